"""Training-time augmentation as tf.data graph ops: stateless, seedable, per example.

Every op is a plain function `op(image, seed, ...) -> image` on a float32
`[H, W, 3]` tensor with values in [0, 255]; it returns the same shape, dtype and
range. Randomness comes only from `tf.random.stateless_*` with the explicit
`seed` (int32/int64 `[2]`), so a fixed seed gives the same output eagerly, in
`Dataset.map`, and under `tf.config.experimental.enable_op_determinism()`.
These are not Keras layers on purpose: the pipeline, evaluation and the CPU path
run them in tf.data. On an accelerator the CPU cannot keep up, so `device_params`
draws the same random numbers as parameters and `device_augment.py` applies the
geometric and colour ops inside the compiled training step instead (the same pixels
up to float rounding, tests/test_device_augment.py).

`augment(image, config, seed)` runs the enabled ops in a fixed order:

1. ONE bilinear resample with the composed affine matrix (rotation, zoom,
   shear, translation, and the geometric ops RandAugment drew), black fill;
2. flips: inside that matrix; as reversals only when there is no resample;
3. colour jitter (brightness, saturation, hue, contrast: one fused 3x3 matrix
   product) and sharpness (one 3x3 convolution);
4. RandAugment's colour ops; 5. Gaussian blur; 6. random erasing;
7. fundus mask: zero outside the inscribed circle (radius `field_radius * S / 2`)
   and outside the transformed input circle, so rotated square edges, black
   corners and lifted background never come into view.

Which ops exist in the graph is decided in Python from `AugmentConfig`, so a
disabled op costs nothing. Each op draws from its own seed slot (split from the
example's seed by a fixed table), so switching one op on or off does not change
what the others draw.
"""

import dataclasses
import functools
import math

import gin
import numpy as np
import tensorflow as tf

# Fixed seed slots: adding an op appends to this tuple, never reorders it.
_SLOTS = ("affine", "hflip", "vflip", "brightness", "contrast", "saturation", "hue",
          "sharpness", "blur", "erase", "randaugment")
GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's "L" conversion.


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What `augment` does; every field can be bound from gin (`AugmentConfig.hue = 0.0`).

    Ranges are symmetric around "no change" unless stated; 0 (or False) turns an op off.
    """

    rotation_degrees: float = 180.0  # angle ~ U(-r, r); fundus photos have no "up".
    scale_range: tuple[float, float] = (0.9, 1.1)  # isotropic zoom; >1 zooms in.
    shear_degrees: float = 0.0  # x-shear angle ~ U(-s, s).
    translate: float = 0.05  # shift per axis ~ U(-t, t) * S.
    hflip: bool = True
    vflip: bool = True
    brightness: float = 0.2  # multiplicative factor ~ U(1-b, 1+b): black stays black.
    contrast: float = 0.2  # blend with the mean grey, factor ~ U(1-c, 1+c).
    saturation: float = 0.2  # blend with the grey image, factor ~ U(1-s, 1+s).
    hue: float = 0.02  # rotation of the chroma plane by U(-h, h) turns.
    sharpness: float = 0.0  # PIL-style sharpness blend, factor ~ U(1-s, 1+s).
    blur_prob: float = 0.0  # probability of a Gaussian blur ...
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # ... with sigma ~ U(lo, hi) pixels.
    erase_prob: float = 0.0  # random erasing (cutout) probability ...
    erase_area: tuple[float, float] = (0.02, 0.1)  # ... of this fraction of the image.
    randaugment_layers: int = 0  # RandAugment N (0: off).
    randaugment_magnitude: float = 9.0  # RandAugment M on the usual 0..10 scale.
    # Op names from RANDAUGMENT_OPS; solarize is left out by default: an inverted
    # fundus is no photo the model will ever see.
    randaugment_ops: tuple[str, ...] = ("identity", "autocontrast", "brightness", "contrast",
                                        "color", "hue", "sharpness", "posterize", "rotate",
                                        "shear", "translate_x", "translate_y")
    fundus_aware: bool = True  # keep the circular field: mask + restricted zoom/shift.
    field_radius: float = 0.98  # mask radius as a fraction of S/2.

    def geometric(self) -> bool:
        """True when the affine resample is needed for the configured ops."""
        return bool(self.rotation_degrees or self.shear_degrees or self.translate
                    or tuple(self.scale_range) != (1.0, 1.0) or self.randaugment_layers)


# Field overrides per modality (input_pipeline/modality.py): fundus keeps the class defaults.
# B-scans have an up (vitreous on top, choroid below) and a left-right symmetry, so no
# vertical flip and only a small tilt; their rectangle is all image, so no circular mask
# (it would zero ~28 % of every training image that evaluation and serving see whole).
MODALITY_DEFAULTS = {
    "fundus": {},
    "oct": dict(fundus_aware=False, vflip=False, rotation_degrees=10.0, hue=0.0,
                saturation=0.0),
    "other": dict(fundus_aware=False, vflip=False, rotation_degrees=10.0),
}


def config_for_modality(modality: str) -> AugmentConfig:
    """AugmentConfig with the modality's defaults; gin bindings of AugmentConfig win.

    An explicit keyword would override a gin binding silently (PITFALLS 7), so only the
    fields gin does not bind are passed.
    """
    if modality not in MODALITY_DEFAULTS:
        raise ValueError(f"Unknown modality {modality!r}; known: {sorted(MODALITY_DEFAULTS)}")
    bound = gin.get_bindings(AugmentConfig)
    return AugmentConfig(**{k: v for k, v in MODALITY_DEFAULTS[modality].items()
                            if k not in bound})


def full_config(**overrides) -> AugmentConfig:
    """Every op switched on at moderate strength (benchmarks, the inspect CLI demo)."""
    base = dict(shear_degrees=5.0, sharpness=0.3, blur_prob=0.2, erase_prob=0.25,
                randaugment_layers=2, randaugment_magnitude=5.0)
    return AugmentConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- helpers


def _uniform(seed, lo, hi, shape=()) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi, dtype=tf.float32)


def _bernoulli(seed, p) -> tf.Tensor:
    return _uniform(seed, 0.0, 1.0) < p


def _clip(image: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(image, 0.0, 255.0)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
    return _clip(degenerate + factor * (image - degenerate))


def _gray(image: tf.Tensor) -> tf.Tensor:
    """[H, W, 3] -> [H, W, 1] luma."""
    return tf.tensordot(image, tf.constant(GRAY), axes=[[2], [0]])[..., None]


def _size(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    shape = tf.shape(image)
    return tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)


# ---------------------------------------------------------------------- geometric ops
# Matrices are 3x3 float32 mapping INPUT pixel coords (x, y, 1) to OUTPUT coords,
# built about the image centre; `apply_affine` inverts the composition once.


def _about_center(linear: tf.Tensor, shift: tf.Tensor, height, width) -> tf.Tensor:
    """[[A, c + shift - A c], [0, 0, 1]] for a 2x2 `linear` and a [2] `shift`."""
    c = tf.stack([(width - 1.0) / 2.0, (height - 1.0) / 2.0])
    t = c + shift - tf.linalg.matvec(linear, c)
    top = tf.concat([linear, t[:, None]], axis=1)
    return tf.concat([top, tf.constant([[0.0, 0.0, 1.0]])], axis=0)


def affine_matrix(height, width, angle=0.0, scale=1.0, shear=0.0, shift=(0.0, 0.0)):
    """Forward matrix: rotate by `angle` (radians), zoom by `scale`, x-shear by
    `shear` (radians), then translate by `shift` (pixels), all about the centre."""
    angle, scale, shear = (tf.cast(v, tf.float32) for v in (angle, scale, shear))
    cos, sin = tf.cos(angle), tf.sin(angle)
    rot = tf.reshape(tf.stack([cos, -sin, sin, cos]), [2, 2])
    shr = tf.reshape(tf.stack([1.0, tf.tan(shear), 0.0, 1.0]), [2, 2])
    linear = scale * tf.matmul(rot, shr)
    return _about_center(linear, tf.cast(tf.stack(shift), tf.float32), height, width)


def apply_affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """One bilinear resample of `image` through the forward 3x3 `matrix`, black fill."""
    inverse = tf.linalg.inv(matrix)  # the op maps output pixels to input pixels
    transform = tf.reshape(inverse, [9])[:8] / inverse[2, 2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
            fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    return _clip(out)  # bilinear weights are convex; the clip only pins the static range


def random_affine_matrix(image: tf.Tensor, config: AugmentConfig, seed) -> tf.Tensor:
    """Draws rotation, zoom, shear, shift and (when enabled) flips from `config`:
    the forward 3x3 matrix. Flips are reflections, so they ride along for free.

    With `config.fundus_aware`, zoom is capped at 1 and the shift is shortened so
    the (zoomed) field circle stays inside the frame: |shift| <= (1 - scale) * S / 2.
    """
    height, width = _size(image)
    u = _uniform(seed, -1.0, 1.0, [7])
    lo, hi = config.scale_range
    if config.fundus_aware:
        lo, hi = min(lo, 1.0), min(hi, 1.0)
    scale = lo + (hi - lo) * (u[0] + 1.0) / 2.0
    shift = u[1:3] * config.translate * tf.stack([width, height])
    if config.fundus_aware:
        room = (1.0 - scale) * tf.minimum(height, width) / 2.0
        shift = shift * tf.minimum(1.0, room / tf.maximum(tf.norm(shift), 1e-6))
    angle = u[3] * math.radians(config.rotation_degrees)
    shear = u[4] * math.radians(config.shear_degrees)
    matrix = affine_matrix(height, width, angle, scale, shear, tf.unstack(shift))
    flip_x = tf.where(u[5] < 0.0, -1.0, 1.0) if config.hflip else 1.0
    flip_y = tf.where(u[6] < 0.0, -1.0, 1.0) if config.vflip else 1.0
    mirror = _about_center(tf.linalg.diag(tf.stack([flip_x, flip_y])), tf.zeros([2]),
                           height, width)
    return matrix @ mirror


def random_affine(image: tf.Tensor, config: AugmentConfig, seed) -> tf.Tensor:
    """Rotation + zoom + shear + shift from `config` in one resample."""
    return apply_affine(image, random_affine_matrix(image, config, seed))


def random_flip(image: tf.Tensor, seed, horizontal: bool = True) -> tf.Tensor:
    """Mirrors left-right (or up-down) with probability 1/2."""
    axis = 1 if horizontal else 0
    # tf.cond, not tf.where: a select over the whole image costs 4x the reversal.
    return tf.cond(_bernoulli(seed, 0.5), lambda: tf.reverse(image, [axis]), lambda: image)


@functools.cache
def _circle_mask(height: int, width: int, radius: float) -> np.ndarray:
    y, x = np.mgrid[:height, :width].astype(np.float32)
    r = radius * min(height, width) / 2.0
    inside = (x - (width - 1) / 2.0) ** 2 + (y - (height - 1) / 2.0) ** 2 <= r * r
    return inside.astype(np.float32)[..., None]


def fundus_mask(image: tf.Tensor, radius: float = 0.98, matrix: tf.Tensor | None = None
                ) -> tf.Tensor:
    """Zeroes every pixel outside the fundus field.

    The field is the output's inscribed circle (radius `radius * min(H, W) / 2`)
    intersected, when the forward `matrix` of a geometric transform is given, with
    the image of the input's inscribed circle under it. So a zoomed-out, rotated
    square photo shows no rotated edges, and colour ops that lifted the black
    background (contrast, solarize) do not leave a grey ring. Needs a static
    height and width (true after `preprocess`).
    """
    height, width = image.shape[0], image.shape[1]
    if height is None or width is None:
        raise ValueError("fundus_mask needs a static image size")
    if matrix is None:
        return image * tf.constant(_circle_mask(height, width, radius))
    inside = tf.logical_and(tf.constant(_circle_mask(height, width, radius) > 0),
                            _inside_transformed_circle(height, width, radius, matrix))
    return image * tf.cast(inside, tf.float32)


def _inside_transformed_circle(height: int, width: int, radius: float, matrix) -> tf.Tensor:
    """bool [H, W, 1]: where the inverse of `matrix` lands inside the inscribed circle.

    With d = p - matrix(centre) and B the inverse's 2x2 part, that is the ellipse
    d^T (B^T B) d <= r^2, evaluated from per-row and per-column vectors (broadcast)
    so only a handful of full-size ops remain.
    """
    inverse = tf.linalg.inv(matrix)
    b = inverse[:2, :2]
    q = tf.matmul(b, b, transpose_a=True)
    c = tf.constant([(width - 1) / 2.0, (height - 1) / 2.0, 1.0])
    centre = tf.linalg.matvec(matrix, c)  # where the input centre lands
    dx = tf.range(width, dtype=tf.float32)[None, :] - centre[0]
    dy = tf.range(height, dtype=tf.float32)[:, None] - centre[1]
    form = q[0, 0] * dx * dx + (q[1, 1] * dy * dy + 2.0 * q[0, 1] * dy * dx)
    r = radius * min(height, width) / 2.0
    return (form <= r * r)[..., None]


# ------------------------------------------------------------------------- colour ops


def adjust_brightness(image: tf.Tensor, factor) -> tf.Tensor:
    """Multiplies by `factor` (PIL Brightness): the black background stays black."""
    return _clip(image * factor)


def _mean_rgb(image: tf.Tensor) -> tf.Tensor:
    """Mean colour float32 [3], from every 4th row and column (16x cheaper, same value
    to well under a grey level on photographs)."""
    return tf.reduce_mean(image[::4, ::4], axis=[0, 1])


def adjust_contrast(image: tf.Tensor, factor) -> tf.Tensor:
    """Blends with the image's mean grey level (PIL Contrast)."""
    mean_gray = tf.tensordot(_mean_rgb(image), tf.constant(GRAY), 1)
    return _blend(mean_gray, image, factor)


