import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from samples.datasets import write_idx

# Hypothesis profiles, picked by HYPOTHESIS_PROFILE (tox passes it through):
# - "ci", the default: derandomized (every run draws the same examples, so a failure
#   reproduces and a pass means the same thing every time), no example database, no
#   deadline (CI machines vary). Property tests state their own example counts; the fuzz
#   tests take theirs from strategies.fuzz_settings, a fixed budget here.
# - "long": random draws with the example database, for long local runs of the fuzz suite
#   (strategies.fuzz_settings multiplies each budget by DOCONV_FUZZ_SCALE, 100 by default):
#   HYPOTHESIS_PROFILE=long python -m pytest tests/core/test_fuzz_files.py
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW)
settings.register_profile("long", deadline=None, suppress_health_check=_SLOW)
settings.register_profile("doconv", settings.get_profile("ci"))  # the former default's name
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
