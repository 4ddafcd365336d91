"""A/B of C-kernel builds: the shipped source against compile-time variants or an older
revision, hot and with cold caches, plus the composition's cost inside a training step.

    .tox/torch/bin/python benchmarks/experiments/compose_c/bench_kernel_ab.py \
        [--variant NAME=DEFINES ...] [--revision NAME=GIT_REV:PATH] [--rounds 41] [--in-step]
        [--shape CHANNELS,VOLUME,D_MUL ...]

Variants are the shipped source with extra `#define`s in front, e.g.
`--variant nopf="PREFETCH 0"` (no software prefetch), `--variant ob8="OB 8"`,
`--variant pfd32="PFD 32"`; a revision is another source, e.g. the first integrated kernel
(ABI 7): `--revision abi7=a0862a1:benchmarks/experiments/compose_c/doconv_kernel.c`.
Every build must produce exactly the shipped build's K, dW and dD. "cold" writes 64 MB
before each call (inside a training step the convolution evicts W, K, dK, dW); "hot" times
a call right after the same call. --in-step times the shipped kernel's forward and backward inside a 128-channel 3x3
layer's training step (batch 8, 28x28), in a hot loop, and after a 64 MB write. Figures in
this folder's README and in docs/benchmarks.md ("What we tried") come from this script.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

import doconv_torch  # noqa: E402
from benchmarks.harness import keep_freed_memory  # noqa: E402
from doconv_torch import _ckernel  # noqa: E402

# (channels, kernel volume, D_mul), groups 1: 3x3 layers, then the 1-D (kernel 3) and 3-D
# (3x3x3) benchmark layers' shapes
SHAPES = [(128, 9, 9), (256, 9, 9), (512, 9, 9), (512, 9, 12), (256, 3, 3), (64, 27, 27)]
FLUSH = torch.empty(64 << 20, dtype=torch.uint8)


def build(sources: dict[str, tuple[str, int]]) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="doconv-ab-"))
    scratch.chmod(0o700)
    libraries = {}
    for name, (source, abi) in sources.items():
        _ckernel.ABI_VERSION = abi  # the loader checks the ABI an older source reports
        libraries[name], _ = _ckernel._compile_and_load(source, scratch / name)
    return libraries


def ab(libraries: dict, rounds: int, shapes: list[tuple[int, int, int]]) -> None:
    threads = torch.get_num_threads()
    for channels, volume, D_mul in shapes:
        W = torch.randn(channels, channels, D_mul)
        D = torch.randn(channels, volume, D_mul)
        dK = torch.randn(channels, channels, volume)
        K, dW, dD = (torch.empty(channels, channels, volume), torch.empty_like(W),
                     torch.empty_like(D))
        n = max(1, min(threads, W.numel() // 16384))

        def fwd(lib):
            lib.doconv_fwd(0, W.data_ptr(), D.data_ptr(), K.data_ptr(), channels, channels, 1,
                           volume, D_mul, n)

        def bwd(lib):
            lib.doconv_bwd(0, W.data_ptr(), D.data_ptr(), dK.data_ptr(), dW.data_ptr(),
                           dD.data_ptr(), channels, channels, 1, volume, D_mul, n)

        reference = None
        for lib in libraries.values():
            fwd(lib)
            bwd(lib)
            if reference is None:
                reference = (K.clone(), dW.clone(), dD.clone())
            elif not all(torch.equal(a, b) for a, b in zip(reference, (K, dW, dD))):
                raise SystemExit("a build computes different values")
        times: dict = {}
        for _ in range(rounds):
            for name, lib in libraries.items():
                for mode in ("hot", "cold"):
                    for kind, fn in (("fwd", fwd), ("bwd", bwd)):
                        if mode == "cold":
                            FLUSH.fill_(1)
                        else:
                            fn(lib)  # hot: the same call just before, untimed
                        start = time.perf_counter()
                        fn(lib)
                        times.setdefault((name, mode, kind), []).append(
                            time.perf_counter() - start)
        for mode in ("hot", "cold"):
            cells = [f"{name}: fwd {statistics.median(times[(name, mode, 'fwd')]) * 1e6:.0f} "
                     f"bwd {statistics.median(times[(name, mode, 'bwd')]) * 1e6:.0f}"
                     for name in libraries]
            print(f"{channels} ch volume {volume} D_mul {D_mul} {mode} (us): "
                  + " | ".join(cells))


def in_step(rounds: int) -> None:
    layer = doconv_torch.DOConv2d(128, 128, 3, 1, 1, bias=False)
    x = torch.randn(8, 128, 28, 28, requires_grad=True)
    times: dict = {"fwd": [], "bwd": []}
    forward, backward = _ckernel.c_forward, _ckernel.c_backward

    def timed(kind, fn):
        def call(*args):
            start = time.perf_counter()
            out = fn(*args)
            times[kind].append(time.perf_counter() - start)
            return out
        return call

    # doconv::compose's CPU kernels look these up on the module at every call.
    _ckernel.c_forward, _ckernel.c_backward = timed("fwd", forward), timed("bwd", backward)
    grad = torch.randn(128, 128, 3, 3)
    try:
        for label, step in (
                ("in a training step", lambda: layer(x).sum().backward()),
                ("hot loop", lambda: layer._compose().backward(grad)),
                ("after a 64 MB write", lambda: (FLUSH.fill_(1), layer._compose().backward(grad)))):
            for phase in ("warm-up", "timed"):
                times["fwd"].clear()
                times["bwd"].clear()
                for _ in range(5 if phase == "warm-up" else rounds):
                    layer.zero_grad(set_to_none=True)
                    step()
            print(f"128 ch, {label}: fwd {statistics.median(times['fwd']) * 1e6:.0f} us, "
                  f"bwd {statistics.median(times['bwd']) * 1e6:.0f} us")
    finally:
        _ckernel.c_forward, _ckernel.c_backward = forward, backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DEFINES")
    parser.add_argument("--revision", action="append", default=[], metavar="NAME=REV:PATH")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--in-step", action="store_true")
    parser.add_argument("--shape", action="append", default=[], metavar="C,VOLUME,D_MUL",
                        help="instead of the default shapes (repeatable)")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in spec.split(",")) for spec in args.shape] or SHAPES
    keep_freed_memory()
    source = _ckernel.SOURCE.read_text()
    sources = {"shipped": (source, _ckernel.ABI_VERSION)}
    for spec in args.variant:
        name, defines = spec.split("=", 1)
        sources[name] = ("".join(f"#define {d.strip()}\n" for d in defines.split(",")) + source,
                         _ckernel.ABI_VERSION)
    for spec in args.revision:
        name, rev = spec.split("=", 1)
        text = subprocess.run(["git", "-C", str(REPO), "show", rev], check=True,
                              capture_output=True, text=True).stdout
        abi = int(text.split("doconv_abi_version(void) { return ")[1].split(";")[0])
        sources[name] = (text, abi)
    shipped_abi = _ckernel.ABI_VERSION
    try:
        ab(build(sources), args.rounds, shapes)
    finally:
        _ckernel.ABI_VERSION = shipped_abi
    if args.in_step:
        in_step(args.rounds)


if __name__ == "__main__":
    main()
