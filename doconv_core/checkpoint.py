"""All-or-nothing imports: every checkpoint is validated whole before any layer changes.

Each adapter's import reads its source, names the layers it will fill with the spec each
has, checks those layers are ready, and calls ``prepare_import``. That checks everything
(schema, floating dtypes, shapes, layer names, matching specs) and returns the canonical
parameters of every layer; only then does the adapter assign them, staging every layer's
assignment before running any (``stage_assignments``: a stage that checks its layer and
prepares the values makes a layer that cannot take them fail the import before anything
changes). Every problem is a CheckpointError naming the source, the layer and the array.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Union

from .legacy import LegacyImport, import_legacy_gluon, import_legacy_tf, import_legacy_torch
from .params import CheckpointError, load_params, match_layers, save_params
from .spec import ConvSpec

# layout -> (importer, the array names it takes)
_LEGACY = {
    "torch-legacy": (import_legacy_torch, ("W", "D", "bias", "D_diag")),
    "tf-legacy": (import_legacy_tf, ("W", "D", "bias")),
    "gluon-legacy": (import_legacy_gluon, ("weight", "D", "bias")),
}
LAYOUTS = ("portable",) + tuple(_LEGACY)

Source = Union[str, os.PathLike]
ROOT_NAME = "layer"  # the name a model that is itself one layer gets in files and messages


def prepare_import(source: Source, targets: Mapping[str, ConvSpec],
                   arrays: Optional[Mapping[str, Mapping[str, Any]]] = None, *,
                   layout: str = "portable") -> dict[str, LegacyImport]:
    """Validate a whole checkpoint against the layers it is to fill; assign nothing.

    ``targets`` maps each layer name to the spec of the layer that will receive it.
    ``layout`` "portable": ``source`` is a file written by ``save_params`` (safetensors, or
    an ``.npz`` of version 1 or 2); it must hold
    exactly the target layers, each saved with a spec of the same function.
    A legacy layout ("torch-legacy", "tf-legacy", "gluon-legacy"): ``arrays`` maps each
    target layer name to its arrays as the original code named them, and ``source``
    describes where they came from (for messages).
    Returns {layer name: LegacyImport} whose ``params`` the adapter assigns; every entry
    of a portable file is exact.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    where = repr(os.fspath(source)) if layout == "portable" else str(source)
    if layout == "portable":
        if arrays is not None:
            raise ValueError("arrays is read from the file for the portable layout; "
                             "pass None")
        stored = load_params(source)
        match_layers(stored, targets, where)
        return {name: LegacyImport(stored[name], True, "identical") for name in targets}
    if arrays is None:
        raise ValueError(f"the {layout} layout needs arrays: {{layer name: {{array: value}}}}")
    missing = sorted(set(targets) - set(arrays))
    extra = sorted(set(arrays) - set(targets))
    if missing or extra:
        raise CheckpointError(f"{where} does not match the model's DO-Conv layers: "
                              f"missing {missing}, unexpected {extra}")
    importer, names = _LEGACY[layout]
    results = {}
    for name, spec in targets.items():
        parts = dict(arrays[name])
        unknown = sorted(set(parts) - set(names))
        if unknown:
            raise CheckpointError(f"{where}: layer {name!r} holds arrays the {layout} layout "
                                  f"does not have: {unknown} (expected some of {list(names)})")
        if names[0] not in parts:
            raise CheckpointError(f"{where}: layer {name!r} is missing its {names[0]} array")
        try:
            results[name] = importer(spec, **parts)
        except CheckpointError as error:
            raise CheckpointError(f"{where}: layer {name!r}: {error}") from None
    return results


def check_state_keys(source: str, expected: Mapping[str, Optional[tuple[int, ...]]],
                     given: Mapping[str, tuple[int, ...]], *, strict: bool
                     ) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys of a native state ``given`` (key -> shape) against the
    model's ``expected`` (key -> shape, None where any shape loads); a CheckpointError
    for a shape mismatch, or for any missing or unexpected key when ``strict``."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{source} does not match the model (strict): missing keys "
                              f"{missing}, unexpected keys {unexpected}")
    for key in sorted(set(expected) & set(given)):
        want, got = expected[key], tuple(given[key])
        if want is not None and tuple(want) != got:
            raise CheckpointError(f"{source}: {key!r} must have shape {tuple(want)} for this "
                                  f"model, got {got}")
    return missing, unexpected


