"""`synthetic:N[:SEED]`: N generated images, deterministic from SEED, shaped like ImageNet.

Sizes: the longer side is 500 for about half the images (as in ImageNet), otherwise mostly 200-800, with a
few small (<200) and large (up to 2000) ones; aspect ratios 4:3, 3:4, 1:1, 3:2, 2:3, 16:9, 9:16, some
jittered and a few extreme (2.5:1 to 5:1 either way). Content: a smooth gradient in the class colour, a
few flat shapes and sensor-like noise, so that JPEG sizes and decode costs are realistic. Formats: JPEG
(quality 75-95; 2% grayscale, 0.5% CMYK) and 3% PNG (half with alpha). Labels: 10 colour classes.
Images are made per unit, on demand, in about 3 ms each on average."""
from __future__ import annotations

import dataclasses
import functools
import io
from typing import Iterator, Sequence

import numpy as np

from .sources import SourceError, Source, SourceRecord, check_meta_fields

CLASS_COLORS = {
    "red": (200, 40, 40), "orange": (230, 130, 30), "yellow": (220, 210, 50), "lime": (140, 220, 60),
    "green": (40, 150, 60), "cyan": (50, 200, 210), "blue": (40, 70, 200), "purple": (110, 50, 170),
    "magenta": (210, 50, 180), "brown": (120, 80, 40),
}
CLASS_NAMES = tuple(sorted(CLASS_COLORS))
IMAGES_PER_UNIT = 256
_MAX_SIDE = 2000

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
    fmt = "png" if u < 0.015 else "png-alpha" if u < 0.03 else "jpeg-gray" if u < 0.05 else \
        "jpeg-cmyk" if u < 0.055 else "jpeg"
    return _Plan(height, width, label, fmt, int(rng.integers(75, 96)))


@functools.lru_cache(maxsize=1)
def _noise_field() -> np.ndarray:
    """Uniform noise shared by all images (each takes a window at its own offset): drawing fresh noise
    per pixel would cost more than everything else together."""
    return np.random.default_rng(20230706).integers(0, 256, (_MAX_SIDE, _MAX_SIDE, 3), dtype=np.uint8)


def _render(seed: int, index: int, plan: _Plan) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index, 1])
    h, w = plan.height, plan.width
    base = np.array(CLASS_COLORS[CLASS_NAMES[plan.label]], dtype=np.int16)
    corners = np.clip(base + rng.integers(-70, 71, (2, 2, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(corners, "RGB").resize((w, h), Image.Resampling.BILINEAR)
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
    mask = int(rng.choice([7, 15, 31]))  # noise amplitude
    field = _noise_field()
    oy, ox = int(rng.integers(0, field.shape[0] - h + 1)), int(rng.integers(0, field.shape[1] - w + 1))
    pixels = np.minimum(np.asarray(img), 255 - mask) + (field[oy:oy + h, ox:ox + w] & mask)
    img = Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    if plan.fmt == "png-alpha":
        alpha = Image.linear_gradient("L").resize((w, h))
        img.putalpha(alpha)
    if plan.fmt.startswith("png"):
        img.save(buf, "PNG", compress_level=1)
    else:
        mode = {"jpeg-gray": "L", "jpeg-cmyk": "CMYK"}.get(plan.fmt, "RGB")
        (img if mode == "RGB" else img.convert(mode)).save(buf, "JPEG", quality=plan.quality)
    return buf.getvalue()


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
        if labels == "folder":
            raise SourceError(spec, "labels='folder' applies to image folders only")
        return cls(spec, count, seed, labels=labels, meta_fields=check_meta_fields(spec, meta_fields, cls.META))

    def units(self) -> list[str]:
        return [f"{a}-{min(a + IMAGES_PER_UNIT, self.count)}" for a in range(0, self.count, IMAGES_PER_UNIT)]

    @property
    def num_records(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return f"synthetic/{index:0{self._width}d}"

    def _range(self, unit: str) -> range:
        start, _, stop = unit.partition("-")
        return range(int(start), int(stop))

    def _read(self, unit: str) -> Iterator[SourceRecord]:
        for i in self._range(unit):
            plan = _plan(self.seed, i)
            meta = {"class_name": CLASS_NAMES[plan.label], "format": plan.fmt.split("-")[0]}
            yield SourceRecord(self.key(i), _render(self.seed, i, plan), plan.label if self.with_labels else None,
                               {name: meta[name] for name in self.meta_fields})

    def sizes(self) -> Iterator[tuple[str, int, int]]:
        """(key, height, width) of every image without generating any (for size statistics)."""
        for i in range(self.count):
            plan = _plan(self.seed, i)
            yield self.key(i), plan.height, plan.width
