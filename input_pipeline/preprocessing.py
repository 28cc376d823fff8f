"""Pre-processing of fundus photographs with numpy and OpenCV (no TensorFlow).

`prepare.py` calls `process_image` once per row in spawned worker processes, so
this module stays light: numpy, OpenCV and Pillow (header parsing only).

Stages of `process_image`, each a pure function unit-tested on small arrays:
  read_image   safe decode (bad files raise ImageError), reduced-scale JPEG
               decode, 16-bit / alpha / grayscale conversion to RGB uint8
  find_fundus  circle of the camera's field of view (robust to dark captures,
               wide frames with black borders and circles clipped by the frame)
  crop_fundus  bounding square of that circle, zero-padded where clipped
  resize       INTER_AREA down, INTER_CUBIC up
  apply_clahe  CLAHE on the green channel or on L of LAB
  ben_graham   local-average colour subtraction (Kaggle DR 2015)
  quality_flags  too-dark / small-field flags, recorded and never rejecting

Coordinates follow OpenCV: x is the column, y the row, pixel centres at
integer positions.
"""

import dataclasses
import io
import math
import pathlib
import warnings
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

# Pillow refuses images above 2 * MAX_IMAGE_PIXELS by itself; our own limit is
# lower and gives a clear reason, so Pillow's warning is silenced in _header.
MAX_MEGAPIXELS = 60.0
# libjpeg can decode at 1/2, 1/4 and 1/8 scale almost for free (it skips the
# high-frequency DCT work), which is most of the decode time of large photos.
_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
# The field is detected on a copy whose longer side is at most this (speed).
_DETECT_MAX_SIDE = 512
# Quality thresholds: mean luma (0..255) inside the field, and field diameter
# relative to the shorter image side / in original pixels.
DARK_MEAN_THRESHOLD = 20.0
SMALL_FIELD_FRACTION = 0.5
SMALL_FIELD_PIXELS = 224.0


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
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    reduced_decode: bool = True  # JPEG DCT-domain downscale when image_size allows
    # Quality flags (recorded, never rejecting): see quality_flags.
    dark_threshold: float = DARK_MEAN_THRESHOLD
    small_field_fraction: float = SMALL_FIELD_FRACTION
    small_field_pixels: float = SMALL_FIELD_PIXELS


class Circle(NamedTuple):
    """Field of view: centre (cx, cy) and radius r, in pixels of the analysed image."""

    cx: float
    cy: float
    r: float


# --------------------------------------------------------------------------- decoding


def _read_bytes(path) -> bytes:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ImageError("file not found")
    data = path.read_bytes()
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def _header(data: bytes) -> tuple[str, tuple[int, int], str]:
    """(format, (width, height), mode) parsed from the header only (Pillow is lazy:
    no pixel is decoded here); raises ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                # MPO: JPEG with extra frames (stereo / preview), as some cameras write.
                fmt = "JPEG" if im.format == "MPO" else im.format or ""
                return fmt, im.size, im.mode
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large to decode safely (> {MAX_MEGAPIXELS:g} MP)") from e
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError("not an image (unrecognised format)") from e


def _check_complete(fmt: str, data: bytes) -> None:
    """Rejects truncated files, which OpenCV would decode as a part-grey image."""
    if fmt == "JPEG":
        # FFD9 cannot occur inside entropy-coded data (0xFF is byte-stuffed),
        # so its absence near the end means the file was cut. Some writers pad
        # after EOI, hence the search window instead of endswith().
        if data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
            raise ImageError("truncated JPEG (no end-of-image marker)")
    elif fmt == "PNG":
        if data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
            raise ImageError("truncated PNG (no IEND chunk)")


def reduced_scale(size: tuple[int, int], target_size: int | None) -> int:
    """Largest JPEG DCT scale in {1, 2, 4, 8} keeping the shorter side >= target_size.

    Args:
      size: (width, height) of the full-resolution image.
      target_size: output side in pixels; None means full resolution (1).
    """
    if not target_size:
        return 1
    short = min(size)
    for scale in (8, 4, 2):
        if math.ceil(short / scale) >= target_size:
            return scale
    return 1


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Rescales uint16 [0, 65535] to uint8 [0, 255] with rounding (not truncation)."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise ImageError(f"unsupported pixel type {img.dtype}")


def _composite_on_black(img: np.ndarray) -> np.ndarray:
    """[H, W, C + 1] colour + alpha (uint8 or uint16) -> [H, W, C] of the same dtype,
    colour * alpha / max, rounded."""
    max_value = np.iinfo(img.dtype).max
    alpha = img[..., -1:].astype(np.uint64)
    colour = img[..., :-1].astype(np.uint64)
    return ((colour * alpha + max_value // 2) // max_value).astype(img.dtype)


def _to_rgb(img: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Any OpenCV decode (gray / gray+alpha / BGR / BGRA, uint8 / uint16) -> RGB uint8,
    and notes on what was converted."""
    notes = []
    if img.ndim == 3 and img.shape[2] in (2, 4):
        img = _composite_on_black(img)
        notes.append("alpha->black")
    if img.dtype != np.uint8:
        notes.append(f"{8 * img.dtype.itemsize}bit->8bit")
        img = _to_uint8(img)
    if img.ndim == 2 or img.shape[2] == 1:
        notes.append("gray->rgb")
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), notes
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), notes


