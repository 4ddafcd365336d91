"""Whole models mixing 1-D, 2-D and 3-D convs: convert is function-preserving, fuse gives back
Keras' own classes, export/import carry every rank; load_legacy stays 2-D (the original
layer was) and refuses the other ranks clearly."""

from __future__ import annotations

import re

import numpy as np
import pytest

import keras

import doconv_core
import doconv_tf
from doconv_core import CheckpointError
from doconv_tf import DOConv1D, DOConv2D, DOConv3D
from doconv_tf.layer import _to_numpy

RNG = np.random.default_rng(23)
L = keras.layers

# The native layer of each converted layer, by name, and the DO-Conv class it becomes.
CONVERTED = {"c1": (L.Conv1D, DOConv1D), "causal": (L.Conv1D, DOConv1D),
             "dw1": (L.DepthwiseConv1D, DOConv1D), "c2": (L.Conv2D, DOConv2D),
             "dw2": (L.DepthwiseConv2D, DOConv2D), "c3": (L.Conv3D, DOConv3D),
             "g3": (L.Conv3D, DOConv3D), "p3": (L.Conv3D, DOConv3D)}


def numpy(value):
    return _to_numpy(value)


def mixed():
    """A functional model with a 1-D, a 2-D and a 3-D branch (a nested one among them)."""
    seq = keras.Input((16, 4), name="seq")
    a = L.Conv1D(6, 3, padding="same", activation="relu", name="c1",
                 bias_initializer="random_normal")(seq)
    a = L.Conv1D(6, 3, padding="causal", dilation_rate=2, groups=2, name="causal")(a)
    a = L.DepthwiseConv1D(5, strides=2, depth_multiplier=2, name="dw1",
                          bias_initializer="random_normal")(a)
    a = L.GlobalAveragePooling1D()(a)
    image = keras.Input((9, 10, 3), name="image")
    b = L.Conv2D(4, 3, strides=2, padding="same", name="c2")(image)
    b = L.DepthwiseConv2D(3, name="dw2", bias_initializer="random_normal")(b)
    b = L.GlobalAveragePooling2D()(b)
    volume = keras.Input((4, 6, 7, 2), name="volume")
    inner = keras.Sequential([keras.Input((4, 6, 7, 2)),
                              L.Conv3D(4, (1, 3, 3), padding="same", name="c3"),
                              L.Conv3D(8, 3, padding="same", groups=4, name="g3",
                                       bias_initializer="random_normal")], name="inner")
    c = L.Conv3D(3, 1, name="p3")(inner(volume))
    c = L.GlobalAveragePooling3D()(c)
    merged = L.Concatenate()([a, b, c])
    return keras.Model([seq, image, volume], L.Dense(2, name="head")(merged))


def inputs():
    return [RNG.standard_normal((2, 16, 4)).astype("float32"),
            RNG.standard_normal((2, 9, 10, 3)).astype("float32"),
            RNG.standard_normal((2, 4, 6, 7, 2)).astype("float32")]


def predict(model, x):
    return numpy(model(x, training=False))


def layers_of(model):
    return {layer.name: layer for layer in model._flatten_layers(include_self=False)}


def perturb_D(model):
    for layer in doconv_tf.doconv_layers(model).values():
        if layer.D is not None:
            layer.D.assign(0.1 * RNG.standard_normal(tuple(layer.D.shape)).astype("float32"))


@pytest.mark.parametrize("D_mul", [None, 30])
def test_convert_and_fuse_a_model_of_every_rank(D_mul):
    model = mixed()
    x = inputs()
    expected = predict(model, x)
    converted = doconv_tf.convert(model, D_mul=D_mul)
    found = layers_of(converted)
    for name, (_, doconv_class) in CONVERTED.items():
        assert type(found[name]) is doconv_class, name
        spec = found[name].spec
        assert found[name].D_mul == (1 if spec.mn == 1 else D_mul or spec.mn)
    assert found["causal"].padding == "causal" and found["dw1"].groups == 6
    assert set(doconv_tf.doconv_layers(converted)) == set(CONVERTED)
    # The embedded kernels are exact: the same function (3-D groups may run another op).
    np.testing.assert_allclose(predict(converted, x), expected, rtol=1e-5, atol=1e-6)
    perturb_D(converted)
    changed = predict(converted, x)
    assert not np.allclose(changed, expected)
    fused = doconv_tf.fuse(converted)
    assert [type(layer) for layer in fused._flatten_layers()] == \
        [type(layer) for layer in model._flatten_layers()]
    originals = layers_of(model)
    for name, layer in layers_of(fused).items():
        assert layer.get_config() == originals[name].get_config(), name
    assert fused.count_params() == model.count_params()
    np.testing.assert_allclose(predict(fused, x), changed, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predict(model, x), expected)  # the given model is untouched


