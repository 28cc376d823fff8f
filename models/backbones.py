"""Registered backbones: pixels in [0, 255] -> last conv feature map.

Each builder returns a ``keras.Model`` named ``"backbone"`` mapping float32
``[B, S, S, 3]`` pixels in [0, 255] to its last conv feature map ``[B, h, w, C]``
(``include_top=False``; this is the map Grad-CAM uses). Input normalisation is
inside the backbone, chosen per backbone in ``INPUT_SCALING`` below: the only
place in fundusflow that scales pixels.

``weights``: None (random init), ``"imagenet"`` (keras.applications backbones
only; downloads once into ~/.keras), or a path to a weights file of the
backbone, loaded with ``load_weights``.
"""

import gin
import keras
from keras import layers

from models.registry import register

# name -> (scale, offset) of a Rescaling layer applied to [0, 255] pixels, or None where the
# keras.applications model carries its own preprocessing layers (include_preprocessing / built in):
#   convnext_tiny:     Normalization with ImageNet mean/std (include_preprocessing=True)
#   efficientnet_b3:   Rescaling(1/255) + Normalization with ImageNet mean/std (always built in)
#   mobilenetv3_large: Rescaling(1/127.5, -1) -> [-1, 1] (include_preprocessing=True)
INPUT_SCALING: dict[str, tuple[float, float] | None] = {
    "resnetv2_lite": (1.0 / 255.0, 0.0),  # [0, 1], as the IDRiD system trained it
    "resnet50v2": (1.0 / 127.5, -1.0),  # [-1, 1], what keras' resnet_v2.preprocess_input does
    "convnext_tiny": None,
    "efficientnet_b3": None,
    "mobilenetv3_large": None,
}


def _pixels_in(name: str, image_size: int):
    """Input ``[B, S, S, 3]`` in [0, 255] and the tensor the network body should see."""
    pixels = keras.Input((image_size, image_size, 3), dtype="float32", name="pixels")
    scaling = INPUT_SCALING[name]
    if scaling is None:
        return pixels, pixels
    scale, offset = scaling
    return pixels, layers.Rescaling(scale, offset, name="input_scaling")(pixels)


def _load_weights_file(model: keras.Model, weights: str | None) -> keras.Model:
    if weights == "imagenet":
        raise ValueError(f"No ImageNet weights for {model.name!r}; pass None or a file path")
    if weights is not None:
        model.load_weights(weights)
    return model


# ----------------------------------------------------------------------------- resnetv2_lite


def _preact_block(x, filters: int, name: str):
    """Pre-activation residual block (He et al. 2016, "Identity mappings in deep ResNets").

    BN-ReLU-conv3x3(stride 2)-BN-ReLU-conv3x3 plus a 1x1 stride-2 projection of the
    pre-activated input: ``[B, H, W, C_in] -> [B, H/2, W/2, filters]``.
    """
    pre = layers.BatchNormalization(name=f"{name}_preact_bn")(x)
    pre = layers.ReLU(name=f"{name}_preact_relu")(pre)
    shortcut = layers.Conv2D(filters, 1, strides=2, name=f"{name}_proj")(pre)
    y = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"{name}_conv1")(
        pre
    )
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv2")(y)
    return layers.Add(name=f"{name}_add")([shortcut, y])


