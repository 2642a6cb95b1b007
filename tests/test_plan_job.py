"""`navit-pack plan ... -- --runner ...` (pipelines.batch.plan_job): Beam workers read the headers, one
worker decides, and the plan file is the one `navit-pack plan` writes on one machine, byte for byte, for
folders with class labels, PNGs read whole, a corrupt file and a decompression bomb, with 1 or 2 DirectRunner
processes; a plan for a remote path goes through Beam's filesystems."""
from __future__ import annotations

import subprocess
import sys

import pytest

import packer

from conftest import encode, image_folder, make_pixels

pytest.importorskip("apache_beam", reason="the plan job runs on Apache Beam")

OPTIONS = ["--resolution", "uniform:32:96", "--seq-len", "64", "--patch-size", "8", "--seed", "5", "--epochs", "2",
           "--shuffle-block", "16"]


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    image_folder(root, 40, classes=["cat", "dog", "eel"], seed=2, sizes=(16, 120))
    image_folder(root, 6, classes=["cat"], seed=3, sizes=(16, 120), fmt="PNG", name="png{i:02d}.png")  # read whole for their size
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "eel" / "huge.png").write_bytes(encode(make_pixels(200, 200), "PNG"))  # over --max-pixels
    return str(root)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_beam_plan_is_the_local_plan(folder, tmp_path, workers):
    local, beam = tmp_path / "local.jsonl", tmp_path / "beam.jsonl"
    r = _plan("--input", folder, "--output", str(local), *OPTIONS, "--max-pixels", "20000")
    assert r.returncode == 0, r.stderr
    r = _plan("--input", folder, "--output", str(beam), *OPTIONS, "--max-pixels", "20000", "--workers", workers,
              "--", "--runner", "DirectRunner")
    assert r.returncode == 0, r.stderr
    lines = local.read_text().splitlines()
    assert beam.read_text() == local.read_text()
    assert f"sequences         {len(lines) - 1}" in r.stdout and len(lines) > 20
    assert "broken.jpg" not in beam.read_text() and "huge.png" not in beam.read_text() and "png03" in beam.read_text()


def test_a_remote_plan_goes_through_beams_filesystems(folder, tmp_path):
    """write_plan to a scheme Beam knows (a test one, mapped to a folder) writes the local plan's bytes."""
    from apache_beam.io.localfilesystem import LocalFileSystem

    from pipelines.batch.plan_job import PlanJob, read_headers, write_plan

    root = tmp_path / "bucket"
    root.mkdir()

    class Mapped(LocalFileSystem):
        @classmethod
        def scheme(cls):
            return "navittest"

        def create(self, path, *args, **kwargs):
            return super().create(str(root / path.split("://", 1)[1]), *args, **kwargs)

    config = packer.PackConfig(seq_len=64, patch_size=8, resolution="uniform:32:96", seed=5)
    job = PlanJob(folder, "navittest://plan.jsonl", config, epochs=2, shuffle_block=16)
    source = job.source()
    headers = dict(read_headers(source, unit, config.max_pixels) for unit in source.units())
    count = write_plan(job, headers)
    local = tmp_path / "local.jsonl"
    assert job.stream().write_plan(str(local)) == count > 0
    assert (root / "plan.jsonl").read_bytes() == local.read_bytes()
    assert all(r.data is None for rs in headers.values() for r in rs if r.ref is not None)  # only sizes travel
