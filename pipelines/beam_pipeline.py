"""Batch packing on Apache Beam: source units -> packing groups -> packed, sharded output.

Shape of the pipeline (one shuffle, of encoded bytes only):

  units --Reshuffle--> ReadUnit --> (key, bytes, label, meta)
        --for each epoch e: group g = stable_hash(key, seed/e) % G--> GroupByKey((e, g))
        --PackGroup: order by (order_fraction(seed, key, e), key), reject duplicate keys, prepare_image
          (decode/plan/resize/patchify/drop; rejections to the dead-letter output), SequencePacker,
          write the group's shards--> Finalize: rejects.jsonl, then manifest.json.

Determinism: every choice is a pure function of (config, key, epoch, input count), never of bundling,
runner or worker count: the group of an image, its order inside the group (a seeded shuffle that
breaks ties by key), its resolution and drop rate, its `images_seen` (for drop schedules), and the
shard that each sequence lands in. So the same input gives byte-identical shards with any runner.

Why group before decoding: the shuffle carries the encoded bytes (JPEG is ~10x smaller than the
raw pixels and about as large as the kept patches), decoding happens next to the packer, and the
packed records are written by the worker that packed them, with no second shuffle.

Packing groups: G = ceil(N / group_size) per epoch, but no more than the shards per epoch, since a
group writes whole shards (shard s of an epoch belongs to group s % G and gets a contiguous slice of
its sequences). Each group ends with one partial flush, so efficiency loses about one part-filled
sequence per group: with the default group_size=4096 that is ~0.1 point (see benchmarks).
A group's encoded images and packed records are held in one worker's memory.

Counting: every (image, epoch) pair is one instance; num_images_in = N * epochs = packed + rejected.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterable, Iterator, Optional, Sequence

import packer
from schemas import FORMATS

COUNTERS = "navit_pack"  # Beam Metrics namespace
_REJECTS_TAG = "rejects"


class RejectBudgetExceeded(RuntimeError):
    """More inputs were rejected than --max-reject-fraction allows (rejects.jsonl is written; no manifest)."""


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
    max_reject_fraction: float = 1.0
    owner: Optional[str] = None  # the output claim's token (schemas.claim_output); the manifest needs it

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


# ----------------------------------------------------------------------------- pure layout functions
def order_fraction(seed: int, key: str, epoch: int) -> float:
    """Position of an image in the epoch's global pseudo-random order, in [0, 1)."""
    return packer.unit_fraction(seed, key, epoch, "order")


def images_seen(seed: int, key: str, epoch: int, num_images: int) -> int:
    """Training-progress value for drop schedules: epoch * N + floor(order_fraction * N).

    The image's expected position in a stream that shuffles each epoch; independent of the runner."""
    return epoch * num_images + math.floor(order_fraction(seed, key, epoch) * num_images)


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


# ----------------------------------------------------------------------------- per-element steps
def _assign(record, num_images: int, job: PackJob) -> Iterator:
    key = record[0]
    groups, _ = layout(num_images, job)
    for epoch in range(job.epochs):
        yield (epoch, packing_group(job.config.seed, key, epoch, groups)), record


def _all_groups(num_images: int, job: PackJob, progress_dir: Optional[str]) -> Iterator:
    """A None marker for every group, so that a group without images still writes its (empty) shards."""
    groups, _ = layout(num_images, job)
    if progress_dir:
        _write_text(os.path.join(progress_dir, "total"), str(num_images * job.epochs))
    for epoch in range(job.epochs):
        for g in range(groups):
            yield (epoch, g), None


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _sort_key(seed: int, epoch: int):
    def key(item):
        k, data, label, meta, reject, detail = item
        return (order_fraction(seed, k, epoch), k, reject is not None, data, repr(label),
                json.dumps(meta, sort_keys=True, default=repr), reject or "", detail)
    return key


def _make_read_unit():
    import apache_beam as beam

    class ReadUnit(beam.DoFn):
        """Reads every record of one source unit (a file or shard) as (key, bytes, label, meta, reject, detail)."""

        def __init__(self, spec: str, labels: str, meta_fields: tuple[str, ...]):
            self.spec, self.labels, self.meta_fields = spec, labels, meta_fields
            self._source = None

        def setup(self):
            from pipelines import sources
            self._source = sources.open_source(self.spec, labels=self.labels, meta_fields=self.meta_fields)

        def process(self, unit):
            for r in self._source.read(unit):
                yield r.key, bytes(r.data or b""), r.label, dict(r.meta or {}), r.reject, r.detail

    return ReadUnit


