/* CPU training kernels for fersearch, compiled at first use by fersearch/native.py:
   - bnrp_forward/backward: batch norm (training), ReLU and 2x2 max-pool fused into one
     kernel each way;
   - conv1_forward/backward: a convolution of one-channel images (not fused with anything);
   - conv_grad_input: the input gradient of a narrow convolution (not fused either).

   Layouts (all float32, contiguous, sizes as int64):
   - feature maps with channels are channels-last: a map PyTorch shapes (N, C, H, W) is
     stored as [N][H][W][C];
   - conv1's input has one channel, so it is plain [N][H][W];
   - filters are as PyTorch holds them, [Co][Ci][K][K];
   - per-channel vectors (gamma, mean, ...) are [C].

   Every exported kernel returns FS_OK, or FS_BAD_SHAPE for a shape it does not take (checked
   before any memory is touched) or FS_NO_MEMORY when a scratch allocation fails; its outputs
   are then undefined and fersearch/native.py raises a Python exception. Each kernel splits its
   rows among `threads` threads (PyTorch's intra-op count) and makes as few passes over the
   data as it can; the hot loops run over whole rows without data-dependent branches so that
   they vectorise. */

#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* ---- results ---- */

enum { FS_OK = 0, FS_NO_MEMORY = 1, FS_BAD_SHAPE = 2 };

/* Largest element count of any buffer a kernel reads, writes or allocates: 2^40 floats (4 TiB)
   is far beyond any real map, and keeps every byte count and index product below 2^63. */
#define MAX_ELEMENTS ((int64_t)1 << 40)

/* Whether all `n` sizes are at least 1 and their product is at most MAX_ELEMENTS. */
static int sizes_ok(int n, const int64_t *sizes)
{
    int64_t product = 1;
    for (int i = 0; i < n; i++) {
        if (sizes[i] < 1 || sizes[i] > MAX_ELEMENTS / product) return 0;
        product *= sizes[i];
    }
    return 1;
}
#define SIZES_OK(...) sizes_ok(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t), (int64_t[]){__VA_ARGS__})

/* ---- splitting work among threads ----
   With OpenMP (-fopenmp) the parts run on the process's OpenMP pool, which is meant to be
   PyTorch's own: the library is loaded after torch, so `libgomp.so.1` resolves to the copy
   torch loaded, and fersearch/native.py checks this at load time (a second runtime would
   compete with PyTorch's spinning threads). Without OpenMP the parts run one after another. */

#define MIN_ROWS_PER_PART 8

/* Works on rows [begin, end); returns FS_OK or FS_NO_MEMORY. */
typedef int (*part_fn)(void *ctx, int64_t begin, int64_t end, int part);

/* How many parts `total` rows are split into. */
static int parts_for(int threads, int64_t total)
{
    int64_t n = threads < 1 ? 1 : threads;
    if (n > total / MIN_ROWS_PER_PART) n = total / MIN_ROWS_PER_PART;
    return n < 1 ? 1 : (int)n;
}

/* Parts for kernels that split by image: at most one per image. */
static int image_parts(int threads, int64_t N, int64_t rows_per_image)
{
    const int parts = parts_for(threads, N * rows_per_image);
    return parts > N ? (int)(N > 0 ? N : 1) : parts;
}

/* Runs fn on `parts` contiguous slices of [0, total), one per thread, and waits for all;
   returns the worst of their results. */
static int parallel_for(int parts, int64_t total, part_fn fn, void *ctx)
{
    if (parts <= 1) return fn(ctx, 0, total, 0);
    int status = FS_OK;
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(max : status)
    for (int t = 0; t < parts; t++) {
        const int s = fn(ctx, total * t / parts, total * (t + 1) / parts, t);
        if (s > status) status = s;
    }
    return status;
}

/* ---- helpers ---- */

/* Eight floats, with GCC/Clang vector extensions: the kernels below are written on these
   so that their accumulators stay in registers whatever the compiler's vectoriser decides. */
typedef float v8 __attribute__((vector_size(32)));
#define LANES 8

static inline v8 load8(const float *p)
{
    v8 r;
    memcpy(&r, p, sizeof r);
    return r;
}

