"""Checkpoint loading from safetensors in LTX-2's key layouts. Never unpickles.

Layouts: ltx-core's (plain DiT keys, `vae.encoder.` etc.), ComfyUI's (`model.diffusion_model.`
prefix), and ST-DRC DiT files (an LTX-2-layout DiT alone). The text side's projection
(`text_embedding_projection.`) and video connector (`[video_]embeddings_connector.`) are split
off into `Checkpoint.text`, under the names of `TextSide`. Config comes from the file's
`config` metadata when present (as ltx-core reads it), else from the preset.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from ltx_core.loader.sd_ops import SDOps
from ltx_core.model.transformer.model_configurator import LTXV_MODEL_COMFY_RENAMING_MAP
from ltx_core.model.video_vae.model_configurator import VAE_DECODER_COMFY_KEYS_FILTER, VAE_ENCODER_COMFY_KEYS_FILTER
from safetensors import safe_open
from safetensors.torch import save_file

from stdrc.export.config import DiTConfig, Preset
from stdrc.export.errors import CheckpointError
from stdrc.export.fp8_source import IN_OUT, FP8Source, LinearScales, dequantize, detect_fp8
from stdrc.export.vae import vae_from_metadata
from stdrc.runtime.manifest import sha256_file

_COMFY_PREFIX = "model.diffusion_model."
# Parts of LTX-2's audio-video model that the video-only DiT does not have, at any depth of a key:
# `audio_patchify_proj.`, `transformer_blocks.N.audio_attn1.`, `...N.scale_shift_table_a2v_ca_video`,
# `...N.video_to_audio_attn.`, `audio_embeddings_connector.`, `audio_vae.`, `vocoder.`.
AUDIO_MARKERS = ("audio_", "av_ca_", "a2v", "v2a", "vocoder")
_TEXT_PREFIXES = {
    "text_embedding_projection.aggregate_embed.": "feature_extractor.aggregate_embed.",
    "text_embedding_projection.video_aggregate_embed.": "feature_extractor.video_aggregate_embed.",
    "video_embeddings_connector.": "connector.",
    "embeddings_connector.": "connector.",
}
# ltx-core's V2 trigger (encoder_configurator.py `_V2_EXPECTED_CONFIG`): all four keys with these values
V2_CAPTION_CONFIG = {"caption_proj_before_connector": True, "caption_projection_first_linear": False,
                     "caption_proj_input_norm": False, "caption_projection_second_linear": False}
_PROJECTION_KEYS = SDOps("TEXT_PROJECTION").with_matching(prefix="text_embedding_projection.")
_MAX_LISTED = 8


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sha256: str
    metadata_config: dict[str, Any] | None
    dit: dict[str, torch.Tensor]
    vae_encoder: dict[str, torch.Tensor]
    vae_decoder: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]  # TextSide names: feature_extractor.*, connector.*


def _split_text(dit: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move the text projection and connector out of the DiT keys (in place), renamed for `TextSide`
    (LTX-2.3's audio projection, `audio_aggregate_embed`, is the audio stream's: already left out)."""
    text = {}
    for key in list(dit):
        for prefix, ours in _TEXT_PREFIXES.items():
            if key.startswith(prefix):
                text[ours + key[len(prefix):]] = dit.pop(key)
                break
    return text


