"""Attention for packed sequences: tokens/s of NaViT-B/16-like transformer layers (width 768, 12 heads,
MLP 3072) with a dense boolean [B, 1, L, L] mask in scaled_dot_product_attention, against flex_attention
with a block mask built from segment_ids (torch.compile), at several sequence lengths L. A third row,
SDPA without any mask, is the speed of light: it lets images attend to each other, so it is wrong for
packed data and shown only as the upper bound.

    python -m benchmarks.attention --device cuda --json attention.json [--seq-lens 256 1024 4096 --seconds 3]

Forward + backward (sum of outputs), bf16 autocast on CUDA, float32 on CPU. Each batch holds
--tokens tokens (B = tokens / L); images are packed next-fit with lengths from uniform:64:256 at P=16
(16..256 patches), so segment sizes are those of NaViT pretraining. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    create_block_mask = flex_attention = None

import packer


def packed_segment_ids(batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """[batch, seq_len] segment ids of next-fit packed images (lengths from uniform:64:256, P=16)."""
    config = packer.PackConfig(seq_len=max(seq_len, 256), resolution="uniform:64:256")
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        pos, seg = 0, 0
        while True:
            h, w = rng.integers(64, 512, 2)
            gh, gw = packer._plan.plan_grid(int(h), int(w), config, rng)
            n = min(gh * gw, seq_len)
            if pos + n > seq_len:
                break
            seg += 1
            out[b, pos:pos + n] = seg
            pos += n
    return out


class Layers(torch.nn.Module):
    """Pre-norm transformer layers; attention is passed in so every variant shares the weights' cost."""

    def __init__(self, width: int, heads: int, mlp: int, depth: int):
        super().__init__()
        self.heads = heads
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "norm1": torch.nn.LayerNorm(width), "qkv": torch.nn.Linear(width, 3 * width),
            "proj": torch.nn.Linear(width, width), "norm2": torch.nn.LayerNorm(width),
            "mlp": torch.nn.Sequential(torch.nn.Linear(width, mlp), torch.nn.GELU(), torch.nn.Linear(mlp, width))})
            for _ in range(depth))

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        B, L, W = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
            x = x + blk["proj"](attend(q, k, v).transpose(1, 2).reshape(B, L, W))
            x = x + blk["mlp"](blk["norm2"](x))
        return x


def variants(segment_ids: torch.Tensor) -> dict:
    """name -> attention function over (q, k, v) for this batch's segment ids."""
    dense_mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    out = {
        "sdpa dense mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask),
        "sdpa no mask (leaks; bound)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    if flex_attention is not None:
        B, L = segment_ids.shape
        block_mask = create_block_mask(lambda b, h, q, k: segment_ids[b, q] == segment_ids[b, k], B, None, L, L,
                                       device=segment_ids.device)
        compiled = torch.compile(flex_attention)
        out["flex_attention (compiled)"] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    return out


def time_variant(model: Layers, x: torch.Tensor, attend, seconds: float, device: torch.device) -> tuple[float, int]:
    """Seconds per forward+backward step (median after warm-up) and the steps measured."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x, attend)
        out.float().sum().backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # compile and warm up
        step()
    sync()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 65536 on CUDA, 2048 on CPU)")
    ap.add_argument("--depth", type=int, default=None, help="layers (default 12 on CUDA, 1 on CPU)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per cell (after warm-up)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    tokens = args.tokens or (65536 if device.type == "cuda" else 2048)
    depth = args.depth or (12 if device.type == "cuda" else 1)
    torch.manual_seed(0)
    model = Layers(768, 12, 3072, depth).to(device)
    rows = []
    for L in args.seq_lens:
        B = max(1, tokens // L)
        seg = torch.from_numpy(packed_segment_ids(B, L)).to(device)
        x = torch.randn(B, L, 768, device=device)
        for name, attend in variants(seg).items():
            try:
                sec, steps = time_variant(model, x, attend, args.seconds, device)
                rows.append({"seq_len": L, "batch": B, "variant": name, "tokens_per_s": B * L / sec, "steps": steps})
            except Exception as e:  # e.g. out of memory for the dense mask at large L: report, go on
                rows.append({"seq_len": L, "batch": B, "variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = {r["seq_len"]: r.get("tokens_per_s") for r in rows if r["variant"] == "sdpa dense mask"}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{name}, torch {torch.__version__}, {depth} layers of width 768, {tokens} tokens/batch, fwd+bwd")
    print("| L | variant | tokens/s | vs dense mask |")
    print("|---|---|---|---|")
    for r in rows:
        tps = r.get("tokens_per_s")
        ratio = f"{tps / base[r['seq_len']]:.2f}x" if tps and base.get(r["seq_len"]) else "-"
        print(f"| {r['seq_len']} | {r['variant']} | {f'{tps:,.0f}' if tps else r['error']} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "depth": depth, "tokens_per_batch": tokens,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
