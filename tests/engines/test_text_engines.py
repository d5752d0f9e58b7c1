"""The text side as two engines: Gemma's hidden states handed to the head in the engine's precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from stdrc.engines.build import BuildConfig, build_component
from stdrc.engines.bundle import BundleWriter
from stdrc.export.config import get_preset
from stdrc.export.models import load_models, plan_sources
from stdrc.export.specs import component_specs
from stdrc.runtime.backends import open_engine
from stdrc.runtime.manifest import Bucket
from stdrc.runtime.text import ByteTokenizer
from stdrc.runtime.vocab import TEXT_COMPONENTS


def test_fp16_text_engines_hand_over_16bit_states(tmp_path: Path, cache_dir: Path) -> None:
    """fp16 ONNX Runtime: text_gemma's outputs and text_head's state inputs are float16 in the graph and the
    manifest (half of fp32's bytes cross), the context stays fp32, and the chain equals the fp32 PyTorch text
    side within fp16's verify tolerance (1e-2)."""
    preset = get_preset("tiny")
    bucket = Bucket(**preset.default_bucket)
    cfg = BuildConfig(out=tmp_path / "bundle", cache_dir=cache_dir, backend="onnxruntime", precision="fp16",
                      progress=False)
    specs = component_specs(preset, bucket, state_dtype="float16")
    src = plan_sources(preset)
    ids, mask = ByteTokenizer(bucket.text_length)("a woman smiles and waves")
    with BundleWriter(cfg.out) as writer:
        entries = {n: build_component(cfg, "onnxruntime", src, bucket, specs[n], writer, lambda: None)
                   for n in TEXT_COMPONENTS}
        gemma, head = entries["text_gemma"], entries["text_head"]
        assert len(gemma.outputs) == preset.text.encoder_layers + 1
        assert {t.dtype for t in gemma.outputs} == {"float16"} and head.inputs[1:] == gemma.outputs
        graphs = {n: onnx.load(str(writer.staging / e.file), load_external_data=False).graph
                  for n, e in entries.items()}
        assert {o.type.tensor_type.elem_type for o in graphs["text_gemma"].output} == {onnx.TensorProto.FLOAT16}
        assert [i.type.tensor_type.elem_type for i in graphs["text_head"].input][1:] == \
            [onnx.TensorProto.FLOAT16] * len(gemma.outputs)
        assert graphs["text_head"].output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        states = open_engine(writer.staging, "text_gemma", gemma).run({"token_ids": ids, "token_mask": mask})
        assert all(v.dtype == np.float16 and v.shape == (1, bucket.text_length, preset.text.encoder_dim)
                   for v in states.values())
        context = open_engine(writer.staging, "text_head", head).run({"token_mask": mask, **states})["context"]
    with torch.no_grad():
        want = load_models("tiny", components=TEXT_COMPONENTS).text(torch.from_numpy(ids), torch.from_numpy(mask))
    want = want[0].numpy()
    assert context.dtype == np.float32 and np.linalg.norm(context - want) / np.linalg.norm(want) <= 1e-2