def _check_safetensors(path: Path) -> FP8Source | None:
    """Refuse what is not safetensors; the FP8 facts of a pre-quantized file (None for a float one)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the path of a .safetensors file")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short): pass a .safetensors checkpoint")
        (size,) = struct.unpack("<Q", head)
        if size > path.stat().st_size - 8 or size > 100_000_000:
            raise CheckpointError(
                f"{path} is not a safetensors file (bad header; pickled .ckpt/.pt files are never loaded): "
                "convert it to .safetensors"
            )
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a safetensors file (header is not JSON): {e}") from e
        if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
            raise CheckpointError(f"{path} is not a safetensors file (header is not a table of tensors)")
        try:
            return detect_fp8(path, header, f, 8 + size)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} has a malformed safetensors header ({e}): the file is corrupt") from e


def is_audio_key(key: str) -> bool:
    """True for a tensor of the audio stream (checkpoints and LoRAs alike): some dotted part names it."""
    return any(m in part for part in key.split(".") for m in AUDIO_MARKERS)


COMPONENTS = ("dit", "vae_encoder", "vae_decoder", "text")
Transform = Callable[[str, torch.Tensor], torch.Tensor]


def _map_keys(keys: list[str]) -> dict[str, dict[str, str]]:
    """Our key -> file key for each component, from the header's key list alone (no tensor is read)."""

    def mapped(ops: SDOps | None, names: list[str]) -> dict[str, str]:
        out = {}
        for name in names:
            key = name if ops is None else ops.apply_to_key(name)
            if key is not None:
                out[key] = name
        return out

    comfy = any(k.startswith(_COMFY_PREFIX) for k in keys)
    if comfy:
        dit = mapped(LTXV_MODEL_COMFY_RENAMING_MAP, keys)
        dit.update(mapped(_PROJECTION_KEYS, keys))  # the projection sits outside the ComfyUI prefix
    else:
        dit = {k: k for k in keys if not k.startswith("vae.")}
    dit = {k: v for k, v in dit.items() if not is_audio_key(k)}
    text = _split_text(dit)
    return {"dit": dit, "vae_encoder": mapped(VAE_ENCODER_COMFY_KEYS_FILTER, keys),
            "vae_decoder": mapped(VAE_DECODER_COMFY_KEYS_FILTER, keys), "text": text}


