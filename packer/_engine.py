"""The one packing core every pipeline runs: plan, decide, fill, assemble.

Every packing decision depends only on each image's token count, and that count is a pure function of
(header size, key, epoch, images_seen, config). So:

1. plan (`plan_header`): read the header (size, EXIF orientation, bomb check; no pixels) and draw the
   grid and the drop rate: an `ImagePlan`. Microseconds.
2. decide (`PackingCore.add`/`flush`): the packer assigns plans to sequences on token counts alone and
   returns `Decision`s (numbered, with each image's plan and the caller's provenance, in slot order).
   Exact fill re-plans a few images here, on sizes alone (`ImagePlan.refit`).
3. fill (`fill_image`): decode, resize, patchify and drop one image to exactly its plan; independent per
   image, so it runs anywhere (worker processes: packer._workers.FillPool).
4. assemble (`assemble`, `assemble_into`): the record of a decision from its filled images.

Failed fill rule. An image whose header planned but whose pixels fail (ImageRejected from fill_image,
or `worker_crashed` when the process filling it died) is left out of its sequence: the other images
keep their order, their segment ids renumber 1..k and the sequence's tokens stay packed from the start,
so the failed image's tokens become padding at the end. The record is exactly `build_record` of the
remaining images (a sequence whose every image failed is all padding, num_images 0). The image is
reported as a `FillReject` and counted by `PackingCore.fill_failed` as a reject with its reason.
Deterministic: the same bytes fail the same way in every process.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from ._algorithms import make_algorithm
from ._config import ConstDrop, NoDrop, PackConfig, TruncNormal, Uniform
from ._drop import choose_kept, kept_count, sample_drop_rate
from ._fill import plan_fill, refit_image
from ._image import ImageRejected, JpegHeader, OpenedImage, read_header
from ._packer import META_PREFIX, PER_IMAGE_FIELDS, build_record, meta_text
from ._patch import grid_positions, patch_view, patchify
from ._plan import plan_grid
from ._process import FillSource, PatchedImage, check_label
from ._rng import image_rng

CORE_STATE_VERSION = 1
MAX_REJECT_EXAMPLES = 20  # the core keeps this many recent rejects (key, reason, detail); counts are complete
FRACTION_MIN_IMAGES = 100  # a fractional reject budget is checked from this many images seen on
NUMERIC_FIELDS = ("patches", "segment_ids", "pos_y", "pos_x", "num_images") + tuple(PER_IMAGE_FIELDS)


class RejectBudgetExceeded(RuntimeError):
    """More images were rejected than the budget allows; `counts` has the rejects by reason,
    `examples` the most recent ones ({key, reason, detail})."""

    def __init__(self, message: str, counts: dict[str, int], examples: list[dict]):
        super().__init__(message)
        self.counts = counts
        self.examples = examples


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

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ImagePlan":
        d = dict(d)
        d["refit"] = Refit(**d["refit"]) if d.get("refit") else None
        return cls(**d)


def _drop_draw(config: PackConfig, key: str, epoch: int, images_seen: float, n: int) -> tuple[np.random.Generator, float, int]:
    """The image's drop generator, its drawn drop rate and kept count for an n-patch grid. Plan and
    fill both call this, so the generator is in the same state when fill picks the kept tokens."""
    rng = image_rng(config.seed, key, epoch, "drop")
    rate = sample_drop_rate(config.token_drop, rng, n, config.max_tokens_per_image, images_seen)
    return rng, rate, kept_count(n, rate)


def plan_opened(opened: "OpenedImage | JpegHeader", key: str, config: PackConfig, *, epoch: int = 0, images_seen: float = 0,
                label: Any = -1, meta: Optional[Mapping[str, Any]] = None) -> ImagePlan:
    """plan_header for an image whose header is already read (only its display height and width count)."""
    label = check_label(label)
    # Generators only for the policies that draw (building one costs more than the rest of the plan).
    random_size = isinstance(config.resolution, (Uniform, TruncNormal))
    rng = image_rng(config.seed, key, epoch, "resolution") if random_size else None
    grid_h, grid_w = plan_grid(opened.height, opened.width, config, rng)
    n = grid_h * grid_w
    if isinstance(config.token_drop, (NoDrop, ConstDrop)):  # no draw: the rate is the policy's
        kept = kept_count(n, sample_drop_rate(config.token_drop, None, n, config.max_tokens_per_image, images_seen))
    else:
        _, _, kept = _drop_draw(config, key, epoch, images_seen, n)
    return ImagePlan(key=key, epoch=int(epoch), images_seen=images_seen, label=label, meta=dict(meta or {}),
                     orig_h=opened.height, orig_w=opened.width, grid_h=grid_h, grid_w=grid_w, num_tokens=kept,
                     drop_rate=1.0 - kept / n)


def plan_header(data: bytes, key: str, config: PackConfig, *, epoch: int = 0, images_seen: float = 0,
                label: Any = -1, meta: Optional[Mapping[str, Any]] = None) -> ImagePlan:
    """Encoded bytes -> ImagePlan from the header alone (no pixel decoding), or ImageRejected
    (empty, undecodable header, too_many_pixels, bad_label)."""
    label = check_label(label)
    return plan_opened(read_header(data, config.max_pixels), key, config, epoch=epoch, images_seen=images_seen,
                       label=label, meta=meta)


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


@dataclasses.dataclass(frozen=True)
class Decision:
    """One sequence the packer closed: number `seq` (0, 1, ... in decision order) and its images'
    (plan, provenance) in slot order."""

    seq: int
    items: tuple[tuple[ImagePlan, Any], ...]

    @property
    def plans(self) -> list[ImagePlan]:
        return [p for p, _ in self.items]

    @property
    def provenances(self) -> list[Any]:
        return [prov for _, prov in self.items]

    @property
    def tokens(self) -> int:
        return sum(p.final_tokens for p, _ in self.items)


@dataclasses.dataclass(frozen=True)
class FillReject:
    """An image of a decision whose fill failed (see the module doc): its slot, key, reason, detail."""

    slot: int
    key: str
    reason: str
    detail: str
    provenance: Any
    tokens: int


Filled = Union[PatchedImage, ImageRejected]


def _check_filled(plan: ImagePlan, image: PatchedImage) -> None:
    if image.num_tokens != plan.final_tokens:
        raise ValueError(f"image {plan.key!r} was filled with {image.num_tokens} tokens, its plan has {plan.final_tokens}")


def assemble_into(out: Mapping[str, np.ndarray], decision: Decision, filled: Sequence[Filled],
                  config: PackConfig) -> list[FillReject]:
    """Write the numeric fields of `decision`'s record (NUMERIC_FIELDS) into preallocated arrays `out`
    (e.g. one row of a shared-memory batch); returns the failed fills. See the module doc."""
    if len(filled) != len(decision.items):
        raise ValueError(f"decision {decision.seq} has {len(decision.items)} images, got {len(filled)} filled")
    ok: list[PatchedImage] = []
    rejects = []
    for slot, ((plan, prov), im) in enumerate(zip(decision.items, filled)):
        if isinstance(im, ImageRejected):
            rejects.append(FillReject(slot, plan.key, im.reason, im.detail, prov, plan.final_tokens))
        else:
            _check_filled(plan, im)
            ok.append(im)
    counts = [im.num_tokens for im in ok]
    total, k = sum(counts), len(ok)
    if total > config.seq_len or k > config.max_images_per_seq:
        raise ValueError(f"cannot pack {k} images with {total} tokens into L={config.seq_len}")
    patches, seg, pos_y, pos_x = out["patches"], out["segment_ids"], out["pos_y"], out["pos_x"]
    if k:
        np.concatenate([im.patches for im in ok], out=patches[:total])
        np.concatenate([im.pos_y for im in ok], out=pos_y[:total])
        np.concatenate([im.pos_x for im in ok], out=pos_x[:total])
        seg[:total] = np.repeat(np.arange(1, k + 1, dtype=np.int32), counts)
    patches[total:] = 0
    seg[total:] = 0
    pos_y[total:] = 0
    pos_x[total:] = 0
    out["num_images"][...] = k
    values = {"labels": [im.label for im in ok], "grid_h": [im.grid_h for im in ok], "grid_w": [im.grid_w for im in ok],
              "orig_h": [im.orig_h for im in ok], "orig_w": [im.orig_w for im in ok], "num_tokens": counts,
              "drop_rates": [im.drop_rate for im in ok]}
    for name, (_, pad) in PER_IMAGE_FIELDS.items():
        arr = out[name]
        arr[:k] = values[name]
        arr[k:] = pad
    return rejects


def text_fields(decision: Decision, failed_slots: Iterable[int], config: PackConfig,
                meta_fields: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The text fields (image_keys, meta_<name>) of `decision`'s record, without the failed slots."""
    failed = set(failed_slots)
    plans = [p for slot, p in enumerate(decision.plans) if slot not in failed]
    E = config.max_images_per_seq
    keys = np.full(E, "", dtype=object)
    keys[:len(plans)] = [p.key for p in plans]
    out = {"image_keys": keys}
    for name in meta_fields:
        arr = np.full(E, "", dtype=object)
        arr[:len(plans)] = [meta_text(p.meta.get(name)) for p in plans]
        out[META_PREFIX + name] = arr
    return out


