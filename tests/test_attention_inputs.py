"""Attention inputs for fused kernels, checked against the dense schemas.attention_mask on packed records
read back from a written dataset: cu_seqlens (FlashAttention varlen) rebuilds the same block-diagonal
mask and gives the same attention outputs; flex_block_mask gives flex_attention the dense-mask outputs."""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest

import schemas

sys.path.insert(0, os.path.dirname(__file__))
from test_readers import small_records  # noqa: E402

E = 4  # small_records' max_images_per_seq


@pytest.fixture(scope="module")
def segment_ids(tmp_path_factory):
    """[B, L] segment_ids of real packed records, plus an all-padding row and a row with no padding."""
    config, records = small_records(n_images=40, seq_len=64)
    d = tmp_path_factory.mktemp("arrow")
    schemas.write_dataset(d, records, config=config, fmt="arrow", num_shards=2, meta_fields=("id",))
    s = np.stack([r["segment_ids"] for r in schemas.read(d)])
    assert E == config.max_images_per_seq and (s == 0).any() and (s.max(1) >= 2).any()
    full = np.repeat(np.arange(1, E + 1, dtype=np.int32), 16)  # four images of 16 tokens: no padding
    return np.concatenate([s, np.zeros((1, 64), np.int32), full[None]])


def block_diagonal(s: np.ndarray) -> np.ndarray:
    """The dense mask of the flattened batch: attention_mask per row on the diagonal, False across rows."""
    B, L = s.shape
    out = np.zeros((B * L, B * L), bool)
    for b, m in enumerate(schemas.attention_mask(s)):
        out[b * L:(b + 1) * L, b * L:(b + 1) * L] = m
    return out


@pytest.mark.parametrize("max_segments", [None, E + 1])
def test_cu_seqlens_rebuild_the_dense_mask(segment_ids, max_segments):
    s = segment_ids
    B, L = s.shape
    cu, max_seqlen = schemas.cu_seqlens(s, max_segments)
    M = max_segments or L
    assert cu.dtype == np.int32 and cu.shape == (B * M + 1,)  # fixed by B, L, M: one shape per step
    assert cu[0] == 0 and cu[-1] == B * L and (np.diff(cu) >= 0).all()
    rebuilt = np.zeros((B * L, B * L), bool)
    for a, b in zip(cu[:-1], cu[1:]):
        rebuilt[a:b, a:b] = True
    np.testing.assert_array_equal(rebuilt, block_diagonal(s))
    assert max_seqlen == max(int(np.count_nonzero(r == v)) for r in s for v in np.unique(r))
    # row b's segments sit in its own M entries, the unused ones zero-length at its end
    for b in range(B):
        row = cu[b * M:(b + 1) * M + 1]
        assert row[0] == b * L and row[-1] == (b + 1) * L


def test_cu_seqlens_attention_equals_dense_masked_attention(segment_ids):
    """Attention computed segment by segment over cu_seqlens (what a varlen kernel does) equals the dense
    masked softmax on every token, padding included."""
    s = segment_ids
    B, L = s.shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, L, 8)) for _ in range(3))
    logits = np.einsum("bqd,bkd->bqk", q, k) / np.sqrt(8)
    logits = np.where(schemas.attention_mask(s), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    dense = np.einsum("bqk,bkd->bqd", p / p.sum(-1, keepdims=True), v).reshape(B * L, 8)
    cu, _ = schemas.cu_seqlens(s, E + 1)
    qf, kf, vf = (x.reshape(B * L, 8) for x in (q, k, v))
    varlen = np.zeros_like(dense)
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            w = qf[a:b] @ kf[a:b].T / np.sqrt(8)
            w = np.exp(w - w.max(-1, keepdims=True))
            varlen[a:b] = (w / w.sum(-1, keepdims=True)) @ vf[a:b]
    np.testing.assert_allclose(varlen, dense, atol=1e-12)


def test_cu_seqlens_refuse_what_they_cannot_express():
    with pytest.raises(ValueError, match="more than max_segments=2"):
        schemas.cu_seqlens(np.array([[1, 1, 2, 0]]), 2)
    with pytest.raises(ValueError, match="two runs"):
        schemas.cu_seqlens(np.array([[1, 2, 1, 0]]))
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        schemas.cu_seqlens(np.array([1, 1, 0]))
    cu, max_seqlen = schemas.cu_seqlens(np.zeros((0, 5), np.int32), 3)
    assert cu.tolist() == [0] and max_seqlen == 0


def test_flex_block_mask_gives_the_dense_mask_outputs(segment_ids):
    torch = pytest.importorskip("torch", reason="torch is not installed (optional)")
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        pytest.skip("this torch has no flex_attention (torch < 2.5)")
    import torch.nn.functional as F

    s = segment_ids
    B, L = s.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, 2, L, 16) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(schemas.attention_mask(s))[:, None])
    for block_size in (128, 16):  # one block per row, and blocks that flex skips (no shared image)
        mask = schemas.flex_block_mask(torch.from_numpy(s), block_size=block_size)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            flex = flex_attention(q, k, v, block_mask=mask)
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    dense_blocks = mask.to_dense()  # [B, 1, L/16, L/16]: block (i, j) kept iff some pair in it may attend
    want = schemas.attention_mask(s).reshape(B, L // 16, 16, L // 16, 16).any((2, 4))
    np.testing.assert_array_equal(dense_blocks[:, 0].numpy().astype(bool), want)
    assert not want.all()  # some blocks are skipped
    assert schemas.flex_block_mask(s).shape[0] == B  # numpy input
