"""The aoti DiT of LTX-2.3 at the real width (32 heads x 128) against ltx-core's `LTXModel`, run by hand.

    python benchmarks/aoti_dit_ltx23.py [--layers 1] [--json]

The `transformer` config block of a synthetic LTX-2.3 file (synthetic.real_config: the 2.3 flags, split fp64
RoPE, context 4096 wide) at `--layers` depth is read the way a checkpoint's is (`config_from_metadata`); the
DiT is built from it, seeded (std 0.01: activations keep unit scale through 4096-wide layers), and ltx-core's
own model is built from the same raw block by its video-only configurator, sharing those weights. The DiT
with its RoPE tables baked (9x64x64: 8 video + 4 reference tokens, 16 text tokens) is compiled exactly as
`build-engines --backend aoti` compiles a component (`torch.export` with the spec's dynamic batch, then
AOTInductor), loaded with `aoti_load_package` as the runtime loads it, and run at each batch size of the spec
on two kinds of stream: the spec's sample inputs, and those with a conditioned first latent frame
(timestep 0 there, so the prompt AdaLN's sigma is no token's timestep). Pass: rel L2 <= 1e-5 (fp32) at every
call (exit 0; else 1).

The suite runs the same check at 1 layer (tests/export/test_dit_ltx23.py, beside PyTorch and ONNX Runtime); this
script runs it at any depth, with each phase's time and peak RSS (docs/benchmarks.md, "LTX-2.3's aoti DiT at real
width").
Peak RSS: this process's VmHWM per phase (reset between phases through /proc/self/clear_refs) and the
largest child's (the C++ compiler AOTInductor runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import harness  # benchmarks/harness.py: the peak RSS of each phase

HERE = Path(__file__).resolve().parent
GB = 1024**3
TOL = 1e-5  # rel L2, fp32: issue 26's DiT parity bound


def run(layers: int, work: Path) -> dict:
    import numpy as np
    import synthetic
    import torch
    from ltx_core.model.transformer.model_configurator import LTXVideoOnlyModelConfigurator

    from stdrc.engines.aoti import torch_engine
    from stdrc.export.checkpoint import config_from_metadata
    from stdrc.export.config import get_preset
    from stdrc.export.dit import BakedRopeDiT, LtxCoreDiT, build_dit, init_seeded
    from stdrc.export.reference import token_positions
    from stdrc.export.rope import rope_tables
    from stdrc.export.specs import component_specs
    from stdrc.runtime.manifest import Bucket

    phases: dict[str, dict] = {}

    def phase(name: str, start: float) -> None:
        peak_gb = harness.peak_rss_mb() / 1024
        phases[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak_gb, 2)}
        harness.reset_peak_rss()

    t = time.perf_counter()
    harness.reset_peak_rss()
    config = {"transformer": synthetic.real_config(synthetic.reduced_preset("ltx23-video", layers))["transformer"]}
    preset = config_from_metadata(get_preset("ltx2-video"), config)
    d = preset.dit
    assert (d.num_attention_heads, d.attention_head_dim, d.num_layers) == (32, 128, layers), d
    assert d.apply_gated_attention and d.cross_attention_adaln and d.caption_proj_before_connector, d
    bucket = Bucket(frames=9, height=64, width=64, text_length=16)
    dit = build_dit(d, seed=None)
    init_seeded(dit, seed=5, std=0.01)
    with torch.device("meta"):  # ltx-core's model from the raw block, sharing our weights
        theirs = LTXVideoOnlyModelConfigurator.from_config(config)
    theirs.load_state_dict(dit.ltx.state_dict(), strict=True, assign=True)
    reference = LtxCoreDiT(theirs.eval()).eval()
    grid = (bucket.latent_frames, bucket.latent_height, bucket.latent_width)
    positions = token_positions(grid, "tass", bucket.fps)
    tables = rope_tables(positions, d)
    spec = component_specs(preset, bucket)["dit"]
    lo, _, hi = spec.dynamic_dims["batch"]
    feeds = []
    for batch in sorted({lo, (lo + hi) // 2, hi}):
        plain = spec.sample_inputs(seed=1234 + batch, batch=batch)
        first_frame = {k: v.copy() for k, v in plain.items()}
        first_frame["timestep"][:, : bucket.latent_height * bucket.latent_width] = 0.0
        feeds += [(False, plain), (True, first_frame)]
    with torch.no_grad():
        wants = [reference(positions, **{k: torch.from_numpy(v) for k, v in f.items()}).numpy() for _, f in feeds]
    phase("build_and_reference", t)

    t = time.perf_counter()
    package = work / "dit.pt2"
    torch_engine(BakedRopeDiT(dit, tables.cos, tables.sin).eval(), spec, package, "aoti", "cpu")
    phase("export_and_compile", t)
    del dit, theirs, reference
    gc.collect()

    t = time.perf_counter()
    engine = torch._inductor.aoti_load_package(str(package))
    calls = []
    with torch.inference_mode():
        for (conditioned, f), want in zip(feeds, wants):
            got = engine(*(torch.from_numpy(f[x.name]) for x in spec.inputs))
            got = (got[0] if isinstance(got, (tuple, list)) else got).numpy()
            rel = float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))
            calls.append({"batch": int(f["latent"].shape[0]), "conditioned": conditioned,
                          "shape": list(got.shape), "rel_l2": rel})
    phase("load_and_run", t)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB
    return {"layers": layers, "heads": d.num_attention_heads, "head_dim": d.attention_head_dim,
            "tokens": {"video": bucket.video_tokens, "reference": bucket.reference_tokens,
                       "text": bucket.text_length},
            "package_gb": round(package.stat().st_size / GB, 3), "calls": calls,
            "max_rel_l2": max(c["rel_l2"] for c in calls), "tolerance": TOL, "phases": phases,
            "peak_rss_gb": max(p["peak_rss_gb"] for p in phases.values()),
            "largest_child_rss_gb": round(children, 2), "torch": torch.__version__,
            "machine": {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
                        "processor": platform.processor() or platform.machine()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=1, help="transformer blocks (default 1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.layers < 1:
        print(f"error: --layers {args.layers}: use 1 or more", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory(prefix="stdrc-aoti-dit23.") as tmp:
        result = run(args.layers, Path(tmp))
    ok = result["max_rel_l2"] <= TOL
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for c in result["calls"]:
            print(f"batch {c['batch']} {'conditioned' if c['conditioned'] else 'plain':11} rel L2 {c['rel_l2']:.2e}")
        print(f"{'PASS' if ok else 'FAIL'}: max rel L2 {result['max_rel_l2']:.2e} (<= {TOL}); "
              + ", ".join(f"{k} {v['seconds']} s / {v['peak_rss_gb']} GB" for k, v in result["phases"].items())
              + f"; compiler child {result['largest_child_rss_gb']} GB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
