"""`verify`: every bundle component against the PyTorch reference on the same seeded inputs.

Each component is rebuilt in fp32 from the bundle's recorded sources (checkpoint files, LoRAs,
face weights, or the seeded preset), one at a time and released before its engine loads; ONNX
files run through polygraphy's ONNX Runtime runner and comparator.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stdrc.engines.stage_cache import release_memory
from stdrc.export.config import ModelFamily, get_preset
from stdrc.export.dit import LtxCoreDiT, ltx_core_dit
from stdrc.export.errors import CheckpointError, LoraError
from stdrc.export.lora import Fp8LoraTransform, LoraSpec, lora_transform, match_manifest
from stdrc.export.models import load_sources, plan_sources
from stdrc.export.reference import token_positions
from stdrc.export.specs import component_specs
from stdrc.export.text import LtxCoreTextHead
from stdrc.export.upsampler import ltx_core_reference as ltx_core_upsample
from stdrc.export.upsampler import seeded_upsampler
from stdrc.export.vae import build_vae, ltx_core_reference
from stdrc.runtime.backends import check_trust, open_engine, resolve_device
from stdrc.runtime.manifest import bundle_path, check_files, read_manifest, sha256_file
from stdrc.runtime.options import check_path
from stdrc.runtime.vocab import BUCKET_SIZED, STAGE_COMPONENTS

# rel L2 tolerated per engine precision (fp32: the 1e-4)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2, "fp8": 1e-1}
# an FP8 DiT built with a pre-quantized checkpoint's own scales, against ltx-core's fp8_scaled_mm arithmetic on
# the same file (the same E4M3 codes and scales): what is left is the torch fast path's bf16 activations, bf16's
# bound (TensorRT's fp32 Q/DQ graph is far inside it)
FP8_FILE_TOLERANCE = 3e-2


# what each component was compared with (ComponentReport.reference)
REF_FILE_CONFIG = "ltx-core, built from the file's config"  # LTXModel / VideoEncoder / VideoDecoder
REF_PRESET_CONFIG = "ltx-core, built from the preset's config"  # seeded, or a file with no config
REF_STDRC = "stdrc export module"
REF_TEXT_HEAD = "ltx-core's feature extractor + embeddings connector"  # FeatureExtractorV1/V2 + Embeddings1DConnector
REF_GEMMA = "the encoder ltx-core's GemmaTextEncoder runs (transformers' Gemma-3, every hidden state)"


@dataclass(frozen=True)
class ComponentReport:
    max_abs_err: float
    rel_l2: float
    tolerance: float
    ok: bool
    backend: str
    precision: str
    buckets: tuple[str, ...] = ()  # the bucket sizes checked (FRAMESxWIDTHxHEIGHT)
    reference: str = REF_STDRC  # what the engine was compared with (REF_*)


@contextmanager
def _engine_runner(bundle: Path, name: str, entry, device: str, report: bool,
                   trust_code: bool = False):
    """feeds -> outputs: polygraphy's OnnxrtRunner for ONNX files, else the runtime's engine for the backend."""
    if entry.backend != "onnxruntime":
        yield open_engine(bundle, name, entry, device, trust_code=trust_code).run
        return
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from stdrc.runtime.backends.onnxruntime import providers_for

    session = SessionFromOnnx(str(bundle / entry.file), providers=providers_for(device))
    with _polygraphy_log(report), OnnxrtRunner(session, name=name) as runner:
        yield lambda feeds: dict(runner.infer({t.name: feeds[t.name] for t in entry.inputs}))


def polygraphy_check(name: str, got: list[dict[str, np.ndarray]], ref: list[dict[str, np.ndarray]],
                     tolerance: float, report: bool = False) -> bool:
    """polygraphy's comparator over every output and batch: mean |error| <= tolerance * RMS(reference).

    rel_l2 <= tolerance implies it (mean |d| <= RMS(d)); it adds shape and NaN/inf checks and, with
    `report`, polygraphy's per-output statistics on stdout.
    """
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc

    def rms(v: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(v.astype(np.float64)))))

    # one tolerance per output (polygraphy's granularity): the largest RMS over batches keeps the implication
    atol = {k: tolerance * max(rms(it[k]) for it in ref) for k in ref[0]}
    results = RunResults()
    for runner, iterations in ((name, got), ("pytorch", ref)):
        results.append((runner, [IterationResult(dict(it), runner_name=runner) for it in iterations]))
    with _polygraphy_log(report):
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
            check_shapes=True, check_error_stat="mean", atol=atol, rtol={k: 0.0 for k in atol}))
    return bool(accuracy)


@contextmanager
def _polygraphy_log(report: bool):
    """polygraphy logs on stdout: its INFO lines only when a report is asked for (never into --json)."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False  # else it prints a hint to install `colored`
    with G_LOGGER.verbosity(G_LOGGER.INFO if report else G_LOGGER.CRITICAL):
        yield


