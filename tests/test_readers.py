"""Reading without TensorFlow: schemas._example parses tf.train.Example bytes into the same arrays as
tf.io.parse_example; TFRecord framing CRCs are checked by schemas._tfrecord; schemas.read, verify,
decode_example and `navit-pack stats / inspect / verify` on TFRecord or ArrayRecord never import
TensorFlow. And the format registry (schemas._formats) that the readers and writers go through."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import packer
import schemas
from schemas import _example, _formats
from schemas._schema import RecordError, Schema
from schemas._tfrecord import _varint, encode_example
from conftest import random_record

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FORMATS = ["tfrecord", "array_record"]


def tf_parse(serialized: list[bytes], schema: Schema) -> dict[str, np.ndarray]:
    """The reference: today's TF path (tf.io.parse_example with the feature spec, uint8 decode, int32 cast),
    strings decoded to str as schemas.read returns them."""
    tf = pytest.importorskip("tensorflow")
    from schemas._tfrecord import parse_examples

    cols = {k: v.numpy() for k, v in parse_examples(tf.constant(serialized, tf.string), schema).items()}
    for f in schema.fields:
        if f.dtype == "string":
            cols[f.name] = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(cols[f.name])
    return cols


def assert_same_columns(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, (k, got[k].dtype, w.dtype, got[k].shape, w.shape)
        assert np.array_equal(got[k], w, equal_nan=w.dtype.kind == "f"), k


@pytest.mark.parametrize("seed", range(8))
def test_parser_equals_tensorflow_parse_example(seed):
    rng = np.random.default_rng(seed)
    schema = Schema(int(rng.integers(1, 300)), int(rng.integers(1, 50)), int(rng.integers(1, 9)), ("caption", "z"))
    serialized = [encode_example(random_record(schema, rng), schema) for _ in range(int(rng.integers(1, 70)))]
    assert_same_columns(_example.parse(serialized, schema), tf_parse(serialized, schema))


def test_parser_equals_tensorflow_on_tensorflows_own_examples():
    """Examples built and serialized by TensorFlow's protobuf (not by this package's encoder)."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(11)
    schema = Schema(40, 12, 3, ("caption",))
    serialized = []
    for _ in range(5):
        rec = random_record(schema, rng)
        feature = {}
        for f in schema.fields:
            v = np.asarray(rec[f.name])
            if f.dtype == "uint8":
                feature[f.name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.tobytes()]))
            elif f.dtype == "int32":
                feature[f.name] = tf.train.Feature(int64_list=tf.train.Int64List(value=v.reshape(-1).tolist()))
            elif f.dtype == "float32":
                feature[f.name] = tf.train.Feature(float_list=tf.train.FloatList(value=v.reshape(-1).tolist()))
            else:
                feature[f.name] = tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[s.encode() for s in v.reshape(-1)]))
        serialized.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    assert_same_columns(_example.parse(serialized, schema), tf_parse(serialized, schema))


