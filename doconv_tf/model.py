"""Whole-model tools: convert Conv1D/Conv2D/Conv3D/DepthwiseConv1D/DepthwiseConv2D to
DOConv1D/DOConv2D/DOConv3D, fuse back to Keras' layers, list the DO-Conv layers, export/import
the portable container, load the original (2-D) Keras layer's weights.

``convert`` and ``fuse`` work on Sequential and Functional models (nested ones included,
through ``keras.models.clone_model(recursive=True)``), with layers of any rank mixed; they
return new, uncompiled models with copied weights and the given layers' settings (the
training configuration is not carried: compile the copy), and leave the given model
untouched. Subclassed models have no layer graph Keras can rebuild: construct DO-Conv
layers in them directly, and deploy each one through ``layer.fuse()`` (a built Keras layer
with the same function) or ``export_params``. Layers are named by their Keras name (unique in
a model); a model that is itself a DO-Conv layer is named "" (``doconv_core.ROOT_NAME`` in
files).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np

import keras

import doconv_core
from doconv_core import ROOT_NAME, CheckpointError, DOConvParams, Include, LegacyLoadReport

from .layer import (_DEPTHWISE_KEYS, INFERENCE_TENSORS, DOConv1D, DOConv2D, DOConv3D, _DOConv,
                    _to_numpy)

__all__ = ["convert", "fuse", "doconv_layers", "export_params", "import_params",
           "load_legacy", "LegacyLoadReport"]

# What convert replaces, by exact type, and with what.
_CONVERTS = {keras.layers.Conv1D: DOConv1D, keras.layers.Conv2D: DOConv2D,
             keras.layers.Conv3D: DOConv3D, keras.layers.DepthwiseConv1D: DOConv1D,
             keras.layers.DepthwiseConv2D: DOConv2D}
_CONVERTED_KINDS = "Conv1D, Conv2D, Conv3D, DepthwiseConv1D or DepthwiseConv2D"
_DOCONV_KINDS = "DOConv1D, DOConv2D or DOConv3D"

# Conv config keys DO-Conv layers take as they are; LoRA settings are folded into the kernel.
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
            f"{type(model).__name__}; in a subclassed model build DO-Conv layers ({_DOCONV_KINDS}) "
            "directly and fuse them one by one with layer.fuse()")
    if not model.built:
        raise ValueError(f"{what} needs a built model (its weights are copied); build it or "
                         "give it an Input first")


def _copy_weights(old: keras.layers.Layer, new: keras.layers.Layer) -> None:
    # Not get_weights(): on JAX it reads variables the way NumPy 2 warns about.
    new.set_weights([_to_numpy(w) for w in old.weights])


@contextlib.contextmanager
def _compile_config_hidden(model: keras.Model) -> Iterator[None]:
    """While open, ``model`` and its nested models read as uncompiled, so clone_model builds
    an uncompiled copy instead of rebuilding the compile configuration (which fails for an
    unregistered custom loss, metric or learning-rate schedule); restored on exit."""
    compiled = [part for part in model._flatten_layers(include_self=True)
                if isinstance(part, keras.Model) and part.compiled]
    try:
        for part in compiled:
            part.compiled = False
        yield
    finally:
        for part in compiled:
            part.compiled = True


def _clone(model: keras.Model, replace: Callable[[keras.layers.Layer], Any]
           ) -> tuple[keras.Model, int]:
    """clone_model with ``replace(layer) -> (new_layer, set_weights) | None`` per leaf layer
    (None: a copy of the layer); returns the new, uncompiled model and how many layers were
    replaced. Converting and fusing change the variables an optimizer state belongs to and
    never need the training configuration: the copy is left for the user to compile."""
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

    with _compile_config_hidden(model):
        new_model = keras.models.clone_model(model, clone_function=clone_function,
                                             recursive=True)
    for old, new, set_weights in pending:
        set_weights(old, new)
    return new_model, replaced


def _conversion(layer: keras.layers.Layer, D_mul: int | None) -> tuple[dict, np.ndarray]:
    """DO-Conv kwargs and the kernel (*kernel_size, C_in/g, filters) with groups that
    reproduce ``layer``."""
    config = layer.get_config()
    kernel = _to_numpy(layer.kernel)  # a LoRA-enabled Conv layer returns its merged kernel
    if "depth_multiplier" not in config:  # Conv1D, Conv2D, Conv3D
        kwargs = {key: config[key] for key in _CONV_KEYS if key in config}
    else:  # DepthwiseConv1D/2D: kernel (*kernel_size, C_in, m), output channel c*m + k
        *kernel_size, C_in, multiplier = kernel.shape
        kwargs = {key: config[key] for key in _SHARED_KEYS if key in config}
        kwargs.update({new: config[old] for old, new in _DEPTHWISE_KEYS.items()})
        kwargs.update(filters=C_in * multiplier, groups=C_in)
        # Grouped conv: output channel o belongs to group o // m, the same order.
        kernel = kernel.reshape(*kernel_size, 1, C_in * multiplier)
    kwargs["D_mul"] = None if math.prod(kernel.shape[:-2]) == 1 else D_mul
    return kwargs, kernel


def convert(model: keras.Model, *, include: Include = None, D_mul: int | None = None
            ) -> keras.Model:
    """A copy of ``model`` whose Conv1D, Conv2D, Conv3D, DepthwiseConv1D and DepthwiseConv2D
    layers are DOConv1D/DOConv2D/DOConv3D layers (the same rank) computing the same function,
    with the same settings (name, trainable, dtype policy, padding 'causal' included,
    activation, initializers, regularizers, constraints).

    ``include`` picks among them: None (all), a callable ``(name, layer) -> bool``, or layer
    name patterns (one string or several, ``fnmatch`` rules) matched against the Keras layer
    name (``doconv_core.layer_filter``). Only exact instances of those classes are converted
    (a subclass may change what it computes). A kernel of one element (1x1 in 2-D) gets
    D_mul 1; ``D_mul`` applies to the others. A ValueError when nothing would be converted.
    The copy is uncompiled, whatever ``model``'s compile configuration holds.
    """
    pick = doconv_core.layer_filter(include)
    if D_mul is not None:
        D_mul = doconv_core.check_int("D_mul", D_mul)
    _check_graph_model(model, "convert")

    def replace(layer: keras.layers.Layer):
        doconv_class = _CONVERTS.get(type(layer))
        if doconv_class is None or not pick(layer.name, layer):
            return None
        kwargs, kernel = _conversion(layer, D_mul)
        try:
            new = doconv_class(**kwargs)
        except ValueError as error:
            raise ValueError(f"cannot convert layer {layer.name!r}: {error}") from None

        def set_weights(old: keras.layers.Layer, new_layer: _DOConv) -> None:
            spec = new_layer.spec
            D, W = doconv_core.embed_kernel(doconv_core.hwio_to_oihw(kernel),
                                            groups=spec.groups, D_mul=spec.D_mul)
            bias = _to_numpy(old.bias) if spec.bias else None
            new_layer.set_params(DOConvParams(spec, W, D, bias))

        return new, set_weights

    converted, count = _clone(model, replace)
    if not count:
        raise doconv_core.nothing_to_convert(model, _CONVERTED_KINDS, include)
    return converted


def fuse(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with every DO-Conv layer replaced by the plain Keras layer
    ``layer.fuse()`` gives, with the same settings, holding the composed kernel: the Conv1D,
    Conv2D or Conv3D of its rank, or a DepthwiseConv1D/DepthwiseConv2D for a depthwise one
    (groups == C_in > 1) that Keras has a depthwise layer for (no causal padding in 1-D,
    equal strides in 2-D; a 3-D one fuses to a grouped Conv3D). A model without DO-Conv
    layers gives a copy and a UserWarning. The copy is uncompiled.
    """
    _check_graph_model(model, "fuse")

    def replace(layer: keras.layers.Layer):
        if not isinstance(layer, _DOConv):
            return None
        cls, config = layer._fused_config()

        def set_weights(old: _DOConv, new_layer: keras.layers.Layer) -> None:
            new_layer.set_weights(old._fused_weights())

        return cls.from_config(config), set_weights

    fused, count = _clone(model, replace)
    if not count:
        warnings.warn(doconv_core.nothing_to_fuse(model, _DOCONV_KINDS), UserWarning,
                      stacklevel=2)
    return fused


