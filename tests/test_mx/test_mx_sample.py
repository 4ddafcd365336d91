"""Smoke test of samples/sample_gluoncv.py on tiny generated IDX data."""

import re

from samples import sample_gluoncv


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
