"""Import checkpoints saved by the paper authors' original code (doconv-math.md, last section).

Each original layout is brought to canonical shapes together with the D channel each
kernel slot (o, i) reads in the original. Where that channel map is a relabelling of
the canonical c(o, i) (a bijection depending only on (group, i)), permuting D's
channels reproduces the original exactly: same parameters, same kernel, same training.
Otherwise the original's composed kernel is embedded (D = 0, W holds the kernel): the
function is preserved, the over-parameterisation restarts.

The TensorFlow mapping c_tf(o, i) = i*g + floor(o/(C_out/g)) depends on (group, i) only
and is a bijection, so TensorFlow and Gluon checkpoints always import exactly (by a
channel permutation when 1 < g < C_in). The PyTorch mapping (o mod g)*(C_in/g) + i does
not depend on the group alone when g > 1 and C_out > g, and such checkpoints import
function-preservingly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .compose import compose_kernel, embed_kernel, identity_d
from .params import (CheckpointError, DOConvParams, checkpoint_array, common_dtype,
                     working_dtype)
from .spec import ConvSpec


@dataclasses.dataclass
class LegacyImport:
    params: DOConvParams
    exact: bool  # True: the original parameters, at most with D's channels permuted
    method: str  # "identical", "permuted D channels" or "embedded composed kernel"


def canonical_channel_map(spec: ConvSpec) -> np.ndarray:
    """c(o, i) for every kernel slot, shape (C_out, C_in/g)."""
    o = np.arange(spec.out_channels)[:, None]
    i = np.arange(spec.in_per_group)[None, :]
    return (o // spec.out_per_group) * spec.in_per_group + i


def torch_channel_map(spec: ConvSpec) -> np.ndarray:
    o = np.arange(spec.out_channels)[:, None]
    i = np.arange(spec.in_per_group)[None, :]
    return (o % spec.groups) * spec.in_per_group + i


def tf_channel_map(spec: ConvSpec) -> np.ndarray:
    o = np.arange(spec.out_channels)[:, None]
    i = np.arange(spec.in_per_group)[None, :]
    return i * spec.groups + o // spec.out_per_group


def _array(name: str, value: Any, shape: tuple[int, ...] | None, source: str) -> np.ndarray | None:
    if value is None:
        if shape is not None:
            raise CheckpointError(f"the {source} checkpoint needs {name} with shape {shape}")
        return None
    array = checkpoint_array(name, value)
    if shape is None:
        raise CheckpointError(
            f"{name} was given but this layer has none (shape {array.shape}); check the spec"
        )
    if array.shape != shape:
        raise CheckpointError(
            f"{name} must have shape {shape} in the {source} layout for this layer, "
            f"got {array.shape}"
        )
    return array


def _from_mapped(spec: ConvSpec, D: np.ndarray | None, W: np.ndarray, bias: np.ndarray | None,
                 channel_map: np.ndarray) -> LegacyImport:
    """Canonical-shaped D, W whose slot (o, i) reads D[channel_map[o, i]] -> LegacyImport."""
    if D is None:
        return LegacyImport(DOConvParams(spec, W.copy(), None, bias), True, "identical")
    canonical = canonical_channel_map(spec)
    # Every canonical channel occurs in the map, so this defines a full candidate.
    permutation = np.empty(spec.in_channels, dtype=np.int64)
    permutation[canonical.ravel()] = channel_map.ravel()
    consistent = np.array_equal(permutation[canonical], channel_map)
    if consistent and np.unique(permutation).size == spec.in_channels:
        method = ("identical" if np.array_equal(permutation, np.arange(spec.in_channels))
                  else "permuted D channels")
        return LegacyImport(DOConvParams(spec, W.copy(), D[permutation].copy(), bias), True,
                            method)
    # Composed in float32 at least (16-bit arithmetic would round every partial sum, and
    # NumPy's einsum takes no bfloat16), stored in the checkpoint's dtype.
    dtype = common_dtype(D.dtype, W.dtype)
    work = working_dtype(dtype)
    kernel = compose_kernel(D.astype(work), W.astype(work), groups=spec.groups,
                            kernel_size=spec.kernel_size, channel_map=channel_map)
    D_new, W_new = embed_kernel(kernel.astype(dtype), groups=spec.groups, D_mul=spec.D_mul)
    return LegacyImport(DOConvParams(spec, W_new, D_new, bias), False,
                        "embedded composed kernel")


def _bias(spec: ConvSpec, bias: Any, source: str) -> np.ndarray | None:
    return _array("bias", bias, (spec.out_channels,) if spec.bias else None, source)


def import_legacy_torch(spec: ConvSpec, *, W: Any, D: Any = None, bias: Any = None,
                        D_diag: Any = None) -> LegacyImport:
    """The original PyTorch layer: D (C_in, MN, D_mul), W (C_out, C_in/g, D_mul).

    ``D_diag`` (saved by the original as a frozen parameter) is optional; when given it
    must be the fixed identity, which confirms the checkpoint matches ``spec``.
    """
    source = "original PyTorch"
    W = _array("W", W, spec.W_shape, source)
    D = _array("D", D, spec.D_shape, source)
    if D_diag is not None and spec.has_D:
        D_diag = _array("D_diag", D_diag, spec.D_shape, source)
        if not np.array_equal(D_diag, identity_d(spec.in_channels, spec.mn, spec.D_mul)):
            raise CheckpointError(
                "D_diag is not the fixed identity for this layer's kernel_size and D_mul; "
                "the checkpoint does not match the spec"
            )
    return _from_mapped(spec, D, W, _bias(spec, bias, source), torch_channel_map(spec))


def import_legacy_tf(spec: ConvSpec, *, W: Any, D: Any = None, bias: Any = None
                     ) -> LegacyImport:
    """The original Keras layer: D (MN, D_mul, C_in), W ('kernel') (D_mul, C_in/g, C_out)."""
    source = "original TensorFlow"
    S, I_g, C_out = spec.D_mul, spec.in_per_group, spec.out_channels
    W = _array("W", W, (S, I_g, C_out), source)
    D_shape = None if not spec.has_D else (spec.mn, S, spec.in_channels)
    D = _array("D", D, D_shape, source)
    W_canonical = W.transpose(2, 1, 0)
    D_canonical = None if D is None else D.transpose(2, 0, 1)
    return _from_mapped(spec, D_canonical, W_canonical, _bias(spec, bias, source),
                        tf_channel_map(spec))


def import_legacy_gluon(spec: ConvSpec, *, weight: Any, D: Any = None, bias: Any = None
                        ) -> LegacyImport:
    """The original Gluon layer: W in the conv's ``weight`` (C_out, C_in/g, M, N), D
    (MN, MN, C_in); D_mul = MN only, read with the TensorFlow mapping."""
    source = "original Gluon"
    if spec.D_mul != spec.mn:
        raise CheckpointError(
            f"the original Gluon layer supports only D_mul = M*N = {spec.mn}, "
            f"got a spec with D_mul={spec.D_mul}"
        )
    weight = _array("weight", weight, spec.kernel_shape, source)
    D_shape = None if not spec.has_D else (spec.mn, spec.mn, spec.in_channels)
    D = _array("D", D, D_shape, source)
    W_canonical = weight.reshape(spec.W_shape)
    D_canonical = None if D is None else D.transpose(2, 0, 1)
    return _from_mapped(spec, D_canonical, W_canonical, _bias(spec, bias, source),
                        tf_channel_map(spec))
