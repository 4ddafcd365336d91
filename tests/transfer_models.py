"""The transfer model of the cross-framework suite, per framework, and its driver.

    python tests/transfer_models.py export FRAMEWORK --artifacts DIR
    python tests/transfer_models.py import FRAMEWORK --artifacts DIR --from torch,keras-tf,...
    python tests/transfer_models.py import-everywhere --artifacts DIR --envs .tox

``export`` trains each transfer model (doconv_core.testing.crosscheck.TRANSFER_MODELS: a 1-D, a
2-D and a 3-D one, ReLU between convs, global average pool) for a few SGD steps in FRAMEWORK,
writes its parameters to the portable safetensors file and its own probe predictions (unfused
and fused).
``import`` loads every other framework's files into FRAMEWORK's models and writes their
predictions. The ``cross``
env then compares everything with the NumPy reference (crosscheck --transfer).
Each framework's code runs in that framework's own environment.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from doconv_core.testing import crosscheck  # noqa: E402
from doconv_core.testing.crosscheck import TRANSFER_MODELS  # noqa: E402

FRAMEWORKS = ("torch", "keras-tf", "keras-jax", "keras-torch", "mx")


class TorchModel:
    def __init__(self, model: str) -> None:
        import torch
        from torch import nn

        import doconv_torch

        self.torch, self.doconv = torch, doconv_torch
        torch.manual_seed(0)
        specs, spatial = TRANSFER_MODELS[model]
        rank = len(spatial)
        layer_class = getattr(doconv_torch, f"DOConv{rank}d")
        layers: OrderedDict = OrderedDict()
        for index, (name, s) in enumerate(specs.items()):
            layers[name] = layer_class(
                s.in_channels, s.out_channels, s.kernel_size, s.stride, s.padding, s.dilation,
                s.groups, s.bias, s.padding_mode, D_mul=s.D_mul)
            if index < len(specs) - 1:
                layers[f"relu{index + 1}"] = nn.ReLU()
        layers["pool"] = getattr(nn, f"AdaptiveAvgPool{rank}d")(1)
        layers["flatten"] = nn.Flatten()
        self.model = nn.Sequential(layers)

    def train(self, x: np.ndarray, target: np.ndarray) -> None:
        torch = self.torch
        optimizer = torch.optim.SGD(self.model.parameters(),
                                    lr=crosscheck.TRANSFER_LEARNING_RATE)
        for _ in range(crosscheck.TRANSFER_STEPS):
            optimizer.zero_grad()
            loss = ((self.model(torch.from_numpy(x)) - torch.from_numpy(target)) ** 2).mean()
            loss.backward()
            optimizer.step()

    def save(self, path: str) -> None:
        self.doconv.export_params(self.model, path)

    def load(self, path: str) -> None:
        self.doconv.import_params(self.model, path)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            unfused = self.model(torch.from_numpy(x)).numpy()
            fused = self.doconv.fuse(self.model)(torch.from_numpy(x)).numpy()
        return unfused, fused


class KerasModel:
    def __init__(self, model: str) -> None:
        import keras

        import doconv_tf

        self.keras, self.doconv = keras, doconv_tf
        keras.utils.set_random_seed(0)
        specs, spatial = TRANSFER_MODELS[model]
        rank = len(spatial)
        layer_class = getattr(doconv_tf, f"DOConv{rank}D")
        layers = [keras.Input(spatial + (3,))]
        for index, (name, s) in enumerate(specs.items()):
            padding = s.padding if isinstance(s.padding, str) else "valid"
            layers.append(layer_class(
                s.out_channels, s.kernel_size, s.stride, padding, dilation_rate=s.dilation,
                groups=s.groups, use_bias=s.bias, D_mul=s.D_mul, name=name,
                activation="relu" if index < len(specs) - 1 else None))
        layers.append(getattr(keras.layers, f"GlobalAveragePooling{rank}D")())
        self.model = keras.Sequential(layers)

    def train(self, x: np.ndarray, target: np.ndarray) -> None:
        keras = self.keras
        self.model.compile(optimizer=keras.optimizers.SGD(crosscheck.TRANSFER_LEARNING_RATE),
                           loss="mse")
        self.model.fit(np.moveaxis(x, 1, -1), target, batch_size=len(x),
                       epochs=crosscheck.TRANSFER_STEPS, shuffle=False, verbose=0)

    def save(self, path: str) -> None:
        self.doconv.export_params(self.model, path)

    def load(self, path: str) -> None:
        self.doconv.import_params(self.model, path)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        channels_last = np.moveaxis(x, 1, -1)
        unfused = self.model.predict(channels_last, verbose=0)
        fused = self.doconv.fuse(self.model).predict(channels_last, verbose=0)
        return np.asarray(unfused), np.asarray(fused)


class MxModel:
    def __init__(self, model: str) -> None:
        import mxnet as mx
        from mxnet import gluon

        import doconv_mx

        self.mx, self.gluon, self.doconv = mx, gluon, doconv_mx
        mx.random.seed(0)
        specs, spatial = TRANSFER_MODELS[model]
        rank = len(spatial)
        layer_class = getattr(doconv_mx, f"DOConv{rank}D")

        class Net(gluon.HybridBlock):
            def __init__(self) -> None:
                super().__init__()
                with self.name_scope():
                    for index, (name, s) in enumerate(specs.items()):
                        padding = s.normalized().padding
                        setattr(self, name, layer_class(
                            s.out_channels, s.kernel_size, s.stride,
                            (0,) * rank if padding == "valid" else padding, s.dilation,
                            s.groups, activation="relu" if index < len(specs) - 1 else None,
                            use_bias=s.bias, in_channels=s.in_channels, D_mul=s.D_mul))

            def hybrid_forward(self, F, x):
                for name in specs:
                    x = getattr(self, name)(x)
                return F.mean(x, axis=tuple(range(2, 2 + rank)))

        self.model = Net()
        self.model.initialize(mx.init.Xavier())

    def train(self, x: np.ndarray, target: np.ndarray) -> None:
        mx, gluon = self.mx, self.gluon
        trainer = gluon.Trainer(self.model.collect_params(), "sgd",
                                {"learning_rate": crosscheck.TRANSFER_LEARNING_RATE})
        for _ in range(crosscheck.TRANSFER_STEPS):
            with mx.autograd.record():
                loss = ((self.model(mx.nd.array(x)) - mx.nd.array(target)) ** 2).mean()
            loss.backward()
            trainer.step(1)

    def save(self, path: str) -> None:
        self.doconv.export_params(self.model, path)

    def load(self, path: str) -> None:
        self.doconv.import_params(self.model, path)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        unfused = self.model(self.mx.nd.array(x)).asnumpy()
        fused = self.doconv.fuse(self.model)(self.mx.nd.array(x)).asnumpy()
        return unfused, fused


def make_model(framework: str, model: str):
    if framework.startswith("keras-"):
        backend = {"keras-tf": "tensorflow", "keras-jax": "jax", "keras-torch": "torch"}[framework]
        if os.environ.setdefault("KERAS_BACKEND", backend) != backend:
            raise SystemExit(f"{framework} needs KERAS_BACKEND={backend}, "
                             f"got {os.environ['KERAS_BACKEND']}")
        return KerasModel(model)
    if framework == "torch":
        return TorchModel(model)
    if framework == "mx":
        return MxModel(model)
    raise SystemExit(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


def export(framework: str, directory: str) -> list[str]:
    """Train and export every transfer model; the parameter files written."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for name in TRANSFER_MODELS:
        data = crosscheck.transfer_data(name)
        model = make_model(framework, name)
        model.train(data["x"], data["target"])
        path = crosscheck.transfer_paths(directory, framework, model=name)
        model.save(path)
        crosscheck.save_predictions(
            crosscheck.transfer_paths(directory, framework, framework, name),
            *model.predict(data["probe"]))
        written.append(path)
    return written


