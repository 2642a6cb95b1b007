"""End-to-end packing throughput on one core, as ratios to two baselines measured in the same run.

On a folder of JPEGs (default ../shared/data/imagenet-dev), with --resolution uniform:64:256 and L=256,
the process pinned to one core (os.sched_setaffinity):

- pack_core: the pack path in-process, JPEG bytes -> prepare_image -> SequencePacker -> schemas.write_shard.
- pack_beam: `navit-pack pack` (the Beam pipeline, DirectRunner, one worker) end to end from the image folder
  to written shards and manifest. Steady rate: extra epochs / extra time between a run with 1 epoch and
  one with 1 + E epochs, which cancels the fixed start-up cost (pipeline construction, imports).
- pillow_full_decode: Image.open(...).convert("RGB") of every image at full size (baseline 1).
- timm_naflex: timm-style NaFlex preprocessing: full decode, resize to the largest grid with at most 256
  patches under ceil rounding (timm / SigLIP2 get_image_size_for_max_num_patches), patchify; no packing
  (baseline 2).

  python -m benchmarks.throughput [--data DIR] [--epochs 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

import packer

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet-dev")


def pin_to_one_core() -> int:
    core = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {core})
    return core


def timed_rate(fn, n: int, rounds: int) -> float:
    """Median images/s of `rounds` calls of fn() (each processes n images), after one warm-up call."""
    fn()
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def pillow_full_decode(blobs: list[bytes]) -> None:
    for b in blobs:
        Image.open(io.BytesIO(b)).convert("RGB").load()


def naflex_size(h: int, w: int, patch: int, max_patches: int) -> tuple[int, int]:
    """timm / SigLIP2 NaFlex: the largest scale whose ceil-rounded patch grid has <= max_patches patches."""
    lo, hi = 1e-6, 64.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if math.ceil(h * mid / patch) * math.ceil(w * mid / patch) <= max_patches:
            lo = mid
        else:
            hi = mid
    return max(1, math.ceil(h * lo / patch)) * patch, max(1, math.ceil(w * lo / patch)) * patch


def timm_naflex(blobs: list[bytes], patch: int = 16, max_patches: int = 256) -> None:
    for b in blobs:
        img = Image.open(io.BytesIO(b)).convert("RGB")
        th, tw = naflex_size(img.height, img.width, patch, max_patches)
        pixels = np.asarray(img.resize((tw, th), Image.Resampling.BICUBIC))
        packer.patchify(pixels, patch)


def pack_core(blobs: list[bytes], keys: list[str], config: packer.PackConfig, out: str) -> None:
    import schemas

    sp = packer.SequencePacker(config)
    records = []
    for key, b in zip(keys, blobs):
        records.extend(sp.add(packer.prepare_image(b, key, config)))
    records.extend(sp.flush())
    schemas.write_shard(out, 0, 1, "tfrecord", records, seq_len=config.seq_len, token_dim=config.token_dim,
                        max_images=config.max_images_per_seq)


def pack_beam_seconds(data: str, config: packer.PackConfig, epochs: int) -> float:
    from pipelines.beam_pipeline import PackJob, run_pack

    with tempfile.TemporaryDirectory() as tmp:
        job = PackJob(input=data, output=os.path.join(tmp, "out"), config=config, epochs=epochs)
        t = time.perf_counter()
        run_pack(job, workers=1)
        return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--resolution", default="uniform:64:256")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="extra epochs of the Beam run for the steady rate")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging
    logging.getLogger().setLevel(logging.ERROR)

    paths = sorted(glob.glob(os.path.join(args.data, "*.JPEG")) + glob.glob(os.path.join(args.data, "*.jpg")))
    if not paths:
        raise SystemExit(f"no JPEGs in {args.data}")
    blobs = [open(p, "rb").read() for p in paths]
    keys = [os.path.basename(p) for p in paths]
    core = pin_to_one_core()
    config = packer.PackConfig(seq_len=args.seq_len, resolution=args.resolution)
    n = len(blobs)
    result = {"images": n, "core": core, "config": config.to_json(), "rates_images_per_s": {}}
    rates = result["rates_images_per_s"]
    rates["pillow_full_decode"] = timed_rate(lambda: pillow_full_decode(blobs), n, args.rounds)
    rates["timm_naflex"] = timed_rate(lambda: timm_naflex(blobs, config.patch_size, args.seq_len), n, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        rates["pack_core"] = timed_rate(lambda: pack_core(blobs, keys, config, tmp), n, args.rounds)
    one = pack_beam_seconds(args.data, config, 1)
    more = pack_beam_seconds(args.data, config, 1 + args.epochs)
    rates["pack_beam_steady"] = args.epochs * n / max(more - one, 1e-9)
    rates["pack_beam_incl_startup"] = (1 + args.epochs) * n / more
    result["beam_seconds"] = {"epochs_1": one, f"epochs_{1 + args.epochs}": more}
    result["ratios"] = {
        "pack_beam_steady / pillow_full_decode": rates["pack_beam_steady"] / rates["pillow_full_decode"],
        "pack_beam_steady / timm_naflex": rates["pack_beam_steady"] / rates["timm_naflex"],
        "pack_core / pillow_full_decode": rates["pack_core"] / rates["pillow_full_decode"],
        "pack_core / timm_naflex": rates["pack_core"] / rates["timm_naflex"],
    }
    print(f"{n} JPEGs from {args.data}, {args.resolution}, L={args.seq_len}, pinned to core {core}")
    for name, rate in rates.items():
        print(f"  {name:<24} {rate:8.1f} images/s")
    for name, ratio in result["ratios"].items():
        print(f"  {name:<40} {ratio:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