def read_image_with_info(path, target_size: int | None = None) -> tuple[np.ndarray, dict]:
    """`read_image` plus what was done: see `read_image`.

    Returns:
      (uint8 RGB [H', W', 3], info) with info keys `original_size` [H, W] (full
      resolution), `decode_scale` (1, 2, 4 or 8: H' ~= H / scale), `format`,
      `converted` (comma-separated notes such as "16bit->8bit,alpha->black", or "").
    """
    data = _read_bytes(path)
    fmt, (width, height), mode = _header(data)
    if width * height > MAX_MEGAPIXELS * 1e6:
        raise ImageError(f"image too large to decode safely (> {MAX_MEGAPIXELS:g} MP)")
    _check_complete(fmt, data)
    scale = reduced_scale((width, height), target_size) if fmt == "JPEG" else 1
    img, notes = _decode(data, fmt, mode, scale)
    info = {"original_size": [height, width], "decode_scale": scale, "format": fmt,
            "converted": ",".join(notes)}
    return np.ascontiguousarray(img), info


_MODE_NOTES = {"1": "gray->rgb", "L": "gray->rgb", "LA": "gray->rgb", "I": "gray->rgb",
               "P": "palette->rgb", "PA": "palette->rgb", "CMYK": "cmyk->rgb"}


def _decode(data: bytes, fmt: str, mode: str, scale: int) -> tuple[np.ndarray, list[str]]:
    """Decodes with OpenCV: uint8 RGB [H / scale, W / scale, 3] and conversion notes."""
    buf = np.frombuffer(data, np.uint8)
    try:
        if fmt == "JPEG":
            # 8-bit only; OpenCV converts gray and CMYK JPEGs to 3 channels itself.
            img, notes = cv2.imdecode(buf, _REDUCED_FLAGS[scale]), []
            if img is not None:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        else:
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            if img is not None:
                img, notes = _to_rgb(img)
    except cv2.error as e:
        raise ImageError(f"could not decode {fmt or 'image'} data") from e
    if img is None or img.size == 0:
        raise ImageError(f"could not decode {fmt or 'image'} data")
    # OpenCV expands these to BGR(A) silently; the header says what they were.
    mode_note = _MODE_NOTES.get(mode.split(";")[0])
    if mode_note and mode_note not in notes:
        notes.append(mode_note)
    return img, notes


def read_image(path, target_size: int | None = None) -> np.ndarray:
    """Decodes an image file to uint8 RGB [H, W, 3]; raises ImageError.

    Args:
      path: file path (JPEG, PNG, TIFF, BMP, WebP, ... whatever OpenCV decodes).
      target_size: final output side; JPEGs are then decoded at the largest DCT
        scale 1/2, 1/4 or 1/8 whose shorter side stays >= target_size.
    Returns:
      uint8 RGB [H, W, 3]. 16-bit input is rescaled to 8 bit, alpha is composited
      on black, grayscale is replicated to 3 channels.
    Raises:
      ImageError: missing, empty, truncated, non-image or too large (> 60 MP) file.
    """
    return read_image_with_info(path, target_size)[0]


# --------------------------------------------------------------------------- field detection


