"""PyTorch reader for packed records: Arrow shards -> numpy dicts (schemas.read) -> batches -> a tiny
NaViT-style model whose attention mask comes from segment_ids and whose outputs are pooled per image.

    python examples/torch_reader.py [--data DIR] [--work-dir TMP] [--steps N] [--attention auto|flex|dense]

Attention: "dense" gives scaled_dot_product_attention a boolean [B, 1, L, L] mask (every pair is
computed); "flex" builds a flex_attention block mask from segment_ids, so blocks of tokens from
different images are skipped (compiled with torch.compile on CUDA; on CPU it runs unfused, for checks
only). "auto": flex on CUDA where torch has it, else dense.

Without --data it first packs synthetic shape images into an Arrow dataset under --work-dir. It trains a
few steps, then checks that every packed image's output equals its output alone ("leak check: ok").
Needs torch, pyarrow and this repository on the path (run from the repository root or set PYTHONPATH).
"""
from __future__ import annotations

import os
import sys

import warnings

import numpy as np
import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    create_block_mask = flex_attention = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/shapes.py
import packer  # noqa: E402
import schemas  # noqa: E402
import shapes  # noqa: E402

FIELDS = ("patches", "segment_ids", "pos_y", "pos_x", "labels")


def to_torch(records: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack numpy records into one batch, with the attention mask [B, 1, L, L] (True: may attend)."""
    batch = {k: np.stack([r[k] for r in records]) for k in FIELDS}
    mask = schemas.attention_mask(batch["segment_ids"])
    out = {k: torch.from_numpy(v) for k, v in batch.items()}
    out["mask"] = torch.from_numpy(mask)[:, None]
    return out


ATTENTION = ("auto", "flex", "dense")


def resolve_attention(kind: str, device: torch.device) -> str:
    """auto -> flex on CUDA where this torch has flex_attention, else dense."""
    if kind not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {kind!r}")
    if kind == "flex" and flex_attention is None:
        raise RuntimeError("this torch has no torch.nn.attention.flex_attention (needs torch >= 2.5); use dense")
    if kind == "auto":
        return "flex" if flex_attention is not None and device.type == "cuda" else "dense"
    return kind


def segment_block_mask(segment_ids: torch.Tensor):
    """flex_attention block mask: a query attends to keys of its own segment (padding to padding), as
    schemas.attention_mask; whole blocks with no shared segment are skipped."""
    def same_segment(b, h, q, k):
        return segment_ids[b, q] == segment_ids[b, k]

    B, L = segment_ids.shape
    return create_block_mask(same_segment, B, None, L, L, device=segment_ids.device)


_compiled_flex = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """flex_attention, compiled once on CUDA (fused kernel); eager elsewhere (unfused, same results)."""
    global _compiled_flex
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)


class TinyNaViT(torch.nn.Module):
    """Patch embedding + factorized absolute positions + masked transformer layers + per-image pooling."""

    def __init__(self, token_dim: int, max_images_per_seq: int, max_grid: int, num_classes: int, width: int = 64,
                 depth: int = 2, heads: int = 4, attention: str = "dense"):
        super().__init__()
        self.max_images_per_seq, self.heads, self.attention = max_images_per_seq, heads, attention
        self.embed = torch.nn.Linear(token_dim, width)
        self.pos_y = torch.nn.Embedding(max_grid, width)
        self.pos_x = torch.nn.Embedding(max_grid, width)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({
            "norm1": torch.nn.LayerNorm(width), "qkv": torch.nn.Linear(width, 3 * width),
            "proj": torch.nn.Linear(width, width), "norm2": torch.nn.LayerNorm(width),
            "mlp": torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))}) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.embed(batch["patches"].float() / 127.5 - 1.0)
        x = x + self.pos_y(batch["pos_y"].long()) + self.pos_x(batch["pos_x"].long())
        B, L, W = x.shape
        kind = resolve_attention(self.attention, x.device)
        block_mask = segment_block_mask(batch["segment_ids"]) if kind == "flex" else None
        for layer in self.layers:
            q, k, v = layer["qkv"](layer["norm1"](x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
            if kind == "flex":
                attn = flex(q, k, v, block_mask)
            else:
                attn = F.scaled_dot_product_attention(q, k, v, attn_mask=batch["mask"])
            x = x + layer["proj"](attn.transpose(1, 2).reshape(B, L, W))
            x = x + layer["mlp"](layer["norm2"](x))
        pool = torch.from_numpy(schemas.pooling_matrix(batch["segment_ids"].numpy(), self.max_images_per_seq))
        return self.head(pool @ self.norm(x))  # [B, E, classes]; empty slots hold the bias only


def masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over image slots with a label (>= 0); padding slots (-1) are ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-1)


def leak_check(model: TinyNaViT, records: list[dict[str, np.ndarray]], config: packer.PackConfig) -> None:
    """Each packed image's logits must equal those of the same image packed alone."""
    with torch.no_grad():
        packed = model(to_torch(records))
        for r, record in enumerate(records):
            images = packer.unpack(record)
            alone = model(to_torch([packer.build_record([im], config) for im in images]))
            torch.testing.assert_close(packed[r, :len(images)], alone[:, 0], rtol=1e-4, atol=1e-5)


def main(argv: list[str] | None = None) -> int:
    args = shapes.reader_args(__doc__.splitlines()[0], ATTENTION, "auto", argv)
    torch.manual_seed(0)
    config, records, num_classes = shapes.load_records(args)
    model = TinyNaViT(config.token_dim, config.max_images_per_seq, config.seq_len, num_classes, attention=args.attention)
    print(f"attention: {resolve_attention(args.attention, torch.device('cpu'))}")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    labelled = any((r["labels"] >= 0).any() for r in records)
    for step in range(args.steps if labelled else 0):
        idx = rng.choice(len(records), size=min(args.batch_size, len(records)), replace=False)
        loss = masked_loss(model(to_torch([records[i] for i in idx])), torch.from_numpy(
            np.stack([records[i]["labels"] for i in idx])))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    if not labelled:
        print("no labels in this dataset: forward pass only")
    leak_check(model, records[:4], config)
    print("leak check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
