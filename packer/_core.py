"""Decide: the packer assigns planned images to sequences on token counts alone (PackingCore), and every
image is accounted for (RejectBudget). Runtime-neutral: the batch job, the stream and the service decide
with it; what the decisions hold is filled later (packer._driver, packer._pool).

Exact fill re-plans a few images here, on sizes alone (ImagePlan.refit, packer._fill).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from ._algorithms import make_algorithm
from ._config import PackConfig
from ._fill import plan_fill
from ._transform import ImagePlan, Refit

CORE_STATE_VERSION = 1
MAX_REJECT_EXAMPLES = 20  # the budget keeps this many recent rejects (key, reason, detail); counts are complete
FRACTION_MIN_IMAGES = 100  # a fractional reject budget is checked from this many images seen on
BudgetSpec = Union[None, int, float]


class RejectBudgetExceeded(RuntimeError):
    """More images were rejected than the budget allows; `counts` has the rejects by reason,
    `examples` the most recent ones ({key, reason, detail})."""

    def __init__(self, message: str, counts: dict[str, int], examples: list[dict]):
        super().__init__(message)
        self.counts = counts
        self.examples = examples


def check_budget_spec(limit: BudgetSpec) -> None:
    """None, an integer >= 0 (most rejected images) or a fraction in [0, 1) of the images seen."""
    ok = limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0) \
        or (isinstance(limit, float) and 0 <= limit < 1)
    if not ok:
        raise ValueError(f"max_rejects must be None, an integer >= 0 or a fraction in [0, 1), got {limit!r}")


class RejectBudget:
    """Counts images seen and rejected (by reason, with recent examples) and enforces a limit: None (no
    limit), an int (most rejected images, checked at each reject) or a float fraction of the images seen
    (checked from FRACTION_MIN_IMAGES images on, and at check(final=True)). `name` is how the limit is
    spelled in messages (an option name such as --max-reject-fraction)."""

    def __init__(self, limit: BudgetSpec = None, *, name: str = "max_rejects"):
        check_budget_spec(limit)
        self.limit, self.name = limit, name
        self.seen = 0
        self.counts: collections.Counter = collections.Counter()
        self.examples: collections.deque = collections.deque(maxlen=MAX_REJECT_EXAMPLES)

    @classmethod
    def from_fraction(cls, fraction: float, *, name: str) -> "RejectBudget":
        """A budget from a fraction in [0, 1], where 1 means no limit (the CLI's --max-reject-fraction)."""
        return cls(None if fraction >= 1 else float(fraction), name=name)

    @property
    def rejected(self) -> int:
        return sum(self.counts.values())

    def add_seen(self, n: int = 1) -> None:
        self.seen += n

    def reject(self, key: str, reason: str, detail: str = "", provenance: Any = None) -> None:
        """Count a rejected image (already counted as seen); raises RejectBudgetExceeded over the limit."""
        self.counts[reason] += 1
        example = {"key": key, "reason": reason, "detail": detail}
        if provenance is not None:
            example["provenance"] = provenance
        self.examples.append(example)
        self.check(final=False)

    def check(self, final: bool = False) -> None:
        """Raise RejectBudgetExceeded when over the limit (a fraction only from FRACTION_MIN_IMAGES on, or when final)."""
        limit, rejected, seen = self.limit, self.rejected, self.seen
        if limit is None:
            return
        if isinstance(limit, int):
            over, what = rejected > limit, f"{limit} images"
        else:
            over = (final or seen >= FRACTION_MIN_IMAGES) and rejected > limit * seen
            what = f"{limit:.2%} of the images seen"
        if over:
            examples = list(self.examples)
            last = [{k: e[k] for k in ("key", "reason", "detail")} for e in examples[-3:]]
            top = ", ".join(f"{reason} {n}" for reason, n in self.counts.most_common(3))
            spelled = f"{self.name} {limit:g}" if self.name.startswith("-") else f"{self.name}={limit!r}"
            raise RejectBudgetExceeded(
                f"{rejected} of {seen} images rejected ({rejected / max(seen, 1):.1%}: {top}), over the budget "
                f"{spelled} ({what}); last: {last}", dict(self.counts), examples)

    def state(self) -> dict:
        return {"seen": self.seen, "rejects": dict(self.counts), "examples": list(self.examples)}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.counts = collections.Counter(state["rejects"])
        self.examples = collections.deque(state["examples"], maxlen=MAX_REJECT_EXAMPLES)


@dataclasses.dataclass(frozen=True)
class Decision:
    """One sequence the packer closed: number `seq` (0, 1, ... in decision order), its images' (plan,
    provenance) in slot order, and what fills them (`payloads`: encoded bytes, or references a pool's
    reader resolves; never part of any state)."""

    seq: int
    items: tuple[tuple[ImagePlan, Any], ...]
    payloads: tuple = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def plans(self) -> list[ImagePlan]:
        return [p for p, _ in self.items]

    @property
    def provenances(self) -> list[Any]:
        return [prov for _, prov in self.items]

    @property
    def tokens(self) -> int:
        return sum(p.final_tokens for p, _ in self.items)


class _PlanFill:
    """ExactFillWindow's feasibility callback on plans: item ids name the core's pending plans.
    `can_rerender(provenance)` says whether an image may be re-rendered at another grid (else only
    tokens are dropped at its drawn grid)."""

    def __init__(self, config: PackConfig, pending: Mapping[int, tuple], can_rerender: Callable[[Any], bool]):
        self.config, self.pending, self.can_rerender = config, pending, can_rerender
        self._cache: dict[tuple[int, int], Any] = {}

    def __call__(self, item: int, length: int, target: int) -> Optional[float]:
        plan = self.plan(item, target)
        return None if plan is None else plan.cost

    def plan(self, item: int, target: int):
        key = (item, target)
        if key not in self._cache:
            p, provenance, _ = self.pending[item]
            self._cache[key] = plan_fill(p.orig_h, p.orig_w, p.grid_h, p.grid_w, p.num_tokens, p.drop_rate, target,
                                         self.config, rerender=self.can_rerender(provenance))
        return self._cache[key]

    def clear(self) -> None:
        self._cache.clear()


class PackingCore:
    """The runtime-neutral packing decisions: decide on plans, account for every image.

    Owns what must not depend on processing order: the images_seen counter (every image added or
    rejected counts), duplicate keys (optional, `unique_keys=True`: a second image with a key already
    seen since the last `forget_keys()` is rejected `duplicate_key`), the reject budget (a RejectBudget,
    shared when several cores make one run, else one built from `max_rejects`), the packer algorithm
    with exact-fill re-plans, the decision numbering and the JSON state. Every reject (the caller's, a
    duplicate key, a failed fill) is also handed to `on_reject(key, reason, detail, provenance)`, for a
    caller that lists them. Pending images are named in the state by the provenance the caller gave
    (small JSON), never by content; restore() takes their plans (and payloads) back."""

    def __init__(self, config: PackConfig, *, max_rejects: BudgetSpec = None, budget: Optional[RejectBudget] = None,
                 unique_keys: bool = False, can_rerender: Callable[[Any], bool] = lambda provenance: True,
                 on_reject: Optional[Callable[[str, str, str, Any], None]] = None):
        self.config = config
        self.budget = budget if budget is not None else RejectBudget(max_rejects)
        self.on_reject = on_reject
        self.unique_keys = unique_keys
        self._pending: dict[int, tuple[ImagePlan, Any, Any]] = {}  # item -> (plan, provenance, payload)
        self._fill: Optional[_PlanFill] = None
        if config.fill == "exact":  # PackConfig checked that the packer can fill
            self._fill = _PlanFill(config, self._pending, can_rerender)
        self._algo = make_algorithm(config.packer, config.seq_len, config.max_images_per_seq, config.window, self._fill)
        self._next_id = 0
        self._next_seq = 0
        self.images_seen = 0
        self._keys: set[str] = set()
        self.stats = {"images": 0, "sequences": 0, "tokens_real": 0, "tokens_padding": 0, "fill_failed": 0}
        if self._fill is not None:  # images re-planned, tokens they dropped beyond their own drop rate
            self.stats.update(images_refit=0, tokens_refit_dropped=0, sequences_unfilled=0)

    # ---------------------------------------------------------------- decide
    def add(self, plan: ImagePlan, provenance: Any = None, payload: Any = None) -> list[Decision]:
        """Add one planned image (and what fills it); returns the decisions it closes (often none).
        Counts it as seen."""
        n = plan.num_tokens
        if not 1 <= n <= self.config.seq_len:
            raise ValueError(f"image {plan.key!r} has {n} tokens, outside [1, seq_len={self.config.seq_len}]")
        if self.unique_keys:
            if plan.key in self._keys:
                self.reject(plan.key, "duplicate_key", f"key {plan.key!r} appears in another input record", provenance)
                return []
            self._keys.add(plan.key)
        self.images_seen += 1
        self.budget.add_seen()
        item = self._next_id
        self._next_id += 1
        self._pending[item] = (plan, provenance, payload)
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
        pending = self._pending
        for b in bins:
            items, payloads, real = [], [], 0
            for i in b:
                plan, prov, payload = pending.pop(i)
                plan = refits.get(i, plan)
                items.append((plan, prov))
                payloads.append(payload)
                real += plan.final_tokens
            d = Decision(self._next_seq, tuple(items), tuple(payloads))
            self._next_seq += 1
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
            out[item] = plan.with_refit(Refit(fp.grid_h, fp.grid_w, fp.tokens, fp.drop_rate, fp.rerender))
            self.stats["images_refit"] += 1
            self.stats["tokens_refit_dropped"] += ((fp.grid_h * fp.grid_w - fp.tokens)
                                                   - (plan.grid_h * plan.grid_w - plan.num_tokens))
        self._fill.clear()
        self.stats["sequences_unfilled"] += self._algo.unfilled
        self._algo.unfilled = 0
        return out

    # ---------------------------------------------------------------- rejects
    def reject(self, key: str, reason: str, detail: str = "", provenance: Any = None) -> None:
        """Record a rejected image (counted as seen); raises RejectBudgetExceeded over budget."""
        self.images_seen += 1
        self.budget.add_seen()
        self._rejected(key, reason, detail, provenance)

    def _rejected(self, key: str, reason: str, detail: str, provenance: Any) -> None:
        if self.on_reject is not None:
            self.on_reject(key, reason, detail, provenance)
        self.budget.reject(key, reason, detail, provenance)

    def fill_failed(self, rejects: Sequence[Any]) -> None:
        """Count the failed fills (FillRejects) of an assembled decision as rejects (their images were
        already seen)."""
        for r in rejects:
            self.stats["images"] -= 1
            self.stats["fill_failed"] += 1
            self.stats["tokens_real"] -= r.tokens
            self.stats["tokens_padding"] += r.tokens
            self._rejected(r.key, r.reason, r.detail, r.provenance)

    @property
    def num_rejected(self) -> int:
        return self.budget.rejected

    @property
    def reject_counts(self) -> collections.Counter:
        return self.budget.counts

    def check_budget(self, final: bool = False) -> None:
        self.budget.check(final)

    # ---------------------------------------------------------------- state
    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def state(self) -> dict:
        """JSON-serializable state; pending images are named by their provenance only. (For a core with its
        own budget: a shared one is the run's to save.)"""
        budget = self.budget.state()
        return {"version": CORE_STATE_VERSION, "next_id": self._next_id, "next_seq": self._next_seq,
                "images_seen": self.images_seen, "algorithm": self._algo.state(), "stats": dict(self.stats),
                "pending_ids": list(self._pending), "pending": [prov for _, prov, _ in self._pending.values()],
                "rejects": budget["rejects"], "reject_examples": budget["examples"],
                "keys": sorted(self._keys) if self.unique_keys else []}

    @staticmethod
    def pending_provenance(state: dict) -> list[Any]:
        """The provenances of the images whose plans `restore(state, plans)` needs, in order."""
        return list(state["pending"])

    def restore(self, state: dict, plans: Sequence[ImagePlan], payloads: Optional[Sequence[Any]] = None) -> None:
        """Resume from `state`; `plans` (and their payloads) are the pending images re-planned from
        pending_provenance(state)."""
        if state.get("version") != CORE_STATE_VERSION:
            raise ValueError(f"core state version {state.get('version')!r} is not {CORE_STATE_VERSION}")
        if len(plans) != len(state["pending"]):
            raise ValueError(f"state has {len(state['pending'])} pending images, got {len(plans)} plans")
        payloads = list(payloads) if payloads is not None else [None] * len(plans)
        self._next_id = int(state["next_id"])
        self._next_seq = int(state["next_seq"])
        self.images_seen = int(state["images_seen"])
        self._algo.restore(state["algorithm"])
        self.stats = dict(state["stats"])
        self._pending.clear()  # the same dict: the fill callback reads it
        self._pending.update((int(i), (p, prov, payload)) for i, p, prov, payload
                             in zip(state["pending_ids"], plans, state["pending"], payloads))
        self.budget.restore({"seen": self.images_seen, "rejects": state["rejects"],
                             "examples": state["reject_examples"]})
        self._keys = set(state.get("keys", ()))
