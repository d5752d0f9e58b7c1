"""Generation options: the one list of generation fields, checked in one place before any heavy work.

`GenerationOptions` holds every field with its `Knob` (help, CLI flag, bounds, which front ends
show it); `stdrc generate`'s flags, the job API's form and client, and the app's inputs are made
from it. The CLI, `stdrc serve` and `stdrc app` all get the same one-line `InputError` for a bad
value (NaN scales, a reversed guidance interval, a negative seed, a prompt that is not valid
Unicode, an unusable path).
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from stdrc.runtime.errors import InputError
from stdrc.runtime.schema import MAX_STEPS
from stdrc.runtime.vocab import STAGES

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
class Knob:
    """How one generation field is offered: its help, CLI flag, bounds, and which front ends show it.

    The CLI's flags (`stdrc generate`, `stdrc submit`), the job API's form (`stdrc serve`, its client)
    and the app's inputs are all made from these, so a new field is added here once."""

    help: str
    lo: float | None = None  # inclusive bounds of a number (of each sigma for a pair)
    hi: float | None = None
    flags: tuple[str, ...] = ()  # CLI spelling; () : --name-with-dashes
    metavar: str | tuple[str, ...] | None = None
    required: bool = False  # on the CLI (the prompt is required everywhere: it has no default)
    served: bool = False  # a form field of the job API (`stdrc serve`, `stdrc submit`, the app's --server mode)
    app: str | None = None  # the app input's label; None: not on the page
    fix: str | None = None  # the advice after "name=value: " for a bad integer


def knob(help: str, default: object = MISSING, **kw) -> Any:
    """A GenerationOptions field with its `Knob` (kw: Knob's other fields)."""
    meta = {"knob": Knob(help, **kw)}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


@dataclass(frozen=True)
class Option:
    """One field of an options class as the front ends use it: name, value type, default and its Knob."""

    name: str
    kind: type  # str, int, float, bool, tuple (a pair of floats) or Path
    optional: bool  # None is allowed (it takes the bundle's value)
    default: object  # MISSING: required
    knob: Knob

    @property
    def flags(self) -> tuple[str, ...]:
        return self.knob.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def flag(self) -> str:
        return self.flags[-1]


def options_of(cls: type) -> tuple[Option, ...]:
    """The fields of `cls` (GenerationOptions or a subclass) that carry a Knob, in declaration order."""
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        if "knob" not in f.metadata:
            continue
        hint = hints[f.name]
        args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, UnionType) else []
        base = args[0] if args else hint
        base = get_origin(base) or base
        out.append(Option(f.name, base, bool(args), f.default, f.metadata["knob"]))
    return tuple(out)


def _check(option: Option, value: object) -> object:
    """One value against its field's type and bounds; returns it normalised (a pair as a tuple)."""
    name, k = option.name, option.knob
    if value is None and option.optional:
        return None
    if option.kind is str:
        return check_text(value, name.replace("_", " "))
    if option.kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"{name}={value!r}: pass true or false")
        return value
    if option.kind is int:
        lo, hi = int(k.lo), int(k.hi)
        return _integer(value, name, lo, hi, k.fix or f"use {option.flag} {lo} to {hi}")
    if option.kind is float:
        return _finite(value, name, k.lo, k.hi)
    if option.kind is tuple:
        return _interval(value, option)
    if option.kind is Path:
        return check_output(value)
    raise TypeError(f"GenerationOptions.{name}: no check for {option.kind}")


def _interval(value: object, option: Option) -> tuple[float, float]:
    try:
        interval = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        interval = (value,)
    if len(interval) != 2:
        raise InputError(f"{option.name}={value!r}: pass two sigmas, {option.flag} SIGMA_LO SIGMA_HI")
    lo, hi = (_finite(v, option.name.replace("_", " ") + " sigma", option.knob.lo, option.knob.hi)
              for v in interval)
    if lo > hi:
        raise InputError(f"{option.name.replace('_', ' ')} ({lo:g}, {hi:g}) is reversed (guidance would never "
                         f"run): use {option.flag} {hi:g} {lo:g}")
    return lo, hi


BUCKET_FIX = "pass {flag} as a whole number: one of the bundle's bucket sizes"


