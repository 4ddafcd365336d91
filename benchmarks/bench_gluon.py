"""MXNet Gluon: DO-Conv against nn.Conv2D, per layer shape and for a ResNet-18-style network.

    python benchmarks/bench_gluon.py [--markdown docs/benchmarks-gluon.md] [--quick] [--repeats N]

Variants, timed interleaved (A B A B ...) in one process:
  native   gluon.nn.Conv2D
  doconv   doconv_mx.DOConv2D
Measures (MXNet runs asynchronously: every timed call ends with mx.nd.waitall(), so the
whole computation is timed, not just its enqueueing):
  train            forward + backward under autograd.record with the input requiring grad
                   (x.attach_grad(), as inside a network), both hybridized; for the whole
                   network instead softmax cross-entropy + backward + Trainer('sgd',
                   momentum 0.9).step
  eval hybrid      inference-mode forward, both hybridized: DO-Conv unfused, its kernel
                   recomposed on every call (a CachedOp graph cannot hold it constant)
  eval imperative  inference-mode forward, neither hybridized: DO-Conv unfused, its
                   composed kernel cached by doconv_mx
  fused            doconv_mx's fuse() result (an nn.Conv2D) against native, both hybridized
Hybridized means hybridize(static_alloc=True, static_shape=True), as Gluon users train for
speed. No peak-memory row: MXNet 1.9 exposes no per-step allocation peak on CPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402
from mxnet.gluon import nn  # noqa: E402
from mxnet.gluon.model_zoo.vision.resnet import BasicBlockV1, ResNetV1  # noqa: E402

import doconv_mx  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Row, command_line, format_table, interleaved_times, machine_description, medians,
    parse_arguments, publish, run_cases)

VARIANTS = ("native", "doconv")
HYBRID = {"static_alloc": True, "static_shape": True}
NETWORK = "ResNet-18-style"
# The Gluon targets (doconv / native); eval hybrid and fused have none.
TARGET_TRAIN = 1.30
TARGET_EVAL_CACHED = 1.05


def synced(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` followed by a wait for every pending operation (MXNet's engine is async)."""
    def call() -> None:
        fn()
        mx.nd.waitall()
    return call