def _make_pack_group():
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    class PackGroup(beam.DoFn):
        """Orders one packing group, prepares and packs its images, writes its shards.

        Output: ("summary", one summary dict per group) and ("rejects", {key, reason, detail, epoch}) pairs."""

        def __init__(self, job: PackJob, progress_dir: Optional[str]):
            self.job, self.progress_dir = job, progress_dir
            self.counters = {}

        def setup(self):
            self.counters = {name: Metrics.counter(COUNTERS, name)
                             for name in ("images_in", "packed", "rejected", "sequences", "tokens", "padding")}

        def process(self, element, num_images: int):
            from pipelines.batch import decide_group, fill_in_process, write_group

            (epoch, group), values = element
            job = self.job
            gp = decide_group([v for v in values if v is not None], job, epoch, group, num_images)
            summary = write_group(gp, (fill_in_process(d, gp.datas, job) for d in gp.decisions), job, num_images)
            if self.progress_dir:
                _write_text(os.path.join(self.progress_dir, f"{epoch}-{group}"), str(gp.images_in))
            for r in gp.rejects:
                yield _REJECTS_TAG, r
            for name, value in (("images_in", summary["images_in"]), ("packed", summary["packed"]),
                                ("rejected", summary["rejected"]), ("sequences", summary["sequences"]),
                                ("tokens", summary["tokens_real"]), ("padding", summary["tokens_padding"])):
                self.counters[name].inc(value)
            yield "summary", summary

    return PackGroup


