"""Hypothesis strategies for DO-Conv layers (NumPy only)."""

from __future__ import annotations

from hypothesis import strategies as st

from doconv_core import PADDING_MODES, ConvSpec
from doconv_core.testing.cases import GROUP_KINDS, KERNEL_SIZES, channels_for


@st.composite
def layer_specs(draw, padding_modes=PADDING_MODES) -> ConvSpec:
    kind = draw(st.sampled_from(GROUP_KINDS))
    in_channels, out_channels, groups = channels_for(
        kind, draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kernel_size = draw(st.sampled_from(KERNEL_SIZES))
    mn = kernel_size[0] * kernel_size[1]
    D_mul = draw(st.sampled_from([None, mn, mn + draw(st.integers(1, 12))])) if mn > 1 else None
    padding = draw(st.one_of(
        st.sampled_from(["valid", "same"]), st.integers(0, 2),
        st.tuples(st.integers(0, 2), st.integers(0, 2))))
    return ConvSpec(
        in_channels, out_channels, kernel_size,
        stride=draw(st.tuples(st.integers(1, 2), st.integers(1, 2))),
        padding=padding,
        dilation=draw(st.tuples(st.integers(1, 2), st.integers(1, 2))),
        groups=groups, bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(padding_modes)), D_mul=D_mul)


def input_shape_for(spec: ConvSpec, batch: int = 2) -> tuple[int, int, int, int]:
    """Big enough for the dilated kernel and for reflect padding (pad < size)."""
    (M, N), (dh, dw) = spec.kernel_size, spec.dilation
    return (batch, spec.in_channels, (M - 1) * dh + 4, (N - 1) * dw + 3)
