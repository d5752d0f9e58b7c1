"""End-to-end generation time by stage, and memory over many generations in one process (issue 6).

    python benchmarks/generate.py                          # builds the tiny bundle (ONNX Runtime), CPU
    python benchmarks/generate.py --bundle bundles/tiny --repeats 5 --json
    python benchmarks/generate.py --repeat-generations 20  # RSS after each of 20 generations
    python benchmarks/generate.py --device cuda            # tiny bundle on the ONNX Runtime CUDA EP

Stage mode times the stages `Pipeline.generate` runs, one by one through the pipeline's own
methods (a test checks the result equals `generate`'s): text (prompt embeddings; the prompt
misses the cache on every repeat, the empty negative prompt is cached after the first
generation, as in real use), reference_prep (crop / resize), reference_encode (VAE encoder),
sampling (every DiT call with guidance and Euler steps), decode (VAE decoder), write (mp4 +
contact sheet), and facesim when --face-crop is on. One warm-up generation, then --repeats;
min and median per stage. Bundle build and load are reported, never timed as stages.

Repeat mode runs `Pipeline.generate` N times in one process (same prompt, seed i) and records
the RSS after each (after a gc.collect()), to show memory stays flat: first, last, slope.

Fast-path mode (--fast-path-gate) generates the same seed and prompt three times: with the
bundle's DiT engine, then with the PyTorch fast path (export/fast_path.py) in bf16 and in FP8
(CUDA graphs on --device cuda), swapped in as the pipeline's DiT. It reports the sampling time
of each beside frame PSNR; the FP8 quality gate is PSNR(FP8 frames, bf16 frames) >=
--gate-min-psnr (exit status 1 when it fails). It needs torch and the bundle's PyTorch
weights (the seeded preset, or --checkpoint); FP8 scales come from --fp8-scales, the
bundle's fp8_scales.json, or a calibration run here.

Two-stage mode (--stages 1 2, issue 27; benchmarks/two_stage.py): the same seed and output size with one
stage and with two, side by side: engine time per stage, wall time, DiT FLOPs and their ratios; without
--bundle also the bytes of a one-stage vs a two-stage bundle against the issue's bound, and the FLOP
projection for the full model at 768x512x121, 30 steps.

Without --bundle the tiny bundle is built in a child process, so this process holds the
runtime only (no torch on the ONNX Runtime path), as a user's would.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import harness
import numpy as np

from stdrc.runtime.vocab import BACKENDS

STAGES = ("text", "reference_prep", "reference_encode", "sampling", "decode", "write", "facesim")
PROMPT = "a woman smiling at the camera, soft window light"
TWO_STAGE_BUCKET = "9x256x256"  # FRAMESxWIDTHxHEIGHT, multiples of 64: the stage-1 grid is 9x128x128
_BUILD = ("import sys; from pathlib import Path; from stdrc.engines.build import BuildConfig, build_engines; "
          "build_engines(BuildConfig(preset=sys.argv[1], backend=sys.argv[2], out=Path(sys.argv[3]), "
          "cache_dir=Path(sys.argv[4]), progress=False))")


@dataclass(frozen=True)
class GenerateConfig:
    bundle: Path | None = None  # None: build the tiny bundle into a temporary folder
    backend: str = "onnxruntime"  # for the built bundle
    device: str = "cpu"
    steps: int | None = None  # None: the bundle's
    distilled: bool = False
    max_batch: int = 3
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    reference: Path | None = None  # None: a seeded synthetic image (no face: use without --face-crop)
    face_crop: bool = False
    repeat_generations: int = 0  # > 0: memory mode
    cache_dir: Path | None = None
    fast_path_gate: bool = False  # fast-path mode
    checkpoint: Path | None = None  # fast-path mode: the weights the bundle was built from
    fp8_scales: Path | None = None  # fast-path mode: else the bundle's, else calibrated here
    fp8_calibration_prompts: int = 4
    gate_min_psnr: float = 30.0  # dB; a convention for "visually close", not a published figure
    trust_bundle_code: bool = False  # a given torch/aoti --bundle runs code when loaded; one built here is ours
    stages: tuple[int, ...] = ()  # two-stage mode: these stage counts side by side (1 2)
    bucket: str = TWO_STAGE_BUCKET  # two-stage mode without --bundle: the bucket both bundles are built for
    preset: str = "tiny"  # two-stage mode without --bundle: tiny, or a full-width preset at `layers` deep
    layers: int = 1  # two-stage mode, a full-width preset: DiT blocks of its synthetic checkpoint


def synthetic_reference(seed: int, size: int = 256) -> np.ndarray:
    """A smooth seeded RGB image: something for the VAE encoder to encode, not a face."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * 200 + 20
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def build_tiny_bundle(out: Path, backend: str, cache_dir: Path) -> float:
    """build_engines in a child process (keeps torch out of this one); seconds taken."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _BUILD, "tiny", backend, str(out), str(cache_dir)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"building the tiny bundle failed (exit {done.returncode}):\n{tail}")
    return time.perf_counter() - start


@contextlib.contextmanager
def stage(times: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    times[name] = (time.perf_counter() - start) * 1e3


def staged_generation(pipe, reference, prompt: str, seed: int, cfg: GenerateConfig,
                      output: Path) -> tuple[dict[str, float], dict, object]:
    """What `Pipeline.generate` does, stage by stage: (ms per stage, DiT call facts, result)."""
    from stdrc.runtime import sampler as smp
    from stdrc.runtime.pipeline import GenerationResult

    g, b = pipe.manifest.guidance, pipe.bucket
    scales = smp.GuidanceScales(text=g.text_scale, ref=g.ref_scale)
    sigmas = pipe.sigmas(cfg.steps, cfg.distilled)
    times: dict[str, float] = {}
    calls: list[float] = []

    def denoiser(**feeds: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        velocity = pipe.denoiser(**feeds)
        calls.append((time.perf_counter() - start) * 1e3)
        return velocity

    with stage(times, "text"):
        pipe.prompts.fill([prompt, ""])  # Gemma, then the head, once for both
        text, no_text = pipe.prompts(prompt), pipe.prompts("")
    with stage(times, "reference_prep"):
        image = pipe.prepare_reference(reference, cfg.face_crop)
    with stage(times, "reference_encode"):
        ref_tokens = pipe.encode_reference(image)
    channels = pipe.manifest.model_config.dit.in_channels
    noise = np.random.default_rng(seed).standard_normal((1, b.video_tokens, channels), dtype=np.float32)
    with stage(times, "sampling"):
        latent = smp.sample(denoiser, noise, sigmas, smp.Conditioning(ref_tokens, text, no_text), scales,
                            cfg.max_batch, feed_sigma=pipe.feeds_sigma)
    with stage(times, "decode"):
        frames = pipe.decode(latent, seed)
    result = GenerationResult(frames=frames, latent=latent, reference=image)
    with stage(times, "write"):
        pipe.write(result, output)
    if cfg.face_crop and "face_encoder" in pipe.engines:
        with stage(times, "facesim"):
            pipe.facesim(frames, image)
    dit = {"steps": len(sigmas) - 1, "dit_calls": len(calls), "dit_ms_total": sum(calls),
           "dit_ms_median": float(np.median(calls)) if calls else None}
    return times, dit, result


def _memory_now(device: str) -> dict:
    out = {"rss_mb": harness.rss_mb()}
    if device == "cuda":
        out["gpu_used_mb"] = harness.gpu_used_mb()
    return out


def stage_mode(pipe, reference, cfg: GenerateConfig, out_dir: Path) -> dict:
    output = out_dir / "bench.mp4"
    for i in range(cfg.warmup):
        staged_generation(pipe, reference, f"{PROMPT} (warm-up {i})", cfg.seed, cfg, output)
    harness.reset_peak_rss()
    before = _memory_now(cfg.device)
    runs, dits = [], []
    for i in range(cfg.repeats):
        times, dit, _ = staged_generation(pipe, reference, f"{PROMPT} ({i})", cfg.seed + i, cfg, output)
        runs.append(times)
        dits.append(dit)
    names = [s for s in STAGES if s in runs[0]]
    stages = {s: harness.Timing(tuple(r[s] for r in runs)).to_json() for s in names}
    totals = harness.Timing(tuple(sum(r.values()) for r in runs))
    memory = {"before": before, "peak_rss_mb": harness.peak_rss_mb(), "after": _memory_now(cfg.device),
              "source": "process RSS high-water (VmHWM) over the timed generations; "
                        "GPU: device memory in use"}
    dit = {"steps": dits[0]["steps"], "dit_calls": dits[0]["dit_calls"],
           "dit_ms_median": float(np.median([d["dit_ms_median"] for d in dits])),
           "note": "DiT calls as the pipeline makes them: numpy in and out, host copies included"}
    overhead = float(np.median([r["sampling"] - d["dit_ms_total"] for r, d in zip(runs, dits)]))
    return {"stages_ms": stages, "total_ms": totals.to_json(), "dit": dit, "sampling_overhead_ms": overhead,
            "memory": memory}


def _slope(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


def repeat_mode(pipe, reference, cfg: GenerateConfig, out_dir: Path) -> dict:
    """`generate` N times in one process; RSS (and GPU memory) after each; then the first seed again.

    The last generation repeats the first one's seed: its frames must be byte-identical (no state
    leaks from one generation into the next).
    """
    output = out_dir / "repeat.mp4"
    rss, gpu, seconds, digests = [], [], [], []
    for i in [*range(cfg.repeat_generations), 0]:
        start = time.perf_counter()
        result = pipe.generate(reference, prompt=PROMPT, seed=cfg.seed + i, steps=cfg.steps, distilled=cfg.distilled,
                               max_batch=cfg.max_batch, face_crop=cfg.face_crop, output=output)
        seconds.append(time.perf_counter() - start)
        digests.append(hashlib.sha256(result.frames.tobytes()).hexdigest())
        gc.collect()
        now = _memory_now(cfg.device)
        rss.append(now["rss_mb"])
        if "gpu_used_mb" in now:
            gpu.append(now["gpu_used_mb"])
    rss, seconds, same = rss[:-1], seconds[:-1], digests[-1] == digests[0]
    out = {
        "generations": cfg.repeat_generations, "rss_mb": rss, "first_mb": rss[0], "last_mb": rss[-1],
        "max_mb": max(rss), "growth_mb": rss[-1] - rss[0],
        "slope_mb_per_generation": _slope(rss), "slope_after_first_mb_per_generation": _slope(rss[1:]),
        "seconds": [round(s, 4) for s in seconds],
        "same_seed_identical_frames": same, "frames_sha256_first": digests[0],
        "note": "RSS read after each generation and a gc.collect(); same prompt, seed + i; then seed + 0 "
                "again, compared byte for byte with the first",
    }
    if gpu:
        out.update(gpu_used_mb=gpu[:-1], gpu_slope_mb_per_generation=_slope(gpu[:-1]))
    return out


def _pytorch_models(pipe, cfg: GenerateConfig):
    """The bundle's weights as PyTorch modules, checked by the source hash the bundle records."""
    from stdrc.export.models import load_models

    m = pipe.manifest
    models = load_models(m.preset, cfg.checkpoint, seed=m.model_config.seed)
    if models.source_sha256 != m.created_by.source_sha256:
        raise RuntimeError("the PyTorch weights are not the bundle's (source sha256 differs): "
                           "pass --checkpoint with the file the bundle was built from")
    return models


