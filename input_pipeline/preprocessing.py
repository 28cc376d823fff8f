"""THE pre-processing of fundus photographs, in TensorFlow ops: raw bytes -> model pixels.

One implementation serves both ends, so training and served pixels agree by
construction, not by tolerance:

- `prepare` calls `process_image` (a `tf.function` of `process`) on each file and
  stores `encode_jpeg` of its output in the TFRecords;
- the exported SavedModel calls `serving_batch` (the same `process`, then the
  same JPEG round trip, then `pipeline.preprocess_image`) inside its signature:
  pure TF, so TF Serving runs it without Python.

Stages of `process`, each a pure function of tensors (traceable in
`tf.function`, `Dataset.map` and a SavedModel signature):

    image_decode.decode   checks from the header (format, size caps, JPEG marker
                          structure), reduced-scale JPEG decode, EXIF orientation,
                          16-bit / alpha / grayscale -> 8-bit RGB
    find_fundus           circle of the camera's field of view
    crop_fundus           its bounding square, zero-padded where the frame clips it
    resize                area average down, bicubic up, rounded to uint8
    clahe / ben_graham    optional enhancement (green-channel CLAHE bit-exact with OpenCV)
    quality               gradability: no_fundus_field, too_dark, small_field

Formats TF cannot decode (TIFF, WebP, ...) are transcoded losslessly to PNG by
`graph_bytes` on the host (OpenCV), in prepare and in predict alike; the graph
itself answers them with an error naming the format.

Coordinates: x is the column, y the row, pixel centres at integer positions.
"""

import dataclasses
import functools
import io
import math
import pathlib

import cv2
import numpy as np
import simplejpeg
import tensorflow as tf

from input_pipeline import image_decode, pipeline

# Field detection: on a copy whose long side is at most DETECT_MAX_SIDE, the max
# over channels is median-filtered, thresholded just above the black border's
# noise, and a circle is fitted (Kasa least squares, robustly re-weighted) to
# the outline of the foreground, leaving out pixels on the frame (where the
# frame, not the field, clips it); then refined on radial profiles.
# 256 px: 4x cheaper than 512 (the median filter dominates), and the rim
# refinement is sub-pixel anyway (~3 px of a 3504 px photograph).
DETECT_MAX_SIDE = 256
MIN_FIELD_FRACTION = 0.1  # smallest plausible field area / image area
_FIT_ITERATIONS = 4
_MIN_POINTS = 8
# Below this share of outline points on the fitted circle, the threshold
# probably caught a grey letterbox or frame around the field, not a circle.
_MIN_INLIERS = 0.25
# Rim refinement along radial profiles, in units of the coarse radius.
_RAYS = 360
_INNER, _SEARCH, _OUTER = (0.80, 0.92), (0.92, 1.08), (1.08, 1.20)
# The narrowest zone is 0.12 r wide, sampled every pixel: below r ~ 8.3 small-image
# pixels (fields in images of a few thousand pixels) it may hold no sample at all.
_MIN_REFINE_RADIUS = 10.0
# Quality thresholds: mean luma (0..255) inside the field, and field diameter
# relative to the shorter image side / in original pixels.
DARK_MEAN_THRESHOLD = 20.0
SMALL_FIELD_FRACTION = 0.5
SMALL_FIELD_PIXELS = 224.0
QUALITY_REASONS = ("no_fundus_field", "too_dark", "small_field")


class ImageError(Exception):
    """An image that cannot be used; `reason` is a short human-readable cause."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Every parameter that changes the pixels (recorded in dataset.json).

    `model_image_size` is the served model's input size (export only; prepare
    leaves it None).
    """

    image_size: int = 512  # prepare's square output (dataset.json "image_size")
    crop: str = "fundus"  # "fundus" | "none"
    clahe: str | None = None  # None | "green"
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    ben_graham: bool = False
    ben_graham_sigma: float = 10.0  # at 512 px; scaled with image_size
    jpeg_quality: int = 95  # prepare stores JPEGs; serving repeats the round trip
    reduced_decode: bool = True  # JPEG DCT-domain downscale when image_size allows
    # Quality checks (gradability; prepare records them, serving returns them).
    dark_threshold: float = DARK_MEAN_THRESHOLD
    small_field_fraction: float = SMALL_FIELD_FRACTION
    small_field_pixels: float = SMALL_FIELD_PIXELS
    model_image_size: int | None = None

    def __post_init__(self):
        if self.crop not in ("fundus", "none"):
            raise ValueError(f"Unknown crop {self.crop!r}; expected 'fundus' or 'none'")
        if self.clahe not in (None, "green"):
            raise ValueError(
                f"CLAHE {self.clahe!r} is not available: the one pre-processing (shared by "
                "prepare and the export graph) has green-channel CLAHE only (--clahe=green)")

    @classmethod
    def from_dataset_info(cls, dataset_info: dict,
                          model_image_size: int | None = None) -> "PreprocessConfig":
        """The config prepare recorded in dataset.json; ValueError for what it cannot redo
        (CLAHE on L of LAB, from datasets prepared before it was dropped)."""
        pp = dataset_info.get("preprocessing", {}) or {}
        thresholds = dataset_info.get("quality_thresholds", {}) or {}
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        pick = {k: type(fields[k])(v) for k, v in {**pp, **thresholds}.items()
                if k in fields and v is not None and fields[k] is not None}
        return cls(**{**pick, "image_size": int(dataset_info.get("image_size",
                                                                  model_image_size)),
                      "crop": pp.get("crop") or "none", "clahe": pp.get("clahe"),
                      "model_image_size": model_image_size})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- field detection


