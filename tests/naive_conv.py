"""Deliberately naive loop convolutions: the check on doconv_core.conv (and conv2d) itself.

They share no code with doconv_core: padding is done by index arithmetic, the
convolution by nested loops (six in naive_conv2d; in naive_conv, for 1 to 3 spatial axes,
one loop over every output position and one over every kernel tap).
"""

from __future__ import annotations

import itertools
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


def _per_axis(value, rank: int) -> tuple:
    return (value,) * rank if isinstance(value, int) else tuple(value)


def _pads_nd(padding, n, k, s, d, axis):
    """(before, after) for one spatial axis; 'causal' pads (k-1)*d before, none after."""
    if padding == "causal":
        return (k - 1) * d, 0
    return _pads(padding, n, k, s, d, axis)


def naive_conv(x, kernel, bias=None, stride=1, padding=0, dilation=1, groups=1,
               padding_mode="zeros"):
    """The same naive loops for 1, 2 or 3 spatial axes: x (B, C_in, *spatial), kernel
    (C_out, C_in/groups, *kernel_size); stride, dilation and padding an int or one per axis,
    or padding 'valid', 'same' or (1-D) 'causal'. Every output position and every kernel tap
    is visited one at a time; each padded coordinate is resolved by _source_index."""
    B, C_in = x.shape[:2]
    sizes = x.shape[2:]
    C_out, I_g = kernel.shape[:2]
    ksize = kernel.shape[2:]
    rank = len(sizes)
    assert len(ksize) == rank and rank in (1, 2, 3) and C_in == I_g * groups
    assert padding != "causal" or rank == 1
    stride, dilation = _per_axis(stride, rank), _per_axis(dilation, rank)
    O_g = C_out // groups
    before, out_sizes = [], []
    for axis in range(rank):
        lo, hi = _pads_nd(padding, sizes[axis], ksize[axis], stride[axis], dilation[axis], axis)
        before.append(lo)
        out_sizes.append(
            (sizes[axis] + lo + hi - (ksize[axis] - 1) * dilation[axis] - 1) // stride[axis] + 1)
    y = np.zeros((B, C_out, *out_sizes), dtype=np.float64)
    taps = list(itertools.product(*(range(k) for k in ksize)))
    for b in range(B):
        for o in range(C_out):
            group = o // O_g
            for out in itertools.product(*(range(n) for n in out_sizes)):
                total = 0.0 if bias is None else float(bias[o])
                for i in range(I_g):
                    c = group * I_g + i
                    for tap in taps:
                        source = []
                        for axis in range(rank):
                            p = out[axis] * stride[axis] + tap[axis] * dilation[axis] - before[axis]
                            source.append(_source_index(p, sizes[axis], padding_mode))
                        if None in source:
                            continue
                        total += x[(b, c, *source)] * kernel[(o, i, *tap)]
                y[(b, o, *out)] = total
    return y
