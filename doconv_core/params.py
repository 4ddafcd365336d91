"""The portable parameter container: D, W, bias and hyper-parameters, saved as ``.npz``.

Every adapter exports to and imports from it, so a layer (or a whole model, as a
mapping of layer names to parameters) trained in one framework loads in another.
Arrays are stored in the canonical layout; the metadata is one JSON string. Files are
read with ``allow_pickle=False``, so loading never runs code from the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any, Mapping, Union

import numpy as np

from .compose import check_params, compose_kernel
from .spec import ConvSpec

FORMAT_NAME = "doconv.params"
FORMAT_VERSION = 2  # 2 added each layer's rank (1-D, 2-D, 3-D); version 1 files are 2-D
READABLE_VERSIONS = (1, 2)
_META_KEY = "__doconv_meta__"


class CheckpointError(ValueError):
    """A parameter file or legacy checkpoint that cannot be loaded as asked."""


def checkpoint_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a NumPy array of real floating-point numbers, else a CheckpointError
    naming the array: integer, boolean, complex, string or object data is never a
    parameter, and a silent cast would hide a corrupt or mismatched file."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{name} cannot be read as an array: {error}") from None
    if array.dtype.kind != "f":
        raise CheckpointError(
            f"{name} must hold floating-point numbers (float16, float32 or float64), "
            f"got dtype {array.dtype}"
        )
    return array


@dataclasses.dataclass
class DOConvParams:
    """One layer's parameters in the canonical layout (D is None for a 1x1 kernel)."""

    spec: ConvSpec
    W: np.ndarray
    D: np.ndarray | None = None
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, ConvSpec):
            raise ValueError(f"spec must be a ConvSpec, got {type(self.spec).__name__}")
        if self.spec.in_channels is None:
            raise ValueError("spec.in_channels must be known to hold parameters, got None")
        self.W = np.asarray(self.W)
        self.D = None if self.D is None else np.asarray(self.D)
        self.bias = None if self.bias is None else np.asarray(self.bias)
        check_params(self.spec, self.D, self.W, self.bias)

    def kernel(self) -> np.ndarray:
        """The composed OIHW kernel."""
        return compose_kernel(self.D, self.W, groups=self.spec.groups,
                              kernel_size=self.spec.kernel_size)

    def save(self, path: Union[str, os.PathLike]) -> None:
        save_params(path, {"layer": self})

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "DOConvParams":
        layers = load_params(path)
        if len(layers) != 1:
            raise CheckpointError(
                f"{os.fspath(path)!r} holds {len(layers)} layers ({sorted(layers)}); "
                "use load_params for a multi-layer file"
            )
        return next(iter(layers.values()))


ParamsMapping = Mapping[str, DOConvParams]


def assignable_params(params: Any, spec: ConvSpec) -> DOConvParams:
    """``params`` checked for a layer with ``spec``, as every adapter's ``set_params`` does
    before it changes anything: DOConvParams describing the same function, with real
    floating-point arrays of the layer's shapes (a ValueError naming what is wrong). Returns
    them with the layer's spec."""
    if not isinstance(params, DOConvParams):
        raise ValueError(f"params must be DOConvParams, got {type(params).__name__}")
    if not params.spec.same_function(spec):
        raise ValueError(f"params.spec must describe this layer's function, {spec}; "
                         f"got {params.spec}")
    arrays = {name: None if array is None else checkpoint_array(name, array)
              for name, array in (("W", params.W), ("D", params.D), ("bias", params.bias))}
    if spec.in_channels is None:
        spec = spec.with_in_channels(params.spec.in_channels)
    return DOConvParams(spec, arrays["W"], arrays["D"], arrays["bias"])


