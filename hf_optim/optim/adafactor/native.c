/* hf-optim: the C kernel of hf_optim._native_adafactor (Adafactor for factored fp32 CPU matrices).
   Built at first use with the system C compiler and the flags in that module; see its docstring for the maths. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = ((uint32_t)h) << 16; float f; memcpy(&f, &bits, 4); return f;
}
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch */
    uint32_t bits; memcpy(&bits, &f, 4);
    /* No NaN special case: arithmetic produces quiet NaNs (0x7fc00000 and up), which this keeps NaN. */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* torch's lerp (ATen lerp_vec): one fused multiply-add from the nearer end, so results round as torch's. */
static inline float lerpf(float start, float end, float w) {
    return w < 0.5f ? fmaf(w, end - start, start) : fmaf(w - 1.0f, end - start, end);
}

/* Statistics pass over rows [0, R) of a block. Updates the row statistics in place and writes two column vectors:
   cs_j = sum_i g_ij^2 and ts_j = sum_i g_ij^2 / row_i (row_i already updated). The second needs row i's sum first,
   so each row is swept twice, the second time from L1 cache: this replaces a whole pass over g for clipping, since
   sum_ij U_ij^2 = mean(row) * sum_j ts_j / col_j. */
static inline float af_row_update(float* row_i, float s, long C, float w, float eps1) {
    *row_i = lerpf(*row_i, s / (float)C + eps1, w);
    return 1.0f / *row_i;
}

void af_sums(const float* g, float* row, float* cs, float* ts, long R, long C, float w, float eps1) {
    for (long j = 0; j < C; j++) { cs[j] = 0.0f; ts[j] = 0.0f; }
    /* Four far-apart rows at a time: four concurrent sequential streams read faster than one on a single core
       (measured 16.7 vs 12.5 GB/s), and cs/ts are loaded and stored once per four rows. */
    const long q = R / 4;
    for (long i = 0; i < q; i++) {
        const float *g0 = g + i * C, *g1 = g0 + q * C, *g2 = g1 + q * C, *g3 = g2 + q * C;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        if (i + 1 < q) {
            /* Ask for each stream's next row now: the hardware prefetcher alone leaves this pass at ~11 GB/s,
               below the ~17 GB/s four read streams reach (measured 20.5 -> 18.5 ms on the 58M set). */
            for (long j = 0; j < C; j += 16) {
                __builtin_prefetch(g0 + C + j); __builtin_prefetch(g1 + C + j);
                __builtin_prefetch(g2 + C + j); __builtin_prefetch(g3 + C + j);
            }
        }
        for (long j = 0; j < C; j++) {
            float q0 = g0[j] * g0[j], q1 = g1[j] * g1[j], q2 = g2[j] * g2[j], q3 = g3[j] * g3[j];
            s0 += q0; s1 += q1; s2 += q2; s3 += q3; cs[j] += (q0 + q1) + (q2 + q3);
        }
        const float i0 = af_row_update(row + i, s0, C, w, eps1), i1 = af_row_update(row + i + q, s1, C, w, eps1),
                    i2 = af_row_update(row + i + 2 * q, s2, C, w, eps1),
                    i3 = af_row_update(row + i + 3 * q, s3, C, w, eps1);
        for (long j = 0; j < C; j++)
            ts[j] += (g0[j] * g0[j] * i0 + g1[j] * g1[j] * i1) + (g2[j] * g2[j] * i2 + g3[j] * g3[j] * i3);
    }
    for (long i = 4 * q; i < R; i++) {  /* the last R % 4 rows */
        const float* gi = g + i * C;
        float s = 0.0f;
        for (long j = 0; j < C; j++) { float v = gi[j] * gi[j]; s += v; cs[j] += v; }
        const float inv = af_row_update(row + i, s, C, w, eps1);
        for (long j = 0; j < C; j++) ts[j] += gi[j] * gi[j] * inv;
    }
}

