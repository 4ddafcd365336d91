"""DOConv2d as a module: signature, state, initialisation, repr, errors, dtypes and layouts."""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import doconv_core as dc
from doconv_torch import DOConv2d


def test_positional_order_is_nn_conv2ds():
    layer = DOConv2d(2, 4, 3, 2, 1, 1, 2, False, "reflect")
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, layer.padding_mode, layer.D_mul) == \
        (2, 4, (3, 3), (2, 2), (1, 1), (1, 1), 2, "reflect", 9)
    assert layer.bias is None
    with pytest.raises(TypeError):
        DOConv2d(2, 4, 3, 1, 0, 1, 1, True, "zeros", None, None, 12)  # D_mul is keyword-only


def test_parameters_buffers_and_state_dict():
    layer = DOConv2d(4, 6, (3, 2), groups=2, D_mul=8)
    assert dict((n, tuple(p.shape)) for n, p in layer.named_parameters()) == {
        "W": (6, 2, 8), "D": (4, 6, 8), "bias": (6,)}
    assert list(layer.state_dict()) == ["W", "D", "bias", "_extra_state"]
    assert layer.state_dict()["_extra_state"].tolist() == [1, 2, 2, 3, 2]
    # The fixed identity D_diag is part of the composition, not module state.
    assert list(layer.named_buffers()) == []
    with torch.no_grad():
        layer.W.normal_()
        layer.D.normal_()
    expected = np.einsum("gois,gims->goim", layer.W.detach().numpy().reshape(2, 3, 2, 8),
                         (layer.D.detach().numpy() + dc.identity_d(4, 6, 8)).reshape(2, 2, 6, 8))
    np.testing.assert_allclose(layer.weight.detach().numpy(), expected.reshape(6, 2, 3, 2),
                               rtol=1e-5, atol=1e-5)


def test_one_by_one_has_no_D():
    layer = DOConv2d(3, 5, 1, bias=False)
    assert layer.D is None and layer.D_mul == 1
    assert list(layer.state_dict()) == ["W", "_extra_state"]
    assert torch.equal(layer.weight, layer.W.reshape(5, 3, 1, 1))


@pytest.mark.parametrize("kwargs", [dict(), dict(groups=2), dict(kernel_size=(1, 3)),
                                    dict(kernel_size=1, bias=False)], ids=str)
def test_initialisation_draws_exactly_nn_conv2ds_weight_and_bias(kwargs):
    """With D_mul = M*N (the default) and D = 0 the composed kernel is nn.Conv2d's init."""
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    torch.manual_seed(7)
    native = nn.Conv2d(**args)
    torch.manual_seed(7)
    layer = DOConv2d(**args)
    assert torch.equal(layer.weight, native.weight)
    assert (layer.bias is None) == (native.bias is None)
    if native.bias is not None:
        assert torch.equal(layer.bias, native.bias)
    if layer.D is not None:
        assert torch.count_nonzero(layer.D) == 0


def test_W_bound_uses_the_conv_fan_in_for_any_D_mul():
    layer = DOConv2d(8, 64, 3, D_mul=30)
    bound = 1 / math.sqrt(8 * 9)  # kaiming_uniform(a=sqrt(5)) with fan_in = C_in/g * M * N
    assert layer.W.abs().max() <= bound
    assert layer.W.abs().max() > 0.95 * bound
    assert layer.bias.abs().max() <= bound


