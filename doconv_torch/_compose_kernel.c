/* DO-Conv kernel composition: K[o,i,:] = (D+Ddiag)[c] @ W[o,i,:],  c = (o/Og)*Ig + i
   W (O, Ig, S), D (Cin, MN, S), K (O, Ig, MN), all contiguous; Ddiag = floor(S/MN) identity
   blocks along s (added on the fly, never read).  Work is split into tiles of up to CB input
   channels of one group; the tile's padded D' stays in L1 while all Og output rows of the group
   stream through (CB*S contiguous elements per row).  Tiles own disjoint c => dD is written
   without races or reductions.  OpenMP over tiles.  GCC/Clang vector extensions (portable,
   lowered to AVX-512/AVX2/SSE/NEON by the compiler).  MN, S up to 32 (f32/f64).
   The tile functions are always_inline and the OpenMP loop lives in per-size wrappers, so
   common sizes (MN = 9 with S = 9, 12, 16; MN = S = 3 and 27, the 1-D and 3-D kernels of
   size 3) get compile-time constant trip counts. */
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

/* output rows per block: a block's rows of W, K (dK, dW) for the tile's channels stay in L1/L2
   while the tile's channels are visited one at a time with that channel's D' in registers */
#ifndef OB
#define OB 16
#endif

/* Cold caches (inside a training step the convolution has evicted W, K, dK, dW) make the
   composition memory-bound, and a tile's row segments (CB*S elements every Ig*S) defeat the
   hardware prefetchers: while a block's first channel is visited, prefetch the next block's
   row segments. */
/* output rows composed together: independent accumulator chains keep the FMA units busy */
#ifndef RU
#define RU 4
#endif

#ifndef PREFETCH
#define PREFETCH 1
#endif
#ifndef PFD
#define PFD OB /* rows ahead: the next block's */
#endif
#define PREFETCH_SEGMENT(ptr, bytes, rw)                                                    \
    do { if (PREFETCH) { const char* p_ = (const char*)(ptr);                               \
        for (long b_ = 0; b_ < (long)(bytes); b_ += 64) __builtin_prefetch(p_ + b_, rw, 3); } \
    } while (0)

/* K (forward) and dW (backward) are written once and read only by the next operation: on x86
   they are written with non-temporal stores from a block buffer in L1, so their cache lines
   are not first read from memory (write-allocate), a third of the composition's traffic. */
#ifndef NTSTORE
#if defined(__SSE2__)
#define NTSTORE 1
#else
#define NTSTORE 0
#endif
#endif
/* outputs smaller than this stay in cache for the convolution that reads them next */
#ifndef NT_MIN_BYTES
#define NT_MIN_BYTES (2L << 20)
#endif
#if NTSTORE
#include <immintrin.h>
#if defined(__AVX512F__)
#define NT_BYTES 64
#define NT_COPY(d, s) _mm512_stream_si512((__m512i*)(d), _mm512_loadu_si512((const void*)(s)))
#elif defined(__AVX__)
#define NT_BYTES 32
#define NT_COPY(d, s) _mm256_stream_si256((__m256i*)(d), _mm256_loadu_si256((const __m256i*)(s)))
#else
#define NT_BYTES 16
#define NT_COPY(d, s) _mm_stream_si128((__m128i*)(d), _mm_loadu_si128((const __m128i*)(s)))
#endif
/* copy n bytes: ordinary stores up to the first NT_BYTES boundary and after the last */
static inline void stream_copy(void* dst, const void* src, long n) {
    char* d = (char*)dst; const char* s = (const char*)src;
    long head = (long)((NT_BYTES - ((unsigned long)d % NT_BYTES)) % NT_BYTES);
    if (head > n) head = n;
    memcpy(d, s, head); d += head; s += head; n -= head;
    for (; n >= NT_BYTES; n -= NT_BYTES, d += NT_BYTES, s += NT_BYTES) NT_COPY(d, s);
    memcpy(d, s, n);
}
#define STREAM_FENCE() _mm_sfence() /* non-temporal stores are weakly ordered */
#else
static inline void stream_copy(void* dst, const void* src, long n) { memcpy(dst, src, n); }
#define STREAM_FENCE() do { } while (0)
#endif

#define DEFINE_TILES(T, SUF, PAD)                                                           \
typedef T vb_##SUF##_##PAD __attribute__((vector_size(VBYTES)));                            \
typedef T ub_##SUF##_##PAD __attribute__((vector_size(VBYTES), aligned(sizeof(T)), may_alias)); \
/* R consecutive output rows of channel j: R independent accumulator chains (one chain's   \
   S dependent FMAs alone leave the FMA units idle for their latency) */                    \
