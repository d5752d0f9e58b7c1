"""Tiled VAE decode: tile placement and blending against ltx-core's `tiled_decode`, and a tiled bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiling_cases import GRID, ltx_tiles  # tests/tiling_cases.py: one grid for Python and C++

from stdrc.runtime.errors import BundleError, InputError
from stdrc.runtime.tiling import DecodeTiling, axis_masks, decode_tiling, decoder_tile_dims, tiled_decode


def test_grid_has_one_to_four_tiles_per_axis() -> None:
    counts = set()
    for h, w, t, o in GRID:
        rows, cols = DecodeTiling(t // 32, o // 32).intervals(h, w)
        counts |= {len(rows), len(cols)}
    assert {1, 2, 3, 4} <= counts


@pytest.mark.parametrize("height, width, tile_px, overlap_px", GRID)
def test_placement_and_masks_match_ltx_core(tiny_models, height: int, width: int, tile_px: int,
                                            overlap_px: int) -> None:
    """Same tiles in the same order, same 1-D blend masks (in pixels), for every size of the grid."""
    tiling = DecodeTiling(tile_px // 32, overlap_px // 32)
    rows, cols = tiling.intervals(height, width)
    row_masks, col_masks = axis_masks(rows, tiling.overlap, 32), axis_masks(cols, tiling.overlap, 32)
    ours = [(r, c, rm, cm) for r, rm in zip(rows, row_masks) for c, cm in zip(cols, col_masks)]
    theirs = ltx_tiles(tiny_models.vae_decoder, height, width, tile_px, overlap_px)
    assert len(ours) == len(theirs)
    for (r, c, rm, cm), tile in zip(ours, theirs):
        assert (tile.in_coords[3].start, tile.in_coords[3].stop) == r
        assert (tile.in_coords[4].start, tile.in_coords[4].stop) == c
        np.testing.assert_allclose(rm, tile.masks_1d[3].numpy(), atol=1e-6)
        np.testing.assert_allclose(cm, tile.masks_1d[4].numpy(), atol=1e-6)


def test_default_bucket_places_the_last_tile_at_the_edge() -> None:
    """512x768 (latent 16x24, 512 px tiles, 64 px overlap): columns [0,16) and [14,24), as ltx-core."""
    rows, cols = decode_tiling(512, 768, None, 64).intervals(16, 24)
    assert cols == [(0, 16), (14, 24)]
    assert rows == [(0, 11), (9, 16)]  # the tile scales to the short axis: round(16 * 16 / 24) = 11
    assert decoder_tile_dims(DecodeTiling(16, 2), 16, 24) == {"tile_height": [7, 11, 11], "tile_width": [10, 16, 16]}


def ltx_tiled_decode(decoder, latent: np.ndarray, tile_px: int, overlap_px: int, timestep: float) -> np.ndarray:
    import torch
    from ltx_core.model.video_vae.tiling import SpatialTilingConfig, TemporalTilingConfig, TilingConfig

    scale, decoder.decode_noise_scale = decoder.decode_noise_scale, 0.0  # noise is mixed in before the engine
    try:
        with torch.no_grad():
            tiles = TilingConfig(SpatialTilingConfig(tile_px, overlap_px), TemporalTilingConfig(16, 0))  # time: 1
            chunks = decoder.tiled_decode(torch.from_numpy(latent), tiles, timestep=torch.full((1,), timestep))
            return torch.cat(list(chunks), dim=2).numpy()
    finally:
        decoder.decode_noise_scale = scale


@pytest.mark.parametrize("height, width, tile_px, overlap_px", [(2, 5, 64, 32), (4, 6, 96, 32), (4, 6, 64, 0),
                                                                (3, 8, 96, 32), (7, 4, 128, 64)])
def test_tiled_decode_matches_ltx_core_on_the_tiny_vae(tiny_models, height: int, width: int, tile_px: int,
                                                       overlap_px: int) -> None:
    """The real tiny decoder, tile by tile through our placement and blend == ltx-core's `tiled_decode`."""
    import torch

    decoder = tiny_models.vae_decoder
    timestep = tiny_models.preset.vae.decode_timestep
    latent = np.random.default_rng(height * 10 + width).standard_normal(
        (1, 128, 2, height, width)).astype(np.float32)

    def decode(part: np.ndarray) -> np.ndarray:
        scale, decoder.decode_noise_scale = decoder.decode_noise_scale, 0.0
        try:
            with torch.no_grad():
                return decoder(torch.from_numpy(part), timestep=torch.full((1,), timestep)).numpy()
        finally:
            decoder.decode_noise_scale = scale

    ours = tiled_decode(decode, latent, decode_tiling(32 * height, 32 * width, tile_px, overlap_px))
    expected = ltx_tiled_decode(decoder, latent, tile_px, overlap_px, timestep)
    assert ours.shape == expected.shape == (1, 3, 9, 32 * height, 32 * width)
    rel = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert rel <= 1e-6, rel


