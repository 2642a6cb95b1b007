"""tf.train.Example wire-format parser, without TensorFlow or protobuf: serialized Examples -> numpy columns
of the Schema (the same arrays as tf.io.parse_example with schemas._tfrecord.feature_spec, then the
uint8 decode, the int32 cast and UTF-8 decoding that schemas.read applies).

The message structure (Example > Features > map<string, Feature> > BytesList | FloatList | Int64List) is
walked in Python, a few dozen steps per record that never touch the payloads; the payloads are decoded
for a whole batch at once with numpy: varints of every int field of every record in one vectorized pass,
packed floats with one frombuffer, each record's patches with one copy into the batch array.

Protobuf's rules are followed, not only the layout that schemas._tfrecord.encode_example writes: fields in
any order, unknown fields skipped, packed or unpacked repeated numbers, a map key given twice (the last
wins), a message given in several pieces (merged). What does not fit the schema raises RecordError: a
missing field, another list kind, a count other than the shape's, patches of another length, a varint
cut short or longer than 10 bytes, a length past the end, a string that is not UTF-8. (TensorFlow pads or
cuts a patches value of the wrong length; this parser refuses it.)
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from ._schema import RecordError, Schema

# Feature's oneof kinds (field numbers in feature.proto)
_BYTES, _FLOAT, _INT64 = 1, 2, 3
_KIND_NAMES = {_BYTES: "bytes_list", _FLOAT: "float_list", _INT64: "int64_list", None: "no value"}
_WANT_KIND = {"uint8": _BYTES, "string": _BYTES, "float32": _FLOAT, "int32": _INT64}


class _Bad(Exception):
    """Malformed wire format (turned into RecordError with the record's position)."""


class _BadAt(_Bad):
    """Payload `index` of a batch's concatenated varint lists is bad."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = buf[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos + 1
        shift += 7
        if shift >= 70:
            raise _Bad("varint longer than 10 bytes")


def _fields(buf: Any, pos: int, end: int) -> list[tuple[int, int, int]]:
    """The fields of the message at buf[pos:end] as (tag, start, stop): a length-delimited field's value, or
    the bytes of a varint / fixed32 / fixed64 one. One-byte tags and lengths (the common case) are read
    inline, longer varints through _varint."""
    out = []
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag >= 0x80:
            tag, pos = _varint(buf, pos - 1)
        wire, start = tag & 7, pos
        if tag >> 3 == 0:
            raise _Bad("field number 0")
        if wire == 2:
            n = buf[pos]
            pos += 1
            if n >= 0x80:
                n, pos = _varint(buf, pos - 1)
            start, pos = pos, pos + n
        elif wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
        else:
            raise _Bad(f"wire type {wire} (groups are not used by Example)")
        if pos > end:
            raise _Bad("a field runs past the end of its message")
        out.append((tag, start, pos))
    return out


# one Feature's list tags (field 1, 2, 3 with wire type 2) and the unpacked element tag of each kind
_LIST_TAGS = {0x0A: _BYTES, 0x12: _FLOAT, 0x1A: _INT64}
_UNPACKED = {_FLOAT: 0x0D, _INT64: 0x08}


def _feature(buf: Any, pieces: list[tuple[int, int]]) -> tuple[int | None, list[tuple[int, int]]]:
    """(kind, chunks) of one Feature given as message pieces (merged in order). For bytes_list the chunks
    are the values; for float_list and int64_list they are byte ranges whose concatenation is the packed
    payload (an unpacked element is its own range: a fixed32 or a varint)."""
    kind, chunks = None, []
    for start, stop in pieces:
        for tag, lstart, lstop in _fields(buf, start, stop):
            this = _LIST_TAGS.get(tag)
            if this is None:
                continue
            if this != kind:  # oneof: another kind replaces the value; the same kind merges
                kind, chunks = this, []
            unpacked = _UNPACKED.get(this)
            for t, s, e in _fields(buf, lstart, lstop):
                if t == 0x0A:  # a bytes value, or a packed run of numbers
                    if this == _BYTES or s != e:
                        chunks.append((s, e))
                elif t == unpacked:
                    chunks.append((s, e))
    return kind, chunks


def scan(buf: Any, start: int = 0, end: int | None = None) -> dict[bytes, tuple[int | None, list[tuple[int, int]]]]:
    """The features of one serialized Example at buf[start:end]: {name (bytes): (kind, chunks)}, the
    chunks as (start, stop) offsets into buf. Raises _Bad on malformed input."""
    end = len(buf) if end is None else end
    entries: dict[bytes, list[tuple[int, int]]] = {}
    try:
        for tag, fstart, fstop in _fields(buf, start, end):
            if tag != 0x0A:  # Example.features
                continue
            for t, estart, estop in _fields(buf, fstart, fstop):
                if t != 0x0A:  # Features.feature (map entry)
                    continue
                key, pieces = b"", []
                for kt, s, e in _fields(buf, estart, estop):
                    if kt == 0x0A:
                        key = bytes(buf[s:e])
                    elif kt == 0x12:
                        pieces.append((s, e))
                entries[key] = pieces  # a map key given twice: the last entry wins
        return {k: _feature(buf, v) for k, v in entries.items()}
    except IndexError:
        raise _Bad("the message ends inside a field") from None


def field_names(buf: Any) -> list[str]:
    """Feature names of one serialized Example (RecordError if malformed)."""
    try:
        return [k.decode("utf-8") for k in scan(buf)]
    except (_Bad, IndexError, UnicodeDecodeError) as e:
        raise RecordError(f"not a serialized Example: {e}") from None


def _decode_varints(data: np.ndarray, lengths: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Concatenated varint payloads (`lengths` bytes each) -> int64 values; each payload must hold
    `expected` varints. Returns the values in order, or raises _BadAt naming the first bad payload."""
    ends = data < 0x80
    bounds = np.concatenate(([0], np.cumsum(lengths)))
    nonempty = np.flatnonzero(lengths > 0)
    cut = nonempty[~ends[bounds[nonempty + 1] - 1]]
    if cut.size:
        raise _BadAt(int(cut[0]), "a varint cut short at the end of its list")
    counted = np.concatenate(([0], np.cumsum(ends)))
    counts = counted[bounds[1:]] - counted[bounds[:-1]]
    if not np.array_equal(counts, expected):
        bad = int(np.flatnonzero(counts != expected)[0])
        raise _BadAt(bad, f"{int(counts[bad])} values, expected {int(expected[bad])}")
    if ends.all():  # every value in [0, 127]: one byte each
        return data.astype(np.int64)
    last = np.flatnonzero(ends)
    first = np.empty_like(last)
    first[0] = 0
    first[1:] = last[:-1] + 1
    size = last - first + 1
    longest = int(size.max())
    if longest > 10:
        where = int(first[np.argmax(size > 10)])
        raise _BadAt(int(np.searchsorted(bounds, where, side="right")) - 1, "a varint longer than 10 bytes")
    values = (data[first] & 0x7F).astype(np.uint64)
    longer = np.flatnonzero(size > 1)  # most values take one byte: only the others get more work
    for k in range(1, longest):
        longer = longer[size[longer] > k]
        values[longer] |= (data[first[longer] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values.view(np.int64)


def _strings(buf: Any, chunks: list[tuple[int, int]]) -> list[str]:
    """The values of a bytes_list as str. When the list's bytes are ASCII (keys, most metadata) they are
    decoded once and sliced, byte offsets being character offsets; otherwise each value is decoded."""
    if not chunks:
        return []
    lo, hi = chunks[0][0], chunks[-1][1]  # chunks ascend: _feature walks the buffer forward
    whole = bytes(buf[lo:hi])
    if whole.isascii():
        text = whole.decode("ascii")
        return [text[s - lo:e - lo] for s, e in chunks]
    return [bytes(buf[s:e]).decode("utf-8") for s, e in chunks]


def columns(items: Sequence[tuple[Any, np.ndarray, dict]], schema: Schema, first: int = 0) -> dict[str, np.ndarray]:
    """Batch columns [B, *shape] (packer dtypes, strings as str object arrays) from scanned records:
    items are (buf, buf as a uint8 array, scan(buf, ...)). RecordError names the field and the record
    (numbered from `first`, the batch's position in its shard)."""
    n = len(items)
    out: dict[str, np.ndarray] = {}
    ints = []
    for f in schema.fields:
        key, want, shape = f.name.encode("utf-8"), _WANT_KIND[f.dtype], schema.shape(f)
        size = int(np.prod(shape, dtype=np.int64))
        chosen = []
        for i, (_, _, feats) in enumerate(items):
            feat = feats.get(key)
            if feat is None:
                raise RecordError(f"record {first + i}: field {f.name} is missing")
            kind, chunks = feat
            if kind != want:
                raise RecordError(f"record {first + i}: field {f.name} holds a {_KIND_NAMES[kind]}, expected "
                                  f"{_KIND_NAMES[want]}")
            chosen.append(chunks)
        if f.dtype == "int32":
            ints.append((f, shape, size, chosen))
        elif f.dtype == "uint8":
            arr = np.empty((n, size), np.uint8)
            for i, ((_, data, _), chunks) in enumerate(zip(items, chosen)):
                if len(chunks) != 1 or chunks[0][1] - chunks[0][0] != size:
                    got = f"{len(chunks)} values" if len(chunks) != 1 else f"{chunks[0][1] - chunks[0][0]} bytes"
                    raise RecordError(f"record {first + i}: field {f.name} holds {got}, expected one value of {size} bytes")
                s, e = chunks[0]
                arr[i] = data[s:e]
            out[f.name] = arr.reshape((n,) + shape)
        elif f.dtype == "float32":
            parts = []
            for i, ((_, data, _), chunks) in enumerate(zip(items, chosen)):
                got = sum(e - s for s, e in chunks)
                if got != 4 * size:
                    raise RecordError(f"record {first + i}: field {f.name} holds {got / 4:g} floats, expected {size}")
                parts += [data[s:e] for s, e in chunks]
            flat = np.concatenate(parts) if parts else np.empty(0, np.uint8)
            out[f.name] = flat.view("<f4").astype(np.float32).reshape((n,) + shape)
        else:
            arr = np.empty((n, size), object)
            for i, ((buf, _, _), chunks) in enumerate(zip(items, chosen)):
                if len(chunks) != size:
                    raise RecordError(f"record {first + i}: field {f.name} holds {len(chunks)} strings, expected {size}")
                try:
                    arr[i] = _strings(buf, chunks)
                except UnicodeDecodeError as e:
                    raise RecordError(f"record {first + i}: field {f.name} holds a string that is not UTF-8: {e}") from None
            out[f.name] = arr.reshape((n,) + shape)
    if ints:
        _int_columns(items, ints, out, first)
    return out


def _int_columns(items: Sequence[tuple[Any, np.ndarray, dict]], ints: list, out: dict, first: int) -> None:
    """Every int field of every record decoded in one vectorized pass, record-major."""
    n = len(items)
    parts, lengths = [], []
    for i, (_, data, _) in enumerate(items):
        for _, _, _, chosen in ints:
            total = 0
            for s, e in chosen[i]:
                parts.append(data[s:e])
                total += e - s
            lengths.append(total)
    sizes = np.array([size for _, _, size, _ in ints], np.int64)
    data = np.concatenate(parts) if parts else np.empty(0, np.uint8)
    try:
        values = _decode_varints(data, np.array(lengths, np.int64), np.tile(sizes, n))
    except _BadAt as e:
        record, field = divmod(e.index, len(ints))
        raise RecordError(f"record {first + record}: field {ints[field][0].name} holds {e}") from None
    values = values.astype(np.int32).reshape(n, int(sizes.sum()))  # as TensorFlow's int64 -> int32 cast: wraps
    offset = 0
    for f, shape, size, _ in ints:
        out[f.name] = np.ascontiguousarray(values[:, offset:offset + size]).reshape((n,) + shape)
        offset += size


def parse(buffers: Sequence[Any], schema: Schema, first: int = 0) -> dict[str, np.ndarray]:
    """Batch columns from serialized Examples (bytes, or any buffer); records numbered from `first` in errors."""
    items = []
    for i, b in enumerate(buffers):
        try:
            items.append((b, np.frombuffer(b, np.uint8), scan(b)))
        except _Bad as e:
            raise RecordError(f"record {first + i}: not a serialized Example: {e}") from None
    return columns(items, schema, first)


def records(cols: dict[str, np.ndarray], n: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(n):
        yield {k: v[i] for k, v in cols.items()}
