"""Test helpers: write old parameter files and corrupt saved ones on purpose (the import
tests of every env)."""

from __future__ import annotations

import json
from typing import Callable

import numpy as np


def rewrite_npz(path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Apply ``change`` to the raw arrays of the ``.npz`` at ``path`` and save them back as
    they are, bypassing save_params' checks."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    change(arrays)
    np.savez(path, **arrays)


def as_int64(key: str) -> Callable[[dict[str, np.ndarray]], None]:
    """A ``change`` that stores one array as int64."""
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = arrays[key].astype(np.int64)
    return change


def write_npz(path, layers, version: int) -> None:
    """``layers`` ({name: DOConvParams}) as doconv wrote ``.npz`` files before safetensors,
    written here without save_params so that the old formats stay pinned: version 1 (2-D
    only, settings without "rank") or version 2 (with "rank")."""
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    meta = {"format": "doconv.params", "version": version, "layers": {}}
    arrays = {}
    for name, params in layers.items():
        config = params.spec.to_dict()
        if version == 1:
            if config.pop("rank") != 2:
                raise ValueError(f"version 1 holds 2-D layers only; {name!r} is not")
        meta["layers"][name] = config
        for part in ("W", "D", "bias"):
            if getattr(params, part) is not None:
                arrays[f"{name}/{part}"] = getattr(params, part)
    arrays["__doconv_meta__"] = np.array(json.dumps(meta))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def safetensors_parts(path) -> tuple[dict, dict, bytes]:
    """(header entries, metadata, data bytes) of the safetensors file at ``path``, read
    without doconv's checks."""
    raw = open(path, "rb").read()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    metadata = header.pop("__metadata__", {})
    return header, metadata, raw[8 + size:]


def write_safetensors_parts(path, entries: dict, metadata: dict | None, data: bytes) -> None:
    """A safetensors file from raw parts, as they are (for corrupt files on purpose)."""
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + data)


def rewrite_safetensors_metadata(path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to the metadata of the safetensors file at ``path`` (a dict of
    strings; "layers" decoded from its JSON and encoded again) and save it back as it is."""
    entries, metadata, data = safetensors_parts(path)
    if "layers" in metadata:
        metadata["layers"] = json.loads(metadata["layers"])
    change(metadata)
    if "layers" in metadata and not isinstance(metadata["layers"], str):
        metadata["layers"] = json.dumps(metadata["layers"])
    write_safetensors_parts(path, entries, metadata, data)
