"""The text side as one engine or two (issue 26): what each engine holds beyond its weights, and its time.

    python benchmarks/text_engines.py --layers 4 --json           # narrow Gemma layers, 3840 wide
    python benchmarks/text_engines.py --layers 2 --full-layers    # Gemma-3 12B's own layer insides

A random 3840-wide Gemma-3 folder (`synthetic.write_gemma`) and the ltx2-video text head at that depth,
seeded, are exported as the one-engine text encoder (`TextSide`: Gemma and the head in one graph, what
bundles held before issue 26) and as `text_gemma` + `text_head` (what they hold now), fp32, each optimised
as build-engines does (`build_ort_engine`). Each engine then runs in a child process of its own, opened as
the runtime opens it (`OrtEngine`, 2 threads, after the one-node warm-up), on one prompt: its peak RSS over
the RSS before opening, minus the engine's file bytes (what it holds beyond its weights), and its run time
(min and median of `--repeats`, after one warm-up run). The head is fed the Gemma engine's own outputs,
and its context is compared with the one engine's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

_CHILD = r"""
import json, sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import harness
from pathlib import Path
from stdrc.runtime.backends.onnxruntime import OrtEngine
from stdrc.runtime.manifest import ComponentEntry
path, entry, feeds, out, repeats = Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
harness.warm_onnxruntime(sys.argv[7])
entry = ComponentEntry.from_json(json.loads(Path(entry).read_text()), "component")
with np.load(feeds) as f:
    feeds = {k: f[k] for k in f.files}
harness.reset_peak_rss()
before = harness.rss_mb()
engine = OrtEngine(path, entry, "cpu", threads=2)
result = engine.run(feeds)  # the warm-up run
times = []
for _ in range(repeats):
    start = time.perf_counter()
    result = engine.run(feeds)
    times.append(time.perf_counter() - start)
np.savez(out, **result)
files = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
print(json.dumps({"peak_over_weights_mb": harness.peak_rss_mb() - before - files / 2**20,
                  "weights_mb": files / 2**20, "seconds": times}))
