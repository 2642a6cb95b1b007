"""Speed of the `synthetic:N` input against an earlier version of its generator (loaded from git), in one
run, timed in alternating blocks of images so that both see the same machine load.

    taskset -c 0 python -m benchmarks.synthetic --images 2000 --baseline c5d2f99
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

from pipelines.sources import synthetic as sources_synthetic
from . import write_json

# Where the generator lived before the sources package: baselines are read from this path.
BASELINE_PATH = "pipelines/sources_synthetic.py"


def load_baseline(commit: str):
    """pipelines/sources_synthetic.py as it was at `commit`, as a module of today's sources package."""
    text = subprocess.run(["git", "show", f"{commit}:{BASELINE_PATH}"], capture_output=True, text=True, check=True).stdout
    text = text.replace("from .sources import", "from .base import")  # the shared types moved to sources/base.py
    name = f"sources_synthetic_{commit}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "pipelines.sources"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(text, f"{commit}:{BASELINE_PATH}", "exec"), module.__dict__)  # noqa: S102 - this repository's own code
    return module


def measure(images: int, seed: int, baseline, block: int = 50) -> dict:
    """images/s of both generators over `synthetic:images:seed`, set-up included (the new one's textures)."""
    sources_synthetic._texture.cache_clear()  # noqa: SLF001
    sources = {"baseline": baseline.SyntheticSource(f"synthetic:{images}", images, seed),
               "current": sources_synthetic.SyntheticSource(f"synthetic:{images}", images, seed)}
    seconds, sizes = dict.fromkeys(sources, 0.0), dict.fromkeys(sources, 0)
    for first in range(0, images, block):
        unit = f"{first}-{min(first + block, images)}"
        for name, source in sources.items():
            start = time.perf_counter()
            sizes[name] += sum(len(r.data) for r in source.read(unit))
            seconds[name] += time.perf_counter() - start
    out = {name: {"images_per_s": images / seconds[name], "seconds": seconds[name], "mean_kb": sizes[name] / images / 1e3}
           for name in sources}
    out["speedup"] = out["current"]["images_per_s"] / out["baseline"]["images_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="N of synthetic:N")
    parser.add_argument("--seed", type=int, default=0, help="SEED of synthetic:N:SEED")
    parser.add_argument("--baseline", default="c5d2f99", help="git commit of the generator to compare with "
                        "(c5d2f99: drawn and encoded whole, before the pre-encoded blocks)")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: a per-core figure
    result = measure(args.images, args.seed, load_baseline(args.baseline))
    for name in ("baseline", "current"):
        r = result[name]
        print(f"{name:>9}: {r['images_per_s']:7.0f} images/s ({r['seconds']:.1f} s, mean {r['mean_kb']:.0f} KB)")
    print(f"speed-up: {result['speedup']:.1f}x")
    write_json(args.json, {**result, "baseline_commit": args.baseline, "images": args.images})
    return 0


if __name__ == "__main__":
    sys.exit(main())
