"""Whole-model operations: convert, fuse, portable export/import, legacy checkpoints.

``convert`` and ``fuse`` return a new model and leave the given one as it was (as in every
adapter); which layers ``convert`` picks follows ``doconv_core.layer_filter``.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

import doconv_core
from doconv_core import ROOT_NAME, CheckpointError, Include, LegacyLoadReport, check_int
from doconv_core.checkpoint import check_layers_assignable, stage_assignments

from . import _assign
from .layer import DOConv1d, DOConv2d, DOConv3d, _DOConvNd

__all__ = ["convert", "fuse", "doconv_layers", "export_params", "import_params", "load_legacy",
           "LegacyLoadReport"]


def _walk(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, qualified name, child) in named_modules() order; a module held
    in several places is yielded at each, but its own children only once."""
    seen = set()

    def visit(prefix: str, parent: nn.Module):
        if id(parent) in seen:
            return
        seen.add(id(parent))
        for attribute, child in parent._modules.items():  # named_children() hides repeats
            if child is None:
                continue
            name = f"{prefix}.{attribute}" if prefix else attribute
            yield parent, attribute, name, child
            yield from visit(name, child)

    return visit("", model)


def _replaced(model: nn.Module, pick: Callable[[str, nn.Module], bool],
              make: Callable[[str, nn.Module], nn.Module]) -> Optional[nn.Module]:
    """A copy of ``model`` with every picked module swapped for ``make``'s result, or None
    when nothing is picked. ``pick`` sees the given model's own modules (once each place
    they are held); the given model is not changed, and all replacements are built before
    the copy changes."""
    if pick("", model):
        return _with_hooks(model, make("", model))
    picked = [(index, name) for index, (_, _, name, child) in enumerate(_walk(model))
              if pick(name, child)]
    if not picked:
        return None
    result = copy.deepcopy(model)  # keeps sharing: both walks see the same structure
    places = list(_walk(result))
    made: dict[int, nn.Module] = {}  # a module shared in two places stays shared
    swaps = []
    for index, picked_name in picked:
        parent, attribute, name, child = places[index]
        if name != picked_name:
            raise RuntimeError(f"copy.deepcopy changed {type(model).__name__}'s module "
                               f"structure ({picked_name!r} became {name!r})")
        if id(child) not in made:
            made[id(child)] = _with_hooks(child, make(name, child))
        swaps.append((parent, attribute, made[id(child)]))
    for parent, attribute, replacement in swaps:
        setattr(parent, attribute, replacement)
    return result


