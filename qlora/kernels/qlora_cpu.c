// Native CPU kernels for 4-bit block-wise quantization (built on first use by cpu.py).
//
// decode: out[i] = code[nibble_i] * scale[i / blocksize], float32 product rounded once to
//         the output type (round to nearest even), exactly as blockwise.py's reference.
//         AVX2 path: the 16-entry code book sits in two registers, looked up with two
//         permutes and a blend; 16 codes (8 bytes) a step; bf16 rounding in integer ops
//         (exact, denormals kept); fp16 via F16C. Other CPUs: a portable scalar loop.
// quantize: per block absmax, x * (1/absmax) (the partial last block divides), clamp,
//         nearest code by counting thresholds below the value (ties go low), pack.
// Threads: the block range is split over `threads` threads: OpenMP's when built with -fopenmp
// (then torch's own pool, see cpu.py), else pthreads.
// Build flags keep IEEE semantics: no -ffast-math, -ffp-contract=off.
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

enum { OUT_F32 = 0, OUT_F16 = 1, OUT_BF16 = 2 };

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline uint16_t f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}

static inline void store1(void* out, int64_t i, float v, int dtype) {
    if (dtype == OUT_F32) ((float*)out)[i] = v;
    else if (dtype == OUT_BF16) ((uint16_t*)out)[i] = f32_to_bf16(v);
    else ((uint16_t*)out)[i] = f32_to_f16(v);
}

// ------------------------------------------------------------------------------------
// decode
typedef struct {
    const uint8_t* packed;
    const float* scale;          // float32 scales, or NULL with double quantization:
    const uint8_t* qscale;       //   8-bit codes of (scale - offset),
    const float* nested_absmax;  //   one float32 per 256 blocks,
    const float* nested_code;    //   the 256-entry signed dynamic map,
    float offset;                //   and the mean that was removed.
    const float* code;
    void* out;
    int64_t n, blocksize, b0, b1;
    int dtype, simd, stream;
} decode_args;

// scale[b] = nested_code[q[b]] * nested_absmax[b / 256] + offset, two float32 roundings.
static inline float block_scale(const decode_args* a, int64_t b) {
    if (a->scale) return a->scale[b];
    float t = a->nested_code[a->qscale[b]] * a->nested_absmax[b >> 8];
    return t + a->offset;
}

static void decode_scalar(const decode_args* a, int64_t start, int64_t end, float s) {
    for (int64_t i = start; i < end; i++) {
        uint8_t byte = a->packed[i >> 1];
        uint8_t nib = (i & 1) ? (byte & 0xF) : (byte >> 4);
        store1(a->out, i, a->code[nib] * s, a->dtype);
    }
}

#if defined(__x86_64__)
// 8 codes -> 8 float32 values * scale. idx holds one nibble per 32-bit lane.
__attribute__((target("avx2,f16c"))) static inline __m256 lookup8(__m256i idx, __m256 lo, __m256 hi, __m256 vs) {
    __m256 a = _mm256_permutevar8x32_ps(lo, idx);  // uses bits 0-2
    __m256 b = _mm256_permutevar8x32_ps(hi, idx);
    __m256 v = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 picks the half
    return _mm256_mul_ps(v, vs);
}

// float32 -> bf16, round to nearest even (inputs are finite), 8 lanes in 32-bit slots.
__attribute__((target("avx2,f16c"))) static inline __m256i bf16_rne(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_srli_epi32(u, 16);
}

// The 16 possible outputs of a block, code[k] * scale rounded to 16 bits, as two byte
// planes (low bytes, high bytes) broadcast to both 128-bit lanes for pshufb look-ups.
__attribute__((target("avx2,f16c"))) static inline void block_tables(__m256 lo, __m256 hi, float s, int dtype,
                                                                    __m256i* tlo, __m256i* thi) {
    const __m256 vs = _mm256_set1_ps(s);
    __m256 p0 = _mm256_mul_ps(lo, vs), p1 = _mm256_mul_ps(hi, vs);
    __m256i entries;  // 16 x 16-bit, in code order
    if (dtype == OUT_BF16) {
        entries = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_rne(p0), bf16_rne(p1)), 0xD8);
    } else {
        entries = _mm256_set_m128i(_mm256_cvtps_ph(p1, _MM_FROUND_TO_NEAREST_INT), _mm256_cvtps_ph(p0, _MM_FROUND_TO_NEAREST_INT));
    }
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    __m256i planes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(entries, split), 0xD8);  // [low bytes | high bytes]
    *tlo = _mm256_permute2x128_si256(planes, planes, 0x00);
    *thi = _mm256_permute2x128_si256(planes, planes, 0x11);
}

