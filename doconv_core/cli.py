"""The ``doconv`` command (also ``python -m doconv_core``): inspect a checkpoint's DO-Conv
layers and fuse them into plain convolutions, without the model's code.

Formats, told apart by content (and OUT's suffix for what to write):

* PyTorch state dicts: ``.pt``/``.pth`` (``torch.load(weights_only=True)``; a training
  checkpoint holding one state dict, e.g. ``{"model": ..., "optimizer": ...}``, is found or
  named with ``--key``) and ``.safetensors``. A DO-Conv layer is the keys ``{layer}.W``,
  ``{layer}.D`` (absent for a kernel of one element), ``{layer}.bias`` and
  ``{layer}._extra_state`` (int64 ``[1, rank, groups, *kernel_size]``, written by doconv_torch
  since it records it; older files lack it, and then ``--kernel-size``/``--rank`` settle the
  kernel's shape: the command never guesses). Fused: ``{layer}.weight`` (C_out, C_in/groups,
  *kernel_size) and ``{layer}.bias``, what nn.Conv1d/2d/3d hold; every other key unchanged,
  in order.
* The portable container (``doconv_core.save_params``: safetensors or ``.npz``). Fused: a
  safetensors file of ``{layer}.weight`` (OIHW) and ``{layer}.bias`` per layer, metadata
  ``{"format": "doconv.fused", "format_version": "1", "layers": JSON {layer: settings}}``.
* Keras ``.keras`` archives (loaded in safe mode with doconv_tf's layers registered, fused
  with ``doconv_tf.fuse``): the output loads with ``keras.models.load_model`` without doconv.
* Gluon parameter files (``save_parameters``/``mx.nd.save``): ``{block}.W``/``.D``/``.bias``
  become ``{block}.weight``/``.bias`` as nn.Conv1D/2D/3D name them. These files record no
  kernel shapes: ``--kernel-size``/``--rank`` give them. An exported model
  (``net.export``: ``PREFIX-0000.params`` with ``--symbol PREFIX-symbol.json``) has them in
  its Convolution nodes; it fuses to ``OUT-0000.params`` and ``OUT-symbol.json``, each conv
  reading a new variable ``{prefix}weight`` instead of the composition of W and D.

Each framework's side lives in its adapter's private ``_fuse_files`` module, imported only
for a file that needs it (doconv_torch's for ``.pt``, doconv_tf's for ``.keras``,
doconv_mx's for ``.params``): the core itself imports no framework, and ``.safetensors`` and
the portable container need NumPy alone. Every problem with a file or the command line is
one line on stderr (``doconv: error: ...``) and a non-zero exit (2: usage, 1: the files);
the output is written to a temporary file and renamed, so it is complete or absent.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import importlib
import json
import math
import os
import re
import sys
import tempfile
import warnings
import zipfile
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

import numpy as np

from .compose import compose_kernel, layer_spec
from .params import CheckpointError, load_params
from .spec import read_extra_state
from .tensorfile import is_safetensors, read_safetensors, read_safetensors_header, write_safetensors

PROG = "doconv"
FUSED_FORMAT = "doconv.fused"
FUSED_VERSION = "1"
EXTRA_STATE = "_extra_state"
_STATE_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "ema")
_GLUON_MAGIC = (0x112).to_bytes(8, "little")  # mx.nd.save's list magic
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

USAGE_ERROR = 2
FILE_ERROR = 1


class UsageError(Exception):
    """A mistake on the command line found after parsing (exit status 2)."""


class _OneLineErrorParser(argparse.ArgumentParser):
    """A user's mistake is one line on stderr and exit status 2, not a usage block. Help is
    wrapped at a fixed width, so the README can show it as it is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _HelpFormatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=88, max_help_position=30)


# -- the layers of a file ---------------------------------------------------------------
@dataclasses.dataclass
class Layer:
    """One DO-Conv layer found in a file, canonical layout: W (C_out, C_in/g, D_mul),
    D (C_in, volume, D_mul) or None, bias (C_out,) or None. ``kernel_size`` and ``groups``
    are None where the file does not say them."""

    name: str
    W: Any
    D: Any = None
    bias: Any = None
    kernel_size: Optional[tuple[int, ...]] = None
    groups: Optional[int] = None
    keys: dict[str, str] = dataclasses.field(default_factory=dict)  # part -> the file's key

    @property
    def volume(self) -> int:
        return 1 if self.D is None else int(self.D.shape[1])

    @property
    def D_mul(self) -> int:
        return int(self.W.shape[2])

    def inferred_groups(self) -> Optional[int]:
        if self.groups is not None:
            return self.groups
        if self.D is not None:
            return int(self.D.shape[0]) // int(self.W.shape[1])
        return None

    def training_count(self) -> int:
        return sum(int(np.prod(a.shape)) for a in (self.W, self.D, self.bias) if a is not None)

    def fused_count(self) -> int:
        C_out, I_g = int(self.W.shape[0]), int(self.W.shape[1])
        return C_out * I_g * self.volume + (0 if self.bias is None else C_out)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


