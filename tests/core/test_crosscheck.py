"""The cross-framework comparison logic, on simulated framework artifacts."""

import os

import numpy as np
import pytest

import doconv_core as dc
from doconv_core.testing import crosscheck
from doconv_core.testing.cases import property_cases, rank_cases
from doconv_core.legacy import torch_channel_map

CASES = ([c for c in property_cases() if c.name.startswith("between") and c.spec.has_D][:5]
         + [c for c in property_cases() if c.name.startswith("one")][:5]
         + [c for c in rank_cases() if "between" in c.name][:4])


def simulated(cases, kernel_fn=None, noise=0.0):
    """What a correct (or deliberately broken) adapter would write."""
    results = {}
    for case in cases:
        for dtype in crosscheck.DTYPES:
            fields = crosscheck.reference_results(case, dtype)
            if kernel_fn is not None and case.spec.has_D:
                a = case.arrays(np.float64)
                kernel = kernel_fn(case.spec, a["D"], a["W"])
                y = dc.conv(a["x"], kernel, a["bias"], stride=case.spec.stride,
                              padding=case.spec.padding, dilation=case.spec.dilation,
                              groups=case.spec.groups, padding_mode=case.spec.padding_mode)
                fields = dict(fields, kernel=kernel, output=y)
            results[(case.name, dtype)] = {
                k: None if v is None else (v * (1 + noise)).astype(dtype)
                for k, v in fields.items()}
    return results


def original_torch_mapping_kernel(spec, D, W):
    # The original PyTorch code's group mapping: slot (o, i) reads D[(o mod g)*(C_in/g) + i].
    D_total = D + dc.identity_d(spec.in_channels, spec.mn, spec.D_mul, D.dtype)
    kernel = np.einsum("oims,ois->oim", D_total[torch_channel_map(spec)], W)
    return kernel.reshape(spec.kernel_shape)


def run(tmp_path, frameworks, capsys):
    code = crosscheck.main(["--artifacts", str(tmp_path), "--frameworks", ",".join(frameworks)])
    return code, capsys.readouterr()


@pytest.fixture
def use_small_case_set(monkeypatch):
    monkeypatch.setattr(crosscheck, "cross_cases", lambda: CASES)


def test_matching_frameworks_pass(tmp_path, capsys, use_small_case_set):
    crosscheck.write_artifacts(tmp_path, "alpha", simulated(CASES), {}, CASES)
    crosscheck.write_artifacts(tmp_path, "beta", simulated(CASES, noise=1e-11), {}, CASES)
    code, out = run(tmp_path, ["alpha", "beta"], capsys)
    assert code == 0, out.err
    assert "| beta~alpha | float32 |" in out.out and "| alpha~reference | float64 |" in out.out
    assert "0 failed, 0 framework(s) missing" in out.out


def test_a_broken_group_mapping_fails(tmp_path, capsys, use_small_case_set):
    crosscheck.write_artifacts(tmp_path, "good", simulated(CASES), {}, CASES)
    broken = simulated(CASES, kernel_fn=original_torch_mapping_kernel)
    crosscheck.write_artifacts(tmp_path, "broken", broken, {}, CASES)
    code, out = run(tmp_path, ["good", "broken"], capsys)
    assert code == 1
    failing_cases = {line.split()[1] for line in out.err.splitlines() if line.startswith("FAIL")}
    # Only grouped cases with 1 < g and C_out > g differ; g == 1 agrees with the paper.
    assert failing_cases and all(name.startswith("between") for name in failing_cases)
    assert "broken~reference" in out.err and "broken~good" in out.err


def test_missing_artifacts_and_other_case_sets_fail(tmp_path, capsys, use_small_case_set):
    crosscheck.write_artifacts(tmp_path, "alpha", simulated(CASES), {}, CASES)
    code, out = run(tmp_path, ["alpha", "absent"], capsys)
    assert code == 1 and "no artifacts for 'absent'" in out.err
    crosscheck.write_artifacts(tmp_path, "stale", simulated(CASES[:3]), {}, CASES[:3])
    code, out = run(tmp_path, ["alpha", "stale"], capsys)
    assert code == 1 and "made from case set" in out.err


def test_unsupported_cases_are_listed_not_failed(tmp_path, capsys, use_small_case_set):
    results = simulated(CASES)
    skipped = CASES[0].name
    for dtype in crosscheck.DTYPES:
        del results[(skipped, dtype)]
    crosscheck.write_artifacts(tmp_path, "partial", results, {skipped: "padding mode"}, CASES)
    code, out = run(tmp_path, ["partial"], capsys)
    assert code == 0 and "1 case/dtype pair(s) unsupported" in out.out
    # Dropping a case without listing it fails.
    crosscheck.write_artifacts(tmp_path, "partial", results, {}, CASES)
    code, out = run(tmp_path, ["partial"], capsys)
    assert code == 1 and "neither computed nor listed as unsupported" in out.err