def _fp8_scales(pipe, models, cfg: GenerateConfig) -> tuple[dict[str, float], str]:
    from stdrc.export.fast_path import load_fp8_scales

    if cfg.fp8_scales is not None:
        return load_fp8_scales(cfg.fp8_scales), str(cfg.fp8_scales)
    if "fp8_scales.json" in pipe.manifest.components["dit"].extra_files:
        return load_fp8_scales(pipe.bundle_dir / "fp8_scales.json"), "the bundle's fp8_scales.json"
    from stdrc.calibration.fp8 import amax_scales
    from stdrc.calibration.report import calibrate_dit_fp8

    with contextlib.redirect_stdout(sys.stderr):
        qdit, _ = calibrate_dit_fp8(models, pipe.bucket, pipe.manifest.rope.layout,
                                    cfg.fp8_calibration_prompts)
    return amax_scales(qdit), f"calibrated here (modelopt max, {cfg.fp8_calibration_prompts} prompts)"


def fast_path_mode(pipe, reference, cfg: GenerateConfig, out_dir: Path) -> dict:
    """Same seed and prompt through the bundle's engine, the bf16 and the FP8 fast path: time and PSNR."""
    import torch

    from stdrc.export.fast_path import FastPathOptions, prepare_fast_dit
    from stdrc.runtime.backends.torch import TorchEngine
    from stdrc.runtime.video import psnr

    models = _pytorch_models(pipe, cfg)
    scales, source = _fp8_scales(pipe, models, cfg)
    rope = np.load(pipe.bundle_dir / pipe.manifest.rope.file)
    cos, sin = torch.from_numpy(rope["cos"]), torch.from_numpy(rope["sin"])
    graph = cfg.device == "cuda"
    variants = {"engine": None, "bf16": FastPathOptions(cuda_graph=graph),
                "fp8": FastPathOptions(fp8=True, cuda_graph=graph)}
    engine, rows, frames = pipe.engines["dit"], {}, {}
    try:
        for name, options in variants.items():
            start = time.perf_counter()
            if options is not None:
                module = prepare_fast_dit(models.dit, cos, sin, options, scales if options.fp8 else None,
                                          device=cfg.device)
                pipe.engines["dit"] = TorchEngine(module, engine.entry, cfg.device)
            prepare_s = time.perf_counter() - start
            runs = [staged_generation(pipe, reference, PROMPT, cfg.seed, cfg, out_dir / f"{name}.mp4")
                    for _ in range(cfg.warmup + cfg.repeats)][cfg.warmup:]
            frames[name] = runs[-1][2].frames
            rows[name] = {"dit": engine.entry.backend if options is None else f"torch fast path {name}",
                          "prepare_s": None if options is None else prepare_s,
                          "sampling_ms": harness.Timing(tuple(r[0]["sampling"] for r in runs)).to_json(),
                          "dit_ms_median": float(np.median([r[1]["dit_ms_median"] for r in runs])),
                          "dit_calls": runs[0][1]["dit_calls"]}
    finally:
        pipe.engines["dit"] = engine
    for name in ("bf16", "fp8"):
        rows[name]["frame_psnr_db_vs_engine"] = float(psnr(frames[name], frames["engine"]))
    gate = float(psnr(frames["fp8"], frames["bf16"]))
    return {"variants": rows, "fp8_scales": source, "cuda_graph": graph,
            "gate": {"metric": "frame PSNR of the FP8 fast path vs the bf16 fast path, same seed and prompt",
                     "psnr_db": gate, "min_db": cfg.gate_min_psnr, "passed": gate >= cfg.gate_min_psnr}}