# The hooks a module's call runs: a replacement runs them as the module did. (nn.Module has
# no public API to read them; state-dict hooks name the old parameters and are not carried.)
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def _with_hooks(module: nn.Module, replacement: nn.Module) -> nn.Module:
    """``replacement`` with ``module``'s forward and backward hooks added to its own."""
    for hooks in _CALL_HOOKS:
        getattr(replacement, hooks).update(getattr(module, hooks, {}))
    if module._backward_hooks:
        replacement._is_full_backward_hook = module._is_full_backward_hook
    return replacement


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wraps: a copy of the wrapper would keep a reducer
    built for the old parameters (the new ones' gradients would never be synchronised)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


# The native convs convert picks (exact types) and the DO-Conv class each becomes.
_DOCONV_OF = {nn.Conv1d: DOConv1d, nn.Conv2d: DOConv2d, nn.Conv3d: DOConv3d}
_NATIVE_NAMES = "nn.Conv1d, nn.Conv2d or nn.Conv3d"
_DOCONV_NAMES = "DOConv1d, DOConv2d or DOConv3d"


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def convert(model: nn.Module, *, include: Include = None,
            D_mul: Optional[int] = None) -> nn.Module:
    """A copy of ``model`` whose nn.Conv1d, nn.Conv2d and nn.Conv3d modules are DOConv1d,
    DOConv2d and DOConv3d layers computing exactly the same function (ranks may mix in one
    model); ``model`` is not changed.

    Only modules whose type is exactly nn.Conv1d, nn.Conv2d or nn.Conv3d are converted:
    subclasses (a materialised LazyConv2d is plain nn.Conv2d; QAT, parametrized or
    custom-forward convs are not) may compute something else, and DO-Conv layers are never
    touched. ``include`` picks among
    them (``doconv_core.layer_filter``): None for all, layer-name patterns, or a callable
    ``(name, module) -> bool`` given the model's own modules (name as in named_modules(),
    "" for the model itself). A ValueError when nothing is picked. ``D_mul`` applies to
    kernels of more than one element (volume > 1); 1x1 (1, 1x1x1) convs have no D. Each layer
    keeps the conv's device, dtype,
    training mode and requires_grad (the weight's goes to W and D, the bias keeps its own)
    and its forward and backward hooks. A DistributedDataParallel model gives its module's
    copy, unwrapped (wrap it again: DDP must see the new parameters); a torch.compile'd one
    a compiled copy.
    """
    _check_model(model)
    model = _unwrapped(model)
    if D_mul is not None:
        D_mul = check_int("D_mul", D_mul)
    keep = doconv_core.layer_filter(include)

    def pick(name: str, module: nn.Module) -> bool:
        return type(module) in _DOCONV_OF and keep(name, module)

    def make(name: str, conv: nn.Module) -> nn.Module:
        try:
            return _DOCONV_OF[type(conv)].from_conv(conv, D_mul=D_mul)
        except ValueError as error:
            raise ValueError(f"cannot convert {name or 'the model'!r}: {error}") from None

    result = _replaced(model, pick, make)
    if result is None:
        raise doconv_core.nothing_to_convert(model, _NATIVE_NAMES, include)
    return result


def fuse(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every DOConv1d, DOConv2d and DOConv3d replaced by its fused
    nn.Conv1d, nn.Conv2d or nn.Conv3d; ``model`` is not changed. A model without DO-Conv
    layers gives a warning and an unchanged copy.

    The result's state_dict loads into the same architecture built with the native convs.
    Each fused conv takes W's requires_grad for its weight and the bias' for its bias, and
    the layer's forward and backward hooks. A DistributedDataParallel model gives its module's
    copy, unwrapped; a torch.compile'd one a compiled copy.
    """
    _check_model(model)
    model = _unwrapped(model)
    result = _replaced(model, lambda name, module: isinstance(module, _DOConvNd),
                       lambda name, layer: layer.fuse())
    if result is None:
        warnings.warn(doconv_core.nothing_to_fuse(model, _DOCONV_NAMES), UserWarning,
                      stacklevel=2)
        return copy.deepcopy(model)
    return result


def doconv_layers(model: nn.Module) -> dict[str, _DOConvNd]:
    """{qualified name: layer} for every DOConv1d, DOConv2d and DOConv3d in ``model`` (""
    for the model itself)."""
    _check_model(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, _DOConvNd)}


def export_params(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save every DO-Conv layer's parameters (any rank; the file records each layer's spec,
    rank included), keyed by layer name, in the core's portable container: safetensors, or
    the .npz of earlier releases when ``path`` ends in ``.npz``."""
    doconv_core.export_layers(path, model, {name or ROOT_NAME: layer for name, layer
                                            in doconv_layers(model).items()}, _DOCONV_NAMES)


def import_params(model: nn.Module, path: Union[str, os.PathLike]) -> list[str]:
    """Load a file written by any adapter's ``export_params`` into the model's DO-Conv layers.

    Every layer must be in the file with the same settings, and the file must hold no
    other layers; nothing is changed unless all match. Returns the layer names loaded.
    """
    layers = {name or ROOT_NAME: layer for name, layer in doconv_layers(model).items()}
    _check_ready(layers, repr(os.fspath(path)))
    return doconv_core.import_layers(path, layers, stage=_assign.staged)


def _check_ready(layers: Mapping[str, _DOConvNd], source: str) -> None:
    """CheckpointError unless every layer can take values: a meta-device parameter would
    silently ignore them, an inference tensor or a parametrization without right_inverse
    refuse them."""
    doconv_core.check_layers_ready(layers, source, lambda layer: not layer._on_meta(),
                                   "are on the meta device; materialise them "
                                   "(model.to_empty(device=...)) first")
    check_layers_assignable(layers, source, _assign.assignment_problem)


_SOURCE = "the legacy checkpoint"


def load_legacy(model: nn.Module, weights: Mapping[str, Any], *,
                strict: bool = True) -> LegacyLoadReport:
    """Load a state_dict saved with the paper authors' original PyTorch DOConv2d (a 2-D
    layer: the arrays go to DOConv2d layers only; with ``strict`` a model holding DOConv1d or
    DOConv3d layers is refused, otherwise those keep their values and are reported missing).

    ``model`` (one DO-Conv layer or a model holding them) is built with this package's layers
    and the original settings (note the original DOConv2d defaulted to bias=False and took
    D_mul as its 4th positional argument). Each layer's ``W``, ``D``, ``d_diag`` (or
    ``D_diag``) and ``bias`` go through ``doconv_core.prepare_legacy`` (layout
    "torch-legacy"); other keys (BatchNorm, ...) load as they are, through
    ``load_state_dict``. Grouped layers whose original channel mapping differs from the
    paper's load function-preservingly (see the report). Everything is checked before
    anything changes, with ``strict`` as in ``model.load_state_dict(strict=strict)``.
    """
    _check_model(model)
    layers = doconv_layers(model)
    results, remaining, _ = doconv_core.prepare_legacy(
        weights, {name: layer.spec for name, layer in layers.items()}, layout="torch-legacy",
        strict=strict, loads_other_keys=True, to_array=_legacy_array, source=_SOURCE)
    # The layers' extra state (rank, groups, kernel shape) is not in the original checkpoints
    # and needs none: each layer keeps its own (one in the weights is left out).
    extra_states = {f"{name}._extra_state" if name else "_extra_state" for name in layers}
    remaining = {key: value for key, value in remaining.items() if key not in extra_states}
    loaded = {name: layer for name, layer in layers.items() if (name or ROOT_NAME) in results}
    targets = {name or ROOT_NAME: layer for name, layer in loaded.items()}  # names as results'
    _check_ready(targets, _SOURCE)
    # Checked in full before anything loads: load_state_dict copies what matches and only
    # then reports what does not.
    not_tensors = sorted(key for key, value in remaining.items()
                         if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{_SOURCE}: {not_tensors} must be torch.Tensor values")
    filled = {}  # state key -> shape, for what the DO-Conv layers take through set_params
    for name in loaded:
        params = results[name or ROOT_NAME].params
        for part in ("W", "D", "bias"):
            array = getattr(params, part)
            if array is not None:
                filled[f"{name}.{part}" if name else part] = array.shape
    # The loaded layers' own keys (W, D, bias, or a parametrization's original) are filled
    # through set_params: they are expected as the layers' specs give them.
    own_keys = {f"{name}.{key}" if name else key for name, layer in loaded.items()
                for key in layer.state_dict(keep_vars=True)}
    expected = {key: None if nn.parameter.is_lazy(value) else tuple(value.shape)
                for key, value in model.state_dict(keep_vars=True).items()
                if key not in extra_states and key not in own_keys}
    expected.update(filled)
    doconv_core.check_state_keys(
        _SOURCE, expected, {**{key: tuple(value.shape) for key, value in remaining.items()},
                            **filled}, strict=strict)
    # Keys under a loaded DO-Conv layer are all unexpected (it holds only W, D, bias); kept
    # from load_state_dict, where a stray ``weight`` would be embedded over W and D.
    prefixes = tuple(f"{name}." if name else "" for name in loaded)
    native = {key: value for key, value in remaining.items() if not key.startswith(prefixes)}
    _check_native_targets(model, native)
    assignments = stage_assignments(_SOURCE, targets,
                                    {name: results[name].params for name in targets},
                                    _assign.staged)
    outcome = model.load_state_dict(native, strict=False)
    for assign in assignments:
        assign()
    missing = [key for key in outcome.missing_keys if key not in own_keys]
    unexpected = list(outcome.unexpected_keys) + sorted(set(remaining) - set(native))
    return LegacyLoadReport(results, missing, unexpected)


def _check_native_targets(model: nn.Module, native: Mapping[str, Any]) -> None:
    """load_state_dict stops at the first tensor that cannot take its value, after loading
    the ones before it: refuse inference tensors (outside inference mode) up front."""
    if torch.is_inference_mode_enabled():
        return
    held = sorted(key for key, value in model.state_dict(keep_vars=True).items()
                  if key in native and isinstance(value, torch.Tensor) and value.is_inference())
    if held:
        raise CheckpointError(f"cannot load {_SOURCE}: {held} are inference tensors (built "
                              "under torch.inference_mode()), which take values only inside "
                              "inference mode; load inside `with torch.inference_mode():` or "
                              "build the model outside it")


def _legacy_array(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return value  # the core checks and converts it
