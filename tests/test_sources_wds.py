"""`wds:` WebDataset tar shards: samples, keys, labels, meta, braces, damage, streaming, and every command path."""
from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image

import packer
from pipelines.cli import options
from pipelines.sources import wds as sources_wds
from pipelines.sources import SourceError, open_source, read_sizes
from pipelines.sources.wds import WdsSource, expand_braces, split_member_name


def image(fmt: str, h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_shard(path, members, mode: str = "w") -> None:
    """A tar in WebDataset layout: members (name, bytes) in the given order; a name ending in / is a folder."""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def data_offset(path, name: str) -> int:
    """Where member `name`'s data starts in an uncompressed tar."""
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset_data


def records_by_key(src):
    return {r.key: r for r in src}


JPG, PNG, WEBP = image("JPEG", 20, 30, 1), image("PNG", 21, 31, 2), image("WEBP", 22, 32, 3)


@pytest.fixture
def mixed_shard(tmp_path):
    """Every kind of sample in one shard, in WebDataset layout."""
    path = tmp_path / "mixed.tar"
    write_shard(path, [
        ("000000.jpg", JPG), ("000000.cls", b"3\n"), ("000000.json", b'{"caption": "a cat", "width": 30, "cid": 7}'),
        ("000001.json", b'{"caption": "image after json", "cid": "8"}'), ("000001.PNG", PNG), ("000001.cls", b"4"),
        ("000002.jpg", JPG), ("000002.cls", b"cat"),
        ("000003.json", b'{"caption": "no image"}'), ("000003.txt", b"text only"),
        ("000004.jpg", JPG), ("000004.png", PNG), ("000004.cls", b"5"),
        ("sub/", b""), ("sub/000005.webp", WEBP), ("sub/000005.seg.png", PNG), ("sub/._000005.jpg", b"apple double"),
        ("README", b"no extension: not part of any sample"),
        ("000006.jpg", JPG), ("000006.json", b"[1, 2]"),
    ])
    return path


def test_samples_keys_images_labels_and_rejects(mixed_shard):
    src = open_source(f"wds:{mixed_shard}", meta_fields=("caption", "width"))
    records = list(src)
    assert [r.key for r in records] == [
        "mixed.tar/000000", "mixed.tar/000001", "mixed.tar/000002", "mixed.tar/000003", "mixed.tar/000004",
        "mixed.tar/000004.png", "mixed.tar/sub/000005", "mixed.tar/000006"]
    by_key = {r.key: r for r in records}
    ok = by_key["mixed.tar/000000"]
    assert (ok.data, ok.label, ok.reject) == (JPG, 3, None)
    assert ok.meta == {"caption": "a cat", "width": 30}
    after_json = by_key["mixed.tar/000001"]  # the image member comes after the json one
    assert (after_json.data, after_json.label, after_json.meta["caption"]) == (PNG, 4, "image after json")
    assert after_json.meta["width"] == ""  # a field the sample's json lacks
    bad_cls = by_key["mixed.tar/000002"]
    assert bad_cls.reject == "bad_label" and "'cat'" in bad_cls.detail
    assert by_key["mixed.tar/000003"].reject == "no_image"
    two = by_key["mixed.tar/000004"]  # the first image is used, the second recorded as a rejection
    assert (two.data, two.label, two.reject) == (JPG, 5, None)
    extra = by_key["mixed.tar/000004.png"]
    assert extra.reject == "extra_image" and "000004.jpg" in extra.detail
    nested = by_key["mixed.tar/sub/000005"]  # seg.png is not an image field; hidden and folder members ignored
    assert (nested.data, nested.label, nested.reject) == (WEBP, None, None)
    assert by_key["mixed.tar/000006"].reject == "bad_json"


def test_label_field_from_json_and_labels_none(mixed_shard):
    by_key = records_by_key(open_source(f"wds:{mixed_shard}?label=cid"))
    assert by_key["mixed.tar/000000"].label == 7
    assert by_key["mixed.tar/000001"].label == 8  # integer text in json, too
    # No json (or no such field): unlabelled, as a sample without cls; its bad cls is not read.
    assert (by_key["mixed.tar/000002"].label, by_key["mixed.tar/000002"].reject) == (None, None)
    assert by_key["mixed.tar/000004"].label is None
    unlabelled = records_by_key(open_source(f"wds:{mixed_shard}", labels="none"))
    assert unlabelled["mixed.tar/000000"].label is None
    assert unlabelled["mixed.tar/000002"].reject is None  # a cls that is not read cannot be bad
    with pytest.raises(SourceError, match="labels='none'"):
        open_source(f"wds:{mixed_shard}?label=cid", labels="none")
    with pytest.raises(SourceError, match="folders only"):
        open_source(f"wds:{mixed_shard}", labels="folder")
    with pytest.raises(SourceError, match="unknown option"):
        open_source(f"wds:{mixed_shard}?image=jpg")


@pytest.mark.parametrize("value,label,reject", [
    ("5", 5, None), ("-1", -1, None), ("2.5", None, "bad_label"), ("true", None, "bad_label"),
    ('"x"', None, "bad_label"), ('"12"', 12, None), ("null", None, None),
])
def test_label_field_values(tmp_path, value, label, reject):
    write_shard(tmp_path / "s.tar", [("a.jpg", JPG), ("a.json", f'{{"y": {value}}}'.encode())])
    (record,) = open_source(f"wds:{tmp_path}/s.tar?label=y")
    assert (record.label, record.reject) == (label, reject)


def test_split_member_name():
    assert split_member_name("dir/000017.seg.png") == ("dir/000017", "seg.png")
    assert split_member_name("a.b/x.JPG") == ("a.b/x", "jpg")
    assert split_member_name("noext") == ("noext", "")


@pytest.mark.parametrize("pattern,expected", [
    ("s-{000..002}.tar", ["s-000.tar", "s-001.tar", "s-002.tar"]),
    ("s-{8..10}.tar", ["s-8.tar", "s-9.tar", "s-10.tar"]),
    ("s-{08..10}.tar", ["s-08.tar", "s-09.tar", "s-10.tar"]),
    ("s-{2..0}", ["s-2", "s-1", "s-0"]),
    ("{train,val}-{0..1}.tar", ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]),
    ("{a,b{1..2}}x", ["ax", "b1x", "b2x"]),
    ("lit{x}-{0..1}", ["lit{x}-0", "lit{x}-1"]),
    ("plain.tar", ["plain.tar"]),
])
def test_expand_braces(pattern, expected):
    assert expand_braces("spec", pattern) == expected


