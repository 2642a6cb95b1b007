"""The batch job reads each input once per epoch, at any number of units and groups: the listing reads
each image's header (a few kB of a large JPEG), and each epoch's fill reads the image whole, once. Counted
by an instrumented source in the main process and in the fill workers (tests/counting_source.py)."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest

import packer
import schemas
from conftest import encode, jpeg
from counting_source import LOG_ENV, CountingSource
from pipelines.batch import PackJob
from pipelines.batch.local import run_local

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("workers", [0, 2])
def test_each_image_is_read_once_per_epoch(tmp_path, monkeypatch, workers):
    folder = tmp_path / "in"
    sizes = {}
    for i in range(40):
        sub = folder / f"part{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        data = encode(np.random.default_rng(i).integers(0, 256, (300, 260, 3), dtype=np.uint8), quality=95) if i % 4 == 0 \
            else jpeg(40 + i, 60, i)  # noise: large files, whose header is a small part
        (sub / f"img{i:02d}.jpg").write_bytes(data)
        sizes[f"part{i % 5}/img{i:02d}.jpg"] = len(data)
    log = tmp_path / "reads.log"
    monkeypatch.setenv(LOG_ENV, str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    packer._worker.stop_idle_workers()  # workers that start now import the counting source
    source = CountingSource.from_spec(str(folder), labels="none", files_per_unit=4)
    assert len(source.units()) == 10
    epochs = 3
    job = PackJob(input=str(folder), output=str(tmp_path / "out"), epochs=epochs, group_size=6, labels="none",
                  config=packer.PackConfig(seq_len=128, resolution="uniform:32:160"))
    os.makedirs(job.output)
    try:
        run_local(job, source, source.units(), workers=workers)
    finally:
        packer._worker.stop_idle_workers()
    assert schemas.read_manifest(job.output)["num_images_packed"] == 40 * epochs
    reads = collections.defaultdict(list)
    for line in log.read_text().splitlines():
        key, count = line.split("\t")
        reads[key].append(int(count))
    assert reads.keys() == sizes.keys()
    for key, counts in reads.items():
        header, fills = counts[0], counts[1:]
        assert fills == [sizes[key]] * epochs, f"{key}: read {counts} (size {sizes[key]})"
        assert header <= min(sizes[key], 64 << 10)
        if sizes[key] > 100_000:
            assert header < sizes[key] // 10, f"{key}: the listing read {header} of {sizes[key]} bytes"
