"""Decoding and resizing: encoded bytes -> RGB uint8, with header checks, EXIF orientation and
reduced-size (DCT) decoding. Every failure is an ImageRejected with a short reason code.

JPEGs in YCbCr, RGB or grayscale are decoded by libjpeg-turbo (simplejpeg) at the smallest 1/2^k DCT
scale that still covers the target, and the remaining step is resized by OpenCV. Pillow reads the header,
size and EXIF orientation, and decodes everything else (other formats, CMYK/YCCK JPEGs). The kernels
were chosen by measurement against a full Pillow decode + Pillow antialiased bicubic resize
(benchmarks/transform.py, benchmarks/RESULTS.md)."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import struct
import sys
import tempfile
import threading
import warnings
from typing import Iterator

import cv2
import numpy as np
import simplejpeg
from PIL import Image

# The pipeline parallelizes across processes; OpenCV's own thread pool would only oversubscribe the cores.
cv2.setNumThreads(1)

RESIZE_KERNELS = ("default", "fast")
# EXIF orientations 5..8 transpose the image, so its displayed height and width swap.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_JPEG_FORMATS = ("JPEG", "MPO")
_TURBO_COLORSPACES = ("YCbCr", "RGB", "Gray")  # libjpeg-turbo converts these to RGB; CMYK and YCCK go to Pillow
_MAX_DCT_HALVINGS = 3  # DCT scaling goes down to 1/8
_MAX_WARNINGS_KEPT = 5


def _describe(error: Exception) -> str:
    """The error as text, without object addresses, so that the same input gives the same reason in any process."""
    return _OBJECT_ADDRESS.sub("", f"{type(error).__name__}: {error}")


def library_versions() -> dict[str, str]:
    """Versions of the decoding and resizing libraries: pixel bytes may differ across them."""
    import PIL

    return {"pillow": PIL.__version__, "simplejpeg": simplejpeg.__version__, "opencv": cv2.__version__,
            "numpy": np.__version__}


class ImageRejected(Exception):
    """An input image that cannot be used; `reason` is a short code, `detail` a human explanation."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Capturing warnings changes process-wide state (the warnings filters, file descriptor 2): one thread at a
# time. The libjpeg-turbo path needs no capture, so JPEG decoding and all resizing stay parallel.
_CAPTURE_LOCK = threading.RLock()


