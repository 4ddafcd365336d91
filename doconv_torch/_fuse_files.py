"""The PyTorch side of the ``doconv`` command (doconv_core.cli imports it only for PyTorch
files, so the core itself imports no framework): reading and writing state dicts and
converting their tensors at the edge."""

from __future__ import annotations

import collections
from typing import Any, Mapping, Optional

import numpy as np
import torch


def load(path: str) -> Any:
    """What ``torch.save`` wrote to ``path``, read without running code from the file."""
    return torch.load(path, map_location="cpu", weights_only=True)


def is_state_dict(value: Any) -> bool:
    """A non-empty mapping holding at least one tensor (its keys are checked apart, so that a
    key that is not a string is named, not taken for a mapping of something else)."""
    return isinstance(value, dict) and bool(value) and \
        any(isinstance(item, torch.Tensor) for item in value.values())


def shape(value: Any) -> Optional[tuple]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _dense(value: torch.Tensor) -> torch.Tensor:
    """A strided tensor with data, else a ValueError saying what it is."""
    if value.is_meta:
        raise ValueError("it is a meta tensor, which holds no values (save the model's state "
                         "after its parameters are materialised)")
    if value.layout != torch.strided:
        raise ValueError(f"it is a {value.layout} tensor; parameters are dense (save it with "
                         ".to_dense())")
    return value.detach().cpu()


def to_numpy(value: torch.Tensor) -> np.ndarray:
    """A CPU NumPy array; bfloat16 (which NumPy lacks) widens exactly to float32."""
    tensor = _dense(value)
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def like(kernel: np.ndarray, original: Any) -> Any:
    """A fused kernel as a tensor of the original W's dtype."""
    return torch.from_numpy(np.array(kernel, order="C")).to(original.dtype)


def safetensors_array(value: Any) -> Optional[np.ndarray]:
    """A tensor as the NumPy array a safetensors file stores (bfloat16 through ml_dtypes);
    None for a value that is not a tensor. An ImportError for bfloat16 without ml_dtypes."""
    if not isinstance(value, torch.Tensor):
        return None
    tensor = _dense(value).contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def to_tensors(entries: Mapping[str, Any]) -> "collections.OrderedDict[str, Any]":
    """``entries`` with NumPy arrays as tensors (a 0-d array stays 0-d; bfloat16 through its
    bits); a ValueError naming an array torch has no dtype for."""
    tensors = collections.OrderedDict()
    for key, value in entries.items():
        if isinstance(value, np.ndarray):
            array = np.array(value, order="C")
            if array.dtype.name == "bfloat16":
                value = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
            else:
                try:
                    value = torch.from_numpy(array)
                except TypeError:
                    raise ValueError(f"{key!r} has dtype {array.dtype}, which a torch tensor "
                                     "cannot hold") from None
        tensors[key] = value
    return tensors


def save(path: str, tensors: Mapping[str, Any]) -> None:
    """``torch.save`` of ``tensors`` (see ``to_tensors``)."""
    torch.save(tensors, path)
