"""Layers fundusflow swaps into keras.applications backbones (keras.ops only).

`TapDepthwiseConv2D` computes a depthwise convolution as a sum of k x k shifted
multiply-adds instead of a grouped convolution. XLA fuses it into plain loop
kernels, so no cuDNN convolution plan is built for it at run time. Same
variables, same maths as `keras.layers.DepthwiseConv2D` (channels_last,
depth_multiplier 1, no dilation). The kernel's gradient is a sum over batch and map
of products in the compute dtype. With bf16 it is within 1 % of DepthwiseConv2D's on an
H200 (JAX) and with TensorFlow on CPU (measured), but JAX on CPU sums it in bf16 (tens of
% off for a batch of 64 15x15 maps): there, use taps only with float32.

`TapGradDepthwiseConv2D` keeps cuDNN for the forward and data gradient and computes only
the kernel gradient as taps (summed in float32): that gradient's cuDNN plan is the
costliest to build at a warm start (~0.4 s of a layer's ~0.85 s on an H200).
"""

import keras
from keras import ops


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(pad_before, pad_after, out_size) of TF/Keras "same" padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def _windows(padded, kernel_size, strides, out_hw):
    """(i, j, the input window tap (i, j) multiplies): [B, H', W', C] slices of `padded`."""
    (kh, kw), (sh, sw), (oh, ow) = kernel_size, strides, out_hw
    for i in range(kh):
        for j in range(kw):
            yield i, j, padded[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]


@keras.saving.register_keras_serializable(package="fundusflow")
class TapDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """`DepthwiseConv2D` as k*k shifted multiply-adds. Input [B, H, W, C] -> [B, H', W', C]."""

    def call(self, inputs):
        out = self._convolve(inputs, ops.cast(self.kernel, inputs.dtype))
        if self.use_bias:
            out = out + ops.cast(self.bias, out.dtype)
        return self.activation(out) if self.activation is not None else out

    def _pad(self, inputs):
        """(inputs padded as the layer's padding says, (H', W'))."""
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        h, w = inputs.shape[1], inputs.shape[2]
        if self.padding != "same":
            return inputs, ((h - kh) // sh + 1, (w - kw) // sw + 1)
        top, bottom, oh = _same_padding(h, kh, sh)
        left, right, ow = _same_padding(w, kw, sw)
        return ops.pad(inputs, [[0, 0], [top, bottom], [left, right], [0, 0]]), (oh, ow)

    def _convolve(self, inputs, kernel):
        padded, out_hw = self._pad(inputs)
        out = None
        for i, j, window in _windows(padded, self.kernel_size, self.strides, out_hw):
            term = window * kernel[i, j, :, 0]
            out = term if out is None else out + term
        return out


@keras.saving.register_keras_serializable(package="fundusflow")
class TapGradDepthwiseConv2D(TapDepthwiseConv2D):
    """`DepthwiseConv2D` whose kernel gradient is a sum of k*k window products (taps).

    Stride 1: the forward convolution and the data gradient (a forward convolution of
    the output gradient with the flipped kernel, as XLA computes it anyway) stay on
    cuDNN; only the kernel gradient, whose cuDNN plan costs a warm start the most time
    to build, becomes taps: per tap, a sum over batch and map of window * output
    gradient, in float32. Strided layers are taps entirely (TapDepthwiseConv2D).
    Input [B, H, W, C] -> [B, H', W', C]; same variables and maths as DepthwiseConv2D.

    Measured on an H200 (JAX, bf16, batch 64), every EfficientNet-B3 300 px depthwise layer
    swapped: a warm start's first execution took 11.4 s instead of ~15 s, but training ran
    at 1,377 img/s against ~2,000 natively: XLA's sums over batch and map are slower than
    cuDNN's kernel gradient on the large maps. Per layer, see benchmarks/depthwise_layers.py.
    """

    def _convolve(self, inputs, kernel):
        if max(self.strides) > 1:
            return super()._convolve(inputs, kernel)

        @ops.custom_gradient
        def convolve(x, k):
            def grad(*args, upstream=None):
                dy = args[0] if upstream is None else upstream
                return self._data_gradient(dy, k, x.shape), self._kernel_gradient(x, dy, k.dtype)

            return ops.depthwise_conv(x, k, strides=1, padding=self.padding), grad

        return convolve(inputs, kernel)

    def _data_gradient(self, dy, kernel, input_shape):
        """d loss / d input [B, H, W, C]: dy correlated with the flipped kernel, padded
        by k - 1 less the forward's padding on each side (a "full" convolution)."""
        (kh, kw), (h, w) = self.kernel_size, input_shape[1:3]
        top, bottom, left, right = 0, 0, 0, 0
        if self.padding == "same":
            top, bottom, _ = _same_padding(h, kh, 1)
            left, right, _ = _same_padding(w, kw, 1)
        dy = ops.pad(dy, [[0, 0], [kh - 1 - top, kh - 1 - bottom],
                          [kw - 1 - left, kw - 1 - right], [0, 0]])
        return ops.depthwise_conv(dy, kernel[::-1, ::-1], strides=1, padding="valid")

    def _kernel_gradient(self, x, dy, dtype):
        """d loss / d kernel [kh, kw, C, 1]: per tap, sum over batch and map of the input
        window times dy, accumulated in float32 (bf16 sums of ~10^6 terms drift)."""
        padded, out_hw = self._pad(x)
        dy = ops.cast(dy, "float32")
        sums = [ops.sum(ops.cast(window, "float32") * dy, axis=(0, 1, 2))
                for _, _, window in _windows(padded, self.kernel_size, (1, 1), out_hw)]
        kh, kw = self.kernel_size
        return ops.cast(ops.reshape(ops.stack(sums), (kh, kw, -1, 1)), dtype)


def _selected(layer, max_input_size: int | None, strided: bool) -> bool:
    if max_input_size is None and not strided:
        return True  # no rule given: every layer
    small = max_input_size is not None and max(layer.input.shape[1:3]) <= max_input_size
    return small or (strided and max(layer.strides) > 1)


def use_tap_depthwise(model: keras.Model, max_input_size: int | None = None,
                      strided: bool = False, kernel_gradient_only: bool = False,
                      copy_weights: bool = True) -> keras.Model:
    """A clone of `model` whose DepthwiseConv2D layers are TapDepthwiseConv2D, weights copied
    (TapGradDepthwiseConv2D with `kernel_gradient_only`).

    copy_weights: False where `model` holds only its fresh initial values: the clone's own
    draws serve as well, and reading the originals would compute them one by one (on JAX,
    inside `training.initialization.initialized_together`, a program per initializer).

    With neither rule below every depthwise layer is swapped; with one or both, the layers
    either rule selects (large stride-1 maps stay on cuDNN, where taps are slow):
    max_input_size: layers whose input is at most this many pixels high and wide.
    strided: layers with a stride above 1, whatever their size (on an H200 the strided 3x3
    layers of EfficientNet-B3 ran faster as taps than on cuDNN, its strided 5x5 ones slower).
    """

    def clone(layer):
        if type(layer) is keras.layers.DepthwiseConv2D and layer.depth_multiplier == 1 \
                and tuple(layer.dilation_rate) == (1, 1) and layer.data_format == "channels_last" \
                and _selected(layer, max_input_size, strided):
            cls = TapGradDepthwiseConv2D if kernel_gradient_only else TapDepthwiseConv2D
            return cls.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    clone_ = keras.models.clone_model(model, clone_function=clone, recursive=True)
    if copy_weights:
        clone_.set_weights(model.get_weights())
    return clone_
