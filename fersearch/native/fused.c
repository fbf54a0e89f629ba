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
