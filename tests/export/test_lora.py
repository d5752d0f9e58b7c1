"""LoRA fusion (export/lora.py): key layouts, parity with ltx-core's apply_loras, errors, bundle round trip."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ltx_core.loader import LoraStateDictWithStrength, SafetensorsStateDictLoader, SDOps, StateDict, apply_loras
from safetensors.torch import save_file

from stdrc.export.config import get_preset
from stdrc.export.errors import LoraError
from stdrc.export.lora import LoraSet, LoraSpec, dit_shapes
from stdrc.runtime.errors import BundleError
from stdrc.runtime.manifest import sha256_file
from stdrc.runtime.schema import LoraEntry

PREFIX = {"comfyui": "diffusion_model.", "diffusers": "transformer.", "peft": "base_model.model.", "ltx-core": ""}
TINY_TARGETS = ("patchify_proj.weight", "adaln_single.linear.weight", "transformer_blocks.0.attn1.to_q.weight",
                "transformer_blocks.1.attn2.to_k.weight", "transformer_blocks.1.ff.net.0.proj.weight",
                "proj_out.weight")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def lora_tensors(shapes: dict, targets, rank: int = 4, seed: int = 0, layout: str = "comfyui",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in targets:
        rows, cols = shapes[key]
        module = PREFIX[layout] + key[: -len(".weight")]
        out[f"{module}.lora_A.weight"] = (torch.randn(rank, cols, generator=gen) * 0.1).to(dtype)
        out[f"{module}.lora_B.weight"] = (torch.randn(rows, rank, generator=gen) * 0.1).to(dtype)
    return out


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def ltx_core_fused(model_sd: dict, loras: list[tuple[Path, float]], layout: str) -> dict:
    """ltx-core's own loader and fusion: its prefix map for the layout, apply_loras in fp32."""
    ops = SDOps(layout).with_matching()
    if PREFIX[layout]:
        ops = ops.with_replacement(PREFIX[layout], "")
    lsds = [LoraStateDictWithStrength(SafetensorsStateDictLoader().load(str(p), sd_ops=ops), s) for p, s in loras]
    sd = StateDict(dict(model_sd), torch.device("cpu"), 0, {torch.bfloat16})
    return apply_loras(sd, lsds, dtype=torch.float32).sd


@pytest.fixture(scope="module")
def tiny_shapes() -> dict:
    return dit_shapes(get_preset("tiny").dit)


@pytest.fixture(scope="module")
def tiny_state(tiny_shapes) -> dict[str, torch.Tensor]:
    """A bf16 DiT state dict (as LTX-2 checkpoints ship), the dtype ltx-core's apply_loras fuses into."""
    from stdrc.export.dit import build_dit

    return {k: v.to(torch.bfloat16) for k, v in build_dit(get_preset("tiny").dit, seed=3).ltx.state_dict().items()}


@pytest.mark.parametrize("text, path, strength", [
    ("a.safetensors", "a.safetensors", None), ("dir/a.safetensors:0.5", "dir/a.safetensors", 0.5),
    ("a.safetensors:-1", "a.safetensors", -1.0), (r"C:\loras\a.safetensors", r"C:\loras\a.safetensors", None),
])
def test_spec_parse(text, path, strength):
    assert LoraSpec.parse(text) == LoraSpec(Path(path), strength)


@pytest.mark.parametrize("text", ["a.safetensors:nan", "a.safetensors:inf", ":0.5", ""])
def test_spec_parse_rejects(text):
    with pytest.raises(LoraError):
        LoraSpec.parse(text)


@pytest.mark.parametrize("layout", sorted(PREFIX))
def test_parity_with_ltx_core(tmp_path, tiny_shapes, tiny_state, layout):
    """Two LoRAs (one covering part of the other's targets) fused per tensor == ltx-core's apply_loras (fp32)."""
    first = write(tmp_path / "a.safetensors", lora_tensors(tiny_shapes, TINY_TARGETS, 4, 1, layout))
    second = write(tmp_path / "b.safetensors", lora_tensors(tiny_shapes, TINY_TARGETS[2:5], 8, 2, layout))
    specs = [(first, 0.7), (second, -0.4)]
    loras = LoraSet.load([LoraSpec(p, s) for p, s in specs], tiny_shapes)
    assert {f.layout for f in loras.files} == {layout}
    assert set(loras.targets) == set(TINY_TARGETS)
    reference = ltx_core_fused(tiny_state, specs, layout)
    for key, weight in tiny_state.items():
        ours = loras.fuse(key, weight.float())
        assert ours.dtype == torch.float32
        if key in TINY_TARGETS:
            assert rel_l2(ours, weight.float()) > 1e-2, key  # the delta is really there
            assert rel_l2(ours, reference[key]) <= 1e-6, key
        else:
            assert ours is not None and torch.equal(ours, weight.float()), key