@dataclasses.dataclass
class LegacyLoadReport:
    """What an adapter's ``load_legacy`` did, per DO-Conv layer and for the other keys."""

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


# Spellings the original code also used: the original PyTorch layer saved its D_diag as d_diag.
_ALIASES = {"torch-legacy": {"d_diag": "D_diag"}}


def prepare_legacy(weights: Mapping[str, Any], layers: Mapping[str, ConvSpec], *, layout: str,
                   strict: bool, loads_other_keys: bool,
                   to_array: Callable[[Any], Any] = lambda value: value,
                   source: str = "the legacy checkpoint"
                   ) -> tuple[dict[str, LegacyImport], dict[str, Any], list[str]]:
    """Validate a flat legacy checkpoint for a whole model; assign nothing.

    ``weights`` maps ``f"{layer}.{array}"`` (just ``array`` for a model that is itself one
    layer, named "") to values; ``layers`` maps each DO-Conv layer's qualified name to its
    spec. Each layer takes the arrays the original code named (``layout``'s names) through
    ``to_array``; with ``strict`` every layer must be there, else a layer with none of its
    arrays is skipped and reported missing. ``loads_other_keys``: whether the adapter loads
    the remaining keys natively (PyTorch's BatchNorm and the like); where it cannot, they are
    unexpected (an error when ``strict``). The original layers were 2-D only: arrays for a
    1-D or 3-D layer are a CheckpointError, and so, with ``strict``, is a model holding one;
    otherwise such layers are skipped and reported missing.
    Returns ({layer name, ROOT_NAME for "": LegacyImport}, {other key: value},
    [missing keys]).
    """
    if layout not in _LEGACY:
        raise ValueError(f"layout must be one of {tuple(_LEGACY)}, got {layout!r}")
    if not isinstance(weights, Mapping):
        raise ValueError(f"the legacy weights must be a mapping of names to arrays, got "
                         f"{type(weights).__name__}")
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    names = _LEGACY[layout][1]
    aliases = _ALIASES.get(layout, {})
    # The original layers were 2-D only: no legacy checkpoint holds a 1-D or 3-D layer, so
    # arrays named for one are a mistake, and with ``strict`` so is a model holding one.
    other_ranks = {name: spec for name, spec in layers.items() if spec.rank != 2}
    for name, spec in other_ranks.items():
        prefix = f"{name}." if name else ""
        held = sorted(key for key in weights if isinstance(key, str)
                      and key[len(prefix):] in names + tuple(aliases) and key.startswith(prefix))
        if held:
            raise CheckpointError(
                f"{source} has arrays {held} for layer {name or ROOT_NAME!r}, a {spec.rank}-D "
                "layer: the original DO-Conv layers were 2-D only, so load_legacy loads 2-D "
                "layers only")
    if strict and other_ranks:
        raise CheckpointError(
            f"{source} cannot fill the model's "
            f"{'/'.join(sorted({f'{spec.rank}-D' for spec in other_ranks.values()}))} layers "
            f"{sorted(name or ROOT_NAME for name in other_ranks)}: the original DO-Conv layers "
            "were 2-D only, so load_legacy loads 2-D layers only (pass strict=False to load "
            "those and leave the others as they are)")
    remaining = dict(weights)
    targets: dict[str, ConvSpec] = {}
    stored: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for name, spec in layers.items():
        if name in other_ranks:
            missing.append(f"{name}.{names[0]}" if name else names[0])
            continue
        prefix = f"{name}." if name else ""
        parts = {}
        for part in names + tuple(aliases):
            if prefix + part in remaining:
                parts[aliases.get(part, part)] = to_array(remaining.pop(prefix + part))
        if parts and names[0] not in parts:
            raise CheckpointError(f"{source} has no {prefix + names[0]!r} for layer "
                                  f"{name or ROOT_NAME!r}")
        if not parts:
            if strict:
                raise CheckpointError(f"{source} has no {prefix + names[0]!r} for layer "
                                      f"{name or ROOT_NAME!r}")
            missing.append(prefix + names[0])
            continue
        stored[name or ROOT_NAME] = parts
        targets[name or ROOT_NAME] = spec
    unexpected = sorted(remaining) if not loads_other_keys else []
    if strict and unexpected:
        raise CheckpointError(f"{source} holds keys that are not arrays of this model's "
                              f"DO-Conv layers: {unexpected} (pass strict=False to skip them)")
    results = prepare_import(source, targets, stored, layout=layout) if targets else {}
    return results, remaining, missing


