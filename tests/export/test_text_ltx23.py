"""LTX-2.3's text side: FeatureExtractorV2 (per-token RMS norm -> video_aggregate_embed) + gated connector.

Reference: ltx-core's own modules, built from a 2.3 `config` by its configurators where they do not
hard-code Gemma-3 12B's size (`Embeddings1DConnectorConfigurator`; `_create_feature_extractor` is built on
the meta device to check the type, names and widths it would make). The numbers come from ltx-core's
FeatureExtractorV2 and EmbeddingsProcessor over the same weights as ours.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from bench import bench_module  # tests/bench.py

from stdrc.export.checkpoint import V2_CAPTION_CONFIG, config_from_metadata
from stdrc.export.config import Preset, get_preset
from stdrc.export.errors import CheckpointError
from stdrc.export.text import LayerwiseFeatureExtractorV2, TextSide, TextStates, build_text_side, load_gemma
from stdrc.runtime.text import JsonTokenizer

PROMPTS = ["a woman smiles at the camera", "",
           "   a man walks through a rainy street at night, neon lights  "]
LENGTH = 128  # ltx-core's connector has 128 registers: the text length is a multiple of it


def ltx23_config(heads: int, head_dim: int, layers: int) -> dict:
    """The text-side keys of an LTX-2.3 `config` header (values as the 3P copies give them, sizes reduced)."""
    return {"transformer": {
        **V2_CAPTION_CONFIG, "apply_gated_attention": True, "cross_attention_adaln": True,
        "num_attention_heads": heads, "attention_head_dim": head_dim,
        "audio_num_attention_heads": 2, "audio_attention_head_dim": 8,
        "connector_num_attention_heads": heads, "connector_attention_head_dim": head_dim,
        "connector_num_layers": layers, "connector_apply_gated_attention": True,
        "connector_positional_embedding_max_pos": [4096], "rope_type": "split",
        "frequencies_precision": "float64",
    }}


def ltx23_preset(base: str, config: dict) -> Preset:
    preset = get_preset(base)  # ltx-core's connectors always have 128 registers (its configurator's default)
    text = replace(preset.text, max_length=LENGTH, connector_registers=128)
    return config_from_metadata(replace(preset, text=text), config)


def ltx_core_processor(side: TextSide, config: dict):
    """ltx-core's EmbeddingsProcessor holding our weights: its configurator's connector, its V2 extractor."""
    from ltx_core.text_encoders.gemma.embeddings_connector import Embeddings1DConnectorConfigurator
    from ltx_core.text_encoders.gemma.embeddings_processor import EmbeddingsProcessor
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV2

    connector = Embeddings1DConnectorConfigurator.from_config(config)
    connector.load_state_dict(side.connector.state_dict(), strict=True)
    ours = side.feature_extractor.video_aggregate_embed
    linear = torch.nn.Linear(ours.in_features, ours.out_features, bias=True)
    linear.load_state_dict(ours.state_dict(), strict=True)
    extractor = FeatureExtractorV2(video_aggregate_embed=linear, embedding_dim=side.cfg.encoder_dim)
    return EmbeddingsProcessor(feature_extractor=extractor, video_connector=connector).eval()


def ltx_core_encode(folder: Path, processor, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ltx-core's GemmaTextEncoder.encode (its tokenizer, the folder's Gemma) -> process_hidden_states."""
    from ltx_core.text_encoders.gemma.encoders.base_encoder import GemmaTextEncoder
    from ltx_core.text_encoders.gemma.tokenizer import LTXVGemmaTokenizer
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    multimodal = json.loads((folder / "config.json").read_text())["model_type"] == "gemma3"
    cls = Gemma3ForConditionalGeneration if multimodal else AutoModelForCausalLM
    hf = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = LTXVGemmaTokenizer(str(folder), LENGTH)
    encoder = GemmaTextEncoder(model=hf, tokenizer=tokenizer, dtype=torch.float32)
    with torch.no_grad():
        states, mask = encoder.encode(prompt)
        return processor.process_hidden_states(states, mask).video_encoding, mask


