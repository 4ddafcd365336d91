"""ConvSpec with 1 and 3 spatial axes: rank, per-rank tuples, 'causal' padding, sizes,
normalisation and serialisation; one pinned message per bad argument."""

import dataclasses

import numpy as np
import pytest

from doconv_core import ConvSpec, check_rank

def test_rank_defaults_to_two_and_is_keyword_only():
    assert ConvSpec(4, 6, 3).rank == 2
    assert ConvSpec(4, 6, 3).kernel_size == (3, 3)
    field = {f.name: f for f in dataclasses.fields(ConvSpec)}["rank"]
    assert field.kw_only and field.default == 2
    with pytest.raises(TypeError):
        ConvSpec(4, 6, 3, 1, 0, 1, 1, True, "zeros", 1)  # rank cannot be passed by position


def test_normalises_arguments_in_one_dimension():
    spec = ConvSpec(4, 6, np.int64(3), rank=1)  # defaults fit every rank
    assert spec.kernel_size == (3,) and spec.stride == (1,) and spec.dilation == (1,)
    assert spec.padding == (0,) and spec.D_mul == 3
    spec = ConvSpec(4, 6, [5], stride=2, padding="CAUSAL", dilation=(3,), groups=2, rank=1)
    assert spec.kernel_size == (5,) and spec.stride == (2,) and spec.dilation == (3,)
    assert spec.padding == "causal"
    assert spec.mn == 5 and spec.D_shape == (4, 5, 5) and spec.W_shape == (6, 2, 5)
    assert spec.kernel_shape == (6, 2, 5) and spec.fan_in == 10
    assert ConvSpec(4, 6, 1, rank=1).D_shape is None and ConvSpec(4, 6, 1, rank=1).D_mul == 1
    assert ConvSpec(4, 6, 3, padding=2, rank=1).padding == (2,)


def test_normalises_arguments_in_three_dimensions():
    spec = ConvSpec(4, 6, 3, rank=3)
    assert spec.kernel_size == (3, 3, 3) and spec.stride == (1, 1, 1)
    assert spec.padding == (0, 0, 0) and spec.dilation == (1, 1, 1)
    assert spec.mn == 27 and spec.D_mul == 27 and spec.D_shape == (4, 27, 27)
    spec = ConvSpec(4, 6, (1, 3, 2), stride=[2, 1, 1], padding=(0, 1, 2), dilation=2,
                    groups=2, D_mul=np.int32(8), rank=3)
    assert spec.kernel_size == (1, 3, 2) and spec.stride == (2, 1, 1)
    assert spec.padding == (0, 1, 2) and spec.dilation == (2, 2, 2)
    assert spec.D_mul == 8 and type(spec.D_mul) is int
    assert spec.kernel_shape == (6, 2, 1, 3, 2) and spec.W_shape == (6, 2, 8)
    assert spec.D_shape == (4, 6, 8) and spec.fan_in == 12
    assert ConvSpec(4, 6, 1, rank=3).has_D is False


@pytest.mark.parametrize("rank, message", [
    (4, r"rank must be 1, 2 or 3 \(spatial axes\), got 4"),
    (0, r"rank must be 1, 2 or 3 \(spatial axes\), got 0"),
    (True, r"rank must be 1, 2 or 3 \(spatial axes\), got True"),
    (2.0, r"rank must be 1, 2 or 3 \(spatial axes\), got 2.0"),
    ("2", r"rank must be 1, 2 or 3 \(spatial axes\), got '2'"),
    (None, r"rank must be 1, 2 or 3 \(spatial axes\), got None"),
])
def test_rejects_bad_ranks(rank, message):
    with pytest.raises(ValueError, match=message):
        ConvSpec(4, 6, 3, rank=rank)
    with pytest.raises(ValueError, match=message):
        check_rank(rank)