def _pointwise_decoder(scale: int):
    """A decoder whose every output pixel depends on its own latent only: tiling must reproduce it exactly."""
    weights = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)

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
        calls.append(part.shape[-2:])
        return decode(part)

    tiling = DecodeTiling(tile, overlap)
    tiled = tiled_decode(counted, latent, tiling, scale=4)
    np.testing.assert_allclose(tiled, decode(latent), rtol=1e-5, atol=1e-5)
    dims = decoder_tile_dims(tiling, height, width)
    assert all(dims["tile_height"][0] <= h <= dims["tile_height"][2] and
               dims["tile_width"][0] <= w <= dims["tile_width"][2] for h, w in calls)  # within the engine's range
    rows, cols = tiling.intervals(height, width)
    assert len(calls) == len(rows) * len(cols)


def test_seams_are_blended_not_cut() -> None:
    """Two tiles that disagree meet in a linear ramp, not a step."""
    latent = np.zeros((1, 1, 1, 1, 4), np.float32)

    def decode(part: np.ndarray) -> np.ndarray:
        value = 1.0 if decode.calls == 0 else 0.0
        decode.calls += 1
        return np.full((1, 1, 1, 1, part.shape[-1]), value, np.float32)

    decode.calls = 0
    row = tiled_decode(decode, latent, DecodeTiling(3, 2), scale=1)[0, 0, 0, 0]
    assert decode.calls == 2
    assert row[0] == 1.0 and row[-1] == 0.0
    assert np.all(np.diff(row) < 0)


def test_tiling_policy() -> None:
    assert decode_tiling(512, 768, None, 64) == DecodeTiling(16, 2)
    assert decode_tiling(64, 96, None, 64) is None  # small: one tile
    assert decode_tiling(512, 768, 0, 64) is None
    assert decode_tiling(64, 96, 64, 32) == DecodeTiling(2, 1)
    for tile, overlap in ((100, 64), (32, 0), (128, 48), (128, 128)):
        with pytest.raises(InputError, match="pick e.g."):
            decode_tiling(512, 768, tile, overlap)
    with pytest.raises(InputError, match="overlap 32"):  # columns [0,2) [2,3): a 1-latent tile the VAE cannot pad
        decode_tiling(128, 96, 64, 0)


def test_old_placement_manifests_are_refused() -> None:
    assert DecodeTiling.from_json(DecodeTiling(16, 2).to_json(), "decode") == DecodeTiling(16, 2)
    assert DecodeTiling(16, 2).to_json() == {"placement": "ltx-core", "tile": 16, "overlap": 2, "spatial_scale": 32}
    with pytest.raises(BundleError, match="predate ltx-core's tile placement: rebuild"):
        DecodeTiling.from_json({"tile_height": 16, "tile_width": 16, "overlap": 2, "spatial_scale": 32}, "decode")
    with pytest.raises(BundleError, match="decode.spatial_scale is 16, expected an integer in 32..32"):
        DecodeTiling.from_json({"placement": "ltx-core", "tile": 16, "overlap": 2, "spatial_scale": 16}, "decode")


TILED = {"height": 64, "width": 192, "decode_tile": 96, "decode_overlap": 32}  # columns [0,3) [2,5) [4,6)


@pytest.fixture(scope="module")
def tiled_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("bundles") / "tiny-tiled"
    return build_engines(BuildConfig(out=out, cache_dir=cache_dir, backend="onnxruntime", progress=False, **TILED))


