"""One image, in two steps: plan (what it will be, from its size alone) and fill (its pixels, to the plan).

Every packing decision needs only an image's token count, and that count is a pure function of (display
size, key, epoch, images_seen, config). So `plan_size` (and `plan_header`, which reads the size from the
header: EXIF orientation, bomb check, no pixels) draws the grid and drop rate into an `ImagePlan`, and
`fill_image` decodes, resizes, patchifies and drops to exactly that plan, anywhere, later.
`prepare_image` is both on one header read.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ._config import BetaDrop, ConstDrop, Fixed, Native, NoDrop, PackConfig, TruncNormal, Uniform
from ._drop import beta_shape, choose_kept, kept_count, sample_drop_rate
from ._image import ImageRejected, OpenedImage, read_header
from ._patch import grid_positions, patch_view, patchify
from ._plan import grid_for_budget, plan_grid
from ._process import PatchedImage, check_label
from ._rng import ImageRngs, image_rng, image_rngs


@dataclasses.dataclass(frozen=True)
class Refit:
    """An exact-fill re-plan: the final grid and exactly `tokens` kept tokens (see packer._fill).
    rerender=False keeps a subset of the drawn kept tokens at the drawn grid (no re-decode)."""

    grid_h: int
    grid_w: int
    tokens: int
    drop_rate: float
    rerender: bool


@dataclasses.dataclass(frozen=True, eq=True)
class ImagePlan:
    """What an image will be in its sequence, known before any pixel is decoded.

    orig_h/orig_w are the display size (after EXIF orientation); grid_h/grid_w, num_tokens and drop_rate
    are the drawn plan; `refit`, when set, replaces them (exact fill). `final_*` give the plan filled."""

    key: str
    epoch: int
    images_seen: float
    label: int
    meta: Mapping[str, Any]
    orig_h: int
    orig_w: int
    grid_h: int
    grid_w: int
    num_tokens: int
    drop_rate: float
    refit: Optional[Refit] = None

    __hash__ = None  # meta is a dict

    @classmethod
    def of_values(cls, values: Sequence[Any]) -> "ImagePlan":
        """ImagePlan(*values) without the checks of a frozen dataclass's __init__ (a third of its cost):
        for values that come from a plan (plan_values, a plan file) or from the planner itself."""
        plan = object.__new__(cls)
        plan.__dict__.update(zip(_PLAN_FIELDS, values))
        return plan

    @property
    def final_tokens(self) -> int:
        return self.refit.tokens if self.refit else self.num_tokens

    @property
    def final_grid(self) -> tuple[int, int]:
        return (self.refit.grid_h, self.refit.grid_w) if self.refit else (self.grid_h, self.grid_w)

    @property
    def final_drop_rate(self) -> float:
        return self.refit.drop_rate if self.refit else self.drop_rate

    def with_refit(self, refit: Optional[Refit]) -> "ImagePlan":
        return dataclasses.replace(self, refit=refit)


_PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(ImagePlan))
# An ImagePlan's field values in order, ImagePlan.of_values(values) rebuilds it: how plans go to the fill workers
# (a tuple pickles in a third of the time of the dataclass).
plan_values = operator.attrgetter(*_PLAN_FIELDS)


RngFor = Callable[[str], np.random.Generator]  # an image's generator for a purpose ("resolution", "drop")


def _draws_size(config: PackConfig) -> bool:
    return isinstance(config.resolution, (Uniform, TruncNormal))


def _draws_drop(config: PackConfig) -> bool:
    return not isinstance(config.token_drop, (NoDrop, ConstDrop))


def _drop_draw(config: PackConfig, key: str, epoch: int, images_seen: float, n: int,
               rng: Optional[np.random.Generator] = None) -> tuple[np.random.Generator, float, int]:
    """The image's drop generator, its drawn drop rate and kept count for an n-patch grid. Plan and
    fill both call this, so the generator is in the same state when fill picks the kept tokens."""
    rng = rng if rng is not None else image_rng(config.seed, key, epoch, "drop")
    rate = sample_drop_rate(config.token_drop, rng, n, config.max_tokens_per_image, images_seen)
    return rng, rate, kept_count(n, rate)


class _FirstUniform:
    """Image i's resolution generator where the policy draws one uniform (sample_resolution): that draw
    computed directly (ImageRngs.first_uniform), bit for bit the generator's."""

    __slots__ = ("_rngs", "_i")

    def __init__(self, rngs: ImageRngs, i: int):
        self._rngs, self._i = rngs, i

    def uniform(self, low: float, high: float) -> float:
        return self._rngs.first_uniform(self._i, low, high)


