"""Keras 3: DO-Conv against Keras' own convs, per layer shape and for a ResNet-18-style network,
in 2-D; a 1-D and a 3-D layer shape and a small 1-D ResNet and R3D-style network beside them.

    KERAS_BACKEND=tensorflow|jax python benchmarks/bench_keras.py [--markdown PATH] [--quick]
        [--part all|layers|network]

Runs on the backend KERAS_BACKEND selects (tensorflow or jax), data_format channels_last,
float32. Variants, timed interleaved (A B A B ...) in one process:
  native   keras.layers.Conv1D/Conv2D/Conv3D; for the depthwise shape
           keras.layers.DepthwiseConv2D (what a Keras model holds there, and what
           doconv_tf.convert replaces)
  doconv   doconv_tf.DOConv1D/DOConv2D/DOConv3D (the networks: doconv_tf.convert of the
           native ones)
There is no einsum variant: a DO-Conv layer's traced call already composes its kernel with
one batched matmul, so a straightforward einsum layer would time the same graph.

Cases: the issue's 2-D layer shapes (benchmarks.harness.LAYERS, batch 8 and 32) and
ResNet-18-style network (112x112, batch 16); RANK_LAYERS (a 1-D shape at batch 16, a 3-D one
at batch 4) and RANK_NETWORKS (a ResNet-10-style 1-D network, an R3D-10-style 3-D one).

Measures (compiled as a user runs them; JIT_COMPILE below fixes XLA per backend):
  train       per layer: forward + backward with gradients for the input and the layer's
              weights (TF: a tf.function with a GradientTape watching the input; JAX:
              jax.jit of jax.value_and_grad over layer.stateless_call); the network:
              model.train_on_batch, SGD momentum 0.9, the optimizer step included
  eval        forward in inference mode, DO-Conv unfused, compiled (per layer a tf.function
              / jax.jit over stateless_call with the weights as arguments; the network:
              predict_on_batch): a DO-Conv layer recomposes its kernel in every such call
  eval eager  JAX only: an eager layer(x) / model(x) call, training=False, where a DO-Conv
              layer reuses its composed kernel (not timed on TensorFlow, where an eager call
              recomposes it as a compiled one does). Eager calls are short and their times
              jitter by several percent from call to call, so this row takes more samples:
              rounds of 3 calls, native and DO-Conv in alternating order, as many rounds as
              fit in about 1.5 s per --repeats (at least --repeats, at most 5x); its ratio is
              the median of the per-round ratios, with a 95% bootstrap interval
  fused       layer.fuse() / doconv_tf.fuse()'s Keras layers against native, timed as "eval"
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
    parse_arguments, publish, ratio_text, round_ratio, run_cases)

BACKEND = keras.backend.backend()
VARIANTS = ("native", "doconv")
# Fixed, not "auto", so every figure says how it was compiled. TensorFlow: False is what
# "auto" picks on a CPU-only machine (Keras disables XLA there). JAX: Keras' JAX trainer
# only jits a step with True; False would run it op by op.
JIT_COMPILE = {"tensorflow": False, "jax": True}.get(BACKEND)
TRAIN_TARGET, EVAL_TARGET = 1.30, 1.05
# The N-d issue's targets for the 1-D and 3-D networks: training at most the 2-D network's
# ratio + RANK_TRAIN_MARGIN, eager inference with the kernel cached at most RANK_EVAL_TARGET.
RANK_TRAIN_MARGIN, RANK_EVAL_TARGET = 0.05, 1.02
# Eager rows (see "eval eager" above): calls per round, rounds at most this many times
# --repeats, and about this many seconds of rounds per --repeats.
EAGER_INNER, EAGER_MAX_ROUNDS_PER_REPEAT, EAGER_SECONDS_PER_REPEAT = 3, 5, 1.5

if BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax
    import jax.numpy as jnp
else:
    raise SystemExit(f"bench_keras.py runs on the tensorflow or jax backend, not {BACKEND!r}; "
                     "set KERAS_BACKEND")

Step = Callable[[], object]

# 1-D and 3-D layer shapes, as harness.LAYERS: (name, in, out, kernel, stride, padding, groups,
# spatial sizes), each rank at its own batch.
RANK_LAYERS = {
    1: (16, [("k3 256ch L1024", 256, 256, 3, 1, 1, 1, (1024,))]),
    3: (4, [("3x3x3 64ch 16x28x28", 64, 64, 3, 1, 1, 1, (16, 28, 28))]),
}
QUICK_RANK_LAYERS = {1: (2, [("k3 8ch L32", 8, 8, 3, 1, 1, 1, (32,))]),
                     3: (2, [("3x3x3 8ch 4x8x8", 8, 8, 3, 1, 1, 1, (4, 8, 8))])}


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


def eager_row(case: str, modules: dict[str, keras.layers.Layer], x: Any, repeats: int) -> Row:
    """The "eval eager" row: rounds sized by the first calls' time (see the module's doc)."""
    steps = {v: infer_eager(m, x) for v, m in modules.items()}
    for step in steps.values():
        step()  # the first eager call compiles each operation
    start = time.perf_counter()
    for step in steps.values():
        step()
    round_seconds = EAGER_INNER * (time.perf_counter() - start)
    rounds = int(repeats * EAGER_SECONDS_PER_REPEAT / round_seconds)
    rounds = max(repeats, min(repeats * EAGER_MAX_ROUNDS_PER_REPEAT, rounds))
    samples = interleaved_times(steps, repeats=rounds, inner=EAGER_INNER, alternate=True)
    return Row(case, "eval eager", medians(samples),
               intervals={"doconv": round_ratio(samples, "doconv")})


def _native_layer(c_in: int, c_out: int, k: int, stride: int, padding: str,
                  groups: int, rank: int = 2) -> keras.layers.Layer:
    if groups > 1 and groups == c_in == c_out and rank < 3:
        # A Keras model's depthwise conv; a depthwise DO-Conv layer runs (and fuses) as one
        # too (Keras has no DepthwiseConv3D).
        return getattr(layers, f"DepthwiseConv{rank}D")(k, stride, padding)
    return getattr(layers, f"Conv{rank}D")(c_out, k, stride, padding, groups=groups)


def layer_rows(batch: int, shapes: Sequence[tuple], repeats: int) -> list[Row]:
    """Rows for layer shapes; the spatial sizes are an int (a square 2-D input, as in
    harness.LAYERS) or a tuple of one size per axis (its length is the rank)."""
    rows = []
    rng = np.random.default_rng(0)
    for name, c_in, c_out, k, stride, padding, groups, size in shapes:
        start = time.perf_counter()
        keras.utils.set_random_seed(0)
        spatial = (size, size) if isinstance(size, int) else tuple(size)
        rank = len(spatial)
        pad = "valid" if padding == 0 else "same"
        native = _native_layer(c_in, c_out, k, stride, pad, groups, rank)
        doconv = getattr(doconv_tf, f"DOConv{rank}D")(c_out, k, stride, pad, groups=groups)
        for layer in (native, doconv):
            layer.build((None, *spatial, c_in))
        fused = doconv.fuse()
        modules = {"native": native, "doconv": doconv}
        x = keras.ops.convert_to_tensor(
            rng.standard_normal((batch, *spatial, c_in), dtype=np.float32))
        case = f"{name} b{batch}"
        for measure, make in (("train", train_step), ("eval", infer_compiled)):
            samples = interleaved_times({v: make(m, x) for v, m in modules.items()},
                                        repeats=repeats)
            rows.append(Row(case, measure, medians(samples)))
        if BACKEND == "jax":
            rows.append(eager_row(case, modules, x, repeats))
        samples = interleaved_times({"native": infer_compiled(native, x),
                                     "doconv": infer_compiled(fused, x)}, repeats=repeats)
        rows.append(Row(case, "fused", medians(samples)))
        _progress(case, start)
    return rows


def _conv_bn(x: Any, filters: int, kernel: Any, stride: Any) -> Any:
    rank = len(x.shape) - 2
    x = getattr(layers, f"Conv{rank}D")(filters, kernel, stride, padding="same",
                                        use_bias=False)(x)
    return layers.BatchNormalization()(x)


def _basic_block(x: Any, filters: int, stride: int) -> Any:
    out = layers.ReLU()(_conv_bn(x, filters, 3, stride))
    out = _conv_bn(out, filters, 3, 1)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride)  # 1x1 projection with BN
    return layers.ReLU()(layers.Add()([out, shortcut]))


def _resnet(spatial: tuple[int, ...], width: int, classes: int, blocks: int,
            stem_kernel: Any, stem_stride: Any, max_pool: bool, name: str) -> keras.Model:
    """A ResNet of basic blocks over len(spatial) axes: stem conv (and max pool), four
    stages of ``blocks`` blocks each, widths w, 2w, 4w, 8w, strides 1, 2, 2, 2."""
    rank = len(spatial)
    inputs = keras.Input((*spatial, 3))
    x = layers.ReLU()(_conv_bn(inputs, width, stem_kernel, stem_stride))
    if max_pool:
        x = getattr(layers, f"MaxPooling{rank}D")(3, 2, padding="same")(x)
    for stage, filters in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(blocks):
            x = _basic_block(x, filters, 2 if stage > 0 and block == 0 else 1)
    x = getattr(layers, f"GlobalAveragePooling{rank}D")()(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name=name)


def resnet18(size: int, width: int = 64, classes: int = 1000) -> keras.Model:
    """ResNet-18's layout: 7x7 stem, max pool, four stages of two basic blocks."""
    return _resnet((size, size), width, classes, 2, 7, 2, True, "resnet18_style")