def bundle_facts(pipe) -> dict:
    m, b = pipe.manifest, pipe.bucket
    return {
        "preset": m.preset, "frames": b.frames, "height": b.height, "width": b.width, "fps": b.fps,
        "video_tokens": b.video_tokens, "reference_tokens": b.reference_tokens, "text_length": b.text_length,
        "dit_layers": m.model_config.dit.num_layers,
        "components": {k: {"backend": e.backend, "precision": e.precision} for k, e in m.components.items()},
        "default_steps": m.sampler.steps, "guidance": m.guidance.to_json(),
    }


def run(cfg: GenerateConfig) -> dict:
    from stdrc.runtime.pipeline import Pipeline

    load_start = harness.load_average()
    with tempfile.TemporaryDirectory(prefix="stdrc-generate-") as tmp:
        tmp = Path(tmp)
        bundle, build_s, pair = cfg.bundle, None, None
        if bundle is None and cfg.stages:
            import two_stage

            pair = two_stage.build_pair(cfg.preset, cfg.bucket, tmp, cfg.cache_dir or tmp / "cache", cfg.layers)
            bundle, build_s = Path(pair["bundles"]["two_stage"]), pair["build_s"]["two_stage"]
        elif bundle is None:
            bundle = tmp / "bundle"
            build_s = build_tiny_bundle(bundle, cfg.backend, cfg.cache_dir or tmp / "cache")
        start = time.perf_counter()
        pipe = Pipeline.from_bundle(bundle, device=cfg.device, trust_code=cfg.bundle is None or cfg.trust_bundle_code)
        pipe.engines.warm()  # engines open on first use: the load time includes opening them
        load_s = time.perf_counter() - start
        reference = cfg.reference if cfg.reference is not None else synthetic_reference(cfg.seed)
        rep = {
            "benchmark": "generate",
            "mode": ("repeat" if cfg.repeat_generations else "fast_path" if cfg.fast_path_gate
                     else "two_stage" if cfg.stages else "stages"),
            "timestamp": harness.timestamp(),
            "device": harness.device_info(cfg.device),
            "preset": pipe.manifest.preset,
            "config": {
                "bundle": str(cfg.bundle) if cfg.bundle else None,
                "built_backend": None if cfg.bundle else cfg.backend, "device": cfg.device,
                "steps": cfg.steps if cfg.steps is not None else pipe.manifest.sampler.steps,
                "distilled": cfg.distilled, "max_batch": cfg.max_batch, "warmup": cfg.warmup,
                "repeats": cfg.repeats, "seed": cfg.seed, "face_crop": cfg.face_crop,
                "reference": str(cfg.reference) if cfg.reference else "synthetic 256x256 (no face)",
                "repeat_generations": cfg.repeat_generations,
                "fast_path_gate": cfg.fast_path_gate,
                "gate_min_psnr": cfg.gate_min_psnr if cfg.fast_path_gate else None,
            },
            "bundle": bundle_facts(pipe),
            "build_s": build_s, "load_s": load_s,
            "versions": harness.versions(),
        }
        if cfg.repeat_generations:
            rep["repeat"] = repeat_mode(pipe, reference, cfg, tmp)
        elif cfg.fast_path_gate:
            rep["fast_path"] = fast_path_mode(pipe, reference, cfg, tmp)
        elif cfg.stages:
            import two_stage

            rep["config"]["stages"] = list(cfg.stages)
            rep["two_stage"] = two_stage.compare(pipe, reference, cfg.stages, cfg.seed, cfg.warmup, cfg.repeats,
                                                 PROMPT, tmp, cfg.steps)
            if pair is not None:
                rep["two_stage"]["bytes"] = two_stage.bytes_check(Path(pair["bundles"]["one_stage"]), bundle,
                                                                  pair["files"])
            rep["two_stage"]["projection"] = two_stage.projection()
        else:
            rep.update(stage_mode(pipe, reference, cfg, tmp))
        del pipe
    rep["config"]["load_average"] = {"start": load_start, "end": harness.load_average()}
    return rep


