"""Keras 3: DO-Conv against Keras' own convs, per layer shape and for a ResNet-18-style network.

    KERAS_BACKEND=tensorflow|jax python benchmarks/bench_keras.py [--markdown PATH] [--quick]

Runs on the backend KERAS_BACKEND selects (tensorflow or jax), data_format channels_last,
float32. Variants, timed interleaved (A B A B ...) in one process:
  native   keras.layers.Conv2D; for the depthwise shape keras.layers.DepthwiseConv2D (what
           a Keras model holds there, and what doconv_tf.convert replaces)
  doconv   doconv_tf.DOConv2D (the network: doconv_tf.convert of the native one)
There is no einsum variant: DOConv2D's traced call already composes its kernel with one
einsum, so a straightforward einsum layer would time the same graph.

Measures (compiled as a user runs them; JIT_COMPILE below fixes XLA per backend):
  train       per layer: forward + backward with gradients for the input and the layer's
              weights (TF: a tf.function with a GradientTape watching the input; JAX:
              jax.jit of jax.value_and_grad over layer.stateless_call); the network:
              model.train_on_batch, SGD momentum 0.9, the optimizer step included
  eval        forward in inference mode, DO-Conv unfused, compiled (per layer a tf.function
              / jax.jit over stateless_call with the weights as arguments; the network:
              predict_on_batch): DOConv2D recomposes its kernel in every such call
  eval eager  JAX only: an eager layer(x) / model(x) call, training=False, where DOConv2D
              reuses its composed kernel (not timed on TensorFlow, where an eager call
              recomposes it as a compiled one does)
  fused       DOConv2D.fuse() / doconv_tf.fuse()'s Conv2D against native, timed as "eval"
Layer shapes with padding 1 use padding "same" (Keras has no explicit padding; the cost is
the same, only a stride-2 layer pads on one side instead of both).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import keras  # noqa: E402
from keras import layers  # noqa: E402

import doconv_tf  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Row, command_line, format_table, interleaved_times, machine_description, medians,
    parse_arguments, publish, run_cases)

BACKEND = keras.backend.backend()
VARIANTS = ("native", "doconv")
# Fixed, not "auto", so every figure says how it was compiled. TensorFlow: False is what
# "auto" picks on a CPU-only machine (Keras disables XLA there). JAX: Keras' JAX trainer
# only jits a step with True; False would run it op by op.
JIT_COMPILE = {"tensorflow": False, "jax": True}.get(BACKEND)
TRAIN_TARGET, EVAL_TARGET = 1.30, 1.05

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
    import jax.numpy as jnp
else:
    raise SystemExit(f"bench_keras.py runs on the tensorflow or jax backend, not {BACKEND!r}; "
                     "set KERAS_BACKEND")

Step = Callable[[], object]


def _progress(case: str, start: float) -> None:
    # A full run takes minutes; stderr shows where it is (the table goes to stdout).
    print(f"  {case}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _ready(value: Any) -> Any:
    # JAX dispatches asynchronously: a timed call must wait for its result.
    return jax.block_until_ready(value) if BACKEND == "jax" else value


def _values(variables: Sequence[Any]) -> list:
    return [v.value for v in variables]


def train_step(layer: keras.layers.Layer, x: Any) -> Step:
    """One compiled forward + backward: gradients for x and every trainable weight."""
    if BACKEND == "tensorflow":
        @tf.function(jit_compile=JIT_COMPILE)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)  # the input "requires grad", as inside a network
                loss = tf.reduce_sum(layer(x, training=True))
            return tape.gradient(loss, [x, *layer.trainable_variables])

        return lambda: step(x)
    others = _values(layer.non_trainable_variables)

    # stateless_call calls layer.call directly and Conv2D's takes no `training` (a conv
    # has no training behaviour), so none is passed here or in infer_compiled.
    def loss(values, x):
        y, _ = layer.stateless_call(values, others, x)
        return jnp.sum(y)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    values = _values(layer.trainable_variables)
    return lambda: _ready(grad(values, x))


def infer_compiled(layer: keras.layers.Layer, x: Any) -> Step:
    """Inference as predict does it: compiled, the weights inputs of the compiled function."""
    if BACKEND == "tensorflow":
        run = tf.function(lambda x: layer(x, training=False), jit_compile=JIT_COMPILE)
        return lambda: run(x)
    # Passed as arguments, not closed over: closed-over arrays would be constants XLA
    # could fold the whole composition into, which predict never does.
    run = jax.jit(lambda values, others, x: layer.stateless_call(values, others, x)[0])
    values, others = _values(layer.trainable_variables), _values(layer.non_trainable_variables)
    return lambda: _ready(run(values, others, x))


def infer_eager(model: keras.layers.Layer, x: Any) -> Step:
    return lambda: _ready(model(x, training=False))


def _native_layer(c_in: int, c_out: int, k: int, stride: int, padding: str,
                  groups: int) -> keras.layers.Layer:
    if groups > 1 and groups == c_in == c_out:
        # A Keras model's depthwise conv; a depthwise DOConv2D runs (and fuses) as one too.
        return layers.DepthwiseConv2D(k, stride, padding)
    return layers.Conv2D(c_out, k, stride, padding, groups=groups)


def layer_rows(batch: int, shapes: Sequence[tuple], repeats: int) -> list[Row]:
    rows = []
    rng = np.random.default_rng(0)
    for name, c_in, c_out, k, stride, padding, groups, size in shapes:
        start = time.perf_counter()
        keras.utils.set_random_seed(0)
        pad = "valid" if padding == 0 else "same"
        native = _native_layer(c_in, c_out, k, stride, pad, groups)
        doconv = doconv_tf.DOConv2D(c_out, k, stride, pad, groups=groups)
        for layer in (native, doconv):
            layer.build((None, size, size, c_in))
        fused = doconv.fuse()
        modules = {"native": native, "doconv": doconv}
        x = keras.ops.convert_to_tensor(
            rng.standard_normal((batch, size, size, c_in), dtype=np.float32))
        case = f"{name} b{batch}"
        for measure, make in (("train", train_step), ("eval", infer_compiled)):
            samples = interleaved_times({v: make(m, x) for v, m in modules.items()},
                                        repeats=repeats)
            rows.append(Row(case, measure, medians(samples)))
        if BACKEND == "jax":
            samples = interleaved_times({v: infer_eager(m, x) for v, m in modules.items()},
                                        repeats=repeats)
            rows.append(Row(case, "eval eager", medians(samples)))
        samples = interleaved_times({"native": infer_compiled(native, x),
                                     "doconv": infer_compiled(fused, x)}, repeats=repeats)
        rows.append(Row(case, "fused", medians(samples)))
        _progress(case, start)
    return rows


def _conv_bn(x: Any, filters: int, kernel: int, stride: int) -> Any:
    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False)(x)
    return layers.BatchNormalization()(x)


def _basic_block(x: Any, filters: int, stride: int) -> Any:
    out = layers.ReLU()(_conv_bn(x, filters, 3, stride))
    out = _conv_bn(out, filters, 3, 1)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride)  # 1x1 projection with BN
    return layers.ReLU()(layers.Add()([out, shortcut]))


def resnet18(size: int, width: int = 64, classes: int = 1000) -> keras.Model:
    """ResNet-18's layout: 7x7 stem, max pool, four stages of two basic blocks."""
    inputs = keras.Input((size, size, 3))
    x = layers.ReLU()(_conv_bn(inputs, width, 7, 2))
    x = layers.MaxPooling2D(3, 2, padding="same")(x)
    for stage, filters in enumerate((width, 2 * width, 4 * width, 8 * width)):
        x = _basic_block(x, filters, 1 if stage == 0 else 2)
        x = _basic_block(x, filters, 1)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name="resnet18_style")