def export_and_check(framework: str, directory: str) -> list[str]:
    """Export, then compare this framework's own predictions with the NumPy reference:
    the failures (an empty list when it passes)."""
    export(framework, directory)
    _, failures, passed = crosscheck.compare_transfer(directory, [framework])
    expected = len(TRANSFER_MODELS)
    return failures if passed == expected else failures + [
        f"{framework}: {passed} of {expected} models compared"]


def check_old_npz_imports(framework: str, directory: str) -> list[str]:
    """Every transfer model trained in FRAMEWORK and exported (safetensors), its parameters
    then written as the ``.npz`` files earlier doconv releases wrote (version 2; the 2-D
    model also as version 1), each imported into a fresh model: the failures (an empty list
    when every old file predicts exactly as the model that exported it)."""
    from checkpoint_files import write_npz

    from doconv_core import is_safetensors, load_params

    failures = []
    for name in TRANSFER_MODELS:
        data = crosscheck.transfer_data(name)
        model = make_model(framework, name)
        model.train(data["x"], data["target"])
        exported = os.path.join(directory, f"old-{name}-{framework}.safetensors")
        model.save(exported)
        if not is_safetensors(exported):
            failures.append(f"{framework} {name}: export_params did not write safetensors")
            continue
        expected = model.predict(data["probe"])
        layers = load_params(exported)
        for version in (1, 2) if name == "2d" else (2,):
            old = os.path.join(directory, f"old-{name}-{framework}-v{version}.npz")
            write_npz(old, layers, version)
            fresh = make_model(framework, name)
            before = fresh.predict(data["probe"])
            fresh.load(old)
            got = fresh.predict(data["probe"])
            if np.allclose(before[0], expected[0]):
                failures.append(f"{framework} {name}: the fresh model already predicts as the "
                                "trained one; the import would go unnoticed")
            for kind, a, b in zip(("unfused", "fused"), got, expected):
                error = float(np.max(np.abs(np.asarray(a, np.float64) - b)))
                if error > 1e-6 * max(float(np.max(np.abs(b))), 1e-12):
                    failures.append(f"{framework} {name}: version-{version} .npz predicts "
                                    f"{kind} {error:.1e} away from the exporting model")
    return failures