def print_report(rep: dict) -> None:
    c, b, dev = rep["config"], rep["bundle"], rep["device"]
    where = f"{dev['name']} ({dev['cores']} cores)" if dev["kind"] == "cpu" else dev["name"]
    backends = sorted({e["backend"] for e in b["components"].values()})
    print(f"generate, preset {b['preset']}: {b['frames']}x{b['height']}x{b['width']}, "
          f"{b['dit_layers']} DiT layers, "
          f"{c['steps']} steps, max batch {c['max_batch']}, {'/'.join(backends)} on {c['device']}: {where}")
    print(f"bundle built in {harness.fmt(rep['build_s'], '.1f')} s, loaded in {rep['load_s']:.2f} s "
          f"(not in the stage times); load average {c['load_average']}")
    if rep["mode"] == "repeat":
        r = rep["repeat"]
        print(f"{r['generations']} generations in one process, RSS MB after each: "
              + " ".join(f"{x:.0f}" for x in r["rss_mb"]))
        print(f"first {r['first_mb']:.1f} MB, last {r['last_mb']:.1f} MB, max {r['max_mb']:.1f} MB, "
              f"growth {r['growth_mb']:+.1f} MB, slope {harness.fmt(r['slope_mb_per_generation'], '+.3f')} "
              f"MB/generation ({harness.fmt(r['slope_after_first_mb_per_generation'], '+.3f')} "
              "after the first)")
        print(f"seed {c['seed']} again after {r['generations']} generations: frames "
              f"{'byte-identical' if r['same_seed_identical_frames'] else 'DIFFERENT'}")
        return
    if rep["mode"] == "fast_path":
        print_fast_path(rep["fast_path"], c)
        return
    if rep["mode"] == "two_stage":
        import two_stage

        print(f"stages {' vs '.join(map(str, c['stages']))}, seed {c['seed']}, warm-up {c['warmup']}, "
              f"repeats {c['repeats']}")
        two_stage.print_two_stage(rep)
        return
    print(f"warm-up {c['warmup']}, repeats {c['repeats']}; ms per stage")
    print(f"{'stage':<17} {'min ms':>10} {'median ms':>10}")
    for name, t in rep["stages_ms"].items():
        print(f"{name:<17} {t['min']:>10.2f} {t['median']:>10.2f}")
    print(f"{'total':<17} {rep['total_ms']['min']:>10.2f} {rep['total_ms']['median']:>10.2f}")
    d = rep["dit"]
    print(f"sampling: {d['dit_calls']} DiT calls for {d['steps']} steps, "
          f"median {harness.fmt(d['dit_ms_median'], '.2f')} ms per call (numpy in and out); "
          f"guidance + Euler + stream batching {harness.fmt(rep['sampling_overhead_ms'], '.2f')} ms")
    m = rep["memory"]
    print(f"memory: RSS {harness.fmt(m['before']['rss_mb'], '.0f')} MB before, peak "
          f"{harness.fmt(m['peak_rss_mb'], '.0f')} MB over the timed generations")
    v = rep["versions"]
    print(f"versions: onnxruntime {v['onnxruntime']}, numpy {v['numpy']}, stdrc {v['stdrc']}, "
          f"python {v['python']}")


