"""Streaming benchmark: PackedStream vs a standard fixed-resolution tf.data ViT input, on 1 and 2 cores.

    python -m benchmarks.streaming [--quick] [--json out.json] [--data ../shared/data/imagenet-dev]

1. Throughput: images/s of PackedStream (NaViT pretraining config: L=256, P=16, R ~ U(64, 256)) and of
   tf.data (decode_jpeg, resize to 224x224, batch 64, parallel map) on the same JPEGs held in memory and
   repeated, each pinned to 1 and then 2 cores (sched_setaffinity, TF thread pools sized to match) in a
   fresh process. Reported as a ratio to the baseline measured in the same run.
2. Memory: peak RSS of a process streaming 10k and 100k small synthetic images (--quick: 2k / 20k).
3. Feeding: packed tokens/s per core, and the cores that keep one accelerator at 500k tokens/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import os
import resource
import subprocess
import sys
import time

TARGET_TOKENS_PER_S = 500_000
CONFIG = dict(seq_len=256, patch_size=16, resolution="uniform:64:256")


@dataclasses.dataclass
class _Rec:
    key: str
    data: bytes
    label: int = -1
    meta: dict = dataclasses.field(default_factory=dict)


class _MemorySource:
    """Encoded images held in memory, one per unit."""

    def __init__(self, items: list[tuple[str, bytes]]):
        self._items = dict(items)

    def units(self):
        return list(self._items)

    def read(self, unit):
        yield _Rec(unit, self._items[unit])


def _load(data_dir: str) -> list[tuple[str, bytes]]:
    paths = sorted(glob.glob(os.path.join(data_dir, "*.JPEG")) + glob.glob(os.path.join(data_dir, "*.jpg")))
    if not paths:
        raise SystemExit(f"no JPEGs in {data_dir}")
    return [(os.path.basename(p), open(p, "rb").read()) for p in paths]


def _synthetic(n: int) -> list[tuple[str, bytes]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = int(rng.integers(32, 128)), int(rng.integers(32, 128))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        out.append((f"syn{i:05d}.jpg", buf.getvalue()))
    return out


def _pin(cores: int) -> None:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))


# ----------------------------------------------------------------------------- child processes
def child_stream(data_dir: str, cores: int, images: int) -> dict:
    _pin(cores)
    import packer
    from pipelines.stream import PackedStream

    config = packer.PackConfig(**CONFIG)
    stream = PackedStream(_MemorySource(_load(data_dir)), config, num_parallel=cores + 1 if cores > 1 else 0)
    for _ in range(20):  # warm up
        next(stream)
    start_images, start = stream.stats["images_seen"], time.perf_counter()
    sequences = 0
    while stream.stats["images_seen"] - start_images < images:
        next(stream)
        sequences += 1
    seconds = time.perf_counter() - start
    seen = stream.stats["images_seen"] - start_images
    stream.close()
    return {"images_per_s": seen / seconds, "sequences_per_s": sequences / seconds,
            "tokens_per_s": sequences * config.seq_len / seconds, "images": seen, "seconds": seconds}


def child_tf(data_dir: str, cores: int, images: int) -> dict:
    _pin(cores)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(cores)
    tf.config.threading.set_intra_op_parallelism_threads(cores)
    data = [d for _, d in _load(data_dir)]
    batch = 64

    def decode(b):
        img = tf.io.decode_jpeg(b, channels=3)
        return tf.cast(tf.image.resize(img, (224, 224)), tf.uint8)

    ds = tf.data.Dataset.from_tensor_slices(data).repeat().map(decode, num_parallel_calls=cores).batch(batch)
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = cores
    ds = ds.with_options(opts).prefetch(2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    steps = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch / seconds, "tokens_per_s": steps * batch * 196 / seconds,
            "images": steps * batch, "seconds": seconds}


def child_memory(images: int) -> dict:
    _pin(1)
    import packer
    from pipelines.stream import PackedStream

    config = packer.PackConfig(seq_len=256, patch_size=16, resolution="native")
    stream = PackedStream(_MemorySource(_synthetic(200)), config, num_parallel=0)
    start = time.perf_counter()
    while stream.stats["images_seen"] < images:
        next(stream)
    return {"images": stream.stats["images_seen"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - start}


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.streaming", "--child", *args], capture_output=True,
                         text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "imagenet-dev"))
    p.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "streaming.json"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        fn = {"stream": child_stream, "tf": child_tf, "memory": child_memory}[kind]
        params = [rest[0], int(rest[1]), int(rest[2])] if kind != "memory" else [int(rest[0])]
        print(json.dumps(fn(*params)))
        return 0

    available = len(os.sched_getaffinity(0))
    images = 600 if args.quick else 1500
    mem_sizes = (2_000, 20_000) if args.quick else (10_000, 100_000)
    results: dict = {"config": CONFIG, "data": args.data, "throughput": [], "memory": []}
    for cores in [c for c in (1, 2) if c <= available]:
        base = _run_child("tf", args.data, str(cores), str(images))
        mine = _run_child("stream", args.data, str(cores), str(images))
        results["throughput"].append({"cores": cores, "tf_fixed224_images_per_s": base["images_per_s"],
                                      "stream_images_per_s": mine["images_per_s"],
                                      "ratio": mine["images_per_s"] / base["images_per_s"],
                                      "stream_tokens_per_s": mine["tokens_per_s"]})
    for n in mem_sizes:
        results["memory"].append(_run_child("memory", str(n)))
    peak = [m["peak_rss_mb"] for m in results["memory"]]
    results["memory_growth"] = peak[1] / peak[0] - 1
    per_core = results["throughput"][0]["stream_tokens_per_s"]
    results["cores_for_500k_tokens_per_s"] = {"from_1_core": TARGET_TOKENS_PER_S / per_core}
    if len(results["throughput"]) > 1:
        two = results["throughput"][1]["stream_tokens_per_s"] / 2
        results["cores_for_500k_tokens_per_s"]["from_2_cores"] = TARGET_TOKENS_PER_S / two

    print(f"{'cores':>5}  {'tf.data 224 img/s':>17}  {'stream img/s':>12}  {'ratio':>6}  {'stream tokens/s':>15}")
    for r in results["throughput"]:
        print(f"{r['cores']:>5}  {r['tf_fixed224_images_per_s']:>17.0f}  {r['stream_images_per_s']:>12.0f}  "
              f"{r['ratio']:>6.2f}  {r['stream_tokens_per_s']:>15.0f}")
    for m in results["memory"]:
        print(f"peak RSS after {m['images']:>7} images streamed: {m['peak_rss_mb']:.1f} MB ({m['seconds']:.1f} s)")
    print(f"peak RSS growth {mem_sizes[0]} -> {mem_sizes[1]} images: {100 * results['memory_growth']:+.1f}%")
    for k, v in results["cores_for_500k_tokens_per_s"].items():
        print(f"cores to feed 500k tokens/s ({k.replace('_', ' ')}): {v:.1f}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