def import_all(framework: str, directory: str, exporters: list[str]) -> list[str]:
    written = []
    for name in TRANSFER_MODELS:
        probe = crosscheck.transfer_data(name)["probe"]
        for exporter in exporters:
            if exporter == framework:
                continue
            source = crosscheck.transfer_paths(directory, exporter, model=name)
            if not os.path.exists(source):
                raise SystemExit(f"missing {source}: run the {exporter} env first")
            model = make_model(framework, name)
            model.load(source)
            target = crosscheck.transfer_paths(directory, exporter, framework, name)
            crosscheck.save_predictions(target, *model.predict(probe))
            written.append(target)
    return written


# The tox env holding each framework; keras-jax and keras-torch are optional (the Keras
# adapter's second and third backends).
ENVS = {"torch": "torch", "keras-tf": "tf", "keras-jax": "keras-jax",
        "keras-torch": "keras-torch", "mx": "mx"}
OPTIONAL = ("keras-jax", "keras-torch")


def import_everywhere(directory: str, envs: str) -> None:
    """Run ``import`` in every framework's own env: the required ones must exist."""
    present = [fw for fw, env in ENVS.items()
               if os.path.exists(os.path.join(envs, env, "bin", "python"))]
    missing = [fw for fw in ENVS if fw not in present and fw not in OPTIONAL]
    if missing:
        raise SystemExit(f"no tox env for {missing} under {envs}: run their envs first")
    for framework in ENVS:
        if framework not in present:
            print(f"{framework}: no env (optional, skipped)")
            continue
        python = os.path.join(envs, ENVS[framework], "bin", "python")
        subprocess.run([python, __file__, "import", framework, "--artifacts", directory,
                        "--from", ",".join(present)], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("export", "import", "import-everywhere"))
    parser.add_argument("framework", nargs="?", choices=FRAMEWORKS)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--from", dest="exporters", default=",".join(FRAMEWORKS))
    parser.add_argument("--envs", default=".tox", help="where the tox envs are")
    args = parser.parse_args(argv)
    if args.action == "import-everywhere":
        import_everywhere(args.artifacts, args.envs)
        return
    if args.framework is None:
        parser.error(f"{args.action} needs a framework")
    if args.action == "export":
        for path in export(args.framework, args.artifacts):
            print(path)
    else:
        for path in import_all(args.framework, args.artifacts, args.exporters.split(",")):
            print(path)


if __name__ == "__main__":
    main()