def test_fuse_keeps_dtype_and_computes_in_fp32(tmp_path, tiny_shapes, tiny_state):
    lora = lora_tensors(tiny_shapes, TINY_TARGETS, dtype=torch.bfloat16)
    path = write(tmp_path / "a.safetensors", lora)
    loras = LoraSet.load([LoraSpec(path, 1.0)], tiny_shapes)
    key = TINY_TARGETS[2]
    weight = tiny_state[key]
    fused = loras.fuse(key, weight)
    assert fused.dtype == torch.bfloat16
    a, b = (lora[f"diffusion_model.{key[:-7]}.lora_{x}.weight"].double() for x in "AB")
    exact = weight.double() + b @ a  # the bf16 LoRA factors, multiplied exactly
    ltx_bf16 = apply_loras(StateDict({key: weight}, torch.device("cpu"), 0, {torch.bfloat16}), [
        LoraStateDictWithStrength(SafetensorsStateDictLoader().load(str(path), sd_ops=SDOps("c").with_matching()
                                                                     .with_replacement("diffusion_model.", "")), 1.0)],
    ).sd[key]
    assert ltx_bf16.dtype == torch.bfloat16
    # one rounding to bf16 at the end: within bf16's half-ulp, and no farther from exact than ltx-core's bf16 math
    assert rel_l2(fused, exact) <= 3e-3
    assert rel_l2(fused, exact) <= rel_l2(ltx_bf16, exact)


def test_strength_zero_is_no_lora(tmp_path, tiny_shapes, tiny_state, tiny_models):
    from stdrc.export.models import load_models

    path = write(tmp_path / "a.safetensors", lora_tensors(tiny_shapes, TINY_TARGETS))
    loras = LoraSet.load([LoraSpec(path, 0.0)], tiny_shapes)
    for key, weight in tiny_state.items():
        assert loras.fuse(key, weight) is weight
    fused = load_models("tiny", loras=(LoraSpec(path, 0.0),)).dit.ltx.state_dict()
    plain = tiny_models.dit.ltx.state_dict()
    assert all(torch.equal(fused[k], plain[k]) for k in plain)
    strong = load_models("tiny", loras=(LoraSpec(path, 1.0),)).dit.ltx.state_dict()
    assert not torch.equal(strong[TINY_TARGETS[0]], plain[TINY_TARGETS[0]])


def test_two_loras_add(tmp_path, tiny_shapes, tiny_state):
    one = write(tmp_path / "a.safetensors", lora_tensors(tiny_shapes, TINY_TARGETS, 4, 1))
    two = write(tmp_path / "b.safetensors", lora_tensors(tiny_shapes, TINY_TARGETS, 2, 2, "diffusers"))
    both = LoraSet.load([LoraSpec(one, 0.5), LoraSpec(two, 1.5)], tiny_shapes)
    only_one = LoraSet.load([LoraSpec(one, 0.5)], tiny_shapes)
    only_two = LoraSet.load([LoraSpec(two, 1.5)], tiny_shapes)
    for key in TINY_TARGETS:
        w = tiny_state[key].float()
        summed = w + (only_one.fuse(key, w) - w) + (only_two.fuse(key, w) - w)
        assert rel_l2(both.fuse(key, w), summed) <= 1e-6


def test_full_width_single_layer_with_audio_keys(tmp_path):
    """ltx2-video's real widths (one layer): fused == ltx-core; the AV model's audio LoRA keys are skipped."""
    shapes = dit_shapes(replace(get_preset("ltx2-video").dit, num_layers=1))
    assert shapes["transformer_blocks.0.attn1.to_q.weight"] == (4096, 4096)
    targets = ("transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.attn2.to_k.weight",
               "caption_projection.linear_1.weight")
    tensors = lora_tensors(shapes, targets, rank=2)
    tensors["diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_A.weight"] = torch.zeros(2, 2048)
    tensors["diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_B.weight"] = torch.zeros(2048, 2)
    path = write(tmp_path / "full.safetensors", tensors)
    loras = LoraSet.load([LoraSpec(path, 0.9)], shapes)
    assert set(loras.targets) == set(targets)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16) for k in targets}
    reference = ltx_core_fused(state, [(path, 0.9)], "comfyui")
    for key in targets:
        assert rel_l2(loras.fuse(key, state[key].float()), reference[key]) <= 1e-6


