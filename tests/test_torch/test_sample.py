"""Smoke test of samples/sample_pt.py on tiny generated IDX data."""

import re

import pytest
import torch

from samples import sample_pt


def run(args, capsys):
    torch_threads = torch.get_num_threads()
    try:
        result = sample_pt.main(args)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(torch_threads)
    return result, capsys.readouterr().out


def test_doconv_sample_fuses_saves_and_reloads(tiny_mnist, tmp_path, capsys):
    save_dir = tmp_path / "models"
    args = ["--conv", "doconv", "--epochs", "2", "--runs", "2", "--seed", "3", "--quiet",
            "--no-download", "--data-dir", str(tiny_mnist), "--save-dir", str(save_dir)]
    result, out = run(args, capsys)
    assert result["conv"] == "doconv" and len(result["accuracies"]) == 2
    assert result["fused_identical"] is True
    assert result["fused_accuracies"] == result["accuracies"]
    assert result["average"] == pytest.approx(sum(result["accuracies"]) / 2)
    assert re.search(r"^\| DO-Conv \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d{3} \| - \|$", out, re.M)
    assert "|  | run1 | run2 | avg | + |" in out
    assert "Fused model accuracy identical to DO-Conv: yes" in out
    assert out.count("(identical predictions)") == 2
    # The saved file is a plain nn.Conv2d state_dict.
    state = torch.load(save_dir / "sample_pt_fused_seed3.pt", weights_only=True)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    # Deterministic given the seed.
    again, _ = run(args, capsys)
    assert again["accuracies"] == result["accuracies"]


def test_conv_baseline_sample(tiny_mnist, capsys):
    result, out = run(["--conv", "conv", "--epochs", "1", "--runs", "1", "--quiet",
                       "--no-download", "--data-dir", str(tiny_mnist)], capsys)
    assert "fused_identical" not in result
    assert re.search(r"^\| Baseline \| \d+\.\d\d \| \d+\.\d{3} \| - \|$", out, re.M)


def test_sample_model_is_the_seeds_network():
    model = sample_pt.build_model(sample_pt.doconv_torch.DOConv2d)
    convs = [m for m in model if isinstance(m, sample_pt.doconv_torch.DOConv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
            for c in convs] == [(1, 16, (3, 3), (2, 2), (1, 1)), (16, 16, (3, 3), (2, 2), (1, 1)),
                                (16, 10, (3, 3), (2, 2), (1, 1))]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
