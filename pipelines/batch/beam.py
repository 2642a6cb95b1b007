"""The batch job on Apache Beam: source units -> packing groups -> packed, sharded output.

Shape of the pipeline (one shuffle, of encoded bytes only; the source is read once):

  units --Reshuffle--> ReadUnit --> (key, bytes, label, meta, reject, detail, unused)
        --for each epoch e: group g = packing_group(key, e)--> GroupByKey((e, g))
        --PackGroup: decide_group, then fill and assemble in the Beam worker (packer.Driver over an
          in-process pool), write the group's shards--> Finalize: rejects.jsonl, then manifest.json.

The steps are pipelines.batch.job's, in the same order as the local runner, so both write the same bytes.
Why group before decoding: the shuffle carries the encoded bytes (JPEG is ~10x smaller than the raw pixels
and about as large as the kept patches), decoding happens next to the packer, and the packed records are
written by the worker that packed them, with no second shuffle. A group's encoded images and packed
records are held in one worker's memory.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional

import packer
from pipelines.sources import Listed

from .job import PackJob, decide_group, filled_records, finalize, layout, packing_group, progress_file, write_group

COUNTERS = "navit_pack"  # Beam Metrics namespace
_REJECTS = "rejects"
_UNUSED = "unused"


def _assign(record, num_images: int, job: PackJob) -> Iterator:
    groups, _ = layout(num_images, job)
    for epoch in range(job.epochs):
        yield (epoch, packing_group(job.config.seed, record[0], epoch, groups)), record


def _all_groups(num_images: int, job: PackJob, progress_dir: Optional[str]) -> Iterator:
    """A None marker for every group, so that a group without images still writes its (empty) shards."""
    groups, _ = layout(num_images, job)
    if progress_dir:
        progress_file(progress_dir, "total", str(num_images * job.epochs))
    for epoch in range(job.epochs):
        for g in range(groups):
            yield (epoch, g), None


def _make_read_unit():
    import apache_beam as beam

    class ReadUnit(beam.DoFn):
        """Reads every record of one source unit (a file or shard) as (key, bytes, label, meta, reject, detail, unused)."""

        def __init__(self, spec: str, labels: str, meta_fields: tuple[str, ...]):
            self.spec, self.labels, self.meta_fields = spec, labels, meta_fields
            self._source = None

        def setup(self):
            from pipelines import sources
            self._source = sources.open_source(self.spec, labels=self.labels, meta_fields=self.meta_fields)

        def process(self, unit):
            for r in self._source.read(unit):
                yield r.key, bytes(r.data or b""), r.label, dict(r.meta or {}), r.reject, r.detail, tuple(r.unused)

    return ReadUnit


def _make_pack_group():
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    class PackGroup(beam.DoFn):
        """Decides, fills and writes one packing group. Output: ("summary", one summary dict per group),
        ("rejects", {key, reason, detail, epoch}) and ("unused", {extension: count}) pairs."""

        def __init__(self, job: PackJob, progress_dir: Optional[str]):
            self.job, self.progress_dir = job, progress_dir
            self.counters = {}

        def setup(self):
            self.counters = {name: Metrics.counter(COUNTERS, name)
                             for name in ("images_in", "packed", "rejected", "sequences", "tokens", "padding")}

        def process(self, element, num_images: int):
            (epoch, group), values = element
            job = self.job
            records = [v for v in values if v is not None]
            members = [Listed(key, label, meta, reject, detail, data=data) for key, data, label, meta, reject, detail, _ in records]
            gp = decide_group(members, job, epoch, group, num_images)
            driver = packer.Driver(packer.fill_pool(job.config, 0), job.meta_fields)
            summary = write_group(gp, filled_records(driver, gp.decisions), job, num_images)
            if self.progress_dir:
                progress_file(self.progress_dir, f"{epoch}-{group}", str(gp.images_in))
            for r in gp.rejects:
                yield _REJECTS, r
            if epoch == 0:  # members are counted once, not per epoch
                unused: dict = {}
                for *_, names in records:
                    for name in names:
                        unused[name] = unused.get(name, 0) + 1
                if unused:
                    yield _UNUSED, unused
            for name, value in (("images_in", summary["images_in"]), ("packed", summary["packed"]),
                                ("rejected", summary["rejected"]), ("sequences", summary["sequences"]),
                                ("tokens", summary["tokens_real"]), ("padding", summary["tokens_padding"])):
                self.counters[name].inc(value)
            yield "summary", summary

    return PackGroup


def build_pipeline(pipeline, job: PackJob, units: list[str], progress_dir: Optional[str] = None, skipped=None):
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
            | "Finalize" >> beam.Map(_finalize_once, job, AsList(packed), dict(skipped or {})))


def _finalize_once(_, job: PackJob, outputs: list[tuple[str, dict]], skipped: dict) -> dict:
    """finalize() on the pack step's one output of (kind, dict) pairs. One tagged stream rather than Beam's
    multiple outputs: the DaskRunner hands every output of a multi-output ParDo to each consumer."""
    unused: dict = {}
    for kind, d in outputs:
        if kind == _UNUSED:
            for name, n in d.items():
                unused[name] = unused.get(name, 0) + n
    extra = {"unused_members": dict(sorted(unused.items()))} if unused else {}
    if skipped:
        extra["skipped"] = dict(sorted(skipped.items()))
    return finalize(job, [d for kind, d in outputs if kind == "summary"], [d for kind, d in outputs if kind == _REJECTS],
                    extra)


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


def run_beam(job: PackJob, units: list[str], beam_args, workers: int, on_progress, skipped=None) -> None:
    """Run the Beam pipeline to completion (local runs report progress through files its workers write)."""
    import shutil
    import tempfile
    import threading

    import apache_beam as beam

    progress_dir = tempfile.mkdtemp(prefix="navit-pack-progress-") if on_progress and is_local(beam_args) else None
    stop = threading.Event()
    poller = None
    if progress_dir:
        poller = threading.Thread(target=_poll_progress, args=(progress_dir, on_progress, stop), daemon=True)
        poller.start()
    try:
        with beam.Pipeline(options=pipeline_options(beam_args, workers)) as p:
            build_pipeline(p, job, units, progress_dir, skipped)
    finally:
        if poller:
            stop.set()
            poller.join()
            _poll_once(progress_dir, on_progress)
            shutil.rmtree(progress_dir, ignore_errors=True)


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
