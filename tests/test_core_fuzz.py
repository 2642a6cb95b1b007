"""Seeded mutations and truncations of valid image bytes: each gives an image or a typed rejection."""
import numpy as np
import pytest

import packer
from conftest import encode, make_pixels

CONFIG = packer.PackConfig(seq_len=64, patch_size=8, resolution="native", max_pixels=4_000_000)


def mutants(data: bytes, seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        b = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:  # flip a few random bytes
            for pos in rng.integers(0, len(b), rng.integers(1, 8)):
                b[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncate
            b = b[: rng.integers(0, len(b))]
        elif kind == 2:  # overwrite a run in the header region
            start = int(rng.integers(0, min(len(b), 64)))
            b[start:start + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        else:  # duplicate or delete a chunk
            a, c = sorted(rng.integers(0, len(b), 2))
            b = b[:a] + b[c:] if rng.integers(2) else b[:c] + b[a:c] + b[c:]
        yield bytes(b)


@pytest.mark.parametrize("seed,fmt", enumerate(["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]))
def test_mutated_images_decode_or_reject_with_a_reason(seed, fmt):
    data = encode(make_pixels(40, 56, seed=1), fmt)
    outcomes = {"ok": 0, "rejected": 0}
    for case in mutants(data, seed=seed, count=60):
        try:
            im = packer.prepare_image(case, "fuzz", CONFIG)
        except packer.ImageRejected as e:
            assert e.reason in {"empty", "undecodable", "too_many_pixels"}
            outcomes["rejected"] += 1
        else:
            assert im.patches.dtype == np.uint8 and 1 <= im.num_tokens <= CONFIG.seq_len
            outcomes["ok"] += 1
    assert outcomes["rejected"] >= 1, outcomes  # the mutants did reach the reject path
