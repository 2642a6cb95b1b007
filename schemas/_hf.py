"""Packed records -> the inputs of one-image-per-row NaFlex vision models (numpy only, no framework).

Hugging Face's SigLIP2 (`siglip2_inputs`): `pixel_values` [B, N, P*P*3] float, the image's patches in
row-major order, flattened (row, col, channel) like navit-pack's, then rescaled by 1/255 and normalized
with mean 0.5, std 0.5 (so x / 127.5 - 1), zero rows after the image; `pixel_attention_mask` [B, N]
int32, 1 for the image's patches; `spatial_shapes` [B, 2] int64, (grid_h, grid_w).

timm's NaFlex ViT (`timm_naflex_inputs`, timm.models.naflexvit), as timm's NaFlexCollator batches them:
`patches` [B, N, P*P*3] float32, each patch flattened (row, col, channel) as timm's Patchify does with
channels_last, normalized per channel as ToTensor + Normalize(mean, std) do, (x / 255 - mean) / std,
zero rows after the image; `patch_coord` [B, N, 2] int64, (y, x) = (pos_y, pos_x), 0 after the image;
`patch_valid` [B, N] bool. mean and std default to timm's ImageNet defaults; a model's own are in its
pretrained config (timm.data.resolve_data_config(model=model)): naflexvit's configs use 0.5, 0.5.

Both take records holding one image each (`--max-images-per-seq 1`) with every patch kept (no token
drop: timm infers each image's grid from the largest patch_coord), packed with the model's patch size
and a token budget within N (`--resolution naflex:T`, N >= T).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

SIGLIP2_MEAN = 0.5
SIGLIP2_STD = 0.5
SIGLIP2_RESCALE = 1 / 255
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN / _STD
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _single_images(records: Iterable[Mapping[str, np.ndarray]], max_num_patches: Optional[int], model: str,
                   row_major: bool) -> tuple[list, int, int, Iterator[tuple[int, int, int, int, Mapping]]]:
    """Checked rows for a one-image-per-row model: (rows, N, D, iterator of (b, n, grid_h, grid_w, record)).
    ValueError naming the record for more than one image, dropped tokens, too many patches or (row_major)
    patches out of row-major order."""
    rows = list(records)
    if not rows:
        raise ValueError(f"{model} inputs need at least one record")
    n_max = int(max_num_patches if max_num_patches is not None else len(rows[0]["segment_ids"]))
    dim = int(np.asarray(rows[0]["patches"]).shape[-1])

    def checked():
        for b, r in enumerate(rows):
            key = str(np.asarray(r["image_keys"])[0]) if "image_keys" in r else str(b)
            if int(r["num_images"]) != 1:
                raise ValueError(f"record {b} ({key!r}) holds {int(r['num_images'])} images; {model} takes one per "
                                 "row: pack with --max-images-per-seq 1")
            gh, gw = int(r["grid_h"][0]), int(r["grid_w"][0])
            n = gh * gw
            seg = np.asarray(r["segment_ids"])
            if int((seg == 1).sum()) != n or not (seg[:n] == 1).all():
                raise ValueError(f"record {b} ({key!r}): {int((seg == 1).sum())} of {n} patches kept; {model} needs "
                                 "the whole grid: pack without token drop")
            if row_major:
                order = np.asarray(r["pos_y"])[:n].astype(np.int64) * gw + np.asarray(r["pos_x"])[:n]
                if not np.array_equal(order, np.arange(n)):
                    raise ValueError(f"record {b} ({key!r}): patches are not in row-major order")
            if n > n_max:
                raise ValueError(f"record {b} ({key!r}): {gh}x{gw} = {n} patches > max_num_patches={n_max}")
            if np.asarray(r["patches"]).shape[-1] != dim:
                raise ValueError(f"record {b} ({key!r}): patches of {np.asarray(r['patches']).shape[-1]} values, "
                                 f"record 0's have {dim}")
            yield b, n, gh, gw, r

    return rows, n_max, dim, checked()


def siglip2_inputs(records: Iterable[Mapping[str, np.ndarray]], max_num_patches: Optional[int] = None) -> dict[str, np.ndarray]:
    """Stack single-image records into SigLIP2 inputs (module doc). max_num_patches (N) defaults to the
    records' sequence length; a record whose image has more patches, more than one image, dropped tokens
    or tokens out of row-major order raises ValueError naming the record."""
    rows, n_max, dim, checked = _single_images(records, max_num_patches, "SigLIP2", row_major=True)
    pixel_values = np.zeros((len(rows), n_max, dim), np.float32)
    mask = np.zeros((len(rows), n_max), np.int32)
    shapes = np.zeros((len(rows), 2), np.int64)
    for b, n, gh, gw, r in checked:
        patches = np.asarray(r["patches"])[:n].astype(np.float32)
        pixel_values[b, :n] = (patches * np.float32(SIGLIP2_RESCALE) - np.float32(SIGLIP2_MEAN)) / np.float32(SIGLIP2_STD)
        mask[b, :n] = 1
        shapes[b] = gh, gw
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def timm_naflex_inputs(records: Iterable[Mapping[str, np.ndarray]], max_num_patches: Optional[int] = None, *,
                       mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                       std: Sequence[float] = IMAGENET_DEFAULT_STD) -> dict[str, np.ndarray]:
    """Stack single-image records into the input dict of timm's NaFlex ViT (module doc): `patches`,
    `patch_coord`, `patch_valid`, as numpy arrays (torch.from_numpy each for the model). max_num_patches
    (N) defaults to the records' sequence length; mean and std (one value per channel, or one for all)
    to timm's ImageNet defaults. A record with more than one image, dropped tokens or more than N
    patches raises ValueError naming the record."""
    rows, n_max, dim, checked = _single_images(records, max_num_patches, "timm NaFlex ViT", row_major=False)
    mean_c = np.broadcast_to(np.asarray(mean, np.float32).reshape(-1), (3,))
    std_c = np.broadcast_to(np.asarray(std, np.float32).reshape(-1), (3,))
    if dim % 3 or (std_c <= 0).any():
        raise ValueError(f"patches of {dim} values are not P*P*3 RGB, or std {tuple(std)} is not positive")
    patches = np.zeros((len(rows), n_max, dim), np.float32)
    coord = np.zeros((len(rows), n_max, 2), np.int64)
    valid = np.zeros((len(rows), n_max), bool)
    for b, n, _, _, r in checked:
        pixels = np.asarray(r["patches"])[:n].reshape(n, -1, 3).astype(np.float32) / np.float32(255)
        patches[b, :n] = ((pixels - mean_c) / std_c).reshape(n, dim)
        coord[b, :n, 0] = np.asarray(r["pos_y"])[:n]
        coord[b, :n, 1] = np.asarray(r["pos_x"])[:n]
        valid[b, :n] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}