def rel_l2(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _hidden_states(count: int, length: int, width: int, mask: torch.Tensor, dtype: torch.dtype, seed: int):
    """Random states with per-layer scales and offsets, and something large under the padding."""
    g = torch.Generator().manual_seed(seed)
    states = tuple((torch.randn(1, length, width, generator=g) * (1 + 3 * i) + i).to(dtype)
                   for i in range(count))
    for h in states:
        h[:, mask[0] == 0] = 300.0
    return states


def _mask(length: int, valid: int, side: str) -> torch.Tensor:
    mask = torch.zeros(1, length, dtype=torch.int64)
    if side == "left":
        mask[:, length - valid:] = 1
    else:
        mask[:, :valid] = 1
    return mask


@pytest.mark.parametrize("length, valid", [(64, 64), (64, 17), (64, 1), (128, 100)])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_layerwise_v2_features_equal_ltx_core(length: int, valid: int, padding: str) -> None:
    """Per-state V2 extraction == ltx-core's stacked FeatureExtractorV2 (fp32, rel 1e-6), output wider than
    the input (the sqrt(out / in) rescale); padding is zeroed by the mask on either side; same state dict."""
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV2

    count, width, out = 5, 24, 40
    torch.manual_seed(length + valid)
    linear = torch.nn.Linear(width * count, out, bias=True)
    ours, theirs = LayerwiseFeatureExtractorV2(linear, width), FeatureExtractorV2(linear, embedding_dim=width)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {
        "video_aggregate_embed.weight", "video_aggregate_embed.bias"}
    mask = _mask(length, valid, padding)
    states = _hidden_states(count, length, width, mask, torch.float32, seed=valid)
    with torch.no_grad():
        got, none = ours(states, mask, padding)
        want, no_audio = theirs(states, mask, padding)
    assert none is None and no_audio is None and got.shape == want.shape == (1, length, out)
    assert rel_l2(got, want) <= 1e-6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pad = mask[0] == 0
    assert torch.equal(got[0, pad], linear.bias.detach().expand(int(pad.sum()), -1))  # the bias alone


@pytest.mark.parametrize("dtype, magnitude",
                         [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 300.0)])
def test_layerwise_v2_features_16bit(dtype: torch.dtype, magnitude: float) -> None:
    """16-bit states (bf16 is the real run's dtype): close to ltx-core's fp32 result, at least as close as
    ltx-core's own 16-bit run; fp16 states past |h| = 256 (Gemma's later states) stay finite, where ltx-core's
    fp16 squares overflow."""
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV2

    count, width, out, length = 7, 64, 96, 96
    torch.manual_seed(0)
    linear = torch.nn.Linear(width * count, out, bias=True)
    mask = _mask(length, 30, "left")
    states = tuple((h.float() * magnitude).to(dtype)
                   for h in _hidden_states(count, length, width, mask, dtype, seed=1))
    with torch.no_grad():
        want = FeatureExtractorV2(linear, width)(tuple(h.float() for h in states), mask)[0]
        half = linear.to(dtype)
        ref16 = FeatureExtractorV2(half, width)(states, mask)[0]
        got = LayerwiseFeatureExtractorV2(half, width)(states, mask)[0]
    assert got.dtype == ref16.dtype == dtype and torch.isfinite(got).all()
    assert rel_l2(got.float(), want) < 1e-2
    if magnitude == 1.0:
        assert rel_l2(got.float(), want) <= 2 * rel_l2(ref16.float(), want) + 1e-3
    else:
        assert rel_l2(ref16.float(), want) > 0.1  # what the norm in fp16 would give


@pytest.mark.parametrize("keys, message", [
    ({"caption_proj_before_connector": True}, "caption_proj_input_norm missing"),
    ({**V2_CAPTION_CONFIG, "caption_proj_input_norm": True}, "caption_proj_input_norm=True"),
])
def test_partial_or_other_v2_config_is_refused(keys: dict, message: str) -> None:
    """ltx-core raises NotImplementedError on these; here one line that names the key, from the header."""
    with pytest.raises(CheckpointError, match=message) as info:
        config_from_metadata(get_preset("ltx2-video"), {"transformer": keys})
    assert "\n" not in str(info.value)


def test_context_width_mismatch_is_refused() -> None:
    """The connector's width must be the DiT's context width (2.3: heads x head_dim): no DiT reads another."""
    config = ltx23_config(heads=32, head_dim=128, layers=1)
    config["transformer"]["connector_num_attention_heads"] = 30
    with pytest.raises(CheckpointError, match="3840-wide text context .* takes 4096") as info:
        config_from_metadata(get_preset("ltx2-video"), config)
    assert "\n" not in str(info.value)


