"""Consumer throughput: tokens/s of the reference NaViT (examples/navit_tf.py) on packed batches, forward
and forward+backward (one Adam step), beside a baseline measured in the same run: the same images fed
one per sequence, padded to L (a consumer without packing). The ratio of real (non-padding) tokens/s,
packed / one-per-sequence, is what packing buys the model at this L.

    python -m benchmarks.consumer --out consumer.json [--seq-len 256 --batch 32 --preset tiny|vit-s|vit-b --jit]

Needs only tensorflow, numpy and this repository; runs on CPU or on a GPU when TensorFlow sees one.
Images: side lengths uniform in [64, 256] px (random aspect), planned with the core (resolution
uniform:64:256, P=16), random uint8 content (the model's speed does not depend on pixel values).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import platform
import sys
import time
from typing import Any

import numpy as np

import packer
from . import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = {  # width, depth, heads, mlp_dim
    "tiny": (64, 2, 4, 128),
    "vit-s": (384, 12, 6, 1536),
    "vit-b": (768, 12, 12, 3072),
}


def load_reference_model():
    """examples/navit_tf.py, loaded by path (examples/ is not an installed package)."""
    path = os.path.join(HERE, "..", "examples", "navit_tf.py")
    spec = importlib.util.spec_from_file_location("_examples_navit_tf", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synthetic_images(n: int, config: packer.PackConfig, seed: int = 0) -> list[packer.PatchedImage]:
    """`n` planned images (core planning for sampled sizes) with random patches; labels in 0..9."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(s) for s in rng.integers(64, 257, 2))
        key = f"bench/{i}"
        gh, gw = packer._plan.plan_image(h, w, key, config, 0)
        pos_y, pos_x = np.divmod(np.arange(gh * gw, dtype=np.int32), np.int32(gw))
        patches = rng.integers(0, 256, (gh * gw, config.token_dim), dtype=np.uint8)
        out.append(packer.PatchedImage(key, patches, pos_y, pos_x, gh, gw, h, w, 0.0, label=i % 10))
    return out


def stack(records: list[dict[str, np.ndarray]], fields) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in records]) for k in fields}


def time_interleaved(fn, batches: dict[str, dict[str, np.ndarray]], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call for each batch, calls alternating between batches so that drift in a shared
    machine's load hits every layout alike; each result is fetched to host so GPU work is included."""
    import tensorflow as tf

    batches = {name: {k: tf.constant(v) for k, v in b.items()} for name, b in batches.items()}
    times: dict[str, list[float]] = {name: [] for name in batches}
    for i in range(warmup + steps):
        for name, batch in batches.items():
            t0 = time.perf_counter()
            _ = fn(batch).numpy()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    navit_tf = load_reference_model()
    width, depth, heads, mlp_dim = PRESETS[args.preset]
    config = packer.PackConfig(seq_len=args.seq_len, patch_size=16, resolution="uniform:64:256")
    images = synthetic_images(args.images, config, args.seed)
    packed = list(packer.pack_patched(images, config))
    if len(packed) < args.batch:
        raise SystemExit(f"{args.images} images gave {len(packed)} sequences < batch {args.batch}: raise --images")
    packed = packed[:args.batch]
    unpacked = [packer.build_record([im], config) for im in images[:args.batch]]
    layouts = {"packed": packed, "one-per-sequence": unpacked}

    keras.utils.set_random_seed(args.seed)
    model_config = navit_tf.NaViTConfig(patch_size=16, max_images_per_seq=config.max_images_per_seq, num_classes=10,
                                        width=width, depth=depth, heads=heads, mlp_dim=mlp_dim,
                                        position=args.position, max_grid=args.seq_len)
    model = navit_tf.NaViT(model_config)
    optimizer = keras.optimizers.Adam(1e-4)
    train_step = navit_tf.make_train_step(model, optimizer, jit_compile=args.jit)

    @tf.function(jit_compile=args.jit)
    def forward(batch):
        return model(batch)["logits"]

    modes = {"forward": forward, "train": train_step}
    results = []
    batches = {layout: stack(records, navit_tf.MODEL_FIELDS) for layout, records in layouts.items()}
    for mode, fn in modes.items():
        timed = time_interleaved(fn, batches, args.steps, args.warmup)
        for layout, records in layouts.items():
            batch, seconds = batches[layout], timed[layout]
            real = int(np.count_nonzero(batch["segment_ids"]))
            n_images = int(sum(int(r["num_images"]) for r in records))
            results.append({"mode": mode, "layout": layout, "seconds_per_step": seconds,
                            "tokens_per_s": args.batch * args.seq_len / seconds, "real_tokens_per_s": real / seconds,
                            "images_per_s": n_images / seconds, "real_fraction": real / (args.batch * args.seq_len),
                            "images_per_batch": n_images})
    by = {(r["mode"], r["layout"]): r for r in results}
    gain = {mode: by[(mode, "packed")]["real_tokens_per_s"] / by[(mode, "one-per-sequence")]["real_tokens_per_s"]
            for mode in modes}
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "benchmark": "consumer",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus] or ["CPU"],
        "cpu_cores": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__,
        "command": "python -m benchmarks.consumer " + " ".join(args.argv),
        "settings": {"seq_len": args.seq_len, "batch": args.batch, "preset": args.preset, "jit": args.jit,
                     "steps": args.steps, "warmup": args.warmup, "model": dataclasses.asdict(model_config),
                     "pack_config": config.to_json()},
        "results": results,
        "packing_gain_real_tokens_per_s": gain,
    }


def table(report: dict[str, Any]) -> str:
    rows = ["| mode | layout | ms/step | tokens/s | real tokens/s | images/s | real % |",
            "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        rows.append(f"| {r['mode']} | {r['layout']} | {1e3 * r['seconds_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['real_tokens_per_s']:,.0f} | {r['images_per_s']:,.1f} | {100 * r['real_fraction']:.1f} |")
    gains = ", ".join(f"{m}: {g:.2f}x" for m, g in report["packing_gain_real_tokens_per_s"].items())
    s = report["settings"]
    return (f"Device: {', '.join(report['device'])}; TF {report['tensorflow']}; L={s['seq_len']}, batch {s['batch']}, "
            f"preset {s['preset']}, jit {s['jit']}.\n\n" + "\n".join(rows) +
            f"\n\nPacking gain in real tokens/s (packed / one image per sequence): {gains}.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.consumer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="model size (width, depth, heads, mlp)")
    parser.add_argument("--position", default="fractional", help="absolute | fractional | fractional-mlp")
    parser.add_argument("--jit", action="store_true", help="compile the steps with XLA (jit_compile=True)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=1000, help="synthetic images to pack (>= enough for a batch)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = argv
    report = run(args)
    print(table(report))
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