// 16-bit outputs: per block, look the 16 precomputed outputs up with pshufb, 32 codes a step.
__attribute__((target("avx2,f16c"))) static void decode_avx2_16bit(const decode_args* a) {
    const __m256 lo = _mm256_loadu_ps(a->code), hi = _mm256_loadu_ps(a->code + 8);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    uint16_t* out = (uint16_t*)a->out;
    for (int64_t b = a->b0; b < a->b1; b++) {
        int64_t start = b * a->blocksize;
        int64_t end = start + a->blocksize < a->n ? start + a->blocksize : a->n;
        const float s = block_scale(a, b);
        __m256i tlo, thi;
        block_tables(lo, hi, s, a->dtype, &tlo, &thi);
        int64_t i = start;
        for (; i + 32 <= end; i += 32) {
            __m128i x = _mm_loadu_si128((const __m128i*)(a->packed + (i >> 1)));
            __m128i nhi = _mm_and_si128(_mm_srli_epi16(x, 4), low4), nlo = _mm_and_si128(x, low4);
            __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(nhi, nlo), _mm_unpacklo_epi8(nhi, nlo));  // element order
            __m256i vl = _mm256_shuffle_epi8(tlo, idx), vh = _mm256_shuffle_epi8(thi, idx);
            __m256i o0 = _mm256_unpacklo_epi8(vl, vh), o1 = _mm256_unpackhi_epi8(vl, vh);
            __m256i r0 = _mm256_permute2x128_si256(o0, o1, 0x20), r1 = _mm256_permute2x128_si256(o0, o1, 0x31);
            if (a->stream) {
                _mm256_stream_si256((__m256i*)(out + i), r0);
                _mm256_stream_si256((__m256i*)(out + i + 16), r1);
            } else {
                _mm256_storeu_si256((__m256i*)(out + i), r0);
                _mm256_storeu_si256((__m256i*)(out + i + 16), r1);
            }
        }
        decode_scalar(a, i, end, s);
    }
    if (a->stream) _mm_sfence();
}

__attribute__((target("avx2,f16c"))) static void decode_avx2_f32(const decode_args* a) {
    const __m256 lo = _mm256_loadu_ps(a->code), hi = _mm256_loadu_ps(a->code + 8);
    const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    const __m256i mask = _mm256_set1_epi32(0xF);
    for (int64_t b = a->b0; b < a->b1; b++) {
        int64_t start = b * a->blocksize;
        int64_t end = start + a->blocksize < a->n ? start + a->blocksize : a->n;
        const float s = block_scale(a, b);
        const __m256 vs = _mm256_set1_ps(s);
        int64_t i = start;
        for (; i + 16 <= end; i += 16) {
            __m128i bytes = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i*)(a->packed + (i >> 1))), dup);
            __m256i i0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes), shifts), mask);
            __m256i i1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), shifts), mask);
            __m256 v0 = lookup8(i0, lo, hi, vs), v1 = lookup8(i1, lo, hi, vs);
            _mm256_storeu_ps((float*)a->out + i, v0);
            _mm256_storeu_ps((float*)a->out + i + 8, v1);
        }
        decode_scalar(a, i, end, s);
    }
}
#endif

static void* decode_range(void* arg) {
    const decode_args* a = (const decode_args*)arg;
#if defined(__x86_64__)
    if (a->simd) {
        if (a->dtype == OUT_F32) decode_avx2_f32(a);
        else decode_avx2_16bit(a);
        return NULL;
    }
#endif
    for (int64_t b = a->b0; b < a->b1; b++) {
        int64_t start = b * a->blocksize;
        int64_t end = start + a->blocksize < a->n ? start + a->blocksize : a->n;
        decode_scalar(a, start, end, block_scale(a, b));
    }
    return NULL;
}

