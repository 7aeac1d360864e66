/* What the KV pool's values may be (vLLM's --kv-cache-dtype), and float32 values written as each,
 * bit for bit as torch casts them (the pages a decode step writes in C and those a prefill writes
 * with torch must hold the same bytes). FP8 has a scale of 1, values past its largest saturating to
 * it, as the pool's torch writes clamp them. Included by the kernels that write or read the pool. */
#ifndef KV_TYPES_H
#define KV_TYPES_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { KV_F32 = 0, KV_BF16 = 1, KV_E4M3 = 2, KV_E5M2 = 3 };

static inline int64_t kv_bytes(int64_t kv_type) { return kv_type == KV_F32 ? 4 : kv_type == KV_BF16 ? 2 : 1; }

static inline uint32_t kv_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float kv_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even; a NaN (tested on the bits: -ffast-math assumes there are none) stays one */
static inline uint16_t kv_to_bf16(float f) {
    const uint32_t u = kv_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* an FP8 format of `mbits` mantissa bits and exponent bias `bias`: round to nearest even, values
 * below its smallest normal through the float adder (as torch: adding a power of two leaves the
 * rounded mantissa in the low bits); the caller has clamped |f| to the format's largest */
static inline uint8_t kv_to_fp8(float f, int mbits, int bias) {
    uint32_t bits = kv_bits(f);
    const uint32_t sign = bits & 0x80000000u;
    bits ^= sign;
    uint8_t out;
    if (bits > 0x7F800000u) {
        out = 0x7F; /* NaN */
    } else if (bits < (uint32_t)(127 - bias + 1) << 23) {
        const uint32_t denorm_mask = (uint32_t)(127 - bias + 23 - mbits + 1) << 23;
        out = (uint8_t)(kv_bits(kv_float(bits) + kv_float(denorm_mask)) - denorm_mask);
    } else {
        const uint32_t odd = (bits >> (23 - mbits)) & 1u;
        bits += ((uint32_t)(bias - 127) << 23) + ((1u << (22 - mbits)) - 1u) + odd;
        out = (uint8_t)(bits >> (23 - mbits));
    }
    return out | (uint8_t)(sign >> 24);
}

/* count kv_type values read as float32, bit for bit as torch widens them. bfloat16 is float32's
 * top half. An FP8 byte's exponent and mantissa, moved to float32's place, make a (tiny) normal
 * float32 that one multiply by a power of two rebiases; a subnormal byte (exponent 0) is its
 * mantissa times the format's smallest step. Both are exact, and no float32 involved is itself
 * subnormal, so a flush-to-zero mode a library left on a thread changes nothing. No NaN or
 * infinity is ever stored (values saturate to the largest). No table: AVX-512 does 16 at a time. */
static inline void kv_widen(int64_t kv_type, const uint8_t *restrict src, float *restrict dst, int64_t count) {
    if (kv_type == KV_F32) {
        memcpy(dst, src, sizeof(float) * (size_t)count);
    } else if (kv_type == KV_BF16) {
        const uint16_t *half = (const uint16_t *)src;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= count; i += 16) {
            const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(half + i)));
            _mm512_storeu_si512(dst + i, _mm512_slli_epi32(wide, 16));
        }
#endif
        for (; i < count; i++) dst[i] = kv_float((uint32_t)half[i] << 16);
    } else {
        const int e4m3 = kv_type == KV_E4M3;
        const uint32_t mbits = e4m3 ? 3 : 2;
        const float rebias = e4m3 ? 0x1p120f : 0x1p112f; /* 2^(127 - 7), 2^(127 - 15) */
        const float step = e4m3 ? 0x1p-9f : 0x1p-16f;    /* the smallest subnormal */
        int64_t i = 0;
#if defined(__AVX512F__)
        /* the same, 16 bytes at a time (GCC does not vectorise the loop below by itself) */
        const __m512i low7 = _mm512_set1_epi32(0x7F), sign_bit = _mm512_set1_epi32(0x80);
        const __m512i smallest_normal = _mm512_set1_epi32(1 << mbits);
        for (; i + 16 <= count; i += 16) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
            const __m512i magnitude = _mm512_and_si512(b, low7);
            const __mmask16 normal = _mm512_cmpge_epu32_mask(magnitude, smallest_normal);
            const __m512i as_normal = _mm512_mask_blend_epi32(normal, smallest_normal, magnitude);
            const __m512 f_normal = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(as_normal, 23 - mbits)),
                                                  _mm512_set1_ps(rebias));
            const __m512 f_subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(step));
            const __m512i f = _mm512_castps_si512(_mm512_mask_blend_ps(normal, f_subnormal, f_normal));
            const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, sign_bit), 24);
            _mm512_storeu_si512(dst + i, _mm512_or_si512(f, sign));
        }
#endif
        for (; i < count; i++) {
            const uint32_t b = src[i], magnitude = b & 0x7Fu;
            /* (a subnormal byte's own bits would make a subnormal float32, slow to multiply: not used) */
            const uint32_t as_normal = magnitude >> mbits ? magnitude : 1u << mbits;
            const float normal = kv_float(as_normal << (23 - mbits)) * rebias;
            const float subnormal = (float)magnitude * step;
            const float f = (magnitude >> mbits) ? normal : subnormal;
            dst[i] = kv_float(kv_bits(f) | (b & 0x80u) << 24);
        }
    }
}

/* count float32 values written as kv_type values at dst */
static inline void kv_encode(int64_t kv_type, const float *restrict src, void *restrict dst, int64_t count) {
    if (kv_type == KV_F32) {
        memcpy(dst, src, sizeof(float) * (size_t)count);
    } else if (kv_type == KV_BF16) {
        uint16_t *out = (uint16_t *)dst;
        for (int64_t i = 0; i < count; i++) out[i] = kv_to_bf16(src[i]);
    } else {
        const int mbits = kv_type == KV_E4M3 ? 3 : 2, bias = kv_type == KV_E4M3 ? 7 : 15;
        const float largest = kv_type == KV_E4M3 ? 448.0f : 57344.0f;
        uint8_t *out = (uint8_t *)dst;
        for (int64_t i = 0; i < count; i++) {
            float f = src[i];
            f = f > largest ? largest : f < -largest ? -largest : f;
            out[i] = kv_to_fp8(f, mbits, bias);
        }
    }
}
#endif
