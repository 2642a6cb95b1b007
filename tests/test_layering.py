"""Package layering: packer <- schemas <- pipelines <- CLI, and the product never imports benchmarks.
Each package is imported alone in a fresh interpreter, and the packages it pulled in are checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WATCHED = ("packer", "schemas", "pipelines", "benchmarks", "tensorflow", "apache_beam", "pyarrow", "datasets",
           "array_record", "torch")

# module -> packages it must not load
FORBIDDEN = {
    "packer": ("schemas", "pipelines", "benchmarks", "tensorflow", "apache_beam", "pyarrow"),
    "schemas": ("pipelines", "benchmarks", "tensorflow", "apache_beam", "pyarrow", "datasets", "array_record", "torch"),
    "pipelines": ("benchmarks",),
    "pipelines.cli": ("benchmarks",),
}


def loaded_packages(statement: str) -> set[str]:
    code = (f"import sys; {statement}; "
            f"print(__import__('json').dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({WATCHED!r}))))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_importing_a_package_loads_only_the_layers_below(module):
    loaded = loaded_packages(f"import {module}")
    assert module.split(".")[0] in loaded
    assert not loaded & set(FORBIDDEN[module]), sorted(loaded & set(FORBIDDEN[module]))


def test_every_cli_subcommand_runs_without_benchmarks():
    """Building the full parser imports every subcommand module (advise, bench and stats included)."""
    loaded = loaded_packages("import pipelines.cli as c, pipelines.cli.stats, pipelines.cli.advise, "
                             "pipelines.cli.bench, pipelines.packing_efficiency, pipelines.cli.report; c.build_parser()")
    assert "benchmarks" not in loaded


def test_the_sources_package_has_no_import_loop():
    """Each source kind imports only `base` (and `files`, for shared file access); only the package's
    `__init__`, the registry, imports the kinds."""
    import ast

    package = REPO / "pipelines" / "sources"
    imports = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports[path.stem] = {node.module or "" for node in ast.walk(tree)
                              if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert not any(isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipelines.sources")
                       for node in ast.walk(tree)), f"{path.name} imports the package by its absolute name"
    kinds = set(imports) - {"__init__", "base"}
    assert imports["base"] == set()
    assert kinds <= imports["__init__"], "every kind module is registered in __init__"
    for kind in kinds:
        assert imports[kind] <= {"base", "files"} and "" not in imports[kind], (kind, imports[kind])
    assert imports["files"] == {"base"}


def test_packages_use_each_other_only_through_the_public_api():
    """pipelines, schemas and examples reach packer and schemas only through names in their `__all__`:
    no private module (`packer._engine`) and no name left out of the curated API."""
    import ast

    import packer
    import schemas

    public = {"packer": set(packer.__all__), "schemas": set(schemas.__all__)}
    misuse = []
    for folder in ("pipelines", "schemas", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            where = str(path.relative_to(REPO))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    top, _, rest = node.module.partition(".")
                    if top in public and top != folder:
                        if rest:
                            misuse.append(f"{where}: from {node.module} import ...")
                        misuse += [f"{where}: {top}.{a.name}" for a in node.names if a.name not in public[top]]
                elif isinstance(node, ast.Import):
                    misuse += [f"{where}: import {a.name}" for a in node.names
                               if a.name.partition(".")[0] in public and "." in a.name]
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in public and node.value.id != folder
                      and node.attr not in public[node.value.id]):
                    misuse.append(f"{where}: {node.value.id}.{node.attr}")
    assert not misuse, misuse


def test_every_product_package_is_installed():
    """pyproject lists packages explicitly, so a new sub-package left off the list would be missing from a
    wheel while every test (run from the repository) still passes."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for top in ("packer", "schemas", "pipelines")
             for p in (REPO / top).rglob("__init__.py")}
    assert listed == found


PRODUCT = ("packer", "schemas", "pipelines")


def product_modules() -> dict[str, "ast.Module"]:
    import ast

    out = {}
    for top in PRODUCT:
        for path in (REPO / top).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = (ast.parse(path.read_text()), path.name == "__init__.py")
    return out


def imports_of(name: str, tree, is_package: bool, known: set[str]) -> set[str]:
    """The product modules a module imports anywhere in it (lazy imports inside functions included)."""
    import ast

    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_import_circle_in_the_product():
    """Every import points down: the module graph of packer, schemas and pipelines (lazy imports included,
    a package counting as its __init__) has no cycle."""
    modules = product_modules()
    graph = {name: imports_of(name, tree, pkg, set(modules)) for name, (tree, pkg) in modules.items()}
    # A package's __init__ re-exports its submodules; a submodule importing its own package means the
    # package's other submodules, so an edge to an ancestor package is not a cycle through it.
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_one_module_drives_the_fill_pool():
    """Only packer/_driver.py submits to, seals or takes from a fill pool; every pipeline goes through it."""
    import ast

    drivers = set()
    for name, (tree, _) in product_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("submit", "seal", "can_submit") \
                    and isinstance(getattr(node, "ctx", None), ast.Load):
                drivers.add(name)
    assert drivers <= {"packer._driver", "packer._pool"}, drivers


def test_one_reject_budget_and_a_small_public_core():
    import ast

    budgets = [f"{name}.{node.name}" for name, (tree, _) in product_modules().items() for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef) and "RejectBudget" in node.name]
    assert sorted(budgets) == ["packer._core.RejectBudget", "packer._core.RejectBudgetExceeded"]
    import packer

    assert len(packer.__all__) <= 42  # 41: PlanBlock, the plans made ahead that every multi-rank reader needs; 42: SharedBytes, encoded rows a writer process reads in place
