"""PyTorch's artifacts for the cross-framework suite (tox env ``cross`` compares them): every
case of ``cross_cases()``, 2-D and the 1-D and 3-D ``rank_cases()``.

Written to $DOCONV_ARTIFACTS (tox sets it) or, outside tox, to a temporary folder; either
way this framework's results are checked against the NumPy reference here too.
"""

import os

import numpy as np
import torch

import doconv_torch
from doconv_core import DOConvParams
from doconv_core.testing import crosscheck
from doconv_core.testing.cases import cross_cases

FRAMEWORK = "torch"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def unsupported_reason(case, dtype):
    """What PyTorch's convs cannot express (nn.Conv1d/2d/3d refuse it too)."""
    spec = case.spec
    if spec.padding == "same" and any(s != 1 for s in spec.stride):
        return "PyTorch allows padding='same' only with stride 1"
    if spec.normalized().padding == "causal":  # a causal pad of nothing is 'valid'
        return "PyTorch has no padding='causal'"
    return None


def compute(case, dtype, inputs, R):
    params = DOConvParams(case.spec, W=inputs["W"], D=inputs["D"], bias=inputs["bias"])
    layer_class = getattr(doconv_torch, f"DOConv{case.spec.rank}d")
    layer = layer_class.from_params(params, dtype=DTYPES[dtype])
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
    produced = {case for case, _ in artifacts.results}
    # Only 'same' padding with a stride and causal padding that pads are out of reach.
    expected = {case.name for case in cross_cases() if unsupported_reason(case, None) is None}
    assert produced == expected
    for rank in (1, 2, 3):
        assert sum(case.spec.rank == rank for case in cross_cases()
                   if case.name in produced) >= 25, rank
    assert set(artifacts.unsupported.values()) == {
        "PyTorch allows padding='same' only with stride 1", "PyTorch has no padding='causal'"}
    assert np.isfinite(next(iter(artifacts.results.values()))["output"]).all()
