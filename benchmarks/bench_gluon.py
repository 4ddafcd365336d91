"""MXNet Gluon: DO-Conv against Gluon's convs, per layer shape and for whole networks: a
ResNet-18-style 2-D network, a small 1-D ResNet and a small 3-D ResNet (R3D-style).

    python benchmarks/bench_gluon.py [--markdown docs/benchmarks-gluon.md] [--quick] [--repeats N]

Cases, layer shapes first: the issue's 2-D shapes (batch 8 and 32), a 1-D shape (256 channels,
kernel 3, length 1024, batch 16) and a 3-D one (64 channels, 3x3x3, 16x28x28, batch 4); then
the networks: ResNet-18-style (112x112, batch 16), a 1-D ResNet-10-style (12x1024, batch 16)
and an R3D-10-style one (3x16x56x56, batch 4). --part picks layers or networks.

Variants, timed interleaved (A B A B ...) in one process:
  native   gluon.nn.Conv1D / Conv2D / Conv3D
  doconv   doconv_mx.DOConv1D / DOConv2D / DOConv3D (the networks: doconv_mx.convert of native)
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
  fused            doconv_mx's fuse() result (Gluon's conv) against native, both hybridized
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
# 1-D and 3-D layer shapes, each at its own batch:
# (name, in, out, kernel, stride, padding, groups, spatial sizes, batch)
RANK_LAYERS = [("1-D k3 256ch L1024", 256, 256, 3, 1, 1, 1, (1024,), 16),
               ("3-D 3x3x3 64ch 16x28x28", 64, 64, 3, 1, 1, 1, (16, 28, 28), 4)]
QUICK_RANK_LAYERS = [("1-D k3 8ch L16", 8, 8, 3, 1, 1, 1, (16,), 2),
                     ("3-D 3x3x3 4ch 4x6x6", 4, 4, 3, 1, 1, 1, (4, 6, 6), 2)]
# Small 1-D and 3-D networks (12-channel signals, RGB clips): rank -> (name, input channels,
# spatial sizes, batch, width, classes); the quick run's are tiny.
RANK_NETWORKS = {1: ("1-D ResNet-10-style", 12, (1024,), 16, 64, 10),
                 3: ("R3D-10-style", 3, (16, 56, 56), 4, 32, 400)}
QUICK_RANK_NETWORKS = {1: ("1-D ResNet-10-style", 12, (32,), 2, 8, 10),
                       3: ("R3D-10-style", 3, (4, 16, 16), 2, 4, 400)}
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
    """Every layer shape at ``batch``; a shape's spatial size is an int (2-D, square) or a
    tuple of one size per axis (its rank: 1, 2 or 3)."""
    rows = []
    for name, c_in, c_out, k, stride, padding, groups, size in layers:
        spatial = (size, size) if isinstance(size, int) else tuple(size)
        rank = len(spatial)
        mx.random.seed(0)
        native = getattr(nn, f"Conv{rank}D")(c_out, k, stride, padding, groups=groups,
                                              in_channels=c_in)
        doconv = getattr(doconv_mx, f"DOConv{rank}D")(c_out, k, stride, padding, groups=groups,
                                                      in_channels=c_in)
        for block in (native, doconv):
            block.initialize(mx.init.Xavier())
        x = mx.nd.random.normal(shape=(batch, c_in) + spatial)
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


class FoldedBatchNorm(gluon.HybridBlock):
    """nn.BatchNorm of (N, C, *spatial) data computed on it folded to (N, C, 1, volume): the
    same per-channel statistics, so the same function and parameters. MXNet 1.9.1's MKL-DNN
    build fails in BatchNorm's backward on a 1-D or 3-D Convolution's output and not on 4-D
    data (docs/design.md); both variants use this block alike."""

    def __init__(self, channels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.bn = nn.BatchNorm(in_channels=channels)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return F.reshape_like(self.bn(F.reshape(x, shape=(0, 0, 1, -1))), x)


class BasicBlockND(gluon.HybridBlock):
    """ResNet's basic block with convs of ``rank`` spatial axes: two 3-wide convs with BN, a
    1-wide projection shortcut with BN where the stride or the width changes."""

    def __init__(self, rank: int, channels: int, stride: int, in_channels: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        conv, norm = getattr(nn, f"Conv{rank}D"), FoldedBatchNorm
        with self.name_scope():
            self.body = nn.HybridSequential()
            self.body.add(conv(channels, 3, stride, 1, use_bias=False, in_channels=in_channels),
                          norm(channels), nn.Activation("relu"),
                          conv(channels, 3, 1, 1, use_bias=False, in_channels=channels),
                          norm(channels))
            self.shortcut = None
            if stride != 1 or channels != in_channels:
                self.shortcut = nn.HybridSequential()
                self.shortcut.add(conv(channels, 1, stride, use_bias=False,
                                       in_channels=in_channels), norm(channels))

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.Activation(self.body(x) + residual, act_type="relu")


def resnet_nd(rank: int, in_channels: int, width: int, classes: int) -> gluon.HybridBlock:
    """A small ResNet of ``rank`` spatial axes (BN as FoldedBatchNorm): four stages of one
    basic block (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), global average pool (a mean),
    Dense. 1-D: ResNet's stem (7-wide
    stride-2 conv, BN, ReLU, 3-wide stride-2 max pool). 3-D: R3D's stem (Tran et al. 2018;
    3x7x7 conv, stride 1x2x2, BN, ReLU, no pool)."""
    conv = getattr(nn, f"Conv{rank}D")
    net = nn.HybridSequential()
    with net.name_scope():
        if rank == 3:
            net.add(conv(width, (3, 7, 7), (1, 2, 2), (1, 3, 3), use_bias=False,
                         in_channels=in_channels))
        else:
            net.add(conv(width, 7, 2, 3, use_bias=False, in_channels=in_channels))
        net.add(FoldedBatchNorm(width), nn.Activation("relu"))
        if rank == 1:
            net.add(nn.MaxPool1D(3, 2, 1))
        channels = width
        for stage in range(4):
            out = width * 2 ** stage
            net.add(BasicBlockND(rank, out, 1 if stage == 0 else 2, channels))
            channels = out
        # The global average pool as a mean: MXNet 1.9.1's MKL-DNN GlobalAvgPool1D failed
        # ("dimensions are invalid") in a process that had run the 2-D network first.
        axes = tuple(range(2, 2 + rank))
        net.add(nn.HybridLambda(lambda F, x: F.mean(x, axis=axes)),
                nn.Dense(classes, in_units=channels))
    return net


def _same_weights_converted(native: gluon.HybridBlock, doconv: gluon.HybridBlock,
                            x: mx.nd.NDArray) -> tuple[gluon.HybridBlock, gluon.HybridBlock]:
    """(native, doconv converted), the second holding the first's weights."""
    for net in (native, doconv):
        net.initialize(mx.init.Xavier())
    # Finishes native's deferred init. In training mode: after an inference call MXNet 1.9.1
    # refuses writes to 1-D and 3-D conv weights (docs/design.md), and training follows.
    with autograd.train_mode():
        native(x)
    for mine, theirs in zip(doconv.collect_params().values(), native.collect_params().values(),
                            strict=True):
        # Same weights (a deferred parameter takes its shape and values from set_data): the
        # converted net computes native's function; convert embeds the convs exactly.
        mine.set_data(theirs.data())
    return native, doconv_mx.convert(doconv)