# Hand-built wire format, for encodings the encoder never writes but protobuf allows.
def _ld(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _ints(values, packed: bool = True) -> bytes:
    if packed:
        return _ld(3, _ld(1, b"".join(_varint(v & (2 ** 64 - 1)) for v in values)))
    return _ld(3, b"".join(b"\x08" + _varint(v & (2 ** 64 - 1)) for v in values))


def _floats(values, packed: bool = True) -> bytes:
    if packed:
        return _ld(2, _ld(1, np.asarray(values, "<f4").tobytes()))
    return _ld(2, b"".join(b"\x0d" + struct.pack("<f", v) for v in values))


def _bytes(values) -> bytes:
    return _ld(1, b"".join(_ld(1, v) for v in values))


def _entry(key: str, feature: bytes) -> bytes:
    return _ld(1, _ld(1, key.encode()) + _ld(2, feature))


SMALL = Schema(3, 2, 2)
FEATURES = {"patches": _bytes([bytes(range(6))]), "segment_ids": _ints([1, 1, 0]), "pos_y": _ints([0, 0, 0], False),
            "pos_x": _ints([0, 1, 0]), "num_images": _ints([1]), "image_keys": _bytes([b"a", "é".encode()]),
            "labels": _ints([-1, -(2 ** 31)]), "grid_h": _ints([1, 0]), "grid_w": _ints([2, 0]),
            "orig_h": _ints([300, 2 ** 31 - 1]), "orig_w": _ints([2 ** 40 + 5, 0]), "num_tokens": _ints([2, 0]),
            "drop_rates": _floats([0.5, -0.0], False)}
ENTRIES = b"".join(_entry(k, v) for k, v in reversed(FEATURES.items()))
HALF = len(FEATURES) // 2
NON_CANONICAL = {
    "unordered keys, unpacked ints and floats": _ld(1, ENTRIES),
    "a key given twice (the last wins)": _ld(1, _entry("segment_ids", _ints([9, 9, 9])) + ENTRIES),
    "features in two messages (merged)": _ld(1, b"".join(_entry(k, v) for k, v in list(FEATURES.items())[:HALF]))
    + _ld(1, b"".join(_entry(k, v) for k, v in list(FEATURES.items())[HALF:])),
}


@pytest.mark.parametrize("name", sorted(NON_CANONICAL))
def test_parser_follows_protobuf_where_tensorflow_does(name):
    serialized = [NON_CANONICAL[name]]
    got = _example.parse(serialized, SMALL)
    assert_same_columns(got, tf_parse(serialized, SMALL))
    assert got["orig_w"].tolist() == [[5, 0]]  # int64 -> int32 wraps, as TensorFlow's cast does
    assert got["labels"].tolist() == [[-1, -(2 ** 31)]] and got["image_keys"].tolist() == [["a", "é"]]


def test_parser_follows_protobuf_where_tensorflows_fast_parser_does_not():
    """Unknown fields are skipped, a packed list given in two runs is concatenated, and a oneof given twice
    keeps the last kind (TensorFlow's fast parser refuses or misreads these; protobuf's rules decide)."""
    unknown = b"\x10\x05" + _ld(1, b"\x18\x07" + ENTRIES) + _ld(9, b"xyz")
    split = _ld(1, ENTRIES + _entry("pos_x", _ld(3, _ld(1, b"\x00") + _ld(1, b"\x01\x00"))))
    replaced = _ld(1, ENTRIES + _entry("num_images", _floats([1.0]) + _ints([1])))
    want = _example.parse([NON_CANONICAL["unordered keys, unpacked ints and floats"]], SMALL)
    for serialized in (unknown, split, replaced):
        assert_same_columns(_example.parse([serialized], SMALL), want)


@pytest.mark.parametrize("feature, value, message", [
    ("segment_ids", None, "segment_ids is missing"),
    ("segment_ids", _ints([1, 1]), "segment_ids holds 2 values, expected 3"),
    ("segment_ids", _floats([1, 1, 0]), "segment_ids holds a float_list, expected int64_list"),
    ("segment_ids", _ld(3, _ld(1, b"\x01\x01\x80")), "a varint cut short"),
    ("segment_ids", _ld(3, _ld(1, b"\x01\x01" + b"\xff" * 10 + b"\x01")), "a varint longer than 10 bytes"),
    ("patches", _bytes([bytes(5)]), "patches holds 5 bytes, expected one value of 6 bytes"),
    ("patches", _bytes([bytes(6), bytes(6)]), "patches holds 2 values"),
    ("drop_rates", _floats([0.5]), "drop_rates holds 1 floats, expected 2"),
    ("image_keys", _bytes([b"a"]), "image_keys holds 1 strings, expected 2"),
    ("image_keys", _bytes([b"\xff", b""]), "not UTF-8"),
    ("num_images", b"", "num_images holds a no value"),
])
def test_records_off_the_schema_raise_record_error(feature, value, message):
    features = dict(FEATURES)
    if value is None:
        del features[feature]
    else:
        features[feature] = value
    serialized = _ld(1, b"".join(_entry(k, v) for k, v in features.items()))
    good = _ld(1, ENTRIES)
    with pytest.raises(RecordError, match=f"record 1: field {feature}") as e:
        _example.parse([good, serialized, good], SMALL)
    assert message in str(e.value)


@pytest.mark.parametrize("bad", [b"\x0a", b"\x0a\x05\x0a\x03", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                                 b"\x0b\x00", b"\x00\x01", _ld(1, ENTRIES)[:-3]])
def test_malformed_bytes_raise_record_error(bad):
    with pytest.raises(RecordError):
        _example.parse([bad], SMALL)
    with pytest.raises(RecordError):
        schemas.decode_example(bad, SMALL)


def test_damaged_examples_never_decode_to_wrong_values():
    """Every flipped byte and every cut of a serialized Example: the parser raises RecordError or, when it
    succeeds and TensorFlow does too, returns what TensorFlow returns."""
    tf = pytest.importorskip("tensorflow")
    schema = Schema(6, 3, 2, ("c",))
    rng = np.random.default_rng(3)
    clean = encode_example(random_record(schema, rng), schema)
    variants = [clean[:i] for i in range(len(clean))]
    variants += [clean[:i] + bytes([clean[i] ^ m]) + clean[i + 1:] for i in range(len(clean)) for m in (0x01, 0x80)]
    agreed = 0
    for v in variants:
        try:
            ours = _example.parse([v], schema)
        except RecordError:
            continue
        try:
            theirs = tf_parse([v], schema)
        except (tf.errors.OpError, UnicodeDecodeError):
            continue
        assert_same_columns(ours, theirs)
        agreed += 1
    assert agreed > len(clean) // 2  # flips in payload bytes decode (to the flipped values) in both


def small_records(n_images: int = 30, seed: int = 0, seq_len: int = 48):
    rng = np.random.default_rng(seed)
    config = packer.PackConfig(seq_len=seq_len, patch_size=4, max_images_per_seq=4, token_drop="const:0.25")
    images = []
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(4, 28, 2))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(packer.prepare_image(buf.getvalue(), f"dir/{i} ✓.png", config, label=i, meta={"id": i}))
    return config, list(packer.pack_patched(images, config, ("id",)))


