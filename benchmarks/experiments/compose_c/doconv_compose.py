"""DO-Conv kernel composition on CPU: fused C kernel (compiled at first use) + torch fallback.

K[o, i, m] = sum_s (D + D_diag)[c(o,i), m, s] * W[o, i, s],  c(o,i) = (o // Og) * Ig + i
W: (C_out, C_in/g, S), D: (C_in, M*N, S), returns K: (C_out, C_in/g, M, N) contiguous.
D_diag is NOT passed: the kernel adds the identity blocks itself (floor(S/MN) MNxMN identity
blocks along the last axis, then zero columns).  dD is the gradient w.r.t. D (= w.r.t. D+D_diag).

Research prototype, packaged from the compose experiment (see README.md next to this file).
The C source lives in _C_SRC below; doconv_kernel.c is a copy for reading and must be
regenerated from _C_SRC if the two ever differ (test_compose_c.py checks that they match).
The compiled .so is cached in $DOCONV_CACHE_DIR, else $XDG_CACHE_HOME/doconv-experiments
(~/.cache/doconv-experiments), never inside the repository.  The cache directory is created
with mode 0700 and must be owned by the current user and not group/other writable, and so
must each cached .so before it is loaded; otherwise the C kernel is not used (einsum).
Environment: DOCONV_NO_CKERNEL=1 forces einsum; DOCONV_CKERNEL_F64=0 sends float64 to einsum;
CC picks the compiler (default cc).
"""
import ctypes, hashlib, os, stat, subprocess, tempfile, threading, warnings
import torch

