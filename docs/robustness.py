"""Generate docs/robustness.md: invalid arguments, inputs and files, and what each adapter says.

Every row makes one invalid call on freshly built objects. A row passes when the call raises a
ValueError (``CheckpointError`` is one) or TypeError whose message names what the row expects
(the argument, the array, the file), and when every object the row watches (a layer, a model)
is exactly as before: same structure, same parameter values. A row that raises nothing, raises
another type, names something else or changes state fails the run (exit status 1).

No environment holds all three frameworks, so each section is written from its own env:

    python docs/robustness.py --section torch --check    # compare with docs/robustness.md
    python docs/robustness.py --section torch --write    # rewrite that section in place

Sections: core (any env), torch, keras (the TensorFlow backend writes it; JAX and PyTorch
backends check every row but not the text) and gluon. Each env's tests run ``--check``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

DOC = Path(__file__).with_name("robustness.md")
SECTIONS = ("core", "torch", "keras", "gluon")
TITLES = {"core": "doconv_core", "torch": "doconv_torch (PyTorch)",
          "keras": "doconv_tf (Keras 3)", "gluon": "doconv_mx (MXNet Gluon)"}
CLEAR_ERRORS = (ValueError, TypeError)


@dataclasses.dataclass
class Row:
    call: str  # what the table shows
    names: str  # the message must contain this
    run: Callable[[], None]  # the invalid call
    watched: Optional[Callable[[], Any]] = None  # a snapshot of the objects it must not change


@dataclasses.dataclass
class Outcome:
    row: Row
    error: Optional[BaseException]
    problem: Optional[str]


class Files:
    """A temporary folder whose path messages show as ``<tmp>``."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="doconv-robustness-")
        self.root = Path(self._dir.name)

    def __call__(self, name: str) -> Path:
        return self.root / name

    def text(self, name: str, content: str) -> Path:
        path = self(name)
        path.write_text(content)
        return path

    def clean(self, message: str) -> str:
        message = message.replace(str(self.root), "<tmp>")
        message = re.sub(r"\x1b\[[0-9;]*m", "", message)  # Keras' terminal bold
        return re.sub(r"\[\d\d:\d\d:\d\d\] ", "", message)  # MXNet's log time stamps


def rewrite_npz(path: Path, change: Callable[[dict], None]) -> Path:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    change(arrays)
    np.savez(path, **arrays)
    return path


def evaluate(row: Row) -> Outcome:
    before = row.watched() if row.watched else None
    try:
        row.run()
    except CLEAR_ERRORS as error:
        outcome = Outcome(row, error, None)
        if row.names not in str(error):
            outcome.problem = f"the message does not name {row.names!r}"
    except BaseException as error:  # noqa: B036 - a crash of any kind is the finding
        return Outcome(row, error, f"raised {type(error).__name__}, not ValueError/TypeError")
    else:
        return Outcome(row, None, "raised nothing")
    if row.watched and not same_state(before, row.watched()):
        outcome.problem = "state changed before the error"
    return outcome


def same_state(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=True))
    return a == b


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table(outcomes: list[Outcome], files: Files) -> str:
    lines = ["| # | call | raises | message |", "|---|---|---|---|"]
    for number, outcome in enumerate(outcomes, 1):
        error = outcome.error
        kind = type(error).__name__ if error is not None else "nothing"
        message = files.clean(str(error)) if error is not None else ""
        lines.append(f"| {number} | `{cell(outcome.row.call)}` | {kind} | {cell(message)} |")
    return "\n".join(lines)


