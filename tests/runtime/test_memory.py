"""Memory plans (all / staged / auto), prompt embeddings on disk, and `stdrc plan` / `encode-prompts`."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import Bucket
from stdrc.runtime.memory import (
    SESSION_BYTES,
    MemoryPlanReport,
    activation_bytes,
    choose_plan,
    gemma_activation_bytes,
    head_activation_bytes,
    memory_needs,
    parse_bytes,
    states_bytes,
    text_activation_bytes,
    trim_heap,
)
from stdrc.runtime.pipeline import Pipeline, weights_and_activations
from stdrc.runtime.schema import DitModel, ModelConfig, TextModel, VaeModel
from stdrc.runtime.text import PromptStore

PROMPT = "a woman smiles and waves"
STAGE_ORDER = ["vae_encoder", "text_gemma", "text_head", "dit", "vae_decoder"]  # the reference before the prompts


def _generate(pipe: Pipeline, astronaut_png, **kw) -> np.ndarray:
    return pipe.generate(reference=astronaut_png, prompt=PROMPT, seed=3, steps=2, **kw).frames


def test_staged_loads_each_engine_for_its_stage_and_gives_identical_frames(tiny_bundle, astronaut_png, tmp_path):
    resident = Pipeline.from_bundle(tiny_bundle, memory_plan="all", prompt_cache=tmp_path / "a")
    assert resident.engines.loaded() == []  # opened on first use (after Pipeline.prepare), or all by warm()
    resident.engines.warm()
    assert sorted(resident.engines.loaded()) == sorted(resident.manifest.components)
    staged = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=tmp_path / "s")
    assert staged.engines.loaded() == []  # nothing opened before a stage needs it
    want = _generate(resident, astronaut_png)
    got = _generate(staged, astronaut_png)
    assert np.array_equal(got, want)  # byte-identical for the same seed
    assert staged.engines.opened == STAGE_ORDER and staged.engines.loaded() == []
    again = _generate(staged, astronaut_png)  # released engines reopen for the next generation
    assert np.array_equal(again, want)
    # the prompt was cached in memory: the second generation never reopened the text encoder
    assert staged.engines.opened == STAGE_ORDER + ["vae_encoder", "dit", "vae_decoder"]


def test_cached_prompt_never_opens_the_text_encoder(tiny_bundle, astronaut_png, tmp_path):
    cache = tmp_path / "prompts"
    first = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=cache)
    assert first.encode_prompts([PROMPT]) == 2  # the prompt and the empty "no text" prompt
    assert first.encode_prompts([PROMPT]) == 0
    fresh = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=cache)  # a new process's view
    frames = _generate(fresh, astronaut_png)
    assert not {"text_gemma", "text_head"} & set(fresh.engines.opened) and fresh.prompts.encoded == 0
    uncached = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=None)
    assert np.array_equal(frames, _generate(uncached, astronaut_png))
    assert uncached.engines.opened[:3] == ["vae_encoder", "text_gemma", "text_head"]  # each once for both prompts


def test_corrupt_or_mismatched_cache_entries_are_ignored_and_rewritten(tiny_bundle, tmp_path):
    cache = tmp_path / "prompts"
    pipe = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=cache)
    want = pipe.prompts(PROMPT)
    store = pipe.prompts.store
    path = store.path(PROMPT)
    for damage in (b"not an npz", path.read_bytes()[:100]):
        path.write_bytes(damage)
        assert store.get(PROMPT) is None
        fresh = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=cache)
        got = fresh.prompts(PROMPT)
        assert fresh.prompts.encoded == 1 and np.array_equal(got[0], want[0])
        assert store.get(PROMPT) is not None  # rewritten whole
    other = store.path("another prompt")
    path.replace(other)  # an entry holding a different prompt than its name says
    assert store.get("another prompt") is None


def test_another_text_side_never_shares_entries(tiny_bundle, tmp_path):
    pipe = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=tmp_path)
    text = pipe.manifest.text
    key = PromptStore.text_key("a" * 64, text)
    assert key != PromptStore.text_key("b" * 64, text)
    assert key != PromptStore.text_key("a" * 64, replace(text, max_length=99))
    assert pipe.prompts.store.folder.parent == tmp_path


def test_precomputed_embeddings_equal_the_prompt_and_bad_shapes_are_refused(tiny_bundle, astronaut_png, tmp_path):
    pipe = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=None)
    text, empty = pipe.prompts(PROMPT), pipe.prompts("")
    fresh = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=None)
    frames = _generate(fresh, astronaut_png, text_embeddings=text, negative_embeddings=empty)
    assert not {"text_gemma", "text_head"} & set(fresh.engines.opened)
    assert np.array_equal(frames, _generate(pipe, astronaut_png))
    opened = list(fresh.engines.opened)
    with pytest.raises(InputError, match="precomputed text embeddings"):
        fresh.generate(reference=astronaut_png, prompt=PROMPT, steps=1,
                       text_embeddings=(text[0][:, :3], text[1][:, :3]))
    assert fresh.engines.opened == opened  # refused before the reference stage opened anything


def test_stage_events_and_the_heap_trimmed_on_release(tiny_bundle, astronaut_png):
    pipe = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=None)
    events = []
    pipe.engines.on_stage = lambda event, name: events.append((event, name, list(pipe.engines.loaded())))
    _generate(pipe, astronaut_png)
    for name in STAGE_ORDER:  # opened when its stage starts, alone, and released when it ends
        assert [e[:2] for e in events if e[1] == name] == [("open", name), ("opened", name), ("done", name)]
        assert next(e[2] for e in events if e[:2] == ("opened", name)) == [name]
    # Gemma is released (its "done", the release after it) before the head starts opening, for both prompts
    order = [e[:2] for e in events]
    assert order.index(("done", "text_gemma")) + 1 == order.index(("open", "text_head"))
    assert order.index(("opened", "text_gemma")) + 1 == order.index(("done", "text_gemma"))
    assert trim_heap() is (platform.libc_ver()[0] == "glibc")


def test_plan_arithmetic():
    weights = {"text_gemma": 22, "text_head": 4, "vae_encoder": 1, "dit": 13, "vae_decoder": 2}
    acts = {"text_gemma": 1, "text_head": 1, "vae_encoder": 1, "dit": 3, "vae_decoder": 5}
    r = memory_needs(weights, acts)
    assert [s.component for s in r.stages] == ["vae_encoder", "text_gemma", "text_head", "dit", "vae_decoder"]
    session = SESSION_BYTES  # one running session's own, once per plan's peak
    # staged: Gemma's stage alone (22 + 1), never Gemma and its head together (27)
    assert r.all_peak_bytes == 42 + 5 + session and r.staged_peak_bytes == 23 + session
    cached = memory_needs(weights, acts, skip_text=True)  # neither text stage
    assert [s.component for s in cached.stages] == ["vae_encoder", "dit", "vae_decoder"]
    assert cached.staged_peak_bytes == 16 + session and cached.all_peak_bytes == 16 + 5 + session
    assert memory_needs({}, {}).staged_peak_bytes == 0


# ltx2-video's text config at reduced Gemma depth, as a build writes it into the manifest (export/config.py)
_TEXT = TextModel(kind="gemma", max_length=1024, encoder_dim=3840, encoder_layers=48, encoder_heads=16,
                  encoder_ffn=15360, connector_heads=30, connector_head_dim=128)
MIB = 2**20


def test_text_encoder_estimate_terms():
    """Hidden states once, one Gemma layer (feed-forward + fp32 scores), one connector block; 1024 tokens."""
    t, d = 1024, 3840
    base = text_activation_bytes(replace(_TEXT, encoder_layers=0), t, 4)
    assert text_activation_bytes(_TEXT, t, 4) - base == 48 * t * d * 4  # one more hidden state a layer, no stack copies
    wider = replace(_TEXT, encoder_heads=32)
    more_heads = text_activation_bytes(wider, t, 4) - text_activation_bytes(_TEXT, t)
    assert more_heads == 3 * 16 * t * t * 4
    # 16-bit halves the rows, not the fp32 attention scores and probabilities nor the extraction's fp32 copies
    fp32 = (3 * 16 + 30) * t * t * 4 + (t * d + t * 30 * 128) * 4
    assert text_activation_bytes(_TEXT, t, 2) - fp32 == (text_activation_bytes(_TEXT, t, 4) - fp32) // 2
    bucket = Bucket(frames=9, height=64, width=64, text_length=t)
    model = ModelConfig(dit=DitModel(in_channels=128, num_layers=1, num_attention_heads=32,
                                     attention_head_dim=128, cross_attention_dim=4096),
                        vae=VaeModel(latent_channels=128, timestep_conditioning=False, decode_timestep=0.05,
                                     decode_noise_scale=0.025), text=_TEXT)
    for e, precision in ((2, "fp16"), (4, "fp32")):
        gemma, head = (activation_bytes(c, model, bucket, precision) for c in ("text_gemma", "text_head"))
        assert gemma == gemma_activation_bytes(_TEXT, t, e) and head == head_activation_bytes(_TEXT, t, e)
        # each holds the hidden states that cross between them once; together, as one graph, once
        assert gemma + head - states_bytes(_TEXT, t, e) == text_activation_bytes(_TEXT, t, e)
    assert states_bytes(_TEXT, t, 2) == 49 * t * d * 2  # Gemma-3 12B at 1024 tokens, fp16: 368 MiB
    # the head's extraction holds one state's fp32 copies, never the [T, D, L] stack
    assert head_activation_bytes(replace(_TEXT, encoder_layers=0), t, 4) + 48 * t * d * 4 == \
        head_activation_bytes(_TEXT, t, 4)


@pytest.mark.parametrize("layers, heads, ffn, measured_mib", [
    (2, 2, 256, 401), (6, 2, 256, 414), (28, 2, 256, 425),  # narrow Gemma layers
    (1, 16, 15360, 450), (2, 16, 15360, 719), (4, 16, 15360, 796),  # Gemma-3 12B's own layers
])
def test_text_encoder_estimate_covers_the_measured_runs(layers, heads, ffn, measured_mib):
    """fp32 ONNX Runtime CPU runs of the reduced-depth one-engine text encoder (docs/benchmarks.md, 2026-12-02):
    the run peak over the weights is within both engines' estimates as one graph plus SESSION_BYTES, and not
    twice it."""
    text = replace(_TEXT, encoder_layers=layers, encoder_heads=heads, encoder_ffn=ffn)
    need = text_activation_bytes(text, 1024, 4)
    assert measured_mib * MIB <= need + SESSION_BYTES < 2.1 * measured_mib * MIB


def test_text_head_estimate_covers_its_measured_run():
    """benchmarks/text_engines.py, fp32 ONNX Runtime CPU, 4 narrow Gemma layers, 1024 tokens (docs/benchmarks.md,
    2026-12-07): the head's run peak over its weights is within its estimate plus SESSION_BYTES, not twice it."""
    text = replace(_TEXT, encoder_layers=4, encoder_heads=2, encoder_ffn=256)
    need = head_activation_bytes(text, 1024, 4) + SESSION_BYTES
    assert 438.4 * MIB <= need < 2 * 438.4 * MIB


