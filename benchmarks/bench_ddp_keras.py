"""Keras 3: DO-Conv's training overhead data-parallel on 2 devices against 1 device.

    KERAS_BACKEND=tensorflow|jax python benchmarks/bench_ddp_keras.py [--markdown PATH]
        [--repeats N] [--batch N] [--smoke]

ResNet-20 (the CIFAR layout, see ``resnet20``; 28 x 28 x 3 inputs, 10 classes), native convs
against DO-Conv (``doconv_tf.convert``), one ``model.train_on_batch`` (forward, backward, the
gradients' all-reduce, the SGD step) timed:

  1 device     a model on the first device alone (TensorFlow: OneDeviceStrategy; JAX: no
               distribution)
  2 devices    TensorFlow: MirroredStrategy; JAX: keras.distribution.DataParallel; over 2
               GPUs, else the CPU split into 2 devices (logical devices / XLA host devices,
               set up before the backend starts, as samples/train_tf.py does)

Weak scaling: each device gets ``--batch`` images, so a 2-device step does twice the work of
a 1-device step. Each round times the four (setting, variant) pairs in turn, so the machine's
drifts fall on all alike. The target, as for PyTorch's DDP (bench_ddp_torch.py): DO-Conv /
native on 2 devices at most 0.03 above DO-Conv / native on 1 device.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEVICES = 2
SETTINGS = ("1 device", f"{DEVICES} devices")
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")

# The devices exist before the backend starts: JAX reads XLA_FLAGS, TensorFlow fixes its
# logical devices when it initialises.
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f"--xla_force_host_platform_device_count={DEVICES}").strip()
elif BACKEND == "tensorflow":
    import tensorflow as tf
    if not tf.config.list_physical_devices("GPU"):
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration() for _ in range(DEVICES)])
else:
    sys.exit(f"bench_ddp_keras.py: KERAS_BACKEND={BACKEND!r}: Keras trains data-parallel on "
             "tensorflow and jax only")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import doconv_tf  # noqa: E402
from benchmarks.bench_keras import _basic_block, _conv_bn  # noqa: E402
from benchmarks.harness import (SCALING_VARIANTS, command_line,  # noqa: E402
                                machine_description, publish, scaling_arguments,
                                scaling_rounds, scaling_summary, scaling_table)


def resnet20(size: int, num_classes: int = 10) -> keras.Model:
    """CIFAR ResNet-20's layout: a 3x3 stem of 16 channels, three stages of three basic blocks
    (16, 32, 64 channels); the shortcuts that change shape are 1x1 convs (bench_keras's
    blocks), where samples/models_tf.py's resnet20 pads with zeros (benchmarks and samples
    do not import each other)."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.ReLU()(_conv_bn(inputs, 16, 3, 1))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            x = _basic_block(x, filters, 2 if stage and not block else 1)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def scopes() -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    """Per setting, the context its model is built and trained in."""
    if BACKEND == "tensorflow":
        kind = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
        one = tf.distribute.OneDeviceStrategy(f"/{kind}:0")
        mirrored = tf.distribute.MirroredStrategy([f"/{kind}:{i}" for i in range(DEVICES)])
        return {SETTINGS[0]: one.scope, SETTINGS[1]: mirrored.scope}
    import jax
    devices = [d for d in jax.devices() if d.platform != "cpu"] or jax.devices("cpu")
    parallel = keras.distribution.DataParallel(devices=devices[:DEVICES])
    return {SETTINGS[0]: contextlib.nullcontext, SETTINGS[1]: parallel.scope}


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Seconds per training step, per setting and variant, one sample per round."""
    keras.utils.set_random_seed(0)
    native = resnet20(args.size)
    weights = native.get_weights()
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    for setting, scope in scopes().items():
        images = args.batch * (DEVICES if setting == SETTINGS[1] else 1)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((images, args.size, args.size, 3)).astype("float32")
        y = rng.integers(0, 10, images)
        for variant in SCALING_VARIANTS:
            with scope():
                model = resnet20(args.size)
                model.set_weights(weights)
                if variant == "doconv":
                    model = doconv_tf.convert(model)
                model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9),
                              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

            def step(model: Any = model, scope: Any = scope, x: Any = x, y: Any = y) -> None:
                with scope():
                    model.train_on_batch(x, y)

            steps[setting, variant] = step
    return scaling_rounds(steps, SETTINGS, args)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = scaling_arguments(__doc__.split("\n\n")[0], argv, "device")
    summary = scaling_summary(measure(args))
    machine = machine_description({"keras": keras.__version__, "backend": BACKEND,
                                   "devices": f"1 and {DEVICES}"})
    images = dict(zip(SETTINGS, (args.batch, args.batch * DEVICES)))
    heading = (f"ResNet-20 on Keras ({BACKEND}), {args.size}x{args.size}x3, batch {args.batch} "
               f"per device (weak scaling), median of {args.repeats} rounds x {args.inner} "
               "steps; the ratio is the median of the per-round ratios")
    publish(command_line("benchmarks/bench_ddp_keras.py", argv, f"KERAS_BACKEND={BACKEND}"),
            machine, [heading, scaling_table(summary, images, f"{DEVICES}-device ratio - "
                                             "1-device ratio")], args.markdown)
    return summary


if __name__ == "__main__":
    main()
