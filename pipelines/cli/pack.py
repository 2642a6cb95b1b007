"""`navit-pack pack`: pack an input into sharded sequences.

Local runs (no `--`) use the packing core directly (pipelines.batch.local): listing and decoding in
--workers processes (default: every core; 0: in this process), deciding in this one.
Anything after `--` is passed to Apache Beam as pipeline options and runs
the Beam pipeline, which writes the same bytes, e.g. `-- --runner DataflowRunner --project P --region R
--temp_location gs://B/tmp`, or `-- --runner apache_beam.runners.dask.dask_runner.DaskRunner
--dask_client_address HOST:8786`.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Optional

from pipelines.cli import options

EXAMPLES = """examples:
  navit-pack pack --input synthetic:2000 --output out --overwrite
  navit-pack pack --input ~/imagenet/train --output gs://bucket/packed --resolution uniform:64:256 \\
      --token-drop beta:0.25:0.5 --epochs 4 --num-shards 256 -- --runner DataflowRunner \\
      --project my-project --region us-central1 --temp_location gs://bucket/tmp --setup_file ./setup.py
"""


def register(subparsers) -> None:
    p = options.command(subparsers, "pack", "pack images into fixed-length sequences, here or on Apache Beam",
                        __doc__, EXAMPLES)
    options.add_input(p)
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (local or gs://), e.g. --output out")
    p.add_argument("--format", default="tfrecord", metavar="FMT",
                   help="shard format: tfrecord (default), arrow, parquet or array_record (JAX/Grain random "
                        "access), e.g. --format parquet")
    p.add_argument("--num-shards", default="auto", metavar="N",
                   help="shards per epoch (default auto: one per packing group of ~--group-size images), e.g. --num-shards 64")
    p.add_argument("--epochs", default="1", metavar="N",
                   help="independently sampled packings of the data (each image gets a new resolution, drop rate "
                        "and packing group per epoch; output has epochs x num-shards files; default 1), e.g. --epochs 4")
    p.add_argument("--group-size", default="4096", metavar="N",
                   help="images per packing group (default 4096): larger packs slightly better, holds more in one "
                        "worker's memory, e.g. --group-size 8192")
    p.add_argument("--workers", default="auto", metavar="N",
                   help="local worker processes (default auto: one per core this process may use; 0: none, all in "
                        "this process; with "
                        "`-- --runner DirectRunner`, the DirectRunner's processes), e.g. --workers 4")
    p.add_argument("--max-reject-fraction", default="1", metavar="F",
                   help="fail the job when more than this fraction of inputs is rejected (default 1: never); "
                        "checked as inputs are rejected once 100 were seen, and at the end; a failed job leaves "
                        "no manifest.json, e.g. --max-reject-fraction 0.01")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset in a non-empty output folder (it stays readable until the new "
                        "manifest lands, and is removed after)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted or killed run recorded in the output folder (local runs): its "
                        "finished shards are kept, the rest written; refused if options or input differ; starts "
                        "a run if none is recorded, e.g. --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on local runs")
    options.add_pack_options(p)
    options.add_beam_args(p, "-- --runner DataflowRunner --project P --region R --temp_location gs://B/tmp "
                             "--setup_file ./setup.py")
    p.set_defaults(func=run)


def job_from_args(args: argparse.Namespace):
    """A PackJob from parsed arguments; raises options.OptionError on a bad value."""
    from pipelines.batch import PackJob
    from schemas import FORMATS

    config = options.config_or_error(args)
    return PackJob(
        input=options.input_spec(args), output=args.output, config=config,
        fmt=options.parse_choice(args.format, "--format", FORMATS),
        num_shards=options.parse_int(args.num_shards, "--num-shards", 1, allow_none=True),
        epochs=options.parse_int(args.epochs, "--epochs", 1),
        group_size=options.parse_int(args.group_size, "--group-size", 1),
        labels=args.labels, meta_fields=options.parse_meta_fields(args.meta_fields),
        max_reject_fraction=options.parse_float(args.max_reject_fraction, "--max-reject-fraction", 0.0, 1.0))


def summary_table(manifest: dict, output: str, seconds: float, timings: Optional[dict] = None,
                  labels: Optional[str] = None) -> str:
    """The end-of-run summary, one aligned `name  value` row per line. With `timings` ({"reading",
    "packing"} seconds, local runs), reading the input and packing it get their own rows; `labels`
    says how labels were found (Source.label_description())."""
    seqs = manifest["num_sequences"]
    images = manifest["num_images_in"]
    rows = [
        ("output", output),
        ("format", f"{manifest['format']}, {len(manifest['shards'])} shards"),
        ("epochs", manifest.get("epochs", 1)),
        ("images in", images),
        ("images packed", manifest["num_images_packed"]),
        ("images rejected", manifest["num_rejected"] if not manifest["num_rejected"] else
         f"{manifest['num_rejected']} (see {manifest.get('rejects', 'rejects.jsonl')})"),
        ("sequences", f"{seqs} x {manifest['config']['seq_len']} tokens"),
        ("images / sequence", f"{manifest['num_images_packed'] / seqs:.2f}" if seqs else "-"),
        ("tokens real", manifest["tokens_real"]),
        ("tokens padding", manifest["tokens_padding"]),
        ("packing efficiency", f"{100 * manifest['efficiency']:.2f}%"),
        *([("labels", labels)] if labels else []),
        *([("unused members", ", ".join(f"{n} {ext if ext.startswith('<') else '.' + ext}"
                                         for ext, n in manifest["unused_members"].items())
            + " (not packed; --meta-fields EXT carries one)")] if manifest.get("unused_members") else []),
        *([("skipped", ", ".join(f"{n} {why}" for why, n in manifest["skipped"].items()) + " (not images)")]
          if manifest.get("skipped") else []),
    ]
    if timings and "reading" in timings and "packing" in timings:
        rows += [("reading input", f"{timings['reading']:.1f} s (listing and reading the source)"),
                 ("packing", f"{timings['packing']:.1f} s ({images / max(timings['packing'], 1e-9):.0f} images/s: "
                             "plan, decode, pack, write)")]
    rows.append(("wall time", f"{seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


class _Progress:
    """A tqdm bar per phase ("reading", "packing"), or a plain stderr line without tqdm, fed from the packing
    loop. The bar is tested with `is None`: a tqdm bar with no total raises on bool()."""

    def __init__(self):
        self.bar = None  # the current phase's tqdm bar; None without tqdm or between phases
        self.phase: Optional[str] = None

    def __call__(self, phase: str, done: int, total: Optional[int]) -> None:
        if phase != self.phase:
            self.close()
            self.phase = phase
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="img", desc=phase, file=sys.stderr)
        if self.bar is not None:
            if total is not None and self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.bar.n)
        else:
            print(f"\r{phase}: {done}" + (f"/{total}" if total else "") + " images", end="", file=sys.stderr)

    def close(self) -> None:
        """End the current phase's line (idempotent)."""
        if self.phase is None:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)
        self.bar = None
        self.phase = None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds as Ctrl-C does (temporaries removed,
    workers stopped, the lock released)."""


def _interrupt(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one unwinding; a second TERM waits for it
    raise _Terminated()


def _interrupted_line(output: str, beam: bool) -> str:
    """What an interrupted run says: how far it got and how to continue."""
    if beam:
        return "navit-pack: interrupted; the output folder keeps its previous dataset; rerun to start again"
    from pipelines.batch import journal

    try:
        done, total = journal.shards_done(output)
    except OSError:
        done, total = 0, None
    if total is None:
        return "navit-pack: interrupted before any shard was written; rerun with --resume to start again"
    return f"navit-pack: interrupted after {done} of {total} shards; rerun with --resume to continue"


def run(args: argparse.Namespace) -> int:
    import packer

    try:
        job = job_from_args(args)
        workers = packer.resolve_workers("auto" if args.workers == "auto" else
                                         options.parse_int(args.workers, "--workers", 0))
    except options.OptionError as e:
        options.fail(e)
    beam_args = options.beam_args(args.beam_args)
    options.quiet_beam()
    import schemas
    from pipelines import sources
    from pipelines.batch import run_pack
    from pipelines.batch.beam import is_local

    from pipelines.batch.journal import ResumeRefused

    progress = _Progress() if not args.no_progress and is_local(beam_args) and sys.stderr.isatty() else None
    start = time.perf_counter()
    timings: dict = {}
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        manifest = run_pack(job, beam_args=beam_args, workers=workers, overwrite=args.overwrite,
                            on_progress=progress, timings=timings, resume=args.resume)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (_interrupt): one line, no traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if progress:
            progress.close()
        print(_interrupted_line(job.output, bool(beam_args)), file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except ResumeRefused as e:
        options.fail(str(e))
    except sources.SourceError as e:
        options.fail(options.OptionError("--input", str(e)))
    except (schemas.OutputDirError, schemas.OutputLocked) as e:
        options.fail(options.OptionError("--output", str(e)))
    except (packer.RejectBudgetExceeded, schemas.OutputWriteError, schemas.OwnershipLost, packer.WorkerError) as e:
        if progress:
            progress.close()
        options.fail(str(e).split("\n")[0], status=1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if progress:
            progress.close()
    seconds = time.perf_counter() - start
    try:
        labels = sources.open_source(job.input, labels=job.labels).label_description()  # lists the input again
    except sources.SourceError:  # the input changed since the run: the summary goes without the row
        labels = None
    print(summary_table(manifest, job.output, seconds, timings, labels))
    return 0
