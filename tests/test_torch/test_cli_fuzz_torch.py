"""Property tests of the ``doconv`` command's PyTorch readers: ``.pt`` state dicts (bfloat16
included) and training checkpoints, changed at the level of their tensors (shapes, dtypes,
sparse and meta layouts, keys that are not strings, extra states that are not tensors) and
byte by byte; every run either fuses to what ``torch.load`` reads from the file, composed
apart from the command, or is one ``doconv: error:`` line, exit 1, with nothing written. The
same state dicts as safetensors are checked against safetensors' own reader."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file as reference_load
from safetensors.torch import save_file

from fuzz_files import byte_mutations, npz_byte_mutations
from strategies import fuzz_settings
from tests.cli_checks import check_fuse_property, mutated_states

DTYPES = ("float16", "bfloat16", "float32", "float64")


def to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def to_numpy(value):
    """A tensor as NumPy (a sparse one densified, a meta one as its description), anything
    else as it is: what the comparison of input and output sees."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_meta:
        return ("meta", tuple(value.shape), str(value.dtype))
    if value.layout != torch.strided:
        value = value.to_dense()
    if value.dtype == torch.bfloat16:
        import ml_dtypes
        return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()


def read_pt(path: Path) -> dict:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded["model"] if "model" in loaded and isinstance(loaded["model"], dict) \
        else loaded
    return {key: to_numpy(value) for key, value in state.items()}


def read_safetensors(path: Path) -> dict:
    return reference_load(str(path))


@st.composite
def torch_values(draw, state: dict) -> dict:
    """``state`` as tensors, perhaps with one value only a .pt file can hold in its place."""
    tensors = {key: to_torch(value) for key, value in state.items()}
    kind = draw(st.sampled_from(["none", "none", "sparse", "meta", "list", "int key",
                                 "nested", "scalar"]))
    key = draw(st.sampled_from(sorted(tensors)))
    if kind == "sparse" and tensors[key].dtype != torch.bfloat16:
        tensors[key] = tensors[key].to_sparse()
    elif kind == "meta":
        tensors[key] = torch.empty(tensors[key].shape, dtype=tensors[key].dtype, device="meta")
    elif kind == "list":
        tensors[key] = tensors[key].tolist()
    elif kind == "int key":
        tensors[0] = tensors.pop(key)
    elif kind == "nested":
        tensors = {"model": tensors, "epoch": 3, "optimizer": {"state": {}}}
    elif kind == "scalar":
        tensors[key] = 1.5
    return tensors


@fuzz_settings(25)
@given(mutated_states(DTYPES), st.data())
def test_fuse_of_a_mutated_pt_file(case, data):
    state, _ = case
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "model.pt"
        torch.save(data.draw(torch_values(state)), source)
        if data.draw(st.booleans()):
            raw, _ = data.draw(npz_byte_mutations(source.read_bytes()))  # a zip archive
            source.write_bytes(raw)
        target = data.draw(st.sampled_from(["plain.pt", "plain.safetensors"]))
        read_output = read_pt if target.endswith(".pt") else read_safetensors
        check_fuse_property(source, Path(directory) / target, read_pt, read_output)


@fuzz_settings(25)
@given(mutated_states(DTYPES), st.data())
def test_fuse_of_a_mutated_safetensors_file_matches_the_reference_reader(case, data):
    state, _ = case
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "model.safetensors"
        save_file({key: to_torch(value) for key, value in state.items()}, source)
        if data.draw(st.booleans()):
            raw, _ = data.draw(byte_mutations(source.read_bytes()))
            source.write_bytes(raw)
        check_fuse_property(source, Path(directory) / "plain.safetensors", read_safetensors,
                            read_safetensors)
