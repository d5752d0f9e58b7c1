"""The runtime on an LTX-2.3-flagged bundle (`tiny23`): the DiT's `sigma` input is fed from the manifest,
with the stream's sigma at every step, and generation equals the same sampling over the PyTorch modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime import sampler as smp
from stdrc.runtime.errors import BundleError
from stdrc.runtime.pipeline import Pipeline

PROMPT, SEED, STEPS = "a person waving", 5, 3


@pytest.fixture(scope="module")
def bundle23(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("bundles23") / "tiny23"
    return build_engines(BuildConfig(preset="tiny23", out=out, cache_dir=cache_dir, backend="onnxruntime",
                                     progress=False))


@pytest.mark.slow  # a bundle build of its own
def test_generation_feeds_sigma_and_equals_pytorch(bundle23: Path) -> None:
    from stdrc.calibration.report import TorchDenoiser
    from stdrc.export.models import load_models

    pipe = Pipeline.from_bundle(bundle23)
    assert pipe.feeds_sigma
    assert [t.name for t in pipe.manifest.components["dit"].inputs][-1] == smp.SIGMA_INPUT
    image = np.random.default_rng(7).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    result = pipe.generate(image, prompt=PROMPT, seed=SEED, steps=STEPS, face_crop=False)

    cond = smp.Conditioning(pipe.encode_reference(result.reference), pipe.prompts(PROMPT), pipe.prompts(""))
    g = pipe.manifest.guidance
    scales = smp.GuidanceScales(text=g.text_scale, ref=g.ref_scale)
    noise, sigmas = pipe.initial_noise(SEED), pipe.sigmas(STEPS, False)
    calls: list[tuple[float, np.ndarray]] = []

    def recording(**feeds: np.ndarray) -> np.ndarray:
        calls.append((float(feeds["timestep"][0, 0]), feeds[smp.SIGMA_INPUT]))
        return pipe.denoiser(**feeds)

    again = smp.sample(recording, noise, sigmas, cond, scales, feed_sigma=True)
    assert np.array_equal(again, result.latent)
    for sigma, fed in calls:  # the stream's sigma, one per stream of the batch, fp32
        assert fed.dtype == np.float32 and fed.shape == (3,) and np.all(fed == np.float32(sigma))

    models = load_models("tiny23", components=("dit",))
    _, tables = models.rope(pipe.bucket)
    torch_latent = smp.sample(TorchDenoiser(models.dit, tables.cos, tables.sin), noise, sigmas, cond, scales,
                              feed_sigma=True)
    assert np.abs(torch_latent - result.latent).max() <= 1e-4

    with pytest.raises(BundleError, match="input 'sigma' is missing"):
        smp.sample(pipe.denoiser, noise, sigmas, cond, scales)  # a sampler that forgets it is refused


@pytest.mark.slow  # the bundle above
def test_a_23_bundle_defaults_to_its_familys_steps(bundle23: Path) -> None:
    """tiny23 sets no steps: the manifest records LTX-2.3's 30 (LTX-2: 40) and their sigmas, which Python runs
    when a generation names none (C++ runs the manifest's sigmas too: runtime/cpp/src/manifest.cpp)."""
    from stdrc.export.config import ModelFamily
    from stdrc.runtime.options import GenerationOptions

    pipe = Pipeline.from_bundle(bundle23)
    s = pipe.manifest.sampler
    assert pipe.manifest.model_config.family == ModelFamily.LTX23.value
    assert s.steps == ModelFamily.LTX23.defaults.steps == 30 != ModelFamily.LTX2.defaults.steps
    np.testing.assert_array_equal(np.array(s.sigmas, np.float32), s.schedule(30))
    image = np.random.default_rng(7).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    prepared = pipe.prepare(image, GenerationOptions(PROMPT, face_crop=False))
    assert prepared.options.steps == 30 and len(prepared.sigmas) == 31
    assert prepared.options.text_scale == pipe.manifest.guidance.text_scale == ModelFamily.LTX23.defaults.text_scale


@pytest.mark.slow  # the bundle above
def test_the_23_decoder_takes_the_latent_alone_and_equals_ltx_core(bundle23: Path) -> None:
    """tiny23's VAE is LTX-2.3's kind (no timestep conditioning, zeros padding): the engine's one input is the
    latent, the runtime draws and mixes no decode noise, and its decode equals ltx-core's own `VideoDecoder`
    (whose forward then adds no noise either) built from the preset's 2.3 `vae` config on the same weights."""
    import torch
    from ltx_core.model.video_vae.model_configurator import VideoDecoderConfigurator

    from stdrc.export.config import get_preset
    from stdrc.export.models import load_models

    pipe = Pipeline.from_bundle(bundle23)
    vae = pipe.manifest.model_config.vae
    assert vae.timestep_conditioning is False
    assert [t.name for t in pipe.manifest.components["vae_decoder"].inputs] == ["latent"]
    assert pipe.decode_noise(seed=SEED) is None
    b = pipe.bucket
    tokens = np.random.default_rng(8).standard_normal((1, b.video_tokens, vae.latent_channels)).astype(np.float32)
    ours = pipe.decode_video(tokens, None)
    config = get_preset("tiny23").vae.ltx_config("decoder")
    assert config["vae"]["spatial_padding_mode"] == "zeros" and not config["vae"]["timestep_conditioning"]
    theirs = VideoDecoderConfigurator.from_config(config).eval()
    theirs.load_state_dict(load_models("tiny23", components=("vae_decoder",)).vae_decoder.state_dict())
    latent = torch.from_numpy(tokens).transpose(1, 2).reshape(1, -1, b.latent_frames, b.latent_height,
                                                               b.latent_width)
    with torch.no_grad():
        want = theirs(latent).numpy()
    assert ours.shape == want.shape == (1, 3, b.frames, b.height, b.width)
    assert np.linalg.norm(ours - want) / np.linalg.norm(want) <= 1e-5
