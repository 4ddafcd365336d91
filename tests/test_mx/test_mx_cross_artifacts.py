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
from doconv_mx import DOConv2D
from mx_helpers import unsupported_reason as gluon_unsupported

FRAMEWORK = "mx"


def unsupported_reason(case, dtype):
    """The adapter's own reason: Gluon pads with zeros only, and 'same' only where it is one
    fixed symmetric padding (stride 1, even (kernel-1)*dilation)."""
    return gluon_unsupported(case.spec)


def compute(case, dtype, inputs, R):
    params = DOConvParams(case.spec, W=inputs["W"], D=inputs["D"], bias=inputs["bias"])
    layer = DOConv2D.from_params(params)
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
    assert len({case for case, _ in artifacts.results}) >= 30
    assert np.isfinite(next(iter(artifacts.results.values()))["output"]).all()
