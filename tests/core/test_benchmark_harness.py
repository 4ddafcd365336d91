import pytest

from benchmarks.harness import (Row, format_table, interleaved_times, machine_description, medians,
                                round_ratio, scaling_arguments, scaling_rounds, scaling_summary,
                                scaling_table)


def test_interleaved_times_round_robin():
    calls = []
    samples = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                repeats=3, warmup=1, inner=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="repeats and inner must be >= 1"):
        interleaved_times({}, repeats=0)


def test_interleaved_times_alternate_reverses_every_other_round():
    calls = []
    interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                      repeats=3, warmup=0, alternate=True)
    assert calls == ["a", "b", "b", "a", "a", "b"]


def test_round_ratio_pairs_rounds_and_brackets_the_median():
    # A drift that doubles both variants' times mid-run: per-round ratios stay 1.1, where
    # the ratio of separate medians would depend on where each median fell.
    native = [1.0] * 10 + [2.0] * 10
    samples = {"native": native, "doconv": [1.1 * n for n in native]}
    assert round_ratio(samples, "doconv") == pytest.approx((1.1, 1.1, 1.1))
    spread = {"native": [1.0] * 9, "doconv": [0.9, 0.95, 1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.3]}
    middle, low, high = round_ratio(spread, "doconv")
    assert middle == pytest.approx(1.02)
    assert 0.9 <= low < middle < high <= 1.3
    assert round_ratio(spread, "doconv") == (middle, low, high)  # seeded: reproducible


def test_table_shows_the_interval_and_the_row_s_ratio_is_its_median():
    row = Row("net", "eval eager", {"native": 2e-3, "doconv": 3e-3},
              intervals={"doconv": (1.01, 0.99, 1.03)})
    assert row.ratio("doconv") == 1.01
    table = format_table([row], ["native", "doconv"])
    assert table.splitlines()[2] == "| net | eval eager | ms | 2.00 | 3.00 | 1.010 [0.990, 1.030] |"


def test_table_shows_medians_and_ratios():
    row = Row("conv 64ch", "train", medians({"native": [1e-3, 3e-3, 2e-3], "doconv": [3e-3]}))
    assert row.ratio("doconv") == pytest.approx(1.5)
    table = format_table([row], ["native", "doconv"])
    assert table.splitlines()[0] == "| case | measure | unit | native | doconv | doconv / native |"
    assert table.splitlines()[2] == "| conv 64ch | train | ms | 2.00 | 3.00 | 1.500 |"
    assert "logical cores" in machine_description({"numpy": "2"})


def test_scaling_rounds_alternate_variants_within_each_setting_and_skip_warmup():
    calls = []
    steps = {(s, v): (lambda s=s, v=v: calls.append((s, v)))
             for s in ("one", "two") for v in ("native", "doconv")}
    args = scaling_arguments("d", ["--repeats", "2", "--inner", "1"], "device")
    args.warmup = 1
    barriers = []
    samples = scaling_rounds(steps, ("one", "two"), args, skip=lambda s: s == "one",
                             after_setting=lambda: barriers.append(1))
    assert calls == [("two", "native"), ("two", "doconv")] * 3
    assert len(barriers) == 2 * 3  # after every setting of every round, skipped ones too
    assert samples["one"] == {"native": [], "doconv": []}
    assert [len(v) for v in samples["two"].values()] == [2, 2]


def test_scaling_table_reports_the_margin_against_the_target():
    samples = {"1 device": {"native": [1.0, 2.0, 3.0], "doconv": [1.1, 2.2, 3.3]},
               "2 devices": {"native": [2.0, 2.0, 2.0], "doconv": [2.4, 2.4, 2.4]}}
    summary = scaling_summary(samples)
    assert summary["1 device"] == pytest.approx({"native": 2.0, "doconv": 2.2, "ratio": 1.1})
    table = scaling_table(summary, {"1 device": 32, "2 devices": 64}, "margin").splitlines()
    assert table[2] == "| 1 device | 2000.00 | 2200.00 | 1.100 | 16 |"
    assert table[3] == "| 2 devices | 2000.00 | 2400.00 | 1.200 | 32 |"
    assert table[-1] == "margin: +0.100 (target <= +0.03: NOT met)"


def test_scaling_arguments_smoke_sizes_and_bad_counts(capsys):
    args = scaling_arguments("d", ["--smoke"], "process")
    assert (args.repeats, args.inner, args.batch, args.size, args.warmup) == (2, 1, 4, 16, 1)
    with pytest.raises(SystemExit):
        scaling_arguments("d", ["--batch", "0"], "process")
    assert "--repeats, --inner and --batch must be >= 1" in capsys.readouterr().err