@dataclass(frozen=True)
class LazyCheckpoint:
    """A safetensors checkpoint opened by its header: tensors are read one at a time, when loaded."""

    path: Path
    metadata_config: dict[str, Any] | None
    keys: dict[str, dict[str, str]]  # component -> our key -> file key
    shapes: dict[str, tuple[int, ...]]  # file key -> shape
    known_sha256: str | None = field(default=None, repr=False)
    model_version: str | None = None  # the top-level metadata key ltx-pipelines reads ("2.3..." on LTX-2.3)
    fp8: FP8Source | None = None  # a pre-quantized file's format and scales: its weights dequantise as read

    @property
    def sha256(self) -> str:
        """The file's sha256, streamed on first use: a file is judged by its header before it is hashed."""
        if self.known_sha256 is None:
            object.__setattr__(self, "known_sha256", sha256_file(self.path))
        return self.known_sha256

    def has(self, component: str) -> bool:
        return bool(self.keys[component])

    def shape(self, component: str, key: str) -> tuple[int, ...]:
        return self.shapes[self.keys[component][key]]

    def linear_scales(self, component: str = "dit") -> dict[str, LinearScales]:
        """Our Linear name (key minus `.weight`) -> the file's scales, for `component`'s float8 weights."""
        if self.fp8 is None:
            return {}
        out = {}
        for key, name in self.keys[component].items():
            scales = self.fp8.scales_of(name)
            if scales is not None:
                out[key.removesuffix(".weight")] = scales
        return out

    def tensors(self, component: str, dtype: torch.dtype | None = None, transform: Transform | None = None,
                dequantize_to: Callable[[str], torch.dtype] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(our key, tensor) one at a time: `transform(key, tensor)` on the file's tensor, then cast to `dtype`.

        A float8 weight is dequantised first: in fp32, or (no `transform`) straight into `dequantize_to(key)`,
        the dtype its module holds, so no whole fp32 copy of it is made (build peak RSS)."""
        try:
            with open(self.path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header, base = json.loads(fh.read(size)), 8 + size
                for key, name in self.keys[component].items():
                    tensor = _read_tensor(fh, base, header[name])
                    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                        into = dequantize_to(key) if dequantize_to is not None and transform is None else None
                        tensor = self._dequantized(name, tensor, into)
                    if transform is not None:
                        tensor = transform(key, tensor)
                    yield key, tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(
                f"{self.path} could not be read as safetensors ({e}): the file is corrupt or truncated") from e

    def _dequantized(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A float8 tensor as [out, in] (fp32, or `dtype`), by its scale: never cast raw."""
        scales = self.fp8.scales_of(name) if self.fp8 is not None else None
        if scales is None:
            raise CheckpointError(f"{self.path}: float8 tensor {name} has no weight_scale, and a float8 tensor is "
                                  "never cast raw: re-download the file or use the bf16 checkpoint")
        return dequantize(tensor, scales, self.fp8.layout, dtype)


def open_checkpoint(path: str | Path, sha256: str | None = None) -> LazyCheckpoint:
    """Header, key layout and shapes of `path`; no tensor is read (`sha256` streams the file when asked)."""
    path = Path(path)
    fp8 = _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        config = json.loads(meta["config"]) if "config" in meta else None
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as safetensors ({e}): the file is corrupt or truncated") from e
    if fp8 is not None:  # scales are consumed with the header; weights read as [out, in] once dequantised
        consumed = fp8.scale_keys()
        keys = [k for k in keys if k not in consumed]
        if fp8.layout == IN_OUT:
            shapes.update({f"{n}.weight": shapes[f"{n}.weight"][::-1] for n in fp8.scales})
    return LazyCheckpoint(path, config, _map_keys(keys), shapes, sha256, meta.get("model_version"), fp8)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Every tensor of `path` in memory (small checkpoints and tests; builds stream with `open_checkpoint`)."""
    lazy = open_checkpoint(path)
    parts = {c: dict(lazy.tensors(c)) for c in COMPONENTS}
    return Checkpoint(lazy.path, lazy.sha256, lazy.metadata_config, parts["dit"], parts["vae_encoder"],
                      parts["vae_decoder"], parts["text"])


def config_from_metadata(preset: Preset, config: dict[str, Any] | None) -> Preset:
    """Preset with the DiT and VAE hyper-parameters a checkpoint's metadata states."""
    if not config:
        return preset
    t = config.get("transformer", {})
    dit_fields = {f for f in DiTConfig.__dataclass_fields__}
    dit_changes = {k: v for k, v in t.items() if k in dit_fields}
    if "positional_embedding_max_pos" in dit_changes:
        dit_changes["positional_embedding_max_pos"] = tuple(dit_changes["positional_embedding_max_pos"])
    vae = vae_from_metadata(config["vae"], preset.vae) if "vae" in config else preset.vae
    text_keys = {"connector_num_attention_heads": "connector_heads",
                 "connector_attention_head_dim": "connector_head_dim",
                 "connector_num_layers": "connector_layers",
                 "connector_apply_gated_attention": "connector_gated_attention",
                 "rope_type": "rope_type", "frequencies_precision": "frequencies_precision"}
    text_changes: dict[str, Any] = {ours: t[k] for k, ours in text_keys.items() if k in t}
    # ltx-core reads an absent LTX-2.3 flag as false: a file's config sets each, whatever the preset's
    for flag in ("apply_gated_attention", "cross_attention_adaln", "caption_proj_before_connector"):
        dit_changes[flag] = bool(t.get(flag, False))
    text_changes["per_token_projection"] = per_token_projection(t)
    text_changes["connector_gated_attention"] = bool(t.get("connector_apply_gated_attention", False))
    if "connector_positional_embedding_max_pos" in t:
        text_changes["connector_max_pos"] = tuple(t["connector_positional_embedding_max_pos"])
    out = replace(preset, dit=replace(preset.dit, **dit_changes), vae=vae,
                  text=replace(preset.text, **text_changes))
    if out.text.connector_dim != out.dit.context_dim:  # ltx-core fails at the DiT's first cross-attention
        raise CheckpointError(
            f"the checkpoint's config makes a {out.text.connector_dim}-wide text context (connector heads x "
            f"head dim) for a DiT that takes {out.dit.context_dim}: use an unmodified LTX-2 or LTX-2.3 "
            "checkpoint"
        )
    return out


def per_token_projection(transformer: dict[str, Any]) -> bool:
    """True for ltx-core's V2 text projection (LTX-2.3), False when none of its caption keys is set (LTX-2).

    As ltx-core decides it: a partial set or another value is refused (ltx-core raises NotImplementedError
    there)."""
    present = transformer.keys() & V2_CAPTION_CONFIG.keys()
    if not present:
        return False
    odd = sorted(f"{k} missing" for k in set(V2_CAPTION_CONFIG) - present) + sorted(
        f"{k}={transformer[k]!r}" for k in present if transformer[k] != V2_CAPTION_CONFIG[k])
    if odd:
        raise CheckpointError(
            f"the checkpoint's transformer config asks for a text projection ltx-core does not build "
            f"({', '.join(odd)}; "
            f"LTX-2.3 sets {', '.join(f'{k}={v}' for k, v in V2_CAPTION_CONFIG.items())}): "
            "use an unmodified LTX-2 or LTX-2.3 checkpoint"
        )
    return True


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Load every tensor or raise one error listing missing, unexpected and mis-shaped keys."""
    check_layout(module, {k: tuple(v.shape) for k, v in state.items()}, what, path)
    expected = module.state_dict()
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def check_layout(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]], what: str, path: Path) -> None:
    """Raise one error listing missing, unexpected and mis-shaped keys (from shapes alone: nothing is read)."""
    check_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()}, shapes, what, path)


def check_shapes(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], what: str,
                 path: Path, fix: str = "pick the preset the checkpoint was trained with") -> None:
    """`check_layout` against expected shapes (a meta-device model's, or `dit_shapes`); `fix` ends the message."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(shapes[k])} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(shapes))
        if tuple(shapes[k]) != tuple(expected[k])
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_MAX_LISTED])}{more}")
    if problems:
        raise CheckpointError(
            f"{path} does not match the {what} of this preset ({'; '.join(problems)}): {fix}"
        )


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _read_tensor(fh: Any, base: int, info: dict) -> torch.Tensor:
    """One tensor by a plain read, not a memory map: a map's touched pages stay in the process's RSS while
    the file is open (a component's whole size again, measured by benchmarks/build_memory.py)."""
    dtype, shape = _DTYPES.get(info["dtype"]), info["shape"]
    if dtype is None:
        raise CheckpointError(f"safetensors dtype {info['dtype']} is not supported: convert the checkpoint")
    start, end = info["data_offsets"]
    if end == start:
        return torch.empty(shape, dtype=dtype)
    fh.seek(base + start)
    buf = bytearray(end - start)
    if fh.readinto(buf) != len(buf):
        raise CheckpointError(f"{fh.name} ends inside a tensor: the file is truncated")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def load_streaming(module: torch.nn.Module, ckpt: LazyCheckpoint, component: str, what: str,
                   transform: Transform | None = None, prefix: str = "") -> None:
    """Copy `component`'s tensors into `module` one at a time (never a second copy of the component)."""
    names = {prefix + k: k for k in ckpt.keys[component]}
    check_layout(module, {ours: ckpt.shape(component, k) for ours, k in names.items()}, what, ckpt.path)
    targets = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in ckpt.tensors(component, transform=transform,
                                        dequantize_to=lambda key: targets[prefix + key].dtype):
            target = targets[prefix + key]
            target.copy_(tensor.to(target.dtype))
            del tensor


