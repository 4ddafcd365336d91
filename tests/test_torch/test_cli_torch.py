"""``doconv fuse`` on PyTorch files, end to end: train a small model holding a grouped
DOConv2d with D_mul > its kernel volume, a non-square kernel, a 1x1 layer, a DOConv1d and a
DOConv3d; save its state dict (torch.save, safetensors, a nested training checkpoint); fuse
in a subprocess without the model's code; load the output strictly into the architecture
built with nn.Conv1d/2d/3d; compare outputs. Also the layers' extra state (what the state
dict records for the command) and old checkpoints without it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from doconv_torch import DOConv1d, DOConv2d, DOConv3d, fuse
from tests.cli_checks import run_doconv


run = run_doconv


def plain_conv(rank: int):
    native = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
    return lambda *args, D_mul=None, **kwargs: native(*args, **kwargs)


class Net(nn.Module):
    """An image branch, a signal branch and a volume branch; ``doconv`` picks DOConv or
    native convs: the same architecture either way."""

    def __init__(self, doconv: bool = True) -> None:
        super().__init__()
        conv1, conv2, conv3 = ((DOConv1d, DOConv2d, DOConv3d) if doconv
                               else (plain_conv(1), plain_conv(2), plain_conv(3)))
        self.features = nn.Sequential(
            conv2(4, 8, 3, padding=1, groups=2, D_mul=12),  # grouped, D_mul > 9
            nn.BatchNorm2d(8), nn.ReLU(),
            conv2(8, 6, (1, 3), padding=(0, 1), bias=False),  # non-square
            conv2(6, 6, 1))  # 1x1: no D
        self.signal = nn.Sequential(conv1(3, 4, 5, padding=2, D_mul=7), nn.ReLU())
        self.volume = conv3(2, 4, (3, 1, 2), groups=2)
        self.head = nn.Linear(6 + 4 + 4, 3)

    def forward(self, image, signal, volume):
        pooled = [self.features(image).mean((2, 3)), self.signal(signal).mean(2),
                  self.volume(volume).mean((2, 3, 4))]
        return self.head(torch.cat(pooled, 1))


def inputs(batch: int = 4):
    return (torch.randn(batch, 4, 7, 6), torch.randn(batch, 3, 9), torch.randn(batch, 2, 5, 4, 4))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        x = inputs()
        optimizer.zero_grad()
        model(*x).square().mean().backward()
        optimizer.step()
    model.eval()
    for layer in (model.features[0], model.signal[0], model.volume):
        assert layer.D.abs().max() > 0  # training moved D away from 0
    return model, optimizer


def load_plain(path: Path) -> Net:
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(
        path, weights_only=True)
    plain = Net(doconv=False).eval()
    plain.load_state_dict(state, strict=True)
    return plain


def assert_same_outputs(model: nn.Module, plain: nn.Module) -> None:
    x = inputs(6)
    with torch.no_grad():
        torch.testing.assert_close(plain(*x), model(*x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source, target", [(".pt", ".pt"), (".pth", ".safetensors"),
                                            (".safetensors", ".safetensors"),
                                            (".safetensors", ".pt")])
def test_fuse_loads_strictly_into_the_plain_architecture(trained, tmp_path, source, target):
    model, _ = trained
    path = tmp_path / f"model{source}"
    if source == ".safetensors":
        save_file(model.state_dict(), path, metadata={"epoch": "5"})
    else:
        torch.save(model.state_dict(), path)
    out = tmp_path / f"plain{target}"
    result = run("fuse", path, out)
    assert result.returncode == 0, result.stderr
    assert "fused 5 DO-Conv layer(s)" in result.stdout
    plain = load_plain(out)
    assert_same_outputs(model, plain)
    # The same values as the adapter's own fuse, key for key and in order.
    expected = fuse(model).state_dict()
    state = load_file(out) if target == ".safetensors" else torch.load(out, weights_only=True)
    if source != ".safetensors" and target == ".pt":  # safetensors orders keys its own way
        assert list(state) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    if source == target == ".safetensors":
        from doconv_core import read_safetensors_header
        assert read_safetensors_header(out)[1] == {"epoch": "5"}


def test_inspect_names_every_layer(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    result = run("inspect", path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.startswith(("features.", "signal.", "volume"))}
    assert rows["features.0"][1:8] == ["2", "3x3", "2", "12", "8x2x12", "4x9x12", "8"]
    assert rows["features.3"][1:8] == ["2", "1x3", "1", "3", "6x8x3", "8x3x3", "-"]
    assert rows["features.4"][1:8] == ["2", "1x1", "1", "1", "6x6x1", "-", "6"]
    assert rows["signal.0"][1:5] == ["1", "5", "1", "7"]
    assert rows["volume"][1:5] == ["3", "3x1x2", "2", "6"]
    ratio = (model.volume.D.norm() / model.volume.W.norm()).item()
    assert float(rows["volume"][8]) == pytest.approx(ratio, rel=1e-3)
    training = sum(v.numel() for k, v in model.state_dict().items()
                   if not k.endswith("_extra_state"))
    fused = sum(v.numel() for v in fuse(model).state_dict().values())
    assert f"parameters: {training:,} for training, {fused:,} after fusion" in result.stdout


def test_a_training_checkpoint_is_found_or_named(trained, tmp_path):
    model, optimizer = trained
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 5},
               path)
    out = tmp_path / "plain.pt"
    result = run("fuse", path, out)
    assert result.returncode == 0, result.stderr
    assert "the state dict under 'model'" in result.stdout
    assert_same_outputs(model, load_plain(out))
    out.unlink()
    assert run("fuse", path, out, "--key", "model").returncode == 0
    assert_same_outputs(model, load_plain(out))
    result = run("fuse", path, tmp_path / "other.pt", "--key", "optimizer")
    assert result.returncode == 1 and "entry 'optimizer' (--key) is not a state dict" in \
        result.stderr
    # Two state dicts holding DO-Conv layers: the command asks which.
    torch.save({"model": model.state_dict(), "ema": model.state_dict()}, path)
    result = run("fuse", path, tmp_path / "other.pt")
    assert result.returncode == 1 and "--key (one of ['ema', 'model'])" in result.stderr
    assert not (tmp_path / "other.pt").exists()


def old_state(model: nn.Module) -> dict:
    """The state dict doconv_torch saved before layers recorded their extra state."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_an_old_checkpoint_is_refused_naming_the_layer_and_accepted_with_the_option(
        trained, tmp_path):
    model, _ = trained
    path = tmp_path / "old.pt"
    torch.save(old_state(model), path)
    out = tmp_path / "plain.pt"
    result = run("fuse", path, out)
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert re.search(r"layer 'features\.0': .*--kernel-size features\.0=3x3", result.stderr)
    result = run("fuse", path, out, "--rank", "2")
    assert result.returncode == 1
    assert "layer 'features.3'" in result.stderr and "features.3=1x3" in result.stderr
    result = run("fuse", path, out, "--rank", "2", "--kernel-size", "features.3=1x3",
                 "--kernel-size", "signal.0=5", "--kernel-size", "volume=3x1x2",
                 "--kernel-size", "features.4=1x1")
    assert result.returncode == 0, result.stderr
    assert_same_outputs(model, load_plain(out))
    # A wrong shape of the right volume is the user's word: the load then fails on shapes.
    result = run("inspect", path)
    assert "kernel shape not recorded for 5 layer(s)" in result.stdout