_C_SRC = r"""/* DO-Conv kernel composition: K[o,i,:] = (D+Ddiag)[c] @ W[o,i,:],  c = (o/Og)*Ig + i
   W (O, Ig, S), D (Cin, MN, S), K (O, Ig, MN), all contiguous; Ddiag = floor(S/MN) identity
   blocks along s (added on the fly, never read).  Work is split into tiles of up to CB input
   channels of one group; the tile's padded D' stays in L1 while all Og output rows of the group
   stream through (CB*S contiguous elements per row).  Tiles own disjoint c => dD is written
   without races or reductions.  OpenMP over tiles.  GCC/Clang vector extensions (portable,
   lowered to AVX-512/AVX2/SSE/NEON by the compiler).  MN, S up to 32 (f32/f64).
   The tile functions are always_inline and the OpenMP loop lives in per-size wrappers, so
   common sizes (MN = 9; S = 9, 12, 16) get compile-time constant trip counts. */
#include <string.h>
/* channels per tile: 16 for float, 8 for double (tile rows = 576 B = 9 lines for S = 9) */
#define CB_(T) (64 / (int)sizeof(T))

/* native SIMD width in bytes: padded rows are arrays of NV native vectors, so scalar*vector
   broadcasts stay in registers (wider-than-native generic vectors spill through the stack) */
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif

#define DEFINE_TILES(T, SUF, PAD)                                                           \
typedef T vb_##SUF##_##PAD __attribute__((vector_size(VBYTES)));                            \
typedef T ub_##SUF##_##PAD __attribute__((vector_size(VBYTES), aligned(sizeof(T)), may_alias)); \
static inline __attribute__((always_inline)) void                                           \
fwd_tile_##SUF##_##PAD(long t, const T* restrict W, const T* restrict D, T* restrict K,     \
        long O, long Ig, long g, const long MN, const long S) {                             \
    typedef vb_##SUF##_##PAD V; enum { CB = CB_(T), VL = VBYTES / sizeof(T), NV = PAD / VL }; \
    long Og = O / g, nIB = (Ig + CB - 1) / CB, nb = S / MN;                                 \
    V DT[CB][PAD][NV]; /* DT[j][s][m] = D'[c0+j][m][s] */                                   \
    long grp = t / nIB, i0 = (t % nIB) * CB, nc = Ig - i0 < CB ? Ig - i0 : CB;              \
    for (long j = 0; j < nc; ++j) {                                                         \
        const T* Dc = D + (grp * Ig + i0 + j) * MN * S;                                     \
        for (long s = 0; s < S; ++s) {                                                      \
            T v[PAD] = {0};                                                                 \
            for (long m = 0; m < MN; ++m)                                                   \
                v[m] = Dc[m * S + s] + ((s % MN == m && s < nb * MN) ? (T)1 : (T)0);        \
            memcpy(DT[j][s], v, sizeof(v));                                                 \
        }                                                                                   \
    }                                                                                       \
    for (long o = grp * Og; o < (grp + 1) * Og; ++o) {                                      \
        const T* restrict w = W + (o * Ig + i0) * S;                                        \
        T* restrict k = K + (o * Ig + i0) * MN;                                             \
        for (long j = 0; j < nc; ++j, w += S, k += MN) {                                    \
            V acc[NV];                                                                      \
            for (int v = 0; v < NV; ++v) acc[v] = (V){0};                                   \
            for (long s = 0; s < S; ++s) { T ws = w[s];                                     \
                for (int v = 0; v < NV; ++v) acc[v] += ws * DT[j][s][v]; }                  \
            memcpy(k, acc, MN * sizeof(T));                                                 \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
static inline __attribute__((always_inline)) void                                           \
bwd_tile_##SUF##_##PAD(long t, const T* restrict W, const T* restrict D,                    \
        const T* restrict dK, T* restrict dW, T* restrict dD,                               \
        long O, long Ig, long g, const long MN, const long S) {                             \
    typedef vb_##SUF##_##PAD V; enum { CB = CB_(T), VL = VBYTES / sizeof(T), NV = PAD / VL }; \
    long Og = O / g, nIB = (Ig + CB - 1) / CB, nb = S / MN;                                 \
    V Dp[CB][PAD][NV], acc[CB][PAD][NV]; /* [j][m][s] */                                    \
    const T* Wend = W + O * Ig * S;                                                         \
    long grp = t / nIB, i0 = (t % nIB) * CB, nc = Ig - i0 < CB ? Ig - i0 : CB;              \
    for (long j = 0; j < nc; ++j) {                                                         \
        const T* Dc = D + (grp * Ig + i0 + j) * MN * S;                                     \
        for (long m = 0; m < MN; ++m) {                                                     \
            T v[PAD] = {0};                                                                 \
            for (long s = 0; s < S; ++s)                                                    \
                v[s] = Dc[m * S + s] + ((s % MN == m && s < nb * MN) ? (T)1 : (T)0);        \
            memcpy(Dp[j][m], v, sizeof(v));                                                 \
            for (int q = 0; q < NV; ++q) acc[j][m][q] = (V){0};                             \
        }                                                                                   \
    }                                                                                       \
    for (long o = grp * Og; o < (grp + 1) * Og; ++o) {                                      \
        const T* restrict w = W + (o * Ig + i0) * S;                                        \
        const T* restrict dk = dK + (o * Ig + i0) * MN;                                     \
        T* restrict dw = dW + (o * Ig + i0) * S;                                            \
        for (long j = 0; j < nc; ++j, w += S, dk += MN, dw += S) {                          \
            V wv[NV], gw[NV];                                                               \
            /* full-width unaligned loads (lanes >= S read the next row and are never      \
               stored); the last rows of W take the exact-size copy instead */              \
            if (w + PAD <= Wend) {                                                          \
                for (int q = 0; q < NV; ++q) wv[q] = *(const ub_##SUF##_##PAD*)(w + q * VL); \
            } else {                                                                        \
                for (int q = 0; q < NV; ++q) wv[q] = (V){0};                                \
                memcpy(wv, w, S * sizeof(T));                                               \
            }                                                                               \
            for (int q = 0; q < NV; ++q) gw[q] = (V){0};                                    \
            for (long m = 0; m < MN; ++m) { T gm = dk[m];                                   \
                for (int q = 0; q < NV; ++q) {                                              \
                    gw[q] += gm * Dp[j][m][q]; acc[j][m][q] += gm * wv[q]; } }              \
            memcpy(dw, gw, S * sizeof(T));                                                  \
        }                                                                                   \
    }                                                                                       \
    for (long j = 0; j < nc; ++j) {                                                         \
        T* dDc = dD + (grp * Ig + i0 + j) * MN * S;                                         \
        for (long m = 0; m < MN; ++m) memcpy(dDc + m * S, acc[j][m], S * sizeof(T));       \
    }                                                                                       \
}

/* one OpenMP driver per (dtype, PAD, size specialisation); MNV/SV are constants or the args */
#define DEFINE_DRIVER(T, SUF, PAD, NAME, MNV, SV)                                           \
static void fwd_##SUF##_##NAME(const T* W, const T* D, T* K, long O, long Ig, long g,       \
                               long MN, long S, int nth) {                                  \
    long ntiles = g * ((Ig + CB_(T) - 1) / CB_(T)); (void)MN; (void)S;                      \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nth)")                       \
    for (long t = 0; t < ntiles; ++t) fwd_tile_##SUF##_##PAD(t, W, D, K, O, Ig, g, MNV, SV); \
}                                                                                           \
static void bwd_##SUF##_##NAME(const T* W, const T* D, const T* dK, T* dW, T* dD,           \
                               long O, long Ig, long g, long MN, long S, int nth) {         \
    long ntiles = g * ((Ig + CB_(T) - 1) / CB_(T)); (void)MN; (void)S;                      \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nth)")                       \
    for (long t = 0; t < ntiles; ++t)                                                       \
        bwd_tile_##SUF##_##PAD(t, W, D, dK, dW, dD, O, Ig, g, MNV, SV);                     \
}

#define DEFINE_ALL(T, SUF)                                                                  \
DEFINE_TILES(T, SUF, 16)                                                                    \
DEFINE_TILES(T, SUF, 32)                                                                    \
DEFINE_DRIVER(T, SUF, 16, 9_9, 9, 9)                                                        \
DEFINE_DRIVER(T, SUF, 16, 9_12, 9, 12)                                                      \
DEFINE_DRIVER(T, SUF, 16, 9_16, 9, 16)                                                      \
DEFINE_DRIVER(T, SUF, 16, gen16, MN, S)                                                     \
DEFINE_DRIVER(T, SUF, 32, gen32, MN, S)                                                     \
static void fwd_##SUF(const T* W, const T* D, T* K, long O, long Ig, long g, long MN, long S, int nth) { \
    if (MN == 9 && S == 9) fwd_##SUF##_9_9(W, D, K, O, Ig, g, MN, S, nth);                 \
    else if (MN == 9 && S == 12) fwd_##SUF##_9_12(W, D, K, O, Ig, g, MN, S, nth);          \
    else if (MN == 9 && S == 16) fwd_##SUF##_9_16(W, D, K, O, Ig, g, MN, S, nth);          \
    else if (MN <= 16 && S <= 16) fwd_##SUF##_gen16(W, D, K, O, Ig, g, MN, S, nth);        \
    else fwd_##SUF##_gen32(W, D, K, O, Ig, g, MN, S, nth);                                 \
}                                                                                           \
static void bwd_##SUF(const T* W, const T* D, const T* dK, T* dW, T* dD, long O, long Ig, long g, long MN, long S, int nth) { \
    if (MN == 9 && S == 9) bwd_##SUF##_9_9(W, D, dK, dW, dD, O, Ig, g, MN, S, nth);        \
    else if (MN == 9 && S == 12) bwd_##SUF##_9_12(W, D, dK, dW, dD, O, Ig, g, MN, S, nth); \
    else if (MN == 9 && S == 16) bwd_##SUF##_9_16(W, D, dK, dW, dD, O, Ig, g, MN, S, nth); \
    else if (MN <= 16 && S <= 16) bwd_##SUF##_gen16(W, D, dK, dW, dD, O, Ig, g, MN, S, nth); \
    else bwd_##SUF##_gen32(W, D, dK, dW, dD, O, Ig, g, MN, S, nth);                        \
}

DEFINE_ALL(float, f32)
DEFINE_ALL(double, f64)

/* returns 0 on success, -1 if unsupported (caller falls back to torch) */
int doconv_fwd(int dtype, const void* W, const void* D, void* K,
               long O, long Ig, long g, long MN, long S, int nth) {
    if (MN > 32 || S > 32 || MN < 1 || S < 1 || g < 1 || O % g) return -1;
    if (nth < 1) nth = 1;
    if (dtype == 0) fwd_f32(W, D, K, O, Ig, g, MN, S, nth);
    else if (dtype == 1) fwd_f64(W, D, K, O, Ig, g, MN, S, nth);
    else return -1;
    return 0;
}
int doconv_bwd(int dtype, const void* W, const void* D, const void* dK, void* dW, void* dD,
               long O, long Ig, long g, long MN, long S, int nth) {
    if (MN > 32 || S > 32 || MN < 1 || S < 1 || g < 1 || O % g) return -1;
    if (nth < 1) nth = 1;
    if (dtype == 0) bwd_f32(W, D, dK, dW, dD, O, Ig, g, MN, S, nth);
    else if (dtype == 1) bwd_f64(W, D, dK, dW, dD, O, Ig, g, MN, S, nth);
    else return -1;
    return 0;
}
int doconv_abi_version(void) { return 7; }
"""