def network_rows(batch: int, size: int, width: int, repeats: int,
                 classes: int = 1000) -> list[Row]:
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    native = resnet18(size, width, classes)
    doconv = doconv_tf.convert(native)
    fused = doconv_tf.fuse(doconv)
    models = {"native": native, "doconv": doconv}
    for model in (native, doconv, fused):
        model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=JIT_COMPILE)
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.standard_normal((batch, size, size, 3),
                                                        dtype=np.float32))
    y = keras.ops.convert_to_tensor(rng.integers(0, classes, batch))

    def train(model: keras.Model) -> Step:
        return lambda: model.train_on_batch(x, y)  # returns the loss as a float: synced

    def predict(model: keras.Model) -> Step:
        return lambda: model.predict_on_batch(x)  # returns NumPy: synced

    case = f"ResNet-18-style {size}x{size} b{batch}"
    rows = [Row(case, "train", medians(interleaved_times(
        {v: train(m) for v, m in models.items()}, repeats=repeats)))]
    rows.append(Row(case, "eval", medians(interleaved_times(
        {v: predict(m) for v, m in models.items()}, repeats=repeats))))
    if BACKEND == "jax":
        rows.append(Row(case, "eval eager", medians(interleaved_times(
            {v: infer_eager(m, x) for v, m in models.items()}, repeats=repeats))))
    rows.append(Row(case, "fused", medians(interleaved_times(
        {"native": predict(native), "doconv": predict(fused)}, repeats=repeats))))
    _progress(case, start)
    return rows


