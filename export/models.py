"""The PyTorch modules of a preset (seeded) or a checkpoint, ready to export per bucket.

Where each component's weights come from is decided first, from file headers alone
(`plan_sources`): a real checkpoint never gets a seeded VAE or text projection. Components
are then loaded one at a time (`load_models(components=...)`), tensor by tensor from the
memory-mapped checkpoint, in the engine's dtype, so a build holds one component at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from stdrc.export.checkpoint import (
    LazyCheckpoint,
    Transform,
    check_layout,
    check_shapes,
    config_from_metadata,
    load_streaming,
    open_checkpoint,
)
from stdrc.export.config import ModelFamily, Preset, get_preset
from stdrc.export.dit import BakedRopeDiT, STDRCTransformer, build_dit
from stdrc.export.errors import CheckpointError
from stdrc.export.family import detect_family
from stdrc.export.lora import LoraSet, LoraSpec, dit_shapes, lora_transform
from stdrc.export.reference import token_positions
from stdrc.export.rope import RopeTables, rope_tables
from stdrc.export.text import GemmaText, TextSide, TextStates, build_text_side, load_gemma
from stdrc.export.upsampler import (
    UpsamplerFile,
    UpsampleVideo,
    load_upsampler,
    module_statistics,
    open_upsampler,
    read_statistics,
    seeded_upsampler,
)
from stdrc.export.vae import DecoderForExport, EncoderForExport, build_vae, vae_from_metadata
from stdrc.runtime.manifest import Bucket, sha256_file
from stdrc.runtime.schema import SourceQuantization
from stdrc.runtime.text import ByteTokenizer
from stdrc.runtime.vocab import COMPONENTS, TEXT_COMPONENTS

BASE_FLAG = "--base-checkpoint"
TEXT_PARTS = "text projection and connector"
VAE_WHAT = {"vae_encoder": "VAE encoder", "vae_decoder": "VAE decoder"}


@dataclass
class ModelSet:
    preset: Preset
    dit: STDRCTransformer | None
    vae_encoder: torch.nn.Module | None
    vae_decoder: torch.nn.Module | None
    text: TextSide | None  # text_head's weights; its encoder is `text_states` when both were loaded, else Identity
    face: torch.nn.Module | None
    source_sha256: str  # hash of every component's source (files' sha256, or the seeded preset config)
    checkpoint_sha256: str | None
    gemma: GemmaText | None = None
    sources: dict[str, dict] = field(default_factory=dict)  # component -> {"file", "sha256"} or {"seeded"}
    loras: LoraSet | None = None  # fused into `dit`
    upsampler: UpsampleVideo | None = None  # two-stage bundles: the x2 latent upsampler with the VAE statistics
    text_states: torch.nn.Module | None = None  # text_gemma's encoder (Gemma-3, or the tiny preset's)

    def tokenize(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """[1, L] token ids and mask as the bundle's runtime tokenizer gives them (bytes, or Gemma's)."""
        length = self.preset.text.max_length
        if self.gemma is None:
            return ByteTokenizer(length)(prompt)
        encoded = self.gemma.tokenizer(prompt.strip(), padding="max_length", max_length=length, truncation=True,
                                       return_tensors="np")
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    def rope(self, bucket: Bucket, layout: str = "tass") -> tuple[torch.Tensor, RopeTables]:
        grid = (bucket.latent_frames, bucket.latent_height, bucket.latent_width)
        positions = token_positions(grid, layout, bucket.fps)
        return positions, rope_tables(positions, self.preset.dit)

    def export_modules(self, bucket: Bucket, layout: str = "tass",
                       rope_input: bool = False) -> dict[str, torch.nn.Module]:
        """The export wrappers of the components this set holds (those loaded).

        `rope_input`: the DiT takes `rope_cos`/`rope_sin` as inputs (one engine, every bucket); else the
        bucket's tables are baked in as constants."""
        modules: dict[str, torch.nn.Module] = {}
        if self.text_states is not None:
            modules["text_gemma"] = TextStates(self.text_states)
        if self.text is not None:
            modules["text_head"] = self.text.head
        if self.dit is not None and rope_input:
            modules["dit"] = self.dit
        elif self.dit is not None:
            _, tables = self.rope(bucket, layout)
            dtype = next(self.dit.parameters()).dtype
            modules["dit"] = BakedRopeDiT(self.dit, tables.cos.to(dtype), tables.sin.to(dtype))
        if self.vae_encoder is not None:
            modules["vae_encoder"] = EncoderForExport(self.vae_encoder)
        if self.vae_decoder is not None:
            modules["vae_decoder"] = DecoderForExport(self.vae_decoder)
        if self.face is not None:
            modules["face_encoder"] = self.face
        if self.upsampler is not None:
            modules["upsampler"] = self.upsampler
        return {k: v.eval() for k, v in modules.items()}


