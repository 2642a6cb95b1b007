"""`navit-pack stats DIR --report OUT`: an HTML page with PNG plots of a packed dataset.

Reads the records with schemas.read and draws what a researcher checks before training: the effective
resolution (P * sqrt(grid_h * grid_w), the side of the square with the resized image's area) and aspect
ratios that the model will see, tokens and images per sequence, the realized drop rates, and padding per
shard. The PNGs are written beside the page, in `<OUT stem>_files/`.
"""
from __future__ import annotations

import html
import math
import os
from typing import Any

import numpy as np


def collect(directory: str) -> dict[str, Any]:
    """Per-image, per-sequence and per-shard arrays of a packed dataset, and its manifest."""
    import schemas

    manifest = schemas.read_manifest(directory)
    per_image = {k: [] for k in ("grid_h", "grid_w", "orig_h", "orig_w", "num_tokens", "drop_rates")}
    seq_tokens, seq_images = [], []
    for record in schemas.read(directory):
        k = int(record["num_images"])
        for name, values in per_image.items():
            values.append(np.asarray(record[name])[:k])
        seq_tokens.append(int(np.count_nonzero(record["segment_ids"])))
        seq_images.append(k)
    cat = {name: np.concatenate(v) if v else np.zeros(0) for name, v in per_image.items()}
    seq_tokens, seq_images = np.asarray(seq_tokens, np.int64), np.asarray(seq_images, np.int64)
    L = int(manifest["config"]["seq_len"])
    shard_padding, start = [], 0
    for shard in manifest["shards"]:  # schemas.read yields shards in manifest order
        n = int(shard["num_sequences"])
        real = int(seq_tokens[start:start + n].sum())
        shard_padding.append({"file": shard["file"], "sequences": n,
                              "padding": 1.0 - real / (n * L) if n else 0.0})
        start += n
    return {"manifest": manifest, "seq_len": L, "patch_size": int(manifest["config"]["patch_size"]),
            "images": cat, "seq_tokens": seq_tokens, "seq_images": seq_images, "shards": shard_padding}


