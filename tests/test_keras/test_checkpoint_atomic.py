"""Keras imports are all-or-nothing; from_params takes explicit paddings equal to 'same'."""

from __future__ import annotations

import re

import numpy as np
import pytest

import keras

import doconv_core
import doconv_tf
from doconv_core import CheckpointError, ConvSpec, DOConvParams
from doconv_tf import DOConv2D
from checkpoint_files import as_int64, rewrite_npz

RNG = np.random.default_rng(7)


def weights(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.weights]


def assert_unchanged(model, before):
    after = weights(model)
    assert len(after) == len(before)
    assert all(np.array_equal(a, b) for a, b in zip(after, before))


def two_layers(name="m"):
    return keras.Sequential([DOConv2D(4, 3, padding="same", name="a"),
                             DOConv2D(2, 3, padding="same", name="b")], name=name)


def test_import_params_into_a_partly_built_model_changes_nothing(tmp_path):
    source = two_layers()
    source.build((None, 6, 6, 3))
    path = tmp_path / "p.npz"
    doconv_tf.export_params(source, path)
    target = two_layers("t")
    target.layers[0].build((None, 6, 6, 3))  # 'b' stays unbuilt
    before = weights(target)
    with pytest.raises(CheckpointError, match=re.escape(
            f"cannot load {str(path)!r}: layers ['b'] are not built (their in_channels are "
            "unknown); call the model on an input or build it first")):
        doconv_tf.import_params(target, path)
    assert_unchanged(target, before)
    target.build((None, 6, 6, 3))  # usable once built
    doconv_tf.import_params(target, path)
    assert all(np.array_equal(a, b) for a, b in zip(weights(target), weights(source)))


def test_import_params_with_an_integer_W_changes_nothing(tmp_path):
    source = two_layers()
    source.build((None, 6, 6, 3))
    path = tmp_path / "p.npz"
    doconv_tf.export_params(source, path)
    rewrite_npz(path, as_int64("b/W"))
    target = two_layers("t")
    target.build((None, 6, 6, 3))
    before = weights(target)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{str(path)!r}: layer 'b': W must hold floating-point numbers (float16, float32 "
            "or float64), got dtype int64")):
        doconv_tf.import_params(target, path)
    assert_unchanged(target, before)


def test_load_legacy_weights_with_an_integer_D_changes_nothing():
    layer = DOConv2D(4, 3)
    layer.build((None, 5, 5, 2))
    before = weights(layer)
    with pytest.raises(CheckpointError, match=re.escape(
            "the original TensorFlow weights: layer '" + layer.name + "': D must hold "
            "floating-point numbers (float16, float32 or float64), got dtype int64")):
        doconv_tf.load_legacy_weights(layer, W=np.zeros((9, 2, 4)),
                                      D=np.zeros((9, 9, 2), dtype=np.int64), bias=np.zeros(4))
    assert_unchanged(layer, before)


def params(spec):
    return DOConvParams(spec, RNG.standard_normal(spec.W_shape).astype("float32"),
                        RNG.standard_normal(spec.D_shape).astype("float32"),
                        RNG.standard_normal(spec.out_channels).astype("float32"))


@pytest.mark.parametrize("spec, padding", [
    (ConvSpec(3, 4, 3, padding=(1, 1)), "same"),  # PyTorch's most common layer
    (ConvSpec(3, 4, (3, 5), padding=(2, 4), dilation=2), "same"),
    (ConvSpec(3, 4, 3, padding=0, padding_mode="reflect"), "valid"),
])
def test_from_params_takes_explicit_padding_equal_to_same_or_valid(spec, padding):
    p = params(spec)
    layer = DOConv2D.from_params(p)
    assert layer.padding == padding
    x = RNG.standard_normal((2, 7, 9, 3)).astype("float32")
    expected = doconv_core.doconv2d(x.transpose(0, 3, 1, 2), p.D, p.W, p.bias, spec)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)).transpose(0, 3, 1, 2),
                               expected, rtol=1e-4, atol=1e-4)
    # set_params on a layer built with the string padding takes the same parameters.
    twin = DOConv2D(4, spec.kernel_size, padding=padding, dilation_rate=spec.dilation)
    twin.build((None, 7, 9, 3))
    twin.set_params(p)


@pytest.mark.parametrize("spec, message", [
    (ConvSpec(3, 4, 3, stride=2, padding=1),
     "params.spec.padding must be 'valid', 'same' or explicit padding that equals one of "
     "them (Keras' Conv2D has no other padding), got (1, 1) with kernel_size=(3, 3), "
     "stride=(2, 2) and dilation=(1, 1)"),
    (ConvSpec(3, 4, 3, padding=(1, 0)),
     "params.spec.padding must be 'valid', 'same' or explicit padding that equals one of "
     "them (Keras' Conv2D has no other padding), got (1, 0) with kernel_size=(3, 3), "
     "stride=(1, 1) and dilation=(1, 1)"),
    (ConvSpec(3, 4, 3, padding=1, padding_mode="circular"),
     "Keras pads with zeros only; params.spec.padding_mode must be 'zeros', got 'circular'"),
])
def test_from_params_refuses_other_padding(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DOConv2D.from_params(params(spec))