class _LogSink(logging.Handler):
    """Collects log records (Pillow logs some header problems, e.g. TiffImagePlugin's "More samples per
    pixel than can be decoded", at ERROR: with no handler configured, logging's last resort prints them)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(f"{record.name}: {record.getMessage()}")
        except Exception:  # a malformed log call must not fail the decode
            self.lines.append(f"{record.name}: {record.msg!r}")


# Loggers of the decoding libraries whose records are collected instead of printed.
_DECODER_LOGGERS = ("PIL",)


@contextlib.contextmanager
def _decoder_warnings(sink: list[str]) -> Iterator[None]:
    """Collect the Python warnings the decoders raise, and what they log (Pillow's "PIL" loggers), into
    `sink` instead of printing them. The loggers stop propagating for that time, so neither the root
    logger's handlers nor logging's last resort (stderr) see their records."""
    log = _LogSink()
    with _CAPTURE_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, not Pillow's limit
        loggers = [logging.getLogger(name) for name in _DECODER_LOGGERS]
        saved = [(lg.propagate, lg.handlers) for lg in loggers]
        for lg in loggers:
            lg.propagate, lg.handlers = False, [log]
        try:
            yield
        finally:
            for lg, (propagate, handlers) in zip(loggers, saved):
                lg.propagate, lg.handlers = propagate, handlers
            texts = [_OBJECT_ADDRESS.sub("", f"{w.category.__name__}: {w.message}") for w in caught]
            for text in texts + [_OBJECT_ADDRESS.sub("", line) for line in log.lines]:
                if text not in sink:
                    sink.append(text)


@contextlib.contextmanager
def _native_stderr(sink: list[str]) -> Iterator[None]:
    """Collect what C libraries (libtiff) write to file descriptor 2 into `sink`. Used around TIFF
    decoding only: it redirects the whole process's fd 2 for that time."""
    sys.stderr.flush()
    with _CAPTURE_LOCK, tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines()
            sink.extend(line.strip() for line in lines if line.strip())


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return int(value) if 1 <= int(value) <= 8 else 1
    except Exception:  # a broken EXIF block is ignored, as browsers do
        return 1


def _apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored -> displayed orientation (EXIF 1..8), as Pillow's ImageOps.exif_transpose."""
    if orientation == 2:
        pixels = pixels[:, ::-1]
    elif orientation == 3:
        pixels = pixels[::-1, ::-1]
    elif orientation == 4:
        pixels = pixels[::-1]
    elif orientation == 5:
        pixels = pixels.transpose(1, 0, 2)
    elif orientation == 6:
        pixels = pixels.transpose(1, 0, 2)[:, ::-1]
    elif orientation == 7:
        pixels = pixels.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        pixels = pixels.transpose(1, 0, 2)[::-1]
    return np.ascontiguousarray(pixels)


def _dct_halvings(height: int, width: int, target_h: int, target_w: int) -> int:
    """The largest k <= 3 such that the 1/2^k DCT-scaled decode still covers the target on both axes."""
    k = 0
    while (k < _MAX_DCT_HALVINGS and math.ceil(height / 2 ** (k + 1)) >= target_h
           and math.ceil(width / 2 ** (k + 1)) >= target_w):
        k += 1
    return k


# The default kernel's upsampling before the 2x2 box is bicubic below this remaining ratio, linear above
# it: closer to the reference there, and cheaper (measured on the dev images, benchmarks/transform.py;
# a plain bicubic without the box for small ratios was measured too, and lowered the PSNR 5th percentile).
_LINEAR_UPSAMPLE_RATIO = 1.7


def resize_rgb(pixels: np.ndarray, height: int, width: int, kernel: str = "default") -> np.ndarray:
    """RGB uint8 [h, w, 3] -> [height, width, 3].

    Reductions of 2x or more (what remains below the 1/8 DCT scale) are box-averaged (INTER_AREA).
    Below 2x, "default" upsamples to twice the target (bicubic, or linear from a 1.7x reduction) and
    box-averages 2x2, an antialiased filter close to Pillow's bicubic; "fast" resizes linearly without
    antialiasing. Enlargements are bicubic (default) or linear (fast)."""
    h, w = pixels.shape[:2]
    if (h, w) == (height, width):
        return pixels
    ratio = max(h / height, w / width)
    if ratio >= 2.0:
        return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    if kernel == "fast":
        return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
    if ratio <= 1.0:
        return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_CUBIC)
    upsample = cv2.INTER_CUBIC if ratio < _LINEAR_UPSAMPLE_RATIO else cv2.INTER_LINEAR
    doubled = cv2.resize(pixels, (2 * width, 2 * height), interpolation=upsample)
    return cv2.resize(doubled, (width, height), interpolation=cv2.INTER_AREA)


