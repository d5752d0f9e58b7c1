"""VAE wrappers, the text side and presets/buckets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stdrc.export.config import VAEConfig, get_preset
from stdrc.export.errors import ExportError
from stdrc.export.text import build_text_side
from stdrc.export.vae import DecoderForExport, build_vae, mix_decode_noise
from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import Bucket
from stdrc.runtime.text import ByteTokenizer, PromptCache


def test_decoder_without_noise_equals_ltx_core(tiny_models) -> None:
    latent = torch.randn(1, 128, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([0.05])
    dec = tiny_models.vae_decoder
    with torch.no_grad():
        theirs = dec(latent, timestep, generator=torch.Generator().manual_seed(9))
        noise = torch.randn(latent.size(), generator=torch.Generator().manual_seed(9))
        ours = DecoderForExport(dec)(mix_decode_noise(latent, noise, dec.decode_noise_scale), timestep)
    assert ours.shape == (1, 3, 9, 64, 96)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_reference_photo_is_one_latent_frame(tiny_models) -> None:
    with torch.no_grad():
        latent = tiny_models.vae_encoder(torch.zeros(1, 3, 1, 64, 96))
    assert latent.shape == (1, 128, 1, 2, 3)


def test_noise_injecting_decoder_is_refused() -> None:
    cfg = VAEConfig(decoder_blocks=(("res_x", {"num_layers": 1, "inject_noise": True}),))
    with pytest.raises(ExportError, match="inject_noise"):
        build_vae(cfg)


@pytest.mark.parametrize("prompt", ["a woman waves at the camera", "", "x" * 40])
def test_text_side_equals_ltx_core_connector(tiny_models, prompt: str) -> None:
    ids, mask = ByteTokenizer(16)(prompt)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        context, context_mask = tiny_models.text(ids, mask)
        reference = tiny_models.text.ltx_reference(ids, mask)
    assert context.shape == (1, 16, 32)
    assert torch.equal(context_mask, torch.ones_like(mask))  # registers fill the padding
    assert (context - reference).abs().max().item() <= 1e-5


def test_byte_tokenizer_left_pads_and_truncates() -> None:
    tok = ByteTokenizer(6)
    ids, mask = tok("ab")
    assert ids.tolist() == [[0, 0, 0, 1, ord("a") + 3, ord("b") + 3]]
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1]]
    ids, mask = tok("abcdefgh")
    assert ids.shape == (1, 6) and mask.all()
    assert tok("")[1].sum() == 1  # the "no text" prompt still has BOS


def test_prompt_cache_encodes_each_prompt_once() -> None:
    calls = []
    cache = PromptCache(lambda ps: (calls.append(list(ps)), [np.full(1, len(p)) for p in ps])[1], capacity=2)
    cache("a"), cache("a"), cache(""), cache("b"), cache("a")
    assert calls == [["a"], [""], ["b"], ["a"]]
    assert len(cache) == 2
    cache.fill(["ccc", "a", "dd", "ccc"])  # the missing ones in one call, each once; the cached one not again
    assert calls[-1] == ["ccc", "dd"] and cache.encoded == 6
    assert cache("dd")[0] == 2 and cache("ccc")[0] == 3


def test_empty_prompt_differs_from_text(tiny_models) -> None:
    tok = ByteTokenizer(16)
    with torch.no_grad():
        a = tiny_models.text(*map(torch.from_numpy, tok("a man runs")))[0]
        b = tiny_models.text(*map(torch.from_numpy, tok("")))[0]
    assert (a - b).abs().max() > 1e-2


def test_presets_and_errors() -> None:
    tiny, full = get_preset("tiny"), get_preset("ltx2-video")
    assert (tiny.dit.num_layers, full.dit.num_layers) == (2, 48)
    assert full.dit.inner_dim == 4096 and full.dit.cross_attention_dim == 4096
    with pytest.raises(InputError, match="unknown preset 'nope'"):
        get_preset("nope")
    assert build_text_side(tiny.text) is not None


@pytest.mark.parametrize("kwargs,match", [
    ({"frames": 10}, "not 8k\\+1: use --frames 9 or 17"),
    ({"height": 100}, "height=100 is not a positive multiple of 32: use --height 96"),
    ({"width": 0}, "width=0"),
])
def test_bucket_validation(kwargs: dict, match: str) -> None:
    base = {"frames": 9, "height": 64, "width": 96, "text_length": 16}
    with pytest.raises(InputError, match=match):
        Bucket(**{**base, **kwargs})


def test_bucket_token_counts() -> None:
    b = Bucket(frames=121, height=512, width=768, text_length=1024)
    assert (b.latent_frames, b.latent_height, b.latent_width) == (16, 16, 24)
    assert (b.video_tokens, b.reference_tokens) == (6144, 384)