def _figure(path: str, draw, figsize=(6.4, 4.0)) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plots(stats: dict[str, Any], out_dir: str) -> list[tuple[str, str]]:
    """Writes the PNGs; returns (file name, caption) pairs in page order."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    im, L, P = stats["images"], stats["seq_len"], stats["patch_size"]
    tokens_grid = im["grid_h"] * im["grid_w"]
    eff_res = P * np.sqrt(tokens_grid)
    out = []

    def add(name: str, caption: str, draw, figsize=(6.4, 4.0)) -> None:
        _figure(os.path.join(out_dir, name), draw, figsize)
        out.append((name, caption))

    def resolution(ax):
        ax.hist(eff_res, bins=40, color="#1f77b4")
        ax.axvline(eff_res.mean(), color="k", ls="--", lw=1, label=f"mean {eff_res.mean():.0f} px")
        ax.set_xlabel("effective resolution: patch size x sqrt(grid_h x grid_w), pixels")
        ax.set_ylabel("images")
        ax.set_title("Effective resolution after resampling")
        ax.legend()

    def aspect(ax):
        grid_ar = np.log2(im["grid_w"] / np.maximum(im["grid_h"], 1))
        orig_ar = np.log2(im["orig_w"] / np.maximum(im["orig_h"], 1))
        lo = math.floor(min(grid_ar.min(initial=0), orig_ar.min(initial=0)) * 4) / 4
        hi = math.ceil(max(grid_ar.max(initial=0), orig_ar.max(initial=0)) * 4) / 4
        bins = np.linspace(lo, hi + 1e-9, max(8, int((hi - lo) * 16) + 1))
        ax.hist(orig_ar, bins=bins, alpha=0.55, color="#7f7f7f", label="original image")
        ax.hist(grid_ar, bins=bins, histtype="step", lw=1.8, color="#d62728", label="patch grid")
        ticks = np.arange(math.floor(lo), math.ceil(hi) + 1)
        ax.set_xticks(ticks, [f"{2.0 ** t:g}" for t in ticks])
        ax.set_xlabel("aspect ratio width / height (log scale)")
        ax.set_ylabel("images")
        ax.set_title("Aspect ratios: original and patch grid")
        ax.legend()

    def tokens_per_image(ax):
        ax.hist(im["num_tokens"], bins=min(50, max(1, int(im["num_tokens"].max(initial=1)))), color="#2ca02c")
        ax.set_xlabel(f"tokens per image after dropping (sequence length {L})")
        ax.set_ylabel("images")
        ax.set_title("Tokens per image")

    def tokens_per_seq(ax):
        t = stats["seq_tokens"]
        pad = L - t
        top = int(pad.max(initial=0))
        step = max(1, math.ceil((top + 1) / 50))
        ax.hist(pad, bins=np.arange(0, top + step + 1, step), color="#9467bd", log=True)
        ax.set_xlabel(f"padding tokens per sequence (L = {L}; 0 = completely full)")
        ax.set_ylabel("sequences (log scale)")
        ax.set_title(f"Real tokens per sequence: mean {t.mean():.1f} of {L} (= {100 * t.mean() / L:.2f}% efficiency); "
                     f"{100 * np.mean(pad == 0):.0f}% of sequences have no padding" if t.size else "Tokens per sequence",
                     fontsize=9)

    def images_per_seq(ax):
        k = stats["seq_images"]
        counts = np.bincount(k) if k.size else np.zeros(1, int)
        ax.bar(np.arange(len(counts)), counts, color="#ff7f0e")
        max_images_per_seq = int(stats["manifest"]["config"].get("max_images_per_seq") or 0)
        ax.set_xlabel(f"images per sequence (max_images_per_seq = {max_images_per_seq})" if max_images_per_seq else "images per sequence")
        ax.set_ylabel("sequences")
        ax.set_title(f"Images per sequence (mean {k.mean():.2f})" if k.size else "Images per sequence")

    def drops(ax):
        d = im["drop_rates"]
        ax.hist(d, bins=np.linspace(0, 1, 41), color="#8c564b")
        ax.set_xlabel("realized drop rate per image (1 - kept / grid tokens)")
        ax.set_ylabel("images")
        ax.set_title(f"Token drop rates (mean {d.mean():.3f}, {100 * np.mean(d == 0):.0f}% keep all)" if d.size
                     else "Token drop rates")

    def shard_padding(ax):
        shards = stats["shards"]
        ax.bar(np.arange(len(shards)), [100 * s["padding"] for s in shards], color="#17becf")
        ax.set_xticks(np.arange(len(shards)), [str(i) for i in range(len(shards))] if len(shards) <= 32 else
                      [str(i) if i % max(1, len(shards) // 16) == 0 else "" for i in range(len(shards))])
        ax.set_xlabel("shard")
        ax.set_ylabel("padding, % of tokens")
        ax.set_title("Padding per shard")

    add("effective_resolution.png", "Effective resolution of the resampled images.", resolution)
    add("aspect_ratio.png", "Aspect ratio of the originals and of their patch grids (rounding shows as spread).", aspect)
    add("tokens_per_image.png", "Tokens per image after token dropping.", tokens_per_image)
    add("tokens_per_sequence.png", "Padding tokens per packed sequence (L minus real tokens). The mean real tokens over L is "
        "the packing efficiency; the share of sequences with no padding at all is a different figure.", tokens_per_seq)
    add("images_per_sequence.png", "Images packed into each sequence.", images_per_seq)
    add("drop_rates.png", "Realized per-image token drop rates.", drops)
    add("padding_per_shard.png", "Padding in each shard.", shard_padding)
    return out


def write_report(directory: str, out: str) -> str:
    """Writes the HTML page `out` (and its PNGs in `<stem>_files/`); returns its path."""
    stats = collect(directory)
    out = out if out.endswith((".html", ".htm")) else os.path.join(out, "report.html")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    files = os.path.splitext(out)[0] + "_files"
    figures = plots(stats, files)
    m = stats["manifest"]
    summary = [
        ("dataset", os.path.abspath(directory)), ("format", m["format"]),
        ("images in / packed / rejected", f"{m['num_images_in']:,} / {m['num_images_packed']:,} / {m['num_rejected']:,}"),
        ("sequences", f"{m['num_sequences']:,} of {stats['seq_len']} tokens in {len(m['shards'])} shard(s)"),
        ("efficiency", f"{100 * m['efficiency']:.2f}% real tokens ({100 * (1 - m['efficiency']):.2f}% padding)"),
        ("images per sequence", f"{stats['seq_images'].mean():.2f}" if stats["seq_images"].size else "-"),
        ("config", ", ".join(f"{k}={v}" for k, v in m["config"].items())),
    ]
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary)
    rel = os.path.basename(files)
    figs = "\n".join(f'<figure><img src="{rel}/{name}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption in figures)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>navit-pack stats: {html.escape(os.path.basename(os.path.abspath(directory)))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ text-align: left; padding: 4px 12px; border-bottom: 1px solid #ddd; vertical-align: top; }}
td {{ font-family: ui-monospace, monospace; font-size: 0.9em; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 1.2em; }}
figure {{ margin: 0; }} img {{ width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>navit-pack dataset report</h1>
<table>
{rows}
</table>
<div class="grid">
{figs}
</div>
</body></html>
"""
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return out