def test_text_encoder_estimate_of_old_manifests():
    """Manifests written before the head count was recorded: Gemma-3 12B's 16 heads, feed-forward 4 x width."""
    old = {k: v for k, v in _TEXT.to_json().items() if k not in ("encoder_heads", "encoder_ffn")}
    old = TextModel.from_json(old, "model_config.text")
    ffn4 = replace(_TEXT, encoder_ffn=4 * 3840)
    assert text_activation_bytes(old, 1024) == text_activation_bytes(ffn4, 1024)
    tiny = TextModel.from_json({"kind": "tiny", "max_length": 16, "encoder_dim": 32, "encoder_layers": 2,
                                "connector_heads": 2, "connector_head_dim": 16}, "model_config.text")
    explicit = replace(tiny, encoder_heads=1, encoder_ffn=128)
    assert text_activation_bytes(tiny, 0) == text_activation_bytes(explicit, 16)


def test_auto_plan_and_sizes():
    small = MemoryPlanReport((), all_peak_bytes=1, staged_peak_bytes=1)
    huge = MemoryPlanReport((), all_peak_bytes=1 << 60, staged_peak_bytes=1)
    assert choose_plan("auto", small, "cpu") == "all" and choose_plan("auto", huge, "cpu") == "staged"
    assert choose_plan("staged", small, "cpu") == "staged"
    with pytest.raises(InputError, match="memory plan"):
        choose_plan("half", small, "cpu")
    assert parse_bytes("24GB") == parse_bytes("24 GiB") == 24 * 2**30 and parse_bytes("800MB") == 800 * 2**20
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(InputError):
            parse_bytes(bad)


