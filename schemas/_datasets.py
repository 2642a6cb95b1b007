"""`hf_dataset(dir)`: a packed dataset as a Hugging Face `datasets.Dataset` whose numpy / torch formats work.

On disk `patches` is `fixed_size_list<fixed_size_binary(D)>[L]` (Parquet stores one FIXED_LEN_BYTE_ARRAY(D)
per token), which `datasets`' numpy and torch formatters cannot convert (ArrowNotImplementedError). The
helper keeps the files as they are and retypes the column in memory to `fixed_size_list<fixed_size_list
<uint8>[D]>[L]` over the same buffer (no copy): `datasets` then sees `List(List(Value("uint8"), D), L)`.
(benchmarks/readers.py measures this against storing that type on disk: see docs/records.md.)

How each format is opened (its registry entry's `table`, schemas._formats): Arrow IPC shards are
memory-mapped (nothing is copied or cached; the table lives in the Dataset as an in-memory table over the
mapping, so pickling the Dataset, as a spawned DataLoader worker does, serializes its rows); Parquet
shards are decoded into memory (page checksums checked); TFRecord and ArrayRecord shards are parsed
(schemas._example) into memory. Each shard's sha256
(check_sha256) and record count are checked as schemas.read does. Imports pyarrow and datasets lazily.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from . import _arrow, _formats
from ._io import CorruptShard, open_shard, read_manifest
from ._schema import Schema

TENSOR_FORMATS = ("numpy", "np", "torch", "pt", "jax")
RETYPE_VERSION = 1  # part of the Dataset's fingerprint: bump if the in-memory types change


def hf_dataset(directory: str, *, format: Optional[str] = None, check_sha256: bool = True) -> Any:
    """Every record of a packed dataset (any format) as a `datasets.Dataset`, rows in schemas.read's order;
    `patches` typed List(List(uint8, D), L), the other fields with their schema dtypes (int32, float32,
    strings). `datasets`' numpy and torch formatters widen every integer column to int64 unless given
    `dtype=None`: `.with_format("numpy", dtype=None)` (or "torch") gives exactly schemas.read's dtypes
    (patches uint8 [L, D], ids int32). `format="numpy"` / `"torch"` / `"jax"` returns the Dataset with that
    format already set so, and any other `format` is passed to with_format as is."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    manifest = read_manifest(directory)
    schema = Schema.from_manifest(manifest)
    fmt = manifest["format"]
    tables = []
    for shard in manifest["shards"]:
        with open_shard(directory, shard, check_sha256) as opened:  # hashed and read from one open file
            try:
                table = _formats.get(fmt).table(opened.path, schema)
            except CorruptShard:
                raise
            except Exception as e:  # noqa: BLE001 - every library error on a shard means a bad shard
                raise CorruptShard(shard["file"], f"{type(e).__name__}: {e}") from e
        if table.num_rows != shard["num_sequences"]:
            raise CorruptShard(shard["file"], f"holds {table.num_rows} records, the manifest says {shard['num_sequences']}")
        tables.append(_arrow.patches_as_uint8(table, schema))
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = _arrow.patches_as_uint8(_arrow.arrow_schema(schema).empty_table(), schema)
    # The fingerprint (datasets' cache key) from the shards' sha256 in the manifest: datasets would
    # otherwise hash the whole table, reading every memory-mapped byte.
    key = json.dumps([RETYPE_VERSION, manifest["format"], [s["sha256"] for s in manifest["shards"]]])
    ds = datasets.Dataset(InMemoryTable(table), fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])
    if format is None:
        return ds
    return ds.with_format(format, dtype=None) if format in TENSOR_FORMATS else ds.with_format(format)
