"""The portable parameter container: D, W, bias and hyper-parameters, saved as safetensors.

Every adapter exports to and imports from it, so a layer (or a whole model, as a
mapping of layer names to parameters) trained in one framework loads in another.
Arrays are stored in the canonical layout. The container is safetensors (format version
3, written by ``doconv_core.tensorfile``): NumPy, PyTorch, TensorFlow, JAX and Flax read
it without doconv, memory-mapped, with the layers' settings as JSON in its metadata.
``.npz`` files (versions 1 and 2) still load, and a path ending in ``.npz`` still writes
one (version 2, for earlier doconv releases). Loading never runs code from the file:
``.npz`` members are read by a strict reader here (plain dtypes only, every size checked
against the archive before anything is allocated), never unpickled.

Arrays are float16, float32, float64 or bfloat16 (``ml_dtypes.bfloat16``, which NumPy
alone lacks). safetensors carries all four; ``.npz`` cannot store bfloat16 (NumPy records
it as raw 2-byte records), so an ``.npz`` file gets bfloat16 arrays widened to float32,
which holds them exactly (earlier releases wrote them so too); safetensors keeps BF16. Reading a bfloat16 file needs ``ml_dtypes`` (a CheckpointError naming it
otherwise).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import struct
import warnings
import zipfile
import zlib
from typing import Any, Mapping, Union

import numpy as np

from .compose import check_params, compose_kernel
from .spec import ConvSpec

FORMAT_NAME = "doconv.params"
# 3: the safetensors container; 2 (.npz) added each layer's rank (1-D, 2-D, 3-D); version 1
# files (.npz) are 2-D.
FORMAT_VERSION = 3
NPZ_VERSION = 2  # what a path ending in .npz gets: the newest .npz version
READABLE_VERSIONS = (1, 2, 3)
_META_KEY = "__doconv_meta__"


class CheckpointError(ValueError):
    """A parameter file or legacy checkpoint that cannot be loaded as asked."""


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (told by name: ml_dtypes is optional)."""
    return dtype.name == "bfloat16"


def is_parameter_dtype(dtype: np.dtype) -> bool:
    """float16, float32, float64 (any NumPy real float) or bfloat16: what parameters hold."""
    return dtype.kind == "f" or is_bfloat16(dtype)


_RaggedWarning = getattr(np, "exceptions", np).VisibleDeprecationWarning


def checkpoint_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a NumPy array of real floating-point numbers (float16, float32,
    float64, or ``ml_dtypes.bfloat16``), else a CheckpointError naming the array: integer,
    boolean, complex, float8, string or object data is never a parameter, and a silent cast
    would hide a corrupt or mismatched file."""
    try:
        with warnings.catch_warnings():
            # NumPy < 1.24 makes an object array of a ragged list, with only this warning.
            warnings.simplefilter("error", _RaggedWarning)
            array = np.asarray(value)
    except (ValueError, TypeError, _RaggedWarning) as error:
        raise CheckpointError(f"{name} cannot be read as an array: {error}") from None
    if not is_parameter_dtype(array.dtype):
        raise CheckpointError(
            f"{name} must hold floating-point numbers (float16, float32 or float64), "
            f"got dtype {array.dtype}"
        )
    return array


def common_dtype(*dtypes: np.dtype) -> np.dtype:
    """The dtype arrays of ``dtypes`` combine to: their own when they agree, else NumPy's
    promotion with bfloat16 taken as float32 (which holds it exactly)."""
    if len(set(dtypes)) == 1:
        return np.dtype(dtypes[0])
    return np.result_type(*(np.float32 if is_bfloat16(np.dtype(d)) else d for d in dtypes))


def working_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype to compute in for arrays of ``dtype``: float32 for the 16-bit floats
    (float16, bfloat16), whose own arithmetic would round every partial sum."""
    return np.dtype(np.float32) if dtype.itemsize < 4 else np.dtype(dtype)


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
        """The composed OIHW kernel, in the parameters' dtype (composed in float32 when that
        is a 16-bit float)."""
        dtype = common_dtype(*(a.dtype for a in (self.W, self.D) if a is not None))
        work = working_dtype(dtype)
        kernel = compose_kernel(None if self.D is None else self.D.astype(work),
                                self.W.astype(work), groups=self.spec.groups,
                                kernel_size=self.spec.kernel_size)
        return kernel.astype(dtype)

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
    them with the layer's spec; bfloat16 arrays come widened to float32 (exactly), since
    no framework takes ml_dtypes arrays, and each adapter casts to its layer's dtype."""
    if not isinstance(params, DOConvParams):
        raise ValueError(f"params must be DOConvParams, got {type(params).__name__}")
    if not params.spec.same_function(spec):
        raise ValueError(f"params.spec must describe this layer's function, {spec}; "
                         f"got {params.spec}")
    arrays = {name: None if array is None else _widen_bfloat16(checkpoint_array(name, array))
              for name, array in (("W", params.W), ("D", params.D), ("bias", params.bias))}
    if spec.in_channels is None:
        spec = spec.with_in_channels(params.spec.in_channels)
    return DOConvParams(spec, arrays["W"], arrays["D"], arrays["bias"])