int qlora_has_simd(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

#define MAX_THREADS 64
// At least this many codes per decode thread: below it, waking a thread (a futex wake where
// OpenMP workers sleep when idle, qlora/threads.py) costs more than the decode it would share.
#define DECODE_GRAIN 65536

static int clamp_threads(int threads, int64_t units) {  // at most one thread per unit of work
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if ((int64_t)threads > units) threads = (int)units;
    return threads < 1 ? 1 : threads;
}

static void run_threads(void* (*fn)(void*), void* args, size_t size, int threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) fn((char*)args + t * size);
    return;
#endif
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tid[t], NULL, fn, (char*)args + t * size) == 0;
    fn(args);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else fn((char*)args + t * size);  // could not start a thread: do its share here
    }
}

// Decode n codes into out. Pass float32 `scale`, or scale = NULL and the double-quantized
// (qscale, nested_absmax, nested_code, offset). `stream`: non-temporal stores for
// outputs too big to stay in cache (needs 32-byte aligned out).
void qlora_decode_4bit(const uint8_t* packed, const float* scale, const uint8_t* qscale, const float* nested_absmax,
                       const float* nested_code, float offset, const float* code, void* out, int64_t n,
                       int64_t blocksize, int dtype, int threads, int simd, int stream) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
    threads = clamp_threads(threads, n / DECODE_GRAIN);
    decode_args args[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        decode_args a = {packed, scale, qscale, nested_absmax, nested_code, offset, code, out, n, blocksize,
                         nblocks * t / threads, nblocks * (t + 1) / threads, dtype, simd, stream};
        args[t] = a;
    }
    run_threads(decode_range, args, sizeof(decode_args), threads);
}

// ------------------------------------------------------------------------------------
// quantize
typedef struct {
    const void* x;
    const float* thresholds;  // 15 ascending midpoints
    const uint8_t* order;     // sorted position -> code index
    uint8_t* packed;
    float* absmax;
    int64_t n, blocksize, b0, b1;
    int dtype;
    int64_t nonfinite;  // out: NaN/Inf values seen
} quantize_args;

static inline float load1(const void* x, int64_t i, int dtype) {
    if (dtype == OUT_F32) return ((const float*)x)[i];
    if (dtype == OUT_BF16) return bf16_to_f32(((const uint16_t*)x)[i]);
    return f16_to_f32(((const uint16_t*)x)[i]);
}

static inline uint8_t nearest_code(float v, const float* th, const uint8_t* order) {
    int k = 0;
    for (int j = 0; j < 15; j++) k += th[j] < v;
    return order[k];
}

static void* quantize_range(void* arg) {
    quantize_args* a = (quantize_args*)arg;
    float buf[4096];
    for (int64_t b = a->b0; b < a->b1; b++) {
        int64_t start = b * a->blocksize;
        int64_t len = start + a->blocksize < a->n ? a->blocksize : a->n - start;
        float m = 0.0f;
        for (int64_t i = 0; i < len; i++) {
            buf[i] = load1(a->x, start + i, a->dtype);
            float v = fabsf(buf[i]);
            a->nonfinite += !(v <= 3.40282347e38f);
            m = v > m ? v : m;
        }
        const int partial = len < a->blocksize;
        // bitsandbytes clamps the divisor to 1e-38; a partial last block stores it clamped.
        float d = m < 1e-38f ? 1e-38f : m;
        a->absmax[b] = partial ? d : m;
        float inv = 1.0f / d;
        for (int64_t i = 0; i < len; i++) {
            float s = partial ? buf[i] / d : buf[i] * inv;
            buf[i] = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
        }
        if (len & 1) buf[len] = 0.0f;  // the padding nibble is the code of 0
        for (int64_t i = 0; i < len; i += 2) {
            uint8_t hi = nearest_code(buf[i], a->thresholds, a->order);
            uint8_t lo = nearest_code(buf[i + 1], a->thresholds, a->order);
            a->packed[(start + i) >> 1] = (uint8_t)(hi << 4 | lo);
        }
    }
    return NULL;
}

