"""Compose-only benchmark: the DO-Conv kernel composition alone (float32, ms).

    .tox/torch/bin/python benchmarks/experiments/compose_c/bench_compose.py [--rounds 9] [--threads 2] [--json OUT] [--quick]

Variants, interleaved per round (A B C A B C ...): einsum (compose_einsum, autograd backward),
ckernel (doconv_torch._ops.compose, the C kernel on CPU) and bmm_ios (variants.ComposeBmm, W stored (i,o,s)-strided;
g=1 only).  "fwd" runs under no_grad, "fb" is forward + backward with a contiguous
(C_out, C_in/g, 3, 3) dK.  Each cell is the median over rounds of the mean of n calls.
--quick: two small shapes, one round, a few calls (a smoke run, numbers meaningless).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from doconv_torch._ckernel import _library as get_lib  # noqa: E402
from doconv_torch._ops import compose  # noqa: E402
from variants import ComposeBmm, compose_einsum, make_d_diag  # noqa: E402

SHAPES = [("g1 C128 S9", 128, 1, 9), ("g1 C256 S9", 256, 1, 9), ("g1 C512 S9", 512, 1, 9),
          ("g1 C128 S12", 128, 1, 12), ("g1 C256 S12", 256, 1, 12), ("g1 C512 S12", 512, 1, 12),
          ("dw C128 S9", 128, 128, 9), ("g32 C256 S9", 256, 32, 9)]
QUICK_SHAPES = [SHAPES[0], SHAPES[6]]


def t_once(f, n):
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT", help="write the raw results here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, 1 round, few calls")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if get_lib() is None:
        sys.exit("C kernel unavailable (no cc, or DOCONV_NO_CKERNEL=1)")
    torch.manual_seed(0)
    rounds = 1 if args.quick else args.rounds
    res = {}
    for name, C, g, S in (QUICK_SHAPES if args.quick else SHAPES):
        O = I = C
        Ig = I // g
        M = N = 3
        MN = 9
        W = torch.randn(O, Ig, S, requires_grad=True)
        D = (0.1 * torch.randn(I, MN, S)).requires_grad_()
        Dd = make_d_diag(I, MN, S)
        Wios = torch.empty(Ig, O, S).permute(1, 0, 2)
        Wios.copy_(W.detach())
        Wios.requires_grad_()
        dK = torch.randn(O, Ig, M, N)
        V = {"einsum": lambda w, d: compose_einsum(w, d, Dd, g, M, N),
             "ckernel": lambda w, d: compose(w, d, g, M, N)}
        if g == 1:
            V["bmm_ios"] = lambda w, d: ComposeBmm.apply(Wios, d, Dd, M, N)
        fwd = {k: (lambda f=f: f(W, D)) for k, f in V.items()}

        def mk(f):
            def run():
                K = f(W, D)
                K.backward(dK)
                W.grad = None
                D.grad = None
                Wios.grad = None
            return run
        fb = {k: mk(f) for k, f in V.items()}
        with torch.no_grad():
            ref = V["einsum"](W, D)
            for k, f in V.items():
                assert (f(W, D) - ref).abs().max() < 1e-3, k
        n = max(3, int(20 * (256 / C) ** 2)) if g == 1 else 30
        if args.quick:
            n = 2
        out = {k: ([], []) for k in V}
        for _ in range(rounds):
            for k in V:
                with torch.no_grad():
                    fwd[k]()
                with torch.no_grad():
                    out[k][0].append(t_once(fwd[k], n))
                fb[k]()
                out[k][1].append(t_once(fb[k], n))
        # per variant: [median fwd, median fb, min fwd, min fb]
        res[name] = {k: (statistics.median(a), statistics.median(b), min(a), min(b)) for k, (a, b) in out.items()}
        print(name, "  ".join("%s fwd %.3f fb %.3f (min %.3f %.3f)" % (k, *v) for k, v in res[name].items()),
              flush=True)

    print("\n## Compose only, float32, %d thread(s), median of %d round(s), ms\n" % (args.threads, rounds))
    print("| shape | einsum fwd | einsum fb | C kernel fwd | C kernel fb | fb ratio C/einsum | bmm_ios fwd / fb |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res.items():
        e, c = r["einsum"], r["ckernel"]
        b = "%.3f / %.3f" % r["bmm_ios"][:2] if "bmm_ios" in r else "n/a"
        print("| %s | %.3f | %.3f | %.3f | %.3f | %.2f | %s |" % (name, e[0], e[1], c[0], c[1], c[1] / e[1], b))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
