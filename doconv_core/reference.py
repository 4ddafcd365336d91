"""NumPy reference convolutions: the oracle every adapter test compares against.

``conv`` is an ordinary grouped convolution with 1 to 3 spatial axes (channels-first data,
kernel (C_out, C_in/g, *kernel_size)); ``conv2d`` is its 2-D form (NCHW, OIHW). ``doconv``
runs a DO-Conv layer through its composed kernel; ``doconv_features`` computes the same
function the other way round (depthwise conv with D, then grouped 1x1 conv with W), so
comparing the two checks the channel mapping c(o, i). The ``*2d`` names are the same
functions, kept for 2-D callers.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

import numpy as np

from .compose import check_params, compose_kernel, compose_kernel_vjp, identity_d
from .spec import ConvSpec

_NUMPY_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                    "circular": "wrap"}


def pad_input(x: np.ndarray, pads: tuple[tuple[int, int], ...],
              padding_mode: str) -> np.ndarray:
    """Pad the spatial axes of a channels-first array as PyTorch's padding modes do."""
    if not any(before or after for before, after in pads):
        return x
    return np.pad(x, ((0, 0), (0, 0)) + tuple(pads), mode=_NUMPY_PAD_MODES[padding_mode])


def _conv_spec(x: np.ndarray, kernel: np.ndarray, bias: Any, stride: Any, padding: Any,
               dilation: Any, groups: int, padding_mode: str) -> ConvSpec:
    rank = kernel.ndim - 2
    if rank not in (1, 2, 3):
        raise ValueError("kernel must be (C_out, C_in/groups, *kernel_size) with 1 to 3 spatial "
                         f"axes, got shape {kernel.shape}")
    if x.ndim != kernel.ndim:
        raise ValueError(f"x must have {kernel.ndim} dimensions (N, C and {rank} spatial) for "
                         f"a kernel of shape {kernel.shape}, got shape {x.shape}")
    C_out, I_g = kernel.shape[:2]
    spec = ConvSpec(x.shape[1], C_out, kernel.shape[2:], stride, padding, dilation, groups,
                    bias=bias is not None, padding_mode=padding_mode, rank=rank)
    if I_g != spec.in_per_group:
        raise ValueError(
            f"kernel must have C_in/groups = {spec.in_per_group} input channels for x with "
            f"{x.shape[1]} channels and groups={groups}, got kernel shape {kernel.shape}"
        )
    if bias is not None and np.shape(bias) != (C_out,):
        raise ValueError(f"bias must have shape ({C_out},), got {np.shape(bias)}")
    return spec


def _taps(spec: ConvSpec, out_sizes: tuple[int, ...]) -> Iterator[tuple[tuple, tuple]]:
    """(kernel offset, slices of the padded input it reads) for every kernel position."""
    for offset in itertools.product(*(range(k) for k in spec.kernel_size)):
        slices = tuple(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, s, n in
                       zip(offset, spec.dilation, spec.stride, out_sizes))
        yield offset, (slice(None), slice(None)) + slices


def conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None, *,
         stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
         padding_mode: str = "zeros") -> np.ndarray:
    """Grouped convolution (cross-correlation, as every framework computes it), 1 to 3
    spatial axes: x (N, C_in, *spatial), kernel (C_out, C_in/g, *kernel_size)."""
    x, kernel = np.asarray(x), np.asarray(kernel)
    spec = _conv_spec(x, kernel, bias, stride, padding, dilation, groups, padding_mode)
    out_sizes = spec.output_size(x.shape[2:])
    xp = pad_input(x, spec.resolve_padding(x.shape[2:]), padding_mode)
    B, C_out, I_g = x.shape[0], kernel.shape[0], kernel.shape[1]
    grouped_kernel = kernel.reshape((groups, C_out // groups, I_g) + spec.kernel_size)
    y = np.zeros((B, groups, C_out // groups, math.prod(out_sizes)),
                 dtype=np.result_type(x, kernel))
    for offset, where in _taps(spec, out_sizes):
        window = xp[where].reshape(B, groups, I_g, -1)
        y += np.einsum("bgip,goi->bgop", window, grouped_kernel[(Ellipsis,) + offset])
    y = y.reshape((B, C_out) + out_sizes)
    if bias is not None:
        y = y + np.asarray(bias).reshape((1, C_out) + (1,) * spec.rank)
    return y


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None, *,
           stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
           padding_mode: str = "zeros") -> np.ndarray:
    """``conv`` for NCHW data and an OIHW kernel."""
    x, kernel = np.asarray(x), np.asarray(kernel)
    if x.ndim != 4:
        raise ValueError(f"x must be NCHW (4 dimensions), got shape {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be OIHW (4 dimensions), got shape {kernel.shape}")
    return conv(x, kernel, bias, stride=stride, padding=padding, dilation=dilation,
                groups=groups, padding_mode=padding_mode)


def _source_indices(size: int, before: int, after: int, padding_mode: str) -> np.ndarray:
    """For each padded position, the input index it copies (-1: a zero)."""
    index = np.arange(size)
    if padding_mode == "zeros":
        return np.pad(index, (before, after), constant_values=-1)
    return np.pad(index, (before, after), mode=_NUMPY_PAD_MODES[padding_mode])


def conv_vjp(x: np.ndarray, kernel: np.ndarray, grad_y: np.ndarray, *, stride: Any = 1,
             padding: Any = 0, dilation: Any = 1, groups: int = 1,
             padding_mode: str = "zeros") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dL/dx, dL/dkernel, dL/dbias) of ``conv`` given dL/dy: the gradient oracle."""
    x, kernel, grad_y = np.asarray(x), np.asarray(kernel), np.asarray(grad_y)
    spec = _conv_spec(x, kernel, None, stride, padding, dilation, groups, padding_mode)
    out_sizes = spec.output_size(x.shape[2:])
    B, C_out, I_g = x.shape[0], kernel.shape[0], kernel.shape[1]
    if grad_y.shape != (B, C_out) + out_sizes:
        raise ValueError(f"grad_y must have the output's shape {(B, C_out) + out_sizes}, "
                         f"got {grad_y.shape}")
    pads = spec.resolve_padding(x.shape[2:])
    xp = pad_input(x, pads, padding_mode)
    dtype = np.result_type(x, kernel, grad_y)
    grouped_kernel = kernel.reshape((groups, C_out // groups, I_g) + spec.kernel_size)
    grad_y_grouped = grad_y.reshape(B, groups, C_out // groups, -1)
    grad_kernel = np.zeros(grouped_kernel.shape, dtype=dtype)
    grad_xp = np.zeros(xp.shape, dtype=dtype)
    for offset, where in _taps(spec, out_sizes):
        window = xp[where]
        grad_kernel[(Ellipsis,) + offset] = np.einsum(
            "bgip,bgop->goi", window.reshape(B, groups, I_g, -1), grad_y_grouped)
        grad_xp[where] += np.einsum(
            "goi,bgop->bgip", grouped_kernel[(Ellipsis,) + offset],
            grad_y_grouped).reshape(window.shape)
    # Fold the padded positions back onto the inputs they copy, one spatial axis at a time.
    grad_x = grad_xp
    for axis, (size, (before, after)) in enumerate(zip(x.shape[2:], pads), start=2):
        source = _source_indices(size, before, after, padding_mode)
        keep = source >= 0
        folded_shape = list(grad_x.shape)
        folded_shape[axis] = size
        folded = np.zeros(folded_shape, dtype=dtype)
        np.add.at(np.moveaxis(folded, axis, 0), source[keep],
                  np.moveaxis(np.compress(keep, grad_x, axis=axis), axis, 0))
        grad_x = folded
    spatial_axes = tuple(range(2, 2 + spec.rank))
    return grad_x, grad_kernel.reshape(kernel.shape), grad_y.sum(axis=(0,) + spatial_axes)


def conv2d_vjp(x: np.ndarray, kernel: np.ndarray, grad_y: np.ndarray, **kwargs: Any
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``conv_vjp`` for NCHW data and an OIHW kernel."""
    if np.ndim(kernel) != 4:
        raise ValueError(f"kernel must be OIHW (4 dimensions), got shape {np.shape(kernel)}")
    return conv_vjp(x, kernel, grad_y, **kwargs)


def _conv_settings(spec: ConvSpec) -> dict[str, Any]:
    return dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                groups=spec.groups, padding_mode=spec.padding_mode)


def doconv_vjp(x: np.ndarray, D: np.ndarray | None, W: np.ndarray, bias: np.ndarray | None,
               spec: ConvSpec, grad_y: np.ndarray) -> dict[str, np.ndarray | None]:
    """Gradients of a DO-Conv layer's output w.r.t. x, D, W and bias, given dL/dy."""
    check_params(spec, D, W, bias)
    kernel = compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size)
    grad_x, grad_kernel, grad_bias = conv_vjp(x, kernel, grad_y, **_conv_settings(spec))
    grad_D, grad_W = compose_kernel_vjp(grad_kernel, D, W, groups=spec.groups,
                                        kernel_size=spec.kernel_size)
    return {"x": grad_x, "D": grad_D, "W": grad_W, "bias": grad_bias if spec.bias else None}


def doconv(x: np.ndarray, D: np.ndarray | None, W: np.ndarray, bias: np.ndarray | None,
           spec: ConvSpec) -> np.ndarray:
    """A DO-Conv layer's output through its composed kernel."""
    check_params(spec, D, W, bias)
    kernel = compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size)
    return conv(x, kernel, bias, **_conv_settings(spec))


def doconv_features(x: np.ndarray, D: np.ndarray | None, W: np.ndarray,
                    bias: np.ndarray | None, spec: ConvSpec) -> np.ndarray:
    """The same function by feature composition: depthwise conv with D', then 1x1 with W."""
    check_params(spec, D, W, bias)
    C_in, S = spec.in_channels, spec.D_mul
    ones = (1,) * spec.rank
    pointwise = np.asarray(W).reshape((spec.out_channels, spec.in_per_group * S) + ones)
    if D is None:
        # A DO-Conv whose kernel has one element is a plain 1x1 conv; stride and padding
        # apply to it directly.
        return conv(x, pointwise, bias, **_conv_settings(spec))
    D_total = np.asarray(D) + identity_d(C_in, spec.mn, S, np.asarray(D).dtype)
    # Output channel c*S + s of the depthwise conv has kernel D'[c, :, s].
    depthwise_kernel = D_total.transpose(0, 2, 1).reshape((C_in * S, 1) + spec.kernel_size)
    depthwise = conv(x, depthwise_kernel, **dict(_conv_settings(spec), groups=C_in))
    return conv(depthwise, pointwise, bias, groups=spec.groups)


# The 2-D names the adapters' tests and the cross-check use.
doconv2d, doconv2d_vjp, doconv2d_features = doconv, doconv_vjp, doconv_features
