"""Arrow codec, derived from the Schema: every field is a non-null fixed-size column, so Parquet stores
patches as FIXED_LEN_BYTE_ARRAY(D) (one value per token), never list<uint8>. Imports pyarrow lazily."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ._schema import SCHEMA_VERSION, Schema
from ._split import locate

SCHEMA_METADATA_KEY = b"navit_pack.schema"


def arrow_type(schema: Schema, dtype: str, shape: tuple[int, ...]) -> Any:
    """uint8 [L, D] -> fixed_size_list<fixed_size_binary(D)>[L]; int32/float32/string [N] -> fixed_size_list[N]."""
    import pyarrow as pa

    if dtype == "uint8":
        leaf, dims = pa.binary(shape[-1]), shape[:-1]
    else:
        leaf = {"int32": pa.int32(), "float32": pa.float32(), "string": pa.string()}[dtype]
        dims = shape
    t = leaf
    for n in reversed(dims):
        t = pa.list_(pa.field("item", t, nullable=False), n)
    return t


def arrow_schema(schema: Schema) -> Any:
    import pyarrow as pa

    meta = {SCHEMA_METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **schema.to_json()}).encode()}
    return pa.schema([pa.field(f.name, arrow_type(schema, f.dtype, schema.shape(f)), nullable=False)
                      for f in schema.fields], metadata=meta)


def to_batch(records: Sequence[Mapping[str, np.ndarray]], schema: Schema) -> Any:
    """A RecordBatch from (validated) records, built from contiguous buffers, no per-value Python."""
    import pyarrow as pa

    target = arrow_schema(schema)
    columns = []
    n = len(records)
    for f in schema.fields:
        shape = schema.shape(f)
        if f.dtype == "string":
            flat = pa.array([s for r in records for s in r[f.name].reshape(-1)], pa.string())
        else:
            stacked = np.ascontiguousarray(np.stack([np.asarray(r[f.name]) for r in records]))
            if f.dtype == "uint8":
                d = shape[-1]
                flat = pa.FixedSizeBinaryArray.from_buffers(pa.binary(d), stacked.size // d, [None, pa.py_buffer(stacked)])
                shape = shape[:-1]
            else:
                flat = pa.array(stacked.reshape(-1))
        col = flat
        for m in reversed(shape):
            col = pa.FixedSizeListArray.from_arrays(col, type=pa.list_(pa.field("item", col.type, nullable=False), m))
        columns.append(col)
        assert len(col) == n
    return pa.RecordBatch.from_arrays(columns, schema=target)


def _leaf(col: Any) -> Any:
    """Values of nested fixed-size lists, offsets applied."""
    import pyarrow as pa

    while pa.types.is_fixed_size_list(col.type):
        col = col.flatten()
    return col


def from_batch(batch: Any, schema: Schema) -> list[dict[str, np.ndarray]]:
    """Records (writable numpy arrays) from a RecordBatch or Table of the schema; RecordError-free by
    construction: the caller checks the batch's schema and nulls first (check_batch)."""
    import pyarrow as pa

    n = batch.num_rows
    cols = {}
    for f in schema.fields:
        col = batch.column(f.name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        shape = schema.shape(f)
        if f.dtype == "uint8":
            leaf = _leaf(col)
            d = shape[-1]
            arr = np.frombuffer(leaf.buffers()[1], np.uint8, count=len(leaf) * d, offset=leaf.offset * d).copy()
        elif f.dtype == "string":
            arr = np.array(_leaf(col).to_pylist(), dtype=object) if n else np.empty(0, object)
        else:
            arr = _leaf(col).to_numpy(zero_copy_only=False).copy()
        cols[f.name] = arr.reshape((n,) + shape)
    return [{name: arr[i] for name, arr in cols.items()} for i in range(n)]


def check_batch(batch: Any, schema: Schema) -> None:
    """Raise ValueError if a batch read back does not have exactly the schema's types, or holds nulls."""
    want = arrow_schema(schema)
    got = batch.schema
    if got.names != want.names or any(not g.type.equals(w.type) for g, w in zip(got, want)):
        raise ValueError(f"Arrow schema differs from the manifest's: {got.remove_metadata()} vs {want.remove_metadata()}")
    for name in got.names:
        col = batch.column(name)
        chunks = col.chunks if hasattr(col, "chunks") else [col]
        for c in chunks:
            while True:
                if c.null_count:
                    raise ValueError(f"column {name} holds nulls")
                if not hasattr(c, "flatten") or not hasattr(c.type, "list_size"):
                    break
                c = c.flatten()


def write_ipc(path: Any, batches: Iterable[list], schema: Schema) -> int:
    """Validated record batches -> an Arrow IPC file (one record batch each) at `path` (or into binary file
    object `path`); returns the record count."""
    import pyarrow as pa

    n = 0
    opened = pa.OSFile(path, "wb") if isinstance(path, (str, os.PathLike)) else pa.PythonFile(path, mode="w")
    with opened as sink, pa.ipc.new_file(sink, arrow_schema(schema)) as w:
        for batch in batches:
            w.write_batch(to_batch(batch, schema))
            n += len(batch)
    return n


def write_parquet(path: Any, batches: Iterable[list], schema: Schema, row_group_size: int) -> int:
    """Validated record batches -> a Parquet file (snappy, page checksums, no dictionary); returns the count."""
    import pyarrow.parquet as pq

    n = 0
    with pq.ParquetWriter(path, arrow_schema(schema), use_dictionary=False, write_page_checksum=True,
                          compression="snappy") as w:
        for batch in batches:
            w.write_batch(to_batch(batch, schema), row_group_size=row_group_size)
            n += len(batch)
    return n


def read_ipc(path: str, schema: Schema, full_validation: bool) -> Iterator[dict[str, np.ndarray]]:
    """Records of an Arrow IPC file (memory-mapped), each batch's types and nulls checked first."""
    import pyarrow as pa

    with pa.memory_map(path) as src:
        reader = pa.ipc.open_file(src)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            if full_validation:
                batch.validate(full=True)
            check_batch(batch, schema)
            yield from from_batch(batch, schema)


class IpcRandomAccess:
    """Records of Arrow IPC files by global index (record i of the files in the given order), as read_ipc
    decodes them: len(), [i], close() (or `with`). Each file is memory-mapped; each record batch is checked
    against the schema once and kept with its row offset as numpy views of the mapping (fixed-size
    fields) and its string columns, so a read copies one row out of the views: nothing else is copied,
    and concurrent reads share no mutable state."""

    def __init__(self, paths: Sequence[str], schema: Schema):
        import pyarrow as pa

        self.schema = schema
        self._batches, self._starts = [], [0]
        for p in paths:
            with pa.memory_map(str(p)) as src:  # the batches keep the mapping alive after close
                reader = pa.ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    check_batch(batch, schema)
                    self._batches.append(self._views(batch))
                    self._starts.append(self._starts[-1] + batch.num_rows)

    def _views(self, batch: Any) -> dict[str, Any]:
        """Field name -> numpy view [rows, ...shape] of the mapped buffer (strings: the Arrow column)."""
        n, out = batch.num_rows, {}
        for f in self.schema.fields:
            col, shape = batch.column(f.name), self.schema.shape(f)
            if f.dtype == "string":
                out[f.name] = col
                continue
            leaf = _leaf(col)
            if f.dtype == "uint8":
                d = shape[-1]
                view = np.frombuffer(leaf.buffers()[1], np.uint8, count=len(leaf) * d, offset=leaf.offset * d)
            else:
                view = leaf.to_numpy(zero_copy_only=True)
            out[f.name] = view.reshape((n,) + shape)
        return out

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        b, j = locate(index, self._starts)
        views = self._batches[b]
        out = {}
        for f in self.schema.fields:  # the same arrays (writable copies, dtypes, order) as from_batch gives
            if f.dtype == "string":
                out[f.name] = np.array(_leaf(views[f.name].slice(j, 1)).to_pylist(), dtype=object).reshape(
                    self.schema.shape(f))
            else:
                out[f.name] = views[f.name][j].copy()
        return out

    def close(self) -> None:
        self._batches, self._starts = [], [0]

    def __enter__(self) -> "IpcRandomAccess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_parquet(path: str, schema: Schema, full_validation: bool, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Records of a Parquet file, page checksums verified, each batch's types and nulls checked first."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, page_checksum_verification=True)
    for batch in pf.iter_batches(batch_size=batch_size):
        if full_validation:
            batch.validate(full=True)
        check_batch(batch, schema)
        yield from from_batch(batch, schema)


