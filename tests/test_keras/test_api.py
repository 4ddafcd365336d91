"""Constructor arguments, parity with Conv2D, errors, mixed precision and the kernel cache."""

from __future__ import annotations

import itertools
import os
import re

import numpy as np
import pytest

import keras

import doconv_core
from doconv_core import CheckpointError, ConvSpec, DOConvParams
from doconv_tf import DOConv2D, load_legacy
from kutils import BACKEND, expect_channels_first_refusal, gradients, keras_runs_channels_first

RNG = np.random.default_rng(0)


def embedded(conv: keras.layers.Conv2D, **kwargs) -> DOConv2D:
    """A DOConv2D with conv's config and its kernel embedded (same function)."""
    config = {k: v for k, v in conv.get_config().items() if not k.startswith("lora")}
    config.pop("name")
    config.update(kwargs)
    layer = DOConv2D(**config)
    layer.build(conv._build_shapes_dict["input_shape"])
    spec = layer.spec
    D, W = doconv_core.embed_kernel(doconv_core.hwio_to_oihw(
        keras.ops.convert_to_numpy(conv.kernel)), groups=spec.groups, D_mul=spec.D_mul)
    bias = keras.ops.convert_to_numpy(conv.bias) if conv.use_bias else None
    layer.set_params(DOConvParams(spec, W, D, bias))
    return layer


PARITY = list(itertools.product(
    (3, (1, 3), (2, 2)), (1, 2), ("valid", "same", "SAME"), ("channels_last", "channels_first"),
    (1, 2), (1, 2), (None, "relu"), (True, False)))
PARITY = [p for p in PARITY if not (p[1] > 1 and p[4] > 1)][::9]


@pytest.mark.parametrize("kernel_size,strides,padding,data_format,dilation,groups,act,bias",
                         PARITY)
def test_parity_with_conv2d(kernel_size, strides, padding, data_format, dilation, groups, act,
                            bias, request):
    # This test runs Keras' Conv2D first.
    expect_channels_first_refusal(request, data_format, "grouped" if groups > 1 else "conv")
    kwargs = dict(kernel_size=kernel_size, strides=strides, padding=padding,
                  data_format=data_format, dilation_rate=dilation, groups=groups,
                  activation=act, use_bias=bias, bias_initializer="random_normal")
    # 10 filters: never equal to the output width (see KERAS_BIAS_BUG below).
    conv = keras.layers.Conv2D(10, **kwargs)
    shape = (2, 9, 8, 4) if data_format == "channels_last" else (2, 4, 9, 8)
    x = RNG.standard_normal(shape).astype("float32")
    expected = keras.ops.convert_to_numpy(conv(x))
    layer = embedded(conv, D_mul=None)
    got = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert layer.compute_output_shape(shape) == conv.compute_output_shape(shape)
    assert layer.compute_output_shape((None,) + shape[1:]) == \
        conv.compute_output_shape((None,) + shape[1:])
    # Every Conv2D setting is in the config with Conv2D's value.
    ours, theirs = layer.get_config(), conv.get_config()
    for key, value in theirs.items():
        if key not in ("name",) and not key.startswith("lora"):
            assert ours[key] == value, key
    assert ours["D_mul"] == layer.spec.mn


def test_functional_output_shape_with_unknown_spatial_size():
    inputs = keras.Input((None, None, 3))
    outputs = DOConv2D(5, 3, strides=2, padding="same")(inputs)
    assert tuple(outputs.shape) == (None, None, None, 5)


def test_initialisation_matches_conv2d_with_the_same_seeded_initializer():
    init = keras.initializers.GlorotUniform(seed=7)
    conv = keras.layers.Conv2D(6, 3, kernel_initializer=init)
    layer = DOConv2D(6, 3, kernel_initializer=keras.initializers.GlorotUniform(seed=7))
    x = RNG.standard_normal((1, 7, 7, 4)).astype("float32")
    conv(x), layer(x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel),
                                  keras.ops.convert_to_numpy(conv.kernel))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.D), 0)
    # D_mul > M*N: each block of M*N slots is a conv-kernel-shaped draw, cut to D_mul.
    wide = DOConv2D(6, 3, D_mul=13)
    wide(x)
    assert tuple(wide.W.shape) == (13, 4, 6) and tuple(wide.D.shape) == (4, 9, 13)
    W = keras.ops.convert_to_numpy(wide.W)
    limit = np.sqrt(6.0 / (9 * 4 + 9 * 6))  # glorot_uniform with the 3x3 kernel's fans
    assert np.abs(W).max() <= limit and np.abs(W).max() > 0.8 * limit
    assert np.all(np.abs(W[9:]).sum(axis=(1, 2)) > 0)  # no dead slots