def every_format(tmp_path_factory, num_shards: int, *small_args) -> tuple[list[dict], dict[str, str]]:
    """(records, {format: folder}): small_records(*small_args) written in every format with `id` carried."""
    config, records = small_records(*small_args)
    dirs = {}
    for fmt in schemas.FORMATS:
        d = tmp_path_factory.mktemp(fmt)
        schemas.write_dataset(d, records, config=config, fmt=fmt, num_shards=num_shards, meta_fields=("id",))
        dirs[fmt] = str(d)
    return records, dirs


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return every_format(tmp_path_factory, 2)


@pytest.mark.parametrize("fmt", EXAMPLE_FORMATS)
def test_read_equals_the_tensorflow_parse_of_the_same_shards(datasets, fmt):
    """schemas.read's records against the serialized records of the same shards parsed by TensorFlow."""
    records, dirs = datasets
    m = schemas.read_manifest(dirs[fmt])
    schema = Schema.from_manifest(m)
    if fmt == "tfrecord":
        tf = pytest.importorskip("tensorflow")
        serialized = [r.numpy() for p in schemas.shard_paths(dirs[fmt], m) for r in tf.data.TFRecordDataset(p)]
    else:
        from schemas import _array_record

        serialized = [s for p in schemas.shard_paths(dirs[fmt], m) for b in _array_record.serialized_batches(p, 7) for s in b]
    want = tf_parse(serialized, schema)
    got = list(schemas.read(dirs[fmt]))
    assert len(got) == len(records) == len(serialized)
    for i, r in enumerate(got):
        for k, w in want.items():
            assert r[k].dtype == w.dtype and r[k].shape == w.shape[1:] and np.array_equal(r[k], w[i]), (i, k)
        for k, v in records[i].items():
            assert np.array_equal(r[k], v), (i, k)


BLOCK_TENSORFLOW = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("blocked: tensorflow must not be imported here")
sys.meta_path.insert(0, Block())
"""


def run_without_tensorflow(code: str, *args: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter in which importing tensorflow fails, then asserts it never got loaded."""
    script = BLOCK_TENSORFLOW + code + "\nassert 'tensorflow' not in sys.modules, sorted(m for m in sys.modules if 'tensorflow' in m)\n"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("fmt", EXAMPLE_FORMATS)
def test_read_verify_and_decode_example_import_no_tensorflow(datasets, fmt):
    records, dirs = datasets
    code = """
import sys
import schemas
from schemas import decode_example
d = sys.argv[1]
n = sum(1 for _ in schemas.read(d)) + sum(1 for _ in schemas.read(d, check_sha256=False))
report = schemas.verify(d)
assert n == 2 * report.num_sequences, n
m = schemas.read_manifest(d)
schema = schemas.Schema.from_manifest(m)
if m["format"] == "array_record":
    from schemas import _formats
    with _formats.get("array_record").random_access(schemas.shard_paths(d, m), schema) as source:
        assert len(source) == report.num_sequences and int(source[-1]["num_images"]) > 0
    from array_record.python.array_record_module import ArrayRecordReader
    raw = ArrayRecordReader(schemas.shard_paths(d, m)[0]).read([0])[0]
else:
    from schemas import _tfrecord
    buf, _, start, stop = next(_tfrecord.frames(schemas.shard_paths(d, m)[0]))
    raw = bytes(buf[start:stop])
assert decode_example(raw, schema)["image_keys"][0] == next(iter(schemas.read(d)))["image_keys"][0]
print("ok", n)
"""
    r = run_without_tensorflow(code, dirs[fmt])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", str(2 * len(records))]


def test_blocking_tensorflow_is_seen():
    """The check above is honest: code that imports tensorflow fails under it."""
    r = run_without_tensorflow("import schemas\nschemas.tf_dataset(sys.argv[1])", "/nonexistent")
    assert r.returncode != 0 and ("blocked" in r.stderr or "ManifestMissing" in r.stderr)
    r = run_without_tensorflow("import tensorflow")
    assert r.returncode != 0 and "blocked" in r.stderr


