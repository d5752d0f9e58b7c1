"""LoRA fusion into the DiT, one tensor at a time (`--lora FILE[:STRENGTH]`).

Files are validated up front (exist, safetensors, every key names a DiT weight with matching
rank and shape) from their headers and the DiT's meta-device shapes, before any model weight
is read. `LoraSet.fuse(key, tensor)` then fuses one DiT tensor as ltx-core's
`ltx_core.loader.fuse_loras.apply_loras` does (W + sum_i (B_i * strength_i) @ A_i), computed
in fp32 and returned in the tensor's dtype, so a streaming loader can call it per tensor.

Key layouts (ltx-core reads LoRAs through `LTXV_LORA_COMFY_RENAMING_MAP`, which drops
`diffusion_model.`): `diffusion_model.<ltx key>` (ComfyUI, and what ltx-trainer writes),
`transformer.<ltx key>` (diffusers), `base_model.model.<ltx key>` (raw PEFT) and bare ltx-core
keys; each `.lora_A.weight`/`.lora_B.weight` (or kohya's `.lora_down`/`.lora_up`). Keys of
LTX-2's audio stream are skipped: the video-only DiT has no such weights, as on checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ltx_core.model.transformer.model_configurator import LTXVideoOnlyModelConfigurator
from safetensors import safe_open

from stdrc.export.checkpoint import is_audio_key
from stdrc.export.config import DiTConfig
from stdrc.export.errors import LoraError
from stdrc.export.fp8_scaled import requantize_per_tensor
from stdrc.runtime.manifest import sha256_file
from stdrc.runtime.schema import LoraEntry

log = logging.getLogger(__name__)
PREFIXES = {"diffusion_model.": "comfyui", "transformer.": "diffusers", "base_model.model.": "peft"}
_DOWN = (".lora_A.weight", ".lora_down.weight")
_UP = (".lora_B.weight", ".lora_up.weight")
_ALPHA = ".alpha"
_MAX_LISTED = 5


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora FILE[:STRENGTH]`; strength None = 1.0 for a build, the manifest's for verify."""

    path: Path
    strength: float | None = None

    @staticmethod
    def parse(text: str) -> LoraSpec:
        head, sep, tail = text.rpartition(":")
        strength = None
        try:
            strength = float(tail) if sep else None
        except ValueError:
            head = text  # a ':' inside the path (C:\...), no strength
        if not sep:
            head = text
        if strength is not None and not math.isfinite(strength):
            raise LoraError(f"--lora {text}: strength {tail!r} is not a finite number: "
                            "pass FILE[:STRENGTH], e.g. x.safetensors:0.8")
        if not head:
            raise LoraError(f"--lora {text!r} names no file: pass FILE[:STRENGTH]")
        return LoraSpec(Path(head), strength)


@dataclass(frozen=True)
class LoraPair:
    """One fused module: the file's tensor names for A [rank, in] and B [out, rank]."""

    down: str
    up: str
    rank: int


@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    strength: float
    layout: str
    pairs: dict[str, LoraPair]  # DiT weight key -> pair

    def entry(self) -> LoraEntry:
        return LoraEntry(name=self.path.name, sha256=self.sha256, strength=float(self.strength))


