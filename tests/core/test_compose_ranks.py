"""The D∘W math with 1 and 3 spatial axes (and 2 where cheap): composition, initialisation,
embedding, fusion and gradients, as test_core_compose.py checks them in 2-D."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import doconv_core as dc
from naive_conv import naive_conv
from strategies import input_shape_for, layer_specs

TOL = dict(rtol=1e-10, atol=1e-10)  # float64 throughout
RANKS = pytest.mark.parametrize("rank", (1, 2, 3), ids=lambda rank: f"{rank}d")
SEED = st.integers(0, 2**32 - 1)


def random_params(spec, seed, D_scale=0.5):
    rng = np.random.default_rng(seed)
    D = D_scale * rng.standard_normal(spec.D_shape) if spec.has_D else None
    W = rng.standard_normal(spec.W_shape)
    bias = rng.standard_normal(spec.out_channels) if spec.bias else None
    return rng, D, W, bias


def conv_settings(spec):
    return dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                groups=spec.groups, padding_mode=spec.padding_mode)


@RANKS
@settings(max_examples=80)
@given(data=st.data(), seed=SEED)
def test_kernel_composition_equals_feature_composition(rank, data, seed):
    spec = data.draw(layer_specs(rank=rank), label="spec")
    assert spec.rank == rank and len(spec.kernel_size) == rank
    rng, D, W, bias = random_params(spec, seed)
    x = rng.standard_normal(input_shape_for(spec))
    by_kernel = dc.doconv(x, D, W, bias, spec)
    by_features = dc.doconv_features(x, D, W, bias, spec)
    assert by_kernel.shape == (x.shape[0], spec.out_channels) + spec.output_size(x.shape[2:])
    np.testing.assert_allclose(by_kernel, by_features, **TOL)


@RANKS
@settings(max_examples=50)
@given(data=st.data(), seed=SEED)
def test_fused_conv_equals_doconv(rank, data, seed):
    spec = data.draw(layer_specs(rank=rank), label="spec")
    rng, D, W, bias = random_params(spec, seed)
    x = rng.standard_normal(input_shape_for(spec))
    kernel, fused_bias = dc.fuse(D, W, bias, spec)
    assert kernel.shape == spec.kernel_shape
    fused = dc.conv(x, kernel, fused_bias, **conv_settings(spec))
    np.testing.assert_allclose(fused, dc.doconv_features(x, D, W, bias, spec), **TOL)


# One layer per rank and padding kind, so 'causal' and every padding mode meet D∘W
# whatever hypothesis draws; each checked against the naive loops too.
FIXED_SPECS = [  # ConvSpec arguments; built in the test, so a broken rank fails it, not collection
    ((4, 6, 3, 2, "causal", 2, 2), dict(padding_mode="reflect", D_mul=5, rank=1)),
    ((3, 6, 4, 1, "causal", 1, 3), dict(bias=False, padding_mode="circular", rank=1)),
    ((4, 4, 5, 3, "same", 1, 4), dict(padding_mode="replicate", D_mul=7, rank=1)),
    ((2, 4, (3, 2), (1, 2), (1, 2), 1, 2), dict(padding_mode="reflect", D_mul=8)),
    ((4, 6, (3, 2, 3), (2, 1, 1), "same", (1, 2, 1), 2),
     dict(padding_mode="reflect", D_mul=20, rank=3)),
    ((3, 3, (2, 3, 1), 1, (1, 1, 0), (2, 1, 1), 3), dict(padding_mode="circular", rank=3)),
    ((2, 3, (1, 3, 3), 2, 1, 1, 1), dict(padding_mode="replicate", rank=3)),
    ((2, 2, 3, 1, "same", 1, 2), dict(bias=False, padding_mode="zeros", D_mul=30, rank=3)),
]


@pytest.mark.parametrize("args, kwargs", FIXED_SPECS, ids=[
    f"{kwargs.get('rank', 2)}d-{args[4]}-{kwargs['padding_mode']}-g{args[6]}".replace(" ", "")
    for args, kwargs in FIXED_SPECS])
def test_fixed_layers_agree_three_ways(args, kwargs):
    spec = dc.ConvSpec(*args, **kwargs)
    rng, D, W, bias = random_params(spec, 9)
    x = rng.standard_normal(input_shape_for(spec, batch=1))
    by_kernel = dc.doconv(x, D, W, bias, spec)
    np.testing.assert_allclose(by_kernel, dc.doconv_features(x, D, W, bias, spec), **TOL)
    kernel = dc.compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size)
    np.testing.assert_allclose(
        by_kernel, naive_conv(x, kernel, bias, spec.stride, spec.padding, spec.dilation,
                              spec.groups, spec.padding_mode), **TOL)


@pytest.mark.parametrize("kernel_size", [(5,), (3, 2), (3, 1, 2)], ids=len)
def test_composition_follows_the_channel_mapping_formula(kernel_size):
    # Slot (o, i) must read D channel floor(o / (C_out/g)) * (C_in/g) + i, and the kernel's
    # spatial axes are the M*N axis of D in row-major order; checked slot by slot, tap by tap.
    rank = len(kernel_size)
    spec = dc.ConvSpec(6, 9, kernel_size, 1, 0, 1, 3, D_mul=11, rank=rank)
    _, D, W, _ = random_params(spec, 1)
    K = dc.compose_kernel(D, W, groups=3, kernel_size=kernel_size)
    assert K.shape == (9, 2) + kernel_size
    D_total = D + dc.identity_d(6, spec.mn, 11, D.dtype)
    for o in range(9):
        for i in range(2):
            c = (o // 3) * 2 + i
            for m, tap in enumerate(itertools.product(*(range(k) for k in kernel_size))):
                assert K[(o, i) + tap] == pytest.approx(D_total[c, m] @ W[o, i], rel=1e-12)


@RANKS
@settings(max_examples=50)
@given(data=st.data(), seed=SEED)
def test_kernel_at_initialisation_is_the_sum_of_W_blocks(rank, data, seed):
    spec = data.draw(layer_specs(rank=rank), label="spec")
    _, _, W, _ = random_params(spec, seed)
    D = np.zeros(spec.D_shape) if spec.has_D else None
    K = dc.compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size)
    assert K.shape == spec.kernel_shape
    mn = spec.mn
    blocks = sum(W[:, :, k * mn:(k + 1) * mn] for k in range(spec.D_mul // mn))
    np.testing.assert_allclose(K.reshape(blocks.shape), blocks, **TOL)
    if spec.D_mul == mn:  # K == W exactly, not just to rounding
        np.testing.assert_array_equal(K.reshape(W.shape), W)


@RANKS
@settings(max_examples=50)
@given(data=st.data(), seed=SEED)
def test_embedding_is_exact(rank, data, seed):
    spec = data.draw(layer_specs(rank=rank), label="spec")
    rng = np.random.default_rng(seed)
    K0 = rng.standard_normal(spec.kernel_shape).astype(np.float32)
    D, W = dc.embed_kernel(K0, groups=spec.groups, D_mul=spec.D_mul)
    assert W.shape == spec.W_shape and W.dtype == np.float32
    assert (D is None) == (not spec.has_D)
    if D is not None:
        assert D.shape == spec.D_shape and not D.any()
    np.testing.assert_array_equal(
        dc.compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size), K0)


@RANKS
@settings(max_examples=40)
@given(data=st.data(), seed=SEED)
def test_compose_kernel_vjp_matches_finite_differences(rank, data, seed):
    spec = data.draw(layer_specs(rank=rank), label="spec")
    rng, D, W, _ = random_params(spec, seed)
    grad_K = rng.standard_normal(spec.kernel_shape)

    def loss(D_, W_):
        K = dc.compose_kernel(D_, W_, groups=spec.groups, kernel_size=spec.kernel_size)
        return float(np.sum(K * grad_K))

    grad_D, grad_W = dc.compose_kernel_vjp(grad_K, D, W, groups=spec.groups,
                                           kernel_size=spec.kernel_size)
    assert grad_W.shape == W.shape
    eps = 1e-6
    for _ in range(3):  # random coordinates; the loss is bilinear so differences are exact-ish
        index = tuple(rng.integers(n) for n in W.shape)
        bump = np.zeros_like(W)
        bump[index] = eps
        numeric = (loss(D, W + bump) - loss(D, W - bump)) / (2 * eps)
        assert numeric == pytest.approx(grad_W[index], rel=1e-6, abs=1e-6)
        if D is not None:
            assert grad_D.shape == D.shape
            index = tuple(rng.integers(n) for n in D.shape)
            bump = np.zeros_like(D)
            bump[index] = eps
            numeric = (loss(D + bump, W) - loss(D - bump, W)) / (2 * eps)
            assert numeric == pytest.approx(grad_D[index], rel=1e-6, abs=1e-6)
    if D is None:
        assert grad_D is None


@RANKS
@settings(max_examples=30)
@given(data=st.data(), seed=SEED)
def test_doconv_vjp_matches_finite_differences(rank, data, seed):
    spec = data.draw(layer_specs(rank=rank), label="spec")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape_for(spec, batch=1))
    D = 0.3 * rng.standard_normal(spec.D_shape) if spec.has_D else None
    W = rng.standard_normal(spec.W_shape)
    bias = rng.standard_normal(spec.out_channels) if spec.bias else None
    grad_y = rng.standard_normal(dc.doconv(x, D, W, bias, spec).shape)
    grads = dc.doconv_vjp(x, D, W, bias, spec, grad_y)
    values = {"x": x, "D": D, "W": W, "bias": bias}

    def loss(**changed):
        # Through feature composition: a path that shares no gradient code with doconv_vjp.
        arrays = dict(values, **changed)
        return float(np.sum(dc.doconv_features(arrays["x"], arrays["D"], arrays["W"],
                                               arrays["bias"], spec) * grad_y))

    eps = 1e-6
    for name, value in values.items():
        if value is None:
            assert grads[name] is None
            continue
        assert grads[name].shape == value.shape
        for _ in range(3):
            index = tuple(rng.integers(n) for n in value.shape)
            bump = np.zeros_like(value)
            bump[index] = eps
            numeric = (loss(**{name: value + bump}) - loss(**{name: value - bump})) / (2 * eps)
            assert numeric == pytest.approx(grads[name][index], rel=1e-5, abs=1e-6), name


def test_doconv2d_names_are_the_nd_functions():
    assert dc.doconv2d is dc.doconv and dc.doconv2d_vjp is dc.doconv_vjp
    assert dc.doconv2d_features is dc.doconv_features


def test_compose_kernel_rejects_mismatched_shapes_in_any_rank():
    W = np.zeros((4, 2, 27))
    with pytest.raises(ValueError, match=r"D must have shape \(C_in, M\*N, D_mul\) = "
                                         r"\(4, 27, 27\)"):
        dc.compose_kernel(np.zeros((4, 9, 27)), W, groups=2, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match="D is required for a 3x3x3 kernel"):
        dc.compose_kernel(None, W, groups=2, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match="D is required for a 3 kernel"):
        dc.compose_kernel(None, np.zeros((4, 2, 3)), groups=2, kernel_size=(3,))
    with pytest.raises(ValueError, match=r"kernel_size must have 1 to 3 values \(one per "
                                         r"spatial axis\), got 4"):
        dc.compose_kernel(None, np.zeros((4, 2, 1)), groups=2, kernel_size=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"grad_K must have the kernel's shape"):
        dc.compose_kernel_vjp(np.zeros((4, 2, 3, 3)), np.zeros((4, 3, 3)), np.zeros((4, 2, 3)),
                              groups=2, kernel_size=(3,))
    # A kernel of one element needs no D in any rank: the kernel is W.
    W1 = np.arange(8.0).reshape(4, 2, 1)
    np.testing.assert_array_equal(dc.compose_kernel(None, W1, groups=2, kernel_size=(1, 1, 1)),
                                  W1.reshape(4, 2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"kernel must be \(C_out, C_in/groups, \*kernel_size\) "
                                         r"with 1 to 3 spatial axes"):
        dc.embed_kernel(np.zeros((4, 2)), groups=1)


@pytest.mark.parametrize("kernel_size", [(3,), (2, 3), (2, 3, 4)], ids=len)
def test_layout_helpers_round_trip_in_any_rank(kernel_size):
    K = np.arange(5 * 6 * np.prod(kernel_size)).reshape((5, 6) + kernel_size)
    channels_last = dc.oihw_to_hwio(K)
    assert channels_last.shape == kernel_size + (6, 5)
    tap = tuple(k - 1 for k in kernel_size)
    assert channels_last[tap + (2, 4)] == K[(4, 2) + tap]
    np.testing.assert_array_equal(dc.hwio_to_oihw(channels_last), K)
    x = np.arange(2 * 3 * np.prod(kernel_size)).reshape((2, 3) + kernel_size)
    nhwc = dc.nchw_to_nhwc(x)
    assert nhwc.shape == (2,) + kernel_size + (3,) and nhwc[(1,) + tap + (2,)] == x[(1, 2) + tap]
    np.testing.assert_array_equal(dc.nhwc_to_nchw(nhwc), x)