@pytest.mark.parametrize("fmt", EXAMPLE_FORMATS)
def test_stats_inspect_and_verify_commands_import_no_tensorflow(datasets, tmp_path, fmt):
    _, dirs = datasets
    code = """
import sys
from pipelines import cli
d, png = sys.argv[1], sys.argv[2]
for argv in (["stats", d], ["inspect", d, "--sequence", "2", "--out", png], ["verify", d]):
    rc = cli.main(argv)
    assert rc in (0, None), (argv, rc)
"""
    png = tmp_path / "seq.png"
    r = run_without_tensorflow(code, dirs[fmt], str(png))
    assert r.returncode == 0, r.stderr[-3000:]
    assert png.stat().st_size > 0 and "OK" in r.stdout


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_tfrecord_damage_at_every_offset_raises_corrupt_shard(tmp_path):
    """With check_sha256=False only the framing CRCs (and the record count) stand between damage and the
    records: a flipped byte anywhere and a cut at any length of a shard must raise CorruptShard."""
    config, records = small_records(6, seed=1, seq_len=16)
    schemas.write_dataset(tmp_path, records[:3], config=config, fmt="tfrecord", meta_fields=("id",), run_id="t0")
    path = tmp_path / "packed-t0-00000-of-00001.tfrecord"
    clean = path.read_bytes()
    for offset in range(len(clean)):
        path.write_bytes(clean[:offset] + bytes([clean[offset] ^ 0x5A]) + clean[offset + 1:])
        with pytest.raises(schemas.CorruptShard, match=path.name) as e:
            list(schemas.read(str(tmp_path), check_sha256=False))
        assert "CRC32C" in e.value.detail, (offset, e.value.detail)
    for offset in range(len(clean)):
        path.write_bytes(clean[:offset])
        with pytest.raises(schemas.CorruptShard, match=path.name) as e:
            list(schemas.read(str(tmp_path), check_sha256=False))
        assert "truncated" in e.value.detail or "the manifest says 3" in e.value.detail, (offset, e.value.detail)
    path.write_bytes(clean)
    assert len(list(schemas.read(str(tmp_path), check_sha256=False))) == 3


def test_tfrecord_framing_errors_name_the_record(tmp_path):
    config, records = small_records(6, seed=1, seq_len=16)
    schemas.write_dataset(tmp_path, records[:3], config=config, fmt="tfrecord", meta_fields=("id",), run_id="t0")
    path = str(tmp_path / "packed-t0-00000-of-00001.tfrecord")
    first = 12 + struct.unpack("<Q", open(path, "rb").read(8))[0] + 4  # where record 1 starts
    _flip(path, first + 20)  # inside record 1's payload
    with pytest.raises(schemas.CorruptShard, match=f"record 1 at byte {first}: the payload fails its CRC32C"):
        list(schemas.read(str(tmp_path), check_sha256=False))
    os.truncate(path, first + 30)
    with pytest.raises(schemas.CorruptShard, match="record 1 .* the file ends inside it"):
        list(schemas.read(str(tmp_path), check_sha256=False))
    os.truncate(path, first)  # at a record boundary: the framing is fine, the count is not
    with pytest.raises(schemas.CorruptShard, match="holds 1 records, the manifest says 3"):
        list(schemas.read(str(tmp_path), check_sha256=False))


# The registry


def test_the_registry_names_every_format_once():
    assert schemas.FORMATS == {"tfrecord": "tfrecord", "arrow": "arrow", "parquet": "parquet",
                               "array_record": "array_record"}
    assert list(schemas.FORMATS) == list(_formats.REGISTRY)
    assert {f.name for f in _formats.REGISTRY.values() if f.checks_records} == {"tfrecord", "array_record"}
    assert [f.name for f in _formats.REGISTRY.values() if f.random_access] == ["arrow", "array_record"]
    for bad in ("csv", None, ["arrow"]):
        with pytest.raises(schemas.SchemaError, match="unknown format"):
            _formats.get(bad)


@pytest.mark.parametrize("fmt", sorted(schemas.FORMATS))
def test_each_formats_sniffer_reads_the_stored_field_names(datasets, fmt):
    records, dirs = datasets
    m = schemas.read_manifest(dirs[fmt])
    names = _formats.get(fmt).field_names(schemas.shard_paths(dirs[fmt], m)[0])
    assert sorted(names) == sorted(records[0])


def test_array_record_random_access_equals_read(datasets):
    records, dirs = datasets
    d = dirs["array_record"]
    m = schemas.read_manifest(d)
    order = [int(i) for i in np.random.default_rng(0).permutation(len(records))]
    with _formats.get("array_record").random_access(schemas.shard_paths(d, m), Schema.from_manifest(m)) as source:
        assert len(source) == len(records)
        got = source.getitems(order)
        assert all(np.array_equal(source[-1][k], records[-1][k]) for k in records[-1])
        with pytest.raises(IndexError):
            source[len(records)]
    for i, r in zip(order, got):
        assert all(np.array_equal(r[k], records[i][k]) for k in records[i])