_lock = threading.Lock()
_lib = None
_lib_tried = False


def _private_ok(path, want_dir):
    """True if path is owned by this user and not writable by group/others (a cached .so
    is code: loading one from a directory others can write to would run their code)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if want_dir and not stat.S_ISDIR(st.st_mode):
        return False
    if not want_dir and not stat.S_ISREG(st.st_mode):
        return False
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return False
    return not (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _cache_dir():
    """Private per-user compile cache, outside the repository.  Returns None if no safe
    directory is available (the caller then uses einsum)."""
    cands = []
    if os.environ.get("DOCONV_CACHE_DIR"):
        cands.append(os.environ["DOCONV_CACHE_DIR"])
    else:
        cands.append(os.path.join(os.environ.get("XDG_CACHE_HOME")
                                  or os.path.join(os.path.expanduser("~"), ".cache"), "doconv-experiments"))
        cands.append(os.path.join(tempfile.gettempdir(), "doconv-experiments-%d" % getattr(os, "getuid", lambda: 0)()))
    for d in cands:
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if _private_ok(d, want_dir=True) and os.access(d, os.W_OK):
            return d
    return None


def _cpu_id():
    # -march=native binaries are CPU specific: key the cache on the CPU model/flags too
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        keep = [l for l in txt.splitlines() if l.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        import platform
        return platform.processor()


def _compile():
    cc = os.environ.get("CC", "cc")
    flag_sets = [["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"], ["-O3", "-ffp-contract=fast", "-fopenmp"],
                 ["-O3", "-march=native", "-ffp-contract=fast"], ["-O2"]]
    d = _cache_dir()
    if d is None:
        warnings.warn("DO-Conv C kernel: no private cache directory; using torch fallback")
        return None
    for flags in flag_sets:
        key = hashlib.sha256((_C_SRC + cc + " ".join(flags) + os.uname().machine + _cpu_id()).encode()).hexdigest()[:16]
        so = os.path.join(d, "doconv_%s.so" % key)
        if not os.path.exists(so):
            cfile = os.path.join(d, "doconv_%s.c" % key)
            with open(cfile, "w") as f:
                f.write(_C_SRC)
            tmp = so + ".tmp%d" % os.getpid()
            try:
                r = subprocess.run([cc, *flags, "-std=gnu99", "-fPIC", "-shared", cfile, "-o", tmp],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
            except (OSError, subprocess.SubprocessError):
                return None  # no compiler at all
            if r.returncode != 0:
                continue
            os.chmod(tmp, 0o700)  # private regardless of umask (checked before loading)
            os.replace(tmp, so)  # atomic: safe with concurrent processes (DDP ranks)
        if not _private_ok(so, want_dir=False):
            warnings.warn("DO-Conv C kernel: %s is not a private regular file; not loading it" % so)
            return None
        try:
            lib = ctypes.CDLL(so)
        except OSError:
            continue
        P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        lib.doconv_fwd.argtypes = [I, P, P, P, L, L, L, L, L, I]
        lib.doconv_bwd.argtypes = [I, P, P, P, P, P, L, L, L, L, L, I]
        lib.doconv_fwd.restype = lib.doconv_bwd.restype = I
        return lib
    return None


def get_lib():
    global _lib, _lib_tried
    if not _lib_tried:
        with _lock:
            if not _lib_tried:
                if os.environ.get("DOCONV_NO_CKERNEL", "0") != "1":
                    try:
                        _lib = _compile()
                    except Exception as e:  # never break training because of the fast path
                        warnings.warn("DO-Conv C kernel unavailable (%r); using torch fallback" % (e,))
                        _lib = None
                _lib_tried = True
    return _lib


_DT = {torch.float32: 0, torch.float64: 1}
# float64 goes through the C kernel too (set DOCONV_CKERNEL_F64=0 to route it to einsum)
_F64_CKERNEL = os.environ.get("DOCONV_CKERNEL_F64", "1") == "1"


def make_d_diag(C_in, MN, S, dtype=torch.float32, device=None):
    eye = torch.eye(MN, dtype=dtype, device=device)
    nb = S // MN
    dd = torch.zeros(MN, S, dtype=dtype, device=device)
    if nb:
        dd[:, :nb * MN] = eye.repeat(1, nb)
    return dd.unsqueeze(0).expand(C_in, MN, S).contiguous()


def compose_einsum(W, D, D_diag, groups, M, N):
    """Reference (autograd) implementation."""
    O, Ig, S = W.shape
    g = groups
    Dg = (D + D_diag).reshape(g, Ig, M * N, S)
    return torch.einsum("gois,gims->goim", W.reshape(g, O // g, Ig, S), Dg).reshape(O, Ig, M, N)


class _ComposeC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W, D, groups, M, N):
        lib = get_lib()
        W = W.contiguous(); D = D.contiguous()
        O, Ig, S = W.shape
        MN = M * N
        K = torch.empty((O, Ig, M, N), dtype=W.dtype)
        rc = lib.doconv_fwd(_DT[W.dtype], W.data_ptr(), D.data_ptr(), K.data_ptr(),
                            O, Ig, groups, MN, S, _nthreads(W.numel()))
        if rc != 0:
            raise RuntimeError("doconv_fwd unsupported sizes")
        ctx.save_for_backward(W, D)
        ctx.groups = groups
        return K

    @staticmethod
    def backward(ctx, dK):
        lib = get_lib()
        W, D = ctx.saved_tensors
        O, Ig, S = W.shape
        dK = dK.contiguous()
        dW = torch.empty_like(W)
        dD = torch.empty_like(D)
        rc = lib.doconv_bwd(_DT[W.dtype], W.data_ptr(), D.data_ptr(), dK.data_ptr(), dW.data_ptr(),
                            dD.data_ptr(), O, Ig, ctx.groups, D.shape[1], S, _nthreads(W.numel()))
        if rc != 0:
            raise RuntimeError("doconv_bwd unsupported sizes")
        return dW, dD, None, None, None


def _nthreads(numel):
    # small problems: one thread (waking OpenMP workers costs more than the work, and on a
    # contended machine a sleeping worker can take a whole scheduler slice to wake)
    return max(1, min(torch.get_num_threads(), numel // 16384))


def compose(W, D, D_diag, groups, M, N):
    """Fast path (C kernel) on CPU float32/float64 when it compiled, else einsum.
    D_diag must be the standard identity-block tensor (it is not read by the C kernel)."""
    if (W.device.type == "cpu" and D.device.type == "cpu" and D.dtype == W.dtype
            and (W.dtype == torch.float32 or (W.dtype == torch.float64 and _F64_CKERNEL))
            and max(M * N, W.shape[-1]) <= 32 and get_lib() is not None):
        return _ComposeC.apply(W, D, groups, M, N)
    return compose_einsum(W, D, D_diag, groups, M, N)