def test_unbalanced_brace_is_an_error():
    with pytest.raises(SourceError, match="unbalanced"):
        expand_braces("spec", "s-{000..002.tar")


def test_brace_glob_folder_specs_and_missing_shards(tmp_path):
    for i in range(4):
        write_shard(tmp_path / f"shards-{i:03d}.tar", [(f"{i}.jpg", JPG)])
    (tmp_path / "shards-000.idx").write_bytes(b"not a tar")
    src = open_source(f"wds:{tmp_path}/shards-{{000..002}}.tar")
    assert src.units() == [str(tmp_path / f"shards-{i:03d}.tar") for i in range(3)]
    assert [r.key for r in src] == ["shards-000.tar/0", "shards-001.tar/1", "shards-002.tar/2"]
    listed = open_source(f"wds:{tmp_path}/shards-{{001,003}}.tar")
    assert [r.key for r in listed] == ["shards-001.tar/1", "shards-003.tar/3"]
    assert len(open_source(f"wds:{tmp_path}/*").units()) == 4  # a glob keeps tar files only
    assert len(open_source(f"wds:{tmp_path}").units()) == 4  # and so does a folder
    with pytest.raises(SourceError, match=r"1 shard\(s\) do not exist: .*shards-004.tar"):
        open_source(f"wds:{tmp_path}/shards-{{000..004}}.tar")
    with pytest.raises(SourceError, match="no tar files"):
        open_source(f"wds:{tmp_path}/nothing-*.tar")
    with pytest.raises(SourceError, match="expected wds:"):
        open_source("wds:")


def test_units_pickle_and_read_alone(tmp_path):
    for i in range(2):
        write_shard(tmp_path / f"s{i}.tar", [(f"k{j}.jpg", JPG) for j in range(3)])
    src = pickle.loads(pickle.dumps(open_source(f"wds:{tmp_path}/s{{0..1}}.tar")))
    assert [[r.key for r in src.read(u)] for u in src.units()] == [
        ["s0.tar/k0", "s0.tar/k1", "s0.tar/k2"], ["s1.tar/k0", "s1.tar/k1", "s1.tar/k2"]]


