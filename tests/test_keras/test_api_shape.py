"""doconv_tf offers the common adapter API (doconv_core.testing.api) with its semantics:
copying convert/fuse, one include rule, the core's errors, settings kept through both."""

from __future__ import annotations

import re
import types
import warnings

import numpy as np
import pytest

import keras

import doconv_core
import doconv_tf
from doconv_core.testing.api import COPYING_FUNCTIONS, api_problems
from doconv_tf import DOConv2D
from doconv_tf.layer import _to_numpy

RNG = np.random.default_rng(11)
# What convert replaces, as its messages name it.
CONVERTED = "Conv1D, Conv2D, Conv3D, DepthwiseConv1D or DepthwiseConv2D"


def numpy(x):
    return _to_numpy(x)  # keras.ops.convert_to_numpy(variable) makes NumPy 2 warn


def weights(model):
    return [numpy(w) for w in model.weights]


def kinds(model):
    return [(type(layer), layer.name) for layer in model._flatten_layers(include_self=False)]


def functional():
    inner = keras.Sequential([keras.Input((8, 8, 4)),
                              keras.layers.Conv2D(4, 3, padding="same", name="conv_inner")],
                             name="inner")
    inputs = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(4, 3, padding="same", name="conv_a",
                            bias_initializer="random_normal")(inputs)
    b = keras.layers.DepthwiseConv2D(3, padding="same", name="dw",
                                     bias_initializer="random_normal")(a)
    c = keras.layers.Conv2D(4, 1, name="conv_b")(inner(b))
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(c))
    return keras.Model(inputs, outputs)


def test_doconv_tf_offers_the_common_api():
    assert api_problems(doconv_tf) == []


def test_api_check_can_fail():
    # The check above means something: a package lacking or misspelling a name is reported.
    fake = types.ModuleType("doconv_tf")
    fake.__file__ = doconv_tf.__file__
    fake.__all__ = [name for name in doconv_tf.__all__ if name != "load_legacy"]
    for name in fake.__all__:
        setattr(fake, name, getattr(doconv_tf, name))

    def fuse(model, inplace=False):
        return model

    fuse.__module__ = "doconv_tf.model"
    fake.fuse = fuse
    assert api_problems(fake) == [
        "doconv_tf.__all__ lacks 'load_legacy'",
        "doconv_tf.fuse(model, inplace=False) differs from (model)",
        "doconv_tf.load_legacy is missing",
    ]


def perturbed(model):
    for layer in doconv_tf.doconv_layers(model).values():
        if layer.D is not None:
            layer.D.assign(0.1 * RNG.standard_normal(tuple(layer.D.shape)).astype("float32"))
    return model


# What each copying function is given: a model it changes.
GIVEN = {
    "convert": functional,
    "fuse": lambda: perturbed(doconv_tf.convert(functional(), D_mul=10)),
}


@pytest.mark.parametrize("name", COPYING_FUNCTIONS)
def test_copying_functions_return_a_new_model_and_leave_the_given_one(name):
    model = GIVEN[name]()
    x = RNG.standard_normal((2, 8, 8, 4)).astype("float32")
    before_kinds, before_weights = kinds(model), weights(model)
    expected = numpy(model(x))
    result = getattr(doconv_tf, name)(model)
    assert result is not model
    assert kinds(result) != before_kinds  # it did change something ...
    assert kinds(model) == before_kinds  # ... in the copy only
    old_ids = {id(layer) for layer in model._flatten_layers()}
    assert not old_ids & {id(layer) for layer in result._flatten_layers()}
    old_variables = {id(v) for v in model.weights}
    assert not old_variables & {id(v) for v in result.weights}
    np.testing.assert_allclose(numpy(result(x)), expected, rtol=1e-5, atol=1e-5)
    # Changing the copy's weights leaves the given model's.
    result.set_weights([w + 1 for w in weights(result)])
    after = weights(model)
    assert len(after) == len(before_weights)
    assert all(np.array_equal(a, b) for a, b in zip(after, before_weights))


SELECTED = {"conv_a", "conv_b", "conv_inner"}


@pytest.mark.parametrize("include", [
    "conv_*",
    ["conv_a", "conv_b", "conv_inner"],
    ("conv_[ab]", "conv_inner"),
    lambda name, layer: name.startswith("conv_"),
], ids=["pattern", "list", "tuple", "callable"])
def test_include_forms_select_the_same_layers(include):
    converted = doconv_tf.convert(functional(), include=include)
    assert set(doconv_tf.doconv_layers(converted)) == SELECTED
    assert type(converted.get_layer("dw")) is keras.layers.DepthwiseConv2D


def test_include_callable_gets_the_name_and_the_given_layer():
    model = functional()
    seen = {}

    def include(name, layer):
        seen[name] = layer
        return True

    doconv_tf.convert(model, include=include)
    originals = {layer.name: layer for layer in model._flatten_layers()}
    assert set(seen) == SELECTED | {"dw"}  # asked for Conv2D and DepthwiseConv2D only
    assert all(seen[name] is originals[name] for name in seen)


@pytest.mark.parametrize("include", [
    "nothing*", "conv_", ["head", "inner"], lambda name, layer: False,
], ids=["pattern", "whole-name", "list", "callable"])
def test_convert_with_nothing_selected_raises_the_core_error(include):
    # Patterns match whole names: "conv_" is no layer's, "inner" is a model, not a conv.
    model = functional()
    before, values = kinds(model), weights(model)
    expected = str(doconv_core.nothing_to_convert(model, CONVERTED, include))
    assert "include=" in expected
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        doconv_tf.convert(model, include=include)
    assert kinds(model) == before
    assert all(np.array_equal(a, b) for a, b in zip(weights(model), values))


