"""One generation request: form fields parsed into `GenerationOptions`, checked and run through the Pipeline.

Validation is the Pipeline's own (the messages the CLI prints): `check` runs `Pipeline.generate` on a
Pipeline whose engines are never loaded, so it stops, cheaply, at the first engine call, after every
check that comes before heavy work.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import read_manifest
from stdrc.runtime.options import FORM_FIELDS, GenerationOptions
from stdrc.runtime.pipeline import Pipeline


def _number(name: str, value: str | None, kind: type) -> int | float | None:
    if value is None or value == "":
        return None
    try:
        number = kind(value)
    except ValueError:
        raise InputError(f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}: "
                         f"pass {name} as {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(number):
        raise InputError(f"{name}={value!r}: pass a finite number")
    return number


def parse_form(form: dict[str, str]) -> GenerationOptions:
    """Text form fields -> options: types here, ranges by `GenerationOptions` (the CLI's messages)."""
    unknown = sorted(set(form) - set(FORM_FIELDS) - {"reference"})
    if unknown:
        raise InputError(f"unknown form field(s) {', '.join(unknown)}: "
                         f"use {', '.join(('reference',) + FORM_FIELDS)}")
    prompt = form.get("prompt")
    if not prompt:
        raise InputError("no prompt: pass a non-empty 'prompt' form field")
    face_crop = str(form.get("face_crop", "true")).lower()
    if face_crop not in ("true", "false", "1", "0"):
        raise InputError(f"face_crop={face_crop!r}: pass true or false")
    seed = _number("seed", form.get("seed"), int)
    return GenerationOptions(
        prompt=prompt, negative_prompt=form.get("negative_prompt") or "", seed=0 if seed is None else seed,
        steps=_number("steps", form.get("steps"), int), text_scale=_number("text_scale", form.get("text_scale"), float),
        ref_scale=_number("ref_scale", form.get("ref_scale"), float), face_crop=face_crop in ("true", "1"),
        **{k: _number(k, form.get(k), int) for k in ("frames", "height", "width")},
    )


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


class _Checked(Exception):
    """Raised at the first engine call: every check before heavy work has passed."""


class _NoEngines(dict):
    def __getitem__(self, name: str):  # noqa: ANN204
        raise _Checked(name)


class Checker:
    """`Pipeline.generate`'s validation without loading an engine: for the ingress, which holds no model."""

    def __init__(self, bundle: str | Path):
        bundle = Path(bundle)
        self.pipe = Pipeline(bundle, read_manifest(bundle), _NoEngines())

    def check(self, options: GenerationOptions, reference: bytes, name: str) -> None:
        """Raises InputError (or another StdrcError) with the CLI's message when the request cannot run."""
        with tempfile.TemporaryDirectory(prefix="stdrc-check-") as tmp:
            folder = Path(tmp)
            try:
                self.pipe.generate_with(_reference_file(folder, reference, name), options)
            except _Checked:
                return
            except InputError as e:
                raise InputError(_strip(e, folder)) from None


@dataclass(frozen=True)
class Output:
    video: bytes
    sheet: bytes
    facesim: float | None
    frames: int


def run(pipe: Pipeline, options: GenerationOptions, reference: bytes, name: str,
        on_step: Callable[[int, int], None] | None = None) -> Output:
    """Generate into a temp folder and return the files' bytes; the folder is removed either way."""
    with tempfile.TemporaryDirectory(prefix="stdrc-job-") as tmp:
        folder = Path(tmp)
        try:
            result = pipe.generate_with(_reference_file(folder, reference, name),
                                        replace(options, output=folder / "video.mp4"), on_step)
        except InputError as e:
            raise InputError(_strip(e, folder)) from None
        files = result.files
        return Output(Path(files["video"]).read_bytes(), Path(files["contact_sheet"]).read_bytes(), result.facesim,
                      int(result.frames.shape[0]))