// Returns the number of NaN/Inf inputs (the caller rejects the result when it is not 0).
int64_t qlora_quantize_4bit(const void* x, int dtype, int64_t n, int64_t blocksize, const float* thresholds,
                         const uint8_t* order, uint8_t* packed, float* absmax, int threads) {
    int64_t nblocks = (n + blocksize - 1) / blocksize;
    threads = clamp_threads(threads, nblocks);
    quantize_args args[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        quantize_args a = {x, thresholds, order, packed, absmax, n, blocksize, nblocks * t / threads,
                           nblocks * (t + 1) / threads, dtype, 0};
        args[t] = a;
    }
    run_threads(quantize_range, args, sizeof(quantize_args), threads);
    int64_t nonfinite = 0;
    for (int t = 0; t < threads; t++) nonfinite += args[t].nonfinite;
    return nonfinite;
}

// ------------------------------------------------------------------------------------
// seeded dropout (qlora/nn/dropout.py holds the PyTorch reference and the definition):
// element i is kept when the 16-bit half (i & 1) of fmix32((uint32)(i >> 1) ^ key) is at
// least `threshold`; key = fmix32(seed_hi ^ (uint32)(i >> 33)) ^ seed_lo. Kept: x * scale
// (float32 product rounded once to the output type); dropped: 0.
// With x2 (not NULL) the same mask also drops x2 into out2, kept values times scale2: one hash
// per element pair for two tensors of the same size (LoRA's backward: dropout(x) and dropout(dy B A)).
typedef struct {
    const void* x;
    void* out;
    const void* x2;
    void* out2;
    int64_t i0, i1;
    uint32_t seed_lo, seed_hi, threshold;
    float scale, scale2;
    int dtype, simd;
} dropout_args;

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

static inline int keep1(int64_t i, uint32_t key, uint32_t threshold) {
    uint32_t r = fmix32((uint32_t)(i >> 1) ^ key);
    return ((r >> ((uint32_t)(i & 1) * 16u)) & 0xffffu) >= threshold;
}

// Elements i0..i1 one at a time (both tensors where x2 is set).
static inline void dropout_scalar(const dropout_args* a, int64_t i0, int64_t i1, uint32_t key) {
    for (int64_t i = i0; i < i1; i++) {
        int k = keep1(i, key, a->threshold);
        store1(a->out, i, k ? load1(a->x, i, a->dtype) * a->scale : 0.0f, a->dtype);
        if (a->x2) store1(a->out2, i, k ? load1(a->x2, i, a->dtype) * a->scale2 : 0.0f, a->dtype);
    }
}

// 16 keep flags (all ones / zero per 32-bit lane) for elements i..i+15, i even: 8 hashes, one
// per pair, whose low halves decide the even elements and high halves the odd ones.
__attribute__((target("avx2"))) static inline void keep16(int64_t i, __m256i vkey, __m256i below, __m256i* k0,
                                                          __m256i* k1) {
    __m256i h = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)(i >> 1)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    h = _mm256_xor_si256(h, vkey);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x85ebca6bu));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0xc2b2ae35u));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    __m256i lo = _mm256_and_si256(h, _mm256_set1_epi32(0xffff)), hi = _mm256_srli_epi32(h, 16);
    __m256i a = _mm256_unpacklo_epi32(lo, hi);  // elements 0-3 | 8-11
    __m256i b = _mm256_unpackhi_epi32(lo, hi);  // elements 4-7 | 12-15
    *k0 = _mm256_cmpgt_epi32(_mm256_permute2x128_si256(a, b, 0x20), below);  // half >= threshold (both < 2^16)
    *k1 = _mm256_cmpgt_epi32(_mm256_permute2x128_si256(a, b, 0x31), below);
}

// out[i..i+7] = keep ? x * scale : 0, fp32 or bf16 (rounded like f32_to_bf16).
__attribute__((target("avx2"))) static inline void apply8(const void* x, void* out, int64_t i, int dtype, __m256i keepi,
                                                         __m256 vscale) {
    __m256 keep = _mm256_castsi256_ps(keepi);
    if (dtype == OUT_F32) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps((const float*)x + i), vscale);
        _mm256_storeu_ps((float*)out + i, _mm256_and_ps(keep, v));
        return;
    }
    __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)x + i)));
    __m256 v = _mm256_and_ps(keep, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), vscale));
    __m256i u = _mm256_castps_si256(v);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i*)((uint16_t*)out + i), _mm256_castsi256_si128(r));
}