def _turbo_header(data: bytes) -> tuple[int, int, str] | None:
    """(height, width, colorspace) of a JPEG that libjpeg-turbo can read, else None (Pillow reads it)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:  # simplejpeg raises ValueError for streams it cannot parse
        return None
    return height, width, colorspace


class OpenedImage:
    """An image whose header has been read (size, mode, orientation) but whose pixels are not decoded yet.

    `warnings` lists the decoder warnings seen so far (they are never printed); a rejection carries them
    in its detail."""

    def __init__(self, data: bytes, max_pixels: int):
        self.warnings: list[str] = []
        if not data:
            raise ImageRejected("empty", "0 bytes")
        self._data = data
        self._max_pixels = max_pixels
        self._img: Image.Image | None = None
        header = _turbo_header(data)
        if header is not None:  # a JPEG: libjpeg-turbo reads the size, a short walk of the markers the orientation
            raw_h, raw_w, self._colorspace = header
            self.format = "JPEG"
            plain = jpeg_header(data)  # orientation without Pillow for plain files; Pillow decides the rest
            if plain is not None:
                self.orientation = plain.orientation
            else:
                self._open_pillow()
                with _decoder_warnings(self.warnings):
                    self.orientation = _orientation(self._img)
        else:
            self._colorspace = None
            self._open_pillow()
            raw_w, raw_h = self._img.size
            self.format = self._img.format
            with _decoder_warnings(self.warnings):
                self.orientation = _orientation(self._img)
        if raw_w < 1 or raw_h < 1:
            raise self._rejected("undecodable", f"declared size {raw_w}x{raw_h}")
        if raw_w * raw_h > max_pixels:
            raise self._rejected("too_many_pixels", f"{raw_w}x{raw_h} exceeds the limit of {max_pixels} pixels")
        self._raw_h, self._raw_w = raw_h, raw_w
        swap = self.orientation in _TRANSPOSING_ORIENTATIONS
        self.height, self.width = (raw_w, raw_h) if swap else (raw_h, raw_w)

    def _open_pillow(self) -> None:
        """Pillow reads the header (lazily for JPEGs, which need it only where libjpeg-turbo cannot decode)."""
        try:
            with _decoder_warnings(self.warnings):
                self._img = Image.open(io.BytesIO(self._data))
        except Image.DecompressionBombError:  # above twice Pillow's own limit: it refuses to read the header
            raise self._rejected("too_many_pixels", f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels, which Pillow "
                                                    f"refuses to open (max_pixels {self._max_pixels})") from None
        except Exception as e:  # Pillow raises many types for unknown or broken headers
            raise self._rejected("undecodable", _describe(e)) from None

    def _rejected(self, reason: str, detail: str) -> ImageRejected:
        if self.warnings:
            shown = self.warnings[:_MAX_WARNINGS_KEPT]
            more = len(self.warnings) - len(shown)
            detail += "; decoder warnings: " + " | ".join(shown) + (f" (+{more} more)" if more else "")
        return ImageRejected(reason, detail)

    def decode_resized(self, height: int, width: int, background: tuple[int, int, int] = (255, 255, 255),
                       resize: str = "default") -> np.ndarray:
        """Pixels as RGB uint8 [height, width, 3] in display orientation.

        JPEGs are decoded at the smallest 1/2^k DCT scale that covers the target, then resized by
        `resize_rgb` with kernel `resize` ("default": antialiased; "fast": linear)."""
        if resize not in RESIZE_KERNELS:
            raise ValueError(f"resize must be one of {RESIZE_KERNELS}, got {resize!r}")
        swap = self.orientation in _TRANSPOSING_ORIENTATIONS
        raw_target = (width, height) if swap else (height, width)
        try:
            pixels = self._decode_turbo(*raw_target, resize == "fast") if self._colorspace else None
            if pixels is None:
                pixels = self._decode_pillow(*raw_target, background)
            pixels = resize_rgb(pixels, *raw_target, kernel=resize)
        except ImageRejected:
            raise
        except Exception as e:
            raise self._rejected("undecodable", _describe(e)) from None
        return _apply_orientation(pixels, self.orientation)

    def _decode_turbo(self, target_h: int, target_w: int, fast: bool) -> np.ndarray | None:
        """libjpeg-turbo decode at 1/2^k scale, or None where Pillow must decode (CMYK/YCCK, or libjpeg
        reports a problem: Pillow is more lenient, and its error is the one a rejection reports). Chroma is
        upsampled by replication (no measurable loss after the resize); `fast` also uses the fast integer IDCT."""
        if self._colorspace not in _TURBO_COLORSPACES:
            return None
        try:
            k = _dct_halvings(self._raw_h, self._raw_w, target_h, target_w)
            pixels = simplejpeg.decode_jpeg(self._data, "rgb", fastupsample=True, fastdct=fast,
                                            min_height=math.ceil(self._raw_h / 2 ** k),
                                            min_width=math.ceil(self._raw_w / 2 ** k))
        except Exception as e:  # simplejpeg raises ValueError for broken or unusual streams
            self.warnings.append(f"libjpeg-turbo: {e}")
            return None
        return pixels

    def _decode_pillow(self, target_h: int, target_w: int, background: tuple[int, int, int]) -> np.ndarray:
        """Pillow decode (other formats, CMYK/YCCK JPEGs), its Python warnings and libtiff's messages collected."""
        if self._img is None:
            self._open_pillow()
        img = self._img
        if img.format in _JPEG_FORMATS and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
            img.draft(img.mode, (target_w, target_h))  # DCT scaling by 1/2, 1/4 or 1/8 down to >= the target
        with _decoder_warnings(self.warnings):
            with _native_stderr(self.warnings) if img.format == "TIFF" else contextlib.nullcontext():
                img.load()
            return np.asarray(to_rgb(img, background), dtype=np.uint8)


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


