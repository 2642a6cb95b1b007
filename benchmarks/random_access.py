"""Random access against sequential reading: records/s of schemas.PackedDataset[i] over a random
permutation of every index, against schemas.read (in order), on the same Arrow and ArrayRecord shards in
the same run; sha256 checks off on both sides (construction cost excluded: the dataset is opened once
outside the timing), the two take turns, best of --rounds.

    python -m benchmarks.random_access [--sequences 256] [--seq-len 256] [--patch-size 16] [--rounds 3] [--json PATH]
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np

import schemas
from benchmarks import record_args
from benchmarks.formats import make_records

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "random_access.json")
FORMATS = ("arrow", "array_record")


def measure(directory: str, rounds: int, seed: int = 0) -> dict:
    ds = schemas.PackedDataset(directory, check_sha256=False)
    order = np.random.default_rng(seed).permutation(len(ds)).tolist()
    best = {"random": 0.0, "sequential": 0.0}
    for _ in range(rounds):
        t = time.perf_counter()
        for i in order:
            ds[i]
        best["random"] = max(best["random"], len(order) / (time.perf_counter() - t))
        t = time.perf_counter()
        n = sum(1 for _ in schemas.read(directory, check_sha256=False))
        best["sequential"] = max(best["sequential"], n / (time.perf_counter() - t))
    return {**best, "ratio": best["random"] / best["sequential"]}


def main(argv: list[str] | None = None) -> int:
    parser = record_args(__doc__.splitlines()[0], DEFAULT_JSON)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    config, records = make_records(args.sequences, args.seq_len, args.patch_size)
    root = tempfile.mkdtemp(prefix="navit-random-access-")
    results = {}
    try:
        for fmt in FORMATS:
            d = os.path.join(root, fmt)
            schemas.write_dataset(d, records, config=config, fmt=fmt, num_shards=args.shards, meta_fields=("caption",))
            results[fmt] = measure(d, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.sequences} sequences, L={args.seq_len}, P={args.patch_size}, {args.shards} shards, "
          f"best of {args.rounds} rounds taken in turns\n")
    print("| format | PackedDataset[i], random order, records/s | schemas.read, in order, records/s | random / sequential |")
    print("|---|---|---|---|")
    for fmt, r in results.items():
        print(f"| {fmt} | {r['random']:.0f} | {r['sequential']:.0f} | {r['ratio']:.2f}x |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
