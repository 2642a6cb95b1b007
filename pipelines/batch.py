"""The batch job's steps on the packing core, shared by the local path and the Beam pipeline.

One packing group of one epoch goes: order its images (seeded, ties by key) -> plan each from its header
(main process) -> decide on token counts (packer.PackingCore) -> fill and assemble each decision (in
FillPool worker processes locally, in the Beam worker otherwise) -> write the group's shards. Both paths
call the same functions in the same order, so they write byte-identical shards and manifests.

Local path (`run_local`): read every source unit once for the keys (progress: "reading"), lay out the
groups as the Beam pipeline does, then per group re-read the group's images, decide, and stream the
decisions through one FillPool of --workers processes while the shards are written in decision order.
Memory: the listing pass keeps the first KEEP_BYTES (1 GiB) of encoded input; the rest is re-read per
group (one group's encoded bytes in memory at a time; sharded inputs are re-read once per group that
needs them).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import packer
from pipelines.beam_pipeline import (PackJob, RejectBudgetExceeded, _sort_key, images_seen, layout, packing_group,
                                     split_contiguous)

MIN_SEEN_FOR_BUDGET = 100  # the reject budget is enforced once this many inputs have been seen
KEEP_BYTES = 1 << 30  # encoded input kept in memory from the listing pass; beyond it, groups re-read their units
Item = tuple  # (key, data, label, meta, reject, detail): one input record of one epoch


class RejectBudget:
    """Counts inputs seen and rejected (by reason); fails as soon as the rejected fraction exceeds the
    budget, once at least MIN_SEEN_FOR_BUDGET inputs were seen (finalize() checks the whole run at the end)."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.seen = 0
        self.reasons: collections.Counter = collections.Counter()

    def add(self, seen: int = 0, reasons: Sequence[str] = ()) -> None:
        self.seen += seen
        self.reasons.update(reasons)
        if reasons and self.seen >= MIN_SEEN_FOR_BUDGET:
            rejected = sum(self.reasons.values())
            if rejected > self.fraction * self.seen:
                top = ", ".join(f"{reason} {n}" for reason, n in self.reasons.most_common(3))
                raise RejectBudgetExceeded(
                    f"{rejected} of the first {self.seen} inputs rejected ({rejected / self.seen:.1%}: {top}), over "
                    f"--max-reject-fraction {self.fraction:g}; no output was completed")

    def reset(self) -> None:
        self.seen = 0
        self.reasons.clear()


@dataclasses.dataclass
class GroupPlan:
    """One group's decisions, the encoded bytes they need (by provenance), and its rejects so far."""

    epoch: int
    group: int
    images_in: int
    decisions: list
    datas: dict
    rejects: list


def decide_group(items: Sequence[Item], job: PackJob, epoch: int, group: int, num_images: int,
                 budget: Optional[RejectBudget] = None) -> GroupPlan:
    """Order a group's images, plan each from its header and decide the sequences on token counts."""
    cfg = job.config
    ordered = sorted(items, key=_sort_key(cfg.seed, epoch))
    core = packer.PackingCore(cfg, job.meta_fields)
    decisions, datas, rejects, seen = [], {}, [], set()
    for i, (key, data, label, meta, source_reject, detail) in enumerate(ordered):
        reject = None
        if source_reject:
            reject = (source_reject, detail)
        elif key in seen:
            reject = ("duplicate_key", f"key {key!r} appears in another input record")
        else:
            seen.add(key)
            try:
                plan = packer.plan_header(data, key, cfg, epoch=epoch, label=label, meta=meta,
                                          images_seen=images_seen(cfg.seed, key, epoch, num_images))
            except packer.ImageRejected as e:
                reject = (e.reason, e.detail)
            else:
                datas[i] = data
                decisions.extend(core.add(plan, provenance=i))
        if reject:
            rejects.append({"key": key, "reason": reject[0], "detail": reject[1], "epoch": epoch})
        if budget is not None:
            budget.add(seen=1, reasons=[reject[0]] if reject else [])
    decisions.extend(core.flush())
    return GroupPlan(epoch, group, len(ordered), decisions, datas, rejects)


def fill_in_process(decision, datas: dict, job: PackJob) -> tuple[dict, list]:
    """Fill and assemble one decision in this process: (record, FillRejects)."""
    filled = []
    for plan, prov in decision.items:
        try:
            filled.append(packer.fill_image(datas[prov], plan, job.config))
        except packer.ImageRejected as e:
            filled.append(e)
    return packer.assemble(decision, filled, job.config, job.meta_fields)


def write_group(gp: GroupPlan, records: Iterator[tuple[dict, list]], job: PackJob, num_images: int,
                budget: Optional[RejectBudget] = None) -> dict:
    """Write a group's shards from its (record, FillRejects) in decision order; returns the group summary
    (the dict finalize() sums) and appends fill failures to gp.rejects."""
    import schemas

    cfg = job.config
    groups, shards = layout(num_images, job)
    mine = list(range(gp.group, shards, groups))
    counts = {"sequences": 0, "packed": 0, "tokens_real": 0}

    def tracked(n: int) -> Iterator[dict]:
        for _ in range(n):
            decision, (record, fill_rejects) = next(pairs)
            failed = [{"key": r.key, "reason": r.reason, "detail": r.detail, "epoch": gp.epoch} for r in fill_rejects]
            gp.rejects.extend(failed)
            if budget is not None and failed:
                budget.add(reasons=[r.reason for r in fill_rejects])
            counts["sequences"] += 1
            counts["packed"] += len(decision.items) - len(fill_rejects)
            counts["tokens_real"] += decision.tokens - sum(r.tokens for r in fill_rejects)
            yield record

    pairs = zip(gp.decisions, records)
    written = []
    for s, chunk in zip(mine, split_contiguous(range(len(gp.decisions)), len(mine))):
        info = schemas.write_shard(job.output, gp.epoch * shards + s, job.epochs * shards, job.fmt, tracked(len(chunk)),
                                   seq_len=cfg.seq_len, token_dim=cfg.token_dim, max_images_per_seq=cfg.max_images_per_seq,
                                   meta_fields=job.meta_fields)
        written.append((gp.epoch * shards + s, info))
    return {"epoch": gp.epoch, "group": gp.group, "images_in": gp.images_in, "rejected": len(gp.rejects),
            "packed": counts["packed"], "sequences": counts["sequences"], "tokens_real": counts["tokens_real"],
            "tokens_padding": counts["sequences"] * cfg.seq_len - counts["tokens_real"], "shards": written}


