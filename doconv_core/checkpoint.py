"""All-or-nothing imports: every checkpoint is validated whole before any layer changes.

Each adapter's import reads its source, names the layers it will fill with the spec each
has, checks those layers are ready, and calls ``prepare_import``. That checks everything
(schema, floating dtypes, shapes, layer names, matching specs) and returns the canonical
parameters of every layer; only then does the adapter assign them. Every problem is a
CheckpointError naming the source, the layer and the array.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

from .legacy import LegacyImport, import_legacy_gluon, import_legacy_tf, import_legacy_torch
from .params import CheckpointError, load_params, match_layers
from .spec import ConvSpec

# layout -> (importer, the array names it takes)
_LEGACY = {
    "torch-legacy": (import_legacy_torch, ("W", "D", "bias", "D_diag")),
    "tf-legacy": (import_legacy_tf, ("W", "D", "bias")),
    "gluon-legacy": (import_legacy_gluon, ("weight", "D", "bias")),
}
LAYOUTS = ("portable",) + tuple(_LEGACY)

Source = Union[str, os.PathLike]


def prepare_import(source: Source, targets: Mapping[str, ConvSpec],
                   arrays: Optional[Mapping[str, Mapping[str, Any]]] = None, *,
                   layout: str = "portable") -> dict[str, LegacyImport]:
    """Validate a whole checkpoint against the layers it is to fill; assign nothing.

    ``targets`` maps each layer name to the spec of the layer that will receive it.
    ``layout`` "portable": ``source`` is a file written by ``save_params``; it must hold
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
