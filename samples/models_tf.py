"""The Keras recipe's built-in model: ``resnet20``, the same network as
``samples/models_pt.py::resnet20`` (He et al. 2016, arXiv:1512.03385, section 4.2).

A 3x3 stem of 16 channels, three stages of 3 basic blocks (16, 32, 64 channels), option-A
shortcuts (stride-2 subsampling and zero-padded channels, no parameters), global average
pooling and a linear classifier returning logits; He (fan_out) initialisation for convs,
BatchNorm as PyTorch's (momentum 0.1 there is 0.9 here, eps 1e-5). The initial weights are
a function of the seed ``keras.utils.set_random_seed`` set before the model is built.

Built from Keras' own layers only (the shortcut's subsampling is a 1x1 max-pool with stride
2, its channel padding a ZeroPadding3D between two Reshapes; no Lambda, no custom class), so
a saved model loads with ``keras.models.load_model`` in safe mode without this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
from keras import layers

__all__ = ["BUILTIN_MODELS", "resnet20"]


def _he_normal(mode: str) -> keras.initializers.Initializer:
    """A new initializer for each layer: one made without a seed takes its seed from
    Python's ``random`` when it is made, so one made here, after
    ``keras.utils.set_random_seed``, draws from that seed (one shared instance would give
    every layer of a shape the same draw, fixed when this module was imported)."""
    return keras.initializers.VarianceScaling(2.0, mode, "untruncated_normal")


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def _conv(filters: int, stride: int, name: str) -> layers.Conv2D:
    return layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                         kernel_initializer=_he_normal("fan_out"), name=name)


def _pad_shortcut(x: keras.KerasTensor, stride: int, extra_channels: int, name: str
                  ) -> keras.KerasTensor:
    """Option A: ``x[:, ::stride, ::stride]`` with ``extra_channels`` zero channels, split
    before and after as in PyTorch (``F.pad``'s half, rest)."""
    if stride != 1:
        x = layers.MaxPooling2D(pool_size=1, strides=stride, name=f"{name}_subsample")(x)
    height, width, channels = x.shape[1:]
    half = extra_channels // 2
    x = layers.Reshape((height, width, channels, 1), name=f"{name}_expand")(x)
    x = layers.ZeroPadding3D(((0, 0), (0, 0), (half, extra_channels - half)),
                             name=f"{name}_pad")(x)
    return layers.Reshape((height, width, channels + extra_channels), name=f"{name}_squeeze")(x)


def _block(x: keras.KerasTensor, c_in: int, c_out: int, stride: int, name: str
           ) -> keras.KerasTensor:
    out = layers.ReLU(name=f"{name}_relu1")(_bn(f"{name}_bn1")(_conv(c_out, stride,
                                                                      f"{name}_conv1")(x)))
    out = _bn(f"{name}_bn2")(_conv(c_out, 1, f"{name}_conv2")(out))
    shortcut = (_pad_shortcut(x, stride, c_out - c_in, f"{name}_shortcut")
                if stride != 1 or c_in != c_out else x)
    return layers.ReLU(name=f"{name}_relu2")(layers.Add(name=f"{name}_add")([out, shortcut]))


def cifar_resnet(depth: int, num_classes: int = 10,
                 input_shape: Sequence[int | None] = (32, 32, 3)) -> keras.Model:
    """A CIFAR ResNet of ``depth`` = 6n + 2 layers on channels-last ``input_shape``."""
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2, got {depth}")
    if len(input_shape) != 3 or None in input_shape[:2]:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")
    n = (depth - 2) // 6
    inputs = keras.Input(tuple(input_shape), name="image")
    x = layers.ReLU(name="relu")(_bn("bn1")(_conv(16, 1, "conv1")(inputs)))
    c_in = 16
    for stage, c_out in enumerate((16, 32, 64)):
        for index in range(n):
            x = _block(x, c_in, c_out, 2 if stage and not index else 1,
                       f"layer{stage + 1}_{index}")
            c_in = c_out
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = layers.Dense(num_classes, kernel_initializer=_he_normal("fan_in"), name="fc")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def resnet20(num_classes: int = 10, input_shape: Sequence[int | None] = (32, 32, 3)
             ) -> keras.Model:
    return cifar_resnet(20, num_classes, input_shape)


BUILTIN_MODELS: dict[str, Callable[..., keras.Model]] = {"resnet20": resnet20}
