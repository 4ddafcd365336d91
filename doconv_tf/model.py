"""Whole-model tools: convert Conv2D/DepthwiseConv2D to DOConv2D, fuse back to Conv2D/
DepthwiseConv2D, export/import.

``convert`` and ``fuse`` work on Sequential and Functional models (nested ones included,
through ``keras.models.clone_model(recursive=True)``); they return new models with copied
weights and leave the given model untouched. Subclassed models have no layer graph Keras can
rebuild: construct DOConv2D layers in them directly, and deploy each one through
``layer.fuse()`` (a built Conv2D or DepthwiseConv2D with the same function) or
``export_params``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Union

import numpy as np

import keras
from keras.src.models.functional import Functional  # Keras 3 has no public alias

import doconv_core
from doconv_core import ConvSpec, DOConvParams, LegacyImport

from .layer import _DEPTHWISE_KEYS, DOConv2D, _to_numpy

# Conv2D config keys DOConv2D takes as they are; LoRA settings are folded into the kernel.
_SHARED_KEYS = ("name", "trainable", "dtype", "kernel_size", "strides", "padding",
                "data_format", "dilation_rate", "activation", "use_bias", "bias_initializer",
                "bias_regularizer", "activity_regularizer", "bias_constraint")
_CONV_KEYS = _SHARED_KEYS + ("filters", "groups", "kernel_initializer", "kernel_regularizer",
                             "kernel_constraint")


def _check_graph_model(model: Any, what: str) -> None:
    if not isinstance(model, (keras.Sequential, Functional)):
        raise ValueError(
            f"{what} needs a Sequential or Functional keras.Model, got "
            f"{type(model).__name__}; in a subclassed model build DOConv2D layers directly "
            "and fuse them one by one with layer.fuse()")
    if not model.built:
        raise ValueError(f"{what} needs a built model (its weights are copied); build it or "
                         "give it an Input first")


def _clone(model: keras.Model, replace: Callable[[keras.layers.Layer], Any]
           ) -> keras.Model:
    """clone_model with ``replace(layer) -> (new_layer, set_weights) | None`` per leaf layer."""
    pending: list[tuple[keras.layers.Layer, keras.layers.Layer, Any]] = []

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        replaced = replace(layer)
        if replaced is None:
            new = layer.__class__.from_config(layer.get_config())
            # Not get_weights(): on JAX it reads variables the way NumPy 2 warns about.
            replaced = (new, lambda old, new_layer: new_layer.set_weights(
                [_to_numpy(w) for w in old.weights]))
        pending.append((layer, *replaced))
        return replaced[0]

    new_model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new, set_weights in pending:
        set_weights(old, new)
    return new_model


def _conversion(layer: keras.layers.Layer, D_mul: int | None) -> tuple[dict, np.ndarray]:
    """DOConv2D kwargs and the HWIO kernel with groups that reproduce ``layer``."""
    config = layer.get_config()
    kernel = _to_numpy(layer.kernel)  # a LoRA-enabled Conv2D returns its merged kernel
    if type(layer) is keras.layers.Conv2D:
        kwargs = {key: config[key] for key in _CONV_KEYS if key in config}
    else:  # DepthwiseConv2D: kernel (M, N, C_in, m), output channel c*m + k
        M, N, C_in, multiplier = kernel.shape
        kwargs = {key: config[key] for key in _SHARED_KEYS if key in config}
        kwargs.update({new: config[old] for old, new in _DEPTHWISE_KEYS.items()})
        kwargs.update(filters=C_in * multiplier, groups=C_in)
        # Grouped conv: output channel o belongs to group o // m, the same order.
        kernel = kernel.reshape(M, N, 1, C_in * multiplier)
    M, N = kernel.shape[:2]
    kwargs["D_mul"] = None if M * N == 1 else D_mul
    return kwargs, kernel


def convert(model: keras.Model, *, D_mul: int | None = None,
            include: Callable[[keras.layers.Layer], bool] | None = None) -> keras.Model:
    """A copy of ``model`` whose Conv2D and DepthwiseConv2D layers (those ``include``
    accepts, default all) are DOConv2D layers computing the same function.

    Only exact Conv2D and DepthwiseConv2D instances are converted (a subclass may change
    what it computes). A 1x1 kernel gets D_mul 1; ``D_mul`` applies to the others.
    """
    _check_graph_model(model, "convert")

    def replace(layer: keras.layers.Layer):
        if type(layer) not in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D):
            return None
        if include is not None and not include(layer):
            return None
        kwargs, kernel = _conversion(layer, D_mul)
        try:
            new = DOConv2D(**kwargs)
        except ValueError as error:
            raise ValueError(f"cannot convert layer {layer.name!r}: {error}") from None

        def set_weights(old: keras.layers.Layer, new_layer: DOConv2D) -> None:
            spec = new_layer.spec
            D, W = doconv_core.embed_kernel(doconv_core.hwio_to_oihw(kernel),
                                            groups=spec.groups, D_mul=spec.D_mul)
            bias = _to_numpy(old.bias) if spec.bias else None
            new_layer.set_params(DOConvParams(spec, W, D, bias))

        return new, set_weights

    return _clone(model, replace)


def fuse(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with every DOConv2D replaced by the plain layer ``layer.fuse()``
    gives: a DepthwiseConv2D for a depthwise one (groups == C_in > 1, equal strides), a
    Conv2D otherwise, holding the composed kernel.

    On TensorFlow, a channels_first Conv2D or DepthwiseConv2D whose output width equals its
    filters adds its bias wrongly (a Keras 3.15 bug, see DOConv2D's module notes); fusing
    such a layer inherits it.
    """
    _check_graph_model(model, "fuse")

    def replace(layer: keras.layers.Layer):
        if not isinstance(layer, DOConv2D):
            return None
        cls, config = layer._fused_config()

        def set_weights(old: DOConv2D, new_layer: keras.layers.Layer) -> None:
            new_layer.set_weights(old._fused_weights())

        return cls.from_config(config), set_weights

    return _clone(model, replace)


