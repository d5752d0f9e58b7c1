"""One DiT sampling step per backend, side by side in one run (issue 6).

A step is one DiT forward over the three guidance streams batched (B = 3: no text / no
reference, no text / reference, text / reference) on the bucket's video + reference tokens.
Every backend gets the same seeded weights, the same inputs (already on the device: host
copies are not timed), fp32 (TF32 off unless --tf32), the same thread count. Engines are
built first into a temporary folder (build time reported, never timed), then each backend is
loaded, warmed up and timed in turn; its output is checked against the PyTorch path.

    python benchmarks/dit_step.py                           # tiny preset, CPU
    python benchmarks/dit_step.py --backends all --json     # adds AOTInductor (slow to compile)
    python benchmarks/dit_step.py --device cuda --preset ltx2-video --layers 4   # 768x512x121

Backends: ltx-eager (baseline: ltx-core's `LTXModel` as users call it today, RoPE recomputed
from positions every call), stdrc-torch (`STDRCTransformer` with the bucket's baked RoPE
tables), onnxruntime (the runtime's `OrtEngine`; CUDA EP with IO binding on --device cuda),
torch-export (`torch.export` .pt2), aoti (AOTInductor .pt2), tensorrt (when it imports, on
CUDA only). With --layers below the preset's depth, full-depth times are scaled by FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import harness
import numpy as np

BASELINE = "ltx-eager"
BACKENDS = ("ltx-eager", "stdrc-torch", "onnxruntime", "torch-export", "aoti", "tensorrt")
BUILT = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "torch-export": "torch", "aoti": "aoti"}
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
    build: object  # stdrc.export.build.BuildConfig (cache dir, seed, layout)
    module: object  # BakedRopeDiT: the stdrc-torch path, and what every engine is built from
    positions: object  # (1, 3, N, 2) pixel-space positions, for the baseline
    feeds: dict[str, np.ndarray]
    work: Path


def make_setup(cfg: StepConfig, work: Path) -> Setup:
    from stdrc.export.build import BuildConfig, bucket_for
    from stdrc.export.config import get_preset
    from stdrc.export.dit import BakedRopeDiT, build_dit
    from stdrc.export.models import ModelSet, config_hash
    from stdrc.export.specs import component_specs

    preset = get_preset(cfg.preset)
    full_layers = preset.dit.num_layers
    if cfg.layers is not None:
        preset = preset.with_dit(num_layers=cfg.layers)
    dit = build_dit(preset.dit, seed=cfg.seed)
    # DiT only (ltx2-video's text side needs real Gemma weights); the source hash is load_models',
    # so a build_engines run sharing --cache-dir reuses the exported dit.onnx.
    models = ModelSet(preset, dit, None, None, None, None, config_hash(preset, cfg.seed), None)
    build = BuildConfig(preset=preset.name, frames=cfg.frames, height=cfg.height, width=cfg.width,
                        out=work / "bundle", cache_dir=cfg.cache_dir or work / "cache", seed=cfg.seed,
                        progress=False)
    bucket = bucket_for(build, models)
    positions, tables = models.rope(bucket)
    module = BakedRopeDiT(dit, tables.cos, tables.sin).eval()
    spec = component_specs(preset, bucket)["dit"]
    feeds = spec.sample_inputs(cfg.seed, batch=STREAMS)
    return Setup(cfg, full_layers, models, bucket, spec, build, module, positions, feeds, work)


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
    return None


def build(name: str, s: Setup, stack: contextlib.ExitStack) -> tuple[object, Path]:
    """One DiT engine through build_engines' own per-component builder, in its own folder."""
    from stdrc.engines.bundle import BundleWriter
    from stdrc.export.build import build_component

    writer = stack.enter_context(BundleWriter(s.work / name))
    with contextlib.redirect_stdout(sys.stderr):  # exporters print; keep --json output clean
        entry = build_component(s.build, BUILT[name], s.models, s.bucket, s.spec, s.module, writer)
    return entry, writer.staging


# -- loading each backend ---------------------------------------------------------------------