static inline void store8(float *p, v8 v)
{
    memcpy(p, &v, sizeof v);
}

static inline v8 splat8(float f)
{
    v8 r = {f, f, f, f, f, f, f, f};
    return r;
}

/* A lane mask, as vector comparisons give it (-1 where true), and a select by it. */
typedef int32_t i8v __attribute__((vector_size(32)));

static inline v8 blend8(i8v mask, v8 yes, v8 no)
{
    return (v8)((mask & (i8v)yes) | (~mask & (i8v)no));
}

/* Keeps a vector in a register. Where a loaded vector feeds several multiply-adds, compilers
   fold its load into each of them, and loads then bound the loop instead of the FMAs (the
   input gradient below measured 30% slower). Only where 8-float vectors are AVX registers. */
#if defined(__GNUC__) && defined(__AVX__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

/* Repeats a per-channel vector along a row of len values. */
static void tile(const float *v, int64_t C, int64_t len, float *row)
{
    for (int64_t j = 0; j < len; j++) row[j] = v[j % C];
}

/* Adds each channel's sum of x (total values, channel = index % C), and of x * y (x * x when
   y is NULL), into double accumulators. Sums run in float over `period` lanes (a multiple of
   C and of 8, so the inner loop vectorises) and are folded into the doubles every 64 periods. */
static int channel_sums(const float *x, const float *y, int64_t total, int64_t C,
                        double *sum, double *sumxy)
{
    int64_t period = C;
    while (period % 8 && period < 256) period += C;
    if (period % 8) period = C;
    float *acc = malloc(sizeof(float) * 2 * period);
    if (!acc) return FS_NO_MEMORY;
    float *acc2 = acc + period;
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
    return FS_OK;
}

/* Folds the per-part sums (parts x 2C doubles: sums, then sums of products) into the first. */
static void fold_parts(double *sums, int parts, int64_t C)
{
    for (int p = 1; p < parts; p++)
        for (int64_t c = 0; c < 2 * C; c++) sums[c] += sums[p * 2 * C + c];
}

/* ---- batch norm (training), ReLU and 2x2 max-pool ---- */

struct bnrp {
    const float *x, *grad, *out_c, *winner_c;
    const uint8_t *slot_c;
    float *out, *winner, *grad_x, *g, *centred;
    uint8_t *slot;
    int64_t C, row, row2;
    double *sums;      /* parts x 2C */
    const float *a, *b, *mean, *c1, *d0;
};

static int bnrp_stats_part(void *ctx, int64_t begin, int64_t end, int part)
{
    struct bnrp *k = ctx;
    double *s = k->sums + part * 2 * k->C;
    return channel_sums(k->x + begin * k->row, NULL, (end - begin) * k->row, k->C, s, s + k->C);
}

/* Pools rows of windows [begin, end). Batch norm is a * x + b per channel and an increasing
   map commutes with ReLU and max-pool, so each window's winner is the input with the largest
   a * x (the smallest x when a < 0). */
