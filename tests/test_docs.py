"""The README is runnable: its Python blocks run, its shell commands are valid `navit-pack` / `make`
invocations, and the relative links between the README, docs/ and benchmarks/ resolve."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def shell_commands(text: str) -> list[str]:
    """Every command of the ```sh blocks (comments and line continuations removed), and every inline
    `navit-pack ...` command in the last cell of a table row (the entry points' one-line commands)."""
    commands = []
    for block in blocks(text, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(line)
    for row in re.findall(r"^\|.*$", text, re.M):
        commands += re.findall(r"`(navit-pack [^`]+)`", row.strip().strip("|").split("|")[-1])
    return commands


def test_readme_python_blocks_run(tmp_path):
    """Runs each ```python block of the README in a fresh interpreter, in a folder holding `packed`, made as
    the README makes it (with the built-in synthetic input in place of the user's photos)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    pack = subprocess.run([sys.executable, "-m", "pipelines.cli", "pack", "--input", "synthetic:32", "--output",
                           "packed", "--seq-len", "256", "--resolution", "uniform:64:256", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert pack.returncode == 0, pack.stderr
    code = blocks(README.read_text(), "python")
    assert code, "the README has no Python example"
    for i, block in enumerate(code):
        script = tmp_path / f"readme_{i}.py"
        script.write_text(block)
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"README python block {i} failed:\n{block}\n{run.stderr[-3000:]}"


def test_readme_shell_commands_are_valid():
    """Each `navit-pack` command parses with the real parser (subcommand and every flag exist, values are
    accepted by argparse); each `make` target exists in the Makefile; `pip install` names an extra we define."""
    text = README.read_text()
    commands = shell_commands(text)
    assert any(c.startswith("make demo") for c in commands) and any(c.startswith("make test") for c in commands)
    targets = set(re.findall(r"^([a-z]+):", (REPO / "Makefile").read_text(), re.M))
    extras = set(re.findall(r"^([a-z]+) = \[", (REPO / "pyproject.toml").read_text(), re.M))
    parser = cli.build_parser()
    for command in commands:
        words = shlex.split(command)
        if words[0] == "navit-pack":
            args = parser.parse_args(words[1:])  # a bad subcommand or flag exits 2 here
            assert callable(args.func), command
        elif words[0] == "make":
            assert set(words[1:]) <= targets, command
        elif words[0] == "pip":
            for extra in re.findall(r"\[([a-z,]+)\]", command):
                assert set(extra.split(",")) <= extras, command
        else:
            pytest.fail(f"unexpected command in the README: {command}")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked offline
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: broken link {link}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: no heading for #{anchor} in {path.name}"


def test_readme_is_a_front_door():
    """At most about 200 lines, and no figures copied from RESULTS.md (they live there only)."""
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\d+(\.\d+)?\s?%|\d[\d,]* (images|img)/s", text), "figures belong in benchmarks/RESULTS.md"
