"""Assigning values to a DO-Conv layer's parameters: what every path that fills a layer
(``set_params``, ``import_params``, ``load_legacy``, ``from_conv``, ``from_params``) runs.

An assignment is staged first: every check runs and every value is prepared (cast to the
target's dtype and device, passed through a parametrization's ``right_inverse``) while
nothing changes; the assignment itself then only copies in place. A whole-model import
stages every layer before assigning any (``doconv_core.stage_assignments``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import math

import numpy as np
import torch
from torch import Tensor
from torch.nn import init
from torch.nn.utils import parametrize

import doconv_core
from doconv_core import DOConvParams

if TYPE_CHECKING:
    from .layer import _DOConvNd

__all__ = ["assignment_problem", "held_tensor", "parametrized", "reset_through_parametrizations",
           "staged", "staged_tensors", "state_entries"]

Assignment = Callable[[], None]


def parametrized(layer: _DOConvNd, name: Optional[str] = None) -> bool:
    """Whether parameter ``name`` (None: any parameter) of the layer is parametrized
    (torch.nn.utils.parametrize)."""
    names = [part for part, _ in _parts(layer)] if name is None else [name]
    return any(parametrize.is_parametrized(layer, part) for part in names)


def _parts(layer: _DOConvNd) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter the layer's spec gives it."""
    spec = layer.spec
    return ([("D", spec.D_shape)] if spec.has_D else []) + [("W", spec.W_shape)] + (
        [("bias", (spec.out_channels,))] if spec.bias else [])


def _targets(layer: _DOConvNd, name: str) -> tuple[Optional[Any], list[Any]]:
    """(the parametrization chain or None, the tensors that hold ``name``'s values: the
    parameter itself, or the chain's ``original`` / ``original0``, ``original1``, ...)."""
    if not parametrize.is_parametrized(layer, name):
        return None, [getattr(layer, name)]
    chain = layer.parametrizations[name]
    if hasattr(chain, "original"):
        return chain, [chain.original]
    return chain, [getattr(chain, f"original{i}") for i in range(chain.ntensors)]


def held_tensor(layer: _DOConvNd, name: str) -> Tensor:
    """The (first) tensor holding parameter ``name``'s values: the parameter or the original
    of its parametrization."""
    return _targets(layer, name)[1][0]


def assignment_problem(layer: _DOConvNd) -> Optional[str]:
    """Why values cannot be assigned to the layer's parameters, or None. Meta parameters
    are ``layer._on_meta()``'s to report."""
    held = {name: _targets(layer, name) for name, _ in _parts(layer)}
    for name, (chain, _) in held.items():
        lacking = [type(module).__name__ for module in chain or ()
                   if not hasattr(module, "right_inverse")]
        if lacking:
            return (f"{name} is parametrized by {', '.join(lacking)}, which has no "
                    f"right_inverse, so values cannot be assigned through it; give it one, or "
                    f"load before registering the parametrization")
    if not torch.is_inference_mode_enabled() and any(
            isinstance(target, Tensor) and target.is_inference()
            for _, targets in held.values() for target in targets):
        return ("its parameters are inference tensors (the layer was built under "
                "torch.inference_mode()), which take values only inside inference mode; load "
                "inside `with torch.inference_mode():` or build the layer outside it")
    for name, shape in _parts(layer):
        chain, targets = held[name]
        if chain is None:
            if not isinstance(targets[0], Tensor):
                return (f"{name} is {type(targets[0]).__name__}, not the tensor of shape "
                        f"{shape} the layer's spec gives it")
            got = tuple(targets[0].shape)
        else:
            with torch.no_grad():
                got = tuple(getattr(layer, name).shape)  # what the parametrization makes
        if got != shape:
            return f"{name} has shape {got}, not the {shape} the layer's spec gives it"
    return None


def _describe(values: Any) -> str:
    items = values if isinstance(values, (list, tuple)) else [values]
    return ", ".join(f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor)
                     else type(v).__name__ for v in items)


