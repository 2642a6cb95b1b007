"""`navit-pack pack` throughput on ImageNet-size JPEGs, as ratios to baselines measured in the same run.

The 250 JPEGs of --data (default ../shared/data/imagenet-dev) are copied under distinct names into a
temporary folder until there are --images of them (default 2,000). With --resolution uniform:64:256, L=256:

- prepare_image: in-process `packer.prepare_image` over the same files' bytes, pinned to one core (baseline).
- pillow_full_decode: Image.open(...).convert("RGB") of the same bytes on one core (reference).
- pack_1core_steady: `navit-pack pack --workers 1` as a subprocess pinned to one core (its main process and
  its one fill process share it). Steady rate: extra images / extra time between a run of 1 epoch and one
  of 2 epochs, which cancels the start-up cost (imports, listing, worker start).
- pack_2core_steady vs pack_1w_2core_steady: `--workers 2` and `--workers 1` pinned to two cores.
- startup_s: wall time of `navit-pack pack` on a folder of one JPEG, start to exit (an upper bound on the
  start-up to the first decoded image).
- efficiency: packing efficiency of the 1-epoch run (manifest).

  python -m benchmarks.throughput [--data DIR] [--images 2000] [--json out.json]
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from PIL import Image

import packer
from . import write_json

DEFAULT_DATA = "/work/shared/data/imagenet-dev"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rate(fn, n: int) -> float:
    """Images/s of one call of fn() over n images, after a warm-up on the first few."""
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def make_folder(data: str, images: int, dest: str) -> list[str]:
    """Copy the JPEGs of `data` under distinct names into `dest` until there are `images` of them."""
    paths = sorted(glob.glob(os.path.join(data, "*.JPEG")) + glob.glob(os.path.join(data, "*.jpg")))
    if not paths:
        raise SystemExit(f"no JPEGs in {data}")
    out = []
    for i in range(images):
        target = os.path.join(dest, f"copy{i // len(paths):03d}_{os.path.basename(paths[i % len(paths)])}")
        shutil.copyfile(paths[i % len(paths)], target)
        out.append(target)
    return out


def pack_seconds(folder: str, out: str, cores: set[int], workers: int, epochs: int, args) -> tuple[float, dict]:
    """Wall seconds of one `navit-pack pack` subprocess pinned to `cores`, and its manifest."""
    cmd = [sys.executable, "-m", "pipelines.cli", "pack", "--no-progress", "--input", folder, "--output", out,
           "--overwrite", "--seq-len", str(args.seq_len), "--resolution", args.resolution, "--labels", "none",
           "--workers", str(workers), "--epochs", str(epochs)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    seconds = time.perf_counter() - t
    with open(os.path.join(out, "manifest.json")) as f:
        return seconds, json.load(f)


def steady(folder: str, tmp: str, cores: set[int], workers: int, n: int, args) -> tuple[float, dict]:
    """Steady images/s: n extra images over the extra time of 2 epochs against 1; also the 1-epoch manifest."""
    one, manifest = pack_seconds(folder, os.path.join(tmp, "o1"), cores, workers, 1, args)
    two, _ = pack_seconds(folder, os.path.join(tmp, "o2"), cores, workers, 2, args)
    return n / max(two - one, 1e-9), manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", default="uniform:64:256")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    one_core, two_cores = {cores[0]}, set(cores[:2])
    config = packer.PackConfig(seq_len=args.seq_len, resolution=args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        paths = make_folder(args.data, args.images, folder)
        n = len(paths)
        blobs = [open(p, "rb").read() for p in paths]
        keys = [os.path.basename(p) for p in paths]
        os.sched_setaffinity(0, one_core)
        rates = {
            "prepare_image": rate(lambda: [packer.prepare_image(b, k, config) for k, b in zip(keys, blobs)], n),
            "pillow_full_decode": rate(lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs], n),
        }
        os.sched_setaffinity(0, set(cores))
        rates["pack_1core_steady"], manifest = steady(folder, tmp, one_core, 1, n, args)
        if len(two_cores) == 2:
            rates["pack_1w_2core_steady"], _ = steady(folder, tmp, two_cores, 1, n, args)
            rates["pack_2w_2core_steady"], _ = steady(folder, tmp, two_cores, 2, n, args)
        single = os.path.join(tmp, "single")
        os.makedirs(single)
        shutil.copyfile(paths[0], os.path.join(single, "one.jpg"))
        startup, _ = pack_seconds(single, os.path.join(tmp, "os"), one_core, 1, 1, args)
    ratios = {"pack_1core_steady / prepare_image": rates["pack_1core_steady"] / rates["prepare_image"],
              "pack_1core_steady / pillow_full_decode": rates["pack_1core_steady"] / rates["pillow_full_decode"]}
    if "pack_2w_2core_steady" in rates:
        ratios["2 workers on 2 cores / 1 worker on 1 core"] = rates["pack_2w_2core_steady"] / rates["pack_1core_steady"]
        ratios["2 workers on 2 cores / 1 worker on 2 cores"] = rates["pack_2w_2core_steady"] / rates["pack_1w_2core_steady"]
    result = {"images": n, "data": args.data, "config": config.to_json(), "rates_images_per_s": rates,
              "ratios": ratios, "startup_s": startup, "efficiency": manifest["efficiency"]}
    print(f"{n} JPEGs (copies of {args.data}), {args.resolution}, L={args.seq_len}")
    for name, value in rates.items():
        print(f"  {name:<28} {value:8.1f} images/s")
    for name, value in ratios.items():
        print(f"  {name:<46} {value:5.2f}x")
    print(f"  {'start-up (1-image pack, start to exit)':<46} {startup:5.2f} s")
    print(f"  {'packing efficiency':<46} {100 * manifest['efficiency']:.2f}%")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
