"""Where a generation runs. The page hands a `Job` to a backend and gets an `Outcome` back.

`LocalBackend` holds one in-process `Pipeline`; `stdrc.app.client.ServerBackend` submits to a
`stdrc serve` endpoint. Both report progress through `on_step(done, total)` and raise
`Cancelled` once `cancel` is set: in process that ends the sampling loop after the current step.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from stdrc.runtime.errors import StdrcError
from stdrc.runtime.options import GenerationOptions
from stdrc.runtime.pipeline import Pipeline

OnStep = Callable[[int, int], None]  # (steps done, total steps)


class Cancelled(StdrcError):
    """The person pressed Cancel."""


@dataclass(frozen=True)
class Job:
    """One generation as the page collects it: the uploaded photo's path and the checked options."""

    reference: str
    options: GenerationOptions


@dataclass(frozen=True)
class Outcome:
    video: str
    contact_sheet: str
    facesim: float | None
    scored: bool  # False: FaceSim was not measured (no face encoder in the bundle, or no face crop)


class Backend(Protocol):
    def generate(self, job: Job, on_step: OnStep, cancel: threading.Event) -> Outcome: ...


class LocalBackend:
    """One `Pipeline`, one generation at a time (the lock also guards against a cancelled run still ending)."""

    def __init__(self, pipeline: Pipeline, out_dir: Path):
        self.pipeline = pipeline
        self.out_dir = out_dir
        self._lock = threading.Lock()

    def generate(self, job: Job, on_step: OnStep, cancel: threading.Event) -> Outcome:
        output = self.out_dir / f"{uuid.uuid4().hex[:12]}.mp4"

        def step(i: int, total: int) -> None:
            if cancel.is_set():
                raise Cancelled(f"cancelled after {i + 1} of {total} steps")
            on_step(i + 1, total)
        with self._lock:
            result = self.pipeline.generate(job.reference, replace(job.options, output=output), on_step=step)
        return Outcome(result.files["video"], result.files["contact_sheet"], result.facesim, result.facesim_scored)


def facesim_text(outcome: Outcome) -> str:
    """The score as the CLI words it."""
    if outcome.facesim is not None:
        return f"{outcome.facesim:.3f}"
    return "n/a (no face in the generated frames)" if outcome.scored else "n/a (no face encoder, or no face crop)"
