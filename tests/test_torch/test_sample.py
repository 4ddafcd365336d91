"""samples/sample_pt.py on tiny generated IDX data: both models by default, the table, fusion."""

import numpy as np
import torch

from sample_checks import (
    check_comparison, check_one_model, check_shared_command_line, epoch_accuracies, tiny)
from samples import common, sample_pt


def main(args):
    """sample_pt.main, then torch's global settings as they were for the other tests."""
    torch_threads = torch.get_num_threads()
    try:
        return sample_pt.main(args)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(torch_threads)


def run(args, capsys):
    return main(args), capsys.readouterr().out


def test_default_trains_baseline_and_doconv_and_fuses(tiny_mnist, tmp_path, capsys):
    save_dir = tmp_path / "models"
    # 30 epochs: the seed's slow-starting net needs them to leave chance on 300 images.
    args = ["--epochs", "30", "--runs", "2", "--seed", "3", "--save-dir", str(save_dir),
            *tiny(tiny_mnist)]
    comparison, out = run(args, capsys)
    check_comparison(comparison, out, seeds=[3, 4], epochs=30, min_accuracy=25)
    # The saved file is a plain nn.Conv2d state_dict.
    state = torch.load(save_dir / "sample_pt_fused_seed3.pt", weights_only=True)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    again, _ = run(args, capsys)
    assert epoch_accuracies(again) == epoch_accuracies(comparison)


def test_conv_flag_trains_one_model(tiny_mnist, capsys):
    check_one_model(main, tiny_mnist, capsys)


def test_different_fused_predictions_fail_the_run(tiny_mnist, capsys, monkeypatch):
    def fuse_badly(model, directory, name):
        plain = sample_pt.build_model(torch.nn.Conv2d)  # untrained: other predictions
        with torch.no_grad():
            for p in plain.parameters():
                p.copy_(torch.from_numpy(np.random.default_rng(1).normal(size=p.shape)))
        return plain

    monkeypatch.setattr(sample_pt, "fuse_save_reload", fuse_badly)
    comparison, out = run(["--conv", "doconv", "--epochs", "1", "--runs", "1",
                           *tiny(tiny_mnist)], capsys)
    assert comparison.fused_identical is False and common.exit_status(comparison) == 1
    assert "DIFFERENT predictions from DO-Conv's in 1 of 1 run" in out


def test_the_sample_takes_the_shared_command_line(capsys):
    check_shared_command_line(sample_pt.main, capsys)


def test_sample_model_is_the_seeds_network():
    model = sample_pt.build_model(sample_pt.doconv_torch.DOConv2d)
    convs = [m for m in model if isinstance(m, sample_pt.doconv_torch.DOConv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
            for c in convs] == [(1, 16, (3, 3), (2, 2), (1, 1)), (16, 16, (3, 3), (2, 2), (1, 1)),
                                (16, 10, (3, 3), (2, 2), (1, 1))]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
