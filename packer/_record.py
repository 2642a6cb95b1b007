"""The packed record, defined once: RECORD_FIELDS (name, dtype, axes, padding value, meaning), in record
order. Records (build_record), their zeroed arrays (empty_record), worker output slots (slot_layout),
the field order of every reader, and schemas.Schema all derive from this table.

Axes: "L" tokens (seq_len), "D" patch bytes (P*P*3), "E" image slots (max_images_per_seq).
Text fields (image_keys, meta_<name>) are str object arrays; numeric fields are numpy arrays.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ._config import PackConfig
from ._process import PatchedImage

META_PREFIX = "meta_"
_NUMPY = {"uint8": np.uint8, "int32": np.int32, "float32": np.float32, "string": object}


@dataclasses.dataclass(frozen=True)
class Field:
    """One record field; `image_attr` names the PatchedImage attribute a per-image field comes from."""

    name: str
    dtype: str  # uint8 | int32 | float32 | string
    dims: tuple[str, ...]
    pad: Any
    doc: str
    image_attr: Optional[str] = None

    @property
    def numpy_dtype(self) -> Any:
        return _NUMPY[self.dtype]

    def shape(self, seq_len: int, token_dim: int, max_images_per_seq: int) -> tuple[int, ...]:
        sizes = {"L": seq_len, "D": token_dim, "E": max_images_per_seq}
        return tuple(sizes[d] for d in self.dims)


RECORD_FIELDS: tuple[Field, ...] = (
    Field("patches", "uint8", ("L", "D"), 0, "RGB pixels of each token's patch, row-major (P, P, 3) flattened; 0 at padding"),
    Field("segment_ids", "int32", ("L",), 0, "image of each token: 1..num_images in packing order; 0 = padding"),
    Field("pos_y", "int32", ("L",), 0, "patch row of the token in its image's grid (in patches, not pixels); 0 at padding"),
    Field("pos_x", "int32", ("L",), 0, "patch column of the token in its image's grid; 0 at padding"),
    Field("num_images", "int32", (), 0, "number of images packed in this sequence (k)"),
    Field("image_keys", "string", ("E",), "", "image i's key (for a folder: path relative to it); '' in empty slots", "key"),
    Field("labels", "int32", ("E",), -1, "class label of image i; -1 for none and in empty slots", "label"),
    Field("grid_h", "int32", ("E",), 0, "patch rows of image i after resizing (before dropping); 0 in empty slots", "grid_h"),
    Field("grid_w", "int32", ("E",), 0, "patch columns of image i after resizing; 0 in empty slots", "grid_w"),
    Field("orig_h", "int32", ("E",), 0, "original pixel height of image i; 0 in empty slots", "orig_h"),
    Field("orig_w", "int32", ("E",), 0, "original pixel width of image i; 0 in empty slots", "orig_w"),
    Field("num_tokens", "int32", ("E",), 0, "tokens kept for image i (= count of segment_ids == i+1); 0 in empty slots",
          "num_tokens"),
    Field("drop_rates", "float32", ("E",), 0.0, "realized token drop rate of image i: 1 - num_tokens/(grid_h*grid_w)",
          "drop_rate"),
)
NUMERIC_FIELDS = tuple(f for f in RECORD_FIELDS if f.dtype != "string")
PER_IMAGE_NUMERIC = tuple(f for f in NUMERIC_FIELDS if f.dims == ("E",))


def meta_field(name: str) -> Field:
    """The record field of pass-through metadata `name` (text, one value per image slot)."""
    return Field(META_PREFIX + name, "string", ("E",), "",
                 f"pass-through metadata '{name}' of image i (JSON text if not a string); '' in empty slots")


def record_fields(meta_fields: Sequence[str] = ()) -> tuple[Field, ...]:
    """Every field of a record with these meta fields, in record order."""
    return RECORD_FIELDS + tuple(meta_field(n) for n in meta_fields)


def field_names(meta_fields: Sequence[str] = ()) -> list[str]:
    return [f.name for f in record_fields(meta_fields)]


def meta_text(value: Any) -> str:
    """Pass-through metadata is stored as text: strings as they are, anything else as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _shape(field: Field, config: PackConfig) -> tuple[int, ...]:
    return field.shape(config.seq_len, config.token_dim, config.max_images_per_seq)


def empty_record(config: PackConfig, batch: Optional[int] = None) -> dict[str, np.ndarray]:
    """Zeroed numeric record arrays (with a leading batch dimension when `batch` is given)."""
    lead = () if batch is None else (batch,)
    return {f.name: np.zeros(lead + _shape(f, config), f.numpy_dtype) for f in NUMERIC_FIELDS}


_ALIGN = 64


