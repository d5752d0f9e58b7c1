"""Guidance algebra and the sigma schedule (numpy, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ltx_core.components.schedulers import LTX2Scheduler

from stdrc.runtime import sampler as smp
from stdrc.runtime.errors import InputError

VIDEO, REF, CH = 6, 3, 4


class ToyDenoiser:
    """A deterministic non-linear function of every input, recording the batch sizes it is called with."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, latent, timestep, context, context_mask, attn_mask):
        self.batches.append(latent.shape[0])
        ref_visible = (attn_mask[:, VIDEO:].mean(axis=1) * latent[:, VIDEO:].mean(axis=(1, 2)))[:, None, None]
        text = context.mean(axis=(1, 2))[:, None, None]
        return np.tanh(latent * (1 + timestep[..., None]) + ref_visible + text).astype(np.float32)


def _cond(seed: int = 0) -> smp.Conditioning:
    r = np.random.default_rng(seed)
    return smp.Conditioning(
        reference=r.standard_normal((1, REF, CH), dtype=np.float32),
        text=(r.standard_normal((1, 5, 8), dtype=np.float32), np.ones((1, 5), np.int64)),
        no_text=(r.standard_normal((1, 5, 8), dtype=np.float32), np.ones((1, 5), np.int64)),
    )


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, VIDEO, CH), dtype=np.float32)


def test_unit_scales_equal_the_conditional_stream() -> None:
    den, cond, x = ToyDenoiser(), _cond(), _x()
    scales = smp.GuidanceScales(text=1.0, ref=1.0)
    assert scales.streams() == (smp.FULL,)
    all_three = smp.denoise_streams(den, (smp.UNCOND, smp.REF, smp.FULL), x, 0.5, cond, 3)
    guided = smp.combine(all_three, scales)
    assert np.allclose(guided, all_three[smp.FULL], atol=1e-6)


@pytest.mark.parametrize("text,ref", [(4.0, 1.0), (1.0, 2.5), (3.0, 2.0)])
def test_skipping_streams_equals_the_full_formula(text: float, ref: float) -> None:
    den, cond, x = ToyDenoiser(), _cond(), _x()
    d = smp.denoise_streams(den, (smp.UNCOND, smp.REF, smp.FULL), x, 0.7, cond, 3)
    formula = d[smp.UNCOND] + ref * (d[smp.REF] - d[smp.UNCOND]) + text * (d[smp.FULL] - d[smp.REF])
    scales = smp.GuidanceScales(text=text, ref=ref)
    needed = smp.denoise_streams(den, scales.streams(), x, 0.7, cond, 3)
    assert len(needed) == (2 if ref == 1.0 else 3)
    assert np.allclose(smp.combine(needed, scales), formula, atol=1e-5)


def test_batched_equals_split() -> None:
    cond, x = _cond(), _x()
    sigmas = smp.ltx2_sigmas(4)
    scales = smp.GuidanceScales(text=3.0, ref=2.0)
    batched, split = ToyDenoiser(), ToyDenoiser()
    a = smp.sample(batched, x, sigmas, cond, scales, max_batch=3)
    b = smp.sample(split, x, sigmas, cond, scales, max_batch=1)
    assert batched.batches == [3] * 4 and split.batches == [1] * 12
    assert np.allclose(a, b, atol=1e-6)


def test_no_reference_stream_hides_reference_keys() -> None:
    feeds = smp._stream_batch([smp.UNCOND, smp.REF, smp.FULL], _x(), 0.3, _cond())
    assert feeds["attn_mask"][:, VIDEO:].tolist() == [[0] * REF, [1] * REF, [1] * REF]
    assert np.all(feeds["timestep"][:, VIDEO:] == 0) and np.all(feeds["timestep"][:, :VIDEO] == np.float32(0.3))
    cond = _cond()
    assert np.array_equal(feeds["context"][0], cond.no_text[0][0])
    assert np.array_equal(feeds["context"][2], cond.text[0][0])


def test_guidance_interval_runs_conditional_only_outside() -> None:
    scales = smp.GuidanceScales(text=3.0, ref=2.0, interval=(0.2, 0.8))
    assert scales.streams(0.9) == (smp.FULL,)
    assert scales.streams(0.5) == (smp.UNCOND, smp.REF, smp.FULL)
    den = ToyDenoiser()
    smp.sample(den, _x(), np.array([1.0, 0.5, 0.0], np.float32), _cond(), scales)
    assert den.batches == [1, 3]