class Loaded(NamedTuple):
    call: Callable[[], object]
    to_numpy: Callable[[object], np.ndarray]  # the call's result -> velocity [B, N, C] float32
    close: Callable[[], None] = lambda: None  # frees what the engine holds (TensorRT device buffers)


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
    if name == "ltx-eager":
        from ltx_core.guidance.perturbations import BatchedPerturbationConfig
        from ltx_core.model.transformer.modality import Modality

        ltx = s.module.dit.ltx
        mask = None
        if cfg.baseline_key_mask:  # ltx-core takes a dense (B, N, N) mask: key j visible to every query
            mask = inputs["attn_mask"][:, None, :].expand(-1, n, -1).float()
        video = Modality(
            latent=inputs["latent"], sigma=inputs["timestep"][:, 0], timesteps=inputs["timestep"],
            positions=s.positions.to(cfg.device).expand(STREAMS, -1, -1, -1), context=inputs["context"],
            context_mask=inputs["context_mask"], attention_mask=mask,
        )
        perturbations = BatchedPerturbationConfig.empty(STREAMS)
        return Loaded(lambda: ltx(video=video, audio=None, perturbations=perturbations)[0], _tensor)
    if name == "stdrc-torch":
        return Loaded(lambda: s.module(*args), _tensor)
    if name == "onnxruntime":
        from stdrc.runtime.backends.onnxruntime import OrtEngine

        engine = OrtEngine(folder / entry.file, entry, device=cfg.device, threads=cfg.threads or 0)
        if cfg.device == "cuda":
            return _ort_cuda(engine, s.feeds, cfg.tf32)
        return Loaded(lambda: engine.run(s.feeds), lambda out: out["velocity"])
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
    if name in ("ltx-eager", "stdrc-torch", "torch-export", "aoti"):
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
    # the baseline without --baseline-key-mask sees the reference in every stream: compare the streams
    # whose keys are all visible anyway
    rows = s.feeds["attn_mask"].all(axis=1) if name == BASELINE and not cfg.baseline_key_mask else slice(None)
    row["max_abs_diff"] = float(np.abs(out[rows] - reference[rows]).max())
    row["max_abs_ref"] = float(np.abs(reference[rows]).max())
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
        for name in sorted(names, key=lambda n: n not in ("onnxruntime", "tensorrt")):
            reason = skip_reason(name, cfg)
            if reason:
                results[name] = {"status": "skipped", "reason": reason}
            elif name in BUILT:
                start = time.perf_counter()
                try:
                    built[name] = build(name, s, stack)
                    results[name] = {"status": "ok", "build_s": time.perf_counter() - start}
                except Exception as e:  # noqa: BLE001 -- a backend that cannot build is reported, not fatal
                    results[name] = {"status": "failed", "reason": f"build: {_error(e)}"}
            else:
                results[name] = {"status": "ok", "build_s": 0.0}
        s.module.to(cfg.device)
        with torch.inference_mode():
            args = [torch.from_numpy(s.feeds[t.name]).to(cfg.device) for t in s.spec.inputs]
            reference = _tensor(s.module(*args))
            del args
        for name in names:
            if results[name]["status"] != "ok":
                continue
            try:
                results[name].update(measure(name, s, built.get(name), reference))
            except Exception as e:  # noqa: BLE001 -- likewise at run time
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
    peak = (device["peak_tflops"] or {}).get("tf32" if cfg.tf32 else "fp32")
    base = results.get(BASELINE, {}).get("timing")
    rows = []
    for name in names:
        r = results[name]
        row = {"name": name, "status": r["status"], "reason": r.get("reason"), "ms_per_step": None,
               "ms_min": None, "ms_median": None, "ratio_to_baseline": None, "speedup": None,
               "tokens_per_s": None, "tflops": None, "pct_of_peak": None, "peak_mem_mb": None,
               "mem_added_mb": None, "mem_source": r.get("mem_source"), "build_s": r.get("build_s"),
               "est_full_depth_ms": None, "max_abs_diff": r.get("max_abs_diff"),
               "max_abs_reference": r.get("max_abs_ref"), "times_ms": None}
        t = r.get("timing")
        if t is not None:
            seconds = t.median_ms / 1e3
            row.update(ms_per_step=t.median_ms, ms_min=t.min_ms, ms_median=t.median_ms,
                       times_ms=list(t.times_ms), tokens_per_s=STREAMS * b.tokens / seconds,
                       tflops=flops / seconds / 1e12, peak_mem_mb=r["peak_mem_mb"],
                       mem_added_mb=r["mem_added_mb"], est_full_depth_ms=t.median_ms * full_flops / flops)
            row["pct_of_peak"] = None if peak is None else 100 * row["tflops"] / peak
            if base is not None:
                row["ratio_to_baseline"] = t.median_ms / base.median_ms
                row["speedup"] = base.median_ms / t.median_ms
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
            "peak_tflops_used": peak, "timing": "median of repeats after warm-up; inputs on the device",
        },
        "versions": harness.versions(),
        "backends": rows,
    }