def _parse_kernel(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if not values or len(values) > 3 or min(values) < 1:
        raise UsageError(f"--kernel-size: {text!r} is not a kernel shape such as 3, 3x3, "
                         "1x5 or 3x3x3")
    return values


@dataclasses.dataclass
class KernelOptions:
    """What the command line says about kernel shapes the file does not record."""

    rank: Optional[int] = None
    # kernel volume -> the shape of every layer of that volume (--kernel-size without LAYER=)
    by_volume: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    per_layer: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "KernelOptions":
        options = cls(rank=getattr(args, "rank", None))
        for entry in getattr(args, "kernel_size", None) or ():
            name, sep, shape = entry.rpartition("=")
            if sep and not name:
                raise UsageError(f"--kernel-size: {entry!r} names no layer (LAYER=SHAPE)")
            kernel = _parse_kernel(shape)
            volume = math.prod(kernel)
            if sep:
                options.per_layer[name] = kernel
            elif options.by_volume.get(volume, kernel) != kernel:
                raise UsageError(f"--kernel-size: {_shape_text(options.by_volume[volume])} and "
                                 f"{_shape_text(kernel)} both claim every layer of "
                                 f"{volume} element(s); name the layers (LAYER=SHAPE)")
            else:
                options.by_volume[volume] = kernel
        return options

    def settle(self, layers: list[Layer], where: str) -> None:
        """Give every layer its kernel shape from the file, else from these options; a
        CheckpointError naming the layer and the option for a layer neither settles."""
        names = {layer.name for layer in layers}
        unknown = sorted(set(self.per_layer) - names)
        if unknown:
            raise CheckpointError(f"--kernel-size names {unknown}, which {where} has no "
                                  f"DO-Conv layer for (its layers: {sorted(names)})")
        for layer in layers:
            given = self.per_layer.get(layer.name)
            if layer.kernel_size is not None:
                if given is not None and given != layer.kernel_size:
                    raise CheckpointError(
                        f"layer {layer.name!r}: --kernel-size {_shape_text(given)} contradicts "
                        f"the {_shape_text(layer.kernel_size)} kernel {where} records")
                continue
            if given is None:
                given = self.by_volume.get(layer.volume)
            if given is None and self.rank is not None:
                given = _regular_kernel(layer.volume, self.rank)
            if given is None:
                raise CheckpointError(self._ambiguous(layer, where))
            if math.prod(given) != layer.volume:
                raise CheckpointError(
                    f"layer {layer.name!r}: --kernel-size {_shape_text(given)} has "
                    f"{math.prod(given)} elements, but its D holds kernels of {layer.volume}")
            layer.kernel_size = given

    def _ambiguous(self, layer: Layer, where: str) -> str:
        rank = self.rank or 2
        example = _regular_kernel(layer.volume, rank) or (1,) * (rank - 1) + (layer.volume,)
        why = (f"{where} does not record its kernel's shape (a checkpoint saved before doconv "
               f"recorded it, or a format that never does), and a kernel of {layer.volume} "
               f"element(s) may be ")
        if self.rank is not None:
            why += f"any {self.rank}-D shape of that volume, not only a regular one"
        else:
            why += "1-D, 2-D or 3-D"
        # A state dict of one bare layer (keys W, D) has no name to put before '='.
        target = f"{layer.name}=" if layer.keys.get("prefix", "-") else ""
        return (f"layer {layer.name!r}: {why}; say which with --kernel-size "
                f"{target}{_shape_text(example)} (or --rank N for square/cubic kernels "
                "of every such layer)")


def _regular_kernel(volume: int, rank: int) -> Optional[tuple[int, ...]]:
    """The square (rank 2) or cubic (rank 3) kernel of ``volume`` elements, if there is one."""
    side = round(volume ** (1 / rank))
    for candidate in (side - 1, side, side + 1):
        if candidate >= 1 and candidate ** rank == volume:
            return (candidate,) * rank
    return None


def _extra_state_kernel(value: np.ndarray, name: str, where: str
                        ) -> tuple[tuple[int, ...], int]:
    """(kernel_size, groups) from a DO-Conv layer's extra state (the core's record)."""
    values = np.asarray(value)
    try:
        if values.dtype.kind not in "iu" or values.ndim != 1:
            raise ValueError(f"an extra-state record must be a 1-D integer tensor, got "
                             f"{values.dtype} of shape {values.shape}")
        _, groups, kernel_size = read_extra_state(values.tolist())
    except ValueError as error:
        raise CheckpointError(f"{where}: {name!r} is not a DO-Conv extra state: {error}"
                              ) from None
    return kernel_size, groups


def _part(to_numpy: Callable[[Any], np.ndarray], value: Any, key: str, where: str
          ) -> np.ndarray:
    """A file's tensor as NumPy, or a CheckpointError naming it (a sparse or meta tensor,
    one that holds no data)."""
    try:
        return to_numpy(value)
    except Exception as error:  # each framework raises its own types for such tensors
        reason = str(error) if type(error) is ValueError else _first_line(error)
        raise CheckpointError(f"{where}: {key!r} cannot be read as an array: {reason}"
                              ) from None


def find_layers(entries: "collections.OrderedDict[str, Any]", shape_of: Callable[[Any], tuple],
                to_numpy: Callable[[Any], np.ndarray], where: str) -> list[Layer]:
    """The DO-Conv layers of a flat state dict ({key: tensor}): each ``{prefix}W`` that is
    3-D and comes with a ``{prefix}D`` or a DO-Conv extra state, or is (C_out, I, 1) with no
    ``{prefix}weight`` beside it (a layer with a kernel of one element)."""
    layers = []
    for key in entries:
        if not isinstance(key, str) or not (key == "W" or key.endswith(".W")):
            continue
        prefix = key[:-1]
        W = entries[key]
        shape = shape_of(W)
        if shape is None or len(shape) != 3:
            continue
        extra = entries.get(prefix + EXTRA_STATE)
        D = entries.get(prefix + "D")
        is_doconv = D is not None or extra is not None or \
            (shape[2] == 1 and prefix + "weight" not in entries)
        if not is_doconv:
            continue
        name = prefix[:-1] if prefix else ""
        label = name or "(the root module)"
        for part, value in (("D", D), ("bias", entries.get(prefix + "bias")), ("extra", extra)):
            if value is not None and shape_of(value) is None:
                part_key = prefix + (EXTRA_STATE if part == "extra" else part)
                raise CheckpointError(f"{where}: {part_key!r} is a {type(value).__name__}, "
                                      f"not a tensor: layer {label!r} cannot be read (save the "
                                      "state dict the layer's state_dict() returns)")
        layer = Layer(label, _part(to_numpy, W, key, where), keys={"W": key})
        if D is not None:
            layer.D = _part(to_numpy, D, prefix + "D", where)
            layer.keys["D"] = prefix + "D"
        bias = entries.get(prefix + "bias")
        if bias is not None:
            layer.bias = _part(to_numpy, bias, prefix + "bias", where)
            layer.keys["bias"] = prefix + "bias"
        if extra is not None:
            layer.kernel_size, layer.groups = _extra_state_kernel(
                _part(to_numpy, extra, prefix + EXTRA_STATE, where), prefix + EXTRA_STATE,
                where)
            layer.keys["extra"] = prefix + EXTRA_STATE
        layer.keys["prefix"] = prefix
        _check_layer(layer, where)
        layers.append(layer)
    return layers


def _is_float(dtype: np.dtype) -> bool:
    """float16/32/64, and bfloat16 (an ml_dtypes dtype NumPy itself lacks)."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _check_layer(layer: Layer, where: str) -> None:
    """The layer is one the layers themselves accept (the core's ``layer_spec``: shapes,
    D_mul, channels, groups, the recorded kernel), holding floating-point numbers."""
    for part in ("W", "D", "bias"):
        array = getattr(layer, part)
        if array is not None and not _is_float(np.asarray(array).dtype):
            raise CheckpointError(f"{where}: layer {layer.name!r}: {part} must hold "
                                  "floating-point numbers (float16, bfloat16, float32, float64), "
                                  f"got dtype {array.dtype}")
    try:
        layer_spec(layer.W.shape, None if layer.D is None else layer.D.shape,
                   None if layer.bias is None else layer.bias.shape,
                   kernel_size=layer.kernel_size, groups=layer.groups)
    except ValueError as error:
        raise CheckpointError(f"{where}: layer {layer.name!r} is not a valid DO-Conv layer: "
                              f"{error} (doconv's layers refuse it, so no doconv layer saved "
                              "this file as it is)") from None


def fused_kernel(layer: Layer) -> np.ndarray:
    """The layer's plain (C_out, C_in/groups, *kernel_size) kernel, in W's dtype (composed
    in float32 for 16-bit floats, float16 and bfloat16 alike, whatever the file format)."""
    W = np.asarray(layer.W)
    dtype = W.dtype
    work = np.float32 if dtype.itemsize < 4 else dtype
    D = None if layer.D is None else np.asarray(layer.D, dtype=work)
    groups = layer.inferred_groups() or 1  # a kernel of one element: the weight is W itself
    # A file's inf or nan, or a sum beyond a 16-bit float's range, gives inf or nan in the
    # kernel as it would in the layer: no warning lines.
    with np.errstate(over="ignore", invalid="ignore"):
        kernel = compose_kernel(D, W.astype(work), groups=groups, kernel_size=layer.kernel_size)
        return kernel.astype(dtype)


def fuse_entries(entries: "collections.OrderedDict[str, Any]", layers: list[Layer],
                 to_native: Callable[[np.ndarray, Any], Any]) -> "collections.OrderedDict":
    """``entries`` with each layer's W, D, extra state replaced by ``{prefix}weight`` (where
    W was) and ``{prefix}bias`` kept; every other key unchanged, in order. ``to_native``
    turns a fused kernel into the file's tensor type, given the original W."""
    by_key = {layer.keys["W"]: layer for layer in layers}
    dropped = {layer.keys[part] for layer in layers for part in ("D", "extra")
               if part in layer.keys}
    fused = collections.OrderedDict()
    for key, value in entries.items():
        if key in by_key:
            layer = by_key[key]
            weight_key = layer.keys["prefix"] + "weight"
            if weight_key in entries:
                raise CheckpointError(f"layer {layer.name!r}: the file already holds "
                                      f"{weight_key!r} beside its W")
            fused[weight_key] = to_native(fused_kernel(layer), value)
        elif key not in dropped:
            fused[key] = value
    return fused