// One 2^33-element span (one key), fp32 or bf16, 16 elements a step.
__attribute__((target("avx2"))) static void dropout_avx2(const dropout_args* a, int64_t i0, int64_t i1,
                                                        uint32_t key) {
    int64_t head = i0 + ((16 - (i0 & 15)) & 15);
    head = head < i1 ? head : i1;
    dropout_scalar(a, i0, head, key);
    const __m256i vkey = _mm256_set1_epi32((int)key), below = _mm256_set1_epi32((int)a->threshold - 1);
    const __m256 vscale = _mm256_set1_ps(a->scale), vscale2 = _mm256_set1_ps(a->scale2);
    int64_t i = head;
    for (; i + 16 <= i1; i += 16) {
        __m256i k0, k1;
        keep16(i, vkey, below, &k0, &k1);
        apply8(a->x, a->out, i, a->dtype, k0, vscale);
        apply8(a->x, a->out, i + 8, a->dtype, k1, vscale);
        if (a->x2) {
            apply8(a->x2, a->out2, i, a->dtype, k0, vscale2);
            apply8(a->x2, a->out2, i + 8, a->dtype, k1, vscale2);
        }
    }
    dropout_scalar(a, i, i1, key);
}

static void* dropout_range(void* arg) {
    dropout_args* a = (dropout_args*)arg;
    for (int64_t s = a->i0; s < a->i1;) {
        int64_t span_end = ((s >> 33) + 1) << 33;
        int64_t e = span_end < a->i1 ? span_end : a->i1;
        uint32_t key = fmix32(a->seed_hi ^ (uint32_t)(s >> 33)) ^ a->seed_lo;
        if ((a->dtype == OUT_F32 || a->dtype == OUT_BF16) && a->simd) {
            dropout_avx2(a, s, e, key);
        } else {
            dropout_scalar(a, s, e, key);
        }
        s = e;
    }
    return NULL;
}

// `seed` points at the 64-bit seed (a 0-dim int64 tensor's storage: read here, not by the host).
// x2 and out2 may be NULL (one tensor); else x2 is dropped with the same mask, times scale2.
void qlora_dropout2(const void* x, void* out, const void* x2, void* out2, int64_t n, int dtype,
                    const uint64_t* seed_ptr, uint32_t threshold, float scale, float scale2, int threads, int simd) {
    uint64_t seed = *seed_ptr;
    int64_t chunks = (n + 65535) / 65536;
    threads = clamp_threads(threads, chunks);
    dropout_args args[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        int64_t i0 = (chunks * t / threads) * 65536, i1 = (chunks * (t + 1) / threads) * 65536;
        dropout_args a = {x, out, x2, out2, i0, i1 < n ? i1 : n, (uint32_t)seed, (uint32_t)(seed >> 32), threshold,
                          scale, scale2, dtype, simd};
        args[t] = a;
    }
    run_threads(dropout_range, args, sizeof(dropout_args), threads);
}

// ------------------------------------------------------------------------------------
// rotary position embedding of q and k together (qlora/nn/rotary.py holds the reference: the
// formula of transformers' apply_rotary_pos_emb). With x = (x1, x2) and cos = (c1, c2),
// sin = (s1, s2) split at half the head dim:
//   forward   y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
//   backward  dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1   (g: the output's gradient, in x)
// Each product and the sum rounded to the dtype, as torch's mul and add (and the exact neg and
// cat) round them: the same values as the formula op by op. x and out are [batch, heads,
// tokens, dim] with the strides given (the last dim contiguous), cos and sin [batch, tokens, dim].
typedef struct {
    const void *q, *k, *cos, *sin;
    void *qo, *ko;
    int64_t hq, qsb, qsh, qst, hk, ksb, ksh, kst, csb, cst, tokens, dim, r0, r1;
    int dtype, backward, simd;
} rotary_args;

