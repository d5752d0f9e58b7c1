"""stdrc-export: turn LTX-2 / ST-DRC weights (or the seeded tiny preset) into an engine bundle, and check it.

`build-engines` exports every component to ONNX and builds engines (ONNX Runtime, TensorRT, torch,
AOTInductor) into a bundle folder that `stdrc generate` runs; `verify` compares each engine in a bundle
with the PyTorch model it came from.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from stdrc import __version__
from stdrc.runtime.cli import HelpFormatter, add_device_flag, run_command
from stdrc.runtime.vocab import BACKENDS, LAYOUTS, PRECISIONS


def _build(args: argparse.Namespace) -> int:
    from stdrc.engines.build import BuildConfig, build_engines
    from stdrc.export.lora import LoraSpec

    cfg = BuildConfig(
        preset=args.preset, checkpoint=args.checkpoint, buckets=tuple(args.bucket), rope=args.rope,
        frames=args.frames, height=args.height, width=args.width,
        fps=args.fps, backend=args.backend, precision=args.precision, out=args.out or Path("bundles") / args.preset,
        seed=args.seed, layout=args.layout, face_weights=args.face_weights, calibrate_fp8=args.calibrate_fp8,
        text_encoder=args.text_encoder, base_checkpoint=args.base_checkpoint, decode_tile=args.decode_tile,
        decode_overlap=args.decode_overlap, loras=tuple(LoraSpec.parse(t) for t in args.lora),
        upsampler=args.upsampler, refine_lora=LoraSpec.parse(args.refine_lora) if args.refine_lora else None,
        two_stage=args.two_stage, progress=not args.quiet, **({"cache_dir": args.cache_dir} if args.cache_dir else {}),
    )
    path = build_engines(cfg)
    print(f"bundle written to {path}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from stdrc.engines.verify import reports_json, verify_bundle
    from stdrc.export.lora import LoraSpec
    from stdrc.runtime.manifest import read_manifest

    reports = verify_bundle(args.bundle, args.checkpoint, device=args.device, text_encoder=args.text_encoder,
                            base_checkpoint=args.base_checkpoint, face_weights=args.face_weights,
                            loras=tuple(LoraSpec.parse(t) for t in args.lora), upsampler=args.upsampler,
                            refine_lora=LoraSpec.parse(args.refine_lora) if args.refine_lora else None,
                            report=args.report and not args.json, trust_code=args.trust_bundle_code)
    result = reports_json(reports, read_manifest(args.bundle).model_config.family)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model         {result['family']}")
        for name, r in reports.items():
            status = "ok" if r.ok else "FAIL"
            print(f"{name:13s} {r.backend:11s} {r.precision:5s} max_abs_err={r.max_abs_err:.3e} "
                  f"rel_l2={r.rel_l2:.3e} (tol {r.tolerance:.0e}) {status}"
                  + (f" buckets {', '.join(r.buckets)}" if len(r.buckets) > 1 else "") + f" vs {r.reference}")
    return 0 if result["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stdrc-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("build-engines", help="preset or checkpoint -> ONNX -> engines -> bundle folder",
                       formatter_class=HelpFormatter,
                       description="Export the model's components to ONNX, build engines and write a bundle "
                                   "folder (manifest.json with sha256 of every file). Without --checkpoint the "
                                   "preset's seeded random weights are used. The bundle appears atomically.")
    b.add_argument("--preset", default="tiny",
                   help="model preset: tiny or tiny23 (seeded, seconds on a CPU), ltx2-video or ltx23-video")
    b.add_argument("--checkpoint", type=Path, default=None,
                   help="LTX-2 / LTX-2.3 / ST-DRC .safetensors (default: the preset's seeded weights)")
    b.add_argument("--bucket", action="append", default=[], metavar="FRAMESxWIDTHxHEIGHT",
                   help="a size the bundle serves, e.g. 121x768x512; repeatable (the first is the default); "
                        "instead of --frames/--height/--width")
    b.add_argument("--rope", default="auto", choices=("auto", "input", "baked"),
                   help="RoPE tables: baked into the DiT as constants (one bucket, the smallest edge bundle) or "
                        "fed as inputs per bucket; auto = baked for one bucket, input for several")
    b.add_argument("--frames", type=int, default=None, help="video frames, 8k+1 (default: the preset's bucket)")
    b.add_argument("--height", type=int, default=None, help="pixels, multiple of 32 (default: the preset's bucket)")
    b.add_argument("--width", type=int, default=None, help="pixels, multiple of 32 (default: the preset's bucket)")
    b.add_argument("--fps", type=float, default=None, help="frame rate of the bucket's videos (default: the preset's)")
    b.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="auto = TensorRT when importable with a GPU, else ONNX Runtime")
    b.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="engine precision (fp16: ONNX Runtime CUDA / TensorRT; bf16, fp8: torch / TensorRT)")
    b.add_argument("--layout", default="tass", choices=LAYOUTS,
                   help="reference token positions (tass = TASS-RoPE)")
    b.add_argument("--text-encoder", type=Path, default=None,
                   help="local Gemma-3 folder (config.json, *.safetensors, tokenizer.json); needed by ltx2-video"
                        " and ltx23-video")
    b.add_argument("--base-checkpoint", type=Path, default=None,
                   help="the LTX-2 .safetensors beside a DiT-only --checkpoint (ST-DRC): supplies the VAE and the "
                        "text projection + connector")
    b.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LTX-2 LoRA .safetensors fused into the DiT (strength default 1.0); repeatable")
    b.add_argument("--upsampler", type=Path, default=None,
                   help="two stages: Lightricks' x2 spatial latent upsampler .safetensors (with --refine-lora)")
    b.add_argument("--refine-lora", default=None, metavar="FILE[:STRENGTH]",
                   help="two stages: the distilled LoRA of the refinement stage (strength default 1.0; with "
                        "--upsampler)")
    b.add_argument("--two-stage", action="store_true",
                   help="a two-stage bundle; the tiny presets get a random tiny upsampler and refinement LoRA "
                        "(bucket sizes: multiples of 64)")
    b.add_argument("--face-weights", type=Path, default=None,
                   help="arcface_torch backbone.pth (iresnet50/100) for the face encoder (default: seeded weights)")
    b.add_argument("--calibrate-fp8", action="store_true",
                   help="run modelopt FP8 calibration and record its measured error in the manifest (on a "
                        "pre-quantized FP8 checkpoint: instead of the file's own scales)")
    b.add_argument("--decode-tile", type=int, default=None,
                   help="VAE decode tile in pixels (default: 512 when the bucket is larger; 0 = never tile)")
    b.add_argument("--decode-overlap", type=int, default=64, help="minimum tile overlap in pixels")
    b.add_argument("--seed", type=int, default=0, help="seed of the preset's random weights")
    b.add_argument("--cache-dir", type=Path, default=None,
                   help="stage cache (default: $STDRC_CACHE, else ~/.cache/stdrc)")
    b.add_argument("--out", type=Path, default=None, help="bundle folder (default bundles/<preset>)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=_build)
    v = sub.add_parser("verify", help="each bundle component vs the PyTorch reference", formatter_class=HelpFormatter,
                       description="Run every engine of a bundle and the PyTorch module it was exported from on "
                                   "the same seeded inputs; print max_abs_err and rel_l2 per component and exit 1 "
                                   "when one exceeds its precision's tolerance (fp32: rel L2 1e-4).")
    v.add_argument("bundle", type=Path, help="bundle folder")
    v.add_argument("--checkpoint", type=Path, default=None, help="the .safetensors the bundle was built from")
    v.add_argument("--text-encoder", type=Path, default=None, help="the Gemma-3 folder the bundle was built with")
    v.add_argument("--base-checkpoint", type=Path, default=None,
                   help="the LTX-2 .safetensors the bundle's VAE and text projection came from")
    v.add_argument("--face-weights", type=Path, default=None, help="the ArcFace backbone the bundle was built with")
    v.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="each LoRA the bundle was built with, in order (strength default: the manifest's)")
    v.add_argument("--refine-lora", default=None, metavar="FILE[:STRENGTH]",
                   help="a two-stage bundle's refinement LoRA (default: the tiny presets' seeded one, made again)")
    v.add_argument("--upsampler", type=Path, default=None,
                   help="the x2 latent upsampler a two-stage bundle was built with (none: the seeded tiny one)")
    add_device_flag(v, "where the engines run (the reference runs on CPU; auto: CUDA when the bundle's backend "
                       "can use it here)")
    v.add_argument("--trust-bundle-code", action="store_true",
                   help="allow torch/aoti bundles: loading one runs code from the bundle (see README, Trust)")
    v.add_argument("--json", action="store_true", help="print the numbers as JSON")
    v.add_argument("--report", action="store_true",
                   help="also print polygraphy's comparison per output and batch (error statistics)")
    v.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch._export", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return run_command(args, "interrupted: no bundle was written")


if __name__ == "__main__":
    sys.exit(main())
