"""Assigning values to a DO-Conv layer's parameters: what every path that fills a layer
(``set_params``, ``import_params``, ``load_legacy``, ``from_conv``, ``from_params``) runs.

An assignment is staged first: every check runs and every value is prepared (cast to the
target's dtype and device, passed through a parametrization's ``right_inverse``) while
nothing changes; the assignment itself then only copies in place. A whole-model import
stages every layer before assigning any (``doconv_core.stage_assignments``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parametrize

import doconv_core
from doconv_core import DOConvParams

if TYPE_CHECKING:
    from .layer import _DOConvNd

__all__ = ["assignment_problem", "held_tensor", "parametrized", "staged", "staged_tensors"]

Assignment = Callable[[], None]


def parametrized(layer: _DOConvNd) -> bool:
    """Whether a parameter of the layer is parametrized (torch.nn.utils.parametrize)."""
    return any(parametrize.is_parametrized(layer, name) for name, _ in _parts(layer))


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
            value = values[name].to(device=targets[0].device, dtype=targets[0].dtype)
            if chain is None:
                copies.append((targets[0], value))
                continue
            for module in reversed(chain):  # what assigning layer.<name> = value runs
                value = module.right_inverse(value)
            held = [value] if len(targets) == 1 and isinstance(value, Tensor) else value
            if not isinstance(held, (list, tuple)) or len(held) != len(targets) or any(
                    not isinstance(v, Tensor) or v.shape != t.shape or v.dtype != t.dtype
                    for v, t in zip(held, targets)):
                raise ValueError(
                    f"{refused}the right_inverse of {name}'s parametrization must return "
                    f"tensors of shapes {[tuple(t.shape) for t in targets]} and dtypes "
                    f"{[t.dtype for t in targets]}, got {_describe(held)}")
            copies.extend(zip(targets, held))

    def assign() -> None:
        with torch.no_grad():
            for target, value in copies:
                target.copy_(value)

    return assign
