"""Whole-model tools: convert Conv2D/DepthwiseConv2D to DOConv2D, fuse back to Conv2D/
DepthwiseConv2D, list the DOConv2D layers, export/import the portable container, load the
original Keras layer's weights.

``convert`` and ``fuse`` work on Sequential and Functional models (nested ones included,
through ``keras.models.clone_model(recursive=True)``); they return new models with copied
weights and the given layers' settings, and leave the given model untouched. Subclassed models
have no layer graph Keras can rebuild: construct DOConv2D layers in them directly, and deploy
each one through ``layer.fuse()`` (a built Conv2D or DepthwiseConv2D with the same function)
or ``export_params``. Layers are named by their Keras name (unique in a model); a model that
is itself a DOConv2D is named "" (``doconv_core.ROOT_NAME`` in files).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping, Union

import numpy as np

import keras

import doconv_core
from doconv_core import ROOT_NAME, CheckpointError, DOConvParams, Include, LegacyLoadReport

from .layer import _DEPTHWISE_KEYS, DOConv2D, _to_numpy

__all__ = ["convert", "fuse", "doconv_layers", "export_params", "import_params",
           "load_legacy", "LegacyLoadReport"]

# Conv2D config keys DOConv2D takes as they are; LoRA settings are folded into the kernel.
_SHARED_KEYS = ("name", "trainable", "dtype", "kernel_size", "strides", "padding",
                "data_format", "dilation_rate", "activation", "use_bias", "bias_initializer",
                "bias_regularizer", "activity_regularizer", "bias_constraint")
_CONV_KEYS = _SHARED_KEYS + ("filters", "groups", "kernel_initializer", "kernel_regularizer",
                             "kernel_constraint")


def _is_graph_model(model: Any) -> bool:
    # Keras 3 exports no Functional class: a Functional model is the keras.Model that is also
    # a keras.Function (its layer graph), which is what clone_model rebuilds.
    return isinstance(model, keras.Sequential) or (isinstance(model, keras.Model)
                                                   and isinstance(model, keras.Function))


def _check_graph_model(model: Any, what: str) -> None:
    if not _is_graph_model(model):
        raise ValueError(
            f"{what} needs a Sequential or Functional keras.Model, got "
            f"{type(model).__name__}; in a subclassed model build DOConv2D layers directly "
            "and fuse them one by one with layer.fuse()")
    if not model.built:
        raise ValueError(f"{what} needs a built model (its weights are copied); build it or "
                         "give it an Input first")


def _copy_weights(old: keras.layers.Layer, new: keras.layers.Layer) -> None:
    # Not get_weights(): on JAX it reads variables the way NumPy 2 warns about.
    new.set_weights([_to_numpy(w) for w in old.weights])


def _clone(model: keras.Model, replace: Callable[[keras.layers.Layer], Any]
           ) -> tuple[keras.Model, int]:
    """clone_model with ``replace(layer) -> (new_layer, set_weights) | None`` per leaf layer
    (None: a copy of the layer); returns the new model and how many layers were replaced."""
    pending: list[tuple[keras.layers.Layer, keras.layers.Layer, Any]] = []
    replaced = 0

    def clone_function(layer: keras.layers.Layer) -> keras.layers.Layer:
        nonlocal replaced
        swap = replace(layer)
        if swap is None:
            swap = (layer.__class__.from_config(layer.get_config()), _copy_weights)
        else:
            replaced += 1
        pending.append((layer, *swap))
        return swap[0]

    new_model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new, set_weights in pending:
        set_weights(old, new)
    return new_model, replaced


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


def convert(model: keras.Model, *, include: Include = None, D_mul: int | None = None
            ) -> keras.Model:
    """A copy of ``model`` whose Conv2D and DepthwiseConv2D layers are DOConv2D layers
    computing the same function, with the same settings (name, trainable, dtype policy,
    activation, initializers, regularizers, constraints).

    ``include`` picks among them: None (all), a callable ``(name, layer) -> bool``, or layer
    name patterns (one string or several, ``fnmatch`` rules) matched against the Keras layer
    name (``doconv_core.layer_filter``). Only exact Conv2D and DepthwiseConv2D instances are
    converted (a subclass may change what it computes). A 1x1 kernel gets D_mul 1; ``D_mul``
    applies to the others. A ValueError when nothing would be converted.
    """
    pick = doconv_core.layer_filter(include)
    if D_mul is not None:
        D_mul = doconv_core.check_int("D_mul", D_mul)
    _check_graph_model(model, "convert")

    def replace(layer: keras.layers.Layer):
        if type(layer) not in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D):
            return None
        if not pick(layer.name, layer):
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

    converted, count = _clone(model, replace)
    if not count:
        raise doconv_core.nothing_to_convert(model, "Conv2D or DepthwiseConv2D", include)
    return converted


def fuse(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with every DOConv2D replaced by the plain layer ``layer.fuse()``
    gives, with the same settings: a DepthwiseConv2D for a depthwise one (groups == C_in > 1,
    equal strides), a Conv2D otherwise, holding the composed kernel. A model without DOConv2D
    layers gives a copy and a UserWarning.
    """
    _check_graph_model(model, "fuse")

    def replace(layer: keras.layers.Layer):
        if not isinstance(layer, DOConv2D):
            return None
        cls, config = layer._fused_config()

        def set_weights(old: DOConv2D, new_layer: keras.layers.Layer) -> None:
            new_layer.set_weights(old._fused_weights())

        return cls.from_config(config), set_weights

    fused, count = _clone(model, replace)
    if not count:
        warnings.warn(doconv_core.nothing_to_fuse(model, "DOConv2D"), UserWarning,
                      stacklevel=2)
    return fused