def adjust_saturation(image: tf.Tensor, factor) -> tf.Tensor:
    """Blends with the grey image (PIL Color)."""
    return _blend(_gray(image), image, factor)


def adjust_hue(image: tf.Tensor, turns) -> tf.Tensor:
    """Rotates the chroma (I, Q) plane of YIQ by `turns` * 360 degrees.

    One 3x3 matrix product instead of an RGB -> HSV -> RGB round trip: far cheaper,
    and luma is kept exactly.
    """
    return _clip(_apply_colour_matrix(image, _hue_matrix(turns)))


def _hue_matrix(turns) -> tf.Tensor:
    """3x3 acting on RGB column vectors: YIQ chroma rotation by `turns`."""
    to_yiq = tf.constant([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                          [0.211, -0.523, 0.312]])
    theta = 2.0 * math.pi * tf.cast(turns, tf.float32)
    cos, sin = tf.cos(theta), tf.sin(theta)
    rot = tf.reshape(tf.stack([1.0, 0.0, 0.0, 0.0, cos, -sin, 0.0, sin, cos]), [3, 3])
    return tf.linalg.inv(to_yiq) @ rot @ to_yiq


def _saturation_matrix(factor) -> tf.Tensor:
    """3x3 of `adjust_saturation`: factor * I + (1 - factor) * (rows of luma weights)."""
    gray = tf.tile(tf.constant([GRAY]), [3, 1])
    return factor * tf.eye(3) + (1.0 - factor) * gray


