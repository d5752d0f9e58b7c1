"""The engine bundle contract (DESIGN.md §4): plain data shared by engines/, runtime/ and C++.

No torch, no onnx: the runtime and C++ apps read this and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stdrc.runtime import schema as sc
from stdrc.runtime.errors import BundleError, InputError
from stdrc.runtime.schema import (
    SPACE_SCALE,
    TIME_SCALE,
    CreatedBy,
    GuidanceConfig,
    LoraEntry,
    MemoryConfig,
    ModelConfig,
    QualityConfig,
    ReferenceConfig,
    RopeConfig,
    SamplerConfig,
    Stage1Tables,
    TableFile,
    TextConfig,
    TwoStageConfig,
    nested,
    nested_list,
    spec,
)
from stdrc.runtime.tiling import DecodeTiling
from stdrc.runtime.vocab import BACKENDS, COMPONENTS, OLD_TEXT_COMPONENT, PRECISIONS, STAGE_COMPONENTS, TEXT_COMPONENTS

FORMAT_VERSION = 2  # 2: a "buckets" list (format 1: one "bucket"), still read
READ_FORMATS = (1, 2)
TWO_STAGE_MULTIPLE = 2 * SPACE_SCALE  # two-stage bucket sizes: their half is a multiple of the VAE's 32
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8", "float8_e4m3fn")


@dataclass(frozen=True)
class Bucket(sc.Section):
    """One static shape the engines are built for: frames = 8k+1, sizes multiples of 32."""

    frames: int = spec(sc.integer, lo=1)
    height: int = spec(sc.integer, lo=1)
    width: int = spec(sc.integer, lo=1)
    text_length: int = spec(sc.integer, lo=1)
    fps: float = spec(sc.number, 24.0, required=True, lo=0)
    # this bucket's RoPE tables in the bundle (format 2); not part of the shape
    rope: TableFile | None = spec(nested(TableFile), None, compare=False)
    # a two-stage bundle: the RoPE tables of this bucket's stage-1 grid (`half()`), beside its own
    stage1: Stage1Tables | None = spec(nested(Stage1Tables), None, compare=False)
    DERIVED: ClassVar[tuple[str, ...]] = ("latent_grid", "video_tokens", "reference_tokens")  # C++ reads these

    def __post_init__(self) -> None:
        if self.frames < 1 or (self.frames - 1) % TIME_SCALE:
            lo = (max(self.frames, 1) - 1) // TIME_SCALE * TIME_SCALE + 1
            raise InputError(
                f"frames={self.frames} is not 8k+1: use --frames {lo} or {lo + TIME_SCALE}"
            )
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < SPACE_SCALE or value % SPACE_SCALE:
                near = max(SPACE_SCALE, round(value / SPACE_SCALE) * SPACE_SCALE)
                raise InputError(f"{name}={value} is not a positive multiple of 32: use --{name} {near}")
        if self.text_length < 1:
            raise InputError(f"text_length={self.text_length} must be >= 1")
        if not math.isfinite(self.fps) or not 0 < self.fps <= 1000:
            raise InputError(f"fps={self.fps} must be a number in (0, 1000]: use --fps 24")

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // TIME_SCALE + 1

    @property
    def latent_height(self) -> int:
        return self.height // SPACE_SCALE

    @property
    def latent_width(self) -> int:
        return self.width // SPACE_SCALE

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        return self.latent_frames, self.latent_height, self.latent_width

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.latent_height * self.latent_width

    @property
    def reference_tokens(self) -> int:
        return self.latent_height * self.latent_width

    @property
    def tokens(self) -> int:
        return self.video_tokens + self.reference_tokens

    def label(self) -> str:
        """As `--bucket` spells it: frames x width x height."""
        return f"{self.frames}x{self.width}x{self.height}"

    def half(self) -> Bucket:
        """The stage-1 bucket of a two-stage generation: half the height and width (same frames, fps, text).

        Two-stage buckets are multiples of 64 (the half stays a multiple of the VAE's 32); else an InputError."""
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % TWO_STAGE_MULTIPLE:
                lo = max(TWO_STAGE_MULTIPLE, value // TWO_STAGE_MULTIPLE * TWO_STAGE_MULTIPLE)
                raise InputError(f"{name}={value} is not a multiple of {TWO_STAGE_MULTIPLE}, which two-stage "
                                 f"generation needs (its first stage runs at half size): use --{name} {lo} or "
                                 f"{lo + TWO_STAGE_MULTIPLE} (bucket {self.label()})")
        return Bucket(frames=self.frames, height=self.height // 2, width=self.width // 2,
                      text_length=self.text_length, fps=self.fps)

    def same_size(self, frames: int, height: int, width: int) -> bool:
        return (self.frames, self.height, self.width) == (frames, height, width)


def symbolic_shape(data: dict, key: str, where: str) -> tuple[int | str, ...]:
    """Sizes >= 0 and symbolic names ("batch")."""
    shape = sc.get(data, key, where)
    if not isinstance(shape, list) or not all(
            (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d) for d in shape):
        raise sc.bad(f"{where}.{key}", shape, "a list of sizes >= 0 or symbolic names")
    return tuple(shape)


@dataclass(frozen=True)
class TensorSpec(sc.Section):
    """A named engine input or output. Symbolic dims are strings (e.g. "batch")."""

    name: str = spec(sc.string)
    shape: tuple[int | str, ...] = spec(symbolic_shape)
    dtype: str = spec(sc.string, choices=DTYPES)


def dim_ranges(data: dict, key: str, where: str) -> dict[str, list[int]]:
    """[min, opt, max] per symbolic dim, 1 <= min <= opt <= max."""
    dims = {}
    for name, span in sc.section(sc.get(data, key, where), f"{where}.{key}").items():
        ok = isinstance(span, list) and len(span) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in span) and 1 <= span[0] <= span[1] <= span[2]
        if not ok:
            raise sc.bad(f"{where}.{key}.{name}", span, "[min, opt, max] with 1 <= min <= opt <= max")
        dims[name] = list(span)
    return dims


def file_hashes(data: dict, key: str, where: str) -> dict[str, str]:
    """Files relative to the bundle folder -> their sha256."""
    files = sc.section(sc.get(data, key, where), f"{where}.{key}")
    for rel in files:
        sc.relative_path(rel, f"{where}.{key}")
        sc.sha256(files, rel, f"{where}.{key}")
    return dict(files)


@dataclass(frozen=True)
class ComponentEntry(sc.Section):
    """One engine file in the bundle and its interface."""

    backend: str = spec(sc.string, choices=BACKENDS)
    file: str = spec(sc.file_field)
    sha256: str = spec(sc.sha256)
    precision: str = spec(sc.string, choices=PRECISIONS)
    inputs: tuple[TensorSpec, ...] = spec(nested_list(TensorSpec, empty=False))
    outputs: tuple[TensorSpec, ...] = spec(nested_list(TensorSpec, empty=False))
    # min/opt/max per symbolic dim, e.g. {"batch": [1, 3, 3]}
    dynamic_dims: dict[str, list[int]] = spec(dim_ranges, {})
    extra_files: dict[str, str] = spec(file_hashes, {})  # relative file -> sha256
    build: sc.BuildFacts = spec(nested(sc.BuildFacts), sc.BuildFacts())  # backend-specific (TRT version, GPU, flags)

    @classmethod
    def from_json(cls, data: Any, where: str) -> ComponentEntry:
        """The fields' checks, then the one that spans two: an aoti engine sharing another's constants names both
        files among its extra files."""
        entry = super().from_json(data, where)
        shared = (entry.build.constants_from, entry.build.constants_file)
        if any(shared) and (entry.backend != "aoti" or not all(f in entry.extra_files for f in shared)):
            raise sc.bad(f"{where}.build", {k: v for k, v in zip(("constants_from", "constants_file"), shared)},
                         "an aoti engine's constants_from and constants_file, both among its extra_files")
        return entry


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to run a bundle, and nothing it must guess."""

    preset: str
    model_config: ModelConfig
    checkpoint_sha256: str | None
    buckets: tuple[Bucket, ...]  # the first is the default
    components: dict[str, ComponentEntry]
    sampler: SamplerConfig
    guidance: GuidanceConfig
    rope: RopeConfig
    text: TextConfig
    reference: ReferenceConfig
    quality: QualityConfig = field(default_factory=QualityConfig)  # measured errors (FP8 etc.)
    decode: DecodeTiling | None = None  # spatial tiling of the VAE decode; None: the whole latent
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    created_by: CreatedBy = field(default_factory=CreatedBy)
    format: int = FORMAT_VERSION
    loras: tuple[LoraEntry, ...] = ()  # fused into the DiT, in build order
    two_stage: TwoStageConfig | None = None  # a two-stage bundle (with both STAGE_COMPONENTS); None: one stage

    @property
    def default_stages(self) -> int:
        """The stages a generation runs unless asked otherwise: the bundle's two-stage default, else 1."""
        return self.two_stage.default_stages if self.two_stage is not None else 1

    @property
    def rope_input(self) -> bool:
        """Whether the DiT takes the RoPE tables as inputs (`rope_cos`/`rope_sin`), as C++ decides it."""
        return "dit" in self.components and any(t.name == "rope_cos" for t in self.components["dit"].inputs)

    @property
    def bucket(self) -> Bucket:
        """The default bucket (the first)."""
        return self.buckets[0]

    def find_bucket(self, frames: int | None = None, height: int | None = None, width: int | None = None) -> Bucket:
        """The bucket of that size (None fields: the default's); a size the bundle lacks is an InputError."""
        d = self.bucket
        want = (d.frames if frames is None else frames, d.height if height is None else height,
                d.width if width is None else width)
        for b in self.buckets:
            if b.same_size(*want):
                return b
        have = ", ".join(f"{b.frames} frames {b.width}x{b.height}" for b in self.buckets)
        raise InputError(f"this bundle has no bucket of {want[0]} frames {want[2]}x{want[1]} (width x height): "
                         f"its buckets are {have}; pass one of them, or rebuild with --bucket "
                         f"{want[0]}x{want[2]}x{want[1]}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "preset": self.preset,
            "model_config": self.model_config.to_json(),
            "checkpoint_sha256": self.checkpoint_sha256,
            "bucket": self.bucket.to_json(),  # the default, as format 1 readers (and C++) read it
            "buckets": [b.to_json() for b in self.buckets],
            "components": {k: v.to_json() for k, v in self.components.items()},
            **{key: getattr(self, key).to_json() for key in SECTIONS},
            "decode": self.decode.to_json() if self.decode is not None else {},
            "loras": [lora.to_json() for lora in self.loras],
            **({"two_stage": self.two_stage.to_json()} if self.two_stage is not None else {}),
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Manifest:
        """The typed loader: every section checked (types, ranges, paths) before anything is used."""
        fmt = data.get("format")
        if fmt not in READ_FORMATS or isinstance(fmt, bool):
            raise BundleError(
                f"bundle manifest format {fmt!r} is not supported (this stdrc reads formats "
                f"{', '.join(map(str, READ_FORMATS))}): rebuild it with `stdrc-export build-engines`"
            )
        components = sc.section(sc.get(data, "components", "manifest"), "components")
        if OLD_TEXT_COMPONENT in components:
            raise BundleError(f"bundle holds the one-engine {OLD_TEXT_COMPONENT} (Gemma and the text head together, "
                              f"built before they became {' and '.join(TEXT_COMPONENTS)}): rebuild it with "
                              "`stdrc-export build-engines`")
        unknown = sorted(set(components) - set(COMPONENTS) - set(STAGE_COMPONENTS))
        if unknown or not components:
            raise sc.bad("components", sorted(components),
                         f"components among {', '.join(COMPONENTS + STAGE_COMPONENTS)}")
        preset = sc.string(data, "preset", "manifest")
        checkpoint = sc.get(data, "checkpoint_sha256", "manifest", None)
        if checkpoint is not None:
            sc.sha256(data, "checkpoint_sha256", "manifest")
        sections = {key: kind.from_json(sc.get(data, key, "manifest", sc.MISSING if kind in REQUIRED else {}),
                                        key) for key, kind in SECTIONS.items()}
        manifest = Manifest(
            preset=preset,
            checkpoint_sha256=checkpoint,
            buckets=_buckets(data, fmt),
            components={k: ComponentEntry.from_json(v, f"components.{k}") for k, v in components.items()},
            decode=_decode(sc.get(data, "decode", "manifest", {})),
            **sections,
            format=fmt,
            loras=_loras(sc.get(data, "loras", "manifest", [])),
            two_stage=None if data.get("two_stage") is None else TwoStageConfig.from_json(data["two_stage"],
                                                                                          "two_stage"),
        )
        if "dit" in manifest.components and manifest.rope.baked_in_dit == manifest.rope_input:
            raise sc.bad("rope.baked_in_dit", manifest.rope.baked_in_dit,
                         f"{not manifest.rope_input} (the DiT's rope_cos input says so)")
        _check_two_stage(manifest)
        return manifest


def _buckets(data: dict, fmt: int) -> tuple[Bucket, ...]:
    if fmt == 1:
        return (Bucket.from_json(sc.get(data, "bucket", "manifest"), "bucket"),)
    items = sc.get(data, "buckets", "manifest")
    if not isinstance(items, list) or not items:
        raise sc.bad("buckets", items, "a non-empty list of buckets")
    buckets = tuple(Bucket.from_json(b, f"buckets[{i}]") for i, b in enumerate(items))
    if len({(b.frames, b.height, b.width) for b in buckets}) != len(buckets):
        raise sc.bad("buckets", [b.label() for b in buckets], "buckets of different sizes")
    if len(buckets) > 1 and any(b.rope is None for b in buckets):
        raise sc.bad("buckets", [b.label() for b in buckets], "a RoPE table file per bucket")
    if "bucket" in data:  # the default, repeated for format 1 readers: it must be the first
        default = Bucket.from_json(data["bucket"], "bucket")
        if default != buckets[0]:
            raise sc.bad("bucket", default.label(), f"the first of buckets ({buckets[0].label()})")
    return buckets


def _check_two_stage(m: Manifest) -> None:
    """`two_stage` comes with both stage components, a DiT fed its RoPE tables, and per bucket a multiple-of-64
    size with its stage-1 tables; the stage components come only with `two_stage`."""
    present = [c for c in STAGE_COMPONENTS if c in m.components]
    if m.two_stage is None:
        if present:
            raise sc.bad("two_stage", None, f"a two_stage section (the bundle holds {', '.join(present)})")
        return
    missing = [c for c in STAGE_COMPONENTS if c not in m.components]
    if missing:
        raise sc.bad("components", sorted(m.components), f"{', '.join(missing)} too (a two_stage bundle)")
    if not m.rope_input:
        raise sc.bad("rope.baked_in_dit", True, "false in a two_stage bundle (its DiT runs two token grids)")
    for i, b in enumerate(m.buckets):
        try:
            b.half()
        except InputError as e:
            raise BundleError(f"bundle manifest buckets[{i}]: {e} ({sc.FIX})") from e
        if b.stage1 is None:
            raise sc.bad(f"buckets[{i}].stage1", None, "the stage-1 RoPE tables of a two_stage bundle")


def _decode(data: Any) -> DecodeTiling | None:
    """The `decode` section; {} (as written for one tile): the whole latent at once."""
    return None if sc.section(data, "decode") == {} else DecodeTiling.from_json(data, "decode")


def _loras(data: Any) -> tuple[LoraEntry, ...]:
    if not isinstance(data, list):
        raise sc.bad("loras", data, "a list of {name, sha256, strength} objects")
    return tuple(LoraEntry.from_json(x, f"loras[{i}]") for i, x in enumerate(data))


SECTIONS = {"model_config": ModelConfig, "sampler": SamplerConfig, "guidance": GuidanceConfig,
            "rope": RopeConfig, "text": TextConfig, "reference": ReferenceConfig, "quality": QualityConfig,
            "memory": MemoryConfig, "created_by": CreatedBy}
REQUIRED = (ModelConfig, SamplerConfig, GuidanceConfig, RopeConfig, TextConfig, ReferenceConfig)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON under a temp name in the same folder, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(bundle_dir: str | os.PathLike) -> Manifest:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist: build one with `stdrc-export build-engines`")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a complete bundle; rebuild it")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}): the bundle is corrupt; rebuild it") from e
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a manifest object: rebuild the bundle")
    return Manifest.from_json(data)


