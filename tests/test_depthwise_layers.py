"""benchmarks/depthwise_layers.py: the layers it measures and the threshold totals it
prints (the timings themselves need a GPU to mean anything)."""

import keras

from benchmarks import depthwise_layers
from models import registry


def test_configs_are_the_backbones_depthwise_layers_by_shape():
    backbone = registry.get_backbone_fn("mobilenetv3_large")(image_size=64, weights=None)
    configs = depthwise_layers.depthwise_configs(backbone)
    # MobileNetV3-Large: 15 inverted-residual blocks, one depthwise convolution each
    assert sum(c["count"] for c in configs) == 15
    assert len(configs) == len({(c["h"], c["w"], c["c"], tuple(c["kernel"]),
                                 tuple(c["strides"])) for c in configs})
    # the first block: after the stride-2 stem, 32x32 at 16 channels, 3x3, stride 1
    assert configs[0] == {"h": 32, "w": 32, "c": 16, "kernel": [3, 3], "strides": [1, 1],
                          "padding": "same", "count": 1}


def test_configs_look_inside_nested_models():
    inner_in = keras.Input((8, 8, 4))
    inner = keras.Model(inner_in, keras.layers.DepthwiseConv2D(3, padding="same")(inner_in))
    x = keras.Input((8, 8, 4))
    outer = keras.Model(x, keras.layers.DepthwiseConv2D(3, padding="same")(inner(x)))
    assert [c["count"] for c in depthwise_layers.depthwise_configs(outer)] == [2]


def test_threshold_totals_by_hand():
    configs = [{"h": 4, "w": 4, "count": 2}, {"h": 16, "w": 16, "count": 1}]
    native = [{"first_s": 1.0, "step_ms": 2.0}, {"first_s": 3.0, "step_ms": 1.0}]
    taps = [{"first_s": 0.1, "step_ms": 3.0}, {"first_s": 0.2, "step_ms": 5.0}]
    assert depthwise_layers.threshold_table(configs, native, taps) == [
        {"max_input_size": None, "first_s": 5.0, "step_ms": 5.0, "taps_layers": 0},
        {"max_input_size": 4, "first_s": 3.2, "step_ms": 7.0, "taps_layers": 2},
        {"max_input_size": 16, "first_s": 0.4, "step_ms": 11.0, "taps_layers": 3},
    ]
