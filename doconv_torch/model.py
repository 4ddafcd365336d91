"""Whole-model operations: convert, fuse, portable export/import, legacy checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

import doconv_core
from doconv_core import CheckpointError, LegacyImport, check_int

from .layer import DOConv2d

__all__ = ["convert", "fuse", "export_params", "import_params", "load_legacy_state_dict",
           "LegacyLoadReport"]

Include = Callable[[str, nn.Module], bool]
ROOT_NAME = "layer"  # the container's name for a model that is itself one layer


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


def _replace(model: nn.Module, pick: Callable[[str, nn.Module], bool],
             make: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """Swap every picked module; all replacements are built before the model changes."""
    if pick("", model):
        return make("", model)
    made: dict[int, nn.Module] = {}  # a module shared in two places stays shared
    swaps = []
    for parent, attribute, name, child in _walk(model):
        if pick(name, child):
            if id(child) not in made:
                made[id(child)] = make(name, child)
            swaps.append((parent, attribute, made[id(child)]))
    for parent, attribute, replacement in swaps:
        setattr(parent, attribute, replacement)
    return model


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def convert(model: nn.Module, *, D_mul: Optional[int] = None, include: Optional[Include] = None,
            inplace: bool = False) -> nn.Module:
    """Replace nn.Conv2d modules by DOConv2d layers computing exactly the same function.

    Only modules whose type is exactly nn.Conv2d are converted: subclasses (a materialised
    LazyConv2d is plain nn.Conv2d; QAT, parametrized or custom-forward convs are not) may
    compute something else, and DOConv2d itself is never touched. ``include(name, module)``
    picks among them (name as in named_modules(), "" for the model itself). ``D_mul``
    applies to kernels with M*N > 1; 1x1 convs have no D. Returns a copy unless ``inplace``.
    """
    _check_model(model)
    if D_mul is not None:
        D_mul = check_int("D_mul", D_mul)
    if include is not None and not callable(include):
        raise ValueError(f"include must be a callable (name, module) -> bool, got {include!r}")
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace must be True or False, got {inplace!r}")

    def pick(name: str, module: nn.Module) -> bool:
        return type(module) is nn.Conv2d and (include is None or bool(include(name, module)))

    def make(name: str, conv: nn.Module) -> nn.Module:
        try:
            return DOConv2d.from_conv(conv, D_mul=D_mul)
        except ValueError as error:
            raise ValueError(f"cannot convert {name or 'the model'!r}: {error}") from None

    return _replace(model if inplace else copy.deepcopy(model), pick, make)


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every DOConv2d by its fused nn.Conv2d (a copy unless ``inplace``).

    The result's state_dict loads into the same architecture built with nn.Conv2d.
    """
    _check_model(model)
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace must be True or False, got {inplace!r}")
    return _replace(model if inplace else copy.deepcopy(model),
                    lambda name, module: isinstance(module, DOConv2d),
                    lambda name, layer: layer.fuse())


def doconv_layers(model: nn.Module) -> dict[str, DOConv2d]:
    """{qualified name: layer} for every DOConv2d in ``model`` ("" for the model itself)."""
    _check_model(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, DOConv2d)}


