"""Patchify and its exact inverse. Patches are uint8, flattened (row, col, channel), in row-major (y, x)."""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4096)
def grid_positions(grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """(pos_y, pos_x) of a grid_h x grid_w grid in row-major order, int32, read-only (shared between images)."""
    pos_y, pos_x = np.divmod(np.arange(grid_h * grid_w, dtype=np.int32), np.int32(grid_w))
    pos_y.flags.writeable = False
    pos_x.flags.writeable = False
    return pos_y, pos_x


def patch_view(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[gh*P, gw*P, C] -> a strided view [gh, gw, P, P*C/k] of k-byte words (no copy); indexing it with
    (pos_y, pos_x) copies just those patches. Whole words make the copy move 8 bytes per element, not 1."""
    h, w, c = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    row = patch * c
    word = next(dt for dt in (np.uint64, np.uint32, np.uint16, np.uint8) if row % np.dtype(dt).itemsize == 0)
    words = np.ascontiguousarray(pixels).reshape(h, w * c).view(word)
    return words.reshape(h // patch, patch, w // patch, row // np.dtype(word).itemsize).transpose(0, 2, 1, 3)


def patchify(pixels: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[gh*P, gw*P, C] -> (patches [gh*gw, P*P*C], pos_y [gh*gw], pos_x [gh*gw]), int32 positions (read-only)."""
    view = patch_view(pixels, patch)
    gh, gw = view.shape[:2]
    patches = np.empty(view.shape, view.dtype)
    patches[...] = view
    return patches.view(np.uint8).reshape(gh * gw, -1), *grid_positions(gh, gw)


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