@dataclass(frozen=True)
class Sources:
    """Where each component's weights come from, decided from file headers before any weight is read."""

    preset: Preset
    seed: int
    checkpoint: LazyCheckpoint | None = None
    vae: LazyCheckpoint | None = None  # the checkpoint holding the VAE
    text: LazyCheckpoint | None = None  # the checkpoint holding the text projection + connector
    gemma: GemmaText | None = None  # tokenizer and config only: weights load with the text encoder
    face_weights: Path | None = None
    face_sha256: str | None = None
    two_stage: bool = False  # the bundle has an `upsampler` (from `upsampler`, else seeded: the tiny presets)
    upsampler: UpsamplerFile | None = None

    def file_of(self, component: str) -> LazyCheckpoint | None:
        """The checkpoint `component`'s weights are read from (None: seeded, or not from a checkpoint)."""
        return {"dit": self.checkpoint, "vae_encoder": self.vae, "vae_decoder": self.vae,
                "text_head": self.text}.get(component)

    def source_quantization(self) -> SourceQuantization | None:
        """The DiT file's pre-quantization, for the manifest (None: a float file, or seeded weights)."""
        fp8 = self.checkpoint.fp8 if self.checkpoint is not None else None
        return SourceQuantization(**fp8.record()) if fp8 is not None else None

    def of(self) -> dict[str, dict]:
        """Per component: the files (name + sha256) its weights come from, or the seed they were drawn with."""
        seeded = {"seeded": config_hash(self.preset, self.seed)}

        def files(*parts: tuple[str, str | Path | None, str | None]) -> dict:
            real = {role: {"file": Path(p).name, "sha256": sha} for role, p, sha in parts if sha is not None}
            return {"files": real} if real else seeded

        ck, vae = self.checkpoint, self.vae
        gemma = ("encoder", self.gemma.folder if self.gemma else None, self.gemma.sha256 if self.gemma else None)
        head = ("projection", self.text.path if self.text else None, self.text.sha256 if self.text else None)
        out = {
            # the head's shapes follow Gemma's config: its folder keys the head too
            "text_gemma": files(gemma),
            "text_head": files(head, gemma),
            "dit": files(("dit", ck.path if ck else None, ck.sha256 if ck else None)),
            "vae_encoder": files(("vae", self.vae.path if self.vae else None, self.vae.sha256 if self.vae else None)),
            "vae_decoder": files(("vae", self.vae.path if self.vae else None, self.vae.sha256 if self.vae else None)),
            "face_encoder": files(("face", self.face_weights, self.face_sha256)),
        }
        if self.two_stage:  # the upsampler's file and the VAE's (its statistics are in the graph); a part of
            up = self.upsampler  # them seeded (tiny presets) adds the seed
            out["upsampler"] = files(("upsampler", up.path if up else None, up.sha256 if up else None),
                                     ("vae", vae.path if vae else None, vae.sha256 if vae else None))
            if (up is None or vae is None) and "files" in out["upsampler"]:
                out["upsampler"] = {**out["upsampler"], **seeded}
        return out


