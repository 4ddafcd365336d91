"""torch.compile, TorchScript (script and trace), ONNX export of the fused model, DDP."""

import io

import numpy as np
import pytest
import torch
from torch import nn

import ddp_worker
from doconv_torch import DOConv2d, fuse

# torch 2.9+ deprecates TorchScript and the legacy ONNX exporter; both still work and are
# what the issue asks to test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*torch.jit.*is deprecated:DeprecationWarning",
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    "ignore:The feature will be removed:DeprecationWarning")


def small_net():
    torch.manual_seed(3)
    model = nn.Sequential(DOConv2d(3, 8, 3, padding=1, D_mul=12), nn.ReLU(),
                          DOConv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),
                          DOConv2d(8, 6, 3, padding="same", groups=2, padding_mode="circular"),
                          nn.ReLU(), DOConv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DOConv2d) and m.D is not None:
                m.D.normal_(0, 0.2)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def forward_backward(module, x, model=None):
    model = module if model is None else model  # a compiled module renames parameters
    model.zero_grad()
    y = module(x)
    y.pow(2).sum().backward()
    return y.detach(), grads(model)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = small_net()
    x = torch.randn(2, 3, 10, 10)
    y_eager, g_eager = forward_backward(model, x)
    compiled = torch.compile(model, backend="inductor")
    y_compiled, g_compiled = forward_backward(compiled, x, model)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-4, atol=1e-5)
    for name in g_eager:
        torch.testing.assert_close(g_compiled[name], g_eager[name], rtol=1e-4, atol=1e-5)
    # Eval / no_grad through the compiled module sees parameter updates.
    model.eval()
    with torch.no_grad():
        before = compiled(x)
        model[0].W.mul_(2)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(compiled(x), before)


def test_torchscript_script_matches_eager_and_round_trips():
    model = small_net()
    x = torch.randn(2, 3, 9, 9)
    y_eager, g_eager = forward_backward(model, x)
    scripted = torch.jit.script(model)
    y_script, g_script = forward_backward(scripted, x)
    torch.testing.assert_close(y_script, y_eager, rtol=1e-5, atol=1e-6)
    for name in g_eager:
        torch.testing.assert_close(g_script[name], g_eager[name], rtol=1e-5, atol=1e-6)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(x), y_eager, rtol=1e-5, atol=1e-6)
    # The scripted layer keeps the channel check (TorchScript wraps the ValueError).
    layer = torch.jit.script(DOConv2d(3, 4, 3))
    with pytest.raises(Exception, match=r"input must have 3 channels \(the layer's in_channels\)"):
        layer(torch.zeros(1, 2, 5, 5))


def test_torchscript_trace():
    model = small_net().eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        x2 = torch.randn(3, 3, 9, 9)
        torch.testing.assert_close(traced(x2), model(x2), rtol=1e-5, atol=1e-6)
    # The trace records the composition, so parameter changes reach it.
    model.train()
    traced = torch.jit.trace(model, x)
    with torch.no_grad():
        model[0].D.add_(0.1)
        torch.testing.assert_close(traced(x2), model(x2), rtol=1e-5, atol=1e-6)


def test_onnx_export_of_the_fused_model_has_only_standard_convs(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = small_net().eval()
    fused = fuse(model)
    x = torch.randn(2, 3, 12, 12)
    path = tmp_path / "fused.onnx"
    torch.onnx.export(fused, (x,), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("Conv") == 4
    assert not {"Einsum", "MatMul", "Gemm", "Add", "Mul", "Reshape"} & set(ops), ops
    # The circular 'same' conv pads with a standard Pad (as nn.Conv2d exports it).
    assert set(ops) <= {"Conv", "Relu", "Pad", "GlobalAveragePool", "Flatten", "Concat",
                        "Slice", "Constant", "Shape", "Gather", "Unsqueeze"}, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 5):
        xb = torch.randn(batch, 3, 12, 12)
        (y_onnx,) = session.run(None, {"x": xb.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(y_onnx, model(xb).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_distributed_data_parallel_gloo_two_processes(tmp_path):
    torch.manual_seed(11)
    model = ddp_worker.build_model()
    x = torch.randn(8, 2, 8, 8)
    y = torch.randint(0, 3, (8,))
    torch.save({"state": model.state_dict(), "x": x, "y": y}, tmp_path / "data.pt")
    torch.multiprocessing.spawn(ddp_worker.run, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert list(rank0) == list(model.state_dict())
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Single-process training on the combined batch reaches the same parameters.
    ddp_worker.train(model, x, y)
    initial = torch.load(tmp_path / "data.pt", weights_only=True)["state"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)
        if not key.endswith("_extra_state"):  # the layers' settings: not trained
            assert not torch.equal(value, initial[key]), f"{key} did not train"
