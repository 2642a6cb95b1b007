"""Per-image token dropping (paper 2.2, A.4, A.5). Kept tokens keep their positions and order."""
from __future__ import annotations

import numpy as np

from ._config import BetaDrop, ConstDrop, DropPolicy, NoDrop, ResDepDrop

_BETA_VARIANCE_FACTOR = 0.3  # paper A.4: variance 0.3 * u_mu * (1 - u_mu)
_RESDEP_SIGMA = 0.02
_MAX_RATE = 0.999


def sample_drop_rate(policy: DropPolicy, rng: np.random.Generator, num_tokens: int, max_tokens: int,
                     images_seen: float = 0) -> float:
    """Drop rate for one image with `num_tokens` tokens. A schedule, when present, sets the mean rate
    from images_seen: const -> the rate; beta -> MEAN; resdep -> the line shifted so its midpoint is rho."""
    if isinstance(policy, NoDrop):
        return 0.0
    rho = policy.schedule.rate(images_seen) if policy.schedule else None
    if isinstance(policy, ConstDrop):
        return policy.rate if rho is None else rho
    if isinstance(policy, BetaDrop):
        a, b = beta_shape(policy, rho)
        return float(rng.beta(a, b) * policy.max_rate)
    if isinstance(policy, ResDepDrop):
        s_min = policy.s_min if policy.s_min is not None else 1
        s_max = policy.s_max if policy.s_max is not None else max(max_tokens, s_min + 1)
        frac = min(max((num_tokens - s_min) / (s_max - s_min), 0.0), 1.0)
        mu = policy.min_rate + frac * (policy.max_rate - policy.min_rate)
        if rho is not None:
            mu += rho - (policy.min_rate + policy.max_rate) / 2
        for _ in range(64):  # truncated at 2 sigma by rejection: each draw is accepted with p = 0.95
            d = rng.normal(mu, _RESDEP_SIGMA)
            if abs(d - mu) <= 2 * _RESDEP_SIGMA:
                break
        else:
            d = mu
        return float(min(max(d, 0.0), _MAX_RATE))
    raise TypeError(f"unknown drop policy {policy!r}")


def beta_shape(policy: BetaDrop, rho: "float | None" = None) -> tuple[float, float]:
    """The Beta's (a, b) for a mean drop rate of policy.mean (or the schedule's `rho`)."""
    m = (policy.mean if rho is None else rho) / policy.max_rate
    concentration = 1.0 / _BETA_VARIANCE_FACTOR - 1.0  # a + b, so that var = m(1-m)/(a+b+1)
    return m * concentration, (1.0 - m) * concentration


def kept_count(num_tokens: int, rate: float) -> int:
    """Tokens kept at drop rate `rate`: round(n * (1 - rate)), at least one."""
    return max(1, min(num_tokens, int(num_tokens * (1.0 - rate) + 0.5)))


def choose_kept(rng: np.random.Generator, num_tokens: int, kept: int) -> np.ndarray:
    """Sorted indices of the `kept` tokens to keep, uniformly at random."""
    if kept >= num_tokens:
        return np.arange(num_tokens)
    return np.sort(rng.choice(num_tokens, kept, replace=False))