def doconv_layers(model: keras.layers.Layer) -> dict[str, _DOConv]:
    """{layer name: layer} for every DOConv1D, DOConv2D and DOConv3D in ``model``, nested
    models and layers included ("" for a model that is itself one)."""
    if isinstance(model, _DOConv):
        return {"": model}
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"model must be a keras.Model or keras.layers.Layer, got "
                         f"{type(model).__name__}")
    found = {}
    # Private, but Keras 3 has no public recursive walk (Model.layers lists direct children).
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, _DOConv):
            if layer.name in found:
                raise ValueError(f"two DO-Conv layers are named {layer.name!r}; layer names "
                                 "must be unique to tell the layers apart")
            found[layer.name] = layer
    return found


def _file_names(model: keras.layers.Layer) -> dict[str, _DOConv]:
    """doconv_layers keyed as in files and reports (ROOT_NAME for the model itself)."""
    return {name or ROOT_NAME: layer for name, layer in doconv_layers(model).items()}


def _check_built(layers: Mapping[str, _DOConv], source: str) -> None:
    doconv_core.check_layers_ready(layers, source, lambda layer: layer.built,
                                   "are not built (their in_channels are unknown); call the "
                                   "model on an input or build it first")


def _check_writable(layers: Mapping[str, _DOConv], source: str) -> None:
    """Every (built) layer can take values here, checked before any is assigned."""
    doconv_core.check_layers_ready(layers, source,
                                   lambda layer: not layer._holds_inference_tensors(),
                                   f"hold variables that {INFERENCE_TENSORS}")


