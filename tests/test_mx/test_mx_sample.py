"""Smoke test of samples/sample_gluoncv.py on tiny generated IDX data."""

import re

import numpy as np
import pytest

from samples import sample_gluoncv
from samples.datasets import IDX_FILES, write_idx


@pytest.fixture
def tiny_mnist(tmp_path):
    rng = np.random.default_rng(0)
    # Learnable toy digits: the label sets the brightness of a block.
    def split(n):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for k, label in enumerate(y):
            x[k, 2 * label:2 * label + 8, 4:24] = 250
        return x, y
    x_train, y_train = split(300)
    x_test, y_test = split(100)
    for role, array in (("train_images", x_train), ("train_labels", y_train),
                        ("test_images", x_test), ("test_labels", y_test)):
        write_idx(tmp_path / IDX_FILES[role], array)
    return tmp_path


def test_sample_doconv_smoke(tiny_mnist, capsys):
    argv = ["--epochs", "2", "--runs", "2", "--quiet", "--data-dir", str(tiny_mnist)]
    result = sample_gluoncv.main(argv + ["--conv", "doconv"])
    out = capsys.readouterr().out
    assert len(result["accuracies"]) == 2 and result["fused_accuracies"] == result["accuracies"]
    assert "(identical predictions)" in out and "DIFFERENT" not in out
    assert result["fused_identical"] is True
    assert re.search(r"^\| DO-Conv \| [\d.]+ \| [\d.]+ \| [\d.]+ \| - \|$", out, re.M)
    assert re.search(r"^\| DO-Conv fused \|", out, re.M)
    assert all(0 <= a <= 100 for a in result["accuracies"])
    again = sample_gluoncv.main(argv + ["--conv", "doconv"])
    assert again["accuracies"] == result["accuracies"]  # deterministic given the seed
    baseline = sample_gluoncv.main(argv[:2] + ["--runs", "1"] + argv[4:] + ["--conv", "conv"])
    assert baseline["fused_accuracies"] == [] and len(baseline["accuracies"]) == 1
    assert "| Baseline |" in capsys.readouterr().out
