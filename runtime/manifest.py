"""The engine bundle contract (DESIGN.md §4): plain data shared by engines/, runtime/ and C++.

No torch, no onnx: the runtime and C++ apps read this and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stdrc.runtime.errors import BundleError, InputError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
COMPONENTS = ("text_encoder", "dit", "vae_encoder", "vae_decoder", "face_encoder")

# LTX-2 video VAE compression: time x8 (causal first frame), space x32.
TIME_SCALE = 8
SPACE_SCALE = 32


@dataclass(frozen=True)
class Bucket:
    """One static shape the engines are built for: frames = 8k+1, sizes multiples of 32."""

    frames: int
    height: int
    width: int
    text_length: int
    fps: float = 24.0

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
        if self.fps <= 0:
            raise InputError(f"fps={self.fps} must be > 0")

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
    def video_tokens(self) -> int:
        return self.latent_frames * self.latent_height * self.latent_width

    @property
    def reference_tokens(self) -> int:
        return self.latent_height * self.latent_width

    @property
    def tokens(self) -> int:
        return self.video_tokens + self.reference_tokens

    def key(self) -> str:
        return f"f{self.frames}_h{self.height}_w{self.width}_l{self.text_length}"

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "latent_grid": [self.latent_frames, self.latent_height, self.latent_width],
            "video_tokens": self.video_tokens,
            "reference_tokens": self.reference_tokens,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Bucket:
        return Bucket(
            frames=int(data["frames"]),
            height=int(data["height"]),
            width=int(data["width"]),
            text_length=int(data["text_length"]),
            fps=float(data["fps"]),
        )


@dataclass(frozen=True)
class TensorSpec:
    """A named engine input or output. Symbolic dims are strings (e.g. "batch")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(data: dict[str, Any]) -> TensorSpec:
        return TensorSpec(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class ComponentEntry:
    """One engine file in the bundle and its interface."""

    backend: str
    file: str
    sha256: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # min/opt/max per symbolic dim, e.g. {"batch": [1, 3, 3]}
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    extra_files: dict[str, str] = field(default_factory=dict)  # relative file -> sha256
    build: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (TRT version, GPU, flags)

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.precision,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dynamic_dims": self.dynamic_dims,
            "extra_files": self.extra_files,
            "build": self.build,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> ComponentEntry:
        return ComponentEntry(
            backend=data["backend"],
            file=data["file"],
            sha256=data["sha256"],
            precision=data["precision"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            dynamic_dims={k: list(v) for k, v in data.get("dynamic_dims", {}).items()},
            extra_files=dict(data.get("extra_files", {})),
            build=dict(data.get("build", {})),
        )


@dataclass(frozen=True)
class LoraEntry:
    """A LoRA fused into the DiT at build time: file name, sha256, strength (DESIGN.md §4)."""

    name: str
    sha256: str
    strength: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise BundleError(f"manifest LoRA name {self.name!r} is not a file name: rebuild the bundle")
        if not (isinstance(self.sha256, str) and len(self.sha256) == 64
                and all(c in "0123456789abcdef" for c in self.sha256)):
            raise BundleError(f"manifest LoRA {self.name} sha256 {self.sha256!r} is not 64 hex digits: "
                              "rebuild the bundle")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) \
                or self.strength != self.strength or abs(self.strength) == float("inf"):
            raise BundleError(f"manifest LoRA {self.name} strength {self.strength!r} is not a finite number: "
                              "rebuild the bundle")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "strength": float(self.strength)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> LoraEntry:
        return LoraEntry(data["name"], data["sha256"], data["strength"])


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to run a bundle, and nothing it must guess."""

    preset: str
    model_config: dict[str, Any]
    checkpoint_sha256: str | None
    bucket: Bucket
    components: dict[str, ComponentEntry]
    sampler: dict[str, Any]  # {"sigmas": [...], "distilled_sigmas": [...], "steps": int, "shift": ...}
    guidance: dict[str, Any]  # {"text_scale": .., "ref_scale": .., "null_reference": "mask"}
    rope: dict[str, Any]  # {"file": "rope.npz", "sha256": .., "layout": "tass", "type": .., ...}
    text: dict[str, Any]  # tokenizer description
    reference: dict[str, Any]  # layout and latent slot facts
    quality: dict[str, Any] = field(default_factory=dict)  # measured errors (FP8 etc.)
    decode: dict[str, Any] = field(default_factory=dict)  # spatial tiling of the VAE decode; {} = whole latent
    memory: dict[str, Any] = field(default_factory=dict)  # weight_bytes / activation_bytes per component
    created_by: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    loras: tuple[LoraEntry, ...] = ()  # fused into the DiT, in build order

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "preset": self.preset,
            "model_config": self.model_config,
            "checkpoint_sha256": self.checkpoint_sha256,
            "bucket": self.bucket.to_json(),
            "components": {k: v.to_json() for k, v in self.components.items()},
            "sampler": self.sampler,
            "guidance": self.guidance,
            "rope": self.rope,
            "text": self.text,
            "reference": self.reference,
            "quality": self.quality,
            "decode": self.decode,
            "memory": self.memory,
            "created_by": self.created_by,
            "loras": [lora.to_json() for lora in self.loras],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Manifest:
        fmt = data.get("format")
        if fmt != FORMAT_VERSION:
            raise BundleError(
                f"bundle manifest format {fmt!r} is not supported (this stdrc reads format "
                f"{FORMAT_VERSION}): rebuild it with `stdrc-export build-engines`"
            )
        try:
            return Manifest(
                preset=data["preset"],
                model_config=data["model_config"],
                checkpoint_sha256=data.get("checkpoint_sha256"),
                bucket=Bucket.from_json(data["bucket"]),
                components={k: ComponentEntry.from_json(v) for k, v in data["components"].items()},
                sampler=data["sampler"],
                guidance=data["guidance"],
                rope=data["rope"],
                text=data["text"],
                reference=data["reference"],
                quality=data.get("quality", {}),
                decode=data.get("decode", {}),
                memory=data.get("memory", {}),
                created_by=data.get("created_by", {}),
                format=fmt,
                loras=tuple(LoraEntry.from_json(x) for x in data.get("loras", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"bundle manifest is malformed ({e!r}): rebuild the bundle") from e


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
    """Every file the manifest names, relative path -> sha256."""
    files = {manifest.rope["file"]: manifest.rope["sha256"]}
    for entry in manifest.components.values():
        files[entry.file] = entry.sha256
        files.update(entry.extra_files)
    return files


def check_files(bundle_dir: str | os.PathLike, manifest: Manifest, hashes: bool = True) -> None:
    """Refuse a bundle whose files are missing, truncated or changed."""
    bundle_dir = Path(bundle_dir)
    for rel, digest in bundle_files(manifest).items():
        path = bundle_dir / rel
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing: rebuild the bundle")
        if hashes and sha256_file(path) != digest:
            raise BundleError(
                f"bundle file {path} does not match its sha256 in the manifest (truncated or changed): "
                "rebuild the bundle"
            )
