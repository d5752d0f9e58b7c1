"""ArcFace IResNet: insightface parameter names, strict loading, BN folding, ONNX export parity."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from stdrc.export import face as F
from stdrc.export.errors import CheckpointError, ExportError

ATOL_FP32 = 1e-4


def _ort(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny() -> F.IResNet:
    return F.build_face_encoder("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("face") / "face_tiny.onnx"
    F.export_face_encoder_onnx(tiny, path)
    return path


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    model = F.build_face_encoder("iresnet50", seed=1)
    path = tmp_path_factory.mktemp("r50") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_seeded_build_is_deterministic(tiny):
    again, other = F.build_face_encoder("tiny", seed=0), F.build_face_encoder("tiny", seed=1)
    sds = tiny.state_dict(), again.state_dict(), other.state_dict()
    states = zip(sds[0].items(), sds[1].values(), sds[2].values(), strict=True)
    for (k, a), b, c in states:
        assert torch.equal(a, b), k
        if a.is_floating_point():
            assert not torch.equal(a, c), k
    assert not tiny.training
    assert not torch.allclose(tiny.layer1[0].bn2.running_var, torch.ones(8))  # stats are seeded too
    with pytest.raises(ExportError, match="iresnet50"):
        F.build_face_encoder("r18")


def test_iresnet50_has_arcface_torch_names_and_shapes(r50_file):
    sd = r50_file[0].state_dict()
    shapes = {
        "conv1.weight": (64, 3, 3, 3), "bn1.running_var": (64,), "prelu.weight": (64,),
        "layer1.0.bn1.weight": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3), "layer1.0.bn2.bias": (64,),
        "layer1.0.prelu.weight": (64,), "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.bn3.running_mean": (64,), "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        "layer1.0.downsample.1.num_batches_tracked": (), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer3.13.conv2.weight": (256, 256, 3, 3), "layer4.2.bn3.weight": (512,),
        "bn2.weight": (512,), "fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,),
        "features.running_var": (512,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    blocks = {name: len({k.split(".")[1] for k in sd if k.startswith(name + ".")}) for name in
              ("layer1", "layer2", "layer3", "layer4")}
    assert blocks == {"layer1": 3, "layer2": 4, "layer3": 14, "layer4": 3}
    assert "layer1.1.downsample.0.weight" not in sd and "dropout" not in "".join(sd)
    r100 = F.IResNet(F.ARCHS["iresnet100"])
    assert [len(getattr(r100, f"layer{i}")) for i in range(1, 5)] == [3, 13, 30, 3]


def test_strict_load_of_written_iresnet50(r50_file):
    model, path = r50_file
    loaded = F.load_arcface_backbone(path, "iresnet50")
    assert not loaded.training
    got = loaded.state_dict()
    assert got.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v) and got[k].device.type == "cpu", k
    with pytest.raises(CheckpointError, match=r"iresnet100.*missing: layer2\.4\."):
        F.load_arcface_backbone(path, "iresnet100")


def test_load_errors_name_the_problem(tiny, tmp_path):
    sd = tiny.state_dict()
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "layer2.0.conv1.weight"},
                    r"missing: layer2\.0\.conv1\.weight"),
        "renamed": ({("head.weight" if k == "fc.weight" else k): v for k, v in sd.items()},
                    r"missing: fc\.weight; unexpected: head\.weight"),
        "shape": ({**sd, "fc.weight": torch.zeros(512, 100)},
                  r"wrong shape: fc\.weight \(512, 100\) != \(512, 3136\)"),
    }
    for name, (state, pattern) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        with pytest.raises(CheckpointError, match=pattern):
            F.load_arcface_backbone(path, "tiny")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        F.load_arcface_backbone(tmp_path / "list.pth", "tiny")
    with pytest.raises(CheckpointError, match="does not exist"):
        F.load_arcface_backbone(tmp_path / "nope.pth", "tiny")
    # Tolerated: DDP "module." prefixes and absent num_batches_tracked counters.
    relaxed = {"module." + k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(relaxed, tmp_path / "ddp.pth")
    assert torch.equal(F.load_arcface_backbone(tmp_path / "ddp.pth", "tiny").fc.weight, tiny.fc.weight)


def test_fold_batchnorm_parity(tiny):
    folded = F.fold_batchnorm(tiny)
    def n_bn(m: torch.nn.Module) -> int:
        return sum(isinstance(x, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for x in m.modules())

    assert n_bn(tiny) == 19 and n_bn(folded) == 4  # only each block's leading bn1 stays
    x = F.sample_face_input(3, seed=5)
    with torch.no_grad():
        ref, got = tiny(x), folded(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    enc = F.FaceEncoderForExport(tiny)
    with torch.no_grad():
        torch.testing.assert_close(F.FaceEncoderForExport(folded)(x), enc(x), rtol=0, atol=1e-5)


def test_export_contract_and_ort_parity(tiny, tiny_onnx):
    sess = _ort(tiny_onnx)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name,) == F.FACE_INPUTS and (out.name,) == F.FACE_OUTPUTS
    assert inp.shape == ["batch", 3, F.FACE_SIZE, F.FACE_SIZE] and out.shape == ["batch", 512]
    enc = F.FaceEncoderForExport(tiny).eval()
    for batch in (1, 3):
        x = F.sample_face_input(batch, seed=batch)
        with torch.no_grad():
            ref = enc(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
        assert np.abs(got - ref).max() <= ATOL_FP32
        assert not np.allclose(ref[0], ref[-1]) or batch == 1
    assert not list(tiny_onnx.parent.glob("*.tmp"))


def test_exported_encoder_through_runtime_embedder(tiny, tiny_onnx):
    """The runtime's normalisation outside the graph matches what the PyTorch model was given."""
    from stdrc.runtime.face import FaceEmbedder

    crops = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    x = torch.from_numpy((crops.astype(np.float32) - 127.5) / 127.5).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = F.FaceEncoderForExport(tiny)(x).numpy()
    assert np.abs(FaceEmbedder(tiny_onnx).embed(crops) - ref).max() <= ATOL_FP32


def _fixed_batch_recognizer(path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.1, (3, 512)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input.1"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["683"])],
        "r50", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])], [w],
        value_info=[helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_patch_insightface_onnx_makes_batch_dynamic(tmp_path):
    src, dst = tmp_path / "w600k_r50.onnx", tmp_path / "w600k_r50_dyn.onnx"
    _fixed_batch_recognizer(src)
    x = np.random.default_rng(1).normal(size=(3, 3, 112, 112)).astype(np.float32)
    with pytest.raises(Exception, match="(?i)dimension"):
        _ort(src).run(None, {"input.1": x})
    F.patch_insightface_onnx(src, dst)
    sess = _ort(dst)
    assert sess.get_inputs()[0].shape[0] == "batch" and sess.get_outputs()[0].shape[0] == "batch"
    single = np.concatenate([_ort(src).run(None, {"input.1": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(sess.run(None, {"input.1": x})[0], single, rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w600k_r50.onnx", "w600k_r50_dyn.onnx"]
    with pytest.raises(ExportError, match="does not exist"):
        F.patch_insightface_onnx(tmp_path / "glintr100.onnx", dst)
