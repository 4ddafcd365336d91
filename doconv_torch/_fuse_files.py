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
    """A non-empty {str: ...} mapping holding at least one tensor."""
    return isinstance(value, dict) and bool(value) and \
        all(isinstance(key, str) for key in value) and \
        any(isinstance(item, torch.Tensor) for item in value.values())


def shape(value: Any) -> Optional[tuple]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def to_numpy(value: torch.Tensor) -> np.ndarray:
    """A CPU NumPy array; bfloat16 (which NumPy lacks) widens exactly to float32."""
    tensor = value.detach().cpu()
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
    tensor = value.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def save(path: str, entries: Mapping[str, Any]) -> None:
    """``torch.save`` of ``entries``, NumPy arrays as tensors (a 0-d array stays 0-d)."""
    tensors = collections.OrderedDict(
        (key, torch.from_numpy(np.array(value, order="C")) if isinstance(value, np.ndarray)
         else value) for key, value in entries.items())
    torch.save(tensors, path)