def compare(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    if actual.shape != expected.shape:
        return float("inf"), float("inf")
    diff = actual - expected
    rel = np.linalg.norm(diff) / max(np.linalg.norm(expected), 1e-12)
    return float(np.abs(diff).max()), float(rel)


_ROLE_FLAG = {"dit": "--checkpoint", "vae": "--base-checkpoint (or --checkpoint)", "projection":
              "--base-checkpoint (or --checkpoint)", "encoder": "--text-encoder", "face": "--face-weights",
              "upsampler": "--upsampler"}


def _describe(source: dict) -> str:
    if "files" not in source:
        return "seeded weights"
    return ", ".join(f"{role} {f['file']} ({f['sha256'][:12]})" for role, f in sorted(source["files"].items()))


def check_sources(bundle: Path, recorded: dict[str, dict], given: dict[str, dict], names: list[str]) -> None:
    """The files given to verify are the ones each component was built from (sha256), or one error naming the flag."""
    for name in names:
        want, got = recorded.get(name), given.get(name)
        if want is None or want == got:
            continue
        roles = set(want.get("files", {})) | set((got or {}).get("files", {}))
        flags = ", ".join(sorted({_ROLE_FLAG.get(r, r) for r in roles})) or "no weight flags"
        raise CheckpointError(f"{bundle}'s {name} was built from {_describe(want)}, not {_describe(got or {})}: "
                              f"pass the same files to verify ({flags})")


def _reference_module(src, name: str, manifest, transform: Callable | None,
                      fp8_file: bool = False) -> tuple[torch.nn.Module, str]:
    """The fp32 module `name`'s engine is compared with, and which it is. The DiT (and `dit_refine`, the DiT with
    the refinement LoRA fused as ltx-core fuses it, not as branches) always runs ltx-core's own `LTXModel.forward`;
    a DiT or VAE whose file has a config: ltx-core's module built from that config. `fp8_file`: the DiT's
    quantized Linears run ltx-core's fp8_scaled_mm arithmetic with the checkpoint's scales (`scaled_fp8_dit`)."""
    if fp8_file:
        from stdrc.export.fp8_scaled import file_scales, scaled_fp8_dit

        module, which = _reference_module(src, name, manifest, transform)
        scales = file_scales(src.checkpoint.linear_scales("dit"), getattr(transform, "weight_scales", None))
        return scaled_fp8_dit(module, scales), f"{which}, FP8 Linears as fp8_scaled_mm (the file's scales)"
    dit_like = name in ("dit", "dit_refine")
    ckpt = src.file_of("dit" if dit_like else name)
    config = (ckpt.metadata_config or {}) if ckpt is not None else {}
    if name in ("vae_encoder", "vae_decoder") and "vae" in config:
        return ltx_core_reference(ckpt, name), REF_FILE_CONFIG
    if dit_like and "transformer" in config:
        return ltx_core_dit(ckpt, transform), REF_FILE_CONFIG
    if dit_like:  # ltx-core's LTXModel as its configurator builds it from the preset's config
        return LtxCoreDiT(load_sources(src, ("dit",), torch.float32, transform).dit.ltx), REF_PRESET_CONFIG
    if name == "upsampler":  # ltx-core's LatentUpsampler + upsample_video, as ltx-core loads the files
        return ltx_core_upsample(
            src.upsampler.path if src.upsampler else seeded_upsampler(src.seed),
            src.vae.path if src.vae else build_vae(src.preset.vae, seed=src.seed, which="vae_encoder")[0]
        ), REF_FILE_CONFIG if src.upsampler else REF_PRESET_CONFIG
    one = load_sources(src, (name,), torch.float32, None)
    if name == "text_head":  # ltx-core's own arithmetic on the head's weights (not the layer-by-layer rewrite)
        return LtxCoreTextHead(one.text.head), REF_TEXT_HEAD
    module = one.export_modules(manifest.bucket, manifest.rope.layout, manifest.rope_input)[name]
    return module, REF_GEMMA if name == "text_gemma" and src.gemma is not None else REF_STDRC


def _reference(src, name: str, manifest, spec, feeds: list[dict], transform: Callable | None,
               buckets: list, fp8_file: bool = False) -> tuple[list[tuple], str]:
    """PyTorch outputs (fp32, from the recorded sources) for each feed (of `buckets[i]`), and which module
    gave them; the module is released on return."""
    module, which = _reference_module(src, name, manifest, transform, fp8_file)
    outs = []
    with torch.no_grad():
        for feed, bucket in zip(feeds, buckets):
            # the reference runs in fp32: 16-bit inputs (a 16-bit text head's hidden states) widened
            args = {t.name: torch.from_numpy(np.asarray(feed[t.name], np.float32 if "float" in t.dtype else None))
                    for t in spec.inputs}
            if isinstance(module, LtxCoreDiT):
                grid = (bucket.latent_frames, bucket.latent_height, bucket.latent_width)
                ref = module(token_positions(grid, manifest.rope.layout, bucket.fps), **args)
            else:
                ref = module(*args.values())
            outs.append(tuple(r.float().numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))))
    return outs, which


