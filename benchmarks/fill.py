"""The price of exact fill (fill="exact"), against the same stream packed with fill="none".

For each sequence length L, `--draws` images are drawn from the input's sizes (draw i resamples size
i % n with key f"{i}/{name}") and planned with the resolution policy (default uniform:64:256, P=16). Both
runs see the same grids; exact fill re-plans some of them. Reported per L:
  ks, mean_shift: two-sample Kolmogorov-Smirnov distance and mean difference of the realized effective
    resolution P*sqrt(grid_h*grid_w) over all images, exact vs none (aim: ks < 0.03);
  refit: fraction of images re-planned; extra_dropped: tokens dropped by re-plans beyond the images'
    own drop, as a fraction of all real tokens; max_drop: the largest drop rate a re-plan used;
  efficiency (real / total tokens) and non-full sequences, both runs;
  speed: packing decisions in images/s on lengths (exact fill asks packer._fill.plan_fill for feasibility),
    and end to end (packer.pack_images on the input's bytes) with their ratio.

    python -m benchmarks.fill [--input DIR] [--seq-len 64 256 1024] [--draws 20000] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

import packer
from . import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INPUT = os.path.join(HERE, "..", "..", "shared", "data", "imagenet-dev")
DEFAULT_JSON = os.path.join(HERE, "results", "fill.json")


def read_sizes(folder: str) -> list[tuple[str, int, int, str]]:
    """(name, h, w, path) of the readable images in a folder, from their headers."""
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                h, w = packer.image_size(f.read())
        except (OSError, packer.ImageRejected):
            continue
        out.append((name, h, w, path))
    return out


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size)))


def lengths_run(sizes, seq_len: int, resolution: str, draws: int, window: int, repeats: int = 3) -> dict:
    config = packer.PackConfig(seq_len=seq_len, resolution=resolution, window=window, fill="exact")
    hw = [(sizes[i % len(sizes)][1], sizes[i % len(sizes)][2]) for i in range(draws)]
    grids = [packer._plan.plan_image(h, w, f"{i}/{sizes[i % len(sizes)][0]}", config) for i, (h, w) in enumerate(hw)]
    lengths = [gh * gw for gh, gw in grids]
    plans: dict[tuple[int, int], packer._fill.FillPlan] = {}

    def feasible(item, length, target):
        plan = packer._fill.plan_fill(*hw[item], *grids[item], lengths[item], 0.0, target, config)
        if plan is not None:
            plans[item, target] = plan
        return None if plan is None else plan.cost

    E = config.max_images_per_seq
    t_none = min(_timed(lambda: packer.pack_lengths(lengths, "window-bfd", seq_len, E, window))[0] for _ in range(repeats))
    t_exact, (bins, final, unfilled) = _timed(lambda: packer._algorithms.fill_lengths(lengths, "window-bfd", seq_len, E, window, feasible))
    plain = packer.pack_lengths(lengths, "window-bfd", seq_len, E, window)
    new_grids, extra, max_drop = list(grids), 0, 0.0
    for i, n in enumerate(final):
        if n != lengths[i]:
            plan = plans[i, n]
            new_grids[i] = (plan.grid_h, plan.grid_w)
            extra += plan.grid_h * plan.grid_w - n  # grids were not dropped before (drop policy none)
            max_drop = max(max_drop, plan.drop_rate)
    p = config.patch_size
    r0 = p * np.sqrt([gh * gw for gh, gw in grids])
    r1 = p * np.sqrt([gh * gw for gh, gw in new_grids])
    real0, real1 = sum(lengths), sum(final)
    return {
        "seq_len": seq_len, "images": draws,
        "ks": ks_distance(r0, r1), "mean_shift": float(r1.mean() - r0.mean()), "mean_resolution_none": float(r0.mean()),
        "refit": sum(a != b for a, b in zip(lengths, final)) / draws, "extra_dropped": extra / real1, "max_drop": max_drop,
        "efficiency_none": real0 / (seq_len * len(plain)), "efficiency_exact": real1 / (seq_len * len(bins)),
        "nonfull_none": sum(sum(lengths[i] for i in b) < seq_len for b in plain),
        "nonfull_exact": sum(sum(final[i] for i in b) < seq_len for b in bins), "unfilled": unfilled,
        "sequences_none": len(plain), "sequences_exact": len(bins),
        "lengths_images_per_s_none": draws / t_none, "lengths_images_per_s_exact": draws / t_exact,
    }


def end_to_end(sizes, seq_len: int, resolution: str, window: int) -> dict:
    """packer.pack_images (the pipelines' path, in this process) over the input's bytes, fill none vs exact
    (same run)."""
    blobs = []
    for name, _, _, path in sizes:
        with open(path, "rb") as f:
            blobs.append((name, f.read()))
    out = {}
    for fill in ("none", "exact"):
        config = packer.PackConfig(seq_len=seq_len, resolution=resolution, window=window, fill=fill)
        t, records = _timed(lambda: list(packer.pack_images(blobs, config)))
        out[fill] = {"images_per_s": len(blobs) / t, "sequences": len(records),
                     "efficiency": sum(int((r["segment_ids"] > 0).sum()) for r in records) / (len(records) * seq_len)}
    out["ratio_exact_to_none"] = out["exact"]["images_per_s"] / out["none"]["images_per_s"]
    return out


def _timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT, help="folder of images (their sizes are resampled)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--resolution", default="uniform:64:256")
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--json", default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        print(f"fill benchmark skipped: input folder {args.input} not found")
        return 0
    sizes = read_sizes(args.input)
    rows = [lengths_run(sizes, L, args.resolution, args.draws, args.window) for L in args.seq_len]
    e2e = end_to_end(sizes, 256, args.resolution, min(args.window, 64))
    print(f"Exact fill vs none: {args.draws} draws from {len(sizes)} image sizes, {args.resolution}, P=16, "
          f"window {args.window}, drop none (re-plans may drop up to {packer._fill.FILL_EXTRA_DROP:g})")
    head = ("L", "KS", "mean shift", "refit", "extra drop", "max drop", "eff none", "eff exact", "non-full none/exact",
            "img/s none", "img/s exact")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['seq_len']} | {r['ks']:.4f} | {r['mean_shift']:+.2f} px | {100 * r['refit']:.1f}% | "
              f"{100 * r['extra_dropped']:.2f}% | {r['max_drop']:.3f} | {100 * r['efficiency_none']:.2f}% | "
              f"{100 * r['efficiency_exact']:.2f}% | {r['nonfull_none']}/{r['nonfull_exact']} | "
              f"{r['lengths_images_per_s_none']:,.0f} | {r['lengths_images_per_s_exact']:,.0f} |")
    print(f"End to end (decode + pack, {len(sizes)} images, L=256): none {e2e['none']['images_per_s']:.0f} img/s, "
          f"exact {e2e['exact']['images_per_s']:.0f} img/s (x{e2e['ratio_exact_to_none']:.2f}); "
          f"efficiency {100 * e2e['none']['efficiency']:.2f}% -> {100 * e2e['exact']['efficiency']:.2f}%")
    result = {"meta": {"python": platform.python_version(), "numpy": np.__version__, "cpu": platform.processor() or platform.machine(),
                       "command": "python -m benchmarks.fill " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "input": args.input, "resolution": args.resolution, "draws": args.draws, "window": args.window,
                       "fill_extra_drop": packer._fill.FILL_EXTRA_DROP},
              "lengths": rows, "end_to_end": e2e}
    write_json(args.json, result)
    return 0 if all(r["unfilled"] == 0 and r["nonfull_exact"] <= 1 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
