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
from kutils import build_in_inference_mode, torch_only, values

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


def exported(path):
    """A built two_layers() model and its parameters written to ``path``."""
    source = two_layers()
    source.build((None, 6, 6, 3))
    doconv_tf.export_params(source, path)
    return source


def test_import_params_into_a_partly_built_model_changes_nothing(tmp_path):
    path = tmp_path / "p.npz"
    source = exported(path)
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
    path = tmp_path / "p.npz"
    exported(path)
    rewrite_npz(path, as_int64("b/W"))
    target = two_layers("t")
    target.build((None, 6, 6, 3))
    before = weights(target)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{str(path)!r}: layer 'b': W must hold floating-point numbers (float16, float32 "
            "or float64), got dtype int64")):
        doconv_tf.import_params(target, path)
    assert_unchanged(target, before)


@torch_only
def test_imports_into_inference_tensors_change_nothing(tmp_path):
    # A layer built under torch.inference_mode() holds inference tensors, which only
    # inference mode can write: every import refuses before any layer changes.
    path = tmp_path / "p.safetensors"
    source = exported(path)
    target = two_layers("t")
    target.layers[0].build((None, 6, 6, 3))
    build_in_inference_mode(target.layers[1], (None, 6, 6, 4))
    before = weights(target)
    problem = ("layers ['b'] hold variables that are torch inference tensors (built under "
               "torch.inference_mode()), which only inference mode can write; build the "
               "layers outside it")
    with pytest.raises(CheckpointError, match=re.escape(f"cannot load {str(path)!r}: {problem}")):
        doconv_tf.import_params(target, path)
    with pytest.raises(CheckpointError, match=re.escape(
            f"cannot load the legacy checkpoint: {problem}")):
        doconv_tf.load_legacy(target, legacy_weights(target))
    with pytest.raises(ValueError, match=re.escape(
            "set_params: the layer's variables are torch inference tensors")):
        target.layers[1].set_params(source.layers[1].to_params())
    assert_unchanged(target, before)
    # Inside inference mode they can take values, as torch allows.
    import torch

    with torch.inference_mode():
        assert doconv_tf.import_params(target, path) == ["a", "b"]
    assert all(np.array_equal(a, b) for a, b in zip(weights(target), weights(source)))


def test_import_params_into_a_bfloat16_layer(tmp_path):
    # A bfloat16 layer after a float32 one: the values are cast by Keras (NumPy has no
    # bfloat16), so the import cannot fail halfway.
    path = tmp_path / "p.safetensors"
    source = exported(path)
    target = keras.Sequential([DOConv2D(4, 3, padding="same", name="a"),
                               DOConv2D(2, 3, padding="same", name="b", dtype="bfloat16")])
    target.build((None, 6, 6, 3))
    assert target.layers[1].W.dtype == "bfloat16"
    assert doconv_tf.import_params(target, path) == ["a", "b"]
    expected = [keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(w, dtype), "float32"))
                for w, dtype in zip(source.weights, ["float32"] * 3 + ["bfloat16"] * 3)]
    assert all(np.array_equal(a, b) for a, b in zip(values(target), expected))


def legacy_weights(model):
    """The original Keras layer's arrays for every DOConv2D of a built model."""
    weights = {}
    for name, layer in doconv_tf.doconv_layers(model).items():
        spec = layer.spec
        prefix = f"{name}." if name else ""
        weights[prefix + "W"] = RNG.standard_normal((spec.D_mul, spec.in_per_group,
                                                     spec.out_channels))
        weights[prefix + "D"] = RNG.standard_normal((spec.mn, spec.D_mul, spec.in_channels))
        weights[prefix + "bias"] = RNG.standard_normal(spec.out_channels)
    return weights


def test_load_legacy_with_an_integer_D_in_the_second_layer_changes_nothing():
    model = two_layers()
    model.build((None, 6, 6, 3))
    before = weights(model)
    legacy = legacy_weights(model)
    legacy["b.D"] = legacy["b.D"].astype(np.int64)
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint: layer 'b': D must hold floating-point numbers (float16, "
            "float32 or float64), got dtype int64")):
        doconv_tf.load_legacy(model, legacy)
    assert_unchanged(model, before)  # 'a' was valid, and is untouched too


def test_load_legacy_into_a_partly_built_model_changes_nothing():
    model = two_layers()
    model.layers[0].build((None, 6, 6, 3))
    before = weights(model)
    with pytest.raises(CheckpointError, match=re.escape(
            "cannot load the legacy checkpoint: layers ['b'] are not built")):
        doconv_tf.load_legacy(model, {"a.W": np.zeros((9, 3, 4))}, strict=False)
    assert_unchanged(model, before)


def test_load_legacy_whole_model_strict_and_not():
    model = two_layers()
    model.build((None, 6, 6, 3))
    legacy = legacy_weights(model)
    report = doconv_tf.load_legacy(model, legacy)
    assert isinstance(report, doconv_tf.LegacyLoadReport)
    assert report.exact == ["a", "b"]
    assert (report.missing_keys, report.unexpected_keys) == ([], [])
    for name in ("a", "b"):
        layer = model.get_layer(name)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.bias), legacy[f"{name}.bias"],
                                   rtol=1e-6)
        expected = doconv_core.import_legacy_tf(
            layer.spec, W=legacy[f"{name}.W"], D=legacy[f"{name}.D"],
            bias=legacy[f"{name}.bias"]).params.kernel()
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel),
                                   doconv_core.oihw_to_hwio(expected), rtol=1e-5, atol=1e-5)
    # strict: a missing layer or another key is an error, and nothing changes.
    before = weights(model)
    partial = {k: v for k, v in legacy_weights(model).items() if not k.startswith("b.")}
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint has no 'b.W' for layer 'b'")):
        doconv_tf.load_legacy(model, partial)
    with pytest.raises(CheckpointError, match=re.escape(
            "holds keys that are not arrays of this model's DO-Conv layers: ['head.kernel']")):
        doconv_tf.load_legacy(model, {**legacy_weights(model), "head.kernel": np.zeros(3)})
    assert_unchanged(model, before)
    # strict=False: 'b' keeps its values and the other key is reported.
    a_before, b_before = (weights(model.get_layer(name)) for name in ("a", "b"))
    report = doconv_tf.load_legacy(model, {**partial, "head.kernel": np.zeros(3)},
                                   strict=False)
    assert list(report.layers) == ["a"]
    assert (report.missing_keys, report.unexpected_keys) == (["b.W"], ["head.kernel"])
    assert_unchanged(model.get_layer("b"), b_before)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.get_layer("a").bias),
                               partial["a.bias"], rtol=1e-6)
    assert not np.array_equal(weights(model.get_layer("a"))[-1], a_before[-1])


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
