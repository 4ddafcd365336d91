"""Hypothesis strategies for DO-Conv layers (NumPy only)."""

from __future__ import annotations

from hypothesis import strategies as st

from doconv_core import PADDING_MODES, ConvSpec
from doconv_core.testing.cases import GROUP_KINDS, KERNEL_SIZES, channels_for

# Kernel sizes per rank; 2-D uses the fixed case set's. Each has one element (no D) and
# several, odd and even, equal and unequal per axis.
RANK_KERNEL_SIZES = {
    1: ((1,), (2,), (3,), (5,)),
    2: KERNEL_SIZES,
    3: ((1, 1, 1), (3, 3, 3), (1, 3, 3), (3, 1, 2), (2, 2, 1)),
}


@st.composite
def layer_specs(draw, padding_modes=PADDING_MODES, *, rank: int = 2) -> ConvSpec:
    """A ConvSpec with ``rank`` spatial axes. For rank 2 the draws are exactly the original
    2-D strategy's (same order, same ranges), so 2-D callers see the same examples; rank 1
    adds padding 'causal'."""
    kind = draw(st.sampled_from(GROUP_KINDS))
    in_channels, out_channels, groups = channels_for(
        kind, draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kernel_size = draw(st.sampled_from(RANK_KERNEL_SIZES[rank]))
    mn = 1
    for k in kernel_size:
        mn *= k
    D_mul = draw(st.sampled_from([None, mn, mn + draw(st.integers(1, 12))])) if mn > 1 else None
    explicit = (st.integers(0, 2), st.tuples(*[st.integers(0, 2)] * rank))
    if rank == 2:
        padding = draw(st.one_of(st.sampled_from(["valid", "same"]), *explicit))
    else:  # strings about half the time, so 'same' and 'causal' are drawn often enough
        strings = ["valid", "same"] + (["causal"] if rank == 1 else [])
        padding = draw(st.sampled_from(strings) if draw(st.booleans())
                       else st.one_of(*explicit))
    return ConvSpec(
        in_channels, out_channels, kernel_size,
        stride=draw(st.tuples(*[st.integers(1, 2)] * rank)),
        padding=padding,
        dilation=draw(st.tuples(*[st.integers(1, 2)] * rank)),
        groups=groups, bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(padding_modes)), D_mul=D_mul, rank=rank)


def input_shape_for(spec: ConvSpec, batch: int = 2) -> tuple[int, ...]:
    """(batch, C_in, *spatial), big enough for the dilated kernel and for reflect padding
    (pad < size): (k-1)*d + 4 on the first spatial axis, + 3 on the others."""
    spatial = tuple((k - 1) * d + (4 if axis == 0 else 3)
                    for axis, (k, d) in enumerate(zip(spec.kernel_size, spec.dilation)))
    return (batch, spec.in_channels) + spatial


def fuzz_settings(examples: int, **kwargs):
    """Hypothesis settings for a fuzz test: ``examples`` examples under the default "ci"
    profile (derandomized: the same examples every run), ``examples`` times
    DOCONV_FUZZ_SCALE (100 unless set) under HYPOTHESIS_PROFILE=long. See tests/conftest.py."""
    import os

    from hypothesis import settings

    scale = 1
    if os.environ.get("HYPOTHESIS_PROFILE") == "long":
        scale = int(os.environ.get("DOCONV_FUZZ_SCALE", "100"))
    return settings(max_examples=examples * scale, **kwargs)
