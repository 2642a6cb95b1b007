"""`navit-pack plan` as a Beam job (Dataflow, Dask or any runner): Beam workers read the headers of the
input's units in parallel, then one worker decides the global plan from them exactly as
PackedStream.write_plan does on one machine (the same file, byte for byte) and writes it.

  units --Reshuffle--> ReadHeaders: (unit, its header records, bytes dropped) --ToDict--> WritePlan

Reading headers is what grows with the input, and it runs on every worker. Deciding is sequential (the
plan's order is the stream's) and holds every image's header record in that one worker's memory (a few
hundred bytes an image). The plan goes to a local path or, through Beam's filesystems, to gs:// and the like.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Optional, Sequence

from packer import PackConfig


@dataclasses.dataclass(frozen=True)
class PlanJob:
    """What `navit-pack plan` plans: the input spec and the stream options the plan file records."""

    input: str
    output: str
    config: PackConfig
    epochs: int
    shuffle_block: int
    labels: str = "auto"
    meta_fields: tuple[str, ...] = ()

    def source(self):
        from pipelines import sources

        return sources.open_source(self.input, labels=self.labels, meta_fields=self.meta_fields)

    def stream(self, source=None):
        """The one-rank, in-process stream whose write_plan writes this plan."""
        from pipelines.stream import PackedStream

        return PackedStream(source if source is not None else self.source(), self.config, epochs=self.epochs,
                            meta_fields=self.meta_fields, shuffle_block=self.shuffle_block, num_parallel=0)


def read_headers(source, unit: str, max_pixels: int) -> tuple[str, list]:
    """(unit, its header records): the bytes a reference reads again are dropped (a plan names images by
    reference), so that only sizes and keys travel."""
    from pipelines.stream import unit_headers

    return unit, [dataclasses.replace(r, data=None) if r.ref is not None else r
                  for r in unit_headers(source, unit, max_pixels)]


def write_plan(job: PlanJob, headers: dict) -> int:
    """Decide and write the plan from every unit's headers; returns the number of decisions."""
    stream = job.stream()
    try:
        if "://" not in job.output:
            return stream.write_plan(job.output, headers=headers)
        from apache_beam.io.filesystems import FileSystems

        local = tempfile.mkdtemp(prefix="navit-plan-")
        try:
            path = os.path.join(local, "plan.jsonl")
            count = stream.write_plan(path, headers=headers)
            with open(path, "rb") as src, FileSystems.create(job.output) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return count
        finally:
            shutil.rmtree(local, ignore_errors=True)
    finally:
        stream.close()


def run_plan_beam(job: PlanJob, beam_args: Sequence[str], workers: int = 1) -> Optional[int]:
    """Run the plan job on Beam; the number of decisions when the plan is a local file, else None."""
    import apache_beam as beam

    from .beam import pipeline_options

    units = list(job.source().units())

    class ReadHeaders(beam.DoFn):
        def __init__(self, plan_job: PlanJob):
            self.job, self._source = plan_job, None

        def setup(self):
            self._source = self.job.source()

        def process(self, unit):
            yield read_headers(self._source, unit, self.job.config.max_pixels)

    with beam.Pipeline(options=pipeline_options(beam_args, workers)) as p:
        _ = (p | "Units" >> beam.Create(units) | "Spread" >> beam.Reshuffle()
             | "ReadHeaders" >> beam.ParDo(ReadHeaders(job))
             | "AllHeaders" >> beam.combiners.ToDict()
             | "WritePlan" >> beam.Map(lambda headers, plan_job: write_plan(plan_job, headers), job))
    if "://" in job.output:
        return None
    with open(job.output, encoding="utf-8") as f:
        return sum(1 for _ in f) - 1
