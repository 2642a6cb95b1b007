"""`navit-pack serve` as trainers meet it: separate processes on 127.0.0.1, and a bounded shutdown.

Each serve process imports TensorFlow (seconds), so the tests start few of them."""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import packer

pytest.importorskip("tensorflow")

from pipelines import service  # noqa: E402
from pipelines.cli import options  # noqa: E402
from pipelines.cli import serve as cmd_serve  # noqa: E402

PACK_OPTIONS = ["--seq-len", "64", "--patch-size", "8", "--resolution", "budget:32"]
CONFIG = packer.PackConfig(seq_len=64, patch_size=8, resolution="budget:32")
BOUND = cmd_serve.STOP_SECONDS + 5  # the stated bound, plus slack for a loaded test machine


def start_serve(*args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})


def address(proc: subprocess.Popen) -> str:
    """The dispatcher address a serve process prints on its first line."""
    line = proc.stdout.readline()
    match = re.search(r"dispatcher grpc://([\w.-]+:\d+)", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    return match.group(1)


def finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_dispatcher_alone_and_two_worker_processes_then_sigterm_stops_each():
    dispatcher = start_serve("--workers", "0")
    procs = [dispatcher]
    try:
        addr = address(dispatcher)
        assert addr.startswith("127.0.0.1:")
        for _ in range(2):
            worker = start_serve("--input", "synthetic:12", "--dispatcher", addr, "--workers", "1", "--epochs", "2",
                                 "--group-units", "1", *PACK_OPTIONS)
            procs.append(worker)
            assert "joined dispatcher" in worker.stdout.readline()
        other = start_serve("--input", "synthetic:12", "--dispatcher", addr, "--workers", "1", "--epochs", "2",
                            "--group-units", "1", *PACK_OPTIONS, "--seed", "1")  # other options: refused
        procs.append(other)
        assert other.wait(60) == 2 and other.stdout.read() == ""
        errors = [line for line in other.stderr.read().splitlines() if line.startswith("navit-pack: error")]
        assert len(errors) == 1 and "other input or packing options" in errors[0], errors
        procs.remove(other)
        partial = service.read_service(f"grpc://{addr}", CONFIG).take(1)  # a trainer that stops early
        assert len(list(partial.as_numpy_iterator())) == 1
        out = list(service.read_service(f"grpc://{addr}", CONFIG).as_numpy_iterator())
        keys = collections.Counter(k for r in out for k in r["image_keys"][: r["num_images"]])
        assert len(keys) == 12 and set(keys.values()) == {2}  # dynamic sharding over both workers: once per epoch
        start = time.monotonic()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(BOUND) for p in procs] == [0, 0, 0]
        assert time.monotonic() - start < BOUND
        errs = [p.stderr.read() for p in procs]
        assert all("stopped" in e for e in errs)
        assert all(e.count("warning: the tf.data service ports listen on every network interface") == 1 for e in errs)
    finally:
        finish(procs)


def test_duration_ends_the_server_after_a_trainer_has_read():
    duration = 15  # counted from when the servers are up (the line `address` reads)
    proc = start_serve("--input", "synthetic:400", "--workers", "2", "--epochs", "5", "--group-units", "1",
                       "--duration", str(duration), *PACK_OPTIONS)
    try:
        addr = address(proc)
        start = time.monotonic()
        assert len(list(service.read_service(f"grpc://{addr}", CONFIG).take(3).as_numpy_iterator())) == 3
        assert proc.wait(duration + BOUND) == 0
        assert duration - 1 <= time.monotonic() - start < duration + BOUND
    finally:
        finish([proc])


def test_servers_that_do_not_stop_are_killed_in_the_bound_and_a_second_signal_ends_at_once():
    hang = {cmd_serve.HANG_ON_STOP_ENV: "1"}
    first, second = start_serve("--workers", "0", env=hang), start_serve("--workers", "0", env=hang)
    try:
        address(first), address(second)
        start = time.monotonic()
        first.send_signal(signal.SIGTERM)
        second.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert second.poll() is None  # still waiting for its servers
        second.send_signal(signal.SIGINT)
        assert second.wait(3) == 128 + signal.SIGINT
        assert second.stdout.read() == ""  # EOF: the servers' process is gone too
        assert first.wait(BOUND) == 0
        assert cmd_serve.STOP_SECONDS <= time.monotonic() - start < BOUND
        assert "did not stop within" in first.stderr.read()
        assert first.stdout.read() == ""
    finally:
        finish([first, second])


