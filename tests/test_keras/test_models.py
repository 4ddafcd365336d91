"""convert / fuse on Sequential, Functional (nested) and MobileNetV2; saving; the container."""

from __future__ import annotations

import re

import numpy as np
import pytest

import keras

import doconv_core
import doconv_tf
from doconv_tf import DOConv2D

RNG = np.random.default_rng(1)


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def perturb_D(model, scale=0.1):
    # Converted layers start with D = 0; give D values so fusion has something to fold.
    for layer in model._flatten_layers():
        if isinstance(layer, DOConv2D) and layer.D is not None:
            layer.D.assign(scale * RNG.standard_normal(tuple(layer.D.shape)).astype("float32"))


def sequential():
    return keras.Sequential([
        keras.Input((10, 10, 4)),
        keras.layers.Conv2D(6, 3, padding="same", groups=2, activation="relu",
                            bias_initializer="random_normal"),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=3, strides=2,
                                     bias_initializer="random_normal"),
        keras.layers.BatchNormalization(),
        keras.layers.Conv2D(5, 1, use_bias=False),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


def functional():
    inner = keras.Sequential([keras.Input((10, 10, 4)), keras.layers.Conv2D(4, (1, 3),
                                                                           padding="same",
                                                                           name="c")],
                             name="inner")
    inputs = keras.Input((10, 10, 4))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = keras.layers.DepthwiseConv2D(5, padding="same", name="b")(inputs)
    c = inner(inputs)
    merged = keras.layers.Add()([a, b, c])
    out = keras.layers.Conv2D(2, 3, dilation_rate=2, name="out")(merged)
    return keras.Model(inputs, out)


@pytest.mark.parametrize("build,D_mul", [(sequential, 12), (functional, None),
                                         (functional, 30)])
def test_convert_then_fuse_preserves_predictions(build, D_mul):
    model = build()
    x = RNG.standard_normal((2, 10, 10, 4)).astype("float32")
    expected = predict(model, x)
    converted = doconv_tf.convert(model, D_mul=D_mul)
    kinds = {type(layer) for layer in converted._flatten_layers()}
    assert keras.layers.Conv2D not in kinds and keras.layers.DepthwiseConv2D not in kinds
    # The embedded kernel is exact (composing it multiplies by 0 and 1 only), and each layer
    # runs the op its original ran (a DepthwiseConv2D's included): the same predictions.
    np.testing.assert_array_equal(predict(converted, x), expected)
    for layer in converted._flatten_layers():
        if isinstance(layer, DOConv2D):
            assert layer.D_mul == (1 if layer.spec.mn == 1 else D_mul or layer.spec.mn)
    perturb_D(converted)
    changed = predict(converted, x)
    assert not np.allclose(changed, expected)
    fused = doconv_tf.fuse(converted)
    # Every layer is back to its original kind: DepthwiseConv2D stays DepthwiseConv2D.
    assert [type(layer) for layer in fused._flatten_layers()] == \
        [type(layer) for layer in model._flatten_layers()]
    np.testing.assert_array_equal(predict(fused, x), changed)
    assert fused.count_params() == model.count_params()
    np.testing.assert_array_equal(predict(model, x), expected)  # the original is untouched


def test_depthwise_channel_order_matches_grouped_conv():
    # DepthwiseConv2D output channel c*m + k uses kernel[..., c, k]; the grouped DOConv2D
    # (groups = C_in, filters = C_in*m) puts output o in group o // m: the same order.
    layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=3, use_bias=False)
    model = keras.Sequential([keras.Input((6, 6, 2)), layer])
    kernel = np.arange(3 * 3 * 2 * 3, dtype="float32").reshape(3, 3, 2, 3) / 10
    layer.set_weights([kernel])
    converted = doconv_tf.convert(model)
    doconv = converted.layers[-1]
    assert (doconv.filters, doconv.groups) == (6, 2)
    x = np.zeros((1, 6, 6, 2), "float32")
    x[0, 2, 2, 1] = 1.0  # an impulse in input channel 1
    y = predict(converted, x)
    np.testing.assert_array_equal(y, predict(model, x))
    for k in range(3):  # channel 1*3 + k responds with kernel[..., 1, k] (flipped)
        np.testing.assert_allclose(y[0, :3, :3, 3 + k], kernel[::-1, ::-1, 1, k], rtol=1e-6)
    assert np.all(y[0, ..., :3] == 0)


