/* Fused CPU kernels for fersearch, compiled at first use by fersearch/native.py.

   Feature maps arrive as raw pointers to contiguous channels-last float32 data: a map of
   shape (N, C, H, W) is stored as [N][H][W][C]. The kernels are single-threaded and
   memory-bound; each makes as few passes over the data as it can, and the hot loops run over
   whole image rows (W * C floats) without branches so that the compiler vectorises them. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Repeats a per-channel vector along a row of W * C values. */
static void tile(const float *v, int64_t C, int64_t len, float *row)
{
    for (int64_t j = 0; j < len; j++) row[j] = v[j % C];
}

/* Each channel's sum of x (total values, channel = index % C), and of x * y (x * x when y is
   NULL), in double. Sums run in float over `period` lanes (a multiple of C and of 8, so the
   inner loop vectorises) and are folded into the doubles every 64 periods. */
static void channel_sums(const float *x, const float *y, int64_t total, int64_t C,
                         double *sum, double *sumxy)
{
    int64_t period = C;
    while (period % 8 && period < 256) period += C;
    if (period % 8) period = C;
    float *acc = malloc(sizeof(float) * 2 * period), *acc2 = acc + period;
    memset(sum, 0, sizeof(double) * C);
    memset(sumxy, 0, sizeof(double) * C);
    const int64_t full = total - total % period;
    int64_t j = 0;
    while (j < full) {
        memset(acc, 0, sizeof(float) * 2 * period);
        int64_t stop = j + 64 * period < full ? j + 64 * period : full;
        for (; j < stop; j += period) {
            const float *p = x + j, *q = y ? y + j : x + j;
            for (int64_t k = 0; k < period; k++) {
                acc[k] += p[k];
                acc2[k] += p[k] * q[k];
            }
        }
        for (int64_t k = 0, c = 0; k < period; k++, c = c + 1 == C ? 0 : c + 1) {
            sum[c] += acc[k];
            sumxy[c] += acc2[k];
        }
    }
    for (; j < total; j++) {
        sum[j % C] += x[j];
        sumxy[j % C] += (double)x[j] * (y ? y[j] : x[j]);
    }
    free(acc);
}

/* Training-mode batch norm, ReLU and 2x2 max-pool of x (N, H, W, C; H and W even).

   Batch norm is a * x + b per channel (a = gamma * invstd, b = beta - a * mean) and an
   increasing map commutes with ReLU and max-pool, so each window's winner is the input with
   the largest a * x (the smallest x when a < 0). Ties go to the first input in row-major
   order, as in PyTorch's max-pool. Writes out = max(0, a * x_win + b), the winner's slot
   (0..3, row-major) and raw value, all (N, H/2, W/2, C), and mean, var (biased) and invstd
   per channel. */
