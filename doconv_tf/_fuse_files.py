"""The Keras side of the ``doconv`` command (doconv_core.cli imports it only for ``.keras``
archives, so the core itself imports no framework)."""

from __future__ import annotations

import math

import keras

from doconv_core import DOConvParams

# Importing doconv_tf registers DOConv1D/2D/3D, so load_model deserialises them.
from .model import doconv_layers, fuse


def load_model(path: str) -> keras.Model:
    """The archive's model, in Keras' safe mode: code in the file (Lambda layers, ...) is
    refused, never run."""
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def layer_params(model: keras.Model) -> dict[str, DOConvParams]:
    """{layer name: its parameters, canonical layout} for every DO-Conv layer."""
    return {name or layer.name: layer.to_params() for name, layer in doconv_layers(model).items()}


def other_weights(model: keras.Model) -> list[tuple[str, int]]:
    """(path, element count) of every weight outside the DO-Conv layers."""
    inside = {id(weight) for layer in doconv_layers(model).values()
              for weight in layer.weights}
    return [(getattr(weight, "path", weight.name), math.prod(weight.shape))
            for weight in model.weights if id(weight) not in inside]


def fuse_and_save(model: keras.Model, path: str) -> None:
    fuse(model).save(path)

