"""One DiT sampling step per backend, side by side in one run (issue 6).

A step is one DiT forward over the three guidance streams batched (B = 3: no text / no
reference, no text / reference, text / reference) on the bucket's video + reference tokens.
Every backend gets the same seeded weights, the same inputs (already on the device: host
copies are not timed), the same thread count; fp32 (TF32 off unless --tf32) except the
low-precision rows. Engines are built first into a temporary folder (build time reported,
never timed), then each backend is loaded, warmed up and timed in turn; its output is
checked against the fp32 PyTorch path (max abs diff and rel L2).

    python benchmarks/dit_step.py                           # tiny preset, CPU
    python benchmarks/dit_step.py --backends all --json     # adds AOTInductor (slow to compile)
    python benchmarks/dit_step.py --device cuda --preset ltx2-video --layers 4   # 768x512x121

Backends: ltx-eager (baseline: ltx-core's `LTXModel` as users call it today, RoPE recomputed
from positions every call), ltx-eager-bf16 (the same in bf16, as ltx-pipelines runs it),
stdrc-torch (`STDRCTransformer` with the bucket's baked RoPE tables), stdrc-bf16 and
stdrc-fp8 (the fast path, export/fast_path.py: bf16, FP8 GEMMs with calibrated scales, CUDA
graphs on --device cuda), onnxruntime (the runtime's `OrtEngine` on the fused-attention graph,
com.microsoft.MultiHeadAttention; CUDA EP with IO binding on --device cuda), onnxruntime-unfused
(the same graph with attention left as MatMul -> Softmax -> MatMul: before fusion), torch-export
(`torch.export` .pt2), aoti (AOTInductor .pt2), tensorrt (when it imports, on CUDA only).
With --layers below the preset's depth, full-depth times are scaled by FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import harness
import numpy as np

from stdrc.runtime.vocab import ONNX_BACKENDS

BASELINE = "ltx-eager"
BF16_BASELINE = "ltx-eager-bf16"
BACKENDS = ("ltx-eager", "ltx-eager-bf16", "stdrc-torch", "stdrc-bf16", "stdrc-fp8", "onnxruntime",
            "onnxruntime-unfused", "torch-export", "aoti", "tensorrt")
FAST = ("stdrc-bf16", "stdrc-fp8")  # export/fast_path.py
PRECISION = {"ltx-eager-bf16": "bf16", "stdrc-bf16": "bf16", "stdrc-fp8": "fp8"}  # others: fp32 (tf32)
BUILT = {"onnxruntime": "onnxruntime", "onnxruntime-unfused": "onnxruntime", "tensorrt": "tensorrt",
         "torch-export": "torch", "aoti": "aoti"}
ATTENTION = {"onnxruntime-unfused": "unfused"}  # export/attention.py kind; others: the backend's fused op
STREAMS = 3


@dataclass(frozen=True)
class StepConfig:
    """What to measure. Bucket fields left as None take the preset's default bucket."""

    preset: str = "tiny"
    layers: int | None = None  # reduced depth (full width); None = the preset's
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    device: str = "cpu"
    backends: tuple[str, ...] = ("auto",)
    warmup: int = 3
    repeats: int = 20
    threads: int | None = None  # torch and ONNX Runtime intra-op threads; None = torch's default
    seed: int = 0
    tf32: bool = False
    baseline_key_mask: bool = False  # give ltx-core the dense (B, N, N) "no ref" mask it needs
    cache_dir: Path | None = None  # ONNX export cache (build_engines' layout); None = temporary
    fp8_scales: Path | None = None  # fp8_scales.json for these weights; None = calibrate here
    fp8_calibration_batches: int = 4  # seeded guidance batches for that calibration
    cuda_graph: bool = True  # fast path on CUDA: replay a captured CUDA graph
    compile: bool = False  # fast path: torch.compile the module first
    fast_accum: bool = False  # fast path: _scaled_mm's fast FP8 accumulation


# -- FLOPs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamCounts:
    """Linear-layer weights of the DiT, split by which tokens they multiply."""

    token: int  # outside the blocks, per token: patchify, adaLN (timesteps are per token), proj_out
    text: int  # outside the blocks, per text token: caption projection
    block_token: int  # one block, per token: self-attention QKVO, cross-attention Q/O, feed-forward
    block_text: int  # one block, per text token: cross-attention K/V

    @staticmethod
    def of(ltx) -> ParamCounts:
        import torch

        counts = {"token": 0, "text": 0, "block_token": 0, "block_text": 0}
        for name, module in ltx.named_modules():
            if not isinstance(module, torch.nn.Linear) or not (
                    name.startswith("transformer_blocks.0.") or not name.startswith("transformer_blocks.")):
                continue
            on_text = name.startswith("caption_projection") or ".attn2.to_k" in name or ".attn2.to_v" in name
            in_block = name.startswith("transformer_blocks.")
            key = ("block_" if in_block else "") + ("text" if on_text else "token")
            counts[key] += module.weight.numel()
        return ParamCounts(**counts)