void bnrp_forward(const float *x, int64_t N, int64_t H, int64_t W, int64_t C,
                  const float *gamma, const float *beta, double eps,
                  float *out, uint8_t *slot, float *winner,
                  float *mean, float *var, float *invstd)
{
    const int64_t H2 = H / 2, W2 = W / 2, row = W * C, row2 = W2 * C;
    double *sum = malloc(sizeof(double) * 2 * C), *sumsq = sum + C;
    float *a = malloc(sizeof(float) * (2 * C + 3 * row + row2));
    float *b = a + C, *arow = b + C, *best = arow + row, *raw = best + row, *brow = raw + row;
    uint8_t *lower = malloc(row);
    int32_t *left = malloc(sizeof(int32_t) * row2); /* pooled (w, c) -> its left input's (2w, c) */
    for (int64_t w = 0; w < W2; w++)
        for (int64_t c = 0; c < C; c++) left[w * C + c] = (int32_t)(2 * w * C + c);
    channel_sums(x, NULL, N * H * row, C, sum, sumsq);
    const double count = (double)(N * H * W);
    for (int64_t c = 0; c < C; c++) {
        double m = sum[c] / count, v = sumsq[c] / count - m * m;
        if (v < 0) v = 0;
        mean[c] = (float)m;
        var[c] = (float)v;
        invstd[c] = (float)(1.0 / sqrt(v + eps));
        a[c] = gamma[c] * invstd[c];
        b[c] = beta[c] - a[c] * mean[c];
    }
    tile(a, C, row, arow);
    tile(b, C, row2, brow);
    for (int64_t nh = 0; nh < N * H2; nh++) {
        const float *top = x + 2 * nh * row, *bot = top + row;
        /* Rows first: the lower input wins only if strictly larger. */
        for (int64_t j = 0; j < row; j++) {
            float t = arow[j] * top[j], u = arow[j] * bot[j];
            uint8_t l = u > t;
            lower[j] = l;
            best[j] = l ? u : t;
            raw[j] = l ? bot[j] : top[j];
        }
        /* Then columns: the right winner takes the window if larger, or if equal and it comes
           first in row-major order (upper right before lower left). Bitwise, not
           short-circuit, so there are no data-dependent branches. */
        float *o = out + nh * row2, *xw = winner + nh * row2;
        uint8_t *s = slot + nh * row2;
        for (int64_t j = 0; j < row2; j++) {
            const int32_t jl = left[j], jr = jl + (int32_t)C;
            const float bl = best[jl], br = best[jr];
            const int ll = lower[jl], lr = lower[jr];
            const int right = (br > bl) | ((br == bl) & (lr < ll));
            const int32_t k = jl + right * (int32_t)C;
            const float y = best[k] + brow[j];
            o[j] = y < 0 ? 0.0f : y; /* a ReLU that keeps NaN, as PyTorch's does */
            xw[j] = raw[k];
            s[j] = (uint8_t)(2 * lower[k] + right);
        }
    }
    free(sum);
    free(a);
    free(lower);
    free(left);
}

/* Gradients of bnrp_forward. grad, out, slot and winner: (N, H/2, W/2, C);
   grad_x: (N, H, W, C). Writes grad_gamma and grad_beta. */
void bnrp_backward(const float *grad, const float *x, const uint8_t *slot, const float *winner,
                   const float *out, int64_t N, int64_t H, int64_t W, int64_t C,
                   const float *gamma, const float *mean, const float *invstd,
                   float *grad_x, float *grad_gamma, float *grad_beta)
{
    const int64_t H2 = H / 2, W2 = W / 2, row = W * C, row2 = W2 * C;
    const int64_t pooled = N * H2 * row2;
    double *sg = malloc(sizeof(double) * 2 * C), *sgx = sg + C;
    float *g = malloc(sizeof(float) * (2 * pooled + 3 * row + 3 * C));
    float *centred = g + pooled, *c1row = centred + pooled, *d0row = c1row + row;
    float *meanrow = d0row + row, *a = meanrow + row, *c1 = a + C, *d0 = c1 + C;
    /* Pass 1: the ReLU-masked gradient, and its sums plain and times the winner's x - mean. */
    tile(mean, C, row2, meanrow);
    for (int64_t r = 0; r < N * H2; r++) {
        const int64_t off = r * row2;
        for (int64_t j = 0; j < row2; j++) {
            g[off + j] = out[off + j] > 0 ? grad[off + j] : 0.0f;
            centred[off + j] = winner[off + j] - meanrow[j];
        }
    }
    channel_sums(g, centred, pooled, C, sg, sgx);
    const double count = (double)(N * H * W);
    for (int64_t c = 0; c < C; c++) {
        double gx = sgx[c] * invstd[c];
        grad_gamma[c] = (float)gx;
        grad_beta[c] = (float)sg[c];
        a[c] = gamma[c] * invstd[c];
        /* Every input gets c1 * (x - mean) + c0 = c1 * x + d0. */
        double c1d = -a[c] * invstd[c] * gx / count, c0 = -a[c] * sg[c] / count;
        c1[c] = (float)c1d;
        d0[c] = (float)(c0 - c1d * mean[c]);
    }
    tile(c1, C, row, c1row);
    tile(d0, C, row, d0row);
    /* Pass 2: write every input's share, then add a * grad to each window's winner. */
    for (int64_t nh = 0; nh < N * H2; nh++) {
        const float *top = x + 2 * nh * row;
        float *gtop = grad_x + 2 * nh * row;
        for (int64_t r = 0; r < 2 * row; r += row)
            for (int64_t j = 0; j < row; j++) gtop[r + j] = c1row[j] * top[r + j] + d0row[j];
        const float *gp = g + nh * row2;
        const uint8_t *s = slot + nh * row2;
        for (int64_t w = 0; w < W2; w++)
            for (int64_t c = 0; c < C; c++) {
                const uint8_t k = s[w * C + c];
                gtop[(k >> 1) * row + (2 * w + (k & 1)) * C + c] += a[c] * gp[w * C + c];
            }
    }
    free(sg);
    free(g);
}

