"""The Beam packing pipeline: determinism across worker counts, rejects that reconcile, epochs, and
agreement with the single-process packer. Inputs are a few dozen small images made here."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("apache_beam")

import packer  # noqa: E402
from conftest import image_folder, jpeg  # noqa: E402
import schemas  # noqa: E402
from pipelines import batch as bp  # noqa: E402


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """30 images in 3 class folders, plus an undecodable file and an empty one."""
    root = tmp_path_factory.mktemp("imgs")
    image_folder(root, 30, classes=["class0", "class1", "class2"], seed=1, sizes=(24, 300))
    (root / "class0" / "broken.jpg").write_bytes(b"this is not an image")
    (root / "class1" / "empty.jpg").write_bytes(b"")
    return str(root)


def _job(image_dir, out, **kw) -> bp.PackJob:
    cfg = kw.pop("config", packer.PackConfig(seq_len=128, resolution="uniform:32:160", token_drop="beta:0.2:0.5"))
    kw.setdefault("run_id", "t0")  # one run id, so that two runs' folders compare file by file
    return bp.PackJob(input=image_dir, output=str(out), config=cfg, **kw)


def _files(directory) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("fmt", ["tfrecord", "parquet", "array_record"])
def test_output_byte_identical_with_one_and_two_worker_processes(image_dir, tmp_path, fmt):
    job1 = _job(image_dir, tmp_path / "w1", fmt=fmt, num_shards=3, group_size=8, epochs=2)
    job2 = _job(image_dir, tmp_path / "w2", fmt=fmt, num_shards=3, group_size=8, epochs=2)
    bp.run_pack(job1, workers=1)  # the local path (packing core, one fill process)
    bp.run_pack(job2, beam_args=["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                                 "--direct_num_workers=2"])  # Beam: DoFns pickled into 2 worker processes
    one, two = _files(job1.output), _files(job2.output)
    assert len([n for n in one if n.startswith("packed-")]) == 6  # 2 epochs x 3 shards
    assert one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], f"{name} differs between the local path and Beam on 2 workers"


def test_rejects_reconcile_and_nothing_is_lost(image_dir, tmp_path):
    job = _job(image_dir, tmp_path / "out", num_shards=2, group_size=10)
    manifest = bp.run_pack(job)
    assert manifest["num_images_in"] == 32
    assert manifest["num_images_in"] == manifest["num_images_packed"] + manifest["num_rejected"]
    written = json.load(open(tmp_path / "out" / "manifest.json"))
    assert written["libraries"] == packer.library_versions()  # pixel bytes depend on these versions
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "rejects-t0.jsonl")]
    assert {(r["key"], r["reason"]) for r in rejects} == {("class0/broken.jpg", "undecodable"),
                                                          ("class1/empty.jpg", "empty")}
    records = list(schemas.read(job.output))
    packed_keys = [str(k) for r in records for k in r["image_keys"][: int(r["num_images"])]]
    assert len(packed_keys) == len(set(packed_keys)) == manifest["num_images_packed"] == 30
    assert sum(int(np.count_nonzero(r["segment_ids"])) for r in records) == manifest["tokens_real"]
    assert {int(v) for r in records for v in r["labels"][: int(r["num_images"])]} == {0, 1, 2}


def test_duplicate_keys_across_units_are_rejected(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for part, keys in enumerate([["a", "b", "dup"], ["c", "dup", "d"]]):
        table = pa.table({"image": [jpeg(40 + 8 * i, 64, 10 * part + i) for i in range(3)], "key": keys,
                          "label": [part, part, part]})
        pq.write_table(table, tmp_path / f"part{part}.parquet")
    job = bp.PackJob(input=f"parquet:{tmp_path}/*.parquet", output=str(tmp_path / "out"),
                     config=packer.PackConfig(seq_len=64, resolution="budget:32"), run_id="t0")
    manifest = bp.run_pack(job)
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "rejects-t0.jsonl")]
    assert [(r["key"], r["reason"]) for r in rejects] == [("dup", "duplicate_key")]
    assert (manifest["num_images_in"], manifest["num_images_packed"], manifest["num_rejected"]) == (6, 5, 1)


def test_single_group_matches_the_single_process_packer(image_dir, tmp_path):
    job = _job(image_dir, tmp_path / "out", fmt="parquet", group_size=1000)
    bp.run_pack(job)
    from pipelines import sources

    source = sources.open_source(image_dir)
    items = sorted(source, key=lambda r: (bp.order_fraction(0, r.key, 0), r.key))
    images = []
    for r in items:
        try:
            images.append(packer.prepare_image(r.data, r.key, job.config, label=r.label,
                                               images_seen=bp.images_seen(0, r.key, 0, 32)))
        except packer.ImageRejected:
            pass
    expected = list(packer.pack_patched(images, job.config))
    got = list(schemas.read(job.output))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for name in b:
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


def test_epochs_resample_every_image(image_dir, tmp_path):
    job = _job(image_dir, tmp_path / "out", epochs=2, num_shards=1)
    manifest = bp.run_pack(job)
    assert manifest["num_images_in"] == 64 and manifest["epochs"] == 2
    grids: dict[str, list] = {}
    for r in schemas.read(job.output):
        for i in range(int(r["num_images"])):
            grids.setdefault(str(r["image_keys"][i]), []).append((int(r["grid_h"][i]), int(r["grid_w"][i])))
    assert len(grids) == 30 and all(len(g) == 2 for g in grids.values())
    assert sum(g[0] != g[1] for g in grids.values()) >= 10  # resolution sampled per (key, epoch)


def test_reject_budget_fails_after_writing_rejects(image_dir, tmp_path):
    job = _job(image_dir, tmp_path / "out", max_reject_fraction=0.01)
    with pytest.raises(packer.RejectBudgetExceeded, match="max-reject-fraction"):
        bp.run_pack(job)
    assert (tmp_path / "out" / "rejects-t0.jsonl").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_layout_functions():
    job = bp.PackJob(input="x", output="y", group_size=100, num_shards=None)
    assert bp.layout(1, job) == (1, 1)
    assert bp.layout(250, job) == (3, 3)
    assert bp.layout(250, bp.PackJob(input="x", output="y", group_size=100, num_shards=8)) == (3, 8)
    assert bp.layout(250, bp.PackJob(input="x", output="y", group_size=100, num_shards=2)) == (2, 2)
    parts = bp.job.split_contiguous(list(range(10)), 3)
    assert [list(p) for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    seen = [bp.images_seen(0, f"k{i}", 1, 50) for i in range(200)]
    assert all(50 <= s < 100 for s in seen) and len(set(seen)) > 30
    with pytest.raises(ValueError, match="fmt"):
        bp.PackJob(input="x", output="y", fmt="csv")
