"""JAX reader for packed records: Arrow shards -> numpy dicts (schemas.read) -> batches -> a tiny
NaViT-style model (pure functions over a parameter dict) whose attention mask comes from segment_ids
and whose outputs are pooled per image.

    python examples/jax_reader.py [--data DIR] [--work-dir TMP] [--steps N] [--attention fused|einsum]

Attention: "fused" calls jax.nn.dot_product_attention with the segment mask [B, 1, L, L] (XLA or cuDNN
picks the kernel); "einsum" writes the masked softmax out (the reference, and the fallback for a jax
without dot_product_attention). Both compute every pair; on GPU, jax.experimental.pallas.ops.gpu
.attention.mha takes segment_ids directly and skips cross-image blocks.

Without --data it first packs synthetic shape images into an Arrow dataset under --work-dir. It trains a
few steps, then checks that every packed image's output equals its output alone ("leak check: ok").
Needs jax, pyarrow and this repository on the path (run from the repository root or set PYTHONPATH).
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/shapes.py
import packer  # noqa: E402
import schemas  # noqa: E402
import shapes  # noqa: E402

FIELDS = ("patches", "segment_ids", "pos_y", "pos_x", "labels")


def to_batch(records: list[dict[str, np.ndarray]], max_images_per_seq: int) -> dict[str, np.ndarray]:
    """Stack numpy records into one batch, with the attention mask [B, L, L] and the per-image pooling
    matrix [B, E, L]."""
    batch = {k: np.stack([r[k] for r in records]) for k in FIELDS}
    batch["mask"] = schemas.attention_mask(batch["segment_ids"])
    batch["pool"] = schemas.pooling_matrix(batch["segment_ids"], max_images_per_seq)
    return batch


def init_params(key, token_dim: int, max_grid: int, num_classes: int, width: int = 64, depth: int = 2) -> dict:
    def dense(k, n_in, n_out):
        return {"w": jax.random.normal(k, (n_in, n_out)) * n_in ** -0.5, "b": jnp.zeros(n_out)}

    keys = iter(jax.random.split(key, 4 + 4 * depth))
    return {
        "embed": dense(next(keys), token_dim, width),
        "pos_y": jax.random.normal(next(keys), (max_grid, width)) * 0.02,
        "pos_x": jax.random.normal(next(keys), (max_grid, width)) * 0.02,
        "layers": [{"qkv": dense(next(keys), width, 3 * width), "proj": dense(next(keys), width, width),
                    "mlp1": dense(next(keys), width, 2 * width), "mlp2": dense(next(keys), 2 * width, width)}
                   for _ in range(depth)],
        "head": dense(next(keys), width, num_classes),
    }


def _dense(p, x):
    return x @ p["w"] + p["b"]


def _norm(x):
    return (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)


ATTENTION = ("fused", "einsum")


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray, kind: str) -> jnp.ndarray:
    """Attention over [B, L, heads, dim] with the boolean segment mask [B, L, L] (True: may attend)."""
    if kind == "fused" and hasattr(jax.nn, "dot_product_attention"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    if kind not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {kind!r}")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    logits = jnp.where(mask[:, None], logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def forward(params: dict, batch: dict, heads: int = 4, attention: str = "fused") -> jnp.ndarray:
    """Packed batch -> logits [B, E, classes], one row per image slot (empty slots hold the bias only)."""
    x = _dense(params["embed"], batch["patches"].astype(jnp.float32) / 127.5 - 1.0)
    x = x + params["pos_y"][batch["pos_y"]] + params["pos_x"][batch["pos_x"]]
    B, L, W = x.shape
    for p in params["layers"]:
        q, k, v = jnp.split(_dense(p["qkv"], _norm(x)).reshape(B, L, 3 * heads, W // heads), 3, axis=2)
        attn = attend(q, k, v, batch["mask"], attention)
        x = x + _dense(p["proj"], attn.reshape(B, L, W))
        x = x + _dense(p["mlp2"], jax.nn.gelu(_dense(p["mlp1"], _norm(x))))
    return _dense(params["head"], batch["pool"] @ _norm(x))


def masked_loss(params: dict, batch: dict, attention: str = "fused") -> jnp.ndarray:
    """Cross-entropy over image slots with a label (>= 0); padding slots (-1) are ignored."""
    logits = forward(params, batch, attention=attention)
    labels = batch["labels"]
    valid = labels >= 0
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)


def leak_check(params: dict, records: list[dict[str, np.ndarray]], config: packer.PackConfig,
               attention: str = "fused") -> None:
    """Each packed image's logits must equal those of the same image packed alone."""
    E = config.max_images_per_seq
    packed = np.asarray(forward(params, to_batch(records, E), attention=attention))
    for r, record in enumerate(records):
        images = packer.unpack(record)
        alone = np.asarray(forward(params, to_batch([packer.build_record([im], config) for im in images], E),
                                   attention=attention))
        np.testing.assert_allclose(packed[r, :len(images)], alone[:, 0], rtol=1e-4, atol=1e-5)


def main(argv: list[str] | None = None) -> int:
    args = shapes.reader_args(__doc__.splitlines()[0], ATTENTION, "fused", argv)
    config, records, num_classes = shapes.load_records(args)
    params = init_params(jax.random.PRNGKey(0), config.token_dim, config.seq_len, num_classes)

    @jax.jit
    def step(params, batch, lr=3e-2):
        loss, grads = jax.value_and_grad(masked_loss)(params, batch, args.attention)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss

    labelled = any((r["labels"] >= 0).any() for r in records)
    rng = np.random.default_rng(0)
    for i in range(args.steps if labelled else 0):
        idx = rng.choice(len(records), size=min(args.batch_size, len(records)), replace=False)
        params, loss = step(params, to_batch([records[j] for j in idx], config.max_images_per_seq))
        if i % 10 == 0 or i == args.steps - 1:
            print(f"step {i}: loss {float(loss):.4f}")
    if not labelled:
        print("no labels in this dataset: forward pass only")
    leak_check(params, records[:4], config, args.attention)
    print("leak check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