def read_image_size(f, size: int, max_pixels: int = 100_000_000) -> tuple[tuple[int, int], "bytes | None"]:
    """((height, width) in display orientation, None or the whole bytes) of the image in seekable binary file
    (or file descriptor) `f` of `size` bytes, reading as little of it as its format allows (read_header_file);
    ImageRejected as read_header would raise on the whole bytes."""
    head, whole = read_header_file(f, size, max_pixels)
    return (head.height, head.width), whole


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
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # Pillow's own pattern (Image.getexif)
_NO_ORIENTATION = -1


class JpegHeader:
    """Size and orientation of a plain JPEG, read without Pillow (see jpeg_header)."""

    __slots__ = ("height", "width", "orientation")

    def __init__(self, height: int, width: int, orientation: int):
        self.height, self.width, self.orientation = height, width, orientation


def _exif_orientation(exif: bytes) -> "int | None":
    """EXIF orientation (IFD0 tag 0x0112) as Pillow's getexif() gives it, its raw value (out-of-range values
    included), _NO_ORIENTATION when absent; None when the block is unusual (then Pillow decides)."""
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
            return int.from_bytes(entry[8:10], order)
    return _NO_ORIENTATION


def _display_orientation(exif: "bytes | None", xmp: "bytes | None") -> "int | None":
    """The orientation Pillow's getexif() reports (EXIF first; without an EXIF orientation, the first
    tiff:Orientation of the last XMP block), 1 for none or an out-of-range value; None when Pillow decides."""
    value = _NO_ORIENTATION if exif is None else _exif_orientation(exif)
    if value is None:
        return None
    if value == _NO_ORIENTATION and xmp is not None:
        match = _XMP_ORIENTATION.search(xmp)
        value = int(match[2]) if match else 1
    return value if 1 <= value <= 8 else 1


def jpeg_header(data: bytes) -> "JpegHeader | None":
    """(height, width) in display orientation and the orientation of a plain JPEG (one frame of 1, 3 or 4
    components, baseline/extended/progressive, at most one EXIF block; XMP read as Pillow reads it), or None."""
    return _walk_jpeg(data, len(data))


_MARKER_HEAD = struct.Struct(">BBH")  # 0xFF, the marker, the segment's length (for markers that have one)
_SKIPPED = frozenset([0xC4, 0xDB, 0xDD, 0xE0] + list(range(0xE2, 0xF0)))  # tables, restart interval, APPn but APP1