def test_regularizers_and_constraints_apply_to_W_and_bias_not_D():
    conv = keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(0.1),
                               bias_regularizer=keras.regularizers.L1(0.2),
                               bias_initializer="ones")
    x = RNG.standard_normal((1, 6, 6, 2)).astype("float32")
    conv(x)
    layer = embedded(conv, kernel_regularizer=keras.regularizers.L2(0.1),
                     bias_regularizer=keras.regularizers.L1(0.2),
                     kernel_constraint=keras.constraints.NonNeg(),
                     bias_constraint=keras.constraints.MaxNorm(1.0))
    assert layer.bias.constraint is layer.bias_constraint
    assert layer.W.regularizer is layer.kernel_regularizer
    assert layer.W.constraint is layer.kernel_constraint
    assert layer.D.regularizer is None and layer.D.constraint is None
    # With D = 0 and D_mul = M*N, W is the kernel: the same penalty as the Conv2D's.
    np.testing.assert_allclose(float(sum(layer.losses)), float(sum(conv.losses)), rtol=1e-6)


ERRORS = [
    (dict(filters=0, kernel_size=3), "filters must be an integer >= 1, got 0"),
    (dict(filters=4.0, kernel_size=3), "filters must be an integer >= 1, got 4.0 (float)"),
    (dict(filters=4, kernel_size=0),
     "kernel_size must be an integer >= 1 or a pair of them, got 0 (int)"),
    (dict(filters=4, kernel_size=(3, 3, 3)),
     "kernel_size must be an integer >= 1 or a pair of them, got 3 values: (3, 3, 3)"),
    (dict(filters=4, kernel_size=3, strides=0),
     "strides must be an integer >= 1 or a pair of them, got 0 (int)"),
    (dict(filters=4, kernel_size=3, padding=1),
     "padding must be 'valid' or 'same' (Keras' Conv2D has no explicit padding), got 1"),
    (dict(filters=4, kernel_size=3, padding="full"),
     "padding must be 'valid' or 'same' (Keras' Conv2D has no explicit padding), got 'full'"),
    (dict(filters=4, kernel_size=3, data_format="NCHW"),
     "data_format must be 'channels_last', 'channels_first' or None, got 'NCHW'"),
    (dict(filters=4, kernel_size=3, dilation_rate=(1, 0)),
     "dilation_rate must be an integer >= 1 or a pair of them, got (1, 0)"),
    (dict(filters=4, kernel_size=3, groups=0), "groups must be an integer >= 1, got 0"),
    (dict(filters=4, kernel_size=3, groups=3),
     "filters must be divisible by groups (3), got 4"),
    (dict(filters=4, kernel_size=3, use_bias="yes"),
     "use_bias must be True or False, got 'yes' (str)"),
    (dict(filters=4, kernel_size=3, D_mul=8),
     "D_mul must be >= kernel height*width = 9 for a 3x3 kernel, got 8"),
    (dict(filters=4, kernel_size=1, D_mul=2),
     "D_mul must be 1 or None for a 1x1 kernel (it has no depthwise part), got 2"),
    (dict(filters=4, kernel_size=3, D_mul=0), "D_mul must be an integer >= 1, got 0"),
    (dict(filters=4, kernel_size=3, strides=2, dilation_rate=2),
     "strides > 1 together with dilation_rate > 1 is not supported by Keras' Conv2D, "
     "got strides=(2, 2) and dilation_rate=(2, 2)"),
    (dict(filters=4, kernel_size=3, activation="no-such-activation"), "no-such-activation"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DOConv2D(**kwargs)


def test_d_mul_is_keyword_only():
    with pytest.raises(TypeError):
        DOConv2D(4, 3, 1, "valid", None, 1, 1, None, True, "glorot_uniform", "zeros",
                 None, None, None, None, None, 9)


def test_bad_inputs_at_build_and_call():
    with pytest.raises(ValueError, match=re.escape(
            "in_channels must be divisible by groups (2), got 3")):
        DOConv2D(4, 3, groups=2)(np.zeros((1, 5, 5, 3), "float32"))
    with pytest.raises(ValueError, match="DOConv2D expects 4-D inputs"):
        DOConv2D(4, 3).build((5, 5, 3))
    layer = DOConv2D(4, 3)
    layer(np.zeros((1, 5, 5, 3), "float32"))
    message = "input must have 3 channels (the layer's in_channels), got 2"
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(np.zeros((1, 5, 5, 2), "float32"))
    with pytest.raises(ValueError, match=re.escape(message)):  # symbolic, too
        layer(keras.Input((5, 5, 2)))
    first = DOConv2D(4, 3, data_format="channels_first")
    first(np.zeros((1, 3, 5, 5), "float32"))
    with pytest.raises(ValueError, match=re.escape(message)):
        first(np.zeros((1, 2, 5, 5), "float32"))
    with pytest.raises(ValueError, match=re.escape(
            "an input of spatial size (2, 5) is too small for kernel_size (3, 3) with "
            "dilation (1, 1) and padding 'valid'")):
        DOConv2D(4, 3).compute_output_shape((1, 2, 5, 3))
    # As Keras' Conv2D; on torch, nn.Module.__getattr__ replaces the property's message.
    message = "has no attribute 'kernel'" if BACKEND == "torch" else \
        "build the layer before accessing `kernel`"
    with pytest.raises(AttributeError, match=message):
        DOConv2D(4, 3).kernel
    if BACKEND == "torch":
        with pytest.raises(AttributeError, match=message):
            keras.layers.Conv2D(4, 3).kernel
    with pytest.raises(ValueError, match="to_params needs a built layer"):
        DOConv2D(4, 3).to_params()


def test_params_errors():
    layer = DOConv2D(4, 3)
    layer.build((None, 5, 5, 2))
    other = DOConvParams(ConvSpec(2, 4, 3, D_mul=10), np.zeros((4, 2, 10)),
                         np.zeros((2, 9, 10)), np.zeros(4))
    with pytest.raises(ValueError, match="params.spec must describe this layer.s function"):
        layer.set_params(other)
    with pytest.raises(ValueError, match="params must be DOConvParams, got dict"):
        layer.set_params({})
    before = [keras.ops.convert_to_numpy(w).copy() for w in layer.weights]
    integer_D = DOConvParams(layer.spec, np.ones((4, 2, 9)), np.ones((2, 9, 9), np.int64),
                             np.ones(4))
    with pytest.raises(ValueError, match=re.escape(
            "D must hold floating-point numbers (float16, float32 or float64), got dtype int64")):
        layer.set_params(integer_D)
    assert all(np.array_equal(keras.ops.convert_to_numpy(w), b)
               for w, b in zip(layer.weights, before))  # W was valid, and is untouched too
    with pytest.raises(ValueError, match=re.escape(
            "from_params takes ['filters'] from params.spec; do not pass them")):
        DOConv2D.from_params(other, filters=3)
    explicit = DOConvParams(ConvSpec(2, 4, 3, padding=2), np.zeros((4, 2, 9)),
                            np.zeros((2, 9, 9)), np.zeros(4))
    with pytest.raises(ValueError, match=re.escape(
            "params.spec.padding must be 'valid', 'same' or explicit padding that equals one "
            "of them (Keras' Conv2D has no other padding), got (2, 2) with kernel_size=(3, 3), "
            "stride=(1, 1) and dilation=(1, 1)")):
        DOConv2D.from_params(explicit)
    reflect = DOConvParams(ConvSpec(2, 4, 3, padding="same", padding_mode="reflect"),
                           np.zeros((4, 2, 9)), np.zeros((2, 9, 9)), np.zeros(4))
    with pytest.raises(ValueError, match="params.spec.padding_mode must be 'zeros', got 'reflect'"):
        DOConv2D.from_params(reflect)
    with pytest.raises(CheckpointError, match=re.escape(
            "W must have shape (9, 2, 4) in the original TensorFlow layout")):
        load_legacy(layer, {"W": np.zeros((4, 2, 9)), "D": np.zeros((9, 9, 2)),
                            "bias": np.zeros(4)})
    with pytest.raises(CheckpointError, match=re.escape(
            "cannot load the legacy checkpoint: layers ['layer'] are not built")):
        load_legacy(DOConv2D(4, 3), {"W": np.zeros((9, 2, 4))})


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    compute = policy.split("_")[1]
    x = RNG.standard_normal((2, 8, 8, 4)).astype("float32")
    layer = DOConv2D(6, 3, groups=2, D_mul=11, dtype=policy, bias_initializer="ones")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert all(v.dtype == "float32" for v in layer.weights)
    layer.D.assign(0.1 * RNG.standard_normal(tuple(layer.D.shape)).astype("float32"))
    reference = DOConv2D.from_params(layer.to_params())
    tolerance = 2e-2 if compute == "bfloat16" else 3e-3
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)).astype("float32"),
                               keras.ops.convert_to_numpy(reference(x)), rtol=tolerance,
                               atol=tolerance * 4)
    # The fused Conv2D under the same policy computes exactly the same thing.
    fused = layer.fuse()
    assert fused.dtype_policy.name == policy
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fused(x)),
                                  keras.ops.convert_to_numpy(layer(x)))
    # Training under the policy updates the float32 variables.
    model = keras.Sequential([keras.Input((8, 8, 4)), layer, keras.layers.Flatten(),
                              keras.layers.Dense(1, dtype=policy)])
    model.compile(optimizer="sgd", loss="mse")
    before = keras.ops.convert_to_numpy(layer.D).copy()
    model.fit(x, np.ones((2, 1), "float32"), epochs=1, verbose=0)
    assert not np.array_equal(keras.ops.convert_to_numpy(layer.D), before)


