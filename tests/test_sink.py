"""schemas._sink: shards are written, hashed and fsynced by a child process while the writer fills a pipe.
The bytes are those of a direct write for every format, the digest is taken as they pass (the shard is never
read back, ArrayRecord included), a failed write comes back as the child's OSError, and an interrupted
write leaves neither a child nor a temporary file."""
from __future__ import annotations

import errno
import hashlib
import os
import threading

import pytest

import schemas
from schemas import _sink

from test_readers import small_records

pytestmark = pytest.mark.skipif(not _sink.AVAILABLE, reason="shard writer processes need /dev/fd")


def _write(directory, fmt: str, records, config) -> dict:
    return schemas.write_dataset(directory, records, config=config, fmt=fmt, num_shards=2, meta_fields=("id",))


def _shards(directory) -> list[bytes]:
    """The shard files' bytes in shard order (the names carry a run id of their own)."""
    return [(directory / e).read_bytes() for e in sorted(os.listdir(directory)) if e.startswith("packed-")]


@pytest.mark.parametrize("fmt", sorted(schemas.FORMATS))
def test_the_child_writes_the_bytes_of_a_direct_write(tmp_path, monkeypatch, fmt):
    config, records = small_records(20, seed=3)
    through_child = _write(tmp_path / "child", fmt, records, config)
    monkeypatch.setattr(_sink, "AVAILABLE", False)
    direct = _write(tmp_path / "direct", fmt, records, config)
    assert _shards(tmp_path / "child") == _shards(tmp_path / "direct")
    assert [s["sha256"] for s in through_child["shards"]] == [s["sha256"] for s in direct["shards"]]


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts this process's reads in /proc/self/io")
@pytest.mark.parametrize("fmt", sorted(schemas.FORMATS))
def test_a_shard_is_hashed_as_it_is_written_not_read_back(tmp_path, monkeypatch, fmt):
    """The manifest's sha256 is that of the file on disk, and this process read far less than the shards."""
    def no_read_back(path):
        raise AssertionError(f"{path} read back for its digest")

    monkeypatch.setattr(schemas._io, "sha256_file", no_read_back)
    config, records = small_records(40, seed=5)
    records = records * 40  # enough bytes to tell a read-back from the few reads of writing
    _write(tmp_path / "warm-up", fmt, records[:2], config)  # imports and first-use reads happen here

    def rchar() -> int:  # this thread's reads: a process's count also takes in the children it reaped
        with open(f"/proc/self/task/{threading.get_native_id()}/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    before = rchar()
    manifest = _write(tmp_path / "out", fmt, records, config)
    read = rchar() - before
    written = sum(map(len, _shards(tmp_path / "out")))
    for s in manifest["shards"]:
        assert s["sha256"] == hashlib.sha256((tmp_path / "out" / s["file"]).read_bytes()).hexdigest()
    assert written > 500_000 and read < written / 10, (read, written)


@pytest.mark.parametrize("flush_every", [1000, 1 << 30])
def test_the_child_sends_the_bytes_to_disk_as_they_come(tmp_path, monkeypatch, flush_every):
    """While it writes, the child fdatasyncs every _FLUSH_BYTES in the background (so the fsync the writer
    waits for at the end is short), and the file and digest are the same either way."""
    monkeypatch.setattr(_sink, "_FLUSH_BYTES", flush_every)
    data = os.urandom(60_000)
    target = tmp_path / "shard"
    target.write_bytes(b"")
    sink = _sink.ShardSink(str(target))
    try:
        f = sink.file()
        for i in range(0, len(data), 4096):
            f.write(data[i:i + 4096])
            f.flush()
        digest, size = sink.finish()
    finally:
        sink.close()
    assert target.read_bytes() == data and size == len(data) and digest == hashlib.sha256(data).hexdigest()
    assert (sink.background_syncs >= 1) == (flush_every < len(data)), sink.background_syncs


def test_a_failed_write_in_the_child_is_its_oserror(tmp_path):
    """The child cannot open its target: the writer's pipe breaks, and failure() says why (ENOENT, the path)."""
    target = str(tmp_path / "gone" / "shard")
    sink = _sink.ShardSink(target)
    try:
        with pytest.raises(OSError):
            f = sink.file()
            for _ in range(64):
                f.write(b"x" * (1 << 20))
            sink.finish()
        failure = sink.failure()
    finally:
        sink.close()
    assert isinstance(failure, OSError) and failure.errno == errno.ENOENT and failure.filename == target


def test_a_write_that_fails_in_the_child_fails_write_dataset_with_the_childs_error(tmp_path, monkeypatch):
    """write_shard raises the child's OSError (as OutputWriteError naming its cause), not the broken pipe."""
    real = _sink.ShardSink

    def elsewhere(target, shared_fd=None):  # the child writes to a folder that is not there
        return real(os.path.join(os.path.dirname(target), "missing", os.path.basename(target)), shared_fd)

    monkeypatch.setattr(_sink, "ShardSink", elsewhere)
    config, records = small_records(20, seed=1)
    with pytest.raises(schemas.OutputWriteError, match=os.strerror(errno.ENOENT)):
        _write(tmp_path, "tfrecord", records, config)
    assert not any(e.endswith(".tmp") for e in os.listdir(tmp_path))


def _tracked_sinks(monkeypatch) -> list:
    """Every ShardSink the code under test makes, in order."""
    sinks = []
    real = _sink.ShardSink

    def tracked(target, shared_fd=None):
        sinks.append(real(target, shared_fd))
        return sinks[-1]

    monkeypatch.setattr(_sink, "ShardSink", tracked)
    return sinks


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_an_interrupted_write_leaves_no_child_and_no_temporary(tmp_path, monkeypatch, fmt):
    config, records = small_records(20, seed=2)
    sinks = _tracked_sinks(monkeypatch)

    def interrupted():
        yield from records[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        schemas.write_shard(str(tmp_path), 0, 1, fmt, interrupted(), seq_len=config.seq_len,
                            token_dim=config.token_dim, max_images_per_seq=config.max_images_per_seq,
                            meta_fields=("id",))
    assert len(sinks) == 1 and sinks[0]._child.returncode is not None  # ended and reaped
    assert os.listdir(tmp_path) == []


def _pack(src: str, out, workers: int) -> dict[str, bytes]:
    """Shards of `src` packed one image a sequence (more sequences than the pool has slots)."""
    import packer
    from pipelines import batch as bp

    cfg = packer.PackConfig(seq_len=64, resolution="uniform:96:128")
    job = bp.PackJob(input=src, output=str(out), config=cfg, fmt="tfrecord", num_shards=2, group_size=200,
                     run_id="t0")
    bp.run_pack(job, workers=workers)
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.startswith("packed-")}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> str:
    from conftest import image_folder

    root = tmp_path_factory.mktemp("jpegs")
    image_folder(root, 120, classes=["a", "b"], seed=11, sizes=(40, 160))
    return str(root)


def test_rows_encoded_by_workers_go_to_the_child_by_location(jpegs, tmp_path, monkeypatch):
    """`pack --workers 2` sends every worker-encoded TFRecord row by its place in shared memory (not
    through the pipe), and the shards are those of packing in one process."""
    sinks = _tracked_sinks(monkeypatch)
    by_location = _pack(jpegs, tmp_path / "workers", 2)
    assert sinks and all(s.shared_fd is not None for s in sinks)
    sequences = sum(s._sent for s in sinks)
    inline = _pack(jpegs, tmp_path / "inline", 0)
    assert sequences == sum(b.count(b"segment_ids") for b in inline.values()) > 100
    assert by_location == inline


def test_a_slow_child_holds_the_slots_it_has_not_read(jpegs, tmp_path, monkeypatch):
    """The child reads each row a while after it was sent; the pool must not reuse that row's slot before
    (the fill workers would overwrite it): the bytes stay those of packing in one process."""
    slow = _sink._CHILD.replace("h.update(b)", "__import__('time').sleep(0.02); h.update(b)")
    assert slow != _sink._CHILD
    monkeypatch.setattr(_sink, "_CHILD", slow)
    assert _pack(jpegs, tmp_path / "slow", 2) == _pack(jpegs, tmp_path / "inline", 0)