def test_extra_state_is_a_small_int_tensor_and_checked_on_load():
    layer = DOConv2d(4, 6, (3, 2), groups=2, D_mul=8)
    state = layer.state_dict()
    assert list(state) == ["W", "D", "bias", "_extra_state"]
    assert state["_extra_state"].dtype == torch.int64
    assert state["_extra_state"].tolist() == [1, 2, 2, 3, 2]
    assert DOConv3d(2, 2, 1).state_dict()["_extra_state"].tolist() == [1, 3, 1, 1, 1, 1]
    # Old state dicts (no extra state) load, strict included, and so do native convs' ones.
    other = DOConv2d(4, 6, (3, 2), groups=2, D_mul=8)
    result = other.load_state_dict({k: v for k, v in state.items() if k != "_extra_state"})
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(other.weight, layer.weight)
    other.load_state_dict(nn.Conv2d(4, 6, (3, 2), groups=2).state_dict())
    # The same volume, another shape: the shapes of W and D cannot tell, the extra state can.
    wrong = DOConv2d(4, 6, (2, 3), groups=2, D_mul=8)
    with pytest.raises(RuntimeError, match=re.escape(
            "_extra_state: the checkpoint was saved from a layer with kernel_size (3, 2) "
            "(this layer's is (2, 3))")):
        wrong.load_state_dict(state)
    with pytest.raises(RuntimeError, match="the extra state must be an int64 tensor"):
        other.load_state_dict({**state, "_extra_state": torch.zeros(2)})
    with pytest.raises(ValueError, match="groups"):
        DOConv2d(4, 6, (3, 2), D_mul=8).set_extra_state(state["_extra_state"])


