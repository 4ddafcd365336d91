"""The per-process part of the DistributedDataParallel test (spawned, so importable)."""

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from doconv_torch import DOConv2d

STEPS = 3
LR = 0.1


def build_model() -> nn.Module:
    return nn.Sequential(DOConv2d(2, 4, 3, padding=1, D_mul=12), nn.ReLU(),
                         DOConv2d(4, 6, 3, stride=2, groups=2, padding_mode="reflect",
                                  padding=1),
                         nn.ReLU(), DOConv2d(6, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def run(rank: int, world_size: int, directory: str) -> None:
    torch.set_num_threads(1)
    # A file store in the test's folder: no TCP port to race other processes for.
    dist.init_process_group("gloo", init_method=(Path(directory) / "store").as_uri(),
                            rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        directory = Path(directory)
        data = torch.load(directory / "data.pt", weights_only=True)
        model = build_model()
        model.load_state_dict(data["state"])
        ddp = nn.parallel.DistributedDataParallel(model)
        per_rank = len(data["x"]) // world_size
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        train(ddp, data["x"][part], data["y"][part])
        torch.save(model.state_dict(), directory / f"rank{rank}.pt")
        # Both ranks finish communicating before either tears gloo down: a rank that exits
        # while the other still has gloo threads running can abort it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