def save_checkpoint(
    path: str | Path,
    dit: torch.nn.Module,
    vae_encoder: torch.nn.Module | None = None,
    vae_decoder: torch.nn.Module | None = None,
    config: dict[str, Any] | None = None,
    layout: str = "comfy",
    text: torch.nn.Module | None = None,
    audio_connector: torch.nn.Module | None = None,
    audio_projection: torch.nn.Module | None = None,
    model_version: str | None = None,
) -> None:
    """Write an LTX-2-layout checkpoint (tests and conversions); `dit` is an LTXModel (video-only or, as real
    files, audio-video), `text` a TextSide, `audio_connector` and `audio_projection` (LTX-2.3's
    `audio_aggregate_embed`) the audio stream's text parts; `model_version` the top-level metadata key."""
    prefix = _COMFY_PREFIX if layout == "comfy" else ""
    tensors = {prefix + k: v.contiguous() for k, v in dit.state_dict().items()}
    if text is not None:
        for k, v in text.feature_extractor.state_dict().items():
            tensors[f"text_embedding_projection.{k}"] = v.contiguous()
        for k, v in text.connector.state_dict().items():
            tensors[f"{prefix}video_embeddings_connector.{k}"] = v.contiguous()
    if audio_connector is not None:
        for k, v in audio_connector.state_dict().items():
            tensors[f"{prefix}audio_embeddings_connector.{k}"] = v.contiguous()
    if audio_projection is not None:
        for k, v in audio_projection.state_dict().items():
            tensors[f"text_embedding_projection.audio_aggregate_embed.{k}"] = v.contiguous()
    for name, module in (("encoder", vae_encoder), ("decoder", vae_decoder)):
        if module is not None:
            for k, v in module.state_dict().items():
                key = k.replace("per_channel_statistics.", "vae.per_channel_statistics.", 1) if k.startswith(
                    "per_channel_statistics.") else f"vae.{name}.{k}"
                tensors[key] = v.contiguous()
    meta = {"config": json.dumps(config)} if config else {}
    if model_version is not None:
        meta["model_version"] = model_version
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta or None)
    tmp.replace(path)
