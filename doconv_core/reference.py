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

from .compose import check_params, compose_kernel, identity_d
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
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"x's spatial size {x.shape[2:]} is too small for kernel_size {(M, N)} "
            f"with dilation {spec.dilation} and padding {spec.padding!r}"
        )
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
