/*
 * lowbit.formats.gguf._kernels: compiled row quantizers for ggml's legacy types (Q4_0, Q4_1, Q5_0,
 * Q5_1, Q8_0) and k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), with and without an importance vector,
 * and the row dequantizers of the same types (ggml's to_float, for requantizing a GGUF file).
 *
 * Why C: the numpy codecs in legacy.py / kquants.py / search.py are the specification (vectorized,
 * bit-exact with ggml, and the reference the tests compare this module against), but they make many
 * passes over each tensor and hold the GIL between numpy calls, so they run at about half of
 * llama-quantize's speed on one core and do not scale to two. No library quantizes these types
 * without llama.cpp itself (which lowbit must not depend on), so the scalar loops are written here.
 * They evaluate every float expression in the same order, in float32, as the numpy code (and ggml);
 * the module is compiled with -ffp-contract=off so that no multiply-add is fused. The GIL is released
 * while a piece of rows is quantized, so the exporter's thread pool runs pieces in parallel.
 *
 * Python API: quantize(ggml_type: int, x, rows: int, n_per_row: int, imatrix | None, out) -> bool.
 * x: C-contiguous float32 (rows*n_per_row), imatrix: float32 (n_per_row) or None, out: writable
 * bytes (rows * row_bytes). Returns False, with out incomplete, if x holds a NaN or an infinity
 * (each row is checked just before it is quantized, while it is in cache); ValueError for a type
 * this module does not handle or buffers of the wrong size.
 *
 * dequantize(ggml_type: int, data, rows: int, n_per_row: int, out) -> None. data: C-contiguous bytes
 * (rows * row_bytes), out: writable float32 (rows*n_per_row); bit-exact with gguf-py's numpy
 * dequantize for every byte pattern (NaN payloads included), GIL released; ValueError as above.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 32
#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

enum {
    T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
};

/* ----------------------------------------------------------------------------------- primitives */

/* ggml's nearest_int: round half to even through the float adder (exact for |v| <= 4194303; beyond
 * it, the same wrapped value as ggml). */