# -- reading ----------------------------------------------------------------------------
def detect_format(path: str) -> str:
    """'torch', 'safetensors' (a state dict), 'portable', 'keras' or 'gluon', from the
    file's content; a CheckpointError for a missing, unreadable or unknown file."""
    where = repr(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except FileNotFoundError:
        raise CheckpointError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{where} is a directory, not a checkpoint file") from None
    except OSError as error:
        raise CheckpointError(f"{where} cannot be read: {error.strerror or error}") from None
    if not head:
        raise CheckpointError(f"{where} is empty")
    if is_safetensors(path):
        _, metadata = read_safetensors_header(path)
        return "portable" if metadata.get("format") == "doconv.params" else "safetensors"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        # zipfile raises NotImplementedError for a version or compression it lacks.
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError,
                RuntimeError) as error:
            raise CheckpointError(f"{where} is a truncated or corrupt zip archive: "
                                  f"{_first_line(error)}") from None
        if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
            return "keras"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if "__doconv_meta__.npy" in names:
            return "portable"
        raise CheckpointError(f"{where} is a zip archive of none of the formats doconv reads "
                              f"(a .keras archive, a torch.save file, a doconv .npz); it holds "
                              f"{names[:5]}")
    if head.startswith(b"\x80") and path.lower().endswith(_TORCH_SUFFIXES):
        return "torch"  # torch.save's legacy (non-zip) format: a pickle
    if head.startswith(_GLUON_MAGIC):
        return "gluon"
    raise CheckpointError(f"{where} is in an unknown format (doconv reads PyTorch .pt/.pth, "
                          f".safetensors, the doconv container, Keras .keras and Gluon .params "
                          f"files); it starts with {head[:8]!r}")


@dataclasses.dataclass
class StateFile:
    """A flat state dict read from a file: entries in order, the DO-Conv layers among them,
    and how to write it back."""

    kind: str  # "torch", "safetensors", "gluon"
    entries: "collections.OrderedDict[str, Any]"
    layers: list[Layer]
    metadata: dict[str, str]
    note: str = ""  # what was chosen in a nested checkpoint
    other: list[str] = dataclasses.field(default_factory=list)  # entries beside the state


def _first_line(error: BaseException) -> str:
    """The error's type and its first line that says something: MXNet's messages start
    with a traceback of its C++ frames ("Traceback (most recent call last):", indented
    "File ..." lines) before the line that says what is wrong."""
    name = type(error).__name__
    for line in str(error).strip().splitlines():
        text = line.strip()
        if not text or line[:1].isspace() or text.startswith(("Traceback (most recent",
                                                               "File \"", "[bt]",
                                                               "Stack trace")):
            continue
        return text if text.startswith(name + ":") else f"{name}: {text}"
    return name


# The frameworks' sides of the command live in each adapter's private ``_fuse_files``,
# imported only for a file that needs them: the core imports no framework.
def _adapter_files(adapter: str, where: str, kind: str, install: str) -> Any:
    """``adapter``'s ``_fuse_files`` module, or a CheckpointError saying what to install."""
    try:
        return importlib.import_module(f"{adapter}._fuse_files")
    except ImportError as error:
        raise CheckpointError(f"{where} is a {kind}; reading it needs {install}: "
                              f"{_first_line(error)}") from None


