/* Paged decode attention for the CPU, bf16 K/V read straight from head-major blocks.
 *
 * One query token per sequence. K/V caches are [num_blocks, num_kv_heads, block_size, head_dim] (the CPU
 * runner's head-major storage), so each (block, KV head) is one contiguous run of block_size * head_dim
 * values. Per (sequence, KV head): the scores of the GQA group's query heads over the sequence's own tokens
 * (no padding, no gathered copy), softmax in fp32, then the weighted sum of V. Built by
 * gpu_worker/attention/cpu_decode.py with gcc -O3 -march=native, fast-math reassociation (not -ffast-math: it sets flush-to-zero process-wide), -fopenmp (the loops over
 * head_dim and the exponentials vectorise) and called through ctypes. The (sequence, KV head) pairs are
 * shared out with OpenMP: loaded into a process that has torch, the library binds to torch's own
 * libgomp.so.1 (same soname), so it uses torch's thread pool and thread count rather than a second one.
 */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_DIM 256

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* one (sequence, KV head) pair: scores of the GQA group's query heads, softmax, weighted sum of V */
static inline void decode_pair(const uint16_t *q, int64_t q_stride_s, int64_t q_stride_h, const uint16_t *k_cache,
                               const uint16_t *v_cache, const int32_t *bt, int L, uint16_t *out,
                               int64_t o_stride_s, int64_t o_stride_h, int s, int h, int G, int num_kv_heads,
                               const int D, int block_size, float scale, float *scores) {
    float qf[MAX_GROUP][MAX_DIM];
    float acc[MAX_GROUP][MAX_DIM];
    float inv_sum[MAX_GROUP];
    for (int g = 0; g < G; ++g) {
        const uint16_t *qr = q + (int64_t)s * q_stride_s + (int64_t)(h * G + g) * q_stride_h;
        for (int d = 0; d < D; ++d) qf[g][d] = bf16_to_f32(qr[d]) * scale;
    }
    for (int t0 = 0; t0 < L; t0 += block_size) { /* scores[g * L + t] = q_g . k_t */
        const uint16_t *kb = k_cache + ((int64_t)bt[t0 / block_size] * num_kv_heads + h) * block_size * D;
        const int n = L - t0 < block_size ? L - t0 : block_size;
        for (int i = 0; i < n; ++i) {
            float kf[MAX_DIM];
            for (int d = 0; d < D; ++d) kf[d] = bf16_to_f32(kb[(int64_t)i * D + d]);
            for (int g = 0; g < G; ++g) {
                float dot = 0.0f;
                for (int d = 0; d < D; ++d) dot += qf[g][d] * kf[d];
                scores[(int64_t)g * L + t0 + i] = dot;
            }
        }
    }
    for (int g = 0; g < G; ++g) { /* softmax left unnormalised: the output is divided by the sum */
        float *sg = scores + (int64_t)g * L;
        float m = -INFINITY, sum = 0.0f;
        for (int t = 0; t < L; ++t) m = sg[t] > m ? sg[t] : m;
        for (int t = 0; t < L; ++t) {
            sg[t] = expf(sg[t] - m);
            sum += sg[t];
        }
        inv_sum[g] = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int d = 0; d < D; ++d) acc[g][d] = 0.0f;
    }
    for (int t0 = 0; t0 < L; t0 += block_size) {
        const uint16_t *vb = v_cache + ((int64_t)bt[t0 / block_size] * num_kv_heads + h) * block_size * D;
        const int n = L - t0 < block_size ? L - t0 : block_size;
        for (int i = 0; i < n; ++i) {
            float vf[MAX_DIM];
            for (int d = 0; d < D; ++d) vf[d] = bf16_to_f32(vb[(int64_t)i * D + d]);
            for (int g = 0; g < G; ++g) {
                const float p = scores[(int64_t)g * L + t0 + i];
                for (int d = 0; d < D; ++d) acc[g][d] += p * vf[d];
            }
        }
    }
    for (int g = 0; g < G; ++g) {
        uint16_t *orow = out + (int64_t)s * o_stride_s + (int64_t)(h * G + g) * o_stride_h;
        for (int d = 0; d < D; ++d) orow[d] = f32_to_bf16(acc[g][d] * inv_sum[g]);
    }
}

static inline int decode_impl(const uint16_t *q, int64_t q_stride_s, int64_t q_stride_h, const uint16_t *k_cache,
                              const uint16_t *v_cache, const int32_t *block_tables, int64_t bt_stride,
                              const int32_t *seq_lens, uint16_t *out, int64_t o_stride_s, int64_t o_stride_h,
                              int num_seqs, int num_q_heads, int num_kv_heads, const int D, int block_size,
                              float scale) {
    const int G = num_q_heads / num_kv_heads;
    if (G > MAX_GROUP || D > MAX_DIM) return -1;
    int longest = 1;
    for (int s = 0; s < num_seqs; ++s) longest = seq_lens[s] > longest ? seq_lens[s] : longest;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)G * (size_t)longest);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int pair = 0; pair < num_seqs * num_kv_heads; ++pair) {
            const int s = pair / num_kv_heads, h = pair % num_kv_heads;
            if (scores)
                decode_pair(q, q_stride_s, q_stride_h, k_cache, v_cache, block_tables + (int64_t)s * bt_stride,
                            seq_lens[s], out, o_stride_s, o_stride_h, s, h, G, num_kv_heads, D, block_size, scale,
                            scores);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* head_dim as a compile-time constant for the common sizes: the loops over it unroll and vectorise fully */
#define DECODE_FOR_DIM(DIM)                                                                                     \
    static int decode_d##DIM(const uint16_t *q, int64_t qs, int64_t qh, const uint16_t *k, const uint16_t *v,  \
                             const int32_t *bt, int64_t bts, const int32_t *sl, uint16_t *o, int64_t os,        \
                             int64_t oh, int ns, int hq, int hkv, int bs, float scale) {                         \
        return decode_impl(q, qs, qh, k, v, bt, bts, sl, o, os, oh, ns, hq, hkv, DIM, bs, scale);               \
    }
DECODE_FOR_DIM(64)
DECODE_FOR_DIM(128)

/* Returns 0, or -1 when a shape is beyond the fixed limits (the caller then takes the torch path). */
int paged_decode_bf16(const uint16_t *q, int64_t q_stride_s, int64_t q_stride_h, const uint16_t *k_cache,
                      const uint16_t *v_cache, const int32_t *block_tables, int64_t bt_stride,
                      const int32_t *seq_lens, uint16_t *out, int64_t o_stride_s, int64_t o_stride_h,
                      int num_seqs, int num_q_heads, int num_kv_heads, int head_dim, int block_size, float scale) {
    if (head_dim == 64)
        return decode_d64(q, q_stride_s, q_stride_h, k_cache, v_cache, block_tables, bt_stride, seq_lens, out,
                          o_stride_s, o_stride_h, num_seqs, num_q_heads, num_kv_heads, block_size, scale);
    if (head_dim == 128)
        return decode_d128(q, q_stride_s, q_stride_h, k_cache, v_cache, block_tables, bt_stride, seq_lens, out,
                           o_stride_s, o_stride_h, num_seqs, num_q_heads, num_kv_heads, block_size, scale);
    return decode_impl(q, q_stride_s, q_stride_h, k_cache, v_cache, block_tables, bt_stride, seq_lens, out,
                       o_stride_s, o_stride_h, num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, scale);
}
