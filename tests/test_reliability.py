"""The guarantees, end to end through the `navit-pack` command: hostile inputs, crashes mid-write,
bad configuration. Corruption of written shards is covered in test_verify.py and test_schemas.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import schemas
from hostile import write_hostile_corpus

CLI = [sys.executable, "-m", "pipelines.cli"]


def pack(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(CLI + ["pack", "--no-progress", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, write_hostile_corpus(root)


def test_hostile_corpus_every_input_packed_or_rejected_with_reason(hostile_dir, tmp_path):
    root, expected = hostile_dir
    out = tmp_path / "out"
    pack("--input", str(root), "--output", str(out), "--labels", "none", "--resolution", "uniform:64:256",
         "--max-pixels", "50000000", "--format", "parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(line) for line in open(schemas.rejects_path(str(out))).read().splitlines()]
    assert all(r["reason"] for r in rejects)
    packed_keys = sorted(k for rec in schemas.read(str(out)) for k in rec["image_keys"][: int(rec["num_images"])])
    assert sorted(r["key"] for r in rejects) == sorted(k for k, v in expected.items() if v == "rejected")
    assert packed_keys == sorted(k for k, v in expected.items() if v == "packed")
    assert manifest["num_images_in"] == len(expected) == manifest["num_images_packed"] + manifest["num_rejected"]
    assert manifest["num_rejected"] == len(rejects)


def test_good_images_are_unaffected_by_bad_neighbours(hostile_dir, tmp_path):
    root, expected = hostile_dir
    clean_root = tmp_path / "clean_input"
    shutil.copytree(root / "good", clean_root / "good")  # same keys, no bad neighbours
    mixed, clean = tmp_path / "mixed", tmp_path / "clean"
    common = ["--labels", "none", "--resolution", "uniform:64:256", "--format", "parquet"]
    pack("--input", str(root), "--output", str(mixed), *common)
    pack("--input", str(clean_root), "--output", str(clean), *common)

    def images(d):
        return {k: (rec["grid_h"][i], rec["grid_w"][i], rec["patches"][rec["segment_ids"] == i + 1].tobytes())
                for rec in schemas.read(str(d)) for i, k in enumerate(rec["image_keys"][: int(rec["num_images"])])}
    mixed_good = {k: v for k, v in images(mixed).items() if k.startswith("good/")}
    assert mixed_good == images(clean) and len(mixed_good) == 12


def test_reject_budget_fails_the_job_with_a_clear_message(hostile_dir, tmp_path):
    root, _ = hostile_dir
    result = pack("--input", str(root), "--output", str(tmp_path / "o"), "--labels", "none",
                  "--max-reject-fraction", "0.1", check=False)
    assert result.returncode != 0
    assert "reject" in result.stderr.lower() and "0.1" in result.stderr
    with pytest.raises(schemas.ManifestMissing):
        list(schemas.read(str(tmp_path / "o")))


@pytest.mark.parametrize("flag,value", [
    ("--seq-len", "0"), ("--seq-len", "-4"), ("--resolution", "budget:512"), ("--patch-size", "0"),
    ("--resolution", "zoom:2"), ("--max-images-per-seq", "0"),
])
def test_bad_configuration_exits_before_work_with_one_line(flag, value, tmp_path):
    out = tmp_path / "o"
    result = pack("--input", "synthetic:4", "--output", str(out), flag, value, check=False)
    assert result.returncode != 0
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and flag in result.stderr, repr(result.stderr)  # raw: exactly one line
    assert not out.exists()


def test_unwritable_output_exits_before_work_with_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = pack("--input", "synthetic:4", "--output", str(blocker / "out"), check=False)
    assert result.returncode != 0
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--output" in result.stderr, repr(result.stderr)


def _kill_when(out: Path, condition, args: list[str]) -> bool:
    """Start a pack job, kill -9 its whole process group once `condition(out)` holds; True if killed."""
    proc = subprocess.Popen(CLI + ["pack", "--no-progress", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if condition(out):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _entries(out: Path) -> list[str]:
    return os.listdir(out) if out.is_dir() else []


def _final_shards(out: Path) -> list[str]:
    return [e for e in _entries(out) if e.startswith("packed-")]


MOMENTS = {  # each must be reached while the job runs (asserted): none holds trivially
    "output folder claimed": lambda out: (out / schemas.LOCK).exists(),
    "first temporary shard appears": lambda out: any(e.startswith(".packed-") for e in _entries(out)),
    "first final shard renamed": lambda out: len(_final_shards(out)) >= 1,
    "half the shards renamed": lambda out: len(_final_shards(out)) >= 3,
}


RUN_FIELDS = ("run_id", "rejects")  # what differs between two runs' manifests (besides each shard's "file")


def comparable(manifest: dict) -> dict:
    """A manifest without what names the run (RUN_FIELDS, the shards' file names, which carry the run id):
    what two runs of the same input and options must agree on, whole."""
    out = {k: v for k, v in manifest.items() if k not in RUN_FIELDS}
    out["shards"] = [{k: v for k, v in s.items() if k != "file"} for s in manifest["shards"]]
    return out


def shard_bytes(out: Path) -> list[bytes]:
    """The bytes of every shard the manifest lists, in order."""
    return [(out / s["file"]).read_bytes() for s in schemas.read_manifest(str(out))["shards"]]


def _index(name: str) -> str:
    return name.rsplit("-", 3)[-3]  # packed-RUN-IIIII-of-NNNNN.ext -> IIIII


def test_kill_9_at_several_moments_leaves_only_whole_shards_then_overwrite_gives_identical_output(tmp_path):
    args = ["--input", "synthetic:240", "--resolution", "uniform:64:256", "--num-shards", "6", "--format", "tfrecord",
            "--workers", "1"]
    reference = tmp_path / "reference"
    pack(*args, "--output", str(reference))
    ref_manifest = json.loads((reference / "manifest.json").read_text())
    by_index = {_index(s["file"]): (reference / s["file"]).read_bytes() for s in ref_manifest["shards"]}
    for i, (moment, condition) in enumerate(MOMENTS.items()):
        out = tmp_path / f"killed{i}"
        assert _kill_when(out, condition, args + ["--output", str(out)]), f"never reached: {moment}"
        for name in _final_shards(out):  # a shard under its final name is whole: byte-equal to the reference's
            assert (out / name).read_bytes() == by_index[_index(name)], (moment, name)
        if (out / "manifest.json").exists():
            schemas.verify(str(out))
        else:
            with pytest.raises(schemas.ManifestMissing):  # no reader accepts a partial output
                next(iter(schemas.read(str(out))))
            assert subprocess.run(CLI + ["verify", str(out)], capture_output=True).returncode == 2, moment
        rerun = pack(*args, "--output", str(out), "--overwrite")
        assert "taking over" in rerun.stderr, moment  # the killed run's lock, left behind, belongs to no one
        manifest = json.loads((out / "manifest.json").read_text())
        assert comparable(manifest) == comparable(ref_manifest), moment  # the whole manifest but the run's name
        assert shard_bytes(out) == shard_bytes(reference), moment
        assert sorted(os.listdir(out)) == sorted(["manifest.json", manifest["rejects"]] +
                                                 [s["file"] for s in manifest["shards"]]), moment  # nothing else