def test_convert_without_convolutions_raises_the_core_error():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=re.escape(
            f"convert found no {CONVERTED} in Sequential; nothing would change")):
        doconv_tf.convert(model)


def test_fuse_without_doconv_layers_warns_and_copies():
    model = functional()
    x = RNG.standard_normal((1, 8, 8, 4)).astype("float32")
    message = doconv_core.nothing_to_fuse(model, "DOConv1D, DOConv2D or DOConv3D")
    assert message.startswith("fuse found no DOConv1D, DOConv2D or DOConv3D in Functional")
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}$"):
        fused = doconv_tf.fuse(model)
    assert fused is not model
    assert [kind for kind, _ in kinds(fused)] == [kind for kind, _ in kinds(model)]
    np.testing.assert_array_equal(numpy(fused(x)), numpy(model(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        doconv_tf.fuse(doconv_tf.convert(model))  # no warning with DOConv2D layers


SETTINGS = dict(activation="relu", bias_regularizer=keras.regularizers.L1(0.02),
                activity_regularizer=keras.regularizers.L2(0.03),
                bias_constraint=keras.constraints.MaxNorm(3.0),
                bias_initializer="random_normal", trainable=False, dtype="mixed_bfloat16")


def configured():
    inputs = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(6, 3, padding="same", groups=2, name="c",
                            kernel_regularizer=keras.regularizers.L2(0.01),
                            kernel_constraint=keras.constraints.NonNeg(), **SETTINGS)(inputs)
    b = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="d",
                                     depthwise_regularizer=keras.regularizers.L1(0.04),
                                     depthwise_constraint=keras.constraints.UnitNorm(),
                                     **{**SETTINGS, "trainable": True, "dtype": "float32"})(a)
    return keras.Model(inputs, b)


# A DepthwiseConv2D's settings under DOConv2D's (Conv2D's) names.
AS_CONV = {"depthwise_initializer": "kernel_initializer",
           "depthwise_regularizer": "kernel_regularizer",
           "depthwise_constraint": "kernel_constraint"}


def test_settings_survive_convert_and_fuse():
    model = configured()
    converted = doconv_tf.convert(model)
    for name in ("c", "d"):
        old, new = model.get_layer(name), converted.get_layer(name)
        assert isinstance(new, DOConv2D)
        ours = new.get_config()
        for key, value in old.get_config().items():
            if key != "depth_multiplier":
                assert ours[AS_CONV.get(key, key)] == value, (name, key)
    c, d = converted.get_layer("c"), converted.get_layer("d")
    assert not c.trainable and c.dtype_policy.name == "mixed_bfloat16"
    assert c.W.regularizer is c.kernel_regularizer and c.kernel_regularizer is not None
    assert isinstance(c.W.constraint, keras.constraints.NonNeg)
    assert isinstance(d.W.constraint, keras.constraints.UnitNorm)
    assert d.kernel_regularizer.get_config()["l1"] == pytest.approx(0.04)
    assert d.trainable and d.dtype_policy.name == "float32"
    assert len(converted.trainable_weights) == 3  # d's W, D and bias; c is frozen
    # The same penalties: regularizers on W (= the kernel while D = 0) and on the bias.
    x = RNG.standard_normal((2, 8, 8, 4)).astype("float32")
    model(x), converted(x)
    assert len(converted.losses) == len(model.losses) == 4  # a frozen layer: activity only
    def total(losses):
        return sum(float(numpy(keras.ops.cast(loss, "float32"))) for loss in losses)

    np.testing.assert_allclose(total(converted.losses), total(model.losses), rtol=1e-2)
    fused = doconv_tf.fuse(converted)
    for name in ("c", "d"):
        old, new = model.get_layer(name), fused.get_layer(name)
        assert type(new) is type(old)
        assert new.get_config() == old.get_config(), name
    assert len(fused.trainable_weights) == len(model.trainable_weights)


def test_doconv_layers_and_a_model_that_is_one_layer(tmp_path):
    converted = doconv_tf.convert(functional())
    layers = doconv_tf.doconv_layers(converted)
    assert set(layers) == SELECTED | {"dw"}
    assert all(isinstance(layer, DOConv2D) for layer in layers.values())
    assert layers["conv_inner"] is converted.get_layer("inner").get_layer("conv_inner")
    with pytest.raises(ValueError, match="model must be a keras.Model or keras.layers.Layer"):
        doconv_tf.doconv_layers(object())
    # One DOConv2D is named "" here and ROOT_NAME in files.
    layer = DOConv2D(3, 3)
    layer.build((None, 6, 6, 2))
    assert doconv_tf.doconv_layers(layer) == {"": layer}
    path = tmp_path / "one.npz"
    doconv_tf.export_params(layer, path)
    assert set(doconv_core.load_params(path)) == {doconv_core.ROOT_NAME}
    twin = DOConv2D(3, 3)
    twin.build((None, 6, 6, 2))
    assert doconv_tf.import_params(twin, path) == [doconv_core.ROOT_NAME]
    np.testing.assert_array_equal(numpy(twin.kernel), numpy(layer.kernel))


def test_doconv_layers_refuses_two_layers_of_one_name():
    inputs = keras.Input((6, 6, 2))
    branches = [keras.Sequential([keras.Input((6, 6, 2)), DOConv2D(2, 3, name="same")],
                                 name=f"branch{index}")(inputs) for index in range(2)]
    model = keras.Model(inputs, keras.layers.Add()(branches))
    with pytest.raises(ValueError, match=re.escape(
            "two DO-Conv layers are named 'same'; layer names must be unique")):
        doconv_tf.doconv_layers(model)
