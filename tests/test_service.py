"""tf.data service: a dispatcher and two workers on 127.0.0.1, and the sharding guarantee."""
from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time

import numpy as np
import pytest

import packer

tf = pytest.importorskip("tensorflow")

from pipelines import service  # noqa: E402
from test_stream import CONFIG, ListSource, make_records  # noqa: E402

EPOCHS = 2


@pytest.fixture(scope="module")
def local_service():
    svc = service.LocalService(num_workers=2)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def records():
    return make_records(16, bad={4})


def occurrences(out, recs):
    """Counter of (key, epoch): each packed image is matched to prepare_image at epoch 0 or 1."""
    data = {r.key: r for r in recs}
    seen = collections.Counter()
    for rec in out:
        rec = {k: (np.array([x.decode() for x in v], object) if v.dtype.kind in "SO" else v) for k, v in rec.items()}
        for im in packer.unpack(rec):
            src = data[im.key]
            epochs = [e for e in range(EPOCHS)
                      if np.array_equal(packer.prepare_image(src.data, src.key, CONFIG, epoch=e).patches, im.patches)]
            assert len(epochs) == 1, (im.key, epochs)
            seen[(im.key, epochs[0])] += 1
    return seen


def dataset(recs):
    return service.service_dataset(ListSource(recs, per_unit=1), CONFIG, epochs=EPOCHS, group_units=3, num_parallel=2)


def test_dynamic_sharding_packs_each_image_exactly_once_per_epoch(local_service, records):
    before = service.REJECTS["undecodable"]
    out = list(service.distribute(dataset(records), local_service.target, "dynamic").as_numpy_iterator())
    seen = occurrences(out, records)
    good = [r.key for r in records if r.key != "img004.jpg"]
    assert seen == collections.Counter({(k, e): 1 for k in good for e in range(EPOCHS)})
    assert service.REJECTS["undecodable"] - before == EPOCHS  # the bad image, skipped and counted each epoch


def test_sharding_off_runs_the_whole_pipeline_on_every_worker(local_service, records):
    out = list(service.distribute(dataset(records), local_service.target, "off").as_numpy_iterator())
    seen = occurrences(out, records)
    assert set(seen.values()) == {2} and len(seen) == (len(records) - 1) * EPOCHS  # once per worker per epoch


def test_registered_dataset_read_by_id_with_static_shapes(local_service, records):
    dataset_id = service.register(dataset(records), local_service.target, "navit-test")
    ds = service.read_service(local_service.target, CONFIG, dataset_id="navit-test", processing_mode="dynamic")
    assert ds.element_spec["patches"].shape == (CONFIG.seq_len, CONFIG.token_dim)
    out = list(ds.as_numpy_iterator())
    assert dataset_id.numpy() == b"navit-test"
    assert sum(occurrences(out, records).values()) == (len(records) - 1) * EPOCHS


def test_bad_sharding_mode_is_refused(local_service, records):
    with pytest.raises(ValueError, match="processing_mode"):
        service.distribute(dataset(records), local_service.target, "static")


