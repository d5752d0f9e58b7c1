"""Two-stage generation (issue 27) in the Python runtime, on the shared tiny two-stage bundle: guided half-size
sampling, the x2 upsampler, re-noise, the unguided refinement, decode at the output size; progress over both
stages; the staged memory plan; `--stages 1` equal to a one-stage bundle of the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime import sampler as smp
from stdrc.runtime.errors import InputError
from stdrc.runtime.options import GenerationOptions
from stdrc.runtime.pipeline import Pipeline

PROMPT, SEED, STEPS = "a woman waving", 4, 3
TWO_STAGE_BUNDLES = {"tiny": "two_stage_bundle", "tiny23": "two_stage_tiny23_bundle"}  # tests/conftest.py fixtures


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def pipe(two_stage_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(two_stage_bundle, prompt_cache=None)


@pytest.fixture(scope="module")
def result(pipe: Pipeline, astronaut_png: Path):
    steps: list[tuple[int, int]] = []
    out = pipe.generate(astronaut_png, prompt=PROMPT, seed=SEED, steps=STEPS,
                        on_step=lambda i, total: steps.append((i, total)))
    return out, steps


def test_prepare_resolves_two_stages_from_the_bundle(pipe: Pipeline, astronaut_png: Path) -> None:
    m = pipe.manifest
    assert m.two_stage is not None and m.default_stages == 2
    prepared = pipe.prepare(astronaut_png, GenerationOptions(PROMPT, steps=STEPS))
    b, h = prepared.bucket, prepared.bucket.half()
    assert prepared.options.stages == 2 and (b.height, b.width) == (64, 128)
    assert prepared.image.shape == (b.height, b.width, 3) and prepared.stage1_image.shape == (h.height, h.width, 3)
    np.testing.assert_array_equal(prepared.refine_sigmas, np.array(m.two_stage.sigmas, np.float32))
    assert prepared.total_steps == STEPS + len(m.two_stage.sigmas) - 1
    one = pipe.prepare(astronaut_png, GenerationOptions(PROMPT, steps=STEPS, stages=1))
    assert one.stage1_image is None and one.refine_sigmas is None and one.total_steps == STEPS
    assert pipe.engines.loaded() == []


def test_two_stages_generate_at_the_output_size(pipe: Pipeline, result) -> None:
    out, steps = result
    b = pipe.manifest.bucket
    total = STEPS + len(pipe.manifest.two_stage.sigmas) - 1
    assert out.frames.shape == (b.frames, b.height, b.width, 3) and out.frames.dtype == np.uint8
    assert out.latent.shape == (1, b.video_tokens, pipe.manifest.model_config.dit.in_channels)
    assert steps == [(i, total) for i in range(total)]  # one bar over both stages


def test_two_stages_are_the_stages_composed(pipe: Pipeline, result, astronaut_png: Path) -> None:
    """The result is stage 1 (guided, half grid, its RoPE and reference) -> upsampler -> re-noise (seed + 2)
    -> `dit_refine` (one unguided stream at the output grid), each run here by hand through the same engines;
    and each stage matters (the one-stage path, or a refinement of another start, differ)."""
    out, _ = result
    prepared = pipe.prepare(astronaut_png, GenerationOptions(PROMPT, seed=SEED, steps=STEPS))
    b, h = prepared.bucket, prepared.bucket.half()
    np.testing.assert_array_equal(prepared.image, out.reference)
    pipe.bucket = b
    text = (pipe.prompts(PROMPT), pipe.prompts(""))
    ref_h, ref_b = pipe.encode_reference(prepared.stage1_image), pipe.encode_reference(prepared.image)
    assert ref_h.shape[1] == h.reference_tokens and ref_b.shape[1] == b.reference_tokens
    calls: list[tuple[int, int]] = []

    def stage1(**feeds):
        calls.append(feeds["latent"].shape[:2])
        return pipe.denoiser_for("dit", stage1=True)(**feeds)

    x1 = smp.sample(stage1, pipe.initial_noise(SEED, h), prepared.sigmas, smp.Conditioning(ref_h, *text),
                    prepared.scales)
    assert set(calls) == {(3, h.tokens)}  # three guidance streams at the half grid
    up = pipe.upsample(x1, h)
    assert up.shape == (1, b.video_tokens, x1.shape[2])
    calls.clear()

    def refine(**feeds):
        calls.append(feeds["latent"].shape[:2])
        return pipe.denoiser_for("dit_refine")(**feeds)

    x2 = smp.sample(refine, pipe.refine_noise(SEED), prepared.refine_sigmas, smp.Conditioning(ref_b, *text),
                    smp.GuidanceScales(1.0, 1.0), start=up)
    assert calls == [(1, b.tokens)] * (len(prepared.refine_sigmas) - 1)  # one stream at the output grid
    assert rel_l2(x2, out.latent) <= 1e-6
    one = pipe.generate(astronaut_png, prompt=PROMPT, seed=SEED, steps=STEPS, stages=1)
    assert rel_l2(one.latent, out.latent) > 1e-2


def test_staged_plan_opens_each_stage_once(two_stage_bundle: Path, astronaut_png: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_bundle(two_stage_bundle, memory_plan="staged", prompt_cache=None)
    events: list[tuple[str, str, list[str]]] = []
    pipe.engines.on_stage = lambda event, name: events.append((event, name, list(pipe.engines.loaded())))
    pipe.generate(astronaut_png, prompt=PROMPT, seed=SEED, steps=2)
    order = ["vae_encoder", "text_gemma", "text_head", "dit", "upsampler", "dit_refine", "vae_decoder"]
    assert pipe.engines.opened == order and pipe.engines.loaded() == []
    for name in order:  # alone while it runs, released when its stage ends
        assert ("opened", name, [name]) in events and ("done", name, [name]) in events
    pipe.generate(astronaut_png, prompt=PROMPT, seed=SEED, steps=2, stages=1)
    assert pipe.engines.opened == order + ["vae_encoder", "dit", "vae_decoder"]  # one stage: no upsampler


def test_memory_plan_covers_the_stage_components(pipe: Pipeline) -> None:
    from stdrc.runtime.memory import memory_needs
    from stdrc.runtime.pipeline import weights_and_activations

    report = memory_needs(*weights_and_activations(pipe.bundle_dir, pipe.manifest))
    stages = [(s.stage, s.component) for s in report.stages]
    assert stages[1:3] == [("text", "text_gemma"), ("text head", "text_head")]
    assert stages[3:6] == [("sampling", "dit"), ("upsample", "upsampler"), ("refine", "dit_refine")]
    act = pipe.manifest.memory.activation_bytes
    assert 0 < act["dit_refine"] < act["dit"] and act["upsampler"] > 0


def test_two_stages_on_a_one_stage_bundle_is_refused(tiny_bundle: Path, astronaut_png: Path) -> None:
    pipe = Pipeline.for_checks(tiny_bundle)
    with pytest.raises(InputError, match="this bundle has one stage"):
        pipe.prepare(astronaut_png, GenerationOptions(PROMPT, stages=2))
    assert pipe.engines.opened == []


def test_cli_bar_names_each_stage(two_stage_bundle: Path, astronaut_png: Path, tmp_path: Path, capsys) -> None:
    from stdrc.cli import main

    out = tmp_path / "v.mp4"
    rc = main(["generate", "--bundle", str(two_stage_bundle), "--ref", str(astronaut_png), "--prompt", PROMPT,
               "--steps", "2", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and out.is_file()
    assert "stage 1/2 (half size)" in err and "stage 2/2 (refine)" in err


@pytest.mark.slow  # a one-stage bundle of its own (the same seeded weights, the same bucket)
def test_stages_1_equals_a_one_stage_bundle(two_stage_bundle: Path, cache_dir: Path, tmp_path_factory,
                                            astronaut_png: Path) -> None:
    from stdrc.engines.build import BuildConfig, build_engines

    one = build_engines(BuildConfig(out=tmp_path_factory.mktemp("b") / "one", cache_dir=cache_dir,
                                    backend="onnxruntime", progress=False, buckets=("9x128x64",), rope="input"))
    a = Pipeline.from_bundle(two_stage_bundle, prompt_cache=None).generate(
        astronaut_png, prompt=PROMPT, seed=SEED, steps=STEPS, stages=1)
    b = Pipeline.from_bundle(one, prompt_cache=None).generate(astronaut_png, prompt=PROMPT, seed=SEED, steps=STEPS)
    assert rel_l2(a.latent, b.latent) <= 1e-6
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1


# -- parity with a loop built from ltx-core's pieces ---------------------------------------------------------


class LtxCoreDenoiser:
    """ltx-core's `LTXModel` as the sampler's denoiser: the stream batch's tokens as one video `Modality` at the
    grid's TASS positions (reference tokens at timestep 0, hidden from the no-reference stream by the mask)."""

    def __init__(self, model, positions):
        self.model, self.positions = model, positions

    def __call__(self, latent, timestep, context, context_mask, attn_mask, **sigma):
        import torch
        from ltx_core.guidance.perturbations import BatchedPerturbationConfig
        from ltx_core.model.transformer.modality import Modality

        x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dict(
            latent=latent, timestep=timestep, context=context, context_mask=context_mask, attn_mask=attn_mask).items()}
        b, n = x["latent"].shape[:2]
        dense = x["attn_mask"][:, None, :].expand(-1, n, -1).float()
        video = Modality(latent=x["latent"], sigma=x["timestep"][:, 0], timesteps=x["timestep"],
                         positions=self.positions.expand(b, -1, -1, -1), context=x["context"],
                         context_mask=x["context_mask"], attention_mask=dense)
        with torch.no_grad():
            out, _ = self.model(video=video, audio=None, perturbations=BatchedPerturbationConfig.empty(b))
        return out.numpy()