def dit_flops(params: ParamCounts, layers: int, heads: int, head_dim: int, batch: int, tokens: int,
              text_length: int) -> float:
    """FLOPs of one DiT forward, a multiply-add counted as 2.

    Linear layers: 2 * params * tokens, each weight on the tokens it multiplies (B*N video and
    reference tokens, or B*L text tokens). Self-attention: Q K^T and P V, 4 * B * heads * N^2 *
    head_dim per layer. Cross-attention: 4 * B * heads * N * L * head_dim per layer. Norms,
    RoPE, softmax, activations and adaLN modulation are left out (the usual MFU convention), so
    the baseline's per-call RoPE work counts as overhead, not as useful FLOPs.
    """
    linear = 2 * batch * (tokens * (params.token + layers * params.block_token)
                          + text_length * (params.text + layers * params.block_text))
    self_attention = 4 * batch * heads * tokens**2 * head_dim
    cross_attention = 4 * batch * heads * tokens * text_length * head_dim
    return float(linear + layers * (self_attention + cross_attention))


# -- setup ------------------------------------------------------------------------------------

@dataclass
class Setup:
    cfg: StepConfig
    full_layers: int
    models: object  # stdrc.export.models.ModelSet, DiT only
    bucket: object  # stdrc.runtime.manifest.Bucket
    spec: object  # the DiT's ComponentSpec
    build: object  # stdrc.engines.build.BuildConfig (cache dir, seed, layout)
    module: object  # BakedRopeDiT: the stdrc-torch path, and what every engine is built from
    positions: object  # (1, 3, N, 2) pixel-space positions, for the baseline
    feeds: dict[str, np.ndarray]
    work: Path
    fp8_scales: dict[str, float] | None = None
    fast_facts: dict = field(default_factory=dict)  # fast path: scales' source, SDPA kernels
    src: object = None  # stdrc.export.models.Sources the engines are built from (seeded)


def make_setup(cfg: StepConfig, work: Path) -> Setup:
    from stdrc.engines.build import BuildConfig
    from stdrc.engines.preflight import check_bucket
    from stdrc.export.config import get_preset
    from stdrc.export.dit import BakedRopeDiT
    from stdrc.export.models import load_sources, plan_sources
    from stdrc.export.specs import component_specs

    preset = get_preset(cfg.preset)
    full_layers = preset.dit.num_layers
    if cfg.layers is not None:
        preset = preset.with_dit(num_layers=cfg.layers)
    # DiT only (ltx2-video's text side needs real Gemma weights): the seeded sources build_engines plans,
    # so a build sharing --cache-dir reuses the exported dit.onnx.
    src = plan_sources(preset, seed=cfg.seed, components=("dit",))
    models = load_sources(src, ("dit",))
    dit = models.dit
    build = BuildConfig(preset=preset.name, frames=cfg.frames, height=cfg.height, width=cfg.width,
                        out=work / "bundle", cache_dir=cfg.cache_dir or work / "cache", seed=cfg.seed,
                        progress=False)
    bucket, _ = check_bucket(build)
    positions, tables = models.rope(bucket)
    module = BakedRopeDiT(dit, tables.cos, tables.sin).eval()
    spec = component_specs(preset, bucket)["dit"]
    feeds = spec.sample_inputs(cfg.seed, batch=STREAMS)
    return Setup(cfg, full_layers, models, bucket, spec, build, module, positions, feeds, work, src=src)


def resolve_backends(cfg: StepConfig) -> list[str]:
    wanted = list(cfg.backends)
    if "all" in wanted:
        return list(BACKENDS)
    if "auto" in wanted:  # AOTInductor compiles for ~25 s even for tiny on 2 CPU cores: opt-in there
        return [b for b in BACKENDS if cfg.device == "cuda" or b != "aoti"]
    return [b for b in BACKENDS if b in wanted]


