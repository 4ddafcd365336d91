"""Framework-free timing harness: variants interleaved (A B A B ...), medians, ratios, tables.

Interleaving spreads slow drifts of the machine (thermal, other processes) evenly over
the variants, so the ratio to the native conv is measured side by side in one run.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import random
import statistics
import sys
import time
from typing import Callable, Mapping, Sequence

from doconv_core.testing.machine import machine_description as describe_machine


# The layer shapes, shared by every framework's benchmark:
# (name, in, out, kernel, stride, padding, groups, spatial)
LAYERS = [
    ("3x3 64ch 56x56", 64, 64, 3, 1, 1, 1, 56),
    ("3x3 128ch 28x28", 128, 128, 3, 1, 1, 1, 28),
    ("3x3 256ch 14x14", 256, 256, 3, 1, 1, 1, 14),
    ("3x3 512ch 7x7", 512, 512, 3, 1, 1, 1, 7),
    ("dw 3x3 128ch 28x28", 128, 128, 3, 1, 1, 128, 28),
    ("1x1 256ch 14x14", 256, 256, 1, 1, 0, 1, 14),
    ("seed 1->16ch 28x28", 1, 16, 3, 2, 1, 1, 28),
]
QUICK_LAYERS = [("3x3 8ch 8x8", 8, 8, 3, 1, 1, 1, 8), ("dw 3x3 8ch 8x8", 8, 8, 3, 1, 1, 8, 8)]

_allocator = "system allocator"  # what keep_freed_memory() set, for machine_description


def interleaved_times(variants: Mapping[str, Callable[[], object]], *, repeats: int = 15,
                      warmup: int = 3, inner: int = 1,
                      alternate: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``repeats`` samples, taken round-robin.

    ``alternate``: every other round takes the variants in reverse order (A B, B A, A B, ...),
    so whatever a round's position costs (the first call after another model's) falls on
    every variant alike.
    """
    if repeats < 1 or warmup < 0 or inner < 1:
        raise ValueError(f"repeats and inner must be >= 1 and warmup >= 0, got "
                         f"repeats={repeats}, warmup={warmup}, inner={inner}")
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    forward = list(variants.items())
    for round_ in range(repeats):
        for name, fn in (forward[::-1] if alternate and round_ % 2 else forward):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return samples


@dataclasses.dataclass
class Row:
    case: str
    measure: str  # "train", "eval unfused", "eval fused", "peak memory", ...
    values: dict[str, float]  # variant -> median seconds (or bytes for memory)
    baseline: str = "native"
    unit: str = "ms"
    # variant -> median over rounds of (variant - baseline) within the same round: the
    # overhead itself, robust to drifts that medians taken separately would mix in.
    paired: dict[str, float] = dataclasses.field(default_factory=dict)
    # variant -> the baseline's median in the variant's own A/B pair (see pairwise_row)
    baselines: dict[str, float] = dataclasses.field(default_factory=dict)
    tags: set[str] = dataclasses.field(default_factory=set)  # e.g. which targets apply
    # variant -> (median of per-round ratios, 95% interval low, high), see round_ratio: where
    # present, the row's ratio (and the table shows the interval).
    intervals: dict[str, tuple[float, float, float]] = dataclasses.field(default_factory=dict)

    def ratio(self, variant: str) -> float:
        if variant in self.intervals:
            return self.intervals[variant][0]
        return self.values[variant] / self.baselines.get(variant, self.values[self.baseline])