def test_weight_is_the_composed_kernel():
    layer = DOConv2d(4, 6, 3, groups=2, D_mul=11)
    with torch.no_grad():
        layer.D.normal_()
    expected = dc.compose_kernel(layer.D.detach().numpy(), layer.W.detach().numpy(), groups=2,
                                 kernel_size=(3, 3))
    weight = layer.weight
    assert weight.shape == (6, 2, 3, 3) and weight.requires_grad
    np.testing.assert_allclose(weight.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    weight.sum().backward()
    assert layer.W.grad is not None and layer.D.grad is not None
    with pytest.raises(AttributeError, match="cannot be assigned; set W and D"):
        layer.weight = torch.zeros(6, 2, 3, 3)
    with pytest.raises(KeyError, match="attribute 'weight' already exists"):  # nn.Module's
        layer.weight = nn.Parameter(torch.zeros(6, 2, 3, 3))


@pytest.mark.parametrize("args, kwargs", [
    ((3, 8, 3), dict()),
    ((4, 8, (3, 5)), dict(stride=(2, 1), padding=(1, 2), dilation=2, groups=4, bias=False,
                          padding_mode="circular")),
    ((3, 3, 3), dict(padding="same", padding_mode="reflect")),
    ((3, 3, 3), dict(padding="valid")),
    ((3, 6, 1), dict(groups=3)),
])
def test_repr_is_nn_conv2ds_plus_D_mul(args, kwargs):
    layer = DOConv2d(*args, **kwargs)
    native = repr(nn.Conv2d(*args, **kwargs))
    assert repr(layer) == "DO" + native[:-1] + f", D_mul={layer.D_mul})"


BAD_ARGUMENTS = [
    (dict(in_channels=0), "in_channels must be an integer >= 1, got 0"),
    (dict(in_channels=2.0), "in_channels must be an integer >= 1, got 2.0 (float)"),
    (dict(out_channels=-1), "out_channels must be an integer >= 1, got -1"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size must be an integer >= 1 or a pair of them, "
                                  "got 3 values: (3, 3, 3)"),
    (dict(kernel_size=0), "kernel_size must be an integer >= 1 or a pair of them, got 0 (int)"),
    (dict(stride=0), "stride must be an integer >= 1 or a pair of them, got 0 (int)"),
    (dict(padding=-1), "padding must be 'valid', 'same', an integer >= 0 or a pair of them, "
                       "got -1 (int)"),
    (dict(padding="full"), "padding must be 'valid', 'same', an integer >= 0 or a pair of "
                           "them, got 'full'"),
    (dict(dilation=(1, 0)), "dilation must be an integer >= 1 or a pair of them, got (1, 0)"),
    (dict(groups=0), "groups must be an integer >= 1, got 0"),
    (dict(groups=4), "in_channels must be divisible by groups (4), got 6"),
    (dict(groups=5, in_channels=5), "out_channels must be divisible by groups (5), got 8"),
    (dict(bias=1), "bias must be True or False, got 1 (int)"),
    (dict(padding_mode="zero"), "padding_mode must be one of 'zeros', 'reflect', 'replicate', "
                                "'circular', got 'zero'"),
    (dict(D_mul=8), "D_mul must be >= kernel height*width = 9 for a 3x3 kernel, got 8"),
    (dict(D_mul=0), "D_mul must be an integer >= 1, got 0"),
    (dict(kernel_size=1, D_mul=2), "D_mul must be 1 or None for a 1x1 kernel (it has no "
                                   "depthwise part), got 2"),
    (dict(padding="same", stride=2), "padding='same' is not supported for strided convolutions "
                                     "in PyTorch, got stride=(2, 2)"),
    (dict(dtype=torch.int64), "dtype must be a floating point torch.dtype, got torch.int64"),
]


@pytest.mark.parametrize("override, message", BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
def test_bad_arguments_raise_clear_value_errors(override, message):
    kwargs = dict(in_channels=6, out_channels=8, kernel_size=3)
    kwargs.update(override)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DOConv2d(**kwargs)


def test_wrong_input_raises_clear_value_error():
    layer = DOConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=re.escape(
            "input must have 3 channels (the layer's in_channels), got 5")):
        layer(torch.zeros(2, 5, 8, 8))
    with pytest.raises(ValueError, match=re.escape(
            "input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape (3, 8)")):
        layer(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="input must be a torch.Tensor, got ndarray"):
        layer(np.zeros((1, 3, 8, 8), np.float32))


def test_unbatched_input_works_like_nn_conv2d():
    layer = DOConv2d(3, 4, 3, padding=1)
    x = torch.randn(3, 6, 7)
    assert torch.allclose(layer(x), layer(x[None])[0], rtol=1e-6, atol=1e-6)


def test_device_and_dtype_arguments():
    layer = DOConv2d(2, 3, 3, device="cpu", dtype=torch.float64)
    for tensor in (layer.W, layer.D, layer.bias):
        assert tensor.dtype == torch.float64 and tensor.device.type == "cpu"
    y = layer(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64
    fused = layer.fuse()
    assert fused.weight.dtype == torch.float64 and fused.weight.device.type == "cpu"
    assert layer.float().W.dtype == torch.float32 and layer.weight.dtype == torch.float32


def test_float64_matches_reference_tightly():
    layer = DOConv2d(4, 4, 3, groups=2, padding=1, padding_mode="replicate",
                     dtype=torch.float64, D_mul=13)
    with torch.no_grad():
        layer.D.normal_()
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    expected = dc.doconv2d(x.numpy(), layer.D.detach().numpy(), layer.W.detach().numpy(),
                           layer.bias.detach().numpy(), layer.spec)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-12, atol=1e-13)


def test_channels_last_input():
    layer = DOConv2d(4, 6, 3, padding=1, groups=2)
    with torch.no_grad():
        layer.D.normal_()
    x = torch.randn(2, 4, 9, 8)
    x_last = x.to(memory_format=torch.channels_last)
    y_last = layer(x_last)
    torch.testing.assert_close(y_last, layer(x), rtol=1e-5, atol=1e-6)
    y_last.sum().backward()
    assert layer.D.grad is not None
    # A channels_last module works too (W, D are 3-D: only inputs/outputs change layout).
    layer.to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x_last), layer(x), rtol=1e-5, atol=1e-6)