def test_tiny23_text_side_is_v2() -> None:
    """`tiny23`: V2 projection, gated connector, context as wide as its DiT takes; == ltx-core's path."""
    from stdrc.export.specs import component_specs
    from stdrc.runtime.manifest import Bucket
    from stdrc.runtime.text import ByteTokenizer

    preset = get_preset("tiny23")
    side = build_text_side(preset.text, seed=0)
    assert isinstance(side.feature_extractor, LayerwiseFeatureExtractorV2)
    assert side.connector.transformer_1d_blocks[0].attn1.to_gate_logits is not None
    specs = component_specs(preset, Bucket(**preset.default_bucket))
    width = dict((t.name, t.shape) for t in specs["dit"].inputs)["context"][-1]
    assert specs["text_head"].outputs[0].shape[-1] == width == preset.dit.context_dim
    for prompt in ("a woman waves at the camera", ""):
        ids, mask = (torch.from_numpy(a) for a in ByteTokenizer(preset.text.max_length)(prompt))
        with torch.no_grad():
            context, _ = side(ids, mask)
            reference = side.ltx_reference(ids, mask)
        assert context.shape[-1] == width and rel_l2(context, reference) <= 1e-5


def test_ltx2_config_keeps_the_v1_projection() -> None:
    preset = config_from_metadata(get_preset("ltx2-video"), {"transformer": {"connector_num_layers": 2}})
    assert not preset.text.per_token_projection


def test_v2_config_builds_what_ltx_core_builds() -> None:
    """From the same config: ltx-core's feature extractor is V2 with the names and bias of ours, its output as
    wide as the DiT's heads x head_dim (= our connector's), and its connector has ours' state dict (gated)."""
    from ltx_core.text_encoders.gemma.embeddings_connector import Embeddings1DConnectorConfigurator
    from ltx_core.text_encoders.gemma.encoders.encoder_configurator import _create_feature_extractor
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV2

    config = ltx23_config(heads=32, head_dim=128, layers=1)
    preset = ltx23_preset("ltx2-video", config)
    assert preset.text.per_token_projection and preset.text.connector_gated_attention
    assert preset.text.connector_dim == 4096 and preset.text.connector_layers == 1
    with torch.device("meta"):
        theirs = _create_feature_extractor(config["transformer"])
        side = TextSide(replace(preset.text, encoder_layers=1), torch.nn.Identity())
        connector = Embeddings1DConnectorConfigurator.from_config(config)
    assert isinstance(theirs, FeatureExtractorV2)
    video = side.feature_extractor.video_aggregate_embed
    ours = {f"video_aggregate_embed.{k}" for k in video.state_dict()}
    assert ours == {k for k in theirs.state_dict() if k.startswith("video_")}
    assert theirs.video_aggregate_embed.out_features == video.out_features
    assert {k: v.shape for k, v in side.connector.state_dict().items()} == {
        k: v.shape for k, v in connector.state_dict().items()}
    assert "transformer_1d_blocks.0.attn1.to_gate_logits.weight" in connector.state_dict()
    assert side.connector.learnable_registers.shape == (128, 4096)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_v2_text_side_matches_ltx_core_tiny(tiny_gemma_dir: Path, prompt: str) -> None:
    """A 32-wide Gemma, connector 2 x 24 = 48 wide (the context's width is the connector's, not the
    encoder's), 2 gated layers: ltx-core's encoder + embeddings processor == ours (fp32)."""
    config = ltx23_config(heads=2, head_dim=24, layers=2)
    gemma = load_gemma(tiny_gemma_dir, LENGTH)
    side = build_text_side(ltx23_preset("tiny", config).text, seed=0, gemma=gemma)
    assert side.cfg.per_token_projection and side.cfg.connector_dim == 48
    expected, mask = ltx_core_encode(tiny_gemma_dir, ltx_core_processor(side, config), prompt)
    tok_path = tiny_gemma_dir.parent / "v2-tokenizer.json"
    tok_path.write_text(gemma.tokenizer_json(), encoding="utf-8")
    ids, our_mask = (torch.from_numpy(a) for a in JsonTokenizer(tok_path, LENGTH, 0)(prompt))
    with torch.no_grad():
        context, context_mask = side(ids, our_mask)
        reference = side.ltx_reference(ids, our_mask)
    assert torch.equal(our_mask, mask)
    assert context.shape == (1, LENGTH, 48) and context_mask.all()
    assert rel_l2(context, expected) <= 1e-5 and rel_l2(reference, expected) <= 1e-6


# --- Gemma-3 12B's width (3840) and the 2.3 connector's (4096): 2 Gemma layers, 1 connector layer ---

@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory):
    synthetic = bench_module("synthetic")
    folder = tmp_path_factory.mktemp("gemma23") / "gemma-3-w3840"
    synthetic.write_gemma(folder, hidden_size=3840, layers=2)
    config = ltx23_config(heads=32, head_dim=128, layers=1)
    preset = ltx23_preset("ltx2-video", config)
    side = build_text_side(preset.text, seed=0, gemma=load_gemma(folder, LENGTH))
    return folder, config, preset, side