def test_manifest_records_weight_bytes_per_component(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle, memory_plan="staged", prompt_cache=None)
    weights, acts = weights_and_activations(tiny_bundle, pipe.manifest)
    recorded = pipe.manifest.memory.weight_bytes
    assert set(recorded) == set(pipe.manifest.components)
    for name, entry in pipe.manifest.components.items():
        files = [entry.file, *[f for f in entry.extra_files if f.endswith(".data")]]
        assert recorded[name] == weights[name] == sum((tiny_bundle / f).stat().st_size for f in files)
        assert acts[name] > 0


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stdrc.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_plan_and_encode_prompts_commands(tiny_bundle, tmp_path):
    out = _cli("plan", "--bundle", str(tiny_bundle), "--gpu-memory", "24GB")
    assert out.returncode == 0 and "staged" in out.stdout and "fits" in out.stdout, out.stderr
    assert out.stdout.splitlines()[0].split() == ["model", "ltx2", "(preset", "tiny)"]
    data = json.loads(_cli("plan", "--bundle", str(tiny_bundle), "--json").stdout)
    assert data["family"] == "ltx2"
    assert data["cached prompt"]["staged_peak_bytes"] <= data["uncached prompt"]["staged_peak_bytes"]
    bad = _cli("plan", "--bundle", str(tiny_bundle), "--gpu-memory", "lots")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    made = _cli("encode-prompts", "--bundle", str(tiny_bundle), "-", "--cache-dir", str(tmp_path),
                stdin=f"{PROMPT}\n\nanother one\n")
    assert made.returncode == 0 and "3 encoded now" in made.stdout, made.stderr
    assert len(list(tmp_path.rglob("*.npz"))) == 3
    missing = _cli("encode-prompts", "--bundle", str(tiny_bundle), str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "one prompt a line" in missing.stderr