LTX23_TARGETS = ("transformer_blocks.0.attn1.to_gate_logits.weight",
                 "transformer_blocks.1.attn2.to_gate_logits.weight", "prompt_adaln_single.linear.weight",
                 "prompt_adaln_single.emb.timestep_embedder.linear_1.weight", "adaln_single.linear.weight",
                 "transformer_blocks.1.attn2.to_q.weight")


def test_ltx23_keys_fuse_as_ltx_core(tmp_path):
    """LTX-2.3's own weights at real width (gates, prompt AdaLN, the 9-slot AdaLN linear): two LoRAs fused per
    tensor == ltx-core's apply_loras (fp32). The DiT's keys and shapes come from the config flags alone."""
    cfg = replace(get_preset("ltx2-video").dit, num_layers=2, apply_gated_attention=True,
                  cross_attention_adaln=True, caption_proj_before_connector=True)
    shapes = dit_shapes(cfg)
    assert shapes["adaln_single.linear.weight"] == (9 * 4096, 4096)
    assert shapes["prompt_adaln_single.linear.weight"] == (2 * 4096, 4096)
    assert shapes["transformer_blocks.0.attn1.to_gate_logits.weight"] == (32, 4096)
    first = write(tmp_path / "a.safetensors", lora_tensors(shapes, LTX23_TARGETS, 2, 1))
    second = write(tmp_path / "b.safetensors", lora_tensors(shapes, LTX23_TARGETS[:3], 4, 2))
    specs = [(first, 0.8), (second, -0.5)]
    loras = LoraSet.load([LoraSpec(p, s) for p, s in specs], shapes)
    assert set(loras.targets) == set(LTX23_TARGETS)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16) for k in LTX23_TARGETS}
    reference = ltx_core_fused(state, specs, "comfyui")
    for key in LTX23_TARGETS:
        fused = loras.fuse(key, state[key].float())
        assert rel_l2(fused, state[key].float()) > 1e-2, key  # the delta is really there
        assert rel_l2(fused, reference[key]) <= 1e-6, key


def _bad_loras(tmp_path: Path, shapes: dict) -> dict[str, tuple[Path, str]]:
    good = lora_tensors(shapes, TINY_TARGETS[:2])
    q = "diffusion_model.transformer_blocks.0.attn1.to_q"
    cases = {}
    pickled = tmp_path / "pickled.safetensors"
    torch.save(good, pickled)
    cases["not_safetensors"] = (pickled, "not a safetensors file")
    cases["missing"] = (tmp_path / "nope.safetensors", "does not exist")
    cases["unknown_key"] = (write(tmp_path / "deep.safetensors", {
        **good, "diffusion_model.transformer_blocks.7.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
        "diffusion_model.transformer_blocks.7.attn1.to_q.lora_B.weight": torch.zeros(64, 4)}),
        "1 targets that are not DiT weights: transformer_blocks.7.attn1.to_q")
    cases["other_model"] = (write(tmp_path / "flux.safetensors", {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 64),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(192, 4)}),
        "is not a LoRA for this LTX-2 video DiT")
    cases["rank_mismatch"] = (write(tmp_path / "rank.safetensors", {
        f"{q}.lora_A.weight": torch.zeros(4, 64), f"{q}.lora_B.weight": torch.zeros(64, 3)}), "of one rank")
    cases["shape_mismatch"] = (write(tmp_path / "wide.safetensors", {
        f"{q}.lora_A.weight": torch.zeros(4, 4096), f"{q}.lora_B.weight": torch.zeros(4096, 4)}),
        "trained for another model size")
    cases["not_lora"] = (write(tmp_path / "diff.safetensors", {**good, f"{q}.diff": torch.zeros(64, 64)}),
                         "not lora_A/lora_B/alpha")
    cases["half_pair"] = (write(tmp_path / "half.safetensors", {f"{q}.lora_A.weight": torch.zeros(4, 64)}),
                          "no lora_B (up)")
    cases["alpha"] = (write(tmp_path / "alpha.safetensors", {**good, f"{q}.alpha": torch.tensor(8.0),
                                                             f"{q}.lora_A.weight": torch.zeros(4, 64),
                                                             f"{q}.lora_B.weight": torch.zeros(64, 4)}),
                      "alpha 8 != rank 4")
    return cases


def test_errors_are_typed(tmp_path, tiny_shapes):
    for path, message in _bad_loras(tmp_path, tiny_shapes).values():
        with pytest.raises(LoraError, match=re.escape(message)):
            LoraSet.load([LoraSpec(path, 1.0)], tiny_shapes)


