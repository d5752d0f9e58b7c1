"""Memory of one generation under each memory plan, and the projection for the full model (issue 18).

    python benchmarks/runtime_memory.py --json                       # builds the tiny bundle, CPU
    python benchmarks/runtime_memory.py --bundle bundles/ltx2-1layer --json
    python benchmarks/runtime_memory.py --device cuda --bundle DIR   # device memory instead of RSS
    python benchmarks/runtime_memory.py --projection-only --family ltx2.3 --json  # LTX-2.3's arithmetic

Each configuration (plan all / staged, prompt cached or not) runs in a child process of its own,
so its peak is its own: one generation (2 steps), then the process's RSS high-water mark (VmHWM)
on CPU, or the device memory in use (nvidia-smi) at its highest between stages on CUDA. The
baseline is the RSS before the generation, after the runtime is imported and ONNX Runtime has run
one session of a one-node graph (its own code and globals resident), with no engine open. Under
`staged` each stage is recorded too (RSS at its start, peak while loading, peak while running),
and `check` compares the peak over the baseline with the largest stage's weights plus its
activation estimate plus one session's allowance (runtime/memory.py: the plan's own numbers), and
each stage's own rise with its component's.

The projection for the full model counts parameters exactly (the family's full-size preset, ltx2-video
or ltx23-video: its DiT, text-side head (feature extractor + connector) and VAE built on the meta
device; Gemma-3 12B's text model from its published config: width 3840, 48 layers,
15360 feed-forward, 16 heads of 256, 8 KV heads, vocabulary 262208) and prices them in the engine
precision, with the activation estimates at 768x512x121, one session's SESSION_BYTES and a fixed
1 GiB for the CUDA context and workspace. It is arithmetic, not a measurement; docs/benchmarks.md shows it line by line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

from stdrc.runtime.vocab import FIXED_PLANS, REQUIRED_COMPONENTS, TEXT_COMPONENTS

GIB = 2**30
CONTEXT_BYTES = GIB  # CUDA context + cuBLAS/TensorRT workspace, a fixed allowance
FAMILY_PRESETS = {"ltx2": "ltx2-video", "ltx2.3": "ltx23-video"}  # the full-size preset of each family
_CHILD = r"""
import json, sys, numpy as np
sys.path.insert(0, sys.argv[6])
import harness
from stdrc.runtime.pipeline import Pipeline
bundle, plan, cache, ref, device = sys.argv[1:6]
harness.warm_onnxruntime(sys.argv[7], device)  # ORT's own code and globals: the baseline's, no engine's
pipe = Pipeline.from_bundle(bundle, memory_plan=plan, device=device, prompt_cache=None if cache == "-" else cache)
if cache != "-":
    pipe.encode_prompts(["a woman smiles and waves"])  # fill the store in an earlier process's place
    pipe = Pipeline.from_bundle(bundle, memory_plan=plan, device=device, prompt_cache=cache)
pipe.engines.warm()  # under "all", every engine resident before the measured generation
stages, peak = [], [0.0]

def on_stage(event, name):  # per stage: RSS at its start, peak while loading, peak while running
    peak[0] = max(peak[0], harness.peak_rss_mb())
    if event == "open":
        stages.append({"component": name, "rss_start_mb": harness.rss_mb()})
    else:
        stages[-1]["load_peak_mb" if event == "opened" else "run_peak_mb"] = harness.peak_rss_mb()
    harness.reset_peak_rss()

pipe.engines.on_stage = on_stage
harness.reset_peak_rss()
base = harness.rss_mb()
gpu = []
output = None if sys.argv[8] == "-" else sys.argv[8]  # the video too, for a caller that checks it
result = pipe.generate(reference=ref, prompt="a woman smiles and waves", seed=0, steps=2, face_crop=False,
                       output=output,
                       on_step=lambda i, n: gpu.append(harness.gpu_used_mb()) if device == "cuda" else None)