# -- core -----------------------------------------------------------------------------------
def core_rows(files: Files) -> Iterator[Row]:
    import doconv_core as core
    from doconv_core import ConvSpec, DOConvParams

    spec = ConvSpec(4, 8, 3)
    rng = np.random.default_rng(0)
    params = DOConvParams(spec, rng.standard_normal(spec.W_shape).astype(np.float32),
                          np.zeros(spec.D_shape, np.float32), np.zeros(8, np.float32))
    good = files("core-good.npz")
    core.save_params(good, {"conv": params})

    def bad_file(name: str, change: Callable[[dict], None]) -> Path:
        path = files(name)
        core.save_params(path, {"conv": params})
        return rewrite_npz(path, change)

    int_W = bad_file("core-int-W.npz", lambda a: a.update({"conv/W": a["conv/W"].astype(int)}))
    no_D = bad_file("core-no-D.npz", lambda a: a.pop("conv/D"))
    text = files.text("core-text.npz", "not a zip file")
    yield Row("ConvSpec(4, 0, 3)", "out_channels", lambda: ConvSpec(4, 0, 3))
    yield Row("ConvSpec(4, 8, 3, groups=3)", "groups", lambda: ConvSpec(4, 8, 3, groups=3))
    yield Row("ConvSpec(4, 8, 3, D_mul=4)", "D_mul", lambda: ConvSpec(4, 8, 3, D_mul=4))
    yield Row("ConvSpec(4, 8, 3, padding='full')", "padding",
              lambda: ConvSpec(4, 8, 3, padding="full"))
    yield Row("ConvSpec(4, 8, 3, stride=(1, 0))", "stride",
              lambda: ConvSpec(4, 8, 3, stride=(1, 0)))
    yield Row("ConvSpec(4, 8, 3, padding_mode='mirror')", "padding_mode",
              lambda: ConvSpec(4, 8, 3, padding_mode="mirror"))
    yield Row("ConvSpec(4, 8, 3, bias='yes')", "bias", lambda: ConvSpec(4, 8, 3, bias="yes"))
    yield Row("DOConvParams(spec, W of shape (8, 4, 8), D, bias)", "W",
              lambda: DOConvParams(spec, np.zeros((8, 4, 8)), params.D, params.bias))
    yield Row("save_params(path, {'a/b': params})", "layer names",
              lambda: core.save_params(files("core-out.npz"), {"a/b": params}))
    yield Row("load_params('<tmp>/missing.npz')", "missing.npz",
              lambda: core.load_params(files("missing.npz")))
    yield Row("load_params(a text file)", "core-text.npz", lambda: core.load_params(text))
    yield Row("load_params(a file whose W is int64)", "W", lambda: core.load_params(int_W))
    yield Row("load_params(a file without layer conv's D)", "D", lambda: core.load_params(no_D))
    safe = files("core-good.safetensors")
    core.save_params(safe, {"conv": params})
    truncated = files("core-truncated.safetensors")
    truncated.write_bytes(safe.read_bytes()[:-10])
    foreign = files("core-foreign.safetensors")
    core.write_safetensors(foreign, {"weight": params.W}, {"format": "pt"})
    tensors, meta = core.read_safetensors(safe, mmap=False)
    safe_int_W = files("core-int-W.safetensors")
    core.write_safetensors(safe_int_W, dict(tensors, **{"conv.W": tensors["conv.W"].astype(int)}),
                           meta)
    yield Row("load_params('<tmp>/missing.safetensors')", "missing.safetensors",
              lambda: core.load_params(files("missing.safetensors")))
    yield Row("load_params(a truncated .safetensors file)", "core-truncated.safetensors",
              lambda: core.load_params(truncated))
    yield Row("load_params(a .safetensors file of another library)", "core-foreign.safetensors",
              lambda: core.load_params(foreign))
    yield Row("load_params(a .safetensors file whose W is int64)", "W",
              lambda: core.load_params(safe_int_W))
    yield Row("write_safetensors(path, {'x': an object array})", "'x'",
              lambda: core.write_safetensors(files("core-object.safetensors"),
                                             {"x": np.array([None])}))
    yield from core_hostile_file_rows(files, params, safe, tensors, meta)
    yield Row("layer_filter(3)", "include", lambda: core.layer_filter(3))


