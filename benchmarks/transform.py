"""The per-image transform: speed on one pinned core and accuracy against the reference.

Over the dev JPEGs (default ../shared/data/imagenet-dev, looped to at least --decodes decodes), with each
image's target grid drawn as prepare_image draws it (--resolution uniform:64:256, P=16, L=256):

- pillow_full_decode: Image.open(...).convert("RGB") at full size, the yardstick (1.0x).
- pillow_draft_decode: Pillow with draft() (DCT scaling 1/2, 1/4, 1/8) to >= the target, no resize.
- simplejpeg_decode: libjpeg-turbo at the 1/2^k scale that prepare_image uses, no resize.
- previous_transform: the earlier transform (Pillow draft + Pillow bicubic, reducing_gap=2).
- prepare_default / prepare_fast: packer.prepare_image, --resize default / fast (decode, resize, patchify).

The same on --large photos of 1600x1200 (landscape) or 1200x1600, made by upscaling dev images with Pillow
(Lanczos) and re-encoding at quality 90. Every variant runs once per round over all files, the variants
interleaved per image per image; the figure is the median over --rounds rounds.

Accuracy: for every dev image (and every large photo), the output of decode_resized against the reference,
a full Pillow decode, EXIF transpose and Pillow's antialiased bicubic resize to the same grid: mean
absolute difference (/255, mean over images) and PSNR (5th percentile and median over images).

prepare_image step by step (header, plan, decode + resize, patchify, drop, record), timed in the loop.

Overhead after the transform, per image at L=256: prepare_image with the pixels already decoded
(plan, patchify, drop; the header read is measured apart), packer.pack_patched (packing decisions and
build_record), and schemas.write_shard (TFRecord serialization and write; outside packer/).

  taskset -c 0 python -m benchmarks.transform [--data DIR] [--rounds 5] [--large 48] [--json out.json]
"""
from __future__ import annotations

import argparse
import glob
import io
import math
import os
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

import packer
from packer import _image
from . import write_json

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet-dev")


def pin_to_one_core() -> int:
    core = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {core})
    return core


def targets_for(blobs: list[bytes], keys: list[str], config: packer.PackConfig) -> list[tuple[int, int]]:
    """Each image's target (height, width) in pixels, drawn exactly as prepare_image draws it."""
    p = config.patch_size
    out = []
    for key, data in zip(keys, blobs):
        opened = packer._image.OpenedImage(data, config.max_pixels)
        gh, gw = packer._plan.plan_grid(opened.height, opened.width, config,
                                  packer.image_rng(config.seed, key, 0, "resolution"))
        out.append((gh * p, gw * p))
    return out


def make_large(blobs: list[bytes], count: int) -> list[bytes]:
    """1600x1200 (or 1200x1600) photos: dev images upscaled with Lanczos, re-encoded at quality 90."""
    out = []
    for data in blobs[:count]:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        size = (1600, 1200) if img.width >= img.height else (1200, 1600)
        buf = io.BytesIO()
        img.resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pillow_full(data: bytes, height: int, width: int) -> None:
    Image.open(io.BytesIO(data)).convert("RGB")


def pillow_draft(data: bytes, height: int, width: int) -> None:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (width, height))
    img.convert("RGB")


def simplejpeg_scaled(data: bytes, height: int, width: int) -> None:
    h0, w0, _, _ = simplejpeg.decode_jpeg_header(data)
    k = _image._dct_halvings(h0, w0, height, width)
    simplejpeg.decode_jpeg(data, "rgb", min_height=math.ceil(h0 / 2 ** k), min_width=math.ceil(w0 / 2 ** k))


