"""Validated, frozen configuration and the one parser of the spec strings shared by CLI and API.

Spec strings (see docs/core.md):
  resolution: native | fixed:R | budget:T | naflex:T | uniform:RMIN:RMAX | tnormal:RMIN:RMAX:MU:SIGMA:side|area
  token drop: none | const:RATE | beta:MEAN:MAX | resdep:MIN:MAX[:SMIN:SMAX], each optionally followed
              by @sigmoid:RHO_MIN:RHO_MAX:MU:TAU (paper A.5), which then sets the policy's mean rate.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal, Optional, Union

from ._algorithms import ALGORITHMS


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what it accepts."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----------------------------------------------------------------------------- resolution policies
@dataclasses.dataclass(frozen=True)
class Native:
    """The image's own size, rounded to patches (capped by the token budget)."""

    def spec(self) -> str:
        return "native"


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Effective resolution R: area R*R, aspect ratio kept."""

    resolution: float

    def __post_init__(self):
        _require(_finite(self.resolution) and self.resolution > 0, "resolution", f"fixed:R needs R > 0, got {self.resolution}")

    def spec(self) -> str:
        return f"fixed:{self.resolution:g}"


@dataclasses.dataclass(frozen=True)
class _TokenCap:
    """A grid rule capped at `tokens` patches; NAME is its spec prefix."""

    tokens: int
    NAME: ClassVar[str] = ""

    def __post_init__(self):
        _require(isinstance(self.tokens, int) and self.tokens >= 1, "resolution",
                 f"{self.NAME}:T needs an integer T >= 1, got {self.tokens}")

    def spec(self) -> str:
        return f"{self.NAME}:{self.tokens}"


@dataclasses.dataclass(frozen=True)
class Budget(_TokenCap):
    """The largest aspect-keeping grid with at most `tokens` patches (timm / SigLIP2 max_num_patches)."""

    NAME: ClassVar[str] = "budget"


@dataclasses.dataclass(frozen=True)
class NaFlex(_TokenCap):
    """Hugging Face SigLIP2's grid rule for max_num_patches = `tokens`, reproduced exactly (see packer._plan)."""

    NAME: ClassVar[str] = "naflex"


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Effective resolution R ~ U(rmin, rmax) per image (paper A.1 pretraining: 64..256)."""

    rmin: float
    rmax: float

    def __post_init__(self):
        _require(_finite(self.rmin) and _finite(self.rmax) and 0 < self.rmin <= self.rmax, "resolution",
                 f"uniform:RMIN:RMAX needs 0 < RMIN <= RMAX, got {self.rmin}, {self.rmax}")

    def spec(self) -> str:
        return f"uniform:{self.rmin:g}:{self.rmax:g}"


@dataclasses.dataclass(frozen=True)
class TruncNormal:
    """u ~ N(mu, sigma) truncated to [-1, 1], rescaled linearly to [rmin, rmax] as side or as area (paper 3.2)."""

    rmin: float
    rmax: float
    mu: float
    sigma: float
    mode: Literal["side", "area"] = "side"

    def __post_init__(self):
        _require(_finite(self.rmin) and _finite(self.rmax) and 0 < self.rmin <= self.rmax, "resolution",
                 f"tnormal needs 0 < RMIN <= RMAX, got {self.rmin}, {self.rmax}")
        _require(_finite(self.mu) and -1 <= self.mu <= 1, "resolution", f"tnormal MU must be in [-1, 1], got {self.mu}")
        _require(_finite(self.sigma) and 0 < self.sigma <= 10, "resolution", f"tnormal SIGMA must be in (0, 10], got {self.sigma}")
        _require(self.mode in ("side", "area"), "resolution", f"tnormal mode must be side or area, got {self.mode!r}")

    def spec(self) -> str:
        return f"tnormal:{self.rmin:g}:{self.rmax:g}:{self.mu:g}:{self.sigma:g}:{self.mode}"


ResolutionPolicy = Union[Native, Fixed, Budget, NaFlex, Uniform, TruncNormal]
RESOLUTION_HELP = "native | fixed:R | budget:T | naflex:T | uniform:RMIN:RMAX | tnormal:RMIN:RMAX:MU:SIGMA:side|area"


# ----------------------------------------------------------------------------- token-drop policies
@dataclasses.dataclass(frozen=True)
class SigmoidSchedule:
    """rho(n) = rho_min + (rho_max - rho_min) * sigmoid((n - mu) / tau), n = images seen (paper A.5)."""

    rho_min: float
    rho_max: float
    mu: float
    tau: float

    def __post_init__(self):
        _require(_finite(self.rho_min) and _finite(self.rho_max) and 0 <= self.rho_min <= self.rho_max < 1, "token_drop",
                 f"schedule needs 0 <= RHO_MIN <= RHO_MAX < 1, got {self.rho_min}, {self.rho_max}")
        _require(_finite(self.mu), "token_drop", f"schedule MU must be finite, got {self.mu}")
        _require(_finite(self.tau) and self.tau != 0, "token_drop", f"schedule TAU must be non-zero (negative: decreasing), got {self.tau}")

    def rate(self, images_seen: float) -> float:
        z = (images_seen - self.mu) / self.tau
        sig = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
        return self.rho_min + (self.rho_max - self.rho_min) * sig

    def spec(self) -> str:
        return f"@sigmoid:{self.rho_min:g}:{self.rho_max:g}:{self.mu:g}:{self.tau:g}"


@dataclasses.dataclass(frozen=True)
class NoDrop:
    def spec(self) -> str:
        return "none"


@dataclasses.dataclass(frozen=True)
class ConstDrop:
    """Every image drops the same fraction `rate` of its tokens (the schedule, if any, sets the rate)."""

    rate: float
    schedule: Optional[SigmoidSchedule] = None

    def __post_init__(self):
        _require(_finite(self.rate) and 0 <= self.rate < 1, "token_drop", f"const:RATE needs 0 <= RATE < 1, got {self.rate}")

    def spec(self) -> str:
        return f"const:{self.rate:g}" + (self.schedule.spec() if self.schedule else "")


@dataclasses.dataclass(frozen=True)
class BetaDrop:
    """d = u * max_rate, u ~ Beta with mean mean/max_rate and variance 0.3*m*(1-m) (paper A.4)."""

    mean: float
    max_rate: float
    schedule: Optional[SigmoidSchedule] = None

    def __post_init__(self):
        _require(_finite(self.max_rate) and 0 < self.max_rate < 1, "token_drop", f"beta:MEAN:MAX needs 0 < MAX < 1, got {self.max_rate}")
        _require(_finite(self.mean) and 0 < self.mean < self.max_rate, "token_drop",
                 f"beta:MEAN:MAX needs 0 < MEAN < MAX, got {self.mean}, {self.max_rate}")
        if self.schedule:
            _require(0 < self.schedule.rho_min and self.schedule.rho_max < self.max_rate, "token_drop",
                     f"with beta the schedule sets MEAN, so it needs 0 < RHO_MIN <= RHO_MAX < MAX={self.max_rate:g}")

    def spec(self) -> str:
        return f"beta:{self.mean:g}:{self.max_rate:g}" + (self.schedule.spec() if self.schedule else "")


@dataclasses.dataclass(frozen=True)
class ResDepDrop:
    """d ~ N(mu, 0.02) truncated at 2 sigma; mu linear in the image's token count s, from min_rate at
    s_min to max_rate at s_max (paper A.4). s_min/s_max default to 1 and the per-image token cap."""

    min_rate: float
    max_rate: float
    s_min: Optional[int] = None
    s_max: Optional[int] = None
    schedule: Optional[SigmoidSchedule] = None

    def __post_init__(self):
        _require(_finite(self.min_rate) and _finite(self.max_rate) and 0 <= self.min_rate < 1 and 0 <= self.max_rate < 1,
                 "token_drop", f"resdep:MIN:MAX needs rates in [0, 1), got {self.min_rate}, {self.max_rate}")
        if self.s_min is not None or self.s_max is not None:
            _require(isinstance(self.s_min, int) and isinstance(self.s_max, int) and 1 <= self.s_min < self.s_max,
                     "token_drop", f"resdep SMIN:SMAX needs integers 1 <= SMIN < SMAX, got {self.s_min}, {self.s_max}")

    def spec(self) -> str:
        s = f"resdep:{self.min_rate:g}:{self.max_rate:g}"
        if self.s_min is not None:
            s += f":{self.s_min}:{self.s_max}"
        return s + (self.schedule.spec() if self.schedule else "")


DropPolicy = Union[NoDrop, ConstDrop, BetaDrop, ResDepDrop]
DROP_HELP = "none | const:RATE | beta:MEAN:MAX | resdep:MIN:MAX[:SMIN:SMAX], optionally + @sigmoid:RHO_MIN:RHO_MAX:MU:TAU"

PACKERS = tuple(ALGORITHMS)  # the registered packers; the first is the default
FILL_PACKERS = tuple(n for n, a in ALGORITHMS.items() if a.make_filling)  # those that can fill exactly (fill="exact")
DEFAULT_PACKER = PACKERS[0]


def _numbers(field: str, spec: str, parts: list[str], help_text: str, ints: tuple[int, ...] = ()) -> list:
    out = []
    for i, p in enumerate(parts):
        try:
            out.append(int(p) if i in ints else float(p))
        except ValueError:
            raise ConfigError(field, f"cannot parse {spec!r}: {p!r} is not a number; accepted: {help_text}") from None
    return out


def parse_resolution(spec: "str | ResolutionPolicy") -> ResolutionPolicy:
    """Parse a resolution spec string (see RESOLUTION_HELP); policy objects pass through."""
    if not isinstance(spec, str):
        return spec
    name, *args = spec.strip().split(":")
    arity = {"native": 0, "fixed": 1, "budget": 1, "naflex": 1, "uniform": 2, "tnormal": 5}
    if name not in arity or len(args) != arity[name]:
        raise ConfigError("resolution", f"unknown or malformed policy {spec!r}; accepted: {RESOLUTION_HELP}")
    if name == "native":
        return Native()
    if name == "tnormal":
        mode = args[4]
        if mode not in ("side", "area"):
            raise ConfigError("resolution", f"tnormal mode must be side or area, got {mode!r}")
        return TruncNormal(*_numbers("resolution", spec, args[:4], RESOLUTION_HELP), mode=mode)  # type: ignore[arg-type]
    nums = _numbers("resolution", spec, args, RESOLUTION_HELP, ints=(0,) if name in ("budget", "naflex") else ())
    return {"fixed": Fixed, "budget": Budget, "naflex": NaFlex, "uniform": Uniform}[name](*nums)


def parse_drop(spec: "str | DropPolicy") -> DropPolicy:
    """Parse a token-drop spec string (see DROP_HELP); policy objects pass through."""
    if not isinstance(spec, str):
        return spec
    base, _, sched_spec = spec.strip().partition("@")
    schedule = None
    if sched_spec:
        sname, *sargs = sched_spec.split(":")
        if sname != "sigmoid" or len(sargs) != 4:
            raise ConfigError("token_drop", f"malformed schedule {'@' + sched_spec!r}; accepted: @sigmoid:RHO_MIN:RHO_MAX:MU:TAU")
        schedule = SigmoidSchedule(*_numbers("token_drop", spec, sargs, DROP_HELP))
    name, *args = base.split(":")
    if name == "none" and not args:
        if schedule:
            raise ConfigError("token_drop", "none takes no schedule; use const:0@sigmoid:... for a scheduled constant rate")
        return NoDrop()
    if name == "const" and len(args) == 1:
        return ConstDrop(*_numbers("token_drop", spec, args, DROP_HELP), schedule=schedule)
    if name == "beta" and len(args) == 2:
        return BetaDrop(*_numbers("token_drop", spec, args, DROP_HELP), schedule=schedule)
    if name == "resdep" and len(args) in (2, 4):
        nums = _numbers("token_drop", spec, args, DROP_HELP, ints=(2, 3))
        return ResDepDrop(*nums, schedule=schedule)
    raise ConfigError("token_drop", f"unknown or malformed policy {spec!r}; accepted: {DROP_HELP}")


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """Everything that shapes the packed output. Spec strings are parsed and validated on construction.

    max_tokens_per_image defaults to seq_len; max_images_per_seq defaults to seq_len // 16
    (room for 4x4-patch images), at least 1.
    """

    seq_len: int = 256
    patch_size: int = 16
    resolution: "str | ResolutionPolicy" = "native"
    token_drop: "str | DropPolicy" = "none"
    max_images_per_seq: Optional[int] = None
    max_tokens_per_image: Optional[int] = None
    packer: str = DEFAULT_PACKER
    window: int = 1024
    seed: int = 0
    max_pixels: int = 100_000_000
    background: tuple[int, int, int] = (255, 255, 255)
    fill: Literal["none", "exact"] = "none"
    resize: Literal["default", "fast"] = "default"  # resize kernel: antialiased, or linear (faster, less faithful)

    def __post_init__(self):
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        _require(is_int(self.seq_len) and self.seq_len >= 1, "seq_len", f"must be an integer >= 1, got {self.seq_len!r}")
        _require(is_int(self.patch_size) and 1 <= self.patch_size <= 1024, "patch_size", f"must be an integer in [1, 1024], got {self.patch_size!r}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        set_("resolution", parse_resolution(self.resolution))
        set_("token_drop", parse_drop(self.token_drop))
        if self.max_images_per_seq is None:
            set_("max_images_per_seq", max(1, self.seq_len // 16))
        _require(is_int(self.max_images_per_seq) and 1 <= self.max_images_per_seq <= self.seq_len, "max_images_per_seq",
                 f"must be an integer in [1, seq_len={self.seq_len}], got {self.max_images_per_seq!r}")
        if self.max_tokens_per_image is None:
            set_("max_tokens_per_image", self.seq_len)
        _require(is_int(self.max_tokens_per_image) and 1 <= self.max_tokens_per_image <= self.seq_len, "max_tokens_per_image",
                 f"must be an integer in [1, seq_len={self.seq_len}], got {self.max_tokens_per_image!r}")
        if isinstance(self.resolution, (Budget, NaFlex)):
            _require(self.resolution.tokens <= self.seq_len, "resolution",
                     f"{self.resolution.spec()} exceeds seq_len={self.seq_len}; the token budget must be <= the sequence length")
        _require(self.packer in PACKERS, "packer", f"must be one of {', '.join(PACKERS)}, got {self.packer!r}")
        _require(is_int(self.window) and self.window >= 1, "window", f"must be an integer >= 1, got {self.window!r}")
        _require(is_int(self.seed) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")
        _require(is_int(self.max_pixels) and self.max_pixels >= 1, "max_pixels", f"must be an integer >= 1, got {self.max_pixels!r}")
        _require(len(self.background) == 3 and all(is_int(c) and 0 <= c <= 255 for c in self.background), "background",
                 f"must be three integers in [0, 255], got {self.background!r}")
        set_("background", tuple(self.background))
        _require(self.fill in ("none", "exact"), "fill", f"must be none or exact, got {self.fill!r}")
        _require(self.fill == "none" or self.packer in FILL_PACKERS, "fill",
                 f"exact fill needs packer {' or '.join(FILL_PACKERS)}, got packer {self.packer!r}")
        _require(self.resize in ("default", "fast"), "resize", f"must be default or fast, got {self.resize!r}")

    @property
    def token_dim(self) -> int:
        """Length of one flattened patch: P*P*3."""
        return self.patch_size * self.patch_size * 3

    def to_json(self) -> dict:
        """Plain-JSON view, with policies as their spec strings (inverse: PackConfig(**d))."""
        d = dataclasses.asdict(self)
        d["resolution"] = self.resolution.spec()
        d["token_drop"] = self.token_drop.spec()
        d["background"] = list(self.background)
        return d