def resnet10_1d(length: int, width: int = 64, classes: int = 10) -> keras.Model:
    """A small 1-D ResNet: ResNet-18's layout with one basic block per stage (kernel 7
    stride 2 stem, max pool, kernel 3 blocks)."""
    return _resnet((length,), width, classes, 1, 7, 2, True, "resnet10_1d_style")


def r3d10(frames: int, size: int, width: int = 32, classes: int = 10) -> keras.Model:
    """A small R3D-style network (R3D-18's layout with one block per stage): 3x7x7 stem
    striding space only, no max pool, 3x3x3 basic blocks striding every axis."""
    return _resnet((frames, size, size), width, classes, 1, (3, 7, 7), (1, 2, 2), False,
                   "r3d10_style")


# name -> (builder, (batch, its arguments), the same for --quick).
RANK_NETWORKS = {
    "1-D ResNet-10-style": (resnet10_1d, (16, dict(length=1024, width=64)),
                            (2, dict(length=64, width=8))),
    "R3D-10-style": (r3d10, (4, dict(frames=8, size=56, width=32)),
                     (2, dict(frames=4, size=16, width=4))),
}


def network_rows(batch: int, size: int, width: int, repeats: int,
                 classes: int = 1000) -> list[Row]:
    keras.utils.set_random_seed(0)
    return model_rows(f"ResNet-18-style {size}x{size} b{batch}",
                      resnet18(size, width, classes), batch, classes, repeats)


