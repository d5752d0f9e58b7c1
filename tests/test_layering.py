"""Imports run one way: runtime <- export <- calibration <- engines; nothing reads ../shared."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# each folder and the stdrc subpackages it must never import (at module level or inside a function)
FORBIDDEN = {
    "runtime": ("stdrc.export", "stdrc.calibration", "stdrc.engines"),
    "app": ("stdrc.export", "stdrc.calibration", "stdrc.engines"),  # the page runs on the runtime (and the serve client)
    "export": ("stdrc.calibration", "stdrc.engines"),
    "calibration": ("stdrc.engines",),
    "serve": ("stdrc.export", "stdrc.calibration", "stdrc.engines"),
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


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_run_one_way(folder):
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[folder]):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_layering_check_catches_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from stdrc.engines.build import build_engines\n")
    assert "stdrc.engines.build" in imported_modules(bad)


def test_package_never_reads_shared():
    hits = [str(p.relative_to(ROOT)) for folder in ("runtime", "app", "export", "engines", "calibration", "serve", "stdrc")
            for p in (ROOT / folder).rglob("*.py") if '"shared"' in p.read_text() or "../shared" in p.read_text()]
    assert not hits, hits
