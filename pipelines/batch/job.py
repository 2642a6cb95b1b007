"""The batch job's model and the steps every runner calls, in the same order, so that the local runner
and the Beam pipeline write byte-identical shards and manifests.

One packing group of one epoch goes: order its members (seeded, ties by key, then content) -> plan each
from its size (read from the header once, by the listing or from the bytes) -> decide on token counts
(packer.PackingCore, duplicate keys rejected there) -> fill and assemble each decision (packer.Driver
over a pool) -> write the group's shards. Then finalize: rejects.jsonl, then manifest.json (last).

Determinism: every choice is a pure function of (config, key, epoch, input count), never of bundling,
runner or worker count: the group of an image, its order inside the group, its resolution and drop rate,
its `images_seen` (for drop schedules), and the shard that each sequence lands in.

Packing groups: G = ceil(N / group_size) per epoch, but no more than the shards per epoch, since a
group writes whole shards (shard s of an epoch belongs to group s % G and gets a contiguous slice of
its sequences). Each group ends with one partial flush, so efficiency loses about one part-filled
sequence per group: with the default group_size=4096 that is ~0.1 point (see benchmarks).

Counting: every (image, epoch) pair is one instance; num_images_in = N * epochs = packed + rejected.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import packer
from pipelines.sources import Listed
from schemas import FORMATS


@dataclasses.dataclass(frozen=True)
class PackJob:
    """One `navit-pack pack` run: what to read, how to pack it, where to write it."""

    input: str
    output: str
    config: packer.PackConfig = dataclasses.field(default_factory=packer.PackConfig)
    fmt: str = "tfrecord"
    num_shards: Optional[int] = None  # shards per epoch; None: one per packing group
    epochs: int = 1
    group_size: int = 4096  # target images per packing group
    labels: str = "auto"
    meta_fields: tuple[str, ...] = ()
    max_reject_fraction: float = 1.0  # 1: no limit
    owner: Optional[str] = None  # the output claim's token (schemas.claim_output); the manifest needs it
    tmp_dir: Optional[str] = None  # where the local runner keeps the bytes of inputs it cannot re-read
    run_id: Optional[str] = None  # names this run's files (run_pack sets a fresh one, or the resumed run's)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        for name, low in (("epochs", 1), ("group_size", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if self.num_shards is not None and (not isinstance(self.num_shards, int) or self.num_shards < 1):
            raise ValueError(f"num_shards must be an integer >= 1 or None, got {self.num_shards!r}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction!r}")
        object.__setattr__(self, "meta_fields", tuple(self.meta_fields))

    def budget(self) -> packer.RejectBudget:
        """The run's reject budget (--max-reject-fraction)."""
        return packer.RejectBudget.from_fraction(self.max_reject_fraction, name="--max-reject-fraction")


# ----------------------------------------------------------------------------- pure layout functions
def order_fraction(seed: int, key: str, epoch: int) -> float:
    """Position of an image in the epoch's global pseudo-random order, in [0, 1)."""
    return packer.unit_fraction(seed, key, epoch, "order")


def images_seen(seed: int, key: str, epoch: int, num_images: int) -> int:
    """Training-progress value for drop schedules: epoch * N + floor(order_fraction * N).

    The image's expected position in a stream that shuffles each epoch; independent of the runner."""
    return _seen(order_fraction(seed, key, epoch), epoch, num_images)


def _seen(fraction: float, epoch: int, num_images: int) -> int:
    return epoch * num_images + math.floor(fraction * num_images)


def layout(num_images: int, job: PackJob) -> tuple[int, int]:
    """(packing groups, shards) per epoch for an input of num_images images."""
    groups = max(1, math.ceil(num_images / job.group_size))
    shards = job.num_shards or groups
    return min(groups, shards), shards


def packing_group(seed: int, key: str, epoch: int, groups: int) -> int:
    """The packing group of an image in an epoch (a fresh mix of images every epoch)."""
    return packer.stable_hash(key, f"group/{seed}/{epoch}") % groups


def split_contiguous(items: Sequence, parts: int) -> list[Sequence]:
    """`parts` contiguous slices of near-equal length (the first ones longer by at most one)."""
    q, r = divmod(len(items), parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + q + (1 if i < r else 0))
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


