"""`synthetic:N[:SEED]`: N generated images, deterministic from SEED, shaped like ImageNet.

Sizes: the longer side is 500 for about half the images (as in ImageNet), otherwise mostly 200-800, with a
few small (<200) and large (up to 2000) ones; aspect ratios 4:3, 3:4, 1:1, 3:2, 2:3, 16:9, 9:16, some
jittered and a few extreme (2.5:1 to 5:1 either way). Formats: JPEG (quality 75, 85 or 95; 2% grayscale,
0.5% CMYK) and 1% PNG (half with alpha). Labels: 10 colour classes.

Speed. Encoding each image would cost more than packing it, so JPEGs are assembled from pre-encoded
blocks: per (seed, class, quality) one 256x256 "texture" (grayscale: per (seed, quality)) (a gradient in the class colour, flat shapes and
sensor-like noise) is encoded once with a restart marker after every MCU (16x16 pixels), which makes each
MCU an independent piece of entropy-coded data. An image of any size is then its header (size patched)
plus a grid of MCUs: a crop of its class's texture at a random offset, with a few blocky shapes taken
from other classes' textures. The result is a valid baseline JPEG that every decoder reads (restart
markers are standard), with realistic decode cost and size. CMYK and PNG images are drawn and encoded
directly (a few ms each)."""
from __future__ import annotations

import dataclasses
import functools
import io
import re
from typing import Iterator, Sequence

import numpy as np

from .base import Listed, SourceError, Source, SourceRecord, check_meta_fields

CLASS_COLORS = {
    "red": (200, 40, 40), "orange": (230, 130, 30), "yellow": (220, 210, 50), "lime": (140, 220, 60),
    "green": (40, 150, 60), "cyan": (50, 200, 210), "blue": (40, 70, 200), "purple": (110, 50, 170),
    "magenta": (210, 50, 180), "brown": (120, 80, 40),
}
CLASS_NAMES = tuple(sorted(CLASS_COLORS))
IMAGES_PER_UNIT = 256
_MAX_SIDE = 2000
_QUALITIES = (75, 85, 95)
_TEXTURE_SIDE = 256  # pixels of each pre-encoded texture (a multiple of 16)

# (width : height, probability); the rest of the mass is jittered (12%) and extreme (3%) ratios.
_ASPECTS = ((4 / 3, 0.38), (3 / 4, 0.12), (1.0, 0.10), (3 / 2, 0.10), (2 / 3, 0.05), (16 / 9, 0.08), (9 / 16, 0.02))


@dataclasses.dataclass(frozen=True)
class _Plan:
    height: int
    width: int
    label: int
    fmt: str  # "jpeg", "jpeg-gray", "jpeg-cmyk", "png", "png-alpha"
    quality: int


def _plan(seed: int, index: int) -> _Plan:
    """Size, class and format of image `index`: a pure function, computed without drawing pixels."""
    rng = np.random.default_rng([seed, index, 0])
    u = rng.random()
    if u < 0.50:
        long_side = 500
    elif u < 0.85:
        long_side = int(rng.integers(200, 801))
    elif u < 0.95:
        long_side = int(rng.integers(801, 1201))
    elif u < 0.98:
        long_side = int(rng.integers(1201, _MAX_SIDE + 1))
    else:
        long_side = int(rng.integers(32, 200))
    u = rng.random()
    cumulative = np.cumsum([p for _, p in _ASPECTS])
    if u < cumulative[-1]:
        aspect = _ASPECTS[int(np.searchsorted(cumulative, u, side="right"))][0]
    elif u < cumulative[-1] + 0.12:
        aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.9))))
    else:
        aspect = float(rng.uniform(2.5, 5.0)) ** (1 if rng.random() < 0.7 else -1)
    if aspect >= 1:
        width, height = long_side, max(1, round(long_side / aspect))
    else:
        width, height = max(1, round(long_side * aspect)), long_side
    label = int(rng.integers(len(CLASS_NAMES)))
    u = rng.random()
    fmt = "png" if u < 0.005 else "png-alpha" if u < 0.01 else "jpeg-gray" if u < 0.03 else \
        "jpeg-cmyk" if u < 0.035 else "jpeg"
    return _Plan(height, width, label, fmt, int(_QUALITIES[int(rng.integers(len(_QUALITIES)))]))


@functools.lru_cache(maxsize=1)
def _noise_field() -> np.ndarray:
    """Uniform noise shared by all images (each takes a window at its own offset): drawing fresh noise
    per pixel would cost more than everything else together."""
    return np.random.default_rng(20230706).integers(0, 256, (_MAX_SIDE, _MAX_SIDE, 3), dtype=np.uint8)


