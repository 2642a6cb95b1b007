"""A prepared image (PatchedImage) and label checks; the transform itself (prepare_image = plan_header +
fill_image) lives in packer._transform."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from ._image import ImageRejected


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

    @property
    def num_tokens(self) -> int:
        return int(self.patches.shape[0])


def check_label(label: Any) -> int:
    """Labels are integers >= -1 (-1: none). NaN, fractions and other values are rejected."""
    if type(label) is int and -1 <= label <= 2**31 - 1:  # the common case, checked first
        return label
    if label is None:
        return -1
    try:
        value = float(label)
    except (TypeError, ValueError):
        raise ImageRejected("bad_label", f"label {label!r} is not a number") from None
    if not np.isfinite(value) or value != int(value) or value < -1 or value > 2**31 - 1:
        raise ImageRejected("bad_label", f"label {label!r} is not an integer in [-1, 2^31)")
    return int(value)
