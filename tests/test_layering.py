"""Imports run one way: runtime <- export <- calibration <- engines; serve and app on runtime; the top
package's `stdrc.cli` assembles the `stdrc` command; benchmarks on top of everything (only tests import
them); nothing reads ../shared."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# benchmark scripts import each other by bare name (`import harness`), so these names count as benchmarks too
BENCHMARK_MODULES = ("benchmarks", *sorted(p.stem for p in BENCHMARKS.glob("*.py")))
SIDES = ("stdrc.serve", "stdrc.app", "stdrc.cli")  # serving side, page, and the command assembling both
TORCH_SIDE = ("stdrc.export", "stdrc.calibration", "stdrc.engines")
# each folder and the modules it must never import (at module level or inside a function). Benchmarks may
# import anything, and only tests import benchmarks.
FORBIDDEN = {
    "runtime": (*TORCH_SIDE, *SIDES, *BENCHMARK_MODULES),
    "export": ("stdrc.calibration", "stdrc.engines", *SIDES, *BENCHMARK_MODULES),
    "calibration": ("stdrc.engines", *SIDES, *BENCHMARK_MODULES),
    "engines": (*SIDES, *BENCHMARK_MODULES),
    # the page runs on the runtime; its --server mode uses the runtime's job API client, not the serving side
    "app": (*TORCH_SIDE, "stdrc.serve", "stdrc.cli", *BENCHMARK_MODULES),
    "serve": (*TORCH_SIDE, "stdrc.app", "stdrc.cli", *BENCHMARK_MODULES),
    # `stdrc` (runtime, serve, app) works without the export extra: no torch behind the top package
    "stdrc": (*TORCH_SIDE, *BENCHMARK_MODULES),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def wrong_imports(folder: str) -> list[str]:
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[folder]):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    return wrong


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_run_one_way(folder):
    wrong = wrong_imports(folder)
    assert not wrong, "\n".join(wrong)


def test_every_package_folder_has_rules():
    """A new subpackage must state what it may import: each folder pyproject maps into stdrc is covered."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-dir]")[1].split("\n[")[0]
    folders = {line.split("=")[1].strip().strip('"').split("/")[0]
               for line in section.splitlines() if "=" in line}
    assert folders == set(FORBIDDEN), folders ^ set(FORBIDDEN)


def test_layering_check_catches_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from stdrc.engines.build import build_engines\n    import harness\n"
                   "    from stdrc.serve import request\n")
    assert {"stdrc.engines.build", "harness", "stdrc.serve"} <= imported_modules(bad)
    assert "harness" in BENCHMARK_MODULES


def stdrc_module_exists(name: str) -> bool:
    """`stdrc.runtime.client` -> runtime/client.py (or a package folder), by the layout; imports nothing."""
    parts = name.split(".")[1:]
    if not parts:
        return True
    path = (ROOT / parts[0] if parts[0] in FORBIDDEN else ROOT / "stdrc" / parts[0]).joinpath(*parts[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_benchmarks_import_only_what_exists():
    """Benchmarks may import any layer, but only modules that exist: a moved module fails here, not in a
    benchmark run nobody makes on CI."""
    missing = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            missing += [f"{path.name} imports {n}" for n in names
                        if n.split(".")[0] == "stdrc" and not stdrc_module_exists(n)]
    assert not missing, "\n".join(missing)
    assert stdrc_module_exists("stdrc.runtime.client") and not stdrc_module_exists("stdrc.serve.client")


def test_package_never_reads_shared():
    hits = [str(p.relative_to(ROOT)) for folder in FORBIDDEN for p in (ROOT / folder).rglob("*.py")
            if '"shared"' in p.read_text() or "../shared" in p.read_text()]
    assert not hits, hits
