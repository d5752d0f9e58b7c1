"""ArcFace IResNet face encoder: PyTorch model, checkpoint loading, BN folding and ONNX export.

Parameter names follow insightface's ``arcface_torch`` backbones so that published
``backbone.pth`` files load strictly. The exported graph takes an already normalised RGB
face crop (``(x - 127.5) / 127.5``, done by the runtime) and returns an L2-normalised
512-d embedding. The runtime (``stdrc.runtime.face``) never imports this file.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stdrc.export.errors import CheckpointError, ExportError
from stdrc.runtime.face import FACE_SIZE  # the aligned crop the runtime feeds the encoder

log = logging.getLogger(__name__)

FACE_INPUTS = ("image",)
FACE_OUTPUTS = ("embedding",)
EMBED_DIM = 512
MAX_BATCH = 64


@dataclass(frozen=True)
class IResNetArch:
    """Depths and widths of one IResNet variant; the spatial size after layer4 is 7x7 for 112 inputs."""

    layers: tuple[int, int, int, int]
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    num_features: int = EMBED_DIM


ARCHS: dict[str, IResNetArch] = {
    "tiny": IResNetArch(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64)),
    "iresnet50": IResNetArch(layers=(3, 4, 14, 3)),
    "iresnet100": IResNetArch(layers=(3, 13, 30, 3)),
}


def _arch(name: str) -> IResNetArch:
    if name not in ARCHS:
        raise ExportError(f"unknown face encoder arch {name!r}; use one of {sorted(ARCHS)}")
    return ARCHS[name]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of IResNet: BN-conv-BN-PReLU-conv-BN plus shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """IResNet backbone (112x112 RGB -> 512 features, not normalised), arcface_torch layout."""

    def __init__(self, arch: IResNetArch) -> None:
        super().__init__()
        w = arch.widths
        self.inplanes = w[0]
        self.conv1 = _conv3x3(3, w[0])
        self.bn1 = nn.BatchNorm2d(w[0], eps=1e-5)
        self.prelu = nn.PReLU(w[0])
        self.layer1 = self._make_layer(w[0], arch.layers[0])
        self.layer2 = self._make_layer(w[1], arch.layers[1])
        self.layer3 = self._make_layer(w[2], arch.layers[2])
        self.layer4 = self._make_layer(w[3], arch.layers[3])
        self.bn2 = nn.BatchNorm2d(w[3], eps=1e-5)
        self.dropout = nn.Dropout(p=0.0, inplace=True)
        self.fc = nn.Linear(w[3] * 7 * 7, arch.num_features)
        self.features = nn.BatchNorm1d(arch.num_features, eps=1e-5)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        # Every stage halves the resolution; the shortcut always needs a strided 1x1 conv + BN.
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def _init_seeded(module: nn.Module, seed: int) -> None:
    """Deterministic, well-scaled values for every parameter and BN statistic (no RNG state leaks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.25 + 0.05 * torch.randn(m.weight.shape, generator=g))


def build_face_encoder(arch: str = "tiny", seed: int | None = 0) -> IResNet:
    """An IResNet in eval mode; seeded so tests and the tiny preset are reproducible."""
    model = IResNet(_arch(arch))
    if seed is not None:
        _init_seeded(model, seed)
    return model.eval()


def load_arcface_backbone(path: str | os.PathLike, arch: str) -> IResNet:
    """Load an arcface_torch ``backbone.pth`` strictly; any key or shape mismatch is one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"face backbone {path} does not exist; pass the arcface_torch backbone.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a PyTorch state dict ({e}); "
                              f"expected arcface_torch backbone.pth") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors; "
                              f"expected arcface_torch backbone.pth")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    with torch.device("meta"):  # shapes only: no time spent initialising weights that get replaced
        model = IResNet(_arch(arch))
    expected = model.state_dict()
    _check_state(expected, state, path, arch)
    full = {k: state[k].float() if state[k].is_floating_point() else state[k] for k in state}
    full.update({k: torch.tensor(0) for k in expected if k not in full})  # num_batches_tracked only
    model.load_state_dict(full, strict=True, assign=True)
    return model.eval()


def infer_arch(path: str | os.PathLike) -> str:
    """iresnet50 or iresnet100 from a backbone's layer3 depth (14 or 30 blocks); read by key names."""
    try:
        state = torch.load(Path(path), map_location="meta", weights_only=True)
    except Exception:
        return "iresnet50"  # load_arcface_backbone reports the unreadable file
    keys = state.keys() if isinstance(state, dict) else ()
    depth = 1 + max((int(k.split(".")[1]) for k in (k.removeprefix("module.") for k in keys)
                     if k.startswith("layer3.") and k.split(".")[1].isdigit()), default=-1)
    return next((name for name, arch in ARCHS.items() if arch.layers[2] == depth), "iresnet50")


