"""ConvSpec: normalisation, derived shapes, and one pinned message per bad argument."""

import numpy as np
import pytest

from doconv_core import ConvSpec

GOOD = dict(in_channels=4, out_channels=6, kernel_size=3)


def test_normalises_arguments():
    spec = ConvSpec(4, 6, np.int64(3), stride=2, padding="SAME", dilation=[1, 2], groups=2,
                    D_mul=np.int32(12))
    assert spec.kernel_size == (3, 3) and spec.stride == (2, 2) and spec.dilation == (1, 2)
    assert spec.padding == "same" and spec.D_mul == 12 and type(spec.D_mul) is int
    assert spec.D_shape == (4, 9, 12) and spec.W_shape == (6, 2, 12)
    assert spec.kernel_shape == (6, 2, 3, 3) and spec.fan_in == 18
    assert ConvSpec(4, 6, (1, 3)).D_mul == 3
    assert ConvSpec(4, 6, 1).D_mul == 1 and ConvSpec(4, 6, 1).D_shape is None
    assert ConvSpec(4, 6, 1, D_mul=1).has_D is False
    assert ConvSpec(4, 6, 3, padding=(1, 2)).padding == (1, 2)


def test_deferred_in_channels():
    spec = ConvSpec(None, 6, 3, groups=3)
    with pytest.raises(ValueError, match="in_channels is not known yet"):
        spec.W_shape
    assert spec.with_in_channels(6).W_shape == (6, 2, 9)
    with pytest.raises(ValueError, match=r"in_channels must be divisible by groups \(3\), got 4"):
        spec.with_in_channels(4)


def test_round_trips_through_dict():
    for spec in (ConvSpec(4, 6, (3, 1), 2, "same", 1, 2, bias=False, padding_mode="circular",
                          D_mul=5),
                 ConvSpec(3, 3, 5, padding=(2, 1), groups=3)):
        assert ConvSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match=r"unknown \['colour'\]"):
        ConvSpec.from_dict(dict(GOOD, colour=1))


@pytest.mark.parametrize("changes, message", [
    (dict(in_channels=0), r"in_channels must be an integer >= 1, got 0"),
    (dict(in_channels=2.0), r"in_channels must be an integer >= 1, got 2.0 \(float\)"),
    (dict(in_channels=True), r"in_channels must be an integer >= 1, got True \(bool\)"),
    (dict(out_channels=-1), r"out_channels must be an integer >= 1, got -1"),
    (dict(out_channels="8"), r"out_channels must be an integer >= 1, got '8' \(str\)"),
    (dict(kernel_size=0), r"kernel_size must be an integer >= 1 or a pair of them, got 0"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size must be .* got 3 values: \(3, 3, 3\)"),
    (dict(kernel_size=(3, 0)), r"kernel_size must be an integer >= 1 or a pair of them, got \(3, 0\)"),
    (dict(kernel_size="3"), r"kernel_size must be .* got '3' \(str\)"),
    (dict(stride=0), r"stride must be an integer >= 1 or a pair of them, got 0"),
    (dict(stride=(1, 1.5)), r"stride must be .* got \(1, 1.5\)"),
    (dict(dilation=0), r"dilation must be an integer >= 1 or a pair of them, got 0"),
    (dict(padding=-1), r"padding must be 'valid', 'same', an integer >= 0 or a pair of them, got -1"),
    (dict(padding="full"), r"padding must be 'valid', 'same', .* got 'full'"),
    (dict(padding=(1, 1, 1, 1)), r"padding must be 'valid', 'same', .* got \(1, 1, 1, 1\)"),
    (dict(groups=0), r"groups must be an integer >= 1, got 0"),
    (dict(groups=4), r"out_channels must be divisible by groups \(4\), got 6"),
    (dict(groups=3), r"in_channels must be divisible by groups \(3\), got 4"),
    (dict(bias=1), r"bias must be True or False, got 1 \(int\)"),
    (dict(padding_mode="mirror"),
     r"padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular', got 'mirror'"),
    (dict(D_mul=4), r"D_mul must be >= kernel height\*width = 9 for a 3x3 kernel, got 4"),
    (dict(D_mul=0), r"D_mul must be an integer >= 1, got 0"),
    (dict(D_mul=9.0), r"D_mul must be an integer >= 1, got 9.0 \(float\)"),
    (dict(kernel_size=1, D_mul=4),
     r"D_mul must be 1 or None for a 1x1 kernel \(it has no depthwise part\), got 4"),
    (dict(kernel_size=(1, 3), D_mul=2), r"D_mul must be >= kernel height\*width = 3 for a 1x3"),
])
def test_rejects_bad_arguments(changes, message):
    arguments = dict(GOOD, **changes)
    with pytest.raises(ValueError, match=message):
        ConvSpec(**arguments)


def test_wrong_input_channels_message():
    with pytest.raises(ValueError, match=r"input must have 4 channels \(the layer's in_channels\), got 3"):
        ConvSpec(**GOOD).check_input_channels(3)


@pytest.mark.parametrize("size, kernel, stride, dilation, expected", [
    (7, 3, 1, 1, (1, 1)), (7, 4, 1, 1, (1, 2)), (7, 3, 2, 1, (1, 1)), (8, 3, 2, 1, (0, 1)),
    (7, 3, 1, 2, (2, 2)), (5, 1, 2, 1, (0, 0)), (6, 5, 3, 1, (1, 1)), (6, 4, 3, 1, (0, 1)),
])
def test_same_padding_follows_tensorflow(size, kernel, stride, dilation, expected):
    spec = ConvSpec(1, 1, kernel, stride, "same", dilation)
    assert spec.resolve_padding((size, size)) == (expected, expected)
    assert spec.output_size((size, size)) == (-(-size // stride),) * 2


def test_explicit_and_valid_padding_output_sizes():
    assert ConvSpec(1, 1, 3, 2, (1, 0)).output_size((7, 7)) == (4, 3)
    assert ConvSpec(1, 1, 3, 1, "valid", 2).output_size((7, 9)) == (3, 5)


def test_same_function_normalizes_padding_spellings():
    assert ConvSpec(4, 4, 3, padding="same").same_function(ConvSpec(4, 4, 3, padding=1))
    assert ConvSpec(4, 4, 3, padding=(0, 0), padding_mode="reflect").same_function(
        ConvSpec(4, 4, 3, padding="valid"))
    assert ConvSpec(None, 4, 3).same_function(ConvSpec(6, 4, 3))
    # 'same' with a stride or an odd total depends on the input size: not explicit padding.
    assert not ConvSpec(4, 4, 3, stride=2, padding="same").same_function(
        ConvSpec(4, 4, 3, stride=2, padding=1))
    assert not ConvSpec(4, 4, 2, padding="same").same_function(ConvSpec(4, 4, 2, padding=1))
    assert not ConvSpec(4, 4, 3, padding=1, padding_mode="reflect").same_function(
        ConvSpec(4, 4, 3, padding=1))
    assert not ConvSpec(4, 4, 3, D_mul=10).same_function(ConvSpec(4, 4, 3))
