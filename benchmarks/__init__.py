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