def doconv_layers(model: keras.layers.Layer) -> dict[str, DOConv2D]:
    """{layer name: layer} for every DOConv2D in ``model``, nested models and layers included
    ("" for a model that is itself a DOConv2D)."""
    if isinstance(model, DOConv2D):
        return {"": model}
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"model must be a keras.Model or keras.layers.Layer, got "
                         f"{type(model).__name__}")
    found = {}
    # Private, but Keras 3 has no public recursive walk (Model.layers lists direct children).
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, DOConv2D):
            if layer.name in found:
                raise ValueError(f"two DOConv2D layers are named {layer.name!r}; layer names "
                                 "must be unique to tell the layers apart")
            found[layer.name] = layer
    return found


def _file_names(model: keras.layers.Layer) -> dict[str, DOConv2D]:
    """doconv_layers keyed as in files and reports (ROOT_NAME for the model itself)."""
    return {name or ROOT_NAME: layer for name, layer in doconv_layers(model).items()}


def _check_built(layers: Mapping[str, DOConv2D], source: str) -> None:
    doconv_core.check_layers_ready(layers, source, lambda layer: layer.built,
                                   "are not built (their in_channels are unknown); call the "
                                   "model on an input or build it first")


def export_params(model: keras.layers.Layer, path: Union[str, os.PathLike]) -> None:
    """Write every DOConv2D's parameters, keyed by layer name, to the core's portable
    ``.npz`` container."""
    doconv_core.export_layers(path, model, _file_names(model), "DOConv2D")


def import_params(model: keras.layers.Layer, path: Union[str, os.PathLike]) -> list[str]:
    """Load a file written by any adapter's ``export_params`` into the model's DOConv2D
    layers, by name; returns the names loaded, sorted.

    The file and the model must hold the same layer names with equal specs, and every layer
    must be built; nothing is assigned unless all of them match.
    """
    layers = _file_names(model)
    _check_built(layers, repr(os.fspath(path)))
    return doconv_core.import_layers(path, layers)


def _legacy_array(value: Any) -> Any:
    if isinstance(value, keras.Variable) or keras.ops.is_tensor(value):
        return _to_numpy(value)
    return value  # the core checks and converts it


def load_legacy(model: keras.layers.Layer, weights: Mapping[str, Any], *, strict: bool = True
                ) -> LegacyLoadReport:
    """Load weights saved with the paper authors' original Keras DO-Conv layer.

    ``weights`` maps ``f"{layer name}.W"`` (the original layer's 'kernel', shape (D_mul,
    C_in/g, C_out)), ``".D"`` ((M*N, D_mul, C_in)) and ``".bias"`` to arrays; bare "W", "D"
    and "bias" when ``model`` is itself a DOConv2D. Every DOConv2D must be built. With
    ``strict`` every DOConv2D must be there and nothing else; otherwise layers without arrays
    keep their values (``missing_keys``) and other keys are skipped (``unexpected_keys``).
    The original's channel mapping always imports exactly (D's channels permuted where
    needed). Nothing changes unless everything checks.
    """
    layers = doconv_layers(model)
    named = {name or ROOT_NAME: layer for name, layer in layers.items()}
    _check_built(named, "the legacy checkpoint")
    results, remaining, missing = doconv_core.prepare_legacy(
        weights, {name: layer.spec for name, layer in layers.items()}, layout="tf-legacy",
        strict=strict, loads_other_keys=False, to_array=_legacy_array)
    for name, result in results.items():
        named[name].set_params(result.params)
    return LegacyLoadReport(results, missing, sorted(remaining))
