"""schemas.siglip2_inputs: single-image records -> Hugging Face SigLIP2 vision-model inputs."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import packer
import schemas


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# Sizes that are already SigLIP2's target for T (multiples of P, grid from naflex:T), so neither
# navit-pack nor the processor resamples and the pixels can be compared exactly.
CASES = [((192, 256), 16, 192), ((224, 224), 16, 196), ((32, 512), 16, 64), ((48, 80), 8, 64)]


def _records(cases, seq_len_pad: int = 0):
    out, pixels = [], []
    for i, ((h, w), patch, tokens) in enumerate(cases):
        assert packer._plan.grid_for_naflex(h, w, patch, tokens) == (h // patch, w // patch)
        config = packer.PackConfig(seq_len=tokens + seq_len_pad, patch_size=patch, resolution=f"naflex:{tokens}",
                                   max_images_per_seq=1)
        px = _pixels(h, w, i)
        im = packer.prepare_image(_png(px), f"k{i}", config)
        out.append(packer.build_record([im], config))
        pixels.append(px)
    return out, pixels


@pytest.mark.parametrize("case", CASES)
def test_inputs_follow_the_processor_formula(case):
    (h, w), patch, tokens = case
    (record,), (px,) = _records([case], seq_len_pad=5)
    got = schemas.siglip2_inputs([record], max_num_patches=tokens)
    gh, gw = h // patch, w // patch
    assert got["spatial_shapes"].tolist() == [[gh, gw]]
    assert got["pixel_attention_mask"].tolist() == [[1] * (gh * gw) + [0] * (tokens - gh * gw)]
    # Processor: rescale 1/255, normalize mean 0.5 std 0.5, patches (row, col) each flattened (y, x, c).
    want = (px.astype(np.float32) / 255 - 0.5) / 0.5
    want = want.reshape(gh, patch, gw, patch, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)
    np.testing.assert_allclose(got["pixel_values"][0, :gh * gw], want, atol=1e-6)
    assert not got["pixel_values"][0, gh * gw:].any()
    assert got["pixel_values"].dtype == np.float32 and got["spatial_shapes"].dtype == np.int64


def test_inputs_equal_the_transformers_processor():
    """Where transformers is installed (not a dependency): the same image through its SigLIP2 processor."""
    siglip2 = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
    for case in CASES:
        (h, w), patch, tokens = case
        (record,), (px,) = _records([case])
        processor = siglip2.Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=tokens)
        ref = processor(images=[Image.fromarray(px)], return_tensors="np")
        got = schemas.siglip2_inputs([record])
        np.testing.assert_array_equal(got["spatial_shapes"], ref["spatial_shapes"])
        np.testing.assert_array_equal(got["pixel_attention_mask"], ref["pixel_attention_mask"])
        np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], atol=1e-6)


def test_records_it_cannot_convert_are_refused():
    config = packer.PackConfig(seq_len=64, patch_size=8, resolution="naflex:16", max_images_per_seq=4)
    ims = [packer.prepare_image(_png(_pixels(32, 32, i)), f"k{i}", config) for i in range(2)]
    with pytest.raises(ValueError, match="max-images-per-seq 1"):
        schemas.siglip2_inputs([packer.build_record(ims, config)])
    dropped = packer.PackConfig(seq_len=64, patch_size=8, resolution="naflex:16", max_images_per_seq=1,
                                token_drop="const:0.5")
    im = packer.prepare_image(_png(_pixels(32, 32, 0)), "k", dropped)
    with pytest.raises(ValueError, match="token drop"):
        schemas.siglip2_inputs([packer.build_record([im], dropped)])
    (record,), _ = _records([CASES[0]])
    with pytest.raises(ValueError, match="max_num_patches"):
        schemas.siglip2_inputs([record], max_num_patches=100)