def ipc_field_names(path: str) -> tuple[str, ...]:
    import pyarrow as pa

    with pa.memory_map(path) as src:
        return tuple(pa.ipc.open_file(src).schema.names)


def parquet_field_names(path: str) -> tuple[str, ...]:
    import pyarrow.parquet as pq

    return tuple(pq.read_schema(path).names)


def _checked(table: Any, schema: Schema) -> Any:
    for batch in table.to_batches() or [table]:
        check_batch(batch, schema)
    return table


def ipc_table(path: str, schema: Schema) -> Any:
    """An Arrow IPC shard as a Table, memory-mapped (no copy: the table keeps the mapping alive)."""
    import pyarrow as pa

    with pa.memory_map(path) as src:
        return _checked(pa.ipc.open_file(src).read_all(), schema)


def parquet_table(path: str, schema: Schema) -> Any:
    """A Parquet shard decoded into a Table, page checksums verified."""
    import pyarrow.parquet as pq

    return _checked(pq.ParquetFile(path, page_checksum_verification=True).read(), schema)


def records_table(records: Iterable[Mapping[str, np.ndarray]], schema: Schema, batch_size: int) -> Any:
    """Records (as read from a shard of another format) as a Table in the Arrow schema."""
    import pyarrow as pa

    batches, chunk = [], []
    for r in records:
        chunk.append(r)
        if len(chunk) == batch_size:
            batches.append(to_batch(chunk, schema))
            chunk = []
    if chunk:
        batches.append(to_batch(chunk, schema))
    return pa.Table.from_batches(batches, schema=arrow_schema(schema))


