"""The kernel composition as one PyTorch operator, ``torch.ops.doconv.compose``.

``compose(W, D, groups, M, N)`` is K = einsum('gois,gims->goim', W, D + D_diag) laid out as
(C_out, C_in/groups, M, N), doconv-math.md. The composition depends on the kernel's volume
M*N only, so one operator serves every rank: DOConv2d passes its kernel's (M, N), DOConv1d
(K, 1) and DOConv3d (K_d, K_h*K_w), and views the contiguous result as its kernel_size.
The fixed identity D_diag is built inside the operator (the C kernel adds it on the fly), so
a layer holds no state besides W, D, bias: nothing to initialise after ``to_empty``, move,
broadcast or keep in step.

Registered with ``torch.library``: a CPU implementation (the compiled kernel of ``_ckernel``
where it applies, else einsum), a default one for every other device (einsum), a fake one
(shapes only: meta tensors, FakeTensor, torch.compile, torch.export) and an autograd formula.
Device choice is dispatch's, not a Python check's.
"""

# No `from __future__ import annotations`: TorchScript compiles einsum_compose.
from typing import List, Tuple

import torch
from torch import Tensor

from . import _ckernel

__all__ = ["compose", "einsum_compose", "identity_pattern"]


def identity_pattern(mn: int, D_mul: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """D_diag of one channel, (M*N, D_mul): floor(D_mul/MN) identities side by side, then
    zero columns (the same for every channel, so it broadcasts over C_in)."""
    s = torch.arange(D_mul, device=device)
    m = torch.arange(mn, device=device).unsqueeze(1)
    blocks = D_mul // mn
    return ((s % mn == m) & (s < blocks * mn)).to(dtype)


def einsum_compose(W: Tensor, D: Tensor, groups: int, M: int, N: int) -> Tensor:
    """The composition in plain torch ops (any device, TorchScript, traces, transforms)."""
    out_channels = W.shape[0]
    in_per_group = W.shape[1]
    D_mul = W.shape[2]
    mn = M * N
    Wg = W.reshape(groups, out_channels // groups, in_per_group, D_mul)
    Dg = (D + identity_pattern(mn, D_mul, D.dtype, D.device)).reshape(
        groups, in_per_group, mn, D_mul)
    # einsum returns a permuted view; a convolution with a non-contiguous weight is slower,
    # so lay the kernel out once.
    return torch.einsum("gois,gims->goim", Wg, Dg).reshape(
        out_channels, in_per_group, M, N).contiguous()


def einsum_backward(grad_kernel: Tensor, W: Tensor, D: Tensor,
                    groups: int) -> Tuple[Tensor, Tensor]:
    """(dL/dW, dL/dD) in differentiable ops (double backward goes through these)."""
    out_channels, in_per_group, D_mul = W.shape
    mn = D.shape[1]
    Wg = W.reshape(groups, out_channels // groups, in_per_group, D_mul)
    Dg = (D + identity_pattern(mn, D_mul, D.dtype, D.device)).reshape(
        groups, in_per_group, mn, D_mul)
    dK = grad_kernel.reshape(groups, out_channels // groups, in_per_group, mn)
    # Contiguous, as the fake implementation (and the C kernel) promise.
    grad_W = torch.einsum("goim,gims->gois", dK, Dg).reshape(W.shape).contiguous()
    grad_D = torch.einsum("goim,gois->gims", dK, Wg).reshape(D.shape).contiguous()
    return grad_W, grad_D


@torch.library.custom_op("doconv::compose", mutates_args=())
def _compose_op(W: Tensor, D: Tensor, groups: int, M: int, N: int) -> Tensor:
    return einsum_compose(W, D, groups, M, N)  # every device without its own registration


@_compose_op.register_kernel("cpu")
def _compose_cpu(W: Tensor, D: Tensor, groups: int, M: int, N: int) -> Tensor:
    if _ckernel.c_kernel_applies(W, D, M, N):
        return _ckernel.c_forward(W, D, groups, M, N)
    return einsum_compose(W, D, groups, M, N)


@_compose_op.register_fake
def _compose_fake(W: Tensor, D: Tensor, groups: int, M: int, N: int) -> Tensor:
    return W.new_empty((W.shape[0], W.shape[1], M, N))


@torch.library.custom_op("doconv::compose_backward", mutates_args=())
def _compose_backward_op(grad_kernel: Tensor, W: Tensor, D: Tensor,
                         groups: int) -> List[Tensor]:
    return list(einsum_backward(grad_kernel, W, D, groups))


@_compose_backward_op.register_kernel("cpu")
def _compose_backward_cpu(grad_kernel: Tensor, W: Tensor, D: Tensor,
                          groups: int) -> List[Tensor]:
    if _ckernel.c_kernel_applies(W, D, D.shape[1], 1):
        return list(_ckernel.c_backward(grad_kernel, W, D, groups))
    return list(einsum_backward(grad_kernel, W, D, groups))


@_compose_backward_op.register_fake
def _compose_backward_fake(grad_kernel: Tensor, W: Tensor, D: Tensor,
                           groups: int) -> List[Tensor]:
    return [torch.empty_like(W), torch.empty_like(D)]


def _setup_context(ctx, inputs, output) -> None:
    W, D, groups, _, _ = inputs
    ctx.save_for_backward(W, D)
    ctx.groups = groups


def _backward(ctx, grad_kernel: Tensor):
    W, D = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the same gradients as differentiable ops.
        grad_W, grad_D = einsum_backward(grad_kernel, W, D, ctx.groups)
    else:
        grad_W, grad_D = _compose_backward_op(grad_kernel, W, D, ctx.groups)
    needs_W, needs_D = ctx.needs_input_grad[:2]
    return grad_W if needs_W else None, grad_D if needs_D else None, None, None, None


_compose_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerCompose(torch.autograd.Function):
    """The operator's CPU C-kernel path and autograd formula, called directly.

    Eager training calls the composition twice per layer and step, and going through the
    dispatcher and the registered autograd costs more than the C kernel itself on a small
    layer (docs/benchmarks.md). Same kernels, same formulas, same results.
    """

    @staticmethod
    def forward(ctx, W: Tensor, D: Tensor, groups: int, M: int, N: int) -> Tensor:
        ctx.save_for_backward(W, D)
        ctx.groups = groups
        return _ckernel.c_forward(W, D, groups, M, N)

    @staticmethod
    def backward(ctx, grad_kernel: Tensor):
        W, D = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiable formulas, as the op
            grad_W, grad_D = einsum_backward(grad_kernel, W, D, ctx.groups)
        else:
            grad_W, grad_D = _ckernel.c_backward(grad_kernel, W, D, ctx.groups)
        needs_W, needs_D = ctx.needs_input_grad[:2]
        return grad_W if needs_W else None, grad_D if needs_D else None, None, None, None


def _plain(tensor: Tensor) -> bool:
    # Not a FakeTensor, FunctionalTensor, DTensor or other subclass: those take the operator.
    return type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter


def compose(W: Tensor, D: Tensor, groups: int, M: int, N: int) -> Tensor:
    """``torch.ops.doconv.compose``: the contiguous (C_out, C_in/groups, M, N) kernel.

    Eager calls on plain CPU tensors the C kernel serves skip the dispatcher (see
    ``_EagerCompose``); compiled, exported and traced code records the operator.
    """
    if _plain(W) and _plain(D) and not torch.compiler.is_compiling() and \
            _ckernel.c_kernel_applies(W, D, M, N):
        return _EagerCompose.apply(W, D, groups, M, N)
    return torch.ops.doconv.compose(W, D, groups, M, N)
