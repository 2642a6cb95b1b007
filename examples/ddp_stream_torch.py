"""Data-parallel PyTorch with the packing stream: each torchrun rank packs its own share of one global
plan (PackedStream(shard="auto") reads RANK / WORLD_SIZE), every rank takes the same number of steps,
and no image is seen twice.

    torchrun --nproc_per_node 2 examples/ddp_stream_torch.py --input ~/photos --steps 100

The check at the end (all_gather of the image keys each rank saw, and of its step count) is what
tests/test_examples_ranks.py runs with two CPU processes over gloo.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import packer  # noqa: E402
from pipelines.stream import PackedStream  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default="synthetic:200")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the epochs)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    config = packer.PackConfig(seq_len=256, resolution="uniform:64:256", token_drop="beta:0.25:0.5")
    keys, steps = [], 0
    with PackedStream(args.input, config, epochs=args.epochs, shard="auto", num_parallel=1) as stream:
        for batch in stream.batches(args.batch):
            patches = torch.from_numpy(batch["patches"])  # uint8 [B, L, P*P*3]: the model's input
            segment_ids = torch.from_numpy(batch["segment_ids"])
            assert patches.shape[0] == segment_ids.shape[0] <= args.batch  # the last, short step: the same on every rank
            for row, n in zip(batch["image_keys"], batch["num_images"]):
                keys += [str(k) for k in row[:int(n)]]
            steps += 1
            if args.steps is not None and steps == args.steps:
                break
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"keys": keys, "steps": steps})
    if dist.get_rank() == 0:
        seen = [k for r in everyone for k in r["keys"]]
        report = {"steps": [r["steps"] for r in everyone], "images": len(seen), "distinct": len(set(seen))}
        print(json.dumps(report))
        assert len(set(report["steps"])) == 1, report
        assert report["images"] == report["distinct"], report
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
