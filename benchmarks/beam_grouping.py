"""Packing efficiency of the Beam pipeline's grouping vs the single-process packer, on lengths only.

The Beam pipeline packs each packing group (stable_hash(key) % G, ordered by order_fraction) on its
own, so it pays one end-of-stream flush per group. This measures that cost with packer.pack_lengths over
exactly the pipeline's grouping and order (pipelines.batch.layout / packing_group /
order_fraction), on N synthetic ImageNet-like image sizes planned with the given resolution policy.

  python -m benchmarks.beam_grouping [--images 100000] [--json out.json]
"""
from __future__ import annotations

import argparse
import math

import numpy as np

import packer
from pipelines.batch import PackJob, layout, order_fraction, packing_group
from . import write_json


def synthetic_lengths(n: int, config: packer.PackConfig, seed: int = 0) -> list[tuple[str, int]]:
    """(key, tokens) for n images with ImageNet-like sizes (area ~ 400x350, aspect 0.5..2)."""
    rng = np.random.default_rng(seed)
    area = rng.lognormal(math.log(400 * 350), 0.35, n)
    aspect = np.exp(rng.uniform(math.log(0.5), math.log(2.0), n))
    out = []
    for i in range(n):
        h, w = max(1, int(math.sqrt(area[i] / aspect[i]))), max(1, int(math.sqrt(area[i] * aspect[i])))
        key = f"img{i:07d}"
        gh, gw = packer._plan.plan_image(h, w, key, config)
        out.append((key, gh * gw))
    return out


def efficiency(bins: list[list[int]], lengths: list[int], seq_len: int) -> float:
    return sum(lengths) / (len(bins) * seq_len)


def measure(n: int, config: packer.PackConfig, group_sizes: list[int]) -> dict:
    items = synthetic_lengths(n, config)
    items.sort(key=lambda kv: (order_fraction(config.seed, kv[0], 0), kv[0]))
    lengths = [t for _, t in items]
    pack = lambda ls: packer.pack_lengths(ls, config.packer, config.seq_len, config.max_images_per_seq, config.window)  # noqa: E731
    single = efficiency(pack(lengths), lengths, config.seq_len)
    result = {"images": n, "config": config.to_json(), "single_process_efficiency": single, "grouped": []}
    for size in group_sizes:
        groups, _ = layout(n, PackJob(input="-", output="-", config=config, group_size=size))
        members: list[list[int]] = [[] for _ in range(groups)]
        for key, tokens in items:  # items are already in order_fraction order, as inside each group
            members[packing_group(config.seed, key, 0, groups)].append(tokens)
        num_bins = sum(len(pack(m)) for m in members if m)
        eff = sum(lengths) / (num_bins * config.seq_len)
        result["grouped"].append({"group_size": size, "groups": groups, "efficiency": eff,
                                  "points_below_single": 100 * (single - eff)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--resolution", default="uniform:64:256")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--group-sizes", default="1024,2048,4096,8192")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = packer.PackConfig(seq_len=args.seq_len, resolution=args.resolution)
    result = measure(args.images, config, [int(s) for s in args.group_sizes.split(",")])
    print(f"{args.images} images, {args.resolution}, L={args.seq_len}, {config.packer}: "
          f"single process {100 * result['single_process_efficiency']:.2f}%")
    for g in result["grouped"]:
        print(f"  group_size {g['group_size']:>6} ({g['groups']:>3} groups): {100 * g['efficiency']:.2f}% "
              f"({g['points_below_single']:+.2f} points below single process)")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
