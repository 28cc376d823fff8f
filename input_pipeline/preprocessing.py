"""Pre-processing of fundus photographs with numpy and OpenCV (no TensorFlow).

STUB: the API below is the contract used by prepare.py; the implementation is
being replaced by the full version (reduced-scale decode, circle fit, CLAHE,
Ben Graham, quality flags).
"""

import dataclasses

import cv2
import numpy as np


class ImageError(Exception):
    """An image that cannot be used; `reason` is a short human-readable cause."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Every parameter that changes the written pixels (recorded in dataset.json)."""

    image_size: int = 512
    crop: str = "fundus"  # "fundus" | "none"
    clahe: str | None = None  # None | "green" | "lab"
    ben_graham: bool = False
    ben_graham_sigma: float = 10.0  # at 512 px; scaled with image_size
    jpeg_quality: int = 95


def read_image(path: str, target_size: int | None = None) -> np.ndarray:
    """Decodes an image file to uint8 RGB [H, W, 3]; raises ImageError."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageError("not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def process_image(path: str, config: PreprocessConfig) -> tuple[np.ndarray, dict]:
    """Reads, crops, resizes and enhances one image.

    Returns:
      (uint8 RGB [S, S, 3] with S = config.image_size, info dict with at least
       {"quality_too_dark": bool, "quality_small_field": bool})
    Raises:
      ImageError with the reason the image cannot be used.
    """
    img = read_image(path, config.image_size)
    img = cv2.resize(img, (config.image_size, config.image_size), interpolation=cv2.INTER_AREA)
    return img, {"quality_too_dark": False, "quality_small_field": False}


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """Encodes uint8 RGB [H, W, 3] as JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()
