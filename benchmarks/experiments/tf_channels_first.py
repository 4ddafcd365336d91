"""TensorFlow CPU, channels_first: the native NCHW conv (oneDNN only) against NHWC between two
transposes (what DOConv2D runs there), forward plus backward, side by side in one run.

    TF_ENABLE_ONEDNN_OPTS=1 KERAS_BACKEND=tensorflow python benchmarks/experiments/tf_channels_first.py
    TF_ENABLE_ONEDNN_OPTS=0 KERAS_BACKEND=tensorflow python benchmarks/experiments/tf_channels_first.py

Without oneDNN the native NCHW kernel does not exist, and only the transposed path is timed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.harness import interleaved_times, machine_description, medians  # noqa: E402

# (channels, spatial size) at batch 16, 3x3 'same': ResNet stages.
SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]
BATCH = 16


def steps(channels: int, size: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((BATCH, channels, size, size)).astype("float32"))
    kernel = tf.Variable(0.01 * rng.standard_normal((3, 3, channels, channels)).astype("float32"))

    def train_step(conv):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = conv(x)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x, kernel])
        return step

    native = train_step(lambda x: tf.nn.conv2d(x, kernel, 1, "SAME", data_format="NCHW"))
    transposed = train_step(lambda x: tf.transpose(
        tf.nn.conv2d(tf.transpose(x, (0, 2, 3, 1)), kernel, 1, "SAME"), (0, 3, 1, 2)))
    variants = {"NHWC + transposes": transposed}
    try:
        native()
        variants["native NCHW"] = native
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        pass  # no NCHW kernel (forward: Unimplemented; inside a graph: InvalidArgument)
    return variants


def main() -> None:
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (this CPU's default)")
    print(machine_description({"tensorflow": tf.__version__,
                               "TF_ENABLE_ONEDNN_OPTS": onednn}))
    print("\n| 3x3 conv, batch 16 | NHWC + transposes (ms) | native NCHW (ms) | ratio |")
    print("|---|---|---|---|")
    for channels, size in SHAPES:
        variants = steps(channels, size)
        times = medians(interleaved_times(variants, repeats=15, warmup=3))
        ours = times["NHWC + transposes"] * 1e3
        native = times.get("native NCHW")
        cells = (f"{native * 1e3:.1f}", f"{ours / (native * 1e3):.2f}") if native else \
            ("refused (no kernel)", "-")
        print(f"| {channels}ch {size}x{size} | {ours:.1f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
