"""NumPy reference convolutions: the oracle every adapter test compares against.

``conv2d`` is an ordinary grouped 2-D convolution (NCHW, OIHW). ``doconv2d`` runs a
DO-Conv layer through its composed kernel; ``doconv2d_features`` computes the same
function the other way round (depthwise conv with D, then grouped 1x1 conv with W),
so comparing the two checks the channel mapping c(o, i).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .compose import check_params, compose_kernel, compose_kernel_vjp, identity_d
from .spec import ConvSpec

_NUMPY_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                    "circular": "wrap"}


def pad_input(x: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]],
              padding_mode: str) -> np.ndarray:
    """Pad the spatial axes of an NCHW array as PyTorch's padding modes do."""
    (top, bottom), (left, right) = pads
    if not any((top, bottom, left, right)):
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)),
                  mode=_NUMPY_PAD_MODES[padding_mode])


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None, *,
           stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
           padding_mode: str = "zeros") -> np.ndarray:
    """Grouped 2-D convolution (cross-correlation, as every framework computes it)."""
    x = np.asarray(x)
    kernel = np.asarray(kernel)
    if x.ndim != 4:
        raise ValueError(f"x must be NCHW (4 dimensions), got shape {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be OIHW (4 dimensions), got shape {kernel.shape}")
    C_out, I_g, M, N = kernel.shape
    spec = ConvSpec(x.shape[1], C_out, (M, N), stride, padding, dilation, groups,
                    bias=bias is not None, padding_mode=padding_mode)
    if I_g != spec.in_per_group:
        raise ValueError(
            f"kernel must have C_in/groups = {spec.in_per_group} input channels for x with "
            f"{x.shape[1]} channels and groups={groups}, got kernel shape {kernel.shape}"
        )
    if bias is not None and np.shape(bias) != (C_out,):
        raise ValueError(f"bias must have shape ({C_out},), got {np.shape(bias)}")
    out_h, out_w = spec.output_size(x.shape[2:])
    xp = pad_input(x, spec.resolve_padding(x.shape[2:]), padding_mode)
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    extent = ((M - 1) * dh + 1, (N - 1) * dw + 1)
    windows = sliding_window_view(xp, extent, axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :out_h, :out_w]
    B = x.shape[0]
    windows = windows.reshape(B, groups, I_g, out_h, out_w, M, N)
    grouped_kernel = kernel.reshape(groups, C_out // groups, I_g, M, N)
    y = np.einsum("bgihwmn,goimn->bgohw", windows, grouped_kernel, optimize=True)
    y = y.reshape(B, C_out, out_h, out_w)
    if bias is not None:
        y = y + np.asarray(bias).reshape(1, C_out, 1, 1)
    return y


def _source_indices(size: int, before: int, after: int, padding_mode: str) -> np.ndarray:
    """For each padded position, the input index it copies (-1: a zero)."""
    index = np.arange(size)
    if padding_mode == "zeros":
        return np.pad(index, (before, after), constant_values=-1)
    return np.pad(index, (before, after), mode=_NUMPY_PAD_MODES[padding_mode])


def conv2d_vjp(x: np.ndarray, kernel: np.ndarray, grad_y: np.ndarray, *, stride: Any = 1,
               padding: Any = 0, dilation: Any = 1, groups: int = 1,
               padding_mode: str = "zeros") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dL/dx, dL/dkernel, dL/dbias) of ``conv2d`` given dL/dy: the gradient oracle."""
    x, kernel, grad_y = np.asarray(x), np.asarray(kernel), np.asarray(grad_y)
    C_out, I_g, M, N = kernel.shape
    spec = ConvSpec(x.shape[1], C_out, (M, N), stride, padding, dilation, groups,
                    padding_mode=padding_mode)
    out_h, out_w = spec.output_size(x.shape[2:])
    B = x.shape[0]
    if grad_y.shape != (B, C_out, out_h, out_w):
        raise ValueError(f"grad_y must have the output's shape {(B, C_out, out_h, out_w)}, "
                         f"got {grad_y.shape}")
    pads = spec.resolve_padding(x.shape[2:])
    xp = pad_input(x, pads, padding_mode)
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    windows = sliding_window_view(xp, ((M - 1) * dh + 1, (N - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :out_h, :out_w]
    windows = windows.reshape(B, groups, I_g, out_h, out_w, M, N)
    grad_y_grouped = grad_y.reshape(B, groups, C_out // groups, out_h, out_w)
    grouped_kernel = kernel.reshape(groups, C_out // groups, I_g, M, N)
    grad_kernel = np.einsum("bgihwmn,bgohw->goimn", windows, grad_y_grouped, optimize=True)
    grad_windows = np.einsum("goimn,bgohw->bgihmwn", grouped_kernel, grad_y_grouped,
                             optimize=True).reshape(B, x.shape[1], out_h, M, out_w, N)
    rows = (np.arange(out_h) * sh)[:, None] + (np.arange(M) * dh)[None, :]
    cols = (np.arange(out_w) * sw)[:, None] + (np.arange(N) * dw)[None, :]
    grad_xp = np.zeros(xp.shape, dtype=np.result_type(x, kernel, grad_y))
    np.add.at(grad_xp, (slice(None), slice(None), rows[:, :, None, None], cols[None, None]),
              grad_windows)
    # Fold the padded positions back onto the inputs they copy.
    source_rows = _source_indices(x.shape[2], *pads[0], padding_mode)
    source_cols = _source_indices(x.shape[3], *pads[1], padding_mode)
    keep_rows, keep_cols = source_rows >= 0, source_cols >= 0
    grad_x = np.zeros(x.shape, dtype=grad_xp.dtype)
    np.add.at(grad_x, (slice(None), slice(None), source_rows[keep_rows][:, None],
                       source_cols[keep_cols][None, :]),
              grad_xp[:, :, keep_rows][:, :, :, keep_cols])
    return grad_x, grad_kernel.reshape(kernel.shape), grad_y.sum(axis=(0, 2, 3))


def doconv2d_vjp(x: np.ndarray, D: np.ndarray | None, W: np.ndarray, bias: np.ndarray | None,
                 spec: ConvSpec, grad_y: np.ndarray) -> dict[str, np.ndarray | None]:
    """Gradients of a DO-Conv layer's output w.r.t. x, D, W and bias, given dL/dy."""
    check_params(spec, D, W, bias)
    kernel = compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size)
    grad_x, grad_kernel, grad_bias = conv2d_vjp(
        x, kernel, grad_y, stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
        groups=spec.groups, padding_mode=spec.padding_mode)
    grad_D, grad_W = compose_kernel_vjp(grad_kernel, D, W, groups=spec.groups,
                                        kernel_size=spec.kernel_size)
    return {"x": grad_x, "D": grad_D, "W": grad_W, "bias": grad_bias if spec.bias else None}


