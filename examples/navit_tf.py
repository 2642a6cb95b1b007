"""A small reference NaViT encoder in TensorFlow / Keras 3 that consumes packed records as they are.

It reads only what a packed record carries: uint8 `patches` [B, L, P*P*3], `segment_ids` [B, L]
(1..k per image, 0 padding), `pos_y` / `pos_x` [B, L] and, per image slot, `grid_h` / `grid_w`
[B, E] (for fractional positions) and `labels` [B, E] (-1: padding or no label). It shows the three
things a NaViT consumer must get right, and the tests check each:
  - factorized position embeddings phi_y(y) + phi_x(x), absolute (patch index) or fractional
    (pos / grid size, bucketed or through a small MLP), looked up per token from its own image's grid;
  - self-attention masked by segment_ids: a token attends only to tokens of its own image (padding
    tokens attend only to padding, so every softmax row has a finite entry and nothing becomes NaN);
  - masked mean pooling to max_images_per_seq vectors per sequence, one per image slot, zeros for empty slots.
Not part of the core package (it imports TensorFlow); load it from examples/.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import keras
import tensorflow as tf

import schemas

POSITIONS = ("absolute", "fractional", "fractional-mlp")
# Record fields the model reads (labels only for the loss).
MODEL_FIELDS = ("patches", "segment_ids", "pos_y", "pos_x", "grid_h", "grid_w", "labels")


@dataclasses.dataclass(frozen=True)
class NaViTConfig:
    """Model hyper-parameters. Small defaults so CPU tests are fast."""

    patch_size: int = 16
    channels: int = 3
    max_images_per_seq: int = 16  # max_images_per_seq of the records: one output slot per image
    num_classes: int = 10
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 128
    position: str = "absolute"  # absolute | fractional | fractional-mlp
    max_grid: int = 256  # absolute tables cover patch indices 0..max_grid-1 (grid side <= tokens per image)
    frac_buckets: int = 32  # fractional: [0, 1) split into this many learned buckets per axis

    def __post_init__(self):
        for name in ("patch_size", "channels", "max_images_per_seq", "num_classes", "width", "depth", "heads",
                     "mlp_dim", "max_grid", "frac_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width: {self.width} is not divisible by heads={self.heads}")
        if self.position not in POSITIONS:
            raise ValueError(f"position: one of {POSITIONS}, got {self.position!r}")

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels


def pooling_weights(segment_ids: tf.Tensor, max_images_per_seq: int) -> tf.Tensor:
    """[B, L] -> float32 [B, E, L]: row e averages the tokens of image e+1; empty slots are all zero."""
    one_hot = tf.one_hot(segment_ids - 1, max_images_per_seq, dtype=tf.float32)  # id 0 -> all-zero row
    one_hot = tf.transpose(one_hot, [0, 2, 1])
    counts = tf.reduce_sum(one_hot, axis=-1, keepdims=True)
    return one_hot / tf.maximum(counts, 1.0)


def per_token(per_image: tf.Tensor, segment_ids: tf.Tensor) -> tf.Tensor:
    """Broadcast a per-slot value [B, E] to each token [B, L] of that image (padding gets slot 0's)."""
    return tf.gather(per_image, tf.maximum(segment_ids - 1, 0), batch_dims=1)


class FactorizedPosition(keras.layers.Layer):
    """phi_y(y) + phi_x(x), from absolute patch indices or fractional positions (pos + 0.5) / grid.
    Absolute indices >= max_grid raise InvalidArgumentError (XLA drops that check: size max_grid to L)."""

    def __init__(self, config: NaViTConfig, **kw):
        super().__init__(**kw)
        self.config = config
        if config.position == "fractional-mlp":
            self.phi = [keras.Sequential([keras.layers.Dense(config.width, activation="gelu"),
                                          keras.layers.Dense(config.width)]) for _ in range(2)]
        else:
            size = config.max_grid if config.position == "absolute" else config.frac_buckets
            self.phi = [keras.layers.Embedding(size, config.width) for _ in range(2)]

    def call(self, pos_y, pos_x, grid_h, grid_w):
        c = self.config
        if c.position == "absolute":
            tf.debugging.assert_less(tf.maximum(pos_y, pos_x), c.max_grid,
                                     message="patch index >= max_grid: raise NaViTConfig.max_grid")
            return self.phi[0](pos_y) + self.phi[1](pos_x)
        frac = [(tf.cast(p, tf.float32) + 0.5) / tf.cast(tf.maximum(g, 1), tf.float32)
                for p, g in ((pos_y, grid_h), (pos_x, grid_w))]
        if c.position == "fractional":
            idx = [tf.clip_by_value(tf.cast(f * c.frac_buckets, tf.int32), 0, c.frac_buckets - 1) for f in frac]
            return self.phi[0](idx[0]) + self.phi[1](idx[1])
        return self.phi[0](frac[0][..., None]) + self.phi[1](frac[1][..., None])


class Block(keras.layers.Layer):
    """Pre-LayerNorm transformer block; attention restricted by a boolean [B, L, L] mask."""

    def __init__(self, config: NaViTConfig, **kw):
        super().__init__(**kw)
        self.heads = config.heads
        self.head_dim = config.width // config.heads
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.qkv = keras.layers.Dense(3 * config.width)
        self.proj = keras.layers.Dense(config.width)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.mlp = keras.Sequential([keras.layers.Dense(config.mlp_dim, activation="gelu"),
                                     keras.layers.Dense(config.width)])

    def call(self, x, mask):
        b, n = tf.shape(x)[0], tf.shape(x)[1]
        qkv = tf.reshape(self.qkv(self.norm1(x)), [b, n, 3, self.heads, self.head_dim])
        q, k, v = tf.unstack(qkv, axis=2)
        logits = tf.einsum("bqhd,bkhd->bhqk", q, k) * (self.head_dim ** -0.5)
        # Masked entries get the lowest finite value: exp underflows to exactly 0, so other images
        # (and padding) contribute nothing, and every row keeps at least its own token.
        logits = tf.where(mask[:, None], logits, tf.cast(logits.dtype.min, logits.dtype))
        attn = tf.nn.softmax(logits, axis=-1)
        out = tf.reshape(tf.einsum("bhqk,bkhd->bqhd", attn, v), [b, n, self.heads * self.head_dim])
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))


