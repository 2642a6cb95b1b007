"""Resolution planning: (image h, w) -> target patch grid (grid_h, grid_w).

Scale rule (native, fixed, uniform, tnormal): the policy gives a scale s; the ideal grid is
(h*s/P, w*s/P). Each side is rounded to the nearest integer (halves up) and raised to at least 1.
If that grid has more than `cap` patches, the budget rule below picks the grid for `cap` instead.

Budget rule (budget:T, and the cap of every other policy; grid_for_budget): among all grids with at
most T patches whose aspect error |log(grid aspect / image aspect)| is at most (1/grid_h + 1/grid_w)/2,
take the one with the most patches, then the smallest aspect error. Half of the bound that nearest
rounding of the ideal sides keeps (1/grid_h + 1/grid_w): with the full bound the most-patches grid is
often a distorted one (mean error 0.060 against SigLIP2's 0.032 at T = 256 on ImageNet-like sizes); with
half, the fill equals SigLIP2's (0.98 T) at a similar mean error and a smaller worst case
(benchmarks/grid_rules.py). A grid's short side is at most sqrt(T), so a search over that side is
exhaustive: O(sqrt(T)) steps, about 30 us in Python, and cached per (h, w, T) since sizes repeat.
If no grid meets the bound (images thinner than about 1.6 T : 1, or tiny T), the ideal grid with each
side floored is used instead. The cap path uses this rule too, so that a capped image also fills the cap.
Properties (tested): never more than T patches; the token count never decreases as T grows (the set
of grids meeting the bound does not depend on T); the aspect error stays within 1/grid_h + 1/grid_w
whenever both ideal sides are >= 1.

NaFlex rule (naflex:T; grid_for_naflex): Hugging Face SigLIP2's image processor
(`get_image_size_for_max_num_patches`): a bisection on the scale in [1e-6, 100] to a width of 1e-5, each
side ceil-rounded to whole patches (at least one); the grid of the largest scale found that has at most
T patches. It fills the budget less well and has a larger aspect error than the budget rule, but it is
the grid SigLIP2 NaFlex checkpoints were trained on.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ._config import Budget, Fixed, NaFlex, Native, PackConfig, ResolutionPolicy, TruncNormal, Uniform
from ._rng import image_rng

ASPECT_SLACK = 0.5  # budget rule: |log aspect error| <= ASPECT_SLACK * (1/grid_h + 1/grid_w)


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
    """The grid for an image scaled by `scale`, rounded per side, or the budget grid for `cap` if larger."""
    gh = max(1, math.floor(h * scale / patch + 0.5))
    gw = max(1, math.floor(w * scale / patch + 0.5))
    if gh * gw <= cap:
        return gh, gw
    return grid_for_budget(h, w, cap)


def floored_grid(h: int, w: int, cap: int) -> tuple[int, int]:
    """The ideal aspect-keeping grid of area `cap`, each side floored (at least 1, product <= cap)."""
    gh = min(cap, max(1, math.floor(math.sqrt(cap * h / w))))
    gw = min(cap // gh, max(1, math.floor(math.sqrt(cap * w / h))))
    return gh, gw


def _aspect_bound(side: int, other: int) -> float:
    """How far |log(grid aspect / image aspect)| may go for a budget grid (see module doc)."""
    return ASPECT_SLACK * (1.0 / side + 1.0 / other)


def _longest_within_bound(side: int, ratio: float, limit: int) -> int:
    """The largest x <= limit whose grid (side, x) meets the budget rule's aspect bound, or 0 if none.

    `ratio` is the image's extent along x over its extent along `side`, so x's ideal is side * ratio.
    log(x / ideal) - bound grows with x and log(ideal / x) - bound shrinks (x >= 1), so the x meeting the
    bound form one interval; this is its top end clipped to limit."""
    ideal = side * ratio
    base = ASPECT_SLACK / side
    # The top end solves x = ideal * exp(base + slack / x). Start above it (x >= 1) and take an even number
    # of fixed-point steps (they alternate around the root and contract), so the estimate stays above it.
    top = ideal * math.exp(base + ASPECT_SLACK)
    for _ in range(4):
        top = ideal * math.exp(base + ASPECT_SLACK / max(1.0, top))
    x = min(limit, math.floor(top))
    while x >= 1 and math.log(x / ideal) > _aspect_bound(side, x):
        x -= 1
    if x < 1 or math.log(ideal / x) > _aspect_bound(side, x):
        return 0
    return x


@functools.lru_cache(maxsize=1 << 16)
def grid_for_budget(h: int, w: int, cap: int) -> tuple[int, int]:
    """The grid with the most patches (<= cap), then the least aspect error, within the aspect bound.

    Cached: image sizes repeat (most ImageNet images are 500 x 375 or 375 x 500)."""
    best_patches, best_err, best = 0, math.inf, None
    aspect = w / h
    stretch = math.exp(ASPECT_SLACK)  # the bound's 1/other term is at most ASPECT_SLACK (other >= 1)
    # Short sides from the largest down: near-ideal grids come first, so the reach test below soon skips the rest.
    for short in range(math.isqrt(cap), 0, -1):
        limit = cap // short
        span = math.exp(ASPECT_SLACK / short) * stretch
        for ratio, tall in ((aspect, False), (1.0 / aspect, True)):
            ideal = short * ratio
            # Skip short sides that cannot win: too few patches even at the longest other side the bound
            # allows, or an other side that must exceed the limit.
            if short * min(limit, ideal * span) < best_patches or ideal > limit * span:
                continue
            other = _longest_within_bound(short, ratio, limit)
            if not other:
                continue
            gh, gw = (other, short) if tall else (short, other)
            err = abs(math.log(gw / gh / aspect))
            if gh * gw > best_patches or (gh * gw == best_patches and err < best_err):
                best_patches, best_err, best = gh * gw, err, (gh, gw)
    return best if best is not None else floored_grid(h, w, cap)


@functools.lru_cache(maxsize=1 << 16)
def grid_for_naflex(h: int, w: int, patch: int, max_patches: int) -> tuple[int, int]:
    """SigLIP2's grid for max_num_patches (module doc): the same bisection, bounds, tolerance and ceil,
    so that the floating-point steps, and hence the grid, are the same as the processor's."""
    def grid_at(scale: float) -> tuple[int, int]:
        return max(1, math.ceil(h * scale / patch)), max(1, math.ceil(w * scale / patch))

    tolerance = 1e-5
    low, high = tolerance / 10, 100.0
    while high - low >= tolerance:
        mid = (low + high) / 2
        gh, gw = grid_at(mid)
        if gh * gw <= max_patches:
            low = mid
        else:
            high = mid
    return grid_at(low)


