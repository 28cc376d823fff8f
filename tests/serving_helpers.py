"""Test helpers shared by the serving / export / predict tests: synthetic fundus images."""

import cv2
import numpy as np


def synthetic_fundus(height: int, width: int, *, radius: float, centre=None,
                     brightness: float = 1.0, seed: int = 0) -> np.ndarray:
    """uint8 RGB [height, width, 3]: an orange-red disc with vessels on a black border.

    Args:
        radius: disc radius in pixels (may exceed height / 2: the frame clips it).
        centre: (cx, cy), the frame centre when None.
        brightness: scales the disc's colours (0.2 gives a dark capture).
    """
    rng = np.random.default_rng(seed)
    cx, cy = centre if centre is not None else ((width - 1) / 2, (height - 1) / 2)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    dist = np.hypot(xx - cx, yy - cy) / radius
    base = np.array([200.0, 90.0, 40.0]) * brightness
    vignette = np.clip(1.0 - 0.4 * dist ** 2, 0, 1)[..., None]
    img = base * vignette + rng.normal(0, 3 * brightness, (height, width, 3))
    for _ in range(6):  # dark "vessels": sinusoids across the disc
        a, f, p = rng.uniform(0.1, 0.3) * radius, rng.uniform(1, 3) / radius, rng.uniform(0, 6)
        y_line = cy + a * np.sin(f * (xx - cx) + p) + rng.uniform(-0.5, 0.5) * radius
        img *= 1 - 0.35 * np.exp(-((yy - y_line) ** 2) / 8.0)[..., None]
    img[dist > 1.0] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, fmt: str = ".png", quality: int = 95) -> bytes:
    """uint8 RGB [H, W, 3] -> encoded bytes (".png" or ".jpg")."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == ".jpg" else []
    ok, buf = cv2.imencode(fmt, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
    assert ok
    return buf.tobytes()


def garbage_scan(jpeg: bytes) -> bytes:
    """The JPEG with random bytes over its scan data, every marker before and after kept."""
    data = bytearray(jpeg)
    start = data.find(b"\xff\xda") + 12
    data[start:-8] = np.random.default_rng(0).integers(0, 256, len(data) - 8 - start,
                                                       dtype=np.uint8).tobytes()
    return bytes(data)
