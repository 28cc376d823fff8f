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
    configs = [{"h": 4, "w": 4, "strides": [1, 1], "count": 2},
               {"h": 16, "w": 16, "strides": [2, 2], "count": 1}]
    native = [{"first_s": 1.0, "step_ms": 2.0}, {"first_s": 3.0, "step_ms": 1.0}]
    taps = [{"first_s": 0.1, "step_ms": 2.0}, {"first_s": 0.2, "step_ms": 5.0}]
    assert depthwise_layers.threshold_table(configs, native, taps) == [
        {"max_input_size": None, "first_s": 5.0, "step_ms": 5.0, "taps_layers": 0},
        {"max_input_size": 4, "first_s": 3.2, "step_ms": 5.0, "taps_layers": 2},
        {"max_input_size": 16, "first_s": 0.4, "step_ms": 9.0, "taps_layers": 3},
        # taps for the strided shape only: 2 * 1.0 + 0.2, 2 * 2.0 + 5.0
        {"max_input_size": "strided", "first_s": 2.2, "step_ms": 9.0, "taps_layers": 1},
        # strided or small: both shapes at either threshold
        {"max_input_size": "strided or <= 4", "first_s": 0.4, "step_ms": 9.0,
         "taps_layers": 3},
        {"max_input_size": "strided or <= 16", "first_s": 0.4, "step_ms": 9.0,
         "taps_layers": 3},
        # taps exactly where its step is no slower: the first shape (a tie) only
        {"max_input_size": "no slower", "first_s": 3.2, "step_ms": 5.0, "taps_layers": 2},
    ]


# Two lines of an optimised XLA GPU module (abridged), as compiled.as_text() prints them
_HLO = (
    '%cudnn-conv.1 = (bf16[64,19,19,576]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), '
    'window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, feature_group_count=576, '
    'custom_call_target="__cudnn$convForward", backend_config={"cudnn_conv_backend_config":'
    '{"activation_mode":"kNone"},"algorithm":{"algo_id":"5","math_type":"DEFAULT_MATH",'
    '"is_cudnn_frontend":true}}\n'
    '%add.3 = f32[4]{0} add(%a, %b)\n'
    '%cudnn-conv-bw-filter = (bf16[3,3,1,576]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %g), '
    'custom_call_target="__cudnn$convBackwardFilter", backend_config={\\"algorithm\\":'
    '{\\"algo_id\\":\\"16\\"}}\n'
)


def test_cudnn_engines_read_from_the_optimised_program():
    # one plain backend config, one with escaped quotes; the add is no convolution
    assert depthwise_layers.cudnn_engines(_HLO) == ["ConvFwd_eng5", "ConvBwdFilter_eng16"]
    assert depthwise_layers.cudnn_engines("%add = f32[] add(%a, %b)") == []
