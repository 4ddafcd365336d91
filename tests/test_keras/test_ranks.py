"""DOConv1D and DOConv3D against the NumPy reference on the core's fixed 1-D and 3-D cases
(``rank_cases``), both data formats: outputs, composed kernel, gradients, fusion to Keras'
own layers; the layer paths particular to a rank (1-D causal padding, 1-D depthwise, 3-D
groups on TensorFlow's CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import keras

import doconv_core
from doconv_core import ConvSpec, DOConvParams
from doconv_core.testing.cases import rank_cases
from doconv_tf import DOConv1D, DOConv2D, DOConv3D
from doconv_tf.layer import _to_numpy
from kutils import (BACKEND, expect_channels_first_refusal, float64, fused_class, gradients,
                    keras_layer_kind, layer_class, to_keras, to_nchw)
from test_reference import keras_case, keras_reason

RNG = np.random.default_rng(17)
ALL = rank_cases()
SUPPORTED = [keras_case(c) for c in ALL if keras_reason(c) is None]
UNSUPPORTED = {c.name: keras_reason(c) for c in ALL if keras_reason(c) is not None}
FORMATS = ("channels_last", "channels_first")


def numpy(value):
    return _to_numpy(value)  # keras.ops.convert_to_numpy(variable) makes NumPy 2 warn


def output_size(case):
    return case.spec.output_size(case.input_shape[2:])


def test_case_split_is_explicit():
    assert len(SUPPORTED) + len(UNSUPPORTED) == len(ALL)
    assert set(UNSUPPORTED.values()) <= {
        "explicit integer padding: Keras' Conv1D has only 'valid', 'same' and 'causal'",
        "explicit integer padding: Keras' Conv3D has only 'valid' and 'same'",
        "strides > 1 with dilation_rate > 1: Keras' Conv1D refuses it",
        "strides > 1 with dilation_rate > 1: Keras' Conv3D refuses it"}
    for rank in (1, 3):
        run = [c for c in SUPPORTED if c.spec.rank == rank]
        assert len(run) >= 20, rank
        assert {c.name.split("-")[1] for c in run} == {
            "one", "between", "depthwise", "depthwise_multiplier"}
        assert {c.spec.padding for c in run} == ({"valid", "same", "causal"} if rank == 1
                                                 else {"valid", "same"})
        assert any(max(c.spec.stride) == 2 for c in run)
        assert any(max(c.spec.dilation) == 2 for c in run)
        assert any(c.spec.D_mul > c.spec.mn > 1 for c in run)
        assert {keras_layer_kind(c.spec) for c in run} == (
            {"conv", "grouped", "depthwise"} if rank == 1 else {"conv", "grouped"})
    # A channels_first output whose last size equals the filters would meet Keras' bias bug
    # in the fused layer (test_api.KERAS_BIAS_BUG): the fused checks below compare exactly.
    assert not any(c.spec.bias and output_size(c)[-1] == c.spec.out_channels
                   for c in SUPPORTED)


@pytest.mark.parametrize("case", [c for c in ALL if keras_reason(c)], ids=lambda c: c.name)
def test_unsupported_cases_are_refused(case):
    spec = case.spec
    with pytest.raises(ValueError, match="padding must be 'valid'|strides > 1"):
        layer_class(spec.rank)(spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                               dilation_rate=spec.dilation, groups=spec.groups, D_mul=spec.D_mul)


def layer_for(case, arrays, data_format, dtype="float32"):
    params = DOConvParams(case.spec, arrays["W"], arrays["D"], arrays["bias"])
    return layer_class(case.spec.rank).from_params(params, data_format=data_format, dtype=dtype)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", SUPPORTED, ids=lambda c: c.name)
def test_float32_output_kernel_and_fused_match_reference(case, data_format, request):
    spec = case.spec
    arrays = case.arrays(np.float32)
    layer = layer_for(case, arrays, data_format)
    ref = {k: None if v is None else v.astype(np.float64) for k, v in arrays.items()}
    expected = doconv_core.doconv(ref["x"], ref["D"], ref["W"], ref["bias"], spec)
    # The feature composition agrees with the kernel one: an independent check of c(o, i).
    np.testing.assert_allclose(
        doconv_core.doconv_features(ref["x"], ref["D"], ref["W"], ref["bias"], spec),
        expected, atol=1e-10)
    x = to_keras(arrays["x"], data_format)
    got = to_nchw(numpy(layer(x)), data_format)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # float32 rounding
    assert layer.compute_output_shape(x.shape) == to_keras(got, data_format).shape
    kernel = doconv_core.compose_kernel(ref["D"], ref["W"], groups=spec.groups,
                                        kernel_size=spec.kernel_size)
    np.testing.assert_allclose(numpy(layer.kernel), doconv_core.oihw_to_hwio(kernel),
                               rtol=1e-6, atol=1e-6)
    exported = layer.to_params()
    assert exported.spec == spec
    np.testing.assert_array_equal(exported.W, arrays["W"])
    if spec.has_D:
        np.testing.assert_array_equal(exported.D, arrays["D"])
    conv = layer.fuse()
    assert type(conv) is fused_class(spec)
    assert conv.get_config()["padding"] == spec.padding
    # Last, Keras' own layer runs: the fused one.
    expect_channels_first_refusal(request, data_format, keras_layer_kind(spec),
                                  rank=spec.rank)
    fused = to_nchw(numpy(conv(x)), data_format)
    if same_op(layer):
        np.testing.assert_array_equal(fused, got)
    else:
        np.testing.assert_allclose(fused, got, rtol=1e-5, atol=1e-6)


def same_op(layer) -> bool:
    """Whether the layer's fused Keras layer runs the very op the layer runs: not where the
    layer transposes channels_first data (TensorFlow's CPU: Keras runs a channels_first
    Conv3D, and its grouped convs, through XLA) or runs one conv per group."""
    return layer._conv_format == layer.data_format and not layer._split_groups


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", SUPPORTED, ids=lambda c: c.name)
def test_float64_output_and_gradients_match_reference(case, data_format):
    spec = case.spec
    with float64():
        arrays = case.arrays(np.float64, seed=1)
        layer = layer_for(case, arrays, data_format, dtype="float64")
        y_shape = (case.input_shape[0], spec.out_channels) + output_size(case)
        grad_y = np.random.default_rng(3).standard_normal(y_shape)
        x = to_keras(arrays["x"], data_format)
        y = to_nchw(numpy(layer(x)), data_format)
        got = gradients(layer, x, to_keras(grad_y, data_format))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, doconv_core.doconv(arrays["x"], arrays["D"], arrays["W"],
                                                     arrays["bias"], spec), rtol=0, atol=1e-9)
    expected = doconv_core.doconv_vjp(arrays["x"], arrays["D"], arrays["W"], arrays["bias"],
                                      spec, grad_y)
    assert set(got) == {"x", "W"} | ({"D"} if spec.has_D else set()) | (
        {"bias"} if spec.bias else set())
    np.testing.assert_allclose(to_nchw(got["x"], data_format), expected["x"], atol=1e-9)
    np.testing.assert_allclose(np.transpose(got["W"], (2, 1, 0)), expected["W"], atol=1e-9)
    if spec.has_D:
        np.testing.assert_allclose(got["D"], expected["D"], atol=1e-9)
    if spec.bias:
        np.testing.assert_allclose(got["bias"], expected["bias"], atol=1e-9)


@pytest.mark.parametrize("case", SUPPORTED[::4], ids=lambda c: c.name)
def test_float32_gradients_match_reference_loosely(case):
    spec = case.spec
    arrays = case.arrays(np.float32, seed=2)
    layer = layer_for(case, arrays, "channels_last")
    grad_y = np.random.default_rng(5).standard_normal(
        (case.input_shape[0], spec.out_channels) + output_size(case)).astype(np.float32)
    got = gradients(layer, to_keras(arrays["x"], "channels_last"),
                    to_keras(grad_y, "channels_last"))
    ref = {k: None if v is None else v.astype(np.float64) for k, v in arrays.items()}
    expected = doconv_core.doconv_vjp(ref["x"], ref["D"], ref["W"], ref["bias"], spec,
                                      grad_y.astype(np.float64))
    tolerance = {"rtol": 1e-4, "atol": 1e-4}
    np.testing.assert_allclose(to_nchw(got["x"], "channels_last"), expected["x"], **tolerance)
    np.testing.assert_allclose(np.transpose(got["W"], (2, 1, 0)), expected["W"], **tolerance)
    if spec.has_D:
        np.testing.assert_allclose(got["D"], expected["D"], **tolerance)


# -- per rank: Keras' arguments, initialisation, config, saving --------------------------------
SHAPES = {1: (2, 11, 4), 3: (2, 5, 6, 7, 4)}  # channels_last, 4 channels


@pytest.mark.parametrize("rank,kwargs", [
    (1, dict(kernel_size=3, padding="causal", dilation_rate=2)),
    (1, dict(kernel_size=5, strides=2, padding="same", groups=2)),
    (1, dict(kernel_size=2, padding="valid", activation="relu")),
    (3, dict(kernel_size=(3, 1, 2), strides=(1, 2, 1), padding="same")),
    (3, dict(kernel_size=3, padding="valid", groups=2, use_bias=False)),
    (3, dict(kernel_size=(1, 3, 3), dilation_rate=(1, 2, 1), padding="same")),
])
def test_parity_with_keras_conv(rank, kwargs):
    conv = getattr(keras.layers, f"Conv{rank}D")(6, bias_initializer="random_normal",
                                                 **kwargs)
    x = RNG.standard_normal(SHAPES[rank]).astype("float32")
    expected = numpy(conv(x))
    layer = layer_class(rank)(6, bias_initializer="random_normal", **kwargs)
    layer.build(x.shape)
    spec = layer.spec
    D, W = doconv_core.embed_kernel(doconv_core.hwio_to_oihw(numpy(conv.kernel)),
                                    groups=spec.groups, D_mul=spec.D_mul)
    bias = numpy(conv.bias) if conv.use_bias else None
    layer.set_params(DOConvParams(spec, W, D, bias))
    np.testing.assert_allclose(numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)
    for shape in (x.shape, (None,) * (rank + 1) + (4,)):
        assert layer.compute_output_shape(shape) == conv.compute_output_shape(shape)
    ours, theirs = layer.get_config(), conv.get_config()
    for key, value in theirs.items():
        if key != "name" and not key.startswith("lora"):
            assert ours[key] == value, key
    assert ours["D_mul"] == spec.mn


@pytest.mark.parametrize("rank", [1, 3])
def test_initialisation_matches_keras_conv_with_the_same_seeded_initializer(rank):
    conv = getattr(keras.layers, f"Conv{rank}D")(
        6, 3, kernel_initializer=keras.initializers.GlorotUniform(seed=7))
    layer = layer_class(rank)(6, 3, kernel_initializer=keras.initializers.GlorotUniform(seed=7))
    x = RNG.standard_normal(SHAPES[rank]).astype("float32")
    conv(x), layer(x)
    np.testing.assert_array_equal(numpy(layer.kernel), numpy(conv.kernel))
    assert numpy(layer.kernel).shape == (3,) * rank + (4, 6)
    np.testing.assert_array_equal(numpy(layer.D), 0)
    assert tuple(layer.D.shape) == (4, 3 ** rank, 3 ** rank)


@pytest.mark.parametrize("cls,kernel_size", [(DOConv1D, 4), (DOConv3D, (3, 1, 2))])
def test_get_config_round_trips_and_registers(cls, kernel_size):
    layer = cls(6, kernel_size, strides=2, padding="same", data_format="channels_first",
                groups=3, activation="relu", use_bias=False,
                kernel_regularizer=keras.regularizers.L2(0.01), D_mul=9, name="dc",
                dtype="mixed_bfloat16")
    config = layer.get_config()
    assert cls.from_config(config).get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"doconv>{cls.__name__}"
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is cls and again.get_config() == config


def test_keras_files_round_trip_for_1d_and_3d_models(tmp_path):
    models = {
        "1d": keras.Sequential([
            keras.Input((16, 4)),
            DOConv1D(8, 3, padding="causal", dilation_rate=2, D_mul=5, name="causal"),
            DOConv1D(8, 3, padding="same", groups=8, bias_initializer="random_normal",
                     name="dw"),
            DOConv1D(4, 1, name="pw")]),
        "3d": keras.Sequential([
            keras.Input((4, 6, 6, 4)),
            DOConv3D(6, 3, padding="same", groups=2, activation="relu", name="grouped"),
            DOConv3D(6, (1, 3, 3), strides=(1, 2, 2), groups=6, name="dw"),
            DOConv3D(2, 1, data_format="channels_last", name="pw")]),
    }
    for key, model in models.items():
        for layer in model.layers:
            if layer.D is not None:
                layer.D.assign(0.1 * RNG.standard_normal(tuple(layer.D.shape)).astype("float32"))
        x = RNG.standard_normal((2,) + tuple(model.inputs[0].shape[1:])).astype("float32")
        path = tmp_path / f"{key}.keras"
        model.save(path)
        loaded = keras.models.load_model(path, safe_mode=True)  # no custom_objects
        assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
        assert [layer.get_config() for layer in loaded.layers] == \
            [layer.get_config() for layer in model.layers]
        np.testing.assert_array_equal(numpy(loaded(x)), numpy(model(x)))


# -- 1-D: causal padding, depthwise ----------------------------------------------------------
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("kernel_size,dilation,strides,groups", [
    (3, 1, 1, 1), (3, 2, 1, 1), (4, 1, 2, 2), (3, 3, 1, 4)])
def test_causal_padding(data_format, kernel_size, dilation, strides, groups):
    layer = DOConv1D(8, kernel_size, strides=strides, padding="causal", dilation_rate=dilation,
                     groups=groups, data_format=data_format, bias_initializer="random_normal",
                     D_mul=kernel_size + 2)
    x = RNG.standard_normal((2, 4, 15)).astype("float32")  # channels first
    layer.build(to_keras(x, data_format).shape)
    layer.D.assign(0.2 * RNG.standard_normal(tuple(layer.D.shape)).astype("float32"))
    y = to_nchw(numpy(layer(to_keras(x, data_format))), data_format)
    assert y.shape == (2, 8, -(-15 // strides))  # as 'same': ceil(length / stride)
    params = layer.to_params()
    assert params.spec.padding == "causal"
    np.testing.assert_allclose(
        y, doconv_core.doconv(x.astype(np.float64), params.D, params.W, params.bias,
                              params.spec), rtol=1e-5, atol=1e-5)
    # Output t reads inputs up to t * stride only: changing the future changes nothing before.
    t = 5
    later = x.copy()
    later[:, :, t * strides + 1:] = RNG.standard_normal(later[:, :, t * strides + 1:].shape)
    changed = to_nchw(numpy(layer(to_keras(later, data_format))), data_format)
    np.testing.assert_array_equal(changed[:, :, :t + 1], y[:, :, :t + 1])
    assert not np.allclose(changed[:, :, t + 1:], y[:, :, t + 1:])
    # Keras' DepthwiseConv1D has no causal padding: a depthwise causal layer stays a Conv1D.
    fused = layer.fuse()
    assert type(fused) is keras.layers.Conv1D and fused.padding == "causal"
    assert layer._depthwise_multiplier() is None
    if data_format == "channels_last":  # Keras' own NCW Conv1D may not run here (kutils)
        np.testing.assert_array_equal(numpy(fused(to_keras(x, data_format))),
                                      to_keras(y, data_format))


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("strides,dilation,padding,multiplier", [
    (1, 1, "same", 1), (2, 1, "valid", 2), (1, 2, "same", 2), (3, 1, "same", 1)])
def test_depthwise_1d_runs_as_depthwise_and_matches_the_grouped_conv(
        data_format, strides, dilation, padding, multiplier, request):
    class GroupedDOConv1D(DOConv1D):
        def _depthwise_multiplier(self):
            return None

    spec = ConvSpec(3, 3 * multiplier, 3, strides, padding, dilation, groups=3, D_mul=5,
                    rank=1)
    params = DOConvParams(spec, RNG.standard_normal(spec.W_shape),
                          0.3 * RNG.standard_normal(spec.D_shape),
                          RNG.standard_normal(spec.out_channels))
    # Length 15: no output length equals the filters (the Keras bias bug, test_api).
    x = to_keras(RNG.standard_normal((2, 3, 15)), data_format)
    with float64():
        layer = DOConv1D.from_params(params, data_format=data_format, dtype="float64")
        grouped = GroupedDOConv1D.from_params(params, data_format=data_format, dtype="float64")
        assert layer._depthwise_multiplier() == multiplier
        y = numpy(layer(x))
        np.testing.assert_allclose(y, numpy(grouped(x)), rtol=1e-10, atol=1e-10)
        grad_y = RNG.standard_normal(y.shape)
        got, expected = gradients(layer, x, grad_y), gradients(grouped, x, grad_y)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-10, atol=1e-10, err_msg=name)
        fused = layer.fuse()
        assert type(fused) is keras.layers.DepthwiseConv1D
        assert fused.get_config()["depth_multiplier"] == multiplier
        assert [tuple(w.shape) for w in fused.weights] == [(3, 3, multiplier),
                                                           (3 * multiplier,)]
        expect_channels_first_refusal(request, data_format, "depthwise", "float64", rank=1)
        np.testing.assert_array_equal(numpy(fused(x)), y)


# -- 3-D: groups -------------------------------------------------------------------------------
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("groups,filters", [(2, 6), (4, 4), (4, 8)])
def test_grouped_3d_matches_keras_grouped_conv(data_format, groups, filters, request):
    """On TensorFlow's CPU a grouped DOConv3D runs one conv per group; Keras' own grouped
    Conv3D (XLA there) computes the same values and gradients."""

    class KerasGroupedDOConv3D(DOConv3D):
        def build(self, input_shape):
            super().build(input_shape)
            self._split_groups = False  # ops.conv with the grouped kernel, as Conv3D

    spec = ConvSpec(4, filters, (3, 2, 3), padding="same", groups=groups, D_mul=20, rank=3)
    params = DOConvParams(spec, RNG.standard_normal(spec.W_shape) / 5,
                          0.3 * RNG.standard_normal(spec.D_shape),
                          RNG.standard_normal(spec.out_channels))
    # Last size 7: not the filters (the Keras bias bug, test_api).
    x = to_keras(RNG.standard_normal((2, 4, 4, 5, 7)), data_format)
    with float64():
        layer = DOConv3D.from_params(params, data_format=data_format, dtype="float64")
        keras_path = KerasGroupedDOConv3D.from_params(params, data_format=data_format,
                                                      dtype="float64")
        on_tensorflow_cpu = BACKEND == "tensorflow" and not keras.distribution.list_devices(
            "gpu")
        assert layer._split_groups is on_tensorflow_cpu
        assert layer._depthwise_multiplier() is None  # no DepthwiseConv3D
        y = numpy(layer(x))
        np.testing.assert_allclose(y, numpy(keras_path(x)), rtol=1e-10, atol=1e-10)
        grad_y = RNG.standard_normal(y.shape)
        got, expected = gradients(layer, x, grad_y), gradients(keras_path, x, grad_y)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-10, atol=1e-10, err_msg=name)
        fused = layer.fuse()
        assert type(fused) is keras.layers.Conv3D and fused.groups == groups
        expect_channels_first_refusal(request, data_format, "grouped", "float64", rank=3)
        np.testing.assert_allclose(numpy(fused(x)), y, rtol=1e-10, atol=1e-10)


def test_grouped_3d_trains_in_fit():
    model = keras.Sequential([keras.Input((4, 6, 6, 4)),
                              DOConv3D(8, 3, padding="same", groups=4, name="g"),
                              keras.layers.GlobalAveragePooling3D(), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = numpy(model.get_layer("g").D).copy()
    model.fit(RNG.standard_normal((4, 4, 6, 6, 4)), np.ones((4, 1)), epochs=2, verbose=0)
    assert not np.array_equal(numpy(model.get_layer("g").D), before)


# -- errors ------------------------------------------------------------------------------------
ERRORS = [
    (DOConv1D, dict(filters=4, kernel_size=3, padding="full"),
     "padding must be 'valid', 'same' or 'causal' (Keras' Conv1D has no explicit padding), "
     "got 'full'"),
    (DOConv1D, dict(filters=4, kernel_size=3, padding=1),
     "padding must be 'valid', 'same' or 'causal' (Keras' Conv1D has no explicit padding), "
     "got 1"),
    (DOConv2D, dict(filters=4, kernel_size=3, padding="causal"),
     "padding must be 'valid' or 'same' (Keras' Conv2D has no explicit padding), got 'causal'"),
    (DOConv3D, dict(filters=4, kernel_size=3, padding="causal"),
     "padding must be 'valid' or 'same' (Keras' Conv3D has no explicit padding), got 'causal'"),
    (DOConv1D, dict(filters=4, kernel_size=(3, 3)),
     "kernel_size must be an integer >= 1 or a sequence of one of them, got 2 values: (3, 3)"),
    (DOConv3D, dict(filters=4, kernel_size=(3, 3)),
     "kernel_size must be an integer >= 1 or a triple of them, got 2 values: (3, 3)"),
    (DOConv3D, dict(filters=4, kernel_size=3, strides=(1, 2)),
     "strides must be an integer >= 1 or a triple of them, got 2 values: (1, 2)"),
    (DOConv1D, dict(filters=4, kernel_size=3, strides=2, dilation_rate=2),
     "strides > 1 together with dilation_rate > 1 is not supported by Keras' Conv1D, "
     "got strides=(2,) and dilation_rate=(2,)"),
    (DOConv3D, dict(filters=4, kernel_size=3, D_mul=26),
     "D_mul must be >= kernel volume = 27 for a 3x3x3 kernel, got 26"),
    (DOConv1D, dict(filters=4, kernel_size=3, D_mul=2),
     "D_mul must be >= kernel length = 3, got 2"),
    (DOConv3D, dict(filters=4, kernel_size=1, D_mul=2),
     "D_mul must be 1 or None for a 1x1x1 kernel (it has no depthwise part), got 2"),
]


@pytest.mark.parametrize("cls,kwargs,message", ERRORS, ids=[m[:40] for _, _, m in ERRORS])
def test_bad_arguments_raise_clear_value_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**kwargs)


def test_bad_inputs_and_params():
    with pytest.raises(ValueError, match=re.escape("DOConv1D expects 3-D inputs (batch, ...)")):
        DOConv1D(4, 3).build((None, 5, 5, 3))
    with pytest.raises(ValueError, match=re.escape("DOConv3D expects 5-D inputs (batch, ...)")):
        DOConv3D(4, 3).build((None, 5, 5, 3))
    with pytest.raises(ValueError, match="expected ndim=5, found ndim=4"):  # Keras' input_spec
        DOConv3D(4, 3)(np.zeros((1, 5, 5, 3), "float32"))
    layer = DOConv3D(4, 3, data_format="channels_first")
    layer.build((None, 3, 5, 5, 5))
    with pytest.raises(ValueError, match=re.escape(
            "input must have 3 channels (the layer's in_channels), got 2")):
        layer(np.zeros((1, 2, 5, 5, 5), "float32"))
    with pytest.raises(ValueError, match=re.escape(
            "an input of spatial size (2, 5, 5) is too small for kernel_size (3, 3, 3)")):
        layer.compute_output_shape((1, 3, 2, 5, 5))
    # from_params takes the class's rank only.
    spec = ConvSpec(2, 4, 3, rank=1)
    params = DOConvParams(spec, np.zeros(spec.W_shape), np.zeros(spec.D_shape), np.zeros(4))
    with pytest.raises(ValueError, match=re.escape(
            "params.spec describes a 1-D layer (rank 1); DOConv2D.from_params takes rank 2: "
            "use DOConv1D.from_params")):
        DOConv2D.from_params(params)
    causal = DOConv1D(4, 3, padding="causal")
    causal.build((None, None, 2))
    with pytest.raises(ValueError, match="params.spec must describe this layer.s function"):
        causal.set_params(params)  # 'valid' is another function
    # Explicit padding equal to 'same' loads; other explicit padding has no Keras spelling.
    same = DOConv1D.from_params(DOConvParams(ConvSpec(2, 4, 3, padding=1, rank=1), params.W,
                                             params.D, params.bias))
    assert same.padding == "same"
    with pytest.raises(ValueError, match=re.escape(
            "params.spec.padding must be 'valid', 'same', 'causal' or explicit padding that "
            "equals one of them (Keras' Conv1D has no other padding), got (2,)")):
        DOConv1D.from_params(DOConvParams(ConvSpec(2, 4, 3, padding=2, rank=1), params.W,
                                          params.D, params.bias))
