"""The data-parallel examples run for real with two CPU processes: torch (gloo, torchrun's variables) and
JAX (jax.distributed on localhost). Each asserts that no image is seen twice across the ranks and that
all ranks take the same number of steps."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(commands: list[list[str]], envs: list[dict]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for c, e in zip(commands, envs)]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank did not finish within 240 s")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def report_of(results) -> dict:
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(results[0].stdout.strip().splitlines()[-1])


def test_torch_ddp_example_two_ranks():
    pytest.importorskip("torch")
    port = free_port()
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", PYTHONPATH=str(REPO))
    script = str(REPO / "examples" / "ddp_stream_torch.py")
    results = run_ranks([[sys.executable, script, "--input", "synthetic:120"]] * 2,
                        [dict(base, RANK=str(r), LOCAL_RANK=str(r)) for r in range(2)])
    report = report_of(results)
    assert report["steps"][0] == report["steps"][1] > 0 and report["images"] == report["distinct"] == 120


def test_jax_multiprocess_example_two_processes():
    pytest.importorskip("jax")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    script = str(REPO / "examples" / "multiprocess_stream_jax.py")
    results = run_ranks([[sys.executable, script, "--input", "synthetic:120", "--process-id", str(r), "--num-processes", "2",
                          "--coordinator", f"127.0.0.1:{port}"] for r in range(2)], [env, env])
    report = report_of(results)
    assert report["steps"][0] == report["steps"][1] > 0 and report["images"] == report["distinct"] == 120
