"""Runner portability on a real distributed engine: `pack` on Beam's DaskRunner against a local
dask.distributed cluster (2 worker processes on 127.0.0.1) writes the same bytes as the local path."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("apache_beam.runners.dask.dask_runner", reason="apache-beam's Dask runner needs dask")
distributed = pytest.importorskip("distributed", reason="dask.distributed is a test dependency (extra 'test')")

import packer  # noqa: E402
from conftest import image_folder  # noqa: E402
from pipelines import batch as bp  # noqa: E402

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """8 JPEGs in 2 class folders and one undecodable file."""
    root = tmp_path_factory.mktemp("imgs")
    image_folder(root, 8, classes=["class0", "class1"], seed=5, sizes=(20, 160), noise=True)
    (root / "class0" / "broken.jpg").write_bytes(b"not an image")
    return str(root)


def _files(directory) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_dask_runner_writes_the_same_bytes_as_the_local_path(cluster, image_dir, tmp_path):
    cfg = packer.PackConfig(seq_len=80, resolution="uniform:24:112")
    jobs = [bp.PackJob(input=image_dir, output=str(tmp_path / name), config=cfg, num_shards=2, group_size=4,
                         run_id="t0")
            for name in ("local", "dask")]
    bp.run_pack(jobs[0], workers=2)
    manifest = bp.run_pack(jobs[1], beam_args=["--runner", DASK_RUNNER, "--dask_client_address", cluster])
    assert manifest["num_images_in"] == 9 and manifest["num_rejected"] == 1
    local, dask = _files(jobs[0].output), _files(jobs[1].output)
    assert len([n for n in local if n.startswith("packed-")]) == 2
    assert local == dask
