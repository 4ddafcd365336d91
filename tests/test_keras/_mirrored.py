"""Run by test_distributed.py in a fresh process: logical devices must be set before TF
initialises its devices. Prints the max difference between mirrored and single-device
training as JSON."""

import json
import os
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import doconv_tf  # noqa: E402

rng = np.random.default_rng(0)
x = rng.standard_normal((16, 8, 8, 4)).astype("float32")
y = rng.standard_normal((16, 3)).astype("float32")


def train(strategy):
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 8, 4)),
            doconv_tf.DOConv2D(6, 3, groups=2, D_mul=11, activation="relu"),
            doconv_tf.DOConv2D(4, 3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    # Give D a start away from zero so its gradient path is exercised from step one.
    for layer in model.layers[:2]:
        layer.D.assign(0.1 * np.ones(tuple(layer.D.shape), "float32"))
    initial = [np.asarray(w) for w in model.get_weights()]
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)  # global batch 16
    trained = [np.asarray(w) for w in model.get_weights()]
    moved = min(float(np.abs(a - b).max()) for a, b in zip(trained, initial))
    return trained, len(strategy.extended.worker_devices), moved


mirrored, replicas, moved = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
single, _, _ = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
max_diff = max(float(np.abs(a - b).max()) for a, b in zip(mirrored, single))
print(json.dumps({"replicas": replicas, "max_diff": max_diff, "min_moved": moved,
                  "shapes": [list(w.shape) for w in mirrored]}))
