"""Models for test_train_gluoncv.py's --model package.module:callable runs."""

from mxnet.gluon import nn


def tiny(num_classes: int) -> nn.HybridSequential:
    """A small CNN with BatchNorm (statistics each device updates apart) and dropout (the
    RNG reseeded every epoch): fast enough for several runs per test."""
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
            nn.Conv2D(8, 3, strides=2, padding=1), nn.Activation("relu"),
            nn.GlobalAvgPool2D(), nn.Flatten(), nn.Dropout(0.1), nn.Dense(num_classes))
    return net


def not_a_block(num_classes: int) -> int:
    return num_classes
