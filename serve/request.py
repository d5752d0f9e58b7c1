"""One generation request: form fields parsed into `GenerationOptions`, checked and run through the Pipeline.

Validation is the Pipeline's own (the messages the CLI prints): `Checker` calls `Pipeline.prepare` on a
Pipeline that never opens an engine, so a bad request is refused before it is queued.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from stdrc.runtime.errors import InputError
from stdrc.runtime.options import GenerationOptions, from_form
from stdrc.runtime.pipeline import Pipeline


def parse_form(form: dict[str, str], options_type: type = GenerationOptions) -> GenerationOptions:
    """Text form fields (the upload aside) -> options: types and ranges by `options_type`'s Knobs."""
    return from_form(form, options_type)


def safe_name(filename: str | None) -> str:
    """The upload's base name, kept for error messages; never a path."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename or "reference").name)[:100].lstrip(".")
    return name or "reference"


def _reference_file(folder: Path, data: bytes, name: str) -> Path:
    (folder / "ref").mkdir()
    path = folder / "ref" / name
    path.write_bytes(data)
    return path


def _strip(error: Exception, folder: Path) -> str:
    """The error's message without the temp folder the upload was saved in."""
    return str(error).replace(f"{folder}/ref/", "")


class Checker:
    """`Pipeline.prepare` without loading an engine: for the ingress, which holds no model."""

    def __init__(self, bundle: str | Path):
        self.pipe = Pipeline.for_checks(bundle)

    def check(self, options: GenerationOptions, reference: bytes, name: str) -> None:
        """Raises InputError (or another StdrcError) with the CLI's message when the request cannot run."""
        with tempfile.TemporaryDirectory(prefix="stdrc-check-") as tmp:
            folder = Path(tmp)
            try:
                self.pipe.prepare(_reference_file(folder, reference, name), options)
            except InputError as e:
                raise InputError(_strip(e, folder)) from None


@dataclass(frozen=True)
class Output:
    video: bytes
    sheet: bytes
    facesim: float | None
    facesim_scored: bool
    frames: int


def run(pipe: Pipeline, options: GenerationOptions, reference: bytes, name: str,
        on_step: Callable[[int, int], None] | None = None) -> Output:
    """Generate into a temp folder and return the files' bytes; the folder is removed either way."""
    with tempfile.TemporaryDirectory(prefix="stdrc-job-") as tmp:
        folder = Path(tmp)
        try:
            result = pipe.generate(_reference_file(folder, reference, name),
                                   replace(options, output=folder / "video.mp4"), on_step=on_step)
        except InputError as e:
            raise InputError(_strip(e, folder)) from None
        files = result.files
        return Output(Path(files["video"]).read_bytes(), Path(files["contact_sheet"]).read_bytes(), result.facesim,
                      result.facesim_scored, int(result.frames.shape[0]))