def uint8_patches_type(schema: Schema) -> Any:
    """fixed_size_list<fixed_size_list<uint8>[D]>[L]: the patches type that numpy-minded readers (Hugging
    Face datasets' numpy and torch formats, polars arrays) convert to a uint8 [L, D] array."""
    import pyarrow as pa

    shape = schema.shape(schema.fields[0])
    t = pa.uint8()
    for n in reversed(shape):
        t = pa.list_(pa.field("item", t, nullable=False), n)
    return t


def patches_as_uint8(table: Any, schema: Schema) -> Any:
    """`table` with its patches column retyped from fixed_size_list<fixed_size_binary(D)>[L] to
    uint8_patches_type over the same buffers (no copy)."""
    import pyarrow as pa

    seq_len, d = schema.shape(schema.fields[0])
    target = uint8_patches_type(schema)
    chunks = []
    for chunk in table.column("patches").chunks:
        binary = chunk.flatten()  # fixed_size_binary(D), the chunk's offset applied
        leaf = pa.UInt8Array.from_buffers(pa.uint8(), len(binary) * d, [None, binary.buffers()[1]],
                                          offset=binary.offset * d)
        inner = pa.FixedSizeListArray.from_arrays(leaf, type=target.value_type)
        chunks.append(pa.FixedSizeListArray.from_arrays(inner, type=target))
    column = pa.chunked_array(chunks, type=target)
    index = table.schema.get_field_index("patches")
    return table.set_column(index, pa.field("patches", target, nullable=False), column)