def finalize(job: PackJob, summaries: list[dict], rejects: list[dict]) -> dict:
    """Write rejects.jsonl, check the reject budget, then write manifest.json (last). Returns totals."""
    import schemas

    rejects = sorted(rejects, key=lambda r: (r["epoch"], r["key"], r["reason"], r["detail"]))
    schemas.write_rejects(job.output, rejects)
    totals = {name: sum(s[name] for s in summaries)
              for name in ("images_in", "packed", "rejected", "sequences", "tokens_real", "tokens_padding")}
    if totals["images_in"] != totals["packed"] + totals["rejected"] or totals["rejected"] != len(rejects):
        raise RuntimeError(f"counts do not reconcile: {totals}, {len(rejects)} reject records")
    if totals["rejected"] > job.max_reject_fraction * totals["images_in"]:
        raise RejectBudgetExceeded(
            f"{totals['rejected']} of {totals['images_in']} inputs rejected "
            f"({totals['rejected'] / totals['images_in']:.1%}), over --max-reject-fraction {job.max_reject_fraction:g}; "
            f"see {os.path.join(job.output, 'rejects.jsonl')}")
    shards = [info for _, info in sorted((i for s in summaries for i in s["shards"]), key=lambda t: t[0])]
    groups, shards_per_epoch = layout(totals["images_in"] // job.epochs, job)
    schemas.write_manifest(job.output, fmt=job.fmt, config=job.config.to_json(), num_images_in=totals["images_in"],
                           num_images_packed=totals["packed"], num_rejected=totals["rejected"],
                           num_sequences=totals["sequences"], tokens_real=totals["tokens_real"],
                           tokens_padding=totals["tokens_padding"], shards=shards, meta_fields=job.meta_fields,
                           extra={"input": job.input, "epochs": job.epochs, "shards_per_epoch": shards_per_epoch,
                                  "packing_groups_per_epoch": groups, "group_size": job.group_size,
                                  "libraries": packer.library_versions()}, owner=job.owner)
    return totals


def build_pipeline(pipeline, job: PackJob, units: list[str], progress_dir: Optional[str] = None):
    """Add the packing transforms to `pipeline` (a beam.Pipeline); returns the totals PCollection."""
    import apache_beam as beam
    from apache_beam.pvalue import AsList, AsSingleton

    records = (pipeline
               | "Units" >> beam.Create(sorted(units))
               | "SpreadUnits" >> beam.Reshuffle()
               | "Read" >> beam.ParDo(_make_read_unit()(job.input, job.labels, job.meta_fields)))
    count = records | "Count" >> beam.combiners.Count.Globally()
    assigned = records | "Assign" >> beam.FlatMap(_assign, AsSingleton(count), job)
    markers = count | "AllGroups" >> beam.FlatMap(_all_groups, job, progress_dir)
    packed = ((assigned, markers)
              | "Join" >> beam.Flatten()
              | "Group" >> beam.GroupByKey()
              | "Pack" >> beam.ParDo(_make_pack_group()(job, progress_dir), AsSingleton(count)))
    return (pipeline
            | "Once" >> beam.Create([None])
            | "Finalize" >> beam.Map(_finalize_once, job, AsList(packed)))


def _finalize_once(_, job: PackJob, outputs: list[tuple[str, dict]]) -> dict:
    """finalize() on the pack step's one output of (kind, dict) pairs. One tagged stream rather than Beam's
    multiple outputs: the DaskRunner hands every output of a multi-output ParDo to each consumer."""
    return finalize(job, [d for kind, d in outputs if kind == "summary"],
                    [d for kind, d in outputs if kind == _REJECTS_TAG])


def pipeline_options(beam_args: Iterable[str] = (), workers: int = 1):
    """Beam options: the user's, with DirectRunner (multi-process when workers > 1) unless a runner is given."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=DirectRunner")
        if workers > 1:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
            if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
                args.append("--default_sdk_harness_log_level=WARNING")  # worker processes log INFO by default
    return PipelineOptions(args)


def is_local(beam_args: Iterable[str]) -> bool:
    """True when the pipeline runs on this machine (DirectRunner or no runner given)."""
    args = list(beam_args)
    for i, a in enumerate(args):
        if a.startswith("--runner="):
            return a.split("=", 1)[1] in ("DirectRunner", "direct")
        if a == "--runner" and i + 1 < len(args):
            return args[i + 1] in ("DirectRunner", "direct")
    return True


def run_pack(job: PackJob, *, beam_args: Sequence[str] = (), workers: int = 1, overwrite: bool = False,
             on_progress=None, timings: Optional[dict] = None) -> dict:
    """Run the packing job to completion; returns the manifest (schemas.read_manifest).

    Without Beam options it runs on this machine (pipelines.batch.run_local: the packing core over
    `workers` fill processes, no Beam); with them (e.g. `--runner ...`) it runs the Beam pipeline, which
    writes the same bytes. on_progress(phase, done, total) is called on local runs ("reading", then
    "packing"); `timings`, when given, receives seconds spent {"reading", "packing"} on the local path.
    The output folder is claimed (schemas.claim_output) before it is touched and released at the end."""
    import schemas
    from pipelines import sources

    source = sources.open_source(job.input, labels=job.labels, meta_fields=job.meta_fields)
    units = source.units()
    with schemas.claim_output(job.output, overwrite) as claim:  # released at the end, success or failure
        manifest = _run_claimed(dataclasses.replace(job, owner=claim.token), source, units, beam_args, workers,
                                on_progress, timings)
        claim.check()  # never report success for a folder another run has taken
    return manifest


def _run_claimed(job: PackJob, source, units: list[str], beam_args: Sequence[str], workers: int, on_progress,
                 timings: Optional[dict]) -> dict:
    """run_pack's work once the output folder is this run's (job.owner set)."""
    import tempfile
    import threading

    import schemas

    if not list(beam_args):
        from pipelines.batch import run_local

        run_local(job, source, units, workers=workers, on_progress=on_progress, timings=timings)
        return schemas.read_manifest(job.output)

    import apache_beam as beam

    local = is_local(beam_args)
    progress_dir = tempfile.mkdtemp(prefix="navit-pack-progress-") if on_progress and local else None
    stop = threading.Event()
    poller = None
    if progress_dir:
        poller = threading.Thread(target=_poll_progress, args=(progress_dir, on_progress, stop), daemon=True)
        poller.start()
    try:
        with beam.Pipeline(options=pipeline_options(beam_args, workers)) as p:
            build_pipeline(p, job, units, progress_dir)
    finally:
        if poller:
            stop.set()
            poller.join()
            _poll_once(progress_dir, on_progress)
            import shutil
            shutil.rmtree(progress_dir, ignore_errors=True)
    return schemas.read_manifest(job.output)


def _poll_once(progress_dir: str, on_progress) -> None:
    try:
        names = os.listdir(progress_dir)
        if "total" not in names:
            return
        values = {}
        for n in names:
            if ".tmp" not in n:
                with open(os.path.join(progress_dir, n)) as f:
                    values[n] = int(f.read() or 0)
        on_progress("packing", sum(v for n, v in values.items() if n != "total"), values["total"])
    except (OSError, ValueError):
        pass  # a file being replaced; the next poll reads it


def _poll_progress(progress_dir: str, on_progress, stop) -> None:
    while not stop.wait(0.5):
        _poll_once(progress_dir, on_progress)