def test_cfg_rescale_matches_conditional_std() -> None:
    d = smp.denoise_streams(ToyDenoiser(), (smp.UNCOND, smp.REF, smp.FULL), _x(), 0.6, _cond(), 3)
    out = smp.combine(d, smp.GuidanceScales(text=5.0, ref=3.0, rescale=1.0))
    assert np.isclose(out.std(), d[smp.FULL].std(), rtol=1e-4)


@pytest.mark.parametrize("steps", [2, 8, 30, 40])
def test_sigmas_equal_ltx_core_scheduler(steps: int) -> None:
    theirs = LTX2Scheduler().execute(steps=steps).numpy()
    assert np.allclose(smp.ltx2_sigmas(steps), theirs, atol=1e-6)
    tokens_latent = torch.zeros(1, 128, 2, 8, 8)
    theirs = LTX2Scheduler().execute(steps=steps, latent=tokens_latent).numpy()
    assert np.allclose(smp.ltx2_sigmas(steps, tokens=128), theirs, atol=1e-6)


def test_single_step_is_one_plain_euler_step() -> None:
    assert np.allclose(smp.ltx2_sigmas(1), [1.0, 0.0], atol=1e-6)


def test_bad_steps() -> None:
    with pytest.raises(InputError, match="--steps 1 or more"):
        smp.ltx2_sigmas(0)


def test_fixed_inputs_are_built_once_per_stream_set() -> None:
    """Context and masks reach the DiT as the same arrays at every step (engines keep them bound);
    only latent and timestep are new each step."""
    seen: list[dict[str, np.ndarray]] = []
    toy = ToyDenoiser()

    def recording(**feeds):
        seen.append(feeds)
        return toy(**feeds)

    scales = smp.GuidanceScales(text=3.0, ref=2.0, interval=(0.2, 0.8))
    sigmas = np.array([1.0, 0.7, 0.5, 0.1, 0.0], np.float32)  # streams: full, 3, 3, full (interval)
    smp.sample(recording, _x(), sigmas, _cond(), scales)
    assert toy.batches == [1, 3, 3, 1]
    for a, b in ((seen[0], seen[3]), (seen[1], seen[2])):
        assert all(a[k] is b[k] for k in smp.FIXED_INPUTS)
        assert not any(a[k] is b[k] for k in smp.STEP_INPUTS)
    assert seen[0]["context"] is not seen[1]["context"]
    # and the values are exactly what building every batch anew gives
    fresh = smp._stream_batch([smp.UNCOND, smp.REF, smp.FULL], _x(), 0.7, _cond())
    for k in smp.FIXED_INPUTS:
        assert np.array_equal(seen[1][k], fresh[k])


def test_start_latent_is_renoised_and_stepped_as_ltx_core_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two-stage refinement: `sample(..., start=clean)` equals ltx-core's GaussianNoiser (its noise being ours)
    followed by its Euler steps on the one (unguided) stream's denoised prediction."""
    from ltx_core.components.diffusion_steps import EulerDiffusionStep
    from ltx_core.components.noisers import GaussianNoiser
    from ltx_core.types import LatentState

    from stdrc.runtime.schema import STAGE2_SIGMAS

    den, cond, noise, clean = ToyDenoiser(), _cond(), _x(1), _x(2)
    sigmas = np.array(STAGE2_SIGMAS, np.float32)
    ours = smp.sample(den, noise, sigmas, cond, smp.GuidanceScales(text=1.0, ref=1.0), start=clean)

    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: torch.from_numpy(noise.copy()))  # its draw = ours
    state = LatentState(latent=torch.from_numpy(clean), denoise_mask=torch.ones(1, VIDEO, 1),
                        positions=torch.zeros(1, 3, VIDEO, 2), clean_latent=torch.from_numpy(clean))
    x = GaussianNoiser(torch.Generator())(state, noise_scale=float(sigmas[0])).latent
    monkeypatch.undo()
    step, s = EulerDiffusionStep(), torch.from_numpy(sigmas)
    for i in range(len(sigmas) - 1):
        d = smp.denoise_streams(den, (smp.FULL,), x.numpy(), float(sigmas[i]), cond, 1)[smp.FULL]
        x = step.step(x, torch.from_numpy(d), s, i)
    np.testing.assert_allclose(ours, x.numpy(), rtol=0, atol=1e-6)
    assert np.abs(ours - smp.sample(den, noise, sigmas, cond, smp.GuidanceScales(1.0, 1.0))).max() > 1e-2
    with pytest.raises(ValueError, match="start latent"):
        smp.sample(den, noise, sigmas, cond, smp.GuidanceScales(1.0, 1.0), start=clean[:, :2])
