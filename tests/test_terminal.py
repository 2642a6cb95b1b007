"""The user-facing commands run as a person runs them: in a real pseudo-terminal (stdin, stdout and stderr a
tty of 100 x 30, as a terminal window is), with the progress bar on. Each exits 0, prints no traceback and
leaves its output; the same command with --no-progress, or with stderr a pipe, writes the same bytes."""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import tarfile
import termios
import time
from pathlib import Path

import pytest

from conftest import encode, make_pixels

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="", LINES="")
NAVIT_PACK = [sys.executable, "-m", "pipelines.cli"]
IMAGES = 300  # more than the 256 records after which `pack` first reports reading progress without a total


def run_in_terminal(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run `args` with a pseudo-terminal as stdin, stdout and stderr; (exit status, everything it printed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(args, cwd=cwd, env=env or ENV, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: the terminal's other side closed (the process ended)
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"{args} did not finish within {timeout} s in a terminal:\n{out.decode(errors='replace')}")
        return proc.wait(timeout=30), out.decode("utf-8", "replace")
    finally:
        os.close(master)


def run_in_pipe(args: list[str], cwd: Path) -> tuple[int, str, str]:
    p = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in an output folder (the lock of a finished run is gone), the run id taken out
    of the names and the manifest (each run has its own; it never appears inside a shard)."""
    manifest = folder / "manifest.json"
    run_id = json.loads(manifest.read_text())["run_id"] if manifest.exists() else "\0"
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                manifest = json.loads(data)
                data = json.dumps({k: v for k, v in manifest.items() if k not in ("run_id", "rejects")} | {
                    "shards": [dict(s, file=s["file"].replace(run_id, "RUN")) for s in manifest["shards"]]}).encode()
            out[str(p.relative_to(folder)).replace(run_id, "RUN")] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """photos/ (two class folders of small JPEGs) and shards.tar (a WebDataset shard of the same images)."""
    root = tmp_path_factory.mktemp("terminal")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(IMAGES):
            cls = ("cat", "dog")[i % 2]
            data = encode(make_pixels(40 + i % 7 * 8, 56 + i % 5 * 8, seed=i), "JPEG", quality=80)
            path = root / "photos" / cls / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "shards.tar").write_bytes(buf.getvalue())
    return root


PACK_INPUTS = {
    "folder": "photos",
    "synthetic": f"synthetic:{IMAGES}",
    "wds": "wds:shards.tar",
}
# The README's pack command, on these inputs.
PACK = ["pack", "--output", "{out}", "--seq-len", "256", "--resolution", "uniform:64:256", "--token-drop", "beta:0.25:0.5"]


def pack_args(source: str, out: str, *extra: str) -> list[str]:
    return NAVIT_PACK + [a.format(out=out) for a in PACK] + ["--input", PACK_INPUTS[source], *extra]


def assert_clean(status: int, printed: str, what: str) -> None:
    assert status == 0, f"{what} exited {status}:\n{printed[-3000:]}"
    assert "Traceback" not in printed, f"{what} printed a traceback:\n{printed[-3000:]}"


@pytest.mark.parametrize("source", sorted(PACK_INPUTS))
def test_pack_in_a_terminal_shows_progress_and_writes_the_same_bytes(inputs, tmp_path, source):
    status, printed = run_in_terminal(pack_args(source, str(tmp_path / "tty")), cwd=inputs)
    assert_clean(status, printed, f"pack {source} in a terminal")
    assert "reading" in printed and "packing" in printed and "img/s" in printed, printed  # tqdm's bar was drawn
    assert "packing efficiency" in printed
    assert (tmp_path / "tty" / "manifest.json").is_file()
    expected = folder_digest(tmp_path / "tty")

    status, printed = run_in_terminal(pack_args(source, str(tmp_path / "quiet"), "--no-progress"), cwd=inputs)
    assert_clean(status, printed, f"pack {source} --no-progress in a terminal")
    assert "img/s" not in printed.split("output")[0], "--no-progress drew a bar"
    assert folder_digest(tmp_path / "quiet") == expected

    status, out, err = run_in_pipe(pack_args(source, str(tmp_path / "pipe")), cwd=inputs)
    assert_clean(status, out + err, f"pack {source} with stderr a pipe")
    assert folder_digest(tmp_path / "pipe") == expected


@pytest.fixture(scope="module")
def packed(inputs) -> Path:
    status, out, err = run_in_pipe(pack_args("folder", "packed", "--no-progress"), cwd=inputs)
    assert status == 0, err
    return inputs / "packed"


READERS = {
    "stats": ["stats", "packed", "--report", "{out}/report.html"],
    "inspect": ["inspect", "packed", "--sequence", "0", "--out", "{out}/seq.png"],
    "verify": ["verify", "packed"],
    "advise": ["advise", "--input", "photos", "--target-padding", "0.02", "--draws", "2000", "--json", "{out}/advice.json"],
}


@pytest.mark.parametrize("command", sorted(READERS))
def test_reading_commands_in_a_terminal(inputs, packed, tmp_path, command):
    outputs = {}
    for how in ("tty", "pipe"):
        out = tmp_path / how
        out.mkdir()
        args = NAVIT_PACK + [a.format(out=out) for a in READERS[command]]
        if how == "tty":
            status, printed = run_in_terminal(args, cwd=inputs)
        else:
            status, stdout, stderr = run_in_pipe(args, cwd=inputs)
            printed = stdout + stderr
        assert_clean(status, printed, f"{command} ({how})")
        outputs[how] = folder_digest(out)
    assert outputs["tty"] == outputs["pipe"]
    if command != "verify":
        assert outputs["tty"], f"{command} wrote nothing"


def test_serve_in_a_terminal_stops_after_its_duration(inputs):
    pytest.importorskip("tensorflow")
    args = NAVIT_PACK + ["serve", "--input", "synthetic:16", "--workers", "1", "--duration", "2", "--threads", "0"]
    status, printed = run_in_terminal(args, cwd=inputs, timeout=240)
    assert_clean(status, printed, "serve --duration 2 in a terminal")


OLDEST_TQDM = "4.60.0"  # pyproject: progress = ["tqdm>=4.60"]


def test_pack_in_a_terminal_with_the_oldest_tqdm(inputs, tmp_path):
    """The progress bar works with the oldest tqdm pyproject.toml allows (the suite's own is the newest)."""
    target = tmp_path / "tqdm-oldest"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          f"tqdm=={OLDEST_TQDM}"], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI: cannot install tqdm=={OLDEST_TQDM}: {pip.stderr[-500:]}")
        pytest.skip(f"cannot install tqdm=={OLDEST_TQDM} (no package registry?): {pip.stderr.strip()[-200:]}")
    env = dict(ENV, PYTHONPATH=f"{target}{os.pathsep}{REPO}")
    check = subprocess.run([sys.executable, "-c", "import tqdm; print(tqdm.__version__)"], env=env,
                           capture_output=True, text=True)
    assert check.stdout.strip() == OLDEST_TQDM, check
    status, printed = run_in_terminal(pack_args("folder", str(tmp_path / "out")), cwd=inputs, env=env)
    assert_clean(status, printed, f"pack with tqdm {OLDEST_TQDM} in a terminal")
    assert "img/s" in printed and (tmp_path / "out" / "manifest.json").is_file()
