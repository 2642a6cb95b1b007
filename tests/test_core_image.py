import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import packer
from packer import ImageRejected
from packer._image import OpenedImage
from conftest import encode, make_pixels


def decode(data: bytes, h: int, w: int, background=(255, 255, 255)) -> np.ndarray:
    return OpenedImage(data, 10**8).decode_resized(h, w, background)


@pytest.mark.parametrize("fmt,kw", [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}),
                                    ("BMP", {}), ("TIFF", {}), ("GIF", {})])
def test_formats_decode_to_rgb_uint8(fmt, kw):
    pix = make_pixels(48, 64)
    out = decode(encode(pix, fmt, **kw), 48, 64)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    tol = 40 if fmt == "GIF" else 12  # GIF quantizes to 256 colours
    assert np.abs(out.astype(int) - pix.astype(int)).mean() < tol


def test_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode(buf.getvalue(), 16, 16)
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_grayscale_palette_cmyk():
    gray = Image.fromarray(make_pixels(32, 32)[..., 0])
    out = decode(encode(gray, "PNG"), 32, 32)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], np.asarray(gray))
    pal = Image.fromarray(make_pixels(32, 32)).convert("P")
    assert decode(encode(pal, "PNG"), 32, 32).shape == (32, 32, 3)
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    out = decode(encode(cmyk, "JPEG", quality=95), 32, 32)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0)])
def test_alpha_composited_on_background(background):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    out = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 16, 16, background)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 15]) == background


def test_palette_with_transparency_uses_background():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    img.info["transparency"] = 0
    out = decode(encode(img, "PNG", transparency=0), 8, 8, (10, 20, 30))
    assert tuple(out[0, 0]) == (10, 20, 30)


def test_16_bit_png_scaled_to_8_bit():
    a = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    out = decode(encode(Image.frombytes("I;16", (64, 64), a.astype("<u2").tobytes()), "PNG"), 64, 64)
    expected = np.round(a / 65535 * 255)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1


@pytest.mark.parametrize("orientation,expected_shape", [(1, (30, 60)), (6, (60, 30)), (8, (60, 30)), (3, (30, 60))])
def test_exif_orientation_applied_before_planning(orientation, expected_shape):
    pix = make_pixels(30, 60)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(pix, "JPEG", quality=95, exif=exif.tobytes())
    opened = OpenedImage(data, 10**8)
    assert (opened.height, opened.width) == expected_shape
    out = opened.decode_resized(*expected_shape)
    reference = np.asarray(packer._image.to_rgb(Image.fromarray(pix), (0, 0, 0)))
    ref = {1: reference, 3: np.rot90(reference, 2), 6: np.rot90(reference, -1), 8: np.rot90(reference, 1)}[orientation]
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 6


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG that declares a huge size: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_from_header():
    data = _png_header_only(100_000, 100_000)
    assert len(data) < 200
    with pytest.raises(ImageRejected) as err:
        OpenedImage(data, max_pixels=50_000_000)
    assert err.value.reason == "too_many_pixels"
    with pytest.raises(ImageRejected) as err:
        OpenedImage(encode(make_pixels(100, 100), "PNG"), max_pixels=5000)
    assert err.value.reason == "too_many_pixels"


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"not an image at all", "undecodable"),
                                         (b"\xff\xd8\xff\xe0" + b"\0" * 20, "undecodable")])
def test_garbage_is_a_typed_rejection(data, reason):
    with pytest.raises(ImageRejected) as err:
        packer.prepare_image(data, "k", packer.PackConfig())
    assert err.value.reason == reason


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_jpeg_and_png_rejected(cut):
    for fmt in ("JPEG", "PNG"):
        data = encode(make_pixels(64, 64), fmt)
        with pytest.raises(ImageRejected):
            packer.prepare_image(data[: int(len(data) * cut)], "k", packer.PackConfig(resolution="native"))


