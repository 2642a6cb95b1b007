"""TFRecord codec: tf.train.Example encoder and the feature spec / parser, both derived from the Schema.

uint8 fields are one raw bytes value (row-major); int32 fields are int64_list; float32 float_list;
strings bytes_list (UTF-8). Imports tensorflow lazily: only the TFRecord paths pay for it.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ._schema import RecordError, Schema


def encode_example(record: Mapping[str, np.ndarray], schema: Schema) -> bytes:
    """Serialized tf.train.Example of one (validated) record."""
    import tensorflow as tf

    feature = {}
    for f in schema.fields:
        v = np.asarray(record[f.name])
        if f.dtype == "uint8":
            feat = tf.train.Feature(bytes_list=tf.train.BytesList(value=[np.ascontiguousarray(v).tobytes()]))
        elif f.dtype == "int32":
            feat = tf.train.Feature(int64_list=tf.train.Int64List(value=v.reshape(-1).tolist()))
        elif f.dtype == "float32":
            feat = tf.train.Feature(float_list=tf.train.FloatList(value=v.reshape(-1).tolist()))
        else:
            feat = tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode("utf-8") for s in v.reshape(-1)]))
        feature[f.name] = feat
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


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
    strings as str object arrays), through the protobuf alone, no TF ops: for per-record readers such as
    Grain over array_record's ArrayRecordDataSource. RecordError if it does not fit the schema."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.example import example_pb2

    try:
        feats = example_pb2.Example.FromString(serialized).features.feature
        out = {}
        for f in schema.fields:
            if f.name not in feats:
                raise RecordError(f"field {f.name} is missing")
            feat, shape = feats[f.name], schema.shape(f)
            if f.dtype == "uint8":
                (raw,) = feat.bytes_list.value
                v = np.frombuffer(raw, np.uint8).reshape(shape).copy()
            elif f.dtype == "int32":
                v = np.array(feat.int64_list.value, np.int64).astype(np.int32).reshape(shape)
            elif f.dtype == "float32":
                v = np.array(feat.float_list.value, np.float32).reshape(shape)
            else:
                v = np.array([b.decode("utf-8") for b in feat.bytes_list.value], dtype=object).reshape(shape)
            out[f.name] = v
    except RecordError:
        raise
    except (DecodeError, ValueError) as e:
        raise RecordError(f"not a serialized Example of this schema: {e}") from e
    return out
