"""The pure-torch candidates of the experiment (the C kernel is doconv_torch._ckernel)."""
import torch

import doconv_core


def make_d_diag(C_in, MN, S, dtype=torch.float32):
    return torch.from_numpy(doconv_core.identity_d(C_in, MN, S)).to(dtype)


def compose_einsum(W, D, D_diag, groups, M, N):
    """The reference: one einsum, autograd backward."""
    O, Ig, S = W.shape
    Dg = (D + D_diag).reshape(groups, Ig, M * N, S)
    return torch.einsum("gois,gims->goim", W.reshape(groups, O // groups, Ig, S), Dg).reshape(
        O, Ig, M, N)


class ComposeBmm(torch.autograd.Function):
    """pure torch: W stored (i,o,s)-strided [g==1 only], bmm per input channel, K returned as a permuted view."""
    @staticmethod
    def forward(ctx, W, D, Dd, M, N):
        Wios = W.permute(1, 0, 2)              # contiguous if param stored (i,o,s)
        Dp = D + Dd
        ctx.save_for_backward(Wios, Dp)
        K = torch.bmm(Wios, Dp.transpose(1, 2))   # (i,o,m)
        return K.permute(1, 0, 2).reshape(W.shape[0], W.shape[1], M, N) if False else K.permute(1, 0, 2).unflatten(2, (M, N))
    @staticmethod
    def backward(ctx, dK):
        Wios, Dp = ctx.saved_tensors
        g = dK.flatten(2).permute(1, 0, 2)       # (i,o,m) strided view; bmm handles lda != cols
        gW = torch.bmm(g, Dp)                     # (i,o,s) contiguous
        gD = torch.bmm(g.transpose(1, 2), Wios)  # (i,m,s)
        return gW.permute(1, 0, 2), gD, None, None, None

def bcast(W, D, Dd, g, M, N):
    O, Ig, S = W.shape
    Dp = (D + Dd).reshape(g, 1, Ig, M * N, S)
    return (W.reshape(g, O // g, Ig, 1, S) * Dp).sum(-1).reshape(O, Ig, M, N)

def split_identity(W, D, Dd, g, M, N):
    """K = einsum(W, D) + sum of W's identity blocks (drops D_diag from the product)."""
    O, Ig, S = W.shape
    MN = M * N; nb = S // MN
    K = torch.einsum("gois,gims->goim", W.reshape(g, O // g, Ig, S), D.reshape(g, Ig, MN, S))
    K = K.reshape(O, Ig, MN) + W[..., :nb * MN].reshape(O, Ig, nb, MN).sum(2)
    return K.reshape(O, Ig, M, N)