def test_through_beam_filesystems_matches_local(tmp_path, monkeypatch):
    """gs:// and other schemes are listed and streamed through Beam's FileSystems: here on local paths."""
    pytest.importorskip("apache_beam")
    for i in range(3):
        write_shard(tmp_path / f"s-{i}.tar", [(f"k{i}.jpg", JPG), (f"k{i}.cls", b"1"), (f"m{i}.png", PNG)])
    spec = f"wds:{tmp_path}/s-{{0..1}}.tar"
    local = [(r.key, r.data, r.label) for r in open_source(spec)]
    opened = []
    from pipelines.sources import files as sources_files
    real_open = sources_files.open_file
    monkeypatch.setattr(sources_wds, "has_scheme", lambda path: True)
    monkeypatch.setattr(sources_wds, "open_file", lambda path, use_beam: opened.append(use_beam) or
                        real_open(path, use_beam=use_beam))
    assert [(r.key, r.data, r.label) for r in open_source(spec)] == local
    assert opened == [True, True]
    assert len(open_source(f"wds:{tmp_path}/s-*.tar").units()) == 3  # a glob listed by FileSystems.match


def test_repeated_key_in_a_shard_is_a_duplicate(tmp_path):
    write_shard(tmp_path / "s.tar", [("a.jpg", JPG), ("b.jpg", PNG), ("a.jpg", WEBP)])
    records = list(open_source(f"wds:{tmp_path}/s.tar"))
    assert [(r.key, r.reject) for r in records] == [("s.tar/a", None), ("s.tar/b", None), ("s.tar/a", "duplicate_key")]


def three_samples(path) -> None:
    write_shard(path, [("a.jpg", JPG), ("a.cls", b"1"), ("b.png", PNG), ("b.cls", b"2"),
                       ("c.webp", WEBP), ("c.cls", b"3")])


def test_shard_truncated_mid_member_keeps_complete_samples(tmp_path):
    full = tmp_path / "full.tar"
    three_samples(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:data_offset(full, "c.webp") + len(WEBP) // 2])
    records = list(open_source(f"wds:{cut}"))
    assert [(r.key, r.reject) for r in records] == [
        ("cut.tar/a", None), ("cut.tar/b", None), ("cut.tar/c", "truncated")]
    assert (records[0].data, records[0].label, records[1].data, records[1].label) == (JPG, 1, PNG, 2)
    assert "damaged" in records[2].detail and records[2].data == b""


@pytest.mark.parametrize("where", ["mid_header", "no_end_marker"])
def test_shard_cut_between_members_rejects_the_sample_it_may_cut(tmp_path, where):
    """tarfile ends silently on a partial header or a missing end marker; the sample before it may lack members."""
    full = tmp_path / "full.tar"
    three_samples(full)
    data = full.read_bytes()
    header = data_offset(full, "b.png") - 512
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:header + (100 if where == "mid_header" else 0)])
    records = list(open_source(f"wds:{cut}"))
    assert [(r.key, r.reject) for r in records] == [("cut.tar/a", "truncated")]


