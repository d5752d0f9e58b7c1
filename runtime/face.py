"""Face stack of the lean runtime: detect, align, embed, FaceSim. numpy + cv2 + onnxruntime only.

Detectors: YuNet through ``cv2.FaceDetectorYN`` (bundled default) or SCRFD from an insightface
model folder. Alignment: 5 keypoints -> similarity transform onto the ArcFace 112x112
template. Embedding: any ArcFace ONNX (ours from ``stdrc.export.face`` or insightface's) fed
RGB ``(x - 127.5) / 127.5``. FaceSim follows the ConsisID protocol (clamped cosine, averaged).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import onnxruntime as ort

from stdrc.runtime.errors import InputError, NoFaceError

log = logging.getLogger(__name__)

FACE_SIZE = 112
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
YUNET_ENV = "STDRC_YUNET"
YUNET_SIZE = 640
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
INSIGHTFACE_ROOT = "~/.insightface/models"
INSIGHTFACE_PACKS = ("buffalo_l", "buffalo_s", "antelopev2")

# insightface's standard 5-point template (eyes, nose, mouth corners; image-left first) for 112x112.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


@dataclass(frozen=True, eq=False)
class Face:
    """One detection in image pixels: box (x, y, w, h), 5 keypoints (5, 2) in template order, score."""

    box: tuple[float, float, float, float]
    kps: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return max(self.box[2], 0.0) * max(self.box[3], 0.0)


class FaceDetector(Protocol):
    """Anything that finds faces with 5 keypoints in an RGB uint8 image."""

    def detect(self, image_rgb: np.ndarray) -> list[Face]: ...


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box: the subject, in reference photos and generated frames alike."""
    return max(faces, key=lambda f: f.area, default=None)