@pytest.mark.parametrize("rank, changes, message", [
    # One spatial axis.
    (1, dict(kernel_size=(3, 3)), r"kernel_size must be an integer >= 1 or a sequence of one "
                                  r"of them, got 2 values: \(3, 3\)"),
    (1, dict(kernel_size=0), r"kernel_size must be an integer >= 1 or a sequence of one of "
                             r"them, got 0"),
    (1, dict(kernel_size=(0,)), r"kernel_size must be .* a sequence of one of them, got \(0,\)"),
    (1, dict(stride=(1, 2)), r"stride must be an integer >= 1 or a sequence of one of them, "
                             r"got 2 values: \(1, 2\)"),
    (1, dict(dilation=[]), r"dilation must be .* a sequence of one of them, got 0 values: \[\]"),
    (1, dict(padding=(1, 1)), r"padding must be 'valid', 'same', 'causal', an integer >= 0 or "
                              r"a sequence of one of them, got \(1, 1\)"),
    (1, dict(padding="full"), r"padding must be 'valid', 'same', 'causal', .* got 'full'"),
    (1, dict(D_mul=2), r"D_mul must be >= kernel length = 3, got 2"),
    (1, dict(kernel_size=1, D_mul=2),
     r"D_mul must be 1 or None for a length-1 kernel \(it has no depthwise part\), got 2"),
    # Three spatial axes.
    (3, dict(kernel_size=(3, 3)), r"kernel_size must be an integer >= 1 or a triple of them, "
                                  r"got 2 values: \(3, 3\)"),
    (3, dict(kernel_size=(3, 3, 0)), r"kernel_size must be an integer >= 1 or a triple of "
                                     r"them, got \(3, 3, 0\)"),
    (3, dict(stride=0), r"stride must be an integer >= 1 or a triple of them, got 0"),
    (3, dict(dilation=(1, 1)), r"dilation must be an integer >= 1 or a triple of them, got 2 "
                               r"values"),
    (3, dict(padding=(1, 1)), r"padding must be 'valid', 'same', an integer >= 0 or a triple "
                              r"of them, got \(1, 1\)"),
    (3, dict(padding=-1), r"padding must be 'valid', 'same', an integer >= 0 or a triple of "
                          r"them, got -1"),
    (3, dict(D_mul=26), r"D_mul must be >= kernel volume = 27 for a 3x3x3 kernel, got 26"),
    (3, dict(kernel_size=(1, 3, 2), D_mul=5),
     r"D_mul must be >= kernel volume = 6 for a 1x3x2 kernel, got 5"),
    (3, dict(kernel_size=1, D_mul=4),
     r"D_mul must be 1 or None for a 1x1x1 kernel \(it has no depthwise part\), got 4"),
    # 'causal' is for one spatial axis only.
    (3, dict(padding="causal"), r"padding must be 'valid', 'same', an integer >= 0 or a triple "
                                r"of them, got 'causal'"),
    (2, dict(padding="causal"), r"padding must be 'valid', 'same', an integer >= 0 or a pair "
                                r"of them, got 'causal'"),
    (2, dict(kernel_size=(3,)), r"kernel_size must be an integer >= 1 or a pair of them, got 1 "
                                r"values: \(3,\)"),
])
def test_rejects_bad_arguments_per_rank(rank, changes, message):
    arguments = dict(in_channels=4, out_channels=6, kernel_size=3, rank=rank)
    arguments.update(changes)
    with pytest.raises(ValueError, match=message):
        ConvSpec(**arguments)