def medians(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def pairwise_row(case: str, measure: str, variants: Mapping[str, Callable[[], object]], *,
                 baseline: str = "native", **timing) -> Row:
    """Each variant interleaved with the baseline alone (A B A B ...), one pair after another.

    Timing three variants round-robin lets one disturb another: a variant that allocates
    heavily (the einsum composition at 512 channels holds 3.6x native's memory) changes the
    allocator's state for the variant after it and moved that one's step time by several
    milliseconds. Each ratio and overhead is therefore taken within its own pair.
    """
    row = Row(case, measure, {})
    for name, fn in variants.items():
        if name == baseline:
            continue
        samples = interleaved_times({baseline: variants[baseline], name: fn}, **timing)
        pair = medians(samples)
        row.values.setdefault(baseline, pair[baseline])
        row.values[name] = pair[name]
        row.baselines[name] = pair[baseline]
        row.paired[name] = paired_differences(samples, baseline)[name]
    return row


def paired_differences(samples: Mapping[str, Sequence[float]],
                       baseline: str = "native") -> dict[str, float]:
    """Per variant, the median of its per-round difference to the baseline (same round)."""
    base = samples[baseline]
    return {name: statistics.median(v - b for v, b in zip(values, base))
            for name, values in samples.items() if name != baseline}


def round_ratio(samples: Mapping[str, Sequence[float]], variant: str,
                baseline: str = "native", *, resamples: int = 2000,
                seed: int = 0) -> tuple[float, float, float]:
    """The median over rounds of ``variant`` / ``baseline`` (each ratio within one round), and
    a 95% bootstrap interval of that median (``resamples`` resamplings of the rounds)."""
    ratios = [v / b for v, b in zip(samples[variant], samples[baseline])]
    rng = random.Random(seed)
    resampled = sorted(statistics.median(rng.choices(ratios, k=len(ratios)))
                       for _ in range(resamples))
    return (statistics.median(ratios), resampled[int(0.025 * (resamples - 1))],
            resampled[int(round(0.975 * (resamples - 1)))])


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value * 1e3:.2f}"
    if unit == "us":
        return f"{value * 1e6:.0f}"
    if unit == "MiB":
        return f"{value / 2**20:.1f}"
    return f"{value:.3g}"


