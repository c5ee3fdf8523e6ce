/* The collector's per-row reductions on CPU (vitsift_core/model/native.py builds and calls it): for
   each attention row, its sum and min in one pass, then the focus entropy and every variant's theta
   sums while the row is in cache. Built at first use for the machine's own ISA (-march=native);
   -fno-trapping-math lets the compiler vectorise the selects. Reference: vitsift_core/method/metrics.py. */
#include <stdint.h>
#include <string.h>
#include <math.h>

/* natural log for normal x > 0 (Cephes logf, |rel err| < 2e-7), branch-free so loops vectorise */
static inline float vs_logf(float x) {
    int32_t i;
    memcpy(&i, &x, 4);
    float e = (float)(((i >> 23) & 0xff) - 126);
    i = (i & 0x807fffff) | 0x3f000000;               /* mantissa in [0.5, 1) */
    float m;
    memcpy(&m, &i, 4);
    int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292E-2f;
    y = y * m - 1.1514610310E-1f;
    y = y * m + 1.1676998740E-1f;
    y = y * m - 1.2420140846E-1f;
    y = y * m + 1.4249322787E-1f;
    y = y * m - 1.6668057665E-1f;
    y = y * m + 2.0000714765E-1f;
    y = y * m - 2.4999993993E-1f;
    y = y * m + 3.3333331174E-1f;
    y = y * m * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    return m + y + 0.693359375f * e;
}

/* attn: (B, H, N, N) rows at element strides (sb, sh, si), unit stride along a row; rowsum: (B, H, N)
   the rows' sums as torch computes them (Eq. 2's line from the same float sum as the eager path, so
   the attended sets are the same to the bit); w: (B, 2V, N) per image [num_w, den_w] of each variant;
   excl: (V,) 0/1. Out: ent (B, H, N) row entropies (minmax: rows shifted by their min; NaN when a row
   sums to 0 or holds NaN), theta (V, B, H, N) = num / den (NaN when den = 0). */
void vs_rows(const float *attn, int64_t sb, int64_t sh, int64_t si, const float *rowsum, const float *w,
             const int32_t *excl, int64_t B, int64_t H, int64_t N, int64_t V, float gamma, int minmax,
             float *ent, float *theta) {
    const float nan = NAN;
    for (int64_t b = 0; b < B; b++) {
        const float *wb = w + b * 2 * V * N;
        for (int64_t h = 0; h < H; h++) {
            for (int64_t i = 0; i < N; i++) {
                const int64_t r = (b * H + h) * N + i;
                const float *a = attn + b * sb + h * sh + i * si;
                float mn = INFINITY;
                #pragma omp simd reduction(min:mn)
                for (int64_t j = 0; j < N; j++) mn = a[j] < mn ? a[j] : mn;
                const float line = gamma * (rowsum[r] / (float)N);
                const float shift = minmax ? mn : 0.0f;
                float z = 0.0f, xl = 0.0f;
                #pragma omp simd reduction(+:z, xl)
                for (int64_t j = 0; j < N; j++) {
                    float s = a[j] - shift;
                    float t = s > 0.0f ? s : 1.0f;          /* log(1) = 0: s = 0 adds nothing */
                    z += s;
                    xl += s * vs_logf(t);
                }
                ent[r] = (z > 0.0f) ? logf(z) - xl / z : nan;
                for (int64_t v = 0; v < V; v++) {
                    const float *wn = wb + 2 * v * N, *wd = wn + N;
                    float num = 0.0f, den = 0.0f;
                    #pragma omp simd reduction(+:num, den)
                    for (int64_t j = 0; j < N; j++) {
                        float m = a[j] >= line ? 1.0f : 0.0f;
                        num += m * wn[j];
                        den += m * wd[j];
                    }
                    if (excl[v] && a[i] >= line) { num -= wn[i]; den -= wd[i]; }
                    theta[(v * B * H + b * H + h) * N + i] = den > 0.0f ? num / (den > 1e-30f ? den : 1e-30f) : nan;
                }
            }
        }
    }
}
