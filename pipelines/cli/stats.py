"""`navit-pack stats DIR [--json]`: what a packed output holds, from its manifest and one pass over its records."""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

from pipelines.cli import options


def register(subparsers) -> None:
    p = options.command(subparsers, "stats", "summarize a packed output (efficiency, images per sequence, rejects)",
                        __doc__, "examples:\n  navit-pack stats out\n  navit-pack stats out --json > stats.json")
    options.add_dataset_dir(p)
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    p.add_argument("--report", metavar="OUT", default=None,
                   help="also write an HTML page with PNG plots: OUT itself when it ends in .html (plots in OUT_files/), "
                        "else OUT/report.html (plots in OUT/report_files/)")
    p.set_defaults(func=run)


def _describe(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"mean": 0.0, "min": 0, "p50": 0, "max": 0}
    return {"mean": float(values.mean()), "min": float(values.min()), "p50": float(np.median(values)),
            "max": float(values.max())}


def read_rejects(directory: str) -> list[dict]:
    """The entries of an output's rejects file (the manifest's `rejects`; empty when the file is absent)."""
    import schemas

    path = schemas.rejects_path(directory)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def compute_stats(directory: str) -> dict:
    """Statistics of a packed output as plain JSON (also the input of any report renderer)."""
    import schemas

    manifest = schemas.read_manifest(directory)
    per_seq, tokens, drops, grid_h, grid_w, labels = [], [], [], [], [], collections.Counter()
    for record in schemas.read(directory):
        k = int(record["num_images"])
        per_seq.append(k)
        tokens.append(record["num_tokens"][:k])
        drops.append(record["drop_rates"][:k])
        grid_h.append(record["grid_h"][:k])
        grid_w.append(record["grid_w"][:k])
        labels.update(int(v) for v in record["labels"][:k])
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    per_seq_arr = np.asarray(per_seq, np.int64)
    tokens_arr, drops_arr = cat(tokens, np.int32), cat(drops, np.float32)
    patch = manifest["config"]["patch_size"]
    side = np.sqrt(cat(grid_h, np.int32).astype(np.float64) * cat(grid_w, np.int32)) * patch
    rejects = read_rejects(directory)
    return {
        "dir": directory,
        "format": manifest["format"],
        "num_shards": len(manifest["shards"]),
        "epochs": manifest.get("epochs", 1),
        "config": manifest["config"],
        "num_images_in": manifest["num_images_in"],
        "num_images_packed": manifest["num_images_packed"],
        "num_rejected": manifest["num_rejected"],
        "rejects_by_reason": dict(sorted(collections.Counter(r["reason"] for r in rejects).items())),
        "num_sequences": manifest["num_sequences"],
        "tokens_real": manifest["tokens_real"],
        "tokens_padding": manifest["tokens_padding"],
        "efficiency": manifest["efficiency"],
        "images_per_sequence": _describe(per_seq_arr),
        "images_per_sequence_histogram": {str(k): int(v) for k, v in sorted(collections.Counter(per_seq).items())},
        "tokens_per_image": _describe(tokens_arr),
        "drop_rate": _describe(drops_arr),
        "effective_resolution": _describe(side),
        "num_labels": len([v for v in labels if v >= 0]),
        "unlabelled_images": labels.get(-1, 0),
    }


def format_stats(stats: dict) -> str:
    """A human-readable table of compute_stats() output."""
    def dist(d: dict, fmt: str = "{:.1f}") -> str:
        return " / ".join(fmt.format(d[k]) for k in ("mean", "min", "p50", "max")) + "  (mean / min / p50 / max)"

    rows = [
        ("output", f"{stats['dir']} ({stats['format']}, {stats['num_shards']} shards, {stats['epochs']} epochs)"),
        ("config", ", ".join(f"{k}={stats['config'][k]}" for k in ("seq_len", "patch_size", "resolution",
                                                                      "token_drop", "max_images_per_seq", "packer"))),
        ("images in", stats["num_images_in"]),
        ("images packed", stats["num_images_packed"]),
        ("images rejected", stats["num_rejected"]),
    ]
    rows += [(f"  {reason}", n) for reason, n in stats["rejects_by_reason"].items()]
    rows += [
        ("sequences", stats["num_sequences"]),
        ("packing efficiency", f"{100 * stats['efficiency']:.2f}% ({stats['tokens_padding']} padding tokens)"),
        ("images / sequence", dist(stats["images_per_sequence"], "{:.2f}")),
        ("tokens / image", dist(stats["tokens_per_image"])),
        ("drop rate", dist(stats["drop_rate"], "{:.3f}")),
        ("resolution (px)", dist(stats["effective_resolution"])),
        ("labels", f"{stats['num_labels']} classes, {stats['unlabelled_images']} unlabelled images"),
        ("histogram", " ".join(f"{k}:{v}" for k, v in stats["images_per_sequence_histogram"].items())
         + "  (images per sequence: sequences)"),
    ]
    width = max(len(str(name)) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    import schemas

    try:
        stats = compute_stats(args.dir)
    except schemas.SchemaError as e:
        options.fail(e)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    if args.report:
        from pipelines.cli.report import write_report

        print(f"wrote {write_report(args.dir, args.report)}", file=sys.stderr)
    return 0
