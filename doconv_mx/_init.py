"""The initializer of DOConv2D's W: drawn like nn.Conv2D's weight of the same layer."""

from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet import initializer


class KernelInit(initializer.Initializer):
    """Initialises W (C_out, C_in/g, D_mul) chunk by chunk as an OIHW conv kernel.

    Each block of M*N columns is drawn like nn.Conv2D's weight of the same shape, so its
    scale uses the plain conv's fan-in (C_in/g*M*N). ``inner`` None: the initializer given
    to ``initialize()`` (Gluon's global default), exactly as nn.Conv2D does.
    """

    def __init__(self, inner: Any, kernel_size: tuple[int, int]) -> None:
        super().__init__()
        self._inner = inner
        self._kernel_size = tuple(kernel_size)

    def _init_weight(self, desc: Any, arr: mx.nd.NDArray) -> None:
        inner = self._inner if self._inner is not None else getattr(desc, "global_init", None)
        inner = initializer.create(inner if inner is not None else "uniform")
        C_out, I_g, S = arr.shape
        M, N = self._kernel_size
        mn = M * N
        chunks = []
        for _ in range(-(-S // mn)):  # init-time only: a few chunks, not a forward loop
            chunk = mx.nd.zeros((C_out, I_g, M, N), dtype=arr.dtype, ctx=arr.context)
            inner._init_weight(desc, chunk)
            chunks.append(chunk.reshape((C_out, I_g, mn)))
        arr[:] = mx.nd.concat(*chunks, dim=2)[:, :, :S]