def print_fast_path(f: dict, c: dict) -> None:
    print(f"fast path vs the bundle's DiT engine: seed {c['seed']}, warm-up {c['warmup']}, repeats "
          f"{c['repeats']}; CUDA graph {f['cuda_graph']}; FP8 scales: {f['fp8_scales']}")
    print(f"{'DiT':<26} {'sampling min ms':>15} {'median ms':>10} {'DiT call ms':>11} "
          f"{'PSNR vs engine dB':>17}")
    for row in f["variants"].values():
        print(f"{row['dit']:<26} {row['sampling_ms']['min']:>15.2f} {row['sampling_ms']['median']:>10.2f} "
              f"{row['dit_ms_median']:>11.2f} {harness.fmt(row.get('frame_psnr_db_vs_engine'), '17.2f')}")
    g = f["gate"]
    print(f"FP8 gate: {g['metric']}: {g['psnr_db']:.2f} dB (minimum {g['min_db']:.1f} dB): "
          f"{'passed' if g['passed'] else 'FAILED'}")


def parse_args(argv: list[str] | None = None) -> tuple[GenerateConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="engine bundle (default: build the tiny one)")
    p.add_argument("--preset", default="tiny",
                   help="preset to build when no --bundle is given: tiny, or with --stages a full-width preset "
                        "at --layers deep from benchmarks/synthetic.py's random real-layout files")
    p.add_argument("--layers", type=int, default=1,
                   help="--stages with a full-width --preset: DiT blocks of the synthetic checkpoint")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="backend of the built tiny bundle")
    harness.add_device_flag(p)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    p.add_argument("--distilled", action="store_true")
    p.add_argument("--max-batch", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref", type=Path, default=None, help="reference photo (default: synthetic, no face)")
    p.add_argument("--face-crop", action="store_true", help="detect and crop the face (needs a real photo)")
    p.add_argument("--repeat-generations", type=int, default=0, metavar="N",
                   help="memory mode: N generations in one process, RSS after each")
    p.add_argument("--cache-dir", type=Path, default=None, help="ONNX export cache for the build")
    p.add_argument("--fast-path-gate", action="store_true",
                   help="fast-path mode: bundle engine vs PyTorch fast path bf16 / FP8, time and frame PSNR")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="fast-path mode: the bundle's source checkpoint (default: the seeded preset)")
    p.add_argument("--fp8-scales", type=Path, default=None,
                   help="fast-path mode: fp8_scales.json (default: the bundle's, else calibrate here)")
    p.add_argument("--fp8-calibration-prompts", type=int, default=4)
    p.add_argument("--gate-min-psnr", type=float, default=30.0, help="fast-path mode: FP8 gate, dB vs bf16")
    p.add_argument("--trust-bundle-code", action="store_true",
                   help="allow a torch/aoti --bundle: loading one runs code from it (see README, Trust)")
    p.add_argument("--stages", type=int, nargs="+", default=[], choices=(1, 2),
                   help="two-stage mode: these stage counts side by side, same seed and size (e.g. --stages 1 2)")
    p.add_argument("--bucket", default=TWO_STAGE_BUCKET, metavar="FRAMESxWIDTHxHEIGHT",
                   help="two-stage mode without --bundle: the bucket of the bundles built (multiples of 64)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.bundle is None and a.preset != "tiny" and not a.stages:
        p.error(f"--preset {a.preset} needs real weights (a Gemma-3 text side): build its bundle with "
                "build-engines --checkpoint ... and pass --bundle (or compare --stages 1 2 on synthetic files)")
    if a.preset != "tiny" and a.stages and a.preset not in ("ltx2-video", "ltx23-video"):
        p.error(f"--stages with --preset {a.preset}: benchmarks/synthetic.py writes ltx2-video and ltx23-video "
                "files only; pick one, or tiny")
    if a.layers < 1:
        p.error("--layers must be >= 1")
    if a.repeats < 1 or a.warmup < 0 or a.repeat_generations < 0 or a.fp8_calibration_prompts < 1:
        p.error("--repeats and --fp8-calibration-prompts must be >= 1, "
                "--warmup and --repeat-generations >= 0")
    if sum(map(bool, (a.fast_path_gate, a.repeat_generations, a.stages))) > 1:
        p.error("--fast-path-gate, --repeat-generations and --stages are separate modes: pick one")
    a.device = harness.resolve_device(a.device, harness.bundle_backends(a.bundle) if a.bundle else [a.backend])
    cfg = GenerateConfig(bundle=a.bundle, backend=a.backend, device=a.device, steps=a.steps,
                         distilled=a.distilled, max_batch=a.max_batch, warmup=a.warmup, repeats=a.repeats,
                         seed=a.seed, reference=a.ref, face_crop=a.face_crop,
                         repeat_generations=a.repeat_generations, cache_dir=a.cache_dir,
                         fast_path_gate=a.fast_path_gate, checkpoint=a.checkpoint, fp8_scales=a.fp8_scales,
                         fp8_calibration_prompts=a.fp8_calibration_prompts, gate_min_psnr=a.gate_min_psnr,
                         trust_bundle_code=a.trust_bundle_code, stages=tuple(dict.fromkeys(a.stages)),
                         bucket=a.bucket, preset=a.preset, layers=a.layers)
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    cfg, as_json = parse_args(argv)
    rep = run(cfg)
    if as_json:
        print(harness.dump_json(rep))
    else:
        print_report(rep)
    return 1 if rep["mode"] == "fast_path" and not rep["fast_path"]["gate"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