def _detection_image(img: np.ndarray) -> tuple[np.ndarray, float]:
    """Median-filtered max-channel uint8 [h, w] at most _DETECT_MAX_SIDE, and its scale to img."""
    scale = min(1.0, _DETECT_MAX_SIDE / max(img.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    # Max over channels: the field is bright in some channel (usually red) even
    # when the capture is under-exposed; the black border is dark in all three.
    if img.ndim == 2:
        gray = img
    else:  # cv2.max is ~20x faster than np.max(axis=2) on interleaved channels
        r, g, b = cv2.split(img)
        gray = cv2.max(cv2.max(r, g), b)
    # A median removes sensor and JPEG noise without moving edges; a Gaussian
    # would push a bright rim ~2 px outwards past a threshold just above black.
    return cv2.medianBlur(np.ascontiguousarray(gray), 5), scale


def _border_threshold(gray: np.ndarray) -> float:
    """Grey level just above the black border of a capture.

    The border is the darkest large population of pixels: its level is the mode
    of the histogram below the 10th percentile, its noise the spread of the
    pixels below that mode. The threshold sits just above that noise, not at a
    fraction of the field brightness, because under-exposed fields (and the dark
    half of unevenly lit ones) are only 3-10 grey levels above a black border.
    """
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    p10 = int(np.searchsorted(np.cumsum(hist), 0.1 * gray.size))  # 10th percentile
    bg = int(np.argmax(hist[:p10 + 1]))
    below = hist[:bg + 1]
    sigma = np.sqrt(np.sum(below * (np.arange(bg + 1) - bg) ** 2) / np.sum(below))
    return bg + max(2.5, 4.0 * sigma)


def field_mask(gray: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """uint8 {0, 255} mask of gray [H, W] > threshold (default: _border_threshold)."""
    if threshold is None:
        threshold = _border_threshold(gray)
    return cv2.threshold(gray, float(np.floor(threshold)), 255, cv2.THRESH_BINARY)[1]


def fit_circle(points: np.ndarray) -> Circle:
    """Algebraic least-squares (Kasa) circle through points float [N, 2] (x, y), N >= 3."""
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
    cx, cy = a / 2, b / 2
    return Circle(float(cx), float(cy), float(np.sqrt(max(c + cx * cx + cy * cy, 0.0))))


def _residuals(points: np.ndarray, circle: Circle) -> tuple[np.ndarray, float]:
    """Signed distances of points to the circle (negative inside), and the inlier tolerance."""
    dist = np.hypot(points[:, 0] - circle.cx, points[:, 1] - circle.cy) - circle.r
    return dist, max(1.5, 0.01 * circle.r)


def robust_circle(points: np.ndarray, iterations: int = 4) -> tuple[Circle, float] | None:
    """Circle fit ignoring straight clipping edges and notches.

    Points well inside the circle (edges where a mask or the frame clips the
    field, hull chords over dark notches) are dropped every round; after two
    rounds, points well outside it (notch markers) too.

    Args:
      points: float [N, 2] (x, y) outline points.
    Returns:
      (circle, inlier fraction: share of points within tolerance of it), or None
      with fewer than 8 usable points.
    """
    keep = np.ones(len(points), bool)
    for i in range(iterations):
        if keep.sum() < 8:
            return None
        circle = fit_circle(points[keep])
        dist, tol = _residuals(points, circle)
        keep = dist > -tol
        if i >= 1:
            keep &= dist < 3 * tol
    dist, tol = _residuals(points, circle)
    return circle, float(np.mean(np.abs(dist) < tol))


def _hull_outline(mask: np.ndarray, min_area: float) -> np.ndarray | None:
    """Points float [N, 2] of the convex hull outline of the largest blob, without
    points on the image frame (where the frame, not the field, clips the blob)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    blob = max(contours, key=cv2.contourArea)
    if cv2.contourArea(blob) < min_area:
        return None
    # The hull bridges dark regions inside the field that reach its rim.
    hull = np.zeros_like(mask)
    cv2.fillConvexPoly(hull, cv2.convexHull(blob), 255)
    outline, _ = cv2.findContours(hull, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = max(outline, key=len)[:, 0, :].astype(np.float64)
    h, w = mask.shape
    on_frame = ((pts[:, 0] <= 1) | (pts[:, 0] >= w - 2) | (pts[:, 1] <= 1)
                | (pts[:, 1] >= h - 2))
    return pts[~on_frame]


def _fit_mask(mask: np.ndarray, min_fraction: float) -> tuple[Circle, float] | None:
    """(circle, inlier fraction) of the largest blob of mask, if plausible."""
    points = _hull_outline(mask, min_fraction * mask.size)
    if points is None or len(points) < 8:
        return None
    fit = robust_circle(points)
    if fit is None or not _plausible(fit[0], mask.shape, min_fraction):
        return None
    return fit


def _plausible(circle: Circle, shape: tuple[int, int], min_fraction: float) -> bool:
    """Centre inside the frame, radius below the longer side, enough field area."""
    h, w = shape
    if not (0 <= circle.cx < w and 0 <= circle.cy < h and circle.r < max(h, w)):
        return False
    mask = np.zeros(shape, np.uint8)
    cv2.circle(mask, (round(circle.cx), round(circle.cy)), round(circle.r), 1, -1)
    return cv2.countNonZero(mask) >= min_fraction * h * w


# Below this share of outline points on the fitted circle, the border threshold
# probably caught a grey letterbox or frame around the field (not a circle).
_MIN_INLIERS = 0.25
# Radial profiles for the edge refinement, in units of the coarse radius.
_RAYS = 360
_INNER, _SEARCH, _OUTER = (0.80, 0.92), (0.92, 1.08), (1.08, 1.20)


def _radial_profiles(gray: np.ndarray, circle: Circle) -> tuple[np.ndarray, np.ndarray]:
    """Brightness float32 [_RAYS, R] sampled 1 px apart along rays from the centre,
    -1 outside the frame, and the radii float [R] of the samples."""
    radii = np.arange(_INNER[0] * circle.r, _OUTER[1] * circle.r, 1.0)
    angles = np.linspace(0, 2 * np.pi, _RAYS, endpoint=False)
    map_x = (circle.cx + np.cos(angles)[:, None] * radii).astype(np.float32)
    map_y = (circle.cy + np.sin(angles)[:, None] * radii).astype(np.float32)
    profiles = cv2.remap(gray, map_x, map_y, cv2.INTER_LINEAR).astype(np.float32)
    h, w = gray.shape
    outside = (map_x < 0) | (map_x > w - 1) | (map_y < 0) | (map_y > h - 1)
    profiles[outside] = -1.0
    return profiles, radii


def _edge_points(gray: np.ndarray, circle: Circle) -> np.ndarray:
    """Sub-pixel rim points float [N, 2] (x, y): on each ray from the coarse centre,
    where brightness crosses half-way between the field just inside the rim and
    the border just outside it. Half-way is immune to the JPEG ringing and blur
    that a threshold just above black picks up around bright rims. Rays whose
    rim lies outside the frame, or without contrast, give no point."""
    profiles, radii = _radial_profiles(gray, circle)
    rel = radii / circle.r
    inner = np.median(profiles[:, (rel >= _INNER[0]) & (rel < _INNER[1])], axis=1)
    outer_zone = profiles[:, rel >= _OUTER[0]]
    outer = np.median(outer_zone, axis=1)
    level = (inner + outer) / 2
    search = profiles[:, (rel >= _SEARCH[0]) & (rel < _SEARCH[1])]
    ok = (inner - outer >= 2.0) & (outer_zone.min(axis=1) >= 0) & (search.min(axis=1) >= 0)
    below = search <= level[:, None]
    j = np.argmax(below, axis=1)  # first sample at or below half-way
    ok &= below.any(axis=1) & (j > 0)
    rows = np.flatnonzero(ok)
    j = j[rows]
    first = int(np.argmax(rel >= _SEARCH[0]))
    before, after = search[rows, j - 1], search[rows, j]
    frac = (before - level[rows]) / np.maximum(before - after, 1e-6)
    rho = radii[first + j - 1] + frac
    angles = 2 * np.pi * rows / _RAYS
    return np.stack([circle.cx + rho * np.cos(angles), circle.cy + rho * np.sin(angles)], 1)


def _refine(gray: np.ndarray, circle: Circle) -> Circle:
    """Circle fitted to the half-way rim points, or the coarse one if too few exist."""
    if circle.r < 16:  # too few pixels in the profile windows to measure levels
        return circle
    points = _edge_points(gray, circle)
    if len(points) < _RAYS // 8:
        return circle
    fit = robust_circle(points)
    if fit is None or fit[1] < _MIN_INLIERS or abs(fit[0].r - circle.r) > 0.1 * circle.r:
        return circle
    return fit[0]


def find_fundus(img: np.ndarray, min_fraction: float = 0.1) -> Circle | None:
    """Finds the circular field of view of a fundus photograph.

    Coarse: threshold just above the black border (adaptive to exposure),
    largest blob, its convex hull, robust circle fit to the hull outline minus
    the frame. When few outline points lie on the circle, an Otsu threshold
    among the bright pixels is tried too (a grey band around the field) and the
    better fit kept. Fine: robust circle fit to the half-way brightness crossing
    on 360 rays around the coarse circle.

    Args:
      img: uint8 RGB [H, W, 3] (or gray [H, W]), any exposure; the field may be
        clipped by the frame (wide captures) and have dark regions inside.
      min_fraction: smallest plausible field area / image area.
    Returns:
      Circle in img pixels (centre inside the image), or None when no plausible
      field exists: black or uniform image, field below min_fraction of the image,
      or no visible rim (the field fills the whole frame).
    """
    gray, scale = _detection_image(img)
    threshold = _border_threshold(gray)
    fit = _fit_mask(field_mask(gray, threshold), min_fraction)
    if fit is None or fit[1] < _MIN_INLIERS:
        bright = gray[gray > threshold]
        if bright.size:
            otsu, _ = cv2.threshold(bright.reshape(1, -1), 0, 255,
                                    cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            retry = _fit_mask(field_mask(gray, otsu), min_fraction)
            if retry is not None and (fit is None or retry[1] > fit[1]):
                fit = retry
    if fit is None:
        return None
    circle = _refine(gray, fit[0])
    return Circle(circle.cx / scale, circle.cy / scale, circle.r / scale)


def crop_fundus(img: np.ndarray, circle: Circle | None = None) -> np.ndarray:
    """Crops the bounding square of the field, zero-padding outside the image.

    Args:
      img: uint8 RGB [H, W, 3].
      circle: the field; found with find_fundus when None.
    Returns:
      uint8 [D, D, 3], D = round(2 r), the circle centred.
    Raises:
      ImageError("no fundus field found") when detection fails.
    """
    if circle is None:
        circle = find_fundus(img)
    if circle is None:
        raise ImageError("no fundus field found")
    side = max(1, round(2 * circle.r))
    x0, y0 = round(circle.cx - side / 2), round(circle.cy - side / 2)
    out = np.zeros((side, side) + img.shape[2:], img.dtype)
    h, w = img.shape[:2]
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


# --------------------------------------------------------------------------- pixel ops


def resize(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes to size x size (int) or (height, width); INTER_AREA down, INTER_CUBIC up."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = img.shape[:2]
    if (out_h, out_w) == (h, w):
        return img
    # INTER_AREA averages all source pixels (no aliasing) but is blocky when
    # enlarging; cubic is the better interpolator there.
    downscale = out_h <= h and out_w <= w
    interp = cv2.INTER_AREA if downscale else cv2.INTER_CUBIC
    return cv2.resize(img, (out_w, out_h), interpolation=interp)


def apply_clahe(img: np.ndarray, mode: str = "green", clip_limit: float = 2.0,
                tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation.

    Args:
      img: uint8 RGB [H, W, 3].
      mode: "green" equalises the green channel only (vessels and lesions have the
        most contrast there); "lab" equalises L of CIE LAB, keeping hue.
    Returns:
      uint8 RGB [H, W, 3].
    """
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    out = img.copy()
    if mode == "green":
        out[..., 1] = clahe.apply(np.ascontiguousarray(img[..., 1]))
        return out
    if mode == "lab":
        lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
        lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    raise ValueError(f"unknown CLAHE mode {mode!r}; expected 'green' or 'lab'")


def circle_mask(shape: tuple[int, int], circle: Circle, scale: float = 1.0) -> np.ndarray:
    """bool [H, W], True inside the circle with radius scale * circle.r."""
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (xx - circle.cx) ** 2 + (yy - circle.cy) ** 2 <= (scale * circle.r) ** 2


def centred_circle(size: int) -> Circle:
    """The field of a crop_fundus output of side `size`: inscribed circle."""
    return Circle((size - 1) / 2, (size - 1) / 2, size / 2)


def ben_graham(img: np.ndarray, sigma: float, circle: Circle | None = None,
               mask_field: bool = True) -> np.ndarray:
    """Ben Graham's local average colour subtraction (Kaggle DR 2015 winner).

    out = clip(4 * img - 4 * GaussianBlur(img, sigma) + 128), then black outside
    95% of the field radius (the rim's blur halo is an artefact).

    Args:
      img: uint8 RGB [H, W, 3].
      sigma: Gaussian sigma in pixels (he used radius / 30).
      circle: the field; the inscribed circle of img when None (crop_fundus output).
      mask_field: False leaves the outside of the field as computed (uncropped
        images, whose field is not the inscribed circle).
    Returns:
      uint8 RGB [H, W, 3]; a constant region becomes 128.
    """
    blur = cv2.GaussianBlur(img, (0, 0), sigma)
    out = cv2.addWeighted(img, 4.0, blur, -4.0, 128.0)  # saturates to uint8
    if not mask_field:
        return out
    if circle is None:
        circle = centred_circle(min(img.shape[:2]))
    out[~circle_mask(img.shape[:2], circle, 0.95)] = 0
    return out


def quality_flags(img: np.ndarray, circle: Circle | None, scale: float = 1.0,
                  dark_threshold: float = DARK_MEAN_THRESHOLD,
                  min_fraction: float = SMALL_FIELD_FRACTION,
                  min_pixels: float = SMALL_FIELD_PIXELS) -> dict:
    """Quality measures; they are recorded, never a reason to reject.

    Args:
      img: uint8 RGB [H, W, 3].
      circle: the field in img pixels; None means the whole image.
      scale: original-image pixels per img pixel (the JPEG decode scale).
    Returns:
      {"too_dark": mean luma inside the field < dark_threshold,
       "small_field": diameter < min_fraction * shorter side or < min_pixels
                      (original pixels),
       "mean_brightness": float 0..255, "field_diameter": float (original pixels),
       "field_fraction": float, diameter / shorter image side}
    """
    h, w = img.shape[:2]
    luma = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if circle is None:
        mean, diameter = float(luma.mean()), float(min(h, w))
    else:
        mask = np.zeros((h, w), np.uint8)  # cv2.circle: ~10x faster than circle_mask
        cv2.circle(mask, (round(circle.cx), round(circle.cy)), round(circle.r), 1, -1)
        mean = float(cv2.mean(luma, mask)[0]) if cv2.countNonZero(mask) else 0.0
        diameter = 2 * circle.r
    fraction = diameter / min(h, w)
    return {
        "too_dark": mean < dark_threshold,
        "small_field": fraction < min_fraction or diameter * scale < min_pixels,
        "mean_brightness": round(mean, 2),
        "field_diameter": round(diameter * scale, 1),
        "field_fraction": round(fraction, 3),
    }


# --------------------------------------------------------------------------- pipeline


def process_image(path: str, config: PreprocessConfig) -> tuple[np.ndarray, dict]:
    """Reads, crops, resizes and enhances one image.

    Returns:
      (uint8 RGB [S, S, 3] with S = config.image_size, info dict) with info keys
      "quality_too_dark", "quality_small_field" (bool), "mean_brightness",
      "field_diameter" (original pixels), "field_fraction", "circle" ([cx, cy, r]
      in original pixels, or None with crop="none"), "original_size" [H, W],
      "decode_scale", "format", "converted" (e.g. "16bit->8bit", or "").
    Raises:
      ImageError with the reason the image cannot be used.
    """
    target = config.image_size if config.reduced_decode else None
    img, info = read_image_with_info(path, target)
    scale = info["decode_scale"]
    circle = None
    if config.crop == "fundus":
        circle = find_fundus(img)
        if circle is None:
            raise ImageError("no fundus field found")
    elif config.crop != "none":
        raise ValueError(f"unknown crop {config.crop!r}; expected 'fundus' or 'none'")
    flags = quality_flags(img, circle, scale, config.dark_threshold,
                          config.small_field_fraction, config.small_field_pixels)
    if circle is not None:
        img = crop_fundus(img, circle)
        info["circle"] = _to_original(circle, scale)
    else:
        info["circle"] = None
    img = resize(img, config.image_size)
    img = _enhance(img, config)
    info.update({"quality_too_dark": flags.pop("too_dark"),
                 "quality_small_field": flags.pop("small_field"), **flags})
    return img, info


def _to_original(circle: Circle, scale: int) -> list[float]:
    """[cx, cy, r] in full-resolution pixels of a circle found in a 1/scale decode
    (reduced pixel i averages full pixels i * scale .. i * scale + scale - 1)."""
    offset = (scale - 1) / 2
    return [round(circle.cx * scale + offset, 1), round(circle.cy * scale + offset, 1),
            round(circle.r * scale, 1)]


def _enhance(img: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Optional CLAHE then Ben Graham on the final-size uint8 RGB [S, S, 3] image."""
    if config.clahe:
        img = apply_clahe(img, config.clahe, config.clahe_clip_limit, config.clahe_tile_grid)
    if config.ben_graham:
        sigma = config.ben_graham_sigma * config.image_size / 512
        img = ben_graham(img, sigma, mask_field=config.crop == "fundus")
    return img


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """Encodes uint8 RGB [H, W, 3] as JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()
