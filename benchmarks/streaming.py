"""Streaming benchmark: PackedStream (worker processes) vs prepare_image alone and a fixed-224 tf.data peer.

    python -m benchmarks.streaming [--workers 1,2,4,8,16] [--quick] [--json out.json] [--data DIR]

Every measurement runs in a fresh process pinned to N cores (sched_setaffinity; the stream's worker
processes inherit the pinning), on the JPEGs of DIR held in memory and looped (each epoch reshuffles
and redraws resolutions and drops), NaViT pretraining config: L=256, P=16, R ~ U(64, 256).

1. Baseline: packer.prepare_image alone on 1 core, one image after another (same run).
2. PackedStream with num_parallel=N on N cores (for each N in --workers; N=1 fills in process, N>1 in N
   worker processes beside the main process), records one at a time and batches(--batch). Reported: img/s, per core as a ratio
   to the baseline, scaling vs 1 core, the main process's CPU per image and share, packing efficiency.
3. tf.data peer: decode_jpeg, resize to 224x224, batch 64, parallel map, on the same cores.
4. Packing efficiency of the decisions alone, and peak RSS streaming 10k / 100k small synthetic images.
5. The cores needed to feed TARGET_IMAGES_PER_S from the per-core rate at the largest N measured.
CPU us/image (main + workers, from /proc) next to the wall-clock rates: on a shared, noisy machine
the CPU cost per image against prepare_image's is the steadier figure of the stream's overhead.
"worker idle": the share of the workers' time asleep waiting for work from the main process (from
/proc/PID/schedstat; the rest is running or waiting for a CPU): near 0 means the main process keeps
them fed and the rate is bound by the cores alone.
Results: a table on stdout and JSON (--json).
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
from . import write_json

TARGET_IMAGES_PER_S = 3_150  # one H100 training NaViT-B/16 at L=256, batch 64
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


def _default_data() -> str:
    """The shared imagenet-dev folder: beside the checkout (../shared) or at /work/shared."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "..", "..", "shared"), os.path.join(here, "..", "..", "..", "shared"), "/work/shared"):
        path = os.path.normpath(os.path.join(root, "data", "imagenet-dev"))
        if os.path.isdir(path):
            return path
    return "imagenet-dev"


def _pin(cores: int) -> None:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))


