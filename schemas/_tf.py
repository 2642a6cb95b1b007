"""tf.data reader: dense tensors with static shapes, shards interleaved in parallel. Imports TF lazily."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _array_record, _formats
from ._io import CorruptShard, _check_sha, iter_shard, read_manifest
from ._io import open_shard as _open_shard
from ._schema import Schema
from ._split import check_split, file_ranges


def tf_dataset(directory: str, *, cycle_length: int | None = None, shuffle_shards: bool = False, seed: int | None = None,
               deterministic: bool = True, check_sha256: bool | None = None, shard_index: int = 0,
               shard_count: int = 1) -> Any:
    """A tf.data.Dataset of record dicts: patches uint8 [L, D], int32/float32 fields, tf.string for
    image_keys and meta_*; every shape static, so batches feed tf.function / XLA (jit_compile) directly.

    Shards are read `cycle_length` at a time (default min(#shards, 8)) with parallel interleave.
    TFRecord CRCs and ArrayRecord chunk hashes are always checked by the reader, and every shard's record
    count against the manifest; check_sha256 also hashes each shard. Its default (None) is on for Arrow
    and Parquet, whose readers have no per-record checksum (a flipped byte would otherwise come back as
    wrong data), off for TFRecord and ArrayRecord. Arrow, Parquet and ArrayRecord shards are hashed and read
    from one open file (schemas._io.open_shard) when the dataset reaches them; TFRecord shards (read by
    TensorFlow, by name) are hashed up front. A run never writes a name its manifest lists, so a shard
    replaced meanwhile is a missing file, never new data.

    shard_index / shard_count: this reader's contiguous share of the records, as schemas.read splits them
    (schemas._split); files holding none of it are left out, and a file left before its end has its
    count checked only by its sha256.
    """
    import tensorflow as tf

    shard_index, shard_count = check_split(shard_index, shard_count)
    manifest = read_manifest(directory)
    schema = Schema.from_manifest(manifest)
    fmt = manifest["format"]
    if check_sha256 is None:
        check_sha256 = not _formats.get(fmt).checks_records
    shards = manifest["shards"]
    by_name = {s["file"]: s for s in shards}
    ranges = file_ranges([int(s["num_sequences"]) for s in shards], shard_index, shard_count)
    up_front = check_sha256 and fmt == "tfrecord"
    paths = [_check_sha(directory, shards[i]) if up_front else os.path.join(directory, shards[i]["file"])
             for i, _, _ in ranges]
    counts = [int(shards[i]["num_sequences"]) for i, _, _ in ranges]
    # (path, records in the file, first and end record of this reader's share of it)
    files = tf.data.Dataset.from_tensor_slices(tuple(tf.constant(c, t, shape=[len(ranges)]) for c, t in (
        (paths, tf.string), (counts, tf.int64), ([r[1] for r in ranges], tf.int64), ([r[2] for r in ranges], tf.int64))))

    def opened(path: Any):
        """The shard at `path` opened once (hashed on that open file when check_sha256)."""
        path = path.decode() if isinstance(path, bytes) else path
        return _open_shard(directory, by_name[os.path.basename(path)], bool(check_sha256))
    if shuffle_shards:
        files = files.shuffle(max(len(paths), 1), seed=seed, reshuffle_each_iteration=True)
    cycle = cycle_length or max(1, min(len(paths), 8))

    from ._tfrecord import parse_examples

    if fmt == "tfrecord":
        ds = files.interleave(_share_of_tfrecords, cycle_length=cycle, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=deterministic)
        return ds.batch(64).map(lambda s: parse_examples(s, schema), num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=deterministic).unbatch()

    if fmt == "array_record":
        def serialized(path, expected, first, end):
            n = 0
            with opened(path) as shard:
                try:
                    for batch in _array_record.serialized_batches(shard.path, 64):
                        share = batch[max(first - n, 0):max(end - n, 0)]
                        n += len(batch)
                        if share:
                            yield np.array(share, dtype=object)
                        if n >= end and end < expected:
                            return
                except Exception as e:  # noqa: BLE001 - any reader error means a bad shard
                    raise CorruptShard(shard.name, f"{type(e).__name__}: {e}") from e
                if n != expected:
                    raise CorruptShard(shard.name, f"holds {n} records, the manifest says {expected}")

        def open_array_record(path, expected, first, end):
            return tf.data.Dataset.from_generator(serialized, output_signature=tf.TensorSpec([None], tf.string),
                                                  args=(path, expected, first, end))

        ds = files.interleave(open_array_record, cycle_length=cycle, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=deterministic)
        return ds.map(lambda s: parse_examples(s, schema), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=deterministic).unbatch()

    dtypes = {"uint8": tf.uint8, "int32": tf.int32, "float32": tf.float32, "string": tf.string}
    signature = {f.name: tf.TensorSpec(schema.shape(f), dtypes[f.dtype]) for f in schema.fields}

    def generate(path, expected, first, end):
        n = 0
        with opened(path) as shard:
            for r in iter_shard(shard.path, fmt, schema, name=shard.name):
                if n >= first:
                    yield {k: _encode(v) for k, v in r.items()}
                n += 1
                if n == end < expected:
                    return
            if n != expected:
                raise CorruptShard(shard.name, f"holds {n} records, the manifest says {expected}")

    def open_shard(path, expected, first, end):
        return tf.data.Dataset.from_generator(generate, output_signature=signature, args=(path, expected, first, end))

    return files.interleave(open_shard, cycle_length=cycle, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=deterministic)


def _share_of_tfrecords(path: Any, expected: Any, first: Any, end: Any) -> Any:
    """Records [first, end) of the shard, counted as _counted_tfrecords does when read to its end."""
    import tensorflow as tf

    # take(n) would stop before the end-of-file count check: a share that ends with the file takes all (-1)
    count = tf.where(tf.equal(end, expected), tf.constant(-1, tf.int64), end - first)
    return _counted_tfrecords(path, expected).skip(first).take(count)


def _counted_tfrecords(path: Any, expected: Any) -> Any:
    """The shard's serialized records, failing at its end unless it held `expected` of them (TF's reader
    checks CRCs but takes a shard cut at a record boundary for a shorter one)."""
    import tensorflow as tf

    records = tf.data.TFRecordDataset(path, buffer_size=1 << 22).map(lambda s: (s, False))
    end = tf.data.Dataset.from_tensors((tf.constant(b""), True))

    def step(n, elem):
        ok = tf.logical_or(tf.logical_not(elem[1]), tf.equal(n, expected))
        check = tf.debugging.Assert(ok, ["corrupt shard", path, "holds", n, "records, the manifest says", expected])
        with tf.control_dependencies([check]):
            return n + 1, (tf.identity(elem[0]), elem[1])

    counted = records.concatenate(end).scan(tf.constant(0, tf.int64), step)
    return counted.filter(lambda s, last: tf.logical_not(last)).map(lambda s, last: s)


def _encode(v: Any) -> Any:
    """str object arrays -> UTF-8 bytes object arrays (tf.string); other arrays unchanged."""
    if v.dtype == object:
        return np.array([s.encode("utf-8") for s in v.reshape(-1)], dtype=object).reshape(v.shape)
    return v