def refine_lora_for_verify(entry, given: LoraSpec | None, preset, seed: int, bundle: Path,
                           folder: Path | None = None) -> LoraSpec:
    """The refinement LoRA of a two-stage bundle, checked against its manifest entry (sha256, strength).
    The tiny presets' seeded one is made again in `folder` (default: a temporary folder removed at exit)."""
    from stdrc.engines.refine import RANDOM_LORA_PREFIX, random_refine_lora

    if given is None and entry.name.startswith(RANDOM_LORA_PREFIX):
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="stdrc-refine-lora-"))
            atexit.register(shutil.rmtree, folder, True)
        given = random_refine_lora(preset, seed, folder)
    if given is None:
        raise LoraError(f"{bundle} refines with the LoRA {entry.name}: pass it as --refine-lora FILE to verify it")
    if not given.path.is_file() or sha256_file(given.path) != entry.sha256:
        raise LoraError(f"--refine-lora {given.path} is not the refinement LoRA of {bundle} ({entry.name}, sha256 "
                        f"{entry.sha256[:12]}...): pass that file")
    if given.strength is not None and given.strength != entry.strength:
        raise LoraError(f"--refine-lora {given.path}:{given.strength:g} differs from the strength {entry.strength:g} "
                        f"{bundle} was built with: leave the strength out or pass {entry.strength:g}")
    return LoraSpec(given.path, entry.strength)


