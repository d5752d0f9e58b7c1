"""One stage vs two stages, same output size and seed, side by side in one run (issue 27): `generate.py --stages 1 2`.

    python benchmarks/generate.py --stages 1 2                       # builds both tiny bundles, CPU
    python benchmarks/generate.py --stages 1 2 --bucket 17x256x256 --repeats 3 --json
    python benchmarks/generate.py --stages 1 2 --preset ltx2-video --layers 1 --steps 30   # full width, reduced depth

Without --bundle it builds, in a child process (torch stays out of this one), a one-stage and a two-stage
tiny bundle of the same bucket, the two-stage one from files it writes first: the tiny presets' seeded x2
upsampler (`export/upsampler.save_upsampler`) and a seeded rank-4 refinement LoRA
(`export/refine.write_random_lora`), passed as `--upsampler` and `--refine-lora`, so that the bundle-bytes
check compares with the files' own bytes: two-stage bundle <= one-stage bundle + 1.05 x (upsampler file +
LoRA file), i.e. no second copy of the DiT. (On tiny the refinement graph outweighs a rank-4 LoRA: see
docs/benchmarks.md, refine_step.py.) With --preset ltx2-video (or ltx23-video) --layers N both bundles are built
from benchmarks/synthetic.py's random real-layout files (full width, N DiT blocks, 2 Gemma layers), a
released-width x2 upsampler and a rank-384 LoRA under Lightricks' names (GBs of disk and tens of minutes: run it
under the heavy-work lock). With --bundle (a two-stage bundle, any preset) the bytes are not checked.

Every generation runs through `Pipeline.generate(stages=...)` on the two-stage bundle (`--stages 1` on it is the
one-stage path, equal to a one-stage bundle's output). Each engine call is timed where the pipeline makes it
(`Pipeline.run`, per component: reference and text encoders, `dit` = stage 1, `upsampler`, `dit_refine` =
stage 2, `vae_decoder`), with the wall time of the whole generation; the rest (guidance, Euler, noise, writing)
is "other". DiT FLOPs are `dit_step.dit_flops` summed over the DiT calls the pipeline made (their batch and
token counts as fed), with the DiT's parameter counts from ltx-core's model built on the meta device (the
refinement LoRA's low-rank branches are not counted). The projection applies the same arithmetic to the full
ltx2-video model at 768x512x121, 30 steps, three guidance streams in stage 1, the manifest's 3 stage-2 steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import harness
import numpy as np

BYTES_SLACK = 1.05  # the issue's bound: the stage pieces may add at most 1.05x their own files' bytes
DIT_COMPONENTS = ("dit", "dit_refine")
REAL_LORA_RANK = 384  # LTX's distilled LoRA (`*-distilled-lora-384*`): the rank written beside a full-width model
PROJECTION = {"preset": "ltx2-video", "frames": 121, "width": 768, "height": 512, "steps": 30, "streams": 3}
_HERE = Path(__file__).resolve().parent


# -- children (torch lives there) -------------------------------------------------------------

def _child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(args[:1])} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _build_pair(preset: str, bucket: str, work: Path, cache: Path, layers: int | None) -> dict:
    """Both bundles of `preset` at `bucket`; the two-stage one from an upsampler and a LoRA file written here.

    tiny: the seeded preset, its tiny upsampler and a rank-4 LoRA. Any other preset (`layers` deep): the
    synthetic real-layout inputs of benchmarks/synthetic.py (a full-width checkpoint with `layers` DiT blocks,
    a 3840-wide 2-layer Gemma-3 folder, a released-width x2 upsampler) and a rank-384 LoRA over every Linear
    under Lightricks' key names, as the reduced-depth tests use; the source files are removed once built."""
    import shutil

    from stdrc.engines.build import BuildConfig, build_engines
    from stdrc.export.config import get_preset
    from stdrc.export.lora import LoraSpec
    from stdrc.export.refine import write_random_lora
    from stdrc.export.upsampler import TINY_UPSAMPLER, build_upsampler, save_upsampler

    start = time.perf_counter()
    source = work / "source"
    source.mkdir(parents=True, exist_ok=True)
    if preset == "tiny":
        upsampler = save_upsampler(source / "upsampler-x2.safetensors", build_upsampler(TINY_UPSAMPLER, 0),
                                   TINY_UPSAMPLER)
        lora = Path(write_random_lora(source / "refine-lora.safetensors", get_preset(preset).dit))
        weights = {}
    else:
        import synthetic

        ckpt, gemma = synthetic.write_all(source, dit_layers=layers, gemma_layers=2, preset=preset)
        upsampler = synthetic.write_upsampler(source / "upsampler-x2.safetensors")
        lora = Path(write_random_lora(source / "refine-lora.safetensors",
                                      synthetic.reduced_preset(preset, layers).dit, rank=REAL_LORA_RANK))
        weights = {"checkpoint": ckpt, "text_encoder": gemma}
    files = {"upsampler": upsampler.stat().st_size, "refine_lora": lora.stat().st_size}
    out, seconds = {}, {"write_inputs": time.perf_counter() - start}
    for name, extra in (("one_stage", {}), ("two_stage", {"upsampler": upsampler,
                                                          "refine_lora": LoraSpec(lora, 1.0)})):
        start = time.perf_counter()
        out[name] = str(build_engines(BuildConfig(preset=preset, out=work / name, cache_dir=cache, buckets=(bucket,),
                                                  progress=False, **weights, **extra)))
        seconds[name] = time.perf_counter() - start
        print(f"built {name} in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    shutil.rmtree(source, ignore_errors=True)  # GBs at full width: the bundles are all the timing needs
    return {"bundles": out, "build_s": seconds, "files": files}


def _param_counts(preset: str, layers: int) -> dict:
    """dit_step.ParamCounts of `preset` at `layers` deep: ltx-core's model on the meta device (no weights)."""
    import dataclasses

    import torch
    from dit_step import ParamCounts
    from ltx_core.model.transformer.model_configurator import LTXVideoOnlyModelConfigurator

    from stdrc.export.config import get_preset

    cfg = get_preset(preset).with_dit(num_layers=layers).dit
    with torch.device("meta"):
        model = LTXVideoOnlyModelConfigurator.from_config(cfg.ltx_config())
    return {"counts": dataclasses.asdict(ParamCounts.of(model)), "heads": cfg.num_attention_heads,
            "head_dim": cfg.attention_head_dim}


def build_pair(preset: str, bucket: str, work: Path, cache: Path, layers: int | None = None) -> dict:
    return _child("--child-build", preset, bucket, str(work), str(cache), str(layers or 0))


def param_counts(preset: str, layers: int) -> dict:
    """{"counts": dit_step.ParamCounts, "heads", "head_dim"} of `preset` at `layers` deep."""
    from dit_step import ParamCounts

    out = _child("--child-params", preset, str(layers))
    return {**out, "counts": ParamCounts(**out["counts"])}


# -- measuring --------------------------------------------------------------------------------

class EngineClock:
    """Wraps `pipe.run` (every engine call the pipeline makes): ms per component, and each DiT call's shape."""

    def __init__(self, pipe) -> None:
        self.pipe, self.inner = pipe, pipe.run
        self.ms: dict[str, float] = {}
        self.dit_calls: list[tuple[str, int, int, int]] = []  # (component, batch, tokens, text length)
        pipe.run = self

    def __call__(self, component: str, feeds: dict, keep: tuple[str, ...] = ()) -> dict:
        start = time.perf_counter()
        out = self.inner(component, feeds, keep)
        self.ms[component] = self.ms.get(component, 0.0) + (time.perf_counter() - start) * 1e3
        if component in DIT_COMPONENTS:
            batch, tokens = feeds["latent"].shape[:2]
            self.dit_calls.append((component, int(batch), int(tokens), int(feeds["context"].shape[1])))
        return out

    def reset(self) -> None:
        self.ms, self.dit_calls = {}, []

    def close(self) -> None:
        self.pipe.run = self.inner


def flops_of(calls: list[tuple[str, int, int, int]], counts, model) -> dict[str, float]:
    """DiT FLOPs per DiT component over `calls` (dit_step.dit_flops of each call's batch and tokens)."""
    from dit_step import dit_flops

    out: dict[str, float] = {}
    for component, batch, tokens, text in calls:
        out[component] = out.get(component, 0.0) + dit_flops(counts, model.num_layers, model.num_attention_heads,
                                                             model.attention_head_dim, batch, tokens, text)
    return out


def projection() -> dict:
    """The full ltx2-video model at 768x512x121, 30 steps: DiT FLOPs of one stage vs two (arithmetic)."""
    from dit_step import dit_flops

    from stdrc.export.config import get_preset
    from stdrc.runtime.manifest import Bucket
    from stdrc.runtime.schema import STAGE2_SIGMAS

    p = PROJECTION
    preset = get_preset(p["preset"])
    layers = preset.dit.num_layers
    dit = param_counts(p["preset"], layers)
    b = Bucket(p["frames"], p["height"], p["width"], preset.default_bucket["text_length"])
    h = b.half()

    def flops(bucket: Bucket, batch: int, steps: int) -> float:
        return steps * dit_flops(dit["counts"], layers, dit["heads"], dit["head_dim"], batch, bucket.tokens,
                                 bucket.text_length)

    one = flops(b, p["streams"], p["steps"])
    stage1, stage2 = flops(h, p["streams"], p["steps"]), flops(b, 1, len(STAGE2_SIGMAS) - 1)
    return {**p, "layers": layers, "text_length": b.text_length, "tokens": b.tokens, "stage1_tokens": h.tokens,
            "one_stage_tflop": one / 1e12, "two_stage_tflop": {"stage1": stage1 / 1e12, "stage2": stage2 / 1e12,
                                                               "total": (stage1 + stage2) / 1e12},
            "ratio": one / (stage1 + stage2)}


def bundle_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def bytes_check(one: Path, two: Path, files: dict[str, int]) -> dict:
    sizes = {"one_stage": bundle_bytes(one), "two_stage": bundle_bytes(two)}
    own = sum(files.values())
    limit = sizes["one_stage"] + BYTES_SLACK * own
    return {**sizes, "files": files, "added": sizes["two_stage"] - sizes["one_stage"],
            "added_over_files": (sizes["two_stage"] - sizes["one_stage"]) / own, "limit": limit,
            "passed": sizes["two_stage"] <= limit}


ENGINE_ORDER = ("vae_encoder", "text_gemma", "text_head", "dit", "upsampler", "dit_refine", "vae_decoder",
                "face_encoder")


def compare(pipe, reference, stages: tuple[int, ...], seed: int, warmup: int, repeats: int, prompt: str,
            out_dir: Path, steps: int | None = None) -> dict:
    """`warmup` untimed then `repeats` timed rounds, each round one generation per stage count in turn
    (interleaved, so a shared machine's changing load falls on both alike), same seed and prompt (its embeddings
    are cached after the first, for both alike), `steps` stage-1 steps (None: the bundle's): engine ms per
    component, wall ms, DiT FLOPs, and the 1-minute load average after each timed generation."""
    m = pipe.manifest
    counts = param_counts(m.preset, m.model_config.dit.num_layers)["counts"]
    clock = EngineClock(pipe)
    walls: dict[int, list[float]] = {s: [] for s in stages}
    per: dict[int, list[dict]] = {s: [] for s in stages}
    loads: dict[int, list[float | None]] = {s: [] for s in stages}
    shape: dict[int, list[int]] = {}
    dit_calls: dict[int, list[tuple[str, int, int, int]]] = {}
    try:
        for i in range(warmup + repeats):
            for s in stages:
                clock.reset()
                start = time.perf_counter()
                result = pipe.generate(reference, prompt=prompt, seed=seed, stages=s, steps=steps, face_crop=False,
                                       output=out_dir / f"stages-{s}.mp4")
                wall = (time.perf_counter() - start) * 1e3
                if i >= warmup:
                    walls[s].append(wall)
                    per[s].append(dict(clock.ms))
                    load = harness.load_average()
                    loads[s].append(load[0] if load else None)
                shape[s], dit_calls[s] = list(result.frames.shape), list(clock.dit_calls)
    finally:
        clock.close()
    rows: dict[str, dict] = {}
    for s in stages:
        names = [c for c in ENGINE_ORDER if any(c in r for r in per[s])]
        engine = {c: harness.Timing(tuple(r.get(c, 0.0) for r in per[s])).to_json() for c in names}
        other = [w - sum(r.values()) for w, r in zip(walls[s], per[s])]
        flops = flops_of(dit_calls[s], counts, m.model_config.dit)
        calls = {c: [list(x[1:]) for x in dit_calls[s] if x[0] == c] for c in DIT_COMPONENTS}
        rows[str(s)] = {"wall_ms": harness.Timing(tuple(walls[s])).to_json(), "engine_ms": engine,
                        "other_ms_median": float(np.median(other)), "frames_shape": shape[s],
                        "load_1min": loads[s],
                        "dit_tflop": {c: f / 1e12 for c, f in flops.items()},
                        "dit_tflop_total": sum(flops.values()) / 1e12,
                        "dit_calls": {c: {"count": len(v), "batch_tokens_text": sorted({tuple(x) for x in v})}
                                      for c, v in calls.items() if v}}
    out = {"stages": rows}
    if {"1", "2"} <= set(rows):
        one, two = rows["1"], rows["2"]
        out["ratios"] = {"dit_flops_one_over_two": one["dit_tflop_total"] / two["dit_tflop_total"],
                         "wall_one_over_two": one["wall_ms"]["median"] / two["wall_ms"]["median"],
                         "same_output_shape": one["frames_shape"] == two["frames_shape"]}
    return out


def print_two_stage(rep: dict) -> None:
    t = rep["two_stage"]
    rows = t["stages"]
    names = [c for c in ENGINE_ORDER if any(c in r["engine_ms"] for r in rows.values())]
    print("engine ms per component (median of the repeats; Pipeline.run), wall ms, DiT TFLOP:")
    print(f"{'stages':<8}" + "".join(f"{n:>13}" for n in names) + f"{'other':>10}{'wall':>11}{'DiT TFLOP':>12}")
    for s, r in rows.items():
        ms = {n: r["engine_ms"][n]["median"] for n in names if n in r["engine_ms"]}
        cells = "".join(f"{ms[n]:>13.1f}" if n in ms else f"{'-':>13}" for n in names)
        print(f"{s:<8}{cells}{r['other_ms_median']:>10.1f}{r['wall_ms']['median']:>11.1f}"
              f"{r['dit_tflop_total']:>12.4f}  load {r['load_1min']}")
    if "ratios" in t:
        q = t["ratios"]
        print(f"one stage / two stages: DiT FLOPs {q['dit_flops_one_over_two']:.2f}x, wall "
              f"{q['wall_one_over_two']:.2f}x (same output shape: {q['same_output_shape']})")
    b = t.get("bytes")
    if b is not None:
        print(f"bundle bytes: one stage {b['one_stage']:,} B, two stages {b['two_stage']:,} B, added {b['added']:,} B "
              f"= {b['added_over_files']:.3f}x the upsampler + LoRA files ({sum(b['files'].values()):,} B); "
              f"check two <= one + {BYTES_SLACK} x files ({b['limit']:,.0f} B): "
              f"{'passed' if b['passed'] else 'FAILED'}")
    p = t["projection"]
    print(f"projection, {p['preset']} at {p['width']}x{p['height']}x{p['frames']}, {p['steps']} steps, "
          f"{p['streams']} streams: one stage {p['one_stage_tflop']:,.0f} TFLOP; two stages "
          f"{p['two_stage_tflop']['stage1']:,.0f} + {p['two_stage_tflop']['stage2']:,.0f} = "
          f"{p['two_stage_tflop']['total']:,.0f} TFLOP: {p['ratio']:.2f}x fewer")


if __name__ == "__main__":  # the children
    sys.path.insert(0, str(_HERE))
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in ("-h", "--help"):
        print("usage: python benchmarks/generate.py --stages 1 2 [...] (this module runs through it)\n")
        print(__doc__)
        sys.exit(0)
    if command == "--child-build":
        print(json.dumps(_build_pair(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]),
                                     int(sys.argv[6]) or None)))
    elif command == "--child-params":
        print(json.dumps(_param_counts(sys.argv[2], int(sys.argv[3]))))
    else:
        print(f"error: {command or 'no arguments'}: this module runs through generate.py --stages 1 2", file=sys.stderr)
        sys.exit(2)
