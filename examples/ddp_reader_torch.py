"""Data-parallel PyTorch over a written packed dataset: schemas.PackedDataset (random access to Arrow or
ArrayRecord shards) + DistributedSampler + DataLoader workers, each batch turned into tensors with the
attention inputs a fused kernel takes (cu_seqlens for FlashAttention varlen).

    torchrun --nproc_per_node 2 examples/ddp_reader_torch.py --data DIR [--sampler distributed|exact]

--sampler distributed (training): DistributedSampler with drop_last=False pads every rank to the same
length by repeating the first indices, so ceil(N / world) steps on every rank and up to world - 1
records seen twice per epoch (drop_last=True drops them instead: N % world records unseen); call
set_epoch(e) each epoch for a new shuffle. --sampler exact (evaluation): rank r reads records r, r + world,
...: every record once, but ranks may differ by one step, so no collective may run per step.
Without --data, rank 0 writes a small synthetic Arrow dataset first. At the end the ranks all_gather the
image keys they saw and rank 0 prints a JSON report (tests/test_dataset.py runs it with two CPU ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/shapes.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import schemas  # noqa: E402
import shapes  # noqa: E402


class Collate:
    """Records -> a batch of tensors (string fields kept as lists) plus cu_seqlens / max_seqlen."""

    def __init__(self, max_images_per_seq: int):
        self.max_segments = max_images_per_seq + 1  # the images and the padding of a row

    def __call__(self, records: list[dict]) -> dict:
        batch = {k: ([r[k].tolist() for r in records] if records[0][k].dtype == object
                     else torch.from_numpy(np.stack([r[k] for r in records]))) for k in records[0]}
        cu, max_seqlen = schemas.cu_seqlens(batch["segment_ids"].numpy(), self.max_segments)
        batch["cu_seqlens"], batch["max_seqlen"] = torch.from_numpy(cu), max_seqlen
        return batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a packed Arrow or ArrayRecord dataset (default: a synthetic one)")
    parser.add_argument("--sampler", choices=("distributed", "exact"), default="distributed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = [args.data or os.path.join(tempfile.mkdtemp(), "packed-arrow")]
    if args.data is None:
        if rank == 0:
            shapes.make_dataset(data[0], n=80, num_shards=3)
        dist.broadcast_object_list(data)
    dist.barrier()
    dataset = schemas.PackedDataset(data[0])  # sha256 of every shard checked here; workers reopen, no rehash
    if args.sampler == "distributed":
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=False)
        sampler.set_epoch(0)
    else:
        sampler = range(rank, len(dataset), world)
    max_images = schemas.read_manifest(data[0])["max_images"]
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                        collate_fn=Collate(max_images), persistent_workers=False)
    keys, steps = [], 0
    for batch in loader:
        B, L = batch["segment_ids"].shape
        assert batch["patches"].dtype == torch.uint8 and batch["cu_seqlens"].shape == (B * (max_images + 1) + 1,)
        for row, n in zip(batch["image_keys"], batch["num_images"].tolist()):
            keys.append(tuple(row[:n]))
        steps += 1
    everyone = [None] * world
    dist.all_gather_object(everyone, {"keys": keys, "steps": steps})
    if rank == 0:
        seen = [k for r in everyone for k in r["keys"]]
        print(json.dumps({"records": len(dataset), "seen": len(seen), "distinct": len(set(seen)),
                          "steps": [r["steps"] for r in everyone], "sampler": args.sampler}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