def _draw(rng: np.random.Generator, h: int, w: int, label: int, photo: bool = True):
    """An RGB PIL image: a gradient in the class colour, a few flat shapes, and sensor-like noise; or,
    with photo=False, a drawing: the shapes on a flat background in the class colour."""
    from PIL import Image, ImageDraw

    base = np.array(CLASS_COLORS[CLASS_NAMES[label]], dtype=np.int16)
    corners = np.clip(base + rng.integers(-70, 71, (2, 2, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(corners, "RGB").resize((w, h), Image.Resampling.BILINEAR) if photo else \
        Image.new("RGB", (w, h), tuple(int(c) for c in corners[0, 0]))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 9))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.03, 0.3) * w, rng.uniform(0.03, 0.3) * h
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=color)
        elif kind == 1:
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)], fill=color)
    if not photo:
        return img
    mask = int(rng.choice([7, 15, 31]))  # noise amplitude
    field = _noise_field()
    oy, ox = int(rng.integers(0, field.shape[0] - h + 1)), int(rng.integers(0, field.shape[1] - w + 1))
    pixels = np.minimum(np.asarray(img), 255 - mask) + (field[oy:oy + h, ox:ox + w] & mask)
    return Image.fromarray(pixels, "RGB")


def _encode_directly(seed: int, index: int, plan: _Plan) -> bytes:
    """PNG and CMYK JPEG images: drawn and encoded whole (the slow path, 1.5% of images). PNGs are
    drawings (flat colours, as most PNGs in photo datasets): zlib on a noisy photo costs ~70 ms."""
    from PIL import Image

    h, w = plan.height, plan.width
    img = _draw(np.random.default_rng([seed, index, 1]), h, w, plan.label, photo=not plan.fmt.startswith("png"))
    buf = io.BytesIO()
    if plan.fmt == "png-alpha":
        img.putalpha(Image.linear_gradient("L").resize((w, h)))
    if plan.fmt.startswith("png"):
        img.save(buf, "PNG", compress_level=1)
    else:
        img.convert("CMYK").save(buf, "JPEG", quality=plan.quality)
    return buf.getvalue()


_RESTART = re.compile(rb"\xff[\xd0-\xd7]")


@dataclasses.dataclass(frozen=True)
class _Texture:
    """A JPEG encoded with a restart marker after every MCU, split into its parts."""

    header: bytes           # everything before the scan data; SOF height and width at `size_at`
    size_at: int
    mcu: int                # MCU side in pixels (16 for 4:2:0 colour, 8 for grayscale)
    side: int               # MCUs per row and per column
    blocks: list            # entropy-coded data of MCU (r, c) at r * side + c, without its restart marker


@functools.lru_cache(maxsize=64)
def _texture(seed: int, label: int, quality: int, gray: bool) -> _Texture:
    import cv2

    rng = np.random.default_rng([seed, label, quality, int(gray), 2])
    pixels = np.asarray(_draw(rng, _TEXTURE_SIDE, _TEXTURE_SIDE, label))
    pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if gray else np.ascontiguousarray(pixels[..., ::-1])
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_RST_INTERVAL, 1])
    data = encoded.tobytes()
    at, size_at = 2, None
    while data[at + 1] != 0xDA:  # walk the marker segments up to the start of scan
        if data[at + 1] == 0xC0:
            size_at = at + 5
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    scan = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")
    if not ok or size_at is None or not data.endswith(b"\xff\xd9"):
        raise RuntimeError("unexpected JPEG layout from OpenCV")
    blocks = _RESTART.split(data[scan:-2])
    mcu = 8 if gray else 16
    side = _TEXTURE_SIDE // mcu
    if len(blocks) != side * side:
        raise RuntimeError(f"expected {side * side} MCUs, found {len(blocks)}")
    return _Texture(data[:scan], size_at, mcu, side, blocks)


