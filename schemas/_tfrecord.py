"""TFRecord codec: tf.train.Example encoder, the TFRecord framing (written and read), and the tf.data
feature spec / parser, all derived from the Schema.

uint8 fields are one raw bytes value (row-major); int32 fields are int64_list; float32 float_list;
strings bytes_list (UTF-8). Writing and reading need no TensorFlow: the Example wire format is written
here and parsed by schemas._example, the framing's CRCs are checked here (google-crc32c). Only the
tf.data path (feature_spec, parse_examples, for schemas.tf_dataset) imports tensorflow, lazily.
"""
from __future__ import annotations

import functools
import mmap
import os
import struct
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from . import _example
from ._schema import RecordError, Schema


def _varint_loop(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Every one- and two-byte varint (n < 2**14: sizes, labels, token counts, short lengths), so that the
# per-image fields of a record cost a table lookup per value.
_SHORT_VARINTS = [_varint_loop(n) for n in range(0x4000)]


_MASK64 = (1 << 64) - 1
_long_varint = functools.lru_cache(maxsize=4096)(_varint_loop)  # the longer ones met: -1 labels, the patches' lengths


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    return _SHORT_VARINTS[n] if n < 0x4000 else _long_varint(n)


def _varints(values: np.ndarray) -> bytes:
    """Concatenated varints of int values as protobuf writes int64 (negatives as 10-byte two's complement)."""
    flat = values.reshape(-1)
    if flat.size <= 64:  # a per-image field: a Python loop beats numpy's passes (negatives: their 64-bit form)
        small = flat.tolist()
        if not small or (min(small) >= 0 and max(small) < 0x80):  # a byte each
            return bytes(small)
        return b"".join([_varint(n & _MASK64) for n in small])
    if (flat.view(np.uint32).max() < 0x80 if flat.dtype == np.int32 else flat.min() >= 0 and flat.max() < 0x80):
        return flat.astype(np.uint8).tobytes()  # positions and segment ids: a byte each (one pass for int32)
    v = flat.astype(np.int64).view(np.uint64)
    groups = (v[:, None] >> (np.arange(10, dtype=np.uint64) * np.uint64(7))) & np.uint64(0x7F)
    nbytes = np.maximum(1, 10 - np.argmax((groups[:, ::-1] != 0), axis=1))
    nbytes[~(groups != 0).any(axis=1)] = 1
    cont = np.arange(10)[None, :] < (nbytes[:, None] - 1)
    out = (groups | (cont.astype(np.uint64) << np.uint64(7))).astype(np.uint8)
    return out[np.arange(10)[None, :] < nbytes[:, None]].tobytes()


_TAGS = {number: _varint(number << 3 | 2) for number in (1, 2, 3)}


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return b"".join((_TAGS[number], _varint(len(payload)), payload))


_EMPTY_STRING = _field(1, b"")  # the padding entries of a record's string fields


def _values(v: np.ndarray, dtype: str) -> list:
    """A feature's values as protobuf writes them: the raw bytes (uint8, one bytes_list value), packed
    varints (int32) or little-endian floats (float32), or one length-delimited field per string."""
    if dtype == "uint8":
        return [memoryview(np.ascontiguousarray(v)).cast("B")]  # joined once, by encode_example: no copy here
    if dtype == "int32":
        packed = _varints(v)
    elif dtype == "float32":
        packed = np.ascontiguousarray(v, dtype="<f4").tobytes()
    else:
        return [_field(1, s.encode("utf-8")) if s else _EMPTY_STRING for s in v.reshape(-1).tolist()]
    return [packed] if packed else []


@functools.lru_cache(maxsize=4096)
def _entry_header(name: bytes, dtype: str, n: int) -> bytes:
    """The bytes of a features-map entry (key `name`, a length-delimited field already) before its values'
    n bytes: a tf.train.Feature (bytes_list = 1, float_list = 2, int64_list = 3) around them. They depend
    on (name, dtype, n) alone, so each is built once."""
    if dtype == "string":  # the values are the list's fields themselves
        feature = _TAGS[1] + _varint(n)
    else:
        inner = _TAGS[1] + _varint(n) if n or dtype == "uint8" else b""  # bytes_list's value, or the packed field
        feature = _TAGS[{"uint8": 1, "int32": 3, "float32": 2}[dtype]] + _varint(len(inner) + n) + inner
    value = _TAGS[2] + _varint(len(feature) + n) + feature
    return _TAGS[1] + _varint(len(name) + len(value) + n) + name + value


@functools.lru_cache(maxsize=64)
def _sorted_fields(schema: Schema) -> tuple[tuple[str, str, bytes], ...]:
    """(name, dtype, key field) of each field in the order TF writes the map: sorted by key bytes."""
    return tuple((f.name, f.dtype, _field(1, f.name.encode("utf-8")))
                 for f in sorted(schema.fields, key=lambda f: f.name.encode("utf-8")))


def _example_parts(record: Mapping[str, np.ndarray], schema: Schema) -> tuple[list, int]:
    """The parts of a (validated) record's serialized tf.train.Example, in order, and their total size:
    its length prefix first, the patches as a view of the record's array (copied once, by the caller)."""
    parts: list = []
    total = 0
    for name, dtype, key in _sorted_fields(schema):
        values = _values(np.asarray(record[name]), dtype)
        n = sum(map(len, values))
        head = _entry_header(key, dtype, n)
        parts.append(head)
        parts += values
        total += len(head) + n
    prefix = _TAGS[1] + _varint(total)
    return [prefix, *parts], len(prefix) + total


def encode_example(record: Mapping[str, np.ndarray], schema: Schema) -> bytes:
    """Serialized tf.train.Example of one (validated) record, written as protobuf wire format by hand (no
    TensorFlow): byte-identical to TF's deterministic SerializeToString (map entries sorted by key). Built
    as a list of parts joined once, so the patches are copied once."""
    return b"".join(_example_parts(record, schema)[0])


def _parts_into(parts: list, out: np.ndarray) -> None:
    """Copy `parts` one after another into the start of uint8 array `out` (large enough)."""
    view, at = memoryview(out), 0
    for part in parts:
        n = len(part)
        view[at:at + n] = part
        at += n


def example_into(record: Mapping[str, np.ndarray], schema: Schema, out: np.ndarray) -> int:
    """encode_example's bytes written at the start of uint8 array `out` (a fill worker's encoded slot):
    their size, or -1 when they do not fit. No bytes object is built: the patches are copied once."""
    parts, size = _example_parts(record, schema)
    if size > out.size:
        return -1
    _parts_into(parts, out)
    return size


def frame_into(record: Mapping[str, np.ndarray], schema: Schema, out: np.ndarray) -> int:
    """tfrecord_frame(encode_example(record)) written at the start of uint8 array `out`: its size, or -1
    when it does not fit. The payload's CRC is taken in place."""
    parts, size = _example_parts(record, schema)
    if size + 16 > out.size:
        return -1
    length = struct.pack("<Q", size)
    _parts_into([length, _masked_crc(length), *parts], out)
    out[12 + size:16 + size] = np.frombuffer(_masked_crc(out[12:12 + size]), np.uint8)
    return size + 16


def _masked(data: Any) -> int:
    """TFRecord's masked CRC32C of `data` (bytes or a uint8 array) as an int."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    """TFRecord's masked CRC32C of `data`, little-endian."""
    return struct.pack("<I", _masked(data))


def tfrecord_frame(payload: bytes) -> bytes:
    """One TFRecord record: uint64 length, masked CRC32C of the length, payload, masked CRC32C of the payload
    (the framing tf.io.TFRecordWriter writes, uncompressed)."""
    length = struct.pack("<Q", len(payload))
    return length + _masked_crc(length) + payload + _masked_crc(payload)


def write_tfrecord(path: Any, payloads: Iterable[bytes]) -> int:
    """Write `payloads` as an uncompressed TFRecord file at `path` (or to binary file object `path`);
    returns the record count."""
    return write_frames(path, (tfrecord_frame(p) for p in payloads))



def write_frames(target: Any, frames: Iterable[Any]) -> int:
    """Write TFRecord records already framed (tfrecord_frame's bytes, or buffers) to `target`, a path or a
    binary file object; returns their count."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            return write_frames(f, frames)
    n = 0
    for frame in frames:
        target.write(frame)
        n += 1
    return n


def write_records(path: Any, batches: Iterable[list], schema: Schema) -> int:
    """Validated record batches -> a TFRecord shard of serialized Examples; returns the record count."""
    return write_tfrecord(path, (encode_example(r, schema) for batch in batches for r in batch))


class CorruptRecord(ValueError):
    """The TFRecord framing is broken: a CRC32C mismatch, or the file ends inside a record."""


def frames(path: str) -> Iterator[tuple[Any, np.ndarray, int, int]]:
    """The records of a TFRecord file as (buffer, the buffer as uint8, start, stop), without copying: the
    file is memory-mapped. The length's and the payload's masked CRC32C are checked before a record is
    given out; CorruptRecord names the first bad one. A file cut at a record boundary reads as a shorter
    one: callers compare the count with the manifest's."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mm, np.uint8)
    try:
        yield from _framed(mm, data, size)
    finally:
        del data
        try:
            mm.close()
        except BufferError:  # a caller still holds a view (an abandoned batch): the mapping goes with it
            pass


def _framed(mm: Any, data: np.ndarray, size: int) -> Iterator[tuple[Any, np.ndarray, int, int]]:
    pos = i = 0
    while pos < size:
        if size - pos < 12:
            raise CorruptRecord(f"record {i} at byte {pos}: the file ends inside its header (truncated)")
        (length,) = struct.unpack_from("<Q", mm, pos)
        (crc,) = struct.unpack_from("<I", mm, pos + 8)
        if _masked(data[pos:pos + 8]) != crc:
            raise CorruptRecord(f"record {i} at byte {pos}: the length fails its CRC32C")
        start = pos + 12
        stop = start + length
        if stop + 4 > size:
            raise CorruptRecord(f"record {i} at byte {pos}: the file ends inside it (truncated)")
        (crc,) = struct.unpack_from("<I", mm, stop)
        if _masked(data[start:stop]) != crc:
            raise CorruptRecord(f"record {i} at byte {pos}: the payload fails its CRC32C")
        yield mm, data, start, stop
        pos = stop + 4
        i += 1


def read_records(path: str, schema: Schema, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Records of a TFRecord shard as numpy dicts (schemas.read's dtypes), without TensorFlow: framing
    CRCs checked, Examples parsed by schemas._example `batch_size` at a time."""
    items: list = []
    n = 0
    for buf, data, start, stop in frames(path):
        try:
            items.append((buf, data, _example.scan(buf, start, stop)))
        except _example._Bad as e:
            raise RecordError(f"record {n}: not a serialized Example: {e}") from None
        n += 1
        if len(items) == batch_size:
            yield from _example.records(_example.columns(items, schema, n - len(items)), len(items))
            items = []
    if items:
        yield from _example.records(_example.columns(items, schema, n - len(items)), len(items))


def field_names(path: str) -> tuple[str, ...]:
    """Feature names of the shard's first record (empty for an empty shard)."""
    for buf, _, start, stop in frames(path):
        return tuple(_example.field_names(bytes(buf[start:stop])))
    return ()


def feature_spec(schema: Schema) -> dict[str, Any]:
    """The tf.io.parse_example spec: every field fixed-length, so parsed tensors have static shapes."""
    import tensorflow as tf

    dtypes = {"uint8": tf.string, "int32": tf.int64, "float32": tf.float32, "string": tf.string}
    return {f.name: tf.io.FixedLenFeature([] if f.dtype == "uint8" else list(schema.shape(f)), dtypes[f.dtype])
            for f in schema.fields}


def parse_examples(serialized: Any, schema: Schema) -> dict[str, Any]:
    """Parse a batch [B] (or a scalar) of serialized Examples into dense tensors of the schema's dtypes."""
    import tensorflow as tf

    batched = serialized.shape.rank == 1
    parse = tf.io.parse_example if batched else tf.io.parse_single_example
    raw = parse(serialized, feature_spec(schema))
    lead = [-1] if batched else []
    out = {}
    for f in schema.fields:
        t = raw[f.name]
        if f.dtype == "uint8":
            shape = list(schema.shape(f))
            t = tf.reshape(tf.io.decode_raw(t, tf.uint8, fixed_length=int(np.prod(shape))), lead + shape)
        elif f.dtype == "int32":
            t = tf.cast(t, tf.int32)
        out[f.name] = t
    return out


def decode_example(serialized: bytes, schema: Schema) -> dict[str, np.ndarray]:
    """One serialized Example (a TFRecord or ArrayRecord record) as a numpy record dict (the packer's dtypes;
    strings as str object arrays), through schemas._example: no TensorFlow, no protobuf. For per-record
    readers such as Grain over array_record's ArrayRecordDataSource. RecordError if it does not fit the schema."""
    try:
        cols = _example.parse([serialized], schema)
    except RecordError as e:
        raise RecordError(f"not a serialized Example of this schema: {str(e).removeprefix('record 0: ')}") from None
    return next(_example.records(cols, 1))
