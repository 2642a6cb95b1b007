"""The per-image transform: libjpeg-turbo DCT-scaled decode + OpenCV resize, checked against
the reference (full Pillow decode, EXIF transpose, Pillow antialiased bicubic to the same grid), and
decoder warnings kept out of stderr."""
import io
import math
import warnings

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageFile, ImageFilter, ImageOps

import packer
from packer import ImageRejected
from packer._image import OpenedImage
from conftest import encode, make_pixels

MAD_BOUND = 2.5  # /255, mean over a set of images (the bound set for the default kernel)
PSNR_BOUND = 28.0  # dB, for every image of the set here (the issue asks it of the 5th percentile)


def reference(data: bytes, height: int, width: int) -> np.ndarray:
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC))


def mad_psnr(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = out.astype(np.float64) - ref
    return float(np.abs(diff).mean()), 10 * math.log10(255.0 ** 2 / max(float((diff * diff).mean()), 1e-12))


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """Photograph-like: make_pixels' gradients, shapes and noise, seen through a lens (slightly soft)."""
    img = Image.fromarray(make_pixels(h, w, seed))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)))


# (source h, w) -> target (h, w): 1/2^k scales with every remaining ratio, below the 1/8 scale, enlargement.
CASES = [((1200, 1600), (96, 128)), ((900, 600), (64, 48)), ((800, 800), (224, 224)), ((2000, 3000), (64, 96)),
         ((375, 500), (160, 208)), ((480, 640), (224, 304)), ((333, 500), (256, 384)), ((500, 375), (112, 80)),
         ((120, 160), (192, 256)), ((1024, 768), (400, 304))]


@pytest.mark.parametrize("resize,mad_bound,psnr_bound", [("default", MAD_BOUND, PSNR_BOUND), ("fast", 3.5, 26.0)])
def test_kernel_matches_reference_on_synthetic_photos(resize, mad_bound, psnr_bound):
    mads, psnrs = [], []
    for seed, (src, target) in enumerate(CASES):
        data = encode(photo(*src, seed=seed), "JPEG", quality=90)
        out = OpenedImage(data, 10**8).decode_resized(*target, resize=resize)
        assert out.shape == (*target, 3) and out.dtype == np.uint8
        mad, psnr = mad_psnr(out, reference(data, *target))
        mads.append(mad)
        psnrs.append(psnr)
    assert np.mean(mads) <= mad_bound, mads
    assert min(psnrs) >= psnr_bound, psnrs


def test_fast_kernel_differs_from_default():
    data = encode(photo(480, 640, seed=1), "JPEG", quality=90)
    default = OpenedImage(data, 10**8).decode_resized(176, 240)
    fast = OpenedImage(data, 10**8).decode_resized(176, 240, resize="fast")
    assert not np.array_equal(default, fast)
    with pytest.raises(ValueError):
        OpenedImage(data, 10**8).decode_resized(176, 240, resize="lanczos")


