"""Hypothesis: a failed Keras import (portable file or legacy weights) changes nothing, for
random models and failure points (the shared contract in tests/import_contract.py)."""

from __future__ import annotations

import numpy as np

import keras

import doconv_tf
from import_contract import Adapter, contract_tests, random_params
from kutils import BACKEND, build_in_inference_mode, layer_class, values


def build(specs, unready, seed):
    """One DO-Conv layer per spec, each built alone (the model is never called); the layers
    in ``unready`` are left unbuilt or built under torch.inference_mode()."""
    rng = np.random.default_rng(seed)
    layers = []
    for index, spec in enumerate(specs):
        layer = layer_class(spec.rank)(spec.out_channels, spec.kernel_size, groups=spec.groups,
                                       use_bias=spec.bias, D_mul=spec.D_mul, name=f"l{index}",
                                       kernel_initializer="zeros")
        shape = (None, *(k + 2 for k in spec.kernel_size), spec.in_channels)
        how = unready.get(index)
        if how == "inference":
            build_in_inference_mode(layer, shape)
        elif how is None:
            layer.build(shape)
            layer.set_params(random_params(spec, rng))
        layers.append(layer)
    return keras.Sequential(layers)


ADAPTER = Adapter(doconv_tf, build, values,
                  unready_kinds=("unbuilt",) + (("inference",) if BACKEND == "torch" else ()),
                  legacy_layout="tf-legacy")
test_a_failed_import_params_changes_nothing, test_a_failed_load_legacy_changes_nothing = \
    contract_tests(ADAPTER)
