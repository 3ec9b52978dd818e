/* Training-mode batch norm on CPU, forward and backward, for float32 and float64 tensors in two layouts.
 *
 *   planar: x is (N, C, S) contiguous (NCHW, NCL, NCDHW);  one channel is N runs of S values.
 *   rows:   x is (M, C) contiguous (NHWC, NDHWC, (N, C));  one channel is every C-th value.
 *
 * Statistics are taken of d = x − shift, shift = the mean of the first sample's values of the channel
 * ("shifted data", Chan, Golub & LeVeque 1983), so a large mean does not cancel. Sums are blocked: short
 * runs accumulate in the storage type (vectorized), each run is added to a double per channel.
 *
 * Forward:  delta = E[d], var = max(E[d²] − delta², 0), y = d·γ/σ + (β − delta·γ/σ).
 * Backward: Σdy, Σdy·d, then dx = A·dy + B·d + K with A = γ/σ, B = −A/σ·Σdy·x̂/m, K = −A·Σdy/m − B·delta.
 *
 * Threads: OpenMP, num_threads passed in by the caller (torch.get_num_threads()); over channels in the
 * planar layout, over blocks of rows in the rows layout. Hot loops sit in small functions that GCC clones
 * for AVX2/AVX-512 on x86-64 (picked at load time), so one build runs on any x86-64; elsewhere the
 * compiler's default vectorization applies.
 *
 * Built by bnlab.kernels.cpu with `cc -O3 -fPIC -shared -fopenmp`; no Python or torch headers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#if !defined(HOT) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#if !defined(HOT)
#define HOT
#endif

#define BLOCK 256  /* values per run summed in the storage type before going into a double */
#define ROWS 16    /* rows per run in the rows layout */
#define WIDE 64    /* the rows layout takes rows together up to this many values */

#define DEFINE_KERNELS(T, SUF)                                                                                 \
                                                                                                               \
/* Planar layout, one channel: N runs of S values, run n at p + n·stride. Runs shorter than BLOCK are          \
 * summed lane-wise over ROWS runs at a time (no horizontal sum per short run), longer ones per BLOCK. */      \
/* Σd and Σd², d = p − s. */                                                                                   \
HOT static void plane_sums_##SUF(const T *p, int64_t N, int64_t stride, int64_t S, T s, double *sum_d,         \
                                 double *sum_d2) {                                                             \
    double a = 0, b = 0;                                                                                       \
    if (S < BLOCK) {                                                                                           \
        T la[BLOCK], lb[BLOCK];                                                                                \
        for (int64_t n0 = 0; n0 < N; n0 += ROWS) {                                                             \
            int64_t n1 = n0 + ROWS < N ? n0 + ROWS : N;                                                        \
            for (int64_t i = 0; i < S; i++) { la[i] = 0; lb[i] = 0; }                                          \
            for (int64_t n = n0; n < n1; n++, p += stride) {                                                   \
                _Pragma("omp simd")                                                                            \
                for (int64_t i = 0; i < S; i++) { T d = p[i] - s; la[i] += d; lb[i] += d * d; }                \
            }                                                                                                  \
            T ba = 0, bb = 0;                                                                                  \
            _Pragma("omp simd reduction(+:ba,bb)")                                                             \
            for (int64_t i = 0; i < S; i++) { ba += la[i]; bb += lb[i]; }                                      \
            a += ba; b += bb;                                                                                  \
        }                                                                                                      \
        *sum_d = a; *sum_d2 = b;                                                                               \
        return;                                                                                                \
    }                                                                                                          \
    for (int64_t n = 0; n < N; n++, p += stride)                                                               \
        for (int64_t i0 = 0; i0 < S; i0 += BLOCK) {                                                            \
            int64_t i1 = i0 + BLOCK < S ? i0 + BLOCK : S;                                                      \
            T ba = 0, bb = 0;                                                                                  \
            _Pragma("omp simd reduction(+:ba,bb)")                                                             \
            for (int64_t i = i0; i < i1; i++) { T d = p[i] - s; ba += d; bb += d * d; }                        \
            a += ba; b += bb;                                                                                  \
        }                                                                                                      \
    *sum_d = a; *sum_d2 = b;                                                                                   \
}                                                                                                              \
                                                                                                               \
