"""The per-process part of the FSDP2 test: run as a script, one process per rank.

``python fsdp2_worker.py RANK WORLD_SIZE DIRECTORY SCENARIO`` reads DIRECTORY/data.pt (the
reference model's full state dict and the global batch), rendezvouses through the file
DIRECTORY/store, runs SCENARIO (a key of SCENARIOS) and writes its results to
DIRECTORY/rank{RANK}.pt. Imported by the test for the model and the training loop.
"""

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.fsdp import fully_shard

from doconv_torch import DOConv2d, _ckernel

SGD_STEPS = 3
ADAM_STEPS = 2
SGD_LR = 0.1
ADAM_LR = 1e-2


def build_model() -> nn.Module:
    """Uneven shards on purpose: FSDP2 shards dim 0, and W (8, 3, 12) of layer 0 has 8 rows
    but its D (3, 9, 12) has 3, and the Linear's weight 5."""
    return nn.Sequential(
        DOConv2d(3, 8, 3, padding=1, D_mul=12), nn.ReLU(),  # bias, D_mul > M*N
        DOConv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.ReLU(),  # grouped
        DOConv2d(8, 6, 3, padding=1, groups=2, padding_mode="reflect"), nn.ReLU(),
        DOConv2d(6, 6, 1),  # 1x1: W and bias only, no D
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def reference_model(seed: int) -> nn.Module:
    """Built the ordinary way, with D drawn away from 0: D = 0 would hide a wrong (or
    missing) identity D_diag behind W's own values."""
    torch.manual_seed(seed)
    model = build_model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DOConv2d) and module.D is not None:
                module.D.normal_(0, 0.2)
    return model


def shard(model: nn.Module) -> None:
    """fully_shard per layer for the first two DOConv2d; the rest (two DOConv2d inside no
    FSDP module of their own, and the Linear) belong to the root's group."""
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduce=lambda loss: loss) -> list:
    """SGD with momentum, then Adam; mean cross-entropy over the batch it is given. Returns
    the losses, each passed through ``reduce`` (the ranks' mean under FSDP)."""
    losses = []
    for optimizer, steps in (
            (torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=0.9), SGD_STEPS),
            (torch.optim.Adam(model.parameters(), lr=ADAM_LR), ADAM_STEPS)):
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(reduce(loss.detach()).item())
    return losses


def train_from_meta(rank: int, world_size: int, directory: Path) -> dict:
    """Build on meta, shard, materialise, load rank 0's full state dict, train on this rank's
    half of the global batch, gather the full state dict (on rank 0)."""
    data = torch.load(directory / "data.pt", weights_only=True)
    per_rank = len(data["x"]) // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    x, y = data["x"][part], data["y"][part]

    with torch.device("meta"):
        model = build_model()
    shard(model)
    model.to_empty(device="cpu")
    # Only rank 0 holds the full state dict; the other ranks receive their shards.
    set_model_state_dict(
        model, data["state"] if rank == 0 else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        initial = model(x)
    model.reshard()  # the root keeps its group unsharded after a no-grad forward

    def mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        return loss / world_size

    losses = train(model, x, y, mean_over_ranks)
    with torch.no_grad():
        final = model(x)
    model.reshard()
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"initial": initial, "final": final, "losses": losses, "state": state}


def edit_between_no_grad_forwards(rank: int, world_size: int, directory: Path) -> dict:
    """No-grad forwards with the sharded parameters changed in place between them (as an
    EMA update, a weight perturbation or an optimizer step between two evaluations does):
    each forward must see the new values. FSDP2 refills one reused unsharded tensor per
    parameter in place and keeps its version counter, so a kernel cache keyed on identity,
    version and address can match the previous values' kernel."""
    data = torch.load(directory / "data.pt", weights_only=True)
    reference = build_model()
    reference.load_state_dict(data["state"])
    model = build_model()
    model.load_state_dict(data["state"])
    shard(model)
    x = data["x"]
    wrong = []
    with torch.no_grad():
        for step in range(100):
            expected = reference(x)
            if not torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6):
                wrong.append(step)
            model.reshard()  # the root's group too: every edit goes to the shards
            for module in (model, reference):
                for param in module.parameters():
                    param.add_(0.01 if step % 2 else -0.01)
    return {"wrong": wrong}


SCENARIOS = {"train": train_from_meta, "edits": edit_between_no_grad_forwards}


def run(rank: int, world_size: int, directory: Path, scenario: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=(directory / "store").as_uri(), rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        result = SCENARIOS[scenario](rank, world_size, directory)
        result["backend"] = _ckernel.backend().name
        torch.save(result, directory / f"rank{rank}.pt")
        # Both ranks finish communicating before either tears gloo down.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