def print_table(rep: dict) -> None:
    c, dev = rep["config"], rep["device"]
    where = f"{dev['name']} ({dev['cores']} cores)" if dev["kind"] == "cpu" else dev["name"]
    print(f"DiT step, preset {rep['preset']}: {c['layers']} of {c['full_layers']} layers, "
          f"{c['frames']}x{c['height']}x{c['width']} -> {c['video_tokens']} video + {c['reference_tokens']} "
          f"reference tokens, text {c['text_length']}, batch {c['batch']} guidance streams, fp32"
          f"{' (TF32 on)' if c['tf32'] else ''}")
    print(f"device {c['device']}: {where}, {c['threads']} threads; "
          f"warm-up {c['warmup']}, repeats {c['repeats']}; "
          f"{c['flops_per_step'] / 1e9:.3g} GFLOP per step")
    load = c.get("load_average") or {}
    print(f"load average (1/5/15 min): {load.get('start')} at start, {load.get('end')} at end")
    if c["depth_reduced"]:
        print(f"reduced depth: 'full ms' scales each time by FLOPs to {c['full_layers']} layers "
              f"(x{c['flops_per_step_full_depth'] / c['flops_per_step']:.2f})")
    head = (f"{'backend':<13} {'min ms':>9} {'median ms':>10} {'ratio':>6} {'tokens/s':>10} {'TFLOP/s':>8} "
            f"{'%peak':>6} {'peak MB':>8} {'+MB':>7} {'build s':>7} {'max|diff|':>9}")
    if c["depth_reduced"]:
        head += f" {'full ms':>9}"
    print(head)
    for r in rep["backends"]:
        if r["status"] != "ok":
            print(f"{r['name']:<13} {r['status']}: {r['reason']}")
            continue
        f = harness.fmt
        line = (f"{r['name']:<13} {f(r['ms_min'], '9.3f')} {f(r['ms_median'], '10.3f')} "
                f"{f(r['ratio_to_baseline'], '6.2f')} {f(r['tokens_per_s'], '10.0f')} "
                f"{f(r['tflops'], '8.4f')} "
                f"{f(r['pct_of_peak'], '6.1f')} {f(r['peak_mem_mb'], '8.0f')} {f(r['mem_added_mb'], '7.0f')} "
                f"{f(r['build_s'], '7.1f')} {f(r['max_abs_diff'], '9.1e')}")
        if c["depth_reduced"]:
            line += f" {f(r['est_full_depth_ms'], '9.1f')}"
        print(line)
    v = rep["versions"]
    print(f"ratio = median / {BASELINE} median (lower is faster); max|diff| vs stdrc-torch"
          f"{'' if c['baseline_key_mask'] else f' ({BASELINE}: streams with the reference visible)'}")
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
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
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
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    if a.layers is not None and a.layers < 1:
        p.error("--layers must be >= 1")
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    cfg = StepConfig(preset=a.preset, layers=a.layers, frames=a.frames, height=a.height, width=a.width,
                     device=a.device, backends=tuple(a.backends), warmup=a.warmup, repeats=a.repeats,
                     threads=a.threads, seed=a.seed, tf32=a.tf32, baseline_key_mask=a.baseline_key_mask,
                     cache_dir=a.cache_dir)
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
