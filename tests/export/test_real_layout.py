"""Files laid out as Lightricks ships them (benchmarks/synthetic.py, tiny width): they load, and a file
whose components do not match the preset is refused from its header, before any tensor is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench import bench_module  # tests/bench.py
from ltx_core.model.transformer.model_configurator import LTXV_MODEL_COMFY_RENAMING_MAP, LTXModelConfigurator
from ltx_core.model.video_vae.model_configurator import (
    VAE_DECODER_COMFY_KEYS_FILTER,
    VAE_ENCODER_COMFY_KEYS_FILTER,
    VideoDecoderConfigurator,
    VideoEncoderConfigurator,
)
from ltx_core.text_encoders.gemma.encoders.encoder_configurator import (
    EMBEDDINGS_PROCESSOR_KEY_OPS,
    EmbeddingsProcessorConfigurator,
)
from refusals import assert_build_refused_before_any_read  # tests/refusals.py
from safetensors import safe_open
from safetensors.torch import save_file

from stdrc.export.checkpoint import is_audio_key, open_checkpoint
from stdrc.export.config import get_preset
from stdrc.export.models import load_models


def _synthetic():
    return bench_module("synthetic")


@pytest.fixture(scope="module")
def real_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("real") / "ltx2-tiny.safetensors"
    return _synthetic().write_checkpoint(path, get_preset("tiny"), text_layers=2, dtype=torch.float32)


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, json.loads(f.metadata()["config"])


def test_synthetic_file_holds_what_ltx_core_loads(real_file: Path) -> None:
    """Every key of the file lands in one of ltx-core's own builders (its configurators and key maps, as
    ltx-pipelines loads a real file), and every weight those builders have is in the file."""
    shapes, config = _header(real_file)
    with torch.device("meta"):
        builders = [(LTXModelConfigurator.from_config(config), LTXV_MODEL_COMFY_RENAMING_MAP),
                    (VideoEncoderConfigurator.from_config(config), VAE_ENCODER_COMFY_KEYS_FILTER),
                    (VideoDecoderConfigurator.from_config(config), VAE_DECODER_COMFY_KEYS_FILTER),
                    (EmbeddingsProcessorConfigurator.from_config(config), EMBEDDINGS_PROCESSOR_KEY_OPS)]
    used = set()
    for module, ops in builders:
        expected = module.state_dict()
        mapped = {ops.apply_to_key(k): k for k in shapes if ops.apply_to_key(k) in expected}
        assert set(expected) == set(mapped), (type(module).__name__, sorted(set(expected) - set(mapped))[:5])
        for ours, name in mapped.items():
            # ltx-core fixes the feature extractor's input to Gemma-3 12B's 49 layers and the connector's
            # registers to 128; the tiny preset has a 2-layer encoder and 16 registers
            if "aggregate_embed" not in ours and "learnable_registers" not in ours:
                assert tuple(expected[ours].shape) == shapes[name], name
        used |= set(mapped.values())
    assert used == set(shapes)
    blocks = "model.diffusion_model.transformer_blocks."
    per_block_audio = [k for k in shapes if k.startswith(blocks) and is_audio_key(k)]
    assert any(".audio_attn1." in k for k in per_block_audio) and any("a2v_ca" in k for k in per_block_audio)
    assert any(k.startswith("model.diffusion_model.audio_embeddings_connector.") for k in shapes)


def test_real_layout_file_loads_every_component(real_file: Path) -> None:
    lazy = open_checkpoint(real_file, sha256="-")
    assert not [k for keys in lazy.keys.values() for k in keys if is_audio_key(k)]
    models = load_models("tiny", checkpoint=real_file)
    with safe_open(str(real_file), framework="pt") as f:
        for ours, name in lazy.keys["dit"].items():
            assert torch.equal(models.dit.ltx.state_dict()[ours], f.get_tensor(name)), ours
        block = "model.diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight"
        to_q = models.text.connector.transformer_1d_blocks[0].attn1.to_q.weight
        assert torch.equal(to_q, f.get_tensor(block))
        conv_in = f.get_tensor("vae.decoder.conv_in.conv.weight")
        assert torch.equal(models.vae_decoder.conv_in.conv.weight, conv_in)


def _rewrite(src: Path, dst: Path, change) -> Path:
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    change(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


P = "model.diffusion_model."
BAD = {
    "unknown DiT key": (lambda t: t.__setitem__(P + "transformer_blocks.0.attn3.to_q.weight", torch.zeros(2)),
                        r"DiT of this preset \(1 unexpected: transformer_blocks\.0\.attn3\.to_q\.weight\)"),
    "DiT block missing": (lambda t: [t.pop(k) for k in list(t) if ".transformer_blocks.1.attn1." in k],
                          r"DiT of this preset \(\d+ missing: transformer_blocks\.1\.attn1"),
    "VAE decoder key missing": (lambda t: t.pop("vae.decoder.conv_out.conv.weight"),
                                r"VAE decoder of this preset \(1 missing: conv_out\.conv\.weight\)"),
    "connector key missing": (
        lambda t: t.pop(P + "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_v.bias"),
        r"text projection and connector of this preset \(1 missing: connector\.transformer_1d_blocks\.0"),
    "projection of another width": (
        lambda t: t.__setitem__("text_embedding_projection.aggregate_embed.weight", torch.zeros(32, 64)),
        r"feature_extractor\.aggregate_embed\.weight: checkpoint \(32, 64\) vs model \(32, 96\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_mismatched_component_is_refused_before_any_read(real_file: Path, tmp_path: Path, case: str,
                                                          monkeypatch, capsys) -> None:
    """`build-engines` refuses in one line, exit 2, with no tensor read and no bundle folder."""
    change, message = BAD[case]
    bad = _rewrite(real_file, tmp_path / "bad.safetensors", change)
    assert_build_refused_before_any_read(bad, tmp_path, message, monkeypatch, capsys)