class NaViT(keras.Model):
    """Packed batch in, per-image-slot outputs: {"embeddings": [B, E, width], "logits": [B, E, classes]}.
    Empty slots (no image) get zeros in both."""

    def __init__(self, config: NaViTConfig, **kw):
        super().__init__(**kw)
        self.config = config
        self.embed = keras.layers.Dense(config.width)
        self.position = FactorizedPosition(config)
        self.blocks = [Block(config) for _ in range(config.depth)]
        self.norm = keras.layers.LayerNormalization(epsilon=1e-6)
        self.head = keras.layers.Dense(config.num_classes)

    def call(self, batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        c = self.config
        seg = tf.cast(batch["segment_ids"], tf.int32)
        patches = tf.convert_to_tensor(batch["patches"])
        if patches.shape[-1] != c.token_dim:
            raise ValueError(f"patches have {patches.shape[-1]} values, the model expects {c.token_dim} "
                             f"(patch_size={c.patch_size}, channels={c.channels})")
        x = self.embed(tf.cast(patches, tf.float32) / 127.5 - 1.0)  # uint8 -> [-1, 1]
        grid_h = per_token(tf.cast(batch["grid_h"], tf.int32), seg)
        grid_w = per_token(tf.cast(batch["grid_w"], tf.int32), seg)
        x = x + self.position(tf.cast(batch["pos_y"], tf.int32), tf.cast(batch["pos_x"], tf.int32), grid_h, grid_w)
        mask = schemas.tf_attention_mask(seg)  # same segment id; padding sees only padding
        for block in self.blocks:
            x = block(x, mask)
        pool = pooling_weights(seg, c.max_images_per_seq)
        embeddings = tf.einsum("bel,blw->bew", pool, self.norm(x))
        present = tf.cast(tf.reduce_sum(pool, axis=-1, keepdims=True) > 0, embeddings.dtype)
        return {"embeddings": embeddings, "logits": self.head(embeddings) * present}


def masked_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy over image slots with a label (labels >= 0); padding slots are ignored."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.cast(labels >= 0, tf.float32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(labels, 0), logits=logits)
    return tf.reduce_sum(ce * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


def make_train_step(model: NaViT, optimizer: keras.optimizers.Optimizer, jit_compile: bool = False):
    """A compiled step: batch dict -> loss (one optimizer update)."""

    @tf.function(jit_compile=jit_compile)
    def step(batch):
        with tf.GradientTape() as tape:
            loss = masked_loss(model(batch)["logits"], batch["labels"])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def model_inputs(record: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The fields the model reads, from a (tf.data or numpy) record; drop strings before batching."""
    return {name: record[name] for name in MODEL_FIELDS}
