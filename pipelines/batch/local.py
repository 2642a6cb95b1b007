"""The local runner: every step on this machine, each input read once per run.

1. List (in the fill pool's worker processes, unit by unit: packer.fill_pool(...).map): each record's key,
   label and metadata, and its display size from the header alone. A source that can read one record by
   reference (folders, synthetic) gives references, and only the header bytes are read (for a plain
   JPEG its markers and EXIF block: a few kB); an image that must be read whole for its size (not a plain
   JPEG), and every record of a source without references (tables, TFDS, WebDataset), is written to a
   spill file in a temporary folder (the output's, or PackJob.tmp_dir), removed on every exit path.
   The main process keeps the listing in flat lists and arrays.
2. Per epoch and packing group (pipelines.batch.job): order, plan from the sizes, decide; then the
   decisions go through one packer.Driver to the same pool, whose workers read each image by its
   reference (the file, or its span of the spill file), fill and assemble it; shards are written in
   decision order.

So an input is read once (plus its header), the listing costs a few hundred bytes per image in memory,
and the output is byte-identical to the Beam pipeline's, for any worker count.

3. The run journal (pipelines.batch.journal) records each finished group; a resumed run (`--resume`)
   lists and plans again and fills only the groups it does not find finished there.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

import packer
import schemas
from pipelines.sources import Listed, unused_totals

from . import journal
from .job import PackJob, decide_group, filled_records, finalize, layout, packing_group, write_group

SPILL_PREFIX = ".navit-pack-spill-"


class _Reader:
    """What the worker processes get: the source (its light copy) and the spill folder. Called with a
    payload reference, it returns the encoded bytes (the pool's reader)."""

    def __init__(self, source, spill_dir: str, max_pixels: int):
        self.source, self.spill_dir, self.max_pixels = source, spill_dir, max_pixels

    def spill_path(self, unit: int) -> str:
        return os.path.join(self.spill_dir, f"unit-{unit:07d}.bin")

    def __call__(self, ref: Any) -> bytes:
        if isinstance(ref, tuple) and ref and ref[0] == "spill":
            _, unit, offset, length = ref
            with open(self.spill_path(unit), "rb") as f:
                f.seek(offset)
                return f.read(length)
        return self.source.fetch(ref)


def _scan_unit(reader: _Reader, task: tuple[int, str]) -> list[Listed]:
    """The listing of one unit (run in a worker): Source.headers, with every image read whole written to
    the unit's spill file and named by its span there."""
    u, unit = task
    out = []
    spill = None
    try:
        for r in reader.source.headers(unit, reader.max_pixels):
            if r.data is not None:  # read whole: keep the bytes, read them back from here
                if spill is None:
                    os.makedirs(reader.spill_dir, exist_ok=True)
                    spill = open(reader.spill_path(u), "wb")
                ref = ("spill", u, spill.tell(), len(r.data))
                spill.write(r.data)
                r = dataclasses.replace(r, ref=ref, data=None)
            out.append(r)
    finally:
        if spill is not None:
            spill.close()
    return out


class Listing:
    """The whole input, listed once: flat per-image lists (keys, labels, metas, references), sizes as
    arrays, and the few records rejected or unreadable so far in dicts."""

    def __init__(self):
        self.keys: list[str] = []
        self.labels: list[Any] = []
        self.metas: list[dict] = []
        self.refs: list[Any] = []
        self.heights: list[int] = []
        self.widths: list[int] = []
        self.rejects: dict[int, tuple[str, str]] = {}
        self.header_rejects: dict[int, tuple[str, str]] = {}
        self.unused = unused_totals(())

    def add(self, entries: list[Listed], budget: packer.RejectBudget) -> None:
        empty: dict = {}
        for r in entries:
            i = len(self.keys)
            self.keys.append(r.key)
            self.labels.append(r.label)
            self.metas.append(dict(r.meta) or empty)
            self.refs.append(r.ref)
            h, w = r.size or (0, 0)
            self.heights.append(h)
            self.widths.append(w)
            self.unused.update(r.unused)
            budget.add_seen()
            if r.reject is not None:
                self.rejects[i] = (r.reject, r.detail)
                budget.reject(r.key, r.reject, r.detail)
            elif r.header_reject is not None:
                self.header_rejects[i] = r.header_reject

    def finish(self) -> None:
        self.heights = np.asarray(self.heights, np.int32)
        self.widths = np.asarray(self.widths, np.int32)

    def __len__(self) -> int:
        return len(self.keys)

    def member(self, i: int) -> Listed:
        reject = self.rejects.get(i)
        size = (int(self.heights[i]), int(self.widths[i])) if self.heights[i] else None
        if reject is None and i not in self.header_rejects:  # the usual image, once an epoch
            return Listed.by_ref(self.keys[i], self.labels[i], self.metas[i], self.refs[i], size)
        return Listed(self.keys[i], self.labels[i], self.metas[i], reject[0] if reject else None,
                      reject[1] if reject else "", (), size, self.header_rejects.get(i), self.refs[i])


def _spill_dir(job: PackJob) -> str:
    """A fresh name for the spill folder: in PackJob.tmp_dir, else in the (local) output folder itself,
    else the system's temporary folder (created only if something is spilled)."""
    base = job.tmp_dir or (job.output if "://" not in job.output else tempfile.gettempdir())
    return os.path.join(base, f"{SPILL_PREFIX}{os.getpid()}-{time.time_ns()}")


def run_local(job: PackJob, source, units: Sequence[str], *, workers: int,
              on_progress: Optional[Callable[[str, int, Optional[int]], None]] = None,
              timings: Optional[dict] = None, resume: Optional[dict] = None) -> dict:
    """Pack on this machine (see the module doc); writes shards, the rejects file and manifest.json (last),
    recording each finished group in the run journal. `resume`: the interrupted run's journal state (its
    run id is job.run_id); its finished groups are kept, and journal.ResumeRefused is raised before any
    work if the input's listing differs. Returns the totals."""
    timings = timings if timings is not None else {}
    progress = on_progress or (lambda *a: None)
    reader = _Reader(source.reader(), _spill_dir(job), job.config.max_pixels)
    try:
        encoder = schemas.record_encoder(job.fmt, job.config, job.meta_fields)  # workers encode, this process appends
        with packer.fill_pool(job.config, workers, reader=reader, encoder=encoder) as pool:  # start while the input is listed
            t0 = time.perf_counter()
            listing = _list(pool, units, job, progress)
            timings["reading"] = time.perf_counter() - t0
            digest = journal.listing_digest(listing.keys, listing.labels, listing.metas, listing.heights,
                                            listing.widths, listing.rejects, listing.header_rejects)
            if resume is not None:
                journal.check_inputs(resume, digest, len(listing))
            else:
                _, shards = layout(len(listing), job)
                journal.start(job.output, job.run_id, job, digest, len(listing), shards * job.epochs)
            summaries, rejects = _pack(job, listing, reader, pool, progress, resume is not None)
            timings["packing"] = time.perf_counter() - t0 - timings["reading"]
    finally:
        shutil.rmtree(reader.spill_dir, ignore_errors=True)
    extra = {"unused_members": dict(sorted(listing.unused.items()))} if listing.unused else {}
    if getattr(source, "skipped", None):
        extra["skipped"] = dict(sorted(source.skipped.items()))
    return finalize(job, summaries, rejects, extra)


def _list(pool, units: Sequence[str], job: PackJob, progress) -> Listing:
    listing = Listing()
    budget = job.budget()  # the listing's own count: a source that is mostly rejects fails here, early
    for entries in pool.map(_scan_unit, enumerate(units)):
        listing.add(entries, budget)
        progress("reading", len(listing), None)
    listing.finish()
    progress("reading", len(listing), len(listing))
    return listing


def _pack(job: PackJob, listing: Listing, reader: _Reader, pool, progress, resume: bool) -> tuple[list, list]:
    """Decide, fill and write every group of every epoch (on resume, not those the journal finished:
    their summaries and rejects are taken from it); (summaries, rejects). The next group to pack is
    decided once every decision of the current one is with the pool, so the workers never wait for it."""
    num_images = len(listing)
    groups, _ = layout(num_images, job)
    budget = job.budget()  # packing counts every (image, epoch) again
    driver = packer.Driver(pool, job.meta_fields)
    members: dict[int, list[list[int]]] = {}  # epoch -> each group's members

    def decide(epoch: int, g: int):
        if epoch not in members:
            members.clear()
            members[epoch] = [[] for _ in range(groups)]
            for i, key in enumerate(listing.keys):
                members[epoch][packing_group(job.config.seed, key, epoch, groups)].append(i)
        return decide_group([listing.member(i) for i in members[epoch][g]], job, epoch, g, num_images, budget,
                            content=lambda m: b"" if m.reject else reader(m.payload))

    finished = {(epoch, g): journal.finished_group(job.output, epoch, g) if resume else None
                for epoch in range(job.epochs) for g in range(groups)}
    todo = iter([eg for eg, was in finished.items() if was is None])
    ahead: list = []  # the next group to pack, decided and its decisions put while the current one fills

    def decide_next() -> None:
        following = next(todo, None)
        if following is not None:
            ahead.append(decide(*following))
            driver.put(ahead[-1].decisions)

    summaries, rejects, done = [], [], 0
    for (epoch, g), was in finished.items():
        if was is not None:
            summary, group_rejects = was
            budget.add_seen(summary["images_in"])
            for r in group_rejects:
                budget.reject(r["key"], r["reason"], r["detail"])
        else:
            if not ahead:  # the first group, or one after a group without decisions
                decide_next()
            gp = ahead.pop()
            assert (gp.epoch, gp.group) == (epoch, g), "groups out of order"
            summary = write_group(gp, filled_records(driver, gp.decisions, then=decide_next, queued=True), job,
                                  num_images, budget)
            group_rejects = gp.rejects
            journal.record_group(job.output, summary, group_rejects)
        summaries.append(summary)
        rejects.extend(group_rejects)
        done += summary["images_in"]
        progress("packing", done, num_images * job.epochs)
    return summaries, rejects
