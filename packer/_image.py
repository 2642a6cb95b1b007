"""Decoding and resizing: encoded bytes -> RGB uint8, with header checks, EXIF orientation and
reduced-size (DCT) decoding. Every failure is an ImageRejected with a short reason code."""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

# EXIF orientations 5..8 transpose the image, so its displayed height and width swap.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(error: Exception) -> str:
    """The error as text, without object addresses, so that the same input gives the same reason in any process."""
    return _OBJECT_ADDRESS.sub("", f"{type(error).__name__}: {error}")


class ImageRejected(Exception):
    """An input image that cannot be used; `reason` is a short code, `detail` a human explanation."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return int(value) if 1 <= int(value) <= 8 else 1
    except Exception:  # a broken EXIF block is ignored, as browsers do
        return 1


class OpenedImage:
    """An image whose header has been read (size, mode, orientation) but whose pixels are not decoded yet."""

    def __init__(self, data: bytes, max_pixels: int):
        if not data:
            raise ImageRejected("empty", "0 bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels below decides
                self._img = Image.open(io.BytesIO(data))
                raw_w, raw_h = self._img.size
        except Image.DecompressionBombError:  # above twice Pillow's own limit: it refuses to read the header
            raise ImageRejected("too_many_pixels", f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels, which Pillow "
                                                   f"refuses to open (max_pixels {max_pixels})") from None
        except Exception as e:  # Pillow raises many types for unknown or broken headers
            raise ImageRejected("undecodable", _describe(e)) from None
        if raw_w < 1 or raw_h < 1:
            raise ImageRejected("undecodable", f"declared size {raw_w}x{raw_h}")
        if raw_w * raw_h > max_pixels:
            raise ImageRejected("too_many_pixels", f"{raw_w}x{raw_h} exceeds the limit of {max_pixels} pixels")
        self.format = self._img.format
        self.orientation = _orientation(self._img)
        swap = self.orientation in _TRANSPOSING_ORIENTATIONS
        self.height, self.width = (raw_w, raw_h) if swap else (raw_h, raw_w)

    def decode_resized(self, height: int, width: int, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
        """Pixels as RGB uint8 [height, width, 3] in display orientation, resized with antialiasing.

        JPEGs at least twice the target's size are decoded at reduced size (DCT scaling) first; large
        reductions box-reduce to within 2x of the target before the bicubic filter (reducing_gap=2)."""
        img = self._img
        try:
            if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
                # DCT scaling by 1/2, 1/4 or 1/8 to the smallest size still >= the target: a low-pass
                # decode that skips most of the inverse-DCT work.
                swap = self.orientation in _TRANSPOSING_ORIENTATIONS
                img.draft(img.mode, (height, width) if swap else (width, height))
            img.load()
            img = ImageOps.exif_transpose(img) if self.orientation != 1 else img
            rgb = to_rgb(img, background)
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=2.0)
            return np.asarray(rgb, dtype=np.uint8)
        except ImageRejected:
            raise
        except Exception as e:
            raise ImageRejected("undecodable", _describe(e)) from None


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on `background`, 16/32-bit scaled to 8-bit, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img)
        if img.mode == "F":
            a = np.clip(a, 0.0, 1.0) * 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else np.clip(a, 0, 255)
            img = Image.fromarray(np.nan_to_num(a).astype(np.uint8), "L")
        else:
            peak = 65535 if img.mode.startswith("I;16") or (a.size and a.max() > 255) else 255
            img = Image.fromarray((np.clip(a, 0, peak).astype(np.float64) * (255.0 / peak) + 0.5).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa") or (img.mode == "L" and "transparency" in img.info) or (img.mode == "RGB" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, background)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def image_size(data: bytes, max_pixels: int = 100_000_000) -> tuple[int, int]:
    """(height, width) in display orientation, from the header alone (no pixel decoding)."""
    opened = OpenedImage(data, max_pixels)
    return opened.height, opened.width