def _torch_files(where: str) -> Any:
    return _adapter_files("doconv_torch", where, "PyTorch file", "torch (pip install torch)")


def _mx_files(where: str) -> Any:
    return _adapter_files("doconv_mx", where, "Gluon parameter file",
                          "mxnet (pip install 'mxnet<2')")


def _keras_files(where: str) -> Any:
    # TensorFlow's C++ start-up messages would bury the command's one line on stderr.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _quiet_stderr():
        return _adapter_files("doconv_tf", where, "Keras archive",
                              "keras and a backend (pip install 'doconv[tf]')")


def read_torch(path: str, key: Optional[str]) -> StateFile:
    where = repr(path)
    files = _torch_files(where)
    with warnings.catch_warnings(record=True) as caught:  # never lines of their own
        warnings.simplefilter("always")
        try:
            loaded = files.load(path)
        except Exception as error:  # torch raises many types for truncated or foreign files
            raise CheckpointError(_torch_load_problem(where, error, caught)) from None
    note = ""
    other: list[str] = []
    if key is not None:
        if not isinstance(loaded, dict) or key not in loaded:
            held = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
            raise CheckpointError(f"{where} has no entry {key!r} (--key); it holds {held}")
        if not files.is_state_dict(loaded[key]):
            raise CheckpointError(f"{where}: entry {key!r} (--key) is not a state dict of "
                                  "tensors")
        other = [str(k) for k in loaded if k != key]
        note = f"the state dict under {key!r}"
        loaded = loaded[key]
    elif isinstance(loaded, dict) and not files.is_state_dict(loaded):
        nested = [k for k, v in loaded.items() if files.is_state_dict(v)]
        with_layers = [k for k in nested if find_layers(
            collections.OrderedDict(loaded[k]), files.shape, files.to_numpy, where)]
        chosen = with_layers or [k for k in nested if k in _STATE_KEYS]
        if len(chosen) != 1:
            raise CheckpointError(
                f"{where} is a checkpoint holding {sorted(map(str, loaded))}, not a state dict; "
                + (f"name the state dict to fuse with --key (one of {sorted(map(str, nested))})"
                   if nested else "none of its entries is a state dict of tensors"))
        key = chosen[0]
        other = [str(k) for k in loaded if k != key]
        note = (f"the state dict under {key!r} (the file also holds {other}; the output "
                "holds the fused state dict only)")
        loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{where} holds a {type(loaded).__name__}, not a state dict")
    entries = collections.OrderedDict(loaded)
    bad = [k for k in entries if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{where}{' under ' + repr(key) if key is not None else ''} "
                              f"is a state dict with keys that are not strings: "
                              f"{[repr(k) for k in bad[:3]]}; a state dict maps parameter "
                              "names (str) to tensors")
    layers = find_layers(entries, files.shape, files.to_numpy, where)
    return StateFile("torch", entries, layers, {}, note, other)


def _torch_load_problem(where: str, error: Exception, caught: list) -> str:
    """What to say when torch.load(weights_only=True) fails: torch's own detail where it
    gives one (the pickle opcode its safe unpickler refuses), and the pickle protocol its
    warning reports (a file saved with pickle_protocol > 2)."""
    text = str(error)
    detail = re.search(r"WeightsUnpickler error: \s*(.+?)\s*(\n\n|$)", text, re.S)
    reason = " ".join(detail.group(1).split()) if detail else _first_line(error)
    protocol = next((re.search(r"pickle protocol (\d+)", str(w.message)) for w in caught
                     if re.search(r"pickle protocol (\d+)", str(w.message))), None)
    if protocol is not None:
        return (f"{where} cannot be read by torch.load(weights_only=True): it was saved with "
                f"pickle protocol {protocol.group(1)}, which that loader does not fully read "
                f"({reason}); save it again with torch.save's default protocol")
    return (f"{where} cannot be read by torch.load(weights_only=True) (truncated, corrupt, "
            f"or holding objects that are not tensors): {reason}")


def read_safetensors_state(path: str) -> StateFile:
    arrays, metadata = read_safetensors(path, mmap=False)
    entries = collections.OrderedDict(arrays)
    layers = find_layers(entries, lambda a: tuple(a.shape), np.asarray, repr(path))
    return StateFile("safetensors", entries, layers, metadata)


def read_gluon(path: str) -> StateFile:
    where = repr(path)
    files = _mx_files(where)
    try:
        loaded = files.load(path)
    except Exception as error:  # MXNetError for truncated or corrupt files
        raise CheckpointError(f"{where} cannot be read by mx.nd.load (truncated or corrupt; "
                              f"save it again with save_parameters): {_first_line(error)}"
                              ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{where} holds a list of unnamed arrays, not a Gluon "
                              "parameter file (save_parameters)")
    entries = collections.OrderedDict(loaded)
    layers = find_layers(entries, files.shape, files.to_numpy, where)
    return StateFile("gluon", entries, layers, {})


def read_gluon_exported(path: str, symbol: str) -> tuple[StateFile, dict]:
    """An exported Gluon model (``net.export``: ``arg:``/``aux:`` parameters and the symbol
    JSON): each Convolution node ``{prefix}fwd`` fed by ``{prefix}W`` is a DO-Conv layer whose
    kernel and groups the node's attributes give. Returns the state and the symbol graph."""
    state = read_gluon(path)
    to_numpy = _mx_files(repr(path)).to_numpy
    graph = _read_symbol(symbol)
    entries = state.entries
    layers = []
    for node in graph["nodes"]:
        name = node.get("name", "")
        if node.get("op") != "Convolution" or not name.endswith("fwd"):
            continue
        prefix = name[:-3]
        if f"arg:{prefix}W" not in entries:
            continue
        attrs = node.get("attrs") or node.get("attr") or {}
        try:
            kernel = tuple(int(k) for k in attrs["kernel"].strip("()[] ").split(",") if k.strip())
            groups = int(attrs.get("num_group", "1"))
            if not 1 <= len(kernel) <= 3:
                raise ValueError(kernel)
        except (KeyError, ValueError):
            raise CheckpointError(f"{symbol!r}: node {name!r} has no readable kernel/num_group "
                                  "attributes") from None
        layer = Layer(prefix.rstrip("_") or prefix, to_numpy(entries[f"arg:{prefix}W"]),
                      kernel_size=kernel, groups=groups,
                      keys={"W": f"arg:{prefix}W", "prefix": f"arg:{prefix}"})
        for part in ("D", "bias"):
            if f"arg:{prefix}{part}" in entries:
                setattr(layer, part, to_numpy(entries[f"arg:{prefix}{part}"]))
                layer.keys[part] = f"arg:{prefix}{part}"
        _check_layer(layer, repr(path))
        layers.append(layer)
    state.layers = layers
    return state, graph


