"""`Pipeline`: a bundle loaded once, then `generate(reference, prompt, ...)` as often as wanted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from stdrc.runtime import sampler as smp
from stdrc.runtime.backends import Engine, check_cuda_graph, check_feeds, check_trust, open_engine, resolve_device
from stdrc.runtime.errors import BundleError, InputError, NoFaceError
from stdrc.runtime.manifest import Bucket, Manifest, bundle_path, check_files, read_manifest
from stdrc.runtime.memory import EngineSet, choose_plan, memory_needs
from stdrc.runtime.options import GenerationOptions, check_path
from stdrc.runtime.text import Embedding, PromptCache, PromptStore, default_prompt_store_dir, tokenizer_from_manifest
from stdrc.runtime.tiling import tiled_decode
from stdrc.runtime.video import (
    as_rgb,
    contact_sheet,
    frames_to_uint8,
    load_image,
    resize_cover,
    write_png,
    write_video,
)
from stdrc.runtime.vocab import BACKENDS, REQUIRED_COMPONENTS, TEXT_COMPONENTS

log = logging.getLogger(__name__)
# prompts whose Gemma hidden states are held on the host together before the head runs (`encode_prompts`):
# Gemma-3 12B's 49 states at 1024 tokens are 0.72 GiB a prompt in fp32, 0.36 in fp16
PROMPT_BATCH = 4
UNGUIDED = smp.GuidanceScales(text=1.0, ref=1.0)  # one stream, text and reference (two-stage refinement)


@dataclass(frozen=True)
class GenerationResult:
    frames: np.ndarray  # [F, H, W, 3] uint8
    latent: np.ndarray  # final video tokens [1, N_video, C]
    reference: np.ndarray  # the prepared reference image [H, W, 3]
    facesim: float | None = None
    files: dict[str, str] = field(default_factory=dict)
    facesim_scored: bool = False  # FaceSim was measured (None above then means: no face in the frames)


@dataclass(frozen=True)
class Prepared:
    """One request checked and resolved against the bundle, before any engine runs (`Pipeline.prepare`)."""

    options: GenerationOptions  # the bundle's values filled in: steps, scales and the bucket's size
    bucket: Bucket
    scales: smp.GuidanceScales
    sigmas: np.ndarray
    image: np.ndarray  # the reference as it is encoded (face crop or whole photo) [H, W, 3] uint8
    text: Embedding | None = None  # given prompt embeddings, checked
    negative: Embedding | None = None
    facesim_scored: bool = False  # the bundle has an ONNX face encoder and the reference is a face crop
    # two stages (options.stages == 2): the reference cropped for the stage-1 half, the refinement's sigmas
    stage1_image: np.ndarray | None = None
    refine_sigmas: np.ndarray | None = None

    @property
    def total_steps(self) -> int:
        """DiT steps over every stage (what `on_step` counts to)."""
        return len(self.sigmas) - 1 + (0 if self.refine_sigmas is None else len(self.refine_sigmas) - 1)


def weights_and_activations(bundle_dir: Path, manifest: Manifest) -> tuple[dict[str, int], dict[str, int]]:
    """Per component: weight bytes (recorded at build, else the files' sizes) and activation estimates."""
    from stdrc.runtime.memory import activation_bytes, component_weight_bytes

    recorded = manifest.memory
    m = manifest
    weights = {name: recorded.weight_bytes.get(name) or component_weight_bytes(bundle_dir, e.file,
                                                                                e.extra_files)
               for name, e in m.components.items()}
    activations = {name: recorded.activation_bytes.get(name)
                   or activation_bytes(name, m.model_config, m.bucket, e.precision, m.decode)
                   for name, e in m.components.items()}
    return weights, activations


def prompt_store_for(manifest: Manifest, folder: Path) -> PromptStore:
    """The prompt cache of this bundle's text side: keyed by both text engines' files (external data too)."""
    context = next(t for t in manifest.components["dit"].inputs if t.name == "context")
    weights = "".join(e.sha256 + "".join(sorted(e.extra_files.values()))
                      for e in (manifest.components[n] for n in TEXT_COMPONENTS))
    return PromptStore(folder, PromptStore.text_key(weights, manifest.text), tuple(context.shape[1:]))


def patchify(latent: np.ndarray) -> np.ndarray:
    """[1, C, F, H, W] -> [1, F*H*W, C] (ltx-core's patch size 1 order)."""
    b, c = latent.shape[:2]
    return np.ascontiguousarray(latent.reshape(b, c, -1).transpose(0, 2, 1))


def unpatchify(tokens: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    b, _, c = tokens.shape
    return np.ascontiguousarray(tokens.transpose(0, 2, 1).reshape(b, c, *grid))


class Pipeline:
    def __init__(self, bundle_dir: Path, manifest: Manifest, engines: EngineSet,
                 prompt_store: PromptStore | None = None, verify_hashes: bool = True,
                 tokenizer: Callable[[str], tuple[np.ndarray, np.ndarray]] | None = None):
        """`tokenizer`: prompt -> (token ids, mask) for the Gemma engine; None: the bundle's own, made from
        the manifest's text section on first use (after the files' hashes are checked)."""
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.engines = engines
        self.bucket = manifest.bucket  # the one `generate` runs; it picks one of the manifest's buckets
        self._rope: dict[str, dict[str, np.ndarray]] = {}  # per bucket: its DiT RoPE feeds, read once
        self._hashes_pending = verify_hashes
        self._tokenize = tokenizer
        self.prompts = PromptCache(self._encode_prompts, store=prompt_store)
        self._detector = None
        self._embedder = None

    def use_face_detector(self, path: str | Path | None = None) -> None:
        """Detect faces with this YuNet ONNX (None: $STDRC_YUNET, else the copy shipped with stdrc)."""
        from stdrc.runtime import face

        self._detector = face.YuNetDetector(face.find_yunet(path))

    def use_face_models(self, folder: str | Path) -> None:
        """Detect faces with SCRFD from an insightface model folder (buffalo_l, antelopev2) instead of YuNet."""
        from stdrc.runtime import face

        self._detector = face.ScrfdDetector(face.resolve_model_folder(folder).detector)

    @staticmethod
    def from_bundle(path: str | Path, backend: str | None = None, device: str = "auto",
                    verify_hashes: bool = True, cuda_graphs: bool = False, memory_plan: str = "all",
                    prompt_cache: str | Path | None = "default", trust_code: bool = False) -> Pipeline:
        """Validate the manifest and files (types, containment, backend, TensorRT version/GPU); no engine opens yet.

        Files are checked against their sha256 once, before the first is read (`check_hashes`): after the
        first request's `prepare`, so a bad request never waits for a large bundle to be hashed.

        `device`: "auto" (CUDA when the bundle's backends can use it here, else CPU), "cpu" or "cuda".
        `cuda_graphs`: the DiT of a torch/aoti bundle replays CUDA graphs (device "cuda" only).
        `memory_plan`: ``all`` keeps every engine once opened (on first use, or `engines.warm()`); ``staged``
        opens each when its stage starts and releases it after; ``auto`` picks by the device's free memory
        (runtime/memory.py).
        `prompt_cache`: folder of prompt embeddings on disk ("default": $STDRC_PROMPT_CACHE or
        ~/.cache/stdrc/prompts; None: in memory only).
        `trust_code`: allow torch/aoti bundles, whose loading runs code from the bundle (see README, Trust).
        """
        if backend is not None and backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}, or drop --backend")
        bundle_dir = check_path(path, "bundle folder")
        manifest = read_manifest(bundle_dir)
        device = resolve_device(device, {e.backend for e in manifest.components.values()})
        if cuda_graphs and device != "cuda":
            raise InputError("CUDA graphs need --device cuda: drop --cuda-graphs on CPU")
        missing = [c for c in REQUIRED_COMPONENTS if c not in manifest.components]
        if missing:
            raise BundleError(f"bundle {bundle_dir} lacks {', '.join(missing)}: rebuild it with build-engines")
        if backend is not None:
            wrong = {k: e.backend for k, e in manifest.components.items() if e.backend != backend}
            if wrong:
                raise BundleError(
                    f"bundle {bundle_dir} holds {sorted(set(wrong.values()))} engines, not {backend}: "
                    f"rebuild it with --backend {backend} or drop --backend"
                )
        for name, entry in manifest.components.items():  # before any file is hashed or opened
            check_trust(name, entry, trust_code)
        if cuda_graphs:
            check_cuda_graph(manifest.components["dit"])
        check_files(bundle_dir, manifest, hashes=False)  # containment and presence; sha256 before the first read
        plan = choose_plan(memory_plan, memory_needs(*weights_and_activations(bundle_dir, manifest)), device)

        def opener(name: str) -> Engine:
            pipe.check_hashes()
            return open_engine(bundle_dir, name, manifest.components[name], device,
                               cuda_graph=cuda_graphs and name == "dit", trust_code=trust_code)

        store = None
        if prompt_cache is not None:
            folder = default_prompt_store_dir() if prompt_cache == "default" else Path(prompt_cache)
            store = prompt_store_for(manifest, folder)
        pipe = Pipeline(bundle_dir, manifest, EngineSet(opener, list(manifest.components), plan), store, verify_hashes)
        return pipe

    @staticmethod
    def for_checks(path: str | Path) -> Pipeline:
        """A Pipeline for `prepare` only, in a process that holds no model (the serve ingress, the app's face
        preview): the manifest and the files' presence are checked, nothing is hashed, no engine is opened."""
        return Pipeline.from_bundle(path, device="cpu", verify_hashes=False, prompt_cache=None)

    def check_hashes(self) -> None:
        """Every bundle file against its sha256, once, before the first is read: after `prepare`, so a bad
        request is refused before a large bundle is hashed (BundleError for a changed file)."""
        if self._hashes_pending:
            check_files(self.bundle_dir, self.manifest)
            self._hashes_pending = False

    def run(self, component: str, feeds: dict[str, np.ndarray], keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        engine = self.engines[component]
        check_feeds(engine.entry, feeds, component)
        return engine.run(feeds, keep=keep) if keep else engine.run(feeds)

    # -- stages -------------------------------------------------------------------------------

    def _encode_prompts(self, prompts: list[str]) -> list[Embedding]:
        """Gemma over every prompt, then (staged: Gemma released first) the head over their hidden states, so
        the two text engines are never resident together and each opens once for all the prompts.

        The states cross on the host as the Gemma engine returns them (16-bit from a 16-bit ONNX Runtime
        engine), one prompt's set (L + 1 arrays [1, T, D]) at a time into the head."""
        if self._tokenize is None:
            self.check_hashes()
            self._tokenize = tokenizer_from_manifest(self.manifest.text, self.bundle_dir)
        masks, states = [], []
        for prompt in prompts:
            ids, mask = self._tokenize(prompt)
            masks.append(mask)
            states.append(self.run("text_gemma", {"token_ids": ids, "token_mask": mask}))
        self._stage_done("text_gemma")
        out = []
        for mask in masks:
            context = self.run("text_head", {"token_mask": mask, **states.pop(0)})
            out.append((context["context"].astype(np.float32), context["context_mask"].astype(np.int64)))
        self._stage_done("text_head")
        return out

    def _stage_done(self, component: str) -> None:
        self.engines.done(component)

    def encode_prompts(self, prompts: list[str]) -> int:
        """Fill the prompt cache ahead of time (the empty "no text" prompt included); returns how many
        prompts were encoded now (the rest were cached already)."""
        before = self.prompts.encoded
        todo = list(dict.fromkeys(["", *prompts]))
        for first in range(0, len(todo), PROMPT_BATCH):  # host memory: one batch's hidden states at a time
            self.prompts.fill(todo[first:first + PROMPT_BATCH])
        return self.prompts.encoded - before

    def _embeddings(self, prompt: str, given: Embedding | None) -> Embedding:
        if given is None:
            return self.prompts(prompt)
        spec = next(t for t in self.manifest.components["dit"].inputs if t.name == "context")
        context, mask = (np.asarray(a) for a in given)
        want = (1, *spec.shape[1:])
        if context.shape != want or mask.shape != want[:2] or not np.isfinite(context).all():
            raise InputError(f"precomputed text embeddings have shape {context.shape} / {mask.shape}: this bundle "
                             f"takes context {want} and mask {want[:2]} (from stdrc encode-prompts or "
                             "Pipeline.prompts)")
        return np.asarray(context, dtype=np.float32), np.asarray(mask, dtype=np.int64)

    def prepare_reference(self, reference: str | Path | np.ndarray, face_crop: bool = True,
                          bucket: Bucket | None = None) -> np.ndarray:
        """Largest face, cropped with margin and resized to the bucket (None: the current one); or the whole photo."""
        return self.prepare_references(reference, face_crop, (bucket or self.bucket,))[0]

    def prepare_references(self, reference: str | Path | np.ndarray, face_crop: bool,
                           buckets: tuple[Bucket, ...]) -> list[np.ndarray]:
        """The reference prepared for each bucket's size (two stages: the output and its half), the face
        detected once."""
        image = load_image(reference) if isinstance(reference, (str, Path)) else as_rgb(np.asarray(reference))
        if not face_crop:
            return [resize_cover(image, b.height, b.width) for b in buckets]
        from stdrc.runtime import face

        found = face.largest_face(self._face_detector().detect(image))
        if found is None:
            raise NoFaceError("no face found in the reference image: use a clearer photo, or pass --no-face-crop")
        return [face.crop_reference(image, found, b.height, b.width) for b in buckets]

    def _face_detector(self):
        """YuNet unless `use_face_models` chose SCRFD; created on first use."""
        if self._detector is None:
            from stdrc.runtime import face

            self._detector = face.YuNetDetector(face.find_yunet())
        return self._detector

    def encode_reference(self, image: np.ndarray) -> np.ndarray:
        pixels = (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None, :, None]
        latent = self.run("vae_encoder", {"image": np.ascontiguousarray(pixels)})["latent"]
        return patchify(latent.astype(np.float32))

    def initial_noise(self, seed: int, bucket: Bucket | None = None) -> np.ndarray:
        """The seed's starting noise, video tokens [1, N_video, C] of `bucket` (None: the current one; two
        stages: the stage-1 half's)."""
        channels = self.manifest.model_config.dit.in_channels
        tokens = (bucket or self.bucket).video_tokens
        return np.random.default_rng(seed).standard_normal((1, tokens, channels), dtype=np.float32)

    def refine_noise(self, seed: int) -> np.ndarray:
        """The noise the upsampled latent is re-noised with before the refinement (seed + 2; the decoder's is
        seed + 1): video tokens [1, N_video, C] of the current (output) bucket."""
        return self.initial_noise(seed + 2)

    def upsample(self, tokens: np.ndarray, stage1: Bucket) -> np.ndarray:
        """Stage-1 video tokens at `stage1`'s grid -> the `upsampler` engine -> tokens at twice its height
        and width (the output bucket's grid)."""
        latent = unpatchify(tokens, (stage1.latent_frames, stage1.latent_height, stage1.latent_width))
        return patchify(self.run("upsampler", {"latent": latent})["upsampled"].astype(np.float32))

    def decode_noise(self, seed: int) -> np.ndarray | None:
        """The noise a timestep-conditioned VAE decoder mixes into its input ([1, C, F, H, W]), else None."""
        b, vae = self.bucket, self.manifest.model_config.vae
        if not vae.timestep_conditioning:
            return None
        shape = (1, vae.latent_channels, b.latent_frames, b.latent_height, b.latent_width)
        return np.random.default_rng(seed + 1).standard_normal(shape, dtype=np.float32)

    def decode(self, tokens: np.ndarray, seed: int) -> np.ndarray:
        return frames_to_uint8(self.decode_video(tokens, self.decode_noise(seed)))

    def decode_video(self, tokens: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        """Video tokens [1, N_video, C] + decode noise (None when not timestep-conditioned) -> video in [-1, 1]."""
        b = self.bucket
        latent = unpatchify(tokens, (b.latent_frames, b.latent_height, b.latent_width))
        if noise is not None:
            scale = np.float32(self.manifest.model_config.vae.decode_noise_scale)
            latent = noise * scale + (np.float32(1.0) - scale) * latent
        return self.decode_latent(latent)

    def decode_latent(self, latent: np.ndarray) -> np.ndarray:
        """[1, C, F, H, W] latent (decode noise already mixed in) -> [1, 3, frames, height, width] in [-1, 1].

        The decoder gets a timestep only where its engine has that input (a timestep-conditioned decoder)."""
        names = {t.name for t in self.manifest.components["vae_decoder"].inputs}
        value = self.manifest.model_config.vae.decode_timestep
        timestep = {"timestep": np.full((1,), value, np.float32)} if "timestep" in names else {}

        def decode(part: np.ndarray) -> np.ndarray:
            return self.run("vae_decoder", {"latent": part.astype(np.float32), **timestep})["video"]

        tiling = self.manifest.decode
        return decode(latent) if tiling is None else tiled_decode(decode, latent, tiling)

    def sigmas(self, steps: int | None, distilled: bool) -> np.ndarray:
        """The manifest's sigmas, as C++ runs them; another `steps`: its schedule, computed as at build."""
        return self.manifest.sampler.sigmas_for(steps, distilled)

    def use_bucket(self, frames: int | None = None, height: int | None = None, width: int | None = None) -> None:
        """Run the bundle's bucket of this size next (None: the default's value); one it lacks: InputError."""
        self.bucket = self.manifest.find_bucket(frames, height, width)

    def rope_feeds(self, stage1: bool = False) -> dict[str, np.ndarray]:
        """The DiT's `rope_cos`/`rope_sin` for the current bucket, or (`stage1`) its stage-1 half's (a DiT with
        tables baked in: none).

        Read once per file and handed over as the same arrays at every call, so the engines bind
        them once (ONNX Runtime IO binding, a TensorRT buffer copied once)."""
        if not self.manifest.rope_input:
            return {}
        b = self.bucket
        if stage1 and b.stage1 is None:
            raise BundleError(f"bundle bucket {b.label()} has no stage-1 RoPE tables: rebuild it two-stage")
        rel = b.stage1.rope.file if stage1 else (b.rope or self.manifest.rope).file
        if rel not in self._rope:
            self.check_hashes()
            with np.load(bundle_path(self.bundle_dir, rel), allow_pickle=False) as tables:
                self._rope[rel] = {"rope_cos": np.ascontiguousarray(tables["cos"], np.float32),
                                   "rope_sin": np.ascontiguousarray(tables["sin"], np.float32)}
        return self._rope[rel]

    @property
    def feeds_sigma(self) -> bool:
        """The DiT takes the stream's `sigma` (a prompt-AdaLN DiT, LTX-2.3): sample with `feed_sigma`."""
        return any(t.name == smp.SIGMA_INPUT for t in self.manifest.components["dit"].inputs)

    def denoiser(self, latent, timestep, context, context_mask, attn_mask,
                 **sigma):
        """The `dit` engine at the current bucket."""
        return self.denoiser_for()(latent, timestep, context, context_mask, attn_mask, **sigma)

    def denoiser_for(self, component: str = "dit", stage1: bool = False) -> smp.Denoiser:
        """A DiT engine (`dit`, or `dit_refine` for two-stage refinement) with the current bucket's RoPE
        tables, or (`stage1`) its stage-1 half's."""
        def denoise(latent, timestep, context, context_mask, attn_mask, **sigma):
            rope = self.rope_feeds(stage1)
            feeds = {"latent": latent, "timestep": timestep, "context": context,
                     "context_mask": context_mask, "attn_mask": attn_mask, **rope, **sigma}
            # only latent, timestep (and sigma) move
            return self.run(component, feeds, keep=(*smp.FIXED_INPUTS, *rope))["velocity"]
        return denoise

    # -- the whole thing ----------------------------------------------------------------------

    def generate(self, reference: str | Path | np.ndarray, options: GenerationOptions | None = None, *,
                 on_step: Callable[[int, int], None] | None = None, text_embeddings: Embedding | None = None,
                 negative_embeddings: Embedding | None = None, **fields: object) -> GenerationResult:
        """One video. `options` (or its fields as keywords, which override it) is checked before any engine
        runs; a bad value is an InputError. `generate(ref, prompt="...", seed=3)` is the short form.

        `frames`/`height`/`width` pick the bundle's bucket of that size (None: the default bucket's value).

        `text_embeddings` / `negative_embeddings`: precomputed (context [1, L, D], mask [1, L]) for the prompt
        and the negative prompt; with both given (or cached) neither text engine is opened."""
        if options is None:
            options = GenerationOptions(**fields)
        elif not isinstance(options, GenerationOptions):
            raise InputError(f"options is a {type(options).__name__}, not GenerationOptions: pass the prompt as "
                             "prompt=...")
        elif fields:
            options = replace(options, **fields)
        return self.generate_prepared(self.prepare(reference, options, text_embeddings, negative_embeddings),
                                      on_step)

    def prepare(self, reference: str | Path | np.ndarray, options: GenerationOptions,
                text_embeddings: Embedding | None = None, negative_embeddings: Embedding | None = None) -> Prepared:
        """Everything one request needs that no engine computes: the bucket, the bundle's defaults filled in,
        scales, sigmas, the reference crop, given embeddings checked, whether FaceSim is scored.

        The one validation path (the CLI, `stdrc serve`'s ingress, the app's face preview and the C++
        inputs all come through here); it opens no engine and leaves the Pipeline as it was."""
        o = self.resolve(options)
        bucket = self.manifest.find_bucket(o.frames, o.height, o.width)
        sigmas = self.sigmas(options.steps, options.distilled)  # the manifest's own unless overridden
        scales = smp.GuidanceScales(text=o.text_scale, ref=o.ref_scale, interval=o.guidance_interval,
                                    rescale=o.cfg_rescale)
        given = tuple(None if e is None else self._embeddings(p, e)
                      for p, e in ((o.prompt, text_embeddings), (o.negative_prompt, negative_embeddings)))
        two = o.stages == 2
        image, *stage1 = self.prepare_references(reference, o.face_crop,
                                                 (bucket, bucket.half()) if two else (bucket,))
        encoder = self.manifest.components.get("face_encoder")
        scored = encoder is not None and encoder.backend == "onnxruntime" and o.face_crop
        refine = np.array(self.manifest.two_stage.sigmas, np.float32) if two else None
        return Prepared(o, bucket, scales, sigmas, image, *given, facesim_scored=scored,
                        stage1_image=stage1[0] if two else None, refine_sigmas=refine)

    def resolve(self, options: GenerationOptions) -> GenerationOptions:
        """`options` with the bundle's values in place of None: steps (the sigmas' count), stages, guidance scales
        and the bucket's size (an InputError when the bundle has no such bucket). The app shows these."""
        o, g = options, self.manifest.guidance
        bucket = self.manifest.find_bucket(o.frames, o.height, o.width)
        stages = self.manifest.default_stages if o.stages is None else o.stages
        if stages == 2 and self.manifest.two_stage is None:
            raise InputError("this bundle has one stage (no upsampler and refinement LoRA): pass --stages 1 or "
                             "leave it out, or rebuild it with --upsampler FILE --refine-lora FILE")
        return replace(o, steps=len(self.sigmas(o.steps, o.distilled)) - 1, stages=stages, frames=bucket.frames,
                       height=bucket.height, width=bucket.width,
                       text_scale=g.text_scale if o.text_scale is None else o.text_scale,
                       ref_scale=g.ref_scale if o.ref_scale is None else o.ref_scale)

    def generate_prepared(self, prepared: Prepared,
                          on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Run what `prepare` checked: encode, sample (one stage, or two: half size, upsample, refine),
        decode, score, write."""
        o, image = prepared.options, prepared.image
        self.bucket = prepared.bucket
        # the reference is encoded before the prompts: the VAE encoder's stage then carries nothing (the
        # prompt embeddings are not yet made), and only a few reference tokens ride into the text stage
        reference_tokens = self.encode_reference(image)
        stage1_tokens = None if prepared.stage1_image is None else self.encode_reference(prepared.stage1_image)
        self._stage_done("vae_encoder")
        # the prompts not given nor cached go through Gemma together, then through the head together
        self.prompts.fill([p for p, e in ((o.prompt, prepared.text), (o.negative_prompt, prepared.negative))
                           if e is None])
        text = (self._embeddings(o.prompt, prepared.text), self._embeddings(o.negative_prompt, prepared.negative))
        total = prepared.total_steps

        def steps_from(first: int) -> Callable[[int], None] | None:
            return (lambda i: on_step(first + i, total)) if on_step else None

        if stage1_tokens is None:
            cond = smp.Conditioning(reference_tokens, *text)
            latent = smp.sample(self.denoiser, self.initial_noise(o.seed), prepared.sigmas, cond, prepared.scales,
                                o.max_batch, on_step=steps_from(0), feed_sigma=self.feeds_sigma)
            self._stage_done("dit")
        else:
            latent = self.two_stage(prepared, reference_tokens, stage1_tokens, text, steps_from)
        frames = self.decode(latent, o.seed)
        self._stage_done("vae_decoder")
        score = self.facesim(frames, image) if prepared.facesim_scored else None
        if self.engines.plan == "staged":
            self._embedder = None  # the face encoder's session, released like the other stages
        result = GenerationResult(frames, latent, image, score, facesim_scored=prepared.facesim_scored)
        files = self.write(result, o.output) if o.output is not None else {}
        return replace(result, files=files)

    def two_stage(self, prepared: Prepared, reference_tokens: np.ndarray, stage1_tokens: np.ndarray,
                  text: tuple[Embedding, Embedding],
                  steps_from: Callable[[int], Callable[[int], None] | None]) -> np.ndarray:
        """Guided sampling at the half-size grid (`dit`, its RoPE tables, the reference encoded at that size),
        the x2 `upsampler`, re-noise to the refinement's first sigma (seed + 2), then `dit_refine` over the
        refinement sigmas at the output grid, one unguided stream (text + reference). Returns the output
        bucket's video tokens [1, N_video, C]. ltx-pipelines' TI2VidTwoStagesPipeline, docs/design.md."""
        o, b = prepared.options, prepared.bucket
        half = b.half()
        stage1 = smp.sample(self.denoiser_for("dit", stage1=True), self.initial_noise(o.seed, half),
                            prepared.sigmas, smp.Conditioning(stage1_tokens, *text), prepared.scales, o.max_batch,
                            on_step=steps_from(0), feed_sigma=self.feeds_sigma)
        self._stage_done("dit")
        upsampled = self.upsample(stage1, half)
        self._stage_done("upsampler")
        refine_sigma = any(t.name == smp.SIGMA_INPUT for t in self.manifest.components["dit_refine"].inputs)
        latent = smp.sample(self.denoiser_for("dit_refine"), self.refine_noise(o.seed), prepared.refine_sigmas,
                            smp.Conditioning(reference_tokens, *text), UNGUIDED, o.max_batch,
                            on_step=steps_from(len(prepared.sigmas) - 1), feed_sigma=refine_sigma,
                            start=upsampled)
        self._stage_done("dit_refine")
        return latent

    def facesim(self, frames: np.ndarray, reference: np.ndarray) -> float | None:
        from stdrc.runtime import face

        entry = self.manifest.components["face_encoder"]
        if self._embedder is None:
            self.check_hashes()
            self._embedder = face.FaceEmbedder(bundle_path(self.bundle_dir, entry.file))
        try:
            result = face.facesim(frames, reference, self._face_detector(), self._embedder)
        except NoFaceError:
            return None
        return result.value  # None when no sampled frame has a face, as `stdrc facesim` says n/a

    def write(self, result: GenerationResult, output: str | Path) -> dict[str, str]:
        output = Path(output)
        codec = write_video(result.frames, output, self.bucket.fps)
        sheet = output.with_name(output.stem + "_sheet.png")
        write_png(contact_sheet(result.frames), sheet)
        return {"video": str(output), "contact_sheet": str(sheet), "codec": codec}