def _walk_jpeg(data: bytes, n: int, more=None) -> "JpegHeader | None":
    """jpeg_header of an n-byte image whose first len(data) bytes are `data`; `more(offset, count)` reads
    what lies beyond them (it is asked only for marker heads, the frame header and EXIF/XMP blocks, never for
    the other segments' contents)."""
    have = len(data)
    head = _MARKER_HEAD.unpack_from

    def get(offset: int, count: int) -> bytes:
        return data[offset:offset + count] if offset + count <= have or more is None else more(offset, count)

    if n < 4 or data[:2] != b"\xff\xd8":
        return None
    i = 2
    size = exif = xmp = None
    while i + 4 <= n:
        if i + 4 <= have:
            ff, marker, length = head(data, i)
        else:
            mark = get(i, 4)
            if len(mark) < 4:
                return None
            ff, marker, length = head(mark)
        if ff != 0xFF:
            return None
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan / end of image: the header is over
            break
        if length < 2 or i + 2 + length > n:
            return None
        start = i + 4
        i += 2 + length
        if marker in _SKIPPED:  # most segments of a plain JPEG
            continue
        if marker in _SOF_PLAIN:
            if size is not None or length < 8:
                return None
            frame = get(start, 6)
            if len(frame) < 6:
                return None
            h, w, components = (frame[1] << 8) | frame[2], (frame[3] << 8) | frame[4], frame[5]
            if h < 1 or w < 1 or components not in (1, 3, 4):
                return None
            size = (h, w)
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC8, 0xCC):
            return None  # lossless, arithmetic or hierarchical frames: Pillow decides
        elif marker == 0xE1:
            prefix = get(start, len(_XMP_PREFIX))
            if prefix.startswith(_EXIF_PREFIX):
                if exif is not None:
                    return None  # Pillow concatenates several blocks
                exif = bytes(get(start, length - 2))
            elif length - 2 >= len(_XMP_PREFIX) and prefix.startswith(_XMP_PREFIX):  # the last block counts, as in Pillow
                xmp = bytes(get(start + len(_XMP_PREFIX), length - 2 - len(_XMP_PREFIX)))
    if size is None:
        return None
    orientation = _display_orientation(exif, xmp)
    if orientation is None:
        return None
    h, w = size
    return JpegHeader(w, h, orientation) if orientation in _TRANSPOSING_ORIENTATIONS else JpegHeader(h, w, orientation)


_FILE_CHUNK = 4096


def read_header_file(f, size: int, max_pixels: int) -> "tuple[JpegHeader | OpenedImage, bytes | None]":
    """read_header for the image in binary file `f` (seekable, `size` bytes; or an open file descriptor,
    read with os.pread, the fewest system calls), reading as little as it can: a plain JPEG's marker heads,
    frame header and EXIF/XMP blocks (other segments are skipped, never read). Any other image is read
    whole, and its bytes are returned too: (header, None or the whole bytes). The answer is read_header's
    on the whole bytes."""
    if isinstance(f, int):
        window = [0, b""]  # the last chunk read past the first: the marker heads that follow are often in it

        def more(offset: int, count: int) -> bytes:
            start, chunk = window
            if start <= offset and offset + count <= start + len(chunk):
                return chunk[offset - start:offset - start + count]
            if count > _FILE_CHUNK:
                return os.pread(f, count, offset)
            window[:] = offset, os.pread(f, _FILE_CHUNK, offset)
            return window[1][:count]

        def whole() -> bytes:
            parts, offset = [], 0
            while chunk := os.pread(f, max(size - offset, _FILE_CHUNK), offset):
                parts.append(chunk)
                offset += len(chunk)
            return b"".join(parts)
    else:
        def more(offset: int, count: int) -> bytes:
            f.seek(offset)
            return f.read(count)

        def whole() -> bytes:
            f.seek(0)
            return f.read()
    first = more(0, _FILE_CHUNK)
    head = _walk_jpeg(first, size, more) if size else None
    if head is not None and head.height * head.width <= min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
        return head, None
    data = first if len(first) == size else whole()
    return read_header(data, max_pixels), data


def read_header(data: bytes, max_pixels: int) -> "JpegHeader | OpenedImage":
    """The image's display size from its header: the fast JPEG reader when it can, else Pillow
    (OpenedImage, with every check and error it has). Same answers either way."""
    if not data:
        raise ImageRejected("empty", "0 bytes")
    head = jpeg_header(data)
    if head is not None and head.height * head.width <= min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
        return head
    return OpenedImage(data, max_pixels)