def test_corrupt_and_unreadable_shards(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    (tmp_path / "empty.tar").write_bytes(b"")
    write_shard(tmp_path / "good.tar", [("a.jpg", JPG)])
    records = list(open_source(f"wds:{tmp_path}/{{junk,empty,good}}.tar"))
    assert [(r.key, r.reject) for r in records] == [
        ("junk.tar/<corrupt>", "corrupt_tar"), ("empty.tar/<corrupt>", "corrupt_tar"), ("good.tar/a", None)]
    src = open_source(f"wds:{tmp_path}/good.tar")
    (tmp_path / "good.tar").unlink()
    (record,) = list(src)
    assert (record.key, record.reject) == ("good.tar/<unreadable>", "unreadable")


def test_compressed_shard(tmp_path):
    write_shard(tmp_path / "s.tar.gz", [("a.jpg", JPG), ("a.cls", b"2")], mode="w:gz")
    (record,) = open_source(f"wds:{tmp_path}")
    assert (record.key, record.data, record.label) == ("s.tar.gz/a", JPG, 2)
    pngs = [image("PNG", 20, 20, i) for i in range(30)]
    write_shard(tmp_path / "cut.tgz", [(f"{i:02d}.png", data) for i, data in enumerate(pngs)], mode="w:gz")
    data = (tmp_path / "cut.tgz").read_bytes()
    (tmp_path / "cut.tgz").write_bytes(data[:len(data) // 2])
    records = list(open_source(f"wds:{tmp_path}/cut.tgz"))
    assert 5 < len(records) < 30 and records[-1].reject == "truncated"
    assert [r.data for r in records[:-1]] == pngs[:len(records) - 1]


def test_oversized_member_rejected_from_its_header_unread(tmp_path, monkeypatch):
    write_shard(tmp_path / "s.tar", [("a.png", PNG), ("a.cls", b"1"), ("b.jpg", JPG)])
    src = WdsSource.from_spec("wds:x", f"{tmp_path}/s.tar", max_image_bytes=len(JPG))
    reads = []
    real = sources_wds._read_member
    monkeypatch.setattr(sources_wds, "_read_member", lambda tar, m: reads.append(m.name) or real(tar, m))
    records = list(src)
    assert [(r.key, r.reject) for r in records] == [("s.tar/a", "too_large"), ("s.tar/b", None)]
    assert "a.png" not in reads and records[1].data == JPG
    # The packer's header check rejects pixel bombs that are small in bytes.
    with pytest.raises(packer.ImageRejected, match="too_many_pixels"):
        packer.image_size(records[1].data, max_pixels=100)


def test_memory_does_not_grow_with_shard_size(tmp_path):
    """Only the current sample is held: reading 10x the samples peaks at about the same memory."""
    tiny = image("PNG", 4, 4)
    peaks = []
    for n in (150, 1500):
        path = tmp_path / f"s{n}.tar"
        write_shard(path, [(f"{i:06d}.{ext}", data) for i in range(n) for ext, data in
                           (("png", tiny), ("cls", b"1"), ("json", b'{"caption": "x"}'))])
        src = open_source(f"wds:{path}", meta_fields=("caption",))
        tracemalloc.start()
        count = sum(1 for _ in src._read(src.units()[0]))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert count == n
    assert peaks[1] < peaks[0] + 200_000, peaks


def test_read_sizes_from_headers(tmp_path):
    write_shard(tmp_path / "s.tar", [("a.jpg", JPG), ("b.png", PNG), ("c.json", b"{}")])
    assert list(read_sizes(f"wds:{tmp_path}/s.tar")) == [("s.tar/a", 20, 30), ("s.tar/b", 21, 31)]


def test_webdataset_package_reads_the_same_keys(mixed_shard, tmp_path):
    wds = pytest.importorskip("webdataset", reason="the webdataset package is not installed (not a dependency)")
    clean = tmp_path / "clean.tar"
    write_shard(clean, [(f"{i:06d}.{ext}", data) for i in range(5) for ext, data in
                        (("json", b"{}"), ("jpg", JPG), ("cls", str(i).encode()))] +
                [("d/x.png", PNG), ("d/x.txt", b"t")])
    theirs = [f"clean.tar/{s['__key__']}" for s in wds.WebDataset(str(clean), shardshuffle=False)]
    ours = [r.key for r in open_source(f"wds:{clean}")]
    assert ours == theirs and len(ours) == 6


# ----------------------------------------------------------------------------- --label-field and the commands
def args(input: str, label_field=None, labels="auto") -> argparse.Namespace:
    return argparse.Namespace(input=input, label_field=label_field, labels=labels)


def test_label_field_option_folds_into_the_spec():
    assert options.input_spec(args("wds:s-{0..9}.tar")) == "wds:s-{0..9}.tar"
    assert options.input_spec(args("wds:s-{0..9}.tar", "cid")) == "wds:s-{0..9}.tar?label=cid"
    assert options.input_spec(args("parquet:x/*.parquet?image=img", "y")) == "parquet:x/*.parquet?image=img&label=y"
    for bad, match in [(args("wds:s.tar?label=a", "b"), "already"), (args("synthetic:4", "y"), "applies to"),
                       (args("wds:s.tar", "a&b"), "field name"), (args("wds:s.tar", "y", "none"), "--labels")]:
        with pytest.raises(options.OptionError, match=match):
            options.input_spec(bad)


def test_bad_label_field_is_one_line_before_any_work(tmp_path, capsys):
    from pipelines import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["pack", "--input", "synthetic:4", "--output", str(tmp_path / "o"), "--label-field", "y"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("navit-pack: error: --label-field: ")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def shard_dir(tmp_path):
    """shards-000..002 with 4 good samples each (labels in cls and json), one bad label, one without image,
    one extra image, and shard 002 truncated mid-member; shard 003 exists but is not named by the spec."""
    root = tmp_path / "shards"
    root.mkdir()
    rng = np.random.default_rng(0)
    for s in range(4):
        members = []
        for i in range(4):
            h, w = (int(v) for v in rng.integers(24, 90, 2))
            key = f"{s}{i:03d}"
            members += [(f"{key}.json", json.dumps({"caption": f"c{key}", "cid": i}).encode()),
                        (f"{key}.jpg", image("JPEG", h, w, s * 10 + i)), (f"{key}.cls", str(i).encode())]
        members += [("bad.jpg", JPG), ("bad.cls", b"nine"), ("noimg.json", b"{}"), ("two.jpg", JPG), ("two.webp", WEBP)]
        members += [("last.png", image("PNG", 40, 50, s))]
        write_shard(root / f"shards-{s:03d}.tar", members)
    full = root / "shards-002.tar"
    data = full.read_bytes()
    full.write_bytes(data[:data_offset(full, "last.png") + 30])
    return root


@pytest.mark.parametrize("label_from", ["cls", "json"])
def test_pack_cli_end_to_end(shard_dir, tmp_path, capsys, label_from):
    pytest.importorskip("apache_beam")
    import schemas
    from pipelines import cli
    out = tmp_path / "out"
    argv = ["pack", "--input", f"wds:{shard_dir}/shards-{{000..002}}.tar", "--output", str(out), "--seq-len", "64",
            "--resolution", "uniform:32:64", "--format", "parquet", "--meta-fields", "caption", "--no-progress"]
    assert cli.main(argv + (["--label-field", "cid"] if label_from == "json" else [])) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"].endswith("?label=cid") == (label_from == "json")
    rejects = [json.loads(line) for line in open(schemas.rejects_path(str(out))).read().splitlines()]
    # Per shard 9 inputs: 4 good samples, bad (cls "nine", no json), noimg, two (+ the extra two.webp), last.
    assert manifest["num_images_in"] == 27
    assert manifest["num_images_in"] == manifest["num_images_packed"] + manifest["num_rejected"]
    expected = [(f"shards-{s:03d}.tar/{k}", reason) for s in range(3) for k, reason in
                (("noimg", "no_image"), ("two.webp", "extra_image"))] + [("shards-002.tar/last", "truncated")]
    if label_from == "cls":  # with --label-field the cls member is not read, and "bad" is unlabelled
        expected += [(f"shards-{s:03d}.tar/bad", "bad_label") for s in range(3)]
    assert sorted((r["key"], r["reason"]) for r in rejects) == sorted(expected)
    images = {im.key: im for rec in schemas.read(str(out)) for im in packer.unpack(rec)}
    assert len(images) == manifest["num_images_packed"] == 27 - len(expected)
    assert not any(k.startswith("shards-003") for k in images)
    assert images["shards-001.tar/1002"].label == 2 and images["shards-001.tar/1002"].meta["caption"] == "c1002"
    assert images["shards-000.tar/two"].label == -1
    capsys.readouterr()
    assert cli.main(["stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rejects_by_reason"] == dict(collections.Counter(reason for _, reason in expected))
    assert stats["num_labels"] == 4 and stats["unlabelled_images"] == 3 * (2 if label_from == "cls" else 3) - 1


def test_packed_stream_over_wds(shard_dir):
    from pipelines.stream import PackedStream
    config = packer.PackConfig(seq_len=64, resolution="uniform:32:64")
    stream = PackedStream(f"wds:{shard_dir}/shards-{{000..001}}.tar?label=cid", config, epochs=1, num_parallel=0,
                          meta_fields=("caption",))
    keys = [im.key for rec in stream for im in packer.unpack(rec)]
    expected = {f"shards-{s:03d}.tar/{k}" for s in range(2) for k in [f"{s}{i:03d}" for i in range(4)] +
                ["bad", "two", "last"]}
    assert set(keys) == expected and len(keys) == len(expected)
    assert stream.rejects == {"no_image": 2, "extra_image": 2}


def test_advise_reads_wds_sizes(shard_dir, capsys):
    from pipelines import cli
    assert cli.main(["advise", "--input", f"wds:{shard_dir}/shards-000.tar", "--draws", "200", "--seq-len", "64",
                     "128"]) == 0
    assert "seq" in capsys.readouterr().out.lower()


def test_tf_dataset_and_service_graph_over_wds(shard_dir):
    pytest.importorskip("tensorflow")
    from pipelines import service
    from pipelines.stream import as_tf_dataset
    config = packer.PackConfig(seq_len=64, resolution="uniform:32:64")
    spec = f"wds:{shard_dir}/shards-{{000..002}}.tar"
    expected = {f"shards-{s:03d}.tar/{k}" for s in range(3) for k in [f"{s}{i:03d}" for i in range(4)] +
                ["two"] + (["last"] if s != 2 else [])}

    def keys(dataset):
        return [k.decode() for rec in dataset.as_numpy_iterator() for k in rec["image_keys"] if k]

    streamed = keys(as_tf_dataset(spec, config, epochs=1, num_parallel=0))
    assert sorted(streamed) == sorted(expected)
    before = dict(service.REJECTS)
    served = keys(service.service_dataset(spec, config, epochs=1, group_units=2, num_parallel=0))
    assert sorted(served) == sorted(expected)
    counted = {r: service.REJECTS[r] - before.get(r, 0) for r in service.REJECTS}
    assert {r: n for r, n in counted.items() if n} == {"no_image": 3, "extra_image": 3, "bad_label": 3, "truncated": 1}
