"""Augmentation inside the compiled training step: `augment.augment`'s geometric and
colour ops in keras.ops, so they run on the accelerator under JAX or TensorFlow.

The host draws the parameters (`augment.device_params`, same seeds and random numbers
as `augment.augment`) and ships them with the un-augmented uint8 image; this module
applies them to the whole batch on the device. Why: on a GPU host the CPU cores cannot
augment as fast as the accelerator trains (ConvNeXt-Tiny at 224 px on one H200 wants
~3,500 images/s), while one bilinear warp, one 3x3 colour product and a mask cost the
GPU a fraction of a millisecond per batch.

The ops equal `augment.augment` up to float rounding (tests/test_device_augment.py):
one bilinear resample with zero fill (`ImageProjectiveTransformV3`'s rule: each of the
four taps outside the image reads 0), clip to [0, 255], the fused colour jitter with
contrast around the mean grey of every 4th row and column, clip, then the fundus mask
(the output's inscribed circle and the image of the input's).
"""

import keras
from keras import ops

from input_pipeline.augment import GRAY


def warp(images, transforms):
    """Bilinear resample with zero fill.

    Args:
        images: float32 [B, H, W, C].
        transforms: float32 [B, 8], output pixel (x, y) -> input pixel
            (a0 x + a1 y + a2, b0 x + b1 y + b2) (affine: the last two are unused).
    Returns:
        (float32 [B, H, W, C], input x and y float32 [B, H, W] of every output pixel).
    """
    batch, height, width, channels = ops.shape(images)
    rows, cols = ops.meshgrid(ops.arange(height, dtype="float32"),
                              ops.arange(width, dtype="float32"), indexing="ij")
    t = transforms[:, :, None, None]
    x_in = t[:, 0] * cols + t[:, 1] * rows + t[:, 2]
    y_in = t[:, 3] * cols + t[:, 4] * rows + t[:, 5]
    x0, y0 = ops.floor(x_in), ops.floor(y_in)
    wx, wy = x_in - x0, y_in - y0
    flat = ops.reshape(images, (-1, channels))
    base = ops.reshape(ops.arange(batch, dtype="int32") * (height * width), (-1, 1, 1))

    def tap(y, x):
        valid = (y >= 0) & (y <= height - 1) & (x >= 0) & (x <= width - 1)
        index = (ops.cast(ops.clip(y, 0, height - 1), "int32") * width
                 + ops.cast(ops.clip(x, 0, width - 1), "int32") + base)
        return ops.where(valid[..., None], ops.take(flat, index, axis=0), 0.0)

    top = (1.0 - wx)[..., None] * tap(y0, x0) + wx[..., None] * tap(y0, x0 + 1.0)
    bottom = (1.0 - wx)[..., None] * tap(y0 + 1.0, x0) + wx[..., None] * tap(y0 + 1.0, x0 + 1.0)
    out = (1.0 - wy)[..., None] * top + wy[..., None] * bottom
    return ops.clip(out, 0.0, 255.0), x_in, y_in


def colour(images, matrices, contrast):
    """`augment.colour_jitter` per example.

    Args:
        images: float32 [B, H, W, 3] in [0, 255].
        matrices: float32 [B, 3, 3] acting on RGB column vectors.
        contrast: float32 [B].
    Returns:
        float32 [B, H, W, 3] in [0, 255].
    """
    gray = ops.convert_to_tensor(GRAY, "float32")
    mean_rgb = ops.mean(images[:, ::4, ::4], axis=(1, 2))  # as augment._mean_rgb
    mean_gray = ops.sum(ops.einsum("bij,bj->bi", matrices, mean_rgb) * gray, axis=-1)
    c = contrast[:, None, None, None]
    out = c * ops.einsum("bhwj,bij->bhwi", images, matrices) + (1.0 - c) * mean_gray[
        :, None, None, None]
    return ops.clip(out, 0.0, 255.0)


def field_mask(x_in, y_in, height: int, width: int, radius: float):
    """float32 [B, H, W, 1]: 1 inside the output's inscribed circle of `radius` * min/2
    where the input pixel (x_in, y_in) also lies inside the input's (augment.fundus_mask)."""
    r2 = (radius * min(height, width) / 2.0) ** 2
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    rows, cols = ops.meshgrid(ops.arange(height, dtype="float32"),
                              ops.arange(width, dtype="float32"), indexing="ij")
    out_circle = (cols - cx) ** 2 + (rows - cy) ** 2 <= r2
    in_circle = (x_in - cx) ** 2 + (y_in - cy) ** 2 <= r2
    return ops.cast(out_circle[None] & in_circle, "float32")[..., None]


def apply(images, params, fundus_aware: bool = True, field_radius: float = 0.98):
    """Applies `augment.device_params` to a batch.

    Args:
        images: uint8 or float32 [B, H, W, 3], values in [0, 255] (static H, W).
        params: float32 [B, augment.DEVICE_PARAMS].
        fundus_aware, field_radius: as in `AugmentConfig`.
    Returns:
        float32 [B, H, W, 3] in [0, 255].
    """
    images = ops.cast(images, "float32")
    params = ops.cast(params, "float32")
    height, width = images.shape[1], images.shape[2]
    out, x_in, y_in = warp(images, params[:, :8])
    out = colour(out, ops.reshape(params[:, 8:17], (-1, 3, 3)), params[:, 17])
    if fundus_aware:
        out = out * field_mask(x_in, y_in, height, width, field_radius)
    return out


class DeviceAugment(keras.layers.Layer):
    """(images uint8/float32 [B, S, S, 3], params float32 [B, DEVICE_PARAMS]) -> float32
    [B, S, S, 3] in [0, 255]: `apply` when training, the cast images otherwise.

    Computes in float32 whatever the mixed-precision policy: pixel values up to 255
    with sub-level interpolation weights need more than bfloat16's 8 bits.
    """

    def __init__(self, fundus_aware: bool = True, field_radius: float = 0.98, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.fundus_aware = fundus_aware
        self.field_radius = field_radius

    def call(self, images, params, training=None):
        if not training:
            return ops.cast(images, "float32")
        return apply(images, params, self.fundus_aware, self.field_radius)

    def get_config(self):
        return {**super().get_config(), "fundus_aware": self.fundus_aware,
                "field_radius": self.field_radius}