static inline __attribute__((always_inline)) void                                           \
fwd_rows_##SUF##_##PAD(const int R, long o, long oend, long j, const T* restrict W,         \
        T* restrict K, T* restrict out, long ld, const int nt,                              \
        const vb_##SUF##_##PAD (*d)[PAD / (VBYTES / sizeof(T))], long Ig,                   \
        long i0, long nc, const long MN, const long S) {                                    \
    typedef vb_##SUF##_##PAD V; enum { VL = VBYTES / sizeof(T), NV = PAD / VL };            \
    if (j == 0)                                                                             \
        for (int r = 0; r < R; ++r) if (o + r + PFD < oend) {                               \
            PREFETCH_SEGMENT(W + ((o + r + PFD) * Ig + i0) * S, nc * S * sizeof(T), 0);     \
            if (!nt)                                                                        \
                PREFETCH_SEGMENT(K + ((o + r + PFD) * Ig + i0) * MN, nc * MN * sizeof(T), 1); \
        }                                                                                   \
    V acc[R][NV];                                                                           \
    for (int r = 0; r < R; ++r) for (int v = 0; v < NV; ++v) acc[r][v] = (V){0};            \
    for (long s = 0; s < S; ++s)                                                            \
        for (int r = 0; r < R; ++r) { T ws = W[((o + r) * Ig + i0 + j) * S + s];           \
            for (int v = 0; v < NV; ++v) acc[r][v] += ws * d[s][v]; }                       \
    for (int r = 0; r < R; ++r)                                                             \
        memcpy(out + r * ld + j * MN, acc[r], MN * sizeof(T));                              \
}                                                                                           \
static inline __attribute__((always_inline)) void                                           \
fwd_tile_##SUF##_##PAD(long t, const T* restrict W, const T* restrict D, T* restrict K,     \
        long O, long Ig, long g, const long MN, const long S, const int nt) {               \
    typedef vb_##SUF##_##PAD V; enum { CB = CB_(T), VL = VBYTES / sizeof(T), NV = PAD / VL }; \
    long Og = O / g, nIB = (Ig + CB - 1) / CB, nb = S / MN;                                 \
    V DT[CB][PAD][NV]; /* DT[j][s][m] = D'[c0+j][m][s] */                                   \
    T Kb[NTSTORE ? OB : 1][NTSTORE ? CB * PAD : 1]; /* the block's K rows, streamed out */  \
    long grp = t / nIB, i0 = (t % nIB) * CB, nc = Ig - i0 < CB ? Ig - i0 : CB;              \
    long oend = (grp + 1) * Og;                                                             \
    for (long j = 0; j < nc; ++j) {                                                         \
        const T* Dc = D + (grp * Ig + i0 + j) * MN * S;                                     \
        for (long s = 0; s < S; ++s) {                                                      \
            T v[PAD] = {0};                                                                 \
            for (long m = 0; m < MN; ++m)                                                   \
                v[m] = Dc[m * S + s] + ((s % MN == m && s < nb * MN) ? (T)1 : (T)0);        \
            memcpy(DT[j][s], v, sizeof(v));                                                 \
        }                                                                                   \
    }                                                                                       \
    for (long ob = grp * Og; ob < oend; ob += OB) {                                         \
        long oe = ob + OB < oend ? ob + OB : oend;                                          \
        for (long j = 0; j < nc; ++j) {                                                     \
            V d[PAD][NV]; /* this channel's D', held in registers for the block's rows */   \
            for (long s = 0; s < S; ++s)                                                    \
                for (int v = 0; v < NV; ++v) d[s][v] = DT[j][s][v];                         \
            long o = ob, ld = nt ? CB * PAD : Ig * MN;                                      \
            T* out = nt ? &Kb[0][0] : K + (ob * Ig + i0) * MN;                              \
            for (; o + RU <= oe; o += RU)                                                   \
                fwd_rows_##SUF##_##PAD(RU, o, oend, j, W, K, out + (o - ob) * ld, ld, nt,   \
                                       d, Ig, i0, nc, MN, S);                               \
            for (; o < oe; ++o)                                                             \
                fwd_rows_##SUF##_##PAD(1, o, oend, j, W, K, out + (o - ob) * ld, ld, nt,    \
                                       d, Ig, i0, nc, MN, S);                               \
        }                                                                                   \
        if (nt)                                                                             \
            for (long o = ob; o < oe; ++o)                                                  \
                stream_copy(K + (o * Ig + i0) * MN, Kb[o - ob], nc * MN * sizeof(T));       \
    }                                                                                       \
    if (nt) STREAM_FENCE();                                                                 \
}                                                                                           \
/* R consecutive output rows of channel j: dW's R rows are independent chains; dD's        \
   accumulator a (MN chains) takes each row in turn */                                      \
