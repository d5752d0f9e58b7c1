"""The VAE a checkpoint's `vae` config describes, against ltx-core's VideoEncoder/VideoDecoder built from that
same config by ltx-core's own configurators and loaded through its own key filters: through the project's load
path (`config_from_metadata` -> build -> streamed weights), in PyTorch and exported to ONNX Runtime (fp32).

Real block lists (LTX-2 and LTX-2.3, LTX23.md 1c) at reduced channel width (latent 16, decoder base 16): the
block structure, padding and timestep conditioning are what is under test; the width is only a size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from ltx_core.model.video_vae.model_configurator import VideoDecoderConfigurator
from vae_cases import LTX2, LTX23, ltx_core_from_file, write_vae_file  # tests/vae_cases.py

from stdrc.export.checkpoint import config_from_metadata
from stdrc.export.config import get_preset
from stdrc.export.dit import init_seeded
from stdrc.export.errors import CheckpointError
from stdrc.export.models import load_sources, plan_sources
from stdrc.export.onnx_export import export_onnx
from stdrc.export.specs import component_specs
from stdrc.export.vae import mix_decode_noise
from stdrc.runtime.manifest import Bucket

BUCKET = Bucket(frames=9, height=64, width=96, text_length=16)
TOL = 1e-5  # rel L2, fp32

CASES = {
    "ltx2": LTX2,  # no spatial_padding_mode: ltx-core's encoder pads zeros, its decoder reflects
    "ltx2-zeros": {**LTX2, "spatial_padding_mode": "zeros"},
    "ltx23": LTX23,
    "ltx23-reflect": {**LTX23, "spatial_padding_mode": "reflect"},
}
# ONNX Runtime: the LTX-2.3 layout (the timestep-conditioned decoder's graph against ltx-core: tests/runtime/
# test_tiling.py's tiny bundles; LTX-2's layout and paddings: the PyTorch test, which loads what is exported)
ONNX_CASES = ("ltx23",)


def _rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))


def _inputs(section: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 1, BUCKET.height, BUCKET.width, generator=gen) * 2 - 1
    latent = torch.randn(1, section["latent_channels"], BUCKET.latent_frames, BUCKET.latent_height,
                         BUCKET.latent_width, generator=gen)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(9))
    return image, latent, noise


@pytest.fixture(scope="module", params=[pytest.param(k, marks=pytest.mark.slow) if "-" in k else k for k in CASES])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One file per case; the project's modules loaded from it; ltx-core's reference outputs. The second
    padding of each family is in the slow lane (seconds each to write, load and run)."""
    section = CASES[request.param]
    path = write_vae_file(tmp_path_factory.mktemp("vae") / f"{request.param}.safetensors", section)
    src = plan_sources(get_preset("ltx2-video"), path, components=("vae_encoder", "vae_decoder"))
    ours = load_sources(src, ("vae_encoder", "vae_decoder")).export_modules(BUCKET)
    encoder, decoder = ltx_core_from_file(path)
    image, latent, noise = _inputs(section)
    with torch.no_grad():
        want_latent = encoder(image)
        # ltx-core draws its decode noise from the generator (timestep-conditioned decoders only)
        want_video = decoder(latent, generator=torch.Generator().manual_seed(9))
    conditioned = section["timestep_conditioning"]
    mixed = mix_decode_noise(latent, noise, decoder.decode_noise_scale) if conditioned else latent
    dec_feeds = {"latent": mixed}
    if conditioned:
        dec_feeds["timestep"] = torch.tensor([decoder.decode_timestep])
    return {"name": request.param, "section": section, "preset": src.preset, "ours": ours,
            "image": image, "dec_feeds": dec_feeds, "want_latent": want_latent.numpy(),
            "want_video": want_video.numpy()}


def test_pytorch_equals_ltx_core_from_the_files_config(case: dict) -> None:
    vae = case["preset"].vae
    mode = case["section"].get("spatial_padding_mode")
    assert (vae.encoder_spatial_padding_mode, vae.decoder_spatial_padding_mode) == ((mode, mode) if mode else
                                                                                     ("zeros", "reflect"))
    assert vae.timestep_conditioning == case["section"]["timestep_conditioning"]
    with torch.no_grad():
        latent = case["ours"]["vae_encoder"](case["image"]).numpy()
        video = case["ours"]["vae_decoder"](*case["dec_feeds"].values()).numpy()
    assert latent.shape == case["want_latent"].shape == (1, 16, 1, 2, 3)
    assert video.shape == case["want_video"].shape == (1, 3, BUCKET.frames, BUCKET.height, BUCKET.width)
    assert _rel_l2(latent, case["want_latent"]) <= TOL
    assert _rel_l2(video, case["want_video"]) <= TOL