def core_hostile_file_rows(files: Files, params: Any, safe: Path, tensors: dict, meta: dict
                           ) -> Iterator[Row]:
    """Files built to exhaust the stack or the memory, or that only one reader would read."""
    import io
    import json
    import zipfile

    import doconv_core as core

    deep = "[" * 100_000 + "]" * 100_000
    header = files("core-deep-header.safetensors")
    text = ('{"x": ' + deep + "}").encode()
    header.write_bytes(len(text).to_bytes(8, "little") + text)
    layers = files("core-deep-layers.safetensors")
    core.write_safetensors(layers, tensors, dict(meta, layers='{"conv": ' + deep + "}"))
    npz_deep = files("core-deep-meta.npz")
    core.save_params(npz_deep, {"conv": params})
    rewrite_npz(npz_deep, lambda a: a.update({"__doconv_meta__": np.array(deep)}))

    def npz_with_W_header(name: str, header: str) -> Path:
        # One member's .npy header replaced, its data kept: what np.load would trust.
        path = files(name)
        core.save_params(path, {"conv": params})
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: archive.read(info) for info in archive.infolist()}
        data = members["conv/W.npy"]
        size = int.from_bytes(data[8:10], "little")
        raw = header.encode("latin1")
        raw += b" " * (-(11 + len(raw)) % 64) + b"\n"
        members["conv/W.npy"] = data[:8] + len(raw).to_bytes(2, "little") + raw + data[10 + size:]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for member, content in members.items():
                archive.writestr(member, content)
        path.write_bytes(buffer.getvalue())
        return path

    huge = npz_with_W_header("core-huge.npz", "{'descr': '<f4', 'fortran_order': False, "
                                              "'shape': (1000000, 1000000), }")
    unary = npz_with_W_header("core-unary.npz", "{'descr': '<f4', 'fortran_order': False, "
                                                "'shape': " + "- " * 5000 + "1, }")
    f8 = files("core-f8.safetensors")
    raw = safe.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    entries = json.loads(raw[8:8 + size])
    begin, end = entries["conv.bias"]["data_offsets"]
    entries["conv.bias"].update(dtype="F8_E4M3", shape=[end - begin])
    text = json.dumps(entries).encode()
    f8.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
    yield Row("load_params(a .safetensors file whose header is nested 100,000 deep)",
              "nested 100001 levels deep", lambda: core.load_params(header))
    yield Row("load_params(a .safetensors file whose 'layers' are nested 100,000 deep)",
              "'layers'", lambda: core.load_params(layers))
    yield Row("load_params(an .npz file whose metadata is nested 100,000 deep)",
              "nested 100000 levels deep", lambda: core.load_params(npz_deep))
    yield Row("load_params(an .npz file whose W claims 10**12 elements)", "conv/W.npy",
              lambda: core.load_params(huge))
    yield Row("load_params(an .npz file whose W's .npy header nests 5,000 operators)",
              "conv/W.npy", lambda: core.load_params(unary))
    yield Row("load_params(a .safetensors file whose bias is float8)", "conv.bias",
              lambda: core.load_params(f8))
    yield Row("save_params('<tmp>/x.npz', {'a\\x00b': params})", "NUL",
              lambda: core.save_params(files("core-nul.npz"), {"a\0b": params}))


