"""Folder and glob listing: symlink loops and aliases listed once, a file read once by its real path, and
everything that is not an image counted by reason (`Source.skipped`) or rejected with a reason."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from conftest import encode, make_pixels
from pipelines.sources import SourceError, open_source
from pipelines.sources.files import SKIP_REASONS


def write_image(path, seed: int = 0, fmt: str = "PNG") -> bytes:
    data = encode(make_pixels(24 + seed, 32, seed), fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def rejects_of(src) -> dict[str, str]:
    return {r.key: r.reject for r in src if r.reject is not None}


def packed_keys(src) -> list[str]:
    return [r.key for r in src if r.reject is None]


@pytest.fixture
def looped(tmp_path):
    """root/{cat,dog}/ with one image each, `loop -> .` at the top and `cat/up -> ..` (both loops)."""
    root = tmp_path / "images"
    write_image(root / "cat" / "a.png", 1)
    write_image(root / "dog" / "b.png", 2)
    os.symlink(".", root / "loop")
    os.symlink("..", root / "cat" / "up")
    return root


def test_a_symlink_loop_lists_each_image_once(looped):
    src = open_source(str(looped))
    assert [r.key for r in src] == ["cat/a.png", "dog/b.png"]
    assert src.class_names == ("cat", "dog")  # no "loop" class, no "some images sit in sub-folders" error
    assert src.skipped == {"symlink_loop": 2}
    assert sorted(src.skipped_examples["symlink_loop"]) == ["cat/up -> ..", "loop -> ."]
    assert [r.key for r in open_source(str(looped / "**" / "*.png"))] == ["cat/a.png", "dog/b.png"]


def test_two_loops_in_one_folder_do_not_multiply(tmp_path):
    """glob's `**` follows both: 2^40 paths. The walk lists each real folder once."""
    root = tmp_path / "flat"
    write_image(root / "x.png")
    os.symlink(".", root / "a")
    os.symlink(".", root / "b")
    src = open_source(str(root))
    assert [r.key for r in src] == ["x.png"] and src.skipped == {"symlink_loop": 2}
    assert [r.key for r in open_source(str(root / "**" / "*.png"))] == ["x.png"]


def test_folder_symlinks_are_followed_once_and_real_folders_win(tmp_path):
    outside = tmp_path / "outside"
    write_image(outside / "o.png", 3)
    root = tmp_path / "images"
    write_image(root / "cat" / "a.png", 1)
    os.symlink(outside, root / "ext")  # a folder elsewhere: followed
    os.symlink(outside, root / "ext2")  # the same folder again: not followed
    os.symlink("cat", root / "alias")  # sorts before "cat", but the real folder is the one listed
    src = open_source(str(root), labels="none")
    assert [r.key for r in src] == ["cat/a.png", "ext/o.png"]
    assert src.skipped == {"folder_seen": 2}
    assert sorted(src.skipped_examples["folder_seen"]) == ["alias -> cat", "ext2 -> ext"]


def test_a_file_reached_by_two_paths_is_read_once(tmp_path):
    """The file's own path is kept; a symlink to it is rejected `duplicate_file` naming the kept key. Two
    symlinks to a file outside: the first in key order is kept. A hard link is a separate file; a broken
    symlink with an image name is `missing`."""
    outside = tmp_path / "pool"
    write_image(outside / "o.png", 3)
    root = tmp_path / "images"
    a = write_image(root / "a.png", 1)
    os.symlink("a.png", root / "0_link_to_a.png")
    os.symlink(outside / "o.png", root / "l1.png")
    os.symlink(outside / "o.png", root / "l2.png")
    os.link(root / "a.png", root / "hard.png")
    os.symlink(root / "nothing.png", root / "broken.png")
    src = open_source(str(root))
    records = {r.key: r for r in src}
    assert sorted(records) == ["0_link_to_a.png", "a.png", "broken.png", "hard.png", "l1.png", "l2.png"]
    assert {k: r.reject for k, r in records.items()} == {
        "0_link_to_a.png": "duplicate_file", "a.png": None, "broken.png": "missing", "hard.png": None,
        "l1.png": None, "l2.png": "duplicate_file"}
    assert "'a.png'" in records["0_link_to_a.png"].detail and "'l1.png'" in records["l2.png"].detail
    assert "symlink" in records["broken.png"].detail
    assert records["a.png"].data == records["hard.png"].data == a and records["0_link_to_a.png"].data == b""
    # The same through a glob, after pickling (what a worker gets), and unit by unit.
    clone = pickle.loads(pickle.dumps(open_source(str(root / "*.png"))))
    assert {r.key: r.reject for u in clone.units() for r in clone.read(u)} == {k: r.reject for k, r in records.items()}


