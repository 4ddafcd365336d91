"""DOConv2d against the NumPy reference on the core's fixed case set, and gradients.

Tolerances: float32 rtol 1e-4 / atol 1e-5, float64 rtol 1e-10 / atol 1e-12 (torch_helpers.TOL).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck
from torch.func import functional_call

import doconv_core as dc
from doconv_core.testing.cases import property_cases
from strategies import input_shape_for, layer_specs
from torch_helpers import TOL, layer_for, tensor

CASES = property_cases()
DTYPES = [torch.float32, torch.float64]


def torch_supports(spec: dc.ConvSpec) -> bool:
    # PyTorch (nn.Conv2d and DOConv2d alike) refuses padding='same' with a stride > 1.
    return not (spec.padding == "same" and spec.stride != (1, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_output_and_fused_kernel_match_reference(case, dtype):
    arrays = case.arrays(np.float64, seed=1)
    rtol, atol = TOL[dtype]
    spec = case.spec
    expected_kernel = dc.compose_kernel(arrays["D"], arrays["W"], groups=spec.groups,
                                        kernel_size=spec.kernel_size)
    if not torch_supports(spec):
        with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
            layer_for(spec, dtype=dtype)
        layer = layer_for(spec, {k: None if v is None else v.astype(np.float64)
                                 for k, v in arrays.items()}, dtype=dtype, padding=0)
        np.testing.assert_allclose(layer.fuse().weight.detach().double().numpy(),
                                   expected_kernel, rtol=rtol, atol=atol)
        return
    layer = layer_for(spec, arrays, dtype=dtype)
    x = tensor(arrays["x"], dtype)
    y = layer(x)
    assert y.dtype == dtype
    expected = dc.doconv2d(arrays["x"], arrays["D"], arrays["W"], arrays["bias"], spec)
    np.testing.assert_allclose(y.detach().double().numpy(), expected, rtol=rtol, atol=atol)
    fused = layer.fuse()
    assert fused.weight.dtype == dtype
    np.testing.assert_allclose(fused.weight.detach().double().numpy(), expected_kernel,
                               rtol=rtol, atol=atol)
    # The fused conv runs the layer's own kernel through the same op: bit-identical.
    assert torch.equal(fused(x), y)


@pytest.mark.parametrize("case", [c for c in CASES if torch_supports(c.spec)][::3],
                         ids=lambda c: c.name)
def test_feature_composition_agrees(case):
    """The independent feature-composition oracle (checks the channel mapping c(o, i))."""
    arrays = case.arrays(np.float64, seed=2)
    y = layer_for(case.spec, arrays)(tensor(arrays["x"])).detach().numpy()
    expected = dc.doconv2d_features(arrays["x"], arrays["D"], arrays["W"], arrays["bias"],
                                    case.spec)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if torch_supports(c.spec)][::4],
                         ids=lambda c: c.name)
def test_gradients_match_reference_vjp(case):
    """dL/dD, dL/dW from autograd equal the core's compose_kernel_vjp of dL/dK (float64)."""
    arrays = case.arrays(np.float64, seed=3)
    layer = layer_for(case.spec, arrays)
    fused = layer.fuse()
    x = tensor(arrays["x"])
    grad_out = torch.randn(layer(x).shape, dtype=torch.float64)
    layer(x).backward(grad_out)
    fused(x).backward(grad_out)
    grad_D, grad_W = dc.compose_kernel_vjp(fused.weight.grad.numpy(), arrays["D"], arrays["W"],
                                           groups=case.spec.groups,
                                           kernel_size=case.spec.kernel_size)
    np.testing.assert_allclose(layer.W.grad.numpy(), grad_W, rtol=1e-10, atol=1e-12)
    if grad_D is None:
        assert layer.D is None
    else:
        np.testing.assert_allclose(layer.D.grad.numpy(), grad_D, rtol=1e-10, atol=1e-12)
    if layer.bias is not None:
        np.testing.assert_allclose(layer.bias.grad.numpy(), fused.bias.grad.numpy(),
                                   rtol=1e-12)


GRADCHECK = [
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=(3, 1), groups=2, D_mul=5, stride=2,
         padding_mode="reflect", padding=1),
    dict(in_channels=2, out_channels=4, kernel_size=3, groups=2, dilation=2, padding="same",
         padding_mode="circular"),
    dict(in_channels=2, out_channels=2, kernel_size=1, bias=True),
    dict(in_channels=3, out_channels=2, kernel_size=(1, 3), D_mul=4, bias=False,
         padding_mode="replicate", padding=(0, 1)),
]


@pytest.mark.parametrize("kwargs", GRADCHECK, ids=str)
def test_gradcheck_float64(kwargs):
    from doconv_torch import DOConv2d

    layer = DOConv2d(**kwargs, dtype=torch.float64)
    with torch.no_grad():
        if layer.D is not None:
            layer.D.normal_(0, 0.5)  # away from D = 0 so every term is exercised
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())
    x = torch.randn(2, kwargs["in_channels"], 5, 6, dtype=torch.float64, requires_grad=True)

    def run(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x,))

    assert gradcheck(run, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)
    expected = {"W", "bias"} if kwargs.get("bias", True) else {"W"}
    if layer.D is not None:
        expected.add("D")
    assert set(names) == expected


@settings(max_examples=40)
@given(spec=layer_specs().filter(torch_supports), seed=st.integers(0, 2**16))
def test_random_specs_match_reference(spec, seed):
    """Hypothesis over the shared layer-spec strategy, float64, tight tolerance."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape_for(spec))
    D = rng.standard_normal(spec.D_shape) if spec.has_D else None
    W = rng.standard_normal(spec.W_shape)
    bias = rng.standard_normal(spec.out_channels) if spec.bias else None
    layer = layer_for(spec, {"D": D, "W": W, "bias": bias})
    np.testing.assert_allclose(layer(tensor(x)).detach().numpy(),
                               dc.doconv2d(x, D, W, bias, spec), rtol=1e-10, atol=1e-10)


def test_functorch_grad_matches_autograd():
    from doconv_torch import DOConv2d

    layer = DOConv2d(2, 4, 3, padding=1, groups=2, D_mul=11, dtype=torch.float64)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grads = torch.func.grad(lambda p: functional_call(layer, p, (x,)).pow(2).sum())(params)
    layer(x).pow(2).sum().backward()
    for name, value in grads.items():
        torch.testing.assert_close(value, getattr(layer, name).grad, rtol=1e-10, atol=1e-12)
