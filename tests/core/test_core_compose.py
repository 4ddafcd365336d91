"""Properties of the D∘W math: composition, initialisation, embedding, fusion, gradients."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import doconv_core as dc
from doconv_core.testing.cases import property_cases
from strategies import input_shape_for, layer_specs

TOL = dict(rtol=1e-10, atol=1e-10)  # float64 throughout


def random_params(spec, seed, D_scale=0.5):
    rng = np.random.default_rng(seed)
    D = D_scale * rng.standard_normal(spec.D_shape) if spec.has_D else None
    W = rng.standard_normal(spec.W_shape)
    bias = rng.standard_normal(spec.out_channels) if spec.bias else None
    return rng, D, W, bias


@settings(max_examples=200)
@given(spec=layer_specs(), seed=st.integers(0, 2**32 - 1))
def test_kernel_composition_equals_feature_composition(spec, seed):
    rng, D, W, bias = random_params(spec, seed)
    x = rng.standard_normal(input_shape_for(spec))
    by_kernel = dc.doconv2d(x, D, W, bias, spec)
    by_features = dc.doconv2d_features(x, D, W, bias, spec)
    assert by_kernel.shape == (x.shape[0], spec.out_channels) + spec.output_size(x.shape[2:])
    np.testing.assert_allclose(by_kernel, by_features, **TOL)


@settings(max_examples=100)
@given(spec=layer_specs(), seed=st.integers(0, 2**32 - 1))
def test_fused_conv_equals_doconv(spec, seed):
    rng, D, W, bias = random_params(spec, seed)
    x = rng.standard_normal(input_shape_for(spec))
    kernel, fused_bias = dc.fuse(D, W, bias, spec)
    assert kernel.shape == spec.kernel_shape
    fused = dc.conv2d(x, kernel, fused_bias, stride=spec.stride, padding=spec.padding,
                      dilation=spec.dilation, groups=spec.groups, padding_mode=spec.padding_mode)
    np.testing.assert_allclose(fused, dc.doconv2d_features(x, D, W, bias, spec), **TOL)


def test_composition_follows_the_channel_mapping_formula():
    # Slot (o, i) must read D channel floor(o / (C_out/g)) * (C_in/g) + i; checked slot by slot.
    spec = dc.ConvSpec(6, 9, 3, groups=3, D_mul=11)
    _, D, W, _ = random_params(spec, 1)
    K = dc.compose_kernel(D, W, groups=3, kernel_size=3)
    D_total = D + dc.identity_d(6, 9, 11, D.dtype)
    for o in range(9):
        for i in range(2):
            c = (o // 3) * 2 + i
            np.testing.assert_allclose(K[o, i].ravel(), D_total[c] @ W[o, i], **TOL)


@settings(max_examples=100)
@given(spec=layer_specs(), seed=st.integers(0, 2**32 - 1))
def test_kernel_at_initialisation_is_the_sum_of_W_blocks(spec, seed):
    _, _, W, _ = random_params(spec, seed)
    D = np.zeros(spec.D_shape) if spec.has_D else None
    K = dc.compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size)
    mn = spec.mn
    blocks = sum(W[:, :, k * mn:(k + 1) * mn] for k in range(spec.D_mul // mn))
    np.testing.assert_allclose(K.reshape(blocks.shape), blocks, **TOL)
    if spec.D_mul == mn:  # K == W exactly, not just to rounding
        np.testing.assert_array_equal(K.reshape(W.shape), W)


def test_identity_d_layout():
    block = dc.identity_d(2, 4, 10)[1]
    np.testing.assert_array_equal(block[:, :4], np.eye(4))
    np.testing.assert_array_equal(block[:, 4:8], np.eye(4))
    np.testing.assert_array_equal(block[:, 8:], 0)
    assert dc.identity_d(3, 9, 9, np.float64).dtype == np.float64


@settings(max_examples=100)
@given(spec=layer_specs(), seed=st.integers(0, 2**32 - 1))
def test_embedding_is_exact(spec, seed):
    rng = np.random.default_rng(seed)
    K0 = rng.standard_normal(spec.kernel_shape).astype(np.float32)
    D, W = dc.embed_kernel(K0, groups=spec.groups, D_mul=spec.D_mul)
    assert W.shape == spec.W_shape and W.dtype == np.float32
    assert (D is None) == (not spec.has_D)
    if D is not None:
        assert D.shape == spec.D_shape and not D.any()
    np.testing.assert_array_equal(
        dc.compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size), K0)


@settings(max_examples=50)
@given(spec=layer_specs(), seed=st.integers(0, 2**32 - 1))
def test_vjp_matches_finite_differences(spec, seed):
    rng, D, W, _ = random_params(spec, seed)
    grad_K = rng.standard_normal(spec.kernel_shape)

    def loss(D_, W_):
        K = dc.compose_kernel(D_, W_, groups=spec.groups, kernel_size=spec.kernel_size)
        return float(np.sum(K * grad_K))

    grad_D, grad_W = dc.compose_kernel_vjp(grad_K, D, W, groups=spec.groups,
                                           kernel_size=spec.kernel_size)
    eps = 1e-6
    for _ in range(3):  # random coordinates; the loss is bilinear so differences are exact-ish
        index = tuple(rng.integers(n) for n in W.shape)
        bump = np.zeros_like(W)
        bump[index] = eps
        numeric = (loss(D, W + bump) - loss(D, W - bump)) / (2 * eps)
        assert numeric == pytest.approx(grad_W[index], rel=1e-6, abs=1e-6)
        if D is not None:
            index = tuple(rng.integers(n) for n in D.shape)
            bump = np.zeros_like(D)
            bump[index] = eps
            numeric = (loss(D + bump, W) - loss(D - bump, W)) / (2 * eps)
            assert numeric == pytest.approx(grad_D[index], rel=1e-6, abs=1e-6)
    if D is None:
        assert grad_D is None


def test_property_cases_agree_with_feature_composition():
    cases = property_cases()
    assert len(cases) >= 80
    kinds = {case.name.split("-")[0] for case in cases}
    assert kinds == {"one", "between", "depthwise", "depthwise_multiplier"}
    for case in cases:
        arrays = case.arrays()
        x, D, W, bias = arrays["x"], arrays["D"], arrays["W"], arrays["bias"]
        np.testing.assert_allclose(dc.doconv2d(x, D, W, bias, case.spec),
                                   dc.doconv2d_features(x, D, W, bias, case.spec), **TOL,
                                   err_msg=case.name)


def test_compose_kernel_rejects_mismatched_shapes():
    W = np.zeros((4, 2, 9))
    with pytest.raises(ValueError, match=r"D must have shape \(C_in, M\*N, D_mul\) = \(4, 9, 9\)"):
        dc.compose_kernel(np.zeros((4, 9, 8)), W, groups=2, kernel_size=3)
    with pytest.raises(ValueError, match="D is required for a 3x3 kernel"):
        dc.compose_kernel(None, W, groups=2, kernel_size=3)
    with pytest.raises(ValueError, match=r"W's C_out \(4\) must be divisible by groups \(3\)"):
        dc.compose_kernel(None, np.zeros((4, 1, 1)), groups=3, kernel_size=1)
    with pytest.raises(ValueError, match="W must have shape"):
        dc.compose_kernel(None, np.zeros((4, 1)), groups=1, kernel_size=1)


def test_fuse_checks_parameter_shapes():
    spec = dc.ConvSpec(4, 4, 3)
    _, D, W, bias = random_params(spec, 0)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\) for this layer, got no array"):
        dc.fuse(D, W, None, spec)
    with pytest.raises(ValueError, match=r"W must have shape \(4, 4, 9\)"):
        dc.fuse(D, W[:, :2], bias, spec)


def test_layout_helpers_round_trip():
    K = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    hwio = dc.oihw_to_hwio(K)
    assert hwio.shape == (4, 5, 3, 2) and hwio[1, 2, 0, 1] == K[1, 0, 1, 2]
    np.testing.assert_array_equal(dc.hwio_to_oihw(hwio), K)
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(dc.nhwc_to_nchw(dc.nchw_to_nhwc(x)), x)
