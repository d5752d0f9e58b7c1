"""benchmarks/*.py as modules for the tests: the folder is not a package, and its scripts import each other."""

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_module(name: str):
    """`benchmarks/NAME.py`, imported with the folder on sys.path for the import only (its sibling imports)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
