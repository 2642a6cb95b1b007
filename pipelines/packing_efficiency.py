"""Packing-efficiency sweep and sequence-length advice: how well each packer fills sequences of length L for a
real size distribution (`navit-pack bench packing`, `navit-pack advise`, `python -m benchmarks.packing`).

The sizes of a dataset (read from image headers, or a CSV of sizes) are resampled `draws` times with the
planner's own rule (packer.plan_size; draw i of file f has key
f"{i}/{f}"), giving each draw's token count. Every packer then packs the same token counts, beside the
peers' behaviour: each image padded to the token budget (timm / Hugging Face NaFlex; the budget is the
smallest that holds every draw, min(L, largest image), their best case), next-fit in input
order (vit-pytorch NaViT) and first-fit (the paper, A.3). Per cell: efficiency (real tokens / (sequences
* L)), padding, images per sequence, the gap to two lower bounds on the number of sequences (ceil(total /
L) and Martello-Toth L2, both also raised to ceil(images / max_images_per_seq)), the effect of max_images_per_seq, and the speed of
the packing decisions. The default packer is packer.PACKERS[0] (window-swap); window-bfd, the default before
it, is measured beside it.

max_images_per_seq columns: `emax_closed` counts sequences closed because they reached max_images_per_seq images while room was
left; `images_over_emax` counts the images that the paper's scheme would drop: the same packer run
without the max_images_per_seq limit, and every image beyond the max_images_per_seq-th of a sequence counted as lost;
`efficiency_uncapped` is that run's efficiency (for bfd: offline best fit without the cap, a reference that
the cap can only lower).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
import tracemalloc
from typing import Any, Iterable, Sequence

import numpy as np

import packer

DEFAULT_SEQ_LENS = (64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_WINDOWS = (64, 256, 1024, 4096)
PAD_TO_BUDGET = "pad-to-budget"
WINDOWED = ("window-swap", "window-bfd")  # the packers that take a window (PackerSpec "NAME@W")
DEFAULT_PACKER = packer.PACKERS[0]
# Peers whose behaviour a packer reproduces, for the table and plots.
PEERS = {PAD_TO_BUDGET: "timm / HF NaFlex", "next-fit": "vit-pytorch NaViT", "first-fit": "NaViT paper"}


@dataclasses.dataclass(frozen=True)
class ImageSize:
    """One image's display size, from its header."""

    key: str
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class PackerSpec:
    """A packer to measure: its packer.pack_lengths name and window (ignored except by the WINDOWED packers)."""

    name: str
    window: int = 1024

    @property
    def label(self) -> str:
        return f"{self.name}@{self.window}" if self.name in WINDOWED else self.name

    @classmethod
    def parse(cls, text: str) -> "PackerSpec":
        """'next-fit', 'first-fit', 'bfd', 'window-swap', 'window-bfd' or either '@W', or 'pad-to-budget'."""
        name, _, window = text.partition("@")
        if name not in packer.PACKERS and name != PAD_TO_BUDGET:
            raise ValueError(f"unknown packer {name!r}; choose from {sorted(packer.PACKERS)} or {PAD_TO_BUDGET}")
        if window and (not window.isdigit() or int(window) < 1):
            raise ValueError(f"packer {text!r}: the window must be a positive integer")
        return cls(name, int(window) if window else 1024)


def default_packers(windows: Iterable[int] = DEFAULT_WINDOWS) -> list[PackerSpec]:
    windows = list(windows)
    return ([PackerSpec(PAD_TO_BUDGET), PackerSpec("next-fit"), PackerSpec("first-fit")]
            + [PackerSpec(name, w) for name in reversed(WINDOWED) for w in windows] + [PackerSpec("bfd")])


# ---------------------------------------------------------------------------------------------- sizes

def _sizes_from_rows(rows: Iterable[Any]) -> list[ImageSize]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, ImageSize):
            out.append(row)
        elif isinstance(row, dict):
            out.append(ImageSize(str(row.get("key", i)), int(row.get("height", row.get("h"))), int(row.get("width", row.get("w")))))
        elif hasattr(row, "height") and hasattr(row, "width"):
            out.append(ImageSize(str(getattr(row, "key", i)), int(row.height), int(row.width)))
        else:  # a tuple: (key, h, w) or (h, w)
            row = tuple(row)
            key, h, w = row if len(row) == 3 else (str(i), *row)
            out.append(ImageSize(str(key), int(h), int(w)))
    return out


def load_sizes(spec: str) -> list[ImageSize]:
    """Image sizes for a source spec (any source, or a CSV of sizes), through pipelines.sources.read_sizes."""
    from pipelines.sources import read_sizes

    sizes = _sizes_from_rows(read_sizes(spec))
    if not sizes:
        raise ValueError(f"no readable image sizes in {spec!r}")
    return sizes


