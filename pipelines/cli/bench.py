"""`navit-pack bench packing`: the packing-efficiency sweep of pipelines.packing_efficiency."""
from __future__ import annotations

import argparse
import sys

from pipelines.cli.options import fail


def register(subparsers) -> None:
    from pipelines import packing_efficiency as packing

    bench = subparsers.add_parser("bench", help="benchmarks (packing efficiency)")
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    p = kinds.add_parser("packing", help="packing efficiency of every packer and peer over a size distribution",
                         description=packing.__doc__.split("\n\n")[0],
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    packing.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines import packing_efficiency as packing

    try:
        return packing.run(args, command="navit-pack " + " ".join(sys.argv[1:]))
    except ValueError as e:
        fail(e)
