"""The refinement DiT of two-stage generation vs the base DiT, ONNX Runtime (issue 27): bytes and step time.

Builds the `dit` engine as build-engines does for a two-stage bundle (exported with RoPE inputs, optimised
offline, weights in `dit.onnx.data`), writes a seeded refinement LoRA of `--rank` over every Linear (the
tiny presets' stand-in layout, export/refine.py) and builds `dit_refine.onnx` on it (engines/refine.py).
Prints: the LoRA file's bytes, what the refinement adds to the bundle (graph + LoRA data; the base
weights are shared), their ratio, and one DiT step (one stream, as stage 2 runs) of each engine, min and
median of `--repeats` after `--warmup`, same inputs, same threads. Weights are seeded (nothing downloaded).

`--backend aoti`: the same with AOTInductor packages (engines/aoti.py): `dit.pt2` holds the weights,
`dit_refine.pt2` is compiled without constants and run through the runtime's engine, given the dit package's
constants and `dit_refine.lora.safetensors` at load; "refinement adds" is then its kernel library + that file.

    python benchmarks/refine_step.py                                   # tiny, rank 4
    python benchmarks/refine_step.py --preset ltx2-video --layers 1 --rank 384 --bucket 9x256x256
    python benchmarks/refine_step.py --backend aoti                    # AOTInductor packages, tiny
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import harness
import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="DiT depth (default: the preset's)")
    p.add_argument("--rank", type=int, default=4, help="the LoRA's rank (LTX's distilled LoRA: 384)")
    p.add_argument("--bucket", default=None, metavar="FRAMESxWIDTHxHEIGHT", help="default: the preset's")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--backend", choices=("onnxruntime", "aoti"), default="onnxruntime")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from stdrc.engines.onnxruntime import build_ort_engine
    from stdrc.engines.refine import build_refine_graph, externalize
    from stdrc.export.config import get_preset
    from stdrc.export.dit import build_dit
    from stdrc.export.lora import LoraSpec, dit_shapes
    from stdrc.export.onnx_export import export_onnx
    from stdrc.export.refine import load_refine_lora, write_random_lora
    from stdrc.export.specs import component_specs
    from stdrc.runtime.manifest import Bucket

    preset = get_preset(args.preset)
    if args.layers is not None:
        preset = preset.with_dit(num_layers=args.layers)
    fields = dict(preset.default_bucket)
    if args.bucket:
        frames, width, height = (int(v) for v in args.bucket.lower().split("x"))
        fields.update(frames=frames, width=width, height=height)
    bucket = Bucket(**fields)
    spec = component_specs(preset, bucket, rope_input=True)["dit"]
    with tempfile.TemporaryDirectory(prefix="stdrc-refine-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "export").mkdir()
        (tmp / "bundle").mkdir()
        if args.backend == "aoti":
            report = aoti_report(args, preset, bucket, tmp / "bundle")
            b = report["bytes"]
            print(harness.dump_json(report) if args.json else
                  f"aoti: LoRA file {report['lora']['file_bytes']} B; refinement adds {b['refine_added']} B (kernel "
                  f"library {b['refine_package']} B + LoRA data {b['refine_lora_data']} B); dit package "
                  f"{b['dit_package']} B; step median dit {report['step_ms']['dit']['median']:.2f} ms, dit_refine "
                  f"{report['step_ms']['dit_refine']['median']:.2f} ms")
            return 0
        with torch.no_grad():
            export_onnx(build_dit(preset.dit, seed=0).eval(), spec, tmp / "export" / "dit.onnx")
        dit = tmp / "bundle" / "dit.onnx"
        build_ort_engine(tmp / "export" / "dit.onnx", dit, "fp32")
        externalize(dit)
        lora_path = write_random_lora(tmp / "refine.safetensors", preset.dit, rank=args.rank)
        lora = load_refine_lora(LoraSpec(lora_path, 1.0), preset.dit)
        own = build_refine_graph(dit, tmp / "bundle" / "dit_refine.onnx", lora, dit_shapes(preset.dit))
        size = {f.name: f.stat().st_size for f in (tmp / "bundle").iterdir()}
        lora_bytes = lora_path.stat().st_size
        added = size["dit_refine.onnx"] + sum(size[f.name] for f in own)
        feeds = spec.sample_inputs(seed=0, batch=1)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # as OrtEngine: offline
        options.intra_op_num_threads = args.threads
        timings, outputs = {}, {}
        for name in ("dit", "dit_refine"):
            session = ort.InferenceSession(str(tmp / "bundle" / f"{name}.onnx"), options,
                                           providers=["CPUExecutionProvider"])
            outputs[name] = session.run(None, feeds)[0]
            timings[name] = harness.time_calls(lambda s=session: s.run(None, feeds), args.warmup, args.repeats,
                                               lambda: None)
            del session
    report = {
        "preset": preset.name, "layers": preset.dit.num_layers, "bucket": bucket.label(), "tokens": bucket.tokens,
        "lora": {"rank": args.rank, "targets": len(lora.pairs), "file_bytes": lora_bytes},
        "bytes": {"dit_weights": size.get("dit.onnx.data", 0), "dit_graph": size["dit.onnx"],
                  "refine_graph": size["dit_refine.onnx"], "refine_lora_data": sum(size[f.name] for f in own),
                  "refine_added": added, "added_over_lora": round(added / lora_bytes, 4)},
        "step_ms": {k: v.to_json() for k, v in timings.items()},
        "refine_over_base_median": round(timings["dit_refine"].median_ms / timings["dit"].median_ms, 4),
        "refine_vs_base_rel_l2": float(np.linalg.norm(outputs["dit_refine"] - outputs["dit"])
                                       / np.linalg.norm(outputs["dit"])),
        "device": harness.device_info("cpu"), "versions": harness.versions(), "load": harness.load_average(),
        "when": harness.timestamp(), "argv": sys.argv[1:] if argv is None else argv,
    }
    if args.json:
        print(harness.dump_json(report))
    else:
        b = report["bytes"]
        print(f"{preset.name} x{preset.dit.num_layers} layers, bucket {bucket.label()} ({bucket.tokens} tokens), "
              f"LoRA rank {args.rank} on {len(lora.pairs)} Linears")
        print(f"LoRA file {lora_bytes} B; refinement adds {added} B (graph {b['refine_graph']} B + LoRA data "
              f"{b['refine_lora_data']} B) = {b['added_over_lora']:.3f}x the LoRA; dit weights {b['dit_weights']} B")
        for name, t in timings.items():
            print(f"{name:10s} step: min {t.min_ms:.2f} ms, median {t.median_ms:.2f} ms")
        print(f"refine / base (median): {report['refine_over_base_median']:.3f}")
    return 0


def aoti_report(args: argparse.Namespace, preset, bucket, folder: Path) -> dict:
    """dit.pt2 (weights inside) and dit_refine.pt2 (none: the dit's and the LoRA's at load), bytes and one step."""

    from stdrc.engines.aoti import CONSTANTS_SUFFIX, refine_package, torch_engine, write_branch_constants
    from stdrc.export.dit import build_dit
    from stdrc.export.lora import LoraSpec
    from stdrc.export.refine import load_refine_lora, write_random_lora
    from stdrc.export.specs import component_specs
    from stdrc.runtime.backends.torch import TorchEngine
    from stdrc.runtime.manifest import ComponentEntry, sha256_file
    from stdrc.runtime.schema import BuildFacts

    specs = component_specs(preset, bucket, rope_input=True)  # the refinement has the DiT's inputs
    lora_path = write_random_lora(folder.parent / "refine.safetensors", preset.dit, rank=args.rank)
    lora = load_refine_lora(LoraSpec(lora_path, 1.0), preset.dit)
    dit = build_dit(preset.dit, seed=0).eval()
    torch_engine(dit, specs["dit"], folder / "dit.pt2", "aoti", "cpu")
    refine_package(dit, lora, specs["dit"], folder / "dit_refine.pt2", "cpu")
    del dit
    own = write_branch_constants(lora, folder / f"dit_refine{CONSTANTS_SUFFIX}")
    spec = specs["dit"]
    base = ComponentEntry("aoti", "dit.pt2", sha256_file(folder / "dit.pt2"), "fp32", spec.inputs, spec.outputs,
                          spec.dynamic_dims, build=BuildFacts(device="cpu"))
    refine = ComponentEntry("aoti", "dit_refine.pt2", "0" * 64, "fp32", spec.inputs, spec.outputs, spec.dynamic_dims,
                            extra_files={"dit.pt2": base.sha256, own.name: "0" * 64},
                            build=BuildFacts(device="cpu", constants_from="dit.pt2", constants_file=own.name))
    size = {f.name: f.stat().st_size for f in folder.iterdir()}
    feeds = spec.sample_inputs(seed=0, batch=1)
    timings, outputs = {}, {}
    for name, entry in (("dit", base), ("dit_refine", refine)):
        engine = TorchEngine.from_file(folder / entry.file, entry)
        outputs[name] = engine.run(feeds)["velocity"]
        timings[name] = harness.time_calls(lambda e=engine: e.run(feeds), args.warmup, args.repeats, lambda: None)
        del engine
    added = size["dit_refine.pt2"] + size[own.name]
    return {
        "backend": "aoti", "preset": preset.name, "layers": preset.dit.num_layers, "bucket": bucket.label(),
        "tokens": bucket.tokens, "lora": {"rank": args.rank, "targets": len(lora.pairs),
                                          "file_bytes": lora_path.stat().st_size},
        "bytes": {"dit_package": size["dit.pt2"], "refine_package": size["dit_refine.pt2"],
                  "refine_lora_data": size[own.name], "refine_added": added,
                  "added_over_lora": round(added / lora_path.stat().st_size, 4),
                  "lora_data_over_lora": round(size[own.name] / lora_path.stat().st_size, 4)},
        "step_ms": {k: v.to_json() for k, v in timings.items()},
        "refine_over_base_median": round(timings["dit_refine"].median_ms / timings["dit"].median_ms, 4),
        "refine_vs_base_rel_l2": float(np.linalg.norm(outputs["dit_refine"] - outputs["dit"])
                                       / np.linalg.norm(outputs["dit"])),
        "device": harness.device_info("cpu"), "versions": harness.versions(), "load": harness.load_average(),
        "when": harness.timestamp(), "argv": sys.argv[1:],
    }


if __name__ == "__main__":
    sys.exit(main())