# ---------------------------------------------------------------------------------------------- draws

def draw_tokens(sizes: Sequence[ImageSize], config: packer.PackConfig, draws: int, epoch: int = 0) -> np.ndarray:
    """Token counts (after dropping) of `draws` images: draw i resamples sizes[i % len(sizes)] with the key
    f"{i}/{key}" and images_seen i, through the planner's own rule (packer.plan_size), as every pipeline plans."""
    n_sizes = len(sizes)
    return np.fromiter((packer.plan_size(s.height, s.width, f"{i}/{s.key}", config, epoch=epoch, images_seen=i).num_tokens
                        for i, s in ((i, sizes[i % n_sizes]) for i in range(draws))), np.int64, draws)


# ---------------------------------------------------------------------------------------------- bounds

def martello_toth_l2(lengths: np.ndarray, capacity: int) -> int:
    """Martello-Toth lower bound L2 on the number of bins (items of integer size <= capacity).

    For each K in [0, C/2]: items larger than C - K each need their own bin, as do items in (C/2, C-K];
    items in [K, C/2] fit only into the room the latter leave, or into new bins. Vectorized over K."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size == 0:
        return 0
    C = int(capacity)
    counts = np.bincount(lengths, minlength=C + 1)[: C + 1]
    cnt_le = np.cumsum(counts)
    sum_le = np.cumsum(counts * np.arange(C + 1))
    half = C // 2
    K = np.arange(half + 1)
    hi = C - K
    n_total = cnt_le[C]
    n1 = n_total - cnt_le[hi]
    n2 = cnt_le[hi] - cnt_le[half]
    s2 = sum_le[hi] - sum_le[half]
    below_k = np.where(K > 0, sum_le[np.maximum(K - 1, 0)], 0)
    s3 = sum_le[half] - below_k
    extra = np.maximum(0, -(-(s3 - (n2 * C - s2)) // C))
    return int(np.max(n1 + n2 + extra))


def lower_bounds(lengths: np.ndarray, capacity: int, max_images_per_seq: int) -> dict[str, int]:
    """Lower bounds on the number of sequences: ceil(total / L), Martello-Toth L2, ceil(images / max_images_per_seq),
    and `best`, the largest of L2 and the max_images_per_seq bound."""
    total = int(np.sum(lengths))
    items = -(-len(lengths) // max_images_per_seq)
    l2 = martello_toth_l2(lengths, capacity)
    return {"ceil": -(-total // capacity), "l2": l2, "items": items, "best": max(l2, items)}


# ---------------------------------------------------------------------------------------------- cells

def measure_packer(lengths: np.ndarray, spec: PackerSpec, capacity: int, max_images_per_seq: int,
                   repeats: int = 2) -> dict[str, Any]:
    """Pack `lengths` with one packer; efficiency (also without the max_images_per_seq limit), images per sequence,
    max_images_per_seq effects, decision speed."""
    n, total = len(lengths), int(np.sum(lengths))
    if spec.name == PAD_TO_BUDGET:  # one image per sequence, padded to the smallest budget that holds every draw
        budget = int(np.max(lengths))
        return {"sequences": n, "slots": n * budget, "efficiency": total / (n * budget), "budget": budget,
                "efficiency_uncapped": total / (n * budget), "images_per_seq": 1.0, "images_per_seq_hist": {1: n},
                "emax_closed": 0, "images_over_emax": 0, "images_per_s": None}
    items = lengths.tolist()
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        bins = packer.pack_lengths(items, spec.name, capacity, max_images_per_seq, spec.window)
        best = min(best, time.perf_counter() - t0)
    sizes = np.fromiter((len(b) for b in bins), np.int64, len(bins))
    fill = np.fromiter((sum(items[i] for i in b) for b in bins), np.int64, len(bins))
    assert int(sizes.sum()) == n and int(fill.sum()) == total and int(fill.max()) <= capacity
    unbounded = packer.pack_lengths(items, spec.name, capacity, capacity, spec.window) if max_images_per_seq < capacity else bins
    over = sum(max(0, len(b) - max_images_per_seq) for b in unbounded)
    hist = np.bincount(sizes)
    return {"sequences": len(bins), "slots": len(bins) * capacity, "efficiency": total / (len(bins) * capacity),
            "efficiency_uncapped": total / (len(unbounded) * capacity), "images_per_seq": n / len(bins),
            "images_per_seq_hist": {int(k): int(v) for k, v in enumerate(hist) if v},
            "emax_closed": int(np.sum((sizes == max_images_per_seq) & (fill < capacity))),
            "images_over_emax": int(over), "images_per_s": n / best if best > 0 else None}


def sweep(sizes: Sequence[ImageSize], *, seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
          resolutions: Sequence[str] = ("uniform:64:256",), drops: Sequence[str] = ("none",),
          max_images_per_seq: Sequence[int | None] = (None,), packers: Sequence[PackerSpec] | None = None,
          draws: int = 20_000, patch_size: int = 16, seed: int = 0, repeats: int = 2,
          progress: bool = False) -> dict[str, Any]:
    """Every (resolution, drop, L, max_images_per_seq, packer) cell on the same draws per (resolution, drop, L).
    Returns {"cells": [...], "distributions": [...]} (plain JSON)."""
    packers = list(packers or default_packers())
    cells, dists = [], []
    for res in resolutions:
        for drop in drops:
            for L in seq_lens:
                config = packer.PackConfig(seq_len=L, patch_size=patch_size, resolution=res, token_drop=drop, seed=seed)
                t0 = time.perf_counter()
                lengths = draw_tokens(sizes, config, draws)
                draw_s = time.perf_counter() - t0
                total = int(lengths.sum())
                tok_hist = np.bincount(lengths, minlength=L + 1)
                dists.append({"resolution": res, "drop": drop, "seq_len": L, "tokens_hist": tok_hist.tolist(),
                              "mean_tokens": total / draws, "draws_per_s": draws / draw_s})
                for e in max_images_per_seq:
                    E = e if e is not None else config.max_images_per_seq
                    bounds = lower_bounds(lengths, L, E)
                    for spec in packers:
                        m = measure_packer(lengths, spec, L, E, repeats)
                        seqs = m["sequences"]
                        cells.append({
                            "resolution": res, "drop": drop, "seq_len": L, "max_images_per_seq": E, "packer": spec.label,
                            "algorithm": spec.name, "window": spec.window if spec.name in WINDOWED else None,
                            "peer": PEERS.get(spec.name), "images": draws, "tokens": total,
                            **m, "padding": 1.0 - m["efficiency"],
                            "bounds": bounds,
                            "efficiency_bound": total / (bounds["best"] * L),
                            "efficiency_ceil": total / (bounds["ceil"] * L),
                            "gap_ceil": seqs / bounds["ceil"] - 1.0, "gap_l2": seqs / bounds["best"] - 1.0,
                        })
                        if progress:
                            print(f"  {res} {drop} L={L} E={E} {spec.label}: {m['efficiency']:.4f}", file=sys.stderr)
    return {"cells": cells, "distributions": dists}


# ---------------------------------------------------------------------------------------------- targets

def streaming_peak_bytes(lengths: np.ndarray, num_items: int, name: str = DEFAULT_PACKER, capacity: int = 256,
                         max_images_per_seq: int = 16, window: int = 1024) -> int:
    """tracemalloc peak of a streaming packer fed `num_items` lengths from a generator (closed bins are
    consumed and dropped, as a pipeline does): the memory the packer itself holds."""
    algo = packer.ALGORITHMS[name].make(capacity, max_images_per_seq, window)
    src = lengths.tolist()
    n_src = len(src)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for i in range(num_items):
            algo.push(i, src[i % n_src])
        algo.flush()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def _timed_runs(runs: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Seconds of each callable, `repeats` times, interleaved (so that load changes hit every one alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def core_targets(sizes: Sequence[ImageSize], *, draws: int = 20_000, speed_items: int = 1_000_000,
                 memory_items: Sequence[int] = (10_000, 1_000_000), repeats: int = 3) -> dict[str, Any]:
    """The core's targets: uniform:64:256, P=16, L=256, no drop. Efficiency of the default packer (>= 98.5%,
    within 0.2 points of offline BFD), decision speed (>= 1M images/s on one core, lengths only; beside
    window-bfd and next-fit measured in the same run) and streaming memory independent of the number of images."""
    config = packer.PackConfig(seq_len=256, patch_size=16, resolution="uniform:64:256")
    lengths = draw_tokens(sizes, config, draws)
    default_spec, old_spec = PackerSpec(DEFAULT_PACKER, config.window), PackerSpec("window-bfd", config.window)
    result = sweep(sizes, seq_lens=(256,), draws=draws,
                   packers=[PackerSpec(PAD_TO_BUDGET), PackerSpec("next-fit"), PackerSpec("first-fit"),
                            *dict.fromkeys([old_spec, default_spec]), PackerSpec("bfd")])
    eff = {c["packer"]: c["efficiency"] for c in result["cells"]}
    default = eff[default_spec.label]
    cell = result["cells"][0]
    big = np.resize(np.random.default_rng(0).permutation(lengths), speed_items).tolist()
    E = config.max_images_per_seq
    runs = {spec.label: (lambda spec=spec: packer.pack_lengths(big, spec.name, 256, E, spec.window))
            for spec in dict.fromkeys([default_spec, old_spec])}
    runs["next-fit"] = lambda: packer.pack_lengths(big, "next-fit", 256, E)  # a machine-load yardstick
    times = _timed_runs(runs, repeats)
    speed = speed_items / min(times[default_spec.label])
    peaks = {label: {str(n): streaming_peak_bytes(lengths, n, name=spec.name, window=config.window, max_images_per_seq=E)
                     for n in memory_items}
             for label, spec in ((s.label, s) for s in dict.fromkeys([default_spec, old_spec]))}
    first, last = peaks[default_spec.label][str(memory_items[0])], peaks[default_spec.label][str(memory_items[-1])]
    return {
        "config": config.to_json(), "draws": draws, "efficiency": eff, "default": default_spec.label,
        "previous": old_spec.label,
        "lower_bound_ceil": cell["efficiency_ceil"], "lower_bound_l2": cell["efficiency_bound"],
        "default_efficiency": default, "gap_to_bfd_points": 100 * (eff["bfd"] - default),
        "images_per_s": speed, "speed_items": speed_items, "speed_runs_s": times[default_spec.label],
        "previous_images_per_s": speed_items / min(times[old_spec.label]),
        "speed_vs_previous": min(times[old_spec.label]) / min(times[default_spec.label]),
        "next_fit_images_per_s": speed_items / min(times["next-fit"]),
        "speed_vs_next_fit": min(times["next-fit"]) / min(times[default_spec.label]),
        "memory_peak_bytes": peaks[default_spec.label], "memory_peak_bytes_by_packer": peaks,
        "memory_ratio": last / first if first else None,
        "pass": {"efficiency": default >= 0.985, "near_bfd": 100 * (eff["bfd"] - default) <= 0.2,
                 "speed": speed >= 1_000_000, "memory": last <= 2 * first},
    }


CAP_SEQ_LENS = (64, 256, 1024)
CAP_RESOLUTIONS = ("uniform:64:256", "tnormal:64:384:-0.5:1:side")
CAP_DROPS = ("none", "beta:0.5:0.8")


def cap_targets(sizes: Sequence[ImageSize], *, draws: int = 20_000, seq_lens: Sequence[int] = CAP_SEQ_LENS,
                resolutions: Sequence[str] = CAP_RESOLUTIONS, drops: Sequence[str] = CAP_DROPS) -> dict[str, Any]:
    """What the image cap costs the default packer (issue 30), at the default max_images_per_seq (L // 16): per
    cell, its efficiency beside window-bfd@1024, the paper's first-fit and offline best fit run without the cap.
    Targets: within 0.1 points of the last (0.3 at L=64, where E = 4), never below first-fit, and in cells
    without token dropping never below window-bfd."""
    default_spec, old_spec = PackerSpec(DEFAULT_PACKER), PackerSpec("window-bfd")
    result = sweep(sizes, seq_lens=seq_lens, resolutions=resolutions, drops=drops, draws=draws, repeats=1,
                   packers=[PackerSpec("first-fit"), *dict.fromkeys([old_spec, default_spec]), PackerSpec("bfd")])
    rows = []
    for res in resolutions:
        for drop in drops:
            for L in seq_lens:
                by = {c["packer"]: c for c in result["cells"]
                      if (c["resolution"], c["drop"], c["seq_len"]) == (res, drop, L)}
                new, old, ff, bfd = (by[s.label] for s in (default_spec, old_spec, PackerSpec("first-fit"), PackerSpec("bfd")))
                tolerance = 0.003 if L == 64 else 0.001
                ok = {"near_uncapped": new["efficiency"] >= bfd["efficiency_uncapped"] - tolerance,
                      "first_fit": new["sequences"] <= ff["sequences"],
                      "previous": drop != "none" or new["sequences"] <= old["sequences"]}
                rows.append({"resolution": res, "drop": drop, "seq_len": L, "max_images_per_seq": new["max_images_per_seq"],
                             "default": new["efficiency"], "previous": old["efficiency"], "first_fit": ff["efficiency"],
                             "bfd": bfd["efficiency"], "bfd_uncapped": bfd["efficiency_uncapped"],
                             "bound": new["efficiency_bound"], "sequences": {s: by[s]["sequences"] for s in by},
                             "emax_closed": {s: by[s]["emax_closed"] for s in by},
                             "tolerance_points": 100 * tolerance, "pass": ok})
    return {"default": default_spec.label, "previous": old_spec.label, "draws": draws, "rows": rows,
            "pass": all(all(r["pass"].values()) for r in rows)}


def format_cap_targets(t: dict[str, Any]) -> str:
    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    lines = [f"image-cap targets ({t['draws']:,} draws per cell, max_images_per_seq = L // 16): {t['default']} within "
             "0.1 points (0.3 at L=64) of offline bfd without the cap, >= first-fit, >= window-bfd without drops",
             f"  {'resolution':<28}{'drop':<14}{'L':>6}{t['default']:>18}{t['previous']:>18}{'bfd no cap':>12}"
             f"{'first-fit':>11}{'bound':>8}  ok"]
    for r in t["rows"]:
        lines.append(f"  {r['resolution']:<28}{r['drop']:<14}{r['seq_len']:6d}{100 * r['default']:18.2f}"
                     f"{100 * r['previous']:18.2f}{100 * r['bfd_uncapped']:12.2f}{100 * r['first_fit']:11.2f}"
                     f"{100 * r['bound']:8.2f}  {yes(all(r['pass'].values()))}")
    lines.append(f"  all targets met: {yes(t['pass'])}")
    return "\n".join(lines)


ADVISE_SEQ_LENS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def smallest_max_images_per_seq(lengths: np.ndarray, capacity: int, spec: PackerSpec, tolerance: float = 0.001) -> tuple[int, float]:
    """The smallest max_images_per_seq whose efficiency is within `tolerance` of packing without an max_images_per_seq limit (binary
    search; efficiency does not decrease as max_images_per_seq grows, up to packer noise), and that efficiency."""
    items, total = lengths.tolist(), int(np.sum(lengths))
    eff = lambda e: total / (len(packer.pack_lengths(items, spec.name, capacity, e, spec.window)) * capacity)  # noqa: E731
    free = eff(capacity)
    lo, hi = 1, capacity
    while lo < hi:
        mid = (lo + hi) // 2
        if eff(mid) >= free - tolerance:
            hi = mid
        else:
            lo = mid + 1
    return lo, eff(lo)


def advise(sizes: Sequence[ImageSize], *, resolution: str = "uniform:64:256", token_drop: str = "none",
           target_padding: float = 0.02, seq_lens: Sequence[int] = ADVISE_SEQ_LENS, packer_spec: str = DEFAULT_PACKER,
           draws: int = 20_000, patch_size: int = 16, seed: int = 0, max_shrunk: float = 0.01) -> dict[str, Any]:
    """Recommend a sequence length L and max_images_per_seq for a padding target (the paper kept padding under 2% by
    tuning L). For each candidate L: padding with the chosen packer and max_images_per_seq, the smallest max_images_per_seq that costs
    at most 0.1 points of efficiency, and the share of draws whose sampled resolution needs more than L tokens
    (those images would be shrunk to fit, changing the resolution distribution). The recommendation is the
    smallest L (attention cost grows with L) that meets the target while shrinking at most `max_shrunk` of the
    images (rounding to patches pushes a few just over the cap); failing that,
    the L with the least padding."""
    spec = PackerSpec.parse(packer_spec)
    if not 0 <= target_padding < 1:
        raise ValueError(f"target_padding must be in [0, 1), got {target_padding}")
    big = max(seq_lens)
    uncapped = draw_tokens(sizes, packer.PackConfig(seq_len=big, patch_size=patch_size, resolution=resolution,
                                                    token_drop=token_drop, seed=seed), draws)
    rows = []
    for L in sorted(seq_lens):
        config = packer.PackConfig(seq_len=L, patch_size=patch_size, resolution=resolution, token_drop=token_drop, seed=seed)
        lengths = uncapped if L == big else draw_tokens(sizes, config, draws)
        max_images_per_seq, eff = smallest_max_images_per_seq(lengths, L, spec)
        bounds = lower_bounds(lengths, L, max_images_per_seq)
        rows.append({"seq_len": L, "max_images_per_seq": max_images_per_seq, "padding": 1.0 - eff, "efficiency": eff,
                     "padding_bound": 1.0 - int(lengths.sum()) / (bounds["best"] * L),
                     "images_per_seq": len(lengths) * eff * L / int(lengths.sum()),
                     "shrunk": float(np.mean(uncapped > L)), "mean_tokens": float(lengths.mean())})
    ok = [r for r in rows if r["padding"] <= target_padding and r["shrunk"] <= max_shrunk]
    best = ok[0] if ok else min(rows, key=lambda r: (r["padding"], r["seq_len"]))
    return {"resolution": resolution, "token_drop": token_drop, "packer": spec.label, "draws": draws,
            "patch_size": patch_size, "target_padding": target_padding, "max_shrunk": max_shrunk, "candidates": rows,
            "recommended": {"seq_len": best["seq_len"], "max_images_per_seq": best["max_images_per_seq"], "padding": best["padding"],
                            "meets_target": bool(ok)}}


def format_advice(a: dict[str, Any]) -> str:
    lines = [f"{a['resolution']}, drop {a['token_drop']}, packer {a['packer']}, {a['draws']:,} draws, "
             f"target padding {100 * a['target_padding']:.1f}%",
             f"  {'L':>6}{'E':>7}{'pad %':>8}{'bound %':>9}{'img/seq':>9}{'tok/img':>9}{'shrunk %':>10}"]
    for r in a["candidates"]:
        lines.append(f"  {r['seq_len']:6d}{r['max_images_per_seq']:7d}{100 * r['padding']:8.2f}{100 * r['padding_bound']:9.2f}"
                     f"{r['images_per_seq']:9.2f}{r['mean_tokens']:9.1f}{100 * r['shrunk']:10.2f}")
    rec = a["recommended"]
    verdict = "meets the target" if rec["meets_target"] else "no candidate meets the target; least padding"
    lines.append(f"recommended: --seq-len {rec['seq_len']} --max-images-per-seq {rec['max_images_per_seq']} "
                 f"(padding {100 * rec['padding']:.2f}%, {verdict})")
    lines.append("  (bound: padding of the lower bound max(L2, ceil(n/E)), E = --max-images-per-seq; shrunk: draws needing more than L "
                 f"tokens, which would be resized to fit; at most {100 * a['max_shrunk']:.1f}% allowed)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- output

def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def format_table(result: dict[str, Any]) -> str:
    """Terminal table: one block per (resolution, drop, L, max_images_per_seq), one row per packer plus the bounds."""
    lines = []
    head = f"{'packer':<18}{'peer':<20}{'eff %':>8}{'pad %':>8}{'img/seq':>9}{'seqs':>8}{'gap L2 %':>10}{'E closed':>9}{'lost@E':>8}{'k img/s':>9}"
    block = None
    for c in result["cells"]:
        key = (c["resolution"], c["drop"], c["seq_len"], c["max_images_per_seq"])
        if key != block:
            if block is not None:
                lines.append("")
            block = key
            b = c["bounds"]
            lines.append(f"resolution={c['resolution']} drop={c['drop']} L={c['seq_len']} max_images_per_seq={c['max_images_per_seq']} "
                         f"images={c['images']} tokens={c['tokens']}")
            lines.append(f"  lower bounds: ceil(total/L)={b['ceil']} seqs (eff <= {100 * c['efficiency_ceil']:.2f}%), "
                         f"max(L2, ceil(n/E))={b['best']} seqs (eff <= {100 * c['efficiency_bound']:.2f}%)")
            lines.append("  " + head)
        speed = f"{c['images_per_s'] / 1e3:9.0f}" if c["images_per_s"] else f"{'-':>9}"
        lines.append(f"  {c['packer']:<18}{(c['peer'] or ''):<20}{100 * c['efficiency']:8.2f}{100 * c['padding']:8.2f}"
                     f"{c['images_per_seq']:9.2f}{c['sequences']:8d}{100 * c['gap_l2']:10.2f}{c['emax_closed']:9d}"
                     f"{c['images_over_emax']:8d}{speed}")
    return "\n".join(lines)


_COLORS = {PAD_TO_BUDGET: "#999999", "next-fit": "#d62728", "first-fit": "#ff7f0e", "bfd": "#000000"}


def _color(label: str, labels: list[str]):
    import matplotlib

    if label in _COLORS:
        return _COLORS[label]
    name = label.partition("@")[0]  # one colour map per windowed packer, darker for larger windows
    windows = [x for x in labels if x.partition("@")[0] == name]
    cmap = matplotlib.colormaps["Greens" if name == DEFAULT_PACKER else "Blues"]
    return cmap(0.45 + 0.55 * windows.index(label) / max(1, len(windows) - 1))


def draws_text(result: dict[str, Any]) -> str:
    images = result["cells"][0]["images"] if result["cells"] else 0
    return f"{images:,} draws per cell, same draws for every packer"


def plot(result: dict[str, Any], out_dir: str, reference_len: int = 256) -> list[str]:
    """PNG plots: efficiency against L per packer (one figure per resolution/drop/max_images_per_seq setting), tokens per
    image, and images per sequence at the reference L (or the closest measured L). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []

    def save(fig, name: str, **layout) -> None:
        fig.tight_layout(**layout)
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    cells = result["cells"]
    settings = list(dict.fromkeys((c["resolution"], c["drop"]) for c in cells))
    labels = list(dict.fromkeys(c["packer"] for c in cells))
    seq_lens = sorted({c["seq_len"] for c in cells})
    ref = min(seq_lens, key=lambda L: abs(math.log2(L / reference_len)))

    # 1. efficiency against L, per (resolution, drop): full range, and zoomed on the best packers.
    # max_images_per_seq is the first value measured at each L.
    fig, axes = plt.subplots(len(settings), 2, figsize=(13, 4.6 * len(settings)), squeeze=False)
    for row, (res, drop) in zip(axes, settings):
        sel = [c for c in cells if c["resolution"] == res and c["drop"] == drop]
        first_e = {}
        for c in sel:
            first_e.setdefault(c["seq_len"], c["max_images_per_seq"])
        sel = [c for c in sel if c["max_images_per_seq"] == first_e[c["seq_len"]]]
        bound = {c["seq_len"]: c["efficiency_bound"] for c in sel}
        xs = sorted(bound)
        zoom_low = min([100 * c["efficiency"] for c in sel if c["algorithm"] in (*WINDOWED, "bfd", "first-fit")]
                       + [100 * b for b in bound.values()])
        for ax, zoom in zip(row, (False, True)):
            ax.plot(xs, [100 * bound[x] for x in xs], "k--", lw=1, label="efficiency ceiling: from the lower bound max(L2, ceil(n/max_images_per_seq)) on sequences")
            for label in labels:
                pts = sorted((c["seq_len"], c["efficiency"]) for c in sel if c["packer"] == label)
                if not pts or (zoom and label in (PAD_TO_BUDGET, "next-fit")):
                    continue
                peer = PEERS.get(label)
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", ms=4, color=_color(label, labels),
                        lw=2 if label == "bfd" else 1.5, label=f"{label} ({peer})" if peer else label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("sequence length L (tokens)")
            ax.set_ylabel("efficiency = real tokens / (sequences x L), %")
            ax.grid(alpha=0.3)
            if zoom:
                ax.set_ylim(max(0.0, math.floor(zoom_low) - 0.5), 100.2)
                ax.set_title(f"{res}, drop {drop}: zoom on the best packers", fontsize=10)
            else:
                ax.set_ylim(0, 101)
                ax.set_title(f"{res}, drop {drop}: all packers and peers", fontsize=10)
                ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Packing efficiency against sequence length ({draws_text(result)})")
    save(fig, "efficiency_vs_seq_len.png", rect=(0, 0, 1, 1 - 0.35 / (4.6 * len(settings))))

    # 2. tokens per image at the reference L
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for res, drop in settings:
        d = next(d for d in result["distributions"] if d["resolution"] == res and d["drop"] == drop and d["seq_len"] == ref)
        hist = np.asarray(d["tokens_hist"], float)
        step = max(1, ref // 32)
        edges = np.arange(0, ref + step, step)
        binned, _ = np.histogram(np.arange(len(hist)), bins=edges, weights=hist)
        ax.stairs(100 * binned / hist.sum(), edges, lw=1.6, label=f"{res}, drop {drop} (mean {d['mean_tokens']:.0f})")
    ax.set_xlabel(f"tokens per image (after dropping), cap = L = {ref}")
    ax.set_ylabel("% of images")
    ax.set_title(f"Tokens per image at L = {ref}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "tokens_per_image.png")

    # 3. images per sequence at the reference L, per packer (first setting)
    res, drop = settings[0]
    sel = [c for c in cells if c["resolution"] == res and c["drop"] == drop and c["seq_len"] == ref
           and c["packer"] != PAD_TO_BUDGET]
    first_e = sel[0]["max_images_per_seq"] if sel else None
    sel = [c for c in sel if c["max_images_per_seq"] == first_e]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    width = 0.8 / max(1, len(sel))
    for j, c in enumerate(sel):
        hist = {int(k): v for k, v in c["images_per_seq_hist"].items()}
        ks = np.array(sorted(hist))
        ax.bar(ks - 0.4 + width * (j + 0.5), [100 * hist[k] / c["sequences"] for k in ks], width,
               color=_color(c["packer"], labels), label=f"{c['packer']} (mean {c['images_per_seq']:.2f})")
    ax.set_xlabel(f"images per sequence (max_images_per_seq = {first_e})")
    ax.set_ylabel("% of sequences")
    ax.set_title(f"Images per sequence at L = {ref}, {res}, drop {drop}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    save(fig, "images_per_sequence.png")
    return paths


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `navit-pack bench packing` (also `python -m benchmarks.packing`)."""
    parser.add_argument("--input", required=True, help="image folder, source spec, or CSV of sizes with columns key,height,width (sizes:FILE.csv or FILE.csv)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=list(DEFAULT_SEQ_LENS), help="sequence lengths L, e.g. --seq-len 256 512")
    parser.add_argument("--resolution", nargs="+", default=["uniform:64:256"], help=packer.RESOLUTION_HELP)
    parser.add_argument("--token-drop", nargs="+", default=["none"], help=packer.DROP_HELP)
    parser.add_argument("--max-images-per-seq", nargs="+", default=["auto"],
                        help="max_images_per_seq values; 'auto' = L // 16 for each L")
    parser.add_argument("--packers", nargs="+", default=None,
                        help="packers, a list (unlike pack's single --packer): pad-to-budget next-fit first-fit window-swap@W "
                             "window-bfd@W bfd (default: all, windows " + ",".join(map(str, DEFAULT_WINDOWS)) + ")")
    parser.add_argument("--patch-size", type=int, default=16, help="patch side in pixels")
    parser.add_argument("--draws", type=int, default=20_000, help="images drawn (sizes resampled) per cell")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--plots", default=None, help="write PNG plots into this folder")
    parser.add_argument("--targets", action="store_true",
                        help="also check the packing core's targets: efficiency at L=256 vs bfd, decisions/s, streaming memory, "
                             "and what max_images_per_seq costs the default packer (L = 64, 256, 1024; both resolutions and drops of the sweep in RESULTS.md)")


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Run the sweep that `args` describes and print its table; raises ValueError on a bad option."""
    sizes = load_sizes(args.input)
    packers = [PackerSpec.parse(p) for p in args.packers] if args.packers else default_packers()
    max_images_per_seq = [None if str(e) == "auto" else int(e) for e in args.max_images_per_seq]
    for res in args.resolution:
        packer.parse_resolution(res)
    for drop in args.token_drop:
        packer.parse_drop(drop)
    if args.draws < 1:
        raise ValueError(f"--draws: must be an integer >= 1, got {args.draws}")
    t0 = time.perf_counter()
    result = sweep(sizes, seq_lens=args.seq_len, resolutions=args.resolution, drops=args.token_drop,
                   max_images_per_seq=max_images_per_seq, packers=packers, draws=args.draws, patch_size=args.patch_size, seed=args.seed)
    result["meta"] = {**machine_info(), "command": command or " ".join(sys.argv), "input": args.input,
                      "num_sizes": len(sizes), "draws": args.draws, "patch_size": args.patch_size, "seed": args.seed,
                      "seconds": time.perf_counter() - t0}
    if args.targets:
        result["targets"] = core_targets(sizes, draws=max(args.draws, 20_000))
        result["cap_targets"] = cap_targets(sizes, draws=max(args.draws, 20_000))
    print(format_table(result))
    if "targets" in result:
        print(format_targets(result["targets"]))
        print(format_cap_targets(result["cap_targets"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plots:
        for p in plot(result, args.plots, reference_len=256):
            print(f"wrote {p}")
    return 0


def format_targets(t: dict[str, Any]) -> str:
    e = t["efficiency"]
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    mem = "; ".join(f"{label}: " + ", ".join(f"{int(n):,} images: {b / 1024:.0f} KiB" for n, b in peaks.items())
                    for label, peaks in t["memory_peak_bytes_by_packer"].items())
    return "\n".join([
        f"packing-core targets (uniform:64:256, P=16, L=256, no drop, {t['draws']} draws):",
        f"  {t['default']} (default) {100 * t['default_efficiency']:.2f}% (>= 98.5%: {ok(t['pass']['efficiency'])}); "
        f"{t['previous']} {100 * e[t['previous']]:.2f}%; "
        f"bfd {100 * e['bfd']:.2f}% (gap {t['gap_to_bfd_points']:.2f} points <= 0.2: {ok(t['pass']['near_bfd'])})",
        f"  first-fit {100 * e['first-fit']:.2f}%, next-fit {100 * e['next-fit']:.2f}%, pad-to-budget "
        f"{100 * e[PAD_TO_BUDGET]:.2f}%, bound ceil(total/L) {100 * t['lower_bound_ceil']:.2f}%, "
        f"L2 {100 * t['lower_bound_l2']:.2f}%",
        f"  decisions: {t['images_per_s'] / 1e6:.2f} M images/s on one core ({t['speed_items']:,} lengths, best of "
        f"{len(t['speed_runs_s'])}; >= 1M: {ok(t['pass']['speed'])}); {t['speed_vs_previous']:.2f}x {t['previous']}'s speed "
        f"({t['previous_images_per_s'] / 1e6:.2f} M/s) and {t['speed_vs_next_fit']:.2f}x next-fit's "
        f"({t['next_fit_images_per_s'] / 1e6:.2f} M/s) in the same run, interleaved",
        f"  streaming memory (tracemalloc peak): {mem} ({ok(t['pass']['memory'])})",
    ])
