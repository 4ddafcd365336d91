"""Depthwise DOConv2D (groups == C_in > 1): its call runs ops.depthwise_conv, ``fuse`` gives a
DepthwiseConv2D. Checked against the grouped-conv path it replaced (TensorFlow runs that one
through XLA on CPU, ~100x slower), on values and gradients, and through convert/fuse/save."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

import keras

import doconv_tf
from doconv_core import ConvSpec, DOConvParams
from doconv_tf import DOConv2D
from kutils import (assert_fused_equal, expect_channels_first_refusal, float64, gradients,
                    to_keras, to_nchw)
from test_api import expect_keras_bias_bug

RNG = np.random.default_rng(7)


class GroupedDOConv2D(DOConv2D):
    """The reference: the same layer computed as a grouped conv (the path before)."""

    def _depthwise_multiplier(self):
        return None


def numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def params_for(in_channels, multiplier, kernel_size, strides, padding, dilation, use_bias,
               D_mul=None):
    spec = ConvSpec(in_channels, in_channels * multiplier, kernel_size, strides, padding,
                    dilation, groups=in_channels, bias=use_bias, D_mul=D_mul)
    W = RNG.standard_normal(spec.W_shape) / np.sqrt(spec.fan_in)
    D = 0.3 * RNG.standard_normal(spec.D_shape) if spec.has_D else None
    bias = RNG.standard_normal(spec.out_channels) if use_bias else None
    return DOConvParams(spec, W, D, bias)


# (strides, dilation_rate): Keras refuses both > 1 together.
GEOMETRIES = (((1, 1), (1, 1)), ((2, 2), (1, 1)), ((2, 1), (1, 1)), ((1, 1), (2, 2)),
              ((1, 1), (1, 2)))
GRID = list(itertools.product(("channels_last", "channels_first"), GEOMETRIES,
                              ("valid", "same"), (True, False), (1, 2), ("float32", "float64")))
CASES = GRID[::5]  # 5 is prime to every axis' length: each value of each axis occurs


def test_case_grid_covers_every_value():
    for axis in range(len(GRID[0])):
        assert {case[axis] for case in CASES} == {case[axis] for case in GRID}


@pytest.mark.parametrize("data_format,geometry,padding,use_bias,multiplier,dtype", CASES)
def test_depthwise_call_and_gradients_match_the_grouped_conv(data_format, geometry, padding,
                                                             use_bias, multiplier, dtype):
    strides, dilation = geometry
    # A non-square kernel and D_mul > M*N, so a transposed axis or a wrong slot shows.
    params = params_for(3, multiplier, (3, 2), strides, padding, dilation, use_bias, D_mul=8)
    # Width 10: no output width equals the filters (the Keras bias bug, see the end).
    x_nchw = RNG.standard_normal((2, 3, 9, 10))
    # float64 agrees to rounding; float32 runs two kernel implementations.
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == "float64" else \
        {"rtol": 1e-5, "atol": 1e-5}
    with float64():
        layer = DOConv2D.from_params(params, data_format=data_format, dtype=dtype)
        grouped = GroupedDOConv2D.from_params(params, data_format=data_format, dtype=dtype)
        # TensorFlow's depthwise kernel refuses unequal strides: those stay grouped convs.
        depthwise = strides[0] == strides[1]
        assert layer._depthwise_multiplier() == (multiplier if depthwise else None)
        x = to_keras(x_nchw, data_format).astype(dtype)
        y = numpy(layer(x))
        np.testing.assert_allclose(y, numpy(grouped(x)), **tolerance)
        # The composed kernel itself is still the grouped HWIO one.
        kernel = numpy(layer.kernel)
        assert kernel.shape == (3, 2, 1, 3 * multiplier)
        np.testing.assert_array_equal(kernel, numpy(grouped.kernel))
        grad_y = RNG.standard_normal(y.shape).astype(dtype)
        got = gradients(layer, x, grad_y)
        expected = gradients(grouped, x, grad_y)
        assert set(got) == {"x", "W", "D"} | ({"bias"} if use_bias else set())
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, err_msg=name, **tolerance)
        # The fused layer runs the very same op on the very same kernel.
        fused = layer.fuse()
        expected_type = keras.layers.DepthwiseConv2D if depthwise else keras.layers.Conv2D
        assert type(fused) is expected_type
        np.testing.assert_array_equal(numpy(fused(x)), y)


def test_fuse_returns_depthwise_conv2d_with_the_layer_settings():
    regularizer, constraint = keras.regularizers.L2(0.01), keras.constraints.NonNeg()
    layer = DOConv2D(6, 3, strides=2, padding="same", data_format="channels_first",
                     groups=3, activation="relu", bias_initializer="random_normal",
                     kernel_initializer=keras.initializers.HeNormal(seed=1),
                     kernel_regularizer=regularizer, kernel_constraint=constraint,
                     bias_regularizer=keras.regularizers.L1(0.02),
                     bias_constraint=keras.constraints.MaxNorm(2.0),
                     activity_regularizer=keras.regularizers.L1(0.03), name="dw", D_mul=11)
    layer.build((None, 3, 9, 9))
    fused = layer.fuse()
    assert type(fused) is keras.layers.DepthwiseConv2D
    ours, theirs = layer.get_config(), fused.get_config()
    assert theirs["depth_multiplier"] == 2
    for key in ("name", "dtype", "trainable", "kernel_size", "strides", "padding",
                "data_format", "dilation_rate", "activation", "use_bias", "bias_initializer",
                "bias_regularizer", "bias_constraint", "activity_regularizer"):
        assert theirs[key] == ours[key], key
    for kind in ("initializer", "regularizer", "constraint"):
        assert theirs[f"depthwise_{kind}"] == ours[f"kernel_{kind}"], kind
    assert [tuple(w.shape) for w in fused.weights] == [(3, 3, 3, 2), (6,)]
    x = RNG.standard_normal((2, 3, 9, 9)).astype("float32")
    np.testing.assert_array_equal(numpy(fused(x)), numpy(layer(x)))


@pytest.mark.parametrize("filters,kernel_size,strides,groups,in_channels,expected", [
    (4, 3, 1, 4, 4, keras.layers.DepthwiseConv2D),       # multiplier 1
    (8, 1, 2, 4, 4, keras.layers.DepthwiseConv2D),       # 1x1: no D
    (8, 3, (1, 2), 4, 4, keras.layers.Conv2D),           # TF's depthwise: equal strides only
    (8, 3, 1, 2, 4, keras.layers.Conv2D),                # grouped, not depthwise
    (5, 3, 1, 1, 1, keras.layers.Conv2D),                # groups == C_in == 1: a plain conv
    (5, 3, 1, 1, 3, keras.layers.Conv2D),
])
def test_fused_type_depends_on_groups_and_strides(filters, kernel_size, strides, groups,
                                                  in_channels, expected):
    layer = DOConv2D(filters, kernel_size, strides, groups=groups,
                     bias_initializer="random_normal")
    x = RNG.standard_normal((2, 7, 7, in_channels)).astype("float32")
    y = numpy(layer(x))
    fused = layer.fuse()
    assert type(fused) is expected
    np.testing.assert_array_equal(numpy(fused(x)), y)


def test_fused_depthwise_under_a_mixed_policy():
    layer = DOConv2D(8, 3, groups=4, dtype="mixed_float16", bias_initializer="ones")
    x = RNG.standard_normal((2, 8, 8, 4)).astype("float32")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    fused = layer.fuse()
    assert type(fused) is keras.layers.DepthwiseConv2D
    assert fused.dtype_policy.name == "mixed_float16"
    np.testing.assert_array_equal(numpy(fused(x)), numpy(y))


def depthwise_model(data_format):
    shape = (10, 10, 4) if data_format == "channels_last" else (4, 10, 10)
    kw = {"data_format": data_format}
    return keras.Sequential([
        keras.Input(shape),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                     depthwise_regularizer=keras.regularizers.L2(0.01),
                                     depthwise_constraint=keras.constraints.NonNeg(),
                                     bias_initializer="random_normal", name="dw1", **kw),
        keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False, activation="relu",
                                     name="dw2", **kw),
        keras.layers.DepthwiseConv2D(1, bias_initializer="random_normal", name="dw3", **kw),
        keras.layers.Conv2D(3, 3, padding="same", name="pw", **kw),
    ])


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_convert_fuse_gives_back_depthwise_layers(data_format, tmp_path, request):
    model = depthwise_model(data_format)
    x_nchw = RNG.standard_normal((2, 4, 10, 10)).astype("float32")
    x = to_keras(x_nchw, data_format)
    # The model's function, computed in channels_last (the same weights): a channels_first
    # Keras model may not run here (see kutils.keras_runs_channels_first).
    twin = depthwise_model("channels_last")
    twin.set_weights(model.get_weights())
    expected = to_keras(to_nchw(numpy(twin(to_keras(x_nchw, "channels_last"))),
                                "channels_last"), data_format)
    converted = doconv_tf.convert(model, D_mul=12)
    assert all(type(layer) is DOConv2D for layer in converted.layers)
    np.testing.assert_allclose(numpy(converted(x)), expected, rtol=1e-5, atol=1e-6)
    for layer in converted.layers:
        if layer.D is not None:
            layer.D.assign(0.1 * RNG.standard_normal(tuple(layer.D.shape)).astype("float32"))
    changed = numpy(converted(x))
    assert not np.allclose(changed, expected)
    fused = doconv_tf.fuse(converted)
    assert [type(layer) for layer in fused.layers] == [type(layer) for layer in model.layers]
    for old, new in zip(model.layers, fused.layers):
        assert new.get_config() == old.get_config(), old.name  # settings, names included
    assert fused.count_params() == model.count_params()
    # Both save and load as .keras files, safe mode on (the fused one is plain Keras).
    loaded = {}
    for name, saved in (("unfused", converted), ("fused", fused)):
        path = tmp_path / f"{name}.keras"
        saved.save(path)
        loaded[name] = keras.models.load_model(path, safe_mode=True)
        assert [type(layer) for layer in loaded[name].layers] == \
            [type(layer) for layer in saved.layers]
    np.testing.assert_array_equal(numpy(loaded["unfused"](x)), changed)
    # Last, Keras' own layers run: the fused model and its reloaded copy (depthwise, then a
    # Conv2D).
    if not expect_channels_first_refusal(request, data_format, "depthwise"):
        expect_channels_first_refusal(request, data_format, "conv")
    assert_fused_equal(numpy(fused(x)), changed, data_format)
    assert_fused_equal(numpy(loaded["fused"](x)), changed, data_format)


def test_no_deprecation_warnings_from_weight_reads():
    # ops.convert_to_numpy(variable) makes NumPy 2 warn about __array__'s `copy` keyword.
    model = depthwise_model("channels_last")
    model.add(keras.layers.BatchNormalization())  # a layer convert copies as it is
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        converted = doconv_tf.convert(model)
        {name: layer.to_params() for name, layer in doconv_tf.doconv_layers(converted).items()}
        doconv_tf.fuse(converted)
        for layer in converted.layers:
            if isinstance(layer, DOConv2D):
                layer.fuse()


def test_fused_depthwise_channels_first_bias_when_width_equals_filters(request):
    expect_keras_bias_bug(request, "depthwise",
                          "Keras 3.15 TF backend: DepthwiseConv2D, like Conv2D, adds a "
                          "channels_first bias along the width when the width equals the "
                          "filters (see test_api.KERAS_BIAS_BUG); DOConv2D avoids it")
    params = params_for(2, 1, 1, 1, "valid", 1, True)  # 2 filters
    layer = DOConv2D.from_params(params, data_format="channels_first")
    x = RNG.standard_normal((1, 2, 3, 2)).astype("float32")  # output width 2
    expected = x * params.W.reshape(1, 2, 1, 1) + params.bias.reshape(1, 2, 1, 1)
    np.testing.assert_allclose(numpy(layer(x)), expected, rtol=1e-6, atol=1e-6)
    fused = layer.fuse()
    assert type(fused) is keras.layers.DepthwiseConv2D
    np.testing.assert_allclose(numpy(fused(x)), expected, rtol=1e-6, atol=1e-6)
