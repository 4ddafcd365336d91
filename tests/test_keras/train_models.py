"""Models for test_train_tf.py's recipe runs: small enough for a few seconds per epoch."""

from __future__ import annotations

from collections.abc import Sequence

import keras


def tiny(num_classes: int = 10, input_shape: Sequence[int] = (16, 16, 3)) -> keras.Model:
    """Two 3x3 convs (one DO-Conv'd with --doconv), BatchNorm, a linear classifier."""
    inputs = keras.Input(tuple(input_shape))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def not_a_model(num_classes: int = 10, input_shape: Sequence[int] = (16, 16, 3)) -> int:
    return 3
