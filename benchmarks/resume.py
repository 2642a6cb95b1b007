"""What `navit-pack pack --resume` saves: the wall time of resuming a run killed (kill -9 of its process
group) once 50% and 90% of its packing groups were written, against a full run, measured in the same
invocation on the same input. Each resumed output is checked byte-identical to the full run's.

The resume pays the start-up, the listing (headers only) and planning of every group, and the sha256 of
the kept shards; it skips the fill (decode, resize, patchify) and write of the finished groups.

    python -m benchmarks.resume [--input DIR|synthetic:N] [--groups 10] [--rounds 3] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INPUT = os.path.join(HERE, "..", "..", "shared", "data", "imagenet-dev")
JOURNAL = ".navit-pack-journal"


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "pack", "--no-progress", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, **kw)


def _groups_done(out: str) -> int:
    try:
        return sum(1 for e in os.listdir(os.path.join(out, JOURNAL)) if e.startswith("group-") and e.endswith(".json"))
    except FileNotFoundError:
        return 0


def _timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    proc = _cli(args)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"pack failed: {err.decode()}")
    return time.perf_counter() - t0


def _kill_after(args: list[str], out: str, groups: int) -> None:
    proc = _cli(args)
    while proc.poll() is None and _groups_done(out) < groups:
        time.sleep(0.002)
    if proc.poll() is not None:
        raise SystemExit(f"the run ended before {groups} groups were written")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _shards(out: str) -> list[bytes]:
    import schemas

    return [open(os.path.join(out, s["file"]), "rb").read() for s in schemas.read_manifest(out)["shards"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default=DEFAULT_INPUT if os.path.isdir(DEFAULT_INPUT) else "synthetic:2000")
    p.add_argument("--groups", type=int, default=10, help="packing groups (= shards) of the run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default="2")
    a = p.parse_args(argv)
    from pipelines import sources

    n = sum(1 for _ in sources.open_source(a.input))  # records in the input
    base = ["--input", a.input, "--resolution", "uniform:64:256", "--num-shards", str(a.groups),
            "--group-size", str(-(-n // a.groups)), "--workers", a.workers]
    work = tempfile.mkdtemp(prefix="navit-resume-bench-")
    times: dict[str, list[float]] = {"full": [], "resume after 50%": [], "resume after 90%": []}
    try:
        ref = os.path.join(work, "full")
        for r in range(a.rounds):
            shutil.rmtree(ref, ignore_errors=True)
            times["full"].append(_timed(base + ["--output", ref]))
            for frac, name in ((0.5, "resume after 50%"), (0.9, "resume after 90%")):
                out = os.path.join(work, f"killed-{frac}")
                shutil.rmtree(out, ignore_errors=True)
                _kill_after(base + ["--output", out], out, int(frac * a.groups))
                times[name].append(_timed(base + ["--output", out, "--resume"]))
                if _shards(out) != _shards(ref):
                    raise SystemExit(f"{name}: the resumed output differs from the full run's")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    full = statistics.median(times["full"])
    print(f"Resume vs full run: {a.input} ({n} images), {a.groups} groups/shards, --workers {a.workers}, "
          f"uniform:64:256, median of {a.rounds}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| run | wall s (median) | runs | vs full |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.2f} | {', '.join(f'{t:.2f}' for t in ts)} | x{m / full:.2f} |")
    print("every resumed output byte-identical to the full run's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
