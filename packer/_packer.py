"""Packed records: PatchedImages in, one fixed-length record (a dict of numpy arrays) out, and back."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import numpy as np

from ._config import PackConfig
from ._process import PatchedImage

# Per-image record fields, padded to max_images_per_seq, with their dtype and padding value.
PER_IMAGE_FIELDS: dict[str, tuple[Any, Any]] = {
    "labels": (np.int32, -1),
    "grid_h": (np.int32, 0),
    "grid_w": (np.int32, 0),
    "orig_h": (np.int32, 0),
    "orig_w": (np.int32, 0),
    "num_tokens": (np.int32, 0),
    "drop_rates": (np.float32, 0.0),
}
META_PREFIX = "meta_"


def meta_text(value: Any) -> str:
    """Pass-through metadata is stored as text: strings as they are, anything else as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def build_record(images: list[PatchedImage], config: PackConfig, meta_fields: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """One packed sequence from `images` (which must fit), filled by vectorized copies (each token is
    copied once; only the padding is zeroed)."""
    L, E = config.seq_len, config.max_images_per_seq
    counts = [im.patches.shape[0] for im in images]
    total, k = sum(counts), len(images)
    if total > L or k > E or k == 0:
        raise ValueError(f"cannot pack {k} images with {total} tokens into L={L}, max_images_per_seq={E}")
    patches = np.empty((L, config.token_dim), np.uint8)
    np.concatenate([im.patches for im in images], out=patches[:total])
    patches[total:] = 0
    segment_ids = np.zeros(L, np.int32)
    segment_ids[:total] = np.repeat(np.arange(1, k + 1, dtype=np.int32), counts)
    positions = np.zeros((2, L), np.int32)
    np.concatenate([im.pos_y for im in images], out=positions[0, :total])
    np.concatenate([im.pos_x for im in images], out=positions[1, :total])
    record = {"patches": patches, "segment_ids": segment_ids, "pos_y": positions[0], "pos_x": positions[1],
              "num_images": np.int32(k)}
    keys = np.full(E, "", dtype=object)
    keys[:k] = [im.key for im in images]
    record["image_keys"] = keys
    ints = np.zeros((6, E), np.int32)  # labels, grid_h, grid_w, orig_h, orig_w, num_tokens
    ints[:, :k] = np.array([(im.label, im.grid_h, im.grid_w, im.orig_h, im.orig_w, n)
                            for im, n in zip(images, counts)], np.int32).T
    ints[0, k:] = PER_IMAGE_FIELDS["labels"][1]
    for row, name in enumerate(("labels", "grid_h", "grid_w", "orig_h", "orig_w", "num_tokens")):
        record[name] = ints[row]
    drop_rates = np.zeros(E, np.float32)
    drop_rates[:k] = [im.drop_rate for im in images]
    record["drop_rates"] = drop_rates
    for name in meta_fields:
        arr = np.full(E, "", dtype=object)
        arr[:k] = [meta_text(im.meta.get(name)) for im in images]
        record[META_PREFIX + name] = arr
    return record


def unpack(record: Mapping[str, np.ndarray]) -> list[PatchedImage]:
    """The images of a packed record, exactly as they were packed (inverse of build_record)."""
    k = int(record["num_images"])
    seg = np.asarray(record["segment_ids"])
    meta_names = [n[len(META_PREFIX):] for n in record if n.startswith(META_PREFIX)]
    out = []
    for i in range(k):
        sel = seg == i + 1
        meta = {name: str(record[META_PREFIX + name][i]) for name in meta_names}
        out.append(PatchedImage(
            key=str(record["image_keys"][i]), patches=np.asarray(record["patches"])[sel],
            pos_y=np.asarray(record["pos_y"])[sel], pos_x=np.asarray(record["pos_x"])[sel],
            grid_h=int(record["grid_h"][i]), grid_w=int(record["grid_w"][i]),
            orig_h=int(record["orig_h"][i]), orig_w=int(record["orig_w"][i]),
            drop_rate=float(record["drop_rates"][i]), label=int(record["labels"][i]), meta=meta))
    return out