/* Eight floats, with GCC/Clang vector extensions: the convolutions below are written on these so
   that their accumulators stay in registers whatever the compiler's vectoriser decides. */
typedef float v8 __attribute__((vector_size(32)));
#define LANES 8
#define BLOCKS 8 /* at most BLOCKS * LANES outputs per row: 64 columns */

static inline v8 load8(const float *p)
{
    v8 r;
    memcpy(&r, p, sizeof r);
    return r;
}

static inline v8 splat8(float f)
{
    v8 r = {f, f, f, f, f, f, f, f};
    return r;
}

/* Copies one-channel images (N, H, W) into rows of `stride` floats, zero beyond W, so that
   every block of LANES outputs reads whole blocks without a bound check. */
static float *padded_rows(const float *x, int64_t N, int64_t H, int64_t W, int64_t stride)
{
    float *p = calloc((size_t)(N * H * stride), sizeof(float));
    for (int64_t r = 0; r < N * H; r++) memcpy(p + r * stride, x + r * W, sizeof(float) * W);
    return p;
}

/* Whether conv1_forward/backward take this shape: rows of at most BLOCKS * LANES outputs. */
int conv1_supported(int64_t W, int64_t K)
{
    return K >= 1 && W >= K && W - K + 1 <= BLOCKS * LANES;
}

/* Convolution of one-channel images x (N, H, W) with C filters w (C, K, K) plus bias, stride 1,
   no padding: out (N, Ho, Wo, C) channels-last, Ho = H - K + 1, Wo = W - K + 1.
   oneDNN runs this shape (one input channel) far below its matmul rate. Here a whole output row
   of one channel is summed over the K * K taps in registers, then interleaved into
   channels-last order. */
/* One output row of two channels, nb blocks; inlined into a copy per constant nb (see the
   switch below) so that the accumulators live in registers and each input load serves both
   channels. */
static inline __attribute__((always_inline)) void conv1_row2(const float *xp, int64_t stride,
                                                             const float *w0, const float *w1,
                                                             float b0, float b1, int64_t K,
                                                             int64_t nb, float *d0, float *d1)
{
    v8 a0[BLOCKS], a1[BLOCKS];
    for (int64_t b = 0; b < nb; b++) {
        a0[b] = splat8(b0);
        a1[b] = splat8(b1);
    }
    for (int64_t ky = 0; ky < K; ky++) {
        const float *xr = xp + ky * stride;
        for (int64_t kx = 0; kx < K; kx++) {
            const v8 u0 = splat8(w0[ky * K + kx]), u1 = splat8(w1[ky * K + kx]);
            for (int64_t b = 0; b < nb; b++) {
                const v8 xv = load8(xr + kx + b * LANES);
                a0[b] += u0 * xv;
                a1[b] += u1 * xv;
            }
        }
    }
    memcpy(d0, a0, sizeof(v8) * nb);
    memcpy(d1, a1, sizeof(v8) * nb);
}