/* Σdy and Σdy·d. */                                                                                           \
HOT static void plane_grad_sums_##SUF(const T *p, const T *g, int64_t N, int64_t stride, int64_t S, T s,       \
                                      double *sum_g, double *sum_gd) {                                         \
    double a = 0, b = 0;                                                                                       \
    if (S < BLOCK) {                                                                                           \
        T la[BLOCK], lb[BLOCK];                                                                                \
        for (int64_t n0 = 0; n0 < N; n0 += ROWS) {                                                             \
            int64_t n1 = n0 + ROWS < N ? n0 + ROWS : N;                                                        \
            for (int64_t i = 0; i < S; i++) { la[i] = 0; lb[i] = 0; }                                          \
            for (int64_t n = n0; n < n1; n++, p += stride, g += stride) {                                      \
                _Pragma("omp simd")                                                                            \
                for (int64_t i = 0; i < S; i++) { la[i] += g[i]; lb[i] += g[i] * (p[i] - s); }                 \
            }                                                                                                  \
            T ba = 0, bb = 0;                                                                                  \
            _Pragma("omp simd reduction(+:ba,bb)")                                                             \
            for (int64_t i = 0; i < S; i++) { ba += la[i]; bb += lb[i]; }                                      \
            a += ba; b += bb;                                                                                  \
        }                                                                                                      \
        *sum_g = a; *sum_gd = b;                                                                               \
        return;                                                                                                \
    }                                                                                                          \
    for (int64_t n = 0; n < N; n++, p += stride, g += stride)                                                  \
        for (int64_t i0 = 0; i0 < S; i0 += BLOCK) {                                                            \
            int64_t i1 = i0 + BLOCK < S ? i0 + BLOCK : S;                                                      \
            T ba = 0, bb = 0;                                                                                  \
            _Pragma("omp simd reduction(+:ba,bb)")                                                             \
            for (int64_t i = i0; i < i1; i++) { ba += g[i]; bb += g[i] * (p[i] - s); }                         \
            a += ba; b += bb;                                                                                  \
        }                                                                                                      \
    *sum_g = a; *sum_gd = b;                                                                                   \
}                                                                                                              \
                                                                                                               \
