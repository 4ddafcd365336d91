import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from samples.datasets import write_idx

# Property tests state their own example counts; none has a deadline (CI machines vary).
settings.register_profile("doconv", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "doconv"))


@pytest.fixture
def tiny_mnist(tmp_path_factory):
    """A folder of tiny, learnable MNIST-format IDX files for the samples' smoke tests:
    class k is a bright band at rows 2k+4..2k+6 over faint noise."""
    directory = tmp_path_factory.mktemp("tiny_mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels):
            image[2 * label + 4:2 * label + 7, 4:24] = 255
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def pytest_addoption(parser):
    parser.addoption("--doconv-ckernel", choices=("auto", "0", "1"), default=None,
                     help="doconv_torch's CPU composition: C kernel required (1), einsum "
                          "(0) or whichever builds (auto); sets DOCONV_CKERNEL for the run")


def pytest_configure(config):
    choice = config.getoption("--doconv-ckernel")
    if choice is not None:
        os.environ["DOCONV_CKERNEL"] = choice