static inline int nearest_int(float v) {
    float s = v + 12582912.f;
    int32_t i;
    memcpy(&i, &s, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* C's (int) of a float as x86-64 computes it (cvttss2si): toward zero, INT32_MIN when out of range
 * or NaN. Written out so that the degenerate cases are defined behaviour here. */
static inline int32_t trunc_int(float v) {
    if (v > -2147483904.f && v < 2147483648.f) return (int32_t)v;
    return INT32_MIN;
}

static inline float inv_or_zero(float d) { return d != 0.f ? 1.0f / d : 0.0f; }

/* float32 -> IEEE half, round to nearest even, overflow to inf, subnormals kept (as ggml's
 * GGML_FP32_TO_FP16 and numpy's cast). */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    uint32_t h;
    if (x >= 0x47800000u) {                    /* >= 65536, inf or NaN */
        h = x > 0x7f800000u ? (0x7e00u | ((x >> 13) & 0x3ffu)) : 0x7c00u;
    } else if (x < 0x38800000u) {              /* below the smallest normal half: 2^-14 */
        float a;
        memcpy(&a, &x, 4);
        a += 0.5f;                             /* the adder rounds to a multiple of 2^-24 */
        uint32_t r;
        memcpy(&r, &a, 4);
        h = r - 0x3f000000u;
    } else {
        uint32_t odd = (x >> 13) & 1u;
        x += 0xc8000fffu + odd;                /* rebias the exponent (-112 << 23) and round */
        h = x >> 13;
    }
    return (uint16_t)(h | sign);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-08f; /* m * 2^-24, exact */
        return sign ? -f : f;
    }
    bits = sign | (e == 31 ? (0x7f800000u | (m << 13)) : (((e + 112u) << 23) | (m << 13)));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float fp16_round(float v) { return f16_to_f32(f32_to_f16(v)); }

static inline void put_f16(uint8_t *p, float v) {
    uint16_t h = f32_to_f16(v);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* ------------------------------------------------------------------------------- scale searches */

/* make_q3_quants(n, nmax, x, L, do_rmse=true): x*x-weighted coordinate descent. L = l + nmax. */
static float make_q3_quants(int n, int nmax, const float *x, uint8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)(-nmax) / max;
    int Ls[QK_K];
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
        Ls[i] = l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * Ls[i];
            if (slx > 0) {
                float sl2 = suml2 - w * Ls[i] * Ls[i];
                int new_l = imax(-nmax, imin(nmax - 1, nearest_int(x[i] * sl2 / slx)));
                if (new_l != Ls[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        Ls[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)(Ls[i] + nmax);
    return suml2 > 0 ? sumlx / suml2 : 0.0f;
}

/* make_qp_quants(n, nmax, x, L, quant_weights): non-negative scales of the sub-blocks. */
static float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = max > x[i] ? max : x[i];
    if (max < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = imin(nmax, nearest_int(iscale_is * x[i]));
            float diff = x[i] - scale_is * l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = imin(nmax, nearest_int(iscale * x[i]));
        L[i] = (uint8_t)l;
        float w = qw[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            float w = qw[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = imin(nmax, nearest_int(x[i] * sl2 / slx));
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    return suml2 > 0 ? sumlx / suml2 : 0.0f;
}

/* --------------------------------------------------------------- the same searches, 8 at a time
 *
 * The searches above are chains of dependent float additions (ggml's summation order), so one
 * search keeps the adder's latency, not its throughput, busy. The hot ones (make_qkx_quants for
 * Q2_K/Q4_K/Q5_K/Q4_1/Q5_1, make_qx_quants for Q6_K/Q3_K/Q4_0/Q5_0 with weights) are also written
 * for LANES independent (sub-)blocks at once: arrays [i][k] hold element i of block k, each lane
 * runs exactly the scalar function's operations in its order (a lane's sums are still sequential in
 * i), and the compiler vectorizes across lanes. Branches become per-lane selects; a lane whose block
 * takes an early exit in the scalar code computes garbage that is replaced at the end. */
#define LANES 8

static inline float clampf_code(float v, int lo, int hi) {
    return (float)imax(lo, imin(hi, nearest_int(v)));
}

/* make_qkx_quants on LANES blocks: x, w [n][LANES]; L [n][LANES] (codes as floats). */
static void make_qkx_quants_x8(int n, int nmax, const float *x, const float *w, float *L,
                               float *scale_out, float *the_min_out, float rmin, float rdelta,
                               int nstep, int use_mad, int version) {
    float mn[LANES], mx[LANES], sum_w[LANES], sum_x[LANES], mn0[LANES], span[LANES];
    float scale[LANES], best[LANES], iscale[LANES];
    int deg[LANES];
    float La[32 * LANES];
    for (int k = 0; k < LANES; ++k) {
        mn[k] = mx[k] = x[k];
        sum_w[k] = w[k];
        sum_x[k] = sum_w[k] * x[k];
    }
    for (int i = 1; i < n; ++i) {
        const float *xi = x + LANES * i, *wi = w + LANES * i;
        for (int k = 0; k < LANES; ++k) {
            mn[k] = xi[k] < mn[k] ? xi[k] : mn[k];
            mx[k] = xi[k] > mx[k] ? xi[k] : mx[k];
            sum_w[k] += wi[k];
            sum_x[k] += wi[k] * xi[k];
        }
    }
    for (int k = 0; k < LANES; ++k) {
        if (mn[k] > 0) mn[k] = 0;
        mn0[k] = mn[k];
        deg[k] = version == 3 ? mx[k] <= mn[k] : mx[k] == mn[k];
        span[k] = deg[k] ? 1.f : mx[k] - mn[k];
        iscale[k] = (float)nmax / span[k];
        scale[k] = 1 / iscale[k];
        best[k] = 0;
    }
    for (int i = 0; i < n; ++i) {
        const float *xi = x + LANES * i, *wi = w + LANES * i;
        float *Li = L + LANES * i;
        for (int k = 0; k < LANES; ++k) {
            float l = clampf_code(iscale[k] * (xi[k] - mn[k]), 0, nmax);
            Li[k] = l;
            float diff = scale[k] * l + mn[k] - xi[k];
            diff = use_mad ? fabsf(diff) : diff * diff;
            best[k] += wi[k] * diff;
        }
    }
    for (int is = 0; is <= nstep; ++is) {
        float sum_l[LANES] = {0}, sum_l2[LANES] = {0}, sum_xl[LANES] = {0}, err[LANES] = {0};
        float ts[LANES], tm[LANES];
        for (int k = 0; k < LANES; ++k) /* max - min: the running min, as in ggml */
            iscale[k] = (rmin + rdelta * is + nmax) / (deg[k] ? 1.f : mx[k] - mn[k]);
        for (int i = 0; i < n; ++i) {
            const float *xi = x + LANES * i, *wi = w + LANES * i;
            float *Lai = La + LANES * i;
            for (int k = 0; k < LANES; ++k) {
                float l = clampf_code(iscale[k] * (xi[k] - mn[k]), 0, nmax);
                Lai[k] = l;
                float wl = wi[k] * l;
                sum_l[k] += wl;
                sum_l2[k] += wl * l;
                sum_xl[k] += wl * xi[k];
            }
        }
        for (int k = 0; k < LANES; ++k) {
            float D = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
            float this_scale = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / D;
            float this_min = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl[k] / sum_l2[k];
            }
            ts[k] = this_scale;
            tm[k] = this_min;
            sum_l[k] = D; /* kept for the test below */
        }
        for (int i = 0; i < n; ++i) {
            const float *xi = x + LANES * i, *wi = w + LANES * i, *Lai = La + LANES * i;
            for (int k = 0; k < LANES; ++k) {
                float diff = ts[k] * Lai[k] + tm[k] - xi[k];
                diff = use_mad ? fabsf(diff) : diff * diff;
                err[k] += wi[k] * diff;
            }
        }
        int better[LANES], any = 0;
        for (int k = 0; k < LANES; ++k) {
            better[k] = sum_l[k] > 0 && err[k] < best[k];
            any |= better[k];
            if (better[k]) {
                best[k] = err[k];
                scale[k] = ts[k];
                mn[k] = tm[k];
            }
        }
        if (any)
            for (int i = 0; i < n; ++i)
                for (int k = 0; k < LANES; ++k)
                    if (better[k]) L[LANES * i + k] = La[LANES * i + k];
    }
    for (int k = 0; k < LANES; ++k) {
        if (deg[k]) {
            scale[k] = 0.f;
            mn[k] = mn0[k];
            for (int i = 0; i < n; ++i) L[LANES * i + k] = 0.f;
        }
        scale_out[k] = scale[k];
        the_min_out[k] = -mn[k];
    }
}

/* make_qx_quants' sums for one candidate inverse scale per lane: sumlx += w*x*l, suml2 += w*l*l. */
static inline void qx_sums_x8(int n, int nmax, const float *x, const float *w, const float *wx,
                              const float *iscale, float *sumlx, float *suml2) {
    for (int k = 0; k < LANES; ++k) sumlx[k] = suml2[k] = 0;
    for (int i = 0; i < n; ++i) {
        const float *xi = x + LANES * i;
        for (int k = 0; k < LANES; ++k) {
            float l = clampf_code(iscale[k] * xi[k], -nmax, nmax - 1);
            sumlx[k] += wx[LANES * i + k] * l;
            suml2[k] += w[LANES * i + k] * l * l;
        }
    }
}

/* make_qx_quants (rmse_type 1) on LANES blocks: x, qw (or NULL: x*x) [n][LANES]; L = l + nmax. */
static void make_qx_quants_x8(int n, int nmax, const float *x, const float *qw, float *L,
                              float *scale_out) {
    float amax[LANES] = {0}, mx[LANES] = {0}, sumlx[LANES], suml2[LANES], scale[LANES], best[LANES];
    float best_is[LANES], iscale[LANES];
    float w[32 * LANES], wx[32 * LANES];
    for (int i = 0; i < n; ++i) {
        const float *xi = x + LANES * i;
        for (int k = 0; k < LANES; ++k) {
            float ax = fabsf(xi[k]);
            int take = ax > amax[k];
            amax[k] = take ? ax : amax[k];
            mx[k] = take ? xi[k] : mx[k];
            float wi = qw ? qw[LANES * i + k] : xi[k] * xi[k];
            w[LANES * i + k] = wi;
            wx[LANES * i + k] = wi * xi[k];
        }
    }
    for (int k = 0; k < LANES; ++k) {
        if (amax[k] < GROUP_MAX_EPS) mx[k] = 1.f; /* replaced at the end */
        iscale[k] = (float)(-nmax) / mx[k];
    }
    qx_sums_x8(n, nmax, x, w, wx, iscale, sumlx, suml2);
    for (int k = 0; k < LANES; ++k) {
        scale[k] = suml2[k] != 0 ? sumlx[k] / suml2[k] : 0.0f;
        best[k] = scale[k] * sumlx[k];
        best_is[k] = iscale[k];
    }
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        for (int k = 0; k < LANES; ++k) iscale[k] = -((float)nmax + 0.1f * is) / mx[k];
        qx_sums_x8(n, nmax, x, w, wx, iscale, sumlx, suml2);
        for (int k = 0; k < LANES; ++k) {
            if (suml2[k] > 0 && sumlx[k] * sumlx[k] > best[k] * suml2[k]) {
                best_is[k] = iscale[k];
                scale[k] = sumlx[k] / suml2[k];
                best[k] = scale[k] * sumlx[k];
            }
        }
    }
    for (int i = 0; i < n; ++i) {
        const float *xi = x + LANES * i;
        for (int k = 0; k < LANES; ++k)
            L[LANES * i + k] = amax[k] < GROUP_MAX_EPS ? 0.f : clampf_code(best_is[k] * xi[k], -nmax, nmax - 1) + nmax;
    }
    for (int k = 0; k < LANES; ++k) scale_out[k] = amax[k] < GROUP_MAX_EPS ? 0.f : scale[k];
}

/* Lanes [n][LANES] -> the codes of the first m blocks, [m][n]. */
static inline void codes_from_lanes(const float *L, int n, int m, uint8_t *dst) {
    for (int k = 0; k < m; ++k)
        for (int i = 0; i < n; ++i) dst[n * k + i] = (uint8_t)(int)L[LANES * i + k];
}

/* Blocks b0..b0+m-1 (m <= LANES) of nb contiguous blocks of n into lanes; the unused lanes repeat the
 * last block (their results are dropped). */
static inline void group_to_lanes(const float *src, int n, int m, float *dst) {
    for (int k = 0; k < LANES; ++k) {
        const float *b = src + (int64_t)n * (k < m ? k : m - 1);
        for (int i = 0; i < n; ++i) dst[LANES * i + k] = b[i];
    }
}

/* make_qx_quants (rmse_type 1) of nb contiguous blocks of n <= 32 elements: weights w (NULL: x*x);
 * codes into L (nb*n, l + nmax), scales into scales (nb). */
static void qx_search_blocks(int n, int nb, int nmax, const float *x, const float *w, uint8_t *L,
                             float *scales) {
    float xt[32 * LANES], wt[32 * LANES], Lt[32 * LANES], sc[LANES];
    for (int b0 = 0; b0 < nb; b0 += LANES) {
        const int m = nb - b0 < LANES ? nb - b0 : LANES;
        group_to_lanes(x + (int64_t)n * b0, n, m, xt);
        if (w) group_to_lanes(w + (int64_t)n * b0, n, m, wt);
        make_qx_quants_x8(n, nmax, xt, w ? wt : NULL, Lt, sc);
        codes_from_lanes(Lt, n, m, L + (int64_t)n * b0);
        memcpy(scales + b0, sc, sizeof(float) * (size_t)m);
    }
}

/* make_qkx2/3_quants of nb contiguous blocks of n <= 32 elements with weights w; codes into L, the
 * scales and ggml's "the_min" (-min) of each block into scales and mins. */
static void qkx_search_blocks(int n, int nb, int nmax, const float *x, const float *w, uint8_t *L,
                              float *scales, float *mins, float rmin, float rdelta, int nstep,
                              int use_mad, int version) {
    float xt[32 * LANES], wt[32 * LANES], Lt[32 * LANES], sc[LANES], mn[LANES];
    for (int b0 = 0; b0 < nb; b0 += LANES) {
        const int m = nb - b0 < LANES ? nb - b0 : LANES;
        group_to_lanes(x + (int64_t)n * b0, n, m, xt);
        group_to_lanes(w + (int64_t)n * b0, n, m, wt);
        make_qkx_quants_x8(n, nmax, xt, wt, Lt, sc, mn, rmin, rdelta, nstep, use_mad, version);
        codes_from_lanes(Lt, n, m, L + (int64_t)n * b0);
        memcpy(scales + b0, sc, sizeof(float) * (size_t)m);
        memcpy(mins + b0, mn, sizeof(float) * (size_t)m);
    }
}

/* ---------------------------------------------------------------------------------- legacy types */

static inline uint32_t fbits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

static inline float bits_f(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* ggml's "amax = 0, max = 0; if (amax < fabsf(x)) { amax = fabsf(x); max = x; }" for finite x: the
 * largest magnitude (an integer max of |x|'s bits, which the compiler vectorizes) and the first
 * element holding it; +0 when every element is a zero. */
static inline float signed_absmax(const float *x, int n) {
    uint32_t m = 0;
    for (int j = 0; j < n; ++j) {
        uint32_t b = fbits(x[j]) & 0x7fffffffu;
        m = b > m ? b : m;
    }
    if (m == 0) return 0.f;
    for (int j = 0; j < n; ++j)
        if ((fbits(x[j]) & 0x7fffffffu) == m) return x[j];
    return 0.f; /* not reached */
}

/* A float's bits as an int32 whose order is the float order (-0 just below +0). */
static inline int32_t order_key(float f) {
    int32_t b = (int32_t)fbits(f);
    return b ^ ((b >> 31) & 0x7fffffff);
}

/* Bit j of a word, as a table: loops over j that test or set bit j with these masks vectorize
 * (SSE2 has no per-lane variable shifts). */
static const uint32_t BIT[QK] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
    1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
    1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
    1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31,
};

/* A legacy block's codes (32, each < 32): [qh: bit 4 of code j at bit j, little-endian] then
 * qs[j] = low nibble of code j | low nibble of code j + 16 << 4. */
static void pack_legacy_codes(const uint8_t *restrict q, uint8_t *restrict p, int high) {
    if (high) {
        uint32_t qh = 0;
        for (int j = 0; j < QK; ++j) qh |= BIT[j] & (0u - ((uint32_t)(q[j] >> 4) & 1u));
        memcpy(p, &qh, 4);
        p += 4;
    }
    for (int j = 0; j < QK / 2; ++j) p[j] = (uint8_t)((q[j] & 0xf) | ((q[j + QK / 2] & 0xf) << 4));
}

static void q4_0_or_q5_0_ref(const float *restrict x, int64_t nb, uint8_t *restrict y, int nmax) {
    const int size = nmax > 8 ? 22 : 18;
    const float offset = (float)nmax + 0.5f;
    for (int64_t b = 0; b < nb; ++b, x += QK, y += size) {
        const float max = signed_absmax(x, QK);
        const float d = max / (float)(-nmax);
        const float id = inv_or_zero(d);
        put_f16(y, d);
        uint8_t q[QK];
        if (isfinite(id)) {
            /* |x*id| <= nmax (to an ulp): the value lies in [0, 2*nmax + 1), where C's (int8_t) of
             * the float is a plain truncation */
            for (int j = 0; j < QK; ++j) q[j] = (uint8_t)imin(2 * nmax - 1, (int)(x[j] * id + offset));
        } else {
            for (int j = 0; j < QK; ++j) q[j] = (uint8_t)imin(2 * nmax - 1, (int8_t)trunc_int(x[j] * id + offset));
        }
        pack_legacy_codes(q, y + 2, nmax > 8);
    }
}

static void q4_1_or_q5_1_ref(const float *restrict x, int64_t nb, uint8_t *restrict y, int nmax) {
    const int size = nmax > 15 ? 24 : 20;
    for (int64_t b = 0; b < nb; ++b, x += QK, y += size) {
        int32_t kmin = INT32_MAX, kmax = INT32_MIN;
        for (int j = 0; j < QK; ++j) {
            int32_t k = order_key(x[j]);
            kmin = k < kmin ? k : kmin;
            kmax = k > kmax ? k : kmax;
        }
        float min = bits_f((uint32_t)order_key(bits_f((uint32_t)kmin)));
        float max = bits_f((uint32_t)order_key(bits_f((uint32_t)kmax)));
        if (min == 0 || max == 0) { /* which zero ggml's strict comparisons keep: the first one */
            min = 3.402823466e+38f;
            max = -3.402823466e+38f;
            for (int j = 0; j < QK; ++j) {
                if (x[j] < min) min = x[j];
                if (x[j] > max) max = x[j];
            }
        }
        const float d = (max - min) / (float)nmax;
        const float id = inv_or_zero(d);
        put_f16(y, d);
        put_f16(y + 2, min);
        uint8_t q[QK];
        if (isfinite(id)) {
            /* 0 <= (x - min)*id <= nmax (to an ulp): C's conversions are truncations; Q4_1 clamps
             * at 15, Q5_1 keeps the low 5 bits (the packing drops a 32) */
            for (int j = 0; j < QK; ++j) q[j] = (uint8_t)imin(nmax == 15 ? 15 : 255, (int)((x[j] - min) * id + 0.5f));
        } else {
            for (int j = 0; j < QK; ++j) {
                int32_t c = trunc_int((x[j] - min) * id + 0.5f);
                q[j] = (uint8_t)(nmax == 15 ? imin(15, (int8_t)c) : c);
            }
        }
        pack_legacy_codes(q, y + 4, nmax > 15);
    }
}

static void q8_0_ref(const float *restrict x, int64_t nb, uint8_t *restrict y) {
    const float below_half = 0.49999997f; /* the float just below 0.5 */
    for (int64_t b = 0; b < nb; ++b, x += QK, y += 34) {
        uint32_t m = 0;
        for (int j = 0; j < QK; ++j) {
            uint32_t bits = fbits(x[j]) & 0x7fffffffu;
            m = bits > m ? bits : m;
        }
        const float amax = bits_f(m);
        const float d = amax / 127.f;
        const float id = inv_or_zero(d);
        put_f16(y, d);
        int8_t *restrict qs = (int8_t *)(y + 2);
        if (isfinite(id)) {
            /* roundf of |v| <= 127: adding the float below 0.5 with v's sign rounds the sum to the
             * next integer exactly when |frac(v)| >= 0.5; the conversion truncates */
            for (int j = 0; j < QK; ++j) {
                float v = x[j] * id;
                qs[j] = (int8_t)(int)(v + copysignf(below_half, v));
            }
        } else {
            for (int j = 0; j < QK; ++j) qs[j] = (int8_t)trunc_int(roundf(x[j] * id));
        }
    }
}

/* How many elements of x are NaN or infinite (exponent all ones). Groups of 32 with a fixed trip
 * count, so that the compiler vectorizes the scan (it runs over every element quantized). */
static int64_t count_nonfinite(const float *restrict x, int64_t n) {
    int64_t bad = 0, j = 0;
    for (; j + QK <= n; j += QK) {
        uint32_t group = 0;
        for (int k = 0; k < QK; ++k) group += (fbits(x[j + k]) & 0x7f800000u) == 0x7f800000u;
        bad += group;
    }
    for (; j < n; ++j) bad += (fbits(x[j]) & 0x7f800000u) == 0x7f800000u;
    return bad;
}

/* Legacy types with an importance vector: one row. */
static void legacy_impl_row(const float *x, int64_t n, const float *qw, uint8_t *y, int type) {
    float sum_x2 = 0;
    for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
    const float sigma2 = sum_x2 / (float)n;
    const int sym = type == T_Q4_0 || type == T_Q5_0;
    const int nmax = type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : type == T_Q4_1 ? 15 : 31;
    const int high = type == T_Q5_0 || type == T_Q5_1;
    const int size = (sym ? 2 : 4) + (high ? 4 : 0) + 16;
    const int64_t nb = n / QK;
    float weight[QK * LANES], d[LANES], the_min[LANES];
    uint8_t L[QK * LANES];
    for (int64_t b0 = 0; b0 < nb; b0 += LANES) {
        const int m = nb - b0 >= LANES ? LANES : (int)(nb - b0);
        const float *xb = x + QK * b0;
        const float *qb = qw + QK * b0;
        for (int j = 0; j < QK * m; ++j) weight[j] = qb[j] * sqrtf(sigma2 + xb[j] * xb[j]);
        if (sym)
            qx_search_blocks(QK, m, nmax, xb, weight, L, d);
        else
            qkx_search_blocks(QK, m, nmax, xb, weight, L, d, the_min, -0.9f, 0.05f, 36, 0, 3);
        for (int k = 0; k < m; ++k) {
            uint8_t *yb = y + size * (b0 + k);
            const uint8_t *Lk = L + QK * k;
            put_f16(yb, d[k]);
            if (!sym) put_f16(yb + 2, -the_min[k]);
            pack_legacy_codes(Lk, yb + (sym ? 2 : 4), high);
        }
    }
}

/* ------------------------------------------------------------------------------------- k-quants */

static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; ++l)
            qs[j / 4 + l] = (uint8_t)((L[j + l] & 3) | ((L[j + l + 32] & 3) << 2) |
                                      ((L[j + l + 64] & 3) << 4) | ((L[j + l + 96] & 3) << 6));
}

static float block_sigma2(const float *x, float factor) {
    float sum_x2 = 0;
    for (int j = 0; j < QK_K; ++j) sum_x2 += x[j] * x[j];
    return factor * sum_x2 / (float)QK_K;
}

/* The imatrix path of Q2_K and Q4_K/Q5_K: make_qkx3_quants per sub-block, then make_qp_quants of
 * the scales and of the mins, weighted by each sub-block's sum of weights. */
static void fit_scales_and_mins(const float *x, const float *qw, int sub, float sigma_factor, int nmax,
                                int scale_max, uint8_t *L, uint8_t *Ls, uint8_t *Lm, float *d,
                                float *dmin) {
    const int nsub = QK_K / sub;
    const float sigma2 = block_sigma2(x, sigma_factor);
    float w[QK_K], sw[16], scales[16], mins[16];
    for (int j = 0; j < QK_K; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
    for (int s = 0; s < nsub; ++s) {
        float sum = 0;
        for (int l = 0; l < sub; ++l) sum += w[sub * s + l];
        sw[s] = sum;
    }
    qkx_search_blocks(sub, nsub, nmax, x, w, L, scales, mins, -0.9f, 0.05f, 36, 0, 3);
    *d = make_qp_quants(nsub, scale_max, scales, Ls, sw);
    *dmin = make_qp_quants(nsub, scale_max, mins, Lm, sw);
}

/* ggml's last pass: codes from the stored (fp16) scales; sub-blocks with d == 0 keep the search's. */
static void requantize_sub(const float *x, uint8_t *L, int n, float d, float dm, int lo, int hi) {
    if (d == 0) return;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)(imax(lo, imin(hi, nearest_int((x[i] + dm) / d))) - lo);
}

static void q2_k_block(const float *x, const float *qw, uint8_t *y) {
    uint8_t L[QK_K], sc[16];
    float d, dmin;
    if (!qw) {
        float w[QK_K], scales[16], mins[16], max_scale = 0, max_min = 0;
        for (int j = 0; j < QK_K; ++j) w[j] = fabsf(x[j]);
        qkx_search_blocks(16, 16, 3, x, w, L, scales, mins, -0.5f, 0.1f, 15, 1, 2);
        for (int s = 0; s < 16; ++s) {
            if (scales[s] > max_scale) max_scale = scales[s];
            if (mins[s] > max_min) max_min = mins[s];
        }
        for (int s = 0; s < 16; ++s) sc[s] = 0;
        if (max_scale > 0) {
            const float iscale = 15.f / max_scale;
            for (int s = 0; s < 16; ++s) sc[s] = (uint8_t)nearest_int(iscale * scales[s]);
            d = max_scale / 15.f;
        } else {
            d = 0.f;
        }
        if (max_min > 0) {
            const float iscale = 15.f / max_min;
            for (int s = 0; s < 16; ++s) sc[s] |= (uint8_t)(nearest_int(iscale * mins[s]) << 4);
            dmin = max_min / 15.f;
        } else {
            dmin = 0.f;
        }
    } else {
        uint8_t Ls[16], Lm[16];
        fit_scales_and_mins(x, qw, 16, 1.f, 3, 15, L, Ls, Lm, &d, &dmin);
        for (int s = 0; s < 16; ++s) sc[s] = (uint8_t)(Ls[s] | (Lm[s] << 4));
    }
    const float dq = fp16_round(d), mq = fp16_round(dmin);
    for (int s = 0; s < 16; ++s)
        requantize_sub(x + 16 * s, L + 16 * s, 16, dq * (sc[s] & 0xf), mq * (sc[s] >> 4), 0, 3);
    memcpy(y, sc, 16);
    pack_2bit(L, y + 16);
    put_f16(y + 80, d);
    put_f16(y + 82, dmin);
}

static void pack_q3_scales(const int *ls, uint8_t *out) {
    int o[12] = {0};
    for (int s = 0; s < 8; ++s) o[s] = (ls[s] & 0xf) | ((ls[s + 8] & 0xf) << 4);
    for (int s = 0; s < 16; ++s) o[8 + s % 4] |= (ls[s] >> 4) << (2 * (s / 4));
    for (int i = 0; i < 12; ++i) out[i] = (uint8_t)(o[i] & 0xff);
}

static void q3_k_block(const float *x, const float *qw, uint8_t *y) {
    uint8_t L[QK_K];
    int ls[16];
    float d;
    if (!qw) {
        float scales[16], amax = 0, max_scale = 0;
        for (int s = 0; s < 16; ++s) {
            scales[s] = make_q3_quants(16, 4, x + 16 * s, L + 16 * s);
            float a = fabsf(scales[s]);
            if (a > amax) { amax = a; max_scale = scales[s]; }
        }
        if (max_scale != 0) {
            const float iscale = -32.f / max_scale;
            for (int s = 0; s < 16; ++s) ls[s] = imax(-32, imin(31, (int8_t)nearest_int(iscale * scales[s]))) + 32;
            d = 1 / iscale;
        } else {
            for (int s = 0; s < 16; ++s) ls[s] = 0;
            d = 0.f;
        }
    } else {
        const float sigma2 = block_sigma2(x, 2.f);
        float w[QK_K], sw[16], scales[16];
        uint8_t Ls[16];
        for (int j = 0; j < QK_K; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
        for (int s = 0; s < 16; ++s) {
            float sum = 0;
            for (int l = 0; l < 16; ++l) sum += w[16 * s + l];
            sw[s] = sum;
        }
        qx_search_blocks(16, 16, 4, x, w, L, scales);
        qx_search_blocks(16, 1, 32, scales, sw, Ls, &d);
        for (int s = 0; s < 16; ++s) ls[s] = Ls[s];
    }
    uint8_t *hmask = y, *qs = y + 32, *scales_out = y + 96;
    pack_q3_scales(ls, scales_out);
    const float dq = fp16_round(d);
    for (int s = 0; s < 16; ++s) {
        int lo = s < 8 ? scales_out[s] & 0xf : scales_out[s - 8] >> 4;
        int hi = (scales_out[8 + s % 4] >> (2 * (s / 4))) & 3;
        requantize_sub(x + 16 * s, L + 16 * s, 16, dq * ((lo | (hi << 4)) - 32), 0.f, -4, 3);
    }
    memset(hmask, 0, 32);
    for (int e = 0; e < QK_K; ++e) {
        hmask[e % 32] |= (uint8_t)(((L[e] >> 2) & 1) << (e / 32));
        L[e] &= 3;
    }
    pack_2bit(L, qs);
    put_f16(y + 108, d);
}

static void pack_scale_min_k4(const int *ls, const int *lm, uint8_t *q) {
    int o[12];
    for (int j = 0; j < 4; ++j) {
        o[j] = ls[j] & 0xff;
        o[j + 4] = lm[j] & 0xff;
        o[j + 8] = (ls[j + 4] & 0xf) | ((lm[j + 4] & 0xf) << 4);
    }
    for (int j = 0; j < 4; ++j) {
        o[j] |= ((ls[j + 4] & 0xff) >> 4) << 6;
        o[j + 4] |= ((lm[j + 4] & 0xff) >> 4) << 6;
    }
    for (int i = 0; i < 12; ++i) q[i] = (uint8_t)(o[i] & 0xff);
}

static void get_scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static void q45_k_block(const float *x, const float *qw, uint8_t *y, int nmax) {
    uint8_t L[QK_K];
    int ls[8], lm[8];
    float d, dmin;
    if (!qw) {
        float w[QK_K], scales[8], mins[8], max_scale = 0, max_min = 0;
        for (int s = 0; s < 8; ++s) {
            const float *xs = x + 32 * s;
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
            const float av_x = sqrtf(sum_x2 / 32.f);
            for (int l = 0; l < 32; ++l) w[32 * s + l] = av_x + fabsf(xs[l]);
        }
        if (nmax == 15)
            qkx_search_blocks(32, 8, 15, x, w, L, scales, mins, -1.f, 0.1f, 20, 0, 2);
        else
            qkx_search_blocks(32, 8, 31, x, w, L, scales, mins, -0.5f, 0.1f, 15, 0, 2);
        for (int s = 0; s < 8; ++s) {
            if (scales[s] > max_scale) max_scale = scales[s];
            if (mins[s] > max_min) max_min = mins[s];
        }
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int s = 0; s < 8; ++s) {
            ls[s] = imin(63, nearest_int(inv_scale * scales[s]) & 0xff);
            lm[s] = imin(63, nearest_int(inv_min * mins[s]) & 0xff);
        }
        d = max_scale / 63.f;
        dmin = max_min / 63.f;
    } else {
        uint8_t Ls[8], Lm[8];
        fit_scales_and_mins(x, qw, 32, 2.f, nmax, 63, L, Ls, Lm, &d, &dmin);
        for (int s = 0; s < 8; ++s) {
            ls[s] = nmax > 15 ? imin(63, Ls[s]) : Ls[s];
            lm[s] = nmax > 15 ? imin(63, Lm[s]) : Lm[s];
        }
    }
    put_f16(y, d);
    put_f16(y + 2, dmin);
    uint8_t *scales_out = y + 4;
    pack_scale_min_k4(ls, lm, scales_out);
    const float dq = fp16_round(d), mq = fp16_round(dmin);
    for (int s = 0; s < 8; ++s) {
        int sc, m;
        get_scale_min_k4(s, scales_out, &sc, &m);
        requantize_sub(x + 32 * s, L + 32 * s, 32, dq * sc, mq * m, 0, nmax);
    }
    uint8_t *qs = y + 16;
    if (nmax > 15) {
        uint8_t *qh = y + 16;
        memset(qh, 0, 32);
        for (int e = 0; e < QK_K; ++e) qh[e % 32] |= (uint8_t)(((L[e] >> 4) & 1) << (e / 32));
        qs = y + 48;
    }
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l)
            qs[32 * c + l] = (uint8_t)((L[64 * c + l] & 0xf) | ((L[64 * c + l + 32] & 0xf) << 4));
}

static void q6_k_block(const float *x, const float *qw, uint8_t *y) {
    uint8_t L[QK_K];
    float scales[16], max_abs = 0, max_scale = 0;
    qx_search_blocks(16, 16, 32, x, qw, L, scales);
    for (int s = 0; s < 16; ++s) {
        float a = fabsf(scales[s]);
        if (a > max_abs) { max_abs = a; max_scale = scales[s]; }
    }
    if (max_abs < GROUP_MAX_EPS) {
        memset(y, 0, 210);
        return;
    }
    const float iscale = -128.f / max_scale;
    const float d_block = 1 / iscale;
    const float dq = fp16_round(d_block);
    int8_t sc[16];
    for (int s = 0; s < 16; ++s) sc[s] = (int8_t)imin(127, nearest_int(iscale * scales[s]));
    for (int s = 0; s < 16; ++s) requantize_sub(x + 16 * s, L + 16 * s, 16, dq * sc[s], 0.f, -32, 31);
    uint8_t *ql = y, *qh = y + 128;
    for (int h = 0; h < 2; ++h) {
        const uint8_t *Lh = L + 128 * h;
        for (int l = 0; l < 32; ++l) {
            ql[64 * h + l] = (uint8_t)((Lh[l] & 0xf) | ((Lh[l + 64] & 0xf) << 4));
            ql[64 * h + l + 32] = (uint8_t)((Lh[l + 32] & 0xf) | ((Lh[l + 96] & 0xf) << 4));
            qh[32 * h + l] = (uint8_t)((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) | ((Lh[l + 64] >> 4) << 4) |
                                       ((Lh[l + 96] >> 4) << 6));
        }
    }
    memcpy(y + 192, sc, 16);
    put_f16(y + 208, d_block);
}

/* --------------------------------------------------------------------------------- dequantizers
 *
 * ggml's to_float (dequantize_row_*), one block at a time, in ggml's (and gguf-py's / the numpy
 * codecs') float order: the integer code is converted exactly, then multiplied by the scale, then the
 * minimum is added (Q4_1, Q5_1: x*d + m) or subtracted (k-quants: (d*sc)*q - dmin*m). Products of a
 * scale and an exact integer, and differences, give the same bits in any instruction order, NaNs
 * included: a difference keeps the first operand's NaN, as numpy does. A sum does not (the compiler
 * may swap its operands), and only a sum of two NaNs can tell: x*d + m for a non-finite d and a NaN m
 * is then computed element by element with numpy's rule (the first operand's NaN).
 *
 * Every block pattern is valid input; fp16 NaNs keep their payload into float32 (as numpy's cast),
 * and the arithmetic quiets them. The inner loops have fixed trip counts and restrict pointers, so
 * that the compiler vectorizes them. */

static inline float rd_f16(const uint8_t *p) { return f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

static inline uint32_t rd_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v; /* little-endian hosts only, as the rest of this module */
}

/* y[j] = q[j]*d + m, with numpy's NaN when both terms are NaN (see above). */
static inline void scale_add_32(const float *restrict q, float d, float m, float *restrict y) {
    if (isfinite(d) || !isnan(m)) {
        for (int j = 0; j < QK; ++j) y[j] = q[j] * d + m;
        return;
    }
    for (int j = 0; j < QK; ++j) {
        const float a = q[j] * d;
        y[j] = isnan(a) ? a : a + m;
    }
}

static void dq_q4_0(const uint8_t *restrict b, int64_t nb, float *restrict y) {
    for (int64_t i = 0; i < nb; ++i, b += 18, y += QK) {
        const float d = rd_f16(b);
        const uint8_t *restrict qs = b + 2;
        for (int j = 0; j < 16; ++j) {
            y[j] = (float)((qs[j] & 0xf) - 8) * d;
            y[j + 16] = (float)((qs[j] >> 4) - 8) * d;
        }
    }
}

static void dq_q4_1(const uint8_t *restrict b, int64_t nb, float *restrict y) {
    float q[QK];
    for (int64_t i = 0; i < nb; ++i, b += 20, y += QK) {
        const uint8_t *restrict qs = b + 4;
        for (int j = 0; j < 16; ++j) {
            q[j] = (float)(qs[j] & 0xf);
            q[j + 16] = (float)(qs[j] >> 4);
        }
        scale_add_32(q, rd_f16(b), rd_f16(b + 2), y);
    }
}

/* The 32 five-bit codes of a Q5_0/Q5_1 block: low nibbles in qs, bit 4 of code j at bit j of qh. */
static inline void q5_codes(const uint8_t *restrict qhp, const uint8_t *restrict qs, int32_t *restrict q) {
    const uint32_t qh = rd_u32(qhp);
    for (int j = 0; j < 16; ++j) {
        q[j] = (int32_t)(qs[j] & 0xf) | ((qh & BIT[j]) ? 16 : 0);
        q[j + 16] = (int32_t)(qs[j] >> 4) | ((qh & BIT[j + 16]) ? 16 : 0);
    }
}

static void dq_q5_0(const uint8_t *restrict b, int64_t nb, float *restrict y) {
    int32_t q[QK];
    for (int64_t i = 0; i < nb; ++i, b += 22, y += QK) {
        const float d = rd_f16(b);
        q5_codes(b + 2, b + 6, q);
        for (int j = 0; j < QK; ++j) y[j] = (float)(q[j] - 16) * d;
    }
}

static void dq_q5_1(const uint8_t *restrict b, int64_t nb, float *restrict y) {
    int32_t q[QK];
    float qf[QK];
    for (int64_t i = 0; i < nb; ++i, b += 24, y += QK) {
        q5_codes(b + 4, b + 8, q);
        for (int j = 0; j < QK; ++j) qf[j] = (float)q[j];
        scale_add_32(qf, rd_f16(b), rd_f16(b + 2), y);
    }
}

static void dq_q8_0(const uint8_t *restrict b, int64_t nb, float *restrict y) {
    for (int64_t i = 0; i < nb; ++i, b += 34, y += QK) {
        const float d = rd_f16(b);
        const int8_t *restrict qs = (const int8_t *)(b + 2);
        for (int j = 0; j < QK; ++j) y[j] = (float)qs[j] * d;
    }
}

/* Q2_K: scales[16] | qs[64] | d | dmin. Element 128h + 32g + l is bits 2g..2g+1 of qs[32h + l], in
 * sub-block 8h + 2g + l/16. */
static void dq_q2_k(const uint8_t *restrict b, int64_t nb, float *restrict y) {
    for (int64_t i = 0; i < nb; ++i, b += 84, y += QK_K) {
        const float d = rd_f16(b + 80), dmin = rd_f16(b + 82);
        for (int h = 0; h < 2; ++h) {
            const uint8_t *restrict qs = b + 16 + 32 * h;
            for (int g = 0; g < 4; ++g) {
                for (int half = 0; half < 2; ++half) {
                    const int s = 8 * h + 2 * g + half;
                    const float dl = d * (float)(b[s] & 0xf), ml = dmin * (float)(b[s] >> 4);
                    float *restrict ys = y + 128 * h + 32 * g + 16 * half;
                    const uint8_t *restrict q = qs + 16 * half;
                    for (int l = 0; l < 16; ++l) ys[l] = dl * (float)((q[l] >> (2 * g)) & 3) - ml;
                }
            }
        }
    }
}

/* Q3_K: hmask[32] | qs[64] | scales[12] | d. Low bits as Q2_K; bit 2 (set: no -4) is bit 4h + g of
 * hmask[l]; 6-bit scales: low nibble of scales[s % 8] (s < 8: low, else high), top 2 bits at
 * 2*(s/4) of scales[8 + s % 4]. */
static void dq_q3_k(const uint8_t *restrict b, int64_t nb, float *restrict y) {
    for (int64_t i = 0; i < nb; ++i, b += 110, y += QK_K) {
        const float d = rd_f16(b + 108);
        const uint8_t *restrict hm = b, *restrict sc = b + 96;
        for (int h = 0; h < 2; ++h) {
            const uint8_t *restrict qs = b + 32 + 32 * h;
            for (int g = 0; g < 4; ++g) {
                const int bit = 4 * h + g;
                for (int half = 0; half < 2; ++half) {
                    const int s = 8 * h + 2 * g + half;
                    const int lo = s < 8 ? sc[s] & 0xf : sc[s - 8] >> 4;
                    const int hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
                    const float dl = d * (float)((lo | (hi << 4)) - 32);
                    float *restrict ys = y + 128 * h + 32 * g + 16 * half;
                    const uint8_t *restrict q = qs + 16 * half, *restrict m = hm + 16 * half;
                    for (int l = 0; l < 16; ++l) {
                        const int code = ((q[l] >> (2 * g)) & 3) - 4 + (((m[l] >> bit) & 1) << 2);
                        ys[l] = dl * (float)code;
                    }
                }
            }
        }
    }
}

/* Q4_K: d | dmin | scales[12] | qs[128]; Q5_K: d | dmin | scales[12] | qh[32] | qs[128]. Element
 * 64c + 32n + l is nibble n of qs[32c + l] (+16 if bit 2c + n of qh[l]), in sub-block 2c + n. */
static void dq_q45_k(const uint8_t *restrict b, int64_t nb, float *restrict y, int five) {
    const int ts = five ? 176 : 144;
    for (int64_t i = 0; i < nb; ++i, b += ts, y += QK_K) {
        const float d = rd_f16(b), dmin = rd_f16(b + 2);
        const uint8_t *restrict qh = b + 16, *restrict qs = b + (five ? 48 : 16);
        for (int c = 0; c < 4; ++c) {
            for (int n = 0; n < 2; ++n) {
                int sc, m;
                get_scale_min_k4(2 * c + n, b + 4, &sc, &m);
                const float dl = d * (float)sc, ml = dmin * (float)m;
                const int bit = 2 * c + n;
                float *restrict ys = y + 64 * c + 32 * n;
                const uint8_t *restrict q = qs + 32 * c;
                if (five) {
                    for (int l = 0; l < 32; ++l) {
                        const int code = ((q[l] >> (4 * n)) & 0xf) | (((qh[l] >> bit) & 1) << 4);
                        ys[l] = dl * (float)code - ml;
                    }
                } else {
                    for (int l = 0; l < 32; ++l) ys[l] = dl * (float)((q[l] >> (4 * n)) & 0xf) - ml;
                }
            }
        }
    }
}

/* Q6_K: ql[128] | qh[64] | scales:i8[16] | d. Element 128h + 32g + l: low 4 bits are nibble g/2 of
 * ql[64h + 32(g%2) + l], high 2 bits are bits 2g..2g+1 of qh[32h + l]; sub-block 8h + 2g + l/16. */
static void dq_q6_k(const uint8_t *restrict b, int64_t nb, float *restrict y) {
    for (int64_t i = 0; i < nb; ++i, b += 210, y += QK_K) {
        const float d = rd_f16(b + 208);
        const int8_t *restrict sc = (const int8_t *)(b + 192);
        for (int h = 0; h < 2; ++h) {
            for (int g = 0; g < 4; ++g) {
                const uint8_t *restrict ql = b + 64 * h + 32 * (g % 2), *restrict qh = b + 128 + 32 * h;
                for (int half = 0; half < 2; ++half) {
                    const float dl = d * (float)sc[8 * h + 2 * g + half];
                    float *restrict ys = y + 128 * h + 32 * g + 16 * half;
                    const uint8_t *restrict lo = ql + 16 * half, *restrict hi = qh + 16 * half;
                    for (int l = 0; l < 16; ++l) {
                        const int code = (((lo[l] >> (4 * (g / 2))) & 0xf) | (((hi[l] >> (2 * g)) & 3) << 4)) - 32;
                        ys[l] = dl * (float)code;
                    }
                }
            }
        }
    }
}

static void dequantize_blocks(int type, const uint8_t *x, int64_t nb, float *y) {
    switch (type) {
        case T_Q4_0: dq_q4_0(x, nb, y); break;
        case T_Q4_1: dq_q4_1(x, nb, y); break;
        case T_Q5_0: dq_q5_0(x, nb, y); break;
        case T_Q5_1: dq_q5_1(x, nb, y); break;
        case T_Q8_0: dq_q8_0(x, nb, y); break;
        case T_Q2_K: dq_q2_k(x, nb, y); break;
        case T_Q3_K: dq_q3_k(x, nb, y); break;
        case T_Q4_K: dq_q45_k(x, nb, y, 0); break;
        case T_Q5_K: dq_q45_k(x, nb, y, 1); break;
        default: dq_q6_k(x, nb, y); break;
    }
}

/* ------------------------------------------------------------------------------------- dispatch */

static int64_t type_size(int type) {
    switch (type) {
        case T_Q4_0: return 18;
        case T_Q4_1: return 20;
        case T_Q5_0: return 22;
        case T_Q5_1: return 24;
        case T_Q8_0: return 34;
        case T_Q2_K: return 84;
        case T_Q3_K: return 110;
        case T_Q4_K: return 144;
        case T_Q5_K: return 176;
        case T_Q6_K: return 210;
        default: return 0;
    }
}

static int block_size(int type) { return type >= T_Q2_K ? QK_K : QK; }

static void quantize_row(int type, const float *x, int64_t n, const float *qw, uint8_t *y) {
    const int64_t nb = n / block_size(type);
    const int64_t ts = type_size(type);
    if (type >= T_Q2_K) {
        for (int64_t b = 0; b < nb; ++b) {
            const float *xb = x + QK_K * b;
            const float *wb = qw ? qw + QK_K * b : NULL;
            uint8_t *yb = y + ts * b;
            switch (type) {
                case T_Q2_K: q2_k_block(xb, wb, yb); break;
                case T_Q3_K: q3_k_block(xb, wb, yb); break;
                case T_Q4_K: q45_k_block(xb, wb, yb, 15); break;
                case T_Q5_K: q45_k_block(xb, wb, yb, 31); break;
                default: q6_k_block(xb, wb, yb); break;
            }
        }
        return;
    }
    if (qw && type != T_Q8_0) {
        legacy_impl_row(x, n, qw, y, type);
        return;
    }
    switch (type) {
        case T_Q4_0: q4_0_or_q5_0_ref(x, nb, y, 8); break;
        case T_Q5_0: q4_0_or_q5_0_ref(x, nb, y, 16); break;
        case T_Q4_1: q4_1_or_q5_1_ref(x, nb, y, 15); break;
        case T_Q5_1: q4_1_or_q5_1_ref(x, nb, y, 31); break;
        default: q8_0_ref(x, nb, y); break;
    }
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int type;
    Py_buffer xb, ob, wb;
    Py_ssize_t rows, n;
    PyObject *imatrix;
    (void)self;
    if (!PyArg_ParseTuple(args, "iy*nnOw*", &type, &xb, &rows, &n, &imatrix, &ob)) return NULL;
    int has_w = imatrix != Py_None;
    if (has_w && PyObject_GetBuffer(imatrix, &wb, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&xb);
        PyBuffer_Release(&ob);
        return NULL;
    }
    PyObject *result = NULL;
    const int64_t ts = type_size(type);
    if (ts == 0) {
        PyErr_Format(PyExc_ValueError, "_kernels.quantize: no kernel for ggml type %d", type);
    } else if (rows < 0 || n <= 0 || n % block_size(type) != 0 ||
               xb.len != (Py_ssize_t)(rows * n * (Py_ssize_t)sizeof(float)) ||
               ob.len != (Py_ssize_t)(rows * (n / block_size(type)) * ts) ||
               (has_w && wb.len != (Py_ssize_t)(n * (Py_ssize_t)sizeof(float)))) {
        PyErr_SetString(PyExc_ValueError, "_kernels.quantize: buffer sizes do not match rows x n_per_row");
    } else {
        const float *x = (const float *)xb.buf;
        const float *qw = has_w ? (const float *)wb.buf : NULL;
        uint8_t *y = (uint8_t *)ob.buf;
        const int64_t rb = (n / block_size(type)) * ts;
        int64_t bad = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows && !bad; ++r) {
            const float *xr = x + (int64_t)r * n;
            bad = count_nonfinite(xr, n); /* the row is in cache for the quantizer */
            if (!bad) quantize_row(type, xr, n, qw, y + r * rb);
        }
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(bad == 0);
    }
    if (has_w) PyBuffer_Release(&wb);
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ob);
    return result;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int type;
    Py_buffer xb, ob;
    Py_ssize_t rows, n;
    (void)self;
    if (!PyArg_ParseTuple(args, "iy*nnw*", &type, &xb, &rows, &n, &ob)) return NULL;
    PyObject *result = NULL;
    const int64_t ts = type_size(type);
    if (ts == 0) {
        PyErr_Format(PyExc_ValueError, "_kernels.dequantize: no kernel for ggml type %d", type);
    } else if (rows < 0 || n <= 0 || n % block_size(type) != 0 ||
               xb.len != (Py_ssize_t)(rows * (n / block_size(type)) * ts) ||
               ob.len != (Py_ssize_t)(rows * n * (Py_ssize_t)sizeof(float))) {
        PyErr_SetString(PyExc_ValueError, "_kernels.dequantize: buffer sizes do not match rows x n_per_row");
    } else {
        const uint8_t *x = (const uint8_t *)xb.buf;
        float *y = (float *)ob.buf;
        const int64_t nb = (int64_t)rows * (n / block_size(type)); /* rows are whole blocks */
        Py_BEGIN_ALLOW_THREADS
        dequantize_blocks(type, x, nb, y);
        Py_END_ALLOW_THREADS
        Py_INCREF(Py_None);
        result = Py_None;
    }
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ob);
    return result;
}

