"""Attention inputs from segment_ids: the dense mask and per-image pooling matrix in numpy and TensorFlow (same
results), FlashAttention varlen cu_seqlens (numpy) and a flex_attention block mask (torch, imported lazily)."""
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


def cu_seqlens(segment_ids: np.ndarray, max_segments: int | None = None) -> tuple[np.ndarray, int]:
    """FlashAttention varlen inputs for a batch [B, L] of segment_ids flattened to B·L tokens:
    (cu_seqlens int32 [B·M + 1], max_seqlen), M = max_segments (default L, always enough; pass
    max_images_per_seq + 1 for a short array). The shape depends on B, L and M only, never on the
    contents, so a compiled step sees one shape.

    Row b owns entries b·M .. b·M + M - 1: the start (in flattened tokens) of each of its runs of equal
    segment ids in order, its padding (id 0, at the end) a segment of its own as in attention_mask
    (padding attends to padding); its unused entries repeat the row's end, (b+1)·L, so the extra
    segments are zero-length. The last entry is B·L. max_seqlen is the longest segment (a Python int; L
    is a valid constant bound). ValueError if a row has more than M segments or an id in two runs."""
    s = np.asarray(segment_ids)
    if s.ndim != 2:
        raise ValueError(f"segment_ids must be [batch, seq_len], got shape {s.shape}")
    B, L = s.shape
    M = L if max_segments is None else int(max_segments)
    if L == 0 or M < 1:
        raise ValueError(f"need seq_len >= 1 and max_segments >= 1, got seq_len={L}, max_segments={M}")
    if B == 0:
        return np.zeros(1, np.int32), 0
    starts = np.ones((B, L), bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]  # a segment starts at each change of id (and at each row's start)
    runs = starts.sum(1)
    distinct = 1 + (np.diff(np.sort(s, axis=1), axis=1) != 0).sum(1)
    if (runs != distinct).any():
        raise ValueError(f"row {int(np.argmax(runs != distinct))}: a segment id occurs in two runs (not packed records?)")
    if runs.max() > M:
        raise ValueError(f"row {int(np.argmax(runs))} has {int(runs.max())} segments, more than max_segments={M}")
    out = np.repeat((np.arange(B, dtype=np.int64) + 1) * L, M).reshape(B, M)  # unused entries: the row's end
    rows, cols = np.nonzero(starts)
    slot = np.cumsum(starts, axis=1)[rows, cols] - 1
    out[rows, slot] = rows * L + cols
    cu = np.append(out.reshape(-1), B * L).astype(np.int32)
    return cu, int(np.diff(cu).max())


def flex_block_mask(segment_ids: Any, block_size: int = 128) -> Any:
    """torch flex_attention BlockMask for a batch [B, L] of segment_ids (numpy or a torch tensor, whose device
    the mask is built on): query q sees key k of row b iff segment_ids[b, q] == segment_ids[b, k], as
    attention_mask; blocks with no shared segment are skipped. Needs torch >= 2.5 (imported here)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    s = torch.as_tensor(segment_ids)
    if s.ndim != 2:
        raise ValueError(f"segment_ids must be [batch, seq_len], got shape {tuple(s.shape)}")

    def same_segment(b: Any, h: Any, q: Any, k: Any) -> Any:
        return s[b, q] == s[b, k]

    B, L = s.shape
    return create_block_mask(same_segment, B, None, L, L, device=s.device, BLOCK_SIZE=block_size)
