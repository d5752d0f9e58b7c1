"""Host memory and disk of `build-engines` at full width and reduced depth, projected to the full model.

    python benchmarks/build_memory.py [--layers 1 2 4] [--precision fp16] [--work DIR] --json
    python benchmarks/build_memory.py --family ltx2.3 --layers 1 2 --json
    python benchmarks/build_memory.py --family ltx2.3 --points docs/build_memory_fp16.json --json
    python benchmarks/build_memory.py --source fp8 --layers 2 --json


Each depth builds in its own child process from a synthetic full-width checkpoint of the family's layout
(ltx2: ltx2-video, ltx2.3: ltx23-video, with its 8-layer gated connector) and a random 3840-wide Gemma-3
folder (benchmarks/synthetic.py). Peak RSS comes from the OS: the child's
VmHWM per component (reset between components through /proc/self/clear_refs) and the parent's
RUSAGE_CHILDREN maximum for the whole build. The per-layer slope of the DiT's peak and disk is fitted
and projected to 48 layers; the Gemma-3 12B text encoder is projected from its parameter bytes in the
engine precision, at the RSS per weight byte measured on the DiT's layers (the fitted slopes' ratio).
The checkpoints, bundles and caches (about 28 GB for the default depths) go to --work, kept; without it
to a temp folder removed when the run ends, fails or is interrupted.

The text encoder engine holds the text side's head (feature extractor + connector) beside Gemma, and the
feature extractor grows with Gemma's depth: the projection adds the full head's parameters over the
measured one's (counted on the meta device, runtime_memory.py). `--points FILE` reuses a previous run's
measured points instead of building; projecting them to another family (`--family ltx2.3 --points` an
ltx2 report) scales the DiT's per-layer slope by the ratio of the two families' block parameters and
prices that family's head: arithmetic over the other family's measurements, not a measurement.

`--source fp8` builds from the FP8 variant of each depth's file (synthetic.write_fp8_checkpoint: Lightricks'
pre-quantized layout, dequantised as read) and, for comparison, from the bf16 file of the same weights: each
point carries both peaks (`bf16_peak_rss_gb`). ltx-core's FP8 files keep block 0 in bf16, so a depth needs
two or more layers to hold any float8 weight.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import harness  # benchmarks/harness.py: the per-component peak RSS
from runtime_memory import FAMILY_PRESETS  # benchmarks/ (the script's folder)

from stdrc.runtime.vocab import BACKEND_PRECISIONS, MODEL_FAMILIES

HERE = Path(__file__).resolve().parent
GB = 1024**3
FULL_LAYERS = 48
GEMMA_12B_PARAMS = 11.77e9  # Gemma-3 12B's language model (the text side reads its hidden states only)
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def child(args: argparse.Namespace) -> None:
    """Build one depth; print per-component peak RSS and disk as JSON."""
    sys.path.insert(0, str(HERE))
    import synthetic

    from stdrc.engines.build import BuildConfig, build_engines

    work, layers, preset = Path(args.work), args.layers[0], FAMILY_PRESETS[args.family]
    name = synthetic.checkpoint_name(preset, layers)
    ckpt = work / (name.replace(".safetensors", "-fp8.safetensors") if args.source == "fp8" else name)
    gemma = work / f"gemma-3-w3840-{args.gemma_layers}layer"
    components: dict[str, dict] = {}
    seen: set[Path] = set()

    def on_component(name: str, staging: Path) -> None:
        files = {f for f in staging.rglob("*") if f.is_file()} - seen
        seen.update(files)
        components[name] = {"peak_rss_gb": harness.peak_rss_mb() * 2**20 / GB,
                            "disk_gb": sum(f.stat().st_size for f in files) / GB}
        harness.reset_peak_rss()

    tag = f"{args.family}-{layers}-{args.precision}" + ("-fp8" if args.source == "fp8" else "")
    out, cache = work / f"bundle-{tag}", work / f"cache-{tag}"
    harness.reset_peak_rss()  # not Linux or not allowed: the peaks then accumulate (reported as measured)
    cfg = BuildConfig(preset=preset, checkpoint=ckpt, text_encoder=gemma, frames=args.frames,
                      height=args.height, width=args.width, backend="onnxruntime", precision=args.precision,
                      out=out, cache_dir=cache, progress=False, on_component=on_component)
    build_engines(cfg)
    print(json.dumps({"components": components, "bundle_gb": _du(out) / GB, "cache_gb": _du(cache) / GB,
                      "checkpoint_gb": _du(ckpt) / GB, "gemma_gb": _du(gemma) / GB}))


def measure(layers: int, args: argparse.Namespace, work: Path, source: str | None = None) -> dict:
    """One depth built in a child process from the `source` file (default `args.source`); `--source fp8`
    adds the bf16 file's build of the same weights (`bf16_peak_rss_gb`)."""
    source = source or args.source
    fp8 = source == "fp8"
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import synthetic, pathlib; "
                    f"synthetic.write_all(pathlib.Path({str(work)!r}), {layers}, {args.gemma_layers}, "
                    f"preset={FAMILY_PRESETS[args.family]!r}, fp8={fp8})"],
                   check=True)
    bf16 = measure(layers, args, work, "bf16") if fp8 else None  # measured first: its peak is the max so far
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cmd = [sys.executable, __file__, "--child", "--layers", str(layers), "--work", str(work), "--precision",
           args.precision, "--gemma-layers", str(args.gemma_layers), "--frames", str(args.frames), "--height",
           str(args.height), "--width", str(args.width), "--source", source, "--family", args.family]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB  # the largest child so far
    point = json.loads(done.stdout.strip().splitlines()[-1])
    point.update(layers=layers, precision=args.precision, source=source, family=args.family,
                 peak_rss_gb=max(peak, max(c["peak_rss_gb"] for c in point["components"].values())),
                 peak_rss_is_max_so_far=before * 1024 / GB >= peak)
    if bf16 is not None:  # the fp8 build's own peak: its components' (RUSAGE_CHILDREN keeps the bf16 max)
        point.update(peak_rss_gb=max(c["peak_rss_gb"] for c in point["components"].values()),
                     bf16_peak_rss_gb=max(c["peak_rss_gb"] for c in bf16["components"].values()),
                     bf16_components=bf16["components"], bf16_checkpoint_gb=bf16["checkpoint_gb"])
    return point


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope); one point: slope 0."""
    if len(xs) < 2:
        return ys[0], 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def family_scale(family: str, gemma_layers: int, measured_family: str = "ltx2") -> dict:
    """What turns `measured_family`'s points, measured with a `gemma_layers`-deep Gemma, into `family`'s full
    model: the ratio of one DiT block's parameters (1 for the family measured) and the text head's
    parameters, full and as measured."""
    import runtime_memory as rm

    from stdrc.export.config import get_preset

    full, measured_full = rm.family_params(family), rm.family_params(measured_family)
    measured = replace(get_preset(FAMILY_PRESETS[measured_family]).text, encoder_layers=gemma_layers)
    return {"dit_block_ratio": full["dit_block"] / measured_full["dit_block"], "text_head_params": full["text_head"],
            "measured_text_head_params": rm.text_head_params(measured), "measured_family": measured_family}


def project(points: list[dict], precision: str, gemma_params: float,
            scale: dict | None = None) -> dict | None:
    """The full model: DiT fitted per layer to 48; text encoder = its measured overhead + Gemma-3 12B's
    weights + the full text head's over the measured one's (`scale`, family_scale: also another family).

    None from fewer than two depths: a per-layer slope is never assumed, only fitted."""
    xs = [p["layers"] for p in points]
    if len(set(xs)) < 2:
        return None
    scale = scale or {"dit_block_ratio": 1.0, "text_head_params": 0, "measured_text_head_params": 0}
    ratio = scale["dit_block_ratio"]
    dit_peak = _fit(xs, [p["components"]["dit"]["peak_rss_gb"] for p in points])
    dit_disk = _fit(xs, [p["components"]["dit"]["disk_gb"] for p in points])
    dit_peak, dit_disk = (dit_peak[0], dit_peak[1] * ratio), (dit_disk[0], dit_disk[1] * ratio)
    bpp = BYTES[precision]
    comps = points[-1]["components"]
    head, measured_head = scale["text_head_params"], scale["measured_text_head_params"]
    # per text engine: its measured point, the measured weights (synthetic Gemma, its head) and the full model's
    if "text_encoder" in comps:  # points recorded before issue 26's split: Gemma and its head in one engine
        text = {"text_encoder": (gemma_params + measured_head, GEMMA_12B_PARAMS + head)}
    else:
        text = {"text_gemma": (gemma_params, GEMMA_12B_PARAMS), "text_head": (measured_head, head)}
    # RSS per byte of weights at the margin, as measured on the DiT's layers, applied to each text engine's
    # weights beyond the measured ones (in the engine precision)
    rss_per_weight_byte = dit_peak[1] / dit_disk[1] if dit_disk[1] > 0 else 1.0
    extra = {k: (full - measured) * bpp / GB for k, (measured, full) in text.items()}
    others = {k: v for k, v in comps.items() if k != "dit" and k not in text}
    peaks = {"dit": dit_peak[0] + dit_peak[1] * FULL_LAYERS,
             **{k: comps[k]["peak_rss_gb"] + rss_per_weight_byte * extra[k] for k in text},
             **{k: v["peak_rss_gb"] for k, v in others.items()}}
    text_disk = sum(comps[k]["disk_gb"] + extra[k] for k in text)
    bundle = (dit_disk[0] + dit_disk[1] * FULL_LAYERS + text_disk + sum(v["disk_gb"] for v in others.values()))
    cache_slope = _fit(xs, [p["cache_gb"] for p in points])
    return {"peak_rss_gb": max(peaks.values()), "bundle_gb": bundle,
            "cache_gb": max(0.0, cache_slope[0] + cache_slope[1] * FULL_LAYERS),
            "per_component_peak_rss_gb": peaks, "dit_peak_rss_gb_per_layer": dit_peak[1],
            "dit_disk_gb_per_layer": dit_disk[1], "rss_per_weight_byte": rss_per_weight_byte, **scale}


@contextlib.contextmanager
def work_folder(given: Path | None) -> Iterator[Path]:
    """`--work` as given, kept; else a temp folder, removed however the run ends."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="stdrc-build-memory.") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--precision", default="fp16", choices=BACKEND_PRECISIONS["onnxruntime"])
    p.add_argument("--gemma-layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--work", type=Path, default=None,
                   help="folder for checkpoints, bundles and caches, kept (default: a temp one, removed)")
    p.add_argument("--family", default="ltx2", choices=MODEL_FAMILIES,
                   help="the family built and projected (with --points: projected from that report's points)")
    p.add_argument("--points", type=Path, default=None,
                   help="a previous run's --json report: project from its measured points, build nothing")
    p.add_argument("--source", default="bf16", choices=("bf16", "fp8"),
                   help="fp8: build from the pre-quantized FP8 file (and the bf16 one, to compare)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.points is not None:
        try:
            previous = json.loads(args.points.read_text())
            points = previous["points"]
            import synthetic

            # reports written before these fields: the run's --gemma-layers and synthetic's Gemma config
            gemma_layers = previous.get("gemma_layers", args.gemma_layers)
            gemma_params = previous.get("gemma_params") or _gemma_params(
                synthetic.gemma_config(layers=gemma_layers).to_dict())
            args.precision = points[0]["precision"]
            measured_family = points[0].get("family", "ltx2")  # reports before 2.3 builds measured ltx2
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            print(f"error: --points {args.points}: not a build_memory --json report "
                  f"({type(e).__name__}: {e}); pass one this benchmark wrote", file=sys.stderr)
            return 2
    elif args.source == "fp8" and min(args.layers) < 2:
        print("error: --source fp8 needs --layers of 2 or more: ltx-core's FP8 files keep block 0 in bf16, so a "
              "1-layer file holds no float8 weight", file=sys.stderr)
        return 2
    else:
        try:
            with work_folder(args.work) as work:
                points = [measure(n, args, work) for n in sorted(args.layers)]
                gemma_dir = work / f"gemma-3-w3840-{args.gemma_layers}layer"
                cfg = json.loads((gemma_dir / "config.json").read_text())
        except KeyboardInterrupt:
            print("interrupted" + ("" if args.work is None else f": {args.work} kept"), file=sys.stderr)
            return 130
        gemma_params, gemma_layers, measured_family = _gemma_params(cfg), args.gemma_layers, args.family
    result = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "family": args.family,
              "points": points, "gemma_params": gemma_params, "gemma_layers": gemma_layers,
              "projected": project(points, args.precision, gemma_params,
                                   family_scale(args.family, gemma_layers, measured_family))}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for pt in points:
            vs = f" (bf16 file: {pt['bf16_peak_rss_gb']:.2f} GB)" if "bf16_peak_rss_gb" in pt else ""
            print(f"layers={pt['layers']} peak_rss={pt['peak_rss_gb']:.2f} GB{vs} bundle={pt['bundle_gb']:.2f} GB "
                  f"cache={pt['cache_gb']:.2f} GB")
        print(f"projected {args.family} (48 layers + Gemma-3 12B):",
              json.dumps(result["projected"]) if result["projected"]
              else "needs two or more --layers")
    return 0


def _gemma_params(cfg: dict) -> float:
    """Parameters of a Gemma-3 text config (embedding, attention, MLP, norms)."""
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    attn = h * hd * (heads + 2 * kv) + heads * hd * h
    return float(v * h + n * (attn + 3 * h * i + 4 * h + 2 * hd) + h)


if __name__ == "__main__":
    sys.exit(main())
