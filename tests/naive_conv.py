"""A deliberately naive loop convolution: the check on doconv_core.conv2d itself.

It shares no code with doconv_core: padding is done by index arithmetic, the
convolution by six nested loops.
"""

from __future__ import annotations

import math

import numpy as np


def _source_index(p: int, n: int, mode: str) -> int | None:
    """The input index that padded position p (may be < 0 or >= n) reads, or None for 0."""
    if 0 <= p < n:
        return p
    if mode == "zeros":
        return None
    if mode == "replicate":
        return min(max(p, 0), n - 1)
    if mode == "circular":
        return p % n
    if mode == "reflect":
        while p < 0 or p >= n:  # mirror without repeating the edge
            p = -p if p < 0 else 2 * (n - 1) - p
        return p
    raise ValueError(mode)


def _pads(padding, n, k, s, d, axis):
    if padding == "valid":
        return 0, 0
    if padding == "same":
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        return total // 2, total - total // 2
    value = padding if isinstance(padding, int) else padding[axis]
    return value, value


def naive_conv2d(x, kernel, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                 groups=1, padding_mode="zeros"):
    B, C_in, H, Wd = x.shape
    C_out, I_g, M, N = kernel.shape
    O_g = C_out // groups
    top, bottom = _pads(padding, H, M, stride[0], dilation[0], 0)
    left, right = _pads(padding, Wd, N, stride[1], dilation[1], 1)
    out_h = (H + top + bottom - (M - 1) * dilation[0] - 1) // stride[0] + 1
    out_w = (Wd + left + right - (N - 1) * dilation[1] - 1) // stride[1] + 1
    y = np.zeros((B, C_out, out_h, out_w), dtype=np.float64)
    for b in range(B):
        for o in range(C_out):
            group = o // O_g
            for oy in range(out_h):
                for ox in range(out_w):
                    total = 0.0 if bias is None else float(bias[o])
                    for i in range(I_g):
                        c = group * I_g + i
                        for m in range(M):
                            sy = _source_index(oy * stride[0] + m * dilation[0] - top, H,
                                               padding_mode)
                            if sy is None:
                                continue
                            for n in range(N):
                                sx = _source_index(ox * stride[1] + n * dilation[1] - left, Wd,
                                                   padding_mode)
                                if sx is None:
                                    continue
                                total += x[b, c, sy, sx] * kernel[o, i, m, n]
                    y[b, o, oy, ox] = total
    return y
