"""How `navit-pack pack` scales with cores: where the CPU goes, per process, as ratios to a baseline.

For each N in --cores (default 1, 2, ... up to this machine's cores), a fresh process pinned to N cores runs
the batch job (pipelines.batch.run_pack, the local runner, N fill workers) over --images copies of the
JPEGs of --data, once for 1 epoch and once for 2; the difference (steady state: start-up and listing
cancel) gives, per image:

- images/s;
- main-process CPU per image (the process that lists, decides, hands out work and appends the bytes the
  workers encoded), and the projected ceiling 1 / main CPU per image: the images/s no worker count passes;
- each worker's CPU per image of the whole job, and its idle share (1 - its CPU time / the wall time);
- the shard writers' CPU per image (schemas._sink children: sha256, disk write, fsync of each shard).
  `--inline-writes` does those in the main process instead (the code before the writers), for comparison.

Baseline: in-process `packer.prepare_image` on one pinned core over the same bytes (the work a fill does).

  python -m benchmarks.scaling [--data DIR] [--images 2000] [--cores 1,2] [--format tfrecord] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import packer

from .throughput import DEFAULT_DATA, ROOT, make_folder, rate
from . import write_json

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def child(folder: str, out: str, workers: int, epochs: int, fmt: str, resolution: str, seq_len: int,
          inline_writes: bool) -> dict:
    """One pinned run of the batch job: its wall time, the main process's CPU, each worker's CPU, the shard
    writers' CPU."""
    import resource

    import schemas._sink
    from pipelines.batch import run_pack
    from pipelines.batch.job import PackJob

    if inline_writes:
        schemas._sink.AVAILABLE = False

    config = packer.PackConfig(seq_len=seq_len, resolution=resolution)
    job = PackJob(input=folder, output=out, config=config, fmt=fmt, epochs=epochs, labels="none")
    packer._worker.stop_idle_workers()
    def reaped() -> float:  # the shard writers: the only children waited for during the run
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    cpu0, t0, w0 = time.process_time(), time.perf_counter(), reaped()
    manifest = run_pack(job, workers=workers, overwrite=True)
    wall, main, writers = time.perf_counter() - t0, time.process_time() - cpu0, reaped() - w0
    idle = [proc.pid for _, proc, _ in packer._worker._IDLE]  # the pool's workers, detached at its close
    return {"wall": wall, "main_cpu": main, "worker_cpu": sorted((_cpu_seconds(p) for p in idle), reverse=True),
            "writer_cpu": writers, "images": manifest["num_images_in"]}


def run_child(cores: set[int], *argv) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--child", json.dumps([str(a) for a in argv])],
                         check=True, capture_output=True, text=True, env=env,
                         preexec_fn=lambda: os.sched_setaffinity(0, cores))
    return json.loads(out.stdout.strip().splitlines()[-1])


def steady(folder: str, tmp: str, cores: set[int], workers: int, args) -> dict:
    """Per-image figures of the second epoch: a 2-epoch run minus a 1-epoch run, both pinned to `cores`."""
    runs = [run_child(cores, folder, os.path.join(tmp, f"o{e}"), workers, e, args.format, args.resolution, args.seq_len,
                      int(args.inline_writes)) for e in (1, 2)]
    n = runs[1]["images"] - runs[0]["images"]
    wall = max(runs[1]["wall"] - runs[0]["wall"], 1e-9)
    main = (runs[1]["main_cpu"] - runs[0]["main_cpu"]) / n
    per_worker = [(b - a) for a, b in zip(runs[0]["worker_cpu"], runs[1]["worker_cpu"])]
    return {"cores": len(cores), "workers": workers, "images_per_s": n / wall, "main_us_per_image": 1e6 * main,
            "ceiling_images_per_s": 1 / main if main > 0 else float("inf"),
            "worker_us_per_image": [1e6 * c / n for c in per_worker],
            "worker_idle": [max(0.0, 1 - c / wall) for c in per_worker],
            "writer_us_per_image": 1e6 * (runs[1]["writer_cpu"] - runs[0]["writer_cpu"]) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--cores", default=None, help="comma-separated core counts (default 1, 2, 4, ... up to all)")
    parser.add_argument("--format", default="tfrecord")
    parser.add_argument("--resolution", default="uniform:64:256")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--inline-writes", action="store_true",
                        help="hash, write and fsync shards in the main process (no shard writer processes)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, out, workers, epochs, fmt, resolution, seq_len, inline = json.loads(args.child)
        print(json.dumps(child(folder, out, int(workers), int(epochs), fmt, resolution, int(seq_len), bool(int(inline)))))
        return
    available = sorted(os.sched_getaffinity(0))
    counts = ([int(c) for c in args.cores.split(",")] if args.cores else
              sorted({min(2 ** i, len(available)) for i in range(len(available).bit_length() + 1)}))
    config = packer.PackConfig(seq_len=args.seq_len, resolution=args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        paths = make_folder(args.data, args.images, folder)
        blobs = [open(p, "rb").read() for p in paths]
        keys = [os.path.basename(p) for p in paths]
        os.sched_setaffinity(0, {available[0]})
        base = rate(lambda: [packer.prepare_image(b, k, config) for k, b in zip(keys, blobs)], len(paths))
        os.sched_setaffinity(0, set(available))
        rows = [steady(folder, tmp, set(available[:c]), c, args) for c in counts if c <= len(available)]
    one = rows[0]["images_per_s"] if rows and rows[0]["cores"] == 1 else None
    print(f"{len(paths)} JPEGs (copies of {args.data}), {args.resolution}, L={args.seq_len}, {args.format}; "
          f"prepare_image alone, 1 core: {base:.0f} img/s (baseline)")
    print(f"{'cores':>5} {'img/s':>7} {'/base':>6} {'vs 1':>5} {'main us/img':>11} {'ceiling img/s':>13} "
          f"{'worker us/img':>14} {'worker idle':>12} {'writer us/img':>13}")
    for r in rows:
        print(f"{r['cores']:>5} {r['images_per_s']:>7.0f} {r['images_per_s'] / base / r['cores']:>6.2f} "
              f"{(r['images_per_s'] / one if one else float('nan')):>5.2f} {r['main_us_per_image']:>11.0f} "
              f"{r['ceiling_images_per_s']:>13.0f} {max(r['worker_us_per_image']):>14.0f} "
              f"{min(r['worker_idle']):>5.0%}-{max(r['worker_idle']):.0%} {r['writer_us_per_image']:>13.0f}")
    write_json(args.json, {"images": len(paths), "data": args.data, "format": args.format, "config": config.to_json(),
                           "inline_writes": args.inline_writes,
                           "prepare_image_images_per_s": base, "rows": rows})


if __name__ == "__main__":
    main()
