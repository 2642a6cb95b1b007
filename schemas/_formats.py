"""The output formats, one registry (internal): each format is a `Format` naming its file extension, its
writer, its reader, the sniffer of the field names stored in a shard, whether its reader checks every
record it decodes, and its random access by record index where it has one. schemas._io, _tf and
_verify look formats up here instead of testing names; a new format is one entry.

Every writer takes (path, or a binary file object where `streams`, batches of validated records, schema) and returns the record count; every
reader takes (path, schema, full_validation) and yields numpy record dicts, raising any exception on a
bad shard (schemas._io.iter_shard turns it into CorruptShard). The format modules import their heavy
library (pyarrow, array_record) inside these functions, so the registry itself costs nothing to import.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from . import _array_record, _arrow, _tfrecord
from ._schema import Schema, SchemaError

BATCH = 64  # records per Arrow batch / Parquet row group / Example parse batch


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    extension: str
    write: Callable[[str, Iterable[list], Schema], int]
    read: Callable[[str, Schema, bool], Iterator[dict]]
    field_names: Callable[[str], Sequence[str]]
    table: Callable[[str, Schema], Any]  # the shard as a pyarrow Table in the Arrow schema (hf_dataset)
    checks_records: bool  # its reader verifies a checksum of every record it decodes (TFRecord CRCs, Riegeli hashes)
    random_access: Optional[Callable[[Sequence[str], Schema], Any]] = None  # (paths, schema) -> len() / [i] / close()
    # Formats stored record by record: a validated record's bytes in the file (`encode`, which fill workers
    # run: RecordEncoder), the same bytes written into a uint8 array (`encode_into`: their size, -1 when they
    # do not fit), and the writer of such bytes in order (`write_encoded`, path -> record count).
    encode: Optional[Callable[[Mapping[str, Any], Schema], bytes]] = None
    encode_into: Optional[Callable[[Mapping[str, Any], Schema, np.ndarray], int]] = None
    write_encoded: Optional[Callable[[str, Iterable[Any]], int]] = None
    streams: bool = False  # its writer also takes a binary file object instead of a path (hashed while written)


REGISTRY: dict[str, Format] = {f.name: f for f in (
    Format("tfrecord", "tfrecord", _tfrecord.write_records,
           lambda path, schema, full: _tfrecord.read_records(path, schema, BATCH),
           _tfrecord.field_names,
           lambda path, schema: _arrow.records_table(_tfrecord.read_records(path, schema, BATCH), schema, BATCH),
           checks_records=True, streams=True,
           encode=lambda record, schema: _tfrecord.tfrecord_frame(_tfrecord.encode_example(record, schema)),
           encode_into=_tfrecord.frame_into, write_encoded=_tfrecord.write_frames),
    Format("arrow", "arrow", _arrow.write_ipc, _arrow.read_ipc, _arrow.ipc_field_names, _arrow.ipc_table,
           checks_records=False, random_access=_arrow.IpcRandomAccess, streams=True),
    Format("parquet", "parquet",
           lambda path, batches, schema: _arrow.write_parquet(path, batches, schema, BATCH),
           lambda path, schema, full: _arrow.read_parquet(path, schema, full, BATCH),
           _arrow.parquet_field_names, _arrow.parquet_table, checks_records=False, streams=True),
    Format("array_record", "array_record", _array_record.write_records,
           lambda path, schema, full: _array_record.read_records(path, schema, BATCH),
           _array_record.field_names,
           lambda path, schema: _arrow.records_table(_array_record.read_records(path, schema, BATCH), schema, BATCH),
           checks_records=True, random_access=_array_record.RandomAccess,
           encode=_tfrecord.encode_example, encode_into=_tfrecord.example_into, write_encoded=lambda path, data: _array_record.write(path, map(bytes, data))),
)}

FORMATS = {name: f.extension for name, f in REGISTRY.items()}  # format name -> file extension (public: schemas.FORMATS)


def get(name: str) -> Format:
    """The registered format `name`; SchemaError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise SchemaError(f"unknown format {name!r}; expected one of {', '.join(REGISTRY)}") from None


@dataclasses.dataclass(frozen=True)
class RecordEncoder:
    """A record -> its bytes in a `fmt` shard, validated against `schema` (packer's Encoder protocol): fill
    workers run it, so the writing process only appends bytes. Picklable."""

    fmt: str
    schema: Schema

    @property
    def meta_fields(self) -> tuple[str, ...]:
        return self.schema.meta_fields

    @property
    def row_bytes(self) -> int:
        """Room for one encoded record: the patches, every other number at its longest varint, and 256
        bytes a string; a record with longer keys or meta text is encoded by the writer instead."""
        s = self.schema
        numbers = sum(int(np.prod(s.shape(f))) for f in s.fields if f.dtype != "string" and f.name != "patches")
        strings = sum(int(np.prod(s.shape(f))) for f in s.fields if f.dtype == "string")
        return s.seq_len * s.token_dim + 10 * numbers + 256 * strings + 64 * len(s.fields) + 64

    def __call__(self, record: Mapping[str, Any]) -> bytes:
        self.schema.validate(record)
        return get(self.fmt).encode(record, self.schema)

    def into(self, record: Mapping[str, Any], out: np.ndarray) -> int:
        """The record's bytes written at the start of uint8 array `out` (a worker's encoded slot), built
        nowhere else: their size, or -1 when they do not fit."""
        self.schema.validate(record)
        return get(self.fmt).encode_into(record, self.schema, out)


def record_encoder(fmt: str, config: Any, meta_fields: Sequence[str] = ()) -> Optional[RecordEncoder]:
    """The RecordEncoder of `fmt` shards for `config` (a PackConfig or its to_json()), or None where the
    format is written a batch at a time (Arrow, Parquet): what a fill pool's workers run (packer.fill_pool's
    encoder), so that the writer only appends bytes."""
    if get(fmt).encode is None:
        return None
    return RecordEncoder(fmt, Schema.from_config(config.to_json() if hasattr(config, "to_json") else dict(config),
                                                 tuple(meta_fields)))