/* q = (p − s)·scale + offset. */                                                                              \
HOT static void plane_affine_##SUF(const T *p, T *q, int64_t N, int64_t stride, int64_t S, T s, T scale,       \
                                   T offset) {                                                                 \
    for (int64_t n = 0; n < N; n++, p += stride, q += stride) {                                                \
        _Pragma("omp simd")                                                                                    \
        for (int64_t i = 0; i < S; i++) q[i] = (p[i] - s) * scale + offset;                                    \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* q = a·g + b·(p − s) + k. */                                                                                 \
HOT static void plane_dx_##SUF(const T *p, const T *g, T *q, int64_t N, int64_t stride, int64_t S, T s, T a,   \
                               T b, T k) {                                                                     \
    for (int64_t n = 0; n < N; n++, p += stride, g += stride, q += stride) {                                   \
        _Pragma("omp simd")                                                                                    \
        for (int64_t i = 0; i < S; i++) q[i] = a * g[i] + b * (p[i] - s) + k;                                  \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* Rows layout: per-channel Σd, Σd² (or Σdy, Σdy·d when g != NULL) over rows [r0, r1) of an (M, C) array. */   \
HOT static void rows_sums_##SUF(const T *x, const T *g, int64_t r0, int64_t r1, int64_t C, const T *shift,     \
                                double *sum_a, double *sum_b, T *acc_a, T *acc_b) {                            \
    for (int64_t b0 = r0; b0 < r1; b0 += ROWS) {                                                               \
        int64_t b1 = b0 + ROWS < r1 ? b0 + ROWS : r1;                                                          \
        for (int64_t c = 0; c < C; c++) { acc_a[c] = 0; acc_b[c] = 0; }                                        \
        for (int64_t r = b0; r < b1; r++) {                                                                    \
            const T *xr = x + r * C;                                                                           \
            if (g) {                                                                                           \
                const T *gr = g + r * C;                                                                       \
                _Pragma("omp simd")                                                                            \
                for (int64_t c = 0; c < C; c++) { acc_a[c] += gr[c]; acc_b[c] += gr[c] * (xr[c] - shift[c]); } \
            } else {                                                                                           \
                _Pragma("omp simd")                                                                            \
                for (int64_t c = 0; c < C; c++) { T d = xr[c] - shift[c]; acc_a[c] += d; acc_b[c] += d * d; }  \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t c = 0; c < C; c++) { sum_a[c] += acc_a[c]; sum_b[c] += acc_b[c]; }                        \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* Rows layout: out = coef_a·(x − shift) + coef_k, or + coef_g·g when g != NULL, over rows [r0, r1). */        \
HOT static void rows_affine_##SUF(const T *x, const T *g, T *out, int64_t r0, int64_t r1, int64_t C,           \
                                  const T *shift, const T *coef_d, const T *coef_g, const T *coef_k) {         \
    for (int64_t r = r0; r < r1; r++) {                                                                        \
        const T *xr = x + r * C;                                                                               \
        T *orow = out + r * C;                                                                                 \
        if (g) {                                                                                               \
            const T *gr = g + r * C;                                                                           \
            _Pragma("omp simd")                                                                                \
            for (int64_t c = 0; c < C; c++) orow[c] = coef_g[c] * gr[c] + coef_d[c] * (xr[c] - shift[c]) + coef_k[c]; \
        } else {                                                                                               \
            _Pragma("omp simd")                                                                                \
            for (int64_t c = 0; c < C; c++) orow[c] = (xr[c] - shift[c]) * coef_d[c] + coef_k[c];              \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
                                                                                                               \
/* The per-channel constants of the forward from the sums. */                                                  \
static void fwd_coefs_##SUF(double sd, double sq, double m, const T *weight, const T *bias, int64_t c,         \
                            double eps, T *delta, T *var, T *scale, T *offset) {                               \
    double dl = sd / m, v = sq / m - dl * dl;                                                                  \
    if (v < 0) v = 0;                                                                                          \
    double sc = 1.0 / sqrt(v + eps);                                                                           \
    if (weight) sc *= (double)weight[c];                                                                       \
    *delta = (T)dl; *var = (T)v; *scale = (T)sc;                                                               \
    *offset = (T)((bias ? (double)bias[c] : 0.0) - dl * sc);                                                   \
}                                                                                                              \
                                                                                                               \
/* ... and of the backward: dx = a·dy + b·d + k; returns Σdy·x̂ (dγ), Σdy (dβ). */                             \
static void bwd_coefs_##SUF(double sg, double sgd, double m, const T *weight, int64_t c, T delta, T var,       \
                            double eps, T *a, T *b, T *k, T *dweight, T *dbias) {                              \
    double inv_std = 1.0 / sqrt((double)var + eps);                                                            \
    double sgx = (sgd - (double)delta * sg) * inv_std;                                                         \
    double ca = weight ? (double)weight[c] * inv_std : inv_std;                                                \
    double cb = -ca * inv_std * sgx / m;                                                                       \
    *a = (T)ca; *b = (T)cb; *k = (T)(-ca * sg / m - cb * (double)delta);                                       \
    *dweight = (T)sgx; *dbias = (T)sg;                                                                         \
}                                                                                                              \
                                                                                                               \
int bn_forward_planar_##SUF(const T *x, T *y, const T *weight, const T *bias, T *shift, T *delta, T *var,      \
                            int64_t N, int64_t C, int64_t S, double eps, int threads) {                        \
    double m = (double)N * (double)S;                                                                          \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                          \
    for (int64_t c = 0; c < C; c++) {                                                                          \
        double first = 0;                                                                                      \
        for (int64_t i = 0; i < S; i++) first += x[c * S + i];                                                 \
        T s = (T)(first / (double)S);                                                                          \
        double sd = 0, sq = 0;                                                                                 \
        plane_sums_##SUF(x + c * S, N, C * S, S, s, &sd, &sq);                                                 \
        T scale, offset;                                                                                       \
        fwd_coefs_##SUF(sd, sq, m, weight, bias, c, eps, &delta[c], &var[c], &scale, &offset);                 \
        shift[c] = s;                                                                                          \
        plane_affine_##SUF(x + c * S, y + c * S, N, C * S, S, s, scale, offset);                               \
    }                                                                                                          \
    return 0;                                                                                                  \
}                                                                                                              \
                                                                                                               \
int bn_backward_planar_##SUF(const T *x, const T *dy, T *dx, const T *weight, const T *shift, const T *delta,  \
                             const T *var, T *dweight, T *dbias, int64_t N, int64_t C, int64_t S, double eps,  \
                             int threads) {                                                                    \
    double m = (double)N * (double)S;                                                                          \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                          \
    for (int64_t c = 0; c < C; c++) {                                                                          \
        double sg = 0, sgd = 0;                                                                                \
        plane_grad_sums_##SUF(x + c * S, dy + c * S, N, C * S, S, shift[c], &sg, &sgd);                        \
        T a, b, k;                                                                                             \
        bwd_coefs_##SUF(sg, sgd, m, weight, c, delta[c], var[c], eps, &a, &b, &k, &dweight[c], &dbias[c]);     \
        if (dx) plane_dx_##SUF(x + c * S, dy + c * S, dx + c * S, N, C * S, S, shift[c], a, b, k);             \
    }                                                                                                          \
    return 0;                                                                                                  \
}                                                                                                              \
                                                                                                               \
/* Rows layout, both directions: per-thread partial sums over blocks of rows, one reduction, then the          \
 * elementwise pass over the same rows. With few channels, K consecutive rows are taken as one row of          \
 * W = K·C values against K copies of the per-channel vectors, so the inner loops stay long; the M mod K       \
 * rows left over run at width C. S rows make up the first sample (the shift). Returns −1 when out of memory. */ \
static int rows_pass_##SUF(const T *x, const T *g, T *out, const T *weight, const T *bias, T *shift,           \
                           T *delta, T *var, T *dweight, T *dbias, int64_t M, int64_t C, int64_t S,            \
                           double eps, int threads) {                                                          \
    double m = (double)M;                                                                                      \
    int64_t K = C < WIDE ? WIDE / C : 1, W = K * C, wide_rows = M / K, tail = wide_rows * K;                   \
    int64_t L = (W + 15) / 16 * 16;       /* per-thread stride in whole cache lines: threads share none */     \
    double *partial = aligned_alloc(64, (size_t)(2 * threads * L) * sizeof(double));                           \
    /* the shift ×K, then per thread three coefficients ×K: every thread derives them from the partial sums    \
     * itself (same order, same values), which saves a second barrier */                                       \
    T *vecs = aligned_alloc(64, (size_t)(L + 3 * threads * L) * sizeof(T));                                    \
    T *accs = aligned_alloc(64, (size_t)(2 * threads * L) * sizeof(T));                                        \
    if (!partial || !vecs || !accs) { free(partial); free(vecs); free(accs); return -1; }                      \
    for (int64_t j = 0; j < 2 * threads * L; j++) partial[j] = 0;                                              \
    if (!g) {                                                                                                  \
        for (int64_t r = 0; r < S; r++) for (int64_t c = 0; c < C; c++) partial[c] += x[r * C + c];            \
        for (int64_t c = 0; c < C; c++) { shift[c] = (T)(partial[c] / (double)S); partial[c] = 0; }            \
    }                                                                                                          \
    T *shift_w = vecs;                                                                                         \
    for (int64_t j = 0; j < W; j++) shift_w[j] = shift[j % C];                                                 \
    _Pragma("omp parallel num_threads(threads)")                                                               \
    {                                                                                                          \
        int t = omp_get_thread_num(), nt = omp_get_num_threads();                                              \
        int64_t r0 = wide_rows * t / nt, r1 = wide_rows * (t + 1) / nt;                                        \
        double *sum_a = partial + 2 * t * L, *sum_b = partial + (2 * t + 1) * L;                               \
        T *acc_a = accs + 2 * t * L, *acc_b = accs + (2 * t + 1) * L;                                          \
        rows_sums_##SUF(x, g, r0, r1, W, shift_w, sum_a, sum_b, acc_a, acc_b);                                 \
        if (t == nt - 1) rows_sums_##SUF(x, g, tail, M, C, shift_w, sum_a, sum_b, acc_a, acc_b);               \
        _Pragma("omp barrier")                                                                                 \
        T *coefs = vecs + L + 3 * t * L;                      /* [a (W) | b (W) | k (W)], this thread's */     \
        {                                                                                                      \
            for (int64_t c = 0; c < C; c++) {                                                                  \
                T out_a, out_b;                                   /* δ, σ² or dγ, dβ: thread 0 stores them */  \
                double sa = 0, sb = 0;                                                                         \
                for (int u = 0; u < threads; u++)                                                              \
                    for (int64_t j = c; j < W; j += C) { sa += partial[2 * u * L + j]; sb += partial[(2 * u + 1) * L + j]; } \
                if (g) {                                                                                       \
                    bwd_coefs_##SUF(sa, sb, m, weight, c, delta[c], var[c], eps, &coefs[c], &coefs[W + c],     \
                                    &coefs[2 * W + c], &out_a, &out_b);                                        \
                    if (t == 0) { dweight[c] = out_a; dbias[c] = out_b; }                                      \
                } else {                                                                                       \
                    fwd_coefs_##SUF(sa, sb, m, weight, bias, c, eps, &out_a, &out_b, &coefs[c], &coefs[2 * W + c]); \
                    if (t == 0) { delta[c] = out_a; var[c] = out_b; }                                          \
                }                                                                                              \
            }                                                                                                  \
            for (int64_t j = C; j < W; j++)                                                                    \
                for (int v = 0; v < 3; v++) coefs[v * W + j] = coefs[v * W + j % C];                           \
        }                                                                                                      \
        if (out) {                                                                                             \
            const T *cd = g ? coefs + W : coefs, *cg = g ? coefs : NULL, *ck = coefs + 2 * W;                  \
            rows_affine_##SUF(x, g, out, r0, r1, W, shift_w, cd, cg, ck);                                      \
            if (t == nt - 1) rows_affine_##SUF(x, g, out, tail, M, C, shift_w, cd, cg, ck);                    \
        }                                                                                                      \
    }                                                                                                          \
    free(partial); free(vecs); free(accs);                                                                     \
    return 0;                                                                                                  \
}                                                                                                              \
                                                                                                               \
int bn_forward_rows_##SUF(const T *x, T *y, const T *weight, const T *bias, T *shift, T *delta, T *var,        \
                          int64_t M, int64_t C, int64_t S, double eps, int threads) {                          \
    return rows_pass_##SUF(x, NULL, y, weight, bias, shift, delta, var, NULL, NULL, M, C, S, eps, threads);    \
}                                                                                                              \
                                                                                                               \
int bn_backward_rows_##SUF(const T *x, const T *dy, T *dx, const T *weight, const T *shift, const T *delta,    \
                           const T *var, T *dweight, T *dbias, int64_t M, int64_t C, double eps, int threads) { \
    return rows_pass_##SUF(x, dy, dx, weight, NULL, (T *)shift, (T *)delta, (T *)var, dweight, dbias, M, C, 1, \
                           eps, threads);                                                                      \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
