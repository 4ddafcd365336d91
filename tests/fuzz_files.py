"""Hypothesis strategies for the file readers' fuzz tests: structurally valid safetensors
files and portable parameter files (safetensors and .npz), and the mutations that break
them (header length, JSON shape and depth, offsets, dtypes, shapes, metadata, truncation,
trailing bytes, flipped bytes). NumPy only; shared by tests/core/test_fuzz_files.py and the
reference comparison in tests/test_torch/test_fuzz_safetensors_reference.py."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import struct
import warnings
import zipfile
from typing import Optional

import numpy as np
from hypothesis import strategies as st

import doconv_core as dc
from doconv_core.tensorfile import DTYPES, MAX_JSON_DEPTH
from strategies import layer_specs

# JSON values of every kind, small: what a mutation puts where the format wants something else.
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=6)
NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                max_size=6).filter(lambda name: name != "__metadata__")


@dataclasses.dataclass
class Tensor:
    code: str  # safetensors dtype
    shape: list
    data: bytes


@dataclasses.dataclass
class SafetensorsFile:
    """A safetensors file as parts: ``header`` (the JSON object, mutable), ``data``."""

    header: dict
    data: bytes
    pad: bool = True
    raw_header: Optional[bytes] = None  # a header text used as it is, instead of ``header``

    def to_bytes(self) -> bytes:
        text = self.raw_header
        if text is None:
            text = json.dumps(self.header, ensure_ascii=False).encode("utf-8")
        if self.pad:
            text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + self.data


def _sizable(code: str, shape: list) -> bool:
    return math.prod(shape) * DTYPES[code][0] % 8 == 0


@st.composite
def tensors(draw, codes=tuple(DTYPES), max_tensors: int = 4) -> dict[str, Tensor]:
    """{name: Tensor} of random dtypes (sub-byte ones where the byte count is whole),
    ranks 0-3 and bytes."""
    names = draw(st.lists(NAMES, unique=True, max_size=max_tensors))
    result = {}
    for name in names:
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        code = draw(st.sampled_from(codes).filter(lambda c, s=shape: _sizable(c, s)))
        size = math.prod(shape) * DTYPES[code][0] // 8
        result[name] = Tensor(code, shape, draw(st.binary(min_size=size, max_size=size)))
    return result


@st.composite
def safetensors_files(draw, codes=tuple(DTYPES)) -> tuple[SafetensorsFile, dict, dict]:
    """(a valid file, its {name: Tensor}, its metadata): tensors laid out in a random order,
    header keys in another, metadata present, absent or null, padding or none."""
    content = draw(tensors(codes))
    order = draw(st.permutations(list(content)))
    entries, chunks, offset = {}, [], 0
    for name in order:
        tensor = content[name]
        entries[name] = {"dtype": tensor.code, "shape": tensor.shape,
                         "data_offsets": [offset, offset + len(tensor.data)]}
        chunks.append(tensor.data)
        offset += len(tensor.data)
    header = {name: entries[name] for name in draw(st.permutations(list(entries)))}
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=8),
                                                max_size=3))
    if metadata is not None or draw(st.booleans()):
        header["__metadata__"] = metadata
        header = dict(draw(st.permutations(list(header.items()))))
    file = SafetensorsFile(header, b"".join(chunks), pad=draw(st.booleans()))
    return file, content, metadata or {}


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@st.composite
def header_mutations(draw, file: SafetensorsFile) -> str:
    """Change ``file`` in place at the JSON level; returns what was done."""
    names = [key for key in file.header if key != "__metadata__"]
    kind = draw(st.sampled_from(["entry field", "dtype", "shape", "offsets", "metadata",
                                 "deep", "duplicate", "replace header", "extra key",
                                 "not utf-8", "leading space"] + (["drop"] if names else [])))
    if kind in ("entry field", "dtype", "shape", "offsets", "extra key") and not names:
        kind = "metadata"
    if kind in ("entry field", "dtype", "shape", "offsets", "extra key", "drop"):
        name = draw(st.sampled_from(names))
        entry = file.header[name]
        if not isinstance(entry, dict) and kind != "drop":  # an earlier mutation replaced it
            file.header[name] = entry = {}
        if kind == "drop":
            del file.header[name]
        elif kind == "entry field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_VALUES)
        elif kind == "dtype":
            entry["dtype"] = draw(st.sampled_from(tuple(DTYPES)) | st.text(max_size=4))
        elif kind == "shape":
            # An earlier "entry field" mutation may have left any JSON value here.
            shape = list(entry["shape"]) if isinstance(entry.get("shape"), list) else []
            change = draw(st.sampled_from(["append", "change", "remove", "huge"]))
            if change == "append" or not shape:
                shape.append(draw(st.integers(0, 4)))
            elif change == "change":
                shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(-2, 2**64))
            elif change == "remove":
                shape.pop()
            else:
                shape = [0] + [2**draw(st.integers(31, 70))] * draw(st.integers(1, 3))
            entry["shape"] = shape
        elif kind == "offsets":
            offsets = entry.get("data_offsets")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(type(offset) is int for offset in offsets)):
                offsets = entry["data_offsets"] = [0, 0]  # an earlier mutation replaced them
            offsets[draw(st.integers(0, 1))] += draw(st.integers(-9, 9)
                                                     | st.integers(-2**65, 2**65))
        else:
            entry[draw(st.text(max_size=4))] = draw(JSON_VALUES)
    elif kind == "metadata":
        file.header["__metadata__"] = draw(JSON_VALUES)
    elif kind == "deep":
        depth = draw(st.sampled_from([MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH,
                                      MAX_JSON_DEPTH + 1, 5000, 100_000]))
        where = draw(st.sampled_from(["metadata", "entry", "name"]))
        text = json.dumps(file.header)[1:]
        inner = nested(depth - 1)
        if where == "name":  # brackets inside a string are not nesting
            file.raw_header = ("{" + json.dumps(inner) + ": 1" + ("," if text != "}" else "")
                               + text).encode()
        else:
            key = "__metadata__" if where == "metadata" else "deep"
            file.raw_header = ('{"' + key + '": ' + inner + ("," if text != "}" else "")
                               + text).encode()
    elif kind == "duplicate":
        key = draw(st.sampled_from(names or ["__metadata__"]))
        text = json.dumps(file.header)
        file.raw_header = ("{" + json.dumps(key) + ": " + json.dumps(file.header.get(key))
                           + ("," if text != "{}" else "") + text[1:]).encode()
    elif kind == "replace header":
        file.raw_header = json.dumps(draw(JSON_VALUES)).encode()
    elif kind == "not utf-8":
        file.raw_header = json.dumps(file.header).encode()[:-1] + b'\xff}'
    else:
        file.raw_header = b" " + json.dumps(file.header).encode()
    return kind


@st.composite
def byte_mutations(draw, raw: bytes) -> tuple[bytes, str]:
    """``raw`` truncated, extended, flipped or with another header length."""
    kind = draw(st.sampled_from(["truncate", "trailing", "flip", "length"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, max(len(raw) - 1, 0)))], kind
    if kind == "trailing":
        return raw + draw(st.binary(min_size=1, max_size=16)), kind
    if kind == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:], kind
    (size,) = struct.unpack("<Q", raw[:8]) if len(raw) >= 8 else (0,)
    size = draw(st.sampled_from([size - 1, size + 1, size + 8, 0, 1, 2**63, 2**64 - 1])
                | st.integers(0, len(raw) + 16))
    return struct.pack("<Q", size % 2**64) + raw[8:], kind


@st.composite
def mutated_safetensors(draw, codes=tuple(DTYPES)) -> tuple[bytes, Optional[dict], list]:
    """(file bytes, the expected ``(content, metadata)`` when the file is unchanged else
    None, the mutations applied)."""
    file, content, metadata = draw(safetensors_files(codes))
    done = []
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            done.append(draw(header_mutations(file)))
    raw = file.to_bytes()
    for _ in range(draw(st.integers(0, 2)) if draw(st.booleans()) else 0):
        raw, kind = draw(byte_mutations(raw))
        done.append(kind)
    return raw, (None if done else (content, metadata)), done


# -- portable parameter files ----------------------------------------------------------------
def params_of(spec: dc.ConvSpec, dtype, seed: int) -> dc.DOConvParams:
    rng = np.random.default_rng(seed)
    return dc.DOConvParams(
        spec, rng.standard_normal(spec.W_shape).astype(dtype),
        rng.standard_normal(spec.D_shape).astype(dtype) if spec.has_D else None,
        rng.standard_normal(spec.out_channels).astype(dtype) if spec.bias else None)


LAYER_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",),
                                    exclude_characters="/"), min_size=1, max_size=5)


try:
    from ml_dtypes import bfloat16
except ImportError:  # the core and mx envs: bfloat16 is refused there, tested elsewhere
    bfloat16 = None
FLOATS = (np.float16, np.float32, np.float64)
PARAMETER_DTYPES = FLOATS + ((bfloat16,) if bfloat16 is not None else ())


@st.composite
def portable_layers(draw, dtypes=FLOATS, names=LAYER_NAMES) -> dict[str, dc.DOConvParams]:
    """{name: DOConvParams}: 1 to 3 layers of ranks 1-3 and ``dtypes``, small."""
    names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    return {name: params_of(draw(layer_specs(rank=draw(st.integers(1, 3)))),
                            draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**16)))
            for name in names}


def npz_members(raw: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def npz_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # names zipfile cuts at a NUL byte may repeat: on purpose
        warnings.simplefilter("ignore", UserWarning)
        with zipfile.ZipFile(buffer, "w", compression) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


META = "__doconv_meta__.npy"
SAFETENSORS_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


@st.composite
def settings_mutations(draw, layers_json: dict) -> str:
    """Change the 'layers' settings (decoded JSON, a dict) in place; returns what was done."""
    kind = draw(st.sampled_from(["value", "drop key", "extra key", "replace", "rename",
                                 "deep"]))
    names = [name for name, config in layers_json.items() if isinstance(config, dict) and config]
    if not names or kind == "replace":
        layers_json.clear()
        layers_json.update({"x": draw(JSON_VALUES)})
        return "replace"
    name = draw(st.sampled_from(names))
    config = layers_json[name]
    key = draw(st.sampled_from(sorted(config)))
    if kind == "value":
        config[key] = draw(JSON_VALUES | st.integers(-3, 5)
                           | st.lists(st.integers(-1, 4), max_size=4))
    elif kind == "drop key":
        config.pop(key)
    elif kind == "extra key":
        config[draw(st.text(max_size=4))] = draw(JSON_VALUES)
    elif kind == "rename":
        layers_json[draw(LAYER_NAMES | st.text(max_size=3))] = layers_json.pop(name)
    else:
        config[key] = json.loads(nested(draw(st.sampled_from([MAX_JSON_DEPTH - 3,
                                                               MAX_JSON_DEPTH + 1]))))
    return kind


@st.composite
def portable_files(draw) -> tuple[str, bytes, Optional[dict], list]:
    """(suffix, file bytes, the layers when the file is unchanged else None, mutations):
    a file save_params wrote (safetensors or .npz), mutated at its level of structure and
    then, perhaps, byte by byte."""
    suffix = draw(st.sampled_from(["safetensors", "npz"]))
    # bfloat16 and NUL characters in layer names are for safetensors only: an
    # .npz holds neither (save_params refuses them; test_params checks that).
    layers = draw(portable_layers(PARAMETER_DTYPES, LAYER_NAMES) if suffix == "safetensors"
                  else portable_layers(FLOATS, LAYER_NAMES.filter(lambda n: "\0" not in n)))
    buffer = io.BytesIO()
    done: list = []
    if suffix == "npz":
        meta = {"format": "doconv.params", "version": 2,
                "layers": {name: params.spec.to_dict() for name, params in layers.items()}}
        members = {f"{name}/{part}.npy": npy_bytes(array) for name, params in layers.items()
                   for part, array in (("W", params.W), ("D", params.D), ("bias", params.bias))
                   if array is not None}
        for _ in range(draw(st.integers(0, 2))):
            kind = draw(st.sampled_from(["settings", "meta", "array", "drop", "extra",
                                         "npy header", "version"]))
            done.append(kind)
            if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
                kind = "meta"
            if kind == "settings":
                done.append(draw(settings_mutations(meta["layers"])))
            elif kind == "version":
                meta["version"] = draw(JSON_VALUES | st.integers(0, 4))
            elif kind == "meta":
                meta = draw(JSON_VALUES)
            elif kind == "array" and members:
                name = draw(st.sampled_from(sorted(members)))
                dtype = draw(st.sampled_from(["<f2", ">f4", "<f8", "<i8", "|b1", "<c8", "<U3",
                                              "|V2", "|S2"]))
                shape = draw(st.lists(st.integers(0, 3), max_size=4))
                members[name] = npy_bytes(np.zeros(shape, dtype))
            elif kind == "drop" and members:
                members.pop(draw(st.sampled_from(sorted(members))))
            elif kind == "extra":
                name = draw(st.text(min_size=1, max_size=6).filter(lambda n: n[0] != "\0"))
                members[name] = draw(st.binary(max_size=16))
            elif kind == "npy header" and members:
                name = draw(st.sampled_from(sorted(members)))
                data = members[name]
                at = draw(st.integers(0, max(min(len(data), 128) - 1, 0)))  # may be empty
                members[name] = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at + 1:]
        members[META] = npy_bytes(np.array(json.dumps(meta)))
        raw = npz_bytes(members, draw(st.sampled_from([zipfile.ZIP_STORED,
                                                       zipfile.ZIP_DEFLATED])))
    else:
        tensors_ = {f"{name}.{part}": array for name, params in layers.items()
                    for part, array in (("W", params.W), ("D", params.D), ("bias", params.bias))
                    if array is not None}
        entries, chunks, offset = {}, [], 0
        for name, array in tensors_.items():
            data = array.astype(array.dtype.newbyteorder("<")).tobytes()
            entries[name] = {"dtype": SAFETENSORS_CODES[array.dtype.name],
                             "shape": list(array.shape),
                             "data_offsets": [offset, offset + len(data)]}
            chunks.append(data)
            offset += len(data)
        settings_json = {name: params.spec.to_dict() for name, params in layers.items()}
        metadata = {"format": "doconv.params", "format_version": "3"}
        file = SafetensorsFile(dict(entries), b"".join(chunks))
        for _ in range(draw(st.integers(0, 2))):
            kind = draw(st.sampled_from(["settings", "metadata", "header"]))
            done.append(kind)
            if kind == "settings":
                done.append(draw(settings_mutations(settings_json)))
            elif kind == "metadata":
                key = draw(st.sampled_from(["format", "format_version", "layers", "other"]))
                metadata[key] = draw(st.text(max_size=6) | st.sampled_from(["1", "2", "3"]))
            else:
                file.header["__metadata__"] = dict(metadata, layers=json.dumps(settings_json))
                done.append(draw(header_mutations(file)))
        file.header.setdefault("__metadata__", dict(metadata, layers=json.dumps(settings_json)))
        raw = file.to_bytes()
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 2))):
            raw, kind = draw(byte_mutations(raw) if suffix == "safetensors"
                             else npz_byte_mutations(raw))
            done.append(kind)
    return suffix, raw, (None if done else layers), done


@st.composite
def npz_byte_mutations(draw, raw: bytes) -> tuple[bytes, str]:
    """``raw`` (a zip archive) truncated, extended or with a byte flipped, often in the zip
    structures (local and central headers, the end record)."""
    kind = draw(st.sampled_from(["truncate", "trailing", "flip", "flip structure"]))
    marks = [i for sig in (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06")
             for i in range(len(raw)) if raw.startswith(sig, i)]
    if kind == "trailing" or not raw:  # an earlier truncation may have left nothing
        return raw + draw(st.binary(min_size=1, max_size=16)), "trailing"
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))], kind
    if kind == "flip" or not marks:
        at = draw(st.integers(0, len(raw) - 1))
    else:
        at = min(draw(st.sampled_from(marks)) + draw(st.integers(4, 45)), len(raw) - 1)
    return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:], kind


# -- legacy checkpoints ------------------------------------------------------------------------
def array_values(shape: Optional[tuple]) -> st.SearchStrategy:
    """Values a legacy array might be: the right shape in a float dtype, a wrong dtype or
    shape, a Python list, a ragged list, a string, None or an object."""
    good = () if shape is None else tuple(shape)
    dtypes = st.sampled_from(["<f2", "<f4", ">f8", "<i4", "|b1", "<c8", "<U2", "O"]
                             + (["bfloat16"] if bfloat16 is not None else []))
    return st.one_of(
        st.builds(lambda d, seed: _filled(good, d, seed), dtypes, st.integers(0, 99)),
        st.builds(lambda s, seed: _filled(tuple(s), "<f4", seed),
                  st.lists(st.integers(0, 4), max_size=4), st.integers(0, 99)),
        st.just([[1.0, 2.0], [3.0]]), st.just("W"), st.none(), st.just(object()),
        st.lists(st.floats(allow_nan=False, width=32), max_size=3))


def _filled(shape: tuple, dtype: str, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(shape)
    if dtype == "O":
        return values.astype(object)
    if dtype.endswith("U2"):
        return values.astype(str).astype("<U2")
    if dtype == "bfloat16":
        return values.astype(bfloat16)
    return values.astype(dtype)


def legacy_shapes(spec: dc.ConvSpec, layout: str) -> dict[str, Optional[tuple]]:
    """The arrays (name -> shape) the original code of ``layout`` saved for ``spec``."""
    S, I_g, C_out, mn = spec.D_mul, spec.in_per_group, spec.out_channels, spec.mn
    bias = (C_out,) if spec.bias else None
    if layout == "torch-legacy":
        return {"W": spec.W_shape, "D": spec.D_shape, "bias": bias, "D_diag": spec.D_shape}
    if layout == "tf-legacy":
        return {"W": (S, I_g, C_out), "D": None if not spec.has_D else (mn, S, spec.in_channels),
                "bias": bias}
    return {"weight": spec.kernel_shape,
            "D": None if not spec.has_D else (mn, mn, spec.in_channels), "bias": bias}


def valid_legacy_arrays(spec: dc.ConvSpec, layout: str, seed: int) -> dict[str, np.ndarray]:
    arrays = {name: _filled(shape, "<f4", seed + index) for index, (name, shape)
              in enumerate(legacy_shapes(spec, layout).items()) if shape is not None}
    if "D_diag" in arrays:
        arrays["D_diag"] = dc.identity_d(spec.in_channels, spec.mn, spec.D_mul)
    return arrays
