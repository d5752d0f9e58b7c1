"""The real text side: Gemma-3 from a local folder (a random tiny one written here) + LTX-2's connector.

Reference for parity: ltx-core's own path, GemmaTextEncoder.encode (its tokenizer wrapper and
Gemma3ForConditionalGeneration) -> EmbeddingsProcessor.process_hidden_states.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stdrc.export.checkpoint import read_checkpoint, save_checkpoint
from stdrc.export.config import get_preset
from stdrc.export.errors import CheckpointError, ExportError
from stdrc.export.models import load_models
from stdrc.export.text import TextStates, build_text_side, load_gemma
from stdrc.runtime.text import JsonTokenizer

PROMPTS = [
    "a woman smiles at the camera",
    "",
    "   a man walks through a rainy street at night, neon lights reflecting on wet asphalt, slow camera pan  ",
    "zebra quartz",  # words the tokenizer never saw
]
MAX_LENGTH = get_preset("tiny").text.max_length


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir: Path):
    return load_gemma(tiny_gemma_dir, MAX_LENGTH)


@pytest.fixture(scope="module")
def side(gemma):
    return build_text_side(get_preset("tiny").text, seed=0, gemma=gemma)


@pytest.fixture(scope="module")
def runtime_tokenizer(gemma, tmp_path_factory) -> JsonTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(gemma.tokenizer_json(), encoding="utf-8")
    return JsonTokenizer(path, MAX_LENGTH, gemma.pad_id)


def test_folder_sets_the_text_config(gemma, side) -> None:
    assert (gemma.hidden_size, gemma.num_layers, gemma.vocab_size) == (32, 2, 300)
    assert side.cfg.kind == "gemma" and side.cfg.encoder_layers == 2 and side.cfg.vocab_size == 300
    assert (side.cfg.encoder_heads, side.cfg.encoder_ffn) == (2, 64)  # the activation estimate's, in the manifest
    states = side.encoder(torch.tensor([[0, 0, 2, 40, 41]]), torch.tensor([[0, 0, 1, 1, 1]]))
    assert len(states) == 3 and states[0].shape == (1, 5, 32)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_runtime_tokenizer_matches_ltx_core(tiny_gemma_dir: Path, runtime_tokenizer, prompt: str) -> None:
    """The torch-free tokenizer gives ltx-core's ids and mask: BOS, truncation, left padding."""
    from ltx_core.text_encoders.gemma.tokenizer import LTXVGemmaTokenizer

    pairs = LTXVGemmaTokenizer(str(tiny_gemma_dir), MAX_LENGTH).tokenize_with_weights(prompt)["gemma"]
    ids, mask = runtime_tokenizer(prompt)
    assert ids.shape == mask.shape == (1, MAX_LENGTH)
    assert ids[0].tolist() == [int(t) for t, _ in pairs]
    assert mask[0].tolist() == [int(w) for _, w in pairs]


def test_long_prompt_is_truncated_with_bos_kept(runtime_tokenizer) -> None:
    ids, mask = runtime_tokenizer(PROMPTS[2])
    assert mask.all() and ids[0, 0] == 2  # <bos>


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_text_side_matches_ltx_core(tiny_gemma_dir: Path, side, runtime_tokenizer, prompt: str) -> None:
    """Same weights: our static-shape text side == ltx-core's Gemma encoder + embeddings processor (fp32)."""
    from ltx_core.text_encoders.gemma.embeddings_processor import EmbeddingsProcessor
    from ltx_core.text_encoders.gemma.encoders.base_encoder import GemmaTextEncoder
    from ltx_core.text_encoders.gemma.tokenizer import LTXVGemmaTokenizer
    from transformers import Gemma3ForConditionalGeneration

    hf = Gemma3ForConditionalGeneration.from_pretrained(tiny_gemma_dir, local_files_only=True,
                                                        dtype=torch.float32).eval()
    encoder = GemmaTextEncoder(model=hf, tokenizer=LTXVGemmaTokenizer(str(tiny_gemma_dir), MAX_LENGTH),
                               dtype=torch.float32)
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV1

    ltx_features = FeatureExtractorV1(side.feature_extractor.aggregate_embed)  # ltx-core's, our weights
    processor = EmbeddingsProcessor(feature_extractor=ltx_features, video_connector=side.connector)
    with torch.no_grad():
        states, mask = encoder.encode(prompt)
        expected = processor.process_hidden_states(states, mask).video_encoding
        ids, our_mask = (torch.from_numpy(a) for a in runtime_tokenizer(prompt))
        context, context_mask = side(ids, our_mask)
        ours = TextStates(side.encoder)(ids, our_mask)  # what the text_gemma engine hands text_head
        from_ltx_states = side.head(our_mask, *states)[0]  # the head on ltx-core's encoder's states
    assert torch.equal(our_mask, mask.cpu())
    assert context.shape == (1, MAX_LENGTH, 32) and context_mask.all()
    assert (context - expected).abs().max().item() <= 1e-5
    valid = our_mask.bool()[0]  # the engine zeroes the padding, which the head never reads
    assert len(ours) == len(states) and all((a[0, valid] - b[0, valid]).abs().max().item() <= 1e-5
                                            for a, b in zip(ours, states))
    assert all((a[0, ~valid] == 0).all() for a in ours)
    assert (from_ltx_states - expected).abs().max().item() <= 1e-5