class PlanBlock:
    """The plans of many images of one epoch, made together: their generators seeded at once (image_rngs,
    for the purposes the config draws) and, where `sizes` are given and the policy scales each image by
    one draw (fixed, uniform, native), their grids computed as arrays. `plan(i, ...)` and
    `plan_size(..., rngs=block.of(i))` both give image i's plan exactly as plan_size alone does."""

    def __init__(self, config: PackConfig, keys: Sequence[str], epoch: int,
                 sizes: Optional[Sequence[Optional[tuple[int, int]]]] = None):
        purposes = [p for p, draws in (("resolution", _draws_size(config)), ("drop", _draws_drop(config))) if draws]
        keys = list(keys)
        self.config, self.keys, self.epoch = config, keys, int(epoch)
        self._rngs = image_rngs(config.seed, keys, self.epoch, purposes)
        self._uniform = isinstance(config.resolution, Uniform)  # one uniform draw: no generator needed
        self._sizes = list(sizes) if sizes is not None else [None] * len(keys)
        self._grids = self._block_grids()
        drop = config.token_drop
        # A Beta without a schedule draws with the same shape for every image: set it up once.
        self._beta = beta_shape(drop) if isinstance(drop, BetaDrop) and drop.schedule is None else None

    def _block_grids(self) -> list:
        """Each sized image's (grid_h, grid_w) under a one-draw scale policy (grid_for_scale's steps on
        float64 arrays: the same IEEE operations, so the same grids), None where plan_grid must run."""
        policy, config = self.config.resolution, self.config
        known = [i for i, s in enumerate(self._sizes) if s is not None and s[0] >= 1 and s[1] >= 1]
        grids: list = [None] * len(self._sizes)
        if not known or not isinstance(policy, (Uniform, Fixed, Native)):
            return grids
        h = np.array([self._sizes[i][0] for i in known], np.float64)
        w = np.array([self._sizes[i][1] for i in known], np.float64)
        if isinstance(policy, Native):
            scale = np.ones_like(h)
        else:
            if isinstance(policy, Uniform):
                first = np.array(self._rngs["resolution"].first_doubles, np.float64)[known]
                r = policy.rmin + (policy.rmax - policy.rmin) * first
            else:
                r = np.full_like(h, float(policy.resolution))
            scale = r / np.sqrt(h * w)
        patch = float(config.patch_size)
        gh = np.maximum(1, np.floor(h * scale / patch + 0.5)).astype(np.int64).tolist()
        gw = np.maximum(1, np.floor(w * scale / patch + 0.5)).astype(np.int64).tolist()
        cap = config.max_tokens_per_image
        for i, a, b in zip(known, gh, gw):
            grids[i] = (a, b) if a * b <= cap else grid_for_budget(self._sizes[i][0], self._sizes[i][1], cap)
        return grids

    def _get(self, i: int, purpose: str) -> np.random.Generator:
        if purpose == "resolution" and self._uniform:
            return _FirstUniform(self._rngs[purpose], i)  # type: ignore[return-value]
        return self._rngs[purpose].get(i)

    def of(self, i: int) -> RngFor:
        """Image i's generators, for plan_size or plan_header."""
        return functools.partial(self._get, i)

    def plan(self, i: int, height: int, width: int, *, images_seen: float = 0, label: Any = -1,
             meta: Optional[Mapping[str, Any]] = None) -> ImagePlan:
        """plan_size(height, width, keys[i], config, epoch=epoch, ...) with the block's draws."""
        if self._grids[i] is None or self._sizes[i] != (height, width):
            return plan_size(height, width, self.keys[i], self.config, epoch=self.epoch, images_seen=images_seen,
                             label=label, meta=meta, rngs=self.of(i))
        return self._made(i, images_seen, check_label(label), meta)

    def plans(self, images_seen: Sequence[float], labels: Sequence[Any],
              metas: Sequence[Optional[Mapping[str, Any]]]) -> list[Optional[ImagePlan]]:
        """plan(i, *sizes[i], images_seen=images_seen[i], label=labels[i], meta=metas[i]) of every image in one
        pass (a third of the per-image cost); None where plan() must run alone: a size the block does not
        know, a label that does not check (plan() raises its ImageRejected)."""
        out: list[Optional[ImagePlan]] = []
        for i, grid in enumerate(self._grids):
            try:
                out.append(None if grid is None else self._made(i, images_seen[i], check_label(labels[i]), metas[i]))
            except ImageRejected:
                out.append(None)
        return out

    def _made(self, i: int, images_seen: float, label: int, meta: Optional[Mapping[str, Any]]) -> ImagePlan:
        """Image i's plan at the block's grid: its drop draw (the Beta's shape set up once), then the ImagePlan."""
        grid_h, grid_w = self._grids[i]
        n = grid_h * grid_w
        config = self.config
        if self._beta is not None:  # sample_drop_rate's draw
            rate = float(self._rngs["drop"].get(i).beta(*self._beta) * config.token_drop.max_rate)
        else:
            rate = sample_drop_rate(config.token_drop, self._rngs["drop"].get(i) if "drop" in self._rngs else None, n,
                                    config.max_tokens_per_image, images_seen)
        kept = kept_count(n, rate)
        height, width = self._sizes[i]
        return ImagePlan.of_values((self.keys[i], self.epoch, images_seen, label, dict(meta or {}), height, width,
                                    grid_h, grid_w, kept, 1.0 - kept / n, None))