def empty_record(config: PackConfig, batch: Optional[int] = None) -> dict[str, np.ndarray]:
    """Zeroed numeric record arrays (with a leading batch dimension when `batch` is given)."""
    L, E = config.seq_len, config.max_images_per_seq
    lead = () if batch is None else (batch,)
    out = {"patches": np.zeros(lead + (L, config.token_dim), np.uint8), "segment_ids": np.zeros(lead + (L,), np.int32),
           "pos_y": np.zeros(lead + (L,), np.int32), "pos_x": np.zeros(lead + (L,), np.int32),
           "num_images": np.zeros(lead, np.int32)}
    for name, (dtype, _) in PER_IMAGE_FIELDS.items():
        out[name] = np.zeros(lead + (E,), dtype)
    return out


def assemble(decision: Decision, filled: Sequence[Filled], config: PackConfig,
             meta_fields: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], list[FillReject]]:
    """(record, failed fills) for `decision` from its images filled in slot order (PatchedImage or the
    ImageRejected their fill raised). The record has build_record's fields and layout."""
    record = empty_record(config)
    rejects = assemble_into(record, decision, filled, config)
    record["num_images"] = np.int32(record["num_images"])
    record.update(text_fields(decision, (r.slot for r in rejects), config, meta_fields))
    order = ["patches", "segment_ids", "pos_y", "pos_x", "num_images", "image_keys", *PER_IMAGE_FIELDS,
             *(META_PREFIX + m for m in meta_fields)]
    return {name: record[name] for name in order}, rejects