static int bnrp_pool_part(void *ctx, int64_t begin, int64_t end, int part)
{
    struct bnrp *k = ctx;
    const int64_t C = k->C, row = k->row, row2 = k->row2, W2 = row2 / C;
    (void)part;
    /* Row buffers with LANES floats of slack: the column pass reads and writes whole vectors. */
    const int64_t pad = row + LANES;
    float *buf = calloc((size_t)(4 * pad + 4 * (row2 + LANES)), sizeof(float));
    if (!buf) return FS_NO_MEMORY;
    float *arow = buf, *best = arow + pad, *raw = best + pad, *lower = raw + pad;
    float *brow = lower + pad, *ob = brow + row2 + LANES, *wb = ob + row2 + LANES, *sb = wb + row2 + LANES;
    tile(k->a, C, row, arow);
    tile(k->b, C, row2, brow);
    for (int64_t nh = begin; nh < end; nh++) {
        const float *top = k->x + 2 * nh * row, *bot = top + row;
        /* Rows first: the lower input wins only if strictly larger. */
        for (int64_t j = 0; j < row; j++) {
            float t = arow[j] * top[j], u = arow[j] * bot[j];
            int l = u > t;
            lower[j] = (float)l;
            best[j] = l ? u : t;
            raw[j] = l ? bot[j] : top[j];
        }
        /* Then columns, LANES channels of one output pixel at a time: the right winner takes
           the window if larger, or if equal and it comes first in row-major order (upper right
           before lower left), as in PyTorch's max-pool. With fewer than LANES channels the
           extra lanes spill into the next pixel's slots, which that pixel then overwrites. */
        for (int64_t w = 0; w < W2; w++)
            for (int64_t c = 0; c < C; c += LANES) {
                const int64_t jl = 2 * w * C + c, jr = jl + C, j = w * C + c;
                const v8 bl = load8(best + jl), br = load8(best + jr);
                const v8 ll = load8(lower + jl), lr = load8(lower + jr);
                const i8v right = (br > bl) | ((br == bl) & (lr < ll));
                const v8 y = blend8(right, br, bl) + load8(brow + j);
                const v8 o = blend8(y < splat8(0.0f), splat8(0.0f), y); /* keeps NaN, as PyTorch's ReLU */
                const v8 s = splat8(2.0f) * blend8(right, lr, ll) + blend8(right, splat8(1.0f), splat8(0.0f));
                const v8 xw = blend8(right, load8(raw + jr), load8(raw + jl));
                store8(ob + j, o);
                store8(wb + j, xw);
                store8(sb + j, s);
            }
        memcpy(k->out + nh * row2, ob, sizeof(float) * row2);
        memcpy(k->winner + nh * row2, wb, sizeof(float) * row2);
        uint8_t *s = k->slot + nh * row2;
        for (int64_t j = 0; j < row2; j++) s[j] = (uint8_t)sb[j];
    }
    free(buf);
    return FS_OK;
}

/* Training-mode batch norm, ReLU and 2x2 max-pool of x (N, H, W, C; H and W even). Writes
   out = max(0, a * x_win + b) with a = gamma * invstd and b = beta - a * mean, the winner's
   slot (0..3, row-major) and raw value, all (N, H/2, W/2, C), and mean, var (biased) and
   invstd per channel. */
int bnrp_forward(const float *x, int64_t N, int64_t H, int64_t W, int64_t C,
                 const float *gamma, const float *beta, double eps,
                 float *out, uint8_t *slot, float *winner,
                 float *mean, float *var, float *invstd, int threads)
{
    if (!SIZES_OK(N, H, W, C) || H % 2 || W % 2 || !(eps >= 0)) return FS_BAD_SHAPE;
    const int64_t H2 = H / 2;
    const int parts = parts_for(threads, N * H2);
    float *ab = malloc(sizeof(float) * 2 * C);
    struct bnrp k = {.x = x, .out = out, .winner = winner, .slot = slot, .C = C,
                     .row = W * C, .row2 = (W / 2) * C, .a = ab, .b = ab + C};
    k.sums = calloc((size_t)parts * 2 * C, sizeof(double));
    int status = ab && k.sums ? parallel_for(parts, N * H, bnrp_stats_part, &k) : FS_NO_MEMORY;
    if (status != FS_OK) goto done;
    fold_parts(k.sums, parts, C);
    const double count = (double)(N * H * W);
    for (int64_t c = 0; c < C; c++) {
        double m = k.sums[c] / count, v = k.sums[C + c] / count - m * m;
        if (v < 0) v = 0;
        mean[c] = (float)m;
        var[c] = (float)v;
        invstd[c] = (float)(1.0 / sqrt(v + eps));
        ab[c] = gamma[c] * invstd[c];
        ab[C + c] = beta[c] - ab[c] * mean[c];
    }
    status = parallel_for(parts, N * H2, bnrp_pool_part, &k);
done:
    free(k.sums);
    free(ab);
    return status;
}

/* Pass 1 of the backward: the ReLU-masked gradient, and its sums plain and times the winner's
   x - mean. */