def export_params(model: keras.layers.Layer, path: Union[str, os.PathLike]) -> None:
    """Write every DO-Conv layer's parameters (any rank; the file records each one's), keyed
    by layer name, to the core's portable container: safetensors, or the ``.npz`` of earlier
    releases when ``path`` ends in ``.npz``."""
    doconv_core.export_layers(path, model, _file_names(model), _DOCONV_KINDS)


def import_params(model: keras.layers.Layer, path: Union[str, os.PathLike]) -> list[str]:
    """Load a file written by any adapter's ``export_params`` into the model's DO-Conv
    layers, by name; returns the names loaded, sorted.

    The file and the model must hold the same layer names with equal specs, and every layer
    must be built; nothing is assigned unless all of them match.
    """
    layers = _file_names(model)
    _check_built(layers, repr(os.fspath(path)))
    _check_writable(layers, repr(os.fspath(path)))
    return doconv_core.import_layers(path, layers)


def _legacy_array(value: Any) -> Any:
    if isinstance(value, keras.Variable) or keras.ops.is_tensor(value):
        return _to_numpy(value)
    return value  # the core checks and converts it


def load_legacy(model: keras.layers.Layer, weights: Mapping[str, Any], *, strict: bool = True
                ) -> LegacyLoadReport:
    """Load weights saved with the paper authors' original Keras DO-Conv layer (a 2-D layer:
    DOConv2D layers only).

    ``weights`` maps ``f"{layer name}.W"`` (the original layer's 'kernel', shape (D_mul,
    C_in/g, C_out)), ``".D"`` ((M*N, D_mul, C_in)) and ``".bias"`` to arrays; bare "W", "D"
    and "bias" when ``model`` is itself a DOConv2D. Every DOConv2D must be built. With
    ``strict`` every DO-Conv layer must be there and nothing else, so a model with DOConv1D
    or DOConv3D layers needs ``strict=False``; otherwise layers without arrays (those
    included) keep their values (``missing_keys``) and other keys are skipped
    (``unexpected_keys``). Arrays for a DOConv1D or DOConv3D are a CheckpointError either
    way. The original's channel mapping always imports exactly (D's channels permuted where
    needed). Nothing changes unless everything checks.
    """
    source = "the legacy checkpoint"
    layers = doconv_layers(model)
    # Only 2-D layers take legacy arrays (the core refuses the others); they must be built.
    _check_built({name or ROOT_NAME: layer for name, layer in layers.items()
                  if layer.rank == 2}, source)
    results, remaining, missing = doconv_core.prepare_legacy(
        weights, {name: layer.spec for name, layer in layers.items()}, layout="tf-legacy",
        strict=strict, loads_other_keys=False, to_array=_legacy_array, source=source)
    named = {name or ROOT_NAME: layer for name, layer in layers.items()}
    _check_writable({name: named[name] for name in results}, source)
    for name, result in results.items():
        named[name].set_params(result.params)
    return LegacyLoadReport(results, missing, sorted(remaining))