def test_bad_serve_options_fail_before_starting_anything():
    for args, flag in ((["--workers", "2"], "--input"), (["--workers", "0", "--dispatcher", "x:1"], "--workers"),
                       (["--input", "synthetic:4", "--dispatcher", "nohostport"], "--dispatcher"),
                       (["--workers", "0", "--host", "10.1.2.3"], "--i-understand-remote-code-execution"),
                       (["--workers", "0", "--worker-timeout", "100"], "--worker-timeout")):
        result = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", *args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and flag in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_host_other_than_loopback_needs_the_flag_that_names_the_risk():
    import argparse

    from pipelines.cli import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    check = lambda *a: serve._check(parser.parse_args(["serve", "--workers", "0", *a]))  # noqa: E731
    for host in ("10.1.2.3", "head-node", "0.0.0.0"):
        with pytest.raises(options.OptionError, match="can run code as this user"):
            check("--host", host)
        check("--host", host, "--i-understand-remote-code-execution")
    check("--host", "127.0.0.1"), check("--host", "localhost"), check()


def servers_pid(proc: subprocess.Popen) -> int:
    """The pid of a serve process's servers' child (not multiprocessing's resource tracker)."""
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    kids = [int(k) for k in kids if "resource_tracker" not in open(f"/proc/{k}/cmdline").read()]
    assert len(kids) == 1, kids
    return kids[0]


def children(pid: int) -> list[int]:
    return [int(k) for k in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def gone(pids, bound: float) -> bool:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in pids):
            return True
        time.sleep(0.2)
    return False


LOST_BOUND = 60  # the guarantee: a trainer hears of a killed worker within 60 s (here: --worker-timeout 5)


def test_a_worker_killed_mid_epoch_fails_the_trainer_in_the_bound_naming_it():
    tf = pytest.importorskip("tensorflow")
    dispatcher = service.LocalService(num_workers=0, lost_after=5)  # the registry's silence bound: 5 s
    procs = []
    try:
        names = []
        for _ in range(2):
            worker = start_serve("--input", "synthetic:3000", "--dispatcher", dispatcher.dispatcher_address,
                                 "--workers", "1", "--group-units", "1", "--threads", "2", *PACK_OPTIONS)
            procs.append(worker)
            line = worker.stdout.readline()
            assert "joined dispatcher" in line, line
            names.append(re.search(r"workers \(([\w.:-]+)\)", line).group(1))
        records = iter(service.read_service(dispatcher.target, CONFIG).as_numpy_iterator())
        for _ in range(20):
            next(records)
        victim = servers_pid(procs[0])
        fills = children(victim)
        assert fills  # its fill processes, orphaned by the kill
        ended: list = []

        def trainer() -> None:  # the other worker's records, until the watch fails the reader
            try:
                for _ in records:
                    pass
                ended.append("no error")
            except Exception as e:  # noqa: BLE001 - checked below
                ended.append(e)

        reader = threading.Thread(target=trainer, daemon=True)  # a stalled reader cannot be interrupted
        os.kill(victim, signal.SIGKILL)
        reader.start()
        reader.join(LOST_BOUND)
        assert ended, f"the trainer did not end within {LOST_BOUND} s of the kill"
        assert isinstance(ended[0], tf.errors.UnknownError), ended
        assert re.search(r"ServiceWorkerLost: .* lost: " + re.escape(names[0]) + " ", str(ended[0])), ended
        assert names[1] not in str(ended[0])
        assert procs[0].wait(BOUND) == 1  # the supervisor reports its servers' death
        assert gone(fills, 10), "orphaned fill processes still running"
        stderr = procs[0].stderr.read()
        assert "Traceback" not in stderr and "Error" not in stderr, stderr
    finally:
        finish(procs)
        dispatcher.stop()


ORPHAN_SCRIPT = """
import os, signal, sys, time
import packer
from packer._pool import FillPool
pool = FillPool(packer.PackConfig(seq_len=64, patch_size=8, resolution="budget:32"), 2)
holder = os.fork()  # keeps the pool's ends of the workers' sockets open: no EOF reaches them
if holder == 0:
    time.sleep(120)
    os._exit(0)
print(holder, *pool.worker_pids, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_orphaned_fill_processes_exit_quietly_when_their_parent_dies():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": root})
    holder, *workers = (int(x) for x in proc.stdout.readline().split())
    try:
        assert proc.wait(60) == -signal.SIGKILL and len(workers) == 2
        assert gone(workers, 15), "orphaned fill workers still running"
    finally:
        os.kill(holder, signal.SIGKILL)
    assert proc.stderr.read() == ""  # nothing from the workers either (they share its stderr)