def _round_uint8(x: tf.Tensor) -> tf.Tensor:
    """float -> uint8 with rounding and saturation (OpenCV's saturate_cast)."""
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def small_image(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """float32 [h, w, 3] copy (area average, rounded to integer levels) whose long side is
    at most DETECT_MAX_SIDE, and its scale (small pixels per image pixel, <= 1)."""
    shape = tf.shape(image)
    hw = tf.cast(shape[:2], tf.float32)
    scale = tf.minimum(1.0, DETECT_MAX_SIDE / tf.reduce_max(hw))
    small_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    small = tf.cond(scale < 1.0,
                    lambda: tf.cast(_round_uint8(tf.image.resize(image, small_hw, "area")),
                                    tf.float32),
                    lambda: tf.cast(image, tf.float32))
    return small, scale


def _replicate_pad(x: tf.Tensor, pad: int) -> tf.Tensor:
    """Pads [H, W] by repeating the edge pixels (OpenCV's BORDER_REPLICATE)."""
    for axis in (0, 1):
        n = tf.shape(x)[axis]
        idx = tf.clip_by_value(tf.range(-pad, n + pad), 0, n - 1)
        x = tf.gather(x, idx, axis=axis)
    return x


# Knuth's 9-comparator sorting network for 5 values.
_SORT5 = ((0, 1), (3, 4), (2, 4), (2, 3), (0, 3), (0, 2), (1, 4), (1, 3), (1, 2))


def _median5(values: list) -> tf.Tensor:
    """Elementwise median of 5 equal-shape tensors (a sorting network of min/max)."""
    v = list(values)
    for i, j in _SORT5:
        v[i], v[j] = tf.minimum(v[i], v[j]), tf.maximum(v[i], v[j])
    return v[2]


def median_blur(gray: tf.Tensor) -> tf.Tensor:
    """Separable 5x5 median of float32 [H, W]: the median of 5 along each row, then
    of 5 along each column, edges replicated (OpenCV's BORDER_REPLICATE).

    Like a true 5x5 median it removes sensor and JPEG noise without moving step
    edges (the rim of the field), at ~1/10 of its cost in TF ops.
    """
    h, w = tf.shape(gray)[0], tf.shape(gray)[1]
    padded = _replicate_pad(gray, 2)
    rows = _median5([padded[:, j:j + w] for j in range(5)])
    return _median5([rows[i:i + h] for i in range(5)])


def _histogram_percentile(hist: tf.Tensor, q: float) -> tf.Tensor:
    """np.percentile (linear) of integer levels from their histogram, float64 [256] counts."""
    cum = tf.cumsum(hist)
    pos = q / 100.0 * (cum[-1] - 1)
    lo = tf.floor(pos)

    def sorted_at(k):  # the k-th smallest value: how many levels have cum <= k
        return tf.reduce_sum(tf.cast(cum <= k, tf.float64))

    return sorted_at(lo) + (pos - lo) * (sorted_at(lo + 1) - sorted_at(lo))


def border_threshold(gray: tf.Tensor) -> tf.Tensor:
    """float64 grey level just above the black border of float32 [h, w] gray (integer levels).

    The border level is the histogram mode
    below the 10th percentile, its noise the spread of the pixels below that
    mode, and the threshold sits just above it (dark fields are only a few grey
    levels above a black border, so a fraction of the brightness would lose them).
    """
    hist = tf.cast(tf.math.bincount(tf.cast(gray, tf.int32), minlength=256, maxlength=256),
                   tf.float64)
    p10 = tf.cast(tf.floor(_histogram_percentile(hist, 10.0)), tf.int32)
    bg = tf.cast(tf.argmax(hist[:p10 + 1]), tf.int32)
    below = hist[:bg + 1]
    offsets = tf.cast(tf.range(bg + 1) - bg, tf.float64)
    sigma = tf.sqrt(tf.reduce_sum(below * offsets ** 2) / tf.reduce_sum(below))
    return tf.cast(bg, tf.float64) + tf.maximum(4.0 * sigma, 2.5)


def otsu_threshold(gray: tf.Tensor, above: tf.Tensor) -> tf.Tensor:
    """float64 Otsu level of the pixels of gray brighter than `above` (OpenCV's THRESH_OTSU).

    The level t maximises the between-class variance of {<= t} and {> t}; the
    first maximum wins, as in OpenCV. 0 when no pixel is brighter than `above`.
    """
    levels = tf.cast(gray, tf.int32)
    bright = tf.boolean_mask(levels, tf.cast(gray, tf.float64) > above)
    hist = tf.cast(tf.math.bincount(bright, minlength=256, maxlength=256), tf.float64)
    p = hist / tf.maximum(tf.reduce_sum(hist), 1.0)
    i = tf.range(256, dtype=tf.float64)
    q1 = tf.cumsum(p)
    q2 = 1.0 - q1
    m1 = tf.cumsum(i * p)
    mu = m1[-1]
    eps = 1.1920929e-07  # FLT_EPSILON: OpenCV skips levels with an empty class
    valid = (tf.minimum(q1, q2) >= eps) & (tf.maximum(q1, q2) <= 1.0 - eps)
    mu1 = m1 / tf.where(valid, q1, 1.0)
    mu2 = (mu - m1) / tf.where(valid, q2, 1.0)
    sigma = tf.where(valid, q1 * q2 * (mu1 - mu2) ** 2, -1.0)
    return tf.where(tf.reduce_any(valid), tf.cast(tf.argmax(sigma), tf.float64),
                    tf.constant(0.0, tf.float64))


def field_mask(gray: tf.Tensor, threshold: tf.Tensor | None = None) -> tf.Tensor:
    """bool [h, w]: pixels of float32 [h, w] gray above `threshold` (default: the border's)."""
    if threshold is None:
        threshold = border_threshold(gray)
    return tf.cast(gray, tf.float64) > threshold


def _extremes(mask: tf.Tensor, axis: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """First and last foreground index along `axis` of bool [h, w], and whether any."""
    m = tf.cast(mask, tf.int32)
    n = tf.shape(m)[axis]
    first = tf.cast(tf.argmax(m, axis=axis), tf.int32)  # argmax returns the first maximum
    last = n - 1 - tf.cast(tf.argmax(tf.reverse(m, [axis]), axis=axis), tf.int32)
    return first, last, tf.reduce_any(mask, axis=axis)


def _boundary_points(mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Outline of the foreground: float64 [N, 2] (x, y) points and bool [N] (all True).

    A pixel is on the outline when it is foreground with a background
    4-neighbour (the pixels `cv2.findContours` traces); pixels within 1 px of
    the frame are left out.
    """
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    m = tf.pad(tf.cast(mask, tf.int32), [[1, 1], [1, 1]])
    eroded = tf.reduce_min(tf.stack([m[1:-1, 1:-1], m[:-2, 1:-1], m[2:, 1:-1],
                                     m[1:-1, :-2], m[1:-1, 2:]]), axis=0)
    outline = mask & (eroded == 0)
    yy, xx = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
    outline &= (xx > 1) & (xx < w - 2) & (yy > 1) & (yy < h - 2)
    yx = tf.where(outline)  # int64 [N, 2] (row, column)
    points = tf.cast(tf.reverse(yx, [1]), tf.float64)
    return points, tf.ones([tf.shape(points)[0]], tf.bool)


def _fit_circle(points: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Weighted Kasa circle fit: float64 [N, 2] points, [N] 0/1 weights -> [3] (cx, cy, r)."""
    x, y = points[:, 0], points[:, 1]
    a = tf.stack([x, y, tf.ones_like(x)], 1)
    aw = a * weights[:, None]
    lhs = tf.matmul(aw, a, transpose_a=True)
    rhs = tf.matmul(aw, (x * x + y * y)[:, None], transpose_a=True)
    # A tiny ridge keeps the solve defined when too few points are left (the
    # caller then rejects the circle); it does not move a well-posed fit.
    lhs += 1e-9 * (tf.linalg.trace(lhs) + 1.0) * tf.eye(3, dtype=tf.float64)
    p = tf.linalg.solve(lhs, rhs)[:, 0]
    cx, cy = p[0] / 2, p[1] / 2
    return tf.stack([cx, cy, tf.sqrt(tf.maximum(p[2] + cx * cx + cy * cy, 0.0))])


def _robust_circle(points: tf.Tensor, valid: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Circle fit dropping points well inside it, then also well outside (notches).

    Args:
        points: float64 [N, 2] (x, y); valid: bool [N], the points that exist.
    Returns:
        (float64 [3] circle, float64 inlier fraction among the valid points);
        the fraction is 0 when fewer than 8 points were left in some round.
    """
    keep, ok = valid, tf.constant(True)
    circle = tf.zeros([3], tf.float64)
    for i in range(_FIT_ITERATIONS):
        ok &= tf.reduce_sum(tf.cast(keep, tf.int32)) >= _MIN_POINTS
        circle = _fit_circle(points, tf.cast(keep, tf.float64))
        dist, tol = _residuals(points, circle)
        keep = valid & (dist > -tol)
        if i >= 1:
            keep &= dist < 3 * tol
    dist, tol = _residuals(points, circle)
    inliers = tf.reduce_sum(tf.cast(valid & (tf.abs(dist) < tol), tf.float64))
    fraction = inliers / tf.maximum(tf.reduce_sum(tf.cast(valid, tf.float64)), 1.0)
    return circle, tf.where(ok, fraction, tf.zeros_like(fraction))


def _residuals(points: tf.Tensor, circle: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Signed distances [N] to the circle (negative inside) and the inlier tolerance."""
    dist = tf.norm(points - circle[None, :2], axis=1) - circle[2]
    return dist, tf.maximum(0.01 * circle[2], 1.5)


def _plausible(circle: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Centre inside the frame, radius < long side, disc covers >= MIN_FIELD_FRACTION."""
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    cx, cy, r = circle[0], circle[1], circle[2]
    inside = (cx >= 0) & (cx < wf) & (cy >= 0) & (cy < hf) & (r < tf.maximum(hf, wf))
    yy = tf.cast(tf.range(h), tf.float64)[:, None]
    xx = tf.cast(tf.range(w), tf.float64)[None, :]
    disc = tf.reduce_sum(tf.cast((xx - tf.round(cx)) ** 2 + (yy - tf.round(cy)) ** 2
                                 <= tf.round(r) ** 2, tf.float64))
    min_area = MIN_FIELD_FRACTION * hf * wf
    blob = tf.reduce_sum(tf.cast(mask, tf.float64))
    return inside & (disc >= min_area) & (blob >= min_area)


def _box_circle(mask: tf.Tensor) -> tf.Tensor:
    """Fallback "circle" (float64 [3]) whose bounding square holds the foreground's box.

    The whole frame when nothing is foreground.
    """
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    left, right, row_any = _extremes(mask, axis=1)
    top, bottom, col_any = _extremes(mask, axis=0)
    found = tf.reduce_any(row_any)
    x0 = tf.where(found, tf.reduce_min(tf.where(row_any, left, w)), 0)
    x1 = tf.where(found, tf.reduce_max(tf.where(row_any, right, -1)), w - 1)
    y0 = tf.where(found, tf.reduce_min(tf.where(col_any, top, h)), 0)
    y1 = tf.where(found, tf.reduce_max(tf.where(col_any, bottom, -1)), h - 1)
    box = tf.cast(tf.stack([x0, y0, x1, y1]), tf.float64)
    side = tf.maximum(box[2] - box[0], box[3] - box[1]) + 1
    return tf.stack([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, side / 2])


def _sample_bilinear(gray: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Bilinear samples of float32 [h, w] at float32 x, y (any equal shape); 0 outside."""
    h, w = tf.shape(gray)[0], tf.shape(gray)[1]
    x0, y0 = tf.floor(x), tf.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)

    def at(yi, xi):
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        idx = tf.stack([tf.clip_by_value(yi, 0, h - 1), tf.clip_by_value(xi, 0, w - 1)], -1)
        return tf.where(inside, tf.gather_nd(gray, idx), 0.0)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def _median(x: tf.Tensor) -> tf.Tensor:
    """Median along the last axis (mean of the two middle values for even counts)."""
    n = tf.shape(x)[-1]
    s = tf.sort(x, axis=-1)
    return (tf.gather(s, (n - 1) // 2, axis=-1) + tf.gather(s, n // 2, axis=-1)) / 2


def _edge_points(gray: tf.Tensor, circle: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Sub-pixel rim points float64 [RAYS, 2] and bool [RAYS] validity.

    On each ray from the coarse centre, where
    the brightness crosses half-way between the field just inside the rim and
    the border just outside it (immune to JPEG ringing and blur at the rim).
    Rays whose rim zone leaves the frame, or without contrast, give no point.
    """
    h, w = tf.cast(tf.shape(gray)[0], tf.float32), tf.cast(tf.shape(gray)[1], tf.float32)
    c = tf.cast(circle, tf.float32)
    cx, cy, r = c[0], c[1], c[2]
    radii = tf.range(_INNER[0] * r, _OUTER[1] * r, 1.0)
    angles = tf.range(_RAYS, dtype=tf.float32) * (2 * math.pi / _RAYS)
    map_x = cx + tf.cos(angles)[:, None] * radii[None, :]
    map_y = cy + tf.sin(angles)[:, None] * radii[None, :]
    profiles = _sample_bilinear(gray, map_x, map_y)
    outside = (map_x < 0) | (map_x > w - 1) | (map_y < 0) | (map_y > h - 1)
    profiles = tf.where(outside, -1.0, profiles)
    rel = radii / r

    def zone(lo, hi):
        return tf.boolean_mask(profiles, (rel >= lo) & (rel < hi), axis=1)

    inner = _median(zone(*_INNER))
    outer_zone = zone(_OUTER[0], math.inf)
    outer = _median(outer_zone)
    level = (inner + outer) / 2
    search = zone(*_SEARCH)
    ok = ((inner - outer >= 2.0) & (tf.reduce_min(outer_zone, 1) >= 0)
          & (tf.reduce_min(search, 1) >= 0))
    below = search <= level[:, None]
    j = tf.cast(tf.argmax(tf.cast(below, tf.int32), axis=1), tf.int32)  # first at/below
    ok &= tf.reduce_any(below, 1) & (j > 0)
    jm1 = tf.maximum(j - 1, 0)
    before = tf.gather(search, jm1, batch_dims=1)
    after = tf.gather(search, j, batch_dims=1)
    frac = (before - level) / tf.maximum(before - after, 1e-6)
    first = tf.cast(tf.argmax(tf.cast(rel >= _SEARCH[0], tf.int32)), tf.int32)
    rho = tf.gather(radii, first + jm1) + frac
    points = tf.stack([cx + rho * tf.cos(angles), cy + rho * tf.sin(angles)], 1)
    return tf.cast(points, tf.float64), ok


def _refine(gray: tf.Tensor, circle: tf.Tensor) -> tf.Tensor:
    """Circle fitted to the half-way rim points, or the coarse one when that fit is poor
    or the circle is too small for every rim zone to hold a 1-px sample."""
    def fitted():
        points, valid = _edge_points(gray, circle)
        fit, inliers = _robust_circle(points, valid)
        good = ((tf.reduce_sum(tf.cast(valid, tf.int32)) >= _RAYS // 8)
                & (inliers >= _MIN_INLIERS) & (tf.abs(fit[2] - circle[2]) <= 0.1 * circle[2]))
        return tf.where(good, fit, circle)
    return tf.cond(circle[2] >= _MIN_REFINE_RADIUS, fitted, lambda: circle)


def _fit_mask(mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(float64 [3] circle, inlier fraction, plausible) fitted to the outline of bool mask."""
    points, valid = _boundary_points(mask)
    circle, inliers = _robust_circle(points, valid)
    # inliers is 0 when too few outline points remained.
    return circle, inliers, (inliers > 0) & _plausible(circle, mask)


def find_fundus(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Circle of the camera's field of view in a uint8 RGB [H, W, 3] photograph.

    A fit to the mask above the border threshold; when few outline points lie
    on that circle (a grey letterbox or frame around the field), a second fit
    above an Otsu threshold among the brighter pixels, the one with more
    inliers kept; then the rim refinement.

    Returns:
        (float64 [3] (cx, cy, r) in pixels of `image` (x = column), bool found).
        Without a plausible circle (black, white, uniform or noise images, a
        field below MIN_FIELD_FRACTION of the frame or without a visible rim)
        found is False and the circle is the bounding square of the
        foreground, or of the whole frame, so serving can still crop and score.
    """
    return find_fundus_small(*small_image(image))


def find_fundus_small(small: tf.Tensor, scale: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`find_fundus` on the output of `small_image(image)`; circle in image pixels."""
    # Max over channels: the field is bright in some channel even when under-exposed.
    # A median removes sensor and JPEG noise without moving edges.
    gray = median_blur(tf.reduce_max(small, axis=-1))
    threshold = border_threshold(gray)
    mask = field_mask(gray, threshold)
    circle, inliers, ok = _fit_mask(mask)

    def otsu_retry():
        retry, retry_inliers, retry_ok = _fit_mask(field_mask(gray, otsu_threshold(gray,
                                                                                  threshold)))
        better = retry_ok & (~ok | (retry_inliers > inliers))
        return tf.where(better, retry, circle), ok | better

    circle, ok = tf.cond(~ok | (inliers < _MIN_INLIERS), otsu_retry, lambda: (circle, ok))
    # The refinement runs on the fallback too (harmless: it keeps it if rim points are poor).
    circle = tf.where(ok, circle, _box_circle(mask))
    circle = tf.cond(ok, lambda: _refine(gray, circle), lambda: circle)
    return circle / tf.cast(scale, tf.float64), ok


def crop_fundus(image: tf.Tensor, circle: tf.Tensor | None = None) -> tf.Tensor:
    """Crops the bounding square of the field, zero-padded outside the image.

    Args:
        image: uint8 RGB [H, W, 3].
        circle: float64 [3] (cx, cy, r); found with `find_fundus` when None.
    Returns:
        uint8 [D, D, 3], D = round(2 r), the circle centred.
    """
    if circle is None:
        circle = find_fundus(image)[0]
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.maximum(tf.cast(tf.round(2 * circle[2]), tf.int32), 1)
    half = tf.cast(side, tf.float64) / 2
    x0 = tf.cast(tf.round(circle[0] - half), tf.int32)
    y0 = tf.cast(tf.round(circle[1] - half), tf.int32)
    pad_top, pad_left = tf.maximum(-y0, 0), tf.maximum(-x0, 0)
    pad_bottom = tf.maximum(y0 + side - h, 0)
    pad_right = tf.maximum(x0 + side - w, 0)
    padded = tf.pad(image, [[pad_top, pad_bottom], [pad_left, pad_right], [0, 0]])
    return tf.slice(padded, [y0 + pad_top, x0 + pad_left, 0], [side, side, 3])


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: area average down, bicubic up.

    (OpenCV's INTER_AREA / INTER_CUBIC), rounded into uint8.
    """
    shape = tf.shape(image)
    down = (shape[0] >= size) & (shape[1] >= size)
    out = tf.cond(down, lambda: tf.image.resize(image, [size, size], method="area"),
                  lambda: tf.image.resize(image, [size, size], method="bicubic"))
    return _round_uint8(out)


def gaussian_kernel(sigma: float) -> tf.Tensor:
    """1-D Gaussian, float32 [K], K = round(6 sigma + 1) forced odd (OpenCV's uint8 rule)."""
    size = int(round(sigma * 6 + 1)) | 1
    x = tf.range(size, dtype=tf.float32) - (size - 1) / 2
    k = tf.exp(-0.5 * tf.square(x / sigma))
    return k / tf.reduce_sum(k)


def gaussian_blur(image: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Separable blur of float32 [H, W, C] with a 1-D kernel [K] via depthwise convolutions.

    Borders reflect without repeating the edge pixel (OpenCV's BORDER_REFLECT_101),
    so H and W must exceed K // 2.
    """
    channels = image.shape[-1]
    pad = (int(kernel.shape[0]) - 1) // 2
    x = tf.pad(image[None], [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    kv = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    kh = tf.reshape(kv, [1, -1, channels, 1])
    x = tf.nn.depthwise_conv2d(x, kv, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, kh, [1, 1, 1, 1], "VALID")
    return x[0]


def clahe(channel: tf.Tensor, clip_limit: float = 2.0, tile_grid: int = 8) -> tf.Tensor:
    """OpenCV's CLAHE (`cv2.createCLAHE(clip_limit, (n, n)).apply`), bit for bit, in TF ops.

    Per tile: a 256-bin histogram, clipped at max(int(clip_limit * area / 256), 1)
    with the excess spread evenly and its remainder over every k-th bin, its
    cumulative sum scaled to [0, 255] as a look-up table; each pixel then mixes
    the tables of its four nearest tile centres bilinearly. Sizes not divisible
    by n are reflect-101 padded for the histograms, as OpenCV does.

    Args:
        channel: uint8 [H, W] with static H, W.
    Returns:
        uint8 [H, W].
    """
    h, w = channel.shape
    n = tile_grid
    v = tf.cast(channel, tf.int32)
    # OpenCV pads both axes (by up to a whole tile) when either is not divisible.
    ext = tf.pad(v, [[0, n - h % n], [0, n - w % n]], mode="REFLECT") if h % n or w % n else v
    th, tw = ext.shape[0] // n, ext.shape[1] // n
    tiles = tf.reshape(tf.transpose(tf.reshape(ext, [n, th, n, tw]), [0, 2, 1, 3]), [n * n, -1])
    bins = n * n * 256
    hist = tf.reshape(tf.math.bincount(tf.reshape(tiles + 256 * tf.range(n * n)[:, None], [-1]),
                                       minlength=bins, maxlength=bins), [n * n, 256])
    if clip_limit > 0:
        limit = max(int(clip_limit * th * tw / 256), 1)
        excess = tf.reduce_sum(tf.maximum(hist - limit, 0), axis=1, keepdims=True)
        batch, residual = excess // 256, excess % 256
        level = tf.range(256)[None]
        step = tf.maximum(256 // tf.maximum(residual, 1), 1)
        extra = (residual > 0) & (level % step == 0) & (level // step < residual)
        hist = tf.minimum(hist, limit) + batch + tf.cast(extra, tf.int32)
    scale = np.float32(255) / np.float32(th * tw)  # float32 arithmetic, as OpenCV
    lut = tf.reshape(tf.round(tf.cast(tf.cumsum(hist, axis=1), tf.float32) * scale), [-1])

    def neighbours(size, tile):  # the two tile indices each pixel mixes, and the weight
        pos = tf.range(size, dtype=tf.float32) * (np.float32(1) / np.float32(tile)) - 0.5
        first = tf.floor(pos)
        i = tf.cast(first, tf.int32)
        return tf.maximum(i, 0), tf.minimum(i + 1, n - 1), pos - first

    x1, x2, xa = neighbours(w, tw)
    y1, y2, ya = neighbours(h, th)
    xa, ya = xa[None, :], ya[:, None]

    def table(ty, tx):
        return tf.gather(lut, (ty[:, None] * n + tx[None, :]) * 256 + v)

    out = ((table(y1, x1) * (1 - xa) + table(y1, x2) * xa) * (1 - ya)
           + (table(y2, x1) * (1 - xa) + table(y2, x2) * xa) * ya)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def ben_graham(image: tf.Tensor, sigma: float, mask_field: bool = True) -> tf.Tensor:
    """Ben Graham's local average colour subtraction on uint8 [S, S, 3].

    out = clip(4 img - 4 GaussianBlur(img, sigma) + 128), then black outside 95%
    of the inscribed circle's radius when `mask_field` (fundus-cropped images),
    (Kaggle DR 2015 winner). Returns uint8 [S, S, 3].
    """
    x = tf.cast(image, tf.float32)
    # OpenCV blurs uint8 into uint8, so the blur is rounded before the subtraction.
    blur = tf.round(gaussian_blur(x, gaussian_kernel(sigma)))
    out = _round_uint8(4.0 * x - 4.0 * blur + 128.0)
    if not mask_field:
        return out
    size = int(image.shape[0])
    c = (size - 1) / 2
    yy = tf.range(size, dtype=tf.float32)[:, None]
    xx = tf.range(size, dtype=tf.float32)[None, :]
    inside = (xx - c) ** 2 + (yy - c) ** 2 <= (0.95 * size / 2) ** 2
    return tf.where(inside[..., None], out, tf.zeros_like(out))


def enhance(image: tf.Tensor, config: PreprocessConfig) -> tf.Tensor:
    """Optional green CLAHE then Ben Graham on the final uint8 [S, S, 3] image."""
    if config.clahe == "green":
        green = clahe(image[..., 1], config.clahe_clip_limit, config.clahe_tile_grid)
        image = tf.stack([image[..., 0], green, image[..., 2]], axis=-1)
    if config.ben_graham:
        sigma = config.ben_graham_sigma * config.image_size / 512
        image = ben_graham(image, sigma, mask_field=config.crop == "fundus")
    return image


def field_luma_mean(image: tf.Tensor, circle: tf.Tensor) -> tf.Tensor:
    """float32 mean luma (0.299 R + 0.587 G + 0.114 B) of RGB [H, W, 3] inside the
    disc of radius round(r) around (round(cx), round(cy)); 0 for an empty disc."""
    luma = tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))[..., 0]
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    yy = tf.cast(tf.range(h), tf.float64)[:, None]
    xx = tf.cast(tf.range(w), tf.float64)[None, :]
    disc = ((xx - tf.round(circle[0])) ** 2 + (yy - tf.round(circle[1])) ** 2
            <= tf.round(circle[2]) ** 2)
    count = tf.reduce_sum(tf.cast(disc, tf.float32))
    return tf.reduce_sum(tf.where(disc, luma, 0.0)) / tf.maximum(count, 1.0)


def quality(image: tf.Tensor, circle: tf.Tensor, found: tf.Tensor, scale: tf.Tensor,
            config: PreprocessConfig) -> dict:
    """Gradability of a decoded image (the checks prepare records, serving returns).

    Args:
        image: RGB [H, W, 3] (uint8 or float32 integer levels), the original image
            at 1/scale (`small_image` of the decode: means and fractions do not
            need full resolution).
        circle: float64 [3] field in image pixels; found: whether it is a real field
            (False: crop="fundus" found none). With crop="none" the whole frame counts.
        scale: float32, original pixels per image pixel.
    Returns:
        {"no_fundus_field", "too_dark", "small_field": bool, "mean_brightness",
         "field_diameter" (original pixels), "field_fraction" (diameter / shorter
         side): float32, "quality": tf.string reasons joined by ";" ("" = gradable),
         "gradable": bool}.
    """
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.cast(tf.minimum(h, w), tf.float32)
    if config.crop == "none":
        centre = tf.cast(tf.stack([w - 1, h - 1]), tf.float64) / 2
        circle = tf.concat([centre, [tf.cast(short, tf.float64) / 2]], 0)
        found = tf.constant(True)
    mean = field_luma_mean(image, circle)
    diameter = 2 * tf.cast(circle[2], tf.float32)
    fraction = diameter / short
    flags = {"no_fundus_field": ~found, "too_dark": mean < config.dark_threshold,
             "small_field": (fraction < config.small_field_fraction)
             | (diameter * tf.cast(scale, tf.float32) < config.small_field_pixels)}
    stacked = tf.stack([flags[k] for k in QUALITY_REASONS])
    reasons = tf.strings.reduce_join(tf.boolean_mask(QUALITY_REASONS, stacked), separator=";")
    return {**flags, "mean_brightness": mean,
            "field_diameter": diameter * tf.cast(scale, tf.float32),
            "field_fraction": fraction, "quality": reasons,
            "gradable": ~tf.reduce_any(stacked)}


def _to_original(circle: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """float32 [3] circle in full-resolution pixels from one found in a 1/scale decode
    (reduced pixel i averages full pixels i * scale .. i * scale + scale - 1)."""
    s = tf.cast(scale, tf.float64)
    offset = (s - 1) / 2
    return tf.cast(tf.stack([circle[0] * s + offset, circle[1] * s + offset, circle[2] * s]),
                   tf.float32)


def process(image_bytes: tf.Tensor, config: PreprocessConfig) -> dict:
    """One encoded image -> prepare's pixels and everything recorded about them.

    Args:
        image_bytes: tf.string [] (JPEG / PNG / GIF / BMP).
    Returns:
        {"image": uint8 [S, S, 3] (S = config.image_size; from a 1x1 black image
         when not ok), "ok": bool, "error": tf.string ("" when ok), "gradable": bool,
         "quality": tf.string (reasons, "" when gradable), "circle": float32 [3]
         (cx, cy, r) of the field in original pixels (the crop's square when no
         field was found), "field_found": bool, "mean_brightness",
         "field_diameter", "field_fraction": float32, "original_size": int32 [2],
         "decode_scale": int32, "format": tf.string, "conversions": tf.string}.
        Ungradable images are still cropped (the bounding square of whatever is
        bright, or the whole frame) and resized, so a model can score them.
    """
    target = config.image_size if config.reduced_decode else None
    decoded = image_decode.decode(image_bytes, target)
    image, scale = decoded["image"], decoded["decode_scale"]
    small, small_scale = small_image(image)
    if config.crop == "fundus":
        circle, found = find_fundus_small(small, small_scale)
        found &= decoded["ok"]
        out_image = crop_fundus(image, circle)
    else:
        circle, found, out_image = tf.zeros([3], tf.float64), decoded["ok"], image
    checks = quality(small, circle * tf.cast(small_scale, tf.float64), found,
                     tf.cast(scale, tf.float32) / small_scale, config)
    out_image = resize(out_image, config.image_size)
    out_image = enhance(tf.ensure_shape(out_image, [config.image_size, config.image_size, 3]),
                        config)
    gradable = decoded["ok"] & checks["gradable"]
    return {"image": out_image, "ok": decoded["ok"], "error": decoded["error"],
            "gradable": gradable,
            "quality": tf.where(decoded["ok"], checks["quality"], "not_decoded"),
            "circle": _to_original(circle, scale), "field_found": found,
            "mean_brightness": checks["mean_brightness"],
            "field_diameter": checks["field_diameter"],
            "field_fraction": checks["field_fraction"],
            "original_size": decoded["original_size"], "decode_scale": scale,
            "format": decoded["format"], "conversions": decoded["conversions"]}


def stored_jpeg(image: tf.Tensor, config: PreprocessConfig) -> tf.Tensor:
    """What prepare writes into the TFRecord: tf.string JPEG of uint8 [S, S, 3]."""
    return tf.io.encode_jpeg(image, quality=config.jpeg_quality)


def model_pixels(image: tf.Tensor, config: PreprocessConfig) -> tf.Tensor:
    """The training pipeline's view of prepare's image: uint8 [S, S, 3] -> JPEG ->
    `pipeline.decode` -> `pipeline.preprocess_image`: float32 [M, M, 3] in [0, 255],
    M = config.model_image_size. Served pixels therefore equal training pixels,
    JPEG artefacts included."""
    if config.jpeg_quality:
        image = pipeline.decode({"image_bytes": stored_jpeg(image, config)})["image"]
    m = config.model_image_size
    return tf.ensure_shape(pipeline.preprocess_image(image, m), [m, m, 3])


# Outputs of `serving_batch` besides the pixels, and what an image that failed
# inside a decoder (after passing every check `image_decode` makes) gets.
SERVING_KEYS = ("ok", "error", "gradable", "quality", "circle")
_DECODER_FAILED = "could not decode the image data (corrupt or unsupported encoding)"


def _serving_one(index: tf.Tensor, image_bytes: tf.Tensor, config: PreprocessConfig):
    out = process(image_bytes, config)
    return index, model_pixels(out["image"], config), {k: out[k] for k in SERVING_KEYS}


def serving_batch(image_bytes: tf.Tensor, config: PreprocessConfig) -> tuple[tf.Tensor, dict]:
    """A batch of encoded images -> model pixels and per-image status, never failing the batch.

    Errors a decoder raises on bytes that passed every header check (a PNG with a
    corrupt zlib stream, ...) are caught by tf.data's ignore_errors: that image
    gets ok=False and a generic error, the others their predictions.

    Args:
        image_bytes: tf.string [B].
    Returns:
        (float32 [B, M, M, 3] in [0, 255] (black for images that are not ok),
         {"ok": bool [B], "error": tf.string [B], "gradable": bool [B],
          "quality": tf.string [B], "circle": float32 [B, 3]}).
    """
    m = config.model_image_size
    n = tf.shape(image_bytes)[0]
    default = (tf.constant(-1), tf.zeros([m, m, 3], tf.float32),
               {"ok": tf.constant(False), "error": tf.constant(_DECODER_FAILED),
                "gradable": tf.constant(False), "quality": tf.constant("not_decoded"),
                "circle": tf.zeros([3], tf.float32)})
    done = (tf.data.Dataset.from_tensor_slices((tf.range(n), image_bytes))
            .map(lambda i, b: _serving_one(i, b, config))
            .ignore_errors()
            .concatenate(tf.data.Dataset.from_tensors(default))
            .batch(2 ** 30).get_single_element())
    index, pixels, status = done
    # Row of each image in `done`; the default (last row) for images that failed.
    count = tf.shape(index)[0]
    rows = tf.tensor_scatter_nd_update(tf.fill([n], count - 1), index[:-1, None],
                                       tf.range(count - 1))
    return (tf.gather(pixels, rows), {k: tf.gather(v, rows) for k, v in status.items()})


# --------------------------------------------------------------------------- host side


def check_jpeg_entropy(data: bytes) -> None:
    """Raises ImageError when libjpeg-turbo warns while entropy-decoding the JPEG.

    Garbage in the scan data that keeps the marker structure intact (no 0xFF
    bytes) passes `image_decode.jpeg_structure` and TF's decoder only prints
    "Corrupt JPEG data: bad Huffman code" on stderr, returning garbage pixels.
    libjpeg-turbo's strict mode turns every such warning into an error. The
    1/8-scale decode still entropy-decodes every coefficient, at ~1/3 the cost
    of a full decode (8 ms for 8 MP). Host-side only: prepare and predict call
    it through `graph_bytes`; the exported graph has the structural check alone.
    (Imported at the top: a missing library must stop prepare at once, not reject
    every image as if it were corrupt.)
    """
    try:
        simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)
    except ValueError as e:
        message = str(e)
        if "Corrupt JPEG data" in message:
            raise ImageError(f"corrupt JPEG data ({message})") from e
        # Anything else (truncation, CMYK, ...) the graph names more precisely.


def graph_bytes(data: bytes) -> tuple[bytes, str]:
    """Bytes `image_decode.decode` can read: the input, or a lossless PNG transcode of
    formats TF has no decoder for (TIFF, WebP, ...), with a conversion note.

    16-bit samples and alpha survive the transcode (IMREAD_UNCHANGED), so the graph
    converts them exactly as it converts a PNG. Raises ImageError for data OpenCV
    cannot read either, or above the pixel cap (checked on the header first).
    """
    head = image_decode.format_of(data)
    if head == "JPEG":
        check_jpeg_entropy(data)
    if head in image_decode.GRAPH_FORMATS or not data:
        return data, ""
    from PIL import Image  # header only: Image.open does not decode pixels
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            name = im.format or head
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for junk
        raise ImageError("not an image (unrecognised format)") from e
    if width * height > image_decode.MAX_MEGAPIXELS * 1e6:
        raise ImageError(f"image too large to decode safely "
                         f"(> {image_decode.MAX_MEGAPIXELS:g} MP)")
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise ImageError(f"could not decode {name} data")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"unsupported pixel type {pixels.dtype} in {name}")
    return cv2.imencode(".png", pixels)[1].tobytes(), f"{name.lower()}->png"


@functools.lru_cache(maxsize=8)
def process_fn(config: PreprocessConfig):
    """`process` plus the stored JPEG ("jpeg") as a tf.function of tf.string [] (traced once
    per config: tracing the whole graph costs seconds)."""
    def fn(image_bytes):
        out = process(image_bytes, config)
        return {**out, "jpeg": stored_jpeg(out["image"], config)}
    return tf.function(fn, input_signature=[tf.TensorSpec([], tf.string)])


def process_bytes(data: bytes, config: PreprocessConfig) -> tuple[np.ndarray, bytes, dict]:
    """prepare's per-image work on encoded bytes: `process` plus the stored JPEG.

    Returns:
        (uint8 [S, S, 3], JPEG bytes as stored, info) with info keys "gradable",
        "quality", "quality_too_dark", "quality_small_field", "mean_brightness",
        "field_diameter", "field_fraction", "circle" ([cx, cy, r] in original
        pixels, None with crop="none"), "original_size" [H, W], "decode_scale",
        "format", "converted" (";"-joined conversions, or "").
    Raises:
        ImageError: the image cannot be used (its `error`), or crop="fundus" found
        no field of view ("no fundus field found").
    """
    data, transcoded = graph_bytes(data)
    try:
        out = {k: v.numpy() for k, v in process_fn(config)(tf.constant(data)).items()}
    except tf.errors.InvalidArgumentError as e:
        # A decoder failed on bytes that passed every header check (as in serving_batch).
        raise ImageError(_DECODER_FAILED) from e
    text = {k: out[k].decode() for k in ("error", "quality", "format", "conversions")}
    if not out["ok"]:
        raise ImageError(text["error"])
    if config.crop == "fundus" and not out["field_found"]:
        raise ImageError("no fundus field found")
    reasons = text["quality"].split(";") if text["quality"] else []
    info = {"gradable": bool(out["gradable"]), "quality": text["quality"],
            "quality_too_dark": "too_dark" in reasons,
            "quality_small_field": "small_field" in reasons,
            "mean_brightness": round(float(out["mean_brightness"]), 2),
            "field_diameter": round(float(out["field_diameter"]), 1),
            "field_fraction": round(float(out["field_fraction"]), 3),
            "circle": ([round(float(v), 1) for v in out["circle"]]
                       if config.crop == "fundus" else None),
            "original_size": [int(v) for v in out["original_size"]],
            "decode_scale": int(out["decode_scale"]), "format": text["format"],
            "converted": ";".join(filter(None, [transcoded, text["conversions"]]))}
    return out["image"], bytes(out["jpeg"]), info


def read_file(path) -> bytes:
    """The bytes of an image file; ImageError for a missing, unreadable or empty file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ImageError("file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"unreadable file: {e.strerror or e}") from e
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def process_image(path, config: PreprocessConfig) -> tuple[np.ndarray, dict]:
    """`process_bytes` of a file: (uint8 [S, S, 3], info); info["jpeg"] holds the stored bytes."""
    image, jpeg, info = process_bytes(read_file(path), config)
    return image, {**info, "jpeg": jpeg}