@pytest.mark.parametrize("size, kernel, stride, dilation", [
    (7, 3, 1, 1), (7, 3, 2, 1), (8, 3, 2, 2), (5, 4, 3, 1), (6, 1, 2, 1), (1, 3, 1, 3),
])
def test_causal_padding_pads_the_past_only(size, kernel, stride, dilation):
    spec = ConvSpec(1, 1, kernel, stride, "causal", dilation, rank=1)
    assert spec.resolve_padding((size,)) == (((kernel - 1) * dilation, 0),)
    assert spec.fixed_padding() == (((kernel - 1) * dilation, 0),)
    assert spec.output_size((size,)) == (-(-size // stride),)  # Keras: ceil(n / s)
    assert spec.output_size((None,)) == (None,)


@pytest.mark.parametrize("size, kernel, stride, dilation, expected", [
    (7, 3, 1, 1, (1, 1)), (7, 4, 1, 1, (1, 2)), (8, 3, 2, 1, (0, 1)), (7, 3, 1, 2, (2, 2)),
    (6, 4, 3, 1, (0, 1)),
])
def test_same_padding_follows_tensorflow_per_axis(size, kernel, stride, dilation, expected):
    assert ConvSpec(1, 1, kernel, stride, "same", dilation, rank=1).resolve_padding(
        (size,)) == (expected,)
    # In 3-D each axis is padded on its own: the 2-D pins on axis 0 and 2, a plain axis 1.
    spec = ConvSpec(1, 1, (kernel, 1, kernel), (stride, 1, stride), "same",
                    (dilation, 1, dilation), rank=3)
    assert spec.resolve_padding((size, 4, size)) == (expected, (0, 0), expected)
    assert spec.output_size((size, 4, size)) == (-(-size // stride), 4, -(-size // stride))


def test_explicit_and_valid_padding_output_sizes():
    assert ConvSpec(1, 1, 3, 2, 1, rank=1).output_size((7,)) == (4,)
    assert ConvSpec(1, 1, (3, 1, 2), (2, 1, 1), (1, 0, 2), (1, 1, 3), rank=3).output_size(
        (7, 5, 6)) == (4, 5, 7)
    assert ConvSpec(1, 1, 3, 1, "valid", 2, rank=3).output_size((7, None, 9)) == (3, None, 5)
    with pytest.raises(ValueError, match=r"an input of spatial size \(4, 5, 4\) is too small "
                                         r"for kernel_size \(3, 3, 3\) with dilation \(2, 2, 2\)"):
        ConvSpec(1, 1, 3, 1, "valid", 2, rank=3).output_size((4, 5, 4))
    with pytest.raises(ValueError, match="padding 'same' with stride \\(1, 2, 1\\) depends on "
                                         "the input size"):
        ConvSpec(1, 1, 3, (1, 2, 1), "same", rank=3).fixed_padding()
    assert ConvSpec(1, 1, 3, 1, "same", (1, 2, 3), rank=3).fixed_padding() == (
        (1, 1), (2, 2), (3, 3))


def test_same_function_normalizes_padding_spellings_in_any_rank():
    # 'same' at stride 1 with an even total is explicit padding of half of it.
    assert ConvSpec(4, 4, 3, padding="same", rank=1).same_function(
        ConvSpec(4, 4, 3, padding=1, rank=1))
    assert ConvSpec(4, 4, 5, padding="same", dilation=2, rank=1).same_function(
        ConvSpec(4, 4, 5, padding=4, dilation=2, rank=1))
    assert ConvSpec(4, 4, (3, 1, 5), padding="same", rank=3).same_function(
        ConvSpec(4, 4, (3, 1, 5), padding=(1, 0, 2), rank=3))
    assert ConvSpec(4, 4, 3, padding=(0, 0, 0), padding_mode="reflect", rank=3).same_function(
        ConvSpec(4, 4, 3, padding="valid", rank=3))
    assert ConvSpec(None, 4, 3, rank=1).same_function(ConvSpec(6, 4, 3, rank=1))
    # Not the same function: strided or odd 'same', another mode, another rank.
    assert not ConvSpec(4, 4, 3, stride=2, padding="same", rank=1).same_function(
        ConvSpec(4, 4, 3, stride=2, padding=1, rank=1))
    assert not ConvSpec(4, 4, (3, 2, 3), padding="same", rank=3).same_function(
        ConvSpec(4, 4, (3, 2, 3), padding=(1, 1, 1), rank=3))
    assert not ConvSpec(4, 4, 3, padding=1, padding_mode="circular", rank=3).same_function(
        ConvSpec(4, 4, 3, padding=1, rank=3))
    assert not ConvSpec(4, 4, 1, rank=1).same_function(ConvSpec(4, 4, 1, rank=3))
    assert not ConvSpec(4, 4, 1, rank=2).same_function(ConvSpec(4, 4, 1, rank=3))


def test_causal_normalisation():
    # A kernel of one tap pads nothing: 'causal' is then 'valid' (and its mode irrelevant).
    causal_one = ConvSpec(4, 4, 1, padding="causal", padding_mode="reflect", rank=1)
    assert causal_one.normalized() == ConvSpec(4, 4, 1, padding="valid", rank=1)
    assert causal_one.same_function(ConvSpec(4, 4, 1, padding=0, rank=1))
    assert causal_one.same_function(ConvSpec(4, 4, 1, padding="same", rank=1))
    # With a longer kernel 'causal' is one-sided: neither 'same' nor any explicit padding.
    causal = ConvSpec(4, 4, 3, padding="causal", rank=1)
    assert causal.normalized().padding == "causal"
    assert not causal.same_function(ConvSpec(4, 4, 3, padding="same", rank=1))
    assert not causal.same_function(ConvSpec(4, 4, 3, padding=1, rank=1))
    assert not causal.same_function(ConvSpec(4, 4, 3, padding=2, rank=1))
    assert causal.same_function(ConvSpec(4, 4, 3, padding="CAUSAL", rank=1))
    assert not causal.same_function(dataclasses.replace(causal, padding_mode="reflect"))


def test_string_padding_in_any_rank():
    assert ConvSpec(4, 4, 3, padding=1, rank=1).string_padding() == "same"
    assert ConvSpec(4, 4, 3, padding=0, rank=1).string_padding() == "valid"
    assert ConvSpec(4, 4, 3, padding=2, rank=1).string_padding() is None
    assert ConvSpec(4, 4, 3, padding="causal", rank=1).string_padding() == "causal"
    assert ConvSpec(4, 4, 1, padding="causal", rank=1).string_padding() == "causal"
    assert ConvSpec(4, 4, 3, padding=(1, 1, 1), rank=3).string_padding() == "same"
    assert ConvSpec(4, 4, (3, 1, 3), padding=(1, 0, 1), rank=3).string_padding() == "same"
    assert ConvSpec(4, 4, 3, padding=(1, 0, 1), rank=3).string_padding() is None
    assert ConvSpec(4, 4, 3, padding=(1, 1, 1), padding_mode="reflect",
                    rank=3).string_padding() is None


def test_round_trips_through_dict_with_rank():
    specs = (
        ConvSpec(4, 6, 3, 2, "causal", 2, 2, bias=False, padding_mode="reflect", D_mul=5,
                 rank=1),
        ConvSpec(4, 6, 1, padding=(1,), rank=1),
        ConvSpec(3, 3, (3, 1, 2), (1, 2, 1), (1, 0, 1), (2, 1, 1), 3,
                 padding_mode="circular", D_mul=7, rank=3),
        ConvSpec(3, 6, 3, padding="same", rank=3),
        ConvSpec(4, 6, (3, 1), 2, "same"),
    )
    for spec in specs:
        config = spec.to_dict()
        assert config["rank"] == spec.rank
        assert all(type(config[key]) is list and len(config[key]) == spec.rank
                   for key in ("kernel_size", "stride", "dilation"))
        assert ConvSpec.from_dict(config) == spec
        assert ConvSpec.from_dict(dict(config)).rank == spec.rank


def test_a_dict_without_rank_loads_as_two_dimensional():
    config = ConvSpec(4, 6, (3, 1), 2, (1, 0), 1, 2, padding_mode="reflect").to_dict()
    del config["rank"]
    spec = ConvSpec.from_dict(config)
    assert spec.rank == 2 and spec == ConvSpec(4, 6, (3, 1), 2, (1, 0), 1, 2,
                                               padding_mode="reflect")
    # A rank-3 dict that lost its rank is refused, not silently read as something else.
    config = ConvSpec(4, 6, 3, rank=3).to_dict()
    del config["rank"]
    with pytest.raises(ValueError, match=r"kernel_size must be an integer >= 1 or a pair of "
                                         r"them, got 3 values"):
        ConvSpec.from_dict(config)
    with pytest.raises(ValueError, match=r"rank must be 1, 2 or 3 \(spatial axes\), got 5"):
        ConvSpec.from_dict(dict(ConvSpec(4, 6, 3).to_dict(), rank=5))


def test_with_in_channels_keeps_the_rank():
    spec = ConvSpec(None, 6, 3, groups=3, padding="causal", rank=1).with_in_channels(6)
    assert spec.rank == 1 and spec.padding == "causal" and spec.W_shape == (6, 2, 3)
    spec = ConvSpec(None, 6, 3, rank=3).with_in_channels(2)
    assert spec.rank == 3 and spec.D_shape == (2, 27, 27)


def test_sizes_of_another_rank_are_refused():
    with pytest.raises(ValueError, match=r"a 3-D layer's input has 3 spatial size\(s\), got 2"):
        ConvSpec(1, 1, 3, rank=3).output_size((7, 7))
    with pytest.raises(ValueError, match=r"a 1-D layer's input has 1 spatial size\(s\), got 2"):
        ConvSpec(1, 1, 3, rank=1, padding="same").resolve_padding((7, 7))


def test_rank_takes_numpy_integers():
    assert ConvSpec(1, 1, 3, rank=np.int64(1)).rank == 1