def _widen_bfloat16(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if is_bfloat16(array.dtype) else array


def _writes_npz(path: Union[str, os.PathLike]) -> bool:
    return os.fsdecode(path).lower().endswith(".npz")


def _check_layers(layers: Any) -> dict[str, DOConvParams]:
    if isinstance(layers, DOConvParams):
        return {"layer": layers}
    if not isinstance(layers, Mapping):
        raise ValueError(f"layers must be DOConvParams or a mapping of layer names to them, "
                         f"got {type(layers).__name__}")
    for name, params in layers.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"layer names must be non-empty strings without '/', got {name!r}")
        if not isinstance(params, DOConvParams):
            raise ValueError(
                f"layers[{name!r}] must be DOConvParams, got {type(params).__name__}"
            )
    return dict(layers)


def _parts(params: DOConvParams) -> dict[str, np.ndarray]:
    return {part: array for part, array in (("W", params.W), ("D", params.D),
                                              ("bias", params.bias)) if array is not None}


def save_params(path: Union[str, os.PathLike], layers: Union[DOConvParams, ParamsMapping]) -> None:
    """Write one layer or a {name: DOConvParams} mapping to ``path``, atomically (``path`` is
    replaced whole or left as it was).

    The container follows the name: a path ending in ``.npz`` gets the version-2 ``.npz``
    that earlier doconv releases read (arrays ``"{layer}/W"``, ``"{layer}/D"``,
    ``"{layer}/bias"`` and one JSON metadata string); every other path gets safetensors,
    format version 3, which NumPy, PyTorch, TensorFlow, JAX and Flax read without doconv:
    tensors ``"{layer}.W"``, ``"{layer}.D"``, ``"{layer}.bias"`` and the metadata
    ``{"format": "doconv.params", "format_version": "3", "layers": JSON {layer: settings}}``.
    Layer names are non-empty strings without '/' (a ValueError before anything is written).
    """
    from .tensorfile import _write_atomic, write_safetensors

    layers = _check_layers(layers)
    specs = {name: params.spec.to_dict() for name, params in layers.items()}
    if _writes_npz(path):
        for name, params in layers.items():
            if "\0" in name:  # zipfile ends a member name at its first NUL
                raise ValueError(f"layer names in an .npz file cannot hold NUL characters, got "
                                 f"{name!r}: save to a .safetensors path")
        meta = {"format": FORMAT_NAME, "version": NPZ_VERSION, "layers": specs}
        # .npz has no bfloat16: widened to float32, exactly (DOConvParams holds floats only).
        arrays = {f"{name}/{part}": array.astype(np.float32) if is_bfloat16(array.dtype)
                  else array for name, params in layers.items()
                  for part, array in _parts(params).items()}
        arrays[_META_KEY] = np.array(json.dumps(meta))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _write_atomic(path, [buffer.getvalue()])
        return
    tensors = {f"{name}.{part}": array for name, params in layers.items()
               for part, array in _parts(params).items()}
    write_safetensors(path, tensors, {"format": FORMAT_NAME,
                                      "format_version": str(FORMAT_VERSION),
                                      "layers": json.dumps(specs)})


