"""`pytest -n 2`'s groups (tests/xdist_groups.py) name real test files, and every module that uses the
session's Ray cluster is in the ray group, so that one worker holds the one cluster."""

from __future__ import annotations

from pathlib import Path

from xdist_groups import XDIST_GROUPS, xdist_group  # tests/xdist_groups.py

ROOT = Path(__file__).resolve().parents[1]


def test_every_ray_cluster_module_is_in_the_ray_group() -> None:
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "ray_cluster" in p.read_text() and p.name != Path(__file__).name)
    assert users and {f: xdist_group(f) for f in users} == dict.fromkeys(users, "ray")


def test_every_group_entry_exists() -> None:
    for name, paths in XDIST_GROUPS.items():
        for path in paths:
            assert (ROOT / path).exists(), (name, path)
