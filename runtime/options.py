"""Generation options, checked in one place before any heavy work.

`Pipeline.generate` builds a `GenerationOptions` first, so the CLI, `stdrc serve` and
`stdrc app` all get the same one-line `InputError` for a bad value (NaN scales, a reversed
guidance interval, a negative seed, a prompt that is not valid Unicode, an unusable path).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import MAX_STEPS

MAX_SEED = 2**63 - 1  # int64: what JSON, C++ and numpy's generators all take
MAX_SCALE = 100.0
MAX_PROMPT_CHARS = 100_000


def check_path(value: str | os.PathLike, what: str) -> Path:
    """A path the OS and OpenCV can take: no NUL byte, valid UTF-8 (undecodable bytes arrive as surrogates)."""
    text = os.fspath(value)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise InputError(f"{what} is empty: pass a file path")
    if "\x00" in text:
        raise InputError(f"{what} {text!r} contains a NUL byte: pass a plain file path")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} {text.encode('utf-8', 'backslashreplace').decode()} is not valid UTF-8: "
                         f"rename the file with UTF-8 characters only") from None
    return Path(text)


def check_output(value: str | os.PathLike) -> Path:
    """An .mp4 path in an existing writable folder, that is not itself a folder."""
    path = check_path(value, "output")
    folder = path.parent if str(path.parent) else Path(".")
    if path.suffix.lower() != ".mp4":
        raise InputError(f"output {path} must end in .mp4: pass -o NAME.mp4")
    for target in (path, path.with_name(path.stem + "_sheet.png")):
        if target.is_dir():
            raise InputError(f"output {target} is a folder: pass -o {path.with_suffix('') / 'video.mp4'}")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} does not exist or is not writable: pass -o in a writable folder")
    return path


def check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} holds a character that is not valid Unicode (a lone surrogate at {e.start}): "
                         "pass UTF-8 text") from None
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"{what} has {len(value)} characters: keep it under {MAX_PROMPT_CHARS}")
    return value


def _finite(value: object, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise InputError(f"{what}={value!r}: use a finite number in [{lo:g}, {hi:g}]")
    return float(value)


def _integer(value: object, what: str, lo: int, hi: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{what}={value!r}: {fix}")
    return value


@dataclass(frozen=True)
class GenerationOptions:
    """What one generation asks for; None takes the bundle's default. Checked on construction."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None
    text_scale: float | None = None
    ref_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None  # (sigma_lo, sigma_hi), guidance only inside
    cfg_rescale: float = 0.0
    distilled: bool = False
    max_batch: int = 3
    face_crop: bool = True
    output: Path | None = None
    # the bucket: None takes the bundle default's value (Manifest.find_bucket)
    frames: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            if getattr(self, name) is not None:
                _integer(getattr(self, name), name, 1, 1 << 16,
                         f"pass --{name} as a whole number: one of the bundle's bucket sizes")
        check_text(self.prompt, "prompt")
        check_text(self.negative_prompt, "negative prompt")
        _integer(self.seed, "seed", 0, MAX_SEED, f"use --seed in 0..{MAX_SEED}")
        if self.steps is not None:
            _integer(self.steps, "steps", 1, MAX_STEPS, f"use --steps 1 to {MAX_STEPS}")
        for name in ("text_scale", "ref_scale"):
            if getattr(self, name) is not None:
                _finite(getattr(self, name), name, -MAX_SCALE, MAX_SCALE)
        if self.guidance_interval is not None:
            interval = tuple(self.guidance_interval)
            if len(interval) != 2:
                raise InputError(f"guidance_interval={interval!r}: pass two sigmas, SIGMA_LO SIGMA_HI")
            lo, hi = (_finite(v, "guidance interval sigma", 0.0, 1.0) for v in interval)
            if lo > hi:
                raise InputError(f"guidance interval ({lo:g}, {hi:g}) is reversed (guidance would never run): "
                                 f"use --guidance-interval {hi:g} {lo:g}")
            object.__setattr__(self, "guidance_interval", (lo, hi))
        _finite(self.cfg_rescale, "cfg_rescale", 0.0, 1.0)
        _integer(self.max_batch, "max_batch", 1, 3, "use 1, 2 or 3 guidance streams per DiT call")
        if self.output is not None:
            object.__setattr__(self, "output", check_output(self.output))

    def to_json(self) -> dict:
        """Every field but `output` (a path on this machine), JSON-able: a queued job's record (stdrc serve)."""
        data = asdict(self)
        del data["output"]
        if data["guidance_interval"] is not None:
            data["guidance_interval"] = list(data["guidance_interval"])
        return data

    @staticmethod
    def from_json(data: dict) -> GenerationOptions:
        known = {f.name for f in fields(GenerationOptions)} - {"output"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown generation option(s) {', '.join(unknown)}: use {', '.join(sorted(known))}")
        return GenerationOptions(**data)


# the GenerationOptions fields the job API's form takes (`stdrc serve` parses them, its clients send them);
# the rest keep their defaults over HTTP
FORM_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "text_scale", "ref_scale", "face_crop", "frames",
               "height", "width")
