"""Checkpoint loading from LTX-2-layout safetensors, written here as small files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stdrc.export.checkpoint import is_audio_key, read_checkpoint, save_checkpoint
from stdrc.export.config import get_preset
from stdrc.export.dit import build_dit
from stdrc.export.errors import CheckpointError
from stdrc.export.models import load_models
from stdrc.export.vae import build_vae


@pytest.fixture(scope="module")
def donor():
    preset = get_preset("tiny")
    dit = build_dit(preset.dit, seed=11)
    enc, dec = build_vae(preset.vae, seed=11)
    return preset, dit, enc, dec


@pytest.mark.parametrize("layout", ["comfy", "ltx"])
def test_roundtrip_loads_the_same_weights(tmp_path: Path, donor, layout: str) -> None:
    preset, dit, enc, dec = donor
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, dit.ltx, enc, dec, layout=layout)
    models = load_models("tiny", checkpoint=path)
    for k, v in dit.ltx.state_dict().items():
        assert torch.equal(models.dit.ltx.state_dict()[k], v), k
    for k, v in dec.state_dict().items():
        assert torch.equal(models.vae_decoder.state_dict()[k], v), k
    assert models.checkpoint_sha256 == read_checkpoint(path).sha256


def test_dit_only_file_needs_a_base_checkpoint(tmp_path: Path, donor) -> None:
    """ST-DRC weights are an LTX-2-layout DiT alone: the VAE comes from the LTX-2 file, never from a seed."""
    _, dit, enc, dec = donor
    path = tmp_path / "stdrc_dit.safetensors"
    save_checkpoint(path, dit.ltx, layout="ltx")
    with pytest.raises(CheckpointError, match="no video VAE.*--base-checkpoint"):
        load_models("tiny", checkpoint=path)
    base = tmp_path / "ltx2.safetensors"
    save_checkpoint(base, build_dit(get_preset("tiny").dit, seed=3).ltx, enc, dec)
    models = load_models("tiny", checkpoint=path, base_checkpoint=base)
    assert torch.equal(models.dit.ltx.proj_out.weight, dit.ltx.proj_out.weight)
    for k, v in dec.state_dict().items():
        assert torch.equal(models.vae_decoder.state_dict()[k], v), k
    files = {name: s.get("files") for name, s in models.sources.items()}
    assert files["dit"] == {"dit": {"file": path.name, "sha256": read_checkpoint(path).sha256}}
    assert files["vae_decoder"] == {"vae": {"file": base.name, "sha256": read_checkpoint(base).sha256}}
    assert "seeded" in models.sources["face_encoder"]
    # the old flag name is an alias of the new one
    assert load_models("tiny", checkpoint=path, base_checkpoint=base).sources == models.sources


def test_base_checkpoint_without_vae_is_refused(tmp_path: Path, donor) -> None:
    path = tmp_path / "stdrc_dit.safetensors"
    save_checkpoint(path, donor[1].ltx, layout="ltx")
    with pytest.raises(CheckpointError, match="neither .* holds video VAE.*--base-checkpoint"):
        load_models("tiny", checkpoint=path, base_checkpoint=path)


def test_streamed_load_casts_to_the_engine_dtype(tmp_path: Path, donor) -> None:
    """Weights load straight into a bf16 module: the same values as the fp32 load, rounded once."""
    _, dit, enc, dec = donor
    path = tmp_path / "full.safetensors"
    save_checkpoint(path, dit.ltx, enc, dec)
    seen = []

    def transform(key: str, tensor: torch.Tensor) -> torch.Tensor:
        seen.append(key)
        return tensor * 2 if key == "proj_out.bias" else tensor

    models = load_models("tiny", checkpoint=path, components=("dit",), dtype=torch.bfloat16, transform=transform)
    assert models.vae_decoder is None and models.text is None
    assert models.dit.ltx.proj_out.weight.dtype == torch.bfloat16
    assert torch.equal(models.dit.ltx.proj_out.weight, dit.ltx.proj_out.weight.to(torch.bfloat16))
    assert torch.equal(models.dit.ltx.proj_out.bias, (2 * dit.ltx.proj_out.bias).to(torch.bfloat16))
    assert sorted(seen) == sorted(dit.ltx.state_dict())


def test_metadata_config_overrides_preset(tmp_path: Path) -> None:
    preset = get_preset("tiny").with_dit(rope_type="split", num_layers=1)
    dit = build_dit(preset.dit, seed=2)
    path = tmp_path / "split.safetensors"
    save_checkpoint(path, dit.ltx, config={"transformer": {"rope_type": "split", "num_layers": 1}})
    models = load_models("tiny", checkpoint=path, components=("dit",))
    assert models.preset.dit.rope_type == "split" and models.preset.dit.num_layers == 1


AUDIO_KEYS = {  # the audio stream of LTX-2's audio-video transformer, at every depth of a key
    "audio_patchify_proj.weight": (4, 4),
    "av_ca_video_scale_shift_adaln_single.linear.bias": (4,),
    "transformer_blocks.0.audio_attn1.k_norm.weight": (4,),
    "transformer_blocks.1.audio_ff.net.0.proj.weight": (4, 4),
    "transformer_blocks.0.scale_shift_table_a2v_ca_video": (5, 4),
    "transformer_blocks.1.scale_shift_table_a2v_ca_audio": (5, 4),
    "transformer_blocks.0.audio_to_video_attn.to_q.weight": (4, 4),
    "transformer_blocks.1.video_to_audio_attn.to_out.0.bias": (4,),
    "audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_k.weight": (4, 4),
}


@pytest.mark.parametrize("layout", ["comfy", "ltx"])
def test_audio_keys_of_av_checkpoints_are_ignored(tmp_path: Path, donor, layout: str) -> None:
    _, dit, _, _ = donor
    prefix = "model.diffusion_model." if layout == "comfy" else ""
    tensors = {f"{prefix}{k}": v.contiguous() for k, v in dit.ltx.state_dict().items()}
    tensors.update({f"{prefix}{k}": torch.zeros(shape) for k, shape in AUDIO_KEYS.items()})
    tensors.update({"audio_vae.decoder.conv_in.weight": torch.zeros(2),
                    "vocoder.conv_pre.weight": torch.zeros(2)})
    path = tmp_path / "av.safetensors"
    save_file(tensors, str(path))
    models = load_models("tiny", checkpoint=path, components=("dit",))
    assert torch.equal(models.dit.ltx.proj_out.weight, dit.ltx.proj_out.weight)
    # the LoRA reader skips the same keys: one predicate for both
    assert all(is_audio_key(k) for k in AUDIO_KEYS) and not any(is_audio_key(k) for k in dit.ltx.state_dict())


def _write_modified(tmp_path: Path, dit, change) -> Path:
    tensors = {k: v.clone().contiguous() for k, v in dit.ltx.state_dict().items()}
    change(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    return path


def test_missing_key_is_listed(tmp_path: Path, donor) -> None:
    path = _write_modified(tmp_path, donor[1], lambda t: t.pop("proj_out.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing: proj_out\.weight"):
        load_models("tiny", checkpoint=path, components=("dit",))


def test_unexpected_key_is_listed(tmp_path: Path, donor) -> None:
    path = _write_modified(tmp_path, donor[1], lambda t: t.__setitem__("extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"1 unexpected: extra_head\.weight"):
        load_models("tiny", checkpoint=path, components=("dit",))


def test_wrong_shape_is_listed(tmp_path: Path, donor) -> None:
    path = _write_modified(tmp_path, donor[1], lambda t: t.__setitem__("proj_out.bias", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"wrong shape: proj_out\.bias: checkpoint \(7,\)"):
        load_models("tiny", checkpoint=path, components=("dit",))


def test_other_preset_checkpoint_is_refused(tmp_path: Path) -> None:
    bigger = get_preset("tiny").with_dit(num_layers=3)
    path = tmp_path / "three_layers.safetensors"
    save_checkpoint(path, build_dit(bigger.dit, seed=0).ltx)
    with pytest.raises(CheckpointError, match="unexpected: transformer_blocks.2"):
        load_models("tiny", checkpoint=path, components=("dit",))


def test_pickle_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_checkpoint(path)


def test_truncated_file(tmp_path: Path, donor) -> None:
    path = tmp_path / "full.safetensors"
    save_checkpoint(path, donor[1].ltx)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated|not a safetensors"):
        load_models("tiny", checkpoint=cut, components=("dit",))


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + json.dumps({"a": 1}).encode()[:5] + b"\xff" * 11)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_checkpoint(junk)
