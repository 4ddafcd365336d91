"""The PyTorch adapter's tests. Importing torch here makes a missing torch fail the whole
folder loudly instead of skipping it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
