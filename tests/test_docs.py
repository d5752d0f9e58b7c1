"""The README is for users: at most 160 lines, each measured figure linked to docs/benchmarks.md (where it lives
once); every relative link in the README and docs/ leads to a file and heading that exist; docs/cli.md is
what the commands' `--help` print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "runtime").rglob("README.md")])
# a number with a unit of time, memory, ratio or quality: a measured figure unless it is a flag's value
FIGURE = re.compile(r"\b\d+(\.\d+)? ?(ms|s|min|GB|GiB|MB|MiB|x|%|dB)(?![\w.])")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text: str) -> list[str]:
    """Paragraphs outside code blocks and inline code."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [re.sub(r"`[^`]*`", "", p) for p in re.split(r"\n\s*\n", text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in re.sub(r"```.*?```", "", page.read_text(), flags=re.S).splitlines():
        if line.startswith("#"):
            name = slug(line.lstrip("#"))
            found.add(name if name not in seen else f"{name}-{seen[name]}")
            seen[name] = seen.get(name, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    where = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name
    broken = []
    for link in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", link):  # http:, mailto:
            continue
        file, _, anchor = link.partition("#")
        target = (page.parent / file).resolve() if file else page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target)):
            broken.append(f"{where}: {link}")
    return broken


def test_readme_is_short_and_links_each_figure() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    unlinked = [p.strip()[:80] for p in prose(text) if FIGURE.search(p) and "](docs/benchmarks.md" not in p]
    assert not unlinked, unlinked


def test_the_figure_check_finds_one() -> None:
    (plain,) = prose("`--gpu-memory 24GB` in 512 px tiles, LTX-2 (19B), v1.5, 1e-4\n```\n3 s\n```")
    assert not FIGURE.search(plain)
    assert [FIGURE.search(t).group(0) for t in ("a step takes 1.8 s here", "3.79x the FLOPs", "uses 24 GiB")] == \
        ["1.8 s", "3.79x", "24 GiB"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    assert not broken_links(page)


def test_the_link_check_finds_a_broken_one(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A heading, with (punctuation) 2.3\n\n[ok](#a-heading-with-punctuation-23) [gone](#a-heading)"
                    " [no file](missing.md) [web](https://example.com)\n")
    assert [b.split(": ")[1] for b in broken_links(page)] == ["#a-heading", "missing.md"]
    assert anchors(page) == {"a-heading-with-punctuation-23"}


@pytest.mark.slow  # runs each command's --help in a subprocess (about 8 s)
def test_cli_page_is_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_docs.py"), "--check"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
