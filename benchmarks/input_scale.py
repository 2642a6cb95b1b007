"""`navit-pack pack` as the input grows: bytes read per input byte, images/s, main RSS, time to the first shard.

For each N in --sizes (default 10k, 40k, 160k), a folder of N hard links of the JPEGs of --data, in
sub-folders of 500 (so the files cost no disk), is packed by `navit-pack pack --workers W` (a subprocess).
Measured from outside while it runs:

- read / input: the bytes read (`rchar` of each thread, /proc/PID/task/TID/io, summed over the main process
  and its fill workers; the interpreter's own files included) against the input's bytes. The listing reads headers only, each fill reads its image once;
  the writer reads nothing back (shard digests are taken while writing).
- images/s over the whole run, and its ratio to the smallest N's.
- main RSS: the main process's peak resident memory (VmHWM), and its growth per image between sizes.
- time to the first shard: from the start to the first `packed-*` file in the output folder.

  python -m benchmarks.input_scale [--data DIR] [--sizes 10000,40000,160000] [--workers 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from .throughput import DEFAULT_DATA, ROOT
from . import write_json


def _proc_value(pid: int, name: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _own_reads(pid: int) -> int:
    """Bytes the process's live threads have read (rchar of /proc/PID/task/*/io). Not /proc/PID/io: that
    also adds in the reads of every child the process has reaped (its fill workers, at the end)."""
    try:
        return sum(_proc_value(pid, f"task/{tid}/io", "rchar:") for tid in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return set()


def link_folder(data: str, n: int, dest: str) -> int:
    """Hard links of data's JPEGs under dest/NNNN/ (500 a folder) until there are n; their total bytes."""
    paths = sorted(glob.glob(os.path.join(data, "*.JPEG")) + glob.glob(os.path.join(data, "*.jpg")))
    if not paths:
        raise SystemExit(f"no JPEGs in {data}")
    total = 0
    for i in range(n):
        folder = os.path.join(dest, f"{i // 500:04d}")
        if i % 500 == 0:
            os.makedirs(folder)
        src = paths[i % len(paths)]
        os.link(src, os.path.join(folder, f"{i:07d}_{os.path.basename(src)}"))
        total += os.path.getsize(src)
    return total


def run(folder: str, out: str, workers: int, args) -> dict:
    """Run one pack, sampling its processes' reads and the main RSS every 50 ms until it exits."""
    cmd = [sys.executable, "-m", "pipelines.cli", "pack", "--no-progress", "--input", folder, "--output", out,
           "--overwrite", "--seq-len", str(args.seq_len), "--resolution", args.resolution, "--labels", "none",
           "--workers", str(workers), "--format", args.format]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=ROOT))
    reads: dict[int, int] = {}
    rss = first_shard = 0.0
    while proc.poll() is None:
        for pid in {proc.pid} | _children(proc.pid):
            reads[pid] = max(reads.get(pid, 0), _own_reads(pid))
        rss = max(rss, _proc_value(proc.pid, "status", "VmHWM:") / 1024)
        if not first_shard and os.path.isdir(out) and any(e.startswith("packed-") for e in os.listdir(out)):
            first_shard = time.perf_counter() - start
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"pack failed with exit code {proc.returncode}")
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    return {"seconds": seconds, "read_bytes": sum(reads.values()), "main_read_bytes": reads.get(proc.pid, 0),
            "main_rss_mb": rss,
            "first_shard_s": first_shard or seconds, "images": manifest["num_images_in"],
            "output_bytes": sum(os.path.getsize(os.path.join(out, s["file"])) for s in manifest["shards"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--sizes", default="10000,40000,160000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--format", default="arrow")
    parser.add_argument("--resolution", default="uniform:64:256")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tmp-dir", default=None, help="where the links go (the data's filesystem; default: the system's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:  # must be on the data's filesystem (hard links)
        for n in (int(s) for s in args.sizes.split(",")):
            folder = os.path.join(tmp, f"in{n}")
            input_bytes = link_folder(args.data, n, folder)
            row = {"n": n, "input_bytes": input_bytes, **run(folder, os.path.join(tmp, f"out{n}"), args.workers, args)}
            row["read_per_input"] = row["read_bytes"] / input_bytes
            rows.append(row)
            subprocess.run(["rm", "-rf", folder, os.path.join(tmp, f"out{n}")], check=True)
            print(f"  {n}: done in {row['seconds']:.0f} s", flush=True)
    base = rows[0]["images"] / rows[0]["seconds"]
    print(f"`navit-pack pack --workers {args.workers} --format {args.format}`, {args.resolution}, L={args.seq_len}, "
          f"hard links of {args.data} in folders of 500")
    print(f"{'images':>8} {'input GB':>9} {'read GB':>8} {'read/input':>10} {'img/s':>6} {'vs first':>8} "
          f"{'main RSS MB':>11} {'first shard s':>13}")
    for r in rows:
        rate = r["images"] / r["seconds"]
        print(f"{r['n']:>8} {r['input_bytes'] / 1e9:>9.2f} {r['read_bytes'] / 1e9:>8.2f} {r['read_per_input']:>9.2f}x "
              f"{rate:>6.0f} {rate / base:>7.2f}x {r['main_rss_mb']:>11.0f} {r['first_shard_s']:>13.1f}")
    if len(rows) >= 2:
        slope = (rows[-1]["main_rss_mb"] - rows[0]["main_rss_mb"]) / (rows[-1]["n"] - rows[0]["n"])
        projected = rows[-1]["main_rss_mb"] + slope * (1_000_000 - rows[-1]["n"])
        print(f"main RSS growth: {1e3 * slope:.2f} MB per 1,000 images; at 1,000,000 images: about {projected:.0f} MB")
    write_json(args.json, {"workers": args.workers, "format": args.format, "rows": rows})


if __name__ == "__main__":
    main()