static inline __attribute__((always_inline)) void                                           \
bwd_rows_##SUF##_##PAD(const int R, long o, long oend, long j, const T* restrict W,         \
        const T* Wend, const T* restrict dK, T* restrict dW, T* restrict out, long ld,      \
        const int nt,                                                                       \
        const vb_##SUF##_##PAD (*dp)[PAD / (VBYTES / sizeof(T))],                           \
        vb_##SUF##_##PAD (*a)[PAD / (VBYTES / sizeof(T))], long Ig, long i0, long nc,       \
        const long MN, const long S) {                                                      \
    typedef vb_##SUF##_##PAD V; enum { VL = VBYTES / sizeof(T), NV = PAD / VL };            \
    if (j == 0)                                                                             \
        for (int r = 0; r < R; ++r) if (o + r + PFD < oend) {                               \
            long next = (o + r + PFD) * Ig + i0;                                            \
            PREFETCH_SEGMENT(W + next * S, nc * S * sizeof(T), 0);                          \
            PREFETCH_SEGMENT(dK + next * MN, nc * MN * sizeof(T), 0);                       \
            if (!nt) PREFETCH_SEGMENT(dW + next * S, nc * S * sizeof(T), 1);           \
        }                                                                                   \
    V wv[R][NV], gw[R][NV];                                                                 \
    for (int r = 0; r < R; ++r) {                                                           \
        const T* restrict w = W + ((o + r) * Ig + i0 + j) * S;                              \
        /* full-width unaligned loads (lanes >= S read the next row and are never stored); \
           the last rows of W take the exact-size copy instead */                           \
        if (w + PAD <= Wend) {                                                              \
            for (int q = 0; q < NV; ++q) wv[r][q] = *(const ub_##SUF##_##PAD*)(w + q * VL); \
        } else {                                                                            \
            for (int q = 0; q < NV; ++q) wv[r][q] = (V){0};                                 \
            memcpy(wv[r], w, S * sizeof(T));                                                \
        }                                                                                   \
        for (int q = 0; q < NV; ++q) gw[r][q] = (V){0};                                     \
    }                                                                                       \
    for (long m = 0; m < MN; ++m)                                                           \
        for (int r = 0; r < R; ++r) { T gm = dK[((o + r) * Ig + i0 + j) * MN + m];         \
            for (int q = 0; q < NV; ++q) {                                                  \
                gw[r][q] += gm * dp[m][q]; a[m][q] += gm * wv[r][q]; } }                    \
    for (int r = 0; r < R; ++r)                                                             \
        memcpy(out + r * ld + j * S, gw[r], S * sizeof(T));                                 \
}                                                                                           \
static inline __attribute__((always_inline)) void                                           \
bwd_tile_##SUF##_##PAD(long t, const T* restrict W, const T* restrict D,                    \
        const T* restrict dK, T* restrict dW, T* restrict dD,                               \
        long O, long Ig, long g, const long MN, const long S, const int nt) {               \
    typedef vb_##SUF##_##PAD V; enum { CB = CB_(T), VL = VBYTES / sizeof(T), NV = PAD / VL }; \
    long Og = O / g, nIB = (Ig + CB - 1) / CB, nb = S / MN;                                 \
    V Dp[CB][PAD][NV], acc[CB][PAD][NV]; /* [j][m][s] */                                    \
    T dWb[NTSTORE ? OB : 1][NTSTORE ? CB * PAD : 1]; /* the block's dW rows, streamed out */ \
    const T* Wend = W + O * Ig * S;                                                         \
    long grp = t / nIB, i0 = (t % nIB) * CB, nc = Ig - i0 < CB ? Ig - i0 : CB;              \
    long oend = (grp + 1) * Og;                                                             \
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
    for (long ob = grp * Og; ob < oend; ob += OB) {                                         \
        long oe = ob + OB < oend ? ob + OB : oend;                                          \
        for (long j = 0; j < nc; ++j) {                                                     \
            V dp[PAD][NV], a[PAD][NV]; /* D' and the dD accumulator, in registers */        \
            for (long m = 0; m < MN; ++m)                                                   \
                for (int q = 0; q < NV; ++q) { dp[m][q] = Dp[j][m][q]; a[m][q] = acc[j][m][q]; } \
            long o = ob, ld = nt ? CB * PAD : Ig * S;                                       \
            T* out = nt ? &dWb[0][0] : dW + (ob * Ig + i0) * S;                             \
            for (; o + RU <= oe; o += RU)                                                   \
                bwd_rows_##SUF##_##PAD(RU, o, oend, j, W, Wend, dK, dW, out + (o - ob) * ld, \
                                       ld, nt, dp, a, Ig, i0, nc, MN, S);                   \
            for (; o < oe; ++o)                                                             \
                bwd_rows_##SUF##_##PAD(1, o, oend, j, W, Wend, dK, dW, out + (o - ob) * ld,  \
                                       ld, nt, dp, a, Ig, i0, nc, MN, S);                   \
            for (long m = 0; m < MN; ++m)                                                   \
                for (int q = 0; q < NV; ++q) acc[j][m][q] = a[m][q];                        \
        }                                                                                   \
        if (nt)                                                                             \
            for (long o = ob; o < oe; ++o)                                                  \
                stream_copy(dW + (o * Ig + i0) * S, dWb[o - ob], nc * S * sizeof(T));       \
    }                                                                                       \
    if (nt) STREAM_FENCE();                                                                 \
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
    const int nt = NTSTORE && O * Ig * MN * (long)sizeof(T) >= NT_MIN_BYTES;                \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nth)")                       \
    for (long t = 0; t < ntiles; ++t)                                                       \
        fwd_tile_##SUF##_##PAD(t, W, D, K, O, Ig, g, MNV, SV, nt);                          \
}                                                                                           \
static void bwd_##SUF##_##NAME(const T* W, const T* D, const T* dK, T* dW, T* dD,           \
                               long O, long Ig, long g, long MN, long S, int nth) {         \
    long ntiles = g * ((Ig + CB_(T) - 1) / CB_(T)); (void)MN; (void)S;                      \
    const int nt = NTSTORE && O * Ig * S * (long)sizeof(T) >= NT_MIN_BYTES;                 \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nth)")                       \
    for (long t = 0; t < ntiles; ++t)                                                       \
        bwd_tile_##SUF##_##PAD(t, W, D, dK, dW, dD, O, Ig, g, MNV, SV, nt);                 \
}

