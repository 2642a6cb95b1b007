"""The stream's main-process CPU per image in steady state, as issue 25 states its targets.

`PackedStream(..., num_parallel=1).batches(4, copy=False)` (the main process and one fill worker), its main
thread's CPU over the whole loop. A run pays a fixed cost too (the pool's start, the first reads before the
first batch): over 1,000 images it is several microseconds an image. So each case runs at two lengths, and
the steady state is the marginal cost, (CPU of the long run - CPU of the short run) / (images between them):
- headers: every header read (distinct files: hard links of the data's JPEGs, `--copies` of each), the
  only epoch of a large input;
- headers, memo: later epochs of the same files (FileSource keeps each size while the file is unchanged);
- plan file: the global plan read from a `navit-pack plan` file.
The whole-run figure (fixed cost included) is printed beside it, and the planning child's CPU (a folder's
headers are read and planned in a child process, pipelines.stream._Planner). Runs alternate, each in a
fresh process.

  python -m benchmarks.main_cpu [--data DIR] [--copies 16] [--runs 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from .throughput import DEFAULT_DATA
from . import write_json

_RUN = r"""
import json, sys, time
from pipelines.stream import PackedStream
from benchmarks.ranks import CONFIG
data, epochs, plan = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
with PackedStream("synthetic:8", CONFIG, epochs=1, num_parallel=1) as warm:  # leaves an idle worker to reuse
    list(warm)
with PackedStream(data, CONFIG, epochs=epochs, num_parallel=1, plan=plan) as stream:
    t0 = time.thread_time()
    for _ in stream.batches(4, copy=False):
        pass
    cpu = time.thread_time() - t0
    planner = getattr(stream._reader, "cpu", None) or 0.0  # the planning child's, its start-up left out
print(json.dumps({"cpu": cpu, "planner_cpu": planner, "images": stream.stats["images_packed"]}))
"""


def linked_copies(data: str, copies: int, root: str) -> str:
    """`copies` hard links (or copies, across file systems) of every JPEG under `data`, each under its own
    class folder name, in `root`: distinct files whose headers all have to be read."""
    names = sorted(n for n in os.listdir(data) if n.lower().endswith((".jpeg", ".jpg")))
    for c in range(copies):
        folder = os.path.join(root, f"c{c:03d}")
        os.makedirs(folder)
        for n in names:
            try:
                os.link(os.path.join(data, n), os.path.join(folder, n))
            except OSError:
                with open(os.path.join(data, n), "rb") as src, open(os.path.join(folder, n), "wb") as dst:
                    dst.write(src.read())
    return root


_ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(data: str, epochs: int, plan: str = "") -> dict:
    """One stream run in a fresh process: its main thread's CPU seconds and the images it packed."""
    out = subprocess.run([sys.executable, "-c", _RUN, data, str(epochs), plan], capture_output=True, text=True, env=_ENV)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def write_plan(data: str, epochs: int, path: str) -> str:
    code = ("import sys; from pipelines.stream import PackedStream; from benchmarks.ranks import CONFIG; "
            "PackedStream(sys.argv[1], CONFIG, epochs=int(sys.argv[2])).write_plan(sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, data, str(epochs), path], check=True, env=_ENV)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--copies", type=int, default=16, help="links of each image (epochs) in the long runs; the short ones: 4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="navit-main-cpu-")
    short, long = linked_copies(args.data, 4, os.path.join(tmp, "short")), linked_copies(args.data, args.copies, os.path.join(tmp, "long"))
    plans = {e: write_plan(args.data, e, os.path.join(tmp, f"e{e}.plan")) for e in (4, args.copies)}
    cases = {  # name: ((data, epochs, plan) short, (...) long)
        "headers": ((short, 1, ""), (long, 1, "")),
        "headers, memo": ((args.data, 4, ""), (args.data, args.copies, "")),
        "plan file": ((args.data, 4, plans[4]), (args.data, args.copies, plans[args.copies])),
    }
    results: dict = {name: {"steady_us": [], "whole_run_us": [], "planner_steady_us": []} for name in cases}
    for _ in range(args.runs):
        for name, (a, b) in cases.items():
            ra, rb = run(*a), run(*b)
            more = rb["images"] - ra["images"]
            results[name]["steady_us"].append(1e6 * (rb["cpu"] - ra["cpu"]) / more)
            results[name]["whole_run_us"].append(1e6 * ra["cpu"] / ra["images"])
            results[name]["planner_steady_us"].append(1e6 * (rb["planner_cpu"] - ra["planner_cpu"]) / more)
    print(f"{'us/image':<14} {'main, steady state (runs)':<26} {'median':>6}   {'main, run of 1,000':<20} "
          f"{'planning child, steady':<22}")
    for name, r in results.items():
        steady, whole, child = r["steady_us"], r["whole_run_us"], r["planner_steady_us"]
        print(f"{name:<14} {', '.join(f'{v:.0f}' for v in steady):<26} {statistics.median(steady):>6.0f}   "
              f"{', '.join(f'{v:.0f}' for v in whole):<20} {', '.join(f'{v:.0f}' for v in child):<22}")
    if args.json:
        write_json(args.json, {"data": args.data, "copies": args.copies, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
