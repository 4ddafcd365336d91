"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over two gloo processes: a DO-Conv net
built on the meta device, materialised with ``to_empty``, loaded from a full state dict and
trained on halves of a global batch matches single-process training on the whole batch.

The regression test for sharded meta-device builds: the layers' fixed identity used to be a
non-persistent buffer that ``to_empty`` left as garbage and no state dict refilled.
The ranks run as subprocesses, so that a crash or a hang fails this test and not the run.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fsdp2_worker
from doconv_torch import _ckernel

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
TIMEOUT_S = 180
# float32 throughout: a rank sees half the batch and the gradients are averaged across the
# ranks, so sums run in another order than in the single process.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def run_ranks(directory: Path, scenario: str) -> list:
    """Run fsdp2_worker.SCENARIOS[scenario] on every rank, wait for all (killing them at
    TIMEOUT_S) and return their results."""
    env = dict(os.environ)  # DOCONV_CKERNEL (--doconv-ckernel sets it) reaches the ranks
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    logs = [directory / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    processes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            processes.append(subprocess.Popen(
                [sys.executable, fsdp2_worker.__file__, str(rank), str(WORLD_SIZE),
                 str(directory), scenario],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in processes]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    report = "".join(f"\n--- rank {rank} ---\n{log.read_text()}" for rank, log in enumerate(logs))
    assert codes is not None, f"the ranks did not finish within {TIMEOUT_S} s{report}"
    assert codes == [0] * WORLD_SIZE, f"exit statuses {codes}{report}"
    return [torch.load(directory / f"rank{rank}.pt", weights_only=True)
            for rank in range(WORLD_SIZE)]


@pytest.mark.slow
def test_fully_shard_meta_build_loads_full_state_dict_and_matches_one_process(tmp_path):
    model = fsdp2_worker.reference_model(seed=5)
    torch.manual_seed(6)
    x = torch.randn(8, 3, 10, 10)
    y = torch.randint(0, 5, (8,))
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state": initial_state, "x": x, "y": y}, tmp_path / "data.pt")

    results = run_ranks(tmp_path, "train")

    per_rank = len(x) // WORLD_SIZE
    parts = [slice(rank * per_rank, (rank + 1) * per_rank) for rank in range(WORLD_SIZE)]
    with torch.no_grad():
        initial_out = model(x)
    losses = fsdp2_worker.train(model, x, y)
    with torch.no_grad():
        final_out = model(x)

    for rank, (result, part) in enumerate(zip(results, parts)):
        assert result["backend"] == _ckernel.backend().name, rank
        # The freshly loaded sharded model computes the reference's function (a garbage
        # identity after to_empty would not).
        torch.testing.assert_close(result["initial"], initial_out[part], **TOLERANCE,
                                   msg=lambda m: f"rank {rank} before training: {m}")
        torch.testing.assert_close(result["losses"], losses, **TOLERANCE,
                                   msg=lambda m: f"rank {rank} losses: {m}")
        torch.testing.assert_close(result["final"], final_out[part], **TOLERANCE,
                                   msg=lambda m: f"rank {rank} after training: {m}")

    # The gathered full state dict: rank 0 holds it (cpu_offload), the others none.
    assert results[1]["state"] == {}
    gathered = results[0]["state"]
    trained = model.state_dict()
    assert list(gathered) == list(trained)
    for key, value in trained.items():
        assert gathered[key].shape == value.shape and gathered[key].dtype == value.dtype, key
        assert type(gathered[key]) is torch.Tensor, (key, type(gathered[key]))
        torch.testing.assert_close(gathered[key], value, **TOLERANCE,
                                   msg=lambda m: f"{key}: {m}")
        if not key.endswith("_extra_state"):  # the layers' settings: not trained
            assert not torch.equal(value, initial_state[key]), f"{key} did not train"


@pytest.mark.slow
def test_fully_shard_no_grad_forwards_see_in_place_parameter_edits(tmp_path):
    torch.save({"state": fsdp2_worker.reference_model(seed=5).state_dict(),
                "x": torch.randn(4, 3, 10, 10)}, tmp_path / "data.pt")
    for rank, result in enumerate(run_ranks(tmp_path, "edits")):
        assert result["backend"] == _ckernel.backend().name, rank
        assert result["wrong"] == [], f"rank {rank}: stale outputs at steps {result['wrong']}"
