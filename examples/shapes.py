"""A tiny learnable task for the consumer examples and tests: the class is the colour of one shape
(ellipse or box, random size and place) on a noisy grey background, at random sizes and aspect ratios.
Only the shape's patches carry the class, so a model must pool over the right image's tokens."""
from __future__ import annotations

import argparse
import io
import os
import tempfile

import numpy as np
from PIL import Image

import packer
import schemas

COLOURS = ((220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40))


def shape_pixels(rng: np.random.Generator, label: int, min_side: int = 16, max_side: int = 64) -> np.ndarray:
    """One uint8 [h, w, 3] image of class `label`."""
    h, w = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
    img = rng.normal(rng.uniform(60, 200), 20, (h, w, 1)).repeat(3, axis=-1)
    y, x = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.2, 0.4) * h, rng.uniform(0.2, 0.4) * w
    if rng.random() < 0.5:
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
    else:
        inside = (np.abs(y - cy) < ry) & (np.abs(x - cx) < rx)
    img[inside] = np.asarray(COLOURS[label]) + rng.normal(0, 15, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_images(n: int, seed: int = 0, **kw) -> list[tuple[str, bytes, int]]:
    """`n` (key, PNG bytes, label) triples, classes balanced in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % len(COLOURS)
        buf = io.BytesIO()
        Image.fromarray(shape_pixels(rng, label, **kw)).save(buf, format="PNG")
        out.append((f"shape-{seed}-{i:05d}.png", buf.getvalue(), label))
    return out


def packed_shapes(n: int, config: packer.PackConfig, seed: int = 0, **kw) -> list[dict[str, np.ndarray]]:
    """`n` shape images packed with `config` into records (packer.pack_images: the pipelines' path)."""
    return list(packer.pack_images(shape_images(n, seed, **kw), config))


def make_dataset(directory: str, n: int = 96, num_shards: int = 2) -> None:
    """Pack `n` shape images into an Arrow dataset (what `navit-pack pack --format arrow` writes)."""
    config = packer.PackConfig(seq_len=128, patch_size=8, max_images_per_seq=8)
    schemas.write_dataset(directory, packed_shapes(n, config), config=config, fmt="arrow", num_shards=num_shards)


def reader_args(description: str, attention: tuple[str, ...], default_attention: str,
                argv: list[str] | None = None) -> argparse.Namespace:
    """The reader examples' command line: --data, --work-dir, --steps, --batch-size, --attention."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", help="a packed dataset directory (any format schemas.read reads)")
    parser.add_argument("--work-dir", help="where to write the synthetic dataset when --data is not given")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--attention", choices=attention, default=default_attention)
    return parser.parse_args(argv)


def load_records(args: argparse.Namespace) -> tuple[packer.PackConfig, list[dict[str, np.ndarray]], int]:
    """(config, every record, number of classes) of --data, or of a shape dataset written for the run."""
    data = args.data
    if data is None:
        data = os.path.join(args.work_dir or tempfile.mkdtemp(), "packed-arrow")
        make_dataset(data)
    config = packer.PackConfig(**schemas.read_manifest(data)["config"])
    records = list(schemas.read(data))
    return config, records, max(2, int(max(r["labels"].max() for r in records)) + 1)