def test_state_dict_stays_tensors_only_for_safetensors_and_meta_builds(tmp_path):
    model = Net()
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # no Python objects
    with torch.device("meta"):
        on_meta = Net()
    on_meta.to_empty(device="cpu")
    on_meta.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    on_meta.eval(), model.eval()
    x = inputs()
    with torch.no_grad():
        assert torch.equal(on_meta(*x), model(*x))


def test_bfloat16_state_dict_fuses_in_its_dtype(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "bf16.pt"
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in model.state_dict().items()}, path)
    out = tmp_path / "plain.pt"
    assert run("fuse", path, out).returncode == 0
    state = torch.load(out, weights_only=True)
    assert state["features.0.weight"].dtype == torch.bfloat16
    expected = fuse(model).state_dict()["features.0.weight"]
    torch.testing.assert_close(state["features.0.weight"].float(), expected, rtol=2e-2,
                               atol=2e-2)


def test_torch_file_errors_are_one_line(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:-200])
    pickled = tmp_path / "object.pt"
    torch.save({"model": model.state_dict(), "fn": Net}, pickled)  # not weights_only-safe
    for source, pattern in ((truncated, r"truncated|corrupt"),
                            (pickled, r"cannot be read by torch\.load\(weights_only=True\)")):
        out = tmp_path / "out.pt"
        result = run("fuse", source, out)
        assert result.returncode == 1, result
        assert result.stderr.startswith("doconv: error: ") and result.stderr.count("\n") == 1
        assert re.search(pattern, result.stderr), result.stderr
        assert not out.exists()


def test_console_script_when_installed():
    script = Path(sys.executable).parent / "doconv"
    if not script.exists():
        pytest.skip("the console script is installed on (re)installing the package")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == run("--help").stdout


# -- issue 28: every problem with a .pt file is one line, nothing written ---------------------
def layer_entries(**changes) -> dict:
    """One DOConv2d(2, 3, 3)'s state dict under ``conv.``, with ``changes`` applied (a value
    None drops the key)."""
    state = {f"conv.{k}": v for k, v in DOConv2d(2, 3, 3).state_dict().items()}
    for key, value in changes.items():
        if value is None:
            state.pop(f"conv.{key}")
        else:
            state[f"conv.{key}"] = value
    return state


