"""Whole-layer training step: DO-Conv time divided by native conv time (float32).

    .tox/torch/bin/python benchmarks/experiments/compose_c/bench_layer.py [--rounds 9] [--threads 2] [--json OUT] [--quick]

Layer: x (32, C, H, H) with requires_grad, F.conv2d(padding=1, groups=g) forward plus backward.
Variants, interleaved per round: native (a plain (C_out, C_in/g, 3, 3) weight), einsum
(compose_einsum), ckernel (doconv_torch._ops.compose) and bmm_ios (g=1 only).  Each round times two steps
per variant; the ratio column is the median over rounds of the paired per-round ratio
variant / native.
--quick: two small shapes with batch 4, one round (a smoke run, numbers meaningless).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from doconv_torch._ckernel import _library as get_lib  # noqa: E402
from doconv_torch._ops import compose  # noqa: E402
from variants import ComposeBmm, compose_einsum, make_d_diag  # noqa: E402

# (name, C, groups, S, H)
SHAPES = [("g1 C128 S9", 128, 1, 9, 28), ("g1 C256 S9", 256, 1, 9, 14), ("g1 C512 S9", 512, 1, 9, 7),
          ("g1 C128 S12", 128, 1, 12, 28), ("g1 C256 S12", 256, 1, 12, 14), ("g1 C512 S12", 512, 1, 12, 7),
          ("dw C128 S9", 128, 128, 9, 28), ("g32 C256 S9", 256, 32, 9, 14)]
QUICK_SHAPES = [SHAPES[2], SHAPES[6]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT", help="write the raw results here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, batch 4, 1 round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if get_lib() is None:
        sys.exit("C kernel unavailable (no cc, or DOCONV_NO_CKERNEL=1)")
    torch.manual_seed(0)
    rounds = 1 if args.quick else args.rounds
    batch = 4 if args.quick else 32
    res = {}
    for name, C, g, S, H in (QUICK_SHAPES if args.quick else SHAPES):
        O = I = C
        Ig = I // g
        M = N = 3
        x = torch.randn(batch, C, H, H, requires_grad=True)
        gy = torch.randn(batch, O, H, H)
        Wn = torch.randn(O, Ig, 3, 3, requires_grad=True)
        W = torch.randn(O, Ig, S, requires_grad=True)
        D = (0.1 * torch.randn(I, 9, S)).requires_grad_()
        Dd = make_d_diag(I, 9, S)
        Wios = torch.empty(Ig, O, S).permute(1, 0, 2)
        Wios.copy_(W.detach())
        Wios.requires_grad_()
        V = {"native": lambda: Wn,
             "einsum": lambda: compose_einsum(W, D, Dd, g, M, N),
             "ckernel": lambda: compose(W, D, g, M, N)}
        if g == 1:
            V["bmm_ios"] = lambda: ComposeBmm.apply(Wios, D, Dd, M, N)

        def step(kf):
            K = kf()
            y = F.conv2d(x, K, padding=1, groups=g)
            y.backward(gy)
            for p in (x, Wn, W, D, Wios):
                p.grad = None
        out = {k: [] for k in V}
        for k in V:
            step(V[k])
        for _ in range(rounds):
            for k in V:
                t = time.perf_counter()
                step(V[k])
                step(V[k])
                out[k].append((time.perf_counter() - t) / 2 * 1e3)
        med = {k: statistics.median(v) for k, v in out.items()}
        mn = {k: min(v) for k, v in out.items()}
        pr = {k: statistics.median([a / b for a, b in zip(out[k], out["native"])]) for k in out}
        res[name] = {"median_ms": med, "min_ms": mn, "paired_ratio_median": pr, "raw": out}
        print(name, "median", " ".join("%s %.1f" % kv for kv in med.items()),
              "| min", " ".join("%s %.1f" % kv for kv in mn.items()),
              "| paired ratio", " ".join("%s %.3f" % kv for kv in pr.items() if kv[0] != "native"),
              "| min ratio", " ".join("%s %.3f" % (k, mn[k] / mn["native"]) for k in mn if k != "native"),
              flush=True)

    print("\n## Layer training step, batch %d, float32, %d thread(s), median of %d round(s)\n"
          % (batch, args.threads, rounds))
    print("| shape (H) | native ms | einsum ratio | C kernel ratio | bmm_ios ratio |")
    print("|---|---|---|---|---|")
    for (name, C, g, S, H) in SHAPES:
        if name not in res:
            continue
        r = res[name]["paired_ratio_median"]
        b = "%.2f" % r["bmm_ios"] if "bmm_ios" in r else "n/a"
        print("| %s (%d) | %.1f | %.2f | %.2f | %s |"
              % (name, H, res[name]["median_ms"]["native"], r["einsum"], r["ckernel"], b))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
