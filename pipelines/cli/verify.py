"""`navit-pack verify DIR`: check every shard of DIR against manifest.json (sha256, record counts) and every
record's integrity. Exit 0 if all is well; otherwise exit 1 naming each bad shard (2: no usable manifest)."""
from __future__ import annotations

import argparse
import sys

from pipelines.cli import options
from pipelines.cli.options import fail


def register(subparsers: argparse._SubParsersAction) -> None:
    p = options.command(subparsers, "verify", "check a packed output directory (sha256, counts, CRCs, records)",
                        __doc__)
    options.add_dataset_dir(p)
    p.add_argument("--quick", action="store_true", help="sha256 and manifest checks only; do not decode records")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import schemas

    try:
        report = schemas.verify(args.dir, deep=not args.quick)
    except schemas.VerificationError as e:
        print(f"FAILED {e}", file=sys.stderr)
        return 1
    except (schemas.ManifestMissing, schemas.ManifestError) as e:
        fail(e)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"OK {report.directory}: {report.format}, {report.num_shards} shards, {report.num_sequences} sequences"
          + ("" if args.quick else f", {report.num_images} images, {report.tokens_real} real tokens"))
    return 0