@dataclass(frozen=True)
class GenerationOptions:
    """What one generation asks for; None takes the bundle's default. Checked on construction.

    The one list of generation fields: each `knob(...)` says how the CLI, the job API and the app
    offer it (a subclass adding fields gets them in every front end that is handed the subclass)."""

    prompt: str = knob("what the video shows", served=True, app="Prompt")
    negative_prompt: str = knob("prompt of the 'no text' guidance stream", "", served=True, app="Negative prompt")
    seed: int = knob("noise seed (same seed, same video)", 0, lo=0, hi=MAX_SEED, served=True, app="Seed")
    steps: int | None = knob("sampling steps (default: the bundle's)", None, lo=1, hi=MAX_STEPS, served=True,
                             app="Steps")
    text_scale: float | None = knob("text guidance s_txt (default: the bundle's)", None, lo=-MAX_SCALE,
                                    hi=MAX_SCALE, served=True, app="Text guidance")
    ref_scale: float | None = knob("reference guidance s_ref (default: the bundle's)", None, lo=-MAX_SCALE,
                                   hi=MAX_SCALE, served=True, app="Reference guidance")
    guidance_interval: tuple[float, float] | None = knob(
        "apply guidance only for sigmas in [LO, HI] (default: every step)", None, lo=0.0, hi=1.0,
        metavar=("SIGMA_LO", "SIGMA_HI"))
    cfg_rescale: float = knob("rescale guided velocity toward its std (0 = off)", 0.0, lo=0.0, hi=1.0)
    distilled: bool = knob("LTX-2's distilled 8-step sigmas", False)
    stages: int | None = knob("1: sample at the output size; 2: guided at half size, upsample x2, refine "
                              "(default: the bundle's, 2 when it has an upsampler and a refinement)", None,
                              lo=min(STAGES), hi=max(STAGES), served=True, app="Stages",
                              fix=f"use --stages {' or '.join(map(str, STAGES))}")
    max_batch: int = knob("guidance streams per DiT call (1-3; lower saves memory)", 3, lo=1, hi=3,
                          fix="use 1, 2 or 3 guidance streams per DiT call")
    face_crop: bool = knob("crop the reference to its largest face (--no-face-crop: the whole photo, no "
                           "face detection)", True, served=True, app="Crop to the largest face")
    output: Path | None = knob("output .mp4 (a _sheet.png goes beside it)", None, flags=("-o", "--output"),
                               required=True)
    # the bucket: None takes the bundle default's value (Manifest.find_bucket)
    frames: int | None = knob("video frames: picks the bundle's bucket (default: its first)", None, lo=1,
                              hi=1 << 16, served=True, fix=BUCKET_FIX.format(flag="--frames"))
    height: int | None = knob("pixels: picks the bundle's bucket (default: its first)", None, lo=1, hi=1 << 16,
                              served=True, fix=BUCKET_FIX.format(flag="--height"))
    width: int | None = knob("pixels: picks the bundle's bucket (default: its first)", None, lo=1, hi=1 << 16,
                             served=True, fix=BUCKET_FIX.format(flag="--width"))

    def __post_init__(self) -> None:
        for option in options_of(type(self)):
            value = getattr(self, option.name)
            checked = _check(option, value)
            if checked is not value:
                object.__setattr__(self, option.name, checked)

    def to_json(self) -> dict:
        """Every field but `output` (a path on this machine), JSON-able: a queued job's record (stdrc serve)."""
        data = asdict(self)
        del data["output"]
        if data["guidance_interval"] is not None:
            data["guidance_interval"] = list(data["guidance_interval"])
        return data

    @classmethod
    def from_json(cls, data: dict) -> GenerationOptions:
        known = {f.name for f in fields(cls)} - {"output"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown generation option(s) {', '.join(unknown)}: use {', '.join(sorted(known))}")
        return cls(**data)

    def form(self) -> dict[str, str]:
        """The job API's form fields for these options (the served ones that differ from their default)."""
        out = {}
        for option in options_of(type(self)):
            value = getattr(self, option.name)
            if option.knob.served and value is not None and (value != option.default or option.name == "prompt"):
                out[option.name] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def served(cls: type = GenerationOptions) -> tuple[Option, ...]:
    """The fields the job API's form takes."""
    return tuple(o for o in options_of(cls) if o.knob.served)


def from_form(form: dict[str, str], cls: type = GenerationOptions) -> GenerationOptions:
    """Text form fields (the job API) -> options: types here, ranges by the class (the CLI's messages)."""
    take = {o.name: o for o in served(cls)}
    unknown = sorted(set(form) - set(take))
    if unknown:
        raise InputError(f"unknown form field(s) {', '.join(unknown)}: use {', '.join(take)}")
    values = {}
    for name, option in take.items():
        text = form.get(name)
        if option.default is MISSING and not text:
            raise InputError(f"no {name}: pass a non-empty '{name}' form field")
        if text is None or (text == "" and option.kind is not str):
            continue
        values[name] = _parse(option, text)
    return cls(**values)


def _parse(option: Option, text: str) -> object:
    name = option.name
    if option.kind is str:
        return text
    if option.kind is bool:
        word = text.lower()
        if word not in ("true", "false", "1", "0"):
            raise InputError(f"{name}={text!r}: pass true or false")
        return word in ("true", "1")
    if option.kind is tuple:
        return tuple(_number(name, part, float) for part in text.replace(",", " ").split())
    return _number(name, text, option.kind)


def _number(name: str, text: str, kind: type) -> int | float:
    what = "an integer" if kind is int else "a number"
    try:
        number = kind(text)
    except ValueError:
        raise InputError(f"{name}={text!r} is not {what}: pass {name} as {what}") from None
    if kind is float and not math.isfinite(number):
        raise InputError(f"{name}={text!r}: pass a finite number")
    return number


# the GenerationOptions fields the job API's form takes (`stdrc serve` parses them, its clients send them);
# the rest keep their defaults over HTTP
FORM_FIELDS = tuple(o.name for o in served(GenerationOptions))
