"""Packed records -> the inputs of Hugging Face's SigLIP2 vision model (numpy only).

SigLIP2 NaFlex takes one image per row: `pixel_values` [B, N, P*P*3] float, the image's patches in
row-major order, flattened (row, col, channel) like navit-pack's, then rescaled by 1/255 and normalized
with mean 0.5, std 0.5 (so x / 127.5 - 1), zero rows after the image; `pixel_attention_mask` [B, N]
int32, 1 for the image's patches; `spatial_shapes` [B, 2] int64, (grid_h, grid_w). Records must hold one
image each (`--max-images-per-seq 1`) with every patch kept (no token drop), and match the model's grid
rule (`--resolution naflex:T`, N = T). timm's NaFlex ViT takes the same patches with `patch_coord`
(= pos_y, pos_x) and `patch_valid` (= segment_ids > 0) instead.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import numpy as np

SIGLIP2_MEAN = 0.5
SIGLIP2_STD = 0.5
SIGLIP2_RESCALE = 1 / 255


def siglip2_inputs(records: Iterable[Mapping[str, np.ndarray]], max_num_patches: Optional[int] = None) -> dict[str, np.ndarray]:
    """Stack single-image records into SigLIP2 inputs (module doc). max_num_patches (N) defaults to the
    records' sequence length; a record whose image has more patches, more than one image, dropped tokens
    or tokens out of row-major order raises ValueError naming the record."""
    rows = list(records)
    if not rows:
        raise ValueError("siglip2_inputs needs at least one record")
    n_max = int(max_num_patches if max_num_patches is not None else len(rows[0]["segment_ids"]))
    dim = int(np.asarray(rows[0]["patches"]).shape[-1])
    pixel_values = np.zeros((len(rows), n_max, dim), np.float32)
    mask = np.zeros((len(rows), n_max), np.int32)
    shapes = np.zeros((len(rows), 2), np.int64)
    for b, r in enumerate(rows):
        key = str(np.asarray(r["image_keys"])[0]) if "image_keys" in r else str(b)
        if int(r["num_images"]) != 1:
            raise ValueError(f"record {b} ({key!r}) holds {int(r['num_images'])} images; SigLIP2 takes one per row: "
                             "pack with --max-images-per-seq 1")
        gh, gw = int(r["grid_h"][0]), int(r["grid_w"][0])
        n = gh * gw
        seg = np.asarray(r["segment_ids"])
        if int((seg == 1).sum()) != n or not (seg[:n] == 1).all():
            raise ValueError(f"record {b} ({key!r}): {int((seg == 1).sum())} of {n} patches kept; SigLIP2 needs the "
                             "whole grid: pack without token drop")
        order = np.asarray(r["pos_y"])[:n].astype(np.int64) * gw + np.asarray(r["pos_x"])[:n]
        if not np.array_equal(order, np.arange(n)):
            raise ValueError(f"record {b} ({key!r}): patches are not in row-major order")
        if n > n_max:
            raise ValueError(f"record {b} ({key!r}): {gh}x{gw} = {n} patches > max_num_patches={n_max}")
        patches = np.asarray(r["patches"])[:n].astype(np.float32)
        pixel_values[b, :n] = (patches * np.float32(SIGLIP2_RESCALE) - np.float32(SIGLIP2_MEAN)) / np.float32(SIGLIP2_STD)
        mask[b, :n] = 1
        shapes[b] = gh, gw
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "spatial_shapes": shapes}