print(json.dumps({"peak_rss_mb": max(peak[0], harness.peak_rss_mb()), "rss_before_mb": base, "stages": stages,
                  "gpu_peak_mb": max([g for g in gpu if g is not None], default=None),
                  "text_opened": [n for n in getattr(pipe.engines, "opened", []) if n.startswith("text_")],
                  "frames_sha": __import__("hashlib").sha256(result.frames.tobytes()).hexdigest()}))
"""


def measure(bundle: Path, plan: str, cached: bool, device: str, work: Path, reference: Path,
            output: Path | None = None) -> dict:
    """One configuration in a child process of its own; `output`: the generation also writes its video there."""
    cache = str(work / f"prompts-{plan}") if cached else "-"
    warm = work / "warm.onnx"
    if not warm.is_file():
        harness.write_warm_model(warm)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), plan, cache, str(reference), device,
                          str(Path(__file__).parent), str(warm), str(output or "-")],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {"status": "failed", "reason": out.stderr.strip().splitlines()[-1] if out.stderr else "?"}
    return {"status": "ok", **json.loads(out.stdout.strip().splitlines()[-1])}


def staged_check(record: dict, bundle: Path, cached: bool) -> dict:
    """The staged property, measured: the run's peak RSS over its baseline (RSS before the generation, with
    the runtime and ONNX Runtime loaded and no engine open) against the largest stage's weights plus its
    activation estimate and one session's own allowance (the plan's own number, runtime/memory.py's
    memory_needs); and per stage, its own rise (its peak over the RSS at its start) against its
    component's weights + activations + that allowance. MiB throughout."""
    from stdrc.runtime.memory import SESSION_BYTES, memory_needs

    weights, acts = current_needs(bundle)
    budget = memory_needs(weights, acts, skip_text=cached).staged_peak_bytes / 2**20
    rise = record["peak_rss_mb"] - record["rss_before_mb"]
    stages = []
    for s in record.get("stages", []):
        c = s["component"]
        own = max(s.get("load_peak_mb", 0.0), s.get("run_peak_mb", 0.0)) - s["rss_start_mb"]
        need = (weights[c] + acts[c] + SESSION_BYTES) / 2**20
        stages.append({"component": c, "rise_mb": own, "weights_mb": weights[c] / 2**20,
                       "activations_mb": acts[c] / 2**20, "session_mb": SESSION_BYTES / 2**20,
                       "within": own <= need})
    return {"peak_over_baseline_mb": rise, "largest_component_plus_activations_mb": budget,
            "within": rise <= budget, "stages": stages}


def current_needs(bundle: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Weight bytes (the manifest's) and this runtime's activation estimates for the bundle's bucket (not
    the estimates recorded at build time, which an older build made with an older formula)."""
    from stdrc.runtime.manifest import read_manifest
    from stdrc.runtime.memory import activation_bytes
    from stdrc.runtime.pipeline import weights_and_activations

    manifest = read_manifest(bundle)
    weights, _ = weights_and_activations(bundle, manifest)
    m = manifest
    return weights, {n: activation_bytes(n, m.model_config, m.bucket, e.precision, m.decode)
                     for n, e in manifest.components.items()}


def bundle_needs(bundle: Path) -> dict:
    from stdrc.runtime.memory import memory_needs

    weights, acts = current_needs(bundle)
    return {"weight_bytes": weights, "activation_bytes": acts,
            "largest_component_plus_activations_mb": memory_needs(weights, acts).staged_peak_bytes / 2**20,
            "all_components_mb": sum(weights.values()) / 2**20}


def _meta_params(module_fn) -> dict[str, int]:
    import torch

    with torch.device("meta"):
        module = module_fn()
    return {n: p.numel() for n, p in module.named_parameters()}


def text_head_params(text) -> int:
    """The text side's own parameters (feature extractor + connector: the text_head engine, which follows
    Gemma's), built on the meta device. The feature extractor grows with Gemma's depth."""
    import torch

    from stdrc.export.text import TextSide

    return sum(_meta_params(lambda: TextSide(text, torch.nn.Identity())).values())


def family_params(family: str = "ltx2") -> dict[str, int]:
    """Parameter counts of a family's full-size preset on the meta device (nothing allocated): the DiT (48
    blocks), one block, the blocks' GEMM weights, Gemma-3 12B's text model and the text side's head."""
    from ltx_core.model.transformer.model_configurator import LTXVideoOnlyModelConfigurator
    from transformers import Gemma3TextConfig, Gemma3TextModel

    from stdrc.export.config import get_preset

    preset = get_preset(FAMILY_PRESETS[family])
    dit = _meta_params(lambda: LTXVideoOnlyModelConfigurator.from_config(preset.dit.ltx_config()))
    block_linear = sum(n for k, n in dit.items() if k.startswith("transformer_blocks.") and k.endswith(".weight")
                       and "norm" not in k and n > 4096 * 64)
    gemma_cfg = Gemma3TextConfig(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262208)
    return {"dit": sum(dit.values()),
            "dit_block": sum(n for k, n in dit.items() if k.startswith("transformer_blocks.0.")),
            "dit_block_gemm_weights": block_linear,
            "gemma3_12b_text": sum(_meta_params(lambda: Gemma3TextModel(gemma_cfg)).values()),
            "text_head": text_head_params(preset.text)}