def test_global_mixed_policy():
    keras.config.set_dtype_policy("mixed_float16")
    layer = DOConv2D(4, 3)
    y = layer(np.ones((1, 5, 5, 2), "float32"))
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert layer.W.dtype == "float32"


def test_kernel_is_never_stale():
    x = RNG.standard_normal((1, 6, 6, 2)).astype("float32")
    layer = DOConv2D(3, 3, D_mul=10)
    first = keras.ops.convert_to_numpy(layer(x, training=False))
    k1 = layer.kernel
    if BACKEND == "jax":
        assert layer.kernel is k1  # eager JAX reuses the composed kernel
    # Every way of changing the weights shows at once.
    layer.D.assign(RNG.standard_normal(tuple(layer.D.shape)).astype("float32"))
    second = keras.ops.convert_to_numpy(layer(x, training=False))
    assert not np.allclose(first, second)
    p = layer.to_params()
    expected = doconv_core.nchw_to_nhwc(doconv_core.doconv2d(
        doconv_core.nhwc_to_nchw(x).astype(np.float64), p.D, p.W, p.bias, p.spec))
    np.testing.assert_allclose(second, expected, rtol=1e-5, atol=1e-5)
    layer.set_weights([w * 2 for w in layer.get_weights()])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel),
                               doconv_core.oihw_to_hwio(layer.to_params().kernel()), atol=1e-5)
    # After training steps (fit runs traced), the eager call sees the trained weights.
    model = keras.Sequential([keras.Input((6, 6, 2)), layer, keras.layers.Flatten(),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    before = keras.ops.convert_to_numpy(layer.kernel)
    model.fit(x, np.ones((1, 1)), epochs=2, verbose=0)
    after = keras.ops.convert_to_numpy(layer.kernel)
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, doconv_core.oihw_to_hwio(layer.to_params().kernel()),
                               rtol=1e-5, atol=1e-5)


def test_kernel_without_D_is_never_stale():
    # A 1x1 layer has no D (kernel volume 1): the cache is keyed on W alone.
    x = RNG.standard_normal((1, 4, 4, 2)).astype("float32")
    layer = DOConv2D(3, 1, use_bias=False)
    layer(x)
    assert layer.D is None
    k1 = layer.kernel
    if BACKEND == "jax":
        assert layer.kernel is k1
    W = RNG.standard_normal(tuple(layer.W.shape)).astype("float32")
    layer.W.assign(W)
    expected = np.einsum("nhwc,sco->nhwo", x, W)  # W (D_mul=1, C_in, C_out) is the kernel
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected,
                               rtol=1e-5, atol=1e-5)