static int bnrp_sums_part(void *ctx, int64_t begin, int64_t end, int part)
{
    struct bnrp *k = ctx;
    const int64_t C = k->C, row2 = k->row2;
    float *meanrow = malloc(sizeof(float) * row2);
    if (!meanrow) return FS_NO_MEMORY;
    tile(k->mean, C, row2, meanrow);
    for (int64_t r = begin; r < end; r++) {
        const int64_t off = r * row2;
        for (int64_t j = 0; j < row2; j++) {
            k->g[off + j] = k->out_c[off + j] > 0 ? k->grad[off + j] : 0.0f;
            k->centred[off + j] = k->winner_c[off + j] - meanrow[j];
        }
    }
    free(meanrow);
    double *s = k->sums + part * 2 * C;
    return channel_sums(k->g + begin * row2, k->centred + begin * row2, (end - begin) * row2, C, s, s + C);
}

/* Pass 2: every input gets c1 * x + d0 (the batch-norm terms); each window's winner also gets
   a * grad. */
static int bnrp_grad_part(void *ctx, int64_t begin, int64_t end, int part)
{
    struct bnrp *k = ctx;
    const int64_t C = k->C, row = k->row, row2 = k->row2;
    (void)part;
    float *c1row = malloc(sizeof(float) * 2 * row);
    if (!c1row) return FS_NO_MEMORY;
    float *d0row = c1row + row;
    tile(k->c1, C, row, c1row);
    tile(k->d0, C, row, d0row);
    for (int64_t nh = begin; nh < end; nh++) {
        const float *top = k->x + 2 * nh * row;
        float *gtop = k->grad_x + 2 * nh * row;
        for (int64_t r = 0; r < 2 * row; r += row)
            for (int64_t j = 0; j < row; j++) gtop[r + j] = c1row[j] * top[r + j] + d0row[j];
        const float *gp = k->g + nh * row2;
        const uint8_t *s = k->slot_c + nh * row2;
        for (int64_t w = 0; w < row2 / C; w++)
            for (int64_t c = 0; c < C; c++) {
                const uint8_t q = s[w * C + c];
                gtop[(q >> 1) * row + (2 * w + (q & 1)) * C + c] += k->a[c] * gp[w * C + c];
            }
    }
    free(c1row);
    return FS_OK;
}

/* Gradients of bnrp_forward. grad, out, slot and winner: (N, H/2, W/2, C);
   grad_x: (N, H, W, C). Writes grad_gamma and grad_beta. */
int bnrp_backward(const float *grad, const float *x, const uint8_t *slot, const float *winner,
                  const float *out, int64_t N, int64_t H, int64_t W, int64_t C,
                  const float *gamma, const float *mean, const float *invstd,
                  float *grad_x, float *grad_gamma, float *grad_beta, int threads)
{
    if (!SIZES_OK(N, H, W, C) || H % 2 || W % 2) return FS_BAD_SHAPE;
    const int64_t H2 = H / 2, row2 = (W / 2) * C, pooled = N * H2 * row2;
    const int parts = parts_for(threads, N * H2);
    float *coef = malloc(sizeof(float) * 3 * C);
    float *scratch = malloc(sizeof(float) * 2 * pooled);
    struct bnrp k = {.x = x, .grad = grad, .out_c = out, .winner_c = winner, .slot_c = slot,
                     .grad_x = grad_x, .g = scratch, .centred = scratch ? scratch + pooled : NULL,
                     .C = C, .row = W * C, .row2 = row2, .mean = mean,
                     .a = coef, .c1 = coef ? coef + C : NULL, .d0 = coef ? coef + 2 * C : NULL};
    k.sums = calloc((size_t)parts * 2 * C, sizeof(double));
    int status = coef && scratch && k.sums ? parallel_for(parts, N * H2, bnrp_sums_part, &k) : FS_NO_MEMORY;
    if (status != FS_OK) goto done;
    fold_parts(k.sums, parts, C);
    const double count = (double)(N * H * W);
    for (int64_t c = 0; c < C; c++) {
        const double sg = k.sums[c], gx = k.sums[C + c] * invstd[c];
        grad_gamma[c] = (float)gx;
        grad_beta[c] = (float)sg;
        const double a = (double)gamma[c] * invstd[c];
        const double c1 = -a * invstd[c] * gx / count, c0 = -a * sg / count;
        coef[c] = (float)a;
        coef[C + c] = (float)c1;
        coef[2 * C + c] = (float)(c0 - c1 * mean[c]);
    }
    status = parallel_for(parts, N * H2, bnrp_grad_part, &k);
done:
    free(k.sums);
    free(coef);
    free(scratch);
    return status;
}

