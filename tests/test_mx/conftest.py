"""MXNet adapter tests: mxnet is imported first, so a missing mxnet fails loudly."""

import warnings

import mxnet as mx  # noqa: F401  (a missing mxnet must fail the env, not skip it)
import numpy as np
import pytest

# SymbolBlock.imports warns about untyped inputs; irrelevant to these tests.
warnings.filterwarnings("ignore", message=".*infer_type.*")


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    np.random.seed(0)