def _doconv_layers(model: keras.Model) -> dict[str, DOConv2D]:
    found = {}
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, DOConv2D):
            if layer.name in found:
                raise ValueError(f"two DOConv2D layers are named {layer.name!r}; layer names "
                                 "must be unique to export or import parameters")
            found[layer.name] = layer
    return found


def to_params(model: keras.Model) -> dict[str, DOConvParams]:
    """{layer name: DOConvParams} for every DOConv2D in ``model`` (nested models included)."""
    return {name: layer.to_params() for name, layer in _doconv_layers(model).items()}


def export_params(model: keras.Model, path: Union[str, os.PathLike]) -> None:
    """Write every DOConv2D's parameters to the core's portable ``.npz`` container."""
    layers = to_params(model)
    if not layers:
        raise ValueError("the model has no DOConv2D layers to export")
    doconv_core.save_params(path, layers)


def import_params(model: keras.Model, path: Union[str, os.PathLike]) -> None:
    """Load a container written by any adapter into the model's DOConv2D layers, by name.

    The file and the model must hold the same layer names with equal specs; nothing is
    assigned unless all of them match.
    """
    layers = _doconv_layers(model)
    where = repr(os.fspath(path))
    unbuilt = sorted(name for name, layer in layers.items() if not layer.built)
    if unbuilt:
        raise doconv_core.CheckpointError(
            f"cannot load {where}: layers {unbuilt} are not built (their in_channels are "
            "unknown); call the model on an input or build it first")
    prepared = doconv_core.prepare_import(path, {name: layer.spec
                                                 for name, layer in layers.items()})
    for name, layer in layers.items():
        layer.set_params(prepared[name].params)


def load_legacy_weights(layer: DOConv2D, *, W: Any, D: Any = None, bias: Any = None
                        ) -> LegacyImport:
    """Load the original reference Keras layer's weights: ``W`` (its 'kernel', shape
    (D_mul, C_in/g, C_out)), ``D`` (M*N, D_mul, C_in), ``bias``; returns how it imported."""
    if not isinstance(layer, DOConv2D):
        raise ValueError(f"layer must be a DOConv2D, got {type(layer).__name__}")
    spec: ConvSpec = layer._require_built("load_legacy_weights")
    result = doconv_core.prepare_import(
        "the original TensorFlow weights", {layer.name: spec},
        {layer.name: {"W": W, "D": D, "bias": bias}}, layout="tf-legacy")[layer.name]
    layer.set_params(result.params)
    return result
