"""`navit-pack pack`: pack an input into sharded sequences with the Beam pipeline.

Local runs use Beam's DirectRunner (multi-process with --workers N); anything after `--` is passed to
Beam as pipeline options, e.g. `-- --runner DataflowRunner --project P --region R --temp_location gs://B/tmp`.
"""
from __future__ import annotations

import argparse
import sys
import time

from pipelines import options

EXAMPLES = """examples:
  navit-pack pack --input synthetic:2000 --output out --overwrite
  navit-pack pack --input ~/imagenet/train --output gs://bucket/packed --resolution uniform:64:256 \\
      --token-drop beta:0.25:0.5 --epochs 4 --num-shards 256 -- --runner DataflowRunner \\
      --project my-project --region us-central1 --temp_location gs://bucket/tmp --setup_file ./setup.py
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("pack", help="pack images into fixed-length sequences (Apache Beam)",
                              description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="SRC",
                   help="a folder or glob of images (local or gs://), tfds:NAME[/CONFIG]:SPLIT, tfrecord:GLOB, "
                        "parquet:GLOB, arrow:GLOB, wds:SHARDS (WebDataset tars, e.g. wds:shards-{000..099}.tar) or "
                        "synthetic:N[:SEED], e.g. --input synthetic:2000")
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
    p.add_argument("--workers", default="1", metavar="N",
                   help="local worker processes for the DirectRunner (default 1), e.g. --workers 4")
    p.add_argument("--max-reject-fraction", default="1", metavar="F",
                   help="fail the job when more than this fraction of inputs is rejected (default 1: never), "
                        "e.g. --max-reject-fraction 0.01")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on local runs")
    options.add_pack_options(p)
    p.add_argument("beam_args", nargs=argparse.REMAINDER, metavar="-- BEAM_PIPELINE_OPTIONS",
                   help="options for Beam after `--`, e.g. -- --runner DataflowRunner --project P --region R "
                        "--temp_location gs://B/tmp --setup_file ./setup.py")
    p.set_defaults(func=run)


def job_from_args(args: argparse.Namespace):
    """A PackJob from parsed arguments; raises options.OptionError on a bad value."""
    from pipelines.beam_pipeline import PackJob
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


def _beam_args(raw: list[str]) -> list[str]:
    if raw and raw[0] == "--":
        raw = raw[1:]
    if raw and not raw[0].startswith("--"):
        options.fail(options.OptionError(raw[0], "unexpected argument; Beam pipeline options go after `--`"))
    return raw


def summary_table(manifest: dict, output: str, seconds: float, labels: str | None = None) -> str:
    """The end-of-run summary, one aligned `name  value` row per line; `labels` says how labels were
    found (Source.label_description())."""
    seqs = manifest["num_sequences"]
    rows = [
        ("output", output),
        ("format", f"{manifest['format']}, {len(manifest['shards'])} shards"),
        ("epochs", manifest.get("epochs", 1)),
        ("images in", manifest["num_images_in"]),
        ("images packed", manifest["num_images_packed"]),
        ("images rejected", manifest["num_rejected"] if not manifest["num_rejected"] else
         f"{manifest['num_rejected']} (see rejects.jsonl)"),
        ("sequences", f"{seqs} x {manifest['config']['seq_len']} tokens"),
        ("images / sequence", f"{manifest['num_images_packed'] / seqs:.2f}" if seqs else "-"),
        ("tokens real", manifest["tokens_real"]),
        ("tokens padding", manifest["tokens_padding"]),
        ("packing efficiency", f"{100 * manifest['efficiency']:.2f}%"),
        *([("labels", labels)] if labels else []),
        ("wall time", f"{seconds:.1f} s ({manifest['num_images_in'] / max(seconds, 1e-9):.0f} images/s)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


class _Progress:
    """A tqdm bar (or a plain stderr line) fed by the pipeline's polling thread."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="img", desc="packing", file=sys.stderr)
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(done - self.bar.n)
        else:
            print(f"\rpacking: {done}/{total} images", end="", file=sys.stderr)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        elif self.bar is False:
            print(file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        job = job_from_args(args)
        workers = options.parse_int(args.workers, "--workers", 1)
    except options.OptionError as e:
        options.fail(e)
    beam_args = _beam_args(args.beam_args)
    import logging
    logging.getLogger().setLevel(logging.ERROR)
    import schemas
    from pipelines import sources
    from pipelines.beam_pipeline import RejectBudgetExceeded, is_local, run_pack

    progress = _Progress() if not args.no_progress and is_local(beam_args) and sys.stderr.isatty() else None
    start = time.perf_counter()
    try:
        manifest = run_pack(job, beam_args=beam_args, workers=workers, overwrite=args.overwrite, on_progress=progress)
    except sources.SourceError as e:
        options.fail(options.OptionError("--input", str(e)))
    except schemas.OutputDirError as e:
        options.fail(options.OptionError("--output", str(e)))
    except Exception as e:  # Beam wraps worker errors; report ours in one line
        if isinstance(e, RejectBudgetExceeded) or "RejectBudgetExceeded" in str(e):
            text = str(e)
            start_at = text.find("RejectBudgetExceeded")
            line = text[start_at:].split("\n")[0] if start_at >= 0 else text
            print(f"navit-pack: error: {line.split(': ', 1)[-1]}", file=sys.stderr)
            return 1
        raise
    finally:
        if progress:
            progress.close()
    seconds = time.perf_counter() - start
    try:
        labels = sources.open_source(job.input, labels=job.labels).label_description()  # lists the input again
    except sources.SourceError:  # the input changed since the run: the summary goes without the row
        labels = None
    print(summary_table(manifest, job.output, seconds, labels))
    return 0