/* Column statistics from nparts partial sums (C apart), the factors a_i = (R_i / mean R)^-1/2 and b_j = C_j^-1/2;
   returns sum_ij U_ij^2 (U = g a b, before clipping). */
double af_finalize(float* row, float* col, const float* cs, const float* ts, int nparts, float* a, float* b, long R,
                   long C, float w, float eps1) {
    double total = 0.0;
    for (long i = 0; i < R; i++) total += row[i];
    const float mean = (float)(total / (double)R);
    for (long i = 0; i < R; i++) a[i] = 1.0f / sqrtf(row[i] / mean);
    double sumsq = 0.0;
    for (long j = 0; j < C; j++) {
        float c = cs[j];
        double t = ts[j];
        for (int k = 1; k < nparts; k++) { c += cs[k * C + j]; t += ts[k * C + j]; }
        col[j] = lerpf(col[j], c / (float)R + eps1, w);
        b[j] = 1.0f / sqrtf(col[j]);
        sumsq += t / col[j];
    }
    return sumsq * mean;
}

/* adafactor_v2's momentum update over n elements of one row (bf16 momentum before the lr, decay x - r*x). */
#define AF_CHUNK 64
static inline void af_bf16_momentum_chunk(float* restrict x, const float* restrict g, uint16_t* restrict m,
                                          const float* restrict b, long n, float ai, float alpha, float w1, float r) {
    for (long j = 0; j < n; j++) {
        const float u = g[j] * ai * b[j];
        const float old = bf16_to_f32(m[j]);
        const float mj = fmaf(w1, u - old, old);  /* lerp(old, u, w1) for w1 < 0.5, as torch */
        m[j] = f32_to_bf16(mj);
        x[j] = fmaf(-r, x[j], x[j]) - alpha * mj;
    }
}

/* Write-back. scale = +-clip factor; mode 0: no momentum, 1: momentum before lr, 2: momentum after lr.
   m32 or m16 holds the momentum (one of them NULL). decay: x - r*x, or x*(1-r) with factor != 0. */