def _apply_colour_matrix(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """[H, W, 3] pixels times the transpose of a 3x3 acting on column vectors."""
    return tf.tensordot(image, tf.transpose(matrix), axes=[[2], [0]])


def colour_jitter(image: tf.Tensor, brightness=1.0, saturation=1.0, hue=0.0,
                  contrast=1.0) -> tf.Tensor:
    """brightness -> saturation -> hue -> contrast as ONE 3x3 matrix plus offset.

    All four are affine in the pixel values (contrast's mean follows linearly), so
    composing them costs one matrix product and one clip instead of four passes.
    Equal to `adjust_contrast(adjust_hue(adjust_saturation(adjust_brightness(x))))`
    whenever the intermediate results stay inside [0, 255] (the chained version
    clips after every step).
    """
    matrix = jitter_matrix(brightness, saturation, hue)
    mean_gray = tf.tensordot(tf.linalg.matvec(matrix, _mean_rgb(image)), tf.constant(GRAY), 1)
    out = _apply_colour_matrix(image, contrast * matrix) + (1.0 - contrast) * mean_gray
    return _clip(out)


def jitter_matrix(brightness=1.0, saturation=1.0, hue=0.0) -> tf.Tensor:
    """float32 [3, 3] acting on RGB column vectors: brightness, saturation, hue in one."""
    return _hue_matrix(hue) @ _saturation_matrix(saturation) * brightness


def _filter(image: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Per-channel 2-D filter with a [kh, kw] kernel, zero padding: the image border
    is the black background of a fundus photo, and padding copies cost ~50 %."""
    depthwise = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    return tf.nn.depthwise_conv2d(image[None], depthwise, [1, 1, 1, 1], "SAME")[0]


def adjust_sharpness(image: tf.Tensor, factor) -> tf.Tensor:
    """Blends with PIL's SMOOTH-filtered image: factor > 1 sharpens, < 1 softens.

    The blend is linear, so it is folded into one 3x3 kernel:
    factor * identity + (1 - factor) * SMOOTH.
    """
    smooth = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    identity = tf.constant([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    factor = tf.cast(factor, tf.float32)
    return _clip(_filter(image, factor * identity + (1.0 - factor) * smooth))


def gaussian_blur(image: tf.Tensor, sigma, max_sigma: float = 2.0) -> tf.Tensor:
    """Separable Gaussian blur; the kernel width is fixed by `max_sigma` (static)."""
    radius = max(1, math.ceil(3.0 * max_sigma))
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    g = tf.exp(-0.5 * tf.square(x / tf.maximum(tf.cast(sigma, tf.float32), 1e-3)))
    g = g / tf.reduce_sum(g)
    return _clip(_filter(_filter(image, g[:, None]), g[None, :]))


def random_erase(image: tf.Tensor, seed, area=(0.02, 0.1), aspect=(0.3, 3.3)) -> tf.Tensor:
    """Zeroes one rectangle of `area` fraction and log-uniform `aspect` (always applied)."""
    height, width = _size(image)
    u = _uniform(seed, 0.0, 1.0, [4])
    size = (area[0] + (area[1] - area[0]) * u[0]) * height * width
    ratio = tf.exp(math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * u[1])
    h = tf.minimum(tf.sqrt(size * ratio), height)
    w = tf.minimum(tf.sqrt(size / ratio), width)
    y0, x0 = u[2] * (height - h), u[3] * (width - w)
    ys = tf.range(height)[:, None, None]
    xs = tf.range(width)[None, :, None]
    inside = (ys >= y0) & (ys < y0 + h) & (xs >= x0) & (xs < x0 + w)
    return tf.where(inside, 0.0, image)


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
    """Keeps the top `bits` bits of each 8-bit value."""
    step = tf.pow(2.0, 8.0 - tf.cast(bits, tf.float32))
    return tf.floor(image / step) * step


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
    """Inverts values at or above `threshold`."""
    return tf.where(image >= threshold, 255.0 - image, image)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Stretches each channel to [0, 255] (flat channels are left alone)."""
    lo = tf.reduce_min(image, axis=[0, 1])
    hi = tf.reduce_max(image, axis=[0, 1])
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
    return _clip(tf.where(hi > lo, (image - lo) * scale, image))


# ----------------------------------------------------------- random colour wrappers


def _factor(seed, strength) -> tf.Tensor:
    return _uniform(seed, 1.0 - strength, 1.0 + strength)


def random_brightness(image, seed, strength: float):
    return adjust_brightness(image, _factor(seed, strength))


def random_contrast(image, seed, strength: float):
    return adjust_contrast(image, _factor(seed, strength))


def random_saturation(image, seed, strength: float):
    return adjust_saturation(image, _factor(seed, strength))


def random_hue(image, seed, strength: float):
    return adjust_hue(image, _uniform(seed, -strength, strength))


def draw_colour_jitter(seeds: dict, config: AugmentConfig) -> dict:
    """The jitter factors drawn from `config` (disabled ones stay neutral):
    {brightness, saturation, hue, contrast}, float32 scalars or Python neutrals."""
    c = config
    return dict(
            brightness=_factor(seeds["brightness"], c.brightness) if c.brightness else 1.0,
            saturation=_factor(seeds["saturation"], c.saturation) if c.saturation else 1.0,
            hue=_uniform(seeds["hue"], -c.hue, c.hue) if c.hue else 0.0,
            contrast=_factor(seeds["contrast"], c.contrast) if c.contrast else 1.0)


def random_colour_jitter(image, seeds: dict, config: AugmentConfig):
    """`colour_jitter` with factors drawn from `config` (disabled ones stay neutral)."""
    return colour_jitter(image, **draw_colour_jitter(seeds, config))


def random_sharpness(image, seed, strength: float):
    return adjust_sharpness(image, _factor(seed, strength))


def random_blur(image, seed, prob: float, sigma=(0.3, 1.5)):
    """Gaussian blur with probability `prob`; tf.cond skips the convolution otherwise."""
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    return tf.cond(_bernoulli(s1, prob),
                   lambda: gaussian_blur(image, _uniform(s2, *sigma), max_sigma=sigma[1]),
                   lambda: image)


def random_erasing(image, seed, prob: float, area=(0.02, 0.1)):
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    return tf.cond(_bernoulli(s1, prob), lambda: random_erase(image, s2, area), lambda: image)


# ------------------------------------------------------------------------ RandAugment
# Geometric ops return a forward matrix step (height, width, v in [-1, 1]) so all
# of RandAugment's geometry shares the single resample in `augment`; colour ops
# map (image, m in [0, 1], sign in {-1, 1}) to an image.

_RA_GEOMETRIC = {
        "rotate": lambda h, w, v: affine_matrix(h, w, angle=v * math.radians(30.0)),
        "shear": lambda h, w, v: affine_matrix(h, w, shear=v * math.atan(0.3)),
        "translate_x": lambda h, w, v: affine_matrix(h, w, shift=(v * 0.3 * w, 0.0)),
        "translate_y": lambda h, w, v: affine_matrix(h, w, shift=(0.0, v * 0.3 * h)),
}
_RA_COLOUR = {
        "identity": lambda x, m, s: x,
        "autocontrast": lambda x, m, s: autocontrast(x),
        "brightness": lambda x, m, s: adjust_brightness(x, 1.0 + 0.9 * m * s),
        "contrast": lambda x, m, s: adjust_contrast(x, 1.0 + 0.9 * m * s),
        "color": lambda x, m, s: adjust_saturation(x, 1.0 + 0.9 * m * s),
        "hue": lambda x, m, s: adjust_hue(x, 0.1 * m * s),
        "sharpness": lambda x, m, s: adjust_sharpness(x, 1.0 + 0.9 * m * s),
        "posterize": lambda x, m, s: posterize(x, 8.0 - tf.round(4.0 * m)),
        "solarize": lambda x, m, s: solarize(x, 256.0 - 256.0 * m),
}
RANDAUGMENT_OPS = (*_RA_COLOUR, *_RA_GEOMETRIC)


def randaugment_draw(seed, layers: int, num_ops: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The RandAugment choices: op indices int32 [layers] and signs float32 [layers]."""
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    indices = tf.random.stateless_uniform([layers], s1, 0, num_ops, dtype=tf.int32)
    signs = tf.where(_uniform(s2, 0.0, 1.0, [layers]) < 0.5, 1.0, -1.0)
    return indices, signs


def _ra_geometric_step(name, height, width, v, matrix):
    if name not in _RA_GEOMETRIC:
        return matrix
    return _RA_GEOMETRIC[name](height, width, v) @ matrix


def _ra_colour_step(name, image, m, sign):
    return _RA_COLOUR.get(name, _RA_COLOUR["identity"])(image, m, sign)


def randaugment_matrix(image, matrix, indices, signs, magnitude: float, ops) -> tf.Tensor:
    """Composes the geometric ops among the drawn ones onto the forward `matrix`."""
    height, width = _size(image)
    m = float(magnitude) / 10.0
    for i in range(indices.shape[0]):
        branches = [functools.partial(_ra_geometric_step, n, height, width, m * signs[i],
                                      matrix) for n in ops]
        matrix = tf.switch_case(indices[i], branches)
    return matrix


def randaugment_colour(image, indices, signs, magnitude: float, ops) -> tf.Tensor:
    """Applies the colour ops among the drawn ones; `tf.switch_case` runs only the
    chosen branch."""
    m = float(magnitude) / 10.0
    for i in range(indices.shape[0]):
        branches = [functools.partial(_ra_colour_step, n, image, m, signs[i]) for n in ops]
        image = tf.switch_case(indices[i], branches)
    return image


def randaugment(image: tf.Tensor, seed, layers: int = 2, magnitude: float = 9.0,
                ops: tuple[str, ...] = RANDAUGMENT_OPS) -> tf.Tensor:
    """RandAugment (Cubuk et al. 2020): `layers` ops drawn uniformly from `ops`, at
    strength `magnitude` / 10. Geometry first (one resample), then colour."""
    indices, signs = randaugment_draw(seed, layers, len(ops))
    matrix = randaugment_matrix(image, tf.eye(3), indices, signs, magnitude, ops)
    image = apply_affine(image, matrix)
    return randaugment_colour(image, indices, signs, magnitude, ops)


# ---------------------------------------------------------------------------- augment


def augment(image: tf.Tensor, config: AugmentConfig, seed) -> tf.Tensor:
    """Applies the ops enabled in `config` (module docstring gives the order).

    Args:
        image: float32 [S, S, 3] in [0, 255], static S (the output of `preprocess`).
        config: what to do.
        seed: int32/int64 [2]; the example's seed.
    Returns:
        float32 [S, S, 3] in [0, 255].
    """
    seeds = _op_seeds(seed)
    c = config
    ra_ops = tuple(n for n in c.randaugment_ops  # fundus-aware: +-30 % shifts lose the field
                   if not (c.fundus_aware and n.startswith("translate")))
    if c.randaugment_layers:
        ra = randaugment_draw(seeds["randaugment"], c.randaugment_layers, len(ra_ops))
    # Geometry first: pointwise colour ops then change the black fill uniformly, so
    # no rotated square edge shows up after e.g. a contrast decrease.
    matrix = None
    if c.geometric():
        matrix = random_affine_matrix(image, c, seeds["affine"])
        if c.randaugment_layers:
            matrix = randaugment_matrix(image, matrix, *ra, c.randaugment_magnitude, ra_ops)
        image = apply_affine(image, matrix)
    elif c.hflip or c.vflip:  # otherwise the flips are part of the matrix
        if c.hflip:
            image = random_flip(image, seeds["hflip"], horizontal=True)
        if c.vflip:
            image = random_flip(image, seeds["vflip"], horizontal=False)
    if c.brightness or c.contrast or c.saturation or c.hue:
        image = random_colour_jitter(image, seeds, c)
    if c.sharpness:
        image = random_sharpness(image, seeds["sharpness"], c.sharpness)
    if c.randaugment_layers:
        image = randaugment_colour(image, *ra, c.randaugment_magnitude, ra_ops)
    if c.blur_prob:
        image = random_blur(image, seeds["blur"], c.blur_prob, c.blur_sigma)
    if c.erase_prob:
        image = random_erasing(image, seeds["erase"], c.erase_prob, c.erase_area)
    if c.fundus_aware:
        image = fundus_mask(image, c.field_radius, matrix)
    return image


def _op_seeds(seed) -> dict:
    """{op slot: its own int64 [2] seed}, split from the example's `seed`."""
    return dict(zip(_SLOTS, tf.unstack(
            tf.random.experimental.stateless_split(seed, len(_SLOTS))), strict=True))


# ------------------------------------------------------------- augmentation on the device
# With `augment_on="device"` the pipeline draws, per example and from the same seed slots
# as `augment`, the parameters of the ops below and ships them next to the un-augmented
# uint8 image; `input_pipeline/device_augment.py` applies them inside the compiled
# training step (keras.ops). So both paths draw identical random numbers.

DEVICE_PARAMS = 18  # [inverse affine 8 | colour matrix 9 (row-major) | contrast 1]
_HOST_ONLY = ("shear_degrees", "sharpness", "blur_prob", "erase_prob", "randaugment_layers")


def device_unsupported(config: AugmentConfig) -> list[str]:
    """Names of the enabled `config` fields the device path does not run (shear, which
    it could, is left to the host path only to keep the parameter vector small)."""
    return [name for name in _HOST_ONLY if getattr(config, name)]


def device_params(image: tf.Tensor, config: AugmentConfig, seed) -> tf.Tensor:
    """The parameters `augment(image, config, seed)` would draw, as float32 [DEVICE_PARAMS].

    [0:8]: the affine's inverse as a projective transform (output pixel -> input pixel,
    `ImageProjectiveTransformV3` convention; the identity without geometry); flips ride in
    it, drawn from the same slots as `augment` (the matrix's, or "hflip"/"vflip").
    [8:17]: `jitter_matrix` (brightness, saturation, hue) row-major; [17]: contrast.
    Raises ValueError for configs with host-only ops (`device_unsupported`).
    """
    unsupported = device_unsupported(config)
    if unsupported:
        raise ValueError(f"augmentation on the device does not run {unsupported}: set them "
                         "to 0 or train with augment_on='host'")
    seeds, c = _op_seeds(seed), config
    height, width = _size(image)
    if c.geometric():
        matrix = random_affine_matrix(image, c, seeds["affine"])
    else:
        flips = [tf.where(_bernoulli(seeds[slot], 0.5), -1.0, 1.0) if on else 1.0
                 for slot, on in (("hflip", c.hflip), ("vflip", c.vflip))]
        matrix = _about_center(tf.linalg.diag(tf.stack(flips)), tf.zeros([2]), height, width)
    inverse = tf.linalg.inv(matrix)
    transform = tf.reshape(inverse, [9])[:8] / inverse[2, 2]
    jitter = draw_colour_jitter(seeds, c)
    colour = jitter_matrix(jitter["brightness"], jitter["saturation"], jitter["hue"])
    contrast = tf.reshape(tf.cast(jitter["contrast"], tf.float32), [1])
    return tf.concat([transform, tf.reshape(colour, [9]), contrast], axis=0)
