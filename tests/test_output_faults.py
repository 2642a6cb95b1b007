"""Output faults, each created for real: output file modes under a umask, two runs on one output
folder, a dead run's lock, ownership lost before finalize, a write error mid-run (RLIMIT_FSIZE), a full disk
(a 2 MiB tmpfs, every format), and inputs
that vanish or change between listing and reading (CLI and PackedStream).

Faults are injected at an exact moment by running the CLI's main() under a small wrapper script."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import packer
import schemas
from pipelines.batch.journal import JOURNAL

CLI = [sys.executable, "-m", "pipelines.cli"]
SMALL = ["--input", "synthetic:24", "--resolution", "uniform:32:96", "--workers", "1"]


def pack(*args: str, preexec_fn=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["pack", "--no-progress", *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def same_shards(a: Path, b: Path) -> bool:
    """Two outputs hold the same shards: counts, sha256 and bytes, in order (their names carry each run's id)."""
    shards = [schemas.read_manifest(str(d))["shards"] for d in (a, b)]
    return ([(s["num_sequences"], s["sha256"]) for s in shards[0]] == [(s["num_sequences"], s["sha256"]) for s in shards[1]]
            and all((a / s["file"]).read_bytes() == (b / t["file"]).read_bytes() for s, t in zip(*shards)))


def one_line(stderr: str) -> str:
    """The raw stderr, asserted to be exactly one line."""
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), repr(stderr)
    return stderr


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_files_and_folders_get_the_umask_mode(tmp_path, umask):
    out = tmp_path / "nested" / "out"
    result = pack(*SMALL, "--output", str(out), "--num-shards", "2", preexec_fn=lambda: os.umask(umask))
    assert result.returncode == 0, result.stderr
    files = [p for p in out.iterdir()]
    run = schemas.read_manifest(str(out))["run_id"]
    assert {p.name for p in files} == {"manifest.json", f"rejects-{run}.jsonl", f"packed-{run}-00000-of-00002.tfrecord",
                                       f"packed-{run}-00001-of-00002.tfrecord"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name
    for d in (out, out.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d


def _lock(out: Path) -> dict:
    return json.loads((out / schemas.LOCK).read_text())


def test_a_second_run_on_a_live_owners_folder_fails_at_once_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(CLI + ["pack", "--no-progress", "--input", "synthetic:300", "--workers", "1",
                                    "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / schemas.LOCK).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (out / schemas.LOCK).exists(), "the first run never took its lock"
        second = pack(*SMALL, "--output", str(out), "--overwrite")
        assert first.poll() is None, "the first run ended before the second started: nothing overlapped"
        assert second.returncode == 2
        line = one_line(second.stderr)
        assert "in use by another run" in line and f"pid {first.pid}" in line and socket.gethostname() in line
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    manifest = schemas.read_manifest(str(out))
    assert manifest["input"] == "synthetic:300" and manifest["num_images_in"] == 300  # the first run's output
    schemas.verify(str(out))
    assert not (out / schemas.LOCK).exists()  # released at the end


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = {"host": socket.gethostname(), "pid": _dead_pid(), "started": time.time() - 60,
            "command": "navit-pack pack (killed)", "token": "dead"}
    (out / schemas.LOCK).write_text(json.dumps(dead))
    result = pack(*SMALL, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "taking over" in result.stderr and f"pid {dead['pid']}" in result.stderr
    schemas.verify(str(out))
    assert not (out / schemas.LOCK).exists()


def test_an_empty_lock_left_by_a_run_killed_while_writing_it_is_taken_over(tmp_path):
    """kill -9 between creating the lock file and writing its record leaves it empty: the next run
    (here given a Path, as library callers do) takes it over instead of giving up."""
    out = tmp_path / "out"
    out.mkdir()
    (out / schemas.LOCK).write_bytes(b"")
    with schemas.claim_output(out, overwrite=True) as claim:
        claim.check()
        assert json.loads((out / schemas.LOCK).read_text())["pid"] == os.getpid()
    assert not (out / schemas.LOCK).exists()


def test_a_live_owner_in_this_process_is_refused_and_release_keeps_others_locks(tmp_path):
    claim = schemas.claim_output(str(tmp_path / "out"))
    with pytest.raises(schemas.OutputLocked, match=f"pid {os.getpid()}"):
        schemas.claim_output(str(tmp_path / "out"), overwrite=True)
    claim.check()
    claim.release()
    assert not (tmp_path / "out" / schemas.LOCK).exists()
    with schemas.claim_output(str(tmp_path / "out")):
        claim.release()  # a stale claim must not remove the new owner's lock
        assert (tmp_path / "out" / schemas.LOCK).exists()


def test_ownership_lost_before_finalize_fails_and_writes_no_manifest(tmp_path, monkeypatch):
    from pipelines.batch import PackJob, run_pack

    out = tmp_path / "out"
    real_write_rejects = schemas.write_rejects

    def steal_then_write(directory, rejects, *args):  # another run takes the folder just before finalize
        (Path(directory) / schemas.LOCK).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": "thief"}))
        return real_write_rejects(directory, rejects, *args)

    monkeypatch.setattr(schemas, "write_rejects", steal_then_write)
    job = PackJob(input="synthetic:12", output=str(out), config=packer.PackConfig(resolution="uniform:32:96"))
    with pytest.raises(schemas.OwnershipLost, match="no longer owns"):
        run_pack(job, workers=1)
    assert not (out / "manifest.json").exists()
    assert _lock(out)["token"] == "thief"  # the failed run did not remove the new owner's lock
    with pytest.raises(schemas.ManifestMissing):
        schemas.read_manifest(str(out))


def test_readers_and_verify_ignore_the_lock_file(tmp_path):
    out = tmp_path / "out"
    assert pack(*SMALL, "--output", str(out)).returncode == 0
    (out / schemas.LOCK).write_text("{}")
    report = schemas.verify(str(out))
    assert report.warnings == ()
    assert sum(1 for _ in schemas.read(str(out))) == report.num_sequences


LIMIT_AFTER_POOL = """
import resource, signal, sys
import packer
from pipelines import cli
opened = packer._pool.FillPool.__init__
def init(self, *a, **k):
    opened(self, *a, **k)
    # From here on no file of this process may grow past {limit} bytes; writes past it fail with a real
    # EFBIG (SIGXFSZ ignored). Set after the pool's shared memory is sized: memfd sizes count too.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
packer._pool.FillPool.__init__ = init
sys.exit(cli.main({argv!r}))
"""


@pytest.mark.parametrize("fmt", ["tfrecord", "parquet"])
def test_a_write_error_mid_run_fails_in_one_line_leaves_nothing_readable_and_rerun_is_identical(tmp_path, fmt):
    args = [*SMALL, "--num-shards", "3", "--format", fmt]
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert pack(*args, "--output", str(reference)).returncode == 0
    argv = ["pack", "--no-progress", *args, "--output", str(out)]
    failed = subprocess.run([sys.executable, "-c", LIMIT_AFTER_POOL.format(limit=30_000, argv=argv)],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stderr
    line = one_line(failed.stderr)
    assert str(out) in line and os.strerror(27) in line  # EFBIG: "File too large"
    assert not (out / "manifest.json").exists()
    # no temporary file, no lock left; the run journal stays, for --resume once space is freed
    assert [e for e in os.listdir(out) if e.startswith(".")] == [JOURNAL]
    with pytest.raises(schemas.ManifestMissing):
        next(iter(schemas.read(str(out))))
    assert subprocess.run(CLI + ["verify", str(out)], capture_output=True).returncode != 0
    rerun = pack(*args, "--output", str(out), "--overwrite")  # space freed
    assert rerun.returncode == 0, rerun.stderr
    assert same_shards(out, reference)


LIMIT_BEFORE_START = """
import resource, signal, sys
from pipelines import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
sys.exit(cli.main({argv!r}))
"""


def test_fill_workers_that_cannot_start_fail_in_one_line_and_release_the_output(tmp_path):
    """A file size limit too small for the pool's shared memory: a typed WorkerError, one line, exit 1."""
    out = tmp_path / "out"
    argv = ["pack", "--no-progress", *SMALL, "--output", str(out), "--workers", "2"]
    failed = subprocess.run([sys.executable, "-c", LIMIT_BEFORE_START.format(limit=100_000, argv=argv)],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stderr
    line = one_line(failed.stderr)
    assert "fill workers' shared memory" in line and os.strerror(27) in line, line
    assert not out.exists() or os.listdir(out) == []  # no lock, no shard
    assert pack(*SMALL, "--output", str(out)).returncode == 0  # without the limit the folder is usable


def _image_folder(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    names = ["keep.png", "gone.png", "folder.png", "broken_link.png", "fifo.png", "target.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / name)
    return names


def _change_inputs(root: Path) -> None:
    """What another process does to the folder after the job listed it."""
    (root / "gone.png").unlink()
    (root / "folder.png").unlink()
    (root / "folder.png").mkdir()
    (root / "broken_link.png").unlink()
    (root / "broken_link.png").symlink_to(root / "no_such_file.png")
    (root / "fifo.png").unlink()
    os.mkfifo(root / "fifo.png")  # unreadable for root too; a blocking open would hang the run


EXPECTED_REJECTS = {"gone.png": "missing", "broken_link.png": "missing", "folder.png": "unreadable",
                    "fifo.png": "unreadable"}

CHANGE_AFTER_LISTING = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import pipelines.sources.files as sf
from pipelines import cli
from test_output_faults import _change_inputs
listed = sf.FileSource.units
def units(self):
    result = listed(self)
    _change_inputs(Path({root!r}))
    return result
sf.FileSource.units = units
sys.exit(cli.main({argv!r}))
"""


def test_inputs_changed_after_listing_are_rejected_through_the_cli(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    _image_folder(root)
    out = tmp_path / "out"
    argv = ["pack", "--no-progress", "--input", str(root), "--output", str(out), "--labels", "none",
            "--resolution", "uniform:32:64", "--workers", "1"]
    script = CHANGE_AFTER_LISTING.format(tests=str(Path(__file__).parent), root=str(root), argv=argv)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rejects = {r["key"]: r["reason"] for r in map(json.loads, open(schemas.rejects_path(str(out))).read().splitlines())}
    assert rejects == EXPECTED_REJECTS
    packed = sorted(k for rec in schemas.read(str(out)) for k in rec["image_keys"][: int(rec["num_images"])])
    assert packed == ["keep.png", "target.png"]


def test_inputs_changed_after_listing_are_rejected_through_packed_stream(tmp_path):
    from pipelines.stream import PackedStream

    root = tmp_path / "images"
    root.mkdir()
    _image_folder(root)
    stream = PackedStream(str(root), packer.PackConfig(resolution="uniform:32:64", seq_len=256), epochs=1,
                          num_parallel=0)
    _change_inputs(root)
    packed = sorted(k for rec in stream for k in rec["image_keys"][: int(rec["num_images"])])
    assert packed == ["keep.png", "target.png"]
    assert {r["key"]: r["reason"] for r in stream.reject_examples} == EXPECTED_REJECTS


def test_an_unreadable_file_is_rejected_unreadable(tmp_path):
    """chmod 000 stops reads only for non-root users (tests often run as root): skipped as root; the FIFO
    and folder cases above fail for root too."""
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file; the FIFO and folder cases cover 'unreadable' for root")
    from pipelines.sources.files import FileSource

    (tmp_path / "a.png").write_bytes(b"x")
    source = FileSource.from_spec(str(tmp_path), labels="none")
    os.chmod(tmp_path / "a.png", 0)
    [record] = [r for u in source.units() for r in source.read(u)]
    assert record.reject == "unreadable"


class SmallDisk:
    """A mounted 2 MiB tmpfs at `path`; grow() remounts it larger (space freed)."""

    def __init__(self, path: Path):
        self.path = path

    def grow(self) -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(self.path)], check=True, capture_output=True, timeout=30)


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs: a real filesystem that fills up (ENOSPC), as a full disk does. Mounting needs root (or
    CAP_SYS_ADMIN); elsewhere the tests skip."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {e} {detail.decode().strip()}")
    try:
        yield SmallDisk(mount_point)
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)  # busy: detach it


FULL_DISK = ["--input", "synthetic:60", "--resolution", "uniform:64:256", "--workers", "1"]  # ~12 MB of records


@pytest.mark.parametrize("fmt", ["tfrecord", "arrow", "parquet", "array_record"])
def test_a_full_disk_fails_in_one_line_for_every_format(full_disk, tmp_path, fmt):
    out = full_disk.path / "out"
    failed = pack(*FULL_DISK, "--format", fmt, "--output", str(out))
    assert failed.returncode == 1, failed.stderr
    line = one_line(failed.stderr)
    assert line.startswith("navit-pack: error: cannot write the output ") and str(out) in line, line
    assert os.strerror(28) in line, line  # ENOSPC: "No space left on device"
    assert [e for e in os.listdir(out) if e != JOURNAL] == []  # no shard, no temporary, no manifest, no lock
    with pytest.raises(schemas.ManifestMissing):
        next(iter(schemas.read(str(out))))
    full_disk.grow()  # space freed: the same folder is usable and gets the same output as elsewhere
    reference = tmp_path / "reference"
    assert pack(*FULL_DISK, "--format", fmt, "--output", str(reference)).returncode == 0
    rerun = pack(*FULL_DISK, "--format", fmt, "--output", str(out), "--overwrite")
    assert rerun.returncode == 0, rerun.stderr
    assert same_shards(out, reference)


@pytest.mark.parametrize("record_bytes", [300_000, 20_000], ids=["fails-while-writing", "fails-at-close"])
def test_the_array_record_writer_raises_oserror_enospc(full_disk, record_bytes):
    """array_record reports a full disk as RuntimeError, from write() once a chunk cannot be written or
    only from close() when the last chunks were buffered: both become OSError(ENOSPC)."""
    import errno

    from schemas import _array_record

    rng = np.random.default_rng(0)
    payloads = (rng.integers(0, 256, record_bytes, dtype=np.uint8).tobytes() for _ in range(3_000_000 // record_bytes))
    with pytest.raises(OSError) as e:
        _array_record.write(str(full_disk.path / "x.array_record"), payloads)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(full_disk.path / "x.array_record")
    assert not isinstance(e.value, RuntimeError)


def test_inputs_changed_between_listing_and_filling_spilled_bytes_are_kept(tmp_path, monkeypatch):
    """The local runner's two read paths, with the input changed after the listing and before the fill: an
    image read whole for its size (PNG) is filled from the bytes the listing kept (its spill file), so a
    later change to the file does not reach the output; a plain JPEG is read again by reference, so one
    gone or replaced by a folder is rejected missing / unreadable, and the rest pack as from the unchanged input."""
    from pipelines.batch import PackJob, local, run_pack

    rng = np.random.default_rng(4)
    src, unchanged = tmp_path / "src", tmp_path / "unchanged"
    src.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(src / f"p{i}.png")
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(src / f"j{i}.jpg", quality=90)
    shutil.copytree(src, unchanged)
    config = packer.PackConfig(seq_len=64, resolution="uniform:32:64")

    listed, spilled = local._list, []

    def list_then_change(*args, **kwargs):
        listing = listed(*args, **kwargs)
        for i in range(3):  # same size, other pixels
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(src / f"p{i}.png")
        (src / "j1.jpg").unlink()
        (src / "j2.jpg").unlink()
        (src / "j2.jpg").mkdir()
        spilled.extend(ref for ref in listing.refs if isinstance(ref, tuple) and ref[0] == "spill")
        return listing

    monkeypatch.setattr(local, "_list", list_then_change)
    out = tmp_path / "out"
    run_pack(PackJob(input=str(src), output=str(out), config=config, labels="none"), workers=0)
    monkeypatch.undo()
    reference = tmp_path / "reference"
    run_pack(PackJob(input=str(unchanged), output=str(reference), config=config, labels="none"), workers=0)
    assert len(spilled) == 3  # the three PNGs took the spill path

    def images(d):
        return {k: rec["patches"][rec["segment_ids"] == i + 1].tobytes()
                for rec in schemas.read(str(d)) for i, k in enumerate(rec["image_keys"][: int(rec["num_images"])])}

    got, want = images(out), images(reference)
    assert {r["key"]: r["reason"] for r in map(json.loads, open(schemas.rejects_path(str(out))))} == \
        {"j1.jpg": "missing", "j2.jpg": "unreadable"}
    assert sorted(got) == ["j0.jpg", "p0.png", "p1.png", "p2.png"]
    assert got == {k: want[k] for k in got}  # as listed, not as changed
