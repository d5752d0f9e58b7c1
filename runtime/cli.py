"""The runtime's subcommands of `stdrc` (generate, encode-prompts, plan, facesim) and the contract every
stdrc CLI shares: the help formatter and `run_command` (errors as one line). `stdrc.cli` assembles `stdrc`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING
from pathlib import Path

from stdrc.runtime.errors import StdrcError
from stdrc.runtime.options import GenerationOptions, options_of
from stdrc.runtime.vocab import DEVICES, FIXED_PLANS, MEMORY_PLANS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" where there is a value to show: not on required options, flags or None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (action.required or not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return action.help or ""
        if action.default == "":
            return f"{action.help} (default: empty)"
        return super()._get_help_string(action)


FORMATTER = HelpFormatter


def add_generation_flags(parser: argparse.ArgumentParser, options_type: type = GenerationOptions,
                         served_only: bool = False) -> None:
    """One flag per field of `options_type` (GenerationOptions or a subclass), made from its Knobs.

    `served_only`: just the fields the job API takes (`stdrc submit`)."""
    for option in options_of(options_type):
        if served_only and not option.knob.served:
            continue
        kw: dict = {"help": option.knob.help, "dest": option.name, "default": option.default}
        if option.kind is bool:
            kw["action"] = "store_true" if option.default is False else argparse.BooleanOptionalAction
        else:
            kw["type"] = {tuple: float, Path: str}.get(option.kind, option.kind)
            kw["required"] = option.default is MISSING or option.knob.required
            if option.default is MISSING:
                kw["default"] = None
            if option.kind is tuple:
                kw["nargs"] = 2
            if option.knob.metavar:
                kw["metavar"] = option.knob.metavar
        parser.add_argument(*option.flags, **kw)


def options_from_args(args: argparse.Namespace, options_type: type = GenerationOptions,
                      served_only: bool = False) -> GenerationOptions:
    """The parsed flags of `add_generation_flags` as checked options (InputError on a bad value)."""
    return options_type(**{o.name: getattr(args, o.name) for o in options_of(options_type)
                           if o.knob.served or not served_only})


def add_device_flag(parser: argparse.ArgumentParser, help: str = "") -> None:
    """--device, with the one default every command shares (auto)."""
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help=help or "auto: CUDA when the bundle's backend can use it here, else CPU")


def _generate(args: argparse.Namespace) -> int:
    from stdrc.runtime.pipeline import Pipeline

    # every argument is checked before an engine is opened (options here, the rest in Pipeline.prepare),
    # and before a progress bar is drawn
    options = options_from_args(args)
    pipe = Pipeline.from_bundle(args.bundle, backend=args.backend, device=args.device, cuda_graphs=args.cuda_graphs,
                                memory_plan=args.memory_plan, trust_code=args.trust_bundle_code)
    if args.face_models:
        pipe.use_face_models(args.face_models)
    elif args.face_detector:
        pipe.use_face_detector(args.face_detector)
    bar = None
    resolved = pipe.resolve(options)  # two stages: the bar names each (steps 0..first-1 are stage 1)
    first = resolved.steps if resolved.stages == 2 else None

    def on_step(i: int, total: int) -> None:
        # the bar starts at the first step: every argument check has passed by then
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(desc=stage_label(0, first), unit="step", total=total, disable=args.quiet)
        if first is not None and i == first:
            bar.set_description(stage_label(i, first))
        bar.update()
        if i + 1 == total:
            bar.close()  # decode and FaceSim log lines come after, on lines of their own

    try:
        result = pipe.generate(args.ref, options, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()  # ends the bar's line, so an error goes on its own
    summary = {**result.files, "frames": int(result.frames.shape[0]),
               "size": [int(result.frames.shape[2]), int(result.frames.shape[1])], "facesim": result.facesim}
    if args.json:
        print(json.dumps(summary))
    else:
        face = (f", FaceSim {result.facesim:.3f}" if result.facesim is not None
                else ", FaceSim n/a (no face in the generated frames)" if result.facesim_scored else "")
        print(f"wrote {result.files['video']} ({summary['frames']} frames, {result.files['codec']}) "
              f"and {result.files['contact_sheet']}{face}")
    return 0


def stage_label(step: int, first: int | None) -> str:
    """The progress bar's name for `step`: sampling, or with two stages (`first` stage-1 steps) which one."""
    if first is None:
        return "sampling"
    return "stage 1/2 (half size)" if step < first else "stage 2/2 (refine)"


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
        plans = {k: {**r.to_json(), "budget_bytes": budget} for k, r in reports.items()}
        print(json.dumps({"family": manifest.model_config.family, **plans}, indent=2))
        return 0
    gb = 2**30
    print(f"model      {manifest.model_config.family} (preset {manifest.preset})")
    for stage in reports["uncached prompt"].stages:
        print(f"{stage.stage:<10} {stage.component:<13} weights {stage.weight_bytes / gb:8.3f} GB  "
              f"activations (estimate) {stage.activation_bytes / gb:8.3f} GB")
    print(f"each stage + engine session's own {reports['uncached prompt'].session_bytes / gb:8.3f} GB")
    for label, r in reports.items():
        for plan in FIXED_PLANS:
            need = r.peak(plan)
            fits = "" if budget is None else ("  fits" if need <= budget else "  does NOT fit")
            print(f"{plan:<7} {label:<16} peak {need / gb:8.3f} GB{fits}"
                  f"{'' if budget is None else f' in {budget / gb:.1f} GB'}")
    return 0


