"""Input sources: every spec kind on fixtures written here, keys, labels, meta, units, duplicates, errors."""
from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import packer
from pipelines import sources
from pipelines.sources import base
from pipelines.sources import SourceError, SourceRecord, flag_duplicates, open_source, read_sizes, record_sizes


def encode(fmt: str, h: int, w: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def image_tree(tmp_path):
    """root/{cat,dog,zebra}/... in several formats and nestings, plus files that must be ignored."""
    root = tmp_path / "images"
    files = {
        "cat/a.jpg": encode("JPEG", 20, 30, 1),
        "cat/b.PNG": encode("PNG", 21, 31, 2),
        "cat/deep/er/c.webp": encode("WEBP", 22, 32, 3),
        "dog/d.gif": encode("GIF", 23, 33, 4, "P"),
        "dog/e.bmp": encode("BMP", 24, 34, 5),
        "dog/f.TIFF": encode("TIFF", 25, 35, 6),
        "zebra/g.jpeg": encode("JPEG", 26, 36, 7, "L"),
        "zebra/lies.jpg": b"this is not a JPEG",
    }
    ignored = {"cat/notes.txt": b"hello", "dog/.hidden.jpg": encode("JPEG", 8, 8), ".cache/x.png": encode("PNG", 8, 8),
               "zebra/data.json": b"{}"}
    for rel, data in {**files, **ignored}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root, files


def test_folder_keys_labels_bytes(image_tree):
    root, files = image_tree
    src = open_source(str(root), meta_fields=("class_name",))
    assert src.class_names == ("cat", "dog", "zebra")
    records = list(src)
    assert [r.key for r in records] == sorted(files)
    for r in records:
        assert r.data == files[r.key] and r.reject is None
        assert src.class_names[r.label] == r.key.split("/")[0] == r.meta["class_name"]
    # A lying extension is passed on; the decoder rejects it later.
    with pytest.raises(packer.ImageRejected):
        packer.image_size(files["zebra/lies.jpg"])


def test_folder_units_split_sorted_and_pickle(image_tree):
    root, files = image_tree
    from pipelines.sources.files import FileSource
    src = FileSource.from_spec(str(root), files_per_unit=3)
    units = src.units()
    assert len(units) == 3
    clone = pickle.loads(pickle.dumps(src))
    per_unit = [[r.key for r in clone.read(u)] for u in units]
    assert [len(k) for k in per_unit] == [3, 3, 2]
    assert sum(per_unit, []) == sorted(files)


def test_folder_through_beam_filesystems_matches_local(image_tree):
    root, files = image_tree
    from pipelines.sources.files import FileSource
    local = [(r.key, r.data, r.label) for r in FileSource.from_spec(str(root), use_beam=False)]
    beam_src = FileSource.from_spec(str(root), use_beam=True)
    assert beam_src.use_beam
    assert [(r.key, r.data, r.label) for r in beam_src] == local
    beam_glob = FileSource.from_spec(str(root / "dog" / "*"), use_beam=True)
    assert [r.key for r in beam_glob] == ["d.gif", "e.bmp", "f.TIFF"]


def test_glob_and_single_file_and_labels_modes(image_tree, tmp_path):
    root, files = image_tree
    src = open_source(str(root / "*" / "*.jpg"))
    assert [r.key for r in src] == ["cat/a.jpg", "zebra/lies.jpg"]
    assert src.class_names == ("cat", "zebra")
    assert [r.label for r in open_source(str(root), labels="none")] == [None] * len(files)
    assert open_source(str(root), labels="none").class_names is None
    one = open_source(str(root / "cat" / "a.jpg"))
    assert [(r.key, r.label) for r in one] == [("a.jpg", None)]
    # Flat folder: no labels; a mixed layout is ambiguous and refused unless labels="none".
    (root / "loose.png").write_bytes(encode("PNG", 9, 9))
    with pytest.raises(SourceError, match="ambiguous"):
        open_source(str(root))
    with pytest.raises(SourceError, match="class sub-folder"):
        open_source(str(root), labels="folder")
    assert len(list(open_source(str(root), labels="none"))) == len(files) + 1
    flat = open_source(str(root / "cat" / "*"))
    assert flat.class_names is None and {r.label for r in flat} == {None}


def test_file_gone_after_listing_is_a_rejection_not_a_crash(image_tree):
    root, files = image_tree
    src = open_source(str(root))
    os.remove(root / "dog" / "e.bmp")
    by_key = {r.key: r for r in src}
    assert by_key["dog/e.bmp"].reject == "missing" and by_key["dog/e.bmp"].data == b""
    assert len(by_key) == len(files)


@pytest.mark.parametrize("spec, match", [
    ("", "empty"),
    ("nosuch:thing", "unknown source type"),
    ("synthetic:abc", "synthetic:N"),
    ("synthetic:0", "N must be"),
    ("synthetic:5:1:2", "synthetic:N"),
    ("sizes:x.csv", "read_sizes"),
    ("parquet:", "expected parquet:GLOB"),
    ("tfds:mnist", "tfds:NAME"),
])
def test_bad_specs(spec, match):
    with pytest.raises(SourceError, match=match):
        open_source(spec)


@pytest.mark.parametrize("kind", sorted(sources.KINDS))
@pytest.mark.parametrize("labels", ["folder", r"filename:^(\w+)_"])
def test_folder_only_label_modes_are_refused_by_every_other_kind(kind, labels):
    """Checked before the input is looked at: the spec body here names nothing."""
    with pytest.raises(SourceError, match="applies to image folders only"):
        open_source(f"{kind}:nothing-here", labels=labels)


def test_an_unknown_kind_names_every_registered_one():
    with pytest.raises(SourceError) as error:
        open_source("nosuch:thing")
    assert all(f"{kind}:" in str(error.value) for kind in sources.KINDS)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no input files"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(SourceError, match="no image files"):
        open_source(str(tmp_path / "text"))
    with pytest.raises(SourceError, match="no input files"):
        open_source(str(tmp_path / "*.png"))
    with pytest.raises(SourceError, match="labels="):
        open_source(str(tmp_path), labels="maybe")
    with pytest.raises(SourceError, match="meta field 'caption'"):
        open_source("synthetic:3", meta_fields=("caption",))


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_lazy_and_realistic():
    src = open_source("synthetic:600:7", meta_fields=("format", "class_name"))
    assert src.units() == ["0-256", "256-512", "512-600"]
    records = list(src)
    assert [r.key for r in records[:2]] == ["synthetic/000000", "synthetic/000001"]
    again = list(pickle.loads(pickle.dumps(src)).read("256-512"))
    assert [r.data for r in again] == [r.data for r in records[256:512]]
    assert records[0].data != list(open_source("synthetic:1:8"))[0].data
    sizes = np.array([packer.image_size(r.data) for r in records])
    assert [(k, h, w) for k, h, w in record_sizes(src)] == [(r.key, *s) for r, s in zip(records, sizes.tolist())]
    long_side, short_side = sizes.max(1), sizes.min(1)
    assert np.mean((long_side >= 200) & (long_side <= 800)) > 0.7
    aspects = sizes[:, 1] / sizes[:, 0]
    for ratio in (4 / 3, 3 / 4, 1.0, 16 / 9):
        assert np.mean(np.abs(aspects - ratio) < 0.01) > 0.01, ratio
    assert np.mean(np.maximum(aspects, 1 / aspects) > 2.4) > 0.005
    assert short_side.min() >= 1 and len(set(map(tuple, sizes.tolist()))) > 100
    formats = {r.meta["format"] for r in records}
    assert formats == {"jpeg", "png"}
    assert {r.label for r in records} == set(range(10))
    assert all(src.class_names[r.label] == r.meta["class_name"] for r in records)
    for r in records[:50]:  # every image decodes through the core
        img = packer.prepare_image(r.data, r.key, packer.PackConfig(), label=r.label)
        assert img.orig_h * img.orig_w > 0
    assert {r.label for r in open_source("synthetic:20", labels="none")} == {None}


# ----------------------------------------------------------------------------- TFRecord
def _example(tf, **features):
    feats = {}
    for name, value in features.items():
        if isinstance(value, bytes):
            feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        elif isinstance(value, float):
            feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        else:
            feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def test_tfrecord_default_and_custom_names_duplicates_and_gzip(tmp_path):
    tf = pytest.importorskip("tensorflow")
    imgs = [encode("JPEG", 10 + i, 20 + i, i) for i in range(5)]
    with tf.io.TFRecordWriter(str(tmp_path / "a-0.tfrecord")) as w:
        w.write(_example(tf, **{"image/encoded": imgs[0], "image/class/label": 3, "image/filename": b"x/0.jpg",
                                "score": 0.5}))
        w.write(_example(tf, **{"image/encoded": imgs[1], "image/class/label": 4, "image/filename": b"x/1.jpg"}))
        w.write(_example(tf, **{"image/class/label": 1, "image/filename": b"x/noimage.jpg"}))
        w.write(_example(tf, **{"image/encoded": imgs[2], "image/filename": b"x/0.jpg"}))  # duplicate in unit
    with tf.io.TFRecordWriter(str(tmp_path / "a-1.tfrecord.gz"), options="GZIP") as w:
        w.write(_example(tf, **{"image": imgs[3], "label": 7}))
        w.write(_example(tf, **{"image": imgs[4], "label": 8, "key": b"x/1.jpg"}))  # duplicate across units
    src = open_source(f"tfrecord:{tmp_path}/a-*", meta_fields=("score",))
    assert len(src.units()) == 2
    records = list(src)
    assert [(r.key, r.label, r.reject) for r in records] == [
        ("x/0.jpg", 3, None), ("x/1.jpg", 4, None), ("x/noimage.jpg", 1, "no_image"),
        ("x/0.jpg", None, "duplicate_key"), ("a-1.tfrecord.gz/0", 7, None), ("x/1.jpg", 8, "duplicate_key")]
    assert records[0].data == imgs[0] and records[4].data == imgs[3]
    assert records[0].meta == {"score": 0.5} and records[1].meta == {"score": ""}
    # read(unit) only sees its own unit's duplicates.
    assert [r.reject for r in src.read(src.units()[1])] == [None, None]
    custom = open_source(f"tfrecord:{tmp_path}/a-0.tfrecord?image=image/encoded&label=image/filename&key=nokey",
                         labels="auto")
    first = next(iter(custom))
    assert first.key == "a-0.tfrecord/0" and first.label == "x/0.jpg"  # a non-integer label: the core rejects it
    with pytest.raises(packer.ImageRejected, match="bad_label"):
        packer.prepare_image(first.data, first.key, packer.PackConfig(), label=first.label)
    with pytest.raises(SourceError, match="unknown option"):
        open_source(f"tfrecord:{tmp_path}/a-*?img=x")


def test_tfrecord_corrupt_file_and_foreign_payload_are_rejections(tmp_path):
    tf = pytest.importorskip("tensorflow")
    img = encode("JPEG", 9, 9)
    with tf.io.TFRecordWriter(str(tmp_path / "t.tfrecord")) as w:
        w.write(_example(tf, image=img, key=b"k0"))
        w.write(b"\xff\x00 not a protobuf")
        w.write(_example(tf, image=img, key=b"k2"))
    full = (tmp_path / "t.tfrecord").read_bytes()
    (tmp_path / "t.tfrecord").write_bytes(full[:-5])  # truncate the last record
    records = list(open_source(f"tfrecord:{tmp_path}/t.tfrecord"))
    assert [(r.key, r.reject) for r in records] == [("k0", None), ("t.tfrecord/1", "unreadable"),
                                                    ("t.tfrecord/<corrupt>", "unreadable")]
    assert records[0].data == img and "t.tfrecord" in records[2].detail


# ----------------------------------------------------------------------------- Parquet / Arrow
def _hf_table(pa, n, start=0, paths=True):
    images = [encode("PNG" if i % 2 else "JPEG", 12 + i, 16 + i, i) for i in range(start, start + n)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    image = pa.array([{"bytes": b, "path": f"img_{start + i}.jpg" if paths else None} for i, b in enumerate(images)],
                     type=struct)
    table = pa.table({"image": image, "label": pa.array([i % 3 for i in range(n)], pa.int64()),
                      "caption": pa.array([f"caption {start + i}" for i in range(n)])})
    hf = {"info": {"features": {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"},
                                "label": {"names": ["ant", "bee", "cow"], "_type": "ClassLabel"}}}}
    return table.replace_schema_metadata({"huggingface": json.dumps(hf)}), images


def test_parquet_hf_layout_row_groups_and_meta(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    t0, imgs0 = _hf_table(pa, 7)
    t1, imgs1 = _hf_table(pa, 3, start=7, paths=False)
    pq.write_table(t0, tmp_path / "train-00000.parquet", row_group_size=3)
    pq.write_table(t1, tmp_path / "train-00001.parquet")
    src = open_source(f"parquet:{tmp_path}", meta_fields=("caption",))
    assert src.class_names == ("ant", "bee", "cow")
    assert len(src.units()) == 4  # 3 + 1 row groups
    records = list(pickle.loads(pickle.dumps(src)))
    assert [r.data for r in records] == imgs0 + imgs1
    assert [r.key for r in records] == [f"img_{i}.jpg" for i in range(7)] + [f"train-00001.parquet/{i}" for i in range(3)]
    assert [r.label for r in records] == [i % 3 for i in range(7)] + [0, 1, 2]
    assert records[8].meta == {"caption": "caption 8"}
    assert [r.key for r in src.read(src.units()[2])] == ["img_6.jpg"]
    with pytest.raises(SourceError, match="meta field 'nope'"):
        open_source(f"parquet:{tmp_path}/*.parquet", meta_fields=("nope",))
    assert {r.label for r in open_source(f"parquet:{tmp_path}/*.parquet", labels="none")} == {None}


def test_parquet_missing_bytes_and_bad_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    good = encode("JPEG", 9, 9)
    pq.write_table(pa.table({"image": pa.array([{"bytes": good, "path": "a.jpg"}, {"bytes": None, "path": "b.jpg"},
                                                {"bytes": b"", "path": None}], type=struct),
                             "label": pa.array(["x", "y", "z"])}), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="must hold integers"):
        open_source(f"parquet:{tmp_path}/t.parquet")
    records = list(open_source(f"parquet:{tmp_path}/t.parquet", labels="none"))
    assert [(r.key, r.reject) for r in records] == [("a.jpg", None), ("b.jpg", "no_image"), ("t.parquet/2", "empty")]
    with pytest.raises(SourceError, match="no column 'pixels'"):
        open_source(f"parquet:{tmp_path}/t.parquet?image=pixels")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "u.parquet")
    with pytest.raises(SourceError, match="no image column"):
        open_source(f"parquet:{tmp_path}/u.parquet")
    (tmp_path / "v.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="cannot read parquet metadata"):
        open_source(f"parquet:{tmp_path}/v.parquet")


@pytest.mark.parametrize("ipc", ["stream", "file"])
def test_arrow_binary_column_and_key_column(tmp_path, ipc):
    pa = pytest.importorskip("pyarrow")
    images = [encode("PNG", 8 + i, 8, i) for i in range(4)]
    table = pa.table({"img": pa.array(images, pa.binary()), "id": ["k0", "k1", "k0", "k3"], "y": [0, 1, 2, 3]})
    path = tmp_path / "data-00000-of-00001.arrow"
    writer = pa.ipc.new_stream if ipc == "stream" else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, writer(sink, table.schema) as w:
        w.write_table(table)
    src = open_source(f"arrow:{tmp_path}/*.arrow?image=img&key=id&label=y")
    records = list(src)
    assert [(r.key, r.label, r.reject) for r in records] == [
        ("k0", 0, None), ("k1", 1, None), ("k0", 2, "duplicate_key"), ("k3", 3, None)]
    assert [r.data for r in records] == images
    assert src.units() == [str(path)] and src.class_names is None


# ----------------------------------------------------------------------------- TFDS
def _tiny_tfds_builder():
    tfds = pytest.importorskip("tensorflow_datasets")

    class NavitTinyImages(tfds.core.GeneratorBasedBuilder):
        """A few JPEG and PNG images, written by the test."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=["moon", "sun"]),
                "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                fmt = "JPEG" if i % 2 == 0 else "PNG"
                yield f"ex{i}", {"image": io.BytesIO(encode(fmt, 10 + i, 14, i)), "label": i % 2,
                                 "caption": f"picture {i}"}

    return tfds, NavitTinyImages


def test_tfds_tiny_builder_encoded_bytes_labels_keys(tmp_path):
    tfds, builder_cls = _tiny_tfds_builder()
    data_dir = tmp_path / "tfds"
    builder_cls(data_dir=str(data_dir)).download_and_prepare()
    src = open_source(f"tfds:navit_tiny_images:train:{data_dir}", meta_fields=("caption",))
    assert src.class_names == ("moon", "sun") and src.units() == ["train"]
    records = list(pickle.loads(pickle.dumps(src)))
    assert len(records) == 6 and len({r.key for r in records}) == 6
    assert all(r.key.startswith("navit_tiny_images-train") for r in records)
    by_caption = {r.meta["caption"]: r for r in records}
    for i in range(6):
        r = by_caption[f"picture {i}"]
        assert r.label == i % 2
        assert Image.open(io.BytesIO(r.data)).format == ("JPEG" if i % 2 == 0 else "PNG")  # encoded, not decoded
        assert packer.image_size(r.data) == (10 + i, 14)
    sliced = open_source(f"tfds:navit_tiny_images:train[:2]:{data_dir}", labels="none")
    sliced_records = list(sliced)
    assert len(sliced_records) == 2 and {r.label for r in sliced_records} == {None}
    # The per-shard sub-split syntax that units() uses for multi-shard splits.
    assert len(list(open_source(f"tfds:navit_tiny_images:train[0shard:1shard]:{data_dir}"))) == 6
    with pytest.raises(SourceError, match="no split 'validation'"):
        open_source(f"tfds:navit_tiny_images:validation:{data_dir}")
    with pytest.raises(SourceError, match="cannot open TFDS"):
        open_source(f"tfds:navit_no_such_dataset_xyz:train:{tmp_path / 'none'}")


# ----------------------------------------------------------------------------- sizes and helpers
def test_read_sizes_from_sources_and_csv(image_tree, tmp_path):
    root, files = image_tree
    sizes = list(read_sizes(str(root)))
    assert ("cat/a.jpg", 20, 30) in sizes and ("zebra/g.jpeg", 26, 36) in sizes
    assert len(sizes) == len(files) - 1  # the lying file has no readable header
    csv_path = tmp_path / "sizes.csv"
    csv_path.write_text("key,height,width\na,10,20\nb,300,400\n")
    assert list(read_sizes(f"sizes:{csv_path}")) == [("a", 10, 20), ("b", 300, 400)]
    assert list(read_sizes(str(csv_path))) == [("a", 10, 20), ("b", 300, 400)]
    (tmp_path / "bad.csv").write_text("key,height,width\na,ten,20\n")
    with pytest.raises(SourceError, match="line 2"):
        list(read_sizes(str(tmp_path / "bad.csv")))
    (tmp_path / "cols.csv").write_text("key,h,w\na,1,2\n")
    with pytest.raises(SourceError, match="lacks column"):
        list(read_sizes(str(tmp_path / "cols.csv")))


def test_flag_duplicates_keeps_first_and_passes_rejections():
    recs = [SourceRecord("a", b"1"), SourceRecord("b", b"", reject="unreadable"), SourceRecord("b", b"2"),
            SourceRecord("a", b"3"), SourceRecord("b", b"4")]
    out = list(flag_duplicates(recs))
    assert [(r.key, r.data, r.reject) for r in out] == [
        ("a", b"1", None), ("b", b"", "unreadable"), ("b", b"2", None), ("a", b"3", "duplicate_key"),
        ("b", b"4", "duplicate_key")]


def test_glob_root_and_relative_key():
    assert base.glob_root("gs://b/data/*/x*.jpg") == "gs://b/data"
    assert base.glob_root("/d/**/*.png") == "/d"
    assert base.glob_root("*.png") == "."
    assert base.relative_key("gs://b/data/c/x.jpg", "gs://b/data") == "c/x.jpg"
    assert base.relative_key("./a/b.png", ".") == "a/b.png"


def test_labels_from_file_names_and_label_descriptions(tmp_path):
    for name in ("cat_1.png", "cat_2.png", "sub/dog_1.png", "x.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    src = open_source(str(tmp_path), labels=r"filename:^([a-z]+)_\d+")
    assert src.class_names == ("cat", "dog")
    assert {r.key: r.label for r in pickle.loads(pickle.dumps(src))} == {
        "cat_1.png": 0, "cat_2.png": 0, "sub/dog_1.png": 1, "x.png": None}
    assert src.label_description() == r"from file names by ^([a-z]+)_\d+: 2 classes"
    assert open_source(str(tmp_path / "sub")).label_description() == "none: every label is -1"  # a flat folder
    assert open_source("synthetic:3").label_description() == "from the input's labels: 10 classes"
    with pytest.raises(SourceError, match="needs a group"):
        open_source(str(tmp_path), labels="filename:cat")
    with pytest.raises(SourceError, match="not a regular expression"):
        open_source(str(tmp_path), labels="filename:(")
    with pytest.raises(SourceError, match="image folders only"):
        open_source("synthetic:3", labels="filename:(x)")


def test_a_folder_fetches_each_file_whole_even_one_grown_since_its_stat(tmp_path, monkeypatch):
    """FileSource.fetch reads a local file in one call of its size: every byte of an empty, a small and a
    multi-MB file; a file longer than its fstat said (it grew meanwhile) is still read to its end; a
    missing one is FileNotFoundError (packer's "missing")."""
    import pipelines.sources.files as files

    blobs = {"empty.jpg": b"", "small.jpg": os.urandom(3000), "big.jpg": os.urandom(5 << 20)}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
    src = open_source(str(tmp_path), labels="none")
    assert {k: src.fetch(k) for k in blobs} == blobs

    real = files.open_local

    def stale(path):  # the fstat of the file when it was 10 bytes shorter
        fd, st = real(path)
        return fd, os.stat_result((*st[:6], st.st_size - 10, *st[7:]))

    monkeypatch.setattr(files, "open_local", stale)
    assert src.fetch("small.jpg") == blobs["small.jpg"] and src.fetch("big.jpg") == blobs["big.jpg"]
    os.remove(tmp_path / "small.jpg")
    with pytest.raises(FileNotFoundError):
        src.fetch("small.jpg")
