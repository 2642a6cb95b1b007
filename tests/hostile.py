"""A hostile corpus, generated in the test: broken, extreme and tricky files mixed with good images.

`write_hostile_corpus(root)` returns {relative path: expected outcome}, outcome "packed" or "rejected".
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import encode, make_pixels


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header declares width x height pixels."""
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_hostile_corpus(root: Path, good: int = 12) -> dict[str, str]:
    rng = np.random.default_rng(0)
    files: dict[str, tuple[bytes, str]] = {}
    for i in range(good):
        files[f"good/img{i:02d}.jpg"] = (encode(make_pixels(90 + 11 * i, 140 - 5 * i, seed=i), "JPEG", quality=90), "packed")
    jpeg = encode(make_pixels(120, 160, seed=99), "JPEG", quality=90)
    png = encode(make_pixels(120, 160, seed=98), "PNG")
    for frac in (0.1, 0.5, 0.9):
        files[f"broken/truncated_{int(frac * 100)}.jpg"] = (jpeg[: int(len(jpeg) * frac)], "rejected")
        files[f"broken/truncated_{int(frac * 100)}.png"] = (png[: int(len(png) * frac)], "rejected")
    files["broken/random.jpg"] = (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "rejected")
    files["broken/random.png"] = (rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), "rejected")
    files["broken/empty.jpg"] = (b"", "rejected")
    files["broken/bomb.png"] = (png_bomb(), "rejected")
    files["extreme/one_pixel.png"] = (encode(np.full((1, 1, 3), 200, np.uint8), "PNG"), "packed")
    files["extreme/thin_1x10000.png"] = (encode(make_pixels(1, 10000), "PNG"), "packed")
    files["modes/cmyk.jpg"] = (encode(Image.new("CMYK", (64, 48), (0, 128, 255, 0)), "JPEG"), "packed")
    sixteen = Image.frombytes("I;16", (64, 64), (np.arange(4096, dtype="<u2") * 16).tobytes())
    files["modes/gray16.png"] = (encode(sixteen, "PNG"), "packed")
    pal = Image.fromarray(make_pixels(40, 40, seed=5)).convert("P")
    files["modes/palette_transparent.png"] = (encode(pal, "PNG", transparency=0), "packed")
    frames = [Image.fromarray(make_pixels(32, 32, seed=s)) for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    files["modes/animated.gif"] = (buf.getvalue(), "packed")
    exif = Image.Exif()
    exif[0x0112] = 6
    files["modes/rotated.jpg"] = (encode(make_pixels(60, 100), "JPEG", exif=exif.tobytes()), "packed")
    files["lies/png_named.jpg"] = (png, "packed")  # the content decides, not the extension
    files["lies/text_named.gif"] = (b"GIF89a but really just text", "rejected")
    for rel, (data, _) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {rel: outcome for rel, (_, outcome) in files.items()}
