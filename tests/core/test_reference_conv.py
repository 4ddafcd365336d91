"""doconv_core.conv2d, the oracle, checked against a naive loop implementation."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import doconv_core as dc
from naive_conv import naive_conv2d

CONFIGS = [
    # (C_in, C_out, groups, kernel, stride, padding, dilation)
    (1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)),
    (2, 3, 1, (3, 3), (1, 1), (1, 1), (1, 1)),
    (4, 6, 2, (3, 3), (2, 2), (1, 1), (1, 1)),
    (3, 3, 3, (3, 3), (1, 2), "same", (2, 1)),
    (2, 6, 2, (5, 5), (2, 1), "same", (1, 1)),
    (3, 2, 1, (1, 3), (1, 1), (0, 1), (1, 1)),
    (2, 2, 1, (3, 1), (2, 2), "valid", (1, 2)),
    (4, 4, 2, (5, 5), (1, 1), (2, 1), (2, 2)),
    (2, 4, 2, (3, 3), (3, 2), "same", (1, 1)),
]


@pytest.mark.parametrize("mode", dc.PADDING_MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_conv2d_matches_naive_loops(config, mode):
    C_in, C_out, groups, kernel_size, stride, padding, dilation = config
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, C_in, 8, 9))
    kernel = rng.standard_normal((C_out, C_in // groups) + kernel_size)
    bias = rng.standard_normal(C_out)
    expected = naive_conv2d(x, kernel, bias, stride, padding, dilation, groups, mode)
    actual = dc.conv2d(x, kernel, bias, stride=stride, padding=padding, dilation=dilation,
                       groups=groups, padding_mode=mode)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=60)
@given(
    in_per_group=st.integers(1, 2), out_per_group=st.integers(1, 2), groups=st.integers(1, 3),
    kernel_size=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.one_of(st.sampled_from(["valid", "same"]),
                      st.tuples(st.integers(0, 2), st.integers(0, 2))),
    mode=st.sampled_from(dc.PADDING_MODES), size=st.tuples(st.integers(5, 8), st.integers(5, 8)),
    seed=st.integers(0, 1000),
)
def test_conv2d_matches_naive_loops_random(in_per_group, out_per_group, groups, kernel_size,
                                           stride, dilation, padding, mode, size, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, in_per_group * groups) + size)
    kernel = rng.standard_normal((out_per_group * groups, in_per_group) + kernel_size)
    expected = naive_conv2d(x, kernel, None, stride, padding, dilation, groups, mode)
    actual = dc.conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation,
                       groups=groups, padding_mode=mode)
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


def test_same_padding_keeps_size_at_stride_one_and_ceil_divides_with_stride():
    x = np.ones((1, 1, 7, 6))
    for k, s in itertools.product((1, 2, 3, 4), (1, 2, 3)):
        y = dc.conv2d(x, np.ones((1, 1, k, k)), stride=s, padding="same")
        assert y.shape[2:] == (-(-7 // s), -(-6 // s))


def test_padding_modes_pad_as_pytorch_does():
    x = np.arange(4.0).reshape(1, 1, 1, 4)
    pads = ((0, 0), (2, 2))
    assert dc.pad_input(x, pads, "zeros")[0, 0, 0].tolist() == [0, 0, 0, 1, 2, 3, 0, 0]
    assert dc.pad_input(x, pads, "reflect")[0, 0, 0].tolist() == [2, 1, 0, 1, 2, 3, 2, 1]
    assert dc.pad_input(x, pads, "replicate")[0, 0, 0].tolist() == [0, 0, 0, 1, 2, 3, 3, 3]
    assert dc.pad_input(x, pads, "circular")[0, 0, 0].tolist() == [2, 3, 0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=np.zeros((1, 2, 5))), r"x must be NCHW \(4 dimensions\), got shape \(1, 2, 5\)"),
    (dict(kernel=np.zeros((3, 2, 3))), r"kernel must be OIHW \(4 dimensions\)"),
    (dict(kernel=np.zeros((3, 1, 3, 3))),
     r"kernel must have C_in/groups = 2 input channels for x with 2 channels"),
    (dict(bias=np.zeros(2)), r"bias must have shape \(3,\), got \(2,\)"),
    (dict(x=np.zeros((1, 2, 2, 2))), r"an input of spatial size \(2, 2\) is too small"),
    (dict(groups=2), r"out_channels must be divisible by groups \(2\), got 3"),
    (dict(padding_mode="mirror"), r"padding_mode must be one of .*got 'mirror'"),
    (dict(stride=0), r"stride must be an integer >= 1 or a pair of them, got 0"),
])
def test_conv2d_rejects_bad_arguments(kwargs, message):
    arguments = dict(x=np.zeros((1, 2, 5, 5)), kernel=np.zeros((3, 2, 3, 3)), bias=None)
    arguments.update(kwargs)
    x, kernel, bias = arguments.pop("x"), arguments.pop("kernel"), arguments.pop("bias")
    with pytest.raises(ValueError, match=message):
        dc.conv2d(x, kernel, bias, **arguments)


@pytest.mark.parametrize("mode", dc.PADDING_MODES)
def test_conv2d_vjp_input_gradient_is_the_adjoint(mode):
    # <conv(x), g> == <x, vjp_x(g)> for a linear map, checked exactly on every padding mode.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 7, 6))
    kernel = rng.standard_normal((6, 2, 3, 3))
    options = dict(stride=(2, 1), padding="same", dilation=(1, 2), groups=2, padding_mode=mode)
    y = dc.conv2d(x, kernel, **options)
    g = rng.standard_normal(y.shape)
    grad_x, grad_kernel, grad_bias = dc.conv2d_vjp(x, kernel, g, **options)
    assert np.sum(y * g) == pytest.approx(np.sum(x * grad_x), rel=1e-12)
    assert np.sum(y * g) == pytest.approx(np.sum(kernel * grad_kernel), rel=1e-12)
    np.testing.assert_allclose(grad_bias, g.sum(axis=(0, 2, 3)))
