"""`stdrc`: generate videos from a bundle, and measure FaceSim. Parses, then calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from stdrc.runtime.errors import StdrcError


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stdrc.runtime.pipeline import Pipeline
    from stdrc.runtime.video import check_writable

    check_writable(args.output)  # fail before loading anything
    pipe = Pipeline.from_bundle(args.bundle, backend=args.backend, device=args.device, cuda_graphs=args.cuda_graphs,
                                memory_plan=args.memory_plan)
    if args.face_models:
        pipe.use_face_models(args.face_models)
    bar = tqdm(desc="sampling", unit="step", disable=args.quiet)

    def on_step(i: int, total: int) -> None:
        bar.total = total
        bar.update()

    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    result = pipe.generate(
        reference=args.ref, prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        steps=args.steps, text_scale=args.text_scale, ref_scale=args.ref_scale, guidance_interval=interval,
        cfg_rescale=args.cfg_rescale, distilled=args.distilled, max_batch=args.max_batch,
        face_crop=not args.no_face_crop, output=args.output, on_step=on_step,
    )
    bar.close()
    summary = {**result.files, "frames": int(result.frames.shape[0]),
               "size": [int(result.frames.shape[2]), int(result.frames.shape[1])], "facesim": result.facesim}
    if args.json:
        print(json.dumps(summary))
    else:
        has_encoder = "face_encoder" in pipe.engines and not args.no_face_crop
        face = (f", FaceSim {result.facesim:.3f}" if result.facesim is not None
                else ", FaceSim n/a (no face in the generated frames)" if has_encoder else "")
        print(f"wrote {result.files['video']} ({summary['frames']} frames, {result.files['codec']}) "
              f"and {result.files['contact_sheet']}{face}")
    return 0


def _read_prompts(source: str) -> list[str]:
    from stdrc.runtime.errors import InputError

    try:
        text = sys.stdin.read() if source == "-" else open(source, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts from {source}: {e}: give a UTF-8 text file, one prompt a line") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def _encode_prompts(args: argparse.Namespace) -> int:
    from stdrc.runtime.pipeline import Pipeline

    prompts = _read_prompts(args.prompts)  # before loading anything
    pipe = Pipeline.from_bundle(args.bundle, device=args.device, memory_plan="staged",
                                prompt_cache=args.cache_dir or "default")
    encoded = pipe.encode_prompts(prompts)
    print(f"{len(prompts)} prompts (+ the empty one) cached in {pipe.prompts.store.folder}: "
          f"{encoded} encoded now, {len(prompts) + 1 - encoded} already there")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from stdrc.runtime.manifest import read_manifest
    from stdrc.runtime.memory import memory_needs, parse_bytes
    from stdrc.runtime.pipeline import weights_and_activations

    budget = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    manifest = read_manifest(args.bundle)
    weights, activations = weights_and_activations(args.bundle, manifest)
    reports = {"uncached prompt": memory_needs(weights, activations),
               "cached prompt": memory_needs(weights, activations, skip_text=True)}
    if args.json:
        print(json.dumps({k: {**r.to_json(), "budget_bytes": budget} for k, r in reports.items()}, indent=2))
        return 0
    gb = 2**30
    for stage in reports["uncached prompt"].stages:
        print(f"{stage.stage:<10} {stage.component:<13} weights {stage.weight_bytes / gb:8.3f} GB  "
              f"activations (estimate) {stage.activation_bytes / gb:8.3f} GB")
    for label, r in reports.items():
        for plan in ("all", "staged"):
            need = r.peak(plan)
            fits = "" if budget is None else ("  fits" if need <= budget else "  does NOT fit")
            print(f"{plan:<7} {label:<16} peak {need / gb:8.3f} GB{fits}"
                  f"{'' if budget is None else f' in {budget / gb:.1f} GB'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stdrc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="reference photo + prompt -> video")
    g.add_argument("--bundle", required=True, help="engine bundle folder (stdrc-export build-engines)")
    g.add_argument("--ref", required=True, help="reference photo (PNG/JPEG)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="", help="the 'no text' stream's prompt (default empty)")
    g.add_argument("-o", "--output", required=True, help="output .mp4 (a _sheet.png goes beside it)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    g.add_argument("--distilled", action="store_true", help="LTX-2's distilled 8-step sigmas")
    g.add_argument("--text-scale", type=float, default=None, help="s_txt (default: the bundle's)")
    g.add_argument("--ref-scale", type=float, default=None, help="s_ref (default: the bundle's)")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"))
    g.add_argument("--cfg-rescale", type=float, default=0.0)
    g.add_argument("--max-batch", type=int, default=3, help="guidance streams per DiT call (1-3)")
    g.add_argument("--no-face-crop", action="store_true", help="use the whole photo, no face detection")
    g.add_argument("--face-models", default=None,
                   help="insightface model folder or name (buffalo_l, antelopev2): SCRFD instead of YuNet")
    g.add_argument("--backend", default=None, help="require this backend (default: the bundle's)")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay the DiT step as a CUDA graph (torch/aoti bundles on --device cuda)")
    g.add_argument("--memory-plan", default="all", choices=("all", "staged", "auto"),
                   help="all: every engine resident; staged: each engine loaded for its stage and released "
                        "after (fits large models in small GPUs); auto: by free device memory")
    g.add_argument("--json", action="store_true")
    g.add_argument("-q", "--quiet", action="store_true")
    g.set_defaults(func=_generate)
    e = sub.add_parser("encode-prompts", help="fill the prompt-embedding cache ahead of time")
    e.add_argument("--bundle", required=True, help="engine bundle folder")
    e.add_argument("prompts", help="text file with one prompt a line, or - for standard input")
    e.add_argument("--cache-dir", default=None,
                   help="prompt cache folder (default $STDRC_PROMPT_CACHE or ~/.cache/stdrc/prompts)")
    e.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    e.set_defaults(func=_encode_prompts)
    m = sub.add_parser("plan", help="memory each plan (all, staged) needs for a bundle, and whether it fits")
    m.add_argument("--bundle", required=True, help="engine bundle folder")
    m.add_argument("--gpu-memory", default=None, help="device memory to check against, e.g. 24GB")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_plan)
    try:
        from stdrc.runtime.face import add_facesim_parser

        add_facesim_parser(sub)
    except ImportError:
        pass
    try:  # serve and submit (Ray is imported only when they run)
        from stdrc.serve import add_serve_parsers

        add_serve_parsers(sub)
    except ImportError:
        pass
    try:
        from stdrc.app import add_app_parser

        add_app_parser(sub)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except StdrcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