def test_gradients_flow_with_training_false():
    # The fine-tuning idiom (base(x, training=False) under a tape) must still train W and D.
    layer = DOConv2D(3, 3, D_mul=10)
    x = RNG.standard_normal((1, 6, 6, 2)).astype("float32")
    layer(x, training=False)
    layer(x, training=False)
    got = gradients(layer, x, np.ones((1, 4, 4, 3), "float32"), training=False)
    assert np.abs(got["D"]).sum() > 0 and np.abs(got["W"]).sum() > 0


def test_legacy_import_matches_the_original_mapping():
    # The original Keras layer: D (MN, D_mul, C_in), W (D_mul, C_in/g, C_out); slot (o, i)
    # reads D channel i*g + o // (C_out/g).
    g, C_in, C_out, S = 2, 4, 6, 11
    layer = DOConv2D(C_out, 3, groups=g, D_mul=S)
    layer.build((None, 7, 7, C_in))
    D_old = RNG.standard_normal((9, S, C_in))
    W_old = RNG.standard_normal((S, C_in // g, C_out))
    bias = RNG.standard_normal(C_out)
    report = load_legacy(layer, {"W": W_old, "D": D_old, "bias": bias})
    assert report.exact == ["layer"] and report.function_preserving == []
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.layers["layer"].method == "permuted D channels"
    D_total = D_old + doconv_core.identity_d(C_in, 9, S).transpose(1, 2, 0)
    expected = np.zeros((3, 3, C_in // g, C_out))
    for o in range(C_out):
        for i in range(C_in // g):
            c = i * g + o // (C_out // g)
            expected[:, :, i, o] = (D_total[:, :, c] @ W_old[:, i, o]).reshape(3, 3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel), expected,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.bias), bias, rtol=1e-6)


def test_channels_first_native_kernels_run_where_expected():
    # Which of Keras' own channels_first layers run here; tox's second tf run sets
    # TF_ENABLE_ONEDNN_OPTS=0, and this proves that setting was in force.
    if BACKEND != "tensorflow":
        assert keras_runs_channels_first("conv") and keras_runs_channels_first("conv", "float64")
        return
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if setting in ("0", "1"):
        assert keras_runs_channels_first("conv") is (setting == "1")
    assert keras_runs_channels_first("grouped")  # through XLA
    assert not keras_runs_channels_first("conv", "float64")  # no CPU kernel, oneDNN or not


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_channels_first_runs_as_nhwc_between_transposes_on_tensorflow_cpu(dtype):
    layer = DOConv2D(4, 3, padding="same", data_format="channels_first", dtype=dtype)
    assert not hasattr(layer, "_conv_format")  # decided once, when built
    layer.build((None, 3, 6, 5))
    on_tensorflow_cpu = BACKEND == "tensorflow" and not keras.distribution.list_devices("gpu")
    assert layer._conv_format == ("channels_last" if on_tensorflow_cpu else "channels_first")
    # Its function is the reference's, in float64 too (TensorFlow has no NCHW float64 kernel).
    x = RNG.standard_normal((2, 3, 6, 5))
    params = layer.to_params()
    expected = doconv_core.doconv2d(x, params.D, params.W, params.bias, params.spec)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x.astype(dtype))), expected,
                               rtol=1e-5, atol=1e-5)


