"""Images in, video and contact sheet out. Every file is written under a temp name, then renamed."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from stdrc.runtime.errors import InputError

log = logging.getLogger(__name__)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a larger header is a decompression bomb, not a photo


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header alone (Pillow decodes nothing here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError:  # Pillow's own limit, above ours
        raise InputError(f"reference image {path} claims over {MAX_IMAGE_PIXELS // 2**20} Mpx "
                         "(a decompression bomb, or far larger than needed): pass a smaller photo") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"reference image {path} cannot be read as an image ({type(e).__name__}): "
                         "pass a PNG or JPEG file") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3); the size in the header is checked before anything is decoded."""
    from stdrc.runtime.options import check_path

    path = check_path(path, "reference image")
    if not path.is_file():
        raise InputError(f"reference image {path} does not exist: pass an existing --ref image file")
    width, height = image_size(path)
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"reference image {path} claims {width}x{height} pixels, over the "
                         f"{MAX_IMAGE_PIXELS // 2**20} Mpx limit: pass a smaller photo")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"reference image {path} cannot be read as an image: pass a PNG or JPEG file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 8:
        raise InputError(f"reference image has shape {image.shape}: pass an RGB image of at least 8x8 pixels")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def resize_cover(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize (the whole photo, no face crop)."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    ch, cw = min(h, round(height / scale)), min(w, round(width / scale))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = image[top:top + ch, left:left + cw]
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)


def frames_to_uint8(video: np.ndarray) -> np.ndarray:
    """Decoder output [1, 3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    frames = np.transpose(video[0], (1, 2, 3, 0))
    return np.clip((frames + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 frame stacks, in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def check_writable(path: str | os.PathLike) -> Path:
    from stdrc.runtime.options import check_output

    return check_output(path)


def _write_ffmpeg(frames: np.ndarray, path: Path, fps: float) -> str:
    import imageio.v2 as imageio

    writer = imageio.get_writer(
        str(path), format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", quality=8,
        macro_block_size=1, ffmpeg_log_level="error",
    )
    with writer:
        for frame in frames:
            writer.append_data(frame)
    return "h264"


def _write_cv2(frames: np.ndarray, path: Path, fps: float) -> str:
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise InputError(f"no mp4 writer is available for {path}: install imageio-ffmpeg")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return "mp4v"


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float) -> str:
    """Write [F, H, W, 3] uint8 as mp4 (H.264 when the installed ffmpeg has it, else mp4v)."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        try:
            codec = _write_ffmpeg(frames, Path(tmp), fps)
        except Exception as e:  # no imageio-ffmpeg, or an ffmpeg without libx264
            log.info("H.264 writer unavailable (%s); using mp4v", e)
            codec = _write_cv2(frames, Path(tmp), fps)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return codec


def contact_sheet(frames: np.ndarray, count: int = 8, columns: int = 4) -> np.ndarray:
    """Uniformly sampled frames tiled in a grid (RGB uint8)."""
    index = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
    picked = list(frames[index])
    columns = min(columns, len(picked))
    rows = -(-len(picked) // columns)
    h, w = picked[0].shape[:2]
    sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, frame in enumerate(picked):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = frame
    return sheet


def write_png(image: np.ndarray, path: str | os.PathLike) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        if not cv2.imwrite(tmp, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise InputError(f"could not write {path}: check the folder is writable")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video as (F, H, W, 3) uint8 RGB, through the ffmpeg that wrote it."""
    import imageio.v3 as iio

    from stdrc.runtime.options import check_path

    path = check_path(path, "video")
    if not path.is_file():
        raise InputError(f"video {path} does not exist: pass an existing MP4 file")
    try:
        frames = [np.asarray(f)[..., :3] for f in iio.imiter(path)]
    except Exception as e:  # ffmpeg's whole log is in str(e): name the failure, not the log
        raise InputError(f"cannot read video {path} ({type(e).__name__}): pass an MP4 made by `stdrc generate` "
                         "or readable by ffmpeg") from None
    if not frames:
        raise InputError(f"video {path} has no frames: pass an MP4 made by `stdrc generate`")
    return np.stack(frames).astype(np.uint8)
