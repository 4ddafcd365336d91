"""Kernel composition, embedding and fusion: the D∘W math, once, in NumPy.

Canonical layout (doconv-math.md), for 1 to 3 spatial axes with MN the kernel's volume (M*N in
2-D): D (C_in, MN, D_mul), W (C_out, C_in/g, D_mul), composed kernel K (C_out, C_in/g,
*kernel_size) with

    K[o, i, m] = sum_s (D + D_diag)[c(o, i), m, s] * W[o, i, s]
    c(o, i)    = floor(o / (C_out/g)) * (C_in/g) + i
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .spec import ConvSpec, check_D_mul, check_int, check_tuple


def identity_d(in_channels: int, mn: int, D_mul: int, dtype: np.dtype = np.float32) -> np.ndarray:
    """D_diag: per channel, floor(D_mul/MN) MN x MN identities side by side, then zeros."""
    block = np.zeros((mn, D_mul), dtype=dtype)
    copies = D_mul // mn
    block[:, : copies * mn] = np.tile(np.eye(mn, dtype=dtype), (1, copies))
    return np.broadcast_to(block, (in_channels, mn, D_mul)).copy()


def _kernel_size(kernel_size: Sequence[int]) -> tuple[int, ...]:
    """kernel_size as a tuple of 1 to 3 ints >= 1 (the rank is its length; an int: 2-D)."""
    if isinstance(kernel_size, (str, bytes)) or not hasattr(kernel_size, "__len__"):
        return check_tuple("kernel_size", kernel_size, 2)
    if len(kernel_size) not in (1, 2, 3):
        raise ValueError(f"kernel_size must have 1 to 3 values (one per spatial axis), got "
                         f"{len(kernel_size)}: {kernel_size!r}")
    return check_tuple("kernel_size", kernel_size, len(kernel_size))


def _shapes(D: np.ndarray | None, W: np.ndarray, groups: int,
            kernel_size: Sequence[int]) -> tuple[int, int, int, int, int, int]:
    """(C_in, C_out, I_g, O_g, MN, D_mul) after checking D and W agree with each other."""
    groups = check_int("groups", groups)
    kernel_size = _kernel_size(kernel_size)
    if W.ndim != 3:
        raise ValueError(f"W must have shape (C_out, C_in/groups, D_mul), got shape {W.shape}")
    C_out, I_g, D_mul = W.shape
    if C_out % groups:
        raise ValueError(f"W's C_out ({C_out}) must be divisible by groups ({groups})")
    mn = math.prod(kernel_size)
    C_in = I_g * groups
    shape = "x".join(str(k) for k in kernel_size)
    if D is None:
        if mn != 1 or D_mul != 1:
            raise ValueError(
                f"D is required for a {shape} kernel; without D, W must be (C_out, "
                f"C_in/groups, 1) for a kernel of one element, got W shape {W.shape}"
            )
    elif D.shape != (C_in, mn, D_mul):
        raise ValueError(
            f"D must have shape (C_in, M*N, D_mul) = {(C_in, mn, D_mul)} to match W {W.shape}, "
            f"groups={groups} and kernel_size={kernel_size}, got shape {D.shape}"
        )
    return C_in, C_out, I_g, C_out // groups, mn, D_mul


def compose_kernel(D: np.ndarray | None, W: np.ndarray, *, groups: int,
                   kernel_size: Sequence[int], add_identity: bool = True,
                   channel_map: np.ndarray | None = None) -> np.ndarray:
    """The effective OIHW kernel of a DO-Conv layer, as one batched product.

    ``add_identity`` adds D_diag to D (the trainable D is stored without it).
    D is None for a 1x1 kernel, where the kernel is W itself. ``channel_map`` (C_out, C_in/g):
    the D channel each kernel slot (o, i) reads, for layouts that map channels differently
    from c(o, i) (the original authors' code); default c(o, i).
    """
    D = None if D is None else np.asarray(D)
    W = np.asarray(W)
    C_in, C_out, I_g, O_g, mn, D_mul = _shapes(D, W, groups, kernel_size)
    kernel_size = _kernel_size(kernel_size)
    if D is None:
        return W.reshape(C_out, I_g, *kernel_size).copy()
    D_total = D + identity_d(C_in, mn, D_mul, D.dtype) if add_identity else D
    if channel_map is not None:
        channel_map = np.asarray(channel_map)
        if channel_map.shape != (C_out, I_g):
            raise ValueError(f"channel_map must have shape (C_out, C_in/groups) = "
                             f"{(C_out, I_g)}, got {channel_map.shape}")
        K = np.einsum("oims,ois->oim", D_total[channel_map], W)
        return K.reshape(C_out, I_g, *kernel_size)
    # Batch over (group, input slot): (g, I_g, O_g, S) @ (g, I_g, S, MN) -> (g, I_g, O_g, MN).
    W_batched = W.reshape(groups, O_g, I_g, D_mul).transpose(0, 2, 1, 3)
    D_batched = D_total.reshape(groups, I_g, mn, D_mul).transpose(0, 1, 3, 2)
    K = np.matmul(W_batched, D_batched)
    return K.transpose(0, 2, 1, 3).reshape(C_out, I_g, *kernel_size)


def compose_kernel_vjp(grad_K: np.ndarray, D: np.ndarray | None, W: np.ndarray, *, groups: int,
                       kernel_size: Sequence[int]) -> tuple[np.ndarray | None, np.ndarray]:
    """(dL/dD, dL/dW) given dL/dK: the reference for the adapters' gradients."""
    D = None if D is None else np.asarray(D)
    W = np.asarray(W)
    C_in, C_out, I_g, O_g, mn, D_mul = _shapes(D, W, groups, kernel_size)
    grad_K = np.asarray(grad_K)
    if grad_K.shape != (C_out, I_g) + _kernel_size(kernel_size):
        raise ValueError(f"grad_K must have the kernel's shape, got {grad_K.shape}")
    if D is None:
        return None, grad_K.reshape(W.shape).copy()
    D_total = D + identity_d(C_in, mn, D_mul, D.dtype)
    gK = grad_K.reshape(groups, O_g, I_g, mn)
    Wg = W.reshape(groups, O_g, I_g, D_mul)
    Dg = D_total.reshape(groups, I_g, mn, D_mul)
    grad_W = np.einsum("goim,gims->gois", gK, Dg).reshape(W.shape)
    grad_D = np.einsum("goim,gois->gims", gK, Wg).reshape(D.shape)
    return grad_D, grad_W


def embed_kernel(kernel: np.ndarray, *, groups: int, D_mul: int | None = None
                 ) -> tuple[np.ndarray | None, np.ndarray]:
    """(D, W) whose composition is exactly ``kernel`` ((C_out, C_in/g, *kernel_size), OIHW
    in 2-D): D = 0, W[..., :MN] = kernel."""
    kernel = np.asarray(kernel)
    if kernel.ndim not in (3, 4, 5):
        raise ValueError("kernel must be (C_out, C_in/groups, *kernel_size) with 1 to 3 spatial "
                         f"axes (3 to 5 dimensions), got shape {kernel.shape}")
    C_out, I_g = kernel.shape[:2]
    groups = check_int("groups", groups)
    if C_out % groups:
        raise ValueError(f"the kernel's C_out ({C_out}) must be divisible by groups ({groups})")
    spec = ConvSpec(I_g * groups, C_out, kernel.shape[2:], groups=groups, D_mul=D_mul,
                    rank=kernel.ndim - 2)
    W = np.zeros(spec.W_shape, dtype=kernel.dtype)
    W[:, :, : spec.mn] = kernel.reshape(C_out, I_g, spec.mn)
    D = np.zeros(spec.D_shape, dtype=kernel.dtype) if spec.has_D else None
    return D, W


def fuse(D: np.ndarray | None, W: np.ndarray, bias: np.ndarray | None, spec: ConvSpec
         ) -> tuple[np.ndarray, np.ndarray | None]:
    """(kernel, bias) of the plain conv equal to this DO-Conv layer."""
    check_params(spec, D, W, bias)
    kernel = compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size)
    return kernel, None if bias is None else np.array(bias, copy=True)