BAD_STATES = {
    "D_mul below the kernel volume": (
        layer_entries(W=torch.randn(3, 2, 4), D=torch.zeros(2, 9, 4)),
        r"layer 'conv' is not a valid DO-Conv layer: D_mul must be >= kernel height\*width = 9"),
    "no input channels": (layer_entries(W=torch.randn(3, 0, 9), D=torch.zeros(0, 9, 9)),
                          r"no input channels"),
    "extra state a list": (layer_entries(_extra_state=[1, 2, 1, 3, 3]),
                           r"'conv\._extra_state' is a list, not a tensor"),
    "extra state of floats": (layer_entries(_extra_state=torch.tensor([1., 2, 1, 3, 3])),
                              r"not a DO-Conv extra state: .*1-D integer tensor"),
    "sparse W": (layer_entries(W=torch.randn(3, 2, 9).to_sparse()),
                 r"'conv\.W' cannot be read as an array: it is a torch\.sparse_coo tensor"),
    "meta W": (layer_entries(W=torch.empty(3, 2, 9, device="meta")),
               r"'conv\.W' cannot be read as an array: it is a meta tensor"),
    "a key that is not a string": ({**layer_entries(), 0: torch.zeros(2)},
                                   r"keys that are not strings: \['0'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_bad_state_dicts_are_one_line_and_write_nothing(tmp_path, case):
    from tests.cli_checks import assert_failed_cleanly, run_in_process
    state, pattern = BAD_STATES[case]
    path = tmp_path / "model.pt"
    torch.save(state, path)
    for out in (tmp_path / "plain.pt", tmp_path / "plain.safetensors"):
        assert_failed_cleanly(run_in_process("fuse", path, out), tmp_path, [path], pattern)
    assert_failed_cleanly(run_in_process("inspect", path), tmp_path, [path], pattern)


def test_a_pickle_protocol_4_file_is_one_line_without_the_warning(tmp_path):
    """torch.load's warning about the protocol added two lines to the error before."""
    from tests.cli_checks import assert_one_line_error
    path = tmp_path / "p4.pt"
    torch.save(layer_entries(), path, pickle_protocol=4)
    for args in (("inspect", path), ("fuse", path, tmp_path / "plain.pt")):
        result = run(*args)
        assert_one_line_error(result.returncode, result.stdout, result.stderr,
                              r"saved with pickle protocol 4, .*save it again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p4.pt"]


def test_a_sparse_entry_beside_the_layers_cannot_go_to_safetensors(tmp_path):
    from tests.cli_checks import assert_failed_cleanly, run_in_process
    path = tmp_path / "model.pt"
    torch.save({**layer_entries(), "table": torch.eye(3).to_sparse()}, path)
    assert_failed_cleanly(run_in_process("fuse", path, tmp_path / "plain.safetensors"),
                          tmp_path, [path], r"'table' cannot be written.*sparse.*write a \.pt")
    assert run_in_process("fuse", path, tmp_path / "plain.pt")[0] == 0  # a .pt holds it


@pytest.mark.parametrize("target", [".pt", ".safetensors"])
def test_a_full_disk_is_one_line_naming_out(trained, tmp_path, target):
    """torch.save's failing write was a RuntimeError traceback (its temporary file named)."""
    from tests.cli_checks import assert_one_line_error, leftovers
    model, _ = trained
    path = tmp_path / "model.pt"
    torch.save({**model.state_dict(), "big": torch.zeros(4096)}, path)
    out = tmp_path / f"plain{target}"
    result = run("fuse", path, out, file_size_limit=4096)
    assert_one_line_error(result.returncode, result.stdout, result.stderr,
                          rf"cannot write '.*plain\{target}': .*(nothing was written)")
    assert ".tmp" not in result.stderr
    assert leftovers(tmp_path, [path]) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_state_dicts_fuse_the_same_in_every_format(trained, tmp_path, dtype):
    """A bf16 safetensors state dict was refused while the same .pt fused: both compose in
    float32 and store the input's dtype, bit for bit alike."""
    from tests.cli_checks import run_in_process
    model, _ = trained
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "model.pt")
    save_file(state, tmp_path / "model.safetensors")
    fused = {}
    for source in ("model.pt", "model.safetensors"):
        for target in ("plain.pt", "plain.safetensors"):
            out = tmp_path / f"{source}-{target}"
            status, _, stderr = run_in_process("fuse", tmp_path / source, out)
            assert status == 0, stderr
            fused[source, target] = (load_file(out) if target.endswith(".safetensors")
                                     else torch.load(out, weights_only=True))
    reference = fused["model.pt", "plain.pt"]
    assert reference["features.0.weight"].dtype == dtype
    for name, state in fused.items():
        assert set(state) == set(reference), name
        for key, value in reference.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), (name, key)
    expected = fuse(model).state_dict()["features.0.weight"]
    torch.testing.assert_close(reference["features.0.weight"].float(), expected, rtol=2e-2,
                               atol=2e-2)
