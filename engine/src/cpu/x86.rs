//! x86-64 instantiations of the kernels: AVX-512 (one zmm per panel row
//! group) and AVX2+FMA (two ymm), each behind `#[target_feature]` entry
//! points so that no global `target-cpu` flag is needed.

use std::arch::x86_64::*;

use super::kernels::{expand_panels_generic, fused_task_generic, gemm_task_generic, Isa};
use super::PackedMatrix;

#[derive(Clone, Copy)]
pub(super) struct Avx512;

impl Isa for Avx512 {
    type V = __m512;
    const WIDE: bool = true;
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> __m512 {
        _mm512_set1_ps(*p)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn f16(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn bf16(p: *const u8) -> __m512 {
        let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v))
    }
    #[inline(always)]
    unsafe fn q8(p: *const u8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
    #[inline(always)]
    unsafe fn q4_aux(bias: f32) -> __m512 {
        let i = _mm512_setr_ps(
            0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
        );
        // Small integers: exact.
        _mm512_add_ps(i, _mm512_set1_ps(bias))
    }
    /// Nibbles become floats by a table lookup (`vpermps` reads only the
    /// low 4 bits of each index), which needs neither a mask nor a
    /// conversion and folds the bias into the table.
    #[inline(always)]
    unsafe fn q4x8<const BIASED: bool>(p: *const u8, t: __m512, out: &mut [__m512; 8]) {
        let v = _mm512_loadu_si512(p as *const __m512i);
        out[0] = _mm512_permutexvar_ps(v, t);
        out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), t);
        out[2] = _mm512_permutexvar_ps(_mm512_srli_epi32::<8>(v), t);
        out[3] = _mm512_permutexvar_ps(_mm512_srli_epi32::<12>(v), t);
        out[4] = _mm512_permutexvar_ps(_mm512_srli_epi32::<16>(v), t);
        out[5] = _mm512_permutexvar_ps(_mm512_srli_epi32::<20>(v), t);
        out[6] = _mm512_permutexvar_ps(_mm512_srli_epi32::<24>(v), t);
        out[7] = _mm512_permutexvar_ps(_mm512_srli_epi32::<28>(v), t);
    }
}

/// Sixteen lanes as two ymm: rows 0..8 and 8..16 of a panel.
#[derive(Clone, Copy)]
pub(super) struct Y2(__m256, __m256);

#[derive(Clone, Copy)]
pub(super) struct Avx2;

impl Isa for Avx2 {
    type V = Y2;
    const WIDE: bool = false;
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
    #[inline(always)]
    unsafe fn zero() -> Y2 {
        Y2(_mm256_setzero_ps(), _mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Y2 {
        let v = _mm256_broadcast_ss(&*p);
        Y2(v, v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Y2 {
        Y2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Y2) {
        _mm256_storeu_ps(p, v.0);
        _mm256_storeu_ps(p.add(8), v.1);
    }
    #[inline(always)]
    unsafe fn add(a: Y2, b: Y2) -> Y2 {
        Y2(_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1))
    }
    #[inline(always)]
    unsafe fn fma(a: Y2, b: Y2, c: Y2) -> Y2 {
        Y2(
            _mm256_fmadd_ps(a.0, b.0, c.0),
            _mm256_fmadd_ps(a.1, b.1, c.1),
        )
    }
    #[inline(always)]
    unsafe fn f16(p: *const u8) -> Y2 {
        Y2(
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
        )
    }
    #[inline(always)]
    unsafe fn bf16(p: *const u8) -> Y2 {
        let a = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        let b = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
        Y2(
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(a)),
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(b)),
        )
    }
    #[inline(always)]
    unsafe fn q8(p: *const u8) -> Y2 {
        let a = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i));
        let b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i));
        Y2(_mm256_cvtepi32_ps(a), _mm256_cvtepi32_ps(b))
    }
    #[inline(always)]
    unsafe fn q4_aux(bias: f32) -> Y2 {
        let v = _mm256_set1_ps(bias);
        Y2(v, v)
    }
    #[inline(always)]
    unsafe fn q4x8<const BIASED: bool>(p: *const u8, bias: Y2, out: &mut [Y2; 8]) {
        let a = _mm256_loadu_si256(p as *const __m256i);
        let b = _mm256_loadu_si256(p.add(32) as *const __m256i);
        let m = _mm256_set1_epi32(15);
        let cvt = |x: __m256i, y: __m256i| {
            let v = Y2(
                _mm256_cvtepi32_ps(_mm256_and_si256(x, m)),
                _mm256_cvtepi32_ps(_mm256_and_si256(y, m)),
            );
            if BIASED {
                // Small integers: exact.
                Y2(_mm256_add_ps(v.0, bias.0), _mm256_add_ps(v.1, bias.1))
            } else {
                v
            }
        };
        out[0] = cvt(a, b);
        out[1] = cvt(_mm256_srli_epi32::<4>(a), _mm256_srli_epi32::<4>(b));
        out[2] = cvt(_mm256_srli_epi32::<8>(a), _mm256_srli_epi32::<8>(b));
        out[3] = cvt(_mm256_srli_epi32::<12>(a), _mm256_srli_epi32::<12>(b));
        out[4] = cvt(_mm256_srli_epi32::<16>(a), _mm256_srli_epi32::<16>(b));
        out[5] = cvt(_mm256_srli_epi32::<20>(a), _mm256_srli_epi32::<20>(b));
        out[6] = cvt(_mm256_srli_epi32::<24>(a), _mm256_srli_epi32::<24>(b));
        out[7] = cvt(_mm256_srli_epi32::<28>(a), _mm256_srli_epi32::<28>(b));
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn fused_task_avx512(
    w: &PackedMatrix,
    x: &[f32],
    tokens: usize,
    out: *mut f32,
    p0: usize,
    p1: usize,
) {
    fused_task_generic::<Avx512>(w, x, tokens, out, p0, p1)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fused_task_avx2(
    w: &PackedMatrix,
    x: &[f32],
    tokens: usize,
    out: *mut f32,
    p0: usize,
    p1: usize,
) {
    fused_task_generic::<Avx2>(w, x, tokens, out, p0, p1)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_task_avx512(
    w: &PackedMatrix,
    x: &[f32],
    tokens: usize,
    out: *mut f32,
    grp: usize,
    t0: usize,
    t1: usize,
) {
    gemm_task_generic::<Avx512, 2, 12>(w, x, tokens, out, grp, t0, t1)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_task_avx2(
    w: &PackedMatrix,
    x: &[f32],
    tokens: usize,
    out: *mut f32,
    grp: usize,
    t0: usize,
    t1: usize,
) {
    gemm_task_generic::<Avx2, 1, 6>(w, x, tokens, out, grp, t0, t1)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn expand_panels_avx512(w: &PackedMatrix, p0: usize, p1: usize, dst: *mut f32) {
    expand_panels_generic::<Avx512>(w, p0, p1, dst)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn expand_panels_avx2(w: &PackedMatrix, p0: usize, p1: usize, dst: *mut f32) {
    expand_panels_generic::<Avx2>(w, p0, p1, dst)
}