@pytest.mark.slow  # builds a tiled bundle
def test_tiled_bundle_matches_ltx_core_tiled_decode(tiled_bundle: Path, tiny_models) -> None:
    """Tiles of two widths through one dynamic-width ONNX Runtime engine == ltx-core's `tiled_decode` (fp32)."""
    from stdrc.runtime.manifest import read_manifest
    from stdrc.runtime.pipeline import Pipeline

    manifest = read_manifest(tiled_bundle)
    assert manifest.decode == DecodeTiling(3, 1)
    decoder = manifest.components["vae_decoder"]
    assert decoder.inputs[0].shape[-2:] == (2, "tile_width") and decoder.dynamic_dims == {"tile_width": [2, 3, 3]}
    b = manifest.bucket
    latent = np.random.default_rng(2).standard_normal(
        (1, 128, b.latent_frames, b.latent_height, b.latent_width)).astype(np.float32)
    ours = Pipeline.from_bundle(tiled_bundle).decode_latent(latent)
    expected = ltx_tiled_decode(tiny_models.vae_decoder, latent, TILED["decode_tile"], TILED["decode_overlap"],
                                manifest.model_config.vae.decode_timestep)
    assert ours.shape == expected.shape == (1, 3, b.frames, b.height, b.width)
    rel = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert rel <= 1e-5, rel


@pytest.mark.slow
def test_tiled_bundle_generates(tiled_bundle: Path, astronaut_png: Path) -> None:
    from stdrc.runtime.pipeline import Pipeline

    result = Pipeline.from_bundle(tiled_bundle).generate(reference=astronaut_png, prompt="a woman smiles", seed=1,
                                                         steps=2)
    assert result.frames.shape == (9, 64, 192, 3)


@pytest.mark.slow
def test_tiled_bundle_verifies(tiled_bundle: Path) -> None:
    from stdrc.engines.verify import verify_bundle

    reports = verify_bundle(tiled_bundle)
    assert reports["vae_decoder"].ok, reports["vae_decoder"]


