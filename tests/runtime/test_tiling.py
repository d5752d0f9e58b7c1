"""Tiled VAE decode: tile placement, blending, and a tiled bundle against the whole-latent decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stdrc.runtime.errors import InputError
from stdrc.runtime.tiling import DecodeTiling, decode_tiling, tile_starts, tiled_decode


@pytest.mark.parametrize("length, size, overlap", [(24, 16, 2), (16, 16, 2), (3, 2, 1), (40, 7, 3), (9, 4, 0)])
def test_tiles_cover_with_the_overlap(length: int, size: int, overlap: int) -> None:
    starts = tile_starts(length, size, overlap)
    assert starts[0] == 0 and starts[-1] + min(size, length) == length
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap >= overlap
    assert starts == sorted(set(starts))


def _pointwise_decoder(scale: int):
    """A decoder whose every output pixel depends on its own latent only: tiling must reproduce it exactly."""
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((3, 4)).astype(np.float32)

    def decode(latent: np.ndarray) -> np.ndarray:
        pixels = np.einsum("oc,bcfhw->bofhw", weights, latent)
        return np.repeat(np.repeat(pixels, scale, axis=3), scale, axis=4)

    return decode


@pytest.mark.parametrize("height, width, tile, overlap", [(5, 7, 3, 1), (4, 4, 2, 1), (6, 9, 4, 2), (3, 8, 3, 0)])
def test_blend_reproduces_a_local_decoder_exactly(height: int, width: int, tile: int, overlap: int) -> None:
    latent = np.random.default_rng(0).standard_normal((1, 4, 2, height, width)).astype(np.float32)
    decode = _pointwise_decoder(4)
    calls = []

    def counted(part: np.ndarray) -> np.ndarray:
        calls.append(part.shape)
        return decode(part)

    tiled = tiled_decode(counted, latent, DecodeTiling(tile, tile, overlap), scale=4)
    np.testing.assert_allclose(tiled, decode(latent), rtol=1e-5, atol=1e-5)
    assert {shape[-2:] for shape in calls} == {(min(tile, height), min(tile, width))}  # one static engine shape
    assert len(calls) == len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


def test_seams_are_blended_not_cut() -> None:
    """Two tiles that disagree meet in a linear ramp, not a step."""
    latent = np.zeros((1, 1, 1, 1, 4), np.float32)

    def decode(part: np.ndarray) -> np.ndarray:
        value = 1.0 if decode.calls == 0 else 0.0
        decode.calls += 1
        return np.full((1, 1, 1, 1, part.shape[-1]), value, np.float32)

    decode.calls = 0
    row = tiled_decode(decode, latent, DecodeTiling(1, 3, 2), scale=1)[0, 0, 0, 0]
    assert row[0] == 1.0 and row[-1] == 0.0
    assert np.all(np.diff(row) < 0)


def test_tiling_policy() -> None:
    assert decode_tiling(512, 768, None, 64) == DecodeTiling(16, 16, 2)
    assert decode_tiling(64, 96, None, 64) is None  # small: one tile
    assert decode_tiling(512, 768, 0, 64) is None
    assert decode_tiling(64, 96, 64, 32) == DecodeTiling(2, 2, 1)
    for tile, overlap in ((100, 64), (32, 0), (128, 48), (128, 128)):
        with pytest.raises(InputError, match="pick e.g."):
            decode_tiling(512, 768, tile, overlap)


@pytest.fixture(scope="module")
def tiled_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("bundles") / "tiny-tiled"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="onnxruntime", decode_tile=64,
                                     decode_overlap=32, progress=False))


def test_tiled_decode_matches_ltx_core_tiled_decode(tiled_bundle: Path, tiny_models) -> None:
    """Same tiles (64 px, 32 px overlap on 64x96): ONNX Runtime tile by tile == ltx-core's `tiled_decode` (fp32)."""
    import torch
    from ltx_core.model.video_vae.tiling import SpatialTilingConfig, TemporalTilingConfig, TilingConfig

    from stdrc.runtime.manifest import read_manifest
    from stdrc.runtime.pipeline import Pipeline

    manifest = read_manifest(tiled_bundle)
    assert manifest.decode["tile_width"] == 2 and manifest.decode["overlap"] == 1
    assert manifest.components["vae_decoder"].inputs[0].shape[-2:] == (2, 2)
    b = manifest.bucket
    latent = np.random.default_rng(2).standard_normal(
        (1, 128, b.latent_frames, b.latent_height, b.latent_width)).astype(np.float32)
    ours = Pipeline.from_bundle(tiled_bundle).decode_latent(latent)

    decoder = tiny_models.vae_decoder
    scale, decoder.decode_noise_scale = decoder.decode_noise_scale, 0.0  # noise is mixed in before the engine
    try:
        with torch.no_grad():
            tiles = TilingConfig(SpatialTilingConfig(64, 32), TemporalTilingConfig(16, 0))  # time: one tile
            chunks = decoder.tiled_decode(
                torch.from_numpy(latent), tiles,
                timestep=torch.full((1,), manifest.model_config["vae"]["decode_timestep"]))
            expected = torch.cat(list(chunks), dim=2).numpy()
    finally:
        decoder.decode_noise_scale = scale
    assert ours.shape == expected.shape == (1, 3, b.frames, b.height, b.width)
    rel = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert rel <= 1e-5, rel


def test_tiled_bundle_generates(tiled_bundle: Path, tiny_bundle: Path, astronaut_png: Path) -> None:
    """Only the decode differs from the untiled bundle: same latents, frames of the bucket's shape."""
    from stdrc.runtime.pipeline import Pipeline

    a = Pipeline.from_bundle(tiled_bundle).generate(reference=astronaut_png, prompt="a woman smiles", seed=1, steps=2)
    b = Pipeline.from_bundle(tiny_bundle).generate(reference=astronaut_png, prompt="a woman smiles", seed=1, steps=2)
    np.testing.assert_array_equal(a.latent, b.latent)
    assert a.frames.shape == b.frames.shape == (9, 64, 96, 3)
    assert not np.array_equal(a.frames, b.frames)  # the tiny VAE sees the whole width: tiles differ from it


def test_tiled_bundle_verifies(tiled_bundle: Path) -> None:
    from stdrc.engines.verify import verify_bundle

    reports = verify_bundle(tiled_bundle)
    assert reports["vae_decoder"].ok, reports["vae_decoder"]
