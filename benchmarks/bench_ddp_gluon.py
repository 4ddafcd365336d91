"""Gluon: DO-Conv's training overhead data-parallel on two devices against one device.

    python benchmarks/bench_ddp_gluon.py [--markdown PATH] [--repeats N] [--batch N] [--smoke]

GluonCV's CIFAR ResNet-20 (``cifar_resnet20_v1``; 3 x 28 x 28 inputs, 10 classes), native
convs against DO-Conv (``doconv_mx.convert``), one training step as samples/train_gluoncv.py
takes it (split_and_load, forward and softmax cross-entropy under autograd, backward,
Trainer.step: the kvstore's gradient sum and each device's SGD update, momentum 0.9), timed:

  1 device               mx.cpu(0) alone (GPU 0 where MXNet sees a GPU)
  2 devices (kvstore)    mx.cpu(0) and mx.cpu(1) (GPUs 0 and 1), a 'device' kvstore

Weak scaling: every device takes ``--batch`` images, so a two-device step does twice the
work of a one-device step. On the CPU, one OpenMP thread per operator (OMP_NUM_THREADS=1
unless set) and one engine thread per context, so the two contexts use two cores. All four
run in one process; each round times native and DO-Conv alternately, first on one device,
then on two, so the machine's drifts fall on all alike. Every timed step ends with
mx.nd.waitall(). The target, as for PyTorch's DDP: DO-Conv/native on two devices <=
DO-Conv/native on one + 0.03 (the kvstore's sum of D, DO-Conv's extra parameter, must not
cost more than that).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before MXNet loads: it reads them once
os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "1")

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import doconv_mx  # noqa: E402
from benchmarks.harness import (SCALING_VARIANTS, command_line,  # noqa: E402
                                machine_description, publish, scaling_arguments,
                                scaling_rounds, scaling_summary, scaling_table)

SETTINGS = ("1 device", "2 devices (kvstore)")


def contexts(count: int) -> list[mx.Context]:
    if mx.context.num_gpus() >= count:
        return [mx.gpu(i) for i in range(count)]
    return [mx.cpu(i) for i in range(count)]


def training_step(variant: str, ctx: list[mx.Context], batch: int,
                  size: int) -> Callable[[], None]:
    """One step of ``variant`` on ``ctx``: the same initial weights and data for every
    setting and variant (seeded), ``batch`` images per device."""
    from gluoncv import model_zoo

    mx.random.seed(0)
    net = model_zoo.get_model("cifar_resnet20_v1", classes=10, pretrained=False)
    net.initialize(mx.init.MSRAPrelu(), ctx=ctx)
    net(mx.nd.zeros((1, 3, size, size), ctx=ctx[0]))
    if variant == "doconv":
        net = doconv_mx.convert(net)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), "sgd",
                            {"learning_rate": 1e-4, "momentum": 0.9}, kvstore="device",
                            update_on_kvstore=False)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    x = mx.nd.random.normal(shape=(batch * len(ctx), 3, size, size))
    y = mx.nd.random.randint(0, 10, shape=(batch * len(ctx),)).astype("float32")
    xs = gluon.utils.split_and_load(x, ctx)
    ys = gluon.utils.split_and_load(y, ctx)

    def step() -> None:
        with autograd.record():
            losses = [loss(net(xi), yi) for xi, yi in zip(xs, ys)]
        autograd.backward(losses)
        trainer.step(x.shape[0])
        mx.nd.waitall()

    return step


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    steps = {(setting, variant): training_step(variant, contexts(devices), args.batch,
                                               args.size)
             for setting, devices in zip(SETTINGS, (1, 2)) for variant in SCALING_VARIANTS}
    return scaling_rounds(steps, SETTINGS, args)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = scaling_arguments(__doc__.split("\n\n")[0], argv, "device")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = scaling_summary(measure(args))
    kind = "gpu" if mx.context.num_gpus() >= 2 else "cpu"
    machine = machine_description({
        "mxnet": mx.__version__, "devices": f"1 and 2 {kind} contexts, one process",
        "threads": f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
                   f"MXNET_CPU_WORKER_NTHREADS={os.environ['MXNET_CPU_WORKER_NTHREADS']}"})
    heading = (f"GluonCV cifar_resnet20_v1, 3x{args.size}x{args.size}, batch {args.batch} per "
               f"device (weak scaling), median of {args.repeats} rounds x {args.inner} steps; "
               "the ratio is the median of the per-round ratios")
    publish(command_line("benchmarks/bench_ddp_gluon.py", argv), machine,
            [heading, scaling_table(summary, dict(zip(SETTINGS, (args.batch, 2 * args.batch))),
                                    "two-device ratio - one-device ratio")], args.markdown)
    return summary


if __name__ == "__main__":
    main()