@pytest.mark.parametrize("include", [lambda name, layer: name in ("a", "b"), "[ab]", ["a", "b"]],
                         ids=["callable", "pattern", "patterns"])
def test_include_picks_layers(include):
    model = functional()
    converted = doconv_tf.convert(model, include=include)
    assert isinstance(converted.get_layer("a"), DOConv2D)
    assert isinstance(converted.get_layer("b"), DOConv2D)
    assert type(converted.get_layer("out")) is keras.layers.Conv2D
    assert type(converted.get_layer("inner").layers[-1]) is keras.layers.Conv2D
    # Nested models' layers are named by their own Keras name.
    nested = doconv_tf.convert(model, include="c")
    assert isinstance(nested.get_layer("inner").layers[-1], DOConv2D)
    assert set(doconv_tf.doconv_layers(nested)) == {"c"}


def test_convert_errors():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(2, 3)

        def call(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="convert needs a Sequential or Functional keras.Model, "
                                         "got Sub"):
        doconv_tf.convert(Sub())
    with pytest.raises(ValueError, match="fuse needs a built model"):
        doconv_tf.fuse(keras.Sequential([DOConv2D(2, 3)]))
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(2, 5, name="c5")])
    with pytest.raises(ValueError, match=re.escape(
            "cannot convert layer 'c5': D_mul must be >= kernel height*width = 25")):
        doconv_tf.convert(model, D_mul=9)
    with pytest.raises(ValueError, match=re.escape("D_mul must be an integer >= 1, got 0")):
        doconv_tf.convert(model, D_mul=0)
    with pytest.raises(ValueError, match="include must be None, a callable"):
        doconv_tf.convert(model, include=3)


@pytest.mark.slow
def test_mobilenet_v2():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    x = RNG.uniform(-1, 1, (1, 96, 96, 3)).astype("float32")
    expected = predict(model, x)
    converted = doconv_tf.convert(model)
    counts = {}
    for layer in converted.layers:
        if isinstance(layer, DOConv2D):
            kind = "depthwise" if layer.groups > 1 else "conv"
            counts[kind] = counts.get(kind, 0) + 1
    assert counts == {"depthwise": 17, "conv": 35}
    np.testing.assert_allclose(predict(converted, x), expected, rtol=1e-5, atol=1e-6)
    perturb_D(converted, 0.01)
    changed = predict(converted, x)
    fused = doconv_tf.fuse(converted)
    assert [type(layer) for layer in fused.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_allclose(predict(fused, x), changed, rtol=1e-5, atol=1e-6)
    assert fused.count_params() == model.count_params()


def test_save_and_load_keras_file(tmp_path):
    model = doconv_tf.convert(sequential(), D_mul=10)
    perturb_D(model)
    model.layers[0].activity_regularizer = None
    x = RNG.standard_normal((2, 10, 10, 4)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe_mode on, no custom_objects
    assert isinstance(loaded.layers[0], DOConv2D)
    np.testing.assert_array_equal(predict(loaded, x), predict(model, x))
    # The fused model saves as plain Keras.
    fused = doconv_tf.fuse(model)
    fused.save(tmp_path / "f.keras")
    reloaded = keras.models.load_model(tmp_path / "f.keras")
    assert type(reloaded.layers[1]) is keras.layers.DepthwiseConv2D
    np.testing.assert_array_equal(predict(reloaded, x), predict(model, x))


def test_get_config_round_trips():
    layer = DOConv2D(6, (3, 1), strides=2, padding="same", data_format="channels_first",
                     groups=3, activation="relu", use_bias=False,
                     kernel_initializer=keras.initializers.HeNormal(seed=1),
                     kernel_regularizer=keras.regularizers.L2(0.01),
                     activity_regularizer=keras.regularizers.L1(0.02),
                     kernel_constraint=keras.constraints.MaxNorm(2.0), D_mul=7,
                     name="dc", dtype="mixed_bfloat16")
    config = layer.get_config()
    clone = DOConv2D.from_config(config)
    assert clone.get_config() == config
    assert config["D_mul"] == 7 and config["name"] == "dc"
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "doconv>DOConv2D"
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is DOConv2D and again.get_config() == config


def test_export_and_import_params(tmp_path):
    model = doconv_tf.convert(functional())
    perturb_D(model)
    x = RNG.standard_normal((2, 10, 10, 4)).astype("float32")
    path = tmp_path / "p.npz"
    doconv_tf.export_params(model, path)
    layers = doconv_core.load_params(path)
    assert set(layers) == {"a", "b", "c", "out"}
    target = doconv_tf.convert(functional())
    target.set_weights([w for w in model.get_weights()])
    for layer in target._flatten_layers():
        if isinstance(layer, DOConv2D):
            layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    assert doconv_tf.import_params(target, path) == ["a", "b", "c", "out"]
    np.testing.assert_array_equal(predict(target, x), predict(model, x))
    other = doconv_tf.convert(functional(), D_mul=30)
    with pytest.raises(doconv_core.CheckpointError, match="layer 'a' was saved with"):
        doconv_tf.import_params(other, path)
    renamed = doconv_tf.convert(functional(), include=lambda name, layer: name != "c")
    with pytest.raises(doconv_core.CheckpointError, match=re.escape(
            "does not match the model's DO-Conv layers: missing [], unexpected ['c']")):
        doconv_tf.import_params(renamed, path)
    with pytest.raises(ValueError, match=re.escape(
            "model has no DOConv1D, DOConv2D or DOConv3D layers to export (Functional)")):
        doconv_tf.export_params(functional(), tmp_path / "none.npz")
    # One layer through the container class.
    layer = model.get_layer("a")
    params = layer.to_params()
    again = DOConv2D.from_params(params, name="again")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again.kernel),
                                  keras.ops.convert_to_numpy(layer.kernel))


