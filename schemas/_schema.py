"""The schema of a packed dataset: the record's fields (packer.RECORD_FIELDS, their one definition, plus the
dataset's meta fields) with shapes fixed by (L = seq_len, D = token_dim, E = max_images_per_seq). Every
format's encoder, parser and schema derives from it."""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Mapping

import numpy as np

import packer
from packer import META_PREFIX

SCHEMA_VERSION = 1


class SchemaError(Exception):
    """Base class of every error raised by `schemas`."""


class RecordError(SchemaError, ValueError):
    """A record does not match the schema (missing field, wrong dtype or shape)."""


_META_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SchemaError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Schema:
    """Shape parameters plus the named pass-through metadata fields (stored as `meta_<name>`, string [E])."""

    seq_len: int
    token_dim: int
    max_images_per_seq: int
    meta_fields: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "seq_len", _int("seq_len", self.seq_len))
        object.__setattr__(self, "token_dim", _int("token_dim", self.token_dim))
        object.__setattr__(self, "max_images_per_seq", _int("max_images_per_seq", self.max_images_per_seq))
        if isinstance(self.meta_fields, str):
            raise SchemaError(f"meta_fields must be a sequence of names, got the string {self.meta_fields!r}")
        names = tuple(self.meta_fields)
        for n in names:
            if not isinstance(n, str) or not _META_NAME.match(n):
                raise SchemaError(f"meta field name {n!r} must match [A-Za-z0-9_]+")
        if len(set(names)) != len(names):
            raise SchemaError(f"duplicate meta field names in {names}")
        object.__setattr__(self, "meta_fields", names)

    @classmethod
    def from_config(cls, config: Any, meta_fields: Iterable[str] = ()) -> "Schema":
        """From a PackConfig or its to_json() dict."""
        d = config.to_json() if hasattr(config, "to_json") else dict(config)
        p = d["patch_size"]
        e = d.get("max_images_per_seq") or max(1, d["seq_len"] // 16)
        return cls(d["seq_len"], p * p * 3, e, tuple(meta_fields))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "Schema":
        return cls(manifest["seq_len"], manifest["token_dim"], manifest["max_images"], tuple(manifest.get("meta_fields", ())))

    @property
    def fields(self) -> tuple:
        """Every record field (packer's field table entries), in record order."""
        return packer.record_fields(self.meta_fields)

    def shape(self, field) -> tuple[int, ...]:
        return field.shape(self.seq_len, self.token_dim, self.max_images_per_seq)

    def to_json(self) -> dict:
        return {"seq_len": self.seq_len, "token_dim": self.token_dim, "max_images": self.max_images_per_seq,
                "meta_fields": list(self.meta_fields),
                "fields": [{"name": f.name, "dtype": f.dtype, "shape": list(self.shape(f)), "doc": f.doc}
                           for f in self.fields]}

    def validate(self, record: Mapping[str, Any]) -> None:
        """Raise RecordError unless `record` has exactly the schema's fields with their dtypes and shapes."""
        checks, names = _checks(self)
        if len(record) != len(names) or not names.issuperset(record):
            missing, extra = names - set(record), set(record) - names
            raise RecordError(f"record fields differ from the schema: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, want, dtype in checks:
            arr = np.asarray(record[name])
            if arr.shape != want:
                raise RecordError(f"field {name}: shape {arr.shape}, expected {want}")
            if dtype is None:
                if arr.dtype != object or not all(isinstance(v, str) for v in arr.reshape(-1).tolist()):
                    raise RecordError(f"field {name}: expected an object array of str, got dtype {arr.dtype}")
            elif arr.dtype != dtype:
                raise RecordError(f"field {name}: dtype {arr.dtype}, expected {np.dtype(dtype).name}")


@functools.lru_cache(maxsize=64)
def _checks(schema: Schema) -> tuple[tuple[tuple[str, tuple[int, ...], Any], ...], frozenset[str]]:
    """validate's table, made once per schema: (name, shape, numpy dtype or None for strings) per field, and
    the field names (validating runs once per record in every fill worker)."""
    checks = tuple((f.name, schema.shape(f), None if f.dtype == "string" else np.dtype(f.numpy_dtype))
                   for f in schema.fields)
    return checks, frozenset(name for name, _, _ in checks)


def check_consistency(record: Mapping[str, np.ndarray], schema: Schema) -> None:
    """Cross-field invariants of a packed record (beyond dtypes and shapes); RecordError if broken."""
    k = int(record["num_images"])
    seg = np.asarray(record["segment_ids"])
    if not 0 <= k <= schema.max_images_per_seq:
        raise RecordError(f"num_images={k} outside [0, {schema.max_images_per_seq}]")
    counts = np.bincount(seg, minlength=k + 1) if seg.size and seg.min() >= 0 else None
    if counts is None or counts.size != k + 1:
        raise RecordError(f"segment_ids outside [0, num_images={k}]")
    if not np.array_equal(counts[1:], np.asarray(record["num_tokens"])[:k]) or np.any(np.asarray(record["num_tokens"])[k:]):
        raise RecordError("num_tokens disagrees with segment_ids")
    real = seg > 0
    if np.any(np.diff(seg[real]) < 0) or (real.any() and np.any(~real[: int(real.sum())])):
        raise RecordError("segment_ids are not contiguous runs followed by padding")
    gh = np.repeat(np.asarray(record["grid_h"])[:k], counts[1:])
    gw = np.repeat(np.asarray(record["grid_w"])[:k], counts[1:])
    py, px = np.asarray(record["pos_y"])[real], np.asarray(record["pos_x"])[real]
    if np.any(py < 0) or np.any(px < 0) or np.any(py >= gh) or np.any(px >= gw):
        raise RecordError("a token position lies outside its image's grid")
    if np.any(np.asarray(record["patches"])[~real]) or np.any(record["pos_y"][~real]) or np.any(record["pos_x"][~real]):
        raise RecordError("padding tokens are not zero")