def test_alpha_equal_to_rank_and_kohya_names_are_accepted(tmp_path, tiny_shapes):
    q = "transformer_blocks.0.attn1.to_q"
    path = write(tmp_path / "kohya.safetensors", {f"diffusion_model.{q}.lora_down.weight": torch.ones(4, 64),
                                                  f"diffusion_model.{q}.lora_up.weight": torch.ones(64, 4),
                                                  f"diffusion_model.{q}.alpha": torch.tensor(4.0)})
    loras = LoraSet.load([LoraSpec(path, 0.25)], tiny_shapes)
    assert torch.equal(loras.fuse(f"{q}.weight", torch.zeros(64, 64)), torch.ones(64, 64))


def test_cli_errors_are_one_line_before_any_weight(tmp_path, tiny_shapes, capsys, monkeypatch):
    """Exit 2, one `error:` line, no bundle folder; with a checkpoint, no tensor of it is read first."""
    from stdrc.engines.cli import main
    from stdrc.export import models
    from stdrc.export.checkpoint import save_checkpoint

    ckpt = tmp_path / "ckpt.safetensors"
    tiny = models.load_models("tiny")
    save_checkpoint(ckpt, tiny.dit.ltx, tiny.vae_encoder, tiny.vae_decoder)  # a whole LTX-2 file: no seeded VAE
    reads = []
    monkeypatch.setattr(models, "load_streaming", lambda *args, **kw: reads.append(args))  # reads the weights
    cases = {**_bad_loras(tmp_path, tiny_shapes), "bad_strength": (Path("x.safetensors:nan"), "finite")}
    for name, (path, message) in cases.items():
        out = tmp_path / f"bundle-{name}"
        rc = main(["build-engines", "--checkpoint", str(ckpt), "--lora", str(path), "--out", str(out), "-q",
                   "--cache-dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (name, err)
        assert not out.exists()
    assert reads == []


def test_manifest_entry_validates():
    entry = LoraEntry("a.safetensors", "ab" * 32, 0.5)
    assert LoraEntry.from_json(json.loads(json.dumps(entry.to_json())), "loras[0]") == entry
    for bad in ({"name": "", "sha256": "ab" * 32, "strength": 1.0}, {"name": "a", "sha256": "xyz", "strength": 1.0},
                {"name": "a", "sha256": "ab" * 32, "strength": "1"},
                {"name": "a", "sha256": "ab" * 32, "strength": float("nan")}):
        with pytest.raises(BundleError):
            LoraEntry.from_json(bad, "loras[0]")


@pytest.mark.slow  # a bundle build and verify
def test_build_verify_round_trip(tmp_path, tiny_shapes, tiny_models, cache_dir, capsys):
    """build-engines --lora -> manifest names it -> verify needs the same LoRA and passes; the DiT really changed."""
    from stdrc.engines.cli import main
    from stdrc.export.specs import component_specs
    from stdrc.runtime.backends import open_engine
    from stdrc.runtime.manifest import read_manifest

    lora = write(tmp_path / "style.safetensors", lora_tensors(tiny_shapes, TINY_TARGETS, 4, 5, "comfyui"))
    other = write(tmp_path / "other.safetensors", lora_tensors(tiny_shapes, TINY_TARGETS, 4, 6, "comfyui"))
    out = tmp_path / "bundle"
    assert main(["build-engines", "--backend", "onnxruntime", "--lora", f"{lora}:0.8", "--out", str(out), "-q",
                 "--cache-dir", str(cache_dir)]) == 0
    manifest = read_manifest(out)
    assert manifest.loras == (LoraEntry("style.safetensors", sha256_file(lora), 0.8),)
    assert manifest.created_by.source_sha256 != tiny_models.source_sha256
    capsys.readouterr()
    assert main(["verify", str(out), "--lora", str(lora), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["components"]["dit"]["rel_l2"] <= 1e-4
    for argv, message in ((["verify", str(out)], "was built with style.safetensors:0.8"),
                          (["verify", str(out), "--lora", str(other)], "is not LoRA 1"),
                          (["verify", str(out), "--lora", f"{lora}:0.5"], "differs from the strength 0.8")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    # the engine holds the fused DiT: it disagrees with the LoRA-free reference
    spec = component_specs(tiny_models.preset, manifest.bucket)["dit"]
    feeds = spec.sample_inputs(seed=1)
    got = open_engine(out, "dit", manifest.components["dit"]).run(feeds)["velocity"]
    with torch.no_grad():
        plain = tiny_models.export_modules(manifest.bucket)["dit"](*[torch.from_numpy(feeds[t.name])
                                                                    for t in spec.inputs])
    diff = np.linalg.norm(got - plain.numpy()) / np.linalg.norm(plain.numpy())
    assert diff > 1e-3