def export_params(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save every DOConv2d's parameters, keyed by layer name, in the core's .npz container."""
    layers = doconv_layers(model)
    if not layers:
        raise ValueError(f"model has no DOConv2d layers to export ({type(model).__name__})")
    doconv_core.save_params(path, {name or ROOT_NAME: layer.to_params()
                                   for name, layer in layers.items()})


def import_params(model: nn.Module, path: Union[str, os.PathLike]) -> list[str]:
    """Load a file written by any adapter's ``export_params`` into the model's DOConv2d layers.

    Every layer must be in the file with the same settings, and the file must hold no
    other layers; nothing is changed unless all match. Returns the layer names loaded.
    """
    layers = {name or ROOT_NAME: layer for name, layer in doconv_layers(model).items()}
    _check_ready(layers, repr(os.fspath(path)))
    prepared = doconv_core.prepare_import(path, {name: layer.spec
                                                 for name, layer in layers.items()})
    for name, layer in layers.items():
        params = prepared[name].params
        layer._load_arrays(params.D, params.W, params.bias)
    return sorted(layers)


def _check_ready(layers: Mapping[str, DOConv2d], source: str) -> None:
    """CheckpointError unless every layer can take values: a meta-device parameter would
    silently ignore them."""
    on_meta = sorted(name for name, layer in layers.items()
                     if any(param.is_meta for param in layer.parameters(recurse=False)))
    if on_meta:
        raise CheckpointError(f"cannot load {source}: layers {on_meta} are on the meta device; "
                              "materialise them (model.to_empty(device=...)) first")


@dataclasses.dataclass
class LegacyLoadReport:
    """What ``load_legacy_state_dict`` did, per DO-Conv layer and for the remaining keys."""

    layers: dict[str, LegacyImport]
    missing_keys: list[str]
    unexpected_keys: list[str]

    @property
    def exact(self) -> list[str]:
        """Layers holding the original parameters (at most with D's channels permuted)."""
        return [name for name, result in self.layers.items() if result.exact]

    @property
    def function_preserving(self) -> list[str]:
        """Grouped layers whose original kernel was embedded (same function, D restarts)."""
        return [name for name, result in self.layers.items() if not result.exact]


_LEGACY_PARTS = ("W", "D", "d_diag", "D_diag", "bias")


def load_legacy_state_dict(model: nn.Module, state_dict: Mapping[str, Any], *,
                           strict: bool = True) -> LegacyLoadReport:
    """Load a state_dict saved with the paper authors' original PyTorch DOConv2d.

    ``model`` (one DOConv2d or a model holding them) is built with this package's layers
    and the original settings (note the original DOConv2d defaulted to bias=False and took
    D_mul as its 4th positional argument). Each layer's ``W``, ``D``, ``d_diag`` (or ``D_diag``) and
    ``bias`` go through doconv_core.import_legacy_torch; other keys (BatchNorm, ...) load
    as they are. Grouped layers whose original channel mapping differs from the paper's
    load function-preservingly (see the report). Loading is all-or-nothing as with
    ``model.load_state_dict(strict=strict)``.
    """
    _check_model(model)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    source = "the legacy state_dict"
    remaining = dict(state_dict)
    targets: dict[str, DOConv2d] = {}
    stored: dict[str, dict[str, Any]] = {}
    prefixes: dict[str, str] = {}
    for name, layer in doconv_layers(model).items():
        prefix = f"{name}." if name else ""
        parts = {part: remaining.pop(prefix + part) for part in _LEGACY_PARTS
                 if prefix + part in remaining}
        if not parts and not strict:
            continue
        if "W" not in parts:
            raise CheckpointError(f"{source} has no {prefix + 'W'!r} for layer "
                                  f"{name or ROOT_NAME!r}")
        if "d_diag" in parts:  # the original's spelling wins, as before
            parts["D_diag"] = parts.pop("d_diag")
        stored[name or ROOT_NAME] = {part: _legacy_array(value) for part, value in parts.items()}
        targets[name or ROOT_NAME] = layer
        prefixes[name or ROOT_NAME] = prefix
    _check_ready(targets, source)
    results = doconv_core.prepare_import(
        source, {name: layer.spec for name, layer in targets.items()}, stored,
        layout="torch-legacy")
    for name, result in results.items():
        for part in ("W", "D", "bias"):
            value = getattr(result.params, part)
            if value is not None:
                remaining[prefixes[name] + part] = torch.from_numpy(np.ascontiguousarray(value))
    # Checked in full before load_state_dict, which copies what matches and only then
    # reports what does not.
    not_tensors = sorted(key for key, value in remaining.items()
                         if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{source}: {not_tensors} must be torch.Tensor values")
    expected = {key: None if nn.parameter.is_lazy(value) else tuple(value.shape)
                for key, value in model.state_dict(keep_vars=True).items()}
    doconv_core.check_state_keys(source, expected,
                                 {key: tuple(value.shape) for key, value in remaining.items()},
                                 strict=strict)
    outcome = model.load_state_dict(remaining, strict=strict)
    return LegacyLoadReport(results, list(outcome.missing_keys), list(outcome.unexpected_keys))


def _legacy_array(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return value  # the core checks and converts it
