"""run_pack: the batch job end to end. Claims the output folder, runs the local runner (no Beam options) or
the Beam pipeline (with them), and returns the manifest."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from .job import PackJob


def run_pack(job: PackJob, *, beam_args: Sequence[str] = (), workers: int = 1, overwrite: bool = False,
             on_progress=None, timings: Optional[dict] = None, resume: bool = False) -> dict:
    """Run the packing job to completion; returns the manifest (schemas.read_manifest).

    Without Beam options it runs on this machine (pipelines.batch.local: the packing core over `workers`
    fill processes, packer.resolve_workers' rule); with them (e.g. `--runner ...`) it runs the Beam
    pipeline, which writes the same bytes. on_progress(phase, done, total) is called on local runs
    ("reading", then "packing"); `timings`, when given, receives seconds spent {"reading", "packing"} on
    the local runner. The output folder is claimed (schemas.claim_output) before it is touched and
    released at the end. The run's files carry its run id (job.run_id, else a fresh one); the dataset the
    folder held stays readable until this run's manifest replaces it, and is removed after.

    resume (local runs only): continue the interrupted run the folder's journal records (same run id; its
    finished groups kept), or start one when none is recorded; journal.ResumeRefused (one line) when the
    options or the input differ from that run's, or with Beam options."""
    import schemas
    from pipelines import sources

    from . import journal

    if resume and list(beam_args):
        raise journal.ResumeRefused("--resume continues local runs only; a Beam runner retries failed work "
                                    "itself (docs/batch.md): rerun without --resume")
    source = sources.open_source(job.input, labels=job.labels, meta_fields=job.meta_fields)
    units = source.units()
    state = journal.load(job.output) if resume else None
    if state is not None:
        journal.check_options(state, job)
    with schemas.claim_output(job.output, overwrite or state is not None or (resume and not _has_manifest(job.output))
                              ) as claim:  # released at the end, success or failure
        state = journal.load(job.output) if resume else None  # again, now that the folder is ours
        if state is not None:
            journal.check_options(state, job)
        run_id = state["run_id"] if state is not None else job.run_id or schemas.new_run_id()
        job = dataclasses.replace(job, owner=claim.token, run_id=run_id)
        if list(beam_args):
            from .beam import run_beam

            try:
                run_beam(job, units, beam_args, workers, on_progress, getattr(source, "skipped", None))
            except Exception as e:
                ours = _our_error(e)
                if ours is None:
                    raise
                raise ours from e
        else:
            from .local import run_local

            run_local(job, source, units, workers=workers, on_progress=on_progress, timings=timings, resume=state)
        if "://" not in job.output:
            journal.remove(job.output)  # after the commit: the run is complete
        claim.check()  # never report success for a folder another run has taken
    return schemas.read_manifest(job.output)


def _has_manifest(output: str) -> bool:
    import os

    return "://" not in output and os.path.isfile(os.path.join(output, "manifest.json"))


def _our_error(error: Exception) -> Optional[Exception]:
    """The navit-pack error inside a Beam failure, typed again: runners re-raise a worker's exception as
    text inside their own (RuntimeError, ...), so its class is found by name in that text."""
    import packer
    import schemas

    if isinstance(error, (packer.RejectBudgetExceeded, schemas.OutputWriteError, schemas.OwnershipLost, packer.WorkerError)):
        return error
    ours = {"RejectBudgetExceeded": lambda m: packer.RejectBudgetExceeded(m, {}, []), "OutputWriteError": schemas.OutputWriteError,
            "OwnershipLost": schemas.OwnershipLost, "WorkerError": packer.WorkerError}
    text = str(error)
    for name, make in ours.items():
        at = text.find(f"{name}: ")
        if at >= 0:
            return make(text[at + len(name) + 2:].split("\n")[0])
    return None