"""


def export_engines(work: Path, layers: int, full: bool, length: int,
                   preset_name: str = "ltx2-video") -> dict[str, tuple[Path, Path]]:
    """The three ONNX Runtime engines (optimised, fp32) and their manifest entries' JSON."""
    import synthetic
    import torch

    from stdrc.engines.onnxruntime import build_ort_engine
    from stdrc.export.config import get_preset
    from stdrc.export.onnx_export import export_onnx
    from stdrc.export.specs import ComponentSpec, component_specs
    from stdrc.export.text import TextStates, build_text_side, load_gemma
    from stdrc.runtime.manifest import Bucket, ComponentEntry

    folder = work / "gemma"
    preset = get_preset(preset_name)
    inside = dict(intermediate_size=15360, heads=16, kv_heads=8, head_dim=256) if full else {}
    if preset.text.connector_dim < 3840:  # a small preset (the smoke test's): Gemma as wide as its connector
        inside = dict(head_dim=preset.text.connector_dim // 2)
    synthetic.write_gemma(folder, hidden_size=preset.text.connector_dim, layers=layers, **inside)
    preset = replace(preset, text=replace(preset.text, max_length=length))
    side = build_text_side(preset.text, seed=0, gemma=load_gemma(folder, length)).float().eval()
    preset = replace(preset, text=side.cfg)
    specs = component_specs(preset, Bucket(frames=9, height=64, width=64, text_length=length))
    one = specs["text_gemma"]
    specs["text_encoder"] = ComponentSpec("text_encoder", one.inputs, specs["text_head"].outputs, sample=one.sample)
    modules = {"text_encoder": side, "text_gemma": TextStates(side.encoder), "text_head": side.head}
    out = {}
    for name, module in modules.items():
        (work / "raw" / name).mkdir(parents=True)
        with torch.no_grad():
            raw = export_onnx(module, specs[name], work / "raw" / name / f"{name}.onnx")
        engine = work / name / f"{name}.onnx"
        engine.parent.mkdir(parents=True)
        facts = build_ort_engine(raw, engine, "fp32")
        entry = ComponentEntry("onnxruntime", engine.name, "0" * 64, "fp32", specs[name].inputs,
                               specs[name].outputs, build=facts)
        (work / f"{name}.json").write_text(json.dumps(entry.to_json()))
        out[name] = engine, work / f"{name}.json"
    del side, modules
    return out


def measure(work: Path, engines: dict[str, tuple[Path, Path]], feeds: dict[str, np.ndarray], name: str,
            repeats: int, warm: Path) -> tuple[dict, dict[str, np.ndarray]]:
    path, entry = engines[name]
    np.savez(work / f"{name}_in.npz", **feeds)
    out = work / f"{name}_out.npz"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).resolve().parent), str(path),
                            str(entry), str(work / f"{name}_in.npz"), str(out), str(repeats), str(warm)],
                           capture_output=True, text=True, timeout=3600)
    if child.returncode:
        raise SystemExit(f"error: the {name} child failed: {child.stderr.strip().splitlines()[-1]}")
    row = json.loads(child.stdout.strip().splitlines()[-1])
    t = sorted(row.pop("seconds"))
    row.update(min_s=t[0], median_s=t[len(t) // 2])
    with np.load(out) as f:
        return row, {k: f[k] for k in f.files}


def run(layers: int, full: bool, length: int, repeats: int, preset: str = "ltx2-video") -> dict:
    from stdrc.runtime.text import JsonTokenizer

    with tempfile.TemporaryDirectory(prefix="stdrc-text-engines.") as tmp:
        work = Path(tmp)
        engines = export_engines(work, layers, full, length, preset)
        from stdrc.export.text import load_gemma

        gemma = load_gemma(work / "gemma", length, weights=False)
        (work / "tokenizer.json").write_text(gemma.tokenizer_json(), encoding="utf-8")
        ids, mask = JsonTokenizer(work / "tokenizer.json", length, gemma.pad_id)("a woman smiles and waves")
        warm = harness.write_warm_model(work / "warm.onnx")
        text = {"token_ids": ids, "token_mask": mask}
        one, want = measure(work, engines, text, "text_encoder", repeats, warm)
        first, states = measure(work, engines, text, "text_gemma", repeats, warm)
        second, got = measure(work, engines, {"token_mask": mask, **states}, "text_head", repeats, warm)
        context, expected = got["context"], want["context"]
        crossing = sum(v.nbytes for v in states.values())
    return {"preset": preset, "gemma_layers": layers, "layer_insides": "12B" if full else "narrow", "tokens": length,
            "one_engine": one, "text_gemma": first, "text_head": second,
            "states_crossing_mb": crossing / 2**20,
            "context_rel_l2_two_vs_one": float(np.linalg.norm(context - expected) / np.linalg.norm(expected)),
            "machine": harness.device_info("cpu"), "load_average": harness.load_average(),
            "versions": harness.versions(), "when": harness.timestamp()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="Gemma layers (3840 wide)")
    p.add_argument("--full-layers", action="store_true", help="Gemma-3 12B's layer insides (else narrow)")
    p.add_argument("--length", type=int, default=1024, help="text tokens")
    p.add_argument("--preset", default="ltx2-video", choices=("ltx2-video", "tiny"),
                   help="the text head's config (tiny: a 32-wide smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.layers < 1 or a.repeats < 1 or a.length < 16 or a.length % 16:
        print("error: --layers and --repeats must be >= 1 and --length a multiple of the connector's registers "
              "(128; tiny: 16)", file=sys.stderr)
        return 2
    rep = run(a.layers, a.full_layers, a.length, a.repeats, a.preset)
    if a.json:
        print(harness.dump_json(rep))
        return 0
    for name in ("one_engine", "text_gemma", "text_head"):
        r = rep[name]
        print(f"{name:<11} weights {r['weights_mb']:8.1f} MB  beyond them {r['peak_over_weights_mb']:7.1f} MB  "
              f"run min {r['min_s']:.3f} s median {r['median_s']:.3f} s")
    print(f"states crossing {rep['states_crossing_mb']:.1f} MB; context rel L2 two vs one "
          f"{rep['context_rel_l2_two_vs_one']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
