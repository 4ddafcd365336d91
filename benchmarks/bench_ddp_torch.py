"""PyTorch: DO-Conv's training overhead under DistributedDataParallel against one process.

    python benchmarks/bench_ddp_torch.py [--markdown PATH] [--repeats N] [--batch N] [--smoke]

ResNet-20 (the CIFAR layout, see ``resnet20``; 3 x 28 x 28 inputs, 10 classes), native convs against
DO-Conv (``doconv_torch.convert``), one SGD training step (forward, backward, all-reduce,
optimizer step) timed:

  1 process            rank 0 alone, a plain model (no DDP), while rank 1 waits idle
  2 processes (DDP)    both ranks, DDP over gloo on the CPU

Weak scaling: every process trains on the same per-process batch (``--batch``), so a
DDP step does twice the work of a one-process step on two cores. One thread per process.
The two processes are spawned once (torch.multiprocessing, a file store: no port); each
round times native and DO-Conv alternately, first on one process, then under DDP, so the
four are measured side by side in one run and the machine's drifts fall on all alike.
The target: DO-Conv/native under DDP <= DO-Conv/native on one process + 0.03 (the
all-reduce of D, DO-Conv's extra parameter, must not cost more than that).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import doconv_torch  # noqa: E402
from benchmarks.bench_torch import BasicBlock  # noqa: E402
from benchmarks.harness import (command_line, machine_description, publish,  # noqa: E402
                                scaling_arguments, scaling_rounds, scaling_summary,
                                scaling_table)

WORLD_SIZE = 2
SETTINGS = ("1 process", "2 processes (DDP)")


def resnet20(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20's layout (He et al. 2016, section 4.2): a 3x3 stem of 16 channels,
    three stages of three basic blocks (16, 32, 64 channels). The shortcuts that change
    shape are 1x1 convs (bench_torch's BasicBlock), where samples/models_pt.py's resnet20
    pads with zeros; benchmarks and samples do not import each other."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                               nn.ReLU()]
    c_in = 16
    for stage, c_out in enumerate((16, 32, 64)):
        for block in range(3):
            layers.append(BasicBlock(c_in, c_out, 2 if stage and not block else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def worker(rank: int, args: argparse.Namespace, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=(Path(directory) / "store").as_uri(),
                            rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=600))
    try:
        torch.manual_seed(0)
        native = resnet20(num_classes=10)
        models = {"native": native, "doconv": doconv_torch.convert(native)}
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
        y = torch.randint(0, 10, (args.batch,), generator=generator)
        steps: dict[tuple[str, str], Callable[[], None]] = {}
        for variant, model in models.items():
            single = _copy(model)  # rank 0's one-process model: no DDP hooks
            steps[SETTINGS[0], variant] = _step(single, _sgd(single), x, y)
            ddp = nn.parallel.DistributedDataParallel(_copy(model))
            steps[SETTINGS[1], variant] = _step(ddp, _sgd(ddp), x, y)
        # rank 1 idles in the barrier while rank 0 times the one-process setting
        samples = scaling_rounds(steps, SETTINGS, args,
                                 skip=lambda setting: setting == SETTINGS[0] and rank != 0,
                                 after_setting=dist.barrier)
        if rank == 0:
            (Path(directory) / "samples.json").write_text(json.dumps(samples))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).train()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = scaling_arguments(__doc__.split("\n\n")[0], argv, "process")
    with tempfile.TemporaryDirectory() as directory:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(worker, args=(args, directory), nprocs=WORLD_SIZE, join=True)
        samples = json.loads((Path(directory) / "samples.json").read_text())
    summary = scaling_summary(samples)
    machine = machine_description({"torch": torch.__version__, "threads": "1 per process",
                                   "processes": f"1 and {WORLD_SIZE} (gloo)"})
    heading = (f"ResNet-20, 3x{args.size}x{args.size}, batch {args.batch} per process (weak "
               f"scaling), median of {args.repeats} rounds x {args.inner} steps; the ratio is "
               "the median of the per-round ratios")
    images = dict(zip(SETTINGS, (args.batch, args.batch * WORLD_SIZE)))
    table = scaling_table(summary, images, "DDP ratio - single-process ratio")
    publish(command_line("benchmarks/bench_ddp_torch.py", argv), machine, [heading, table],
            args.markdown)
    return summary


if __name__ == "__main__":
    main()