def skip_reason(name: str, cfg: StepConfig) -> str | None:
    import torch

    if name == "tensorrt":
        trt = harness.tensorrt_status()
        if not trt["importable"]:
            return f"TensorRT not importable here ({trt['reason']})"
        if cfg.device != "cuda":
            return "TensorRT needs --device cuda"
    if name in ("torch-export", "aoti") and cfg.device == "cpu" and torch.cuda.is_available():
        return "build_engines compiles torch engines for the GPU when one is present: use --device cuda"
    if name == "stdrc-fp8":
        if cfg.device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            return "FP8 GEMMs need compute capability 8.9+ (Ada, Hopper)"
        if cfg.fp8_scales is None and importlib.util.find_spec("modelopt") is None:
            return ("calibrating FP8 scales needs nvidia-modelopt (pip install 'stdrc[fp8]'), "
                    "or pass --fp8-scales")
    return None


def fp8_scales(s: Setup) -> dict[str, float]:
    """--fp8-scales, else the project's calibration (modelopt, per-tensor max) on seeded guidance batches."""
    from stdrc.export.fast_path import load_fp8_scales

    cfg = s.cfg
    if cfg.fp8_scales is not None:
        s.fast_facts["fp8_scales"] = str(cfg.fp8_scales)
        return load_fp8_scales(cfg.fp8_scales)
    import torch

    from stdrc.calibration.capture import random_dit_batches
    from stdrc.calibration.fp8 import amax_scales, quantize_dit_fp8

    start = time.perf_counter()
    batches = random_dit_batches(s.models.preset, s.bucket, cfg.fp8_calibration_batches, seed=cfg.seed)
    batches = [{k: v.to(cfg.device) for k, v in b.items()} for b in batches]
    with contextlib.redirect_stdout(sys.stderr), torch.inference_mode():
        scales = amax_scales(quantize_dit_fp8(s.module.dit, batches))
    s.fast_facts.update(fp8_scales=f"calibrated here: modelopt max on {len(batches)} seeded guidance batches",
                        fp8_calibration_s=time.perf_counter() - start)
    return scales


def sdpa_facts(s: Setup) -> dict[str, str]:
    """The SDPA kernel PyTorch picks in bf16 for this bucket's attention shapes (self: N keys, cross: L)."""
    import torch

    from stdrc.export.fast_path import sdpa_choice

    d, b = s.models.preset.dit, s.bucket
    shape = (STREAMS, d.num_attention_heads, b.tokens)
    return {
        "self_attention_key_bias": sdpa_choice(*shape, b.tokens, d.attention_head_dim, torch.bfloat16,
                                               s.cfg.device, key_bias=True),
        "self_attention_no_mask": sdpa_choice(*shape, b.tokens, d.attention_head_dim, torch.bfloat16,
                                              s.cfg.device, key_bias=False),
        "cross_attention_text_bias": sdpa_choice(*shape, b.text_length, d.attention_head_dim, torch.bfloat16,
                                                 s.cfg.device, key_bias=True),
    }


def build(name: str, s: Setup, stack: contextlib.ExitStack) -> tuple[object, Path]:
    """One DiT engine through build_engines' own per-component builder, in its own folder."""
    from stdrc.engines.build import build_component
    from stdrc.engines.bundle import BundleWriter

    writer = stack.enter_context(BundleWriter(s.work / name))
    build_cfg = replace(s.build, attention=ATTENTION.get(name))
    with contextlib.redirect_stdout(sys.stderr):  # exporters print; keep --json output clean
        entry = build_component(build_cfg, BUILT[name], s.src, s.bucket, s.spec, writer, full=lambda: s.models)
    return entry, writer.staging


# -- loading each backend ---------------------------------------------------------------------

class Loaded(NamedTuple):
    call: Callable[[], object]
    to_numpy: Callable[[object], np.ndarray]  # the call's result -> velocity [B, N, C] float32
    close: Callable[[], None] = lambda: None  # frees what the engine holds (TensorRT device buffers)
    prepare_s: float | None = None  # fast path: conversion (and CUDA graph capture) time, not timed
    sampler: Callable[[], dict] | None = None  # the runtime's own sampling loop over this engine