def check_layers_ready(layers: Mapping[str, Any], source: str, ready: Callable[[Any], bool],
                       problem: str) -> None:
    """CheckpointError naming every layer ``ready`` refuses (``problem`` says why and what to
    do), before an import changes anything."""
    waiting = sorted(name for name, layer in layers.items() if not ready(layer))
    if waiting:
        raise CheckpointError(f"cannot load {source}: layers {waiting} {problem}")


def export_layers(path: Source, model: Any, layers: Mapping[str, Any], kind: str) -> None:
    """Every adapter's ``export_params``: ``layers`` maps file names to layers with
    ``to_params()``; a ValueError for a model without any. The file is written atomically
    by ``save_params``: safetensors (format version 3), or the version-2 ``.npz`` that
    earlier releases read when ``path`` ends in ``.npz``."""
    if not layers:
        raise ValueError(f"model has no {kind} layers to export ({type(model).__name__})")
    save_params(path, {name: layer.to_params() for name, layer in layers.items()})


# An import's assignment of one layer: staged (checked, values prepared) before any runs.
Assignment = Callable[[], None]


def _set_params_later(layer: Any, params: Any) -> Assignment:
    return lambda: layer.set_params(params)


def stage_assignments(source: str, layers: Mapping[str, Any], params: Mapping[str, Any],
                      stage: Callable[[Any, Any], Assignment]) -> list[Assignment]:
    """Stage every layer's assignment without changing anything: ``stage(layer, params)``
    checks that the layer can take ``params[name]`` and returns the assignment, or raises a
    ValueError saying why not. A CheckpointError naming every layer that cannot (``source``
    says what was being loaded); else the assignments, in ``layers``' order."""
    assignments, problems = [], {}
    for name, layer in layers.items():
        try:
            assignments.append(stage(layer, params[name]))
        except ValueError as error:
            problems[name] = str(error)
    _raise_layer_problems(source, problems)
    return assignments


def check_layers_assignable(layers: Mapping[str, Any], source: str,
                            problem_of: Callable[[Any], Optional[str]]) -> None:
    """CheckpointError naming every layer with its own reason, ``problem_of(layer)`` (None
    where it can take values), before an import changes anything."""
    _raise_layer_problems(source, {name: problem for name, problem in
                                   ((name, problem_of(layer)) for name, layer in layers.items())
                                   if problem})


def _raise_layer_problems(source: str, problems: Mapping[str, str]) -> None:
    """One CheckpointError; layers with the same problem are named together."""
    if not problems:
        return
    named: dict[str, list[str]] = {}
    for name, problem in problems.items():
        named.setdefault(problem, []).append(name)
    raise CheckpointError(f"cannot load {source}: " + "; ".join(
        f"layer {names[0]!r}: {problem}" if len(names) == 1 else f"layers {names}: {problem}"
        for problem, names in named.items()))


def import_layers(path: Source, layers: Mapping[str, Any], *,
                  stage: Optional[Callable[[Any, Any], Assignment]] = None) -> list[str]:
    """Every adapter's ``import_params`` once its layers are ready: validate the whole file
    against ``layers`` (file name -> layer with ``spec`` and ``set_params``), stage every
    layer's assignment (``stage_assignments``; by default each runs ``layer.set_params``,
    checked only when it runs), then assign. Returns the names loaded, sorted."""
    prepared = prepare_import(path, {name: layer.spec for name, layer in layers.items()})
    assignments = stage_assignments(repr(os.fspath(path)), layers,
                                    {name: prepared[name].params for name in layers},
                                    stage or _set_params_later)
    for assign in assignments:
        assign()
    return sorted(layers)