def ltx_core_fused(ltx, lora_path: Path, strength: float):
    """A copy of `ltx` with the LoRA fused by ltx-core's `apply_loras`. It fuses into bf16 weights only (as
    LTX files ship), so the seeded fp32 weights go in as their bf16 part and the exact fp32 remainder
    (w - bf16(w)) is added back after; the file's bf16 factors are handed over as fp32 values (ltx-core would
    multiply a bf16 file's factors in bf16, the engine in fp32: test_refine.py measures both)."""
    import copy

    import torch
    from ltx_core.loader import LoraStateDictWithStrength, SafetensorsStateDictLoader, SDOps, StateDict, apply_loras

    from stdrc.export.refine import COMFY_PREFIX

    weights = {k: v.detach() for k, v in ltx.state_dict().items()}
    high = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    ops = SDOps("comfy").with_matching().with_replacement(COMFY_PREFIX, "")
    lsd = SafetensorsStateDictLoader().load(str(lora_path), sd_ops=ops)
    factors = StateDict({k: v.float() for k, v in lsd.sd.items()}, torch.device("cpu"), 0, {torch.float32})
    fused = apply_loras(StateDict(high, torch.device("cpu"), 0, {torch.bfloat16}),
                        [LoraStateDictWithStrength(factors, strength)], dtype=torch.float32).sd
    fused = {k: fused[k] + (weights[k] - high[k].float()) for k in weights}
    model = copy.deepcopy(ltx)
    model.load_state_dict(fused, strict=True)
    return model.eval()