def sampler_overhead(engine, s: Setup) -> dict:
    """The runtime's sampling loop (guidance, Euler, stream batching, feed checks) over `engine`, as
    Pipeline runs it: time per step outside the engine calls, as a share of the step."""
    from stdrc.runtime import sampler as smp
    from stdrc.runtime.backends import check_feeds

    video = s.bucket.video_tokens
    f = s.feeds
    cond = smp.Conditioning(reference=f["latent"][:1, video:], text=(f["context"][2:3], f["context_mask"][2:3]),
                            no_text=(f["context"][:1], f["context_mask"][:1]))
    engine_ms: list[float] = []

    def denoiser(**feeds: np.ndarray) -> np.ndarray:
        check_feeds(engine.entry, feeds, "dit")
        start = time.perf_counter()
        out = engine.run(feeds, keep=smp.FIXED_INPUTS)["velocity"]
        engine_ms.append((time.perf_counter() - start) * 1e3)
        return out

    steps = max(2, min(s.cfg.repeats, 10))
    scales = smp.GuidanceScales(text=3.0, ref=2.0)
    noise = np.random.default_rng(s.cfg.seed).standard_normal(f["latent"][:1, :video].shape, dtype=np.float32)
    start = time.perf_counter()
    smp.sample(denoiser, noise, smp.ltx2_sigmas(steps), cond, scales, max_batch=STREAMS,
               feed_sigma=any(t.name == smp.SIGMA_INPUT for t in engine.entry.inputs))
    total_ms = (time.perf_counter() - start) * 1e3
    outside = (total_ms - sum(engine_ms)) / steps
    return {"steps": steps, "step_ms": total_ms / steps, "outside_engine_ms_per_step": outside,
            "outside_engine_pct_of_step": 100 * outside / (total_ms / steps),
            "note": "smp.sample over the engine with IO-bound fixed inputs, feed checks included"}


def _tensor(out: object) -> np.ndarray:
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.detach().float().cpu().numpy()


def _ort_cuda(engine, feeds: dict[str, np.ndarray], tf32: bool) -> Loaded:
    """Inputs bound once on the GPU, output left there: no host copies in the timed call."""
    import onnxruntime as ort

    session = engine.session
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session.set_providers(providers, [{"use_tf32": str(int(tf32))}, {}])
    binding = session.io_binding()
    values = [ort.OrtValue.ortvalue_from_numpy(feeds[t.name], "cuda", 0) for t in engine.entry.inputs]
    for spec, value in zip(engine.entry.inputs, values):
        binding.bind_ortvalue_input(spec.name, value)
    binding.bind_output(engine.entry.outputs[0].name, "cuda", 0)

    def call() -> None:
        session.run_with_iobinding(binding)
        return values  # keeps the bound inputs alive

    return Loaded(call, lambda _: binding.copy_outputs_to_cpu()[0])


def load(name: str, s: Setup, entry: object, folder: Path | None, inputs: dict) -> Loaded:

    cfg, n = s.cfg, s.bucket.tokens
    args = [inputs[t.name] for t in s.spec.inputs]
    if name in ("ltx-eager", "ltx-eager-bf16"):
        import torch
        from ltx_core.guidance.perturbations import BatchedPerturbationConfig
        from ltx_core.model.transformer.modality import Modality

        from stdrc.export.fast_path import cast_copy

        dtype = torch.bfloat16 if name == "ltx-eager-bf16" else torch.float32
        ltx = s.module.dit.ltx if dtype == torch.float32 else cast_copy(s.module.dit.ltx, dtype)
        mask = None
        if cfg.baseline_key_mask:  # ltx-core takes a dense (B, N, N) mask: key j visible to every query
            mask = inputs["attn_mask"][:, None, :].expand(-1, n, -1).to(dtype)
        video = Modality(  # timesteps stay fp32, as in stdrc-bf16
            latent=inputs["latent"].to(dtype), sigma=inputs["timestep"][:, 0], timesteps=inputs["timestep"],
            positions=s.positions.to(cfg.device).expand(STREAMS, -1, -1, -1),
            context=inputs["context"].to(dtype), context_mask=inputs["context_mask"], attention_mask=mask,
        )
        perturbations = BatchedPerturbationConfig.empty(STREAMS)
        return Loaded(lambda: ltx(video=video, audio=None, perturbations=perturbations)[0], _tensor)
    if name == "stdrc-torch":
        return Loaded(lambda: s.module(*args), _tensor)
    if name in FAST:
        from stdrc.export.fast_path import FastPathOptions, prepare_fast_dit

        start = time.perf_counter()
        options = FastPathOptions(fp8=name == "stdrc-fp8", cuda_graph=cfg.cuda_graph and cfg.device == "cuda",
                                  compile=cfg.compile, fast_accum=cfg.fast_accum)
        fast = prepare_fast_dit(s.module.dit, s.module.rope_cos, s.module.rope_sin, options,
                                s.fp8_scales if options.fp8 else None, device=cfg.device)
        fast(*args)  # CUDA graph capture / torch.compile happen here, outside the timed calls
        harness.cuda_sync(cfg.device)()
        return Loaded(lambda: fast(*args), _tensor, prepare_s=time.perf_counter() - start)
    if name in ("onnxruntime", "onnxruntime-unfused"):
        from stdrc.runtime.backends.onnxruntime import OrtEngine

        engine = OrtEngine(folder / entry.file, entry, device=cfg.device, threads=cfg.threads or 0)
        if cfg.device == "cuda":
            return _ort_cuda(engine, s.feeds, cfg.tf32)
        return Loaded(lambda: engine.run(s.feeds), lambda out: out["velocity"],
                      sampler=lambda: sampler_overhead(engine, s))
    if name in ("torch-export", "aoti"):
        from stdrc.runtime.backends.torch import TorchEngine

        engine = TorchEngine.from_file(folder / entry.file, entry, device=cfg.device)
        return Loaded(lambda: engine.module(*args), _tensor)
    if name == "tensorrt":  # the runtime's engine as is: numpy in and out, host copies included
        from stdrc.runtime.backends import open_engine

        engine = open_engine(folder, "dit", entry, cfg.device)
        close = getattr(engine, "close", lambda: None)
        return Loaded(lambda: engine.run(s.feeds), lambda out: out["velocity"], close)
    raise ValueError(f"unknown backend {name!r}")