def model_rows(case: str, native: keras.Model, batch: int, classes: int,
               repeats: int) -> list[Row]:
    """A network's rows: native against doconv_tf.convert of it, and fused."""
    start = time.perf_counter()
    doconv = doconv_tf.convert(native)
    fused = doconv_tf.fuse(doconv)
    models = {"native": native, "doconv": doconv}
    for model in (native, doconv, fused):
        model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=JIT_COMPILE)
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.standard_normal((batch, *native.inputs[0].shape[1:]),
                                                        dtype=np.float32))
    y = keras.ops.convert_to_tensor(rng.integers(0, classes, batch))

    def train(model: keras.Model) -> Step:
        return lambda: model.train_on_batch(x, y)  # returns the loss as a float: synced

    def predict(model: keras.Model) -> Step:
        return lambda: model.predict_on_batch(x)  # returns NumPy: synced

    rows = [Row(case, "train", medians(interleaved_times(
        {v: train(m) for v, m in models.items()}, repeats=repeats)))]
    rows.append(Row(case, "eval", medians(interleaved_times(
        {v: predict(m) for v, m in models.items()}, repeats=repeats))))
    if BACKEND == "jax":
        rows.append(eager_row(case, models, x, repeats))
    rows.append(Row(case, "fused", medians(interleaved_times(
        {"native": predict(native), "doconv": predict(fused)}, repeats=repeats))))
    _progress(case, start)
    return rows


