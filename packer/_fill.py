"""Exact fill (fill="exact"): re-plan one image so that a sequence closes with no padding (paper 2.3
notes the option; it did not use it). NaViT samples every image's resolution and drop rate at random,
so the packer may choose them for a few images, within the policy's range, to close the gaps.

A re-plan to exactly `target` tokens keeps the aspect ratio: the new grid is one that the planner's own
rounding rule (packer._plan.grid_for_scale) yields for some scale in the policy's range. Its kept tokens
never exceed max_tokens_per_image, but its grid may, by the allowed drop: an image that the planner
capped (floored to the budget, e.g. 14x18 = 252 tokens at L = 256) can then fill its sequence exactly
(14x19 less 10 tokens), nearer the resolution its policy drew. Among those grids it takes the smallest whose size at the image's own
drop rate d0 reaches the target (area >= target / (1 - d0)), or the one just below when that keeps the
drop rate closer to d0; then it drops tokens at random (per (seed, key, epoch)) down to exactly target.

Ranges: uniform/tnormal: effective resolution in [RMIN, RMAX]. fixed:R, native, budget:T and naflex:T have no
range, so the natural one is used: from the policy's own scale down to FILL_MIN_SCALE of it (fill may
lower the resolution, never raise it above what the policy gives). Drop rate: at most the policy's
maximum (beta: MAX; resdep: the larger rate + 2 sigma, + the schedule's shift); none and const have no
range, so they allow FILL_EXTRA_DROP above their rate (the benchmark reports how much is used).

Re-rendering needs the encoded image, which the fill step has (packer._transform.fill_image re-renders
at the re-planned grid); a caller that cannot re-render an image (PackingCore's can_rerender) gets only a
drop-only re-plan for it (same grid, fewer tokens).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from typing import Optional

from ._config import BetaDrop, Budget, ConstDrop, Fixed, NaFlex, NoDrop, PackConfig, ResDepDrop, TruncNormal, Uniform
from ._drop import _MAX_RATE, _RESDEP_SIGMA
from ._plan import plan_grid

FILL_EXTRA_DROP = 0.2  # drop none / const: extra drop rate a re-plan may add (the gap between grid sizes)
FILL_MIN_SCALE = 0.5  # fixed / native / budget / naflex: lowest scale, as a fraction of the policy's own
FILL_DROP_WEIGHT = 0.25  # cost of changing the kept fraction, relative to changing the grid area (both in log)


@dataclasses.dataclass(frozen=True)
class FillPlan:
    """How to re-plan one image to exactly `tokens` tokens."""

    grid_h: int
    grid_w: int
    tokens: int
    drop_rate: float  # realized: 1 - tokens / (grid_h * grid_w)
    cost: float  # see plan_fill
    rerender: bool  # False: same grid, a subset of the kept tokens


def max_fill_drop(config: PackConfig) -> float:
    """The largest drop rate a re-planned image may have under config.token_drop (see module doc)."""
    policy = config.token_drop
    if isinstance(policy, NoDrop):
        return FILL_EXTRA_DROP
    if isinstance(policy, ConstDrop):
        return min(_MAX_RATE, (policy.schedule.rho_max if policy.schedule else policy.rate) + FILL_EXTRA_DROP)
    if isinstance(policy, BetaDrop):
        return policy.max_rate
    if isinstance(policy, ResDepDrop):
        shift = max(0.0, policy.schedule.rho_max - (policy.min_rate + policy.max_rate) / 2) if policy.schedule else 0.0
        return min(_MAX_RATE, max(policy.min_rate, policy.max_rate) + 2 * _RESDEP_SIGMA + shift)
    raise TypeError(f"unknown drop policy {policy!r}")


def scale_range(h: int, w: int, config: PackConfig) -> tuple[float, float]:
    """(smin, smax): the image scales a re-plan may use under config.resolution (see module doc)."""
    policy = config.resolution
    root = math.sqrt(h * w)
    if isinstance(policy, (Uniform, TruncNormal)):
        return policy.rmin / root, policy.rmax / root
    if isinstance(policy, Fixed):
        top = policy.resolution / root
    elif isinstance(policy, (Budget, NaFlex)):
        gh, gw = plan_grid(h, w, config, None)
        top = config.patch_size * math.sqrt(gh * gw) / root
    else:  # Native
        top = 1.0
    return FILL_MIN_SCALE * top, top


@functools.lru_cache(maxsize=8192)
def grid_ladder(h: int, w: int, patch: int, smin: float, smax: float, cap: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """All grids grid_for_scale gives for scales in [smin, smax] with at most `cap` patches, by area.

    Each side is round(side * s / patch) (halves up, at least 1); it steps up by one at the scales
    (k + 0.5) * patch / side, so walking those events in order visits every grid once."""
    a = math.floor(h * smin / patch + 0.5)
    b = math.floor(w * smin / patch + 0.5)
    areas: list[int] = []
    grids: list[tuple[int, int]] = []
    while True:
        grid = (max(1, a), max(1, b))
        area = grid[0] * grid[1]
        if area > cap:
            break
        if not grids or grids[-1] != grid:
            areas.append(area)
            grids.append(grid)
        next_h, next_w = (a + 0.5) * patch / h, (b + 0.5) * patch / w
        step = min(next_h, next_w)
        if step > smax:
            break
        a += next_h == step
        b += next_w == step
    return tuple(areas), tuple(grids)


def plan_fill(h: int, w: int, grid_h: int, grid_w: int, num_tokens: int, drop_rate: float, target: int,
              config: PackConfig, rerender: bool = True) -> Optional[FillPlan]:
    """The cheapest re-plan of an (h, w) image, now grid_h x grid_w with num_tokens kept, to exactly
    `target` tokens, or None when the policy's ranges do not allow it. Needs sizes only (no pixels).

    Candidates: the ladder grids just below and just above the area that keeps the drop rate, and the
    current grid (a subset of the kept tokens: no decoding). Cost: |log(area ratio)| (twice the
    resolution shift in log) + FILL_DROP_WEIGHT * |log(kept-fraction ratio)|; it is never below
    FILL_DROP_WEIGHT * |log(target / num_tokens)|, the bound ExactFillWindow is told."""
    limit = max_fill_drop(config)
    cap = config.max_tokens_per_image
    if target > cap:
        return None
    area0 = grid_h * grid_w
    options = []
    if target <= num_tokens:
        options.append((grid_h, grid_w))
    if rerender:
        smin, smax = scale_range(h, w, config)
        areas, grids = grid_ladder(h, w, config.patch_size, smin, smax, math.floor(cap / (1.0 - limit)))
        k = bisect.bisect_left(areas, target / (1.0 - drop_rate) - 1e-9)
        options.extend(grids[j] for j in (k - 1, k) if 0 <= j < len(areas))
    best = None
    for gh, gw in options:
        area = gh * gw
        rate = 1.0 - target / area
        if area < target or rate > limit:
            continue
        cost = abs(math.log(area / area0)) + FILL_DROP_WEIGHT * abs(math.log((1.0 - rate) / (1.0 - drop_rate)))
        if best is None or cost < best.cost:
            same = (gh, gw) == (grid_h, grid_w) and target <= num_tokens
            best = FillPlan(gh, gw, target, rate, cost, not same)
    return best