# -- compiled models: convert and fuse never need (nor rebuild) the training configuration ----
class UnregisteredSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A notebook's schedule: serializable, but not registered, so Keras cannot rebuild it."""

    def __call__(self, step):
        return 0.01

    def get_config(self):
        return {}


class Lossy(keras.losses.Loss):  # unregistered too
    def call(self, y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_true - y_pred))


COMPILE_SETTINGS = {
    "schedule": lambda: dict(optimizer=keras.optimizers.SGD(UnregisteredSchedule()),
                             loss="mse"),
    "loss": lambda: dict(optimizer="sgd", loss=Lossy()),
    "metric": lambda: dict(optimizer="sgd", loss="mse", metrics=[Lossy(name="lossy")]),
    "registered": lambda: dict(optimizer="sgd", loss="mse"),
}


def fit_once(model, x):
    y = np.zeros(keras.ops.shape(model(x)), "float32")
    model.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("settings", sorted(COMPILE_SETTINGS))
def test_compiled_models_convert_and_fuse_to_uncompiled_copies(settings, nested):
    model = functional()
    x = RNG.standard_normal((2, 10, 10, 4)).astype("float32")
    model.compile(**COMPILE_SETTINGS[settings]())
    if nested:  # a compiled model inside another (compiled) one
        model.get_layer("inner").compile(**COMPILE_SETTINGS[settings]())
    expected = predict(model, x)
    converted = doconv_tf.convert(model)
    assert not converted.compiled and not converted.get_layer("inner").compiled
    np.testing.assert_array_equal(predict(converted, x), expected)
    converted.compile(**COMPILE_SETTINGS[settings]())  # the user compiles the copy
    fit_once(converted, x)
    fused = doconv_tf.fuse(converted)
    assert not fused.compiled and not fused.get_layer("inner").compiled
    np.testing.assert_array_equal(predict(fused, x), predict(converted, x))
    # The originals keep their compile state and train on.
    assert model.compiled and converted.compiled
    assert model.get_layer("inner").compiled == nested
    fit_once(model, x)