def rank_rows(args: Any) -> list[Row]:
    """The 1-D and 3-D layer shapes and networks, as harness.run_cases runs the 2-D ones
    (tiny with --quick; --part picks layers or networks)."""
    quick = args.quick
    repeats = 2 if quick else args.repeats
    rows: list[Row] = []
    if quick or args.part in ("all", "layers"):
        for batch, shapes in (QUICK_RANK_LAYERS if quick else RANK_LAYERS).values():
            rows += layer_rows(batch, shapes, repeats)
    if quick or args.part in ("all", "network"):
        for name, (build, full, tiny) in RANK_NETWORKS.items():
            batch, kwargs = tiny if quick else full
            keras.utils.set_random_seed(0)
            native = build(**kwargs)
            sizes = "x".join(str(n) for n in native.inputs[0].shape[1:-1])
            rows += model_rows(f"{name} {sizes} b{batch}", native, batch, 10, repeats)
    return rows


def _met(ratio: float, target: float) -> str:
    return "yes" if ratio <= target else "no"


def target_summary(rows: Sequence[Row]) -> str:
    """The Keras targets (whole networks) against this run, as a markdown table: the 2-D
    network's, and the N-d issue's for the 1-D and 3-D networks."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    network = {r.measure: r for r in rows if r.case.startswith("ResNet-18")}
    if network:
        train = network["train"].ratio("doconv")
        lines.append(f"| ResNet-18-style training ratio <= {TRAIN_TARGET:.2f} "
                     f"| {train:.3f} | {_met(train, TRAIN_TARGET)} |")
        if BACKEND == "jax":
            eager = network["eval eager"].ratio("doconv")
            lines += [
                (f"| ResNet-18-style eval unfused <= {EVAL_TARGET:.2f}, eager (kernel cached) "
                 f"| {ratio_text(network['eval eager'], 'doconv')} | {_met(eager, EVAL_TARGET)} |"),
                (f"| ResNet-18-style eval unfused, compiled (predict_on_batch) "
                 f"| {network['eval'].ratio('doconv'):.3f} "
                 "| no target: traced calls recompose the kernel |")]
        else:
            lines.append(f"| ResNet-18-style eval unfused (predict_on_batch) "
                         f"| {network['eval'].ratio('doconv'):.3f} "
                         "| no target: TensorFlow recomposes the kernel in every call |")
        lines.append(f"| ResNet-18-style fused (a plain model) "
                     f"| {network['fused'].ratio('doconv'):.3f} | - |")
    for name in RANK_NETWORKS:
        ranked = {r.measure: r for r in rows if r.case.startswith(name)}
        if not ranked:
            continue
        train = ranked["train"].ratio("doconv")
        if network:
            limit = network["train"].ratio("doconv") + RANK_TRAIN_MARGIN
            lines.append(f"| {name} training ratio <= ResNet-18-style's + "
                         f"{RANK_TRAIN_MARGIN:.2f} ({limit:.3f}) | {train:.3f} "
                         f"| {_met(train, limit)} |")
        if BACKEND == "jax":
            eager = ranked["eval eager"].ratio("doconv")
            lines.append(f"| {name} eval unfused <= {RANK_EVAL_TARGET:.2f}, eager (kernel "
                         f"cached) | {ratio_text(ranked['eval eager'], 'doconv')} "
                         f"| {_met(eager, RANK_EVAL_TARGET)} |")
        lines.append(f"| {name} fused (a plain model) | {ranked['fused'].ratio('doconv'):.3f} "
                     "| - |")
    networks = ("ResNet-18-style", *RANK_NETWORKS)
    layer_train = [r for r in rows if r.measure == "train" and not r.case.startswith(networks)]
    if layer_train:
        worst = max(layer_train, key=lambda r: r.ratio("doconv"))
        lines.append(f"| per layer, largest training ratio (no Keras target) "
                     f"| {worst.ratio('doconv'):.3f} ({worst.case}) | - |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_arguments(__doc__.split("\n\n")[0], argv)
    start = time.perf_counter()
    rows = run_cases(args, layer_rows, network_rows) + rank_rows(args)
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