@register("resnetv2_lite")
@gin.configurable
def resnetv2_lite(
    image_size: int,
    weights: str | None = None,
    stem_filters: int = 16,
    widths: tuple[int, ...] = (16, 32, 64),
    stem_kernel: int = 7,
    stem_strides: int = 2,
    stem_pool: bool = True,
) -> keras.Model:
    """Small pre-activation ResNet of the IDRiD system: feature map ``[B, S/32, S/32, widths[-1]]``.

    7x7/2 conv, BN, ReLU, 3x3/2 max-pool, one stride-2 pre-activation block per entry of
    ``widths``, then BN + ReLU (a pre-activation net needs a final activation).
    Spatial size S / 2**(2 + len(widths)), rounded up, with the default stem.

    ``stem_kernel``, ``stem_strides`` and ``stem_pool`` set the stem; for tiny images
    (RetinaMNIST's 28 px) a 3x3/1 conv without the pool (CIFAR-style ResNets) keeps the
    detail the default stem would average away in its first two layers: the spatial size
    is then S / 2**len(widths).
    """
    pixels, x = _pixels_in("resnetv2_lite", image_size)
    x = layers.Conv2D(stem_filters, stem_kernel, strides=stem_strides, padding="same",
                      use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    if stem_pool:
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for i, width in enumerate(widths):
        x = _preact_block(x, width, name=f"block{i + 1}")
    x = layers.BatchNormalization(name="post_bn")(x)
    x = layers.ReLU(name="post_relu")(x)
    return _load_weights_file(keras.Model(pixels, x, name="backbone"), weights)


# ----------------------------------------------------------------------------- keras.applications


def _application(name: str, app_fn, image_size: int, weights: str | None, **kw) -> keras.Model:
    """A keras.applications trunk, flat (no extra nesting), fed by ``_pixels_in``."""
    pixels, x = _pixels_in(name, image_size)
    return app_fn(
        include_top=False,
        weights=weights,
        input_tensor=x,
        input_shape=(image_size, image_size, 3),
        name="backbone",
        **kw,
    )


@register("resnet50v2")
def resnet50v2(image_size: int, weights: str | None = None) -> keras.Model:
    """ResNet50V2 (He et al. 2016): ``[B, S/32, S/32, 2048]``."""
    return _application("resnet50v2", keras.applications.ResNet50V2, image_size, weights)


CONVNEXT_TINY = ((3, 3, 9, 3), (96, 192, 384, 768))
EFFICIENTNET_B3 = (1.2, 1.4)  # (width, depth) coefficients


def _scaled(name: str, weights, custom: bool):
    """Scaled-down variants (debug configs) have no ImageNet weights."""
    if custom and weights == "imagenet":
        raise ValueError(f"{name}: ImageNet weights exist only for the standard size; "
                         "unbind the size arguments or pass weights=None")


@register("convnext_tiny")
@gin.configurable
def convnext_tiny(image_size: int, weights: str | None = None,
                  depths: tuple[int, ...] = CONVNEXT_TINY[0],
                  projection_dims: tuple[int, ...] = CONVNEXT_TINY[1]) -> keras.Model:
    """ConvNeXt-Tiny (Liu et al. 2022): ``[B, S/32, S/32, projection_dims[-1]]`` (768).

    ``depths`` / ``projection_dims`` other than Tiny's build the same block design
    smaller (the `_debug` configs: a CI chain in seconds); random init only.
    """
    custom = (tuple(depths), tuple(projection_dims)) != CONVNEXT_TINY
    _scaled("convnext_tiny", weights, custom)
    if not custom:
        return _application("convnext_tiny", keras.applications.ConvNeXtTiny, image_size,
                            weights, include_preprocessing=True)
    from keras.src.applications import convnext  # the block builder behind ConvNeXtTiny

    return _application("convnext_tiny", convnext.ConvNeXt, image_size, weights,
                        depths=list(depths), projection_dims=list(projection_dims),
                        include_preprocessing=True)


@register("efficientnet_b3")
@gin.configurable
def efficientnet_b3(image_size: int, weights: str | None = None,
                    width_coefficient: float = EFFICIENTNET_B3[0],
                    depth_coefficient: float = EFFICIENTNET_B3[1]) -> keras.Model:
    """EfficientNet-B3 (Tan & Le 2019): ``[B, S/32, S/32, 1536]``; native size 300.

    Other width/depth coefficients scale the same design (`_debug` configs; random init).
    """
    custom = (width_coefficient, depth_coefficient) != EFFICIENTNET_B3
    _scaled("efficientnet_b3", weights, custom)
    if not custom:
        return _application("efficientnet_b3", keras.applications.EfficientNetB3, image_size,
                            weights)
    from keras.src.applications import efficientnet

    return _application("efficientnet_b3", efficientnet.EfficientNet, image_size, weights,
                        width_coefficient=width_coefficient,
                        depth_coefficient=depth_coefficient, default_size=300)


@register("mobilenetv3_large")
@gin.configurable
def mobilenetv3_large(image_size: int, weights: str | None = None,
                      alpha: float = 1.0) -> keras.Model:
    """MobileNetV3-Large (Howard et al. 2019): ``[B, S/32, S/32, 960]``.

    ``alpha`` < 1 thins every layer (`_debug` configs; ImageNet weights exist for 0.75 too).
    """
    _scaled("mobilenetv3_large", weights, alpha not in (1.0, 0.75))
    return _application(
        "mobilenetv3_large",
        keras.applications.MobileNetV3Large,
        image_size,
        weights,
        alpha=alpha,
        include_preprocessing=True,
        minimalistic=False,
    )