/* ---- convolution of one-channel images (the CNN's first layer) ---- */

#define BLOCKS 8 /* at most BLOCKS * LANES outputs per row: 64 columns */

/* Whether conv1_forward/backward take this shape: rows of at most BLOCKS * LANES outputs. */
int conv1_supported(int64_t W, int64_t K)
{
    return K >= 1 && W >= K && W - K + 1 <= BLOCKS * LANES;
}

struct conv1 {
    const float *x, *w, *bias, *grad;
    float *out;
    v8 *acc; /* per part: taps + C accumulators */
    int64_t H, W, C, K;
};

/* Copies image n (H, W) into rows of `stride` floats, zero beyond W, so that every block of
   LANES outputs reads whole blocks without a bound check. */
static void padded_image(const float *x, int64_t H, int64_t W, int64_t stride, float *dst)
{
    memset(dst, 0, sizeof(float) * H * stride);
    for (int64_t r = 0; r < H; r++) memcpy(dst + r * stride, x + r * W, sizeof(float) * W);
}

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
                v8 xv = load8(xr + kx + b * LANES);
                IN_REGISTER(xv);
                a0[b] += u0 * xv;
                a1[b] += u1 * xv;
            }
        }
    }
    memcpy(d0, a0, sizeof(v8) * nb);
    memcpy(d1, a1, sizeof(v8) * nb);
}

static int conv1_forward_part(void *ctx, int64_t begin, int64_t end, int part)
{
    struct conv1 *k = ctx;
    const int64_t H = k->H, W = k->W, C = k->C, K = k->K;
    const int64_t Ho = H - K + 1, Wo = W - K + 1, nb = (Wo + LANES - 1) / LANES;
    const int64_t rb = nb * LANES, stride = rb + K - 1;
    (void)part;
    float *xp = malloc(sizeof(float) * (H * stride + (C + 1) * rb)); /* + a spare row, odd C */
    if (!xp) return FS_NO_MEMORY;
    float *buf = xp + H * stride;
    for (int64_t n = begin; n < end; n++) {
        padded_image(k->x + n * H * W, H, W, stride, xp);
        for (int64_t oy = 0; oy < Ho; oy++) {
            const float *xr = xp + oy * stride;
            for (int64_t c = 0; c < C; c += 2) {
                /* For odd C the last pair repeats the last channel into the spare row. */
                const int64_t c1 = c + 1 < C ? c + 1 : c;
                const float *w0 = k->w + c * K * K, *w1 = k->w + c1 * K * K;
                float *d0 = buf + c * rb, *d1 = buf + (c + 1) * rb;
                switch (nb) {
#define ROW(NB) case NB: conv1_row2(xr, stride, w0, w1, k->bias[c], k->bias[c1], K, NB, d0, d1); break;
                ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8)
#undef ROW
                }
            }
            float *o = k->out + (n * Ho + oy) * Wo * C;
            for (int64_t ox = 0; ox < Wo; ox++)
                for (int64_t c = 0; c < C; c++) o[ox * C + c] = buf[c * rb + ox];
        }
    }
    free(xp);
    return FS_OK;
}

/* Convolution of one-channel images x (N, H, W) with C filters w (C, K, K) plus bias, stride
   1, no padding: out (N, Ho, Wo, C) channels-last, Ho = H - K + 1, Wo = W - K + 1.
   oneDNN runs this shape (one input channel) far below its matmul rate. Here a whole output
   row of two channels is summed over the K * K taps in registers, then interleaved into
   channels-last order. */
int conv1_forward(const float *x, const float *w, const float *bias,
                  int64_t N, int64_t H, int64_t W, int64_t C, int64_t K, float *out, int threads)
{
    if (!SIZES_OK(N, H, W, C, K, K) || H < K || !conv1_supported(W, K)) return FS_BAD_SHAPE;
    struct conv1 k = {.x = x, .w = w, .bias = bias, .out = out, .H = H, .W = W, .C = C, .K = K};
    return parallel_for(image_parts(threads, N, H - K + 1), N, conv1_forward_part, &k);
}