def dit_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every DiT state-dict key and shape, from a meta-device model: no weight memory."""
    with torch.device("meta"):
        model = LTXVideoOnlyModelConfigurator.from_config(cfg.ltx_config())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _split_key(name: str) -> tuple[str, str, str] | None:
    """(layout, module, kind) of a LoRA tensor name; kind in down/up/alpha; None if not a LoRA key."""
    layout, key = "ltx-core", name
    for prefix, label in PREFIXES.items():
        if name.startswith(prefix):
            layout, key = label, name[len(prefix):]
            break
    for kind, suffixes in (("down", _DOWN), ("up", _UP), ("alpha", (_ALPHA,))):
        for suffix in suffixes:
            if key.endswith(suffix):
                return layout, key[: -len(suffix)], kind
    return None


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, float]]:
    """Tensor shapes (and alpha scalars) from a safetensors file, without reading the LoRA matrices."""
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist or is not a file: pass the path of a .safetensors LoRA")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            alphas = {name: float(f.get_tensor(name).float().reshape(-1)[0]) for name in shapes
                      if name.endswith(_ALPHA)}
    except Exception as e:  # safetensors raises its own error types for foreign or corrupt files
        raise LoraError(f"LoRA {path} is not a safetensors file ({e}): convert it to .safetensors "
                        "(pickled .ckpt/.pt files are never loaded)") from e
    return shapes, alphas


def _check_file(path: Path, strength: float, targets: Mapping[str, tuple[int, ...]]) -> LoraFile:
    shapes, alphas = _read_header(path)
    if not shapes:
        raise LoraError(f"LoRA {path} holds no tensors: pass an LTX-2 LoRA .safetensors file")
    modules: dict[str, dict[str, str]] = {}
    layouts, not_lora, audio = set(), [], 0
    for name in shapes:
        split = _split_key(name)
        if split is None:
            not_lora.append(name)
            continue
        layout, module, kind = split
        if is_audio_key(module):
            audio += 1
            continue
        layouts.add(layout)
        if kind in modules.setdefault(module, {}):
            raise LoraError(f"LoRA {path} holds {module}.{kind} twice ({modules[module][kind]}, {name}): "
                            "keep one key layout per file")
        modules[module][kind] = name
    if not_lora:
        raise LoraError(f"LoRA {path} has {len(not_lora)} keys that are not lora_A/lora_B/alpha: {_listed(not_lora)}; "
                        "only LoRA (low-rank A/B) files are fused")
    unknown = sorted(m for m in modules if f"{m}.weight" not in targets)
    if unknown and len(unknown) == len(modules):
        raise LoraError(f"LoRA {path} is not a LoRA for this LTX-2 video DiT: none of its {len(modules)} targets "
                        f"exist in the DiT (e.g. {_listed(unknown)}); pass a LoRA trained for LTX-2")
    if unknown:
        raise LoraError(f"LoRA {path} has {len(unknown)} targets that are not DiT weights: {_listed(unknown)}; "
                        "it was trained for another model or depth: pass a LoRA for this checkpoint")
    pairs = {}
    for module, kinds in sorted(modules.items()):
        if "down" not in kinds or "up" not in kinds:
            missing = "lora_A (down)" if "down" not in kinds else "lora_B (up)"
            raise LoraError(f"LoRA {path} has no {missing} for {module}: the file is incomplete")
        down, up = shapes[kinds["down"]], shapes[kinds["up"]]
        target = targets[f"{module}.weight"]
        if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            raise LoraError(f"LoRA {path}: {module} has A {list(down)} and B {list(up)}, not A [rank, in] and "
                            "B [out, rank] of one rank: the file is corrupt or not a LoRA")
        if (up[0], down[1]) != target:
            raise LoraError(f"LoRA {path}: {module} makes a {[up[0], down[1]]} delta but the DiT weight is "
                            f"{list(target)}: it was trained for another model size; pass a LoRA for this checkpoint")
        if "alpha" in kinds and alphas[kinds["alpha"]] != down[0]:
            a = alphas[kinds["alpha"]]
            raise LoraError(f"LoRA {path}: {module} has alpha {a:g} != rank {down[0]}, a scale ltx-core does not "
                            f"apply: fold it in (pass strength x {a / down[0]:g}) after removing the alpha keys")
        pairs[f"{module}.weight"] = LoraPair(kinds["down"], kinds["up"], down[0])
    if audio:
        log.info("LoRA %s: %d audio-stream tensors skipped (the video-only DiT has none)", path, audio)
    layout = "+".join(sorted(layouts)) or "ltx-core"
    return LoraFile(path, sha256_file(path), strength, layout, pairs)


@dataclass(frozen=True)
class LoraSet:
    """Validated LoRAs for one DiT; `fuse` is the per-tensor hook of a (streaming) loader."""

    files: tuple[LoraFile, ...]
    targets: dict[str, tuple[int, ...]] = field(repr=False)

    @staticmethod
    def load(specs: Iterable[LoraSpec], targets: Mapping[str, tuple[int, ...]]) -> LoraSet:
        """Check every file against the DiT's key -> shape map (see `dit_shapes`); reads headers only."""
        files = tuple(_check_file(s.path, 1.0 if s.strength is None else s.strength, targets) for s in specs)
        keys = {k for f in files for k in f.pairs}
        return LoraSet(files, {k: tuple(targets[k]) for k in keys})

    def __bool__(self) -> bool:
        return bool(self.files)

    def entries(self) -> tuple[LoraEntry, ...]:
        return tuple(f.entry() for f in self.files)

    def digest(self) -> str:
        """Hash of the files and strengths, for the stage cache and the bundle's source hash."""
        text = "|".join(f"{f.sha256}:{f.strength!r}" for f in self.files)
        return hashlib.sha256(text.encode()).hexdigest()

    def fuse(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` with every LoRA delta for `key` added (fp32 math, tensor's dtype out); others as given."""
        delta = self.delta(key, tensor)
        return tensor if delta is None else (delta + tensor.to(torch.float32)).to(tensor.dtype)

    def delta(self, key: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The sum of the LoRAs' (B * strength) @ A for `key` in fp32 (None: no LoRA touches it)."""
        active = [(f, f.pairs[key]) for f in self.files if key in f.pairs and f.strength != 0.0]
        if not active:
            return None
        if tuple(tensor.shape) != self.targets[key]:
            raise LoraError(f"DiT weight {key} is {list(tensor.shape)}, the LoRAs were checked against "
                            f"{list(self.targets[key])}: the checkpoint does not match its preset")
        deltas = []
        for lora, pair in active:
            with safe_open(str(lora.path), framework="pt") as f:
                down = f.get_tensor(pair.down).to(torch.float32)
                up = f.get_tensor(pair.up).to(torch.float32)
            deltas.append(torch.matmul(up * lora.strength, down))  # ltx-core's order: (B * coef) @ A
        return deltas[0] if len(deltas) == 1 else torch.sum(torch.stack(deltas, dim=0), dim=0)

    def fuse_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole state dict through `fuse` (today's non-streaming load path; strict loading reports gaps)."""
        return {k: self.fuse(k, v) for k, v in state.items()}


def match_manifest(entries: tuple[LoraEntry, ...], specs: tuple[LoraSpec, ...], bundle: Path) -> tuple[LoraSpec, ...]:
    """The `--lora` files of a verify run checked against the bundle's LoRAs (sha256, order, strength).

    A bundle stores no LoRA paths (every manifest path stays inside the bundle), so verify is
    given the files again; a strength left out is the manifest's.
    """
    built = ", ".join(f"{e.name}:{e.strength:g}" for e in entries) or "no LoRA"
    if len(specs) != len(entries):
        raise LoraError(f"{bundle} was built with {built}; {len(specs)} --lora given: pass each LoRA it was "
                        "built with as --lora FILE, in that order")
    out = []
    for i, (entry, spec) in enumerate(zip(entries, specs), 1):
        if not spec.path.is_file():
            raise LoraError(f"LoRA file {spec.path} does not exist: pass the path of {entry.name}")
        if sha256_file(spec.path) != entry.sha256:
            raise LoraError(f"--lora {spec.path} is not LoRA {i} of {bundle} ({entry.name}, sha256 "
                            f"{entry.sha256[:12]}...): pass the files it was built with ({built}), in order")
        if spec.strength is not None and spec.strength != entry.strength:
            raise LoraError(f"--lora {spec.path}:{spec.strength:g} differs from the strength {entry.strength:g} "
                            f"{bundle} was built with: leave the strength out or pass {entry.strength:g}")
        out.append(LoraSpec(spec.path, entry.strength))
    return tuple(out)


@dataclass(frozen=True)
class LoraTransform:
    """The per-tensor hook of the streaming loader (`transform(key, tensor)` on each DiT tensor as it is read):
    `inner` first, then the LoRAs. Its `sha256` keys the stage cache (None when `inner` has none: never cached)."""

    loras: LoraSet
    inner: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    @property
    def sha256(self) -> str | None:
        if self.inner is None:
            return self.loras.digest()
        inner = getattr(self.inner, "sha256", None)
        return None if inner is None else hashlib.sha256((self.loras.digest() + inner).encode()).hexdigest()

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            tensor = self.inner(key, tensor)
        return self.loras.fuse(key, tensor)


def lora_transform(specs: Iterable[LoraSpec], dit: DiTConfig,
                   inner: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> tuple[LoraTransform, LoraSet]:
    """The LoRA files checked against `dit`'s shapes (headers only, before any model weight is read)."""
    lora_set = LoraSet.load(specs, dit_shapes(dit))
    return LoraTransform(lora_set, inner), lora_set


@dataclass(frozen=True)
class Fp8LoraTransform:
    """LoRAs on a pre-quantized FP8 file for FP8 engines, ltx-core's way (fuse_loras.py
    `_fuse_delta_with_scaled_fp8`): a quantized weight (dequantised as read) plus the delta rounded to bf16 (the
    dtype ltx-core gives deltas of an FP8 weight), requantised per tensor with max|W| / 448
    (`requantize_per_tensor`); its new scale lands in `weight_scales` (Linear name -> scale), the input scale
    stays the file's. Other weights fuse as `LoraTransform` does."""

    loras: LoraSet
    quantized: frozenset[str]  # our DiT keys of the file's float8 weights ("...to_q.weight")
    inner: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    weight_scales: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def sha256(self) -> str | None:
        base = LoraTransform(self.loras, self.inner).sha256
        return None if base is None else hashlib.sha256(f"fp8-requantised:{base}".encode()).hexdigest()

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            tensor = self.inner(key, tensor)
        delta = self.loras.delta(key, tensor) if key in self.quantized else None
        if delta is None:
            return self.loras.fuse(key, tensor)
        codes, scale = requantize_per_tensor(tensor.float() + delta.to(torch.bfloat16).float())
        self.weight_scales[key.removesuffix(".weight")] = scale
        return (codes.float() * scale).to(tensor.dtype)
