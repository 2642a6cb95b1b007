"""The local batch path (pipelines.batch.local: the packing core over fill worker processes) against the
Beam pipeline: byte-identical shards, rejects and manifest; any worker count; a crashed worker costs only
its image; the reject budget fails early with one line. Inputs are small JPEGs made here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import packer
import schemas
from conftest import image_folder, jpeg

from pipelines import batch as bp


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """36 JPEGs in 3 class folders, an undecodable file, an empty one, and one whose body is cut short (its
    header plans, its decode fails: a fill-time reject)."""
    root = tmp_path_factory.mktemp("imgs")
    image_folder(root, 36, classes=["class0", "class1", "class2"], seed=3, sizes=(20, 200))
    (root / "class0" / "broken.jpg").write_bytes(b"not an image at all")
    (root / "class1" / "empty.jpg").write_bytes(b"")
    (root / "class2" / "cut.jpg").write_bytes(jpeg(120, 90, 99)[:1500])
    return str(root)


def _job(src, out, **kw) -> bp.PackJob:
    cfg = packer.PackConfig(seq_len=96, resolution="uniform:24:128", token_drop="beta:0.2:0.5")
    kw.setdefault("run_id", "t0")  # one run id, so that two runs' folders compare file by file
    return bp.PackJob(input=src, output=str(out), config=cfg, **kw)


def _files(directory) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_local_path_and_beam_direct_runner_write_identical_bytes(image_dir, tmp_path):
    pytest.importorskip("apache_beam")
    kw = dict(fmt="tfrecord", num_shards=3, group_size=10, epochs=2)
    local = _job(image_dir, tmp_path / "local", **kw)
    beam = _job(image_dir, tmp_path / "beam", **kw)
    bp.run_pack(local, workers=2)
    bp.run_pack(beam, beam_args=["--runner=DirectRunner"])
    a, b = _files(local.output), _files(beam.output)
    assert len([n for n in a if n.startswith("packed-")]) == 6
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs between the local path and Beam"
    reasons = {json.loads(line)["reason"] for line in a["rejects-t0.jsonl"].decode().splitlines()}
    assert {"undecodable", "empty"} <= reasons


def test_any_worker_count_writes_identical_bytes(image_dir, tmp_path):
    outs = []
    for workers in (1, 3):
        job = _job(image_dir, tmp_path / f"w{workers}", fmt="parquet", num_shards=2, group_size=12)
        bp.run_pack(job, workers=workers)
        outs.append(_files(job.output))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_worker_encoded_records_equal_the_writers_own(image_dir, tmp_path, fmt):
    """The workers encode each record (schemas.record_encoder); rows whose keys overflow that room are encoded
    by the writer. Either way the shards equal those of the in-process run (workers=0: the writer encodes)."""
    if fmt == "array_record":
        pytest.importorskip("array_record")
    deep = tmp_path / "in" / ("d" * 200) / ("e" * 200)  # keys of 400+ characters: past the encoder's room
    deep.mkdir(parents=True)
    for i in range(3):
        (deep / f"long{i}.jpg").write_bytes(jpeg(60 + 10 * i, 80, 500 + i))
    for i in range(12):
        (tmp_path / "in" / f"short{i}.jpg").write_bytes(jpeg(40 + 7 * i, 90, 600 + i))
    outs = []
    for workers in (0, 2):
        job = _job(str(tmp_path / "in"), tmp_path / f"w{workers}", fmt=fmt, labels="none")
        bp.run_pack(job, workers=workers)
        outs.append(_files(job.output))
    assert outs[0] == outs[1]
    assert any(len(k) > 400 for r in schemas.read(str(tmp_path / "w2")) for k in r["image_keys"])


def _decodes(path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure: not a usable image
        return False


def test_crashed_worker_costs_only_its_image(image_dir, tmp_path, monkeypatch):
    """The expectation comes from the images: the key whose worker crashes is rejected worker_crashed, the
    images that do not decode are rejected for their own reasons, and every other image is packed once."""
    victim = "class1/img04.jpg"
    files = sorted(os.path.relpath(os.path.join(d, f), image_dir) for d, _, fs in os.walk(image_dir) for f in fs)
    good = {k for k in files if _decodes(os.path.join(image_dir, k))}
    assert victim in good and len(good) < len(files)  # the fixture has bad images, and the victim is not one
    monkeypatch.setenv(packer._worker.CRASH_KEY_ENV, victim)
    outs = []
    for run in range(2):
        job = _job(image_dir, tmp_path / f"run{run}", num_shards=2)
        manifest = bp.run_pack(job, workers=2)
        rejects = {r["key"]: r["reason"] for r in map(json.loads, open(schemas.rejects_path(job.output)))}
        assert rejects[victim] == "worker_crashed"
        assert set(rejects) == set(files) - good | {victim}
        assert all(reason != "worker_crashed" for key, reason in rejects.items() if key != victim)
        keys = [k for rec in schemas.read(job.output) for k in rec["image_keys"][: int(rec["num_images"])]]
        assert sorted(keys) == sorted(good - {victim})  # every other image, once
        assert manifest["num_images_in"] == len(files) and manifest["num_rejected"] == len(rejects)
        outs.append(_files(job.output))
    assert outs[0] == outs[1]  # deterministic despite the crash


@pytest.fixture(scope="module")
def mostly_broken(tmp_path_factory):
    """150 inputs, 120 of them undecodable."""
    root = tmp_path_factory.mktemp("broken")
    for i in range(150):
        (root / f"f{i:03d}.jpg").write_bytes(jpeg(24, 24, i) if i % 5 == 0 else b"garbage %d" % i)
    return str(root)


def test_reject_budget_fails_while_packing_and_leaves_no_output(mostly_broken, tmp_path):
    job = _job(mostly_broken, tmp_path / "out", max_reject_fraction=0.5)
    with pytest.raises(packer.RejectBudgetExceeded, match=r"\d+ of (\d+) images rejected .*undecodable") as e:
        bp.run_pack(job, workers=1)
    seen = int(str(e.value).split(" of ")[1].split()[0])
    assert packer._core.FRACTION_MIN_IMAGES <= seen < 150  # failed before the input was used up
    assert not [n for n in os.listdir(job.output) if n.startswith("packed-") or n == "manifest.json"]
    with pytest.raises(schemas.ManifestMissing):
        list(schemas.read(job.output))


def test_reject_budget_cli_prints_one_line(mostly_broken, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "pack", "--no-progress", "--input", mostly_broken,
                        "--output", str(tmp_path / "o"), "--max-reject-fraction", "0.5", "--seq-len", "64"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("navit-pack: error:") and "--max-reject-fraction 0.5" in lines[0]


def test_summary_separates_reading_from_packing(image_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "pack", "--no-progress", "--input", image_dir,
                        "--output", str(tmp_path / "o"), "--seq-len", "64", "--workers", "1"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 0, r.stderr
    rows = {line.split("  ")[1].strip() for line in r.stdout.splitlines() if line.startswith("  ")}
    assert {"reading input", "packing", "wall time"} <= rows
    assert r.stderr.strip() == ""  # no Beam or decoder chatter on a local run


@pytest.mark.parametrize("workers", [0, 2])
def test_the_next_group_is_put_while_this_one_fills(workers):
    """filled_records calls `then` once, as soon as every decision of its group is with the pool and before
    its last record: the batch job decides and queues the next group there, so the workers never wait for
    it; the group's own records come out in order, the next group's after them."""
    from pipelines.batch.job import filled_records

    config = packer.PackConfig(seq_len=64, patch_size=16, resolution="fixed:64")
    core = packer.PackingCore(config)
    decisions = []
    for i in range(12):
        data = jpeg(40 + 3 * i, 70, i)
        decisions += core.add(packer.plan_header(data, f"k{i}", config), i, data)
    decisions += core.flush()
    first, second = decisions[:7], decisions[7:]
    with packer.fill_pool(config, workers) as pool:
        driver = packer.Driver(pool)
        calls, seen = [], []

        def then():
            calls.append(len(seen))
            driver.put(second)

        for d, _, _ in filled_records(driver, first, then=then):
            seen.append(d.seq)
        for d, _, _ in filled_records(driver, second, queued=True):
            seen.append(d.seq)
    assert seen == [d.seq for d in decisions] and len(calls) == 1 and calls[0] < len(first), calls
