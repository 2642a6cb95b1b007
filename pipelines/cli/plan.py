"""`navit-pack plan`: write the global packing plan of an input once, for every rank to read.

Data-parallel trainers can plan on the fly (every rank reads and plans every header, then fills only its
own sequences), or read this file instead: `PackedStream(SRC, config, epochs=N, plan=FILE, shard_index=i,
shard_count=M)` gives the same sequences as planning on the fly, without reading a header. The file holds
the options and, a line each, every decision of the epochs: each image's reference in its source,
provenance and plan. The input must be one whose images can be read alone (a folder, a glob, synthetic:N).
"""
from __future__ import annotations

import argparse
import time

from pipelines.cli import options

EXAMPLES = """examples:
  navit-pack plan --input ~/imagenet/train --output plan.jsonl --epochs 4 --resolution uniform:64:256 \\
      --token-drop beta:0.25:0.5
"""


def register(subparsers) -> None:
    p = options.command(subparsers, "plan", "write the global packing plan of an input once, for data-parallel ranks",
                        __doc__, EXAMPLES)
    options.add_input(p)
    p.add_argument("--output", required=True, metavar="FILE", help="the plan file to write, e.g. --output plan.jsonl")
    p.add_argument("--epochs", default="1", metavar="N", help="epochs planned (default 1), e.g. --epochs 4")
    p.add_argument("--shuffle-block", default="1024", metavar="N",
                   help="records shuffled together, as PackedStream's shuffle_block (default 1024)")
    options.add_pack_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = options.config_or_error(args)
        epochs = options.parse_int(args.epochs, "--epochs", 1)
        block = options.parse_int(args.shuffle_block, "--shuffle-block", 1)
        meta_fields = options.parse_meta_fields(args.meta_fields)
        spec = options.input_spec(args)
    except options.OptionError as e:
        options.fail(e)
    from pipelines import sources
    from pipelines.stream import PackedStream, StreamError

    start = time.perf_counter()
    try:
        source = sources.open_source(spec, labels=args.labels, meta_fields=meta_fields)
        stream = PackedStream(source, config, epochs=epochs, meta_fields=meta_fields, shuffle_block=block, num_parallel=0)
        count = stream.write_plan(args.output)
    except sources.SourceError as e:
        options.fail(options.OptionError("--input", str(e)))
    except (StreamError, OSError) as e:
        options.fail(str(e), status=1)
    stats = stream.stats
    print(f"  plan              {args.output}\n  epochs            {epochs}\n  sequences         {count}\n"
          f"  images seen       {stats['images_seen']}\n  images rejected   {stats['images_rejected']}\n"
          f"  wall time         {time.perf_counter() - start:.1f} s")
    return 0