# -- measuring --------------------------------------------------------------------------------

def _memory(name: str, device: str, rss_before: float | None, gpu_before: tuple[float, float] | None) -> dict:
    if device != "cuda":
        peak = harness.peak_rss_mb()
        return {"peak_mem_mb": peak, "mem_added_mb": None if rss_before is None else peak - rss_before,
                "mem_source": "process RSS high-water (VmHWM), reset before loading this backend"}
    import torch

    allocated_before, used_before = gpu_before
    if name in ("ltx-eager", "ltx-eager-bf16", "stdrc-torch", *FAST, "torch-export", "aoti"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak_mem_mb": peak, "mem_added_mb": peak - allocated_before,
                "mem_source": "torch.cuda.max_memory_allocated, reset before loading this backend"}
    used = harness.gpu_used_mb()
    return {"peak_mem_mb": used, "mem_added_mb": used - used_before,
            "mem_source": "device memory in use after the timed calls (cudaMemGetInfo), not a peak"}


def measure(name: str, s: Setup, built: tuple | None, reference: np.ndarray) -> dict:
    import torch

    cfg = s.cfg
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    harness.reset_peak_rss()
    rss_before = harness.rss_mb()
    gpu_before = None
    if cfg.device == "cuda":
        gpu_before = (torch.cuda.memory_allocated() / 2**20, harness.gpu_used_mb())
    entry, folder = built if built else (None, None)
    inputs = {k: torch.from_numpy(v).to(cfg.device) for k, v in s.feeds.items()}
    with torch.inference_mode():
        loaded = load(name, s, entry, folder, inputs)
        timing = harness.time_calls(loaded.call, cfg.warmup, cfg.repeats, harness.cuda_sync(cfg.device))
        out = loaded.to_numpy(loaded.call())
    row = {"timing": timing, **_memory(name, cfg.device, rss_before, gpu_before)}
    if loaded.prepare_s is not None:
        row["build_s"] = loaded.prepare_s
    if loaded.sampler is not None:
        row["sampler"] = loaded.sampler()
    # the baselines without --baseline-key-mask see the reference in every stream: compare the streams
    # whose keys are all visible anyway
    sees_all = name in (BASELINE, BF16_BASELINE) and not cfg.baseline_key_mask
    rows = s.feeds["attn_mask"].all(axis=1) if sees_all else slice(None)
    row["max_abs_diff"] = float(np.abs(out[rows] - reference[rows]).max())
    row["max_abs_ref"] = float(np.abs(reference[rows]).max())
    ref64 = reference[rows].astype(np.float64)
    row["rel_l2"] = float(np.linalg.norm(out[rows] - ref64) / max(np.linalg.norm(ref64), 1e-30))
    loaded.close()
    del loaded, inputs
    gc.collect()
    return row