def test_what_is_not_an_image_is_counted_by_reason(tmp_path):
    root = tmp_path / "images"
    write_image(root / "cat" / "a.jpg", 1, "JPEG")
    (root / "cat" / "x.jpg").mkdir()  # a folder named like an image, empty
    inner = write_image(root / "cat" / "y.png" / "inner.png", 2)  # one named like an image, holding one
    (root / "cat" / "notes.txt").write_text("hello")
    (root / "cat" / "._a.jpg").write_bytes(b"apple double")
    (root / ".DS_Store").write_bytes(b"finder")
    write_image(root / ".cache" / "thumb.png", 3)
    write_image(root / ".cache" / "thumb2.png", 4)
    (root / "cat" / "data.json").write_text("{}")
    os.mkfifo(root / "cat" / "pipe")
    src = open_source(str(root), labels="none")
    assert [r.key for r in src] == ["cat/a.jpg", "cat/y.png/inner.png"]
    assert {r.key: r.data for r in src}["cat/y.png/inner.png"] == inner
    assert src.skipped == {"folder_named_like_image": 2, "hidden": 3, "other_extension": 3}
    assert sorted(src.skipped_examples["folder_named_like_image"]) == ["cat/x.jpg/", "cat/y.png/"]
    assert sorted(src.skipped_examples["hidden"]) == [".DS_Store", ".cache", "cat/._a.jpg"]
    assert sorted(src.skipped_examples["other_extension"]) == ["cat/data.json", "cat/notes.txt", "cat/pipe"]
    assert set(src.skipped) <= set(SKIP_REASONS)
    # A glob counts only what it matches: `*.jpg` names the folder x.jpg and the hidden ._a.jpg, not notes.txt.
    globbed = open_source(str(root / "*" / "*.jpg"), labels="none")
    assert [r.key for r in globbed] == ["cat/a.jpg"]
    assert globbed.skipped == {"folder_named_like_image": 1, "hidden": 1}
    assert pickle.loads(pickle.dumps(src)).skipped == src.skipped


def test_examples_are_capped_and_sources_without_a_listing_skip_nothing(tmp_path):
    write_image(tmp_path / "a.png")
    for i in range(10):
        (tmp_path / f"n{i}.txt").write_text("x")
    src = open_source(str(tmp_path))
    assert src.skipped == {"other_extension": 10} and len(src.skipped_examples["other_extension"]) == 3
    assert open_source("synthetic:3").skipped == {}
    assert open_source(str(tmp_path / "a.png")).skipped == {}


def test_nothing_but_unusable_files_is_an_error_that_says_why(tmp_path):
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    (tmp_path / "n.txt").write_text("x")
    with pytest.raises(SourceError, match="no usable image file: 1 missing"):
        open_source(str(tmp_path))
    (tmp_path / "broken.png").unlink()
    with pytest.raises(SourceError, match="no image files .* found; skipped: 1 other_extension"):
        open_source(str(tmp_path))


def test_a_folder_that_cannot_be_listed_is_rejected_by_its_path(tmp_path, monkeypatch):
    """The folder's path is the rejection's key (its files cannot be named). chmod 000 stops only non-root
    users, so the listing call is made to fail as it would for them."""
    write_image(tmp_path / "ok" / "a.png")
    write_image(tmp_path / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("/locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    src = open_source(str(tmp_path))
    assert rejects_of(src) == {"locked": "unreadable"} and packed_keys(src) == ["ok/a.png"]
    assert "Permission denied" in {r.key: r.detail for r in src}["locked"]
    assert src.class_names == ("ok",)


def test_pack_over_a_looped_folder_packs_each_image_once(looped, tmp_path, capsys):
    pytest.importorskip("apache_beam")
    import schemas
    from pipelines import cli
    os.symlink("a.png", looped / "cat" / "again.png")
    (looped / "dog" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert cli.main(["pack", "--input", str(looped), "--output", str(out), "--seq-len", "64", "--resolution",
                     "uniform:16:32", "--format", "parquet", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    packed = sorted(k for rec in schemas.read(str(out)) for k in rec["image_keys"][: int(rec["num_images"])])
    assert packed == ["cat/a.png", "dog/b.png"]
    rejects = [json.loads(line) for line in open(schemas.rejects_path(str(out))).read().splitlines()]
    assert [(r["key"], r["reason"]) for r in rejects] == [("cat/again.png", "duplicate_file")]
    assert manifest["num_images_in"] == 3 == manifest["num_images_packed"] + manifest["num_rejected"]
    assert manifest["skipped"]["other_extension"] == 1
    summary = capsys.readouterr().out
    assert "1 other_extension" in next(line for line in summary.splitlines() if line.strip().startswith("skipped"))


def test_remote_listings_count_what_they_skip_too(tmp_path, monkeypatch):
    """gs:// and other schemes are listed by Beam's FileSystems (no folders, no symlinks there): hidden files
    and other extensions are counted the same way. Here on a local folder, as if it were remote."""
    pytest.importorskip("apache_beam")
    from pipelines.sources import files
    write_image(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "notes.txt").write_text("x")
    (tmp_path / "cat" / "._a.png").write_bytes(b"apple double")
    monkeypatch.setattr(files, "has_scheme", lambda path: True)
    src = open_source(str(tmp_path))
    assert src.use_beam and [r.key for r in src] == ["cat/a.png"]
    assert src.skipped == {"hidden": 1, "other_extension": 1}
