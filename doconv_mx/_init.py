"""The initializer of a DO-Conv layer's W: drawn like the weight of Gluon's conv of the same
layer."""

from __future__ import annotations

import math
from typing import Any, Sequence

import mxnet as mx
from mxnet import initializer


class KernelInit(initializer.Initializer):
    """Initialises W (C_out, C_in/g, D_mul) chunk by chunk as a (C_out, C_in/g, *kernel_size)
    conv kernel.

    Each block of MN columns (MN the kernel's volume) is drawn like the weight of nn.Conv1D,
    nn.Conv2D or nn.Conv3D of the same shape, so its scale uses the plain conv's fan-in
    (C_in/g*MN). ``inner`` None: the initializer given to ``initialize()`` (Gluon's global
    default), exactly as Gluon's convs do.
    """

    def __init__(self, inner: Any, kernel_size: Sequence[int]) -> None:
        super().__init__()
        self._inner = inner
        self._kernel_size = tuple(kernel_size)

    def _init_weight(self, desc: Any, arr: mx.nd.NDArray) -> None:
        inner = self._inner if self._inner is not None else getattr(desc, "global_init", None)
        inner = initializer.create(inner if inner is not None else "uniform")
        C_out, I_g, S = arr.shape
        mn = math.prod(self._kernel_size)
        chunks = []
        for _ in range(-(-S // mn)):  # init-time only: a few chunks, not a forward loop
            chunk = mx.nd.zeros((C_out, I_g) + self._kernel_size, dtype=arr.dtype,
                                ctx=arr.context)
            inner._init_weight(desc, chunk)
            chunks.append(chunk.reshape((C_out, I_g, mn)))
        arr[:] = mx.nd.concat(*chunks, dim=2)[:, :, :S]
