"""The packed-record schema: every format round-trips the packer's records bit-exactly, the same input
gives the same arrays in every format, metadata passes through, and third-party readers open the files."""
from __future__ import annotations

import collections

import glob
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import packer
import schemas
from schemas._tfrecord import decode_example

FORMATS = ["tfrecord", "arrow", "parquet", "array_record"]
META = ("caption", "tags")


def make_records(n_images=40, seed=0, meta_fields=META):
    """Real packer output from synthetic images of random sizes (some tokens dropped)."""
    rng = np.random.default_rng(seed)
    config = packer.PackConfig(seq_len=64, patch_size=4, token_drop="const:0.25", max_images_per_seq=6)
    images = []
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(4, 36, 2))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        meta = {"caption": f"image nº{i} ✓", "tags": [i, i % 3]} if i % 4 else {"caption": ""}
        images.append(packer.prepare_image(buf.getvalue(), f"class{i % 3}/img {i}.png", config, label=i % 3, meta=meta))
    return config, list(packer.pack_patched(images, config, meta_fields))


@pytest.fixture(scope="module")
def packed():
    return make_records()


@pytest.fixture(scope="module")
def outputs(packed, tmp_path_factory):
    config, records = packed
    dirs = {}
    for fmt in FORMATS:
        d = str(tmp_path_factory.mktemp(fmt))
        schemas.write_dataset(d, records, config=config, fmt=fmt, num_shards=3, meta_fields=META,
                              rejects=[{"key": "bad.jpg", "reason": "undecodable", "detail": "x"}], run_id="t0")
        dirs[fmt] = d
    return dirs


def assert_same_records(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert sorted(a) == sorted(b)
        for k in b:
            ref = np.asarray(b[k])
            assert a[k].dtype == ref.dtype and a[k].shape == ref.shape, k
            assert np.array_equal(a[k], ref), k


def test_the_schema_is_the_packers_record_table(packed):
    config, records = packed
    schema = schemas.Schema.from_config(config, META)
    assert schema.fields == packer.record_fields(META)
    assert list(records[0]) == [f.name for f in schema.fields]  # the same fields, in record order
    for r in records:
        schema.validate(r)
        schemas._schema.check_consistency(r, schema)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("pos_x"), "missing"),
    (lambda r: r.__setitem__("pos_y", r["pos_y"].astype(np.int64)), "dtype"),
    (lambda r: r.__setitem__("patches", r["patches"][:-1]), "shape"),
    (lambda r: r.__setitem__("image_keys", r["image_keys"].astype(str)), "str"),
    (lambda r: r.__setitem__("meta_other", r["image_keys"]), "unexpected"),
])
def test_writer_rejects_records_off_schema(packed, tmp_path, mutate, message):
    config, records = packed
    bad = dict(records[0])
    mutate(bad)
    with pytest.raises(schemas.RecordError, match=message):
        schemas.write_shard(str(tmp_path), 0, 1, "arrow", [records[1], bad], seq_len=64, token_dim=48, max_images_per_seq=6,
                            meta_fields=META)
    assert os.listdir(tmp_path) == []  # atomic: nothing left behind, not even the temporary file


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_bit_exact(packed, outputs, fmt):
    _, records = packed
    assert_same_records(list(schemas.read(outputs[fmt])), records)


