"""MXNet's artifacts for the cross-framework suite (tox env ``cross`` compares them).

Written to $DOCONV_ARTIFACTS (tox sets it) or, outside tox, to a temporary folder; either
way this framework's results are checked against the NumPy reference here too.
"""

import os

import mxnet as mx
import numpy as np
from mxnet import autograd

from doconv_core import DOConvParams
from doconv_core.testing import crosscheck
from doconv_core.testing.cases import cross_cases
from doconv_mx import DOConvND
from mx_helpers import unsupported_reason as gluon_unsupported

FRAMEWORK = "mx"


def unsupported_reason(case, dtype):
    """The adapter's own reason: Gluon pads with zeros only, each axis alike on both sides by
    a fixed amount ('same' only with stride 1 and even (kernel-1)*dilation; no 'causal')."""
    return gluon_unsupported(case.spec)


def compute(case, dtype, inputs, R):
    params = DOConvParams(case.spec, W=inputs["W"], D=inputs["D"], bias=inputs["bias"])
    layer = DOConvND.from_params(params)  # the layer of the case's rank
    x = mx.nd.array(inputs["x"], dtype=dtype)
    x.attach_grad()
    with autograd.record():
        y = layer(x)
        loss = (y * mx.nd.array(R, dtype=dtype)).sum()
    loss.backward()

    def grad(param):
        return None if param is None else param.grad().asnumpy()

    return {"output": y.asnumpy(), "kernel": layer.to_params().kernel(),
            "grad_x": x.grad.asnumpy(), "grad_D": grad(layer.D), "grad_W": grad(layer.W),
            "grad_bias": grad(layer.bias)}


def test_write_cross_artifacts(tmp_path):
    directory = os.environ.get("DOCONV_ARTIFACTS") or str(tmp_path)
    crosscheck.produce_artifacts(directory, FRAMEWORK, compute, unsupported_reason)
    artifacts, failures = crosscheck.self_check(directory, FRAMEWORK)
    assert not failures, "\n".join(failures)
    computed = {case for case, _ in artifacts.results}
    assert len(computed) >= 50
    ranks = {case.spec.rank for case in cross_cases() if case.name in computed}
    assert ranks == {1, 2, 3}
    # Every case is computed or listed as unsupported, with both dtypes alike.
    for case in cross_cases():
        keys = {f"{case.name}@{dtype}" for dtype in crosscheck.DTYPES}
        assert (case.name in computed) != (keys <= set(artifacts.unsupported)), case.name
    assert np.isfinite(next(iter(artifacts.results.values()))["output"]).all()