void af_apply(float* x, const float* g, const float* a, const float* b, long R, long C, float scale, float alpha,
              int mode, float beta1, float* m32, uint16_t* m16, float r, int factor) {
    /* decay: x - r*x as torch's add_(x, alpha=-r), a fused multiply-add */
    const float keep = 1.0f - r, w1 = 1.0f - beta1;
    long first = 0;
    if (!factor && mode == 0) {
        /* No momentum: two far-apart rows per inner loop (twice the concurrent streams, as af_sums). */
        const long half = R / 2;
        for (long i = 0; i < half; i++) {
            const float *g0 = g + i * C, *g1 = g + (i + half) * C;
            float *x0 = x + i * C, *x1 = x + (i + half) * C;
            const float a0 = a[i] * scale, a1 = a[i + half] * scale;
            for (long j = 0; j < C; j++) {
                float u0 = g0[j] * a0 * b[j], u1 = g1[j] * a1 * b[j];
                x0[j] = fmaf(-r, x0[j], x0[j]) - alpha * u0;
                x1[j] = fmaf(-r, x1[j], x1[j]) - alpha * u1;
            }
        }
        first = 2 * half;  /* an odd last row, if any, takes the general loop */
    }
    if (!factor && mode == 1 && m16 && w1 < 0.5f) {
        /* adafactor_v2's case (bf16 momentum before the lr): two far-apart rows, alternating in chunks of 64
           elements. One loop over both rows does not vectorise (the bf16 conversions of two streams); chunks keep
           both streams in flight and each chunk loop vectorises: measured 49 -> 42 ms on the 58M set. */
        const long half = R / 2;
        for (long i = 0; i < half; i++) {
            const long i1 = i + half;
            const float a0 = a[i] * scale, a1 = a[i1] * scale;
            for (long j0 = 0; j0 < C; j0 += AF_CHUNK) {
                const long n = C - j0 < AF_CHUNK ? C - j0 : AF_CHUNK;
                af_bf16_momentum_chunk(x + i * C + j0, g + i * C + j0, m16 + i * C + j0, b + j0, n, a0, alpha, w1, r);
                af_bf16_momentum_chunk(x + i1 * C + j0, g + i1 * C + j0, m16 + i1 * C + j0, b + j0, n, a1, alpha, w1,
                                       r);
            }
        }
        first = 2 * half;
    }
    for (long i = first; i < R; i++) {
        const float* gi = g + i * C; float* xi = x + i * C;
        const float ai = a[i] * scale;
        if (mode == 0) {
            for (long j = 0; j < C; j++) {
                float u = gi[j] * ai * b[j];
                float xv = factor ? xi[j] * keep : fmaf(-r, xi[j], xi[j]);
                xi[j] = xv - alpha * u;
            }
        } else if (m32) {
            float* mi = m32 + i * C;
            for (long j = 0; j < C; j++) {
                float u = gi[j] * ai * b[j];
                float target = mode == 1 ? u : alpha * u;
                float m = lerpf(mi[j], target, w1);
                mi[j] = m;
                float xv = factor ? xi[j] * keep : fmaf(-r, xi[j], xi[j]);
                xi[j] = xv - (mode == 1 ? alpha * m : m);
            }
        } else if (mode == 1 && !factor && w1 < 0.5f) {  /* an odd last row of adafactor_v2's case */
            af_bf16_momentum_chunk(xi, gi, m16 + i * C, b, C, ai, alpha, w1, r);
        } else {
            uint16_t* mi = m16 + i * C;
            for (long j = 0; j < C; j++) {
                float u = gi[j] * ai * b[j];
                float target = mode == 1 ? u : alpha * u;
                float old = bf16_to_f32(mi[j]);
                float m = lerpf(old, target, w1);
                mi[j] = f32_to_bf16(m);
                float xv = factor ? xi[j] * keep : fmaf(-r, xi[j], xi[j]);
                xi[j] = xv - (mode == 1 ? alpha * m : m);
            }
        }
    }
}

/* Whole steps of n matrices on one thread, without returning to Python between them (the interpreter's work between
   kernels runs with cold caches and cost ~2.5 ms per step on the 58M set). Per matrix k: ptrs[6k..6k+5] = x, g, row
   statistics, column statistics, fp32 momentum, bf16 momentum (0 when absent); dims[2k..] = R, C; vals[3k..] =
   1 - beta2, alpha, decay. scratch: at least max(R + 3C) floats. clip <= 0: no update clipping. */
void af_step_batch(long n, const int64_t* ptrs, const long* dims, const float* vals, float* scratch, float eps1,
                   float clip, int maximize, int mode, float beta1, int factor) {
    for (long k = 0; k < n; k++) {
        const int64_t* p = ptrs + 6 * k;
        float* x = (float*)(intptr_t)p[0];
        const float* g = (const float*)(intptr_t)p[1];
        float *row = (float*)(intptr_t)p[2], *col = (float*)(intptr_t)p[3], *m32 = (float*)(intptr_t)p[4];
        uint16_t* m16 = (uint16_t*)(intptr_t)p[5];
        const long R = dims[2 * k], C = dims[2 * k + 1];
        const float w = vals[3 * k], alpha = vals[3 * k + 1], decay = vals[3 * k + 2];
        float *cs = scratch, *ts = cs + C, *a = ts + C, *b = a + R;
        af_sums(g, row, cs, ts, R, C, w, eps1);
        const double sumsq = af_finalize(row, col, cs, ts, 1, a, b, R, C, w, eps1);
        double scale = 1.0;
        if (clip > 0.0f) {
            const double ratio = sqrt(sumsq / (double)(R * C)) / (double)clip;
            scale = 1.0 / (ratio > 1.0 ? ratio : 1.0);
        }
        af_apply(x, g, a, b, R, C, (float)(maximize ? -scale : scale), alpha, mode, beta1, m32, m16, decay, factor);
    }
}