def _read_symbol(symbol: str) -> dict:
    try:
        with open(symbol, encoding="utf-8") as handle:
            graph = json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"--symbol {symbol!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"--symbol {symbol!r} is not a readable symbol JSON file: "
                              f"{error}") from None
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list) or \
            not isinstance(graph.get("heads"), list):
        raise CheckpointError(f"--symbol {symbol!r} is not an MXNet symbol file (no nodes and "
                              "heads)")
    problem = _graph_problem(graph)
    if problem:
        raise CheckpointError(f"--symbol {symbol!r} is a malformed symbol graph: {problem} "
                              "(pass the PREFIX-symbol.json net.export wrote)")
    return graph


def _graph_problem(graph: dict) -> Optional[str]:
    """What makes ``graph`` (nodes and heads) unfit for fusing, or None: every node an object
    with string name and op, string attributes, inputs and heads that name earlier nodes."""
    count = len(graph["nodes"])

    def is_entry(entry: Any, below: int) -> bool:
        return isinstance(entry, list) and 2 <= len(entry) <= 3 and \
            all(isinstance(n, int) and not isinstance(n, bool) for n in entry) and \
            0 <= entry[0] < below
    for index, node in enumerate(graph["nodes"]):
        if not isinstance(node, dict) or not isinstance(node.get("name"), str) or \
                not isinstance(node.get("op"), str):
            return f"node {index} is not an object with a string name and op"
        attrs = node.get("attrs", node.get("attr", {}))
        if not isinstance(attrs, dict) or not all(isinstance(v, str) for v in attrs.values()):
            return f"node {node['name']!r} has attributes that are not strings"
        inputs = node.get("inputs", [])
        if not isinstance(inputs, list) or not all(is_entry(e, count) for e in inputs):
            return f"node {node['name']!r} has inputs that are not [node, output] pairs"
    if not all(is_entry(head, count) for head in graph["heads"]):
        return "its heads are not [node, output] pairs"
    return None


def fused_symbol(graph: dict, layers: list[Layer]) -> dict:
    """``graph`` with each layer's Convolution reading a new variable ``{prefix}weight``
    instead of the composition of W and D; the composition's nodes, now unused, are left
    out."""
    nodes = graph["nodes"]
    convs = {layer.keys["prefix"][len("arg:"):] + "fwd": layer for layer in layers}
    order: list[dict] = []
    new_index: dict[int, int] = {}
    added: dict[int, int] = {}  # conv's old index -> its weight variable's new index
    for index, node in enumerate(nodes):
        layer = convs.get(node.get("name"))
        if layer is not None:
            weight = {"op": "null", "name": layer.keys["prefix"][len("arg:"):] + "weight",
                      "attrs": {"__shape__": str(tuple(int(n) for n in
                                                      (*layer.W.shape[:2], *layer.kernel_size))),
                                "__dtype__": "0", "__storage_type__": "0"},
                      "inputs": []}
            added[index] = len(order)
            order.append(weight)
        new_index[index] = len(order)
        order.append(dict(node))
    for index, node in enumerate(nodes):
        inputs = [list(entry) for entry in node.get("inputs", [])]
        if index in added:
            inputs[1] = [added[index], 0, 0]
            for entry in inputs[:1] + inputs[2:]:
                entry[0] = new_index[entry[0]]
        else:
            for entry in inputs:
                entry[0] = new_index[entry[0]]
        order[new_index[index]]["inputs"] = inputs
    heads = [[new_index[h[0]], *h[1:]] for h in graph["heads"]]
    # Keep only what the outputs reach (W, D and the composition drop out).
    reachable: set[int] = set()
    stack = [h[0] for h in heads]
    while stack:
        index = stack.pop()
        if index not in reachable:
            reachable.add(index)
            stack.extend(entry[0] for entry in order[index]["inputs"])
    kept = sorted(reachable)
    final = {old: new for new, old in enumerate(kept)}
    pruned = []
    for old in kept:
        node = dict(order[old])
        node["inputs"] = [[final[e[0]], *e[1:]] for e in node["inputs"]]
        pruned.append(node)
    result = {key: value for key, value in graph.items()
              if key not in ("nodes", "heads", "arg_nodes", "node_row_ptr")}
    result["nodes"] = pruned
    result["arg_nodes"] = [i for i, node in enumerate(pruned) if node["op"] == "null"]
    result["heads"] = [[final[h[0]], *h[1:]] for h in heads]
    return result


def _symbol_output(out: str) -> str:
    match = re.fullmatch(r"(.*)-\d{4}\.params", out)
    if not match:
        raise UsageError(f"with --symbol, OUT must be named like net.export's parameters "
                         f"(PREFIX-0000.params), so that PREFIX-symbol.json goes beside it; "
                         f"got {out!r}")
    return f"{match.group(1)}-symbol.json"


def read_state(path: str, kind: str, key: Optional[str]) -> StateFile:
    if key is not None and kind != "torch":
        raise UsageError(f"--key applies to PyTorch .pt/.pth checkpoints; {path!r} is "
                         f"{_KIND_WORDS[kind]}")
    if kind == "torch":
        return read_torch(path, key)
    if kind == "safetensors":
        return read_safetensors_state(path)
    return read_gluon(path)


_KIND_WORDS = {
    "torch": "a PyTorch checkpoint (torch.load)",
    "safetensors": "a safetensors state dict",
    "portable": "a doconv parameter container",
    "keras": "a Keras .keras archive",
    "gluon": "a Gluon parameter file",
}


