"""The PyTorch adapter's tests. Importing torch here makes a missing torch fail the whole
folder loudly instead of skipping it."""

import pytest
import torch

from doconv_torch import _ckernel


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["c", "einsum"])
def compose_backend(request, monkeypatch):
    """Run a test with each CPU composition: the C kernel (required) and einsum."""
    monkeypatch.setenv("DOCONV_CKERNEL", "1" if request.param == "c" else "0")
    _ckernel._reset()
    assert _ckernel.backend().name == request.param
    yield request.param
    _ckernel._reset()  # the next use decides again, under the session's own setting