def _variant(kind: str) -> bytes:
    pixels = photo(360, 480, seed=7)
    if kind == "grayscale":
        return encode(Image.fromarray(pixels).convert("L"), "JPEG", quality=90)
    if kind == "cmyk":
        return encode(Image.fromarray(pixels).convert("CMYK"), "JPEG", quality=90)
    if kind == "progressive":
        return encode(pixels, "JPEG", quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = int(kind.split("-")[1])
    return encode(pixels, "JPEG", quality=90, exif=exif.tobytes())


@pytest.mark.parametrize("kind", ["grayscale", "cmyk", "progressive"] + [f"orientation-{o}" for o in range(1, 9)])
def test_jpeg_variants_match_reference(kind):
    data = _variant(kind)
    opened = OpenedImage(data, 10**8)
    target = (128, 96) if opened.height > opened.width else (96, 128)
    assert (opened.height, opened.width) == ((480, 360) if opened.height > opened.width else (360, 480))
    out = opened.decode_resized(*target)
    mad, psnr = mad_psnr(out, reference(data, *target))
    assert mad <= MAD_BOUND and psnr >= PSNR_BOUND, (mad, psnr)
    if kind == "grayscale":
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_exactly_pillows(orientation):
    """Without resizing (a lossless PNG, target = size), the displayed pixels equal Pillow's exif_transpose."""
    pixels = make_pixels(20, 30, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(pixels, "PNG", exif=exif.tobytes())
    opened = OpenedImage(data, 10**8)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(opened.decode_resized(opened.height, opened.width), expected)


@pytest.mark.parametrize("src,target,scale", [((800, 1200), (256, 384), 2), ((800, 1200), (192, 256), 4),
                                               ((800, 1200), (96, 144), 8), ((800, 1200), (32, 48), 8),
                                               ((800, 1200), (400, 600), 2), ((800, 1200), (401, 600), 1)])
def test_jpeg_decoded_at_the_smallest_power_of_two_scale_covering_the_target(monkeypatch, src, target, scale):
    decoded = []
    real = simplejpeg.decode_jpeg

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        decoded.append(out.shape[:2])
        return out

    monkeypatch.setattr(simplejpeg, "decode_jpeg", recording)
    out = OpenedImage(encode(make_pixels(*src), "JPEG"), 10**8).decode_resized(*target)
    assert out.shape == (*target, 3)
    assert decoded == [(math.ceil(src[0] / scale), math.ceil(src[1] / scale))]


def test_pixel_limit_checked_before_any_pixel_is_decoded(monkeypatch):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("pixels decoded")

    data = encode(make_pixels(100, 100), "JPEG")
    monkeypatch.setattr(simplejpeg, "decode_jpeg", must_not_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(ImageRejected) as err:
        packer.prepare_image(data, "k", packer.PackConfig(max_pixels=5000))
    assert err.value.reason == "too_many_pixels"


def test_same_bytes_on_repeat():
    data = encode(photo(300, 400, seed=2), "JPEG", quality=85)
    config = packer.PackConfig(resolution="uniform:64:256", seq_len=256)
    a = packer.prepare_image(data, "key", config)
    b = packer.prepare_image(data, "key", config)
    assert np.array_equal(a.patches, b.patches)


def test_library_versions_name_decoder_and_resizer():
    versions = packer.library_versions()
    assert versions["simplejpeg"] == simplejpeg.__version__
    assert {"pillow", "opencv"} <= versions.keys() and all(versions.values())


# --- decoder warnings -----------------------------------------------------------

def _png_with_broken_exif() -> bytes:
    """A valid PNG whose EXIF block declares a tag far longer than the block: Pillow warns while reading it."""
    exif = Image.Exif()
    exif[0x010E] = "description " * 4
    block = bytearray(exif.tobytes())
    big_endian = b"MM" in block[:8]
    at = block.find(b"\x01\x0e\x00\x02" if big_endian else b"\x0e\x01\x02\x00")
    block[at + 4:at + 8] = (10**6).to_bytes(4, "big" if big_endian else "little")
    return encode(photo(64, 96, seed=3), "PNG", exif=bytes(block))


def _jpeg_with_extraneous_bytes() -> bytes:
    """Garbage before the end marker: libjpeg-turbo (strict) refuses it, Pillow decodes it."""
    data = encode(photo(64, 96, seed=3), "JPEG", quality=90)
    return data[:-2] + b"\x00" * 5 + data[-2:]


def _broken_lzw_tiff() -> bytes:
    """A compressed TIFF with garbage in its strip: libtiff prints an error on file descriptor 2."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = bytearray(encode(noise, "TIFF", compression="tiff_lzw"))
    data[200:2000] = b"\xff" * 1800
    return bytes(data)


@pytest.mark.parametrize("make,expected", [(_png_with_broken_exif, "Truncated File Read"),
                                           (_jpeg_with_extraneous_bytes, "extraneous bytes")])
def test_warnings_of_an_accepted_image_are_dropped(capfd, make, expected):
    data = make()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        image = packer.prepare_image(data, "k", packer.PackConfig())
    assert image.num_tokens > 0
    assert not seen
    assert capfd.readouterr().err == ""
    opened = OpenedImage(data, 10**8)
    opened.decode_resized(64, 96)
    assert any(expected in w for w in opened.warnings)  # the input does make a decoder warn


@pytest.mark.parametrize("make,expected", [(_png_with_broken_exif, "Truncated File Read"),
                                           (_jpeg_with_extraneous_bytes, "Premature end of JPEG file")])
def test_warnings_of_a_rejected_image_go_into_its_detail(capfd, make, expected):
    data = make()
    cut = data[: len(data) - 500]  # header intact, pixel data truncated
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageRejected) as err:
            packer.prepare_image(cut, "k", packer.PackConfig())
    assert err.value.reason == "undecodable"
    assert "decoder warnings" in err.value.detail and expected in err.value.detail
    assert not seen
    assert capfd.readouterr().err == ""


def test_libtiff_messages_go_into_the_detail_not_stderr(capfd):
    with pytest.raises(ImageRejected) as err:
        packer.prepare_image(_broken_lzw_tiff(), "k", packer.PackConfig())
    assert "Using code not yet in table" in err.value.detail
    assert capfd.readouterr().err == ""


def test_dropped_image_keeps_the_full_grid_patches_at_its_positions():
    data = encode(photo(300, 400, seed=4), "JPEG", quality=90)
    config = packer.PackConfig(resolution="uniform:64:256", token_drop="const:0.5")
    image = packer.prepare_image(data, "key", config)
    assert 0 < image.num_tokens < image.grid_h * image.grid_w
    pixels = OpenedImage(data, 10**8).decode_resized(image.grid_h * 16, image.grid_w * 16)
    full, _, _ = packer._patch.patchify(pixels, 16)
    assert np.array_equal(image.patches, full[image.pos_y * image.grid_w + image.pos_x])
    assert np.all(np.diff(image.pos_y * image.grid_w + image.pos_x) > 0)


def test_warning_capture_is_safe_across_threads(capfd):
    """The streaming path decodes in threads: every image keeps its own warnings, nothing reaches stderr,
    and the process's warning filters are as they were."""
    from concurrent.futures import ThreadPoolExecutor

    filters_before = list(warnings.filters)
    inputs = [_broken_lzw_tiff(), _png_with_broken_exif(), _jpeg_with_extraneous_bytes(),
              encode(photo(96, 128, seed=5), "JPEG", quality=90)] * 8

    def outcome(data: bytes) -> str:
        try:
            packer.prepare_image(data, "k", packer.PackConfig())
            return "packed"
        except ImageRejected as e:
            return e.detail

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(outcome, inputs))
    for i in range(0, len(inputs), 4):
        assert "Using code not yet in table" in results[i]
        assert results[i + 1:i + 4] == ["packed"] * 3
    assert capfd.readouterr().err == ""
    assert warnings.filters == filters_before


@pytest.mark.parametrize("ratio", [1.5, 1.8])
def test_default_kernel_antialiases_fine_detail(ratio):
    """A grating finer than the target's pixel grid: the reference averages it away; a resize without
    antialiasing turns it into moire. The default kernel keeps well under half the fast kernel's error."""
    target_h, target_w = 160, 240
    y, x = np.mgrid[0:round(target_h * ratio), 0:round(target_w * ratio)]
    grating = np.repeat((128 + 100 * np.sin(2 * np.pi * (x + 0.5 * y) / 2.2))[..., None], 3, -1).astype(np.uint8)
    data = encode(grating, "PNG")
    ref = reference(data, target_h, target_w)
    errors = {kernel: mad_psnr(OpenedImage(data, 10**8).decode_resized(target_h, target_w, resize=kernel), ref)[0]
              for kernel in ("default", "fast")}
    assert errors["default"] < 0.6 * errors["fast"], errors