@pytest.fixture(scope="module")
def ltx23_vae_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DiT beside an LTX-2.3 VAE (its block list, no timestep conditioning, zeros padding; reduced width:
    latent 16, so the DiT's in/out channels are 16 too), the `config` metadata saying so."""
    from dataclasses import replace

    from vae_cases import LTX23, ltx_core_vae  # tests/vae_cases.py

    from stdrc.export.checkpoint import save_checkpoint
    from stdrc.export.config import get_preset
    from stdrc.export.dit import build_dit

    channels = {"in_channels": LTX23["latent_channels"], "out_channels": LTX23["latent_channels"]}
    dit_config = replace(get_preset("tiny").dit, **channels)
    dit = build_dit(dit_config, seed=0)
    encoder, decoder = ltx_core_vae(LTX23, seed=3)
    path = tmp_path_factory.mktemp("ltx23-vae") / "tiny-dit-ltx23-vae.safetensors"
    # a whole transformer section as LTX-2 files carry it (the 2.3 flags absent): verify builds its DiT reference
    # with ltx-core from it
    transformer = {k: v for k, v in dit_config.ltx_config()["transformer"].items()
                   if v or k not in ("apply_gated_attention", "cross_attention_adaln", "caption_proj_before_connector")}
    save_checkpoint(path, dit.ltx, encoder, decoder, config={"transformer": transformer, "vae": LTX23})
    return path


@pytest.fixture(scope="module")
def ltx23_tiled_bundle(ltx23_vae_file: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    from stdrc.engines.build import BuildConfig, build_engines

    out = tmp_path_factory.mktemp("bundles") / "tiny-ltx23-vae-tiled"
    return build_engines(BuildConfig(checkpoint=ltx23_vae_file, out=out, cache_dir=cache_dir, backend="onnxruntime",
                                     progress=False, **TILED))


@pytest.mark.slow  # builds a bundle
def test_decoder_without_timestep_tiled_bundle_matches_ltx_core(ltx23_tiled_bundle: Path, ltx23_vae_file: Path
                                                                ) -> None:
    """LTX-2.3's decoder (no timestep conditioning): the engine's only input is the latent, the runtime mixes no
    decode noise, and tiles of two widths through it == ltx-core's `tiled_decode` of the decoder ltx-core builds
    from the file's own config (fp32 ONNX Runtime)."""
    from vae_cases import ltx_core_from_file

    from stdrc.runtime.manifest import read_manifest
    from stdrc.runtime.pipeline import Pipeline

    manifest = read_manifest(ltx23_tiled_bundle)
    assert [t.name for t in manifest.components["vae_decoder"].inputs] == ["latent"]
    assert manifest.model_config.vae.timestep_conditioning is False
    pipeline = Pipeline.from_bundle(ltx23_tiled_bundle)
    assert pipeline.decode_noise(seed=1) is None
    b = manifest.bucket
    latent = np.random.default_rng(4).standard_normal(
        (1, 16, b.latent_frames, b.latent_height, b.latent_width)).astype(np.float32)
    ours = pipeline.decode_latent(latent)
    _, decoder = ltx_core_from_file(ltx23_vae_file)
    expected = ltx_tiled_decode(decoder, latent, TILED["decode_tile"], TILED["decode_overlap"], timestep=0.0)
    assert ours.shape == expected.shape == (1, 3, b.frames, b.height, b.width)
    rel = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert rel <= 1e-5, rel


@pytest.mark.slow
def test_decoder_without_timestep_bundle_verifies_and_generates(ltx23_tiled_bundle: Path, ltx23_vae_file: Path,
                                                                tmp_path: Path) -> None:
    from stdrc.engines.verify import verify_bundle
    from stdrc.runtime.cpp_inputs import DECODE_NOISE, write_cpp_inputs
    from stdrc.runtime.options import GenerationOptions
    from stdrc.runtime.pipeline import Pipeline

    reports = verify_bundle(ltx23_tiled_bundle, checkpoint=ltx23_vae_file)
    assert all(r.ok for r in reports.values()), reports
    pipeline = Pipeline.from_bundle(ltx23_tiled_bundle)
    reference = np.random.default_rng(3).integers(0, 256, (64, 192, 3), dtype=np.uint8)
    result = pipeline.generate(reference=reference, prompt="a woman smiles", seed=1, steps=2, face_crop=False)
    assert result.frames.shape == (9, 64, 192, 3)
    options = GenerationOptions("a woman smiles", seed=1, steps=2, face_crop=False)
    inputs = write_cpp_inputs(pipeline, reference, options, tmp_path / "cpp")
    assert not (inputs / DECODE_NOISE).exists()  # the C++ runner gets no decode noise to mix either


@pytest.mark.slow  # a decoder export and a verify
def test_verify_sees_a_vae_config_misread(ltx23_tiled_bundle: Path, ltx23_vae_file: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug verify could not see: a reading of the `vae` config that drops `spatial_padding_mode` (the
    decoder then reflects, on a zeros file) builds the export and its reference alike. verify's reference is
    ltx-core's decoder built from the file's own config, so the misread decoder is a FAIL."""
    import json
    import shutil
    from dataclasses import replace

    from stdrc.engines.verify import verify_bundle
    from stdrc.export import checkpoint
    from stdrc.export.config import get_preset
    from stdrc.export.models import load_sources, plan_sources
    from stdrc.export.onnx_export import export_onnx
    from stdrc.export.specs import component_specs
    from stdrc.runtime.manifest import read_manifest, sha256_file

    def misread(section: dict, base):
        return replace(read(section, base), encoder_spatial_padding_mode="zeros",
                       decoder_spatial_padding_mode="reflect")

    read = checkpoint.vae_from_metadata
    monkeypatch.setattr(checkpoint, "vae_from_metadata", misread)
    bundle = tmp_path / "bundle"
    shutil.copytree(ltx23_tiled_bundle, bundle)
    manifest = read_manifest(bundle)
    src = plan_sources(get_preset("tiny"), ltx23_vae_file, components=("vae_decoder",))
    assert src.preset.vae.decoder_spatial_padding_mode == "reflect"
    decoder = load_sources(src, ("vae_decoder",)).export_modules(manifest.bucket)["vae_decoder"]
    spec = component_specs(src.preset, manifest.buckets, manifest.decode)["vae_decoder"]
    entry = manifest.components["vae_decoder"]
    export_onnx(decoder, spec, bundle / entry.file)
    data = json.loads((bundle / "manifest.json").read_text())
    data["components"]["vae_decoder"]["sha256"] = sha256_file(bundle / entry.file)
    # the VAE alone: the misread preset also changes the seeded components' recorded source
    data["components"] = {k: data["components"][k] for k in ("vae_encoder", "vae_decoder")}
    (bundle / "manifest.json").write_text(json.dumps(data))
    reports = verify_bundle(bundle, checkpoint=ltx23_vae_file)
    assert reports["vae_encoder"].ok and not reports["vae_decoder"].ok, reports
    assert reports["vae_decoder"].rel_l2 > 0.05