/* One row's contribution to every tap of channels c (gc, acc0) and c1 (gc1, acc1); c1 == c
   for the last of an odd count, whose second sums are then dropped. Each input load serves
   both channels (see conv1_row2). */
static inline __attribute__((always_inline)) void conv1_grad_row2(const float *xp, int64_t stride,
                                                                  const float *gc0, const float *gc1,
                                                                  int64_t K, int64_t nb, v8 *acc0,
                                                                  v8 *acc1, v8 *bacc0, v8 *bacc1)
{
    v8 g0[BLOCKS], g1[BLOCKS];
    v8 s0 = splat8(0.0f), s1 = splat8(0.0f);
    for (int64_t b = 0; b < nb; b++) {
        g0[b] = load8(gc0 + b * LANES);
        g1[b] = load8(gc1 + b * LANES);
        s0 += g0[b];
        s1 += g1[b];
    }
    *bacc0 += s0;
    *bacc1 += s1;
    for (int64_t ky = 0; ky < K; ky++) {
        const float *xr = xp + ky * stride;
        for (int64_t kx = 0; kx < K; kx++) {
            v8 t0 = splat8(0.0f), t1 = splat8(0.0f);
            for (int64_t b = 0; b < nb; b++) {
                v8 xv = load8(xr + kx + b * LANES);
                IN_REGISTER(xv);
                t0 += g0[b] * xv;
                t1 += g1[b] * xv;
            }
            acc0[ky * K + kx] += t0;
            acc1[ky * K + kx] += t1;
        }
    }
}

static int conv1_backward_part(void *ctx, int64_t begin, int64_t end, int part)
{
    struct conv1 *k = ctx;
    const int64_t H = k->H, W = k->W, C = k->C, K = k->K, taps = C * K * K;
    const int64_t Ho = H - K + 1, Wo = W - K + 1, nb = (Wo + LANES - 1) / LANES;
    const int64_t rb = nb * LANES, stride = rb + K - 1;
    v8 *acc = k->acc + part * (taps + C), *bacc = acc + taps;
    float *xp = malloc(sizeof(float) * (H * stride + C * rb));
    v8 *spare = aligned_alloc(sizeof(v8), sizeof(v8) * (K * K + 1)); /* sums of no channel */
    if (!xp || !spare) {
        free(xp);
        free(spare);
        return FS_NO_MEMORY;
    }
    /* g: one row of grad, planar and zero beyond Wo, so the padded lanes add nothing. */
    float *g = xp + H * stride;
    memset(g, 0, sizeof(float) * C * rb);
    for (int64_t n = begin; n < end; n++) {
        padded_image(k->x + n * H * W, H, W, stride, xp);
        for (int64_t oy = 0; oy < Ho; oy++) {
            const float *gr = k->grad + (n * Ho + oy) * Wo * C;
            for (int64_t ox = 0; ox < Wo; ox++)
                for (int64_t c = 0; c < C; c++) g[c * rb + ox] = gr[ox * C + c];
            const float *xr = xp + oy * stride;
            for (int64_t c = 0; c < C; c += 2) {
                /* For odd C the last pair repeats the last channel into spare accumulators. */
                const int64_t c1 = c + 1 < C ? c + 1 : c;
                const float *g0 = g + c * rb, *g1 = g + c1 * rb;
                v8 *a0 = acc + c * K * K, *a1 = c1 > c ? acc + c1 * K * K : spare;
                v8 *b0 = bacc + c, *b1 = c1 > c ? bacc + c1 : spare + K * K;
                switch (nb) {
#define ROW(NB) case NB: conv1_grad_row2(xr, stride, g0, g1, K, NB, a0, a1, b0, b1); break;
                ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8)
#undef ROW
                }
            }
        }
    }
    free(spare);
    free(xp);
    return FS_OK;
}

/* Gradients of conv1_forward's filters and bias from grad (N, Ho, Wo, C) channels-last.
   Each tap's products are summed per lane in float over a part's rows, then folded in double. */
