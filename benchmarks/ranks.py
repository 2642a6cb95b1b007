"""Data-parallel streams (PackedStream across ranks): how even each step is, and what planning costs a rank.

1. Step balance. For N ranks of B sequences each, every rank of one run is iterated in turn over the same
   input (one epoch each, fills in this process). For every step, rank r's attention cost is the sum over
   its B sequences of the sum of its images' squared token counts (a segment-aware kernel's work); the
   step's spread is max over ranks / mean over ranks. Dealt by cost (balance=True, the default) against
   round robin (balance=False).
2. Planning against filling, per rank. Rank 0 of N runs with one fill worker process: its main process
   reads and plans every header of the run (on the fly) or reads a plan file (`navit-pack plan`), and
   decides; the worker fills rank 0's share only. Planning CPU (the stream's reads: headers or plan lines,
   plans, decisions, the deal; less handing its own sequences to the pool; plus the planning child's CPU
   after its start-up, where a folder's headers are read and planned a chunk ahead) / worker CPU is what planning
   costs a rank for the work it does; main CPU / worker CPU adds the hand-out and the batches.

  python -m benchmarks.ranks [--data DIR] [--epochs 8] [--ranks 4,8] [--batch 4] [--views] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import packer
from pipelines.stream import PackedStream

from .scaling import _cpu_seconds
from .throughput import DEFAULT_DATA
from . import write_json

CONFIG = packer.PackConfig(seq_len=256, resolution="uniform:64:256", token_drop="beta:0.25:0.5")


def step_costs(data: str, ranks: int, batch: int, balance: bool, epochs: int) -> np.ndarray:
    """[steps, ranks] attention cost of each rank's batch, every rank of one run iterated in turn."""
    per_rank = []
    for r in range(ranks):
        with PackedStream(data, CONFIG, epochs=epochs, shard_index=r, shard_count=ranks, balance=balance,
                          num_parallel=0) as stream:
            per_rank.append([int((b["num_tokens"].astype(np.int64) ** 2).sum()) for b in stream.batches(batch)])
    return np.array(per_rank).T


def spread(costs: np.ndarray) -> np.ndarray:
    mean = costs.mean(axis=1)
    return costs.max(axis=1) / np.maximum(mean, 1)


def _children_cpu() -> float:
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sum(_cpu_seconds(int(p)) for p in f.read().split())


def rank_cpu(data: str, ranks: int, epochs: int, plan: str | None, copy: bool = True) -> dict:
    """Rank 0 of `ranks` with one fill worker: per image it packs, its main-process CPU, the part of it spent
    planning (reading headers or the plan file, planning, deciding and dealing: the stream's reads, less
    handing its own sequences to the pool) and its worker's CPU. The worker is started (and has imported
    what it needs) before the count starts. copy=False takes the batches as views (batches(copy=False))."""
    packer._worker.stop_idle_workers()
    with PackedStream("synthetic:8", CONFIG, epochs=1, num_parallel=1) as warm:  # leaves an idle worker to reuse
        list(warm)
    spent = {"reads": 0.0, "handout": 0.0}

    def timed(fn, into):
        def run(*args):
            t = time.thread_time()
            try:
                return fn(*args)
            finally:
                spent[into] += time.thread_time() - t
        return run

    put = packer.Driver.put
    packer.Driver.put = timed(put, "handout")
    try:
        cpu0, workers0 = time.process_time(), _children_cpu()
        with PackedStream(data, CONFIG, epochs=epochs, shard_index=0, shard_count=ranks, num_parallel=1, plan=plan) as stream:
            stream._read_one = timed(stream._read_one, "reads")
            for _ in stream.batches(4, copy=copy):
                pass
            packed = stream.stats["images_packed"]
            child = getattr(stream._reader, "cpu", None) or 0.0  # the planning child's, its start-up left out
        main, worker = time.process_time() - cpu0, _children_cpu() - workers0
    finally:
        packer.Driver.put = put
    planning = spent["reads"] - spent["handout"] + child
    return {"images_packed": packed, "main_us_per_image": 1e6 * main / packed, "planning_us_per_image": 1e6 * planning / packed,
            "planning_child_us_per_image": 1e6 * child / packed, "worker_us_per_image": 1e6 * worker / packed,
            "main_over_worker": main / worker, "planning_over_worker": planning / worker}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=8, help="passes over --data (new draws each): the images of the run")
    parser.add_argument("--ranks", default="4,8")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--views", action="store_true", help="take the batches as views (batches(copy=False))")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"data": args.data, "epochs": args.epochs, "batch": args.batch, "views": args.views, "config": CONFIG.to_json(), "balance": [],
              "planning": []}
    print(f"{args.data} x {args.epochs} epochs, L={CONFIG.seq_len}, {CONFIG.to_json()['resolution']}, beta drop; "
          f"batch {args.batch} per rank")
    print(f"{'ranks':>5} {'dealt':>11} {'steps':>5} {'spread mean':>11} {'p95':>6} {'max':>6}")
    for n in (int(r) for r in args.ranks.split(",")):
        for balance in (True, False):
            s = spread(step_costs(args.data, n, args.batch, balance, args.epochs))
            full = s[:-1] if len(s) > 1 else s  # the last, short step holds padding: reported apart
            row = {"ranks": n, "balance": balance, "steps": len(s), "mean": float(full.mean()),
                   "p95": float(np.percentile(full, 95)), "max": float(full.max()), "last_step": float(s[-1])}
            result["balance"].append(row)
            print(f"{n:>5} {'by cost' if balance else 'round robin':>11} {len(s):>5} {row['mean']:>11.3f} "
                  f"{row['p95']:>6.3f} {row['max']:>6.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        plan = os.path.join(tmp, "epoch.plan")
        with PackedStream(args.data, CONFIG, epochs=args.epochs, num_parallel=0) as planner:
            planner.write_plan(plan)
        print(f"{'ranks':>5} {'plan from':>10} {'main us/img':>11} {'planning us/img':>15} {'fill us/img':>11} "
              f"{'main/fill':>9} {'planning/fill':>13}")
        for n in (int(r) for r in args.ranks.split(",")):
            for mode, path in (("headers", None), ("plan file", plan)):
                row = {"ranks": n, "plan_from": mode, **rank_cpu(args.data, n, args.epochs, path, not args.views)}
                result["planning"].append(row)
                print(f"{n:>5} {mode:>10} {row['main_us_per_image']:>11.0f} {row['planning_us_per_image']:>15.0f} "
                      f"{row['worker_us_per_image']:>11.0f} {row['main_over_worker']:>9.1%} {row['planning_over_worker']:>13.1%}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
