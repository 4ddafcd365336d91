"""Properties of the D∘W math: composition, initialisation, embedding, fusion, gradients."""

import numpy as np
import pytest

import doconv_core as dc
from doconv_core.testing.cases import property_cases

TOL = dict(rtol=1e-10, atol=1e-10)  # float64 throughout


def random_params(spec, seed, D_scale=0.5):
    rng = np.random.default_rng(seed)
    D = D_scale * rng.standard_normal(spec.D_shape) if spec.has_D else None
    W = rng.standard_normal(spec.W_shape)
    bias = rng.standard_normal(spec.out_channels) if spec.bias else None
    return rng, D, W, bias


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


def test_identity_d_layout():
    block = dc.identity_d(2, 4, 10)[1]
    np.testing.assert_array_equal(block[:, :4], np.eye(4))
    np.testing.assert_array_equal(block[:, 4:8], np.eye(4))
    np.testing.assert_array_equal(block[:, 8:], 0)
    assert dc.identity_d(3, 9, 9, np.float64).dtype == np.float64


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