#define DEFINE_ALL(T, SUF)                                                                  \
DEFINE_TILES(T, SUF, 16)                                                                    \
DEFINE_TILES(T, SUF, 32)                                                                    \
DEFINE_DRIVER(T, SUF, 16, 9_9, 9, 9)                                                        \
DEFINE_DRIVER(T, SUF, 16, 9_12, 9, 12)                                                      \
DEFINE_DRIVER(T, SUF, 16, 9_16, 9, 16)                                                      \
DEFINE_DRIVER(T, SUF, 16, 3_3, 3, 3)                                                        \
DEFINE_DRIVER(T, SUF, 32, 27_27, 27, 27)                                                    \
DEFINE_DRIVER(T, SUF, 16, gen16, MN, S)                                                     \
DEFINE_DRIVER(T, SUF, 32, gen32, MN, S)                                                     \
static void fwd_##SUF(const T* W, const T* D, T* K, long O, long Ig, long g, long MN, long S, int nth) { \
    if (MN == 9 && S == 9) fwd_##SUF##_9_9(W, D, K, O, Ig, g, MN, S, nth);                 \
    else if (MN == 9 && S == 12) fwd_##SUF##_9_12(W, D, K, O, Ig, g, MN, S, nth);          \
    else if (MN == 9 && S == 16) fwd_##SUF##_9_16(W, D, K, O, Ig, g, MN, S, nth);          \
    else if (MN == 3 && S == 3) fwd_##SUF##_3_3(W, D, K, O, Ig, g, MN, S, nth);            \
    else if (MN == 27 && S == 27) fwd_##SUF##_27_27(W, D, K, O, Ig, g, MN, S, nth);        \
    else if (MN <= 16 && S <= 16) fwd_##SUF##_gen16(W, D, K, O, Ig, g, MN, S, nth);        \
    else fwd_##SUF##_gen32(W, D, K, O, Ig, g, MN, S, nth);                                 \
}                                                                                           \
static void bwd_##SUF(const T* W, const T* D, const T* dK, T* dW, T* dD, long O, long Ig, long g, long MN, long S, int nth) { \
    if (MN == 9 && S == 9) bwd_##SUF##_9_9(W, D, dK, dW, dD, O, Ig, g, MN, S, nth);        \
    else if (MN == 9 && S == 12) bwd_##SUF##_9_12(W, D, dK, dW, dD, O, Ig, g, MN, S, nth); \
    else if (MN == 9 && S == 16) bwd_##SUF##_9_16(W, D, dK, dW, dD, O, Ig, g, MN, S, nth); \
    else if (MN == 3 && S == 3) bwd_##SUF##_3_3(W, D, dK, dW, dD, O, Ig, g, MN, S, nth);   \
    else if (MN == 27 && S == 27) bwd_##SUF##_27_27(W, D, dK, dW, dD, O, Ig, g, MN, S, nth); \
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
int doconv_abi_version(void) { return 8; }