def timed(variants: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per synchronised call; the warm-up calls build the hybridized graphs."""
    return medians(interleaved_times({v: synced(fn) for v, fn in variants.items()},
                                     repeats=repeats, warmup=3))


def hybridize(blocks: Sequence[gluon.HybridBlock], active: bool = True) -> None:
    """Switch blocks (and their children) to HYBRID graphs, or back to imperative calls."""
    for block in blocks:
        if active:
            block.hybridize(**HYBRID)
        else:
            block.hybridize(False)


def eval_rows(case: str, native: gluon.HybridBlock, doconv: gluon.HybridBlock,
              fuse: Callable[[], gluon.HybridBlock], x: mx.nd.NDArray,
              repeats: int) -> list[Row]:
    """eval hybrid, eval imperative, then fused (``fuse`` returns the fused block)."""
    def infer(block: gluon.HybridBlock) -> Callable[[], Any]:
        return lambda: block(x)  # outside autograd.record: inference mode (BN running stats)

    hybridize((native, doconv))
    pair = {"native": infer(native), "doconv": infer(doconv)}
    rows = [Row(case, "eval hybrid", timed(pair, repeats))]
    # Unhybridized, doconv_mx caches the composed kernel between inference calls.
    hybridize((native, doconv), active=False)
    rows.append(Row(case, "eval imperative", timed(pair, repeats)))
    fused = fuse()
    hybridize((native, fused))
    rows.append(Row(case, "fused", timed({"native": infer(native), "doconv": infer(fused)},
                                         repeats)))
    return rows


def layer_step(block: gluon.HybridBlock, x: mx.nd.NDArray) -> Callable[[], None]:
    """One training step of a lone layer: forward and backward, the input requiring grad."""
    def step() -> None:
        with autograd.record():
            y = block(x)
        y.backward()  # head gradient of ones: the gradient of y.sum()
    return step


def layer_rows(batch: int, layers: Sequence[tuple], repeats: int) -> list[Row]:
    rows = []
    for name, c_in, c_out, k, stride, padding, groups, size in layers:
        mx.random.seed(0)
        native = nn.Conv2D(c_out, k, stride, padding, groups=groups, in_channels=c_in)
        doconv = doconv_mx.DOConv2D(c_out, k, stride, padding, groups=groups, in_channels=c_in)
        for block in (native, doconv):
            block.initialize(mx.init.Xavier())
        x = mx.nd.random.normal(shape=(batch, c_in, size, size))
        x.attach_grad()
        case = f"{name} b{batch}"
        hybridize((native, doconv))
        rows.append(Row(case, "train", timed({"native": layer_step(native, x),
                                              "doconv": layer_step(doconv, x)}, repeats)))
        rows += eval_rows(case, native, doconv, doconv.fuse, x.detach(), repeats)
    return rows


def resnet18(width: int = 64, classes: int = 1000) -> gluon.HybridBlock:
    """ResNet-18 v1 (Gluon's model zoo, untrained): 7x7 stride-2 stem, BN, ReLU, 3x3 max pool,
    four stages of two basic blocks, 1x1 projection shortcuts with BN, global pool, Dense."""
    channels = [width, width, 2 * width, 4 * width, 8 * width]
    return ResNetV1(BasicBlockV1, [2, 2, 2, 2], channels, classes=classes)


def network_pair(x: mx.nd.NDArray, width: int = 64, classes: int = 1000
                 ) -> tuple[gluon.HybridBlock, gluon.HybridBlock]:
    """(native, doconv): two ResNet-18-style nets with the same weights, the second converted."""
    native, doconv = resnet18(width, classes), resnet18(width, classes)
    for net in (native, doconv):
        net.initialize(mx.init.Xavier())
        net(x)  # finishes deferred init: convert embeds only initialised convs exactly
    for mine, theirs in zip(doconv.collect_params().values(), native.collect_params().values(),
                            strict=True):
        mine.set_data(theirs.data())  # same weights: the converted net computes native's function
    return native, doconv_mx.convert(doconv)


def network_rows(batch: int, size: int, width: int, repeats: int) -> list[Row]:
    mx.random.seed(0)
    x = mx.nd.random.normal(shape=(batch, 3, size, size))
    label = mx.nd.random.randint(0, 1000, shape=(batch,)).astype("float32")
    native, doconv = network_pair(x, width)
    nets = {"native": native, "doconv": doconv}
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    trainers = {v: gluon.Trainer(net.collect_params(), "sgd",
                                 {"learning_rate": 1e-4, "momentum": 0.9})
                for v, net in nets.items()}

    def train(variant: str) -> Callable[[], None]:
        net, trainer = nets[variant], trainers[variant]

        def step() -> None:
            with autograd.record():
                loss = loss_fn(net(x), label)
            loss.backward()
            trainer.step(batch)
        return step

    case = f"{NETWORK} {size}x{size} b{batch}"
    hybridize((native, doconv, loss_fn))
    rows = [Row(case, "train", timed({v: train(v) for v in nets}, repeats))]
    return rows + eval_rows(case, native, doconv, lambda: doconv_mx.fuse(doconv), x, repeats)


def against_targets(rows: Sequence[Row]) -> str:
    """The issue's Gluon targets, checked on the whole-network rows (markdown)."""
    net = {row.measure: row.ratio("doconv") for row in rows if row.case.startswith(NETWORK)}
    if not net:
        return "(no whole-network rows)"

    def met(ratio: float, target: float) -> str:
        return "yes" if ratio <= target else "no"

    lines = ["| target | measured | met |", "|---|---|---|",
             (f"| {NETWORK} training ratio <= {TARGET_TRAIN:.2f} (hybridized) | "
              f"{net['train']:.3f} | {met(net['train'], TARGET_TRAIN)} |"),
             (f"| {NETWORK} eval unfused <= {TARGET_EVAL_CACHED:.2f} where the kernel is cached "
              f"(imperative) | {net['eval imperative']:.3f} | "
              f"{met(net['eval imperative'], TARGET_EVAL_CACHED)} |"),
             (f"| {NETWORK} eval unfused, hybridized: no target (MXNet 1.x recomposes the "
              f"kernel in every graph call) | {net['eval hybrid']:.3f} | reported |"),
             f"| {NETWORK} fused: no Gluon target | {net['fused']:.3f} | reported |"]
    return "\n".join(lines)


def _machine() -> str:
    mkldnn = mx.runtime.Features().is_enabled("MKLDNN")
    return machine_description({
        "mxnet": mx.__version__, "MKL-DNN": "on" if mkldnn else "off",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")})


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_arguments(__doc__.split("\n\n")[0], argv)
    rows = run_cases(args, layer_rows, network_rows)
    machine = _machine()
    table = format_table(rows, VARIANTS)
    summary = against_targets(rows)
    if args.quick:
        summary = ("Quick run: tiny, dispatch-bound sizes; these ratios say nothing about the "
                   "targets.\n\n" + summary)
    publish(command_line("benchmarks/bench_gluon.py", argv), machine,
            ["Hybridized: hybridize(static_alloc=True, static_shape=True); every timed call "
             "ends with mx.nd.waitall().", table, f"Against the targets:\n\n{summary}"],
            args.markdown)
    return rows


if __name__ == "__main__":
    main()