def projected(frames: int = 121, height: int = 512, width: int = 768, family: str = "ltx2") -> dict:
    """Full-model GPU memory per plan, from exact parameter counts and the activation estimates."""
    from stdrc.export.config import get_preset
    from stdrc.export.vae import build_vae
    from stdrc.runtime.manifest import Bucket
    from stdrc.runtime.memory import SESSION_BYTES, activation_bytes
    from stdrc.runtime.schema import ModelConfig
    from stdrc.runtime.tiling import decode_tiling

    preset = get_preset(FAMILY_PRESETS[family])
    counts = family_params(family)
    block_linear = counts["dit_block_gemm_weights"]
    gemma, head = counts["gemma3_12b_text"], counts["text_head"]  # text_gemma and text_head: one stage each
    vae_enc, vae_dec = (sum(_meta_params(lambda i=i: build_vae(preset.vae, seed=None)[i]).values()) for i in (0, 1))
    bucket = Bucket(frames=frames, height=height, width=width, text_length=preset.text.max_length)
    tiling = decode_tiling(height, width, None, 64)
    # the preset's text config is Gemma-3 12B's (48 layers, 16 heads, feed-forward 15360), as a build writes it
    config = ModelConfig.of_preset(preset)
    acts = {c: activation_bytes(c, config, bucket, "fp16", tiling)
            for c in REQUIRED_COMPONENTS}
    dit_total = counts["dit"]
    weights = {
        "fp16": {"text_gemma": 2 * gemma, "text_head": 2 * head, "dit": 2 * dit_total, "vae_encoder": 2 * vae_enc,
                 "vae_decoder": 2 * vae_dec},
        # FP8 DiT: the transformer blocks' GEMM weights in 1 byte, everything else (sensitive layers) 16-bit
        "fp8": {"text_gemma": 2 * gemma, "text_head": 2 * head, "dit": block_linear + 2 * (dit_total - block_linear),
                "vae_encoder": 2 * vae_enc, "vae_decoder": 2 * vae_dec},
    }

    def peak(w: dict[str, int], plan: str, cached: bool) -> float:
        comps = [c for c in w if not (cached and c in TEXT_COMPONENTS)]
        if plan == "all":
            need = sum(w[c] for c in comps) + max(acts[c] for c in comps)
        else:
            need = max(w[c] + acts[c] for c in comps)
        return (need + SESSION_BYTES + CONTEXT_BYTES) / GIB

    return {
        "family": family,
        "bucket": {"frames": frames, "height": height, "width": width, "tokens": bucket.tokens},
        "parameters": {**counts, "vae_encoder": vae_enc, "vae_decoder": vae_dec},
        "weights_gib": {p: {c: v / GIB for c, v in w.items()} for p, w in weights.items()},
        "activations_gib": {c: v / GIB for c, v in acts.items()},
        "context_gib": CONTEXT_BYTES / GIB,
        "session_gib": SESSION_BYTES / GIB,
        "projected_gpu_gb": {
            "fp8_staged": peak(weights["fp8"], "staged", False),
            "fp8_staged_cached_prompt": peak(weights["fp8"], "staged", True),
            "fp16_staged": peak(weights["fp16"], "staged", False),
            "fp16_staged_cached_prompt": peak(weights["fp16"], "staged", True),
            "fp16_all": peak(weights["fp16"], "all", False),
            "fp8_all_cached_prompt": peak(weights["fp8"], "all", True),
        },
        "unit": "GiB (2**30 bytes), as a 24 GB card's 24 GiB",
    }


