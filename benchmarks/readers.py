"""Readers without TensorFlow, and the Arrow type of `patches` for Hugging Face datasets.

1. Example reader: records/s of schemas.read on TFRecord and ArrayRecord shards (the TF-free parser,
   schemas._example, with the TFRecord CRC checks) against the TensorFlow path schemas.read used before
   (tf.data.TFRecordDataset or array_record batches -> tf.io.parse_example -> numpy records, strings
   decoded), on the same shards in the same run. sha256 checks off on both sides (they are the same code
   either way); the two take turns, best of --rounds.
2. Patches type: the shipped on-disk type fixed_size_list<fixed_size_binary(D)>[L] (A), retyped in memory
   as schemas.hf_dataset does, against storing fixed_size_list<fixed_size_list<uint8>[D]>[L] on disk (B,
   what a SCHEMA_VERSION bump would write), for Arrow IPC and Parquet, both written and read by the same
   code here (schemas' batch size and Parquet options): file size, write records/s, schemas.read-style
   numpy records/s, and rows/s through datasets' with_format("numpy", dtype=None) (whole dataset, batches
   of 32, building the Dataset from the shards included).

    python -m benchmarks.readers [--sequences 256] [--seq-len 256] [--patch-size 16] [--rounds 5] [--json PATH]
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np

import schemas
from benchmarks import record_args
from benchmarks.formats import make_records
from . import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "readers.json")
BATCH = 64


def tf_reference_read(directory: str) -> int:
    """The TensorFlow read path of schemas.read before the TF-free parser (same batching, same record dicts)."""
    import tensorflow as tf

    from schemas import _array_record
    from schemas._tfrecord import parse_examples

    m = schemas.read_manifest(directory)
    schema = schemas.Schema.from_manifest(m)
    n = 0
    for path in schemas.shard_paths(directory, m):
        if m["format"] == "tfrecord":
            batches = (s for s in tf.data.TFRecordDataset(path, buffer_size=1 << 22).batch(BATCH))
        else:
            batches = (tf.constant(b, tf.string, shape=[len(b)]) for b in _array_record.serialized_batches(path, BATCH))
        for serialized in batches:
            cols = {k: v.numpy() for k, v in parse_examples(serialized, schema).items()}
            for f in schema.fields:
                if f.dtype == "string":
                    cols[f.name] = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(cols[f.name])
            for i in range(len(serialized)):
                _ = {k: v[i] for k, v in cols.items()}
                n += 1
    return n


def tf_free_read(directory: str) -> int:
    return sum(1 for _ in schemas.read(directory, check_sha256=False))


def best_of(fns: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Seconds of each function, best of `rounds`, the functions taking turns within each round."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def example_reader(records: list, config: Any, root: str, rounds: int) -> list[dict]:
    import tensorflow as tf

    tf.constant(0)  # TensorFlow's import and start-up are not timed
    rows = []
    for fmt in ("tfrecord", "array_record"):
        d = os.path.join(root, fmt)
        schemas.write_dataset(d, records, config=config, fmt=fmt, num_shards=4, meta_fields=("caption",))
        assert tf_free_read(d) == tf_reference_read(d) == len(records)
        t = best_of({"tf": lambda: tf_reference_read(d), "new": lambda: tf_free_read(d)}, rounds)
        rows.append({"format": fmt, "tf_records_s": len(records) / t["tf"], "new_records_s": len(records) / t["new"],
                     "speedup": t["tf"] / t["new"]})
    return rows


def _write_shards(directory: str, fmt: str, records: list, config: Any, uint8_lists: bool) -> None:
    """4 shards written as schemas writes them (64-record batches / row groups, same Parquet options), with
    patches as shipped (A) or as fixed_size_list<fixed_size_list<uint8>[D]>[L] (B, uint8_lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas import _arrow

    schema = schemas.Schema.from_config(config, ("caption",))
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    bounds = np.linspace(0, len(records), 5).astype(int)
    for i in range(4):
        path = os.path.join(directory, f"packed-{i:05d}-of-00004.{fmt}")
        chunks = [records[j:min(j + BATCH, bounds[i + 1])] for j in range(bounds[i], bounds[i + 1], BATCH)]
        tables = [pa.Table.from_batches([_arrow.to_batch(c, schema)]) for c in chunks]
        if uint8_lists:
            tables = [_arrow.patches_as_uint8(t, schema) for t in tables]
        target = tables[0].schema
        if fmt == "arrow":
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, target) as w:
                for t in tables:
                    w.write_table(t)
        else:
            with pq.ParquetWriter(path, target, use_dictionary=False, write_page_checksum=True, compression="snappy") as w:
                for t in tables:
                    w.write_table(t, row_group_size=BATCH)


def _shard_batches(path: str, fmt: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "arrow":
        reader = pa.ipc.open_file(pa.memory_map(path))
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]
    return pq.ParquetFile(path, page_checksum_verification=True).iter_batches(batch_size=BATCH)