static inline float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// One head's row: y1 = r(x1 c1) - r(x2 sa), y2 = r(x2 c2) + r(x1 sb), r() rounding to the dtype.
// Forward: sa = s1, sb = s2. Backward: sa = -s2, sb = -s1 (negation is exact, so this is
// dx1 = r(g1 c1) + r(g2 s2), dx2 = r(g2 c2) - r(g1 s1)). The portable loops, one per dtype.
#define ROTARY_ROW(NAME, T, LOAD, ROUND, STORE)                                                        \
    static inline void NAME(const T* x, T* out, const T* c, const T* s, int64_t half, int backward) {    \
        const T *sa = backward ? s + half : s, *sb = backward ? s : s + half;                          \
        const float sign = backward ? -1.0f : 1.0f;                                                    \
        for (int64_t i = 0; i < half; i++) {                                                           \
            float x1 = LOAD(x[i]), x2 = LOAD(x[half + i]), c1 = LOAD(c[i]), c2 = LOAD(c[half + i]);    \
            float a = sign * LOAD(sa[i]), b = sign * LOAD(sb[i]);                                      \
            out[i] = STORE(ROUND(x1 * c1) - ROUND(x2 * a));                                            \
            out[half + i] = STORE(ROUND(x2 * c2) + ROUND(x1 * b));                                     \
        }                                                                                              \
    }
#define IDENT(v) (v)
ROTARY_ROW(rotary_row_f32, float, IDENT, IDENT, IDENT)
ROTARY_ROW(rotary_row_bf16, uint16_t, bf16_to_f32, bf16_round, f32_to_bf16)
static inline float f16_round(float v) { return f16_to_f32(f32_to_f16(v)); }
ROTARY_ROW(rotary_row_f16, uint16_t, f16_to_f32, f16_round, f32_to_f16)

// AVX2: 8 lanes a step, the same roundings (bf16 in integer ops as f32_to_bf16, f16 by F16C's
// round to nearest even, no FMA); the tail of each half row goes to the portable loops above.
__attribute__((target("avx2"))) static inline __m256 bf16x8_load(const uint16_t* p) {
    __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
}

__attribute__((target("avx2"))) static inline __m256i bf16x8_bits(__m256 v) {  // rounded, in the high halves
    __m256i u = _mm256_castps_si256(v);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    return _mm256_and_si256(_mm256_blendv_epi8(rounded, quiet, nan), _mm256_set1_epi32((int)0xffff0000u));
}

__attribute__((target("avx2"))) static inline __m256 bf16x8_round(__m256 v) {
    return _mm256_castsi256_ps(bf16x8_bits(v));
}

__attribute__((target("avx2"))) static inline void bf16x8_store(uint16_t* p, __m256 v) {
    __m256i r = _mm256_srli_epi32(bf16x8_bits(v), 16);
    r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(r));
}

__attribute__((target("avx2,f16c"))) static inline __m256 f16x8_load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

__attribute__((target("avx2,f16c"))) static inline __m256 f16x8_round(__m256 v) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