def bundle_files(manifest: Manifest) -> dict[str, str]:
    """Every file the runtime reads, relative path -> sha256 (engines, their data, RoPE, tokenizer)."""
    files: dict[str, str] = {}
    named = [(manifest.rope.file, manifest.rope.sha256)]
    tables = [b.rope for b in manifest.buckets] + [b.stage1.rope for b in manifest.buckets if b.stage1]
    named += [(t.file, t.sha256) for t in tables if t is not None]
    if manifest.text.file is not None:
        named.append((manifest.text.file, manifest.text.sha256))
    for entry in manifest.components.values():
        named += [(entry.file, entry.sha256), *entry.extra_files.items()]
    for rel, digest in named:
        if files.setdefault(rel, digest) != digest:
            raise BundleError(f"bundle manifest lists {rel} with two different sha256: {sc.FIX}")
    return files


def bundle_path(bundle_dir: str | os.PathLike, rel: str) -> Path:
    """`bundle_dir / rel`, refused unless it resolves inside the bundle folder (symlinks followed)."""
    root = Path(bundle_dir).resolve()
    path = root / sc.relative_path(rel, "file name")
    if not path.resolve().is_relative_to(root):
        raise BundleError(f"bundle file {rel} is a link to {path.resolve()}, outside the bundle folder {root}: "
                          f"refusing it; {sc.FIX}")
    return path


def check_files(bundle_dir: str | os.PathLike, manifest: Manifest, hashes: bool = True) -> None:
    """Refuse a bundle whose files leave the folder, are missing, truncated or changed (none opened first)."""
    files = {rel: (bundle_path(bundle_dir, rel), digest) for rel, digest in bundle_files(manifest).items()}
    for path, _ in files.values():
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing: rebuild the bundle")
    if hashes:
        for path, digest in files.values():
            if sha256_file(path) != digest:
                raise BundleError(
                    f"bundle file {path} does not match its sha256 in the manifest (truncated or changed): "
                    "rebuild the bundle"
                )
