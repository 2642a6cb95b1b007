"""Every subcommand reports a bad configuration the same way, before touching any output: exactly one line
`navit-pack: error: ...` on the process's raw stderr, exit status 2, and the output folder as it was."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SIZES_CSV = "key,height,width\na,100,200\nb,300,50\n"

# (argv after `navit-pack`, words the one line must contain). {out} is an existing folder holding a sentinel
# file, {new} a path that does not exist yet, {csv} a small CSV of image sizes.
CASES = {
    "pack-fill-needs-packer": (["pack", "--input", "synthetic:8", "--output", "{new}", "--fill", "exact",
                                "--packer", "next-fit", "--no-progress"], ["--fill", "next-fit"]),
    "pack-overwrite-bad-config": (["pack", "--input", "synthetic:8", "--output", "{out}", "--overwrite",
                                   "--fill", "exact", "--packer", "first-fit", "--no-progress"], ["--fill"]),
    "pack-missing-output": (["pack", "--input", "synthetic:8"], ["pack", "--output"]),
    "serve-fill-needs-packer": (["serve", "--input", "synthetic:8", "--fill", "exact", "--packer", "next-fit"],
                                ["--fill"]),
    "bench-bad-seq-len": (["bench", "packing", "--input", "{csv}", "--seq-len", "0"], ["--seq-len"]),
    "advise-bad-resolution": (["advise", "--input", "{csv}", "--resolution", "bogus"], ["--resolution", "bogus"]),
    "stats-not-an-output": (["stats", "{out}"], ["manifest"]),
    "inspect-not-an-output": (["inspect", "{out}"], ["manifest"]),
    "verify-not-an-output": (["verify", "{out}"], ["manifest"]),
    "unknown-command": (["frobnicate"], ["frobnicate"]),
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_configuration_is_one_line_exit_2_and_touches_no_output(case, tmp_path):
    argv, words = CASES[case]
    out, new, csv = tmp_path / "out", tmp_path / "new", tmp_path / "sizes.csv"
    out.mkdir()
    (out / "keep.txt").write_text("sentinel")
    csv.write_text(SIZES_CSV)
    before = snapshot(out)
    argv = [a.format(out=out, new=new, csv=csv) for a in argv]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("navit-pack: error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert proc.stdout == ""
    assert snapshot(out) == before and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sizes.csv"]