def _error(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def run(cfg: StepConfig) -> dict:
    """Build, then measure every requested backend; the report as a JSON-ready dict."""
    import torch

    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    cfg = replace(cfg, threads=threads)
    names = resolve_backends(cfg)
    load_start = harness.load_average()
    with tempfile.TemporaryDirectory(prefix="stdrc-dit-step-") as tmp, contextlib.ExitStack() as stack:
        s = make_setup(cfg, Path(tmp))
        results: dict[str, dict] = {}
        built: dict[str, tuple] = {}
        # ONNX-based builds first: the torch builds move the shared module to the GPU when there is one
        for name in sorted(names, key=lambda n: BUILT.get(n) not in ONNX_BACKENDS):
            reason = skip_reason(name, cfg)
            if reason:
                results[name] = {"status": "skipped", "reason": reason}
            elif name in BUILT:
                start = time.perf_counter()
                try:
                    built[name] = build(name, s, stack)
                    results[name] = {"status": "ok", "build_s": time.perf_counter() - start}
                except Exception as e:
                    results[name] = {"status": "failed", "reason": f"build: {_error(e)}"}
            else:
                results[name] = {"status": "ok", "build_s": 0.0}
        s.module.to(cfg.device)
        with torch.inference_mode():
            args = [torch.from_numpy(s.feeds[t.name]).to(cfg.device) for t in s.spec.inputs]
            reference = _tensor(s.module(*args))
            del args
        if any(n in FAST and results[n]["status"] == "ok" for n in names):
            s.fast_facts["sdpa_bf16"] = sdpa_facts(s)
        if results.get("stdrc-fp8", {}).get("status") == "ok":
            try:
                s.fp8_scales = fp8_scales(s)
            except Exception as e:
                results["stdrc-fp8"] = {"status": "failed", "reason": f"fp8 scales: {_error(e)}"}
        for name in names:
            if results[name]["status"] != "ok":
                continue
            try:
                results[name].update(measure(name, s, built.get(name), reference))
            except Exception as e:
                results[name] = {"status": "failed", "reason": f"run: {_error(e)}"}
        rep = report(s, names, results)
    rep["config"]["load_average"] = {"start": load_start, "end": harness.load_average()}
    return rep


def report(s: Setup, names: list[str], results: dict[str, dict]) -> dict:
    cfg, b, d = s.cfg, s.bucket, s.models.preset.dit
    params = ParamCounts.of(s.module.dit.ltx)
    shape = {"heads": d.num_attention_heads, "head_dim": d.attention_head_dim, "batch": STREAMS,
             "tokens": b.tokens, "text_length": b.text_length}
    flops = dit_flops(params, d.num_layers, **shape)
    full_flops = dit_flops(params, s.full_layers, **shape)
    device = harness.device_info(cfg.device)
    fp32 = "tf32" if cfg.tf32 else "fp32"
    peak_of = {p: (device["peak_tflops"] or {}).get(p) for p in ("fp32", "tf32", "bf16", "fp8")}
    base = results.get(BASELINE, {}).get("timing")
    base_bf16 = results.get(BF16_BASELINE, {}).get("timing")
    rows = []
    for name in names:
        r = results[name]
        precision = PRECISION.get(name, fp32)
        row = {"name": name, "status": r["status"], "reason": r.get("reason"), "precision": precision,
               "ms_per_step": None, "ms_min": None, "ms_median": None, "ratio_to_baseline": None,
               "speedup": None, "ratio_to_ltx_bf16": None, "tokens_per_s": None, "tflops": None,
               "pct_of_peak": None, "peak_tflops_used": peak_of[precision], "peak_mem_mb": None,
               "mem_added_mb": None, "mem_source": r.get("mem_source"), "build_s": r.get("build_s"),
               "est_full_depth_ms": None, "max_abs_diff": r.get("max_abs_diff"),
               "max_abs_reference": r.get("max_abs_ref"), "rel_l2": r.get("rel_l2"), "times_ms": None,
               "sampler": r.get("sampler")}
        t = r.get("timing")
        if t is not None:
            seconds = t.median_ms / 1e3
            row.update(ms_per_step=t.median_ms, ms_min=t.min_ms, ms_median=t.median_ms,
                       times_ms=list(t.times_ms), tokens_per_s=STREAMS * b.tokens / seconds,
                       tflops=flops / seconds / 1e12, peak_mem_mb=r["peak_mem_mb"],
                       mem_added_mb=r["mem_added_mb"], est_full_depth_ms=t.median_ms * full_flops / flops)
            if peak_of[precision] is not None:
                row["pct_of_peak"] = 100 * row["tflops"] / peak_of[precision]
            if base is not None:
                row["ratio_to_baseline"] = t.median_ms / base.median_ms
                row["speedup"] = base.median_ms / t.median_ms
            if base_bf16 is not None:
                row["ratio_to_ltx_bf16"] = t.median_ms / base_bf16.median_ms
        rows.append(row)
    return {
        "benchmark": "dit_step",
        "timestamp": harness.timestamp(),
        "device": device,
        "preset": cfg.preset,
        "config": {
            "frames": b.frames, "height": b.height, "width": b.width, "fps": b.fps,
            "latent_grid": [b.latent_frames, b.latent_height, b.latent_width],
            "video_tokens": b.video_tokens, "reference_tokens": b.reference_tokens, "tokens": b.tokens,
            "text_length": b.text_length, "batch": STREAMS, "layout": "tass",
            "layers": d.num_layers, "full_layers": s.full_layers,
            "depth_reduced": d.num_layers < s.full_layers,
            "heads": d.num_attention_heads, "head_dim": d.attention_head_dim, "rope_type": d.rope_type,
            "dtype": "float32", "tf32": cfg.tf32, "threads": cfg.threads, "device": cfg.device,
            "warmup": cfg.warmup, "repeats": cfg.repeats, "seed": cfg.seed,
            "baseline_key_mask": cfg.baseline_key_mask, "flops_per_step": flops,
            "flops_per_step_full_depth": full_flops, "params": asdict(params),
            "peak_tflops_used": peak_of[fp32],
            "timing": "median of repeats after warm-up; inputs on the device",
            "fast_path": {"cuda_graph": cfg.cuda_graph and cfg.device == "cuda", "compile": cfg.compile,
                          "fast_accum": cfg.fast_accum, **s.fast_facts},
        },
        "versions": harness.versions(),
        "backends": rows,
    }


def print_table(rep: dict) -> None:
    c, dev = rep["config"], rep["device"]
    where = f"{dev['name']} ({dev['cores']} cores)" if dev["kind"] == "cpu" else dev["name"]
    print(f"DiT step, preset {rep['preset']}: {c['layers']} of {c['full_layers']} layers, "
          f"{c['frames']}x{c['height']}x{c['width']} -> {c['video_tokens']} video + {c['reference_tokens']} "
          f"reference tokens, text {c['text_length']}, batch {c['batch']} guidance streams, "
          f"fp32{' (TF32 on)' if c['tf32'] else ''} unless 'prec' says otherwise")
    print(f"device {c['device']}: {where}, {c['threads']} threads; "
          f"warm-up {c['warmup']}, repeats {c['repeats']}; "
          f"{c['flops_per_step'] / 1e9:.3g} GFLOP per step")
    load = c.get("load_average") or {}
    print(f"load average (1/5/15 min): {load.get('start')} at start, {load.get('end')} at end")
    if c["depth_reduced"]:
        print(f"reduced depth: 'full ms' scales each time by FLOPs to {c['full_layers']} layers "
              f"(x{c['flops_per_step_full_depth'] / c['flops_per_step']:.2f})")
    fast = c["fast_path"]
    if any(r["name"] in FAST for r in rep["backends"]):
        print(f"fast path: CUDA graph {fast['cuda_graph']}, compile {fast['compile']}, fast accum "
              f"{fast['fast_accum']}; FP8 scales: {fast.get('fp8_scales', '-')}; bf16 SDPA kernels: "
              + ", ".join(f"{k} {v}" for k, v in fast.get("sdpa_bf16", {}).items()))
    head = (f"{'backend':<14} {'prec':>4} {'min ms':>9} {'median ms':>10} {'ratio':>6} {'tokens/s':>10} "
            f"{'TFLOP/s':>8} {'%peak':>6} {'peak MB':>8} {'+MB':>7} {'build s':>7} {'max|diff|':>9} "
            f"{'rel L2':>8}")
    if c["depth_reduced"]:
        head += f" {'full ms':>9}"
    print(head)
    for r in rep["backends"]:
        if r["status"] != "ok":
            print(f"{r['name']:<14} {r['status']}: {r['reason']}")
            continue
        f = harness.fmt
        line = (f"{r['name']:<14} {r['precision']:>4} {f(r['ms_min'], '9.3f')} {f(r['ms_median'], '10.3f')} "
                f"{f(r['ratio_to_baseline'], '6.2f')} {f(r['tokens_per_s'], '10.0f')} "
                f"{f(r['tflops'], '8.4f')} "
                f"{f(r['pct_of_peak'], '6.1f')} {f(r['peak_mem_mb'], '8.0f')} {f(r['mem_added_mb'], '7.0f')} "
                f"{f(r['build_s'], '7.1f')} {f(r['max_abs_diff'], '9.1e')} {f(r['rel_l2'], '8.1e')}")
        if c["depth_reduced"]:
            line += f" {f(r['est_full_depth_ms'], '9.1f')}"
        print(line)
    for r in rep["backends"]:
        if r.get("sampler"):
            sm = r["sampler"]
            print(f"{r['name']}: the runtime's sampling loop over {sm['steps']} steps: "
                  f"{sm['step_ms']:.1f} ms per step, {sm['outside_engine_ms_per_step']:.2f} ms outside the engine "
                  f"({sm['outside_engine_pct_of_step']:.2f}% of the step)")
    v = rep["versions"]
    print(f"ratio = median / {BASELINE} median (lower is faster; the JSON also has ratio_to_ltx_bf16); "
          f"max|diff| and rel L2 vs stdrc-torch (fp32)"
          f"{'' if c['baseline_key_mask'] else ' (ltx-eager*: streams with the reference visible)'}; "
          "%peak against the row's precision; build s: engine build, or fast-path preparation")
    print(f"versions: torch {v['torch']}, onnxruntime {v['onnxruntime']}, ltx-core {v['ltx-core']}, "
          f"stdrc {v['stdrc']}, python {v['python']}, tensorrt "
          f"{v['tensorrt'].get('version') if v['tensorrt']['importable'] else 'not importable'}")


def parse_args(argv: list[str] | None = None) -> tuple[StepConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=("tiny", "ltx2-video"))
    p.add_argument("--layers", type=int, default=None, help="DiT depth (full width); default the preset's")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    harness.add_device_flag(p)
    p.add_argument("--backends", nargs="+", default=["auto"], choices=(*BACKENDS, "auto", "all"),
                   help="default auto: all but aoti on CPU (slow to compile), all on CUDA")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and ONNX Runtime")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (torch and the ORT CUDA EP)")
    p.add_argument("--baseline-key-mask", action="store_true",
                   help="give ltx-eager the dense (B, N, N) mask for the 'no ref' stream (equal work)")
    p.add_argument("--cache-dir", type=Path, default=None, help="ONNX export cache (default: temporary)")
    p.add_argument("--fp8-scales", type=Path, default=None,
                   help="stdrc-fp8: fp8_scales.json for these weights (default: calibrate on seeded batches)")
    p.add_argument("--fp8-calibration-batches", type=int, default=4)
    p.add_argument("--no-cuda-graph", action="store_true", help="fast path on CUDA: run eagerly")
    p.add_argument("--compile", action="store_true", help="fast path: torch.compile the module first")
    p.add_argument("--fast-accum", action="store_true", help="fast path: _scaled_mm's fast FP8 accumulation")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    if a.layers is not None and a.layers < 1:
        p.error("--layers must be >= 1")
    engines = {b.split("-")[0] if b.startswith(ONNX_BACKENDS) else "aoti" if b == "aoti" else "torch"
               for b in a.backends if b in BACKENDS}  # the runtime backend each row runs on; auto/all: torch's
    a.device = harness.resolve_device(a.device, engines or ["torch"])
    if a.repeats < 1 or a.warmup < 0 or a.fp8_calibration_batches < 1:
        p.error("--repeats and --fp8-calibration-batches must be >= 1 and --warmup >= 0")
    cfg = StepConfig(preset=a.preset, layers=a.layers, frames=a.frames, height=a.height, width=a.width,
                     device=a.device, backends=tuple(a.backends), warmup=a.warmup, repeats=a.repeats,
                     threads=a.threads, seed=a.seed, tf32=a.tf32, baseline_key_mask=a.baseline_key_mask,
                     cache_dir=a.cache_dir, fp8_scales=a.fp8_scales,
                     fp8_calibration_batches=a.fp8_calibration_batches, cuda_graph=not a.no_cuda_graph,
                     compile=a.compile, fast_accum=a.fast_accum)
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    cfg, as_json = parse_args(argv)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    rep = run(cfg)
    if as_json:
        print(harness.dump_json(rep))
    else:
        print_table(rep)
    ok = [r for r in rep["backends"] if r["status"] == "ok"]
    return 0 if ok and all(math.isfinite(r["ms_per_step"]) for r in ok) else 1


if __name__ == "__main__":
    sys.exit(main())