def load_params(path: Union[str, os.PathLike]) -> dict[str, DOConvParams]:
    """Read a file written by ``save_params``: safetensors (version 3) or ``.npz`` (versions
    1 and 2), told apart by content, not by name. Returns {layer name: DOConvParams} in the
    file's order. Every problem (missing, truncated, corrupt or foreign file, missing or
    extra arrays, non-floating dtypes, wrong shapes, invalid settings, metadata nested
    deeper than ``tensorfile.MAX_JSON_DEPTH``; bfloat16 without ``ml_dtypes``) is a
    CheckpointError naming the file and, where relevant, the layer and the array; nothing in
    the file is ever executed. Arrays keep their stored dtype (bfloat16 as
    ``ml_dtypes.bfloat16``)."""
    from .tensorfile import is_safetensors

    where = repr(os.fspath(path))
    kind = ".npz" if _writes_npz(path) else "doconv parameter"
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as error:
        raise CheckpointError(f"{where} is not a readable {kind} file: {error}") from None
    if magic.startswith(_NPY_MAGIC):
        raise CheckpointError(f"{where} is a single .npy array, not a doconv .npz file")
    if magic.startswith(b"PK"):
        return _load_npz(path, where)
    if is_safetensors(path):
        return _load_safetensors(path, where)
    # np.load would try it as a pickle and blame allow_pickle: say what it is instead.
    if kind == ".npz":
        raise CheckpointError(f"{where} is not an .npz file (a zip archive); it starts with "
                              f"{magic!r}")
    raise CheckpointError(f"{where} is not a doconv parameter file (safetensors or .npz); it "
                          f"starts with {magic!r}")


def _load_safetensors(path: Union[str, os.PathLike], where: str) -> dict[str, DOConvParams]:
    from .tensorfile import parse_json, read_safetensors, read_safetensors_header

    entries, meta = read_safetensors_header(path)
    if meta.get("format") != FORMAT_NAME:
        found = (f"format {meta['format']!r}" if "format" in meta
                 else f"no 'format' (keys {sorted(meta)})")
        raise CheckpointError(f"{where} is a safetensors file but not a {FORMAT_NAME} file: "
                              f"its metadata has {found}")
    version = meta.get("format_version")
    if version not in {str(v) for v in READABLE_VERSIONS}:
        raise CheckpointError(
            f"{where} has format version {version!r}; this doconv reads versions "
            f"{', '.join(str(v) for v in READABLE_VERSIONS)}"
        )
    if "layers" not in meta:
        raise CheckpointError(f"{where} has no doconv metadata: its metadata has no 'layers'")
    described = parse_json(meta["layers"], where, "has corrupt metadata 'layers'")
    for name, entry in entries.items():
        # Checked before reading: an F8 tensor would otherwise need ml_dtypes only to be
        # refused. Other dtypes are refused below, by layer and array.
        if entry["dtype"] not in _SAFETENSORS_FLOATS and entry["dtype"].startswith("F"):
            raise CheckpointError(f"{where}: tensor {name!r} must hold floating-point numbers "
                                  f"(float16, float32 or float64), got dtype {entry['dtype']}")
    arrays, _ = read_safetensors(path, mmap=False)
    return _build_layers(where, described, arrays, ".")


def _load_npz(path: Union[str, os.PathLike], where: str) -> dict[str, DOConvParams]:
    from .tensorfile import MAX_HEADER_SIZE, parse_json

    arrays = read_npz(path, where)
    if _META_KEY not in arrays:
        raise CheckpointError(f"{where} has no doconv metadata: not a doconv parameter file")
    text = arrays.pop(_META_KEY)
    if text.dtype.kind != "U" or text.shape != () or text.dtype.itemsize > 4 * MAX_HEADER_SIZE:
        raise CheckpointError(f"{where} has corrupt metadata: {_META_KEY} must be one JSON "
                              f"string of at most {MAX_HEADER_SIZE} characters, got "
                              f"dtype {text.dtype} shape {text.shape}")
    meta = parse_json(str(text), where, "has corrupt metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where} is not a {FORMAT_NAME} file")
    version = meta.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # not True, not 2.0
        raise CheckpointError(
            f"{where} has format version {meta.get('version')!r}; this doconv reads versions "
            f"{', '.join(str(v) for v in READABLE_VERSIONS)}"
        )
    return _build_layers(where, meta.get("layers"), arrays, "/")


