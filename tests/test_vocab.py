"""The shared vocabularies (components, backends, precisions, layouts, memory plans, devices) are written
once, in runtime/vocab.py: no other module of the package or the benchmarks spells one out again."""

from __future__ import annotations

import ast
from pathlib import Path

from stdrc.runtime import vocab

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("runtime", "export", "calibration", "engines", "serve", "app", "stdrc", "benchmarks", "scripts")
WORDS = {name: frozenset(value) for name, value in vars(vocab).items()
         if name.isupper() and isinstance(value, tuple) and len(value) >= 2}


def retyped(path: Path) -> list[str]:
    """Literal tuples/lists/sets of strings that hold exactly one of the vocabularies."""
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            words = frozenset(e.value for e in node.elts)
            found += [f"{where}:{node.lineno} spells out {name}"
                      for name, value in WORDS.items() if words == value]
    return found


def test_vocabularies_are_written_once() -> None:
    copies = [hit for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))
              if path != ROOT / "runtime" / "vocab.py" for hit in retyped(path)]
    assert not copies, "\n".join(copies) + "\nimport it from stdrc.runtime.vocab"


def test_the_check_finds_a_copy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('p.add_argument("--memory-plan", choices=["auto", "staged", "all"])\nok = ("fp16", "bf16")\n')
    assert [hit.split(" ", 1)[1] for hit in retyped(bad)] == ["spells out MEMORY_PLANS"]


def test_vocabularies_agree_with_each_other() -> None:
    assert set(vocab.REQUIRED_COMPONENTS) < set(vocab.COMPONENTS)
    assert set(vocab.BUCKET_SIZED) < set(vocab.REQUIRED_COMPONENTS)
    assert set(vocab.ONNX_BACKENDS) | set(vocab.TORCH_BACKENDS) == set(vocab.BACKENDS)
    assert set(vocab.BACKEND_PRECISIONS) == set(vocab.BACKENDS)
    assert set().union(*vocab.BACKEND_PRECISIONS.values()) == set(vocab.PRECISIONS)
    assert set(vocab.FIXED_PLANS) < set(vocab.MEMORY_PLANS) and set(vocab.CONCRETE_DEVICES) < set(vocab.DEVICES)