def _check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], path: Path,
                 arch: str) -> None:
    # num_batches_tracked is a training counter, unused in eval: tolerate its absence only.
    missing = [k for k in expected if k not in got and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} != {tuple(v.shape)}"
              for k, v in expected.items() if k in got and got[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{label}: {', '.join(items[:8])}{more}")
    if problems:
        raise CheckpointError(f"{path} does not match arch {arch!r}: {'; '.join(problems)}; "
                              f"check the arch (iresnet50 = r50, iresnet100 = r100) and the file")


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def _bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Copy of an IResNet (or a module containing one) with every exactly-foldable BN folded away.

    conv->BN pairs fold into the conv; the final bn2 (before flatten) and the features BN fold
    into fc. Each block's leading bn1 stays: it precedes a zero-padded conv, so folding it
    would be inexact at the borders.
    """
    out = copy.deepcopy(module).eval()
    for m in out.modules():
        if isinstance(m, IBasicBlock):
            m.conv1, m.bn2 = _fold_into_conv(m.conv1, m.bn2), nn.Identity()
            m.conv2, m.bn3 = _fold_into_conv(m.conv2, m.bn3), nn.Identity()
            if m.downsample is not None:
                m.downsample = _fold_into_conv(m.downsample[0], m.downsample[1])
        elif isinstance(m, IResNet):
            m.conv1, m.bn1 = _fold_into_conv(m.conv1, m.bn1), nn.Identity()
            s_in, b_in = _bn_affine(m.bn2)
            spatial = m.fc.in_features // s_in.numel()
            s_in, b_in = s_in.repeat_interleave(spatial), b_in.repeat_interleave(spatial)
            s_out, b_out = _bn_affine(m.features)
            weight = m.fc.weight * s_in[None, :]
            bias = m.fc.bias + m.fc.weight @ b_in
            fc = nn.Linear(m.fc.in_features, m.fc.out_features)
            fc.weight.copy_(weight * s_out[:, None])
            fc.bias.copy_(bias * s_out + b_out)
            m.bn2, m.fc, m.features = nn.Identity(), fc, nn.Identity()
    return out


class FaceEncoderForExport(nn.Module):
    """Export wrapper: ``image`` [B,3,112,112] normalised RGB -> ``embedding`` [B,512], unit L2 norm."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(image)
        return feats / torch.sqrt((feats * feats).sum(dim=1, keepdim=True)).clamp_min(1e-12)


def sample_face_input(batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A normalised-range sample input for export and parity checks."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, FACE_SIZE, FACE_SIZE), generator=g) * 2.0 - 1.0


def export_face_encoder_onnx(module: nn.Module, path: str | os.PathLike) -> None:
    """Export with a dynamic batch (1..64) to ``path``, written under a temp name then renamed."""
    path = Path(path)
    wrapper = module if isinstance(module, FaceEncoderForExport) else FaceEncoderForExport(module)
    wrapper = wrapper.eval()
    tmp = path.with_name(path.name + ".tmp")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper, (sample_face_input(2),), str(tmp), dynamo=True, external_data=False,
                input_names=list(FACE_INPUTS), output_names=list(FACE_OUTPUTS),
                dynamic_shapes={"image": {0: batch}}, verbose=False,
            )
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"face encoder ONNX export to {path} failed: {e}") from e
    log.info("exported face encoder to %s", path)


def patch_insightface_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make an insightface recogniser (w600k_r50.onnx, glintr100.onnx) take any batch size.

    Their declared output (sometimes input) batch dim is fixed to 1 although the graph is
    batch-agnostic; rewrite both to a symbolic ``batch`` and drop stale intermediate shapes.
    """
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"{src} does not exist; pass insightface's w600k_r50.onnx or glintr100.onnx")
    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise ExportError(f"cannot read {src} as ONNX ({e}); re-download the insightface model") from e
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    for value in [v for v in graph.input if v.name not in initializers] + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise ExportError(f"{src}: tensor {value.name!r} has no declared shape; "
                              f"is it an insightface recogniser?")
        dims[0].Clear()
        dims[0].dim_param = "batch"
    del graph.value_info[:]
    onnx.checker.check_model(model)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("patched %s -> %s (dynamic batch)", src, dst)
