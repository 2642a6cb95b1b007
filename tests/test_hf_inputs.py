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


@pytest.mark.parametrize("convert", [schemas.siglip2_inputs, schemas.timm_naflex_inputs], ids=["siglip2", "timm"])
def test_records_it_cannot_convert_are_refused(convert):
    config = packer.PackConfig(seq_len=64, patch_size=8, resolution="naflex:16", max_images_per_seq=4)
    ims = [packer.prepare_image(_png(_pixels(32, 32, i)), f"k{i}", config) for i in range(2)]
    with pytest.raises(ValueError, match="max-images-per-seq 1"):
        convert([packer.build_record(ims, config)])
    dropped = packer.PackConfig(seq_len=64, patch_size=8, resolution="naflex:16", max_images_per_seq=1,
                                token_drop="const:0.5")
    im = packer.prepare_image(_png(_pixels(32, 32, 0)), "k", dropped)
    with pytest.raises(ValueError, match="token drop"):
        convert([packer.build_record([im], dropped)])
    (record,), _ = _records([CASES[0]])
    with pytest.raises(ValueError, match="max_num_patches"):
        convert([record], max_num_patches=100)


# timm's NaFlex ViT


@pytest.mark.parametrize("case", CASES)
def test_timm_inputs_follow_the_normalize_formula(case):
    (h, w), patch, tokens = case
    (record,), (px,) = _records([case], seq_len_pad=5)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    got = schemas.timm_naflex_inputs([record], max_num_patches=tokens + 3, mean=mean, std=std)
    gh, gw = h // patch, w // patch
    n = gh * gw
    assert got["patches"].shape == (1, tokens + 3, patch * patch * 3) and got["patches"].dtype == np.float32
    want = (px.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)  # per channel, (y, x, c) order
    want = want.reshape(gh, patch, gw, patch, 3).transpose(0, 2, 1, 3, 4).reshape(n, -1)
    np.testing.assert_allclose(got["patches"][0, :n], want, atol=1e-6)
    assert not got["patches"][0, n:].any()
    ys, xs = np.divmod(np.arange(n), gw)
    assert got["patch_coord"].dtype == np.int64 and got["patch_coord"][0, :n].tolist() == np.stack([ys, xs], 1).tolist()
    assert not got["patch_coord"][0, n:].any()
    assert got["patch_valid"].dtype == bool and got["patch_valid"][0].tolist() == [True] * n + [False] * (tokens + 3 - n)


def test_timm_inputs_default_to_timms_imagenet_statistics():
    (record,), (px,) = _records([CASES[3]])
    got = schemas.timm_naflex_inputs([record])
    first = (px[:8, :8].astype(np.float32) / 255 - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    np.testing.assert_allclose(got["patches"][0, 0], first.reshape(-1), atol=1e-6)


def test_timm_inputs_need_at_least_one_record():
    with pytest.raises(ValueError, match="at least one record"):
        schemas.timm_naflex_inputs([])


def _timm():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("torchvision", reason="torchvision is not installed (timm needs it)")
    timm = pytest.importorskip("timm", reason="timm is not installed (not a dependency: pip install timm)")
    return torch, timm


def _timm_reference(torch, pixels, patch, max_seq_len, mean, std):
    """timm's own path for the same images: ToTensor + Normalize, patchify_image, NaFlexCollator."""
    from torchvision import transforms

    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import patchify_image

    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))])
    items = []
    for px in pixels:
        patches, coord, valid = patchify_image(to_input(Image.fromarray(px)), (patch, patch))
        items.append(({"patches": patches, "patch_coord": coord, "patch_valid": valid}, 0))
    inputs, _ = NaFlexCollator(max_seq_len=max_seq_len)(items)
    return inputs


def test_timm_inputs_equal_timms_patchify_and_collator():
    torch, _ = _timm()
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert (schemas._hf.IMAGENET_DEFAULT_MEAN, schemas._hf.IMAGENET_DEFAULT_STD) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    cases = [c for c in CASES if c[1] == 16]
    records, pixels = _records(cases)
    n = max(t for _, _, t in cases)
    for mean, std in ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), ((0.5,) * 3, (0.5,) * 3)):
        got = schemas.timm_naflex_inputs(records, max_num_patches=n, mean=mean, std=std)
        ref = _timm_reference(torch, pixels, 16, n, mean, std)
        np.testing.assert_allclose(got["patches"], ref["patches"].numpy(), atol=1e-6)
        np.testing.assert_array_equal(got["patch_coord"], ref["patch_coord"].numpy())
        np.testing.assert_array_equal(got["patch_valid"], ref["patch_valid"].numpy())


def test_a_timm_naflexvit_forward_pass_matches_timms_own_inputs():
    """A small naflexvit (random weights) gives the same outputs for our inputs as for timm's own, and each
    row's output does not depend on the other rows (padding is masked by patch_valid)."""
    torch, timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, embed_dim=64, depth=2, num_heads=4,
                              num_classes=5).eval()
    cfg = timm.data.resolve_data_config(model=model)
    cases = [c for c in CASES if c[1] == 16]
    records, pixels = _records(cases)
    n = max(t for _, _, t in cases)
    ours = {k: torch.from_numpy(v) for k, v in
            schemas.timm_naflex_inputs(records, max_num_patches=n, mean=cfg["mean"], std=cfg["std"]).items()}
    ref = _timm_reference(torch, pixels, 16, n, cfg["mean"], cfg["std"])
    with torch.no_grad():
        out = model(ours)
        want = model({k: ref[k] for k in ("patches", "patch_coord", "patch_valid")})
        alone = torch.cat([model({k: v[i:i + 1] for k, v in ours.items()}) for i in range(len(records))])
    assert out.shape == (len(records), 5) and torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