def bucket_feeds(bundle: Path, bucket, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A DiT taking RoPE inputs is fed the bucket's own tables from the bundle (not random ones)."""
    if "rope_cos" not in feeds or bucket.rope is None:
        return feeds
    with np.load(bundle_path(bundle, bucket.rope.file), allow_pickle=False) as tables:
        return {**feeds, "rope_cos": tables["cos"].astype(np.float32), "rope_sin": tables["sin"].astype(np.float32)}


def verify_bundle(bundle: str | Path, checkpoint: str | Path | None = None, seed: int = 1234,
                  device: str = "auto", text_encoder: str | Path | None = None,
                  base_checkpoint: str | Path | None = None,
                  face_weights: str | Path | None = None, loras: tuple[LoraSpec, ...] = (),
                  dit_transform: Callable | None = None, report: bool = False,
                  trust_code: bool = False, refine_lora: LoraSpec | None = None,
                  upsampler: str | Path | None = None) -> dict[str, ComponentReport]:
    """Rebuild each component in fp32 from the bundle's recorded sources, one at a time, and compare.

    `loras`: the files the bundle's DiT was fused with (the manifest keeps names and sha256, not paths);
    `dit_transform`: any other per-tensor hook it was built with. `refine_lora`: a two-stage bundle's refinement
    LoRA (its `dit_refine` is checked against the DiT with that LoRA fused; the tiny presets' random one is
    made again when not given). `upsampler`: the x2 upsampler file a two-stage bundle was built with (none:
    the tiny presets' seeded one). `trust_code`: allow torch/aoti bundles,
    whose loading runs code from the bundle (README, Trust)."""
    bundle = check_path(bundle, "bundle folder")
    manifest = read_manifest(bundle)
    for name, entry in manifest.components.items():
        check_trust(name, entry, trust_code)
    device = resolve_device(device, {e.backend for e in manifest.components.values()})
    check_files(bundle, manifest)
    if manifest.checkpoint_sha256 and checkpoint is None:
        raise CheckpointError(f"{bundle} was built from a checkpoint: pass --checkpoint with that file to verify it")
    if manifest.text.tokenizer == "hf-tokenizers" and text_encoder is None:
        raise CheckpointError(f"{bundle} uses a Gemma-3 text side: pass --text-encoder with that folder to verify it")
    loras = match_manifest(manifest.loras, tuple(loras), bundle)
    two_stage = manifest.two_stage is not None
    src = plan_sources(get_preset(manifest.preset), checkpoint, manifest.model_config.seed, face_weights,
                       text_encoder, base_checkpoint, family=ModelFamily(manifest.model_config.family),
                       upsampler=upsampler, two_stage=two_stage)
    if manifest.checkpoint_sha256 and (src.checkpoint is None or src.checkpoint.sha256 != manifest.checkpoint_sha256):
        raise CheckpointError(f"{checkpoint} is not the checkpoint {bundle} was built from (sha256 differs)")
    check_sources(bundle, manifest.created_by.sources, src.of(), list(manifest.components))
    fp8 = manifest.quality.fp8
    fp8_file = fp8 is not None and fp8.scales_source == "checkpoint" and src.checkpoint is not None \
        and src.checkpoint.fp8 is not None
    if loras:
        inner = dit_transform
        dit_transform, lora_set = lora_transform(loras, src.preset.dit, inner)
        if fp8_file:  # requantised as the build did (ltx-core's FP8 LoRA fusion)
            quantized = frozenset(f"{n}.weight" for n in src.checkpoint.linear_scales("dit"))
            dit_transform = Fp8LoraTransform(lora_set, quantized, inner)
    refine_transform = None
    if two_stage:
        refine = refine_lora_for_verify(manifest.two_stage.lora, refine_lora, src.preset, manifest.model_config.seed,
                                        bundle)
        refine_transform, _ = lora_transform((refine,), src.preset.dit, dit_transform)
    gemma = manifest.components.get("text_gemma")  # absent from a bundle verified in parts
    states = gemma.outputs[0].dtype if gemma else "float32"  # 16-bit in a 16-bit ONNX bundle
    per_bucket = [component_specs(src.preset, b, manifest.decode, manifest.rope_input, two_stage=two_stage,
                                  state_dtype=states) for b in manifest.buckets]
    reports = {}
    for name, entry in manifest.components.items():
        batches = [None] if "batch" not in entry.dynamic_dims else sorted({entry.dynamic_dims["batch"][0],
                                                                            entry.dynamic_dims["batch"][1]})
        sized = name in BUCKET_SIZED + STAGE_COMPONENTS  # checked at every bucket; the others take no bucket size
        checked = manifest.buckets if sized else manifest.buckets[:1]
        feeds = [bucket_feeds(bundle, b, specs[name].sample_inputs(seed=seed, batch=batch))
                 for b, specs in zip(checked, per_bucket) for batch in batches]
        transform = refine_transform if name == "dit_refine" else dit_transform
        from_file = fp8_file and name == "dit" and entry.precision == "fp8"
        refs, which = _reference(src, name, manifest, per_bucket[0][name], feeds, transform,
                                 [b for b in checked for _ in batches], from_file)
        release_memory()  # the PyTorch module is gone before the engine loads: one copy of the weights at a time
        expected = [{spec.name: value for spec, value in zip(entry.outputs, ref)} for ref in refs]
        with _engine_runner(bundle, name, entry, device, report, trust_code) as run:
            got = [run(feed) for feed in feeds]
        errors = [compare(g[k], e[k]) for g, e in zip(got, expected) for k in e]
        worst = (max(err[0] for err in errors), max(err[1] for err in errors))
        tol = FP8_FILE_TOLERANCE if from_file else TOLERANCE.get(entry.precision, 1e-4)
        matched = polygraphy_check(name, got, expected, tol, report)
        reports[name] = ComponentReport(worst[0], worst[1], tol, worst[1] <= tol and matched, entry.backend,
                                        entry.precision, tuple(b.label() for b in checked) if sized else (),
                                        which)
        del got
        release_memory()
    return reports


def reports_json(reports: dict[str, ComponentReport], family: str) -> dict:
    return {"family": family, "components": {k: asdict(v) for k, v in reports.items()},
            "ok": all(r.ok for r in reports.values())}
