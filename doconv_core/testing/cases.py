"""A fixed, seeded set of layer cases: what every adapter's tests check against the reference.

The set covers each group kind (1, between, depthwise, depthwise with a multiplier),
kernel 1x1, 3x3, 5x5, 1x3, 3x1, D_mul equal to and above M*N, stride 1 and 2,
dilation 1 and 2, padding 'valid', 'same' and explicit, every padding mode, bias on
and off. ``digest`` identifies the set, so results produced from another set are
recognised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

import numpy as np

from ..spec import PADDING_MODES, ConvSpec

GROUP_KINDS = ("one", "between", "depthwise", "depthwise_multiplier")
KERNEL_SIZES = ((1, 1), (3, 3), (5, 5), (1, 3), (3, 1))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    spec: ConvSpec
    input_shape: tuple[int, ...]  # channels first: (N, C, *spatial)

    def arrays(self, dtype: np.dtype = np.float64, seed: int = 0) -> dict[str, np.ndarray | None]:
        """Deterministic x, D, W, bias for this case (D nonzero so mapping errors show)."""
        digest = hashlib.sha256(self.name.encode()).digest()
        rng = np.random.default_rng([seed, int.from_bytes(digest[:4], "little")])
        spec = self.spec
        scale = 1.0 / np.sqrt(spec.fan_in)
        return {
            "x": rng.standard_normal(self.input_shape).astype(dtype),
            "D": (0.5 * rng.standard_normal(spec.D_shape)).astype(dtype) if spec.has_D else None,
            "W": (scale * rng.standard_normal(spec.W_shape)).astype(dtype),
            "bias": rng.standard_normal(spec.out_channels).astype(dtype) if spec.bias else None,
        }


def channels_for(group_kind: str, in_per_group: int, out_per_group: int, groups: int
                 ) -> tuple[int, int, int]:
    """(in_channels, out_channels, groups) for a group kind; sizes are clipped to fit it."""
    if group_kind == "one":
        return in_per_group, out_per_group, 1
    if group_kind == "between":  # 1 < groups < in_channels
        groups = max(groups, 2)
        in_per_group = max(in_per_group, 2)
        return in_per_group * groups, out_per_group * groups, groups
    if group_kind == "depthwise":
        return groups, groups, groups
    if group_kind == "depthwise_multiplier":
        return groups, groups * max(out_per_group, 2), groups
    raise ValueError(f"group_kind must be one of {GROUP_KINDS}, got {group_kind!r}")


def _case(name: str, group_kind: str, kernel_size: tuple[int, int], extra_D_mul: int,
          stride: int, dilation: int, padding, padding_mode: str, bias: bool) -> Case:
    in_channels, out_channels, groups = channels_for(group_kind, 2, 3, 3)
    mn = kernel_size[0] * kernel_size[1]
    D_mul = 1 if mn == 1 else mn + extra_D_mul
    spec = ConvSpec(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                    bias=bias, padding_mode=padding_mode, D_mul=D_mul)
    return Case(name, spec, (2, in_channels, 11, 10))


def property_cases() -> list[Case]:
    """The fixed case set: a seeded sample of the full grid plus each value at least once."""
    grid = list(itertools.product(
        GROUP_KINDS, KERNEL_SIZES, (0, 3), (1, 2), (1, 2), ("valid", "same", 1, (2, 1)),
        PADDING_MODES, (True, False)))
    rng = np.random.default_rng(20220101)
    chosen = [grid[i] for i in sorted(rng.choice(len(grid), size=72, replace=False))]
    # Guarantee every group kind meets every kernel size, with D_mul > M*N where it exists.
    for index, (kind, kernel) in enumerate(itertools.product(GROUP_KINDS, KERNEL_SIZES)):
        chosen.append((kind, kernel, 3, 1 + index % 2, 1, "same", PADDING_MODES[index % 4],
                       bool(index % 2)))
    cases = []
    seen = set()
    for kind, kernel, extra, stride, dilation, padding, mode, bias in chosen:
        if kernel == (1, 1):
            extra = 0  # a 1x1 kernel has no D: D_mul is 1
        pad_name = padding if isinstance(padding, str) else "_".join(map(str, np.atleast_1d(padding)))
        name = (f"{kind}-k{kernel[0]}x{kernel[1]}-dmul+{extra}-s{stride}-d{dilation}-"
                f"p{pad_name}"
                f"-{mode}-{'bias' if bias else 'nobias'}")
        if name in seen:
            continue
        seen.add(name)
        cases.append(_case(name, kind, kernel, extra, stride, dilation, padding, mode, bias))
    return cases


# 1-D and 3-D: each group kind with kernels of one element, the smallest odd kernel and a
# larger or uneven one; D_mul equal to and above the kernel volume; stride, dilation, every
# padding kind (causal in 1-D) and padding mode; bias on and off.
RANK_KERNEL_SIZES = {1: ((1,), (3,), (5,)), 3: ((1, 1, 1), (3, 3, 3), (1, 3, 3), (3, 1, 2))}
RANK_PADDINGS = {1: ("valid", "same", "causal", 1), 3: ("valid", "same", 1, (1, 0, 1))}
RANK_INPUT_SIZES = {1: (13,), 3: (6, 7, 5)}


def rank_cases() -> list[Case]:
    """The fixed 1-D and 3-D cases: a seeded sample of each rank's grid plus every group kind
    with every kernel size."""
    cases = []
    for rank in (1, 3):
        grid = list(itertools.product(
            GROUP_KINDS, RANK_KERNEL_SIZES[rank], (0, 3), (1, 2), (1, 2), RANK_PADDINGS[rank],
            PADDING_MODES, (True, False)))
        rng = np.random.default_rng(20221 + rank)
        chosen = [grid[i] for i in sorted(rng.choice(len(grid), size=16, replace=False))]
        for index, (kind, kernel) in enumerate(itertools.product(GROUP_KINDS,
                                                                 RANK_KERNEL_SIZES[rank])):
            chosen.append((kind, kernel, 3, 1 + index % 2, 1, "same", PADDING_MODES[index % 4],
                           bool(index % 2)))
        seen = set()
        for kind, kernel, extra, stride, dilation, padding, mode, bias in chosen:
            volume = int(np.prod(kernel))
            if volume == 1:
                extra = 0
            if padding == "same" and stride > 1:
                stride = 1  # 'same' with a stride is TensorFlow's alone; keep cases portable
            pad_name = (padding if isinstance(padding, str)
                        else "_".join(map(str, np.atleast_1d(padding))))
            name = (f"{rank}d-{kind}-k{'x'.join(map(str, kernel))}-dmul+{extra}-s{stride}-"
                    f"d{dilation}-p{pad_name}-{mode}-{'bias' if bias else 'nobias'}")
            if name in seen:
                continue
            seen.add(name)
            in_channels, out_channels, groups = channels_for(kind, 2, 3, 3)
            spec = ConvSpec(in_channels, out_channels, kernel, stride, padding, dilation, groups,
                            bias=bias, padding_mode=mode, D_mul=1 if volume == 1 else
                            volume + extra, rank=rank)
            cases.append(Case(name, spec, (2, in_channels) + RANK_INPUT_SIZES[rank]))
    return cases


def cross_cases() -> list[Case]:
    """Every case the cross-framework check compares: the 2-D set, then 1-D and 3-D."""
    return property_cases() + rank_cases()


def digest(cases: list[Case]) -> str:
    """A short fingerprint of a case set (names and specs)."""
    payload = json.dumps([(case.name, case.spec.to_dict(), case.input_shape) for case in cases],
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