# ----------------------------------------------------------------------------- one group
def ordered_members(members: Sequence[Listed], fraction: Mapping[str, float],
                    content: Callable[[Listed], bytes]) -> list[Listed]:
    """The group in its order: by (order_fraction, key), `fraction` giving each key's; records sharing a
    key (duplicates) by (not a reject, content, label, meta, reason, detail), `content(member)` giving the
    encoded bytes (read only for such ties), so that which copy is kept does not depend on the input's
    order or the runner."""
    out = sorted(members, key=lambda m: (fraction[m.key], m.key))
    i = 0
    while i < len(out):
        j = i + 1
        while j < len(out) and out[j].key == out[i].key:
            j += 1
        if j - i > 1:
            out[i:j] = sorted(out[i:j], key=lambda m: (m.reject is not None, content(m), repr(m.label),
                                                       json.dumps(m.meta, sort_keys=True, default=repr),
                                                       m.reject or "", m.detail))
        i = j
    return out


@dataclasses.dataclass
class GroupPlan:
    """One group's decisions (each carrying its payloads) and its rejects so far."""

    epoch: int
    group: int
    images_in: int
    decisions: list
    rejects: list


def decide_group(members: Sequence[Listed], job: PackJob, epoch: int, group: int, num_images: int,
                 budget: Optional[packer.RejectBudget] = None,
                 content: Callable[[Listed], bytes] = lambda m: m.payload) -> GroupPlan:
    """Order a group's members, plan each from its size and decide the sequences on token counts."""
    cfg = job.config
    decisions, rejects = [], []
    core = packer.PackingCore(cfg, budget=budget, unique_keys=True, on_reject=lambda key, reason, detail, _: rejects.append(
        {"key": key, "reason": reason, "detail": detail, "epoch": epoch}))
    fraction = {m.key: order_fraction(cfg.seed, m.key, epoch) for m in members}
    ordered = ordered_members(members, fraction, content)
    block = packer.PlanBlock(cfg, [m.key for m in ordered], epoch, [m.size for m in ordered])
    seen = [_seen(fraction[m.key], epoch, num_images) for m in ordered]
    plans = block.plans(seen, [m.label for m in ordered], [m.meta for m in ordered])
    for i, (m, plan) in enumerate(zip(ordered, plans)):
        if m.reject:
            core.reject(m.key, m.reject, m.detail)
            continue
        if plan is None:  # not planned with its block (see PlanBlock.plans)
            try:
                plan = m.plan(cfg, epoch=epoch, images_seen=seen[i], block=(block, i))
            except packer.ImageRejected as e:
                core.reject(m.key, e.reason, e.detail)
                continue
        decisions.extend(core.add(plan, provenance=i, payload=m.payload))
    decisions.extend(core.flush())
    return GroupPlan(epoch, group, len(members), decisions, rejects)


_HELD_SLOTS = 8  # filled slots kept from the pool while the shard writer process reads their encoded rows


