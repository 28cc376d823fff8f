"""Backbones by name, and the task model built on top of one.

    @register("my_net")
    def my_net(image_size, weights=None): -> keras.Model named "backbone",
        float32 [B, S, S, 3] pixels in [0, 255] -> last conv feature map [B, h, w, C]

    model = build_model("convnext_tiny", "dr_grade", num_classes=5, image_size=384)

The built-in backbones live in ``models/backbones.py`` and register on import.
"""

import importlib
from collections.abc import Callable

import gin
import keras

from models import heads, layers

_BACKBONES: dict[str, Callable[..., keras.Model]] = {}


def register(name: str):
    """Decorator: registers ``fn(image_size, weights=None, **kw) -> backbone`` under ``name``."""

    def decorator(fn):
        if name in _BACKBONES and _BACKBONES[name] is not fn:
            raise ValueError(f"Backbone {name!r} is already registered")
        _BACKBONES[name] = fn
        return fn

    return decorator


def _load_builtins() -> None:
    # Imported lazily: backbones.py imports `register` from here.
    importlib.import_module("models.backbones")


def list_models() -> list[str]:
    """Sorted names of all registered backbones."""
    _load_builtins()
    return sorted(_BACKBONES)


def get_backbone_fn(name: str) -> Callable[..., keras.Model]:
    """The registered builder for ``name``; ValueError listing the known names otherwise."""
    _load_builtins()
    if name not in _BACKBONES:
        raise ValueError(f"Unknown model {name!r}; known models: {sorted(_BACKBONES)}")
    return _BACKBONES[name]


@gin.configurable
def build_model(
    name: str,
    task: str,
    num_classes: int,
    image_size: int,
    weights: str | None = None,
    dropout: float = 0.0,
    head: str | None = None,
    depthwise: str = "native",
    taps_max_input_size: int | None = None,
    taps_strided: bool = False,
    **kw,
) -> keras.Model:
    """Builds ``image -> backbone -> gap -> dropout -> logits`` (see docs/ARCHITECTURE.md).

    Args:
      name: a registered backbone (``list_models()``).
      task: ``binary`` | ``multiclass`` | ``dr_grade`` | ``multilabel``.
      num_classes: K classes (2 for binary), or C labels for multilabel.
      image_size: S; the model input is float32 ``[B, S, S, 3]`` in [0, 255], named ``image``.
      weights: None (random init), ``"imagenet"`` (keras.applications backbones), or a path to
        a backbone weights file.
      dropout: rate of the Dropout before the logits.
      head: see ``models.heads``; None picks ``heads.default_head(task)``.
      depthwise: ``native`` (DepthwiseConv2D) or ``taps`` (``layers.TapDepthwiseConv2D``: same
        weights and maths; on JAX/GPU it skips cuDNN's run-time plan building, so a cached
        repeat start of EfficientNet-B3 takes 24 s instead of 34 s, at 0.65x the throughput)
        or ``taps_grad`` (``layers.TapGradDepthwiseConv2D``: only the kernel gradient of the
        stride-1 layers as taps, whose cuDNN plans cost a warm start the most; strided
        layers as taps).
      taps_max_input_size: with ``taps`` or ``taps_grad``, swap the depthwise layers whose
        input is at most this many pixels across (with neither this nor ``taps_strided``:
        all of them).
      taps_strided: with ``taps`` or ``taps_grad``, swap the strided depthwise layers
        (also, with ``taps_max_input_size``, the small ones).
      **kw: passed on to the backbone builder.

    Returns:
      A functional ``keras.Model`` with float32 logits ``[B, D]``,
      ``D = heads.output_dim(task, num_classes, head)``, also under mixed precision.
    """
    head = heads.check_head(task, head)
    logits_layer = heads.build_head(task, num_classes, head)  # validates num_classes early
    backbone = get_backbone_fn(name)(image_size=image_size, weights=weights, **kw)
    if depthwise in ("taps", "taps_grad"):
        backbone = layers.use_tap_depthwise(backbone, taps_max_input_size, taps_strided,
                                            kernel_gradient_only=depthwise == "taps_grad",
                                            copy_weights=weights is not None)
    elif depthwise != "native":
        raise ValueError(f"depthwise={depthwise!r}: expected 'native', 'taps' or 'taps_grad'.")
    image = keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    x = backbone(image)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(image, logits_layer(x), name=f"{name}_{task}_{head}")