void conv1_forward(const float *x, const float *w, const float *bias,
                   int64_t N, int64_t H, int64_t W, int64_t C, int64_t K, float *out)
{
    const int64_t Ho = H - K + 1, Wo = W - K + 1, nb = (Wo + LANES - 1) / LANES;
    const int64_t stride = nb * LANES + K - 1, rb = nb * LANES;
    float *xp = padded_rows(x, N, H, W, stride);
    float *buf = malloc(sizeof(float) * (C + 1) * rb); /* a spare row for odd C */
    for (int64_t n = 0; n < N; n++)
        for (int64_t oy = 0; oy < Ho; oy++) {
            const float *xr = xp + (n * H + oy) * stride;
            for (int64_t c = 0; c < C; c += 2) {
                /* For odd C the last pair repeats the last channel into the spare row. */
                const int64_t c1 = c + 1 < C ? c + 1 : c;
                const float *w0 = w + c * K * K, *w1 = w + c1 * K * K;
                float *d0 = buf + c * rb, *d1 = buf + (c + 1) * rb;
                switch (nb) {
#define ROW(NB) case NB: conv1_row2(xr, stride, w0, w1, bias[c], bias[c1], K, NB, d0, d1); break;
                ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8)
#undef ROW
                }
            }
            float *o = out + (n * Ho + oy) * Wo * C;
            for (int64_t ox = 0; ox < Wo; ox++)
                for (int64_t c = 0; c < C; c++) o[ox * C + c] = buf[c * rb + ox];
        }
    free(xp);
    free(buf);
}

/* Gradients of conv1_forward's filters and bias from grad (N, Ho, Wo, C) channels-last.
   Each tap's products are summed per lane in float over all rows, then folded in double. */
/* One row's contribution to every tap of one channel (see conv1_row). */
static inline __attribute__((always_inline)) void conv1_grad_row(const float *xp, int64_t stride,
                                                                 const float *gc, int64_t K,
                                                                 int64_t nb, v8 *acc, v8 *bacc)
{
    v8 gb[BLOCKS];
    v8 gsum = splat8(0.0f);
    for (int64_t b = 0; b < nb; b++) {
        gb[b] = load8(gc + b * LANES);
        gsum += gb[b];
    }
    *bacc += gsum;
    for (int64_t ky = 0; ky < K; ky++) {
        const float *xr = xp + ky * stride;
        for (int64_t kx = 0; kx < K; kx++) {
            v8 t = gb[0] * load8(xr + kx);
            for (int64_t b = 1; b < nb; b++) t += gb[b] * load8(xr + kx + b * LANES);
            acc[ky * K + kx] += t;
        }
    }
}

void conv1_backward(const float *grad, const float *x, int64_t N, int64_t H, int64_t W,
                    int64_t C, int64_t K, float *grad_w, float *grad_b)
{
    const int64_t Ho = H - K + 1, Wo = W - K + 1, nb = (Wo + LANES - 1) / LANES, taps = C * K * K;
    const int64_t stride = nb * LANES + K - 1;
    float *xp = padded_rows(x, N, H, W, stride);
    /* g: one row of grad, planar and zero beyond Wo, so the padded lanes add nothing. */
    float *g = calloc((size_t)(C * nb * LANES), sizeof(float));
    /* v8 needs 32-byte alignment, more than malloc promises. */
    v8 *acc = aligned_alloc(sizeof(v8), (size_t)(taps + C) * sizeof(v8)), *bacc = acc + taps;
    memset(acc, 0, (size_t)(taps + C) * sizeof(v8));
    for (int64_t n = 0; n < N; n++)
        for (int64_t oy = 0; oy < Ho; oy++) {
            const float *gr = grad + (n * Ho + oy) * Wo * C;
            for (int64_t ox = 0; ox < Wo; ox++)
                for (int64_t c = 0; c < C; c++) g[c * nb * LANES + ox] = gr[ox * C + c];
            const float *xr = xp + (n * H + oy) * stride;
            for (int64_t c = 0; c < C; c++) {
                const float *gc = g + c * nb * LANES;
                v8 *a = acc + c * K * K;
                switch (nb) {
#define ROW(NB) case NB: conv1_grad_row(xr, stride, gc, K, NB, a, bacc + c); break;
                ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8)
#undef ROW
                }
            }
        }
    for (int64_t t = 0; t < taps + C; t++) {
        double s = 0;
        for (int v = 0; v < LANES; v++) s += acc[t][v];
        if (t < taps) grad_w[t] = (float)s;
        else grad_b[t - taps] = (float)s;
    }
    free(xp);
    free(g);
    free(acc);
}
