"""Typed reading of manifest values: each one's type and range checked, a bad one is one BundleError line.

A manifest is written by whoever wrote the bundle, so nothing in it is trusted: wrong
types (`components: []`, `file: null`), missing keys, NaN, paths leaving the bundle all
end here, before any file is opened. The C++ reader (runtime/cpp/src/manifest.cpp)
applies the same rules.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any

from stdrc.runtime.errors import BundleError

FIX = "rebuild the bundle with `stdrc-export build-engines`"
MISSING = object()
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad(where: str, value: Any, expected: str) -> BundleError:
    return BundleError(f"bundle manifest {where} is {_show(value)}, expected {expected}: {FIX}")


def section(value: Any, where: str) -> dict[str, Any]:
    """An object (JSON dict) with string keys."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise bad(where, value, "an object")
    return value


def get(data: dict[str, Any], key: str, where: str, default: Any = MISSING) -> Any:
    if key in data:
        return data[key]
    if default is MISSING:
        raise BundleError(f"bundle manifest lacks {where}.{key}: {FIX}")
    return default


def integer(data: dict, key: str, where: str, lo: int | None = None, hi: int | None = None,
            default: Any = MISSING) -> int:
    value = get(data, key, where, default)
    if value is default and default is not MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        span = f" in {lo}..{hi}" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise bad(f"{where}.{key}", value, f"an integer{span}")
    return value


def number(data: dict, key: str, where: str, lo: float | None = None, hi: float | None = None,
           default: Any = MISSING) -> float:
    value = get(data, key, where, default)
    if value is default and default is not MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise bad(f"{where}.{key}", value, f"a finite number{span}")
    return float(value)


def numbers(data: dict, key: str, where: str, lo: float, hi: float) -> tuple[float, ...]:
    value = get(data, key, where)
    if not isinstance(value, list) or not value:
        raise bad(f"{where}.{key}", value, "a non-empty list of numbers")
    holder = {str(i): v for i, v in enumerate(value)}
    return tuple(number(holder, str(i), f"{where}.{key}", lo, hi) for i in range(len(value)))


def string(data: dict, key: str, where: str, choices: tuple[str, ...] | None = None,
           default: Any = MISSING) -> str:
    value = get(data, key, where, default)
    if value is default and default is not MISSING:
        return value
    if not isinstance(value, str) or not value or "\x00" in value or (choices and value not in choices):
        raise bad(f"{where}.{key}", value, f"one of {', '.join(choices)}" if choices else "a non-empty string")
    return value


def boolean(data: dict, key: str, where: str, default: Any = MISSING) -> bool:
    value = get(data, key, where, default)
    if not isinstance(value, bool):
        raise bad(f"{where}.{key}", value, "true or false")
    return value


def sha256(data: dict, key: str, where: str) -> str:
    value = get(data, key, where)
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise bad(f"{where}.{key}", value, "a sha256 (64 lowercase hex digits)")
    return value


def relative_path(value: Any, where: str) -> str:
    """A path relative to the bundle folder, staying inside it: no absolute path, no `..`, no NUL."""
    if not isinstance(value, str) or not value or "\x00" in value or "\\" in value:
        raise bad(where, value, "a file name relative to the bundle folder")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or re.match(r"[A-Za-z]:", value):
        raise BundleError(f"bundle manifest {where} is {_show(value)}, which leaves the bundle folder "
                          f"(absolute or with ..): refusing it; {FIX}")
    return value


def file_field(data: dict, key: str, where: str) -> str:
    return relative_path(get(data, key, where), f"{where}.{key}")