def plan_grid(h: int, w: int, config: PackConfig, rng: np.random.Generator | None) -> tuple[int, int]:
    """Target grid for an (h, w) image under config.resolution, at most config.max_tokens_per_image patches."""
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    policy = config.resolution
    cap = config.max_tokens_per_image
    if isinstance(policy, Budget):
        return grid_for_budget(h, w, min(cap, policy.tokens))
    if isinstance(policy, NaFlex):
        gh, gw = grid_for_naflex(h, w, config.patch_size, min(cap, policy.tokens))
        # Only images so thin that even the smallest searched scale overflows (> 1e6 : 1 at T = 1); the
        # processor itself fails on them (more patches than max_num_patches). Keep the cap: budget rule.
        return (gh, gw) if gh * gw <= min(cap, policy.tokens) else grid_for_budget(h, w, min(cap, policy.tokens))
    if isinstance(policy, Native):
        return grid_for_scale(h, w, config.patch_size, 1.0, cap)
    r = sample_resolution(policy, rng)
    return grid_for_scale(h, w, config.patch_size, r / math.sqrt(h * w), cap)


def plan_image(h: int, w: int, key: str, config: PackConfig, epoch: int = 0) -> tuple[int, int]:
    """plan_grid with the image's own deterministic generator (seed, key, epoch)."""
    return plan_grid(h, w, config, image_rng(config.seed, key, epoch, "resolution"))
