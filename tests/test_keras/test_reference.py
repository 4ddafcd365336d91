"""DOConv2D against the NumPy reference on the core's fixed case set, both data formats."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import keras

import doconv_core
from doconv_core import DOConvParams
from doconv_core.testing.cases import property_cases
from doconv_tf import DOConv2D
from kutils import (assert_fused_equal, expect_channels_first_refusal, float64, gradients,
                    keras_layer_kind, to_keras, to_nchw)


def keras_reason(case) -> str | None:
    """Why Keras cannot express a case (any rank), or None."""
    spec = case.spec
    if not isinstance(spec.padding, str):
        strings = "'valid', 'same' and 'causal'" if spec.rank == 1 else "'valid' and 'same'"
        return f"explicit integer padding: Keras' Conv{spec.rank}D has only {strings}"
    if max(spec.stride) > 1 and max(spec.dilation) > 1:
        return f"strides > 1 with dilation_rate > 1: Keras' Conv{spec.rank}D refuses it"
    return None


def keras_case(case):
    # Keras pads with zeros only: every case runs with padding_mode 'zeros' (with 'valid'
    # padding nothing is padded, so only the 'same' cases of other modes change meaning:
    # they test the case's geometry with zero padding).
    return dataclasses.replace(case, spec=dataclasses.replace(case.spec, padding_mode="zeros"))


ALL = property_cases()
SUPPORTED = [keras_case(c) for c in ALL if keras_reason(c) is None]
UNSUPPORTED = {c.name: keras_reason(c) for c in ALL if keras_reason(c) is not None}
FORMATS = ("channels_last", "channels_first")


def test_case_split_is_explicit():
    # Every case is either run or listed with its reason; the run set spans every group kind
    # and kernel size, 'valid' and 'same', strides and dilations.
    assert len(SUPPORTED) + len(UNSUPPORTED) == len(ALL)
    assert len(SUPPORTED) >= 40
    assert set(UNSUPPORTED.values()) <= {
        "explicit integer padding: Keras' Conv2D has only 'valid' and 'same'",
        "strides > 1 with dilation_rate > 1: Keras' Conv2D refuses it"}
    kinds = {c.name.split("-")[0] for c in SUPPORTED}
    assert kinds == {"one", "between", "depthwise", "depthwise_multiplier"}
    assert {c.spec.kernel_size for c in SUPPORTED} == {(1, 1), (3, 3), (5, 5), (1, 3), (3, 1)}
    assert {c.spec.padding for c in SUPPORTED} == {"valid", "same"}
    assert any(c.spec.stride == (2, 2) for c in SUPPORTED)
    assert any(c.spec.dilation == (2, 2) for c in SUPPORTED)


@pytest.mark.parametrize("case", [c for c in ALL if keras_reason(c)],
                         ids=lambda c: c.name)
def test_unsupported_cases_are_refused(case):
    spec = case.spec
    with pytest.raises(ValueError, match="padding must be 'valid' or 'same'|strides > 1"):
        DOConv2D(spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                 dilation_rate=spec.dilation, groups=spec.groups, D_mul=spec.D_mul)


def layer_for(case, arrays, data_format, dtype="float32"):
    params = DOConvParams(case.spec, arrays["W"], arrays["D"], arrays["bias"])
    return DOConv2D.from_params(params, data_format=data_format, dtype=dtype)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", SUPPORTED, ids=lambda c: c.name)
def test_output_kernel_and_fused_match_reference(case, data_format, request):
    arrays = case.arrays(np.float32)
    layer = layer_for(case, arrays, data_format)
    x = arrays["x"]
    ref = {k: None if v is None else v.astype(np.float64) for k, v in arrays.items()}
    expected = doconv_core.doconv2d(ref["x"], ref["D"], ref["W"], ref["bias"], case.spec)
    # The feature composition agrees with the kernel one: an independent check of c(o, i).
    np.testing.assert_allclose(
        doconv_core.doconv2d_features(ref["x"], ref["D"], ref["W"], ref["bias"], case.spec),
        expected, atol=1e-10)
    got = to_nchw(keras.ops.convert_to_numpy(layer(to_keras(x, data_format))), data_format)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # float32 rounding
    kernel = doconv_core.compose_kernel(ref["D"], ref["W"], groups=case.spec.groups,
                                        kernel_size=case.spec.kernel_size)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel),
                               doconv_core.oihw_to_hwio(kernel), rtol=1e-6, atol=1e-6)
    # Exported parameters are the ones loaded, in the canonical layout.
    exported = layer.to_params()
    assert exported.spec == case.spec
    np.testing.assert_array_equal(exported.W, arrays["W"])
    if case.spec.has_D:
        np.testing.assert_array_equal(exported.D, arrays["D"])
    conv = layer.fuse()
    depthwise = case.spec.groups == case.spec.in_channels > 1 and \
        case.spec.stride[0] == case.spec.stride[1]
    assert type(conv) is (keras.layers.DepthwiseConv2D if depthwise else keras.layers.Conv2D)
    # Last, Keras' own layer runs: the fused one.
    expect_channels_first_refusal(request, data_format, keras_layer_kind(case.spec))
    fused = to_nchw(keras.ops.convert_to_numpy(conv(to_keras(x, data_format))), data_format)
    assert_fused_equal(fused, got, data_format)


GRADIENT_CASES = SUPPORTED[::3]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", GRADIENT_CASES, ids=lambda c: c.name)
def test_gradients_match_reference_float64(case, data_format):
    dtype, atol = "float64", 1e-10
    with float64():
        arrays = case.arrays(np.float64, seed=1)
        layer = layer_for(case, arrays, data_format, dtype=dtype)
        x = arrays["x"].astype(dtype)
        y_shape = doconv_core.doconv2d(arrays["x"], arrays["D"], arrays["W"], arrays["bias"],
                                       case.spec).shape
        grad_y = np.random.default_rng(3).standard_normal(y_shape).astype(dtype)
        got = gradients(layer, to_keras(x, data_format), to_keras(grad_y, data_format))
    expected = doconv_core.doconv2d_vjp(arrays["x"], arrays["D"], arrays["W"], arrays["bias"],
                                        case.spec, grad_y.astype(np.float64))
    np.testing.assert_allclose(to_nchw(got["x"], data_format), expected["x"], atol=atol)
    np.testing.assert_allclose(np.transpose(got["W"], (2, 1, 0)), expected["W"], atol=atol)
    if case.spec.has_D:
        np.testing.assert_allclose(got["D"], expected["D"], atol=atol)
    if case.spec.bias:
        np.testing.assert_allclose(got["bias"], expected["bias"], atol=atol)


def test_gradient_oracle_matches_finite_differences():
    # One small case checked directly against central differences of the reference output.
    case = next(c for c in GRADIENT_CASES if c.spec.groups > 1 and c.spec.has_D)
    arrays = case.arrays(np.float64, seed=2)
    spec = case.spec
    grad_y = np.random.default_rng(4).standard_normal(
        doconv_core.doconv2d(arrays["x"], arrays["D"], arrays["W"], arrays["bias"], spec).shape)
    with float64():
        layer = layer_for(case, arrays, "channels_last", dtype="float64")
        got = gradients(layer, to_keras(arrays["x"], "channels_last"),
                        to_keras(grad_y, "channels_last"))
    grad_D = got["D"]
    eps = 1e-6
    rng = np.random.default_rng(5)
    for _ in range(5):
        index = tuple(rng.integers(0, n) for n in arrays["D"].shape)
        plus, minus = arrays["D"].copy(), arrays["D"].copy()
        plus[index] += eps
        minus[index] -= eps
        f = lambda D: np.sum(doconv_core.doconv2d(arrays["x"], D, arrays["W"], arrays["bias"],
                                                  spec) * grad_y)
        assert abs((f(plus) - f(minus)) / (2 * eps) - grad_D[index]) < 1e-6