def network_pair(x: mx.nd.NDArray, width: int = 64, classes: int = 1000
                 ) -> tuple[gluon.HybridBlock, gluon.HybridBlock]:
    """(native, doconv): two ResNet-18-style nets with the same weights, the second converted."""
    return _same_weights_converted(resnet18(width, classes), resnet18(width, classes), x)


def rank_network_pair(rank: int, x: mx.nd.NDArray, width: int, classes: int
                      ) -> tuple[gluon.HybridBlock, gluon.HybridBlock]:
    """(native, doconv): two small ResNets of ``rank`` spatial axes (``resnet_nd``) with the
    same weights, the second converted."""
    return _same_weights_converted(*(resnet_nd(rank, x.shape[1], width, classes)
                                     for _ in range(2)), x)


def network_rows(batch: int, size: int, width: int, repeats: int) -> list[Row]:
    """The ResNet-18-style network on size x size images (the harness's network)."""
    mx.random.seed(0)
    x = mx.nd.random.normal(shape=(batch, 3, size, size))
    label = mx.nd.random.randint(0, 1000, shape=(batch,)).astype("float32")
    return _network_rows(f"{NETWORK} {size}x{size} b{batch}", network_pair(x, width), x, label,
                         repeats)


def rank_network_rows(rank: int, networks: Mapping[int, tuple], repeats: int) -> list[Row]:
    """The small network of ``rank`` spatial axes as ``networks`` sizes it."""
    name, channels, spatial, batch, width, classes = networks[rank]
    mx.random.seed(0)
    x = mx.nd.random.normal(shape=(batch, channels) + spatial)
    label = mx.nd.random.randint(0, classes, shape=(batch,)).astype("float32")
    sizes = f"L{spatial[0]}" if rank == 1 else "x".join(map(str, spatial))
    case = f"{name} {sizes} b{batch}"
    return _network_rows(case, rank_network_pair(rank, x, width, classes), x, label, repeats)


def _network_rows(case: str, pair: tuple[gluon.HybridBlock, gluon.HybridBlock],
                  x: mx.nd.NDArray, label: mx.nd.NDArray, repeats: int) -> list[Row]:
    """train, then eval_rows, for a (native, doconv) pair of networks."""
    batch = x.shape[0]
    native, doconv = pair
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


def rank_rows(quick: bool, part: str, repeats: int, *, layers: bool = True,
              networks: bool = True) -> list[Row]:
    """The 1-D and 3-D layer shapes (RANK_LAYERS, each at its batch) and networks, as
    --quick and --part select them."""
    shapes, sizes = ((QUICK_RANK_LAYERS, QUICK_RANK_NETWORKS) if quick
                     else (RANK_LAYERS, RANK_NETWORKS))
    rows: list[Row] = []
    if layers and (quick or part in ("all", "layers")):
        for *shape, batch in shapes:
            rows += layer_rows(batch, [tuple(shape)], repeats)
    if networks and (quick or part in ("all", "network")):
        for rank in sorted(sizes):
            rows += rank_network_rows(rank, sizes, repeats)
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_arguments(__doc__.split("\n\n")[0], argv)
    # The layer shapes (2-D, then 1-D and 3-D), then the networks (ResNet-18-style, then the
    # 1-D ResNet and R3D): run_cases picks the 2-D sizes (and tunes malloc for a full run);
    # its network call is held back until the 1-D and 3-D layer shapes are done.
    networks: list[tuple] = []
    rows = run_cases(args, layer_rows,
                     lambda *sizes, **options: networks.append((sizes, options)) or [])
    repeats = 2 if args.quick else args.repeats
    rows += rank_rows(args.quick, args.part, repeats, networks=False)
    for sizes, options in networks:
        rows += network_rows(*sizes, **options)
    rows += rank_rows(args.quick, args.part, repeats, layers=False)
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