# ----------------------------------------------------------------------------- child processes
def _cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by running processes (Linux /proc)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _schedstat(pids: list[int]) -> list[tuple[int, int]]:
    """(ns running, ns runnable but waiting for a CPU) per process (Linux /proc/PID/schedstat)."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                running, waiting, _ = f.read().split()
            out.append((int(running), int(waiting)))
        except (OSError, ValueError):
            out.append((0, 0))
    return out


def child_prepare(data_dir: str, cores: int, images: int) -> dict:
    """packer.prepare_image alone (decode, resize, patchify, drop), one image after another: the per-core baseline."""
    _pin(cores)
    import packer

    config = packer.PackConfig(**CONFIG)
    data = _load(data_dir)
    for key, d in data[:20]:  # warm up
        packer.prepare_image(d, key, config)
    start, cpu0 = time.perf_counter(), time.process_time()
    for i in range(images):
        key, d = data[i % len(data)]
        packer.prepare_image(d, key, config, epoch=i // len(data))
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds, "cpu_us_per_image": 1e6 * cpu / images}


def child_stream(data_dir: str, cores: int, images: int, workers: int = -1, batch: int = 0) -> dict:
    """PackedStream over the JPEGs (reshuffled and redrawn every epoch) with `workers` worker processes
    (0: in process; -1: as many as cores), records one at a time or batches of `batch`."""
    _pin(cores)
    import numpy as np

    import packer
    from pipelines.stream import PackedStream

    workers = cores if workers < 0 else workers
    config = packer.PackConfig(**CONFIG)
    stream = PackedStream(_MemorySource(_load(data_dir)), config, num_parallel=workers)
    items = stream.batches(batch) if batch else stream
    packed = 0
    while packed < 100:  # warm up (workers started, pool full)
        packed += int(np.sum(next(items)["num_images"]))
    s0 = stream.stats
    pids = stream._driver.pool.worker_pids  # noqa: SLF001 - to read the workers' CPU time
    start, cpu0, kids0, sched0 = time.perf_counter(), time.process_time(), _cpu_of(pids), _schedstat(pids)
    packed = 0
    while packed < images:
        packed += int(np.sum(next(items)["num_images"]))
    seconds = time.perf_counter() - start
    main_cpu = time.process_time() - cpu0
    workers_cpu = _cpu_of(pids) - kids0
    sched = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(sched0, _schedstat(pids))]
    wall_ns = seconds * 1e9 * max(1, len(pids))
    # Worker time split: running, runnable but waiting for a CPU (other processes), and idle (asleep:
    # waiting for work from the main process). Idle near 0 means the main process keeps them fed.
    workers = {"running": sum(r for r, _ in sched) / wall_ns, "waiting_for_cpu": sum(w for _, w in sched) / wall_ns}
    workers["idle"] = max(0.0, 1 - workers["running"] - workers["waiting_for_cpu"]) if pids else None
    s1 = stream.stats
    sequences = s1["sequences"] - s0["sequences"]
    real = s1["tokens_real"] - s0["tokens_real"]
    stream.close()
    return {"images_per_s": packed / seconds, "sequences_per_s": sequences / seconds,
            "tokens_per_s": real / seconds, "efficiency": real / (sequences * config.seq_len), "images": packed,
            "seconds": seconds, "main_cpu_us_per_image": 1e6 * main_cpu / packed,
            "main_cpu_share": main_cpu / seconds, "workers_cpu_us_per_image": 1e6 * workers_cpu / packed,
            "cpu_us_per_image": 1e6 * (main_cpu + workers_cpu) / packed, "workers_time": workers if pids else None}


def child_packing(data_dir: str, images: int) -> dict:
    """Packing efficiency of the stream's decisions alone (plans, no pixels) over `images` images."""
    import packer

    config = packer.PackConfig(**CONFIG)
    data = _load(data_dir)
    core = packer.PackingCore(config)
    decisions = []
    for i in range(images):
        key, d = data[i % len(data)]
        decisions += core.add(packer.plan_header(d, key, config, epoch=i // len(data), images_seen=i), i)
    decisions += core.flush()
    real = sum(d.tokens for d in decisions)
    return {"images": images, "sequences": len(decisions), "efficiency": real / (len(decisions) * config.seq_len)}


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


def _run_child(kind: str, *params) -> dict:
    """Run one measurement in a fresh process (pinned there), print and return its JSON."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.streaming", "--child", json.dumps([kind, params])],
                         capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode:
        raise SystemExit(f"{kind} {params} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {kind} {params}: {result.get('images_per_s', 0):.0f} img/s", file=sys.stderr, flush=True)
    return result


# ----------------------------------------------------------------------------- driver
CHILDREN = {"prepare": child_prepare, "stream": child_stream, "tf": child_tf, "memory": child_memory}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=_default_data(), help="folder of JPEGs (default: the shared imagenet-dev folder)")
    p.add_argument("--quick", action="store_true", help="smaller runs (about two minutes on 2 idle cores)")
    p.add_argument("--workers", default="1,2", help="comma-separated core counts: the stream runs with that many "
                                                    "worker processes pinned to that many cores (default 1,2)")
    p.add_argument("--images", type=int, default=None, help="images per measurement (default 2000, --quick 600)")
    p.add_argument("--batch", type=int, default=64, help="batch size of the batches() measurement (0: skip)")
    p.add_argument("--repeat", type=int, default=1, help="run every measurement this many times, keep the fastest")
    p.add_argument("--no-tf", action="store_true", help="skip the tf.data fixed-224 peer")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "streaming.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, params = json.loads(args.child)
        print(json.dumps(CHILDREN[kind](*params)))
        return 0

    available = len(os.sched_getaffinity(0))
    images = args.images or (600 if args.quick else 2000)
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    skipped = [c for c in counts if c > available]
    counts = [c for c in counts if c <= available]
    if skipped:
        print(f"skipping {skipped}: only {available} cores available", file=sys.stderr)
    results: dict = {"config": CONFIG, "data": args.data, "images_per_run": images, "cores_available": available,
                     "throughput": [], "memory": []}
    # Every measurement `--repeat` times, interleaved (a round runs each once), keeping the fastest:
    # on a shared machine the best of a few runs is the one least disturbed by other work.
    best: dict = {}

    def measure(name: str, kind: str, *params) -> None:
        result = _run_child(kind, *params)
        if name not in best or result["images_per_s"] > best[name]["images_per_s"]:
            best[name] = result

    for _ in range(args.repeat):
        measure("prepare", "prepare", args.data, 1, images)
        for cores in counts:
            measure(f"stream{cores}", "stream", args.data, cores, images, cores)
            if args.batch:
                measure(f"batches{cores}", "stream", args.data, cores, images, cores, args.batch)
            if not args.no_tf:
                measure(f"tf{cores}", "tf", args.data, cores, images)
    results["repeat"] = args.repeat
    results["prepare_image_1_core_images_per_s"] = best["prepare"]["images_per_s"]
    results["prepare_image_cpu_us_per_image"] = best["prepare"]["cpu_us_per_image"]
    for cores in counts:
        row = {"cores": cores, "stream": best[f"stream{cores}"]}
        if args.batch:
            row["batches"] = best[f"batches{cores}"]
        if not args.no_tf:
            row["tf_fixed224_images_per_s"] = best[f"tf{cores}"]["images_per_s"]
        results["throughput"].append(row)
    results["packing"] = child_packing(args.data, 20_000)
    if not args.no_memory:
        for n in ((2_000, 20_000) if args.quick else (10_000, 100_000)):
            results["memory"].append(_run_child("memory", n))
        peak = [m["peak_rss_mb"] for m in results["memory"]]
        results["memory_growth"] = peak[1] / peak[0] - 1
    _summarize(results)
    write_json(args.json, results)
    return 0


def _summarize(results: dict) -> None:
    """Ratios against prepare_image alone (same run), scaling, and the cores to feed TARGET_IMAGES_PER_S."""
    base = results["prepare_image_1_core_images_per_s"]
    rows = results["throughput"]
    one = next((r["stream"]["images_per_s"] for r in rows if r["cores"] == 1), None)
    base_cpu = results["prepare_image_cpu_us_per_image"]
    print(f"prepare_image alone, 1 core: {base:.0f} img/s, {base_cpu:.0f} CPU us/image (baseline)")
    print(f"{'cores':>5} {'stream img/s':>12} {'per core/base':>13} {'vs 1 core':>9} {'batches img/s':>13} "
          f"{'tf224 img/s':>11} {'main us/img':>11} {'main CPU':>8} {'CPU us/img':>10} {'CPU/base':>8} {'eff':>7} "
          f"{'worker idle':>11}")
    for r in rows:
        s = r["stream"]
        r["per_core_vs_prepare"] = s["images_per_s"] / r["cores"] / base
        r["scaling_vs_1_core"] = s["images_per_s"] / one if one else None
        b = r.get("batches", {}).get("images_per_s")
        tf = r.get("tf_fixed224_images_per_s")
        print(f"{r['cores']:>5} {s['images_per_s']:>12.0f} {r['per_core_vs_prepare']:>13.2f} "
              f"{(r['scaling_vs_1_core'] or float('nan')):>9.2f} {b or float('nan'):>13.0f} {tf or float('nan'):>11.0f} "
              f"{s['main_cpu_us_per_image']:>11.0f} {100 * s['main_cpu_share']:>7.0f}% {s['cpu_us_per_image']:>10.0f} "
              f"{s['cpu_us_per_image'] / base_cpu:>8.2f} {100 * s['efficiency']:>6.2f}% "
              f"{(100 * s['workers_time']['idle']) if s.get('workers_time') else float('nan'):>10.0f}%")
        r["cpu_vs_prepare"] = s["cpu_us_per_image"] / base_cpu
    best = max(rows, key=lambda r: r["cores"]) if rows else None
    if best:
        per_core = best["stream"]["images_per_s"] / best["cores"]
        results["cores_for_target"] = {"target_images_per_s": TARGET_IMAGES_PER_S, "from_cores": best["cores"],
                                       "per_core_images_per_s": per_core, "cores": TARGET_IMAGES_PER_S / per_core}
        print(f"cores to feed {TARGET_IMAGES_PER_S} img/s at the {best['cores']}-core per-core rate "
              f"({per_core:.0f} img/s/core): {TARGET_IMAGES_PER_S / per_core:.1f}")
    pk = results["packing"]
    print(f"packing efficiency (decisions only, {pk['images']} images, L=256 uniform:64:256): {100 * pk['efficiency']:.2f}%")
    for m in results["memory"]:
        print(f"peak RSS after {m['images']:>7} images streamed: {m['peak_rss_mb']:.1f} MB ({m['seconds']:.1f} s)")
    if "memory_growth" in results:
        print(f"peak RSS growth: {100 * results['memory_growth']:+.1f}%")


if __name__ == "__main__":
    sys.exit(main())