KERAS_BIAS_BUG = ("Keras 3.15 TF backend: ops.add(x, bias reshaped (1, C, 1, 1)) becomes an "
                  "NHWC BiasAdd when x's width equals C, so a channels_first Conv2D adds its "
                  "bias along the width; DOConv2D avoids it, its fused Conv2D inherits it")


def expect_keras_bias_bug(request, kind="conv", reason=KERAS_BIAS_BUG):
    """A channels_first fused layer: TensorFlow refuses NCHW here, or runs it with the bug."""
    if not expect_channels_first_refusal(request, "channels_first", kind) and \
            BACKEND == "tensorflow":
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError,
                                              reason=reason))


def _width_equals_filters():
    spec = ConvSpec(1, 2, 1, stride=(1, 2))
    x = RNG.standard_normal((2, 1, 4, 3)).astype("float32")  # output width 2 == filters
    W = RNG.standard_normal(spec.W_shape).astype("float32")
    bias = np.array([0.0, 10.0], "float32")
    layer = DOConv2D.from_params(DOConvParams(spec, W, None, bias),
                                 data_format="channels_first")
    expected = doconv_core.doconv2d(x.astype(np.float64), None, W.astype(np.float64),
                                    bias.astype(np.float64), spec)
    return layer, x, expected


def test_channels_first_bias_when_width_equals_filters():
    layer, x, expected = _width_equals_filters()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-5)


def test_fused_conv2d_channels_first_bias_when_width_equals_filters(request):
    expect_keras_bias_bug(request)
    layer, x, expected = _width_equals_filters()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.fuse()(x)), expected,
                               atol=1e-5)