@pytest.mark.slow  # the tiny models in PyTorch, 3 + 3 ltx-core DiT steps (tiny23: a bundle build of its own)
@pytest.mark.parametrize("preset", ["tiny", "tiny23"])
def test_two_stages_equal_a_loop_of_ltx_core_pieces(preset: str, request: pytest.FixtureRequest, astronaut_png: Path,
                                                     cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole two-stage generation in latent space == a loop of ltx-core's pieces on the bundle's weights:
    its LTXModel at the half grid (three guidance streams, our decoupled text/reference formula) stepped by its
    EulerDiffusionStep, its LatentUpsampler through `upsample_video` with its VAE encoder's statistics, its
    GaussianNoiser (drawing our seed + 2 noise), then its LTXModel with the refinement LoRA fused by its
    `apply_loras`, one stream, Euler over the two_stage sigmas. rel L2 <= 1e-5 (fp32). tiny23 (LTX-2.3's DiT):
    the stream's sigma goes to both `dit` and `dit_refine` as their `sigma` input (tiny's DiT has none)."""
    import torch
    from ltx_core.components.diffusion_steps import EulerDiffusionStep
    from ltx_core.components.noisers import GaussianNoiser
    from ltx_core.model.upsampler import upsample_video
    from ltx_core.types import LatentState

    from stdrc.engines.refine import random_refine_lora
    from stdrc.export.config import get_preset
    from stdrc.export.models import load_models
    from stdrc.export.reference import token_positions
    from stdrc.export.upsampler import seeded_upsampler
    from stdrc.runtime.manifest import sha256_file
    from stdrc.runtime.pipeline import patchify, unpatchify

    pipe = Pipeline.from_bundle(request.getfixturevalue(TWO_STAGE_BUNDLES[preset]), prompt_cache=None)
    m = pipe.manifest
    fed: dict[str, list[bool]] = {}  # per engine: whether each call's `sigma` was its stream's timestep
    run = pipe.run

    def recording(component, feeds, keep=()):
        if smp.SIGMA_INPUT in feeds:
            fed.setdefault(component, []).append(np.array_equal(feeds[smp.SIGMA_INPUT], feeds["timestep"][:, 0]))
        return run(component, feeds, keep)

    monkeypatch.setattr(pipe, "run", recording)
    out = pipe.generate(astronaut_png, prompt=PROMPT, seed=SEED, steps=STEPS)
    monkeypatch.undo()
    prepared = pipe.prepare(astronaut_png, GenerationOptions(PROMPT, seed=SEED, steps=STEPS))
    b, h = prepared.bucket, prepared.bucket.half()
    assert out.frames.shape == (b.frames, b.height, b.width, 3)
    sigma_engines = {k for k in ("dit", "dit_refine") if smp.SIGMA_INPUT in [t.name for t in m.components[k].inputs]}
    assert sigma_engines == ({"dit", "dit_refine"} if preset == "tiny23" else set())
    assert set(fed) == sigma_engines and all(all(v) for v in fed.values())
    pipe.bucket = b
    # the inputs every path shares: the reference encoded at both sizes, the prompts, the seeds' noise
    text = (pipe.prompts(PROMPT), pipe.prompts(""))
    ref_h, ref_b = pipe.encode_reference(prepared.stage1_image), pipe.encode_reference(prepared.image)
    noise1, noise2 = pipe.initial_noise(SEED, h), pipe.refine_noise(SEED)

    models = load_models(preset, components=("dit", "vae_encoder"), seed=m.model_config.seed)
    lora = random_refine_lora(get_preset(preset), m.model_config.seed, cache_dir / "refine_lora").path
    assert sha256_file(lora) == m.two_stage.lora.sha256  # the bundle's own refinement LoRA
    euler = EulerDiffusionStep()

    def positions(grid):
        return token_positions((grid.latent_frames, grid.latent_height, grid.latent_width), m.reference.layout,
                               grid.fps)

    def loop(denoise, x, sigmas, cond, scales):
        s = torch.from_numpy(sigmas)
        for i in range(len(sigmas) - 1):
            streams = scales.streams(float(sigmas[i]))
            d = smp.combine(smp.denoise_streams(denoise, streams, x.numpy(), float(sigmas[i]), cond, 3), scales)
            x = euler.step(x, torch.from_numpy(d), s, i)
        return x

    # stage 1: guided, half grid
    base = LtxCoreDenoiser(models.dit.ltx.eval(), positions(h))
    x1 = loop(base, torch.from_numpy(noise1) * float(prepared.sigmas[0]), prepared.sigmas,
              smp.Conditioning(ref_h, *text), prepared.scales)
    # x2 upsample in latent space, ltx-core's arithmetic around its LatentUpsampler
    with torch.no_grad():
        up = upsample_video(torch.from_numpy(unpatchify(x1.numpy(), (h.latent_frames, h.latent_height,
                                                                       h.latent_width))),
                            models.vae_encoder, seeded_upsampler(m.model_config.seed).eval())
    x_up = torch.from_numpy(patchify(up.numpy()))
    np.testing.assert_allclose(pipe.upsample(x1.numpy(), h), x_up.numpy(), atol=1e-4)
    # re-noise: ltx-core's noiser, its draw replaced by our seed + 2 noise
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: torch.from_numpy(noise2.copy()))
    state = LatentState(latent=x_up, denoise_mask=torch.ones(1, b.video_tokens, 1), positions=positions(b),
                        clean_latent=x_up)
    x = GaussianNoiser(torch.Generator())(state, noise_scale=float(m.two_stage.sigmas[0])).latent
    monkeypatch.undo()
    # stage 2: the LoRA fused into ltx-core's model, one stream, the output grid
    refine = LtxCoreDenoiser(ltx_core_fused(models.dit.ltx, lora, m.two_stage.lora.strength), positions(b))
    x2 = loop(refine, x, prepared.refine_sigmas, smp.Conditioning(ref_b, *text), smp.GuidanceScales(1.0, 1.0))
    err = rel_l2(out.latent, x2.numpy())
    print(f"two-stage latent vs the ltx-core loop: rel L2 {err:.2e}")
    assert err <= 1e-5
