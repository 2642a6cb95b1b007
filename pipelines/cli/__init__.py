"""The `navit-pack` command line. Each subcommand lives in its own module of this package (pack, plan, stats,
inspect, verify, bench, advise, serve) exposing `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the handler; `options` holds what they share (the packing options, the one error format)."""
from __future__ import annotations

import argparse
import importlib
import os

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = [
    "pipelines.cli.pack",
    "pipelines.cli.plan",
    "pipelines.cli.stats",
    "pipelines.cli.inspect",
    "pipelines.cli.verify",
    "pipelines.cli.bench",
    "pipelines.cli.advise",
    "pipelines.cli.serve",
]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line in the CLI's one error format (`navit-pack: error: ...`,
    exit 2), like every other configuration error, instead of the usage block."""

    def error(self, message: str):
        from pipelines.cli.options import fail

        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        fail(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="navit-pack", description="NaViT (Patch n' Pack) data pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The CLI uses TensorFlow only for record I/O and tf.data service: silence its C++ start-up chatter
    # (the oneDNN notice ignores TF_CPP_MIN_LOG_LEVEL; the CLI runs no numerics that oneDNN would change).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)

