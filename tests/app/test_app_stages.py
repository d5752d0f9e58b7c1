"""The page's progress over a two-stage generation names each stage (the CLI bar's words), on the shared tiny
two-stage bundle in process; `stages` comes from the page's inputs like every option."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from stdrc.app.backends import LocalBackend
from stdrc.app.page import Page, page_options
from stdrc.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def page(two_stage_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Page:
    preview = Pipeline.for_checks(two_stage_bundle)
    backend = LocalBackend(Pipeline.from_bundle(two_stage_bundle), tmp_path_factory.mktemp("app-out"))
    return Page(backend, preview.manifest, preview)


@pytest.mark.parametrize(("stages", "labels"), [
    (None, ["stage 1/2 (half size)"] * 2 + ["stage 2/2 (refine)"] * 3),  # the bundle's default: 2
    (1, ["sampling"] * 2),
])
def test_progress_names_each_stage(page: Page, astronaut_png: Path, stages: int | None, labels: list[str]) -> None:
    assert "stages" in {o.name for o in page_options()}
    seen: list[tuple[tuple[int, int], str]] = []
    values = {"prompt": "a person smiling", "steps": 2, "seed": 1, "stages": stages}
    status, video, _, _ = page.generate(str(astronaut_png), values, SimpleNamespace(session_hash="t"),
                                        lambda done, desc, unit: seen.append((done, desc)))
    assert status.startswith("done") and Path(video).is_file(), status
    total = len(labels)
    assert seen == [((i + 1, total), label) for i, label in enumerate(labels)]