__attribute__((target("avx2,f16c"))) static inline void f16x8_store(uint16_t* p, __m256 v) {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

__attribute__((target("avx2"))) static inline __m256 f32x8_load(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2"))) static inline __m256 f32x8_round(__m256 v) { return v; }
__attribute__((target("avx2"))) static inline void f32x8_store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

#define ROTARY_ROW_AVX2(NAME, T, LOAD, ROUND, STORE, PORTABLE)                                            \
    __attribute__((target("avx2,f16c"))) static void NAME(const T* x, T* out, const T* c, const T* s,     \
                                                          int64_t half, int backward) {                   \
        const T *sa = backward ? s + half : s, *sb = backward ? s : s + half;                             \
        const __m256 sign = _mm256_set1_ps(backward ? -1.0f : 1.0f);                                      \
        int64_t i = 0;                                                                                    \
        for (; i + 8 <= half; i += 8) {                                                                   \
            __m256 x1 = LOAD(x + i), x2 = LOAD(x + half + i), c1 = LOAD(c + i), c2 = LOAD(c + half + i);  \
            __m256 a = _mm256_mul_ps(sign, LOAD(sa + i)), b = _mm256_mul_ps(sign, LOAD(sb + i));          \
            STORE(out + i, _mm256_sub_ps(ROUND(_mm256_mul_ps(x1, c1)), ROUND(_mm256_mul_ps(x2, a))));      \
            STORE(out + half + i, _mm256_add_ps(ROUND(_mm256_mul_ps(x2, c2)), ROUND(_mm256_mul_ps(x1, b)))); \
        }                                                                                                 \
        if (i < half) { /* the last (half % 8) pairs: the portable loop, on copies of both halves */      \
            T tx[16], to[16], tc[16], ts[16];                                                             \
            int64_t n = half - i;                                                                         \
            for (int64_t j = 0; j < n; j++) {                                                             \
                tx[j] = x[i + j], tx[n + j] = x[half + i + j];                                            \
                tc[j] = c[i + j], tc[n + j] = c[half + i + j];                                            \
                ts[j] = s[i + j], ts[n + j] = s[half + i + j];                                            \
            }                                                                                             \
            PORTABLE(tx, to, tc, ts, n, backward);                                                        \
            for (int64_t j = 0; j < n; j++) out[i + j] = to[j], out[half + i + j] = to[n + j];             \
        }                                                                                                 \
    }
ROTARY_ROW_AVX2(rotary_row_f32_avx2, float, f32x8_load, f32x8_round, f32x8_store, rotary_row_f32)
ROTARY_ROW_AVX2(rotary_row_bf16_avx2, uint16_t, bf16x8_load, bf16x8_round, bf16x8_store, rotary_row_bf16)
ROTARY_ROW_AVX2(rotary_row_f16_avx2, uint16_t, f16x8_load, f16x8_round, f16x8_store, rotary_row_f16)

static void rotary_heads(const rotary_args* a, const void* x, void* out, int64_t heads, int64_t sb, int64_t sh,
                         int64_t st, int64_t b, int64_t t, int64_t c0) {
    const int64_t half = a->dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        int64_t x0 = b * sb + h * sh + t * st;
        if (a->dtype == OUT_F32) {
            const float *xi = (const float*)x + x0, *c = (const float*)a->cos + c0, *s = (const float*)a->sin + c0;
            float* o = (float*)out + x0;
            if (a->simd) rotary_row_f32_avx2(xi, o, c, s, half, a->backward);
            else rotary_row_f32(xi, o, c, s, half, a->backward);
            continue;
        }
        const uint16_t *xi = (const uint16_t*)x + x0, *c = (const uint16_t*)a->cos + c0,
                       *s = (const uint16_t*)a->sin + c0;
        uint16_t* o = (uint16_t*)out + x0;
        if (a->dtype == OUT_BF16) {
            if (a->simd) rotary_row_bf16_avx2(xi, o, c, s, half, a->backward);
            else rotary_row_bf16(xi, o, c, s, half, a->backward);
        } else {
            if (a->simd) rotary_row_f16_avx2(xi, o, c, s, half, a->backward);
            else rotary_row_f16(xi, o, c, s, half, a->backward);
        }
    }
}

static void* rotary_range(void* arg) {
    const rotary_args* a = (const rotary_args*)arg;
    for (int64_t r = a->r0; r < a->r1; r++) {  // one (batch, token) row: all heads of q and k
        int64_t b = r / a->tokens, t = r % a->tokens, c0 = b * a->csb + t * a->cst;
        rotary_heads(a, a->q, a->qo, a->hq, a->qsb, a->qsh, a->qst, b, t, c0);
        rotary_heads(a, a->k, a->ko, a->hk, a->ksb, a->ksh, a->kst, b, t, c0);
    }
    return NULL;
}

// q [batch, hq, tokens, dim] into qo and k [batch, hk, tokens, dim] into ko (outputs with their
// inputs' strides, in elements), cos and sin [batch, tokens, dim] (strides csb, cst; 0 where
// broadcast), all of one dtype, dim even. simd: the AVX2 (and F16C) build of the loops.
void qlora_rotary(const void* q, void* qo, int64_t hq, int64_t qsb, int64_t qsh, int64_t qst, const void* k, void* ko,
                  int64_t hk, int64_t ksb, int64_t ksh, int64_t kst, const void* cos, const void* sin, int64_t csb,
                  int64_t cst, int64_t batch, int64_t tokens, int64_t dim, int dtype, int backward, int threads,
                  int simd) {
    int64_t rows = batch * tokens;
    threads = clamp_threads(threads, rows * (hq + hk) * dim / 65536);
    rotary_args args[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        rotary_args a = {q, k, cos, sin, qo, ko, hq, qsb, qsh, qst, hk, ksb, ksh, kst, csb, cst, tokens, dim,
                         rows * t / threads, rows * (t + 1) / threads, dtype, backward, simd};
        args[t] = a;
    }
    run_threads(rotary_range, args, sizeof(rotary_args), threads);
}