def run(bundle: Path | None, device: str, cached_modes: tuple[bool, ...] = (False, True),
        family: str = "ltx2") -> dict:
    with tempfile.TemporaryDirectory(prefix="stdrc-memory-") as tmp:
        work = Path(tmp)
        if bundle is None:
            bundle = work / "tiny"
            code = ("from pathlib import Path; from stdrc.engines.build import BuildConfig, build_engines; "
                    f"build_engines(BuildConfig(out=Path({str(bundle)!r}), cache_dir=Path({str(work / 'c')!r}), "
                    "progress=False))")
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=1800)
        import numpy as np
        from PIL import Image

        reference = work / "ref.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(reference)
        plans = {plan: {("cached_prompt" if c else "uncached_prompt"): measure(bundle, plan, c, device, work, reference)
                        for c in cached_modes} for plan in FIXED_PLANS}
        shas = {r.get("frames_sha") for p in plans.values() for r in p.values() if r["status"] == "ok"}
        for mode, r in plans["staged"].items():
            if r["status"] == "ok":
                r["check"] = staged_check(r, bundle, mode == "cached_prompt")
        return {"bundle": str(bundle), "device": device, "plans": plans, "identical_frames": len(shas) == 1,
                "needs": bundle_needs(bundle), "projected": projected(family=family),
                "machine": harness.device_info(device),
                "load_average": harness.load_average(), "versions": harness.versions()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="bundle to measure (default: build tiny)")
    harness.add_device_flag(p)
    p.add_argument("--projection-only", action="store_true", help="print the full-model projection only")
    p.add_argument("--family", default="ltx2", choices=tuple(FAMILY_PRESETS),
                   help="the model family whose full-size preset the projection counts")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not a.projection_only:
        a.device = harness.resolve_device(a.device, harness.bundle_backends(a.bundle) if a.bundle else ["onnxruntime"])
    rep = ({"projected": projected(family=a.family)} if a.projection_only
           else run(a.bundle, a.device, family=a.family))
    if a.json:
        print(harness.dump_json(rep))
        return 0
    if "plans" in rep:
        for plan, modes in rep["plans"].items():
            for mode, r in modes.items():
                print(f"{plan:<7} {mode:<16} " + (f"peak RSS {r['peak_rss_mb']:.0f} MB "
                                                  f"(before {r['rss_before_mb']:.0f}),"
                                                  f" text engines opened: {r['text_opened']}"
                                                  if r["status"] == "ok" else f"failed: {r['reason']}"))
                if "check" in r:
                    c = r["check"]
                    print(f"{'':<24} peak over baseline {c['peak_over_baseline_mb']:.0f} MB vs largest component + "
                          f"activations {c['largest_component_plus_activations_mb']:.0f} MB: "
                          f"{'within' if c['within'] else 'over'}")
        print(f"identical frames across plans: {rep['identical_frames']}; largest component + activations "
              f"{rep['needs']['largest_component_plus_activations_mb']:.0f} MB, all components "
              f"{rep['needs']['all_components_mb']:.0f} MB")
    for k, v in rep["projected"]["projected_gpu_gb"].items():
        print(f"projected {k:<26} {v:6.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
