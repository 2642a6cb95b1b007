"""Deterministic per-image randomness: every draw is a pure function of (seed, image key, epoch, purpose)."""
from __future__ import annotations

import functools
import hashlib

import numpy as np


@functools.lru_cache(maxsize=256)
def _prefixed(prefix: str, digest_size: int):
    """A blake2b that has taken `prefix`: copied, it hashes prefix + more without hashing the prefix again
    (a third of the cost of a short message hashed whole)."""
    return hashlib.blake2b(prefix.encode("utf-8", "surrogatepass"), digest_size=digest_size)


def _digests(seed: int, keys, epoch: int, purpose: str) -> list[bytes]:
    """blake2b-128 of f"{seed}\\0{epoch}\\0{purpose}\\0{key}" for each key: a pure function of its arguments."""
    prefix = _prefixed(f"{seed}\x00{epoch}\x00{purpose}\x00", 16)
    out = []
    for key in keys:
        h = prefix.copy()
        h.update(key.encode("utf-8", "surrogatepass"))
        out.append(h.digest())
    return out


def _digest(seed: int, key: str, epoch: int, purpose: str) -> bytes:
    return _digests(seed, (key,), epoch, purpose)[0]


def image_rng(seed: int, key: str, epoch: int, purpose: str) -> np.random.Generator:
    """A generator that depends only on its arguments, never on processing order, shard or process."""
    d = _digest(seed, key, epoch, purpose)
    return np.random.Generator(np.random.PCG64(int.from_bytes(d, "little")))


def stable_hash(key: str, salt: str = "") -> int:
    """A 64-bit hash of a key that is the same in every process (unlike Python's hash())."""
    h = _prefixed(f"{salt}\x00", 8).copy()
    h.update(key.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little")


def unit_fraction(seed: int, key: str, epoch: int, purpose: str) -> float:
    """A uniform number in [0, 1) from the same pure function, without building a generator."""
    return int.from_bytes(_digest(seed, key, epoch, purpose)[:8], "little") / 2.0**64


# numpy's SeedSequence (pool of 4 words) and PCG64 seeding, vectorized over many images (see ImageRngs).
_MASK32 = 0xFFFFFFFF
_MULT_A, _MULT_B = 0x931E8875, 0x58F38DED
_HASH_A = [0x43B0D7E5]  # SeedSequence's mixing constants: INIT_A times MULT_A, once per hashmix, and one more
for _ in range(16):
    _HASH_A.append((_HASH_A[-1] * _MULT_A) & _MASK32)
_HASH_B = [0x8B51F9DD]  # generate_state's: INIT_B times MULT_B, once per output word
for _ in range(8):
    _HASH_B.append((_HASH_B[-1] * _MULT_B) & _MASK32)
_MIX_L, _MIX_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)
_SHIFT = np.uint32(16)
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
_MASK64 = (1 << 64) - 1
_DOUBLE_UNIT = 1.0 / 9007199254740992.0  # 2**-53


_A = np.array(_HASH_A, np.uint32)[:, None]  # as columns: row j's constant for the j-th word of a stack
_B = np.array(_HASH_B, np.uint32)[:, None]
_POOL_OUT = [i % 4 for i in range(8)]  # generate_state's word i comes from pool word i mod 4


def _pcg64_seeds(entropy: np.ndarray) -> np.ndarray:
    """[N, 4] uint32 entropy words (a 128-bit seed, least significant word first) -> [N, 4] uint64: per row
    the four words numpy's SeedSequence(seed).generate_state(4, np.uint64) gives. The pool's words are rows
    of one [4, N] stack: each of SeedSequence's hashmix and mix steps runs on every word it touches at once
    (a source word mixes into the other three with independent constants)."""
    pool = (entropy.T ^ _A[0:4]) * _A[1:5]  # hashmix of word i with constant i
    pool ^= pool >> _SHIFT
    k = 4
    for src in range(4):
        dst = [d for d in range(4) if d != src]
        h = (pool[src] ^ _A[k:k + 3]) * _A[k + 1:k + 4]  # hashmix(pool[src]) with constants k, k + 1, k + 2
        h ^= h >> _SHIFT
        r = pool[dst] * _MIX_L - h * _MIX_R
        pool[dst] = r ^ (r >> _SHIFT)
        k += 3
    out = (pool[_POOL_OUT] ^ _B[0:8]) * _B[1:9]
    out ^= out >> _SHIFT
    return np.ascontiguousarray(out.T).view("<u8")


# 128-bit unsigned arithmetic mod 2**128 on (high, low) uint64 arrays, for PCG64's state steps.
_U32 = np.uint64(0xFFFFFFFF)
_S32, _S63, _S1, _S11, _S58 = (np.uint64(k) for k in (32, 63, 1, 11, 58))
_MULT_HI, _MULT_LO = np.uint64(_PCG_MULT >> 64), np.uint64(_PCG_MULT & _MASK64)


