"""Keras on JAX: one network's eager call (training=False, the DO-Conv kernel cached), native
against DO-Conv and against the fused model, with many rounds: the focused measurement behind
the eager rows of bench_keras.py (docs/benchmarks.md, Keras 3, JAX backend).

    KERAS_BACKEND=jax python benchmarks/experiments/jax_eager_network.py [--network 1d|r3d|2d]
        [--rounds 200] [--inner 3]

Each round times ``--inner`` calls of every model, the order reversed every other round; each
ratio is the median of the per-round ratios with a 95% bootstrap interval. The fused model is a
plain Keras model: fused / native shows what two equal models measure on this machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import doconv_tf  # noqa: E402
from benchmarks import bench_keras  # noqa: E402  (exits unless KERAS_BACKEND picks tf or jax)
from benchmarks.harness import (  # noqa: E402
    interleaved_times, keep_freed_memory, machine_description, medians, round_ratio)

NETWORKS = {  # name -> (builder, its arguments, batch): bench_keras' full sizes
    "1d": (bench_keras.resnet10_1d, dict(length=1024, width=64), 16),
    "r3d": (bench_keras.r3d10, dict(frames=8, size=56, width=32), 4),
    "2d": (bench_keras.resnet18, dict(size=112, width=64), 16),
}


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=sorted(NETWORKS), default="1d")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--inner", type=int, default=3, help="calls per model per round")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.inner < 1:
        parser.error(f"--rounds and --inner must be >= 1, got {args.rounds} and {args.inner}")
    if bench_keras.BACKEND != "jax":
        parser.error("eager calls reuse the composed kernel on the jax backend only: "
                     "set KERAS_BACKEND=jax")
    keep_freed_memory()  # as bench_keras.py's full runs
    build, kwargs, batch = NETWORKS[args.network]
    keras.utils.set_random_seed(0)
    native = build(**kwargs)
    doconv = doconv_tf.convert(native)
    fused = doconv_tf.fuse(doconv)
    x = keras.ops.convert_to_tensor(np.random.default_rng(0).standard_normal(
        (batch, *native.inputs[0].shape[1:]), dtype=np.float32))
    steps = {name: bench_keras.infer_eager(model, x)
             for name, model in (("native", native), ("doconv", doconv), ("fused", fused))}
    samples = interleaved_times(steps, repeats=args.rounds, warmup=5, inner=args.inner,
                                alternate=True)
    ratios = {name: round_ratio(samples, name) for name in ("doconv", "fused")}
    times = ", ".join(f"{name} {ms * 1e3:.2f} ms" for name, ms in medians(samples).items())
    print(f"{native.name}, batch {batch}, {args.rounds} rounds of {args.inner} calls: {times}")
    for name, (middle, low, high) in ratios.items():
        print(f"{name} / native: {middle:.3f} [{low:.3f}, {high:.3f}]")
    print(f"Machine: {machine_description({'keras': keras.__version__, 'backend': 'jax'})}")
    return ratios


if __name__ == "__main__":
    main()
