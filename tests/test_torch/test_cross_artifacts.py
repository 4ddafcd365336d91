"""PyTorch's artifacts for the cross-framework suite (tox env ``cross`` compares them).

Written to $DOCONV_ARTIFACTS (tox sets it) or, outside tox, to a temporary folder; either
way this framework's results are checked against the NumPy reference here too.
"""

import os

import numpy as np
import torch

from doconv_core import DOConvParams
from doconv_core.testing import crosscheck
from doconv_torch import DOConv2d

FRAMEWORK = "torch"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def unsupported_reason(case, dtype):
    if case.spec.padding == "same" and case.spec.stride != (1, 1):
        return "PyTorch allows padding='same' only with stride 1"
    return None


def compute(case, dtype, inputs, R):
    params = DOConvParams(case.spec, W=inputs["W"], D=inputs["D"], bias=inputs["bias"])
    layer = DOConv2d.from_params(params, dtype=DTYPES[dtype])
    x = torch.tensor(inputs["x"], requires_grad=True)
    y = layer(x)
    (y * torch.from_numpy(R)).sum().backward()
    with torch.no_grad():
        kernel = layer.weight.numpy()

    def grad(tensor):
        return None if tensor is None else tensor.grad.numpy()

    return {"output": y.detach().numpy(), "kernel": kernel, "grad_x": x.grad.numpy(),
            "grad_D": grad(layer.D), "grad_W": grad(layer.W), "grad_bias": grad(layer.bias)}


def test_write_cross_artifacts(tmp_path):
    directory = os.environ.get("DOCONV_ARTIFACTS") or str(tmp_path)
    crosscheck.produce_artifacts(directory, FRAMEWORK, compute, unsupported_reason)
    artifacts, failures = crosscheck.self_check(directory, FRAMEWORK)
    assert not failures, "\n".join(failures)
    assert len({case for case, _ in artifacts.results}) >= 70  # of 92; only 'same' padding with a stride is out of PyTorch's reach
    assert all("padding='same'" in reason for reason in artifacts.unsupported.values())
    assert np.isfinite(next(iter(artifacts.results.values()))["output"]).all()
