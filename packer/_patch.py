"""Patchify and its exact inverse. Patches are uint8, flattened (row, col, channel), in row-major (y, x)."""
from __future__ import annotations

import numpy as np


def patchify(pixels: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[gh*P, gw*P, C] -> (patches [gh*gw, P*P*C], pos_y [gh*gw], pos_x [gh*gw]), int32 positions."""
    h, w, c = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    gh, gw = h // patch, w // patch
    patches = pixels.reshape(gh, patch, gw, patch, c).transpose(0, 2, 1, 3, 4).reshape(gh * gw, patch * patch * c)
    pos_y, pos_x = np.divmod(np.arange(gh * gw, dtype=np.int32), np.int32(gw))
    return np.ascontiguousarray(patches), pos_y, pos_x


def unpatchify(patches: np.ndarray, grid_h: int, grid_w: int, patch: int, pos_y: np.ndarray | None = None,
               pos_x: np.ndarray | None = None, fill: int = 128) -> np.ndarray:
    """Inverse of patchify. With positions, places a subset of patches and paints missing ones `fill`."""
    c = patches.shape[1] // (patch * patch)
    if pos_y is None:
        grid = patches.reshape(grid_h, grid_w, patch, patch, c)
    else:
        grid = np.full((grid_h, grid_w, patch, patch, c), fill, dtype=patches.dtype)
        grid[pos_y, pos_x] = patches.reshape(-1, patch, patch, c)
    return grid.transpose(0, 2, 1, 3, 4).reshape(grid_h * patch, grid_w * patch, c)
