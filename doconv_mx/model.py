"""Whole nets: convert, fuse, the DO-Conv layers of a net, portable and legacy parameters.

``convert`` and ``fuse`` return a new net and leave the given one as it was. Layers are
named by their child path ("features.0"); a net that is itself one layer is named "" here
and ``doconv_core.ROOT_NAME`` in files and reports.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Mapping, Optional, Union

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

import doconv_core
from doconv_core import ROOT_NAME, CheckpointError, ConvSpec, DOConvParams, LegacyLoadReport

from ._blocks import clear_compiled, copy_block, replace_child, walk
from .layer import LAYER_CLASSES, LAYOUTS, DOConvND, _copy_settings

# The Gluon convs convert replaces, one per rank (nn.Conv2DTranspose and the like are not
# among them: they are not subclasses of these).
NATIVE_CLASSES = (nn.Conv1D, nn.Conv2D, nn.Conv3D)
_NATIVE_WORDS = "nn.Conv1D, nn.Conv2D or nn.Conv3D"
_LAYER_WORDS = "DOConv1D, DOConv2D or DOConv3D"

__all__ = ["convert", "fuse", "doconv_layers", "export_params", "import_params",
           "load_legacy", "LegacyLoadReport"]


def _check_model(model: Any) -> None:
    if not isinstance(model, gluon.Block):
        raise ValueError(f"model must be a gluon.Block, got {type(model).__name__}")


def _conv_spec(conv: nn.HybridBlock, D_mul: Optional[int]) -> ConvSpec:
    """The spec of an nn.Conv1D, nn.Conv2D or nn.Conv3D (in_channels None until known);
    D_mul applies to kernels of more than one element."""
    kw = conv._kwargs
    rank = len(kw["kernel"])
    if kw["layout"] != LAYOUTS[rank]:
        raise ValueError(f"layout must be {LAYOUTS[rank]!r} (MXNet 1.9's CPU Convolution "
                         f"supports no other {rank}-D layout), got {kw['layout']!r}")
    shape = conv.weight.shape
    known = shape is not None and len(shape) == rank + 2 and shape[1] > 0
    spec = ConvSpec(shape[1] * kw["num_group"] if known else None, kw["num_filter"],
                    kw["kernel"], kw["stride"], kw["pad"], kw["dilate"], kw["num_group"],
                    bias=not kw["no_bias"], rank=rank)
    return dataclasses.replace(spec, D_mul=D_mul) if spec.has_D and D_mul is not None else spec


def _weight_state(conv: nn.HybridBlock) -> str:
    """'initialized' (has values), 'deferred' (initialize() ran, the shape waits for the first
    input) or 'fresh' (initialize() not called)."""
    weight = conv.weight
    if weight._data is not None:
        return "initialized"
    return "deferred" if weight._deferred_init else "fresh"


def _to_doconv(conv: nn.HybridBlock, D_mul: Optional[int]) -> DOConvND:
    """The DO-Conv layer of the conv's rank for a conv of the net's copy (a conv whose shape
    is known but whose values wait for the first input gets them drawn now)."""
    spec, state = _conv_spec(conv, D_mul), _weight_state(conv)
    if state == "deferred" and spec.in_channels is not None:
        # Shape known but values not materialised yet (set_data before any forward, say):
        # materialise exactly what the conv would hold, then embed it.
        conv.weight._finish_deferred_init()
        state = "initialized"
    act = conv.act._act_type if conv.act is not None else None
    layer = LAYER_CLASSES[spec.rank](
        spec.out_channels, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
        spec.groups, conv._kwargs["layout"], act, spec.bias, conv.weight.init,
        conv.bias.init if conv.bias is not None else "zeros", spec.in_channels or 0,
        D_mul=spec.D_mul, prefix=conv.prefix)
    if state == "initialized":
        kernel = conv.weight.data().asnumpy()
        D, W = doconv_core.embed_kernel(kernel, groups=spec.groups, D_mul=spec.D_mul)
        bias = conv.bias.data().asnumpy() if conv.bias is not None else None
        layer.initialize(ctx=conv.weight.list_ctx())
        layer.cast(conv.weight.dtype)
        layer.set_params(DOConvParams(layer.spec, W, D, bias))
    elif state == "deferred":
        _, ctx, default_init, _ = conv.weight._deferred_init
        # W is drawn at the first forward with the conv's weight initializer, else with the
        # one initialize() was given (default_init).
        layer.initialize(init=default_init, ctx=ctx)
        layer.cast(conv.weight.dtype)
        if conv.bias is not None and conv.bias._data is not None:
            layer.bias.set_data(conv.bias.data())  # already drawn (its shape was known)
    else:
        layer.cast(conv.weight.dtype)
    for param in (layer.W, layer.D):
        if param is not None:
            _copy_settings(conv.weight, param)
    if layer.bias is not None:
        _copy_settings(conv.bias, layer.bias)
    return layer


def _swap(model: gluon.Block, picked: Mapping[str, Any], make) -> gluon.Block:
    """A copy of ``model`` with the children at the ``picked`` names replaced by
    ``make(child of the copy)``; a child held in several places stays shared."""
    new = copy_block(model)
    made: dict[int, gluon.Block] = {}
    swaps = []
    for parent, key, name, child in walk(new):
        if name in picked:
            if id(child) not in made:
                made[id(child)] = make(child)
            swaps.append((parent, key, child, made[id(child)]))
    for parent, key, child, replacement in swaps:
        replace_child(parent, key, child, replacement)
    clear_compiled(new)
    return new


def convert(model: gluon.Block, *, include: doconv_core.Include = None,
            D_mul: Optional[int] = None) -> gluon.Block:
    """A copy of ``model`` whose nn.Conv1D, nn.Conv2D and nn.Conv3D layers are DOConv1D,
    DOConv2D and DOConv3D layers with the same function; ``model`` is left as it was (a bare
    conv: its new DO-Conv layer). A net may mix the three ranks.

    Initialized convs are embedded exactly (D = 0, W holds the kernel); convs initialize()
    has not reached become fresh DO-Conv layers. Convs that initialize() reached but whose
    shape waits for the first input (``in_channels=0``, e.g. a model-zoo stem) become
    DO-Conv layers waiting the same way: same contexts, W drawn at the first forward with
    the conv's weight initializer (else the one given to ``initialize()``), the conv's bias
    kept. The weight's lr_mult, wd_mult and grad_req go to W and D, the bias's to bias.
    ``include``: None (every such conv), layer-name patterns or a callable (name, conv) ->
    bool (``doconv_core.layer_filter``; names are child paths such as "features.0").
    ``D_mul`` (None: the kernel's volume per layer) applies to every kernel of more than one
    element. Every layer is checked before anything is built; a ValueError when nothing
    would be converted.
    """
    _check_model(model)
    keep = doconv_core.layer_filter(include)
    if D_mul is not None:
        D_mul = doconv_core.check_int("D_mul", D_mul)
    if isinstance(model, NATIVE_CLASSES):
        picked = {"": model} if keep("", model) else {}
    else:
        picked = {name: child for _, _, name, child in walk(model)
                  if isinstance(child, NATIVE_CLASSES) and keep(name, child)}
    if not picked:
        raise doconv_core.nothing_to_convert(model, _NATIVE_WORDS, include)
    for name, conv in picked.items():
        try:
            _conv_spec(conv, D_mul)
        except ValueError as error:
            raise ValueError(f"layer {name or ROOT_NAME!r}: {error}") from None
    if isinstance(model, NATIVE_CLASSES):
        return _to_doconv(copy_block(model), D_mul)
    return _swap(model, picked, lambda conv: _to_doconv(conv, D_mul))


def fuse(model: gluon.Block) -> gluon.Block:
    """A copy of ``model`` whose DOConv1D, DOConv2D and DOConv3D layers are their fused
    nn.Conv1D, nn.Conv2D and nn.Conv3D layers (a bare DO-Conv layer: its Gluon conv);
    ``model`` is left as it was. A UserWarning, and an unchanged copy, for a net without
    DO-Conv layers."""
    _check_model(model)
    if isinstance(model, DOConvND):
        return model.fuse()
    layers = doconv_layers(model)
    if not layers:
        warnings.warn(doconv_core.nothing_to_fuse(model, _LAYER_WORDS), UserWarning,
                      stacklevel=2)
        return copy_block(model)
    for name, layer in layers.items():
        try:
            layer._require_initialized("fuse")
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
    picked = {name for _, _, name, child in walk(model) if isinstance(child, DOConvND)}
    return _swap(model, dict.fromkeys(picked), lambda layer: layer.fuse())


def doconv_layers(model: gluon.Block) -> dict[str, DOConvND]:
    """{child path: layer} for every DOConv1D, DOConv2D and DOConv3D in ``model``, each once
    ("" for the model itself)."""
    _check_model(model)
    if isinstance(model, DOConvND):
        return {"": model}
    found: dict[str, DOConvND] = {}
    seen: set[int] = set()
    for _, _, name, child in walk(model):
        if isinstance(child, DOConvND) and id(child) not in seen:
            seen.add(id(child))
            found[name] = child
    return found


def _named_layers(model: gluon.Block) -> dict[str, DOConvND]:
    """doconv_layers with the model itself named ROOT_NAME, as files and reports name it."""
    return {name or ROOT_NAME: layer for name, layer in doconv_layers(model).items()}


def export_params(model: gluon.Block, path: Union[str, os.PathLike]) -> None:
    """Save every DO-Conv layer of ``model`` (any rank) to the core's portable container
    (safetensors, or the .npz of earlier releases when ``path`` ends in ``.npz``), keyed by
    layer name."""
    doconv_core.export_layers(path, model, _named_layers(model), _LAYER_WORDS)


def import_params(model: gluon.Block, path: Union[str, os.PathLike]) -> list[str]:
    """Load a file written by any adapter's ``export_params`` into ``model``'s DO-Conv
    layers (completing deferred in_channels); nothing changes unless every layer matches,
    its rank included. Returns the names of the layers loaded."""
    layers = _named_layers(model)
    _check_ready(layers, repr(os.fspath(path)))
    return doconv_core.import_layers(path, layers)


def _check_ready(layers: Mapping[str, DOConvND], source: str) -> None:
    """CheckpointError unless every layer can take values (initialize() was called)."""
    doconv_core.check_layers_ready(layers, source, lambda layer: layer._initialize_called(),
                                   "are not initialized; call initialize() first")


def _as_array(value: Any) -> Any:
    return value.asnumpy() if isinstance(value, mx.nd.NDArray) else value


_LEGACY_SOURCE = "the legacy checkpoint"


def load_legacy(model: gluon.Block, weights: Mapping[str, Any], *,
                strict: bool = True) -> LegacyLoadReport:
    """Load the arrays of the paper authors' original Gluon layer into ``model``'s DOConv2D
    layers (built with the original settings: D_mul = M*N).

    ``weights`` maps f"{layer}.weight" (the OIHW kernel), f"{layer}.D" ((MN, MN, C_in)) and
    f"{layer}.bias" to arrays (NDArrays or NumPy), as ``mx.nd.load`` reads a file the
    original net saved with ``save_parameters``; just "weight", "D", "bias" when ``model``
    is itself one layer. A layer whose in_channels is deferred takes it from its weight.
    With ``strict`` every layer must be there and no other key; otherwise layers without
    arrays are skipped (missing_keys) and other keys ignored (unexpected_keys). Everything
    is checked, the layers included (initialize() must have reached them), before any
    layer changes.

    The original layer was 2-D only: arrays for a DOConv1D or DOConv3D are refused, and
    with ``strict`` so is a model holding one; otherwise those layers are skipped
    (missing_keys).
    """
    _check_model(model)
    if not isinstance(weights, Mapping):
        raise ValueError(f"the legacy weights must be a mapping of names to arrays, got "
                         f"{type(weights).__name__}")
    layers = doconv_layers(model)
    # The core refuses legacy arrays for 1-D and 3-D layers (the original was 2-D only).
    specs = {name: _legacy_spec(name, layer.spec, weights) if layer.rank == 2 else layer.spec
             for name, layer in layers.items()}
    results, remaining, missing = doconv_core.prepare_legacy(
        weights, specs, layout="gluon-legacy", strict=strict, loads_other_keys=False,
        to_array=_as_array, source=_LEGACY_SOURCE)
    named = _named_layers(model)
    _check_ready({name: named[name] for name in results}, _LEGACY_SOURCE)
    for name, result in results.items():
        named[name].set_params(result.params)
    return LegacyLoadReport(results, missing, sorted(remaining))


def _legacy_key(name: str, part: str) -> str:
    return f"{name}.{part}" if name else part


def _legacy_spec(name: str, spec: ConvSpec, weights: Mapping[str, Any]) -> ConvSpec:
    """``spec`` with a deferred in_channels taken from the layer's legacy weight."""
    key = f"{name}.weight" if name else "weight"
    if spec.in_channels is not None or key not in weights:
        return spec
    shape = tuple(np.shape(weights[key]))
    if len(shape) != 4 or shape[1] < 1:
        raise CheckpointError(f"{_LEGACY_SOURCE}: layer {name or ROOT_NAME!r}: weight must be "
                              f"(C_out, C_in/g, M, N), got shape {shape}")
    return spec.with_in_channels(shape[1] * spec.groups)