def staged(layer: _DOConvNd, params: DOConvParams, caller: Optional[str] = None) -> Assignment:
    """Check ``params`` and that ``layer`` can take them and prepare the values, changing
    nothing (a ValueError otherwise, which says ``caller`` cannot fill the layer where one is
    named); returns the assignment, which copies them in place."""
    params = doconv_core.assignable_params(params, layer.spec)
    return staged_tensors(layer, {name: torch.from_numpy(np.ascontiguousarray(
        getattr(params, name))) for name, _ in _parts(layer)}, caller)


def staged_tensors(layer: _DOConvNd, values: dict[str, Tensor],
                   caller: Optional[str] = None) -> Assignment:
    """``staged`` for values of every parameter the layer's spec gives it, as tensors of
    those shapes (any floating dtype and device: each is cast to its target's)."""
    if layer._on_meta():
        raise ValueError(f"{caller or 'set_params'} cannot fill a layer on the meta device; "
                         f"materialise it (layer.to_empty(device=...)) first")
    refused = f"{caller} cannot fill this layer: " if caller else ""
    problem = assignment_problem(layer)
    if problem:
        raise ValueError(refused + problem)
    copies = []
    with torch.no_grad():
        for name, _ in _parts(layer):
            chain, targets = _targets(layer, name)
            copies.extend(zip(targets, _inverted(name, chain, targets, values[name], refused)))

    def assign() -> None:
        with torch.no_grad():
            for target, value in copies:
                target.copy_(value)

    return assign


def _inverted(name: str, chain: Optional[Any], targets: list[Tensor], value: Tensor,
              refused: str = "") -> list[Tensor]:
    """The values ``targets`` take for ``name`` to hold ``value``: cast to their dtype and
    device, through the chain's right_inverse (in reverse, as assigning the parameter runs
    them) where it is parametrized."""
    value = value.to(device=targets[0].device, dtype=targets[0].dtype)
    if chain is None:
        return [value]
    for module in reversed(chain):
        value = module.right_inverse(value)
    held = [value] if len(targets) == 1 and isinstance(value, Tensor) else value
    if not isinstance(held, (list, tuple)) or len(held) != len(targets) or any(
            not isinstance(v, Tensor) or v.shape != t.shape or v.dtype != t.dtype
            for v, t in zip(held, targets)):
        raise ValueError(
            f"{refused}the right_inverse of {name}'s parametrization must return tensors of "
            f"shapes {[tuple(t.shape) for t in targets]} and dtypes "
            f"{[t.dtype for t in targets]}, got {_describe(held)}")
    return list(held)


def state_entries(layer: _DOConvNd, name: str, value: Tensor) -> dict[str, Tensor]:
    """The layer's own state-dict entries (keys without its prefix) that give parameter
    ``name`` the value ``value``: ``name`` itself, or a parametrization's originals
    (through its right_inverse). A ValueError where the parametrization cannot take it."""
    chain, targets = _targets(layer, name)
    if chain is None:
        return {name: value}
    lacking = [type(module).__name__ for module in chain if not hasattr(module, "right_inverse")]
    if lacking:
        raise ValueError(f"{name} is parametrized by {', '.join(lacking)}, which has no "
                         f"right_inverse, so values cannot be assigned through it")
    suffixes = ["original"] if hasattr(chain, "original") else [
        f"original{i}" for i in range(len(targets))]
    with torch.no_grad():
        held = _inverted(name, chain, targets, value)
    return {f"parametrizations.{name}.{suffix}": tensor
            for suffix, tensor in zip(suffixes, held)}


def reset_through_parametrizations(layer: _DOConvNd, bound: float) -> None:
    """``reset_parameters`` of a parametrized layer: in-place draws would land in the
    parametrizations' outputs, so the same numbers are drawn into fresh tensors (each where
    its parameter's values are held) and assigned through the right_inverse."""
    spec = layer.spec

    def empty(name: str, shape: tuple[int, ...]) -> Tensor:
        held = held_tensor(layer, name)
        return torch.empty(shape, dtype=held.dtype, device=held.device)

    values = {"W": init.uniform_(empty("W", spec.W_shape), -bound, bound)}
    if spec.has_D:
        values["D"] = empty("D", spec.D_shape).zero_()
    if spec.bias:
        bias_bound = 1 / math.sqrt(spec.fan_in)
        values["bias"] = init.uniform_(empty("bias", (spec.out_channels,)), -bias_bound,
                                       bias_bound)
    staged_tensors(layer, values, "reset_parameters")()