def _add128(ah: np.ndarray, al: np.ndarray, bh: np.ndarray, bl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = al + bl
    return ah + bh + (lo < al).astype(np.uint64), lo


def _mul128(ah: np.ndarray, al: np.ndarray, bh: np.uint64, bl: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """(a * b) mod 2**128: the full 64 x 64 product of the low words from 32-bit halves, plus the cross terms."""
    a1, a0, b1, b0 = al >> _S32, al & _U32, bl >> _S32, bl & _U32
    p00, p01, p10 = a0 * b0, a0 * b1, a1 * b0
    mid = (p00 >> _S32) + (p01 & _U32) + (p10 & _U32)
    lo = (p00 & _U32) | (mid << _S32)
    hi = a1 * b1 + (p01 >> _S32) + (p10 >> _S32) + (mid >> _S32) + ah * bl + al * bh
    return hi, lo


def _pcg64_starts(seeds: np.ndarray) -> tuple[tuple, tuple, list]:
    """[N, 4] uint64 SeedSequence words -> per row PCG64's state and inc right after seeding
    (pcg_setseq_128_srandom_r), each as (high, low) uint64 arrays, and the first output's double in [0, 1)
    (XSL-RR of the stepped state, 53 bits, as numpy's next_double)."""
    s0, s1, q0, q1 = (seeds[:, i] for i in range(4))
    inc = (q0 << _S1) | (q1 >> _S63), (q1 << _S1) | np.uint64(1)
    state = _add128(*_mul128(*_add128(*inc, s0, s1), _MULT_HI, _MULT_LO), *inc)
    hi, lo = _add128(*_mul128(*state, _MULT_HI, _MULT_LO), *inc)
    x, rot = hi ^ lo, hi >> _S58
    out = (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))  # rot == 0: x << 0, not x << 64
    return state, inc, ((out >> _S11).astype(np.float64) * _DOUBLE_UNIT).tolist()


def _ints(words: tuple) -> list[int]:
    """(high, low) uint64 arrays -> the 128-bit values as Python ints."""
    return [(h << 64) | l for h, l in zip(words[0].tolist(), words[1].tolist())]


def image_rngs(seed: int, keys: "list[str] | tuple[str, ...]", epoch: int, purposes: "list[str] | tuple[str, ...]") -> dict:
    """{purpose: ImageRngs} of image_rng(seed, key, epoch, purpose) for every key and purpose, all seeded in
    one pass of vector operations (their fixed cost paid once, however many purposes)."""
    digests = b"".join(d for purpose in purposes for d in _digests(seed, keys, epoch, purpose))
    (sh, sl), (ih, il), first = _pcg64_starts(_pcg64_seeds(np.frombuffer(digests, "<u4").reshape(-1, 4)))
    n = len(keys)
    return {purpose: ImageRngs((sh[part], sl[part]), (ih[part], il[part]), first[part])
            for part, purpose in ((slice(j * n, (j + 1) * n), purpose) for j, purpose in enumerate(purposes))}


class ImageRngs:
    """image_rng(seed, key, epoch, purpose) for many keys at once (made by image_rngs), bit for bit the same
    generators: numpy's SeedSequence and PCG64 seeding, and the first draw, run for all keys in a few vector
    operations (about 2 us a key, against 10 us for a generator built alone), which planning every header
    of an epoch on every rank needs. `get(i)` sets one reused generator to key i's starting state: use it
    before the next get."""

    def __init__(self, words: tuple, inc_words: tuple, first: list):
        self._words, self._inc_words, self._first = words, inc_words, first
        self._starts: "tuple[list[int], list[int]] | None" = None  # Python ints for get, made on its first call
        self._bits = np.random.PCG64(0)
        self._rng = np.random.Generator(self._bits)
        self._pcg = {"state": 0, "inc": 0}
        self._state = {"bit_generator": "PCG64", "state": self._pcg, "has_uint32": 0, "uinteger": 0}

    def __len__(self) -> int:
        return len(self._first)

    def get(self, i: int) -> np.random.Generator:
        if self._starts is None:
            self._starts = _ints(self._words), _ints(self._inc_words)
        self._pcg["state"], self._pcg["inc"] = self._starts[0][i], self._starts[1][i]
        self._bits.state = self._state
        return self._rng

    @property
    def first_doubles(self) -> list:
        """Each key's first output as a double in [0, 1) (numpy's next_double), in key order."""
        return self._first

    def first_uniform(self, i: int, low: float, high: float) -> float:
        """get(i).uniform(low, high), bit for bit, without setting a generator: the first output as a double,
        scaled as numpy's random_uniform does."""
        return low + (high - low) * self._first[i]