def check_params(spec: ConvSpec, D: np.ndarray | None, W: np.ndarray,
                 bias: np.ndarray | None) -> None:
    """Raise ValueError unless D, W and bias have the shapes ``spec`` gives them."""
    _check_shapes(spec, {name: None if array is None else tuple(np.shape(array))
                         for name, array in (("D", D), ("W", W), ("bias", bias))})


def _check_shapes(spec: ConvSpec, shapes: dict[str, tuple[int, ...] | None]) -> None:
    expected = {"D": spec.D_shape, "W": spec.W_shape,
                "bias": (spec.out_channels,) if spec.bias else None}
    for name in ("D", "W", "bias"):
        want, got = expected[name], shapes[name]
        if want != got:
            raise ValueError(
                f"{name} must have shape {want} for this layer, got "
                f"{'no array' if got is None else got}"
            )


def layer_spec(W_shape: Sequence[int], D_shape: Sequence[int] | None,
               bias_shape: Sequence[int] | None, *, kernel_size: Sequence[int] | None = None,
               groups: int | None = None) -> ConvSpec:
    """The ConvSpec of the DO-Conv layer whose W, D and bias have these shapes, given what a
    file records besides them (the kernel's shape and groups, e.g. doconv_torch's extra
    state; None where it records nothing): the one decision whether stored arrays describe
    a layer the layers themselves accept (D_mul >= the kernel volume, C_in and C_out >= 1,
    groups dividing both, every shape consistent). A ValueError saying what is wrong.

    Without ``kernel_size`` the kernel is checked by its volume (D's second axis) and the
    returned spec holds it as a 1-D kernel of that volume; without ``groups``, groups is
    C_in / (C_in/groups) from D's and W's channel axes (1 for a layer without D)."""
    W_shape = tuple(int(n) for n in W_shape)
    D_shape = None if D_shape is None else tuple(int(n) for n in D_shape)
    if len(W_shape) != 3:
        raise ValueError(f"W must have shape (C_out, C_in/groups, D_mul), got {W_shape}")
    if D_shape is not None and len(D_shape) != 3:
        raise ValueError(f"D must have shape (C_in, kernel volume, D_mul), got {D_shape}")
    C_out, I_g, D_mul = W_shape
    volume = 1 if D_shape is None else D_shape[1]
    if kernel_size is None:
        check_D_mul(D_mul, volume)
        kernel = (volume,)
    else:
        kernel = _kernel_size(kernel_size)
        if math.prod(kernel) != volume:
            shape = "x".join(str(k) for k in kernel)
            raise ValueError(f"a {shape} kernel has {math.prod(kernel)} element(s), but "
                             + (f"D holds kernels of {volume}" if D_shape is not None
                                else "there is no D (a kernel of one element)"))
    if I_g < 1:
        raise ValueError(f"W {W_shape} has no input channels (C_in/groups = {I_g}); a layer "
                         "needs at least one")
    if groups is None:
        groups = 1
        if D_shape is not None:
            if D_shape[0] % I_g:
                raise ValueError(f"D {D_shape} does not fit W {W_shape}: its C_in "
                                 f"({D_shape[0]}) must be a multiple of W's C_in/groups "
                                 f"({I_g})")
            groups = max(D_shape[0] // I_g, 1)
    spec = ConvSpec(I_g * check_int("groups", groups), C_out, kernel, groups=groups,
                    D_mul=D_mul, bias=bias_shape is not None, rank=len(kernel))
    _check_shapes(spec, {"D": D_shape, "W": W_shape,
                         "bias": None if bias_shape is None else tuple(bias_shape)})
    return spec


# Layout helpers, for any number of spatial axes. PyTorch and Gluon kernels are OIHW (O, I,
# then the spatial axes) with channels-first data; Keras' kernels are HWIO with channels-last data.
def oihw_to_hwio(kernel: np.ndarray) -> np.ndarray:
    """(O, I, *spatial) -> (*spatial, I, O)."""
    rank = np.ndim(kernel) - 2
    return np.transpose(kernel, tuple(range(2, 2 + rank)) + (1, 0))


def hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    """(*spatial, I, O) -> (O, I, *spatial)."""
    rank = np.ndim(kernel) - 2
    return np.transpose(kernel, (rank + 1, rank) + tuple(range(rank)))


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> (N, *spatial, C)."""
    return np.moveaxis(x, 1, -1)


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    """(N, *spatial, C) -> (N, C, *spatial)."""
    return np.moveaxis(x, -1, 1)