def test_autocast_bfloat16_on_cpu():
    layer = DOConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        layer.D.normal_(0, 0.3)
    fused = layer.fuse()
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_fused = fused(x)
    assert y.dtype == torch.bfloat16
    # The kernel is composed in float32 and cast by the conv, exactly as the fused conv's.
    assert torch.equal(y, y_fused)
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert layer.W.grad.dtype == torch.float32 and torch.isfinite(layer.D.grad).all()


def test_bfloat16_parameters():
    layer = DOConv2d(2, 2, 3, dtype=torch.bfloat16)
    assert layer(torch.randn(1, 2, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
    params = layer.to_params()
    # bfloat16 stays bfloat16 (an ml_dtypes array, as Keras' to_params gives), exactly.
    ml_dtypes = pytest.importorskip("ml_dtypes")  # the torch env has it (constraints/torch.txt)
    assert params.W.dtype == ml_dtypes.bfloat16 and params.D.dtype == ml_dtypes.bfloat16
    assert torch.equal(torch.from_numpy(params.W.astype(np.float32)), layer.W.float())


def test_composition_is_one_batched_product_whatever_the_channel_count(compose_backend):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    counts = []
    for channels, groups in ((4, 2), (64, 2), (64, 32)):
        layer = DOConv2d(channels, channels, 3, groups=groups, D_mul=12)
        with torch.no_grad(), Ops() as mode:
            layer._compose()
        counts.append(sorted(mode.ops))
    assert counts[0] == counts[1] == counts[2]
    # Einsum: the one operator (one bmm inside it). The C kernel, called directly in eager
    # mode: one allocation it fills.
    expected = ["aten.empty"] if compose_backend == "c" else ["doconv.compose"]
    assert counts[0] == expected, counts[0]


def test_composed_kernel_is_contiguous():
    # A non-contiguous weight makes F.conv2d copy or take a slow path on every call.
    for groups, out_channels in ((1, 16), (4, 16), (8, 16)):
        layer = DOConv2d(8, out_channels, 3, groups=groups, D_mul=11)
        assert layer.weight.is_contiguous()
        with torch.no_grad():
            assert layer.weight.is_contiguous()