def previous_transform(data: bytes, height: int, width: int) -> np.ndarray:
    """The earlier decode_resized: Pillow draft, EXIF transpose, Pillow bicubic with reducing_gap=2."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (width, height))
    img = ImageOps.exif_transpose(img).convert("RGB")
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=2.0))


def reference(data: bytes, height: int, width: int) -> np.ndarray:
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC))


def timed(variants: dict[str, Callable[[bytes, int, int], object]], work: list[tuple[bytes, int, int]],
          rounds: int) -> dict[str, float]:
    """Median over `rounds` rounds (after a warm-up round) of each variant's ms per image. Within a round
    the variants take turns on each image, so a change in the machine's load hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    clock = time.perf_counter
    for r in range(rounds + 1):
        spent = dict.fromkeys(variants, 0.0)
        for data, h, w in work:
            for name, fn in variants.items():
                t = clock()
                fn(data, h, w)
                spent[name] += clock() - t
        if r:
            for name in variants:
                times[name].append(spent[name] / len(work) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def accuracy(blobs: list[bytes], targets: list[tuple[int, int]], resize: str) -> dict[str, float]:
    mads, psnrs = [], []
    for data, (h, w) in zip(blobs, targets):
        out = packer._image.OpenedImage(data, 10**9).decode_resized(h, w, resize=resize).astype(np.float64)
        diff = out - reference(data, h, w)
        mads.append(float(np.abs(diff).mean()))
        psnrs.append(10 * math.log10(255.0 ** 2 / max(float((diff * diff).mean()), 1e-12)))
    return {"mad": float(np.mean(mads)), "psnr_p5": float(np.percentile(psnrs, 5)),
            "psnr_median": float(np.median(psnrs))}


def overhead(blobs: list[bytes], keys: list[str], config: packer.PackConfig, rounds: int) -> dict[str, float]:
    """ms per image of the steps around the decode, with the pixels decoded beforehand."""
    import schemas

    class Predecoded(packer._image.OpenedImage):
        pixels: dict[tuple[int, int, int], np.ndarray] = {}

        def decode_resized(self, height, width, background=(255, 255, 255), resize="default"):
            slot = (id(self._data), height, width)
            if slot not in self.pixels:
                self.pixels[slot] = super().decode_resized(height, width, background, resize)
            return self.pixels[slot]

    from packer import _transform as _process  # prepare_image opens images there

    real = _process.OpenedImage
    _process.OpenedImage = Predecoded
    try:
        prepare = lambda: [packer.prepare_image(b, k, config) for k, b in zip(keys, blobs)]  # noqa: E731
        images = prepare()
        header = lambda: [packer._image.OpenedImage(b, config.max_pixels) for b in blobs]  # noqa: E731

        def pack() -> list:
            return list(packer.pack_patched(images, config))

        records = pack()
        with tempfile.TemporaryDirectory() as tmp:
            write = lambda: schemas.write_shard(tmp, 0, 1, "tfrecord", records, seq_len=config.seq_len,  # noqa: E731
                                                token_dim=config.token_dim, max_images_per_seq=config.max_images_per_seq)
            steps = {"header": header, "prepare_predecoded": prepare, "pack": pack, "write_tfrecord": write}
            out: dict[str, list[float]] = {name: [] for name in steps}
            for r in range(rounds + 1):
                for name, fn in steps.items():
                    t = time.perf_counter()
                    fn()
                    if r:
                        out[name].append((time.perf_counter() - t) / len(blobs) * 1e3)
    finally:
        _process.OpenedImage = real
    result = {name: statistics.median(ts) for name, ts in out.items()}
    result["after_transform"] = result["prepare_predecoded"] - result["header"] + result["pack"]
    return result


def step_profile(work: list[tuple[bytes, int, int]], keys: list[str], config: packer.PackConfig,
                 rounds: int) -> dict[str, float]:
    """ms per image of each step of prepare_image, timed in the loop as the pipeline runs it (each step
    runs right after the previous image's decode, with the caches that leaves)."""
    from packer._patch import patchify

    steps = ("header", "plan", "decode_resize", "patchify", "drop", "record")
    spent = dict.fromkeys(steps, 0.0)
    clock = time.perf_counter
    for _ in range(rounds):
        for (data, _, _), key in zip(work, keys * (len(work) // len(keys) + 1)):
            t0 = clock()
            opened = packer._image.OpenedImage(data, config.max_pixels)
            t1 = clock()
            gh, gw = packer._plan.plan_grid(opened.height, opened.width, config,
                                      packer.image_rng(config.seed, key, 0, "resolution"))
            t2 = clock()
            pixels = opened.decode_resized(gh * config.patch_size, gw * config.patch_size, config.background,
                                           config.resize)
            t3 = clock()
            patches, pos_y, pos_x = patchify(pixels, config.patch_size)
            t4 = clock()
            kept = packer._drop.kept_count(gh * gw, packer._drop.sample_drop_rate(config.token_drop, None, gh * gw,
                                                                      config.max_tokens_per_image))
            t5 = clock()
            packer.PatchedImage(key=key, patches=patches, pos_y=pos_y, pos_x=pos_x, grid_h=gh, grid_w=gw,
                                orig_h=opened.height, orig_w=opened.width, drop_rate=1.0 - kept / (gh * gw))
            t6 = clock()
            for name, begin, end in zip(steps, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
                spent[name] += end - begin
    return {name: total / rounds / len(work) * 1e3 for name, total in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--resolution", default="uniform:64:256")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decodes", type=int, default=400, help="loop the dev images to at least this many per round")
    parser.add_argument("--large", type=int, default=48, help="number of 1600x1200 photos to make (0: skip)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    paths = sorted(glob.glob(os.path.join(args.data, "*.JPEG")) + glob.glob(os.path.join(args.data, "*.jpg")))
    if not paths:
        raise SystemExit(f"no JPEGs in {args.data}")
    blobs = [open(p, "rb").read() for p in paths]
    keys = [os.path.basename(p) for p in paths]
    core = pin_to_one_core()
    config = packer.PackConfig(seq_len=args.seq_len, resolution=args.resolution)
    fast_config = packer.PackConfig(seq_len=args.seq_len, resolution=args.resolution, resize="fast")
    targets = targets_for(blobs, keys, config)
    key_of = {id(b): k for b, k in zip(blobs, keys)}
    variants = {
        "pillow_full_decode": pillow_full,
        "pillow_draft_decode": pillow_draft,
        "simplejpeg_decode": simplejpeg_scaled,
        "previous_transform": previous_transform,
        "prepare_default": lambda b, h, w: packer.prepare_image(b, key_of[id(b)], config),
        "prepare_fast": lambda b, h, w: packer.prepare_image(b, key_of[id(b)], fast_config),
    }
    loops = max(1, math.ceil(args.decodes / len(blobs)))
    work = [(b, h, w) for _ in range(loops) for b, (h, w) in zip(blobs, targets)]
    result = {"images": len(blobs), "decodes_per_round": len(work), "core": core, "rounds": args.rounds,
              "versions": packer.library_versions(), "config": config.to_json()}
    result["dev_ms"] = timed(variants, work, args.rounds)
    if args.large:
        large = make_large(blobs, args.large)
        large_keys = [f"large-{k}" for k in keys[:args.large]]
        key_of.update({id(b): k for b, k in zip(large, large_keys)})
        large_targets = targets_for(large, large_keys, config)
        result["large_ms"] = timed(variants, list((b, h, w) for b, (h, w) in zip(large, large_targets)), args.rounds)
    result["accuracy_dev"] = {k: accuracy(blobs, targets, k) for k in ("default", "fast")}
    prev = []
    for data, (h, w) in zip(blobs, targets):
        diff = previous_transform(data, h, w).astype(np.float64) - reference(data, h, w)
        prev.append((float(np.abs(diff).mean()), 10 * math.log10(255.0 ** 2 / max(float((diff * diff).mean()), 1e-12))))
    result["accuracy_dev"]["previous"] = {"mad": float(np.mean([m for m, _ in prev])),
                                          "psnr_p5": float(np.percentile([p for _, p in prev], 5)),
                                          "psnr_median": float(np.median([p for _, p in prev]))}
    if args.large:
        result["accuracy_large"] = {k: accuracy(large, large_targets, k) for k in ("default", "fast")}
    result["overhead_ms"] = overhead(blobs, keys, config, args.rounds)
    result["steps_ms"] = {kernel: step_profile(work, keys, cfg, 2) for kernel, cfg in
                          (("default", config), ("fast", fast_config))}

    print(f"{len(blobs)} JPEGs from {args.data} ({len(work)} decodes per round), {args.resolution}, P=16, "
          f"L={args.seq_len}, pinned to core {core}, median of {args.rounds} rounds; {result['versions']}")
    for section in ("dev_ms", "large_ms"):
        if section not in result:
            continue
        base = result[section]["pillow_full_decode"]
        title = "ImageNet-size dev JPEGs" if section == "dev_ms" else f"{args.large} photos 1600x1200 (q90)"
        print(f"\n{title}\n| step | ms/image | speed vs Pillow full decode |\n|---|---|---|")
        for name, ms in result[section].items():
            print(f"| {name} | {ms:.3f} | {base / ms:.2f}x |")
    for section in ("accuracy_dev", "accuracy_large"):
        if section not in result:
            continue
        print(f"\nAccuracy vs full Pillow decode + Pillow bicubic ({'dev images' if section == 'accuracy_dev' else 'large photos'})"
              "\n| kernel | MAD /255 | PSNR p5 dB | PSNR median dB |\n|---|---|---|---|")
        for name, acc in result[section].items():
            print(f"| {name} | {acc['mad']:.2f} | {acc['psnr_p5']:.1f} | {acc['psnr_median']:.1f} |")
    print("\nOverhead per image (ms), pixels decoded beforehand\n| step | ms/image |\n|---|---|")
    for name, ms in result["overhead_ms"].items():
        print(f"| {name} | {ms:.4f} |")
    print("\nprepare_image step by step, in the loop (ms/image; token drop none)\n| step | default | fast |\n|---|---|---|")
    for name in result["steps_ms"]["default"]:
        print(f"| {name} | {result['steps_ms']['default'][name]:.3f} | {result['steps_ms']['fast'][name]:.3f} |")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