/* ggml_compute_fp32_to_bf16: NaN made quiet (0x40 in the top byte of the mantissa), otherwise
 * round to nearest even on the top 16 bits. */
static PyObject *py_to_bf16(PyObject *self, PyObject *args) {
    Py_buffer xb, ob;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*", &xb, &ob)) return NULL;
    PyObject *result = NULL;
    if (xb.len % 4 != 0 || ob.len * 2 != xb.len) {
        PyErr_SetString(PyExc_ValueError, "_kernels.to_bf16: out must hold 2 bytes per float32 of x");
    } else {
        const uint32_t *x = (const uint32_t *)xb.buf;
        uint16_t *y = (uint16_t *)ob.buf;
        const Py_ssize_t n = xb.len / 4;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; ++i) {
            uint32_t u = x[i];
            if ((u & 0x7fffffffu) > 0x7f800000u)
                y[i] = (uint16_t)((u >> 16) | 64u);
            else
                y[i] = (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
        }
        Py_END_ALLOW_THREADS
        Py_INCREF(Py_None);
        result = Py_None;
    }
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ob);
    return result;
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(ggml_type, x, rows, n_per_row, imatrix_or_None, out) -> bool: rows of float32 to ggml "
     "blocks, bit-exact with lowbit's numpy codecs; False (out incomplete) if x holds NaN or Inf."},
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(ggml_type, data, rows, n_per_row, out) -> None: ggml blocks to float32 rows (out), "
     "bit-exact with ggml's to_float and gguf-py's dequantize, NaN and Inf from the scales included."},
    {"to_bf16", py_to_bf16, METH_VARARGS,
     "to_bf16(x, out) -> None: float32 to bfloat16 bits as ggml_compute_fp32_to_bf16 (and gguf-py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "Compiled ggml row quantizers and dequantizers (see the source's header).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
