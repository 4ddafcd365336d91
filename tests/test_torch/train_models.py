"""Models for test_train_pt.py's --model package.module:callable runs."""

from torch import nn


def tiny(num_classes: int) -> nn.Module:
    """A small CNN with BatchNorm (buffers that DDP ranks update apart) and dropout (the
    per-process RNG): fast enough for several torchrun runs per test."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, num_classes))


def not_a_module(num_classes: int) -> int:
    return num_classes