class _PlanFill:
    """ExactFillWindow's feasibility callback on plans: item ids name the core's pending plans.
    `can_rerender(provenance)` says whether an image may be re-rendered at another grid (else only
    tokens are dropped at its drawn grid)."""

    def __init__(self, config: PackConfig, pending: Mapping[int, tuple[ImagePlan, Any]],
                 can_rerender: Callable[[Any], bool]):
        self.config, self.pending, self.can_rerender = config, pending, can_rerender
        self._cache: dict[tuple[int, int], Any] = {}

    def __call__(self, item: int, length: int, target: int) -> Optional[float]:
        plan = self.plan(item, target)
        return None if plan is None else plan.cost

    def plan(self, item: int, target: int):
        key = (item, target)
        if key not in self._cache:
            p, provenance = self.pending[item]
            self._cache[key] = plan_fill(p.orig_h, p.orig_w, p.grid_h, p.grid_w, p.num_tokens, p.drop_rate, target,
                                         self.config, rerender=self.can_rerender(provenance))
        return self._cache[key]

    def clear(self) -> None:
        self._cache.clear()


BudgetSpec = Union[None, int, float]


def check_budget_spec(max_rejects: BudgetSpec) -> None:
    ok = max_rejects is None or (isinstance(max_rejects, int) and not isinstance(max_rejects, bool) and max_rejects >= 0) \
        or (isinstance(max_rejects, float) and 0 < max_rejects < 1)
    if not ok:
        raise ValueError(f"max_rejects must be None, an integer >= 0 or a fraction in (0, 1), got {max_rejects!r}")