def _read_records(directory: str, fmt: str, schema: Any) -> int:
    """schemas.read-style numpy records (a dict per record, arrays copied out of Arrow) from either type."""
    import pyarrow as pa

    from schemas import _arrow

    n = 0
    for name in sorted(os.listdir(directory)):
        for batch in _shard_batches(os.path.join(directory, name), fmt):
            cols = {}
            for f in schema.fields:
                leaf = _arrow._leaf(batch.column(f.name))
                if pa.types.is_fixed_size_binary(leaf.type):  # A: the bytes of the binary values
                    d = leaf.type.byte_width
                    arr = np.frombuffer(leaf.buffers()[1], np.uint8, count=len(leaf) * d, offset=leaf.offset * d).copy()
                elif f.dtype == "string":
                    arr = np.array(leaf.to_pylist(), dtype=object)
                else:
                    arr = leaf.to_numpy(zero_copy_only=False).copy()
                cols[f.name] = arr.reshape((batch.num_rows,) + schema.shape(f))
            for i in range(batch.num_rows):
                _ = {k: v[i] for k, v in cols.items()}
                n += 1
    return n


def _hf_dataset(directory: str, fmt: str, schema: Any, retype: bool) -> Any:
    """What schemas.hf_dataset builds (tables, A retyped, one in-memory Dataset), without manifest checks."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    from schemas import _arrow

    tables = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if fmt == "arrow":
            table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        else:
            table = pq.ParquetFile(path, page_checksum_verification=True).read()
        tables.append(_arrow.patches_as_uint8(table, schema) if retype else table)
    return datasets.Dataset(InMemoryTable(pa.concat_tables(tables)), fingerprint=f"bench-{fmt}-{retype}")


def _hf_rows(ds: Any) -> int:
    ds = ds.with_format("numpy", dtype=None)
    n = 0
    for start in range(0, ds.num_rows, 32):
        batch = ds[start:start + 32]
        assert batch["patches"].dtype == np.uint8 and batch["patches"].ndim == 3
        n += len(batch["patches"])
    return n


def _size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.startswith("packed-"))


def patches_type(records: list, config: Any, root: str, rounds: int) -> list[dict]:
    schema = schemas.Schema.from_config(config, ("caption",))
    rows = []
    for fmt in ("arrow", "parquet"):
        a, b = os.path.join(root, f"a-{fmt}"), os.path.join(root, f"b-{fmt}")
        w = best_of({"a": lambda: _write_shards(a, fmt, records, config, False),
                     "b": lambda: _write_shards(b, fmt, records, config, True)}, rounds)
        assert _read_records(a, fmt, schema) == _read_records(b, fmt, schema) == len(records)
        r = best_of({"a": lambda: _read_records(a, fmt, schema), "b": lambda: _read_records(b, fmt, schema)}, rounds)
        h = best_of({"a": lambda: _hf_rows(_hf_dataset(a, fmt, schema, True)),
                     "b": lambda: _hf_rows(_hf_dataset(b, fmt, schema, False))}, rounds)
        n = len(records)
        rows.append({"format": fmt, "a_mb": _size(a) / 1e6, "b_mb": _size(b) / 1e6,
                     "a_write_records_s": n / w["a"], "b_write_records_s": n / w["b"],
                     "a_read_records_s": n / r["a"], "b_read_records_s": n / r["b"],
                     "a_hf_rows_s": n / h["a"], "b_hf_rows_s": n / h["b"]})
    return rows


def run(sequences: int = 256, seq_len: int = 256, patch_size: int = 16, rounds: int = 5) -> dict:
    config, records = make_records(sequences, seq_len, patch_size)
    root = tempfile.mkdtemp(prefix="navit-readers-")
    try:
        return {"sequences": sequences, "seq_len": seq_len, "patch_size": patch_size, "rounds": rounds,
                "example_reader": example_reader(records, config, root, rounds),
                "patches_type": patches_type(records, config, root, rounds)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(result: dict) -> str:
    lines = [f"{result['sequences']} sequences, L={result['seq_len']}, P={result['patch_size']}, 4 shards, best of "
             f"{result['rounds']} rounds taken in turns", "",
             "Example reader (schemas.read, sha256 off) | TensorFlow parse records/s | TF-free parser records/s | speed-up",
             "|---|---|---|---|"]
    lines[2] = "| " + lines[2] + " |"
    for r in result["example_reader"]:
        lines.append(f"| {r['format']} | {r['tf_records_s']:.0f} | {r['new_records_s']:.0f} | {r['speedup']:.2f}x |")
    lines += ["", "| patches type: A = fixed_size_binary(D) on disk, retyped by hf_dataset; B = uint8 lists on disk "
              "| file MB A / B | write records/s A / B | numpy read records/s A / B | hf numpy rows/s A / B |",
              "|---|---|---|---|---|"]
    for r in result["patches_type"]:
        lines.append(f"| {r['format']} | {r['a_mb']:.1f} / {r['b_mb']:.1f} ({r['b_mb'] / r['a_mb']:.2f}x) | "
                     f"{r['a_write_records_s']:.0f} / {r['b_write_records_s']:.0f} | "
                     f"{r['a_read_records_s']:.0f} / {r['b_read_records_s']:.0f} | "
                     f"{r['a_hf_rows_s']:.0f} / {r['b_hf_rows_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = record_args(__doc__.split("\n\n")[0], DEFAULT_JSON, "python -m benchmarks.readers")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    result = run(args.sequences, args.seq_len, args.patch_size, args.rounds)
    print(table(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