def test_size_from_header_without_decoding():
    data = encode(make_pixels(37, 91), "PNG")
    assert packer.image_size(data) == (37, 91)


def test_too_many_pixels_quotes_max_pixels_not_pillows_limit():
    from PIL import Image

    side = int((Image.MAX_IMAGE_PIXELS * 1.1) ** 0.5)  # above Pillow's warning limit, below twice it
    with pytest.raises(ImageRejected) as err:
        OpenedImage(_png_header_only(side, side), max_pixels=side * side - 1)
    assert err.value.reason == "too_many_pixels" and f"limit of {side * side - 1} pixels" in str(err.value)
    assert OpenedImage(_png_header_only(side, side), max_pixels=side * side).height == side  # within max_pixels
    with pytest.raises(ImageRejected, match="max_pixels 50000000"):
        OpenedImage(_png_header_only(100_000, 100_000), max_pixels=50_000_000)


# ----------------------------------------------------------------------------- decoder chatter stays off stderr
def _tiff_entries(data: bytes) -> dict[int, int]:
    """Tag -> offset of its 12-byte entry in the first IFD of a little-endian TIFF (as Pillow writes them)."""
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, ifd)[0]
    return {struct.unpack_from("<H", data, ifd + 2 + 12 * i)[0]: ifd + 2 + 12 * i for i in range(count)}


def _odd_tiffs() -> dict[str, bytes]:
    """TIFFs that make the decoders talk: Pillow logs a bad SamplesPerPixel at ERROR while reading the header
    (logging's last resort prints it), and libtiff writes a zlib checksum error to fd 2 while decoding."""
    rgb = Image.fromarray(make_pixels(24, 32))
    plain = bytearray(encode(rgb, "TIFF"))
    entry = _tiff_entries(bytes(plain))[277]  # SamplesPerPixel, one SHORT stored in the entry
    struct.pack_into("<HHIHH", plain, entry, 277, 3, 1, 1000, 0)
    deflate = bytearray(encode(rgb, "TIFF", compression="tiff_adobe_deflate"))
    with Image.open(io.BytesIO(bytes(deflate))) as im:
        offset, size = im.tag_v2[273][0], im.tag_v2[279][0]
    for i in range(offset + size - 4, offset + size):  # the stream's adler32: "incorrect data check"
        deflate[i] ^= 0xFF
    return {"samples_per_pixel": bytes(plain), "bad_checksum": bytes(deflate)}


def test_decoder_chatter_stays_off_stderr(tmp_path):
    """Header reads and decodes of odd TIFFs print nothing, at the Python level (Pillow's logger) or the C level
    (libtiff on fd 2): in a fresh interpreter, which has no logging configured."""
    import json
    import os
    import subprocess
    import sys

    names = []
    for name, data in _odd_tiffs().items():
        (tmp_path / f"{name}.tif").write_bytes(data)
        names.append(name)
    code = """if True:
        import json, sys
        import packer
        out = {}
        for name in sys.argv[1:]:
            data = open(name + ".tif", "rb").read()
            seen = []
            for step in (lambda: packer.image_size(data), lambda: packer.prepare_image(data, name, packer.PackConfig()),
                         lambda: packer._image.OpenedImage(data, 10**8).decode_resized(8, 8)):
                try:
                    step()
                    seen.append("ok")
                except packer.ImageRejected as e:
                    seen.append(e.reason + ": " + e.detail)
            out[name] = seen
        print(json.dumps(out))
    """
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHONPATH=repo))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    outcomes = json.loads(result.stdout)
    # The header problem is not lost: the rejection carries what Pillow logged.
    assert all(o.startswith("undecodable") and "More samples per pixel" in o for o in outcomes["samples_per_pixel"])
    # libtiff's message goes into the rejection's detail instead of onto the terminal.
    assert outcomes["bad_checksum"][0] == "ok"  # the header is fine
    assert "incorrect data check" in outcomes["bad_checksum"][2], outcomes
