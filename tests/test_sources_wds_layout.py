"""`wds:` shards laid out as img2dataset writes them (KEY.jpg, KEY.txt caption, KEY.json, KEY.cls): member
extensions as meta fields, the meta-field check at open time, unused members, labels in the summary, link
members and member names that climb out of the shard. Every tar is made here with the tarfile module."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from conftest import encode, make_pixels
from pipelines.sources import SourceError, open_source, unused_totals
from pipelines.sources import wds as sources_wds

JPG = encode(make_pixels(20, 30, 1), "JPEG")


def jpeg(i: int) -> bytes:
    return encode(make_pixels(24 + i % 5, 30 + i % 7, i), "JPEG")


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", *, link: str = "", hard: bool = False) -> None:
    info = tarfile.TarInfo(name)
    if link:
        info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), link
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def img2dataset_shard(path, first: int, n: int, *, npy: bool = False, extra_json=None) -> list[str]:
    """n samples numbered from `first`, in img2dataset's member order: jpg, txt, json (url, caption, key,
    status, width, height), cls (label i % 7); `npy` adds an embedding member. Returns the captions."""
    captions = []
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + n):
            key = f"{i:09d}"
            caption = f"a photo number {i} of something"
            fields = {"url": f"https://example.com/{i}.jpg", "caption": caption, "key": key, "status": "success",
                      "width": 30, "height": 24, **((extra_json or {}).get(i, {}))}
            add(tar, f"{key}.jpg", jpeg(i))
            add(tar, f"{key}.txt", caption.encode())
            add(tar, f"{key}.json", json.dumps(fields).encode())
            add(tar, f"{key}.cls", str(i % 7).encode())
            if npy:
                add(tar, f"{key}.npy", b"\x93NUMPY fake embedding")
            captions.append(caption)
    return captions


@pytest.fixture
def img2dataset(tmp_path):
    root = tmp_path / "laion"
    root.mkdir()
    captions = img2dataset_shard(root / "00000.tar", 0, 8, npy=True) + img2dataset_shard(root / "00001.tar", 8, 6)
    return root, captions


def test_a_member_extension_is_a_meta_field(img2dataset):
    root, captions = img2dataset
    src = open_source(f"wds:{root}/{{00000..00001}}.tar", meta_fields=("txt",))
    records = list(src)
    assert [r.meta for r in records] == [{"txt": c} for c in captions]
    assert [r.label for r in records] == [i % 7 for i in range(14)]
    # Mixed with json fields; a name seen as both is the member's.
    both = list(open_source(f"wds:{root}/00000.tar", meta_fields=("txt", "url", "status")))
    assert both[3].meta == {"txt": captions[3], "url": "https://example.com/3.jpg", "status": "success"}
    raw = list(open_source(f"wds:{root}/00001.tar", meta_fields=("json",)))
    assert json.loads(raw[0].meta["json"])["caption"] == captions[8]


def test_unused_members_are_counted_per_record(img2dataset):
    root, _ = img2dataset
    spec = f"wds:{root}/{{00000..00001}}.tar"
    plain = list(open_source(spec))
    assert plain[0].unused == ("txt", "json", "npy") and plain[8].unused == ("txt", "json")
    assert dict(unused_totals(plain)) == {"txt": 14, "json": 14, "npy": 8}
    captioned = list(open_source(spec, meta_fields=("txt",)))  # the json is not read for a member field
    assert dict(unused_totals(captioned)) == {"json": 14, "npy": 8}
    with_json = list(open_source(spec, meta_fields=("caption",)))
    assert dict(unused_totals(with_json)) == {"txt": 14, "npy": 8}
    unlabelled = list(open_source(spec, labels="none"))
    assert dict(unused_totals(unlabelled)) == {"txt": 14, "json": 14, "cls": 14, "npy": 8}
    totals = unused_totals(plain[:3])
    assert unused_totals(plain[3:], totals) is totals and totals == unused_totals(plain)


def test_members_of_no_sample_are_counted_with_their_neighbour(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "README", b"about this shard")
        add(tar, "a.jpg", JPG)
        add(tar, "._a.jpg", b"apple double")
        add(tar, "b.jpg", JPG)
    records = list(open_source(f"wds:{path}"))
    assert [(r.key, r.unused) for r in records] == [("s.tar/a", ("<no_extension>", "<hidden>")), ("s.tar/b", ())]


def test_a_misspelt_or_absent_meta_field_is_refused_at_open(img2dataset):
    root, _ = img2dataset
    spec = f"wds:{root}/{{00000..00001}}.tar"
    with pytest.raises(SourceError) as error:
        open_source(spec, meta_fields=("captoin",))
    message = str(error.value)
    assert "'captoin'" in message and "\n" not in message
    assert "first 14 samples (00000.tar, 00001.tar)" in message
    assert "json fields: caption, height, key, status, url, width" in message
    assert "member extensions: cls, json, npy, txt" in message
    with pytest.raises(SourceError, match="'nope', 'nada' not found"):
        open_source(spec, meta_fields=("txt", "nope", "nada"))
    with pytest.raises(SourceError, match="names the image member"):
        open_source(spec, meta_fields=("jpg",))


def test_the_meta_field_check_reads_the_first_100_samples(tmp_path):
    """A field first seen in sample 100 passes; one first seen in sample 101 is refused (PROBE_SAMPLES)."""
    assert sources_wds.PROBE_SAMPLES == 100
    img2dataset_shard(tmp_path / "a.tar", 0, 60)
    img2dataset_shard(tmp_path / "b.tar", 60, 60, extra_json={99: {"seen": 1}, 100: {"late": 1}})
    spec = f"wds:{tmp_path}/{{a,b}}.tar"
    records = list(open_source(spec, meta_fields=("seen",)))
    assert [r.meta["seen"] for r in records].count(1) == 1 and records[0].meta["seen"] == ""
    with pytest.raises(SourceError, match=r"'late' not found in the first 100 samples \(a.tar, b.tar\)"):
        open_source(spec, meta_fields=("late",))


def test_damaged_first_shards_do_not_stop_the_check(tmp_path):
    (tmp_path / "0.tar").write_bytes(b"not a tar at all" * 64)
    img2dataset_shard(tmp_path / "1.tar", 0, 3)
    spec = f"wds:{tmp_path}/{{0..1}}.tar"
    assert [r.reject for r in open_source(spec, meta_fields=("txt",))] == ["corrupt_tar", None, None, None]
    with pytest.raises(SourceError, match="first 3 samples"):
        open_source(spec, meta_fields=("captoin",))
    # No readable sample in the first shards: nothing to check against, the records say why.
    only_bad = open_source(f"wds:{tmp_path}/0.tar", meta_fields=("captoin",))
    assert [r.reject for r in only_bad] == ["corrupt_tar"]


def test_label_description_reports_the_labels_of_the_first_samples(img2dataset, tmp_path):
    root, _ = img2dataset
    spec = f"wds:{root}/{{00000..00001}}.tar"
    assert open_source(spec).label_description() == "from .cls members: 7 distinct labels (0..6) in the first 14 samples"
    assert open_source(spec, labels="none").label_description() == "none: every label is -1"
    assert open_source(f"{spec}?label=width").label_description() == \
        "from json field 'width': 1 distinct labels (30..30) in the first 14 samples"
    assert open_source(f"{spec}?label=nope").label_description() == \
        "from json field 'nope': none in the first 14 samples (unlabelled: -1)"
    with tarfile.open(tmp_path / "some.tar", "w") as tar:
        for i in range(4):
            add(tar, f"{i}.jpg", JPG)
            if i % 2:
                add(tar, f"{i}.cls", b"5")
    assert open_source(f"wds:{tmp_path}/some.tar").label_description() == \
        "from .cls members: 1 distinct labels (5..5) in the first 4 samples; 2 unlabelled (-1)"


def test_link_members_are_rejected_link_member(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "a.jpg", JPG)
        add(tar, "b.jpg", link="a.jpg")  # the sample's only image is a symlink
        add(tar, "c.jpg", link="a.jpg", hard=True)  # or a hard link
        add(tar, "d.jpg", JPG)
        add(tar, "d.png", link="/etc/passwd")  # a second image that is a link: its own rejection
        add(tar, "e.jpg", JPG)
        add(tar, "e.cls", link="a.cls")  # a member the record needs (labels from cls)
        add(tar, "f.jpg", JPG)
        add(tar, "f.txt", link="elsewhere.txt")  # a member no one asked for
    records = [(r.key, r.reject, r.unused) for r in open_source(f"wds:{path}")]
    assert records == [("s.tar/a", None, ()), ("s.tar/b", "link_member", ()), ("s.tar/c", "link_member", ()),
                       ("s.tar/d", None, ()), ("s.tar/d.png", "link_member", ()), ("s.tar/e", "link_member", ()),
                       ("s.tar/f", None, ("txt",))]
    details = {r.key: r.detail for r in open_source(f"wds:{path}")}
    assert "symlink to 'a.jpg'" in details["s.tar/b"] and "hard link to 'a.jpg'" in details["s.tar/c"]
    assert "'/etc/passwd'" in details["s.tar/d.png"]
    with_txt = {r.key: r.reject for r in open_source(f"wds:{path}", meta_fields=("txt",))}
    assert with_txt["s.tar/f"] == "link_member"  # now the link stands where a requested member should be


def test_member_names_cannot_climb_out_of_the_shard(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("../../etc/passwd.jpg", "/abs/x.jpg", "./y.jpg", "a//b/./z.jpg", "a/../b.jpg", "ok.jpg"):
            add(tar, name, JPG)
    records = [(r.key, r.reject) for r in open_source(f"wds:{path}")]
    assert records == [("s.tar/%2E%2E/%2E%2E/etc/passwd", "unsafe_key"), ("s.tar/abs/x", None), ("s.tar/y", None),
                       ("s.tar/a/b/z", None), ("s.tar/a/%2E%2E/b", "unsafe_key"), ("s.tar/ok", None)]
    detail = next(r.detail for r in open_source(f"wds:{path}") if r.reject)
    assert "'../../etc/passwd.jpg'" in detail
    assert sources_wds.member_name("/a//./b.jpg") == ("a/b.jpg", False)
    assert sources_wds.member_name("x/../../y.jpg") == ("x/../../y.jpg", True)


# ----------------------------------------------------------------------------- through the CLI
def test_pack_carries_captions_and_refuses_a_misspelt_field(img2dataset, tmp_path, capsys):
    pytest.importorskip("apache_beam")
    import packer
    import schemas
    from pipelines import cli
    root, captions = img2dataset
    out = tmp_path / "out"
    argv = ["pack", "--input", f"wds:{root}/{{00000..00001}}.tar", "--output", str(out), "--seq-len", "64",
            "--resolution", "uniform:16:32", "--format", "parquet", "--no-progress"]
    assert cli.main(argv + ["--meta-fields", "txt,url"]) == 0
    summary = capsys.readouterr().out
    assert "from .cls members: 7 distinct labels (0..6) in the first 14 samples" in summary
    assert "unused members      8 .npy (not packed; --meta-fields EXT carries one)" in summary  # json and txt are used
    assert schemas.read_manifest(str(out))["unused_members"] == {"npy": 8}
    images = {im.key: im for rec in schemas.read(str(out)) for im in packer.unpack(rec)}
    assert len(images) == 14
    for i, caption in enumerate(captions):
        image = images[f"{'00000' if i < 8 else '00001'}.tar/{i:09d}"]
        assert image.meta["txt"] == caption and image.meta["url"] == f"https://example.com/{i}.jpg"
        assert image.label == i % 7
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv[:4] + [str(tmp_path / "o2")] + argv[5:] + ["--meta-fields", "captoin"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("navit-pack: error: --input") and "'captoin'" in err[0]
    assert "caption" in err[0] and "txt" in err[0]
    assert not (tmp_path / "o2").exists()