def ratio_text(row: Row, variant: str) -> str:
    """The row's ratio for ``variant``, followed by its 95% interval where it has one."""
    text = f"{row.ratio(variant):.3f}"
    if variant in row.intervals:
        _, low, high = row.intervals[variant]
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def format_table(rows: Sequence[Row], variants: Sequence[str]) -> str:
    """Markdown: per case and measure, each variant's median and its ratio to the baseline
    (followed by its 95% interval where the row has one)."""
    header = ["case", "measure", "unit"]
    for variant in variants:
        header.append(variant)
        if rows and variant != rows[0].baseline:
            header.append(f"{variant} / {rows[0].baseline}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.case, row.measure, row.unit]
        for variant in variants:
            present = variant in row.values
            cells.append(_fmt(row.values[variant], row.unit) if present else "")
            if variant != row.baseline:
                cells.append(ratio_text(row, variant) if present else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description(extra: Mapping[str, str] | None = None) -> str:
    """doconv_core.testing.machine's description plus the allocator (see keep_freed_memory)."""
    return f"{describe_machine(extra)}; {_allocator}"


def keep_freed_memory() -> str:
    """Tell glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    By default every allocation above its (adaptive) mmap threshold is fresh memory, so a
    10 MB kernel or gradient costs thousands of page faults each step; how many depends on
    what ran before, which moved a 13 ms step by up to 5 ms between runs. Allocators such as
    jemalloc or tcmalloc, which PyTorch's CPU performance guide recommends, behave like this.
    Returns a description for the machine line.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    global _allocator
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if mallopt is None:
        _allocator = "system allocator (no glibc mallopt)"
    elif mallopt(M_MMAP_THRESHOLD, 32 << 20) != 1 or mallopt(M_TRIM_THRESHOLD, 1 << 30) != 1:
        _allocator = "system allocator (mallopt refused)"
    else:
        _allocator = "glibc malloc keeping freed memory (mallopt: mmap threshold 32 MiB, " \
                     "trim threshold 1 GiB)"
    return _allocator


def parse_arguments(description: str,
                    argv: Sequence[str] | None) -> argparse.Namespace:
    """Every framework's benchmark command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--markdown", default=None, help="also write the tables here")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--part", choices=("all", "layers", "network"), default="all",
                        help="time only the layer shapes or only the network")
    return parser.parse_args(argv)


def run_cases(args: argparse.Namespace, layer_rows: Callable[..., list[Row]],
              network_rows: Callable[..., list[Row]]) -> list[Row]:
    """The issue's cases (LAYERS at batch 8 and 32, the network at 112x112 batch 16), or
    tiny ones with --quick (the tests' smoke run: it leaves the process's allocator alone);
    a full run first keeps freed memory for reuse (keep_freed_memory)."""
    if args.quick:
        return layer_rows(2, QUICK_LAYERS, repeats=2) + network_rows(2, 32, 8, repeats=2)
    keep_freed_memory()
    rows: list[Row] = []
    if args.part in ("all", "layers"):
        for batch in (8, 32):
            rows += layer_rows(batch, LAYERS, args.repeats)
    if args.part in ("all", "network"):
        rows += network_rows(16, 112, 64, args.repeats)
    return rows


def command_line(script: str, argv: Sequence[str] | None, prefix: str = "") -> str:
    """The command that produced a table, for the markdown it writes."""
    options = list(argv) if argv is not None else sys.argv[1:]
    return " ".join([*([prefix] if prefix else []), "python", script, *options])


def publish(command: str, machine: str, blocks: Sequence[str], markdown: str | None) -> None:
    """Print the tables; with --markdown also write them, headed by command and machine."""
    body = "\n\n".join(blocks)
    print(f"{body}\n\nMachine: {machine}")
    if markdown:
        with open(markdown, "w") as handle:
            handle.write(f"Command: `{command}`\n\nMachine: {machine}\n\n{body}\n")


# ----------------------------------------------------- data parallel: 2 devices against 1

SCALING_VARIANTS = ("native", "doconv")
# DO-Conv/native on 2 devices may exceed DO-Conv/native on 1 by this much at most: the
# all-reduce of D, DO-Conv's extra parameter, must cost no more.
SCALING_TARGET_MARGIN = 0.03


def scaling_arguments(description: str, argv: Sequence[str] | None,
                      unit: str) -> argparse.Namespace:
    """The data-parallel benchmarks' command line; ``unit``: what --batch is per
    ("process", "device"). Sets ``size`` and ``warmup`` too (tiny ones with --smoke)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--markdown", default=None, help="also write the table here")
    parser.add_argument("--repeats", type=int, default=15, help="rounds (default: 15)")
    parser.add_argument("--inner", type=int, default=3, help="steps per sample (default: 3)")
    parser.add_argument("--batch", type=int, default=32, help=f"per {unit} (default: 32)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and 2 rounds: checks that it runs, not the speed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.inner, args.batch, args.size, args.warmup = 2, 1, 4, 16, 1
    else:
        args.size, args.warmup = 28, 3
    if min(args.repeats, args.inner, args.batch) < 1:
        parser.error("--repeats, --inner and --batch must be >= 1")
    return args


def scaling_rounds(steps: Mapping[tuple[str, str], Callable[[], object]],
                   settings: Sequence[str], args: argparse.Namespace, *,
                   skip: Callable[[str], bool] = lambda setting: False,
                   after_setting: Callable[[], object] = lambda: None
                   ) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of every (setting, variant) in ``steps``: ``args.warmup`` rounds, then
    ``args.repeats`` kept, each round timing the settings in turn and within each the
    variants alternately, so the machine's drifts fall on all alike. ``skip``: settings
    this process only waits through; ``after_setting``: e.g. a barrier of all processes."""
    samples: dict[str, dict[str, list[float]]] = {s: {v: [] for v in SCALING_VARIANTS}
                                                  for s in settings}
    for round_ in range(args.warmup + args.repeats):
        for setting in settings:
            for variant in SCALING_VARIANTS:
                if skip(setting):
                    continue
                start = time.perf_counter()
                for _ in range(args.inner):
                    steps[setting, variant]()
                if round_ >= args.warmup:
                    samples[setting][variant].append((time.perf_counter() - start)
                                                     / args.inner)
            after_setting()
    return samples


def scaling_summary(samples: Mapping[str, Mapping[str, Sequence[float]]]
                    ) -> dict[str, dict[str, float]]:
    """Per setting: each variant's median seconds and the median of the per-round ratios."""
    result = {}
    for setting, by_variant in samples.items():
        native, doconv = by_variant["native"], by_variant["doconv"]
        result[setting] = {"native": statistics.median(native),
                           "doconv": statistics.median(doconv),
                           "ratio": statistics.median(d / n for d, n in zip(doconv, native))}
    return result


def scaling_table(summary: Mapping[str, Mapping[str, float]], images: Mapping[str, int],
                  margin_name: str) -> str:
    """The markdown table, in ``images``' order (setting -> images per step, for the
    throughput column; the first setting is the one-device baseline, the last the
    data-parallel one), and the verdict on SCALING_TARGET_MARGIN."""
    lines = ["| setting | native ms/step | doconv ms/step | doconv / native | images/s native |",
             "|---|---|---|---|---|"]
    for setting, count in images.items():
        row = summary[setting]
        lines.append(f"| {setting} | {row['native'] * 1e3:.2f} | {row['doconv'] * 1e3:.2f} | "
                     f"{row['ratio']:.3f} | {count / row['native']:.0f} |")
    settings = list(images)
    margin = summary[settings[-1]]["ratio"] - summary[settings[0]]["ratio"]
    verdict = "met" if margin <= SCALING_TARGET_MARGIN else "NOT met"
    lines += ["", (f"{margin_name}: {margin:+.3f} "
                   f"(target <= +{SCALING_TARGET_MARGIN:.2f}: {verdict})")]
    return "\n".join(lines)
