"""The commit protocol and resume, each fault created for real: `pack --overwrite` interrupted (SIGINT in a
pty, SIGTERM) or killed (SIGKILL) keeps the old dataset byte-identical and verifying; kill -9 at several
moments then `--resume` gives the bytes of an uninterrupted run; `--resume` with other options, another
input or Beam options is refused in one line; a reader racing an overwrite never returns new data under
the old manifest; a shard of another run is refused."""
from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import schemas
from pipelines.batch.journal import JOURNAL
from test_reliability import comparable, shard_bytes

CLI = [sys.executable, "-m", "pipelines.cli"]
# 6 groups of ~40 images, one shard each: the journal records a group, and its shard, at a time.
ARGS = ["--input", "synthetic:240", "--resolution", "uniform:64:256", "--num-shards", "6", "--group-size", "40",
        "--workers", "2"]
OLD = ["--input", "synthetic:90:7", "--resolution", "uniform:32:96", "--num-shards", "3", "--workers", "1"]


def pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["pack", "--no-progress", *args], capture_output=True, text=True, timeout=300)


def packed(*args: str) -> None:
    result = pack(*args)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of ARGS."""
    out = tmp_path_factory.mktemp("reference") / "out"
    packed(*ARGS, "--output", str(out))
    return out


@pytest.fixture(scope="module")
def old_dataset(tmp_path_factory) -> Path:
    """A committed dataset of other options (OLD), to be overwritten."""
    out = tmp_path_factory.mktemp("old") / "out"
    packed(*OLD, "--output", str(out))
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the dataset the manifest commits (manifest, rejects, shards) with its bytes."""
    manifest = schemas.read_manifest(str(out))
    names = ["manifest.json", manifest["rejects"]] + [s["file"] for s in manifest["shards"]]
    return {n: (out / n).read_bytes() for n in names}


def journal_groups(out: Path) -> int:
    try:
        return sum(1 for e in os.listdir(out / JOURNAL) if e.startswith("group-") and not e.endswith(".tmp"))
    except FileNotFoundError:
        return 0


def temporary_shard(out: Path) -> bool:
    return out.is_dir() and any(e.startswith(".packed-") for e in os.listdir(out))