@pytest.mark.slow
def test_v2_text_side_matches_ltx_core_at_real_width(wide, tmp_path: Path) -> None:
    """Gemma 3840 wide -> V2 -> 4096-wide gated connector: ltx-core == ours in PyTorch and through ONNX
    Runtime (the two exported engines: text_gemma's hidden states fed to text_head), rel L2 <= 1e-5 fp32;
    the spec's context is 4096 wide; same token ids."""
    import onnxruntime as ort

    from stdrc.export.onnx_export import export_onnx
    from stdrc.export.specs import component_specs
    from stdrc.runtime.manifest import Bucket

    folder, config, preset, side = wide
    assert side.cfg.encoder_dim == 3840 and side.cfg.connector_dim == 4096
    prompt = PROMPTS[0]
    expected, mask = ltx_core_encode(folder, ltx_core_processor(side, config), prompt)
    gemma = load_gemma(folder, LENGTH, weights=False)
    (tmp_path / "tokenizer.json").write_text(gemma.tokenizer_json(), encoding="utf-8")
    ids, our_mask = JsonTokenizer(tmp_path / "tokenizer.json", LENGTH, gemma.pad_id)(prompt)
    assert np.array_equal(our_mask, mask.numpy())
    with torch.no_grad():
        context, context_mask = side(torch.from_numpy(ids), torch.from_numpy(our_mask))
    assert context.shape == (1, LENGTH, 4096) and context_mask.all()
    assert rel_l2(context, expected) <= 1e-5

    specs = component_specs(side_preset := replace(preset, text=side.cfg),
                            Bucket(frames=9, height=64, width=96, text_length=LENGTH))
    assert specs["text_head"].outputs[0].shape == (1, LENGTH, side_preset.text.connector_dim)
    assert [t.shape for t in specs["text_gemma"].outputs] == [(1, LENGTH, 3840)] * 3  # embeddings + 2 layers
    sessions = {name: ort.InferenceSession(str(export_onnx(module, specs[name], tmp_path / f"{name}.onnx")),
                                           providers=["CPUExecutionProvider"])
                for name, module in (("text_gemma", TextStates(side.encoder)), ("text_head", side.head))}
    states = sessions["text_gemma"].run(None, {"token_ids": ids, "token_mask": our_mask})
    names = [t.name for t in specs["text_gemma"].outputs]
    onnx_context, onnx_mask = sessions["text_head"].run(None, {"token_mask": our_mask, **dict(zip(names, states))})
    assert onnx_context.shape == (1, LENGTH, 4096) and onnx_mask.all()
    assert rel_l2(onnx_context, expected) <= 1e-5


def test_ltx23_text_weights_load_from_a_checkpoint(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    """A 2.3 file's text side as ltx-core's key ops name it (both aggregate embeds, both connectors): the
    video projection and connector load into ours, the audio ones are left out; config from the header."""
    from safetensors.torch import save_file

    from stdrc.export.models import load_models

    config = ltx23_config(heads=2, head_dim=24, layers=2)
    preset = ltx23_preset("tiny", config)
    donor = build_text_side(preset.text, seed=5, gemma=load_gemma(tiny_gemma_dir, LENGTH))
    flat = donor.feature_extractor.video_aggregate_embed.in_features
    g = torch.Generator().manual_seed(0)
    tensors = {f"text_embedding_projection.video_aggregate_embed.{k}": v.contiguous()
               for k, v in donor.feature_extractor.video_aggregate_embed.state_dict().items()}
    audio = "text_embedding_projection.audio_aggregate_embed."
    tensors.update({audio + "weight": torch.randn(16, flat, generator=g),
                    audio + "bias": torch.randn(16, generator=g)})
    for stream in ("video", "audio"):
        tensors.update({f"model.diffusion_model.{stream}_embeddings_connector.{k}": v.clone()
                        for k, v in donor.connector.state_dict().items()})  # copies: no shared storage
    path = tmp_path / "ltx23-text.safetensors"
    # a 2.3 header sets every 2.3 flag (export/family.py refuses a mix)
    config["transformer"].update(apply_gated_attention=True, cross_attention_adaln=True)
    save_file(tensors, str(path), metadata={"config": json.dumps(config)})
    base = get_preset("tiny")
    base = replace(base, text=replace(base.text, max_length=LENGTH, connector_registers=128))
    models = load_models(preset=base, checkpoint=path, text_encoder=tiny_gemma_dir,
                         components=("text_head",))
    side = models.text
    assert models.preset.family.label == "LTX-2.3"
    assert side.cfg.per_token_projection and side.cfg.connector_gated_attention
    assert side.cfg.connector_dim == 48
    for name in ("feature_extractor", "connector"):
        got, want = getattr(side, name).state_dict(), getattr(donor, name).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)