_SAFETENSORS_FLOATS = ("F16", "BF16", "F32", "F64")
_NPY_MAGIC = b"\x93NUMPY"
# What np.save writes: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } padded.
_NPY_HEADER = re.compile(r"\{'descr': *'([<>|=]?[a-zA-Z]\d{0,9})', *'fortran_order': *"
                         r"(True|False), *'shape': *\(((?: *\d+ *,)*(?: *\d+ *)?)\), *\} *\n?")
_DEFLATE_RATIO = 1032  # deflate's largest expansion: no honest member inflates further
# What reading a hostile zip archive raises (zipfile's own checks, zlib, short reads).
_ZIP_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile,
               NotImplementedError, zlib.error, struct.error)


def read_npz(path: Union[str, os.PathLike], where: str) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` archive ``path`` ({member name without .npy: array}),
    read without NumPy's loader: only .npy members of plain dtypes (no objects, no
    pickles, no structured records), each size checked against what the archive can hold
    before anything is allocated. Every problem is a CheckpointError starting with
    ``where``."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            if len(set(names)) != len(names):
                repeated = sorted({name for name in names if names.count(name) > 1})
                raise CheckpointError(f"{where} is a corrupt .npz file: it holds the members "
                                      f"{repeated} more than once")
            return {info.filename[:-4]: _read_npy_member(archive, info, where)
                    for info in infos}
    except CheckpointError:
        raise
    except _ZIP_ERRORS as error:
        raise CheckpointError(f"{where} is not a readable .npz file: {error}") from None


def _read_npy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str
                     ) -> np.ndarray:
    from .tensorfile import check_numpy_shape

    member = f"{where}: member {info.filename!r}"
    if not info.filename.endswith(".npy"):
        raise CheckpointError(f"{member} is not a .npy array (a doconv .npz file holds .npy "
                              "arrays only)")
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{member} is encrypted")
    if info.compress_type == zipfile.ZIP_STORED:
        holds = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        holds = info.compress_size * _DEFLATE_RATIO + 64
    else:
        raise CheckpointError(f"{member} uses zip compression method {info.compress_type}; "
                              "np.savez writes stored or deflated members only")
    if info.file_size > holds:
        raise CheckpointError(f"{member} claims {info.file_size} bytes, more than its "
                              f"{info.compress_size} stored bytes can hold: a corrupt file")
    data = archive.read(info)
    version = data[6:7]
    if not data.startswith(_NPY_MAGIC) or version not in (b"\x01", b"\x02", b"\x03"):
        raise CheckpointError(f"{member} is not a .npy array (it starts with {data[:8]!r})")
    start = 10 if version == b"\x01" else 12
    if len(data) < start:
        raise CheckpointError(f"{member} is truncated inside its .npy header")
    (size,) = struct.unpack("<H" if version == b"\x01" else "<I", data[8:start])
    header = data[start:start + size].decode("utf-8" if version == b"\x03" else "latin1")
    match = _NPY_HEADER.fullmatch(header)
    if len(header) != size or match is None:
        raise CheckpointError(f"{member} has a .npy header doconv does not read (not what "
                              f"np.save writes): {header[:120]!r}")
    try:
        dtype = np.dtype(match.group(1))
    except (TypeError, ValueError, OverflowError) as error:
        raise CheckpointError(f"{member} has an unknown dtype {match.group(1)!r}: {error}"
                              ) from None
    if dtype.hasobject:
        raise CheckpointError(f"{where} holds an array that cannot be read safely: member "
                              f"{info.filename!r} is an object array, which only unpickling "
                              "could read")
    shape = tuple(int(n) for n in match.group(3).split(",") if n.strip())
    check_numpy_shape(shape, dtype.itemsize, where, info.filename[:-4])
    needed = math.prod(shape) * dtype.itemsize
    if len(data) - start - size != needed:
        raise CheckpointError(f"{member} holds {len(data) - start - size} bytes of data, but "
                              f"its dtype {dtype} and shape {shape} need {needed}")
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start + size)
    return array.reshape(shape, order="F" if match.group(2) == "True" else "C").copy()


def _build_layers(where: str, described: Any, arrays: dict[str, np.ndarray], separator: str
                  ) -> dict[str, DOConvParams]:
    """The layers ``described`` ({name: settings}) with their arrays ``"{name}{separator}
    {part}"``, every array used: the checks both containers share."""
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
            # Looked up by the described name, never by splitting tensor names: layer names
            # hold dots themselves ("features.0").
            key = f"{name}{separator}{part}"
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
