"""Backend-neutral helpers for the Keras tests (the only place they touch tf or jax)."""

from __future__ import annotations

import contextlib

import numpy as np

import keras

BACKEND = keras.backend.backend()
tf_only = __import__("pytest").mark.skipif(
    BACKEND != "tensorflow", reason="needs TensorFlow (tf.distribute); this run uses jax")


def float64():
    """A scope in which float64 is really float64 (JAX computes in float32 by default)."""
    if BACKEND == "jax":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


def to_keras(x_nchw: np.ndarray, data_format: str) -> np.ndarray:
    return np.transpose(x_nchw, (0, 2, 3, 1)) if data_format == "channels_last" else x_nchw


def to_nchw(y: np.ndarray, data_format: str) -> np.ndarray:
    y = np.asarray(y)
    return np.transpose(y, (0, 3, 1, 2)) if data_format == "channels_last" else y


def gradients(layer: keras.layers.Layer, x: np.ndarray, grad_y: np.ndarray,
              training: bool = True) -> dict[str, np.ndarray]:
    """d(sum(layer(x) * grad_y)) with respect to x and each trainable variable (by name)."""
    variables = layer.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x_t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x_t)
            loss = tf.reduce_sum(layer(x_t, training=training) * grad_y)
        grads = tape.gradient(loss, [x_t, *variables])
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        values = [v.value for v in variables]
        others = [v.value for v in layer.non_trainable_variables]

        def loss(x, values):
            y, _ = layer.stateless_call(values, others, x, training=training)
            return jnp.sum(y * grad_y)

        grad_x, grad_values = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), values)
        grads = [grad_x, *grad_values]
    else:
        raise NotImplementedError(BACKEND)
    names = ["x"] + [v.name for v in variables]
    return {name: np.asarray(g) for name, g in zip(names, grads)}