# Restart markers RST0..RST7 in the order they follow MCUs 0, 1, 2, ... (enough for a 2000x2000 image of
# 8x8 MCUs), the last one replaced by the end-of-image marker when an image is assembled.
_MARKER_CYCLE = [bytes([0xFF, 0xD0 + n % 8]) for n in range((-(-_MAX_SIDE // 8)) ** 2)]


def _assemble(seed: int, index: int, plan: _Plan) -> bytes:
    """A baseline JPEG of the planned size from pre-encoded MCUs (see the module docstring)."""
    rng = np.random.default_rng([seed, index, 1])
    gray = plan.fmt == "jpeg-gray"
    own = _texture(seed, 0 if gray else plan.label, plan.quality, gray)  # grey: one texture per quality
    rows, cols, side = -(-plan.height // own.mcu), -(-plan.width // own.mcu), own.side
    yy, xx = np.arange(rows)[:, None], np.arange(cols)[None, :]
    oy, ox = rng.integers(0, side, 2)
    block = ((yy + oy) % side) * side + (xx + ox) % side
    which = np.zeros((rows, cols), np.int64)  # 0: the image's own texture; k >= 1: shape k's texture
    textures = [own]
    for k in range(1, int(rng.integers(2, 5))):
        # a shape: an ellipse or a box of MCUs from another class's texture (grayscale: another part of its own)
        other = own if gray else _texture(seed, int((plan.label + rng.integers(1, len(CLASS_NAMES))) % len(CLASS_NAMES)),
                                          plan.quality, gray)
        textures.append(other)
        cy, cx = rng.uniform(0, rows), rng.uniform(0, cols)
        ry, rx = rng.uniform(0.1, 0.35) * rows + 0.5, rng.uniform(0.1, 0.35) * cols + 0.5
        inside = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) if rng.random() < 0.5 else \
            ((np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx))
        sy, sx = rng.integers(0, side, 2)
        which[inside] = k
        block[inside] = (((yy + sy) % side) * side + (xx + sx) % side)[inside]
    sources = [t.blocks for t in textures]
    n = rows * cols
    parts: list = [None] * (2 * n + 1)
    header = bytearray(own.header)
    header[own.size_at:own.size_at + 4] = plan.height.to_bytes(2, "big") + plan.width.to_bytes(2, "big")
    parts[0] = bytes(header)
    parts[1::2] = [sources[s][b] for s, b in zip(which.ravel().tolist(), block.ravel().tolist())]
    parts[2::2] = _MARKER_CYCLE[:n]  # MCU k is followed by RST(k mod 8) ...
    parts[-1] = b"\xff\xd9"  # ... but the last one by the end of the image
    return b"".join(parts)


def _render(seed: int, index: int, plan: _Plan) -> bytes:
    """Encoded bytes of image `index`."""
    return _assemble(seed, index, plan) if plan.fmt in ("jpeg", "jpeg-gray") else _encode_directly(seed, index, plan)


def synthetic_image(seed: int, index: int) -> tuple[bytes, int]:
    """(encoded bytes, label) of image `index` of `synthetic:N:SEED`."""
    plan = _plan(seed, index)
    return _render(seed, index, plan), plan.label


class SyntheticSource(Source):
    """Generated images; key `synthetic/000123`; units are index ranges "START-STOP"."""

    unique_keys = True
    META = ("class_name", "format")

    def __init__(self, spec: str, count: int, seed: int = 0, *, labels: str = "auto", meta_fields: tuple[str, ...] = ()):
        self.spec, self.count, self.seed = spec, count, seed
        self.with_labels = labels != "none"
        self.class_names = CLASS_NAMES if self.with_labels else None
        self.meta_fields = meta_fields
        self._width = max(6, len(str(count - 1)))

    @classmethod
    def from_spec(cls, spec: str, body: str, *, labels: str = "auto", meta_fields: Sequence[str] = ()) -> "SyntheticSource":
        parts = body.split(":")
        try:
            if not 1 <= len(parts) <= 2:
                raise ValueError
            count, seed = int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
        except ValueError:
            raise SourceError(spec, "expected synthetic:N[:SEED] with integers N >= 1 and SEED >= 0") from None
        if count < 1 or seed < 0:
            raise SourceError(spec, f"N must be >= 1 and SEED >= 0, got N={count}, SEED={seed}")
        return cls(spec, count, seed, labels=labels, meta_fields=check_meta_fields(spec, meta_fields, cls.META))

    def units(self) -> list[str]:
        return [f"{a}-{min(a + IMAGES_PER_UNIT, self.count)}" for a in range(0, self.count, IMAGES_PER_UNIT)]

    def key(self, index: int) -> str:
        return f"synthetic/{index:0{self._width}d}"

    def _range(self, unit: str) -> range:
        start, _, stop = unit.partition("-")
        return range(int(start), int(stop))

    def _read(self, unit: str) -> Iterator[SourceRecord]:
        for i in self._range(unit):
            plan = _plan(self.seed, i)
            yield SourceRecord(self.key(i), _render(self.seed, i, plan), plan.label if self.with_labels else None,
                               self._meta(plan))

    def _meta(self, plan: _Plan) -> dict:
        meta = {"class_name": CLASS_NAMES[plan.label], "format": plan.fmt.split("-")[0]}
        return {name: meta[name] for name in self.meta_fields}

    def scan(self, unit: str) -> Iterator[Listed]:
        """Each image by reference (its index), with its size: nothing is generated until it is filled."""
        for i in self._range(unit):
            plan = _plan(self.seed, i)
            yield Listed(self.key(i), plan.label if self.with_labels else None, self._meta(plan),
                         size=(plan.height, plan.width), ref=i)

    def fetch(self, ref: int) -> bytes:
        return _render(self.seed, ref, _plan(self.seed, ref))

    def sizes(self) -> Iterator[tuple[str, int, int]]:
        """(key, height, width) of every image without generating any (for size statistics)."""
        for i in range(self.count):
            plan = _plan(self.seed, i)
            yield self.key(i), plan.height, plan.width