def test_include_picks_layers_of_any_rank():
    converted = doconv_tf.convert(mixed(), include=["c1", "dw2", "g3"])
    assert {name: type(layer) for name, layer in doconv_tf.doconv_layers(converted).items()} == \
        {"c1": DOConv1D, "dw2": DOConv2D, "g3": DOConv3D}
    assert type(layers_of(converted)["dw1"]) is L.DepthwiseConv1D


def test_export_import_and_keras_files_of_every_rank(tmp_path):
    model = doconv_tf.convert(mixed(), D_mul=30)
    perturb_D(model)
    x = inputs()
    path = tmp_path / "p.npz"
    doconv_tf.export_params(model, path)
    stored = doconv_core.load_params(path)
    assert {name: params.spec.rank for name, params in stored.items()} == {
        name: doconv_class.rank for name, (_, doconv_class) in CONVERTED.items()}
    target = doconv_tf.convert(mixed(), D_mul=30)
    assert doconv_tf.import_params(target, path) == sorted(CONVERTED)
    target.get_layer("head").set_weights(model.get_layer("head").get_weights())
    np.testing.assert_array_equal(predict(target, x), predict(model, x))
    # A file's 1-D layer does not load into a 3-D one of the same name.
    other = keras.Sequential([keras.Input((4, 6, 6, 4)), DOConv3D(6, 3, name="c1")])
    with pytest.raises(CheckpointError, match="does not match the model's DO-Conv layers"):
        doconv_tf.import_params(other, path)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(predict(loaded, x), predict(model, x))


def test_convert_refuses_what_the_layers_refuse():
    model = keras.Sequential([keras.Input((8, 2)), L.Conv1D(2, 5, name="c5")])
    with pytest.raises(ValueError, match=re.escape(
            "cannot convert layer 'c5': D_mul must be >= kernel length = 5")):
        doconv_tf.convert(model, D_mul=4)


# -- load_legacy: 2-D only ---------------------------------------------------------------------
def legacy_model():
    return keras.Sequential([keras.Input((8, 8, 3)), DOConv2D(4, 3, name="planar"),
                             L.Reshape((36, 4)), DOConv1D(2, 3, name="seq")])


def legacy_weights():
    return {"planar.W": RNG.standard_normal((9, 3, 4)), "planar.D": RNG.standard_normal((9, 9, 3)),
            "planar.bias": RNG.standard_normal(4)}


def test_load_legacy_loads_2d_layers_and_refuses_other_ranks():
    model = legacy_model()
    before = [numpy(w) for w in model.weights]
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint cannot fill the model's 1-D layers ['seq']: the original "
            "DO-Conv layers were 2-D only, so load_legacy loads 2-D layers only (pass strict=False "
            "to load those and leave the others as they are)")):
        doconv_tf.load_legacy(model, legacy_weights())
    weights = dict(legacy_weights(), **{"seq.W": np.zeros((3, 4, 2))})
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=re.escape(
                "the legacy checkpoint has arrays ['seq.W'] for layer 'seq', a 1-D layer: the "
                "original DO-Conv layers were 2-D only, so load_legacy loads 2-D layers only")):
            doconv_tf.load_legacy(model, weights, strict=strict)
    assert all(np.array_equal(numpy(w), b) for w, b in zip(model.weights, before))
    report = doconv_tf.load_legacy(model, legacy_weights(), strict=False)
    assert report.exact == ["planar"] and report.missing_keys == ["seq.W"]
    assert report.unexpected_keys == []
    seq = model.get_layer("seq")
    assert all(np.array_equal(numpy(w), b)
               for w, b in zip(seq.weights, before[-len(seq.weights):]))


def test_load_legacy_into_a_model_that_is_a_3d_layer():
    layer = DOConv3D(2, 3, name="vol")
    layer.build((None, 4, 4, 4, 2))
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint has arrays ['D', 'W'] for layer 'layer', a 3-D layer")):
        doconv_tf.load_legacy(layer, {"W": np.zeros((27, 2, 2)), "D": np.zeros((27, 27, 2))})
    report = doconv_tf.load_legacy(layer, {}, strict=False)
    assert report.layers == {} and report.missing_keys == ["W"]