def slot_layout(config: PackConfig, rows: int) -> tuple[dict[str, tuple[int, tuple[int, ...], np.dtype]], int]:
    """{field: (byte offset, shape, dtype)} of the numeric fields of `rows` records laid out in one buffer
    (a worker output slot), and its size in bytes."""
    layout, offset = {}, 0
    for f in NUMERIC_FIELDS:
        shape, dtype = (rows,) + _shape(f, config), np.dtype(f.numpy_dtype)
        layout[f.name] = (offset, shape, dtype)
        offset += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
    return layout, offset


def slot_views(buffer, base: int, layout) -> dict[str, np.ndarray]:
    """The numeric arrays of a slot laid out by slot_layout at byte `base` of `buffer`."""
    return {name: np.ndarray(shape, dtype, buffer=buffer, offset=base + off) for name, (off, shape, dtype) in layout.items()}


def fill_per_image(out: Mapping[str, np.ndarray], images: Sequence[Any]) -> None:
    """Write the per-image numeric fields of `images` (PatchedImages) into `out`, padding the empty slots."""
    k = len(images)
    for f in PER_IMAGE_NUMERIC:
        arr = out[f.name]
        arr[:k] = [getattr(im, f.image_attr) for im in images]
        arr[k:] = f.pad


def text_fields(images: Sequence[Any], config: PackConfig, meta_fields: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The text fields (image_keys, meta_<name>) of a record holding `images` (anything with .key and .meta:
    PatchedImages or ImagePlans), padded to max_images_per_seq."""
    return {name: rows[0] for name, rows in text_rows([images], config, meta_fields).items()}


def text_rows(rows: Sequence[Sequence[Any]], config: PackConfig, meta_fields: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """text_fields of records holding each of `rows` (its images), stacked: (len(rows), max_images_per_seq)
    arrays, built at once (a batch's text fields)."""
    shape = (len(rows), config.max_images_per_seq)
    out = {name: np.full(shape, "", dtype=object) for name in ["image_keys"] + [META_PREFIX + m for m in meta_fields]}
    keys = out["image_keys"]
    for r, images in enumerate(rows):
        keys[r, :len(images)] = [im.key for im in images]
        for name in meta_fields:
            out[META_PREFIX + name][r, :len(images)] = [meta_text(im.meta.get(name)) for im in images]
    return out


def ordered(record: Mapping[str, Any], meta_fields: Sequence[str] = ()) -> dict[str, Any]:
    """`record` with its fields in record order."""
    return {name: record[name] for name in field_names(meta_fields)}


def build_record(images: list[PatchedImage], config: PackConfig, meta_fields: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """One packed sequence from `images` (which must fit, at least one), filled by vectorized copies (each
    token is copied once; only the padding is zeroed)."""
    meta_fields = tuple(meta_fields)
    L, E = config.seq_len, config.max_images_per_seq
    counts = [im.patches.shape[0] for im in images]
    total, k = sum(counts), len(images)
    if total > L or k > E or k == 0:
        raise ValueError(f"cannot pack {k} images with {total} tokens into L={L}, max_images_per_seq={E}")
    record = empty_record(config)
    np.concatenate([im.patches for im in images], out=record["patches"][:total])
    record["segment_ids"][:total] = np.repeat(np.arange(1, k + 1, dtype=np.int32), counts)
    np.concatenate([im.pos_y for im in images], out=record["pos_y"][:total])
    np.concatenate([im.pos_x for im in images], out=record["pos_x"][:total])
    record["num_images"] = np.int32(k)
    fill_per_image(record, images)
    record.update(text_fields(images, config, meta_fields))
    return ordered(record, meta_fields)


def unpack(record: Mapping[str, np.ndarray]) -> list[PatchedImage]:
    """The images of a packed record, exactly as they were packed (inverse of build_record)."""
    k = int(record["num_images"])
    seg = np.asarray(record["segment_ids"])
    meta_names = [n[len(META_PREFIX):] for n in record if n.startswith(META_PREFIX)]
    out = []
    for i in range(k):
        sel = seg == i + 1
        meta = {name: str(record[META_PREFIX + name][i]) for name in meta_names}
        out.append(PatchedImage(
            key=str(record["image_keys"][i]), patches=np.asarray(record["patches"])[sel],
            pos_y=np.asarray(record["pos_y"])[sel], pos_x=np.asarray(record["pos_x"])[sel],
            grid_h=int(record["grid_h"][i]), grid_w=int(record["grid_w"][i]),
            orig_h=int(record["orig_h"][i]), orig_w=int(record["orig_w"][i]),
            drop_rate=float(record["drop_rates"][i]), label=int(record["labels"][i]), meta=meta))
    return out
