"""Resolution planning: (image h, w) -> target patch grid (grid_h, grid_w), in closed form.

Rounding rule (stated and tested): the policy gives a scale s; the ideal grid is (h*s/P, w*s/P).
Each side is rounded to the nearest integer (halves up) and raised to at least 1. If that grid has
more than `cap` patches, the ideal is rescaled to exactly `cap` patches and each side is floored
instead (and raised to 1, the other side then limited to cap // side). Rounding keeps
|log(grid aspect / image aspect)| <= 1/grid_h + 1/grid_w whenever both ideal sides are >= 1; only
images thinner than one patch at the chosen scale are distorted, by the 1-patch minimum. The token
count never exceeds the cap and never decreases when the cap grows.
"""
from __future__ import annotations

import math

import numpy as np

from ._config import Budget, Fixed, Native, PackConfig, ResolutionPolicy, TruncNormal, Uniform
from ._rng import image_rng


def _truncated_normal(rng: np.random.Generator, mu: float, sigma: float, low: float, high: float) -> float:
    """Rejection sampling from N(mu, sigma) restricted to [low, high]; mu lies in [low, high], so
    each batch of 64 draws succeeds with overwhelming probability. Bounded: falls back to clipping."""
    for _ in range(64):
        draws = rng.normal(mu, sigma, 64)
        ok = draws[(draws >= low) & (draws <= high)]
        if ok.size:
            return float(ok[0])
    return float(min(max(mu, low), high))


def sample_resolution(policy: ResolutionPolicy, rng: np.random.Generator) -> float | None:
    """Effective resolution R (area R*R) for one image, or None for native/budget policies."""
    if isinstance(policy, Fixed):
        return float(policy.resolution)
    if isinstance(policy, Uniform):
        return float(rng.uniform(policy.rmin, policy.rmax))
    if isinstance(policy, TruncNormal):
        frac = (_truncated_normal(rng, policy.mu, policy.sigma, -1.0, 1.0) + 1.0) / 2.0
        if policy.mode == "side":
            return policy.rmin + frac * (policy.rmax - policy.rmin)
        return math.sqrt(policy.rmin**2 + frac * (policy.rmax**2 - policy.rmin**2))
    return None


def grid_for_scale(h: int, w: int, patch: int, scale: float, cap: int) -> tuple[int, int]:
    """The grid for an image scaled by `scale`, under the rounding rule above, with at most `cap` patches."""
    gh = max(1, math.floor(h * scale / patch + 0.5))
    gw = max(1, math.floor(w * scale / patch + 0.5))
    if gh * gw <= cap:
        return gh, gw
    return grid_for_budget(h, w, cap)


def grid_for_budget(h: int, w: int, cap: int) -> tuple[int, int]:
    """The largest floored aspect-keeping grid with gh * gw <= cap."""
    ideal_h = math.sqrt(cap * h / w)
    ideal_w = math.sqrt(cap * w / h)
    gh = min(cap, max(1, math.floor(ideal_h)))
    gw = min(cap // gh, max(1, math.floor(ideal_w)))
    return gh, gw


def plan_grid(h: int, w: int, config: PackConfig, rng: np.random.Generator | None) -> tuple[int, int]:
    """Target grid for an (h, w) image under config.resolution, at most config.max_tokens_per_image patches."""
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    policy = config.resolution
    cap = config.max_tokens_per_image
    if isinstance(policy, Budget):
        return grid_for_budget(h, w, min(cap, policy.tokens))
    if isinstance(policy, Native):
        return grid_for_scale(h, w, config.patch_size, 1.0, cap)
    r = sample_resolution(policy, rng)
    return grid_for_scale(h, w, config.patch_size, r / math.sqrt(h * w), cap)


def plan_image(h: int, w: int, key: str, config: PackConfig, epoch: int = 0) -> tuple[int, int]:
    """plan_grid with the image's own deterministic generator (seed, key, epoch)."""
    return plan_grid(h, w, config, image_rng(config.seed, key, epoch, "resolution"))