# -- PyTorch --------------------------------------------------------------------------------
def torch_rows(files: Files) -> Iterator[Row]:
    import torch
    from torch import nn

    import doconv_torch
    from doconv_core import ConvSpec, DOConvParams
    from doconv_torch import DOConv2d

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(DOConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             DOConv2d(4, 2, 3, padding=1, bias=False))

    def plain() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    def state(*modules: nn.Module) -> Callable[[], Any]:
        def snapshot():
            return [(repr(m), {k: v.detach().cpu().numpy().copy() if not v.is_meta
                               else ("meta", tuple(v.shape))
                               for k, v in m.state_dict().items()}) for m in modules]
        return snapshot

    saved = net()
    good = files("torch-good.npz")
    doconv_torch.export_params(saved, good)

    def bad_file(name: str, change: Callable[[dict], None]) -> Path:
        path = files(name)
        doconv_torch.export_params(saved, path)
        return rewrite_npz(path, change)

    int_W = bad_file("torch-int-W.npz", lambda a: a.update({"3/W": a["3/W"].astype(np.int64)}))
    other = files("torch-other.npz")
    doconv_torch.export_params(nn.Sequential(DOConv2d(3, 4, 3, padding=1)), other)
    wider = files("torch-wider.npz")
    doconv_torch.export_params(nn.Sequential(
        DOConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        DOConv2d(4, 2, 3, padding=1, bias=False, D_mul=12)), wider)
    legacy = {k: v.clone() for k, v in net().state_dict().items()}

    layer, model, conv_net = DOConv2d(4, 8, 3), net(), plain()
    spec = ConvSpec(4, 8, 5)
    other_params = DOConvParams(spec, np.zeros(spec.W_shape, np.float32),
                                np.zeros(spec.D_shape, np.float32), np.zeros(8, np.float32))
    with torch.device("meta"):
        meta_model = net()
    one_d_spec = ConvSpec(4, 8, 3, rank=1)
    one_d = DOConvParams(one_d_spec, np.zeros(one_d_spec.W_shape, np.float32),
                         np.zeros(one_d_spec.D_shape, np.float32), np.zeros(8, np.float32))
    one_d_layer = doconv_torch.DOConv1d(4, 8, 3)

    class NoInverse(nn.Module):  # a parametrization without right_inverse
        def forward(self, x):
            return 2 * x

    no_inverse = net()
    torch.nn.utils.parametrize.register_parametrization(no_inverse[3], "W", NoInverse())
    with torch.inference_mode():
        inference_model, inference_layer = net(), DOConv2d(4, 8, 3)
    narrow_bias = net()
    narrow_bias[0].bias = nn.Parameter(torch.zeros(1))

    yield Row("DOConv2d(4, 8, 0)", "kernel_size", lambda: DOConv2d(4, 8, 0))
    yield Row("DOConv2d(4, 8, 3, groups=3)", "groups", lambda: DOConv2d(4, 8, 3, groups=3))
    yield Row("DOConv2d(4, 8, 3, D_mul=8)", "D_mul", lambda: DOConv2d(4, 8, 3, D_mul=8))
    yield Row("DOConv2d(4, 8, 3, D_mul=2.5)", "D_mul", lambda: DOConv2d(4, 8, 3, D_mul=2.5))
    yield Row("DOConv2d(4, 8, 3, stride=2, padding='same')", "padding",
              lambda: DOConv2d(4, 8, 3, stride=2, padding="same"))
    yield Row("DOConv2d(4, 8, 3, padding_mode='mirror')", "padding_mode",
              lambda: DOConv2d(4, 8, 3, padding_mode="mirror"))
    yield Row("DOConv2d(4, 8, 3, padding=-1)", "padding", lambda: DOConv2d(4, 8, 3, padding=-1))
    yield Row("DOConv2d(4, 8, (3, 3, 3))", "kernel_size", lambda: DOConv2d(4, 8, (3, 3, 3)))
    yield Row("DOConv2d(4, 8, 3, bias='yes')", "bias", lambda: DOConv2d(4, 8, 3, bias="yes"))
    yield Row("DOConv1d(4, 8, 3, padding='causal')", "padding",
              lambda: doconv_torch.DOConv1d(4, 8, 3, padding="causal"))
    yield Row("DOConv3d(4, 8, (3, 3))", "kernel_size", lambda: doconv_torch.DOConv3d(4, 8, (3, 3)))
    yield Row("DOConv3d.from_params(params of a 1-D layer)", "rank",
              lambda: doconv_torch.DOConv3d.from_params(one_d))
    yield Row("DOConv1d(4, 8, 3)(x of shape (1, 4, 8, 8))", "input",
              lambda: one_d_layer(torch.zeros(1, 4, 8, 8)), state(one_d_layer))
    yield Row("DOConv2d.from_params('params')", "params",
              lambda: DOConv2d.from_params("params"))
    yield Row("layer.set_params(params of a 5x5 layer)", "spec",
              lambda: layer.set_params(other_params), state(layer))
    yield Row("layer.set_params({'W': ...})", "params",
              lambda: layer.set_params({"W": np.zeros((8, 4, 9))}), state(layer))
    yield Row("convert(nn.Linear(2, 2))", "nn.Conv2d",
              lambda: doconv_torch.convert(nn.Linear(2, 2)))
    yield Row("convert(model, include=3)", "include",
              lambda: doconv_torch.convert(conv_net, include=3), state(conv_net))
    yield Row("convert(model, include='head.*')", "include",
              lambda: doconv_torch.convert(conv_net, include="head.*"), state(conv_net))
    yield Row("convert(model, D_mul=0)", "D_mul",
              lambda: doconv_torch.convert(conv_net, D_mul=0), state(conv_net))
    yield Row("convert('model')", "model", lambda: doconv_torch.convert("model"))
    yield Row("fuse(42)", "model", lambda: doconv_torch.fuse(42))
    yield Row("export_params(nn.Linear(2, 2), path)", "DOConv2d",
              lambda: doconv_torch.export_params(nn.Linear(2, 2), files("torch-out.npz")))
    yield Row("import_params(model, '<tmp>/missing.npz')", "missing.npz",
              lambda: doconv_torch.import_params(model, files("missing.npz")), state(model))
    yield Row("import_params(model, a file whose second W is int64)", "W",
              lambda: doconv_torch.import_params(model, int_W), state(model))
    yield Row("import_params(model, a file of another model)", "missing",
              lambda: doconv_torch.import_params(model, other), state(model))
    yield Row("import_params(model, a file whose layer 3 has D_mul=12)", "'3'",
              lambda: doconv_torch.import_params(model, wider), state(model))
    yield Row("import_params(model built on the meta device, path)", "meta",
              lambda: doconv_torch.import_params(meta_model, good), state(meta_model))
    yield Row("load_legacy(model, [('0.W', W)])", "mapping",
              lambda: doconv_torch.load_legacy(model, [("0.W", legacy["0.W"])]), state(model))
    yield Row("load_legacy(model, weights with 0.W of shape (4, 3, 5))", "W",
              lambda: doconv_torch.load_legacy(model, dict(legacy, **{"0.W": torch.zeros(4, 3, 5)})),
              state(model))
    yield Row("load_legacy(model, weights whose 3.W is int64)", "W",
              lambda: doconv_torch.load_legacy(model, dict(legacy, **{"3.W": legacy["3.W"].long()})),
              state(model))
    yield Row("load_legacy(model, weights plus 'extra')", "extra",
              lambda: doconv_torch.load_legacy(model, dict(legacy, extra=torch.zeros(1))),
              state(model))
    yield Row("load_legacy(model, weights without 3.W)", "3.W",
              lambda: doconv_torch.load_legacy(
                  model, {k: v for k, v in legacy.items() if k != "3.W"}), state(model))
    yield Row("load_legacy(model, weights, strict='yes')", "strict",
              lambda: doconv_torch.load_legacy(model, legacy, strict="yes"), state(model))
    # Layers that cannot take values: refused before anything changes.
    yield Row("layer.set_params(params) for a layer built under torch.inference_mode()",
              "inference", lambda: inference_layer.set_params(layer.to_params()),
              state(inference_layer))
    yield Row("import_params(model built under torch.inference_mode(), path)", "inference",
              lambda: doconv_torch.import_params(inference_model, good), state(inference_model))
    yield Row("import_params(model whose layer 3's W is parametrized without right_inverse, "
              "path)", "right_inverse", lambda: doconv_torch.import_params(no_inverse, good),
              state(no_inverse))
    yield Row("import_params(model whose layer 0's bias was replaced by one of shape (1,), "
              "path)", "bias", lambda: doconv_torch.import_params(narrow_bias, good),
              state(narrow_bias))
    yield Row("load_legacy(model built under torch.inference_mode(), weights)", "inference",
              lambda: doconv_torch.load_legacy(inference_model, legacy), state(inference_model))


