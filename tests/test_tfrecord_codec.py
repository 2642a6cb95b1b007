"""TFRecord writing without TensorFlow: the hand-written tf.train.Example wire format and the TFRecord framing
are byte-identical to TensorFlow's own (deterministic SerializeToString, tf.io.TFRecordWriter)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import conftest
from schemas._schema import Schema
from schemas._tfrecord import encode_example, write_tfrecord

tf = pytest.importorskip("tensorflow")


def tf_encode(record, schema):
    """The reference: TensorFlow's own Example built from the same record."""
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


def random_record(schema, rng):
    """conftest's, without NaN (compared against TensorFlow's parse)."""
    return conftest.random_record(schema, rng, specials=(np.inf, -0.0))


@pytest.mark.parametrize("seed", range(6))
def test_example_bytes_equal_tensorflow(seed):
    rng = np.random.default_rng(seed)
    schema = Schema(int(rng.integers(1, 300)), int(rng.integers(1, 50)), int(rng.integers(1, 9)), ("caption", "z"))
    rec = random_record(schema, rng)
    assert encode_example(rec, schema) == tf_encode(rec, schema)


def test_tfrecord_file_bytes_equal_tensorflow(tmp_path):
    rng = np.random.default_rng(7)
    payloads = [b"", b"x", rng.integers(0, 256, 70000, dtype=np.uint8).tobytes(), b"\x00" * 300]
    ours, theirs = tmp_path / "ours.tfrecord", tmp_path / "tf.tfrecord"
    assert write_tfrecord(str(ours), payloads) == len(payloads)
    with tf.io.TFRecordWriter(str(theirs)) as w:
        for p in payloads:
            w.write(p)
    assert ours.read_bytes() == theirs.read_bytes()
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours))] == payloads


def test_pack_to_tfrecord_imports_no_tensorflow(tmp_path):
    """A whole `pack` run (synthetic input, TFRecord output) never imports tensorflow."""
    out = tmp_path / "out"
    code = ("import sys; from pipelines import cli\n"
            "rc = cli.main(['pack', '--input', 'synthetic:12', '--output', sys.argv[1], '--seq-len', '64',"
            " '--patch-size', '8', '--workers', '1'])\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
            "sys.exit(rc or 0)\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "manifest.json").exists()
