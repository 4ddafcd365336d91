"""Gluon block trees: walking them, copying them whole, swapping one child."""

from __future__ import annotations

import copy
from typing import Iterator

import mxnet as mx
from mxnet import autograd, gluon


def walk(block: gluon.Block) -> Iterator[tuple[gluon.Block, str, str, gluon.Block]]:
    """(parent, key, qualified name, child) for every descendant, depth first; a block held
    in several places is yielded at each, its own children only once."""
    seen: set[int] = set()

    def visit(parent: gluon.Block, prefix: str):
        if id(parent) in seen:
            return
        seen.add(id(parent))
        for key, child in list(parent._children.items()):
            name = f"{prefix}{key}"
            yield parent, key, name, child
            yield from visit(child, name + ".")

    return visit(block, "")


def _blocks(block: gluon.Block) -> list[gluon.Block]:
    found = {id(block): block}
    for _, _, _, child in walk(block):
        found.setdefault(id(child), child)
    return list(found.values())


def _arrays(obj: object) -> Iterator[mx.nd.NDArray]:
    """The NDArrays an object holds directly or in a list or tuple attribute."""
    for value in vars(obj).values():
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, mx.nd.NDArray):
                yield item


def copy_block(block: gluon.Block) -> gluon.Block:
    """A deep copy of ``block`` that computes the same, trains on its own and leaves
    ``block`` as it was.

    The same parameter names, contexts, dtypes, settings (grad_req, lr_mult, wd_mult),
    hybridization flags and deferred initialisations; parameters with values are marked for
    autograd anew; compiled graphs, gradients and any Trainer are not copied.
    """
    memo: dict[int, object] = {}
    params = list(block.collect_params().values())
    for part in _blocks(block):
        if isinstance(part, gluon.HybridBlock):
            # A compiled graph holds C handles, which deepcopy cannot copy; the copy compiles
            # its own on its first call (a SymbolBlock's graph is its definition: kept).
            memo[id(part._cached_op)] = None
            if hasattr(part, "_cached_op_args"):
                memo[id(part._cached_op_args)] = []
            if not isinstance(part, gluon.SymbolBlock):
                memo[id(part._cached_graph)] = ()
    gradients = set()
    for param in params:
        if param._trainer is not None:
            memo[id(param._trainer)] = None
        if param._grad is not None:
            memo[id(param._grad)] = None  # recreated below, as for a new parameter
            gradients.update(id(array) for array in param._grad)
    with autograd.pause():
        for owner in _blocks(block) + params:
            for array in _arrays(owner):
                if id(array) not in memo and id(array) not in gradients:
                    # NDArray's own deepcopy goes through bytes and loses the CPU context.
                    memo[id(array)] = array.copy()
    new = copy.deepcopy(block, memo)
    for param in new.collect_params().values():
        req = param.grad_req
        if req != "null" and param._data is not None:
            # Marks the copied arrays for autograd, with new gradient buffers.
            param.grad_req = "null"
            param.grad_req = req
    return new


def replace_child(parent: gluon.Block, key: str, old: gluon.Block, new: gluon.Block) -> None:
    """Swap a child in place: the _children entry and any attribute naming it."""
    parent._children[key] = new
    for attr, value in list(vars(parent).items()):
        if value is old:
            # Block.__setattr__ refuses a change of type; the registry is updated above.
            object.__setattr__(parent, attr, new)
    if getattr(old, "_active", False):
        new.hybridize(True, **dict(getattr(old, "_flags", [])))


def clear_compiled(block: gluon.Block) -> None:
    """Drop every compiled graph under ``block`` (they hold the children they were built
    from)."""
    for part in _blocks(block):
        if isinstance(part, gluon.HybridBlock) and not isinstance(part, gluon.SymbolBlock):
            part._clear_cached_op()