def _letterbox(image_rgb: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize keeping aspect into a (w, h) canvas anchored top-left; returns canvas and scale."""
    h, w = image_rgb.shape[:2]
    scale = min(size[0] / w, size[1] / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    canvas[:nh, :nw] = cv2.resize(image_rgb, (nw, nh), interpolation=interp)
    return canvas, scale


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise InputError(f"expected an RGB uint8 image (H, W, 3), got {image_rgb.dtype} {image_rgb.shape}")
    return np.ascontiguousarray(image_rgb)


class YuNetDetector:
    """OpenCV's YuNet (fixed 640x640 input): letterbox in, boxes and keypoints mapped back out."""

    def __init__(self, model_path: str | os.PathLike, score_threshold: float = 0.6,
                 nms_threshold: float = 0.3) -> None:
        from stdrc.runtime.options import check_path

        path = check_path(model_path, "YuNet model")  # OpenCV crashes on paths that are not UTF-8
        if not path.is_file():
            raise InputError(f"YuNet model {path} does not exist; see find_yunet() for where to put it")
        # OpenCV 5 warns on every create that its new graph engine ignores the target: not ours to show
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._net = cv2.FaceDetectorYN.create(str(path), "", (YUNET_SIZE, YUNET_SIZE), score_threshold,
                                                  nms_threshold, 5000)
        finally:
            cv2.utils.logging.setLogLevel(level)

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        canvas, scale = _letterbox(_check_image(image_rgb), (YUNET_SIZE, YUNET_SIZE))
        _, rows = self._net.detect(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        if rows is None:
            return []
        return [Face(box=tuple(float(v) / scale for v in r[:4]),
                     kps=(r[4:14].reshape(5, 2) / scale).astype(np.float32), score=float(r[14]))
                for r in rows]


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS on (x1, y1, x2, y2) boxes through OpenCV; indices kept, best first."""
    if not len(boxes):
        return []
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.float32)
    # score threshold 0: the caller has already dropped low scores (OpenCV refuses negative ones)
    keep = cv2.dnn.NMSBoxes(xywh.tolist(), scores.astype(np.float32).tolist(), 0.0, threshold)
    return [int(i) for i in np.asarray(keep).reshape(-1)]


def _session(path: Path, providers: Sequence[str] | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:
        raise InputError(f"cannot load ONNX model {path} ({e}); re-download or re-export it") from e


class ScrfdDetector:
    """insightface SCRFD (det_10g.onnx, det_500m.onnx, scrfd_*_bnkps.onnx) with its standard decoding.

    Outputs come as scores, boxes, keypoints per stride (8, 16, 32), two anchors per cell;
    box/keypoint predictions are distances in stride units from the anchor centre.
    """

    STRIDES = (8, 16, 32)
    ANCHORS = 2

    def __init__(self, det_onnx_path: str | os.PathLike, score_threshold: float = 0.5,
                 nms_threshold: float = 0.4, input_size: tuple[int, int] = (640, 640),
                 providers: Sequence[str] | None = None) -> None:
        path = Path(det_onnx_path)
        if not path.is_file():
            raise InputError(f"SCRFD model {path} does not exist; pass det_10g.onnx from an insightface "
                             f"model folder")
        self._sess = _session(path, providers)
        inp = self._sess.get_inputs()[0]
        outs = self._sess.get_outputs()
        if len(inp.shape) != 4 or inp.shape[1] != 3:
            raise InputError(f"{path} input {inp.shape} is not NCHW RGB; not an SCRFD detector")
        if len(outs) == 6:
            raise InputError(f"{path} is an SCRFD without keypoints (6 outputs); alignment needs the "
                             f"*_kps/bnkps variant such as det_10g.onnx")
        if len(outs) != 9:
            raise InputError(f"{path} has {len(outs)} outputs, expected 9 (SCRFD with keypoints, 3 strides)")
        self._input_name = inp.name
        h, w = inp.shape[2], inp.shape[3]
        self.input_size = (w, h) if isinstance(w, int) and isinstance(h, int) else input_size
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        canvas, scale = _letterbox(_check_image(image_rgb), self.input_size)
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = [o[0] if o.ndim == 3 else o for o in self._sess.run(None, {self._input_name: blob})]
        # Group by channel count (score 1, box 4, keypoints 10); more anchors = finer stride first.
        groups = [sorted((o for o in outs if o.shape[-1] == c), key=len, reverse=True) for c in (1, 4, 10)]
        if any(len(g) != len(self.STRIDES) for g in groups):
            raise InputError(f"SCRFD outputs {[o.shape for o in outs]} are not 3 x (score, box, keypoints)")
        boxes, scores, kpss = [], [], []
        for stride, score, dist, kdist in zip(self.STRIDES, *groups, strict=True):
            centers = self._anchor_centers(stride)
            keep = np.where(score.reshape(-1) >= self.score_threshold)[0]
            c, d, kd = centers[keep], dist[keep] * stride, kdist[keep].reshape(-1, 5, 2) * stride
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            kpss.append(c[:, None, :] + kd)
            scores.append(score.reshape(-1)[keep])
        boxes, scores, kpss = np.concatenate(boxes), np.concatenate(scores), np.concatenate(kpss)
        faces = []
        for i in _nms(boxes, scores, self.nms_threshold):
            x1, y1, x2, y2 = (float(v) / scale for v in boxes[i])
            kps = (kpss[i] / scale).astype(np.float32)
            faces.append(Face((x1, y1, x2 - x1, y2 - y1), kps, float(scores[i])))
        return faces

    def _anchor_centers(self, stride: int) -> np.ndarray:
        h, w = self.input_size[1] // stride, self.input_size[0] // stride
        ys, xs = np.mgrid[:h, :w]
        centers = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
        return np.repeat(centers, self.ANCHORS, axis=0)  # cell-major: both anchors of a cell adjacent


def packaged_yunet() -> Path:
    """The YuNet file shipped as package data (MIT; see stdrc/runtime/assets/README.md)."""
    from importlib.resources import files

    return Path(str(files("stdrc.runtime") / "assets" / YUNET_FILE))


def find_yunet(setting: str | os.PathLike | None = None) -> Path:
    """The YuNet file: explicit setting, then $STDRC_YUNET, then the copy shipped in the package."""
    for label, value in (("setting", setting), (YUNET_ENV, os.environ.get(YUNET_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise InputError(f"YuNet file {path} (from {label}) does not exist; fix the path or unset it")
            return path
    path = packaged_yunet()
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != YUNET_SHA256:
        raise InputError(f"the packaged YuNet detector {path} is missing or altered: reinstall stdrc, "
                         f"or set {YUNET_ENV}=/path/to/{YUNET_FILE}")
    return path


def similarity_transform(src_kps: np.ndarray, dst_kps: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src to dst (Umeyama 1991); 2x3."""
    src, dst = np.asarray(src_kps, np.float64), np.asarray(dst_kps, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise InputError(f"similarity_transform needs two (N>=2, 2) point sets, got {src.shape} "
                         f"and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rot = u @ sign @ vt
    var_s = (s**2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ sign) / var_s) if var_s > 0 else 1.0
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def align_face(image_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The 112x112 ArcFace crop: warp so the 5 keypoints land on ARCFACE_TEMPLATE."""
    m = similarity_transform(np.asarray(kps, np.float32).reshape(5, 2), ARCFACE_TEMPLATE)
    return cv2.warpAffine(_check_image(image_rgb), m, (FACE_SIZE, FACE_SIZE), borderValue=0.0)


def crop_reference(image_rgb: np.ndarray, face: Face, height: int, width: int,
                   margin: float = 0.6) -> np.ndarray:
    """Face-centred crop at the bucket's aspect ratio, resized to (height, width, 3).

    The box grows by ``margin`` of its size on each side and then to the target aspect. The
    crop shrinks (keeping aspect) to fit the image while it still holds the bare face box;
    only otherwise is the outside padded with black.
    """
    image = _check_image(image_rgb)
    ih, iw = image.shape[:2]
    x, y, w, h = face.box
    cx, cy, aspect = x + w / 2, y + h / 2, width / height
    cw, ch = w * (1 + 2 * margin), h * (1 + 2 * margin)
    cw, ch = max(cw, ch * aspect), max(ch, cw / aspect)
    fit = min(1.0, iw / cw, ih / ch)
    need = max(w / cw, h / ch)  # the smallest shrink that still holds the face box
    cw, ch = max(1, round(cw * max(fit, need))), max(1, round(ch * max(fit, need)))
    x0 = min(max(round(cx - cw / 2), 0), iw - cw) if cw <= iw else (iw - cw) // 2
    y0 = min(max(round(cy - ch / 2), 0), ih - ch) if ch <= ih else (ih - ch) // 2
    top, bottom, left, right = max(0, -y0), max(0, y0 + ch - ih), max(0, -x0), max(0, x0 + cw - iw)
    if top or bottom or left or right:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
        x0, y0 = x0 + left, y0 + top
    interp = cv2.INTER_AREA if cw > width else cv2.INTER_CUBIC
    return cv2.resize(image[y0:y0 + ch, x0:x0 + cw], (width, height), interpolation=interp)


@dataclass(frozen=True)
class FaceModels:
    """ONNX files found in an insightface model folder."""

    folder: Path
    detector: Path
    recognizer: Path


def _onnx_role(path: Path) -> str | None:
    """'detector', 'recognizer' or None, judged by declared input/output shapes only."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception:
        log.warning("skipping %s: not a loadable ONNX model", path)
        return None
    inp, outs = sess.get_inputs()[0].shape, [o.shape for o in sess.get_outputs()]
    if len(inp) != 4 or inp[1] != 3:
        return None
    if inp[2:] == [FACE_SIZE, FACE_SIZE] and len(outs) == 1 and outs[0][-1] == 512:
        return "recognizer"
    if len(outs) in (6, 9) and all(not isinstance(d, int) or d == 640 for d in inp[2:]):
        return "detector"
    return None


def resolve_model_folder(name_or_path: str | os.PathLike,
                         sha256: Mapping[str, str] | None = None) -> FaceModels:
    """Find detector and recogniser in buffalo_l / buffalo_s / antelopev2 (or any folder) by their shapes.

    ``sha256`` optionally maps file names to expected digests; a mismatch is an InputError.
    """
    text = str(name_or_path)
    folder = Path(INSIGHTFACE_ROOT) / text if text in INSIGHTFACE_PACKS else Path(text)
    folder = folder.expanduser()
    if not folder.is_dir():
        raise InputError(f"insightface model folder {folder} not found; unzip {text} there or pass its path")
    files = sorted(folder.glob("*.onnx"))
    nested = [d for d in folder.iterdir() if d.is_dir()]
    if not files and len(nested) == 1:  # antelopev2.zip unpacks to antelopev2/antelopev2/*.onnx
        files = sorted(nested[0].glob("*.onnx"))
    roles: dict[str, list[Path]] = {"detector": [], "recognizer": []}
    for f in files:
        role = _onnx_role(f)
        if role:
            roles[role].append(f)
    for role, found in roles.items():
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise InputError(f"{folder}: expected exactly one face {role} ONNX, found {names}; "
                             f"use an unmodified buffalo_l/buffalo_s/antelopev2 folder")
    for name, digest in (sha256 or {}).items():
        match = [f for f in files if f.name == name]
        actual = hashlib.sha256(match[0].read_bytes()).hexdigest() if match else "missing"
        if actual != digest.lower():
            raise InputError(f"{folder}/{name}: sha256 {actual} != expected {digest}; "
                             f"re-download the model pack")
    return FaceModels(folder=folder, detector=roles["detector"][0], recognizer=roles["recognizer"][0])


class FaceEmbedder:
    """ArcFace ONNX on aligned crops; normalisation outside the graph; embeddings L2-normalised."""

    def __init__(self, onnx_path: str | os.PathLike, providers: Sequence[str] | None = None,
                 batch_size: int = 32) -> None:
        from stdrc.runtime.options import check_path

        path = check_path(onnx_path, "face embedder")
        if not path.is_file():
            raise InputError(f"face embedder {path} does not exist; export one with stdrc-export or pass "
                             f"an insightface recogniser (w600k_r50.onnx)")
        self._sess = _session(path, providers)
        inp = self._sess.get_inputs()[0]
        if len(inp.shape) != 4 or list(inp.shape[1:]) != [3, FACE_SIZE, FACE_SIZE]:
            raise InputError(f"{path} input {inp.shape} is not [B,3,112,112]; not an ArcFace recogniser")
        self._input_name = inp.name
        # Unpatched insightface files may declare batch 1; then run one crop at a time.
        self.batch_size = 1 if inp.shape[0] == 1 else batch_size

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        """(B, 112, 112, 3) uint8 RGB crops -> (B, 512) float32 unit vectors."""
        aligned = np.asarray(aligned)
        if aligned.ndim == 3:
            aligned = aligned[None]
        if aligned.ndim != 4 or aligned.shape[1:] != (FACE_SIZE, FACE_SIZE, 3) or aligned.dtype != np.uint8:
            raise InputError(f"embed() wants (B,112,112,3) uint8 aligned crops, "
                             f"got {aligned.dtype} {aligned.shape}")
        out = []
        for i in range(0, len(aligned), self.batch_size):
            x = (aligned[i:i + self.batch_size].astype(np.float32) - 127.5) / 127.5
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            out.append(self._sess.run(None, {self._input_name: x})[0])
        emb = np.concatenate(out).astype(np.float32).reshape(len(aligned), -1)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class FaceSimResult:
    """FaceSim score, per sampled frame cosine (None = no face), and how many frames had no face."""

    score: float
    per_frame: tuple[float | None, ...]
    frames_without_face: int
    frame_indices: tuple[int, ...] = ()

    @property
    def frames_sampled(self) -> int:
        return len(self.per_frame)

    @property
    def value(self) -> float | None:
        """The score, or None when no sampled frame had a face: no similarity to report, not a 0."""
        return None if self.frames_without_face == self.frames_sampled else self.score


def facesim(frames: np.ndarray, reference_rgb: np.ndarray, detector: FaceDetector, embedder: FaceEmbedder,
            samples: int = 16) -> FaceSimResult:
    """ConsisID FaceSim: cosine(reference, largest face) clamped at 0, mean over frames with a face."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise InputError(f"facesim wants frames as (F, H, W, 3) uint8 with F >= 1, got {frames.shape}")
    if samples < 1:
        raise InputError(f"facesim samples must be >= 1, got {samples}")
    ref_face = largest_face(detector.detect(reference_rgb))
    if ref_face is None:
        raise NoFaceError("no face found in the reference image; use a photo with a clear, frontal face")
    ref = embedder.embed(align_face(reference_rgb, ref_face.kps))[0]
    idx = np.unique(np.linspace(0, len(frames) - 1, min(samples, len(frames))).round().astype(int))
    crops, slots = [], []
    for slot, i in enumerate(idx):
        face = largest_face(detector.detect(frames[i]))
        if face is not None:
            crops.append(align_face(frames[i], face.kps))
            slots.append(slot)
    per_frame: list[float | None] = [None] * len(idx)
    if crops:
        for slot, cos in zip(slots, embedder.embed(np.stack(crops)) @ ref, strict=True):
            per_frame[slot] = max(float(cos), 0.0)
    scores = [s for s in per_frame if s is not None]
    if not scores:
        log.info("facesim: no face in any of %d sampled frames; FaceSim is n/a", len(idx))
    return FaceSimResult(score=float(np.mean(scores)) if scores else 0.0, per_frame=tuple(per_frame),
                         frames_without_face=len(idx) - len(scores), frame_indices=tuple(int(i) for i in idx))