class PackingCore:
    """The runtime-neutral packing loop: decide on plans, account for every image.

    Owns what must not depend on processing order: the images_seen counter (every image added or
    rejected counts), duplicate keys (optional, `unique_keys=True`: a second image with a key already
    seen since the last `forget_keys()` is rejected `duplicate_key`), reject accounting (counts by
    reason, recent examples, the budget `max_rejects`: None, an int or a fraction checked from
    FRACTION_MIN_IMAGES images on and at `check_budget(final=True)`), the packer algorithm with exact-fill
    re-plans, the decision numbering and the JSON state. Pending images are named in the state by the
    provenance the caller gave (small JSON), never by content; restore() takes their plans back."""

    def __init__(self, config: PackConfig, meta_fields: Sequence[str] = (), *, max_rejects: BudgetSpec = None,
                 unique_keys: bool = False, can_rerender: Callable[[Any], bool] = lambda provenance: True):
        check_budget_spec(max_rejects)
        self.config = config
        self.meta_fields = tuple(meta_fields)
        self.max_rejects = max_rejects
        self.unique_keys = unique_keys
        self._pending: dict[int, tuple[ImagePlan, Any]] = {}
        self._fill: Optional[_PlanFill] = None
        if config.fill == "exact":  # PackConfig checked that the packer can fill
            self._fill = _PlanFill(config, self._pending, can_rerender)
        self._algo = make_algorithm(config.packer, config.seq_len, config.max_images_per_seq, config.window, self._fill)
        self._next_id = 0
        self._next_seq = 0
        self.images_seen = 0
        self._keys: set[str] = set()
        self.reject_counts: collections.Counter = collections.Counter()
        self.reject_examples: collections.deque = collections.deque(maxlen=MAX_REJECT_EXAMPLES)
        self.stats = {"images": 0, "sequences": 0, "tokens_real": 0, "tokens_padding": 0, "fill_failed": 0}
        if self._fill is not None:  # images re-planned, tokens they dropped beyond their own drop rate
            self.stats.update(images_refit=0, tokens_refit_dropped=0, sequences_unfilled=0)

    # ---------------------------------------------------------------- decide
    def add(self, plan: ImagePlan, provenance: Any = None) -> list[Decision]:
        """Add one planned image; returns the decisions it closes (often none). Counts it as seen."""
        n = plan.num_tokens
        if not 1 <= n <= self.config.seq_len:
            raise ValueError(f"image {plan.key!r} has {n} tokens, outside [1, seq_len={self.config.seq_len}]")
        if self.unique_keys:
            if plan.key in self._keys:
                self.reject(plan.key, "duplicate_key", "another image has the same key", provenance)
                return []
            self._keys.add(plan.key)
        self.images_seen += 1
        item = self._next_id
        self._next_id += 1
        self._pending[item] = (plan, provenance)
        return self._decide(self._algo.push(item, n))

    def flush(self) -> list[Decision]:
        """Close every open sequence (end of the stream or group)."""
        return self._decide(self._algo.flush())

    def forget_keys(self) -> None:
        """Start a new duplicate-key scope (e.g. a new epoch)."""
        self._keys.clear()

    def _decide(self, bins: list[list[int]]) -> list[Decision]:
        if not bins:
            return []
        refits = self._refits() if self._fill is not None else {}
        out = []
        for b in bins:
            items = []
            for i in b:
                plan, prov = self._pending.pop(i)
                items.append((refits.get(i, plan), prov))
            d = Decision(self._next_seq, tuple(items))
            self._next_seq += 1
            real = d.tokens
            self.stats["images"] += len(items)
            self.stats["sequences"] += 1
            self.stats["tokens_real"] += real
            self.stats["tokens_padding"] += self.config.seq_len - real
            out.append(d)
        return out

    def _refits(self) -> dict[int, ImagePlan]:
        out = {}
        for item, length in self._algo.take_refits().items():
            fp = self._fill.plan(item, length)
            plan = self._pending[item][0]
            new = plan.with_refit(Refit(fp.grid_h, fp.grid_w, fp.tokens, fp.drop_rate, fp.rerender))
            out[item] = new
            self.stats["images_refit"] += 1
            self.stats["tokens_refit_dropped"] += ((fp.grid_h * fp.grid_w - fp.tokens)
                                                   - (plan.grid_h * plan.grid_w - plan.num_tokens))
        self._fill.clear()
        self.stats["sequences_unfilled"] += self._algo.unfilled
        self._algo.unfilled = 0
        return out

    # ---------------------------------------------------------------- rejects
    def reject(self, key: str, reason: str, detail: str = "", provenance: Any = None, *, seen: bool = True) -> None:
        """Record a rejected image (counted as seen unless seen=False); raises RejectBudgetExceeded over budget."""
        if seen:
            self.images_seen += 1
        self.reject_counts[reason] += 1
        example = {"key": key, "reason": reason, "detail": detail}
        if provenance is not None:
            example["provenance"] = provenance
        self.reject_examples.append(example)
        self.check_budget(final=False)

    def fill_failed(self, rejects: Iterable[FillReject]) -> None:
        """Count the failed fills of an assembled decision as rejects (their images were already seen)."""
        for r in rejects:
            self.stats["images"] -= 1
            self.stats["fill_failed"] += 1
            self.stats["tokens_real"] -= r.tokens
            self.stats["tokens_padding"] += r.tokens
            self.reject(r.key, r.reason, r.detail, r.provenance, seen=False)

    @property
    def num_rejected(self) -> int:
        return sum(self.reject_counts.values())

    def check_budget(self, final: bool = False) -> None:
        """Raise RejectBudgetExceeded when over the budget (a fraction only from FRACTION_MIN_IMAGES on, or when final)."""
        budget, rejected, seen = self.max_rejects, self.num_rejected, self.images_seen
        if budget is None:
            return
        if isinstance(budget, int):
            over, limit = rejected > budget, f"{budget} images"
        else:
            over = (final or seen >= FRACTION_MIN_IMAGES) and rejected > budget * seen
            limit = f"{budget:.2%} of the images seen"
        if over:
            examples = list(self.reject_examples)
            last = [{k: e[k] for k in ("key", "reason", "detail")} for e in examples[-3:]]
            raise RejectBudgetExceeded(
                f"{rejected} of {seen} images rejected, over the budget max_rejects={budget} ({limit}); "
                f"by reason: {dict(self.reject_counts)}; last: {last}", dict(self.reject_counts), examples)

    # ---------------------------------------------------------------- state
    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def state(self) -> dict:
        """JSON-serializable state; pending images are named by their provenance only."""
        return {"version": CORE_STATE_VERSION, "next_id": self._next_id, "next_seq": self._next_seq,
                "images_seen": self.images_seen, "algorithm": self._algo.state(), "stats": dict(self.stats),
                "pending_ids": list(self._pending), "pending": [prov for _, prov in self._pending.values()],
                "rejects": dict(self.reject_counts), "reject_examples": list(self.reject_examples),
                "keys": sorted(self._keys) if self.unique_keys else []}

    @staticmethod
    def pending_provenance(state: dict) -> list[Any]:
        """The provenances of the images whose plans `restore(state, plans)` needs, in order."""
        return list(state["pending"])

    def restore(self, state: dict, plans: Sequence[ImagePlan]) -> None:
        """Resume from `state`; `plans` are the pending images re-planned from pending_provenance(state)."""
        if state.get("version") != CORE_STATE_VERSION:
            raise ValueError(f"core state version {state.get('version')!r} is not {CORE_STATE_VERSION}")
        if len(plans) != len(state["pending"]):
            raise ValueError(f"state has {len(state['pending'])} pending images, got {len(plans)} plans")
        self._next_id = int(state["next_id"])
        self._next_seq = int(state["next_seq"])
        self.images_seen = int(state["images_seen"])
        self._algo.restore(state["algorithm"])
        self.stats = dict(state["stats"])
        self._pending.clear()  # the same dict: the fill callback reads it
        self._pending.update((int(i), (p, prov)) for i, p, prov in zip(state["pending_ids"], plans, state["pending"]))
        self.reject_counts = collections.Counter(state["rejects"])
        self.reject_examples = collections.deque(state["reject_examples"], maxlen=MAX_REJECT_EXAMPLES)
        self._keys = set(state.get("keys", ()))


