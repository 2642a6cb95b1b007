"""Multi-process JAX with the packing stream: each process (jax.distributed) packs its own share of one
global plan (PackedStream(shard="auto") reads jax.process_index() / process_count()), every process
takes the same number of steps, and no image is seen twice.

    python examples/multiprocess_stream_jax.py --process-id 0 --num-processes 2 --coordinator HOST:PORT
    python examples/multiprocess_stream_jax.py --process-id 1 --num-processes 2 --coordinator HOST:PORT

On TPU or GPU pods jax.distributed.initialize() takes these from the environment. The check at the end
(a process_allgather of the key hashes and step counts) is what tests/test_examples_ranks.py runs with two
CPU processes on localhost.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import packer  # noqa: E402
from pipelines.stream import PackedStream  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default="synthetic:200")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--coordinator", default="127.0.0.1:12355")
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    args = parser.parse_args()
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
    jax.config.update("jax_enable_x64", True)  # the key hashes below are 62-bit: keep them whole in the gather
    from jax.experimental import multihost_utils

    config = packer.PackConfig(seq_len=256, resolution="uniform:64:256", token_drop="beta:0.25:0.5")
    hashes, steps = [], 0
    with PackedStream(args.input, config, epochs=1, shard="auto", num_parallel=1) as stream:
        for batch in stream.batches(args.batch):
            tokens = jax.numpy.asarray(batch["patches"])  # [B, L, P*P*3] on this process's devices
            assert tokens.shape[0] <= args.batch  # the last, short step: the same on every process
            for row, n in zip(batch["image_keys"], batch["num_images"]):
                hashes += [packer.stable_hash(str(k)) >> 2 for k in row[:int(n)]]
            steps += 1
    counts = multihost_utils.process_allgather(np.array([steps, len(hashes)]))
    width = int(np.max(counts[:, 1]))
    padded = np.full(width, -1, np.int64)
    padded[:len(hashes)] = hashes
    gathered = multihost_utils.process_allgather(padded)
    if jax.process_index() == 0:
        seen = [int(h) for h in gathered.reshape(-1) if h >= 0]
        report = {"steps": counts[:, 0].tolist(), "images": len(seen), "distinct": len(set(seen))}
        print(json.dumps(report))
        assert len(set(report["steps"])) == 1, report
        assert report["images"] == report["distinct"], report
    return 0


if __name__ == "__main__":
    sys.exit(main())