int conv1_backward(const float *grad, const float *x, int64_t N, int64_t H, int64_t W,
                   int64_t C, int64_t K, float *grad_w, float *grad_b, int threads)
{
    if (!SIZES_OK(N, H, W, C, K, K) || H < K || !conv1_supported(W, K)) return FS_BAD_SHAPE;
    const int64_t taps = C * K * K, per = taps + C;
    const int parts = image_parts(threads, N, H - K + 1);
    /* v8 needs 32-byte alignment, more than malloc promises. */
    const size_t bytes = (size_t)parts * per * sizeof(v8);
    struct conv1 k = {.x = x, .grad = grad, .H = H, .W = W, .C = C, .K = K,
                      .acc = aligned_alloc(sizeof(v8), bytes)};
    if (!k.acc) return FS_NO_MEMORY;
    memset(k.acc, 0, bytes);
    const int status = parallel_for(parts, N, conv1_backward_part, &k);
    for (int64_t t = 0; t < per; t++) {
        double s = 0;
        for (int p = 0; p < parts; p++)
            for (int v = 0; v < LANES; v++) s += k.acc[p * per + t][v];
        if (t < taps) grad_w[t] = (float)s;
        else grad_b[t - taps] = (float)s;
    }
    free(k.acc);
    return status;
}

/* ---- input gradient of a narrow convolution (the CNN's second layer) ---- */

struct conv_grad_input {
    const float *grad, *wt;
    float *grad_in;
    int64_t Ho, Wo, Ci, Co, K;
};

/* Blocks of CGI_PIXELS pixels x 3 input channels x VB vectors of output channels: each tap loads
   the pixels' gradient vectors once and each filter vector once, and 3 * CGI_PIXELS * VB
   accumulators stay in registers over all K * K taps. Four pixels need 24 accumulators for
   16 output channels, which fits AVX-512's 32 vector registers; with 16 registers, two pixels. */