def _pool_records(pool, gp: GroupPlan, job: PackJob) -> Iterator[tuple[dict, list]]:
    """(record, FillRejects) of each of the group's decisions, filled by `pool`, in decision order."""
    pending = list(gp.decisions)
    nxt = 0
    for _ in range(len(pending)):
        while nxt < len(pending):
            datas = [gp.datas[prov] for prov in pending[nxt].provenances]
            if not pool.can_submit(datas):
                break
            pool.submit(pending[nxt], datas)
            for prov in pending[nxt].provenances:
                del gp.datas[prov]
            nxt += 1
        result = pool.get()
        try:
            d, fill_rejects = result.decisions[0], result.rejects[0]
            record = {k: v[0].copy() for k, v in result.arrays.items()}
            record["num_images"] = record["num_images"].reshape(()).astype("int32")
            record.update(packer.text_fields(d, (r.slot for r in fill_rejects), job.config, job.meta_fields))
        finally:
            pool.release()
        yield record, fill_rejects


def resolve_workers(value: str) -> int:
    """--workers: 'auto' (every core this process may use) or an integer >= 1."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return int(value)


def run_local(job: PackJob, source, units: Sequence[str], *, workers: int,
              on_progress: Optional[Callable[[str, int, Optional[int]], None]] = None,
              timings: Optional[dict] = None) -> dict:
    """Pack on this machine: plan and decide in this process, fill in `workers` FillPool processes, write
    shards in decision order, then rejects.jsonl and manifest.json (last). Returns the totals."""
    from pipelines.beam_pipeline import finalize

    timings = timings if timings is not None else {}
    with packer.FillPool(job.config, max(1, workers)) as pool:  # workers start while the input is read
        summaries, rejects = _run_groups(job, source, units, pool, on_progress or (lambda *a: None), timings)
    return finalize(job, summaries, rejects)


def _run_groups(job: PackJob, source, units: Sequence[str], pool, progress, timings: dict) -> tuple[list, list]:
    """Read the input (listing pass), then decide, fill and write every group; (summaries, rejects)."""
    budget = RejectBudget(job.max_reject_fraction)
    t0 = time.perf_counter()
    index: list[tuple[int, int, str]] = []  # (unit index, position in unit, key)
    kept: dict[tuple[int, int], Item] = {}  # the records themselves while they fit in KEEP_BYTES
    kept_bytes = 0
    total = getattr(source, "num_records", None)
    for u, unit in enumerate(units):
        for pos, r in enumerate(source.read(unit)):
            index.append((u, pos, r.key))
            if kept_bytes < KEEP_BYTES:
                kept[(u, pos)] = (r.key, bytes(r.data or b""), r.label, dict(r.meta or {}), r.reject, r.detail)
                kept_bytes += len(r.data or b"")
            budget.add(seen=1, reasons=[r.reject] if r.reject else [])
            if len(index) % 256 == 0:
                progress("reading", len(index), total)
    progress("reading", len(index), len(index))
    budget.reset()  # packing counts every (image, epoch) again
    timings["reading"] = time.perf_counter() - t0

    num_images = len(index)
    groups, _ = layout(num_images, job)
    summaries, rejects, done = [], [], 0
    read_time = 0.0
    for epoch in range(job.epochs):
        members: list[list[int]] = [[] for _ in range(groups)]
        for i, (_, _, key) in enumerate(index):
            members[packing_group(job.config.seed, key, epoch, groups)].append(i)
        for g in range(groups):
            t1 = time.perf_counter()
            items = _read_items(source, units, [index[i] for i in members[g]], kept)
            read_time += time.perf_counter() - t1
            gp = decide_group(items, job, epoch, g, num_images, budget)
            summaries.append(write_group(gp, _pool_records(pool, gp, job), job, num_images, budget))
            rejects.extend(gp.rejects)
            done += gp.images_in
            progress("packing", done, num_images * job.epochs)
    timings["reading"] += read_time
    timings["packing"] = time.perf_counter() - t0 - timings["reading"]
    return summaries, rejects


def _read_items(source, units: Sequence[str], entries: Sequence[tuple[int, int, str]],
                kept: dict[tuple[int, int], Item]) -> list[Item]:
    """The records at (unit, position): kept ones from memory, others by reading each unit once; a record
    gone since listing is rejected."""
    by_unit: dict[int, list[tuple[int, str]]] = {}
    items = []
    for u, pos, key in entries:
        if (u, pos) in kept:
            items.append(kept[(u, pos)])
        else:
            by_unit.setdefault(u, []).append((pos, key))
    for u, wanted in sorted(by_unit.items()):
        records = list(source.read(units[u]))
        for pos, key in wanted:
            r = records[pos] if pos < len(records) else None
            if r is None or r.key != key:
                items.append((key, b"", -1, {}, "changed", "the input changed while packing"))
            else:
                items.append((r.key, bytes(r.data or b""), r.label, dict(r.meta or {}), r.reject, r.detail))
    return items