def run_until(argv: list[str], condition, signum: int, *, in_pty: bool = False) -> tuple[int, str]:
    """Run the CLI, send `signum` to its process group once `condition()` holds (asserted reached), and
    return (exit status, everything it printed). in_pty: on a terminal, as a user's Ctrl-C is."""
    if in_pty:
        pid, fd = pty.fork()
        if pid == 0:
            os.execv(sys.executable, [sys.executable, *CLI[1:], *argv])
    else:
        proc = subprocess.Popen(CLI + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        pid, fd = proc.pid, proc.stdout.fileno()
    out, sent, deadline = b"", False, time.monotonic() + 120
    try:
        while True:
            if not sent and condition():
                os.killpg(pid, signum)
                sent = True
            ready, _, _ = select.select([fd], [], [], 0.005)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the pty's other end closed
                    data = b""
                if not data:
                    break
                out += data
            assert time.monotonic() < deadline, "the run neither reached the moment nor ended"
        _, status = os.waitpid(pid, 0)
    finally:
        if not sent:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert sent, "the moment was never reached: the run ended first"
    group_gone = time.monotonic() + 30
    while time.monotonic() < group_gone:  # no worker left behind: the whole process group ends
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("worker processes outlived the run")
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_overwrite_keeps_the_old_dataset_and_says_so_in_one_line(old_dataset, tmp_path, signum, status):
    out = tmp_path / "out"
    shutil.copytree(old_dataset, out)
    before = snapshot(out)
    code, printed = run_until(["pack", *ARGS, "--output", str(out), "--overwrite"],
                              lambda: journal_groups(out) >= 2, signum, in_pty=signum == signal.SIGINT)
    assert code == status, printed
    lines = [line for line in printed.replace("\r", "").split("\n") if line.strip()]
    assert "Traceback" not in printed and len(lines) == 1, printed
    done = int(lines[0].split("after ")[1].split()[0])
    assert 2 <= done < 6 and lines[0] == (f"navit-pack: interrupted after {done} of 6 shards; "
                                          "rerun with --resume to continue"), lines
    assert snapshot(out) == before  # byte for byte
    schemas.verify(str(out))
    assert not any(e.startswith(".") and e != JOURNAL for e in os.listdir(out))  # no temporary, no lock


@pytest.mark.parametrize("moment", ["journal started", "temporary shard", "two groups done"])
def test_a_killed_overwrite_keeps_the_old_dataset(old_dataset, tmp_path, moment):
    out = tmp_path / "out"
    shutil.copytree(old_dataset, out)
    before = snapshot(out)
    condition = {"journal started": lambda: (out / JOURNAL / "run.json").exists(),
                 "temporary shard": lambda: temporary_shard(out),
                 "two groups done": lambda: journal_groups(out) >= 2}[moment]
    run_until(["pack", "--no-progress", *ARGS, "--output", str(out), "--overwrite"], condition, signal.SIGKILL)
    assert snapshot(out) == before
    schemas.verify(str(out))
    assert [r["patches"].tobytes() for r in schemas.read(str(out))] == \
        [r["patches"].tobytes() for r in schemas.read(str(old_dataset))]


MOMENTS = {  # kill -9 moments of a run into an empty folder, each asserted reached
    "listed, journal started": lambda out: (out / JOURNAL / "run.json").exists(),
    "first temporary shard": lambda out: temporary_shard(out),
    "half the groups done": lambda out: journal_groups(out) >= 3,
    "five of six groups done": lambda out: journal_groups(out) >= 5,
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_9_then_resume_gives_the_bytes_of_an_uninterrupted_run(reference, tmp_path, moment):
    out = tmp_path / "out"
    run_until(["pack", "--no-progress", *ARGS, "--output", str(out)], lambda: MOMENTS[moment](out), signal.SIGKILL)
    run_id = json.loads((out / JOURNAL / "run.json").read_text())["run_id"]
    kept = {e: (out / e).read_bytes() for e in os.listdir(out) if e.startswith("packed-")}
    resumed = pack(*ARGS, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    manifest = schemas.read_manifest(str(out))
    assert manifest["run_id"] == run_id  # the same run, continued
    assert comparable(manifest) == comparable(schemas.read_manifest(str(reference)))
    assert shard_bytes(out) == shard_bytes(reference)
    assert all((out / name).read_bytes() == data for name, data in kept.items())  # what was whole was kept
    assert sorted(os.listdir(out)) == sorted(snapshot(out))  # journal, lock and temporaries gone
    schemas.verify(str(out))


def test_resume_skips_the_fill_of_finished_groups(reference, tmp_path):
    """A group the journal finished is not filled again: its shard file is the one the killed run wrote
    (same inode), and a damaged one (sha256 no longer the recorded one) is written again."""
    out = tmp_path / "out"
    run_until(["pack", "--no-progress", *ARGS, "--output", str(out)], lambda: journal_groups(out) >= 3, signal.SIGKILL)
    finished = sorted(e for e in os.listdir(out) if e.startswith("packed-"))
    inodes = {e: os.stat(out / e).st_ino for e in finished}
    with open(out / finished[0], "r+b") as f:  # damage one finished shard
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert pack(*ARGS, "--output", str(out), "--resume").returncode == 0
    assert os.stat(out / finished[0]).st_ino != inodes[finished[0]]  # rewritten
    assert all(os.stat(out / e).st_ino == inodes[e] for e in finished[1:])  # kept
    assert shard_bytes(out) == shard_bytes(reference)


@pytest.mark.parametrize("change,named", [
    (["--seq-len", "128"], "--seq-len"), (["--seed", "3"], "--seed"), (["--format", "parquet"], "--format"),
])
def test_resume_with_other_options_is_refused_in_one_line(tmp_path, change, named):
    out = tmp_path / "out"
    run_until(["pack", "--no-progress", *ARGS, "--output", str(out)], lambda: journal_groups(out) >= 1, signal.SIGKILL)
    refused = pack(*ARGS, *change, "--output", str(out), "--resume")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith(f"navit-pack: error: --resume: {named} was ")
    assert not (out / "manifest.json").exists() and (out / JOURNAL / "run.json").exists()  # nothing changed


def test_resume_with_another_input_or_beam_options_is_refused_in_one_line(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    args = ["--input", str(root), "--labels", "none", "--resolution", "uniform:32:64", "--num-shards", "3",
            "--group-size", "10", "--workers", "1"]
    out = tmp_path / "out"
    run_until(["pack", "--no-progress", *args, "--output", str(out)], lambda: journal_groups(out) >= 1, signal.SIGKILL)
    Image.fromarray(rng.integers(0, 255, (50, 56, 3), dtype=np.uint8)).save(root / "05.png")  # another size
    refused = pack(*args, "--output", str(out), "--resume")
    errors = [line for line in refused.stderr.splitlines() if not line.startswith("navit-pack: note: taking over")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr  # after the dead run's lock is taken over
    assert errors[0] == ("navit-pack: error: --resume: the input changed since the interrupted run (the names, "
                         "sizes, labels or metadata of its 30 records differ); rerun without --resume (with "
                         "--overwrite) to start again")
    beam = pack(*args, "--output", str(out), "--resume", "--", "--runner=DirectRunner")
    assert beam.returncode == 2 and beam.stderr.count("\n") == 1 and "local runs only" in beam.stderr, beam.stderr


def test_a_reader_racing_an_overwrite_gets_old_data_or_an_error(old_dataset, tmp_path):
    """A read() generator opened on the old manifest, then the folder overwritten (shards replaced under the
    names it is reading, then a whole new run committed): every record it returns is an old one, and it
    ends with CorruptShard or ManifestError, or with all of the old data."""
    out = tmp_path / "out"
    shutil.copytree(old_dataset, out)
    old = [r["patches"].tobytes() for r in schemas.read(str(out))]
    manifest = schemas.read_manifest(str(out))
    other = tmp_path / "other"
    packed(*ARGS, "--output", str(other))
    replacement = [other / s["file"] for s in schemas.read_manifest(str(other))["shards"]]

    import schemas._io as io

    real_iter_shard, swapped = io.iter_shard, []

    def swap_then_read(path, *args, **kwargs):  # the overwrite lands between the hash and the read
        for shard, new in zip(manifest["shards"], replacement):
            tmp = out / f".swap-{shard['file']}"
            shutil.copyfile(new, tmp)
            os.replace(tmp, out / shard["file"])
        swapped.append(path)
        return real_iter_shard(path, *args, **kwargs)

    io.iter_shard = swap_then_read
    try:
        got = []
        with pytest.raises(schemas.CorruptShard):
            for r in schemas.read(str(out)):
                got.append(r["patches"].tobytes())
    finally:
        io.iter_shard = real_iter_shard
    assert swapped and got == old[:len(got)] and len(got) >= manifest["shards"][0]["num_sequences"]

    shutil.rmtree(out)  # and a real overwrite, committed while the generator is between shards
    shutil.copytree(old_dataset, out)
    reader = schemas.read(str(out))
    got = [next(reader)["patches"].tobytes()]
    packed(*ARGS, "--output", str(out), "--overwrite")
    with pytest.raises((schemas.CorruptShard, schemas.ManifestError)):
        for r in reader:
            got.append(r["patches"].tobytes())
    assert got == old[:len(got)]


def test_a_shard_of_another_run_is_refused(old_dataset, tmp_path):
    """A manifest listing another run's shard (same count, its own sha256: every byte checks out) is refused:
    the file name carries a run id the manifest does not hold."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(old_dataset, a)
    packed(*OLD[:2], "--input", "synthetic:90:8", *OLD[2:], "--output", str(b))  # OLD with other images, same layout
    ma, mb = schemas.read_manifest(str(a)), schemas.read_manifest(str(b))
    shutil.copyfile(b / mb["shards"][0]["file"], a / mb["shards"][0]["file"])
    ma["shards"][0] = dict(mb["shards"][0])
    ma["num_sequences"] = sum(s["num_sequences"] for s in ma["shards"])
    (a / "manifest.json").write_text(json.dumps(ma))
    for reader in (schemas.read_manifest, lambda d: list(schemas.read(d)), schemas.verify):
        with pytest.raises(schemas.ManifestError, match="another run's shard"):
            reader(str(a))
