"""Which layers the adapters' whole-model ``convert`` picks: one ``include`` rule for all three.

``include`` is None (every convertible conv), a callable ``(name, layer) -> bool``, or layer-name
patterns: one string or several, matched whole with ``fnmatch`` rules (``*``, ``?``, ``[...]``)
against the qualified name the adapter reports (PyTorch's ``named_modules()`` name, the Keras
layer's name, Gluon's child path such as ``features.0``).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Union

Include = Union[None, str, Iterable[str], Callable[[str, Any], bool]]
LayerFilter = Callable[[str, Any], bool]


def layer_filter(include: Include) -> LayerFilter:
    """``include`` as a predicate on (qualified name, layer); a ValueError for anything else."""
    if include is None:
        return lambda name, layer: True
    if callable(include):
        return lambda name, layer: bool(include(name, layer))
    patterns = [include] if isinstance(include, str) else include
    try:
        patterns = list(patterns)
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise ValueError("include must be None, a callable (name, layer) -> bool, or layer-name "
                         f"patterns (a string or an iterable of strings), got {include!r}")
    return lambda name, layer: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def nothing_to_convert(model: Any, kinds: str, include: Include) -> ValueError:
    """The error ``convert`` raises when it would return a model with nothing converted."""
    which = "" if include is None else f" that include={include!r} selects"
    return ValueError(f"convert found no {kinds}{which} in {type(model).__name__}; "
                      "nothing would change")


def nothing_to_fuse(model: Any, kind: str) -> str:
    """The warning ``fuse`` gives for a model without DO-Conv layers (it returns a copy)."""
    return f"fuse found no {kind} in {type(model).__name__}; it returns an unchanged copy"
