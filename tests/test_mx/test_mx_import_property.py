"""Hypothesis: a failed Gluon import (portable file or legacy weights) changes nothing, for
random nets and failure points (the shared contract in tests/import_contract.py)."""

from __future__ import annotations

import numpy as np
from mxnet.gluon import nn

import doconv_mx
from doconv_mx.layer import LAYER_CLASSES
from import_contract import Adapter, contract_tests, random_params


def build(specs, unready, seed):
    """One DO-Conv layer per spec in a HybridSequential (never called); the layers in
    ``unready`` are left uninitialized."""
    rng = np.random.default_rng(seed)
    net = nn.HybridSequential()
    for index, spec in enumerate(specs):
        layer = LAYER_CLASSES[spec.rank](spec.out_channels, spec.kernel_size,
                                         padding=(0,) * spec.rank, groups=spec.groups,
                                         use_bias=spec.bias, in_channels=spec.in_channels,
                                         D_mul=spec.D_mul)
        net.add(layer)
        if index not in unready:
            layer.initialize()
            layer.set_params(random_params(spec, rng))
    return net


def values(net):
    return [p.data().asnumpy().copy() for p in net.collect_params().values()
            if p._data is not None]


ADAPTER = Adapter(doconv_mx, build, values, unready_kinds=("uninitialized",),
                  legacy_layout="gluon-legacy")
test_a_failed_import_params_changes_nothing, test_a_failed_load_legacy_changes_nothing = \
    contract_tests(ADAPTER)
