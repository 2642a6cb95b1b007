"""Deterministic per-image randomness: every draw is a pure function of (seed, image key, epoch, purpose)."""
from __future__ import annotations

import hashlib

import numpy as np


def _digest(seed: int, key: str, epoch: int, purpose: str) -> bytes:
    msg = f"{seed}\x00{epoch}\x00{purpose}\x00{key}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(msg, digest_size=16).digest()


def image_rng(seed: int, key: str, epoch: int, purpose: str) -> np.random.Generator:
    """A generator that depends only on its arguments, never on processing order, shard or process."""
    d = _digest(seed, key, epoch, purpose)
    return np.random.Generator(np.random.PCG64(int.from_bytes(d, "little")))


def stable_hash(key: str, salt: str = "") -> int:
    """A 64-bit hash of a key that is the same in every process (unlike Python's hash())."""
    return int.from_bytes(hashlib.blake2b(f"{salt}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def unit_fraction(seed: int, key: str, epoch: int, purpose: str) -> float:
    """A uniform number in [0, 1) from the same pure function, without building a generator."""
    return int.from_bytes(_digest(seed, key, epoch, purpose)[:8], "little") / 2.0**64