# -- Keras ----------------------------------------------------------------------------------
def keras_rows(files: Files) -> Iterator[Row]:
    import keras

    import doconv_tf
    from doconv_core import ConvSpec, DOConvParams
    from doconv_tf import DOConv2D

    def net() -> keras.Model:
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8, 8, 3)),
                                 DOConv2D(4, 3, padding="same", name="conv1"),
                                 keras.layers.BatchNormalization(name="bn"),
                                 DOConv2D(2, 3, use_bias=False, name="conv2")])

    def plain() -> keras.Model:
        return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Dense(2)])

    def values(variable: Any) -> np.ndarray:
        value = variable.value
        if hasattr(value, "detach"):  # torch: NumPy 2 warns about __array__ without copy=
            return value.detach().cpu().numpy().copy()
        if hasattr(value, "numpy"):  # tensorflow: the same warning
            return np.array(value.numpy())
        return np.array(value)

    def state(*objects: Any) -> Callable[[], Any]:
        def snapshot():
            return [(type(o).__name__, o.built,
                     [(w.path, values(w)) for w in o.weights])
                    for o in objects]
        return snapshot

    saved = net()
    good = files("keras-good.npz")
    doconv_tf.export_params(saved, good)
    int_W = files("keras-int-W.npz")
    doconv_tf.export_params(saved, int_W)
    rewrite_npz(int_W, lambda a: a.update({"conv2/W": a["conv2/W"].astype(np.int64)}))
    legacy = {"conv1.W": np.zeros((9, 3, 4), np.float32), "conv1.D": np.zeros((9, 9, 3), np.float32),
              "conv1.bias": np.zeros(4, np.float32), "conv2.W": np.zeros((9, 4, 2), np.float32),
              "conv2.D": np.zeros((9, 9, 4), np.float32)}

    layer = DOConv2D(8, 3, name="layer")  # fixed names: Keras' messages have them
    layer.build((None, 8, 8, 4))
    unbuilt = DOConv2D(8, 3, name="unbuilt")
    model, dense = net(), plain()
    unbuilt_model = keras.Sequential([DOConv2D(4, 3, name="conv1")])
    partly_built = keras.Sequential([DOConv2D(4, 3, padding="same", name="conv1"),
                                     DOConv2D(2, 3, use_bias=False, name="conv2")])
    partly_built.layers[0].build((None, 8, 8, 3))  # conv2 is not built: nothing may change
    spec = ConvSpec(4, 8, 5)
    other_params = DOConvParams(spec, np.zeros(spec.W_shape, np.float32),
                                np.zeros(spec.D_shape, np.float32), np.zeros(8, np.float32))
    odd = ConvSpec(4, 8, 3, padding=(1, 2))
    odd_params = DOConvParams(odd, np.zeros(odd.W_shape, np.float32),
                              np.zeros(odd.D_shape, np.float32), np.zeros(8, np.float32))

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    yield Row("DOConv2D(0, 3)", "filters", lambda: DOConv2D(0, 3))
    yield Row("DOConv2D(8, 3, padding='full')", "padding", lambda: DOConv2D(8, 3, padding="full"))
    yield Row("DOConv2D(8, 3, padding=(1, 1))", "padding", lambda: DOConv2D(8, 3, padding=(1, 1)))
    yield Row("DOConv2D(8, 3, data_format='NCHW')", "data_format",
              lambda: DOConv2D(8, 3, data_format="NCHW"))
    yield Row("DOConv2D(8, 3, strides=2, dilation_rate=2)", "dilation_rate",
              lambda: DOConv2D(8, 3, strides=2, dilation_rate=2))
    yield Row("DOConv2D(8, 3, D_mul=4)", "D_mul", lambda: DOConv2D(8, 3, D_mul=4))
    yield Row("DOConv2D(8, 3, groups=3)", "groups", lambda: DOConv2D(8, 3, groups=3))
    yield Row("DOConv2D(8, (3, 3, 3))", "kernel_size", lambda: DOConv2D(8, (3, 3, 3)))
    yield Row("DOConv3D(8, 3, padding='causal')", "padding",
              lambda: doconv_tf.DOConv3D(8, 3, padding="causal"))
    yield Row("DOConv1D(8, 3, D_mul=2)", "D_mul", lambda: doconv_tf.DOConv1D(8, 3, D_mul=2))
    yield Row("DOConv1D.from_params(params of a 2-D layer)", "rank",
              lambda: doconv_tf.DOConv1D.from_params(other_params))
    yield Row("layer(x with 3 channels), built for 4", "channels",
              lambda: layer(np.zeros((1, 8, 8, 3), np.float32)), state(layer))
    yield Row("layer(x of shape (8, 8, 4))", "ndim",
              lambda: layer(np.zeros((8, 8, 4), np.float32)), state(layer))
    yield Row("unbuilt_layer.to_params()", "built", lambda: unbuilt.to_params())
    yield Row("layer.set_params('params')", "params",
              lambda: layer.set_params("params"), state(layer))
    yield Row("layer.set_params(params of a 5x5 layer)", "spec",
              lambda: layer.set_params(other_params), state(layer))
    yield Row("DOConv2D.from_params(params with padding (1, 2))", "padding",
              lambda: DOConv2D.from_params(odd_params))
    yield Row("convert(a model without Conv2D)", "Conv2D",
              lambda: doconv_tf.convert(dense), state(dense))
    yield Row("convert(a subclassed model)", "Subclassed", lambda: doconv_tf.convert(Subclassed()))
    yield Row("convert(an unbuilt Sequential)", "built",
              lambda: doconv_tf.convert(keras.Sequential([keras.layers.Conv2D(2, 3)])))
    yield Row("convert(model, include=5)", "include",
              lambda: doconv_tf.convert(model, include=5), state(model))
    yield Row("fuse('model')", "model", lambda: doconv_tf.fuse("model"))
    yield Row("export_params(a model without DOConv2D, path)", "DOConv2D",
              lambda: doconv_tf.export_params(dense, files("keras-out.npz")))
    yield Row("import_params(model, '<tmp>/missing.npz')", "missing.npz",
              lambda: doconv_tf.import_params(model, files("missing.npz")), state(model))
    yield Row("import_params(model, a file whose conv2 W is int64)", "W",
              lambda: doconv_tf.import_params(model, int_W), state(model))
    yield Row("import_params(an unbuilt model, path)", "built",
              lambda: doconv_tf.import_params(unbuilt_model, good), state(unbuilt_model))
    yield Row("import_params(a model whose conv2 is not built, path)", "['conv2']",
              lambda: doconv_tf.import_params(partly_built, good), state(*partly_built.layers))
    yield Row("load_legacy(a model whose conv2 is not built, weights)", "['conv2']",
              lambda: doconv_tf.load_legacy(partly_built, legacy), state(*partly_built.layers))
    yield Row("load_legacy(model, weights with conv2.W of shape (9, 4, 3))", "W",
              lambda: doconv_tf.load_legacy(model, dict(legacy, **{"conv2.W": np.zeros((9, 4, 3))})),
              state(model))
    yield Row("load_legacy(model, weights plus 'bn.gamma')", "bn.gamma",
              lambda: doconv_tf.load_legacy(model, dict(legacy, **{"bn.gamma": np.ones(4)})),
              state(model))
    yield Row("load_legacy(model, weights without conv2.W)", "conv2",
              lambda: doconv_tf.load_legacy(
                  model, {k: v for k, v in legacy.items() if not k.startswith("conv2")}),
              state(model))
    yield Row("load_legacy(model, weights whose conv1.D is a string array)", "D",
              lambda: doconv_tf.load_legacy(model, dict(legacy, **{"conv1.D": np.full((9, 9, 3), "x")})),
              state(model))


