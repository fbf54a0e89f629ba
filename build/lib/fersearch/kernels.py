"""CPU training kernels for the CNN family: narrow convolutions (`conv`: the one-channel first
layer, and the input gradient of the second) and each block's batch norm + ReLU + 2x2 max-pool
(`bn_relu_pool`). All give PyTorch's values and gradients to float rounding; `ConvNet.forward`
uses them in training where they apply.

On a CPU, PyTorch's batch norm and max-pool kernels run far below memory speed on small
feature maps such as the seed CNN's 32x6x44x44 (each pass took 1-2 ms where a plain
element-wise pass takes 0.04 ms). `bn_relu_pool` computes exactly what
`max_pool2d(relu(batch_norm(x)), 2)` computes, with batch statistics, by composing only fast
element-wise and reduction ops, and gives the same gradients:

- In training mode batch norm is a per-channel affine map `a * x + b` with
  `a = gamma / sqrt(var + eps)`, `b = beta - a * mean`. An increasing map commutes with
  max-pool and ReLU, so the block pools `sign(a) * x` first and applies the affine map and
  ReLU to a quarter of the values.
- The backward pass uses the closed form of the batch-norm gradient: every input gets
  `c1 * (x - mean) + c0` (per-channel constants from two sums over the pooled gradient) and
  the input that won each pooling window also gets `a * grad`.

Two implementations compute this. Where the C kernels of `fersearch.native` can be built, one
that makes two passes over the map each way (statistics, then pooling; masked sums, then the
input gradient); otherwise a composition of PyTorch's element-wise ops. On an exact tie inside
a pooling window the C kernel sends the gradient to the first tied input in row-major order, as
PyTorch's max-pool does; the PyTorch composition picks the upper row, then the left column, so
it differs from max-pool only on exact ties between the lower-left and upper-right inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fersearch import native

# Widest maps each implementation is used for: beyond these, PyTorch's own layers measured as
# fast or faster (bench of forward + backward at batch 32, 1 and 2 threads; see README).
BN_NATIVE_MAX_CHANNELS = 64
BN_COMPOSITION_MAX_CHANNELS = 8
CONV_NATIVE_MAX_CHANNELS = 8
GRAD_INPUT_NATIVE_MAX_IN_CHANNELS = 6


def bn_relu_pool_applies(x: torch.Tensor, bn: nn.BatchNorm2d) -> bool:
    """Whether `ConvNet` runs a block through `bn_relu_pool` rather than PyTorch's three layers.

    That takes a CPU fp32 map with even sides in a step that records gradients, a BatchNorm2d in
    training mode (batch statistics, affine, tracking running stats), and a map no wider than
    the available implementation beats PyTorch's layers at: BN_NATIVE_MAX_CHANNELS with the C
    kernel (one fused pass each way), BN_COMPOSITION_MAX_CHANNELS with the PyTorch composition
    (several element-wise ops, not a fused kernel)."""
    widest = BN_NATIVE_MAX_CHANNELS if native.library() is not None else BN_COMPOSITION_MAX_CHANNELS
    return (
        x.dim() == 4
        and x.shape[1] <= widest
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[2] % 2 == 0
        and x.shape[3] % 2 == 0
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and torch.is_grad_enabled()
    )


def conv(x: torch.Tensor, layer: nn.Conv2d, use_native: bool = True) -> torch.Tensor:
    """`layer(x)`, with C kernels for the shapes oneDNN runs far below its matmul rate.

    - One input channel (the CNN's first layer, on data that needs no gradient), up to 8
      filters: forward, filter and bias gradients in C. The output is channels-last.
    - Up to 6 input channels and 8 or 16 filters (the seed CNN's second layer): oneDNN's
      forward and filter gradient, the input gradient in C.
    """
    lib = native.library() if use_native else None
    if lib is None or not _plain_conv(x, layer):
        return layer(x)
    k = layer.kernel_size[0]
    ph, pw = layer.padding
    h, w = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
    if h < k or w < k:
        return layer(x)
    if x.shape[1] == 1 and not x.requires_grad and layer.out_channels <= CONV_NATIVE_MAX_CHANNELS:
        if layer.bias is not None and lib.conv1_supported(w, k):
            return _NativeConv1.apply(_pad(x, ph, pw), layer.weight, layer.bias, lib)
    elif (
        x.requires_grad
        and x.shape[1] <= GRAD_INPUT_NATIVE_MAX_IN_CHANNELS
        and lib.conv_grad_input_supported(x.shape[1], layer.out_channels)
    ):
        return _NativeGradInputConv.apply(_pad(x, ph, pw), layer.weight, layer.bias, lib)
    return layer(x)


def _plain_conv(x: torch.Tensor, layer: nn.Conv2d) -> bool:
    """A CPU fp32 training step through a stride-1, undilated, ungrouped, square convolution."""
    k = layer.kernel_size[0]
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.shape[1] == layer.in_channels
        and layer.kernel_size == (k, k)
        and layer.stride == (1, 1)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and isinstance(layer.padding, tuple)  # not the string 'same'
        and torch.is_grad_enabled()
    )


def _pad(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def bn_relu_pool(x: torch.Tensor, bn: nn.BatchNorm2d, use_native: bool = True) -> torch.Tensor:
    """`max_pool2d(relu(bn(x)), 2)` for a BatchNorm2d in training mode; updates its running stats.

    `use_native=False` forces the PyTorch composition even where the C kernel is available.
    """
    lib = native.library() if use_native else None
    if lib is not None:
        out, mean, var = _NativeBNReLUPool.apply(x, bn.weight, bn.bias, bn.eps, lib)
    else:
        out, mean, var = _BNReLUPool.apply(x, bn.weight, bn.bias, bn.eps)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        count = x.numel() // x.shape[1]
        bn.running_mean.lerp_(mean, momentum)
        bn.running_var.lerp_(var * (count / max(count - 1, 1)), momentum)
    return out


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _pool(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2x2 max of a contiguous (N, C, H, W) map: rows first, then columns.

    Returns the maxima and two float masks: 1 where the lower row won, 1 where the right column won.
    """
    n, c, h, w = xs.shape
    rows = xs.view(n * c * (h // 2), 2, w)
    upper, lower = rows[:, 0], rows[:, 1]
    row_mask = torch.gt(lower, upper, out=torch.empty(upper.shape, dtype=xs.dtype))
    r = torch.maximum(upper, lower).view(-1, w // 2, 2)
    # Element-wise ops on stride-2 views are slow here; de-interleave the columns once.
    left, right = r[..., 0].contiguous(), r[..., 1].contiguous()
    col_mask = torch.gt(right, left, out=torch.empty(left.shape, dtype=xs.dtype))
    m = torch.maximum(left, right)
    return m.view(n, c, h // 2, w // 2), row_mask, col_mask


def _unpool(
    g: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    """Routes each window's gradient to the input that won it; zeros elsewhere."""
    n, c, h, w = shape
    g = g.reshape(-1, w // 2)
    cols = torch.empty(g.shape[0], w // 2, 2, dtype=g.dtype)
    torch.mul(g, col_mask, out=cols[..., 1])
    torch.sub(g, cols[..., 1], out=cols[..., 0])
    cols = cols.view(-1, w)
    full = torch.empty(cols.shape[0], 2, w, dtype=g.dtype)
    torch.mul(cols, row_mask, out=full[:, 1])
    torch.sub(cols, full[:, 1], out=full[:, 0])
    return full.view(shape)


class _BNReLUPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
        x = x.contiguous()
        n, c, h, w = x.shape
        count = n * h * w
        mean = x.view(n, c, h * w).sum((0, 2)) / count
        centred = x - _channel(mean)
        var = (centred * centred).view(n, c, h * w).sum((0, 2)) / count
        invstd = torch.rsqrt(var + eps)
        a = gamma * invstd
        negative = a < 0
        sign = torch.where(negative, -1.0, 1.0)
        pooled, row_mask, col_mask = _pool(
            centred * _channel(sign) if bool(negative.any()) else centred
        )
        # pooled holds sign * (x - mean) at each window's winner; a * (x - mean) + beta = |a| * pooled + beta.
        out = (pooled * _channel(a.abs()) + _channel(beta)).clamp_min_(0)
        ctx.save_for_backward(centred, pooled, row_mask, col_mask, out, invstd, gamma, sign)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, _grad_mean: torch.Tensor, _grad_var: torch.Tensor):
        centred, pooled, row_mask, col_mask, out, invstd, gamma, sign = ctx.saved_tensors
        n, c, h, w = centred.shape
        count = n * h * w
        grad = torch.ops.aten.threshold_backward(grad.contiguous(), out, 0)  # ReLU
        xhat = pooled * _channel(sign * invstd)  # normalised value of each window's winner
        sum_g = grad.sum((0, 2, 3))
        sum_gx = (grad * xhat).sum((0, 2, 3))
        a = gamma * invstd
        c1 = -a * invstd * sum_gx / count
        c0 = -a * sum_g / count
        grad_x = _unpool(grad * _channel(a), row_mask, col_mask, centred.shape)
        grad_x += centred * _channel(c1)
        grad_x += _channel(c0)
        return grad_x, sum_gx, sum_g, None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class _NativeBNReLUPool(torch.autograd.Function):
    """The same block through `csrc/cpu_kernels.c` on channels-last maps (the engine's layout)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, lib):
        cl = torch.channels_last
        x = x.contiguous(memory_format=cl)
        n, c, h, w = x.shape
        pooled = (n, c, h // 2, w // 2)
        out = torch.empty(pooled, memory_format=cl)
        winner = torch.empty(pooled, memory_format=cl)
        slot = torch.empty(pooled, dtype=torch.uint8, memory_format=cl)
        mean, var, invstd = torch.empty(c), torch.empty(c), torch.empty(c)  # var: biased
        gamma_c, beta_c = gamma.detach().contiguous(), beta.detach().contiguous()
        native.call(
            lib, "bnrp_forward", _ptr(x), n, h, w, c, _ptr(gamma_c), _ptr(beta_c), float(eps),
            _ptr(out), _ptr(slot), _ptr(winner), _ptr(mean), _ptr(var), _ptr(invstd), torch.get_num_threads(),
        )  # fmt: skip
        ctx.lib = lib
        ctx.save_for_backward(x, slot, winner, out, gamma_c, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, _grad_mean: torch.Tensor, _grad_var: torch.Tensor):
        x, slot, winner, out, gamma, mean, invstd = ctx.saved_tensors
        n, c, h, w = x.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x)
        grad_params = torch.empty(2, c)
        native.call(
            ctx.lib, "bnrp_backward", _ptr(grad), _ptr(x), _ptr(slot), _ptr(winner), _ptr(out), n, h, w, c,
            _ptr(gamma), _ptr(mean), _ptr(invstd), _ptr(grad_x), _ptr(grad_params[0]), _ptr(grad_params[1]),
            torch.get_num_threads(),
        )  # fmt: skip
        return grad_x, grad_params[0], grad_params[1], None, None


class _NativeConv1(torch.autograd.Function):
    """Stride-1 convolution of a one-channel batch through `csrc/cpu_kernels.c`; channels-last out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lib):
        x = x.contiguous()
        n, _, h, w = x.shape
        c, k = weight.shape[0], weight.shape[2]
        out = torch.empty((n, c, h - k + 1, w - k + 1), memory_format=torch.channels_last)
        weight_c, bias_c = weight.detach().contiguous(), bias.detach().contiguous()
        native.call(
            lib, "conv1_forward", _ptr(x), _ptr(weight_c), _ptr(bias_c), n, h, w, c, k, _ptr(out), torch.get_num_threads()
        )
        ctx.lib = lib
        ctx.save_for_backward(x)
        ctx.filters = (c, k)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        n, _, h, w = x.shape
        c, k = ctx.filters
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_w, grad_b = torch.empty(c, 1, k, k), torch.empty(c)
        native.call(
            ctx.lib, "conv1_backward", _ptr(grad), _ptr(x), n, h, w, c, k, _ptr(grad_w), _ptr(grad_b), torch.get_num_threads()
        )
        return None, grad_w, grad_b, None


class _NativeGradInputConv(torch.autograd.Function):
    """A stride-1 convolution: oneDNN forward and filter gradient, the input gradient in C."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lib):
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.lib = lib
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        n, ci, h, w = x.shape
        co, k = weight.shape[0], weight.shape[2]
        grad = grad.contiguous(memory_format=torch.channels_last)
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_output=grad, input=x, weight=weight, bias_sizes=[co], stride=[1, 1], padding=[0, 0],
            dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1,
            output_mask=[False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]],
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            filters = weight.detach().contiguous()
            grad_x = torch.empty(x.shape, memory_format=torch.channels_last)
            native.call(
                ctx.lib, "conv_grad_input", _ptr(grad), _ptr(filters), n, h - k + 1, w - k + 1, ci, co, k, _ptr(grad_x), torch.get_num_threads()
            )
        return grad_x, grad_w, grad_b, None