def _facesim(args: argparse.Namespace) -> int:
    """Build detector and embedder from the args, score, print one line (or JSON)."""
    from stdrc.runtime import face
    from stdrc.runtime.errors import InputError
    from stdrc.runtime.video import load_image, read_video

    models = face.resolve_model_folder(args.models) if args.models else None
    embedder_path = args.embedder or (models.recognizer if models else None)
    if embedder_path is None:
        raise InputError("facesim needs a face recogniser: pass --embedder model.onnx or --models buffalo_l")
    if models:
        detector = face.ScrfdDetector(models.detector)
    else:
        detector = face.YuNetDetector(face.find_yunet(args.face_detector))
    result = face.facesim(read_video(args.video), load_image(args.ref), detector, face.FaceEmbedder(embedder_path),
                          samples=args.samples)
    value = result.value
    if args.json:
        print(json.dumps({"facesim": None if value is None else round(value, 6),
                          "frames_sampled": result.frames_sampled, "frames_without_face": result.frames_without_face}))
    else:
        print(f"facesim {'n/a' if value is None else f'{value:.4f}'} ({result.frames_sampled} frames sampled, "
              f"{result.frames_without_face} without a face)")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Adds generate, encode-prompts, plan and facesim to `stdrc`'s subcommands."""
    g = sub.add_parser("generate", help="reference photo + prompt -> video", formatter_class=FORMATTER,
                       description="Generate a video of the reference photo's person from a prompt. The face is "
                                   "found (YuNet by default), cropped to the bundle's bucket and encoded; the DiT "
                                   "samples with text + reference guidance; the VAE decodes. Writes OUT.mp4 and "
                                   "OUT_sheet.png, and prints FaceSim when the bundle has a face encoder.")
    g.add_argument("--bundle", required=True, help="engine bundle folder (from stdrc-export build-engines)")
    g.add_argument("--ref", required=True, help="reference photo with one face (PNG/JPEG)")
    add_generation_flags(g)
    g.add_argument("--face-detector", metavar="ONNX", default=None,
                   help="YuNet ONNX for the face crop (default: $STDRC_YUNET, else the copy shipped with stdrc)")
    g.add_argument("--face-models", metavar="DIR", default=None,
                   help="insightface model folder or name (buffalo_l, antelopev2): SCRFD instead of YuNet")
    g.add_argument("--backend", default=None,
                   help="refuse a bundle whose engines are not this backend (default: whatever the bundle holds)")
    add_device_flag(g)
    g.add_argument("--trust-bundle-code", action="store_true",
                   help="allow torch/aoti bundles: loading one runs code from the bundle (see README, Trust)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay the DiT step as a CUDA graph (torch/aoti bundles on CUDA)")
    g.add_argument("--memory-plan", default="all", choices=MEMORY_PLANS,
                   help="all: every engine resident; staged: each engine loaded for its stage and released "
                        "after (fits large models in small GPUs); auto: by free device memory")
    g.add_argument("--json", action="store_true", help="print one JSON object (files, frames, size, facesim)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    g.set_defaults(func=_generate)
    e = sub.add_parser("encode-prompts", help="fill the prompt-embedding cache ahead of time",
                       formatter_class=FORMATTER,
                       description="Encode prompts with the bundle's text engines (Gemma, then its head) once and "
                                   "cache the embeddings on disk, so generations with those prompts never load "
                                   "either.")
    e.add_argument("--bundle", required=True, help="engine bundle folder")
    e.add_argument("prompts", help="text file with one prompt a line, or - for standard input")
    e.add_argument("--cache-dir", default=None,
                   help="prompt cache folder (default $STDRC_PROMPT_CACHE or ~/.cache/stdrc/prompts)")
    add_device_flag(e, "where the text engines run (auto: CUDA when the bundle's backend can use it here)")
    e.set_defaults(func=_encode_prompts)
    m = sub.add_parser("plan", help="memory each plan (all, staged) needs for a bundle, and whether it fits",
                       formatter_class=FORMATTER,
                       description="Per stage, the weight and activation bytes of the bundle's engines, the peak of "
                                   "each memory plan (all resident, or staged), and whether it fits --gpu-memory.")
    m.add_argument("--bundle", required=True, help="engine bundle folder")
    m.add_argument("--gpu-memory", default=None, help="device memory to check against, e.g. 24GB")
    m.add_argument("--json", action="store_true", help="print the numbers as JSON")
    m.set_defaults(func=_plan)
    from stdrc.runtime.face import YUNET_ENV

    f = sub.add_parser("facesim", help="FaceSim (ConsisID protocol) of a video vs a reference photo",
                       formatter_class=FORMATTER,
                       description="How much the faces in a video look like the reference photo: the mean clamped "
                                   "cosine similarity of ArcFace embeddings over uniformly sampled frames (ConsisID).")
    f.add_argument("video", help="generated video (MP4)")
    f.add_argument("--ref", required=True, help="reference photo with the face")
    f.add_argument("--models", metavar="DIR",
                   help="insightface model folder or name (buffalo_l, buffalo_s, antelopev2): SCRFD + its recogniser")
    f.add_argument("--embedder", metavar="ONNX",
                   help="ArcFace ONNX, e.g. a bundle's face_encoder.onnx (overrides the folder's recogniser)")
    f.add_argument("--face-detector", "--yunet", dest="face_detector", metavar="ONNX", default=None,
                   help=f"YuNet detector file when no --models (default: ${YUNET_ENV}, else the copy shipped "
                        f"with stdrc)")
    f.add_argument("--samples", type=int, default=16, help="frames sampled uniformly")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.set_defaults(func=_facesim)


def run_command(args: argparse.Namespace, interrupted: str = "interrupted") -> int:
    """Both CLIs' contract: a StdrcError is one `error:` line and exit 2; Ctrl-C is one line and 130."""
    try:
        return args.func(args)
    except StdrcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130

