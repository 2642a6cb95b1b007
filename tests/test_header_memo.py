"""A folder's header pass: plain-JPEG sizes read through a file descriptor (few bytes of a large file), and
kept per unit with each file's identity, so that a later pass stats an unchanged file instead of reading it,
and reads any changed, replaced or vanished file again."""
from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest

from conftest import encode, jpeg
from pipelines.sources import files
from pipelines.sources.base import Listed
from pipelines.sources.files import FileSource


def _folder(tmp_path, n=6):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(n):
        (root / f"img{i}.jpg").write_bytes(jpeg(20 + i, 30 + i, i))
    (root / "p.png").write_bytes(encode(np.zeros((9, 7, 3), np.uint8), "PNG"))
    return root


def _sizes(source):
    return {r.key: (r.size, r.reject) for u in source.units() for r in source.headers(u, 10**9)}


@pytest.fixture
def opened(monkeypatch):
    """The paths the header pass opens (files.open_local), in order."""
    seen = []
    real = files.open_local

    def counting(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(files, "open_local", counting)
    return seen


def test_unchanged_files_are_not_read_again(tmp_path, opened):
    root = _folder(tmp_path)
    source = FileSource.from_spec(str(root), labels="none")
    first = _sizes(source)
    assert first["img3.jpg"] == ((23, 33), None) and first["p.png"] == ((9, 7), None)
    assert sorted(opened) == sorted(os.listdir(root))
    opened.clear()
    assert _sizes(source) == first
    assert opened == ["p.png"]  # only what is not a plain JPEG (its size needs its bytes)
    opened.clear()
    assert _sizes(FileSource.from_spec(str(root), labels="none")) == first and len(opened) == 7  # a new source reads


def test_a_memo_hit_lists_the_same_record(tmp_path):
    """A listing and a memo hit build their Listed without the dataclass's __init__ (Listed.by_ref): the same
    records as the dataclass's."""
    source = FileSource.from_spec(str(_folder(tmp_path)), labels="none", meta_fields=("path",))
    listed = [[r for r in source.headers(u, 10**9)] for u in source.units()]
    again = [[r for r in source.headers(u, 10**9)] for u in source.units()]
    assert again == listed
    assert [r.__dict__ for u in again for r in u] == [r.__dict__ for u in listed for r in u]
    made = Listed.by_ref("k", 3, {"path": "x"}, "k", (4, 5))
    assert made.__dict__ == Listed("k", 3, {"path": "x"}, size=(4, 5), ref="k").__dict__
    assert Listed.by_ref("k", None, {}, "r").__dict__ == Listed("k", None, {}, ref="r").__dict__
    assert dataclasses.replace(made, label=1) == Listed("k", 1, {"path": "x"}, size=(4, 5), ref="k")


def test_changed_replaced_and_vanished_files_are_read_again(tmp_path, opened):
    root = _folder(tmp_path)
    source = FileSource.from_spec(str(root), labels="none")
    _sizes(source)
    st = os.stat(root / "img1.jpg")
    (root / "img1.jpg").write_bytes(jpeg(50, 60, 9))  # rewritten in place, another size
    (root / "tmp.jpg.part").write_bytes(jpeg(40, 20, 5))  # replaced by a rename: a new inode
    os.replace(root / "tmp.jpg.part", root / "img2.jpg")
    data = (root / "img4.jpg").read_bytes()  # same bytes written back, mtime restored: ctime tells
    st4 = os.stat(root / "img4.jpg")
    (root / "img4.jpg").write_bytes(data)
    os.utime(root / "img4.jpg", ns=(st4.st_atime_ns, st4.st_mtime_ns))
    os.remove(root / "img5.jpg")
    opened.clear()
    again = _sizes(source)
    assert again["img1.jpg"] == ((50, 60), None) and again["img2.jpg"] == ((40, 20), None)
    assert again["img4.jpg"] == ((24, 34), None) and again["img5.jpg"][1] == "missing"
    assert sorted(opened) == ["img1.jpg", "img2.jpg", "img4.jpg", "img5.jpg", "p.png"]  # img5: tried, gone
    assert st.st_ino == os.stat(root / "img1.jpg").st_ino  # img1 kept its inode: its size and times told


def test_memo_is_per_max_pixels_and_not_copied(tmp_path, opened):
    root = _folder(tmp_path)
    source = FileSource.from_spec(str(root), labels="none")
    _sizes(source)
    opened.clear()
    small = {r.key: (r.size, r.header_reject) for u in source.units() for r in source.headers(u, 600)}
    assert small["img0.jpg"] == ((20, 30), None) and small["img5.jpg"][1][0] == "too_many_pixels"
    assert len(opened) == 7  # another max_pixels: read again
    for copy in (pickle.loads(pickle.dumps(source)), source.reader()):
        assert copy._memo == {}


def test_descriptor_header_read_takes_few_bytes(tmp_path, monkeypatch):
    big = encode(np.random.default_rng(0).integers(0, 256, (900, 800, 3), dtype=np.uint8), quality=95)
    (tmp_path / "big.jpg").write_bytes(big)
    taken = []
    real = os.pread

    def counting(fd, n, offset):
        out = real(fd, n, offset)
        taken.append(len(out))
        return out

    monkeypatch.setattr(os, "pread", counting)
    source = FileSource.from_spec(str(tmp_path), labels="none")
    (record,) = [r for u in source.units() for r in source.headers(u, 10**9)]
    assert record.size == (900, 800) and record.data is None
    assert 0 < sum(taken) <= 8192 < len(big) // 10
