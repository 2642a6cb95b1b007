"""`python -m benchmarks.packing`: the packing-efficiency sweep, run from the repository.

The sweep itself lives in pipelines.packing_efficiency (the product's `navit-pack bench packing` and `advise`
use it); this script is the same command without the installed CLI."""
from __future__ import annotations

import argparse
import sys

from pipelines import packing_efficiency
from pipelines.cli.options import fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packing",
                                     description=packing_efficiency.__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    packing_efficiency.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return packing_efficiency.run(args, command="python -m benchmarks.packing "
                                      + " ".join(argv if argv is not None else sys.argv[1:]))
    except ValueError as e:
        fail(e, prog="benchmarks.packing")


if __name__ == "__main__":
    sys.exit(main())