def _met(ratio: float, target: float) -> str:
    return "yes" if ratio <= target else "no"


def target_summary(rows: Sequence[Row]) -> str:
    """The issue's Keras targets (whole network) against this run, as a markdown table."""
    network = {r.measure: r.ratio("doconv") for r in rows if r.case.startswith("ResNet-18")}
    lines = ["| target | measured | met |", "|---|---|---|",
             (f"| ResNet-18-style training ratio <= {TRAIN_TARGET:.2f} "
              f"| {network['train']:.3f} | {_met(network['train'], TRAIN_TARGET)} |")]
    if BACKEND == "jax":
        lines += [
            (f"| ResNet-18-style eval unfused <= {EVAL_TARGET:.2f}, eager (kernel cached) "
             f"| {network['eval eager']:.3f} | {_met(network['eval eager'], EVAL_TARGET)} |"),
            (f"| ResNet-18-style eval unfused, compiled (predict_on_batch) "
             f"| {network['eval']:.3f} | no target: traced calls recompose the kernel |")]
    else:
        lines.append(f"| ResNet-18-style eval unfused (predict_on_batch) | {network['eval']:.3f} "
                     "| no target: TensorFlow recomposes the kernel in every call |")
    lines.append(f"| ResNet-18-style fused (a plain model) | {network['fused']:.3f} | - |")
    layer_train = [r for r in rows if r.measure == "train" and not r.case.startswith("ResNet")]
    if layer_train:
        worst = max(layer_train, key=lambda r: r.ratio("doconv"))
        lines.append(f"| per layer, largest training ratio (no Keras target) "
                     f"| {worst.ratio('doconv'):.3f} ({worst.case}) | - |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_arguments(__doc__.split("\n\n")[0], argv)
    start = time.perf_counter()
    rows = run_cases(args, layer_rows, network_rows)
    framework = {"tensorflow": tf.__version__} if BACKEND == "tensorflow" \
        else {"jax": jax.__version__}
    machine = machine_description({"keras": keras.__version__, "backend": BACKEND, **framework,
                                   "jit_compile": str(JIT_COMPILE)})
    table = format_table(rows, VARIANTS)
    summary = target_summary(rows)
    _progress("total", start)
    publish(command_line("benchmarks/bench_keras.py", argv, f"KERAS_BACKEND={BACKEND}"),
            machine, [table, f"Against the targets:\n\n{summary}"], args.markdown)
    return rows


if __name__ == "__main__":
    main()