# -- Gluon ----------------------------------------------------------------------------------
def gluon_rows(files: Files) -> Iterator[Row]:
    import mxnet as mx
    from mxnet.gluon import nn

    import doconv_mx
    from doconv_core import ConvSpec, DOConvParams
    from doconv_mx import DOConv2D

    def net(initialize: bool = True) -> nn.HybridSequential:
        mx.random.seed(0)
        block = nn.HybridSequential()
        block.add(DOConv2D(4, 3, padding=(1, 1), in_channels=3), nn.BatchNorm(in_channels=4),
                  DOConv2D(2, 3, padding=(1, 1), use_bias=False, in_channels=4))
        if initialize:
            block.initialize()
        return block

    def state(*blocks: Any) -> Callable[[], Any]:
        def snapshot():
            out = []
            for block in blocks:
                params = {}
                for name, param in block.collect_params().items():
                    values = param.data().asnumpy() if param._data is not None else None
                    params[name] = (param.shape, values)
                out.append((repr(block), params))
            return out
        return snapshot

    saved = net()
    good = files("gluon-good.npz")
    doconv_mx.export_params(saved, good)
    int_W = files("gluon-int-W.npz")
    doconv_mx.export_params(saved, int_W)
    rewrite_npz(int_W, lambda a: a.update({"2/W": a["2/W"].astype(np.int64)}))
    legacy = {"0.weight": np.zeros((4, 3, 3, 3), np.float32),
              "0.D": np.zeros((9, 9, 3), np.float32), "0.bias": np.zeros(4, np.float32),
              "2.weight": np.zeros((2, 4, 3, 3), np.float32), "2.D": np.zeros((9, 9, 4), np.float32)}

    deferred = DOConv2D(8, 3)
    deferred.initialize()
    parent = nn.HybridSequential(prefix="parent_")  # fixed names: MXNet's message has them
    with parent.name_scope():
        parent.add(DOConv2D(8, 3, prefix="conv_"))
    parent.initialize()
    parent.hybridize()
    layer = DOConv2D(8, 3, in_channels=4)
    layer.initialize()
    layer_3d = doconv_mx.DOConv3D(8, 3, in_channels=4)
    layer_3d.initialize()
    fresh = DOConv2D(8, 3, in_channels=4)
    model, uninitialized = net(), net(initialize=False)
    partly_initialized = net(initialize=False)
    for child in (partly_initialized[0], partly_initialized[1]):  # the second DOConv2D is not
        child.initialize()
    plain = nn.HybridSequential()
    plain.add(nn.Dense(2, in_units=4))
    plain.initialize()
    conv_net = nn.HybridSequential()
    conv_net.add(nn.Conv2D(4, 3, in_channels=3))
    conv_net.initialize()
    spec = ConvSpec(4, 8, 5)
    other_params = DOConvParams(spec, np.zeros(spec.W_shape, np.float32),
                                np.zeros(spec.D_shape, np.float32), np.zeros(8, np.float32))
    x3 = mx.nd.zeros((4, 8, 8))

    yield Row("DOConv2D(0, 3)", "channels", lambda: DOConv2D(0, 3))
    yield Row("DOConv2D(8, 3, layout='NHWC')", "layout", lambda: DOConv2D(8, 3, layout="NHWC"))
    yield Row("DOConv2D(8, 3, activation='gelu')", "activation",
              lambda: DOConv2D(8, 3, activation="gelu"))
    yield Row("DOConv2D(8, 3, padding='same')", "padding", lambda: DOConv2D(8, 3, padding="same"))
    yield Row("DOConv2D(8, 3, in_channels=-1)", "in_channels",
              lambda: DOConv2D(8, 3, in_channels=-1))
    yield Row("DOConv2D(8, 3, D_mul=3)", "D_mul", lambda: DOConv2D(8, 3, D_mul=3))
    yield Row("DOConv2D(8, 3, groups=3)", "groups", lambda: DOConv2D(8, 3, groups=3))
    yield Row("DOConv2D(8, 3, strides=0)", "strides", lambda: DOConv2D(8, 3, strides=0))
    yield Row("DOConv1D(8, 3, padding='causal')", "padding",
              lambda: doconv_mx.DOConv1D(8, 3, padding="causal"))
    yield Row("DOConv3D(8, 3, layout='NDHWC')", "layout",
              lambda: doconv_mx.DOConv3D(8, 3, layout="NDHWC"))
    yield Row("DOConv3D(8, 3, in_channels=4)(x of shape (1, 4, 8, 8))", "5-D",
              lambda: layer_3d(mx.nd.zeros((1, 4, 8, 8))), state(layer_3d))
    yield Row("deferred_layer(x of shape (4, 8, 8))", "4-D",
              lambda: deferred(x3), state(deferred))
    yield Row("hybridized_parent(x of shape (4, 8, 8))", "4D",
              lambda: parent(x3), state(parent))
    yield Row("layer(x with 3 channels), in_channels=4", "channels",
              lambda: layer(mx.nd.zeros((1, 3, 8, 8))), state(layer))
    yield Row("uninitialized_layer.to_params()", "initialize", lambda: fresh.to_params())
    yield Row("layer.set_params('params')", "params",
              lambda: layer.set_params("params"), state(layer))
    yield Row("layer.set_params(params of a 5x5 layer)", "spec",
              lambda: layer.set_params(other_params), state(layer))
    yield Row("uninitialized_layer.set_params(params)", "initialize",
              lambda: fresh.set_params(layer.to_params()), state(fresh))
    yield Row("convert(a net without a conv)", "nn.Conv2D",
              lambda: doconv_mx.convert(plain), state(plain))
    yield Row("convert(net, include=5)", "include",
              lambda: doconv_mx.convert(conv_net, include=5), state(conv_net))
    yield Row("convert(net, D_mul=0)", "D_mul",
              lambda: doconv_mx.convert(conv_net, D_mul=0), state(conv_net))
    yield Row("fuse(a net whose DOConv2D is not initialized)", "initialize",
              lambda: doconv_mx.fuse(uninitialized), state(uninitialized))
    yield Row("export_params(a net without DOConv2D, path)", "DOConv2D",
              lambda: doconv_mx.export_params(plain, files("gluon-out.npz")))
    yield Row("import_params(net, '<tmp>/missing.npz')", "missing.npz",
              lambda: doconv_mx.import_params(model, files("missing.npz")), state(model))
    yield Row("import_params(net, a file whose second W is int64)", "W",
              lambda: doconv_mx.import_params(model, int_W), state(model))
    yield Row("import_params(an uninitialized net, path)", "initialize",
              lambda: doconv_mx.import_params(uninitialized, good), state(uninitialized))
    yield Row("import_params(a net whose second DOConv2D is not initialized, path)", "['2']",
              lambda: doconv_mx.import_params(partly_initialized, good),
              state(partly_initialized))
    yield Row("load_legacy(a net whose second DOConv2D is not initialized, weights)", "['2']",
              lambda: doconv_mx.load_legacy(partly_initialized, legacy),
              state(partly_initialized))
    yield Row("load_legacy(net, weights with 2.weight of shape (2, 4, 5, 5))", "weight",
              lambda: doconv_mx.load_legacy(
                  model, dict(legacy, **{"2.weight": np.zeros((2, 4, 5, 5))})), state(model))
    yield Row("load_legacy(net, weights plus '1.gamma')", "1.gamma",
              lambda: doconv_mx.load_legacy(model, dict(legacy, **{"1.gamma": np.ones(4)})),
              state(model))
    yield Row("load_legacy(net, weights whose 0.D is float16 of the wrong shape)", "D",
              lambda: doconv_mx.load_legacy(
                  model, dict(legacy, **{"0.D": np.zeros((9, 3), np.float16)})), state(model))