def plan_size(height: int, width: int, key: str, config: PackConfig, *, epoch: int = 0, images_seen: float = 0,
              label: Any = -1, meta: Optional[Mapping[str, Any]] = None, rngs: Optional[RngFor] = None) -> ImagePlan:
    """The plan of a height x width image (its display size): the planner's one token-count rule, used by
    every pipeline, the advisor and the efficiency sweep. `rngs`: the image's generators when seeded ahead
    (PlanBlock.of), else each is built here."""
    label = check_label(label)
    # Generators only for the policies that draw (building one costs more than the rest of the plan).
    if rngs is None:
        rngs = functools.partial(image_rng, config.seed, key, epoch)
    grid_h, grid_w = plan_grid(height, width, config, rngs("resolution") if _draws_size(config) else None)
    n = grid_h * grid_w
    if _draws_drop(config):
        _, _, kept = _drop_draw(config, key, epoch, images_seen, n, rngs("drop"))
    else:  # no draw: the rate is the policy's
        kept = kept_count(n, sample_drop_rate(config.token_drop, None, n, config.max_tokens_per_image, images_seen))
    return ImagePlan.of_values((key, int(epoch), images_seen, label, dict(meta or {}), height, width, grid_h, grid_w,
                                kept, 1.0 - kept / n, None))


def plan_header(data: bytes, key: str, config: PackConfig, *, epoch: int = 0, images_seen: float = 0,
                label: Any = -1, meta: Optional[Mapping[str, Any]] = None, rngs: Optional[RngFor] = None) -> ImagePlan:
    """Encoded bytes -> ImagePlan from the header alone (no pixel decoding), or ImageRejected
    (empty, undecodable header, too_many_pixels, bad_label)."""
    label = check_label(label)
    head = read_header(data, config.max_pixels)
    return plan_size(head.height, head.width, key, config, epoch=epoch, images_seen=images_seen, label=label, meta=meta,
                     rngs=rngs)


def fill_opened(opened: OpenedImage, plan: ImagePlan, config: PackConfig) -> PatchedImage:
    """fill_image for an image whose header is already read."""
    if (opened.height, opened.width) != (plan.orig_h, plan.orig_w):
        raise ImageRejected("changed", f"planned at {plan.orig_h}x{plan.orig_w}, the bytes are {opened.height}x{opened.width}")
    p = config.patch_size
    refit = plan.refit
    if refit is not None and refit.rerender:
        grid_h, grid_w = refit.grid_h, refit.grid_w
        idx = choose_kept(image_rng(config.seed, plan.key, plan.epoch, "fill"), grid_h * grid_w, refit.tokens)
    else:
        grid_h, grid_w = plan.grid_h, plan.grid_w
        n = grid_h * grid_w
        if isinstance(config.token_drop, NoDrop):  # no draw: building the generator costs more than the rest
            idx = None
        else:
            rng, _, kept = _drop_draw(config, plan.key, plan.epoch, plan.images_seen, n)
            idx = choose_kept(rng, n, kept) if kept < n else None
        if refit is not None:  # a subset of the kept tokens, at the same grid
            sub = choose_kept(image_rng(config.seed, plan.key, plan.epoch, "fill"), n if idx is None else idx.size,
                              refit.tokens)
            idx = sub if idx is None else idx[sub]
    pixels = opened.decode_resized(grid_h * p, grid_w * p, config.background, config.resize)
    if idx is None:
        patches, pos_y, pos_x = patchify(pixels, p)
    else:  # copy the kept patches only
        pos_y, pos_x = grid_positions(grid_h, grid_w)
        pos_y, pos_x = pos_y[idx], pos_x[idx]
        patches = patch_view(pixels, p)[pos_y, pos_x].view(np.uint8).reshape(idx.size, -1)
    grid_h, grid_w = plan.final_grid
    return PatchedImage(key=plan.key, patches=patches, pos_y=pos_y, pos_x=pos_x, grid_h=grid_h, grid_w=grid_w,
                        orig_h=plan.orig_h, orig_w=plan.orig_w, drop_rate=plan.final_drop_rate, label=plan.label,
                        meta=dict(plan.meta))


def fill_image(data: bytes, plan: ImagePlan, config: PackConfig) -> PatchedImage:
    """Decode, resize, patchify and drop `data` to exactly `plan` (plan.final_tokens kept tokens, the
    kept ones drawn per (seed, key, epoch)); ImageRejected when the pixels fail to decode."""
    return fill_opened(OpenedImage(data, config.max_pixels), plan, config)


def prepare_image(data: bytes, key: str, config: PackConfig, *, epoch: int = 0, images_seen: float = 0,
                  label: Any = -1, meta: Mapping[str, Any] | None = None) -> PatchedImage:
    """Encoded image bytes -> PatchedImage, or ImageRejected with a reason: plan_header + fill_image on
    one header read."""
    label = check_label(label)
    opened = OpenedImage(data, config.max_pixels)
    plan = plan_size(opened.height, opened.width, key, config, epoch=epoch, images_seen=images_seen, label=label,
                     meta=meta)
    return fill_opened(opened, plan, config)
