"""tf.data reader: dense tensors with static shapes, shards interleaved in parallel. Imports TF lazily."""
from __future__ import annotations

import os
from typing import Any

from ._io import _check_sha, iter_shard, read_manifest
from ._schema import Schema


def tf_dataset(directory: str, *, cycle_length: int | None = None, shuffle_shards: bool = False, seed: int | None = None,
               deterministic: bool = True, check_sha256: bool = False) -> Any:
    """A tf.data.Dataset of record dicts: patches uint8 [L, D], int32/float32 fields, tf.string for
    image_keys and meta_*; every shape static, so batches feed tf.function / XLA (jit_compile) directly.

    Shards are read `cycle_length` at a time (default min(#shards, 8)) with parallel interleave.
    TFRecord CRCs are always checked by the reader; check_sha256 also hashes each shard once up front.
    """
    import tensorflow as tf

    manifest = read_manifest(directory)
    schema = Schema.from_manifest(manifest)
    fmt = manifest["format"]
    paths = [_check_sha(directory, s) if check_sha256 else os.path.join(directory, s["file"]) for s in manifest["shards"]]
    files = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string) if paths else tf.zeros([0], tf.string))
    if shuffle_shards:
        files = files.shuffle(max(len(paths), 1), seed=seed, reshuffle_each_iteration=True)
    cycle = cycle_length or max(1, min(len(paths), 8))

    if fmt == "tfrecord":
        from ._tfrecord import parse_examples

        def open_shard(path):
            return tf.data.TFRecordDataset(path, buffer_size=1 << 22)

        ds = files.interleave(open_shard, cycle_length=cycle, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=deterministic)
        return ds.batch(64).map(lambda s: parse_examples(s, schema), num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=deterministic).unbatch()

    dtypes = {"uint8": tf.uint8, "int32": tf.int32, "float32": tf.float32, "string": tf.string}
    signature = {f.name: tf.TensorSpec(schema.shape(f), dtypes[f.dtype]) for f in schema.fields}

    def generate(path):
        for r in iter_shard(path.decode() if isinstance(path, bytes) else path, fmt, schema):
            yield {k: _encode(v) for k, v in r.items()}

    def open_shard(path):
        return tf.data.Dataset.from_generator(generate, output_signature=signature, args=(path,))

    return files.interleave(open_shard, cycle_length=cycle, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=deterministic)


def _encode(v: Any) -> Any:
    """str object arrays -> UTF-8 bytes object arrays (tf.string); other arrays unchanged."""
    import numpy as np

    if v.dtype == object:
        return np.array([s.encode("utf-8") for s in v.reshape(-1)], dtype=object).reshape(v.shape)
    return v
