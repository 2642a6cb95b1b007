"""User-facing benchmarks: packing efficiency, throughput, formats, streaming."""


def write_json(path: "str | None", result) -> None:
    """Write a benchmark's results as JSON at `path` (its folder created), and say where; nothing if no path."""
    if not path:
        return
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


def record_args(description: str, default_json: "str | None", prog: "str | None" = None):
    """An argument parser with the options of the benchmarks over synthetic records: --sequences,
    --seq-len, --patch-size and --json (`default_json`; '' skips writing)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--json", default=default_json, help="write the results as JSON here ('' to skip)")
    return parser
