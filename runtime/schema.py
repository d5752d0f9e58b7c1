"""The manifest's sections as typed dataclasses, and the readers that check each value (one BundleError line).

A manifest is written by whoever wrote the bundle, so nothing in it is trusted: wrong
types (`components: []`, `file: null`), missing keys, NaN, paths leaving the bundle all
end here, before any file is opened. The C++ reader (runtime/cpp/src/manifest.cpp)
applies the same rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath
from typing import Any, ClassVar

import numpy as np

from stdrc.runtime.errors import BundleError, InputError
from stdrc.runtime.vocab import FP8_SCALE_SOURCES, LAYOUTS, MODEL_FAMILIES, SOURCE_QUANT_FORMATS, STAGES, WEIGHT_LAYOUTS

FIX = "rebuild the bundle with `stdrc-export build-engines`"
MAX_STEPS = 1000  # more than this is a typo, not a schedule
# LTX-2 video VAE compression: time x8 (causal first frame), space x32.
TIME_SCALE = 8
SPACE_SCALE = 32
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


# -- typed sections -----------------------------------------------------------------------------
# Each manifest section is a frozen dataclass whose fields say how they are read (`spec`): the
# loader and the writer walk the same field list, so a field is declared once.

def spec(read: Callable[..., Any], default: Any = MISSING, required: bool = False, compare: bool = True,
         kw_only: Any = dataclasses.MISSING, **args: Any) -> Any:
    """A section field read by `read(data, key, where, **args)`; `default`: its value when absent, unless
    `required` (a default for Python callers only); `compare=False`: not part of the section's equality;
    `kw_only=True`: a keyword-only argument of the constructor (still written where it is declared)."""
    meta = {"read": read, "args": args, "required": required}
    if default is MISSING:
        return field(compare=compare, kw_only=kw_only, metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=dict, compare=compare, kw_only=kw_only, metadata=meta)
    return field(default=default, compare=compare, kw_only=kw_only, metadata=meta)


def sigma_list(data: dict, key: str, where: str) -> tuple[float, ...]:
    """At least two non-increasing sigmas in [0, 1] (one step or more)."""
    values = numbers(data, key, where, lo=0, hi=1)
    if len(values) < 2 or any(a < b for a, b in zip(values, values[1:])):
        raise bad(f"{where}.{key}", list(values), "at least 2 non-increasing sigmas")
    return values


def measure(data: dict, key: str, where: str) -> float:
    """A measured figure: a number, possibly infinite (the PSNR of identical frames)."""
    value = get(data, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise bad(f"{where}.{key}", value, "a number")
    return float(value)


def text_value(data: dict, key: str, where: str) -> str:
    """Any string, empty allowed (a recorded fact, not a choice)."""
    value = get(data, key, where)
    if not isinstance(value, str):
        raise bad(f"{where}.{key}", value, "a string")
    return value


def counts(data: dict, key: str, where: str) -> dict[str, int]:
    """An object of integers >= 0 (bytes per component)."""
    per = section(get(data, key, where), f"{where}.{key}")
    return {name: integer(per, name, f"{where}.{key}", lo=0) for name in per}


def counts_per(data: dict, key: str, where: str) -> dict[str, dict[str, int]]:
    per = section(get(data, key, where), f"{where}.{key}")
    return {name: counts(per, name, f"{where}.{key}") for name in per}


def strings(data: dict, key: str, where: str) -> dict[str, str]:
    per = section(get(data, key, where), f"{where}.{key}")
    return {name: text_value(per, name, f"{where}.{key}") for name in per}


def records(data: dict, key: str, where: str) -> dict[str, dict]:
    """An object of objects, kept as written (compared whole, never read field by field)."""
    per = section(get(data, key, where), f"{where}.{key}")
    return {name: dict(section(per[name], f"{where}.{key}.{name}")) for name in per}


def nested(cls: type) -> Callable[..., Any]:
    """The reader of a sub-section of type `cls`."""
    def read(data: dict, key: str, where: str) -> Any:
        return cls.from_json(get(data, key, where), f"{where}.{key}")
    return read


def nested_list(cls: type, empty: bool = True) -> Callable[..., Any]:
    """The reader of a list of sub-sections of type `cls` (`empty=False`: at least one)."""
    def read(data: dict, key: str, where: str) -> tuple:
        items = get(data, key, where)
        if not isinstance(items, list) or not (empty or items):
            raise bad(f"{where}.{key}", items, f"a {'' if empty else 'non-empty '}list of {cls.__name__} objects")
        return tuple(cls.from_json(item, f"{where}.{key}[{i}]") for i, item in enumerate(items))
    return read


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Section:
    """A manifest section: `from_json` reads every field with its `spec` reader, `to_json` writes
    them back (None: left out, as a section that never had the key); unknown keys are ignored.

    `DERIVED` names properties written after the fields for readers that do not compute them (C++);
    read back, a written one must equal the property."""

    DERIVED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_json(cls, data: Any, where: str) -> Any:
        data = section(data, where)
        values = {}
        for f in fields(cls):
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING)
            absent = f.name not in data and default is not MISSING and not f.metadata["required"]
            values[f.name] = default if absent else f.metadata["read"](data, f.name, where, **f.metadata["args"])
        try:
            made = cls(**values)
        except InputError as e:  # a check written for people's sizes (Bucket), here of a written manifest
            raise BundleError(f"bundle manifest {where}: {e} ({FIX})") from e
        for key, want in made.derived().items():
            if key in data and data[key] != want:
                raise bad(f"{where}.{key}", data[key], f"{want} for this {cls.__name__.lower()}")
        return made

    def derived(self) -> dict[str, Any]:
        return {key: _plain(getattr(self, key)) for key in self.DERIVED}

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**{k: _plain(v) for k, v in values.items() if v is not None}, **self.derived()}

    @classmethod
    def of(cls, config: Any, **more: Any) -> Any:
        """From an object with same-named attributes (the export presets' configs)."""
        given = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        return cls(**given, **more)


@dataclass(frozen=True, kw_only=True)
class DitModel(Section):
    """The DiT facts the runtime reads (noise channels, activation estimate)."""

    in_channels: int = spec(integer, lo=1)
    num_layers: int = spec(integer, lo=1)
    num_attention_heads: int = spec(integer, lo=1)
    attention_head_dim: int = spec(integer, lo=1)
    cross_attention_dim: int = spec(integer, lo=1)


@dataclass(frozen=True, kw_only=True)
class VaeModel(Section):
    """The VAE facts the runtime reads: latent channels, and the decoder's timestep conditioning."""

    latent_channels: int = spec(integer, lo=1)
    patch_size: int = spec(integer, 4, lo=1)
    timestep_conditioning: bool = spec(boolean)
    decode_timestep: float = spec(number, lo=0, hi=1)
    decode_noise_scale: float = spec(number, lo=0, hi=1)


@dataclass(frozen=True, kw_only=True)
class TextModel(Section):
    """The text encoder's shape, for its activation estimate (runtime/memory.py).

    Old manifests lack `encoder_heads`/`encoder_ffn` (None): Gemma-3 12B's 16 heads (tiny: 1), 4 x width."""

    kind: str = spec(string, "gemma")
    max_length: int = spec(integer, lo=1)
    encoder_dim: int = spec(integer, lo=1)
    encoder_layers: int = spec(integer, lo=0)
    encoder_heads: int | None = spec(integer, None, lo=1)
    encoder_ffn: int | None = spec(integer, None, lo=1)
    connector_heads: int = spec(integer, 0, lo=0)
    connector_head_dim: int = spec(integer, 0, lo=0)

    @property
    def heads(self) -> int:
        return self.encoder_heads or (16 if self.kind == "gemma" else 1)

    @property
    def ffn(self) -> int:
        return self.encoder_ffn or 4 * self.encoder_dim


@dataclass(frozen=True)
class LoraEntry(Section):
    """A LoRA fused into the DiT at build time: file name, sha256, strength (DESIGN.md §4)."""

    name: str = spec(string)
    sha256: str = spec(sha256)
    strength: float = spec(number)


@dataclass(frozen=True)
class TableFile(Section):
    """A RoPE table file in the bundle (an .npz of cos/sin) and its sha256."""

    file: str = spec(file_field)
    sha256: str = spec(sha256)


@dataclass(frozen=True)
class Stage1Tables(Section):
    """A two-stage bucket's stage-1 grid (its `half()`): the RoPE tables the DiT runs there."""

    rope: TableFile = spec(nested(TableFile))


# LTX-2's distilled stage-2 sigmas (ltx_pipelines STAGE_2_DISTILLED_SIGMA_VALUES): 3 Euler steps, the first
# being the level the upsampled latent is re-noised to
STAGE2_SIGMAS = (0.909375, 0.725, 0.421875, 0.0)


def stage_count(data: dict, key: str, where: str) -> int:
    return integer(data, key, where, lo=min(STAGES), hi=max(STAGES))


@dataclass(frozen=True, kw_only=True)
class TwoStageConfig(Section):
    """A two-stage bundle (its `upsampler` and `dit_refine` components): stage 1 samples the half-size bucket
    with guidance, the upsampler doubles its latent, which is re-noised to `sigmas[0]` and refined by
    `dit_refine` (the DiT with the refinement LoRA `lora`) over `sigmas`, one unguided stream."""

    sigmas: tuple[float, ...] = spec(sigma_list, STAGE2_SIGMAS)
    lora: LoraEntry = spec(nested(LoraEntry))
    default_stages: int = spec(stage_count, 2)

    def __post_init__(self) -> None:
        if self.sigmas[-1] != 0.0 or self.sigmas[0] >= 1.0:
            raise bad("two_stage.sigmas", list(self.sigmas), "sigmas from a re-noise level below 1 down to 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """What the bundle's model is: its family (old bundles: ltx2), the facts the runtime reads of each
    network, and the seed of any seeded weights. The full configs are the preset's (export/config.py)."""

    family: str = spec(string, "ltx2", choices=MODEL_FAMILIES)
    dit: DitModel = spec(nested(DitModel))
    vae: VaeModel = spec(nested(VaeModel))
    text: TextModel = spec(nested(TextModel))
    seed: int = spec(integer, 0)

    @staticmethod
    def of_preset(preset: Any, seed: int = 0) -> ModelConfig:
        """From an export preset's dit, vae and text configs (export/config.py)."""
        return ModelConfig(family=preset.family.value, dit=DitModel.of(preset.dit),
                           vae=VaeModel.of(preset.vae), text=TextModel.of(preset.text), seed=seed)


@dataclass(frozen=True, kw_only=True)
class SamplerConfig(Section):
    """The LTX-2 schedule. `sigmas` is the schedule of `steps`, computed once at build; another step
    count is computed by `schedule`, the function the build used (runtime/sampler.py `ltx2_sigmas`)."""

    kind: str = spec(string, choices=("ltx2",))
    steps: int = spec(integer, lo=1, hi=MAX_STEPS)
    sigmas: tuple[float, ...] = spec(sigma_list)
    distilled_sigmas: tuple[float, ...] = spec(sigma_list)
    max_shift: float = spec(number)
    base_shift: float = spec(number)
    terminal: float | None = spec(number, None, lo=0, hi=1)
    shift_tokens: int = spec(integer, lo=1)

    @staticmethod
    def build(steps: int, distilled: tuple[float, ...], **schedule: Any) -> SamplerConfig:
        """The section a build writes: `steps`' sigmas computed here, once."""
        cfg = SamplerConfig(steps=steps, sigmas=(1.0, 0.0), distilled_sigmas=tuple(distilled), **schedule)
        return dataclasses.replace(cfg, sigmas=tuple(float(s) for s in cfg.schedule(steps)))

    def schedule(self, steps: int) -> np.ndarray:
        """`steps` sigmas of this schedule (float32), as the build computes them."""
        from stdrc.runtime.sampler import ltx2_sigmas

        return ltx2_sigmas(steps, tokens=self.shift_tokens, max_shift=self.max_shift,
                           base_shift=self.base_shift, terminal=self.terminal)

    def sigmas_for(self, steps: int | None = None, distilled: bool = False) -> np.ndarray:
        """The sigmas a generation runs: the manifest's (as C++ reads them) unless `steps` overrides them."""
        if distilled:
            return np.array(self.distilled_sigmas, np.float32)
        if steps is None or steps == self.steps:
            return np.array(self.sigmas, np.float32)
        return self.schedule(steps)


@dataclass(frozen=True, kw_only=True)
class GuidanceConfig(Section):
    """The default guidance scales (s_txt, s_ref) and how the null reference is made."""

    text_scale: float = spec(number, lo=-100, hi=100)
    ref_scale: float = spec(number, lo=-100, hi=100)
    null_reference: str = spec(string, "key_mask")


@dataclass(frozen=True, kw_only=True)
class RopeConfig(Section):
    """The default bucket's RoPE tables and how they were laid out."""

    file: str = spec(file_field)
    sha256: str = spec(sha256)
    layout: str = spec(string, choices=LAYOUTS)
    type: str = spec(string, choices=("interleaved", "split"))
    baked_in_dit: bool = spec(boolean, True)  # False: the DiT takes rope_cos/rope_sin (Manifest.rope_input)
    max_position_ratio: float | None = spec(number, None, lo=0)


@dataclass(frozen=True, kw_only=True)
class TextConfig(Section):
    """The tokenizer the runtime runs: `bytes` (tiny) or a tokenizer.json run by `tokenizers`."""

    tokenizer: str = spec(string, choices=("bytes", "hf-tokenizers"))
    max_length: int = spec(integer, lo=1)
    file: str | None = spec(file_field, None)
    sha256: str | None = spec(sha256, None)
    pad_id: int | None = spec(integer, None, lo=0)
    padding_side: str | None = spec(string, None, choices=("left",))

    def __post_init__(self) -> None:
        if self.tokenizer == "hf-tokenizers" and None in (self.file, self.sha256, self.pad_id):
            raise BundleError(f"bundle manifest text lacks its tokenizer file, sha256 or pad_id: {FIX}")


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig(Section):
    """Where the reference tokens sit (layout), their timestep (clean: 0), the default bucket's tokens."""

    layout: str = spec(string, choices=LAYOUTS)
    video_tokens: int = spec(integer, lo=1)
    reference_tokens: int = spec(integer, lo=1)
    timestep: float = spec(number, 0.0, lo=0, hi=1)


@dataclass(frozen=True, kw_only=True)
class Fp8Quality(Section):
    """FP8 scales (calibrated, or a pre-quantized checkpoint's own: `scales_source`), their file, and the
    errors measured on a held-out generation."""

    method: str = spec(text_value)
    calibration_batches: int = spec(integer, lo=0)
    held_out: str = spec(text_value)
    dit_rel_l2_held_out: float = spec(measure)
    frame_psnr_db_held_out: float = spec(measure)
    scales_file: str = spec(file_field)
    scales_sha256: str = spec(sha256)
    scales_source: str = spec(string, "calibration", choices=FP8_SCALE_SOURCES)


@dataclass(frozen=True, kw_only=True)
class QualityConfig(Section):
    """Measured errors of lossy builds (none: nothing lossy was measured)."""

    fp8: Fp8Quality | None = spec(nested(Fp8Quality), None)


@dataclass(frozen=True, kw_only=True)
class MemoryConfig(Section):
    """Engine bytes per component (recorded at build) and activation estimates (largest bucket's, each's)."""

    weight_bytes: dict[str, int] = spec(counts, {})
    activation_bytes: dict[str, int] = spec(counts, {})
    activation_bytes_per_bucket: dict[str, dict[str, int]] = spec(counts_per, {})
    note: str | None = spec(text_value, None)


@dataclass(frozen=True, kw_only=True)
class SourceQuantization(Section):
    """The DiT checkpoint was pre-quantized (Lightricks' FP8 files): its float8 weights were dequantised by
    their scales as read (float engines); `metadata` is the file's `_quantization_metadata` text, as written
    (recorded, never interpreted)."""

    format: str = spec(string, choices=SOURCE_QUANT_FORMATS)
    layout: str = spec(string, choices=WEIGHT_LAYOUTS)
    quantized_linears: int = spec(integer, lo=1)
    metadata: str | None = spec(text_value, None)


@dataclass(frozen=True, kw_only=True)
class CreatedBy(Section):
    """What built the bundle: versions, backend, and the sources each component's weights came from."""

    stdrc: str | None = spec(text_value, None)
    torch: str | None = spec(text_value, None)
    backend: str | None = spec(text_value, None)
    source_sha256: str | None = spec(text_value, None)
    sources: dict[str, dict] = spec(records, {})  # as export/models.py `Sources.of` writes them
    source_quantization: SourceQuantization | None = spec(nested(SourceQuantization), None)  # FP8 DiT file
    versions: dict[str, str] = spec(strings, {})


def string_list(data: dict, key: str, where: str) -> tuple[str, ...]:
    value = get(data, key, where)
    if not isinstance(value, list):
        raise bad(f"{where}.{key}", value, "a list of strings")
    return tuple(text_value({str(i): v for i, v in enumerate(value)}, str(i), f"{where}.{key}")
                 for i in range(len(value)))


Ranges = dict[str, tuple[tuple[int, ...], ...]]  # input name -> (min, opt, max) shapes


def _ranges(per: Any, where: str) -> Ranges:
    per = section(per, where)
    ok = all(isinstance(span, list) and len(span) == 3 and all(
        isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
        for s in span) for span in per.values())
    if not ok:
        raise bad(where, per, "an object of [min, opt, max] shapes")
    return {name: tuple(tuple(s) for s in span) for name, span in per.items()}


def shape_ranges(data: dict, key: str, where: str) -> Ranges:
    """An optimization profile: (min, opt, max) shapes per input."""
    return _ranges(get(data, key, where), f"{where}.{key}")


def shape_ranges_list(data: dict, key: str, where: str) -> tuple[Ranges, ...]:
    value = get(data, key, where)
    if not isinstance(value, list):
        raise bad(f"{where}.{key}", value, "a list of optimization profiles")
    return tuple(_ranges(p, f"{where}.{key}[{i}]") for i, p in enumerate(value))


def bytes_or_null(data: dict, key: str, where: str) -> int | None:
    """A byte count, or null (TensorRT's default workspace, as builds write it)."""
    return None if data.get(key) is None else integer(data, key, where, lo=0)


def record(data: dict, key: str, where: str) -> dict:
    """An object kept as written (a fact compared whole)."""
    return dict(section(get(data, key, where), f"{where}.{key}"))


@dataclass(frozen=True, kw_only=True)
class BuildFacts(Section):
    """A component's backend-specific build facts; each backend writes its own (None: not this backend's).

    The runtime reads `device` (torch), `graph_optimization_level` (ONNX Runtime), the TensorRT version,
    compute capability and `bucket_profiles` (TensorRT); the rest is recorded for people and caches."""

    source: dict | None = spec(record, None)  # as export/models.py `Sources.of` writes it
    device: str | None = spec(text_value, None)
    torch_version: str | None = spec(text_value, None)
    onnxruntime_version: str | None = spec(text_value, None)
    graph_optimization_level: str | None = spec(text_value, None)
    tensorrt_version: str | None = spec(text_value, None)
    gpu_name: str | None = spec(text_value, None)
    compute_capability: str | None = spec(text_value, None)
    precision: str | None = spec(text_value, None)
    strongly_typed: bool | None = spec(boolean, None)
    builder_flags: tuple[str, ...] | None = spec(string_list, None)
    builder_optimization_level: int | None = spec(integer, None, lo=0)
    workspace_bytes: int | None = spec(bytes_or_null, None)
    profiles: Ranges | None = spec(shape_ranges, None)
    bucket_profiles: tuple[Ranges, ...] | None = spec(shape_ranges_list, None)  # one per bucket
    onnx_sha256: str | None = spec(text_value, None)
    cache_key: str | None = spec(text_value, None)
    # an aoti package compiled without its constants (`dit_refine`, engines/aoti.py): the package (a bundle file)
    # whose constants it shares, and the safetensors file of its own ones; both among the entry's extra_files
    constants_from: str | None = spec(file_field, None)
    constants_file: str | None = spec(file_field, None)