#if defined(__AVX512F__)
#define CGI_PIXELS 4
#else
#define CGI_PIXELS 2
#endif
#define CGI_BLOCK(VB)                                                                              \
    static void cgi_block_##VB(const float *gp, int64_t PW, const float *wt, int64_t Ci,          \
                               int64_t c0, int64_t K, int64_t ky0, int64_t ky1, int64_t kx0,       \
                               int64_t kx1, int64_t y, int64_t x, float out[CGI_PIXELS][3])        \
    {                                                                                              \
        const int64_t Co = 8 * VB;                                                                 \
        v8 a[CGI_PIXELS][3][VB];                                                                   \
        memset(a, 0, sizeof a);                                                                    \
        for (int64_t ky = ky0; ky <= ky1; ky++)                                                    \
            for (int64_t kx = kx0; kx <= kx1; kx++) {                                              \
                const float *q = gp + ((y + K - 1 - ky) * PW + (x + K - 1 - kx)) * Co;            \
                const float *wk = wt + ((ky * K + kx) * Ci + c0) * Co;                             \
                for (int b = 0; b < VB; b++) {                                                     \
                    v8 g[CGI_PIXELS];                                                              \
                    for (int p = 0; p < CGI_PIXELS; p++) g[p] = load8(q + p * Co + 8 * b);         \
                    for (int c = 0; c < 3; c++) {                                                  \
                        v8 wv = load8(wk + c * Co + 8 * b);                                        \
                        IN_REGISTER(wv);                                                           \
                        for (int p = 0; p < CGI_PIXELS; p++) a[p][c][b] += g[p] * wv;              \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        for (int p = 0; p < CGI_PIXELS; p++)                                                       \
            for (int c = 0; c < 3; c++) {                                                          \
                v8 s = a[p][c][0];                                                                 \
                for (int b = 1; b < VB; b++) s += a[p][c][b];                                      \
                out[p][c] = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];                 \
            }                                                                                      \
    }
CGI_BLOCK(1)
CGI_BLOCK(2)

static int conv_grad_input_part(void *ctx, int64_t begin, int64_t end, int part)
{
    struct conv_grad_input *k = ctx;
    const int64_t Ho = k->Ho, Wo = k->Wo, Ci = k->Ci, Co = k->Co, K = k->K;
    const int64_t H = Ho + K - 1, W = Wo + K - 1, Cp = (Ci + 2) / 3 * 3;
    /* The gradient of one image with K - 1 zero columns each side (+ CGI_PIXELS - 1 on the
       right, for a last block past the edge), so every tap of a pixel block reads memory. Taps
       that miss the gradient for all pixels of a block (rows above or below it, columns beside
       it) are skipped. */
    const int64_t PW = Wo + 2 * (K - 1) + CGI_PIXELS - 1;
    (void)part;
    float *gp = calloc((size_t)(Ho + 2 * (K - 1)) * PW * Co, sizeof(float));
    if (!gp) return FS_NO_MEMORY;
    for (int64_t n = begin; n < end; n++) {
        for (int64_t r = 0; r < Ho; r++)
            memcpy(gp + ((r + K - 1) * PW + (K - 1)) * Co, k->grad + (n * Ho + r) * Wo * Co,
                   sizeof(float) * Wo * Co);
        for (int64_t y = 0; y < H; y++) {
            const int64_t ky0 = y - (Ho - 1) > 0 ? y - (Ho - 1) : 0, ky1 = y < K - 1 ? y : K - 1;
            for (int64_t x = 0; x < W; x += CGI_PIXELS) {
                const int64_t kx0 = x - (Wo - 1) > 0 ? x - (Wo - 1) : 0;
                const int64_t kx1 = x + CGI_PIXELS - 1 < K - 1 ? x + CGI_PIXELS - 1 : K - 1;
                for (int64_t c0 = 0; c0 < Cp; c0 += 3) {
                    float out[CGI_PIXELS][3];
                    if (Co == 8) cgi_block_1(gp, PW, k->wt, Cp, c0, K, ky0, ky1, kx0, kx1, y, x, out);
                    else cgi_block_2(gp, PW, k->wt, Cp, c0, K, ky0, ky1, kx0, kx1, y, x, out);
                    for (int p = 0; p < CGI_PIXELS && x + p < W; p++)
                        for (int c = 0; c < 3 && c0 + c < Ci; c++)
                            k->grad_in[((n * H + y) * W + x + p) * Ci + c0 + c] = out[p][c];
                }
            }
        }
    }
    free(gp);
    return FS_OK;
}

/* Whether conv_grad_input takes this layer: 8 or 16 output channels. */
int conv_grad_input_supported(int64_t Ci, int64_t Co)
{
    return Ci >= 1 && (Co == 8 || Co == 16);
}

/* Input gradient of a stride-1 convolution without padding, channels-last:
   grad (N, Ho, Wo, Co), w the filters (Co, Ci, K, K) as PyTorch holds them,
   grad_in (N, Ho + K - 1, Wo + K - 1, Ci). oneDNN computes this for 6 -> 16 channels at
   ~35 GFLOP/s. */
int conv_grad_input(const float *grad, const float *w, int64_t N, int64_t Ho, int64_t Wo,
                    int64_t Ci, int64_t Co, int64_t K, float *grad_in, int threads)
{
    if (!SIZES_OK(Ho, Wo, K, Ci) || !conv_grad_input_supported(Ci, Co) ||
        !SIZES_OK(N, Ho + K - 1, Wo + K - 1, Ci + 2, Co, K, K))
        return FS_BAD_SHAPE;
    /* The filters as (K, K, Cp, Co), Cp = Ci rounded up to a multiple of 3 with zero filters
       beyond Ci: each tap's block of 3 input channels is then 3 whole Co-vectors. */
    const int64_t Cp = (Ci + 2) / 3 * 3;
    float *wt = calloc((size_t)(K * K * Cp * Co), sizeof(float));
    if (!wt) return FS_NO_MEMORY;
    for (int64_t co = 0; co < Co; co++)
        for (int64_t ci = 0; ci < Ci; ci++)
            for (int64_t t = 0; t < K * K; t++) wt[(t * Cp + ci) * Co + co] = w[(co * Ci + ci) * K * K + t];
    struct conv_grad_input k = {.grad = grad, .wt = wt, .grad_in = grad_in, .Ho = Ho, .Wo = Wo,
                                .Ci = Ci, .Co = Co, .K = K};
    const int status = parallel_for(image_parts(threads, N, Ho + K - 1), N, conv_grad_input_part, &k);
    free(wt);
    return status;
}
