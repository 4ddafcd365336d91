"""Hypothesis: random Keras-expressible layer specs agree with the NumPy reference."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import keras

import doconv_core
from doconv_core import DOConvParams
from doconv_tf import DOConv2D
from kutils import to_keras, to_nchw
from strategies import input_shape_for, layer_specs


def keras_expressible(spec) -> bool:
    return isinstance(spec.padding, str) and not (max(spec.stride) > 1 and max(spec.dilation) > 1)


@settings(max_examples=25)
@given(spec=layer_specs(padding_modes=("zeros",)).filter(keras_expressible),
       data_format=st.sampled_from(["channels_last", "channels_first"]),
       seed=st.integers(0, 2**16))
def test_random_specs_match_reference(spec, data_format, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape_for(spec)).astype(np.float32)
    D = (0.5 * rng.standard_normal(spec.D_shape)).astype(np.float32) if spec.has_D else None
    W = rng.standard_normal(spec.W_shape).astype(np.float32) / np.sqrt(spec.fan_in)
    bias = rng.standard_normal(spec.out_channels).astype(np.float32) if spec.bias else None
    layer = DOConv2D.from_params(DOConvParams(spec, W, D, bias), data_format=data_format)
    as64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    expected = doconv_core.doconv2d(as64(x), as64(D), as64(W), as64(bias), spec)
    got = to_nchw(keras.ops.convert_to_numpy(layer(to_keras(x, data_format))), data_format)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert layer.to_params().spec == dataclasses.replace(spec, padding=spec.padding)
