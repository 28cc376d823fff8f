"""Layers fundusflow swaps into keras.applications backbones (keras.ops only).

`TapDepthwiseConv2D` computes a depthwise convolution as a sum of k x k shifted
multiply-adds instead of a grouped convolution. XLA fuses it into plain loop
kernels, so no cuDNN convolution plan is built for it at run time. Same
variables, same maths as `keras.layers.DepthwiseConv2D` (channels_last,
depth_multiplier 1, no dilation). The kernel's gradient is a sum over batch and map
of products in the compute dtype. With bf16 it is within 1 % of DepthwiseConv2D's on an
H200 (JAX) and with TensorFlow on CPU (measured), but JAX on CPU sums it in bf16 (tens of
% off for a batch of 64 15x15 maps): there, use taps only with float32.
"""

import keras
from keras import ops


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(pad_before, pad_after, out_size) of TF/Keras "same" padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


@keras.saving.register_keras_serializable(package="fundusflow")
class TapDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """`DepthwiseConv2D` as k*k shifted multiply-adds. Input [B, H, W, C] -> [B, H', W', C]."""

    def call(self, inputs):
        kh, kw = self.kernel_size
        sh, sw = self.strides
        h, w = inputs.shape[1], inputs.shape[2]
        if self.padding == "same":
            top, bottom, oh = _same_padding(h, kh, sh)
            left, right, ow = _same_padding(w, kw, sw)
            inputs = ops.pad(inputs, [[0, 0], [top, bottom], [left, right], [0, 0]])
        else:
            oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        kernel = ops.cast(self.kernel, inputs.dtype)
        out = None
        for i in range(kh):
            for j in range(kw):
                tap = inputs[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]
                term = tap * kernel[i, j, :, 0]
                out = term if out is None else out + term
        if self.use_bias:
            out = out + ops.cast(self.bias, out.dtype)
        return self.activation(out) if self.activation is not None else out


def _selected(layer, max_input_size: int | None, min_stride: int) -> bool:
    if max(layer.strides) < min_stride:
        return False
    return max_input_size is None or max(layer.input.shape[1:3]) <= max_input_size


def use_tap_depthwise(model: keras.Model, max_input_size: int | None = None,
                      min_stride: int = 1) -> keras.Model:
    """A clone of `model` whose DepthwiseConv2D layers are TapDepthwiseConv2D, weights copied.

    max_input_size: only layers whose input is at most this many pixels high and
    wide are swapped (None: all). Large maps stay on cuDNN, where taps are slow.
    min_stride: only layers with a stride of at least this are swapped (2: the strided
    ones; on an H200 the strided 3x3 layers of EfficientNet-B3 ran faster as taps than on
    cuDNN, its strided 5x5 ones slower).
    """

    def clone(layer):
        if type(layer) is keras.layers.DepthwiseConv2D and layer.depth_multiplier == 1 \
                and tuple(layer.dilation_rate) == (1, 1) and layer.data_format == "channels_last" \
                and _selected(layer, max_input_size, min_stride):
            return TapDepthwiseConv2D.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    clone_ = keras.models.clone_model(model, clone_function=clone, recursive=True)
    clone_.set_weights(model.get_weights())
    return clone_