def doconv2d(x: np.ndarray, D: np.ndarray | None, W: np.ndarray, bias: np.ndarray | None,
             spec: ConvSpec) -> np.ndarray:
    """A DO-Conv layer's output through its composed kernel."""
    check_params(spec, D, W, bias)
    kernel = compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size)
    return conv2d(x, kernel, bias, stride=spec.stride, padding=spec.padding,
                  dilation=spec.dilation, groups=spec.groups, padding_mode=spec.padding_mode)


def doconv2d_features(x: np.ndarray, D: np.ndarray | None, W: np.ndarray,
                      bias: np.ndarray | None, spec: ConvSpec) -> np.ndarray:
    """The same function by feature composition: depthwise conv with D', then 1x1 with W."""
    check_params(spec, D, W, bias)
    C_in, (M, N), S = spec.in_channels, spec.kernel_size, spec.D_mul
    if D is None:
        depthwise = np.asarray(x)
    else:
        D_total = np.asarray(D) + identity_d(C_in, spec.mn, S, np.asarray(D).dtype)
        # Output channel c*S + s of the depthwise conv has kernel D'[c, :, s].
        depthwise_kernel = D_total.transpose(0, 2, 1).reshape(C_in * S, 1, M, N)
        depthwise = conv2d(x, depthwise_kernel, stride=spec.stride, padding=spec.padding,
                           dilation=spec.dilation, groups=C_in, padding_mode=spec.padding_mode)
    pointwise = np.asarray(W).reshape(spec.out_channels, spec.in_per_group * S, 1, 1)
    if D is None:
        # A 1x1 DO-Conv is a plain 1x1 conv; stride and padding apply to it directly.
        return conv2d(depthwise, pointwise, bias, stride=spec.stride, padding=spec.padding,
                      dilation=spec.dilation, groups=spec.groups,
                      padding_mode=spec.padding_mode)
    return conv2d(depthwise, pointwise, bias, groups=spec.groups)