def test_write_artifacts_rejects_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="results key must be"):
        crosscheck.write_artifacts(tmp_path, "x", {("nope", "float32"): {}}, {}, CASES)
    with pytest.raises(ValueError, match="result field must be one of"):
        crosscheck.write_artifacts(tmp_path, "x", {(CASES[0].name, "float32"): {"y": 1}}, {},
                                   CASES)


def test_produce_artifacts_with_a_numpy_framework(tmp_path, capsys, use_small_case_set):
    def compute(case, dtype, inputs, R):
        x, D, W, bias = inputs["x"], inputs["D"], inputs["W"], inputs["bias"]
        y = dc.doconv2d_features(x, D, W, bias, case.spec)
        grads = dc.doconv2d_vjp(x, D, W, bias, case.spec, R)
        return {"output": y, "kernel": dc.compose_kernel(D, W, groups=case.spec.groups,
                                                          kernel_size=case.spec.kernel_size),
                **{f"grad_{k}": v for k, v in grads.items()}}

    def unsupported(case, dtype):
        return "no float64 here" if dtype == "float64" else None

    crosscheck.produce_artifacts(tmp_path, "numpy", compute, unsupported, CASES)
    art = crosscheck.read_artifacts(tmp_path, "numpy")
    assert len(art.unsupported) == len(CASES) and len(art.results) == len(CASES)
    code, out = run(tmp_path, ["numpy"], capsys)
    assert code == 0, out.err
    by_rank = {rank: sum(c.spec.rank == rank for c in CASES) for rank in (1, 2, 3)}
    for rank, count in by_rank.items():
        if count:
            assert f"| numpy~reference | float32 | {rank}-D | {count} |" in out.out


def test_self_check_reports_failures(tmp_path, use_small_case_set):
    crosscheck.write_artifacts(tmp_path, "good", simulated(CASES), {}, CASES)
    assert crosscheck.self_check(tmp_path, "good")[1] == []
    broken = simulated(CASES, kernel_fn=original_torch_mapping_kernel)
    crosscheck.write_artifacts(tmp_path, "broken", broken, {}, CASES)
    failures = crosscheck.self_check(tmp_path, "broken")[1]
    assert failures and all("between" in line for line in failures if line.startswith("FAIL"))


def transfer_params(seed, model="2d"):
    rng = np.random.default_rng(seed)
    return {name: dc.DOConvParams(
        spec, W=rng.standard_normal(spec.W_shape).astype(np.float32),
        D=rng.standard_normal(spec.D_shape).astype(np.float32) * 0.1 if spec.has_D else None,
        bias=rng.standard_normal(spec.out_channels).astype(np.float32) if spec.bias else None)
        for name, spec in crosscheck.TRANSFER_MODELS[model][0].items()}


def test_transfer_models_have_one_rank_each():
    assert {model: {spec.rank for spec in layers.values()}
            for model, (layers, _) in crosscheck.TRANSFER_MODELS.items()} == {
        "1d": {1}, "2d": {2}, "3d": {3}}
    for model, (layers, spatial) in crosscheck.TRANSFER_MODELS.items():
        x = crosscheck.transfer_data(model)["probe"]
        assert x.shape == (4, 3) + spatial
        assert crosscheck.transfer_forward(transfer_params(0, model), x).shape == (4, 10)


def test_transfer_comparison(tmp_path, capsys):
    frameworks = ["a", "b"]
    models = list(crosscheck.TRANSFER_MODELS)
    for model in models:
        probe = crosscheck.transfer_data(model)["probe"]
        for seed, exporter in enumerate(frameworks):
            layers = transfer_params(seed, model)
            dc.save_params(crosscheck.transfer_paths(tmp_path, exporter, model=model), layers)
            good = crosscheck.transfer_forward(layers, probe).astype(np.float32)
            for importer in frameworks:
                crosscheck.save_predictions(
                    crosscheck.transfer_paths(tmp_path, exporter, importer, model), good, good)
    table, failures, passed = crosscheck.compare_transfer(tmp_path, frameworks)
    assert failures == [] and passed == 4 * len(models)
    assert "| 3d | a | " in table
    # An importer that reads the other exporter's channels wrongly is caught.
    probe = crosscheck.transfer_data("1d")["probe"]
    wrong = crosscheck.transfer_forward(transfer_params(0, "1d"), probe)
    crosscheck.save_predictions(crosscheck.transfer_paths(tmp_path, "b", "a", "1d"), wrong, wrong)
    os.remove(crosscheck.transfer_paths(tmp_path, "a", "b", "2d"))
    code = crosscheck.main(["--transfer", "--artifacts", str(tmp_path), "--frameworks", "a,b"])
    out = capsys.readouterr()
    assert code == 1
    assert "FAIL 1d b -> a" in out.err and "missing" in out.err
    assert f"{4 * len(models) - 2} passed, 2 failed" in out.out
