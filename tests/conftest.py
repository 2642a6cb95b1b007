"""Shared fixtures: synthetic images made in the test, never files from ../shared."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def make_pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with a few shapes and noise: compresses like a photo, varies everywhere."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 100 * np.sin((x + y) / 17.0)], -1)
    for _ in range(3):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, max(4, min(h, w) // 3))
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(pixels_or_image, fmt: str = "JPEG", **kw) -> bytes:
    img = pixels_or_image if isinstance(pixels_or_image, Image.Image) else Image.fromarray(pixels_or_image)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(h: int, w: int, seed: int = 0, quality: int = 85) -> bytes:
    return encode(make_pixels(h, w, seed), "JPEG", quality=quality)


def image_folder(root, n: int, *, classes: "list[str]", seed: int, sizes: tuple[int, int] = (24, 200),
                 fmt: str = "JPEG", name: str = "img{i:02d}.jpg", noise: bool = False) -> str:
    """n images of random sizes in class sub-folders of `root` (image i in classes[i % len(classes)]); noise:
    random pixels (large files) instead of make_pixels. Returns root as a str."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1], 2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if noise else make_pixels(h, w, seed * 1000 + i)
        (folder / name.format(i=i)).write_bytes(encode(pixels, fmt))
    return str(root)


def random_record(schema, rng: np.random.Generator, specials=(np.inf, -0.0, np.nan),
                  words=("", "a", "nº ✓", "x" * 200, "日本"), int_bound: int | None = None) -> dict:
    """A record of `schema` whose values cover every varint length (or |v| <= `int_bound`), negatives, the
    `specials` floats, and `words` (empty and non-ASCII strings); no cross-field consistency: for codecs."""
    rec = {}
    for f in schema.fields:
        shape = schema.shape(f)
        if f.dtype == "uint8":
            rec[f.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif f.dtype == "int32" and int_bound is not None:
            rec[f.name] = rng.integers(-int_bound, int_bound + 1, shape).astype(np.int32)
        elif f.dtype == "int32":
            scale = 2 ** int(rng.integers(0, 32))
            rec[f.name] = rng.integers(-scale, scale, shape, dtype=np.int64).clip(-2**31, 2**31 - 1).astype(np.int32)
        elif f.dtype == "float32":
            v = rng.standard_normal(shape).astype(np.float32)
            v.reshape(-1)[:len(specials)] = list(specials)[: v.size]
            rec[f.name] = v
        else:
            rec[f.name] = np.array([words[i] for i in rng.integers(0, len(words), shape).reshape(-1)],
                                   dtype=object).reshape(shape)
    return rec


@pytest.fixture
def jpeg_bytes():
    def make(h: int = 120, w: int = 160, seed: int = 0, quality: int = 90) -> bytes:
        return encode(make_pixels(h, w, seed), "JPEG", quality=quality)
    return make

