"""`navit-pack inspect DIR --sequence I --out seq.png`: draw one packed sequence back as images.

The top strip is the sequence itself, one cell per token in order, coloured by segment (black: padding).
Below, each image is rebuilt from its patches at their (y, x) positions: dropped tokens are grey, and
each image is framed in its segment's colour and captioned with its key, label, grid and
original size as width x height (WxH, as image tools write them), tokens and drop rate.
"""
from __future__ import annotations

import argparse
import itertools
import math

import numpy as np

import packer
from pipelines.cli import options

_DROPPED_GREY = 128


def register(subparsers) -> None:
    p = options.command(subparsers, "inspect", "render one packed sequence back to images (PNG)", __doc__,
                        "example:\n  navit-pack inspect out --sequence 0 --out seq.png")
    options.add_dataset_dir(p)
    p.add_argument("--sequence", type=int, default=0, metavar="I",
                   help="index of the sequence in reading order (shard by shard; default 0), e.g. --sequence 12")
    p.add_argument("--out", default="seq.png", metavar="PNG", help="picture to write (default seq.png), e.g. --out seq.png")
    p.set_defaults(func=run)


def segment_colors(n: int) -> np.ndarray:
    """n distinct RGB colours (float, [0, 1]) for segments 1..n."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N)[:3] for i in range(n)])


def image_caption(segment: int, im: packer.PatchedImage) -> str:
    """Caption of one image; sizes as width x height (WxH), the order image tools use."""
    key = im.key if len(im.key) <= 34 else "..." + im.key[-31:]
    return (f"segment {segment}: {key}\nlabel {im.label} | grid {im.grid_w}x{im.grid_h} (WxH) | {im.num_tokens} tokens\n"
            f"drop {100 * im.drop_rate:.0f}% | original {im.orig_w}x{im.orig_h} (WxH)")


def render_sequence(record: dict, patch_size: int, title: str, out: str) -> None:
    """Write a PNG of one packed record: the token strip, then each image rebuilt from its patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = packer.unpack(record)
    seg = np.asarray(record["segment_ids"])
    length = seg.shape[0]
    colors = segment_colors(max(1, len(images)))
    cols = int(math.ceil(math.sqrt(length))) if length > 64 else length
    strip = np.zeros((int(math.ceil(length / cols)) * cols, 3))
    strip[:length][seg > 0] = colors[seg[seg > 0] - 1]
    strip[length:] = 1.0  # past the end of the sequence: white
    strip = strip.reshape(-1, cols, 3)

    n = max(1, len(images))
    per_row = min(n, 4)
    rows = int(math.ceil(n / per_row))
    fig = plt.figure(figsize=(3.2 * max(per_row, 2) + 2.6, 3.4 * rows + 0.6))
    grid = fig.add_gridspec(rows, per_row + 1, width_ratios=[1.0] + [1.35] * per_row)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(strip, interpolation="nearest")
    ax.set_title(f"tokens in order\n({cols} per row, black = padding)", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for i, (im, (r, c)) in enumerate(zip(images, itertools.product(range(rows), range(per_row)))):
        ax = fig.add_subplot(grid[r, c + 1])
        pixels = packer.unpatchify(im.patches, im.grid_h, im.grid_w, patch_size, im.pos_y, im.pos_x, fill=_DROPPED_GREY)
        ax.imshow(pixels, interpolation="nearest")
        for spine in ax.spines.values():
            spine.set_color(colors[i])
            spine.set_linewidth(4)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(image_caption(i + 1, im), fontsize=7, color=colors[i] * 0.7)
    real = int(np.count_nonzero(seg))
    fig.suptitle(f"{title}: {len(images)} images, {real}/{length} tokens real ({length - real} padding)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import schemas

    try:
        manifest = schemas.read_manifest(args.dir)
        total = manifest["num_sequences"]
        if not 0 <= args.sequence < total:
            options.fail(f"--sequence: must be in [0, {total - 1}] for {args.dir}, got {args.sequence}")
        record = next(itertools.islice(schemas.read(args.dir), args.sequence, None))
    except schemas.SchemaError as e:
        options.fail(e)
    render_sequence(record, manifest["config"]["patch_size"], f"{args.dir} sequence {args.sequence}", args.out)
    print(f"wrote {args.out}")
    return 0
