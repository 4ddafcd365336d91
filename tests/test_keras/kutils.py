"""Backend-neutral helpers for the Keras tests (the only place they touch tf or jax)."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

import keras

BACKEND = keras.backend.backend()
tf_only = pytest.mark.skipif(
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

        # One compiled program per call instead of an XLA compile per eager op and shape.
        grad_x, grad_values = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), values)
        grads = [grad_x, *grad_values]
    elif BACKEND == "torch":
        import torch

        x_t = torch.tensor(x, requires_grad=True)
        loss = torch.sum(layer(x_t, training=training) * torch.as_tensor(grad_y))
        grads = torch.autograd.grad(loss, [x_t, *(v.value for v in variables)])
        grads = [g.detach().cpu() for g in grads]
    else:
        raise NotImplementedError(BACKEND)
    names = ["x"] + [v.name for v in variables]
    return {name: np.asarray(g) for name, g in zip(names, grads)}


_PROBES = {  # Keras' conv layers, by the TensorFlow kernel they run on
    "conv": lambda dtype: keras.layers.Conv2D(2, 1, data_format="channels_first", dtype=dtype),
    # Keras runs a grouped conv through XLA, whose CPU kernel takes NCHW.
    "grouped": lambda dtype: keras.layers.Conv2D(2, 1, groups=2, data_format="channels_first",
                                                 dtype=dtype),
    "depthwise": lambda dtype: keras.layers.DepthwiseConv2D(1, data_format="channels_first",
                                                            dtype=dtype),
}


def keras_layer_kind(spec) -> str:
    """The kind of Keras layer a DOConv2D with this ConvSpec fuses into."""
    if spec.groups == 1:
        return "conv"
    if spec.groups == spec.in_channels and spec.stride[0] == spec.stride[1]:
        return "depthwise"
    return "grouped"


@functools.cache
def keras_runs_channels_first(kind: str = "conv", dtype: str = "float32") -> bool:
    """Whether Keras' own channels_first layer of this kind runs here in ``dtype``.

    TensorFlow's CPU Conv2D and depthwise kernels refuse NCHW unless oneDNN is on
    (TF_ENABLE_ONEDNN_OPTS; on by default only on CPUs with AVX-512 VNNI, AVX-VNNI or AMX), and
    refuse float64 NCHW even then. DOConv2D transposes at its edge instead; a fused layer is
    Keras' own and cannot.
    """
    if BACKEND != "tensorflow":
        return True
    import tensorflow as tf

    try:
        _PROBES[kind](dtype)(np.zeros((1, 2, 1, 1), dtype))
    except tf.errors.UnimplementedError:
        return False
    return True


def expect_channels_first_refusal(request: pytest.FixtureRequest, data_format: str,
                                  kind: str = "conv", dtype: str = "float32") -> bool:
    """Where Keras' own channels_first layer of this kind cannot run, mark the calling test a
    strict expected failure that only TensorFlow's NCHW refusal satisfies, and return True.

    The test still runs everything before its first call of such a layer, so whatever doconv
    computes itself is checked first; tests call the Keras layers last.
    """
    if data_format != "channels_first" or keras_runs_channels_first(kind, dtype):
        return False
    import tensorflow as tf

    request.applymarker(pytest.mark.xfail(
        strict=True, raises=tf.errors.UnimplementedError,
        reason=f"TensorFlow's CPU kernel refuses NCHW {dtype} here (oneDNN off, or float64): "
               f"Keras' own channels_first {kind} layer cannot run"))
    return True
