"""The per-image transform that Beam and tf.data both wrap: bytes -> decode -> plan -> resize ->
patchify -> drop. Pure: the result depends only on (bytes, key, config, epoch, images_seen)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from ._config import NoDrop, PackConfig
from ._drop import choose_kept, kept_count, sample_drop_rate
from ._image import ImageRejected, OpenedImage
from ._patch import grid_positions, patch_view, patchify
from ._plan import plan_grid
from ._rng import image_rng


@dataclasses.dataclass(frozen=True)
class FillSource:
    """What re-rendering an image needs (fill="exact"): its encoded bytes (a reference, not a copy)
    and the epoch of its random draws."""

    data: bytes
    epoch: int


@dataclasses.dataclass
class PatchedImage:
    """One image, ready to pack: its kept patches with (y, x) positions and its metadata."""

    key: str
    patches: np.ndarray  # uint8 [n, P*P*3]
    pos_y: np.ndarray  # int32 [n]
    pos_x: np.ndarray  # int32 [n]
    grid_h: int
    grid_w: int
    orig_h: int
    orig_w: int
    drop_rate: float  # realized: 1 - n / (grid_h * grid_w)
    label: int = -1
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: Optional[FillSource] = dataclasses.field(default=None, repr=False, compare=False)  # fill="exact" only

    @property
    def num_tokens(self) -> int:
        return int(self.patches.shape[0])


def check_label(label: Any) -> int:
    """Labels are integers >= -1 (-1: none). NaN, fractions and other values are rejected."""
    if label is None:
        return -1
    try:
        value = float(label)
    except (TypeError, ValueError):
        raise ImageRejected("bad_label", f"label {label!r} is not a number") from None
    if not np.isfinite(value) or value != int(value) or value < -1 or value > 2**31 - 1:
        raise ImageRejected("bad_label", f"label {label!r} is not an integer in [-1, 2^31)")
    return int(value)


def prepare_image(data: bytes, key: str, config: PackConfig, *, epoch: int = 0, images_seen: float = 0,
                  label: Any = -1, meta: Mapping[str, Any] | None = None) -> PatchedImage:
    """Encoded image bytes -> PatchedImage, or ImageRejected with a reason."""
    label = check_label(label)
    opened = OpenedImage(data, config.max_pixels)
    grid_h, grid_w = plan_grid(opened.height, opened.width, config, image_rng(config.seed, key, epoch, "resolution"))
    p = config.patch_size
    pixels = opened.decode_resized(grid_h * p, grid_w * p, config.background, config.resize)
    n = grid_h * grid_w
    # NoDrop draws nothing: building its generator would cost more than the rest of this function.
    rng = None if isinstance(config.token_drop, NoDrop) else image_rng(config.seed, key, epoch, "drop")
    rate = sample_drop_rate(config.token_drop, rng, n, config.max_tokens_per_image, images_seen)
    kept = kept_count(n, rate)
    if kept < n:
        pos_y, pos_x = grid_positions(grid_h, grid_w)
        idx = choose_kept(rng, n, kept)
        pos_y, pos_x = pos_y[idx], pos_x[idx]
        patches = patch_view(pixels, p)[pos_y, pos_x].view(np.uint8).reshape(kept, -1)  # copies kept patches only
    else:
        patches, pos_y, pos_x = patchify(pixels, p)
    return PatchedImage(key=key, patches=patches, pos_y=pos_y, pos_x=pos_x, grid_h=grid_h, grid_w=grid_w,
                        orig_h=opened.height, orig_w=opened.width, drop_rate=1.0 - kept / n, label=label,
                        meta=dict(meta or {}), source=FillSource(data, epoch) if config.fill == "exact" else None)
