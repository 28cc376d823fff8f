"""TensorFlow-graph pre-processing for the export signature (raw photograph -> model pixels).

At serving time images arrive as raw photographs, not as `prepare`'s output, so
the exported graph repeats what `prepare` (numpy/OpenCV, `preprocessing.py`)
and `pipeline.preprocess_image` did, with TF ops only:

    decode -> fundus crop (pad to square) -> area resize to the dataset's
    image_size -> round to uint8 -> [Ben Graham] -> pipeline.preprocess_image

Every step is a pure function of tensors, traceable inside `tf.function`,
`Dataset.map` and a SavedModel signature.

CLAHE has no TensorFlow op. A dataset prepared with CLAHE cannot be served by
this graph; `ServingConfig.from_dataset_info` refuses it with a clear message
(the client would have to apply CLAHE itself and call the tensor signature).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from input_pipeline import pipeline

# Field detection mirrors `preprocessing.find_fundus` (numpy/OpenCV), with TF ops:
# on a copy whose long side is at most DETECT_MAX_SIDE, the max over channels
# is median-filtered, thresholded just above the black border's noise, and a circle is
# fitted (Kasa least squares, robustly re-weighted) to the left/right-most
# and top/bottom-most foreground pixels of every row/column, leaving out
# pixels on the frame (where the frame, not the field, clips it).
DETECT_MAX_SIDE = 512
MIN_FIELD_FRACTION = 0.1  # smallest plausible field area / image area
_FIT_ITERATIONS = 4
_MIN_POINTS = 8
# Below this share of outline points on the fitted circle, the threshold
# probably caught a grey letterbox or frame around the field, not a circle.
_MIN_INLIERS = 0.25
# Rim refinement along radial profiles, in units of the coarse radius.
_RAYS = 360
_INNER, _SEARCH, _OUTER = (0.80, 0.92), (0.92, 1.08), (1.08, 1.20)


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """What the serving graph must reproduce (from dataset.json plus the model)."""

    dataset_image_size: int  # prepare's square output size (dataset.json "image_size")
    model_image_size: int  # the model's input size S
    crop: str = "fundus"  # "fundus" | "none"
    clahe: str | None = None  # None | "green" (prepare's "lab" is refused: see from_dataset_info)
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    ben_graham: bool = False
    ben_graham_sigma: float = 10.0  # at 512 px; scaled with dataset_image_size
    reduced_decode: bool = True  # JPEG DCT-domain downscale, as prepare does

    @classmethod
    def from_dataset_info(cls, dataset_info: dict, model_image_size: int) -> "ServingConfig":
        """Builds the config from dataset.json; ValueError for CLAHE on L of LAB.

        Green-channel CLAHE is reproduced exactly (`clahe`); LAB CLAHE would also
        need OpenCV's fixed-point RGB<->LAB conversion, which has no TF twin here.
        """
        pp = dataset_info.get("preprocessing", {}) or {}
        if pp.get("clahe") not in (None, "green"):
            raise ValueError(
                f"The dataset was prepared with CLAHE {pp['clahe']!r}; the export signature "
                "reproduces only green-channel CLAHE (prepare --clahe=green). Re-prepare the "
                "dataset with --clahe=green or none, or apply CLAHE on the client and use "
                "the tensor-input model (--format=onnx).")
        crop = pp.get("crop", "fundus") or "none"
        if crop not in ("fundus", "none"):
            raise ValueError(f"Unknown crop {crop!r} in dataset.json; expected 'fundus' or 'none'")
        return cls(dataset_image_size=int(dataset_info.get("image_size", model_image_size)),
                   model_image_size=int(model_image_size), crop=crop, clahe=pp.get("clahe"),
                   clahe_clip_limit=float(pp.get("clahe_clip_limit", cls.clahe_clip_limit)),
                   clahe_tile_grid=int(pp.get("clahe_tile_grid", cls.clahe_tile_grid)),
                   ben_graham=bool(pp.get("ben_graham", cls.ben_graham)),
                   ben_graham_sigma=float(pp.get("ben_graham_sigma", cls.ben_graham_sigma)),
                   reduced_decode=bool(pp.get("reduced_decode", cls.reduced_decode)))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- decoding


def _jpeg_ratio_index(image_bytes: tf.Tensor, target_size: int) -> tf.Tensor:
    """Index into (1, 2, 4, 8) of the largest DCT scale keeping the short side >= target."""
    shape = tf.image.extract_jpeg_shape(image_bytes)
    short = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
    fits = [tf.math.ceil(short / r) >= target_size for r in (2.0, 4.0, 8.0)]
    return tf.reduce_sum(tf.cast(tf.stack(fits), tf.int32))  # fits is monotone: 1,1,0 -> 2


def decode(image_bytes: tf.Tensor, target_size: int | None = None) -> tf.Tensor:
    """Decodes one JPEG / PNG / BMP / GIF (first frame) string to uint8 RGB [H, W, 3].

    With `target_size`, a JPEG is decoded at the largest scale 1/2, 1/4 or 1/8
    whose shorter side stays >= target_size (libjpeg skips most of the work),
    like `preprocessing.read_image`. Accurate integer IDCT, as OpenCV uses.
    """
    def other():
        # expand_animations=False gives a static rank 3; without it tracing fails.
        return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)

    def jpeg(ratio=1):
        # decode_image would use TF's INTEGER_FAST IDCT, up to ~10 levels off training.
        return tf.io.decode_jpeg(image_bytes, channels=3, ratio=ratio,
                                 dct_method="INTEGER_ACCURATE")

    def jpeg_reduced():
        branches = [lambda r=r: jpeg(r) for r in (1, 2, 4, 8)]
        return tf.switch_case(_jpeg_ratio_index(image_bytes, target_size), branches)

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg if target_size is None else jpeg_reduced,
                    other)
    return tf.ensure_shape(image, [None, None, 3])


# --------------------------------------------------------------------------- field detection


def _round_uint8(x: tf.Tensor) -> tf.Tensor:
    """float -> uint8 with rounding and saturation (OpenCV's saturate_cast)."""
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _detection_image(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Median-filtered max-channel float32 [h, w] (long side <= DETECT_MAX_SIDE), and scale."""
    shape = tf.shape(image)
    hw = tf.cast(shape[:2], tf.float32)
    scale = tf.minimum(1.0, DETECT_MAX_SIDE / tf.reduce_max(hw))
    small_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    small = tf.cond(scale < 1.0,
                    lambda: tf.cast(_round_uint8(tf.image.resize(image, small_hw, "area")),
                                    tf.float32),
                    lambda: tf.cast(image, tf.float32))
    # Max over channels: the field is bright in some channel even when under-exposed.
    return median_blur(tf.reduce_max(small, axis=-1), 5), scale


def _replicate_pad(x: tf.Tensor, pad: int) -> tf.Tensor:
    """Pads [H, W] by repeating the edge pixels (OpenCV's BORDER_REPLICATE)."""
    for axis in (0, 1):
        n = tf.shape(x)[axis]
        idx = tf.clip_by_value(tf.range(-pad, n + pad), 0, n - 1)
        x = tf.gather(x, idx, axis=axis)
    return x


def median_blur(gray: tf.Tensor, size: int) -> tf.Tensor:
    """Median over size x size windows of float32 [H, W] integer levels 0..255, edges
    replicated: `cv2.medianBlur` on uint8.

    Sorting 25 values per pixel is slow in TF; instead the median's 8 bits are
    found one at a time (a binary search per pixel): the median is the smallest
    level v with at least size^2 // 2 + 1 window values <= v.
    """
    h, w = tf.shape(gray)[0], tf.shape(gray)[1]
    padded = _replicate_pad(tf.cast(gray, tf.uint8), size // 2)
    window = tf.stack([padded[i:i + h, j:j + w] for i in range(size) for j in range(size)])
    rank = size * size // 2 + 1
    median = tf.zeros([h, w], tf.int32)
    for bit in range(7, -1, -1):
        trial = median + (1 << bit)
        # How many window values are < trial, i.e. <= trial - 1.
        below = tf.reduce_sum(tf.cast(window < tf.cast(trial, tf.uint8)[None], tf.int32), 0)
        median = tf.where(below < rank, trial, median)
    return tf.cast(median, tf.float32)


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

    As `preprocessing._border_threshold`: the border level is the histogram mode
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

    As `preprocessing._edge_points`: on each ray from the coarse centre, where
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
    """Circle fitted to the half-way rim points, or the coarse one when that fit is poor."""
    points, valid = _edge_points(gray, circle)
    fit, inliers = _robust_circle(points, valid)
    good = ((tf.reduce_sum(tf.cast(valid, tf.int32)) >= _RAYS // 8)
            & (inliers >= _MIN_INLIERS) & (tf.abs(fit[2] - circle[2]) <= 0.1 * circle[2]))
    return tf.where(good, fit, circle)


def _fit_mask(mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(float64 [3] circle, inlier fraction, plausible) fitted to the outline of bool mask."""
    points, valid = _boundary_points(mask)
    circle, inliers = _robust_circle(points, valid)
    # inliers is 0 when too few outline points remained (numpy's fit is None then).
    return circle, inliers, (inliers > 0) & _plausible(circle, mask)


def find_fundus(image: tf.Tensor) -> tf.Tensor:
    """Circle of the camera's field of view in a uint8 RGB [H, W, 3] photograph.

    As `preprocessing.find_fundus`: a fit to the mask above the border
    threshold; when few outline points lie on that circle (a grey letterbox or
    frame around the field), a second fit above an Otsu threshold among the
    brighter pixels, the one with more inliers kept; then the rim refinement.

    Returns:
        float64 [3]: (cx, cy, r) in pixels of `image` (x = column). Where
        `preprocessing.find_fundus` gives up (no plausible circle; prepare
        rejects such images), this falls back to the bounding square of the
        foreground, or of the whole frame, so serving always answers.
    """
    gray, scale = _detection_image(image)
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
    return circle / tf.cast(scale, tf.float64)


def crop_fundus(image: tf.Tensor, circle: tf.Tensor | None = None) -> tf.Tensor:
    """Crops the bounding square of the field, zero-padded outside the image.

    Args:
        image: uint8 RGB [H, W, 3].
        circle: float64 [3] (cx, cy, r); found with `find_fundus` when None.
    Returns:
        uint8 [D, D, 3], D = round(2 r), the circle centred (as `preprocessing.crop_fundus`).
    """
    if circle is None:
        circle = find_fundus(image)
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

    As `preprocessing.resize` (INTER_AREA / INTER_CUBIC), rounded into uint8.
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
    as `preprocessing.ben_graham`. Returns uint8 [S, S, 3].
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


def prepare_image(image: tf.Tensor, config: ServingConfig) -> tf.Tensor:
    """What `prepare` does to a decoded photograph: uint8 [H, W, 3] -> uint8 [D, D, 3].

    D = config.dataset_image_size. crop="none" resizes the whole frame, as prepare.
    """
    if config.crop == "fundus":
        image = crop_fundus(image)
    image = resize(image, config.dataset_image_size)
    image = tf.ensure_shape(image, [config.dataset_image_size, config.dataset_image_size, 3])
    if config.clahe == "green":
        green = clahe(image[..., 1], config.clahe_clip_limit, config.clahe_tile_grid)
        image = tf.stack([image[..., 0], green, image[..., 2]], axis=-1)
    if config.ben_graham:
        sigma = config.ben_graham_sigma * config.dataset_image_size / 512
        image = ben_graham(image, sigma, mask_field=config.crop == "fundus")
    return image


def preprocess_bytes(image_bytes: tf.Tensor, config: ServingConfig) -> tf.Tensor:
    """One encoded image (tf.string []) -> float32 [S, S, 3] in [0, 255], S = model size."""
    target = config.dataset_image_size if config.reduced_decode else None
    image = prepare_image(decode(image_bytes, target), config)
    image = pipeline.preprocess_image(image, config.model_image_size)
    s = config.model_image_size
    return tf.ensure_shape(tf.cast(image, tf.float32), [s, s, 3])


def preprocess_batch(image_bytes: tf.Tensor, config: ServingConfig) -> tf.Tensor:
    """A batch of encoded images (tf.string [B]) -> float32 [B, S, S, 3] in [0, 255]."""
    s = config.model_image_size
    return tf.map_fn(lambda b: preprocess_bytes(b, config), image_bytes,
                     fn_output_signature=tf.TensorSpec([s, s, 3], tf.float32))