def test_group_generator_counts_fill_failures_and_crashes(records, monkeypatch):
    """The service's group generator runs on the same core: a truncated image (header plans, pixels
    fail) and an image whose worker process dies are rejected and counted; the rest is packed once."""
    recs = list(records)
    recs[2] = type(recs[2])(recs[2].key, recs[2].data[: len(recs[2].data) // 2], recs[2].label)
    monkeypatch.setenv(packer._worker.CRASH_KEY_ENV, recs[9].key)
    src = ListSource(recs, per_unit=1)
    units = src.units()
    before = collections.Counter(service.REJECTS)
    with packer._pool.FillPool(CONFIG, 2) as pool:
        out = list(service._pack_group(src, units, CONFIG, np.arange(len(units)), shuffle=True, meta_fields=(),
                                       pool=pool, images_per_unit=1.0))
    counted = collections.Counter(service.REJECTS)
    counted.subtract(before)
    assert +counted == {"undecodable": 2, "worker_crashed": 1}  # img004 (bad header) and the truncated one
    keys = collections.Counter(str(k) for r in out for k in r["image_keys"][: int(r["num_images"])])
    assert set(keys) == {r.key for r in recs} - {"img004.jpg", recs[2].key, recs[9].key} and set(keys.values()) == {1}


def test_options_fingerprint_follows_the_options_not_the_mount_path(tmp_path):
    from PIL import Image

    for root in ("a", "b"):
        for name in ("cat/1.png", "dog/2.png"):
            (tmp_path / root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (9, 7)).save(tmp_path / root / name)

    def fingerprint(spec, config=CONFIG, epochs=2):
        return service.options_fingerprint(spec, config, epochs=epochs, group_units=4)

    same = fingerprint(str(tmp_path / "a"))
    assert 0 < same < 2 ** 62 and fingerprint(str(tmp_path / "b")) == same  # the same data mounted elsewhere
    assert fingerprint(str(tmp_path / "a"), epochs=3) != same
    assert fingerprint(str(tmp_path / "a"), config=dataclasses.replace(CONFIG, seed=CONFIG.seed + 1)) != same
    (tmp_path / "b" / "cat" / "1.png").rename(tmp_path / "b" / "dog" / "1.png")  # other classes
    assert fingerprint(str(tmp_path / "b")) != same


def test_a_second_claim_with_other_options_is_refused(local_service):
    service.claim_options(local_service.target, "claims", 12345)
    service.claim_options(local_service.target, "claims", 12345)  # the same options: accepted again
    with pytest.raises(service.OptionsMismatch, match="other input or packing options"):
        service.claim_options(local_service.target, "claims", 12346)


def _until(predicate, bound: float = 20.0) -> bool:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_health_registry_marks_a_closed_or_silent_worker_lost():
    from pipelines import service_health

    registry = service_health.Registry(lost_after=2)
    where = ("127.0.0.1", registry.port)
    try:
        closed, silent = (socket.create_connection(where) for _ in range(2))
        closed.sendall(b"worker 10.0.0.1:1,10.0.0.1:2\n")
        silent.sendall(b"worker 10.0.0.2:1\n")
        time.sleep(0.5)
        assert service_health.lost(where) == {}
        closed.close()  # a process that died: its socket closes
        assert _until(lambda: set(service_health.lost(where)) == {"10.0.0.1:1", "10.0.0.1:2"})
        assert _until(lambda: "10.0.0.2:1" in service_health.lost(where))  # no heartbeat for lost_after
        again = socket.create_connection(where)
        again.sendall(b"worker 10.0.0.2:1\n")  # back on the same address
        assert _until(lambda: "10.0.0.2:1" not in service_health.lost(where))
        again.close()
        silent.close()
    finally:
        registry.close()


WATCH = """
import os, re, socket, sys
sys.path.insert(0, sys.argv[1])
import tensorflow as tf
from pipelines import service, service_health
from test_service import CONFIG, EPOCHS, dataset, make_records, occurrences

records = make_records(16, bad={4})
svc = service.LocalService(num_workers=2)
assert svc.registry is not None and svc.reporting
dataset_id = service.register(dataset(records), svc.target, "navit-watch")
where = service_health.registry_address(svc.target)
assert where == ("127.0.0.1", svc.registry.port) and dataset_id.numpy() == b"navit-watch"
ds = service.read_service(svc.target, CONFIG, dataset_id="navit-watch", processing_mode="dynamic")
assert sum(occurrences(list(ds.as_numpy_iterator()), records).values()) == (len(records) - 1) * EPOCHS
fake = socket.create_connection(where)
fake.sendall(b"worker 127.0.0.1:9\\n")
fake.close()
try:
    list(ds.as_numpy_iterator())
    print("no error")
except tf.errors.UnknownError as e:
    print("lost" if re.search(r"ServiceWorkerLost: .* lost: 127\\.0\\.0\\.1:9 ", str(e)) else f"other: {e}")
sys.stdout.flush()
os._exit(0)  # the failed read's job still runs on the workers: stopping them in-process would wait for it
"""


def test_the_watch_reads_everything_while_no_worker_is_lost_and_fails_naming_one_that_is():
    """In a process of its own: the read that fails leaves its job running on the workers, and TensorFlow's
    in-process worker stop would wait for it for good (LocalService.stop)."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", WATCH, tests], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "lost", r.stdout