def _hidden_states(count: int, length: int, width: int, valid: int, dtype: torch.dtype, seed: int):
    """Left-padded random hidden states with per-layer scales and offsets (Gemma's grow with depth),
    and something large under the padding, which must not reach the statistics."""
    g = torch.Generator().manual_seed(seed)
    states = tuple((torch.randn(1, length, width, generator=g) * (1 + 3 * i) + i).to(dtype) for i in range(count))
    for h in states:
        h[:, : length - valid] = 1e3 if dtype == torch.float32 else 300.0
    mask = torch.zeros(1, length, dtype=torch.int64)
    mask[:, length - valid:] = 1
    return states, mask


@pytest.mark.parametrize("length, valid", [(64, 64), (64, 17), (64, 1), (128, 1), (128, 100)])
@pytest.mark.parametrize("bias", [False, True])
def test_layerwise_features_equal_ltx_core(length: int, valid: int, bias: bool) -> None:
    """Per-hidden-state feature extraction == ltx-core's stacked FeatureExtractorV1 (fp32, 1e-5), left padding
    down to a single valid token; same state dict, so checkpoints load into either."""
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV1

    from stdrc.export.text import LayerwiseFeatureExtractor

    count, width, out = 5, 24, 40
    torch.manual_seed(length + valid)
    linear = torch.nn.Linear(width * count, out, bias=bias)
    ours, theirs = LayerwiseFeatureExtractor(linear), FeatureExtractorV1(linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == (
        {"aggregate_embed.weight", "aggregate_embed.bias"} if bias else {"aggregate_embed.weight"})
    states, mask = _hidden_states(count, length, width, valid, torch.float32, seed=valid)
    with torch.no_grad():
        got, none = ours(states, mask, "left")
        want, _ = theirs(states, mask, "left")
    assert none is None and got.dtype == want.dtype == torch.float32 and got.shape == (1, length, out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pad = mask[0] == 0
    if bias:  # padded rows are the bias alone, as ltx-core's zeroed inputs give
        assert torch.equal(got[0, pad], linear.bias.detach().expand(int(pad.sum()), -1))
    else:
        assert (got[0, pad] == 0).all()


def test_layerwise_features_fp16_sanity() -> None:
    """fp16 hidden states: ltx-core's dtypes (fp32 statistics, fp16 product), close to its fp32 result."""
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV1

    from stdrc.export.text import LayerwiseFeatureExtractor

    count, width, out, length, valid = 7, 64, 48, 96, 30
    torch.manual_seed(0)
    linear = torch.nn.Linear(width * count, out, bias=False)
    states, mask = _hidden_states(count, length, width, valid, torch.float16, seed=1)
    with torch.no_grad():
        want = FeatureExtractorV1(linear)(tuple(h.float() for h in states), mask)[0]
        ref16 = FeatureExtractorV1(linear.half())(states, mask)[0]
        got = LayerwiseFeatureExtractor(linear)(states, mask)[0]  # linear is fp16 now, as a CastIO export's
    assert got.dtype == ref16.dtype == torch.float16 and torch.isfinite(got).all()
    rel = lambda a: float((a.float() - want).norm() / want.norm())  # noqa: E731
    assert rel(got) < 2e-3 and rel(got) <= 2 * rel(ref16) + 1e-4, (rel(got), rel(ref16))


def test_padding_does_not_leak_into_the_context(side, runtime_tokenizer) -> None:
    """Pad ids are masked: whatever sits under the padding, the context is the same."""
    ids, mask = (torch.from_numpy(a) for a in runtime_tokenizer("a woman smiles"))
    other = ids.clone()
    other[mask == 0] = 57
    with torch.no_grad():
        assert torch.allclose(side(ids, mask)[0], side(other, mask)[0], atol=1e-6)


def test_checkpoint_text_weights_load(tmp_path: Path, tiny_gemma_dir: Path, side) -> None:
    """LTX-2 checkpoints hold the projection and connector: they load over the seeded ones."""
    preset = get_preset("tiny")
    donor = load_models("tiny", seed=5, text_encoder=tiny_gemma_dir)
    for layout in ("comfy", "ltx"):
        path = tmp_path / f"{layout}.safetensors"
        save_checkpoint(path, donor.dit.ltx, donor.vae_encoder, donor.vae_decoder, layout=layout, text=donor.text)
        ckpt = read_checkpoint(path)
        assert set(ckpt.text) == {f"feature_extractor.{k}" for k in donor.text.feature_extractor.state_dict()} | {
            f"connector.{k}" for k in donor.text.connector.state_dict()}
        models = load_models("tiny", checkpoint=path, text_encoder=tiny_gemma_dir)
        assert models.preset.text.kind == "gemma" and models.preset.text.max_length == preset.text.max_length
        for k, v in donor.text.connector.state_dict().items():
            assert torch.equal(models.text.connector.state_dict()[k], v), k
        assert not torch.equal(models.text.connector.learnable_registers, side.connector.learnable_registers)


def test_dit_only_checkpoint_needs_a_base_checkpoint(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    donor = load_models("tiny", seed=5, text_encoder=tiny_gemma_dir)
    dit_only, full = tmp_path / "stdrc_dit.safetensors", tmp_path / "ltx2.safetensors"
    save_checkpoint(dit_only, donor.dit.ltx, layout="ltx")
    save_checkpoint(full, donor.dit.ltx, donor.vae_encoder, donor.vae_decoder, text=donor.text)
    with pytest.raises(CheckpointError, match="--base-checkpoint"):
        load_models("tiny", checkpoint=dit_only, text_encoder=tiny_gemma_dir)
    with pytest.raises(CheckpointError, match="--base-checkpoint"):  # the text side alone is asked for
        load_models("tiny", checkpoint=dit_only, text_encoder=tiny_gemma_dir, components=("text_head",))
    models = load_models("tiny", checkpoint=dit_only, text_encoder=tiny_gemma_dir, base_checkpoint=full)
    assert torch.equal(models.text.feature_extractor.aggregate_embed.weight,
                       donor.text.feature_extractor.aggregate_embed.weight)
    with pytest.raises(CheckpointError, match="no text projection"):
        load_models("tiny", checkpoint=dit_only, text_encoder=tiny_gemma_dir, base_checkpoint=dit_only,
                    components=("text_head",))


def test_ltx23_projection_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "ltx23.safetensors"
    save_file({"text_embedding_projection.video_aggregate_embed.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(CheckpointError, match="holds LTX-2.3 tensors .* but no config metadata"):
        load_models("tiny", checkpoint=path, components=("text_head",))


def test_connector_config_comes_from_metadata(tmp_path: Path) -> None:
    from stdrc.export.checkpoint import config_from_metadata

    preset = config_from_metadata(get_preset("ltx2-video"), {"transformer": {
        "connector_num_layers": 8, "connector_positional_embedding_max_pos": [4096], "rope_type": "split",
        "connector_apply_gated_attention": True}})
    assert preset.text.connector_layers == 8 and preset.text.connector_max_pos == (4096,)
    assert preset.text.rope_type == "split" and preset.text.connector_gated_attention
    assert preset.dit.rope_type == "split"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case, message", [
    ("missing", "no config.json"),
    ("not_json", "not valid JSON"),
    ("llama", "'llama' model, not Gemma-3"),
    ("no_weights", "no .safetensors weights"),
    ("truncated", "could not be loaded"),
    ("no_tokenizer", "tokenizer"),
])
def test_bad_gemma_folders(tmp_path: Path, tiny_gemma_dir: Path, case: str, message: str) -> None:
    folder = _copy(tiny_gemma_dir, tmp_path / "gemma")
    if case == "missing":
        (folder / "config.json").unlink()
    elif case == "not_json":
        (folder / "config.json").write_text("{not json")
    elif case == "llama":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif case == "no_weights":
        (folder / "model.safetensors").unlink()
    elif case == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=message) as info:
        load_gemma(folder, MAX_LENGTH)
    assert "\n" not in str(info.value) and "--text-encoder" in str(info.value)


def test_width_mismatch_names_the_preset(tmp_path: Path, make_tiny_gemma) -> None:
    folder = make_tiny_gemma(tmp_path / "wide", hidden_size=48)
    with pytest.raises(ExportError, match="ltx2-video"):
        load_models("tiny", text_encoder=folder)


def test_text_only_gemma_folder(tmp_path: Path, make_tiny_gemma, runtime_tokenizer) -> None:
    """A `gemma3_text` folder (Gemma3ForCausalLM) loads too, and its encoder is that model's trunk."""
    from transformers import Gemma3ForCausalLM

    folder = make_tiny_gemma(tmp_path / "gemma-text", text_only=True)
    gemma = load_gemma(folder, MAX_LENGTH)
    assert (gemma.hidden_size, gemma.num_layers) == (32, 2)
    ids, mask = (torch.from_numpy(a) for a in runtime_tokenizer("a woman smiles"))
    reference = Gemma3ForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        states = gemma.encoder(ids, mask)
    valid = mask[0].bool()
    assert len(states) == len(expected) == 3
    for ours, theirs in zip(states, expected):
        assert torch.allclose(ours[:, valid], theirs[:, valid], atol=1e-6)


def test_gemma_preset_without_folder_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match="--text-encoder"):
        build_text_side(get_preset("ltx2-video").text)


def test_runtime_tokenizer_bad_file(tmp_path: Path) -> None:
    from stdrc.runtime.errors import BundleError

    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(BundleError, match="rebuild the bundle"):
        JsonTokenizer(path, MAX_LENGTH, 0)


@pytest.mark.slow
def test_gemma_bundle_builds_verifies_and_generates(tmp_path: Path, tiny_gemma_dir: Path, cache_dir: Path,
                                                     astronaut_png: Path, side) -> None:
    """build-engines --text-encoder: Gemma ONNX + tokenizer.json in the bundle, verify passes, generate runs."""
    from stdrc.engines.build import BuildConfig, build_engines
    from stdrc.engines.verify import verify_bundle
    from stdrc.runtime.manifest import read_manifest
    from stdrc.runtime.pipeline import Pipeline

    bundle = build_engines(BuildConfig(out=tmp_path / "gemma-bundle", cache_dir=cache_dir, backend="onnxruntime",
                                       text_encoder=tiny_gemma_dir, progress=False))
    manifest = read_manifest(bundle)
    assert manifest.text.tokenizer == "hf-tokenizers" and manifest.text.pad_id == 0
    assert "tokenizer.json" in manifest.components["text_gemma"].extra_files
    assert manifest.model_config.text.kind == "gemma"
    reports = verify_bundle(bundle, text_encoder=tiny_gemma_dir)
    assert all(r.ok for r in reports.values()), reports
    with pytest.raises(CheckpointError, match="--text-encoder"):
        verify_bundle(bundle)

    pipe = Pipeline.from_bundle(bundle)
    prompt = "a woman smiles at the camera"
    context, _ = pipe.prompts(prompt)
    ids, mask = JsonTokenizer(bundle / "tokenizer.json", MAX_LENGTH, 0)(prompt)
    with torch.no_grad():
        expected = side(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy()
    assert np.linalg.norm(context - expected) / np.linalg.norm(expected) <= 1e-4
    result = pipe.generate(reference=astronaut_png, prompt=prompt, seed=0, steps=2)
    assert result.frames.shape[0] == manifest.bucket.frames

    (bundle / "tokenizer.json").write_text("{}")
    from stdrc.runtime.errors import BundleError

    with pytest.raises(BundleError, match="tokenizer.json does not match its sha256"):
        Pipeline.from_bundle(bundle).prompts("another prompt")  # hashed before the tokenizer is read


def test_model_set_tokenizes_as_the_runtime(tiny_gemma_dir: Path, runtime_tokenizer) -> None:
    """Calibration tokenizes through the ModelSet: with Gemma, the same ids as the bundle's tokenizer.json."""
    models = load_models("tiny", text_encoder=tiny_gemma_dir)
    for prompt in PROMPTS:
        for ours, runtime in zip(models.tokenize(prompt), runtime_tokenizer(prompt)):
            assert ours.dtype == np.int64 and np.array_equal(ours, runtime), prompt


def test_a_meta_device_build_leaves_later_builds_working() -> None:
    """ltx-core memoises the RoPE frequency grid: a text side built on meta (shape-only builds, the synthetic
    checkpoint writer) must not leave a meta grid behind for the next real build in the process."""
    from ltx_core.model.transformer import rope

    from stdrc.export.text import TextSide, TinyTextEncoder

    cfg = get_preset("tiny").text
    rope.generate_freq_grid_np.cache_clear()
    rope.generate_freq_grid_pytorch.cache_clear()
    with torch.device("meta"):
        on_meta = TextSide(cfg, TinyTextEncoder(cfg))
    assert on_meta.connector.learnable_registers.is_meta
    real = TextSide(cfg, TinyTextEncoder(cfg))
    assert real.head.connector_cos.device.type == "cpu" and torch.isfinite(real.head.connector_cos).all()
    rope.generate_freq_grid_np.cache_clear()
    rope.generate_freq_grid_pytorch.cache_clear()
    fresh = TextSide(cfg, TinyTextEncoder(cfg))
    torch.testing.assert_close(real.head.connector_cos, fresh.head.connector_cos, rtol=0, atol=0)