# -- writing ----------------------------------------------------------------------------
def _temporary(out: str) -> str:
    """A new empty file beside ``out`` with the same suffix (Keras insists on .keras)."""
    directory = os.path.dirname(os.path.abspath(out))
    base = os.path.basename(out)
    suffix = os.path.splitext(base)[1]
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{base}.",
                                             suffix=f".tmp{suffix}")
    os.close(descriptor)
    return temporary


def write_atomic(out: str, write: Callable[[str], None]) -> None:
    """``write(temporary path)`` then rename over ``out``; the temporary file is removed on
    any failure, so ``out`` is complete or as it was."""
    try:
        temporary = _temporary(out)
    except OSError as error:
        raise CheckpointError(_write_problem(out, error)) from None
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, out)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(error, CheckpointError) or not isinstance(error, Exception):
            raise
        # The frameworks' writers report a full disk in their own types (torch's
        # RuntimeError "file write failed", MXNetError, h5py's OSError).
        raise CheckpointError(_write_problem(out, error)) from None


def _write_problem(out: str, error: BaseException) -> str:
    """What to say when writing ``out`` failed: the reason, never the temporary file's name,
    and what to do."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = _first_line(error)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free some space or write OUT elsewhere"
    elif isinstance(error, PermissionError):
        advice = "write OUT where you may create files"
    else:
        advice = "check that its directory has space and can be written"
    return f"cannot write {out!r}: {reason}; {advice} (nothing was written)"


def _output_kind(out: str) -> str:
    lower = out.lower()
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith(_TORCH_SUFFIXES):
        return "torch"
    if lower.endswith(".keras"):
        return "keras"
    if lower.endswith(".params"):
        return "gluon"
    raise UsageError(f"OUT {out!r} has no known suffix: .safetensors, .pt/.pth (PyTorch), "
                     ".keras or .params (Gluon) say what to write")


_OUTPUTS = {  # the input's kind -> the output kinds it can become
    "torch": ("torch", "safetensors"),
    "safetensors": ("safetensors", "torch"),
    "portable": ("safetensors", "torch"),
    "keras": ("keras",),
    "gluon": ("gluon",),
}


def _numpy_entries(entries: dict[str, Any], out: str) -> dict[str, np.ndarray]:
    """Every entry as a NumPy array for a safetensors file; a CheckpointError for one that
    is not a tensor (safetensors holds tensors only)."""
    arrays = {}
    for key, value in entries.items():
        if isinstance(value, np.ndarray):
            arrays[key] = value
            continue
        if type(value).__module__.startswith("torch"):
            try:
                array = _torch_files(repr(out)).safetensors_array(value)
            except ImportError:
                raise CheckpointError(f"{key!r} is bfloat16; writing it to {out!r} needs "
                                      "ml_dtypes (or write a .pt file)") from None
            except ValueError as error:  # a sparse or meta tensor
                raise CheckpointError(f"{key!r} cannot be written to {out!r}: {error}; "
                                      "write a .pt file instead") from None
            if array is not None:
                arrays[key] = array
                continue
        raise CheckpointError(f"{key!r} is a {type(value).__name__}, not a tensor: a "
                              f"safetensors file cannot hold it; write a .pt file instead")
    return arrays


def write_state(out: str, kind: str, entries: dict[str, Any], metadata: dict[str, str]
                ) -> None:
    """Write a flat state dict as ``kind`` ('torch' or 'safetensors')."""
    if kind == "safetensors":
        arrays = _numpy_entries(entries, out)
        try:
            write_safetensors(out, arrays, metadata or None)
        except ValueError as error:
            raise CheckpointError(f"cannot write {out!r}: {error}") from None
        except OSError as error:  # it names its temporary file; say OUT
            raise CheckpointError(_write_problem(out, error)) from None
        return
    files = _torch_files(repr(out))
    try:
        tensors = files.to_tensors(entries)
    except ValueError as error:
        raise CheckpointError(f"cannot write {out!r}: {error}; write a .safetensors file "
                              "instead") from None
    write_atomic(out, lambda temporary: files.save(temporary, tensors))


def _torch_like(kernel: np.ndarray, original: Any) -> Any:
    """A fused kernel as the original W's type: a torch tensor of its dtype, else NumPy."""
    if type(original).__module__.startswith("torch"):
        return _torch_files("the output").like(kernel, original)
    return np.array(kernel, order="C")


# -- the portable container ---------------------------------------------------------------
def read_portable(path: str) -> tuple[list[Layer], dict]:
    """The container's layers (kernels known: the container records every setting)."""
    stored = load_params(path)
    layers = []
    for name, params in stored.items():
        layers.append(Layer(name, params.W, params.D, params.bias, params.spec.kernel_size,
                            params.spec.groups))
    return layers, {name: params.spec for name, params in stored.items()}


def fuse_portable(path: str, out: str, out_kind: str) -> list[Layer]:
    layers, specs = read_portable(path)
    entries: dict[str, Any] = {}
    for layer in layers:
        entries[f"{layer.name}.weight"] = fused_kernel(layer)
        if layer.bias is not None:
            entries[f"{layer.name}.bias"] = np.asarray(layer.bias)
    metadata = {"format": FUSED_FORMAT, "format_version": FUSED_VERSION,
                "layers": json.dumps({name: spec.to_dict() for name, spec in specs.items()})}
    write_state(out, out_kind, entries, metadata if out_kind == "safetensors" else {})
    return layers


# -- Keras --------------------------------------------------------------------------------
def _load_keras(path: str) -> Any:
    where = repr(path)
    files = _keras_files(where)
    try:
        with _quiet_stderr():
            return files.load_model(path)
    except Exception as error:  # Keras raises many types for foreign or unsafe archives
        text = _first_line(error)
        if "safe_mode" in text or "lambda" in text.lower():
            text += (" (doconv loads archives in Keras' safe mode only: Lambda layers and other "
                     "code in the file are refused, never run)")
        raise CheckpointError(f"{where} cannot be loaded by keras.saving.load_model"
                              f"(safe_mode=True): {text}") from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: TensorFlow's C++ start-up and oneDNN messages
    (which TF_CPP_MIN_LOG_LEVEL does not silence) would bury the command's one line."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no descriptor 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def keras_layers(model: Any) -> list[Layer]:
    return [Layer(name, params.W, params.D, params.bias, params.spec.kernel_size,
                  params.spec.groups)
            for name, params in _keras_files("the model").layer_params(model).items()]


