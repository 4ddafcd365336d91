"""Backend-neutral helpers for the Keras tests (the only place they touch tf or jax)."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

import keras

BACKEND = keras.backend.backend()
tf_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason=f"needs TensorFlow (tf.distribute); this run uses {BACKEND}")


def float64():
    """A scope in which float64 is really float64 (JAX computes in float32 by default)."""
    if BACKEND == "jax":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


def to_keras(x_nchw: np.ndarray, data_format: str) -> np.ndarray:
    """Channels-first data (N, C, *spatial), any rank, in ``data_format``."""
    return np.moveaxis(x_nchw, 1, -1) if data_format == "channels_last" else x_nchw


def to_nchw(y: np.ndarray, data_format: str) -> np.ndarray:
    """Data in ``data_format``, any rank, channels first (N, C, *spatial)."""
    y = np.asarray(y)
    return np.moveaxis(y, -1, 1) if data_format == "channels_last" else y


def layer_class(rank: int) -> type:
    """doconv_tf's layer class for ``rank`` spatial axes."""
    import doconv_tf

    return getattr(doconv_tf, f"DOConv{rank}D")


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
    "conv": lambda dtype, rank: getattr(keras.layers, f"Conv{rank}D")(
        2, 1, data_format="channels_first", dtype=dtype),
    # Keras runs a grouped conv (and any channels_first Conv3D) through XLA, whose CPU kernel
    # takes channels-first data.
    "grouped": lambda dtype, rank: getattr(keras.layers, f"Conv{rank}D")(
        2, 1, groups=2, data_format="channels_first", dtype=dtype),
    "depthwise": lambda dtype, rank: getattr(keras.layers, f"DepthwiseConv{rank}D")(
        1, data_format="channels_first", dtype=dtype),
}


def keras_layer_kind(spec) -> str:
    """The kind of Keras layer a DO-Conv layer with this ConvSpec fuses into: a depthwise
    layer where Keras has one that computes it (1-D without causal padding, 2-D with equal
    strides; no 3-D one)."""
    if spec.groups == 1:
        return "conv"
    if spec.groups == spec.in_channels and (
            (spec.rank == 1 and spec.padding != "causal")
            or (spec.rank == 2 and spec.stride[0] == spec.stride[1])):
        return "depthwise"
    return "grouped"


def fused_class(spec) -> type:
    """The Keras layer class a DO-Conv layer with this (complete) ConvSpec fuses into."""
    name = "DepthwiseConv" if keras_layer_kind(spec) == "depthwise" else "Conv"
    return getattr(keras.layers, f"{name}{spec.rank}D")


@functools.cache
def keras_runs_channels_first(kind: str = "conv", dtype: str = "float32", rank: int = 2) -> bool:
    """Whether Keras' own channels_first layer of this kind and rank runs here in ``dtype``.

    TensorFlow's CPU Conv1D/Conv2D and depthwise kernels refuse NCW/NCHW unless oneDNN is on
    (TF_ENABLE_ONEDNN_OPTS; on by default only on CPUs with AVX-512 VNNI, AVX-VNNI or AMX), and
    refuse float64 even then. DO-Conv layers transpose at their edge instead; a fused layer
    is Keras' own and cannot.
    """
    if BACKEND != "tensorflow":
        return True
    import tensorflow as tf

    try:
        _PROBES[kind](dtype, rank)(np.zeros((1, 2) + (1,) * rank, dtype))
    except tf.errors.UnimplementedError:
        return False
    return True


def assert_fused_equal(fused: np.ndarray, unfused: np.ndarray, data_format: str) -> None:
    """A fused layer's output against the DO-Conv layer's: identical, except where the two run
    different kernels.

    On TensorFlow a channels_first DO-Conv layer runs its conv in NHWC between transposes,
    and the fused Keras layer runs TensorFlow's own NCHW kernel (oneDNN's): on an AVX2-only CPU
    with oneDNN forced on (TF_ENABLE_ONEDNN_OPTS=1) the two sum in other orders, and float32
    rounding differs (measured: up to 1.4e-6 on outputs of order 0.1-1).
    """
    if BACKEND == "tensorflow" and data_format == "channels_first":
        np.testing.assert_allclose(fused, unfused, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(fused, unfused)


def expect_channels_first_refusal(request: pytest.FixtureRequest, data_format: str,
                                  kind: str = "conv", dtype: str = "float32",
                                  rank: int = 2) -> bool:
    """Where Keras' own channels_first layer of this kind cannot run, mark the calling test a
    strict expected failure that only TensorFlow's NCHW refusal satisfies, and return True.

    The test still runs everything before its first call of such a layer, so whatever doconv
    computes itself is checked first; tests call the Keras layers last.
    """
    if data_format != "channels_first" or keras_runs_channels_first(kind, dtype, rank):
        return False
    import tensorflow as tf

    request.applymarker(pytest.mark.xfail(
        strict=True, raises=tf.errors.UnimplementedError,
        reason=f"TensorFlow's CPU kernel refuses channels-first {dtype} here (oneDNN off, or "
               f"float64): Keras' own channels_first {rank}-D {kind} layer cannot run"))
    return True


torch_only = pytest.mark.skipif(
    BACKEND != "torch", reason=f"needs Keras' torch backend (inference tensors); this run uses "
                               f"{BACKEND}")


def build_in_inference_mode(layer: keras.layers.Layer, input_shape: tuple) -> None:
    """Build ``layer`` under torch.inference_mode(): its variables become inference tensors,
    which only inference mode can write (the torch backend only)."""
    import torch

    with torch.inference_mode():
        layer.build(input_shape)


def values(model: keras.layers.Layer) -> list[np.ndarray]:
    """Copies of every variable's values (bfloat16 ones as float32, exactly)."""
    return [keras.ops.convert_to_numpy(keras.ops.cast(w, "float32")).copy()
            for w in model.weights]