class SequencePacker:
    """Packs PatchedImages already made (by prepare_image) into records, in memory: PackingCore decides on
    their token counts, exactly as in every pipeline, and this keeps the images until their sequence
    closes. Memory is bounded for the windowed and next-fit packers. Its state is the core's plain JSON:
    pending images are named by the `provenance` the caller gave, from which the caller re-creates them
    on resume (every image is a pure function of its key, epoch and config). With fill="exact" an image
    that carries its source bytes may be re-rendered at another grid; one without only drops tokens."""

    def __init__(self, config: PackConfig, meta_fields: Iterable[str] = ()):
        self.config = config
        self.meta_fields = tuple(meta_fields)
        self._images: dict[int, PatchedImage] = {}  # pending images by their number; provenance is [number, caller's]
        self._next_image = 0
        self._core = PackingCore(config, self.meta_fields,
                                 can_rerender=lambda provenance: self._images[provenance[0]].source is not None)

    @property
    def stats(self) -> dict:
        """images, sequences, tokens_real, tokens_padding (and with fill="exact" images_refit,
        tokens_refit_dropped, sequences_unfilled)."""
        return {k: v for k, v in self._core.stats.items() if k != "fill_failed"}

    @property
    def num_pending(self) -> int:
        return len(self._images)

    def add(self, image: PatchedImage, provenance: Any = None) -> list[dict[str, np.ndarray]]:
        """Add one image; returns the sequences this closes (often none)."""
        number = self._next_image
        self._images[number] = image
        try:
            decisions = self._core.add(_plan_of(image), [number, provenance])
        except ValueError:
            del self._images[number]
            raise
        self._next_image += 1
        return self._records(decisions)

    def flush(self) -> list[dict[str, np.ndarray]]:
        """Close every open sequence (end of stream)."""
        return self._records(self._core.flush())

    def pack_all(self, images: Iterable[PatchedImage]) -> Iterator[dict[str, np.ndarray]]:
        for im in images:
            yield from self.add(im)
        yield from self.flush()

    def _records(self, decisions: list[Decision]) -> list[dict[str, np.ndarray]]:
        out = []
        for d in decisions:
            images = []
            for plan, (number, _) in d.items:
                image = self._images.pop(number)
                images.append(refit_image(image, plan.refit, self.config) if plan.refit else image)
            out.append(build_record(images, self.config, self.meta_fields))
        return out

    def state(self) -> dict:
        """JSON-serializable state; pending images are named by their provenance."""
        return {"core": self._core.state(), "next_image": self._next_image}

    @staticmethod
    def pending_provenance(state: dict) -> list[Any]:
        """The provenances of the images that `restore(state, ...)` needs, in order."""
        return [provenance for _, provenance in PackingCore.pending_provenance(state["core"])]

    def restore(self, state: dict, images: Sequence[PatchedImage]) -> None:
        """Resume from `state`; `images` are the pending images re-created from pending_provenance(state)."""
        pending = PackingCore.pending_provenance(state["core"])
        if len(images) != len(pending):
            raise ValueError(f"state has {len(pending)} pending images, got {len(images)}")
        self._images = {int(number): image for (number, _), image in zip(pending, images)}
        self._next_image = int(state["next_image"])
        self._core.restore(state["core"], [_plan_of(image) for image in images])


def _plan_of(image: PatchedImage) -> ImagePlan:
    """The plan a PatchedImage was made to (what the core decides on)."""
    epoch = image.source.epoch if image.source is not None else 0
    return ImagePlan(image.key, epoch, 0, image.label, image.meta, image.orig_h, image.orig_w, image.grid_h,
                     image.grid_w, image.num_tokens, image.drop_rate)


def prepare_image(data: bytes, key: str, config: PackConfig, *, epoch: int = 0, images_seen: float = 0,
                  label: Any = -1, meta: Mapping[str, Any] | None = None) -> PatchedImage:
    """Encoded image bytes -> PatchedImage, or ImageRejected with a reason: plan_header + fill_image on
    one header read. With fill="exact" the result keeps a reference to its bytes (PatchedImage.source)."""
    label = check_label(label)
    opened = OpenedImage(data, config.max_pixels)
    plan = plan_opened(opened, key, config, epoch=epoch, images_seen=images_seen, label=label, meta=meta)
    image = fill_opened(opened, plan, config)
    if config.fill == "exact":
        image.source = FillSource(data, epoch)
    return image
