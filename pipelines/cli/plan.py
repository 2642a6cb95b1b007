"""`navit-pack plan`: write the global packing plan of an input once, for every rank to read.

Data-parallel trainers can plan on the fly (every rank reads and plans every header, then fills only its
own sequences), or read this file instead: `PackedStream(SRC, config, epochs=N, plan=FILE, shard_index=i,
shard_count=M)` gives the same sequences as planning on the fly, without reading a header. The file holds
the options and, a line each, every decision of the epochs: each image's reference in its source,
provenance and plan. The input must be one whose images can be read alone (a folder, a glob, synthetic:N).

Anything after `--` is passed to Apache Beam and runs the plan job there (pipelines.batch.plan_job: the
headers read in parallel by Beam workers, the plan decided by one), writing the same file, e.g.
`-- --runner DataflowRunner --project P --region R --temp_location gs://B/tmp` with `--output gs://B/plan.jsonl`.
"""
from __future__ import annotations

import argparse
import time

from pipelines.cli import options

EXAMPLES = """examples:
  navit-pack plan --input ~/imagenet/train --output plan.jsonl --epochs 4 --resolution uniform:64:256 \\
      --token-drop beta:0.25:0.5
  navit-pack plan --input gs://bucket/train --output gs://bucket/plan.jsonl --epochs 4 -- \\
      --runner DataflowRunner --project my-project --region us-central1 --temp_location gs://bucket/tmp
"""


def register(subparsers) -> None:
    p = options.command(subparsers, "plan", "write the global packing plan of an input once, for data-parallel ranks",
                        __doc__, EXAMPLES)
    options.add_input(p)
    p.add_argument("--output", required=True, metavar="FILE", help="the plan file to write, e.g. --output plan.jsonl")
    p.add_argument("--epochs", default="1", metavar="N", help="epochs planned (default 1), e.g. --epochs 4")
    p.add_argument("--shuffle-block", default="1024", metavar="N",
                   help="records shuffled together, as PackedStream's shuffle_block (default 1024)")
    p.add_argument("--workers", default="1", metavar="N",
                   help="with `-- --runner DirectRunner`: its processes (default 1), e.g. --workers 4")
    options.add_pack_options(p)
    options.add_beam_args(p, "-- --runner DataflowRunner --project P --region R --temp_location gs://B/tmp")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = options.config_or_error(args)
        epochs = options.parse_int(args.epochs, "--epochs", 1)
        block = options.parse_int(args.shuffle_block, "--shuffle-block", 1)
        meta_fields = options.parse_meta_fields(args.meta_fields)
        spec = options.input_spec(args)
        workers = options.parse_int(args.workers, "--workers", 1)
    except options.OptionError as e:
        options.fail(e)
    from pipelines import sources
    from pipelines.batch.plan_job import PlanJob, run_plan_beam
    from pipelines.stream import StreamError

    job = PlanJob(spec, args.output, config, epochs, block, args.labels, meta_fields)
    beam_args = options.beam_args(args.beam_args)
    start = time.perf_counter()
    try:
        if beam_args:
            options.quiet_beam()
            count = run_plan_beam(job, beam_args, workers)
            stats = None
        else:
            stream = job.stream()
            count = stream.write_plan(args.output)
            stats = stream.stats
    except sources.SourceError as e:
        options.fail(options.OptionError("--input", str(e)))
    except (StreamError, OSError) as e:
        options.fail(str(e), status=1)
    lines = [("plan", args.output), ("epochs", epochs), ("sequences", "written" if count is None else count)]
    if stats is not None:
        lines += [("images seen", stats["images_seen"]), ("images rejected", stats["images_rejected"])]
    lines.append(("wall time", f"{time.perf_counter() - start:.1f} s"))
    print("\n".join(f"  {name:<17} {value}" for name, value in lines))
    return 0
