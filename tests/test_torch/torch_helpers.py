"""Helpers shared by the PyTorch adapter tests."""

import numpy as np
import torch

import doconv_core as dc
from doconv_torch import DOConv2d

# Tolerances (relative, absolute) against the float64 NumPy reference.
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}


def layer_for(spec: dc.ConvSpec, arrays=None, dtype=torch.float64, **overrides) -> DOConv2d:
    """A DOConv2d built from ``spec`` (overrides replace constructor arguments), holding
    ``arrays`` (the core's canonical D, W, bias) when given."""
    kwargs = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                  groups=spec.groups, bias=spec.bias, padding_mode=spec.padding_mode,
                  D_mul=spec.D_mul, dtype=dtype)
    kwargs.update(overrides)
    layer = DOConv2d(spec.in_channels, spec.out_channels, spec.kernel_size, **kwargs)
    if arrays is not None:
        with torch.no_grad():
            for name in ("D", "W", "bias"):
                if arrays[name] is not None:
                    getattr(layer, name).copy_(torch.from_numpy(arrays[name]))
    return layer


def tensor(array: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