def config_hash(preset: Preset, seed: int) -> str:
    text = json.dumps({"preset": preset.to_json(), "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def plan_sources(
    preset: Preset,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    face_weights: str | Path | None = None,
    text_encoder: str | Path | None = None,
    base_checkpoint: str | Path | None = None,
    components: tuple[str, ...] = COMPONENTS,
    family: ModelFamily | None = None,
    upsampler: str | Path | None = None,
    two_stage: bool = False,
) -> Sources:
    """Open headers, pick each component's file, refuse a mix of real and seeded weights (one line, naming the flag).

    Only the `components` asked for must have real weights (a DiT-only file loads its DiT alone). `family`:
    the one the checkpoint must be (a bundle's, for verify). `upsampler`: the x2 latent upsampler file, checked
    against the VAE's latent channels from its header; `two_stage` without it: the seeded tiny upsampler.
    """
    ckpt = open_checkpoint(checkpoint) if checkpoint is not None else None
    base = open_checkpoint(base_checkpoint) if base_checkpoint is not None else None
    if base is not None and ckpt is None:
        raise CheckpointError(f"{BASE_FLAG} {base.path.name} supplies the VAE and text side beside a DiT file: "
                              "pass that DiT file as --checkpoint")
    if ckpt is not None:
        found = check_family(ckpt, base)
        if family is not None and found is not family:
            raise CheckpointError(f"{ckpt.path} is an {found.label} checkpoint and the bundle "
                                  f"{family.label}: pass the checkpoint the bundle was built from")
        preset = config_from_metadata(preset, ckpt.metadata_config)
        if preset.family is not found:  # a file without config metadata takes the preset's flags
            raise CheckpointError(f"{ckpt.path} is an {found.label} checkpoint and preset {preset.name} "
                                  f"{preset.family.label}: pick a preset of the checkpoint's family")
    vae = text = None
    if ckpt is not None:
        vae = next((c for c in (ckpt, base) if c is not None and c.has("vae_encoder") and c.has("vae_decoder")), None)
        if vae is None and {"vae_encoder", "vae_decoder"} & set(components):
            where = f"neither {ckpt.path.name} nor {base.path.name} holds" if base else f"{ckpt.path.name} holds no"
            raise CheckpointError(f"{where} video VAE, and a real DiT is never paired with a random VAE: pass the "
                                  f"LTX-2 checkpoint as {BASE_FLAG}")
        text = next((c for c in (ckpt, base) if c is not None and c.has("text")), None)
        if vae is not None and vae is not ckpt and "vae" in (vae.metadata_config or {}):
            # the VAE as the file holding it describes it
            preset = replace(preset, vae=vae_from_metadata(vae.metadata_config["vae"], preset.vae))
    gemma = None
    if text_encoder is not None:
        gemma = load_gemma(text_encoder, preset.text.max_length, weights=False)
        preset = replace(preset, text=gemma.text_config(preset.text))
        if ckpt is not None and text is None and "text_head" in components:
            raise CheckpointError(
                f"{ckpt.path} holds no text projection or connector for the Gemma-3 text side: "
                f"pass the LTX-2 checkpoint that has them as {BASE_FLAG}"
            )
    elif preset.text.kind != "tiny" and set(TEXT_COMPONENTS) & set(components):
        raise CheckpointError("the Gemma-3 text side needs real weights: pass --text-encoder DIR (a local Gemma-3 "
                              "folder)")
    face_sha = None
    if face_weights is not None:
        face_weights = Path(face_weights)
        if not face_weights.is_file():
            raise CheckpointError(f"face backbone {face_weights} does not exist: pass the arcface_torch backbone.pth")
        face_sha = sha256_file(face_weights)
    up = open_upsampler(upsampler, preset.vae.latent_channels) if upsampler is not None else None
    src = Sources(preset, seed, ckpt, vae, text, gemma, face_weights, face_sha, two_stage or up is not None, up)
    check_layouts(src, components)
    return src


def check_family(ckpt: LazyCheckpoint, base: LazyCheckpoint | None) -> ModelFamily:
    """The checkpoint's family; its base checkpoint's must be the same."""
    family = detect_family(ckpt.path, ckpt.metadata_config, ckpt.model_version, ckpt.shapes)
    if base is not None:
        other = detect_family(base.path, base.metadata_config, base.model_version, base.shapes)
        if other is not family:
            raise CheckpointError(f"{ckpt.path.name} is an {family.label} checkpoint but {BASE_FLAG} "
                                  f"{base.path.name} is {other.label}: pass the base checkpoint of the same "
                                  "model")
    return family


def _text_parts(side: TextSide) -> torch.nn.Module:
    """The part of the text side a checkpoint holds (its "text" keys); the encoder comes from Gemma."""
    return torch.nn.ModuleDict({"feature_extractor": side.feature_extractor, "connector": side.connector})


def check_layouts(src: Sources, components: tuple[str, ...] = COMPONENTS) -> None:
    """Every component with real weights against the module the preset builds, from the headers and
    meta-device modules alone: a wrong file is refused in one line before any weight is read."""
    for name in components:
        real = src.file_of(name)
        if real is None:
            continue
        part = "text" if name == "text_head" else name
        shapes = {k: real.shape(part, k) for k in real.keys[part]}
        if name == "dit":
            check_shapes(dit_shapes(src.preset.dit), shapes, "DiT", real.path)
            continue
        with torch.device("meta"):
            if name == "text_head":
                parts = _text_parts(TextSide(src.preset.text, torch.nn.Identity()))
                check_layout(parts, shapes, TEXT_PARTS, real.path)
            else:
                encoder, decoder = build_vae(src.preset.vae, seed=None, which=name)
                check_layout(encoder or decoder, shapes, VAE_WHAT[name], real.path)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built under this allocate their weights in `dtype` directly (no fp32 copy first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# presets whose seeded face encoder is the tiny IResNet (the full presets' is iresnet50, a real backbone's arch):
# tiny23 is "the 2.3 path in seconds", and an iresnet50 took ~5 s of each of its builds and verifies
TINY_FACE = ("tiny", "tiny23")


def _face_module(preset: Preset, seed: int, face_weights: Path | None, dtype: torch.dtype) -> torch.nn.Module | None:
    try:
        from stdrc.export import face
    except ImportError:
        return None
    if face_weights is not None:
        module = face.load_arcface_backbone(face_weights, face.infer_arch(face_weights))
    else:
        module = face.build_face_encoder("tiny" if preset.name in TINY_FACE else "iresnet50", seed=seed)
    return face.FaceEncoderForExport(face.fold_batchnorm(module)).to(dtype)


def _no_default_init(real: LazyCheckpoint | None) -> contextlib.AbstractContextManager:
    """Modules filled from a checkpoint skip torch's default init (minutes of CPU for a 13B DiT, all
    overwritten: `load_streaming` refuses a checkpoint that lacks any of the module's keys)."""
    if real is None:
        return contextlib.nullcontext()
    from transformers.initialization import no_init_weights

    return no_init_weights()


def _load_component(src: Sources, name: str, dtype: torch.dtype, transform: Transform | None) -> torch.nn.Module:
    preset, seed = src.preset, src.seed
    real = src.file_of(name)
    # real weights: allocated in the engine dtype; seeded ones are drawn in fp32 (the same values at every dtype)
    with default_dtype(dtype if real is not None else torch.float32), torch.no_grad():
        if name == "dit":
            with _no_default_init(src.checkpoint):
                dit = build_dit(preset.dit, seed=None if src.checkpoint else seed).to(dtype)
            if src.checkpoint is not None:
                load_streaming(dit.ltx, src.checkpoint, "dit", "DiT", transform)
            elif transform is not None:  # seeded weights (a preset): the same hook, over the state dict
                dit.ltx.load_state_dict({k: transform(k, v) for k, v in dit.ltx.state_dict().items()}, strict=True)
            return dit
        if name in ("vae_encoder", "vae_decoder"):
            with _no_default_init(src.vae):
                encoder, decoder = build_vae(preset.vae, seed=None if src.vae else seed, which=name)
            module = (encoder if name == "vae_encoder" else decoder).to(dtype)
            if src.vae is not None:
                load_streaming(module, src.vae, name, VAE_WHAT[name], None)
            return module
        if name in TEXT_COMPONENTS:
            return _text_component(src, name, dtype)
        if name == "upsampler":
            module = load_upsampler(src.upsampler, dtype) if src.upsampler else seeded_upsampler(seed).to(dtype)
            return UpsampleVideo(module, vae_statistics(src))
    raise ValueError(name)


def _text_component(src: Sources, name: str, dtype: torch.dtype) -> torch.nn.Module:
    """`text_gemma`: the encoder alone (Gemma-3's language model, or the tiny preset's seeded one); `text_head`: a
    TextSide whose encoder is an Identity (the head's weights only: Gemma's are never read for it)."""
    preset, seed = src.preset, src.seed
    if src.gemma is not None and name == "text_gemma":
        return load_gemma(src.gemma.folder, preset.text.max_length, dtype=dtype).encoder
    # a tiny encoder is never in a checkpoint: it is the preset's, seeded with the head (the file's projection and
    # connector then load over the rest), else a build and its verify would draw different encoders
    seeded = src.gemma is None or src.text is None
    with _no_default_init(None if seeded else src.text):
        if src.gemma is not None:  # the head on Gemma's config, never its weights
            side = build_text_side(src.gemma.text_config(preset.text), seed=seed if seeded else None,
                                   encoder=torch.nn.Identity())
        else:  # the tiny preset: encoder and head seeded together, as one side
            side = build_text_side(preset.text, seed=seed)
        side = side.to(dtype)
    if name == "text_gemma":
        return side.encoder
    side.encoder = torch.nn.Identity()
    if src.text is not None:
        load_streaming(_text_parts(side), src.text, "text", TEXT_PARTS, None)
    return side


def vae_statistics(src: Sources) -> dict[str, torch.Tensor]:
    """The VAE encoder's per-channel statistics the upsampler runs between: the VAE file's two tensors, or the
    seeded encoder's (the bundle's own `vae_encoder`)."""
    if src.vae is not None:
        return read_statistics(src.vae)
    encoder, _ = build_vae(src.preset.vae, seed=src.seed, which="vae_encoder")
    return module_statistics(encoder)


def load_sources(src: Sources, components: tuple[str, ...] = COMPONENTS, dtype: torch.dtype = torch.float32,
                 transform: Transform | None = None) -> ModelSet:
    """The requested components of `src` (the rest None). `transform(key, tensor)` sees every DiT tensor as read."""
    got = {n: _load_component(src, n, dtype, transform) for n in components if n != "face_encoder"}
    text = got.get("text_head")
    if text is not None and "text_gemma" in got:  # both: the whole text side, as tests run it
        text.encoder = got["text_gemma"]
    face = _face_module(src.preset, src.seed, src.face_weights, dtype) if "face_encoder" in components else None
    sources = src.of()
    source = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()
    ckpt = src.checkpoint
    return ModelSet(src.preset, got.get("dit"), got.get("vae_encoder"), got.get("vae_decoder"),
                    text, text_states=got.get("text_gemma"), face=face, source_sha256=source,
                    checkpoint_sha256=ckpt.sha256 if ckpt else None, gemma=src.gemma, sources=sources,
                    upsampler=got.get("upsampler"))


def load_models(
    preset_name: str = "tiny",
    checkpoint: str | Path | None = None,
    seed: int = 0,
    face_weights: str | Path | None = None,
    preset: Preset | None = None,
    text_encoder: str | Path | None = None,
    base_checkpoint: str | Path | None = None,
    components: tuple[str, ...] = COMPONENTS,
    dtype: torch.dtype = torch.float32,
    transform: Transform | None = None,
    loras: tuple[LoraSpec, ...] = (),
) -> ModelSet:
    """Seeded modules for `preset_name`, with weights from `checkpoint` (+ `base_checkpoint`) when given.

    `text_encoder`: a local Gemma-3 folder (else the preset's tiny text encoder). `base_checkpoint`:
    the LTX-2 file beside a DiT-only checkpoint; it supplies
    the VAE and the text projection + connector that the DiT file lacks. `loras` are checked against
    the DiT's shapes from headers, then fused into each DiT tensor as it is read.
    """
    src = plan_sources(preset or get_preset(preset_name), checkpoint, seed, face_weights, text_encoder,
                       base_checkpoint, components)
    lora_set = None
    if loras:
        transform, lora_set = lora_transform(loras, src.preset.dit, transform)
    models = load_sources(src, components, dtype, transform)
    if lora_set:
        models.loras = lora_set
        models.source_sha256 = hashlib.sha256((models.source_sha256 + lora_set.digest()).encode()).hexdigest()
    return models
