"""The public API every adapter offers, kept in one place; each adapter's tests check it.

The layer classes keep their framework's names (``DOConv1d``/``DOConv2d``/``DOConv3d`` beside
PyTorch's ``Conv1d``/``Conv2d``/``Conv3d``, ``DOConv1D``/``2D``/``3D`` beside Keras' and Gluon's
``Conv1D``/``2D``/``3D``) and their framework's constructors; everything else is spelled, called
and returns the same way in every adapter.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType

ADAPTERS = ("doconv_torch", "doconv_tf", "doconv_mx")
# One layer class per spatial rank (1-D, 2-D, 3-D), named as the framework names its convs.
LAYER_CLASSES = {"doconv_torch": ("DOConv1d", "DOConv2d", "DOConv3d"),
                 "doconv_tf": ("DOConv1D", "DOConv2D", "DOConv3D"),
                 "doconv_mx": ("DOConv1D", "DOConv2D", "DOConv3D")}

# The public module files of every adapter; private helpers live in `_`-files beside them.
PUBLIC_MODULES = ("__init__.py", "layer.py", "model.py")

# Whole-model functions in model.py, exported by the package: name -> parameter list, written
# as inspect.signature prints it without annotations.
MODEL_FUNCTIONS = {
    "convert": "(model, *, include=None, D_mul=None)",
    "fuse": "(model)",
    "doconv_layers": "(model)",
    "export_params": "(model, path)",
    "import_params": "(model, path)",
    "load_legacy": "(model, weights, *, strict=True)",
}
# convert and fuse return a new model and leave the given one as it was, in every adapter
# (timm's reparameterize_model and keras.models.clone_model copy too).
COPYING_FUNCTIONS = ("convert", "fuse")

# Members of the layer class beyond its framework's own: name -> its required parameters
# (None: a read-only property). from_params also takes framework keywords (device, ctx, ...).
LAYER_MEMBERS = {
    "spec": None,
    "to_params": ("self",),
    "set_params": ("self", "params"),
    "from_params": ("params",),  # a classmethod
    "fuse": ("self",),
}

# Names every adapter package exports.
EXPORTS = (*MODEL_FUNCTIONS, "LegacyLoadReport")


def _unannotated(function) -> str:
    signature = inspect.signature(function)
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in
                  signature.parameters.values()]
    return str(signature.replace(parameters=parameters,
                                 return_annotation=inspect.Signature.empty))


def api_problems(package: ModuleType) -> list[str]:
    """What ``package`` (an imported adapter) lacks or spells differently from this list."""
    problems = []
    name = package.__name__
    folder = Path(package.__file__).parent
    public = sorted(p.name for p in folder.glob("*.py") if not p.name.startswith("_")
                    or p.name == "__init__.py")
    if public != sorted(PUBLIC_MODULES):
        problems.append(f"{name} has public modules {public}, expected {sorted(PUBLIC_MODULES)}")
    for export in EXPORTS + LAYER_CLASSES[name]:
        if export not in getattr(package, "__all__", ()):
            problems.append(f"{name}.__all__ lacks {export!r}")
    for function, expected in MODEL_FUNCTIONS.items():
        value = getattr(package, function, None)
        if value is None:
            problems.append(f"{name}.{function} is missing")
        elif value.__module__ != f"{name}.model":
            problems.append(f"{name}.{function} comes from {value.__module__}, not {name}.model")
        elif _unannotated(value) != expected:
            problems.append(f"{name}.{function}{_unannotated(value)} differs from {expected}")
    for class_name in LAYER_CLASSES[name]:
        problems += _layer_problems(name, getattr(package, class_name, None), class_name)
    return problems


def _layer_problems(package: str, layer: type | None, class_name: str) -> list[str]:
    if layer is None:
        return [f"{package}.{class_name} is missing"]
    problems = []
    if layer.__module__ != f"{package}.layer":
        problems.append(f"{package}.{layer.__name__} comes from {layer.__module__}")
    for member, required in LAYER_MEMBERS.items():
        value = inspect.getattr_static(layer, member, None)
        if value is None:
            problems.append(f"{layer.__name__}.{member} is missing")
        elif required is None:
            if not isinstance(value, property) or value.fset is not None:
                problems.append(f"{layer.__name__}.{member} must be a read-only property")
        else:
            function = getattr(layer, member)
            parameters = inspect.signature(value.__func__ if isinstance(value, classmethod)
                                           else value).parameters.values()
            names = tuple(p.name for p in parameters if p.default is inspect.Parameter.empty
                          and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
            if member == "from_params":
                names = names[1:]  # cls
                if not isinstance(value, classmethod):
                    problems.append(f"{layer.__name__}.from_params must be a classmethod")
            if names != required or not callable(function):
                problems.append(f"{layer.__name__}.{member} takes {names}, expected {required}")
    return problems
