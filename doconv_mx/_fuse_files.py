"""The Gluon side of the ``doconv`` command (doconv_core.cli imports it only for Gluon
parameter files, so the core itself imports no framework)."""

from __future__ import annotations

from typing import Any, Mapping

import mxnet as mx
import numpy as np


def load(path: str) -> Any:
    """What ``mx.nd.save`` (``save_parameters``, ``export``) wrote: a dict or a list."""
    return mx.nd.load(path)


def shape(value: Any) -> tuple:
    return tuple(value.shape)


def to_numpy(value: Any) -> np.ndarray:
    return value.asnumpy()


def like(kernel: np.ndarray, original: Any) -> Any:
    """A fused kernel as an NDArray of the original W's dtype."""
    return mx.nd.array(kernel, dtype=original.dtype)


def save(path: str, entries: Mapping[str, Any]) -> None:
    mx.nd.save(path, dict(entries))
