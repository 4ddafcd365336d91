import pytest

from benchmarks.harness import Row, format_table, interleaved_times, machine_description, medians


def test_interleaved_times_round_robin():
    calls = []
    samples = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                repeats=3, warmup=1, inner=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="repeats and inner must be >= 1"):
        interleaved_times({}, repeats=0)


def test_table_shows_medians_and_ratios():
    row = Row("conv 64ch", "train", medians({"native": [1e-3, 3e-3, 2e-3], "doconv": [3e-3]}))
    assert row.ratio("doconv") == pytest.approx(1.5)
    table = format_table([row], ["native", "doconv"])
    assert table.splitlines()[0] == "| case | measure | unit | native | doconv | doconv / native |"
    assert table.splitlines()[2] == "| conv 64ch | train | ms | 2.00 | 3.00 | 1.500 |"
    assert "logical cores" in machine_description({"numpy": "2"})
