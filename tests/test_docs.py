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


# Every ```python block of docs/*.md runs (test_docs_python_snippets_run) in a fresh interpreter, in a folder
# holding what the docs assume a reader has: `out`, a dataset packed from synthetic images (by default
# `navit-pack pack --input synthetic:96 --output out`; an HTML comment `<!-- test: pack ARGS -->` just above a
# block adds pack options, `<!-- test: skip REASON -->` skips it with the reason), `~/imagenet/train` (HOME is
# the folder; a few JPEGs), and these stand-ins for the reader's own values, defined before each block:
SNIPPET_PRELUDE = """
import glob, json, os, sys
import numpy as np
import packer, schemas
sys.path.insert(0, {examples!r})                      # the docs' `import navit_tf` runs from examples/
E = schemas.read_manifest("out")["max_images"]         # the records' max_images_per_seq
i = 0                                                  # a record index
num_steps = 2
jpeg_bytes = open(os.path.expanduser("~/imagenet/train/n01440764/0.jpg"), "rb").read()
_config = packer.PackConfig(seq_len=256, patch_size=16, resolution="uniform:64:256", token_drop="beta:0.3:0.9")
images = [packer.prepare_image(jpeg_bytes, key=f"img{{k}}", config=_config) for k in range(3)]
def train_step(*args, **kwargs): pass
def save_json(state, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(state, f)
"""
_SNIPPET = re.compile(r"(?:<!-- test: (?P<test>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
_NEEDS = {"pyarrow": "pyarrow", "datasets.": "datasets", "polars.": "polars", "tf_dataset": "tensorflow",
          "as_tf_dataset": "tensorflow", "keras": "keras", "array_record": "array_record",
          "import torch": "torch", 'format="torch"': "torch", 'with_format("torch"': "torch"}


def doc_snippets() -> list:
    out = []
    for doc in sorted((REPO / "docs").glob("*.md")):
        for n, m in enumerate(_SNIPPET.finditer(doc.read_text())):
            out.append(pytest.param(m.group("code"), m.group("test") or "", id=f"{doc.stem}-{n}"))
    return out


@pytest.fixture(scope="module")
def snippet_home(tmp_path_factory) -> Path:
    """~/imagenet/train: a few JPEGs in two class folders."""
    from conftest import encode, make_pixels

    home = tmp_path_factory.mktemp("home")
    for k in range(8):
        path = home / "imagenet" / "train" / ("n01440764", "n01443537")[k % 2] / f"{k // 2}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(make_pixels(90 + 10 * k, 120, seed=k), "JPEG", quality=85))
    return home


@pytest.mark.parametrize("code,directive", doc_snippets())
def test_docs_python_snippets_run(code, directive, snippet_home, tmp_path):
    if directive.startswith("skip"):
        pytest.skip(directive[len("skip"):].strip())
    for needle, module in _NEEDS.items():
        if needle in code:
            pytest.importorskip(module, reason=f"the snippet uses {module}, which is not installed")
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(snippet_home), TF_CPP_MIN_LOG_LEVEL="3")
    extra = shlex.split(directive[len("pack"):]) if directive.startswith("pack") else []
    pack = subprocess.run([sys.executable, "-m", "pipelines.cli", "pack", "--input", "synthetic:96", "--output", "out",
                           "--no-progress", *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert pack.returncode == 0, pack.stderr
    script = tmp_path / "snippet.py"
    script.write_text(SNIPPET_PRELUDE.format(examples=str(REPO / "examples")) + code)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"snippet failed:\n{code}\n{run.stderr[-3000:]}"


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


RESULTS = REPO / "benchmarks" / "RESULTS.md"
# A measured figure: a ratio (1.57x), a rate (505 img/s, 525k), a decibel or percentage with decimals,
# or a bare number with three or more decimals (0.978). Design constants (0.2, 1.7) and counts are not.
FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:x\b| ?(?:img/s|images/s|tokens/s|dB)\b|k\b)"
                    r"|(?<![\w.])(\d+\.\d+)%|(?<![\w.])(\d+\.\d{3,})(?![\w.])")


def measured_figures(text: str) -> list[str]:
    """The measured figures of a markdown text, code (fenced or inline) and links left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`|\]\([^)]*\)|arXiv \S+", "", text)
    return [next(g for g in m.groups() if g) for m in FIGURE.finditer(text)]


@pytest.mark.parametrize("doc", [d for d in DOCS if d != RESULTS], ids=lambda p: str(p.relative_to(REPO)))
def test_documents_copy_no_figure_that_results_lacks(doc):
    """Figures live in benchmarks/RESULTS.md; a document that quotes one must quote it exactly as it stands
    there, so a figure cannot drift (regenerated results that change it fail here until the text follows)."""
    results = set(re.findall(r"\d+(?:\.\d+)?", RESULTS.read_text().replace(",", "")))
    drifted = [f for f in measured_figures(doc.read_text()) if f not in results]
    assert not drifted, f"{doc.name} quotes figures not in RESULTS.md: {drifted}"


def test_the_figure_pattern_finds_figures():
    assert measured_figures("runs at 0.9-1.05x, 505 img/s, 98.6% full, 0.978 T, 525k tokens/s, 28.7 dB") == \
        ["1.05", "505", "98.6", "0.978", "525", "28.7"]
    assert measured_figures("paper 2.2, a 0.2 rate, `x/127.5 - 1`, arXiv 2307.06304, 4 workers") == []
