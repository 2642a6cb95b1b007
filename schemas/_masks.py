"""Attention mask and per-image pooling matrix from segment_ids, in numpy and TensorFlow (same results)."""
from __future__ import annotations

from typing import Any

import numpy as np


def attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """bool [..., L, L]: True where query and key tokens carry the same segment id. An image's tokens see
    only that image; padding (0) sees only padding, so no softmax row is empty (an all-masked row is NaN
    in PyTorch and JAX) and no image ever sees padding."""
    s = np.asarray(segment_ids)
    return s[..., :, None] == s[..., None, :]


def pooling_matrix(segment_ids: np.ndarray, max_images_per_seq: int) -> np.ndarray:
    """float32 [..., E, L]: row i averages the tokens of image i+1 (pooling_matrix @ tokens = per-image
    mean embeddings, [..., E, C]); rows of empty image slots are zero."""
    s = np.asarray(segment_ids)
    onehot = (s[..., None, :] == np.arange(1, max_images_per_seq + 1, dtype=s.dtype)[:, None]).astype(np.float32)
    return onehot / np.maximum(onehot.sum(-1, keepdims=True), 1.0)


def tf_attention_mask(segment_ids: Any) -> Any:
    """TensorFlow version of attention_mask (works under tf.function and XLA)."""
    import tensorflow as tf

    s = tf.convert_to_tensor(segment_ids)
    return tf.equal(s[..., :, None], s[..., None, :])


def tf_pooling_matrix(segment_ids: Any, max_images_per_seq: int) -> Any:
    """TensorFlow version of pooling_matrix (works under tf.function and XLA)."""
    import tensorflow as tf

    s = tf.convert_to_tensor(segment_ids)
    onehot = tf.cast(tf.equal(s[..., None, :], tf.range(1, max_images_per_seq + 1, dtype=s.dtype)[:, None]), tf.float32)
    return onehot / tf.maximum(tf.reduce_sum(onehot, -1, keepdims=True), 1.0)