ROWS = {"core": core_rows, "torch": torch_rows, "keras": keras_rows, "gluon": gluon_rows}


def section(name: str) -> tuple[str, list[Outcome]]:
    """The markdown of one section and its rows' outcomes."""
    files = Files()
    outcomes = [evaluate(row) for row in ROWS[name](files)]
    text = "\n".join([f"<!-- section: {name} -->", f"## {TITLES[name]}", "",
                      table(outcomes, files), f"<!-- end: {name} -->"])
    return text, outcomes


def replace_section(document: str, name: str, text: str) -> str:
    pattern = re.compile(rf"<!-- section: {name} -->.*?<!-- end: {name} -->", re.S)
    if not pattern.search(document):
        raise SystemExit(f"{DOC} has no section {name!r}")
    return pattern.sub(lambda m: text, document)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=SECTIONS, required=True)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the section in the doc")
    mode.add_argument("--check", action="store_true",
                      help="fail unless the doc's section is what this run produces")
    mode.add_argument("--rows-only", action="store_true",
                      help="check every row, not the doc's text (other Keras backends)")
    args = parser.parse_args(argv)
    text, outcomes = section(args.section)
    failed = [o for o in outcomes if o.problem]
    for outcome in failed:
        print(f"FAIL {outcome.row.call}: {outcome.problem} "
              f"({type(outcome.error).__name__}: {outcome.error})", file=sys.stderr)
    if failed:
        return 1
    if args.write:
        DOC.write_text(replace_section(DOC.read_text(), args.section, text))
    elif args.check:
        if replace_section(DOC.read_text(), args.section, text) != DOC.read_text():
            print(f"{DOC.name}'s {args.section} section is stale: run "
                  f"python docs/robustness.py --section {args.section} --write", file=sys.stderr)
            return 1
    elif not args.rows_only:
        print(text)
    print(f"{args.section}: {len(outcomes)} rows, every one a clear error before any change",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