@pytest.mark.slow  # two ONNX exports
@pytest.mark.parametrize("case", ONNX_CASES, indirect=True)
def test_onnx_runtime_equals_ltx_core_from_the_files_config(case: dict, tmp_path: Path) -> None:
    """The exported graphs (spec from the file's config): a decoder without timestep conditioning has the
    latent as its only input; fp32 ONNX Runtime == ltx-core."""
    specs = component_specs(case["preset"], BUCKET)
    for name, feeds, want in (("vae_encoder", {"image": case["image"]}, case["want_latent"]),
                              ("vae_decoder", case["dec_feeds"], case["want_video"])):
        spec = specs[name]
        assert [t.name for t in spec.inputs] == list(feeds)
        path = export_onnx(case["ours"][name], spec, tmp_path / f"{name}.onnx")
        assert [i.name for i in onnx.load(str(path), load_external_data=False).graph.input] == list(feeds)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        assert _rel_l2(got, want) <= TOL, (name, _rel_l2(got, want))


def test_the_padding_mode_matters() -> None:
    """The check above can fail: a decoder padded the other way (what the project did with a 2.3 file before
    `spatial_padding_mode` was read) is far from ltx-core's."""
    zeros = VideoDecoderConfigurator.from_config({"vae": LTX23}).eval()
    section = {**LTX23, "spatial_padding_mode": "reflect"}
    reflect = VideoDecoderConfigurator.from_config({"vae": section}).eval()
    init_seeded(zeros, 1)
    reflect.load_state_dict(zeros.state_dict())
    latent = _inputs(LTX23)[1]
    with torch.no_grad():
        assert _rel_l2(reflect(latent).numpy(), zeros(latent).numpy()) > 0.05


@pytest.mark.parametrize("change, match", [
    ({"spatial_padding_mode": "mirror"}, "'mirror' is not a valid PaddingModeType"),
    ({"norm_layer": "batch_norm"}, "'batch_norm' is not a valid NormLayerType"),
    ({"decoder_blocks": [["upsample_magic", {}]]}, "unknown layer: upsample_magic"),
    ({"encoder_blocks": [["res_x", {}]]}, "KeyError: 'num_layers'"),
    ({"dims": 2}, "dims=2: only dims=3"),
    ({"timestep_conditioning": "false"}, "timestep_conditioning='false', not of type bool"),
    ({"latent_channels": 128.0}, "latent_channels=128.0, not of type int"),
    ({"out_channels": 4}, "out_channels=4: only out_channels=3"),
    ({"decoder_blocks": [["res_x", {"num_layers": 1, "inject_noise": True}]]}, "inject_noise"),
])
def test_a_vae_config_ltx_core_would_not_build_is_one_error(change: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as err:
        config_from_metadata(get_preset("ltx2-video"), {"vae": {**LTX23, **change}})
    assert "\n" not in str(err.value)


def test_absent_keys_take_ltx_cores_defaults() -> None:
    """A section without timestep_conditioning is conditioned (ltx-core's default), not the preset's value."""
    section = {k: v for k, v in LTX23.items() if k not in ("timestep_conditioning", "spatial_padding_mode")}
    vae = config_from_metadata(get_preset("ltx2-video"), {"vae": section}).vae
    assert vae.timestep_conditioning is True
    assert (vae.encoder_spatial_padding_mode, vae.decoder_spatial_padding_mode) == ("zeros", "reflect")
    theirs = VideoDecoderConfigurator.from_config({"vae": section})
    assert theirs.timestep_conditioning is True
    ours = VideoDecoderConfigurator.from_config(vae.ltx_config("decoder"))
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (ours, theirs)]
    assert shapes[0] == shapes[1]


def test_ltx23_vae_is_what_the_ltx23_header_describes() -> None:
    """LTX23_VAE (presets and synthetic files) == the VAE read from LTX-2.3's `vae` header at real width
    (which has no latent_channels or decoder_base_channels: ltx-core's 128 apply)."""
    from stdrc.export.config import LTX23_VAE
    from stdrc.export.vae import vae_from_metadata

    header = {k: v for k, v in LTX23.items() if k not in ("latent_channels", "decoder_base_channels")}
    assert vae_from_metadata(header, get_preset("ltx2-video").vae) == LTX23_VAE
