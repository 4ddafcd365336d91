"""Cross-framework equivalence through files.

No environment holds all three frameworks, so each framework's test env runs its
adapter on the fixed case set (``doconv_core.testing.cases.cross_cases``: 2-D, 1-D, 3-D) and writes, per
case and dtype, the output, the composed kernel and the gradients of a fixed loss
``sum(y * R)`` (R seeded per case) to ``<artifacts>/<framework>.npz``, everything in
the canonical layout (channels-first data, OIHW-style kernel, D and W as in doconv-math.md). The
``cross`` env then compares every framework with the NumPy reference and with each
other, and fails on any error above tolerance, on missing artifacts, or on artifacts
made from another case set.

    python -m doconv_core.testing.crosscheck --artifacts DIR [--frameworks torch,keras-tf,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import sys
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .cases import Case, cross_cases, digest
from ..spec import ConvSpec
from ..compose import compose_kernel
from ..params import CheckpointError, DOConvParams, load_params
from ..reference import doconv, doconv_vjp

FIELDS = ("output", "kernel", "grad_x", "grad_D", "grad_W", "grad_bias")
DTYPES = ("float32", "float64")
# Relative error = max |a - b| / max(|reference|, 1e-12): float32 results carry about 1e-7
# relative rounding per operation; a few hundred accumulations stay far below 1e-4.
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}
FORMAT = "doconv.crosscheck"
VERSION = 1
_META = "__manifest__"


def loss_weights(case: Case, output_shape: Sequence[int], dtype: str) -> np.ndarray:
    """R in the fixed loss sum(y * R): seeded by the case's name."""
    seed = int.from_bytes(hashlib.sha256(("loss:" + case.name).encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(tuple(output_shape)).astype(dtype)


def case_inputs(case: Case, dtype: str) -> dict[str, np.ndarray | None]:
    """x, D, W, bias every framework starts from (canonical layout)."""
    return case.arrays(np.dtype(dtype))


def reference_results(case: Case, dtype: str) -> dict[str, np.ndarray | None]:
    """The NumPy reference for one case, computed in float64 and cast to ``dtype``."""
    arrays = case.arrays(np.float64)
    # Inputs are generated in float64 and cast, so cast them as every framework sees them.
    arrays = {k: None if v is None else v.astype(dtype).astype(np.float64)
              for k, v in arrays.items()}
    x, D, W, bias = arrays["x"], arrays["D"], arrays["W"], arrays["bias"]
    y = doconv(x, D, W, bias, case.spec)
    grads = doconv_vjp(x, D, W, bias, case.spec,
                         loss_weights(case, y.shape, dtype).astype(np.float64))
    results = {"output": y, "kernel": compose_kernel(D, W, groups=case.spec.groups,
                                                      kernel_size=case.spec.kernel_size)}
    results.update({f"grad_{k}": v for k, v in grads.items()})
    return results


@dataclasses.dataclass
class Artifacts:
    framework: str
    case_set: str
    results: dict[tuple[str, str], dict[str, np.ndarray]]  # (case, dtype) -> field -> array
    unsupported: dict[str, str]  # "case" or "case@dtype" -> reason


def write_artifacts(directory: str | os.PathLike, framework: str,
                    results: Mapping[tuple[str, str], Mapping[str, np.ndarray | None]],
                    unsupported: Mapping[str, str], cases: Sequence[Case] | None = None) -> str:
    """Save one framework's results; ``unsupported`` names what it cannot express, and why."""
    cases = cross_cases() if cases is None else list(cases)
    names = {case.name for case in cases}
    arrays: dict[str, np.ndarray] = {}
    for (case_name, dtype), fields in results.items():
        if case_name not in names or dtype not in DTYPES:
            raise ValueError(f"results key must be (case name, dtype), got {(case_name, dtype)}")
        for field, value in fields.items():
            if field not in FIELDS:
                raise ValueError(f"result field must be one of {FIELDS}, got {field!r}")
            if value is not None:
                arrays[f"{case_name}@{dtype}/{field}"] = np.asarray(value)
    manifest = {"format": FORMAT, "version": VERSION, "framework": framework,
                "case_set": digest(cases), "unsupported": dict(unsupported)}
    arrays[_META] = np.array(json.dumps(manifest))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{framework}.npz")
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def output_shape(case: Case) -> tuple[int, int, int, int]:
    batch = case.input_shape[0]
    return (batch, case.spec.out_channels) + case.spec.output_size(case.input_shape[2:])


def produce_artifacts(directory: str | os.PathLike, framework: str,
                      compute: Callable[[Case, str, dict, np.ndarray], Mapping[str, np.ndarray]],
                      unsupported_reason: Callable[[Case, str], str | None],
                      cases: Sequence[Case] | None = None) -> str:
    """Run one framework over the case set and write its artifacts.

    ``compute(case, dtype, inputs, R)`` gets the canonical x, D, W, bias (``case_inputs``)
    and the loss weights R, and returns the FIELDS in the canonical layout.
    ``unsupported_reason(case, dtype)`` returns why the framework cannot express a case,
    or None.
    """
    cases = cross_cases() if cases is None else list(cases)
    results: dict[tuple[str, str], Mapping[str, np.ndarray]] = {}
    unsupported: dict[str, str] = {}
    for case in cases:
        for dtype in DTYPES:
            reason = unsupported_reason(case, dtype)
            if reason:
                unsupported[f"{case.name}@{dtype}"] = reason
                continue
            R = loss_weights(case, output_shape(case), dtype)
            results[(case.name, dtype)] = compute(case, dtype, case_inputs(case, dtype), R)
    return write_artifacts(directory, framework, results, unsupported, cases)


def read_artifacts(directory: str | os.PathLike, framework: str) -> Artifacts:
    path = os.path.join(directory, f"{framework}.npz")
    if not os.path.exists(path):
        raise CheckpointError(
            f"no artifacts for {framework!r} at {path}: run that framework's tox env first")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    manifest = json.loads(str(arrays.pop(_META)))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a version-{VERSION} {FORMAT} file")
    results: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        head, field = key.rsplit("/", 1)
        case_name, dtype = head.rsplit("@", 1)
        results.setdefault((case_name, dtype), {})[field] = value
    return Artifacts(manifest["framework"], manifest["case_set"], results,
                     manifest["unsupported"])


def self_check(directory: str | os.PathLike, framework: str) -> tuple[Artifacts, list[str]]:
    """A framework's just-written artifacts against the reference: (artifacts, failure lines)."""
    artifacts = read_artifacts(directory, framework)
    rows = compare([artifacts])
    failures = failure_lines(rows) if rows else [f"{framework}: nothing was compared"]
    return artifacts, failures


@dataclasses.dataclass
class Row:
    case: str
    dtype: str
    pair: str  # "torch~reference", "torch~keras-tf", ...
    field: str
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""
    rank: int = 0  # the case's spatial rank (0: a row about a whole artifact)


def _errors(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    if a.shape != b.shape:
        return float("inf"), float("inf")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    max_abs = float(np.max(np.abs(a64 - b64))) if a.size else 0.0
    denominator = max(float(np.max(np.abs(scale))) if scale.size else 0.0, 1e-12)
    return max_abs, max_abs / denominator


def compare(artifacts: Sequence[Artifacts], cases: Sequence[Case] | None = None) -> list[Row]:
    """Every framework against the reference, and every pair of frameworks with each other."""
    cases = cross_cases() if cases is None else list(cases)
    expected_digest = digest(cases)
    rows: list[Row] = []
    for art in artifacts:
        if art.case_set != expected_digest:
            rows.append(Row("*", "*", f"{art.framework}~reference", "*", float("inf"),
                            float("inf"), False,
                            f"made from case set {art.case_set}, expected {expected_digest}"))
    current = [a for a in artifacts if a.case_set == expected_digest]
    for case, dtype in itertools.product(cases, DTYPES):
        reference = reference_results(case, dtype)
        present = {}
        for art in current:
            skip = art.unsupported.get(case.name) or art.unsupported.get(f"{case.name}@{dtype}")
            if skip is not None:
                continue
            fields = art.results.get((case.name, dtype))
            if fields is None:
                rows.append(Row(case.name, dtype, f"{art.framework}~reference", "*",
                                float("inf"), float("inf"), False,
                                "missing: neither computed nor listed as unsupported",
                                case.spec.rank))
                continue
            present[art.framework] = fields
        sources = [("reference", reference)] + list(present.items())
        for (name_a, a), (name_b, b) in itertools.combinations(sources, 2):
            for field in FIELDS:
                ref_value = reference[field]
                if ref_value is None:
                    continue
                if field not in a or field not in b:
                    rows.append(Row(case.name, dtype, f"{name_b}~{name_a}", field, float("inf"),
                                    float("inf"), False, "field missing", case.spec.rank))
                    continue
                max_abs, max_rel = _errors(np.asarray(a[field]), np.asarray(b[field]), ref_value)
                rows.append(Row(case.name, dtype, f"{name_b}~{name_a}", field, max_abs, max_rel,
                                max_rel <= TOLERANCE[dtype], rank=case.spec.rank))
    return rows


def summary_table(rows: Iterable[Row]) -> str:
    """Per framework pair, dtype and rank: cases compared, worst relative error per field,
    verdict."""
    rows = list(rows)
    groups = sorted({(r.pair, r.dtype, r.rank) for r in rows if r.dtype != "*"})
    header = (["pair", "dtype", "rank", "cases"] + [f"max rel {f}" for f in FIELDS]
              + ["tolerance", "ok"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pair, dtype, rank in groups:
        selected = [r for r in rows if (r.pair, r.dtype, r.rank) == (pair, dtype, rank)]
        cells = [pair, dtype, f"{rank}-D", str(len({r.case for r in selected}))]
        for field in FIELDS:
            values = [r.max_rel for r in selected if r.field == field]
            cells.append(f"{max(values):.1e}" if values else "n/a")
        cells += [f"{TOLERANCE[dtype]:.0e}", "yes" if all(r.ok for r in selected) else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failure_lines(rows: Iterable[Row], limit: int = 30) -> list[str]:
    bad = [r for r in rows if not r.ok]
    lines = [f"FAIL {r.case} [{r.dtype}] {r.pair} {r.field}: max abs {r.max_abs:.3e}, "
             f"max rel {r.max_rel:.3e} {r.note}".rstrip() for r in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more failures")
    return lines


# -- transfer: small models trained in one framework, loaded into the others --------------
# Expressible in every framework: stride-1 'same' with odd kernels, 'valid' otherwise.
TRANSFER_LAYERS = {
    "conv1": ConvSpec(3, 8, 3, padding="same"),
    "conv2": ConvSpec(8, 8, 3, stride=2, padding="valid", groups=2, D_mul=12),
    "conv3": ConvSpec(8, 16, 3, padding="same", groups=8, bias=False),  # depthwise, x2
    "conv4": ConvSpec(16, 10, 1),
}
# name -> (layers, the input's spatial size): one model per rank.
TRANSFER_MODELS: dict[str, tuple[dict[str, ConvSpec], tuple[int, ...]]] = {
    "2d": (TRANSFER_LAYERS, (12, 12)),
    "1d": ({
        "conv1": ConvSpec(3, 8, 5, padding="same", rank=1),
        "conv2": ConvSpec(8, 8, 3, stride=2, padding="valid", groups=2, D_mul=5, rank=1),
        "conv3": ConvSpec(8, 16, 3, padding="same", groups=8, bias=False, rank=1),
        "conv4": ConvSpec(16, 10, 1, rank=1),
    }, (24,)),
    "3d": ({
        "conv1": ConvSpec(3, 6, 3, padding="same", rank=3),
        "conv2": ConvSpec(6, 6, (1, 3, 3), stride=(1, 2, 2), padding="valid", groups=2,
                          D_mul=12, rank=3),
        "conv3": ConvSpec(6, 12, 3, padding="same", groups=6, bias=False, rank=3),
        "conv4": ConvSpec(12, 10, 1, rank=3),
    }, (5, 8, 8)),
}
TRANSFER_STEPS = 3
TRANSFER_LEARNING_RATE = 0.05
# float32 models computed by different libraries: outputs agree to rounding, not bitwise.
TRANSFER_TOLERANCE = 1e-5


def transfer_data(model: str = "2d") -> dict[str, np.ndarray]:
    """Training batch (x, target) and the probe input every framework predicts on
    (channels first: (N, 3, *spatial))."""
    spatial = TRANSFER_MODELS[model][1]
    rng = np.random.default_rng(2022)
    return {"x": rng.standard_normal((8, 3) + spatial).astype(np.float32),
            "target": rng.standard_normal((8, 10)).astype(np.float32),
            "probe": rng.standard_normal((4, 3) + spatial).astype(np.float32)}


def transfer_forward(layers: Mapping[str, DOConvParams], x: np.ndarray) -> np.ndarray:
    """A transfer model in NumPy: conv, ReLU between convs, global average pool."""
    y = np.asarray(x, dtype=np.float64)
    names = list(layers)
    for index, name in enumerate(names):
        p = layers[name]
        y = doconv(y, p.D, p.W, p.bias, p.spec)
        if index < len(names) - 1:
            y = np.maximum(y, 0.0)
    return y.mean(axis=tuple(range(2, y.ndim)))


def transfer_paths(directory: str | os.PathLike, exporter: str,
                   importer: str | None = None, model: str = "2d") -> str:
    """Where an exporter's parameters (importer None; the portable safetensors file) or an
    importer's predictions (an ``.npz`` of arrays, not a parameter file) go."""
    name = (f"transfer-{model}-{exporter}.safetensors" if importer is None
            else f"transfer-{model}-{exporter}-into-{importer}.npz")
    return os.path.join(directory, name)


def save_predictions(path: str, unfused: np.ndarray, fused: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, unfused=np.asarray(unfused), fused=np.asarray(fused))


def compare_transfer(directory: str | os.PathLike, frameworks: Sequence[str],
                     models: Sequence[str] = tuple(TRANSFER_MODELS)
                     ) -> tuple[str, list[str], int]:
    """(table, failures, directions passed): every exporter's models as predicted by every
    framework, unfused and fused, against the NumPy reference of the exported parameters."""
    header = ["model", "exported by \\ predicted by"] + list(frameworks)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    failures: list[str] = []
    passed = 0
    for model in models:
        expected = TRANSFER_MODELS[model][0]
        probe = transfer_data(model)["probe"]
        for exporter in frameworks:
            cells = [model, exporter]
            path = transfer_paths(directory, exporter, model=model)
            if not os.path.exists(path):
                failures.append(f"missing {path}: run the {exporter} env first")
                lines.append("| " + " | ".join(cells + ["missing"] * len(frameworks)) + " |")
                continue
            layers = load_params(path)
            if set(layers) != set(expected) or any(
                    not layers[n].spec.same_function(s) for n, s in expected.items()):
                failures.append(f"{path} does not hold the {model} transfer model's layers")
                continue
            layers = {name: layers[name] for name in expected}  # the model's order
            reference = transfer_forward(layers, probe)
            scale = max(float(np.max(np.abs(reference))), 1e-12)
            for importer in frameworks:
                result = transfer_paths(directory, exporter, importer, model)
                if not os.path.exists(result):
                    failures.append(f"missing {result}: {importer} did not load {exporter}'s "
                                    f"{model} model")
                    cells.append("missing")
                    continue
                with np.load(result, allow_pickle=False) as predictions:
                    errors = [float(np.max(np.abs(predictions[kind].astype(np.float64)
                                                  - reference))) / scale
                              for kind in ("unfused", "fused")]
                worst = max(errors)
                if worst <= TRANSFER_TOLERANCE:
                    passed += 1
                else:
                    failures.append(f"FAIL {model} {exporter} -> {importer}: relative error "
                                    f"unfused {errors[0]:.2e}, fused {errors[1]:.2e}")
                cells.append(f"{worst:.1e}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), failures, passed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True, help="folder the framework envs wrote to")
    parser.add_argument("--frameworks", default="torch,keras-tf,mx",
                        help="comma-separated; each must have written <artifacts>/<name>.npz")
    parser.add_argument("--optional", default="keras-jax,keras-torch",
                        help="comma-separated; compared when their artifacts exist (a second "
                             "backend of an adapter that --frameworks already covers)")
    parser.add_argument("--markdown", default=None, help="also write the summary table here")
    parser.add_argument("--transfer", action="store_true",
                        help="compare the transfer model's predictions instead")
    args = parser.parse_args(argv)
    frameworks = [f for f in args.frameworks.split(",") if f]
    for name in (f for f in args.optional.split(",") if f and f not in frameworks):
        marker = (transfer_paths(args.artifacts, name) if args.transfer
                  else os.path.join(args.artifacts, f"{name}.npz"))
        if os.path.exists(marker):
            frameworks.append(name)
        else:
            print(f"{name}: no artifacts (optional, not compared)")
    if args.transfer:
        table, failures, passed = compare_transfer(args.artifacts, frameworks)
        print("Transfer model: maximum relative error of the probe predictions (unfused and "
              f"fused, worst of the two) against the NumPy reference; tolerance "
              f"{TRANSFER_TOLERANCE:.0e}\n")
        print(table)
        for line in failures:
            print(line, file=sys.stderr)
        print(f"\n{passed} passed, {len(failures)} failed")
        return 1 if failures else 0
    loaded, missing = [], []
    for framework in frameworks:
        try:
            loaded.append(read_artifacts(args.artifacts, framework))
        except CheckpointError as error:
            missing.append(str(error))
    rows = compare(loaded)
    table = summary_table(rows)
    print(table)
    for art in loaded:
        if art.unsupported:
            print(f"\n{art.framework}: {len(art.unsupported)} case/dtype pair(s) unsupported, e.g. "
                  + "; ".join(f"{k}: {v}" for k, v in list(art.unsupported.items())[:3]))
    for line in missing + failure_lines(rows):
        print(line, file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")
    failed = sum(not r.ok for r in rows)
    print(f"\n{len(rows) - failed} comparisons within tolerance, {failed} failed, "
          f"{len(missing)} framework(s) missing")
    return 1 if missing or failed else 0


if __name__ == "__main__":
    sys.exit(main())