def filled_records(driver: packer.Driver, decisions: Sequence[packer.Decision],
                   then: Optional[Callable[[], None]] = None, queued: bool = False
                   ) -> Iterator[tuple[packer.Decision, Any, list]]:
    """(decision, record, failed fills) for each decision, filled by `driver`'s pool (one decision a slot),
    in decision order. The record is its encoded bytes where the pool's workers encoded it (a
    packer.SharedBytes, valid until the next few items: the writer may hand its location to a writer
    process, so a slot is released once that process has read it, up to _HELD_SLOTS slots later), else a
    record dict. `then()` runs once every decision is with the pool: the caller may put the next group's
    decisions (they come after these) while the workers fill these last ones. queued: `decisions` are put
    already (by the previous group's `then`)."""
    if not queued:
        driver.put(decisions)
    most = min(_HELD_SLOTS, driver.pool.num_slots // 2)  # the workers keep the other half to fill
    held: collections.deque = collections.deque()
    left = len(decisions)
    try:
        while left:
            if then is not None and not driver.queued:
                then()
                then = None
            slot = driver.take(final=True)
            if slot is None:
                raise RuntimeError(f"the fill pool returned {len(decisions) - left} of {len(decisions)} decisions")
            left -= len(slot)
            encoded = slot.encoded or [None] * len(slot)
            records = slot.records() if None in encoded else encoded
            held.append((slot, encoded))
            yield from zip(slot.decisions, (e if e is not None else r for e, r in zip(encoded, records)), slot.rejects)
            while len(held) > most:
                _release_read(*held.popleft())
        while held:
            _release_read(*held.popleft())
    finally:
        for slot, _ in held:  # the writer stopped (an error): its process is ended, nothing reads these
            slot.release()


def _release_read(slot: Any, encoded: list) -> None:
    """Release a packer.Slot once every location of its encoded rows handed on has been read."""
    for e in encoded:
        if e is not None:
            e.wait_read()
    slot.release()


def write_group(gp: GroupPlan, filled: Iterator[tuple[packer.Decision, dict, list]], job: PackJob, num_images: int,
                budget: Optional[packer.RejectBudget] = None) -> dict:
    """Write a group's shards from its filled records in decision order; returns the group summary (the
    dict finalize() sums) and appends fill failures to gp.rejects (and the budget)."""
    import schemas

    cfg = job.config
    groups, shards = layout(num_images, job)
    mine = list(range(gp.group, shards, groups))
    counts = {"sequences": 0, "packed": 0, "tokens_real": 0}

    def tracked(n: int) -> Iterator[dict]:
        for _ in range(n):
            decision, record, fill_rejects = next(filled)
            for r in fill_rejects:
                gp.rejects.append({"key": r.key, "reason": r.reason, "detail": r.detail, "epoch": gp.epoch})
                if budget is not None:
                    budget.reject(r.key, r.reason, r.detail)
            counts["sequences"] += 1
            counts["packed"] += len(decision.items) - len(fill_rejects)
            counts["tokens_real"] += decision.tokens - sum(r.tokens for r in fill_rejects)
            yield record

    written = []
    for s, chunk in zip(mine, split_contiguous(range(len(gp.decisions)), len(mine))):
        info = schemas.write_shard(job.output, gp.epoch * shards + s, job.epochs * shards, job.fmt, tracked(len(chunk)),
                                   seq_len=cfg.seq_len, token_dim=cfg.token_dim, max_images_per_seq=cfg.max_images_per_seq,
                                   meta_fields=job.meta_fields, run_id=job.run_id)
        written.append((gp.epoch * shards + s, info))
    if next(filled, None) is not None:  # also lets `filled` release the slots it still holds
        raise RuntimeError(f"group {gp.group} of epoch {gp.epoch}: more filled records than decisions")
    return {"epoch": gp.epoch, "group": gp.group, "images_in": gp.images_in, "rejected": len(gp.rejects),
            "packed": counts["packed"], "sequences": counts["sequences"], "tokens_real": counts["tokens_real"],
            "tokens_padding": counts["sequences"] * cfg.seq_len - counts["tokens_real"], "shards": written}


def finalize(job: PackJob, summaries: list[dict], rejects: list[dict], extra: Optional[dict] = None) -> dict:
    """Write the rejects file, check the reject budget over the whole run, write manifest.json (the commit),
    then remove the files no manifest lists (the replaced dataset's). Returns the totals."""
    import schemas

    rejects = sorted(rejects, key=lambda r: (r["epoch"], r["key"], r["reason"], r["detail"]))
    schemas.write_rejects(job.output, rejects, job.run_id)
    totals = {name: sum(s[name] for s in summaries)
              for name in ("images_in", "packed", "rejected", "sequences", "tokens_real", "tokens_padding")}
    if totals["images_in"] != totals["packed"] + totals["rejected"] or totals["rejected"] != len(rejects):
        raise RuntimeError(f"counts do not reconcile: {totals}, {len(rejects)} reject records")
    budget = job.budget()
    budget.add_seen(totals["images_in"])
    budget.counts.update(r["reason"] for r in rejects)
    budget.check(final=True)
    shards = [info for _, info in sorted((i for s in summaries for i in s["shards"]), key=lambda t: t[0])]
    groups, shards_per_epoch = layout(totals["images_in"] // job.epochs, job)
    manifest = schemas.write_manifest(
        job.output, fmt=job.fmt, config=job.config.to_json(), num_images_in=totals["images_in"],
        num_images_packed=totals["packed"], num_rejected=totals["rejected"], num_sequences=totals["sequences"],
        tokens_real=totals["tokens_real"], tokens_padding=totals["tokens_padding"], shards=shards,
        meta_fields=job.meta_fields, owner=job.owner, run_id=job.run_id,
        extra={"input": job.input, "epochs": job.epochs, "shards_per_epoch": shards_per_epoch,
               "packing_groups_per_epoch": groups, "group_size": job.group_size,
               "libraries": packer.library_versions(), **(extra or {})})
    schemas.remove_unlisted(job.output, manifest)
    return totals


def progress_file(directory: str, name: str, text: str) -> None:
    """Write one progress counter atomically (the Beam runner's workers report through files)."""
    path = os.path.join(directory, name)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