def save_params(path: Union[str, os.PathLike], layers: Union[DOConvParams, ParamsMapping]) -> None:
    """Write one layer or a {name: DOConvParams} mapping to an ``.npz`` file."""
    if isinstance(layers, DOConvParams):
        layers = {"layer": layers}
    meta: dict = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": {}}
    arrays: dict[str, np.ndarray] = {}
    for name, params in layers.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"layer names must be non-empty strings without '/', got {name!r}")
        if not isinstance(params, DOConvParams):
            raise ValueError(
                f"layers[{name!r}] must be DOConvParams, got {type(params).__name__}"
            )
        meta["layers"][name] = params.spec.to_dict()
        arrays[f"{name}/W"] = params.W
        if params.D is not None:
            arrays[f"{name}/D"] = params.D
        if params.bias is not None:
            arrays[f"{name}/bias"] = params.bias
    arrays[_META_KEY] = np.array(json.dumps(meta))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_params(path: Union[str, os.PathLike]) -> dict[str, DOConvParams]:
    """Read a file written by ``save_params``; every problem is a CheckpointError."""
    where = repr(os.fspath(path))
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as error:
        raise CheckpointError(f"{where} is not a readable .npz file: {error}") from None
    if not magic.startswith((b"PK", b"\x93NUMPY")):
        # np.load would try it as a pickle and blame allow_pickle: say what it is instead.
        raise CheckpointError(f"{where} is not an .npz file (a zip archive); it starts with "
                              f"{magic!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"{where} is not a readable .npz file: {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{where} is a single .npy array, not a doconv .npz file")
    with archive:
        try:
            arrays = {key: archive[key] for key in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
            # allow_pickle=False makes object arrays fail here instead of unpickling.
            raise CheckpointError(f"{where} holds an array that cannot be read safely: {error}"
                                  ) from None
    if _META_KEY not in arrays:
        raise CheckpointError(f"{where} has no doconv metadata: not a doconv parameter file")
    try:
        meta = json.loads(str(arrays.pop(_META_KEY)))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{where} has corrupt metadata: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where} is not a {FORMAT_NAME} file")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where} has format version {meta.get('version')!r}; this doconv reads versions "
            f"{', '.join(str(v) for v in READABLE_VERSIONS)}"
        )
    described = meta.get("layers")
    if not isinstance(described, dict):
        raise CheckpointError(
            f"{where} has invalid metadata: 'layers' must map layer names to settings, "
            f"got {type(described).__name__}"
        )
    layers: dict[str, DOConvParams] = {}
    used: set[str] = set()
    for name, config in described.items():
        if not name or "/" in name:
            raise CheckpointError(f"{where} has invalid metadata: layer names must be "
                                  f"non-empty strings without '/', got {name!r}")
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: layer {name!r} has invalid settings: expected a "
                                  f"mapping, got {type(config).__name__}")
        try:
            spec = ConvSpec.from_dict(config)
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{where}: layer {name!r} has invalid settings: {error}"
                                  ) from None
        found = {}
        for part, required in (("W", True), ("D", spec.has_D), ("bias", spec.bias)):
            key = f"{name}/{part}"
            if key in arrays:
                try:
                    found[part] = checkpoint_array(part, arrays[key])
                except CheckpointError as error:
                    raise CheckpointError(f"{where}: layer {name!r}: {error}") from None
                used.add(key)
            elif required:
                raise CheckpointError(f"{where}: layer {name!r} is missing its {part} array")
        try:
            layers[name] = DOConvParams(spec, found["W"], found.get("D"), found.get("bias"))
        except ValueError as error:
            raise CheckpointError(f"{where}: layer {name!r}: {error}") from None
    extra = set(arrays) - used
    if extra:
        raise CheckpointError(f"{where} holds arrays no layer describes: {sorted(extra)}")
    return layers


def match_layers(stored: Mapping[str, DOConvParams], specs: Mapping[str, ConvSpec],
                 source: str) -> None:
    """Raise CheckpointError unless ``stored`` (from ``load_params``) holds exactly the
    layers named in ``specs``, each saved with a spec of the same function: the check every
    adapter's ``import_params`` makes before it changes anything."""
    missing = sorted(set(specs) - set(stored))
    extra = sorted(set(stored) - set(specs))
    if missing or extra:
        raise CheckpointError(f"{source} does not match the model's DO-Conv layers: "
                              f"missing {missing}, unexpected {extra}")
    for name, spec in specs.items():
        if not stored[name].spec.same_function(spec):
            raise CheckpointError(f"{source}: layer {name!r} was saved with "
                                  f"{stored[name].spec}, the model's layer is {spec}")