def fuse_keras(path: str, out: str) -> list[Layer]:
    model = _load_keras(path)
    layers = keras_layers(model)
    if not layers:
        raise CheckpointError(f"{path!r} holds no DO-Conv layers: nothing to fuse")
    files = _keras_files(repr(path))
    with _quiet_stderr():
        write_atomic(out, lambda temporary: files.fuse_and_save(model, temporary))
    return layers


# -- inspect ------------------------------------------------------------------------------
def _norm_ratio(layer: Layer) -> str:
    if layer.D is None:
        return "-"
    W = np.asarray(layer.W, dtype=np.float64)
    D = np.asarray(layer.D, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # a file's inf or nan: no warning lines
        w = float(np.linalg.norm(W))
        d = float(np.linalg.norm(D))
    return f"{d / w:.4g}" if w else "inf"


def _count(value: Any) -> int:
    shape = getattr(value, "shape", None)
    return int(np.prod(shape)) if shape is not None else 0


def _table(layers: list[Layer]) -> list[str]:
    header = ("layer", "rank", "kernel", "groups", "D_mul", "W", "D", "bias", "|D|/|W|")
    rows = [header]
    for layer in layers:
        kernel = layer.kernel_size
        groups = layer.inferred_groups()
        rows.append((
            layer.name,
            "?" if kernel is None else str(len(kernel)),
            f"?({layer.volume})" if kernel is None else _shape_text(kernel),
            "?" if groups is None else str(groups),
            str(layer.D_mul),
            _shape_text(layer.W.shape),
            "-" if layer.D is None else _shape_text(layer.D.shape),
            "-" if layer.bias is None else _shape_text(layer.bias.shape),
            _norm_ratio(layer)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def _summary(layers: list[Layer], other_count: int, other_keys: list[str],
             other_words: str) -> list[str]:
    training = sum(layer.training_count() for layer in layers)
    fused = sum(layer.fused_count() for layer in layers)
    lines = [f"parameters: {training + other_count:,} for training, "
             f"{fused + other_count:,} after fusion (DO-Conv layers {training:,} -> {fused:,})"]
    shown = ", ".join(other_keys[:6]) + (", ..." if len(other_keys) > 6 else "")
    lines.append(f"other {other_words}: {len(other_keys)}"
                 + (f" ({other_count:,} values: {shown})" if other_keys else ""))
    unknown = [layer.name for layer in layers if layer.kernel_size is None]
    if unknown:
        lines.append(f"kernel shape not recorded for {len(unknown)} layer(s): fuse needs "
                     "--kernel-size LAYER=SHAPE or --rank N (see doconv fuse --help)")
    return lines


def inspect_file(path: str, key: Optional[str], symbol: Optional[str] = None) -> list[str]:
    kind = detect_format(path)
    if symbol is not None and kind != "gluon":
        raise UsageError(f"--symbol applies to exported Gluon models; {path!r} is "
                         f"{_KIND_WORDS[kind]}")
    if key is not None and kind != "torch":
        raise UsageError(f"--key applies to PyTorch .pt/.pth checkpoints; {path!r} is "
                         f"{_KIND_WORDS[kind]}")
    lines = []
    if kind == "portable":
        layers, _ = read_portable(path)
        lines.append(f"{path}: {_KIND_WORDS[kind]}, {len(layers)} DO-Conv layer(s)")
        lines += _table(layers) if layers else []
        lines += _summary(layers, 0, [], "entries")
        return lines
    if kind == "keras":
        model = _load_keras(path)
        layers = keras_layers(model)
        others = _keras_files(repr(path)).other_weights(model)
        lines.append(f"{path}: {_KIND_WORDS[kind]} (model {model.name!r}), "
                     f"{len(layers)} DO-Conv layer(s)")
        lines += _table(layers) if layers else []
        lines += _summary(layers, sum(count for _, count in others),
                          [name for name, _ in others], "weights")
        return lines
    if symbol is not None:
        state = read_gluon_exported(path, symbol)[0]
    else:
        state = read_state(path, kind, key)
        _refuse_exported_without_symbol(path, state)
    layer_keys = {k for layer in state.layers for part, k in layer.keys.items()
                  if part != "prefix"}
    others = [k for k in state.entries if k not in layer_keys]
    title = f"{path}: {_KIND_WORDS[kind]}"
    if state.note:
        title += f", {state.note}"
    lines.append(f"{title}, {len(state.layers)} DO-Conv layer(s)")
    lines += _table(state.layers) if state.layers else []
    lines += _summary(state.layers, sum(_count(state.entries[k]) for k in others), others,
                      "entries")
    if state.metadata:
        lines.append(f"metadata: {sorted(state.metadata)}")
    return lines


# -- fuse ---------------------------------------------------------------------------------
def fuse_file(path: str, out: str, *, force: bool, key: Optional[str],
              kernels: KernelOptions, symbol: Optional[str] = None) -> list[str]:
    out_kind = _output_kind(out)
    if os.path.abspath(out) != os.path.abspath(path) and os.path.lexists(out) and not force:
        raise CheckpointError(f"{out!r} exists; pass --force to replace it")
    if os.path.isdir(out):
        raise CheckpointError(f"{out!r} is a directory")
    kind = detect_format(path)
    if os.path.abspath(out) == os.path.abspath(path) and not force:
        raise CheckpointError(f"OUT is IN ({out!r}); pass --force to replace it")
    if out_kind not in _OUTPUTS[kind]:
        suffixes = {"torch": ".pt/.pth", "safetensors": ".safetensors", "keras": ".keras",
                    "gluon": ".params"}
        raise UsageError(f"{path!r} is {_KIND_WORDS[kind]}; it fuses to "
                         f"{' or '.join(suffixes[k] for k in _OUTPUTS[kind])}, not {out!r}")
    if key is not None and kind != "torch":
        raise UsageError(f"--key applies to PyTorch .pt/.pth checkpoints; {path!r} is "
                         f"{_KIND_WORDS[kind]}")
    if symbol is not None and kind != "gluon":
        raise UsageError(f"--symbol applies to exported Gluon models; {path!r} is "
                         f"{_KIND_WORDS[kind]}")
    symbol_out = None if symbol is None else _symbol_output(out)
    if symbol_out is not None and os.path.lexists(symbol_out) and not force:
        raise CheckpointError(f"{symbol_out!r} exists; pass --force to replace it")
    if kernels.per_layer or kernels.by_volume or kernels.rank:
        if kind in ("portable", "keras"):
            raise UsageError(f"--kernel-size and --rank are for state dicts without recorded "
                             f"kernels; {path!r} is {_KIND_WORDS[kind]}, which records them")
    if kind == "portable":
        layers = fuse_portable(path, out, out_kind)
        return [f"fused {len(layers)} DO-Conv layer(s) of {path} into {out}"]
    if kind == "keras":
        layers = fuse_keras(path, out)
        return [f"fused {len(layers)} DO-Conv layer(s) of {path} into {out} (loads with "
                "keras.models.load_model, without doconv)"]
    graph = None
    if symbol is not None:
        state, graph = read_gluon_exported(path, symbol)
    else:
        state = read_state(path, kind, key)
    if symbol is None:
        _refuse_exported_without_symbol(path, state)
    if not state.layers:
        raise CheckpointError(f"{path!r} holds no DO-Conv layers (no W/D keys): nothing to fuse")
    kernels.settle(state.layers, repr(path))
    if kind == "gluon":
        files = _mx_files(repr(path))
        fused = fuse_entries(state.entries, state.layers, files.like)
        if graph is not None:
            try:
                text = json.dumps(fused_symbol(graph, state.layers), indent=2)
            except (KeyError, IndexError, TypeError) as error:
                raise CheckpointError(f"--symbol {symbol!r} is a malformed symbol graph: "
                                      f"{_first_line(error)}") from None
            write_atomic(symbol_out, lambda temporary: _write_text(temporary, text))
        try:
            write_atomic(out, lambda temporary: files.save(temporary, fused))
        except BaseException:
            if symbol_out is not None:
                os.unlink(symbol_out)  # both files or neither
            raise
    else:
        fused = fuse_entries(state.entries, state.layers, _torch_like)
        write_state(out, out_kind, fused, state.metadata)
    carried = len(fused) - len(state.layers)
    lines = [f"fused {len(state.layers)} DO-Conv layer(s) of {path} into {out}; {carried} "
             f"other entr{'y' if carried == 1 else 'ies'} carried over"]
    if state.note:
        lines.append(f"read {state.note}")
    if symbol_out is not None:
        lines.append(f"wrote its symbol to {symbol_out}")
    return lines


def _refuse_exported_without_symbol(path: str, state: StateFile) -> None:
    """An exported Gluon model's parameters (``arg:``/``aux:`` names) say nothing about its
    layers without the symbol: inspect and fuse both ask for it."""
    if state.kind == "gluon" and any(str(k).startswith(("arg:", "aux:"))
                                     for k in state.entries):
        raise CheckpointError(f"{path!r} holds an exported Gluon model's parameters "
                              "(arg:/aux: names), whose DO-Conv layers only its symbol "
                              "describes: pass its symbol with --symbol PREFIX-symbol.json")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


# -- the command line -----------------------------------------------------------------------
DESCRIPTION = ("Inspect DO-Conv checkpoints and fuse their layers into plain convolutions, "
               "without the model's code.")
FUSE_EPILOG = ("Formats: PyTorch .pt/.pth and .safetensors state dicts, the doconv "
               "parameter container, Keras .keras, Gluon .params. Layers saved without "
               "their kernel shape (older PyTorch files, Gluon's save_parameters) need "
               "--kernel-size or --rank.")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog=PROG, description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect", help="list a file's DO-Conv layers and parameter counts",
        description="List every DO-Conv layer of FILE (rank, kernel, groups, D_mul, shapes, "
                    "|D|/|W|: how far D has moved from 0), the parameter counts for training "
                    "and after fusion, and what else the file holds.")
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--key", metavar="KEY",
                         help="the entry of a .pt checkpoint holding the state dict")
    inspect.add_argument("--symbol", metavar="JSON",
                         help="an exported Gluon model's PREFIX-symbol.json")
    fuse = commands.add_parser(
        "fuse", help="write IN with every DO-Conv layer fused into a plain conv",
        description="Write IN with every DO-Conv layer replaced by the plain conv computing "
                    "the same function; every other entry is carried over unchanged, so OUT "
                    "loads strictly into the plain architecture. OUT's suffix picks the "
                    "format.", epilog=FUSE_EPILOG)
    fuse.add_argument("input", metavar="IN")
    fuse.add_argument("output", metavar="OUT")
    fuse.add_argument("--force", action="store_true", help="replace OUT if it exists")
    fuse.add_argument("--key", metavar="KEY",
                      help="the entry of a .pt checkpoint holding the state dict (default: "
                           "the one holding DO-Conv layers)")
    fuse.add_argument("--kernel-size", action="append", metavar="[LAYER=]SHAPE",
                      help="a layer's kernel shape (features.0=3x3, conv=1x5, 3x3x3); without "
                           "LAYER=, for every layer of that volume; repeatable")
    fuse.add_argument("--rank", type=int, choices=(1, 2, 3),
                      help="spatial axes of layers without a recorded kernel: their kernels "
                           "are then taken as square (2) or cubic (3)")
    fuse.add_argument("--symbol", metavar="JSON",
                      help="an exported Gluon model's PREFIX-symbol.json (IN is its "
                           "PREFIX-0000.params); the fused symbol goes beside OUT")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            lines = inspect_file(args.file, args.key, args.symbol)
        elif args.command == "fuse":
            lines = fuse_file(args.input, args.output, force=args.force, key=args.key,
                              kernels=KernelOptions.from_args(args), symbol=args.symbol)
        else:
            parser.error("a command is required: inspect or fuse")
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except (ValueError, OSError) as error:  # CheckpointError included: a file's problem
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return FILE_ERROR
    except MemoryError:
        print(f"{PROG}: error: out of memory reading or fusing the file; run it on a machine "
              "with more memory", file=sys.stderr)
        return FILE_ERROR
    print("\n".join(lines))
    return 0


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename or ''}: {error.strerror}".lstrip(": ")
    return " ".join(str(error).split())
