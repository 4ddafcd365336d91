"""doconv_core.conv and conv_vjp with 1 and 3 spatial axes, checked against naive loops."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import doconv_core as dc
from naive_conv import naive_conv, naive_conv2d

SIZES = {1: (11,), 2: (7, 8), 3: (6, 7, 5)}

CONFIGS = {
    # (C_in, C_out, groups, kernel, stride, padding, dilation)
    1: [
        (1, 1, 1, (1,), (1,), (0,), (1,)),
        (2, 3, 1, (3,), (1,), (1,), (1,)),
        (4, 6, 2, (3,), (2,), 2, (1,)),
        (3, 3, 3, (3,), (2,), "same", (2,)),
        (2, 6, 2, (4,), (3,), "same", (1,)),
        (2, 4, 1, (3,), (1,), "causal", (1,)),
        (4, 4, 2, (3,), (2,), "causal", (2,)),
        (3, 6, 3, (2,), (1,), "causal", (3,)),
        (2, 2, 1, (5,), (2,), "valid", (2,)),
    ],
    3: [
        (1, 1, 1, (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1)),
        (2, 3, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
        (4, 6, 2, (3, 2, 3), (2, 1, 2), (1, 0, 2), (1, 1, 1)),
        (3, 3, 3, (3, 3, 1), (1, 2, 1), "same", (2, 1, 1)),
        (2, 4, 2, (2, 3, 3), (2, 2, 1), "same", (1, 1, 2)),
        (2, 2, 1, (1, 3, 2), (1, 1, 2), "valid", (1, 2, 1)),
    ],
}


def config_id(config):
    return "-".join(map(str, config)).replace(" ", "")


@pytest.mark.parametrize("mode", dc.PADDING_MODES)
@pytest.mark.parametrize("rank, config", [(rank, config) for rank in (1, 3)
                                          for config in CONFIGS[rank]],
                         ids=lambda value: config_id(value) if isinstance(value, tuple)
                         else f"{value}d")
def test_conv_matches_naive_loops(rank, config, mode):
    C_in, C_out, groups, kernel_size, stride, padding, dilation = config
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, C_in) + SIZES[rank])
    kernel = rng.standard_normal((C_out, C_in // groups) + kernel_size)
    bias = rng.standard_normal(C_out)
    expected = naive_conv(x, kernel, bias, stride, padding, dilation, groups, mode)
    actual = dc.conv(x, kernel, bias, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, padding_mode=mode)
    assert actual.shape == expected.shape
    spec = dc.ConvSpec(C_in, C_out, kernel_size, stride, padding, dilation, groups,
                       rank=rank)
    assert actual.shape[2:] == spec.output_size(SIZES[rank])
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=60)
@given(
    rank=st.sampled_from((1, 3)), data=st.data(),
    in_per_group=st.integers(1, 2), out_per_group=st.integers(1, 2), groups=st.integers(1, 2),
    mode=st.sampled_from(dc.PADDING_MODES), bias=st.booleans(), seed=st.integers(0, 1000),
)
def test_conv_matches_naive_loops_random(rank, data, in_per_group, out_per_group, groups,
                                         mode, bias, seed):
    def per_axis(low, high):
        return data.draw(st.tuples(*[st.integers(low, high)] * rank))

    kernel_size = per_axis(1, 3)
    stride, dilation = per_axis(1, 3), per_axis(1, 2)
    strings = ["valid", "same"] + (["causal"] if rank == 1 else [])
    padding = data.draw(st.one_of(st.sampled_from(strings), st.integers(0, 2),
                                  st.tuples(*[st.integers(0, 2)] * rank)))
    size = per_axis(5, 9) if rank == 1 else per_axis(5, 6)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, in_per_group * groups) + size)
    kernel = rng.standard_normal((out_per_group * groups, in_per_group) + kernel_size)
    b = rng.standard_normal(out_per_group * groups) if bias else None
    expected = naive_conv(x, kernel, b, stride, padding, dilation, groups, mode)
    actual = dc.conv(x, kernel, b, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, padding_mode=mode)
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", dc.PADDING_MODES)
def test_naive_conv_agrees_with_naive_conv2d(mode):
    # The N-d loops are themselves checked against the long-standing 2-D loops.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 7, 6))
    kernel = rng.standard_normal((6, 2, 3, 2))
    for stride, padding, dilation in (((2, 1), "same", (1, 2)), ((1, 2), (2, 1), (2, 1))):
        np.testing.assert_array_equal(
            naive_conv(x, kernel, None, stride, padding, dilation, 2, mode),
            naive_conv2d(x, kernel, None, stride, padding, dilation, 2, mode))


def test_conv2d_is_conv_in_two_dimensions():
    rng = np.random.default_rng(2)
    x, kernel = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((4, 3, 3, 2))
    options = dict(stride=(1, 2), padding="same", dilation=(2, 1), padding_mode="reflect")
    np.testing.assert_array_equal(dc.conv(x, kernel, **options),
                                  dc.conv2d(x, kernel, **options))


def test_causal_padding_reads_only_the_past():
    # y[t] depends on x[<= t] only: changing x[t0] leaves y[:t0] unchanged and changes y[t0].
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 12))
    kernel = rng.standard_normal((3, 2, 3))
    y = dc.conv(x, kernel, padding="causal", dilation=2)
    assert y.shape == (1, 3, 12)
    changed = x.copy()
    changed[..., 7] += 1.0
    y2 = dc.conv(changed, kernel, padding="causal", dilation=2)
    np.testing.assert_array_equal(y2[..., :7], y[..., :7])
    assert not np.allclose(y2[..., 7], y[..., 7])
    # It is 'valid' on the input with (k-1)*d zeros in front, as Keras' Conv1D computes it.
    front = np.concatenate([np.zeros((1, 2, 4)), x], axis=2)
    np.testing.assert_allclose(y, dc.conv(front, kernel, padding="valid", dilation=2),
                               rtol=1e-12, atol=1e-12)


ADJOINT_CASES = {
    1: [dict(stride=2, padding="causal", dilation=2, groups=2),
        dict(stride=3, padding="same", dilation=1, groups=1),
        dict(stride=1, padding=3, dilation=2, groups=2)],
    2: [dict(stride=(2, 1), padding=(3, 1), dilation=(1, 2), groups=2)],
    3: [dict(stride=(2, 1, 2), padding="same", dilation=(1, 2, 1), groups=2),
        dict(stride=1, padding=(2, 0, 1), dilation=(2, 1, 1), groups=1)],
}
ADJOINT_SHAPES = {1: ((2, 4, 9), (3,)), 2: ((2, 4, 7, 6), (3, 3)),
                  3: ((2, 4, 6, 5, 5), (3, 2, 3))}  # x (N, C, *spatial), kernel_size


@pytest.mark.parametrize("mode", dc.PADDING_MODES)
@pytest.mark.parametrize("rank, case", [(rank, case) for rank, cases in ADJOINT_CASES.items()
                                        for case in cases],
                         ids=lambda value: f"{value}d" if isinstance(value, int) else
                         "-".join(f"{k}={v}" for k, v in value.items()).replace(" ", ""))
def test_conv_vjp_input_gradient_is_the_adjoint(rank, case, mode):
    # <conv(x), g> == <x, vjp_x(g)> for a linear map, checked exactly on every padding mode
    # (pads of 2 and 3 make reflect and circular fold more than the edge element).
    x_shape, kernel_size = ADJOINT_SHAPES[rank]
    rng = np.random.default_rng(rank)
    x = rng.standard_normal(x_shape)
    kernel = rng.standard_normal((6, x_shape[1] // case["groups"]) + kernel_size)
    options = dict(case, padding_mode=mode)
    y = dc.conv(x, kernel, **options)
    g = rng.standard_normal(y.shape)
    grad_x, grad_kernel, grad_bias = dc.conv_vjp(x, kernel, g, **options)
    assert grad_x.shape == x.shape and grad_kernel.shape == kernel.shape
    assert np.sum(y * g) == pytest.approx(np.sum(x * grad_x), rel=1e-12)
    assert np.sum(y * g) == pytest.approx(np.sum(kernel * grad_kernel), rel=1e-12)
    np.testing.assert_allclose(grad_bias, g.sum(axis=(0,) + tuple(range(2, 2 + rank))))
    # Each input's gradient, one coordinate at a time: the adjoint identity on a basis vector.
    for _ in range(3):
        index = tuple(rng.integers(n) for n in x.shape)
        basis = np.zeros_like(x)
        basis[index] = 1.0
        assert np.sum(dc.conv(basis, kernel, **options) * g) == pytest.approx(
            grad_x[index], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("x_shape, kernel_shape, kwargs, message", [
    ((1, 2, 5, 5), (3, 2, 3), {}, r"x must have 3 dimensions \(N, C and 1 spatial\) for a "
                                  r"kernel of shape \(3, 2, 3\), got shape \(1, 2, 5, 5\)"),
    ((1, 2, 5, 5, 5, 5), (3, 2, 3, 3, 3, 3), {},
     r"kernel must be \(C_out, C_in/groups, \*kernel_size\) with 1 to 3 spatial axes"),
    ((1, 2, 5), (3, 2, 3), dict(stride=(1, 1)),
     r"stride must be an integer >= 1 or a sequence of one of them, got 2 values"),
    ((1, 2, 5, 5, 5), (3, 2, 3, 3, 3), dict(padding="causal"),
     r"padding must be 'valid', 'same', an integer >= 0 or a triple of them, got 'causal'"),
    ((1, 2, 2), (3, 2, 3), dict(padding="valid"), r"an input of spatial size \(2,\) is too small"),
])
def test_conv_rejects_bad_arguments(x_shape, kernel_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dc.conv(np.zeros(x_shape), np.zeros(kernel_shape), **kwargs)
