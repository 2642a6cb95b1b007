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
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self._img = Image.open(io.BytesIO(data))
                raw_w, raw_h = self._img.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("too_many_pixels", _describe(e)) from None
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


# ---------------------------------------------------------------------------- fast JPEG header
# Planning needs only (height, width) in display orientation. Pillow parses every JPEG marker in
# Python (hundreds of microseconds per ImageNet JPEG); this reads the same fields in a few
# microseconds, and answers None (use Pillow) whenever the file is anything but plain.
_SOF_PLAIN = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman)
_EXIF_PREFIX = b"Exif\x00\x00"
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"


class JpegHeader:
    """Size and orientation of a plain JPEG, read without Pillow (see jpeg_header)."""

    __slots__ = ("height", "width", "orientation")

    def __init__(self, height: int, width: int, orientation: int):
        self.height, self.width, self.orientation = height, width, orientation


def _exif_orientation(exif: bytes) -> "int | None":
    """EXIF orientation (IFD0 tag 0x0112) as Pillow's getexif() gives it, 1 when absent; None when
    the block is unusual (then Pillow decides)."""
    tiff = exif[6:]
    if len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        if int.from_bytes(entry[:2], order) == _EXIF_ORIENTATION_TAG:
            if int.from_bytes(entry[2:4], order) != 3 or int.from_bytes(entry[4:8], order) != 1:
                return None  # not one SHORT
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def jpeg_header(data: bytes) -> "JpegHeader | None":
    """(height, width) in display orientation and the EXIF orientation of a plain JPEG (one frame of
    1, 3 or 4 components, baseline/extended/progressive, at most one EXIF block, no XMP), or None."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    n, i = len(data), 2
    size = None
    exif = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: the header is over
            break
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        start = i + 4
        if marker in _SOF_PLAIN:
            if size is not None or length < 8:
                return None
            h, w, components = (data[start + 1] << 8) | data[start + 2], (data[start + 3] << 8) | data[start + 4], data[start + 5]
            if h < 1 or w < 1 or components not in (1, 3, 4):
                return None
            size = (h, w)
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # lossless, arithmetic or hierarchical frames: Pillow decides
        elif marker == 0xE1:
            if data.startswith(_EXIF_PREFIX, start):
                if exif is not None:
                    return None  # Pillow concatenates several blocks
                exif = bytes(data[start:i + 2 + length])
            elif data.startswith(_XMP_PREFIX, start):
                return None  # Pillow may read the orientation from XMP
        i += 2 + length
    if size is None:
        return None
    orientation = 1 if exif is None else _exif_orientation(exif)
    if orientation is None:
        return None
    h, w = size
    return JpegHeader(w, h, orientation) if orientation in _TRANSPOSING_ORIENTATIONS else JpegHeader(h, w, orientation)


def read_header(data: bytes, max_pixels: int) -> "JpegHeader | OpenedImage":
    """The image's display size from its header: the fast JPEG reader when it can, else Pillow
    (OpenedImage, with every check and error it has). Same answers either way."""
    if not data:
        raise ImageRejected("empty", "0 bytes")
    head = jpeg_header(data)
    if head is not None and head.height * head.width <= min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
        return head
    return OpenedImage(data, max_pixels)