def test_every_format_gives_the_same_arrays(outputs):
    reads = {fmt: list(schemas.read(d)) for fmt, d in outputs.items()}
    for fmt in FORMATS[1:]:
        assert_same_records(reads[fmt], reads[FORMATS[0]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_meta_fields_pass_through(outputs, fmt):
    images = [im for r in schemas.read(outputs[fmt]) for im in packer.unpack(r)]
    assert len(images) == 40
    for im in images:
        i = int(im.key.split()[-1].split(".")[0])
        assert im.meta["caption"] == (f"image nº{i} ✓" if i % 4 else "")
        assert im.meta["tags"] == (json.dumps([i, i % 3]) if i % 4 else "")


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_layout_and_manifest(packed, outputs, fmt):
    config, records = packed
    d = outputs[fmt]
    names = [f"packed-t0-{i:05d}-of-00003.{fmt}" for i in range(3)]  # run id t0 (the outputs fixture)
    assert sorted(os.listdir(d)) == sorted(names + ["manifest.json", "rejects-t0.jsonl"])
    m = schemas.read_manifest(d)
    real = sum(int((r["segment_ids"] > 0).sum()) for r in records)
    assert m["schema_version"] == schemas.SCHEMA_VERSION and m["format"] == fmt
    assert packer.PackConfig(**m["config"]) == config
    assert (m["num_images_in"], m["num_images_packed"], m["num_rejected"]) == (41, 40, 1)
    assert m["num_sequences"] == len(records)
    assert (m["tokens_real"], m["tokens_padding"]) == (real, 64 * len(records) - real)
    assert m["efficiency"] == pytest.approx(real / (64 * len(records)))
    assert (m["seq_len"], m["token_dim"], m["max_images"], m["meta_fields"]) == (64, 48, 6, list(META))
    assert [s["file"] for s in m["shards"]] == names
    assert sum(s["num_sequences"] for s in m["shards"]) == len(records)
    for s in m["shards"]:
        assert s["sha256"] == schemas._io.sha256_file(os.path.join(d, s["file"]))
    assert (m["run_id"], m["rejects"]) == ("t0", "rejects-t0.jsonl")
    with open(os.path.join(d, "rejects-t0.jsonl")) as f:
        assert [json.loads(line) for line in f] == [{"key": "bad.jpg", "reason": "undecodable", "detail": "x"}]


def test_manifest_meta_fields_default_to_the_shards(packed, outputs, tmp_path):
    for fmt, d in outputs.items():
        m = schemas.read_manifest(d)
        copy = tmp_path / fmt
        shutil.copytree(d, copy)
        os.remove(copy / "manifest.json")
        again = schemas.write_manifest(str(copy), fmt=fmt, config=m["config"], num_images_in=41, num_images_packed=40,
                                       num_rejected=1, num_sequences=m["num_sequences"], tokens_real=m["tokens_real"],
                                       tokens_padding=m["tokens_padding"], shards=m["shards"])
        assert again["meta_fields"] == sorted(META)


@pytest.mark.parametrize("name", ["../x.arrow", "sub/x.arrow", "/abs/x.arrow", "..", ".", "", None])
def test_shard_names_must_be_plain_file_names_in_the_folder(packed, outputs, tmp_path, name):
    """A manifest naming a shard outside its folder is refused by write_manifest and by every reader."""
    d = tmp_path / "d"
    shutil.copytree(outputs["arrow"], d)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0]["file"] = name
    del m["run_id"]  # the plain-name check holds without a run id too
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(schemas.ManifestError, match="plain file name"):
        schemas.read_manifest(str(d))
    with pytest.raises(schemas.ManifestError, match="plain file name"):
        list(schemas.read(str(d)))
    with pytest.raises(schemas.ManifestError, match="plain file name"):
        schemas.verify(str(d))
    with pytest.raises(schemas.SchemaError, match="plain file name"):
        schemas.write_manifest(str(d), fmt="arrow", config=m["config"], num_images_in=0, num_images_packed=0,
                               num_rejected=0, num_sequences=m["num_sequences"], tokens_real=0, tokens_padding=0,
                               shards=m["shards"], meta_fields=META)


def test_write_manifest_checks_counts(packed, tmp_path):
    config, _ = packed
    with pytest.raises(schemas.SchemaError, match="sequences"):
        schemas.write_manifest(str(tmp_path), fmt="arrow", config=config, num_images_in=1, num_images_packed=1,
                               num_rejected=0, num_sequences=5, tokens_real=1, tokens_padding=0,
                               shards=[{"file": "x", "num_sequences": 4, "sha256": ""}], meta_fields=())
    assert not os.path.exists(tmp_path / "manifest.json")


def test_output_dir_refused_unless_overwrite(packed, tmp_path):
    config, records = packed
    d = str(tmp_path / "out")
    schemas.write_dataset(d, records[:3], config=config, fmt="arrow", num_shards=2, meta_fields=META)
    with pytest.raises(schemas.OutputDirError, match="not empty"):
        schemas.prepare_output_dir(d, overwrite=False)
    with pytest.raises(schemas.OutputDirError):
        schemas.write_dataset(d, records[:3], config=config, fmt="parquet", meta_fields=META)
    run = schemas.write_dataset(d, records[:2], config=config, fmt="parquet", meta_fields=META, overwrite=True)["run_id"]
    assert sorted(os.listdir(d)) == ["manifest.json", f"packed-{run}-00000-of-00001.parquet", f"rejects-{run}.jsonl"]
    assert len(list(schemas.read(d))) == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(schemas.OutputDirError, match="not a directory"):
        schemas.prepare_output_dir(str(tmp_path / "file"), overwrite=True)


def test_rejects_need_key_and_reason(tmp_path):
    with pytest.raises(schemas.SchemaError, match="reason"):
        schemas.write_rejects(str(tmp_path), [{"key": "a"}])
    assert schemas.write_rejects(str(tmp_path), [{"key": "a", "reason": "empty"}]) == 1


def test_directory_without_manifest_is_refused(tmp_path):
    with pytest.raises(schemas.ManifestMissing, match="manifest"):
        schemas.read(str(tmp_path))
    with pytest.raises(schemas.ManifestMissing):
        schemas.tf_dataset(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(schemas.ManifestError):
        schemas.read(str(tmp_path))


def test_schema_rejects_bad_parameters():
    with pytest.raises(schemas.SchemaError):
        schemas.Schema(0, 48, 6)
    with pytest.raises(schemas.SchemaError):
        schemas.Schema(64, 48, 6, ("a-b",))
    with pytest.raises(schemas.SchemaError):
        schemas.Schema(64, 48, 6, ("a", "a"))
    with pytest.raises(schemas.SchemaError):
        schemas._io.shard_name(3, 3, "arrow")
    with pytest.raises(schemas.SchemaError):
        schemas._io.shard_name(0, 1, "csv")


@pytest.mark.parametrize("fmt", FORMATS)
def test_tf_dataset_static_shapes_and_tf_function(packed, outputs, fmt):
    import tensorflow as tf

    _, records = packed
    ds = schemas.tf_dataset(outputs[fmt])
    spec = ds.element_spec
    assert spec["patches"].shape == (64, 48) and spec["patches"].dtype == tf.uint8
    assert spec["segment_ids"].shape == (64,) and spec["num_images"].shape == ()
    assert spec["image_keys"].dtype == tf.string and spec["meta_caption"].shape == (6,)
    got = [{k: v.numpy() for k, v in r.items()} for r in ds]

    def fingerprint(r: dict) -> tuple:  # every field's content, strings decoded
        fields = ("patches", "segment_ids", "pos_y", "pos_x", "num_images", "labels", "drop_rates")
        text = tuple(tuple(s.decode() if isinstance(s, bytes) else str(s) for s in r[k]) for k in ("image_keys", "meta_caption"))
        return tuple(np.asarray(r[k]).tobytes() for k in fields) + text

    # Interleaved shards come in another order: compare multisets, so a duplicated or lost record fails.
    assert collections.Counter(map(fingerprint, got)) == collections.Counter(map(fingerprint, records))

    @tf.function(jit_compile=True)
    def step(seg, patches):
        pool = schemas.tf_pooling_matrix(seg, 6)
        return tf.reduce_sum(tf.cast(schemas.tf_attention_mask(seg), tf.int32)), pool @ tf.cast(patches, tf.float32)

    batch = next(iter(ds.batch(4, drop_remainder=True)))
    assert batch["patches"].shape == (4, 64, 48)
    pairs, means = step(batch["segment_ids"], batch["patches"])
    seg = batch["segment_ids"].numpy()
    assert int(pairs) == int(schemas.attention_mask(seg).sum())
    np.testing.assert_allclose(means.numpy(), schemas.pooling_matrix(seg, 6) @ batch["patches"].numpy().astype(np.float32),
                               rtol=1e-5)


def test_masks_numpy_match_tf_and_mean_pool(packed):
    import tensorflow as tf

    _, records = packed
    seg = np.stack([r["segment_ids"] for r in records])
    mask = schemas.attention_mask(seg)
    assert mask.shape == (len(records), 64, 64)
    assert np.array_equal(mask, schemas.tf_attention_mask(tf.constant(seg)).numpy())
    pool = schemas.pooling_matrix(seg, 6)
    np.testing.assert_allclose(pool, schemas.tf_pooling_matrix(tf.constant(seg), 6).numpy())
    for r, m, p in zip(records, mask, pool):
        k = int(r["num_images"])
        for i in range(6):
            sel = r["segment_ids"] == i + 1
            assert np.array_equal(m[np.ix_(sel, np.arange(64))], np.broadcast_to(sel, (sel.sum(), 64)))
            if i < k:
                np.testing.assert_allclose(p[i] @ r["patches"].astype(np.float32), r["patches"][sel].mean(0), rtol=1e-5)
            else:
                assert not p[i].any()
        pad = r["segment_ids"] == 0
        assert m[np.ix_(pad, pad)].all() and not m[np.ix_(pad, ~pad)].any() and not m[np.ix_(~pad, pad)].any()


def test_arrow_and_parquet_open_with_pyarrow_dataset_and_polars(packed, outputs):
    import polars as pl
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    _, records = packed
    n = len(records)
    first = records[0]
    for fmt, d in (("arrow", outputs["arrow"]), ("parquet", outputs["parquet"])):
        path = os.path.join(d, f"packed-t0-00000-of-00003.{fmt}")
        table = pa.ipc.open_file(path).read_all() if fmt == "arrow" else pq.read_table(path)
        assert table.schema.field("patches").type == pa.list_(pa.field("item", pa.binary(48), nullable=False), 64)
        assert table.column("image_keys")[0].as_py() == list(first["image_keys"])
        files = sorted(glob.glob(os.path.join(d, f"packed-*.{fmt}")))
        dataset = pads.dataset(files, format="ipc" if fmt == "arrow" else "parquet")
        assert dataset.count_rows() == n
        frame = pl.read_ipc(os.path.join(d, "*.arrow")) if fmt == "arrow" else pl.read_parquet(os.path.join(d, "*.parquet"))
        assert frame.height == n
        row = frame.row(0, named=True)
        assert b"".join(row["patches"]) == first["patches"].tobytes()
        assert list(row["segment_ids"]) == first["segment_ids"].tolist()
        assert list(row["meta_caption"]) == list(first["meta_caption"])
    leaf = pq.ParquetFile(os.path.join(outputs["parquet"], "packed-t0-00000-of-00003.parquet")).schema.column(0)
    assert leaf.physical_type == "FIXED_LEN_BYTE_ARRAY" and leaf.length == 48


def test_arrow_and_parquet_open_with_hugging_face_datasets(packed, outputs):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed")
    _, records = packed
    first = records[0]
    for fmt, builder in (("parquet", "parquet"), ("arrow", "arrow")):
        files = os.path.join(outputs[fmt], f"packed-*.{fmt}")
        ds = datasets.load_dataset(builder, data_files=files, split="train",
                                   cache_dir=os.path.join(outputs[fmt], "..", f"hf-cache-{fmt}"))
        assert ds.num_rows == len(records)
        row = ds[0]
        assert b"".join(row["patches"]) == first["patches"].tobytes()
        assert row["segment_ids"] == first["segment_ids"].tolist()


def test_array_record_random_access_like_grain(packed, outputs):
    """Grain reads ArrayRecord by global index through ArrayRecordDataSource: index i is record i."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from array_record.python.array_record_module import ArrayRecordReader

    _, records = packed
    d = outputs["array_record"]
    manifest = schemas.read_manifest(d)
    schema = schemas.Schema.from_manifest(manifest)
    paths = schemas.shard_paths(d, manifest)
    order = [int(i) for i in np.random.default_rng(0).permutation(len(records))]
    with ArrayRecordDataSource(paths) as source:
        assert len(source) == len(records)
        assert_same_records([decode_example(source[i], schema) for i in order], [records[i] for i in order])
        batch = source.__getitems__(order[:5])
    assert_same_records([decode_example(b, schema) for b in batch], [records[i] for i in order[:5]])
    reader = ArrayRecordReader(paths[1])
    assert "group_size:1," in reader.writer_options_string()
    first = manifest["shards"][0]["num_sequences"]
    j = reader.num_records() - 1
    assert_same_records([decode_example(reader.read([j])[0], schema)], [records[first + j]])
    reader.close()


def test_decode_example_refuses_other_bytes(packed, outputs):
    d = outputs["array_record"]
    schema = schemas.Schema.from_manifest(schemas.read_manifest(d))
    other = schemas.Schema(schema.seq_len * 2, schema.token_dim, schema.max_images_per_seq, schema.meta_fields)
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(schemas.shard_paths(d, schemas.read_manifest(d))[0])
    raw = reader.read([0])[0]
    reader.close()
    for bad, s in ((b"\xff\x00garbage", schema), (raw, other)):
        with pytest.raises(schemas.RecordError):
            decode_example(bad, s)
