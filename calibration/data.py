"""A calibration set available offline: varied prompts and two public-domain reference photos.

FP8 scales are per-tensor maxima, so the set should span what the model sees in use: people
in varied scenes, motion and lighting, and faces for the in-context reference.
"""

from __future__ import annotations

from importlib.resources import files

import numpy as np

from stdrc.export.errors import ExportError


def _load_prompts() -> list[str]:
    text = files("stdrc.calibration").joinpath("prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


CALIBRATION_PROMPTS: list[str] = _load_prompts()


def reference_photos() -> list[np.ndarray]:
    """RGB uint8 (H, W, 3) face photos shipped with scikit-image and matplotlib: no download."""
    try:
        import matplotlib.cbook
        import matplotlib.image
        from skimage import data
    except ImportError as e:
        raise ExportError(
            f"calibration photos need scikit-image and matplotlib ({e.name} is missing): "
            "pip install 'stdrc[test]'"
        ) from e
    astronaut = data.astronaut()
    hopper = matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    photos = []
    for image in (astronaut, hopper):
        image = np.asarray(image)
        if image.dtype != np.uint8:  # float images in [0, 1]
            image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        photos.append(np.ascontiguousarray(image[..., :3]))
    return photos
