//! Element-wise and attention kernels of the forward pass.
//!
//! Every function here computes each output in an order fixed by the source
//! (explicit 16-lane accumulators and a fixed reduction tree), so results do
//! not depend on which instruction set ran them, on the batch, or on how a
//! prompt was chunked. The hot loops are compiled twice, for AVX-512 and for
//! the baseline, and picked at run time; `f32::mul_add` is a true fused
//! multiply-add on both, so both give the same bits.

// The kernels index fixed-size accumulator arrays by lane and row on
// purpose: the explicit indices are what fixes the reduction order, and
// they unroll into registers.
#![allow(clippy::needless_range_loop)]

/// Lanes of the fixed accumulation pattern used by [`dot`] and [`sum_squares`].
const LANES: usize = 16;

/// Reduces 16 lanes in a fixed pairwise tree.
#[inline(always)]
fn reduce_lanes(a: [f32; LANES]) -> f32 {
    let mut b = [0f32; 8];
    for i in 0..8 {
        b[i] = a[i] + a[i + 8];
    }
    let c = [b[0] + b[4], b[1] + b[5], b[2] + b[6], b[3] + b[7]];
    (c[0] + c[2]) + (c[1] + c[3])
}

/// Dot product with a fixed order: lane `l` accumulates elements `i ≡ l (mod 16)`
/// with fused multiply-adds, the tail goes to lanes 0.., then a fixed tree.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let n = a.len() / LANES * LANES;
    let mut i = 0;
    while i < n {
        for l in 0..LANES {
            acc[l] = a[i + l].mul_add(b[i + l], acc[l]);
        }
        i += LANES;
    }
    for (l, j) in (n..a.len()).enumerate() {
        acc[l] = a[j].mul_add(b[j], acc[l]);
    }
    reduce_lanes(acc)
}

/// Σ x², same order as [`dot`].
#[inline(always)]
pub fn sum_squares(x: &[f32]) -> f32 {
    dot(x, x)
}

/// `exp(x)` for f32 in a form that vectorises: range reduction to
/// `2^n · e^r` with `|r| ≤ ln2/2` and a degree-6 polynomial; within 2 ulp of
/// the correctly rounded value over the range used by softmax and SiLU.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Below -87.3 the result is under f32's normal range: flush to zero
    // (with a select, which vectorises).
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.0);
    // Round to nearest with the 1.5·2^23 trick: no libm call, vectorises.
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    // e^r ≈ 1 + r + r²/2! + ... + r⁶/6!
    let mut p = 1.0 / 720.0f32;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    let bits = ((n as i32 + 127) as u32) << 23;
    let y = p * f32::from_bits(bits);
    if underflow {
        0.0
    } else {
        y
    }
}

/// RMSNorm as Hugging Face computes it: `w * (x * rsqrt(mean(x²) + eps))`.
#[inline(always)]
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mean = sum_squares(x) / x.len() as f32;
    let r = 1.0 / (mean + eps).sqrt();
    for ((o, xi), wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * r);
    }
}

/// [`rms_norm`] of `x` into itself (a query or key head, say).
#[inline(always)]
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let mean = sum_squares(x) / x.len() as f32;
    let r = 1.0 / (mean + eps).sqrt();
    for (xi, wi) in x.iter_mut().zip(w) {
        *xi = wi * (*xi * r);
    }
}

/// `gate ← silu(gate) · up`, with `silu(g) = g / (1 + e^-g)`.
#[inline(always)]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let s = *g / (1.0 + exp(-*g));
        *g = s * u;
    }
}

/// Softmax in place over `s`: the maximum, then the exponentials, then
/// their sum in the fixed 16-lane order of [`dot`], then one multiply each.
/// Every step vectorises; the order depends only on `s.len()`.
#[inline(always)]
pub fn softmax(s: &mut [f32]) {
    let m = lanes_max(s);
    let n = s.len() / LANES * LANES;
    for v in s.iter_mut() {
        *v = exp(*v - m);
    }
    let mut acc = [0f32; LANES];
    for c in s[..n].chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (l, v) in s[n..].iter().enumerate() {
        acc[l] += v;
    }
    let inv = 1.0 / reduce_lanes(acc);
    for v in s.iter_mut() {
        *v *= inv;
    }
}

/// Whether the AVX-512 copies of the hot loops may run here
/// (`TANDEM_KERNEL=scalar|avx2` forces a lower tier, as for the matmuls).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            let forced = std::env::var("TANDEM_KERNEL").ok();
            let allowed = !matches!(forced.as_deref(), Some("scalar") | Some("avx2"));
            allowed && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX2+FMA copies may run here (hardware FMA: without it
/// `f32::mul_add` is a slow library call, though it gives the same bits).
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            let forced = std::env::var("TANDEM_KERNEL").ok();
            forced.as_deref() != Some("scalar")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name` that runs `$body` compiled for AVX-512, for AVX2+FMA, or
/// for the baseline, whichever this CPU allows. All copies compute
/// identical bits (the source fixes every operation and its order).
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn mid($($arg: $ty),*) $(-> $ret)? $body
                if $crate::ops::has_avx512() {
                    // SAFETY: the CPU supports the enabled features (checked above).
                    return unsafe { fast($($arg),*) };
                }
                if $crate::ops::has_avx2() {
                    // SAFETY: as above.
                    return unsafe { mid($($arg),*) };
                }
            }
            #[inline(never)]
            fn base($($arg: $ty),*) $(-> $ret)? $body
            base($($arg),*)
        }
    };
}

/// Where one sequence's keys and values sit in one layer of the paged pool
/// (see `kv` for the block layout).
#[derive(Clone, Copy)]
pub struct PagedKv<'a> {
    /// The layer's blocks.
    pub layer: crate::kv::PoolLayer<'a>,
    pub blocks: &'a [u32],
    pub block_size: usize,
    pub block_floats: usize,
    /// Offsets of this KV head's K (`[dim][slot]`) and V (`[slot][dim]`) inside a block.
    pub k_off: usize,
    pub v_off: usize,
}

/// Attention of `R` query heads that share one KV head (grouped-query
/// attention) and see the same `n_keys` keys of a paged sequence.
///
/// Each score is one sequential FMA chain over the head dimensions, scaled
/// once; the weighted sum of values runs over keys in order, per output
/// lane. Doing the `R` heads together only interleaves independent chains
/// (more work in flight per cycle), so a head's result does not depend on
/// `R`. `q` holds the `R` heads back to back, as does `out`; `scores` is
/// scratch of at least `R * n_keys`.
#[inline(always)]
fn attend_group<const R: usize>(
    q: &[f32],
    kv: &PagedKv<'_>,
    n_keys: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len() / R;
    let bs = kv.block_size;
    let n_blocks = n_keys.div_ceil(bs);
    for bi in 0..n_blocks {
        let nk = bs.min(n_keys - bi * bs);
        let kblk = &kv.layer.block(kv.blocks[bi])[kv.k_off..kv.k_off + hd * bs];
        if bs == 16 {
            // The common block size: 16 running scores per head in registers.
            let mut acc = [[0f32; 16]; R];
            for d in 0..hd {
                let row: &[f32; 16] = kblk[d * 16..d * 16 + 16].try_into().expect("16 slots");
                for r in 0..R {
                    let qd = q[r * hd + d];
                    for l in 0..16 {
                        acc[r][l] = qd.mul_add(row[l], acc[r][l]);
                    }
                }
            }
            for r in 0..R {
                for l in 0..nk {
                    scores[r * n_keys + bi * 16 + l] = acc[r][l] * scale;
                }
            }
        } else {
            for r in 0..R {
                let s = &mut scores[r * n_keys + bi * bs..r * n_keys + bi * bs + nk];
                s.fill(0.0);
                for d in 0..hd {
                    let qd = q[r * hd + d];
                    for (si, ki) in s.iter_mut().zip(&kblk[d * bs..d * bs + nk]) {
                        *si = qd.mul_add(*ki, *si);
                    }
                }
                for si in s.iter_mut() {
                    *si *= scale;
                }
            }
        }
    }
    for r in 0..R {
        softmax(&mut scores[r * n_keys..(r + 1) * n_keys]);
    }
    let value = |j: usize| -> &[f32] {
        let base = kv.v_off + (j % bs) * hd;
        &kv.layer.block(kv.blocks[j / bs])[base..base + hd]
    };
    if hd == 64 {
        // Accumulators in registers: R × 4 vectors.
        let mut acc = [[0f32; 64]; R];
        for j in 0..n_keys {
            let v: &[f32; 64] = value(j).try_into().expect("64 dims");
            for r in 0..R {
                let p = scores[r * n_keys + j];
                for d in 0..64 {
                    acc[r][d] = p.mul_add(v[d], acc[r][d]);
                }
            }
        }
        for r in 0..R {
            out[r * 64..(r + 1) * 64].copy_from_slice(&acc[r]);
        }
    } else {
        out[..R * hd].fill(0.0);
        for j in 0..n_keys {
            let v = value(j);
            for r in 0..R {
                let p = scores[r * n_keys + j];
                for (o, vi) in out[r * hd..(r + 1) * hd].iter_mut().zip(v) {
                    *o = p.mul_add(*vi, *o);
                }
            }
        }
    }
}

/// Scores of blocks `bi..bi + NB` for [`attend_group_avx512`]: for each
/// key, one FMA chain over the 64 head dimensions, then the scale.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn score_blocks<const R: usize, const NB: usize>(
    q: &[f32],
    kv: &PagedKv<'_>,
    bi: usize,
    n_keys: usize,
    scale: f32,
    sp: *mut f32,
) {
    use std::arch::x86_64::*;
    const HD: usize = 64;
    const BS: usize = 16;
    let n_blocks = n_keys.div_ceil(BS);
    let layer = kv.layer.as_ptr();
    let block_at = |b: usize| layer.add(kv.blocks[b] as usize * kv.block_floats);
    // Decode attention streams a cache far larger than the caches, and a
    // sequence's blocks are scattered, so the hardware prefetchers restart
    // at every 4 KiB block. Each block's loop asks the L2 for the keys two
    // blocks ahead and for its own values (read after the softmax), a line
    // of each per head dimension. Into L2, not L1: at L1 the requests crowd
    // out the loads (measured with `bench_attention`: 17 ms per batch-32
    // step without prefetching, 16 with both into L1, 12.5-13 into L2).
    let mut kp = [std::ptr::null::<f32>(); NB];
    let mut vp = [std::ptr::null::<f32>(); NB];
    let mut kn = [std::ptr::null::<f32>(); NB];
    for i in 0..NB {
        kp[i] = block_at(bi + i).add(kv.k_off);
        vp[i] = block_at(bi + i).add(kv.v_off);
        kn[i] = if bi + i + 2 < n_blocks {
            block_at(bi + i + 2).add(kv.k_off)
        } else {
            kp[i]
        };
    }
    let mut acc = [[_mm512_setzero_ps(); R]; NB];
    for d in 0..HD {
        for i in 0..NB {
            _mm_prefetch::<_MM_HINT_T1>(kn[i].add(d * BS) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(vp[i].add(d * BS) as *const i8);
        }
        for i in 0..NB {
            let row = _mm512_loadu_ps(kp[i].add(d * BS));
            for r in 0..R {
                acc[i][r] =
                    _mm512_fmadd_ps(_mm512_set1_ps(*q.get_unchecked(r * HD + d)), row, acc[i][r]);
            }
        }
    }
    let vscale = _mm512_set1_ps(scale);
    for i in 0..NB {
        let b = bi + i;
        let nk = BS.min(n_keys - b * BS);
        let mask: __mmask16 = ((1u32 << nk) - 1) as __mmask16;
        for r in 0..R {
            _mm512_mask_storeu_ps(
                sp.add(r * n_keys + b * BS),
                mask,
                _mm512_mul_ps(acc[i][r], vscale),
            );
        }
    }
}

/// [`attend_group`] for the common shape (16-token blocks, 64-dim heads)
/// written with AVX-512 intrinsics: the compiler does not keep the
/// `[[f32; 16]; R]` accumulators in vector registers on its own. Each lane
/// performs exactly the same fused multiply-adds in the same order as the
/// portable code, so the two give identical bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_group_avx512<const R: usize>(
    q: &[f32],
    kv: &PagedKv<'_>,
    n_keys: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    const HD: usize = 64;
    const BS: usize = 16;
    debug_assert!(q.len() == R * HD && out.len() >= R * HD && scores.len() >= R * n_keys);
    let layer = kv.layer.as_ptr();
    let sp = scores.as_mut_ptr();
    let n_blocks = n_keys.div_ceil(BS);
    // Two blocks at a time: twice the independent FMA chains in flight
    // (each score is still its own chain over the head dimensions).
    let mut bi = 0;
    while bi < n_blocks {
        if bi + 1 < n_blocks {
            score_blocks::<R, 2>(q, kv, bi, n_keys, scale, sp);
            bi += 2;
        } else {
            score_blocks::<R, 1>(q, kv, bi, n_keys, scale, sp);
            bi += 1;
        }
    }
    for r in 0..R {
        softmax(&mut scores[r * n_keys..(r + 1) * n_keys]);
    }
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for j in 0..n_keys {
        let vp = layer.add(kv.blocks[j / BS] as usize * kv.block_floats + kv.v_off + (j % BS) * HD);
        let v = [
            _mm512_loadu_ps(vp),
            _mm512_loadu_ps(vp.add(16)),
            _mm512_loadu_ps(vp.add(32)),
            _mm512_loadu_ps(vp.add(48)),
        ];
        for r in 0..R {
            let p = _mm512_set1_ps(*scores.get_unchecked(r * n_keys + j));
            for c in 0..4 {
                acc[r][c] = _mm512_fmadd_ps(p, v[c], acc[r][c]);
            }
        }
    }
    let op = out.as_mut_ptr();
    for r in 0..R {
        for c in 0..4 {
            _mm512_storeu_ps(op.add(r * HD + c * 16), acc[r][c]);
        }
    }
}

/// [`attend_group_avx512`] for CPUs with AVX2 and FMA but no AVX-512 (the
/// portable code compiled for AVX2 runs about 3.5× slower: its `[f32; 16]`
/// accumulators live in memory). The same fused multiply-adds in the same
/// order per lane, so the same bits, in 8-lane registers: a block's 16
/// scores of a head are two registers, and the output is accumulated 16
/// dimensions at a time so that the R × 2 accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // indices name the lanes, as in the portable code
unsafe fn attend_group_avx2<const R: usize>(
    q: &[f32],
    kv: &PagedKv<'_>,
    n_keys: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    const HD: usize = 64;
    const BS: usize = 16;
    debug_assert!(q.len() == R * HD && out.len() >= R * HD && scores.len() >= R * n_keys);
    let layer = kv.layer.as_ptr();
    let sp = scores.as_mut_ptr();
    let n_blocks = n_keys.div_ceil(BS);
    let block_at = |b: usize| layer.add(kv.blocks[b] as usize * kv.block_floats);
    let vscale = _mm256_set1_ps(scale);
    for b in 0..n_blocks {
        let kp = block_at(b).add(kv.k_off);
        let vp = block_at(b).add(kv.v_off);
        // As in `score_blocks`: keys two blocks ahead and this block's
        // values into L2, a line of each per head dimension.
        let kn = if b + 2 < n_blocks {
            block_at(b + 2).add(kv.k_off)
        } else {
            kp
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for d in 0..HD {
            _mm_prefetch::<_MM_HINT_T1>(kn.add(d * BS) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(vp.add(d * BS) as *const i8);
            let lo = _mm256_loadu_ps(kp.add(d * BS));
            let hi = _mm256_loadu_ps(kp.add(d * BS + 8));
            for r in 0..R {
                let qd = _mm256_set1_ps(*q.get_unchecked(r * HD + d));
                acc[r][0] = _mm256_fmadd_ps(qd, lo, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(qd, hi, acc[r][1]);
            }
        }
        let nk = BS.min(n_keys - b * BS);
        for r in 0..R {
            let mut s = [0f32; BS];
            _mm256_storeu_ps(s.as_mut_ptr(), _mm256_mul_ps(acc[r][0], vscale));
            _mm256_storeu_ps(s.as_mut_ptr().add(8), _mm256_mul_ps(acc[r][1], vscale));
            std::ptr::copy_nonoverlapping(s.as_ptr(), sp.add(r * n_keys + b * BS), nk);
        }
    }
    for r in 0..R {
        softmax(&mut scores[r * n_keys..(r + 1) * n_keys]);
    }
    let op = out.as_mut_ptr();
    for c in 0..HD / 16 {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for j in 0..n_keys {
            let vp = layer.add(
                kv.blocks[j / BS] as usize * kv.block_floats + kv.v_off + (j % BS) * HD + c * 16,
            );
            let v0 = _mm256_loadu_ps(vp);
            let v1 = _mm256_loadu_ps(vp.add(8));
            for r in 0..R {
                let p = _mm256_set1_ps(*scores.get_unchecked(r * n_keys + j));
                acc[r][0] = _mm256_fmadd_ps(p, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(p, v1, acc[r][1]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(op.add(r * HD + c * 16), acc[r][0]);
            _mm256_storeu_ps(op.add(r * HD + c * 16 + 8), acc[r][1]);
        }
    }
}

/// Picks the intrinsics path for the common shape, the portable one otherwise.
#[inline(always)]
fn attend_group_dispatch<const R: usize>(
    q: &[f32],
    kv: &PagedKv<'_>,
    n_keys: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if kv.block_size == 16 && q.len() == R * 64 {
            if has_avx512() {
                // SAFETY: AVX-512F is present (checked); the shapes match the kernel's.
                unsafe { attend_group_avx512::<R>(q, kv, n_keys, scale, scores, out) };
                return;
            }
            if has_avx2() {
                // SAFETY: AVX2 and FMA are present (checked); the shapes match.
                unsafe { attend_group_avx2::<R>(q, kv, n_keys, scale, scores, out) };
                return;
            }
        }
    }
    attend_group::<R>(q, kv, n_keys, scale, scores, out)
}

multiversion! {
    /// Attention for `n_q` consecutive query tokens of one sequence and the
    /// `n_group` query heads of one KV head; query token `i` sees
    /// `n_keys_first + i` keys (causal). A token's heads sit back to back at
    /// `qs[i * q_stride..]` and `out[i * out_stride..]`.
    pub fn attend_many(
        qs: &[f32],
        q_stride: usize,
        n_q: usize,
        head_dim: usize,
        n_group: usize,
        kv: &PagedKv<'_>,
        n_keys_first: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
        out_stride: usize,
    ) {
        for i in 0..n_q {
            let n_keys = n_keys_first + i;
            let mut r0 = 0;
            while r0 < n_group {
                let take = (n_group - r0).min(4);
                let q = &qs[i * q_stride + r0 * head_dim..i * q_stride + (r0 + take) * head_dim];
                let o = &mut out[i * out_stride + r0 * head_dim..i * out_stride + (r0 + take) * head_dim];
                match take {
                    1 => attend_group_dispatch::<1>(q, kv, n_keys, scale, scores, o),
                    2 => attend_group_dispatch::<2>(q, kv, n_keys, scale, scores, o),
                    3 => attend_group_dispatch::<3>(q, kv, n_keys, scale, scores, o),
                    _ => attend_group_dispatch::<4>(q, kv, n_keys, scale, scores, o),
                }
                r0 += take;
            }
        }
    }
}

/// The largest value (NaNs skipped; -inf for an empty or all-NaN slice),
/// over 16 lanes so that it vectorises.
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let n = x.len() / LANES * LANES;
    for c in x[..n].chunks_exact(LANES) {
        for l in 0..LANES {
            mx[l] = if c[l] > mx[l] { c[l] } else { mx[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in mx.iter().chain(&x[n..]) {
        m = if v > m { v } else { m };
    }
    m
}

multiversion! {
    /// [`lanes_max`] compiled for the best instruction set here.
    pub fn max_value(x: &[f32]) -> f32 {
        lanes_max(x)
    }
}

multiversion! {
    /// `out[i] = exp((x[i] - max) * inv_t)`: the sampler's unnormalised
    /// weights at temperature `1 / inv_t` (vectorised; a whole vocabulary
    /// takes microseconds).
    pub fn exp_weights(x: &[f32], max: f32, inv_t: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = exp((v - max) * inv_t);
        }
    }
}

multiversion! {
    /// One token's LoRA update, `out += scale · B·(A·x)`, with `a` the
    /// `rank × x.len()` down-projection and `bt` the `rank × out.len()`
    /// up-projection stored transposed, so the second product is `rank`
    /// vectorised passes over `out`. Each `A` row is a [`dot`]; each output
    /// sums its `rank` terms in order: the result depends only on this
    /// token's inputs.
    pub fn lora_update(a: &[f32], bt: &[f32], rank: usize, x: &[f32], scale: f32, out: &mut [f32]) {
        const CHUNK: usize = 64;
        // Loops, not iterator closures: a closure does not inherit the
        // enclosing function's target features, and `dot`'s fused
        // multiply-adds would become library calls.
        let mut u = vec![0f32; rank];
        for (r, ur) in u.iter_mut().enumerate() {
            *ur = dot(&a[r * x.len()..(r + 1) * x.len()], x);
        }
        let n = out.len();
        let mut acc = [0f32; CHUNK];
        let mut o0 = 0;
        while o0 < n {
            let len = CHUNK.min(n - o0);
            let acc = &mut acc[..len];
            acc.fill(0.0);
            for (r, &ur) in u.iter().enumerate().take(rank) {
                let b = &bt[r * n + o0..r * n + o0 + len];
                for (s, &bv) in acc.iter_mut().zip(b) {
                    *s = bv.mul_add(ur, *s);
                }
            }
            for (o, &s) in out[o0..o0 + len].iter_mut().zip(acc.iter()) {
                *o += s * scale;
            }
            o0 += len;
        }
    }
}

multiversion! {
    pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            rms_norm(xr, w, eps, or);
        }
    }
}

multiversion! {
    pub fn silu_mul_rows(gate_up: &mut [f32], ffn: usize) {
        for row in gate_up.chunks_exact_mut(2 * ffn) {
            let (g, u) = row.split_at_mut(ffn);
            silu_mul(g, u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.013;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn dot_matches_f64() {
        let a: Vec<f32> = (0..77)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let b: Vec<f32> = (0..77).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.3).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut s = vec![1.0, 2.0, 3.0, -1e9];
        softmax(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(s[3], 0.0);
        assert!(s[2] > s[1] && s[1] > s[0]);
    }

    #[test]
    fn attention_paths_agree_bit_for_bit() {
        // Random paged KV: 3 blocks of 16 slots, 2 KV heads, head dim 64.
        let (bs, hd, nkv) = (16usize, 64usize, 2usize);
        let block_floats = 2 * nkv * hd * bs;
        let mut state = 12345u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let layer: Vec<f32> = (0..4 * block_floats).map(|_| rnd()).collect();
        let blocks = [2u32, 0, 3];
        let q: Vec<f32> = (0..3 * hd).map(|_| rnd() * 4.0).collect();
        for g in 0..nkv {
            let kv = PagedKv {
                layer: crate::kv::PoolLayer::from_slice(&layer, block_floats),
                blocks: &blocks,
                block_size: bs,
                block_floats,
                k_off: g * hd * bs,
                v_off: (nkv + g) * hd * bs,
            };
            for n_keys in [1usize, 15, 16, 17, 40, 48] {
                let mut s1 = vec![0f32; 3 * n_keys];
                let mut o1 = vec![0f32; 3 * hd];
                attend_group::<3>(&q, &kv, n_keys, 0.125, &mut s1, &mut o1);
                let mut s2 = vec![0f32; 3 * n_keys];
                let mut o2 = vec![0f32; 3 * hd];
                attend_group_dispatch::<3>(&q, &kv, n_keys, 0.125, &mut s2, &mut o2);
                assert_eq!(o1, o2, "n_keys {n_keys}");
                // One head alone gives the same bits as inside a group.
                let mut s3 = vec![0f32; n_keys];
                let mut o3 = vec![0f32; hd];
                attend_group_dispatch::<1>(&q[hd..2 * hd], &kv, n_keys, 0.125, &mut s3, &mut o3);
                assert_eq!(&o1[hd..2 * hd], &o3[..]);
                let mut s4 = vec![0f32; 2 * n_keys];
                let mut o4 = vec![0f32; 2 * hd];
                attend_group_dispatch::<2>(&q[..2 * hd], &kv, n_keys, 0.125, &mut s4, &mut o4);
                assert_eq!(&o1[..2 * hd], &o4[..]);
                // The AVX2 kernel (what CPUs without AVX-512 run), whatever
                // this CPU dispatches to.
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    let mut s5 = vec![0f32; 3 * n_keys];
                    let mut o5 = vec![0f32; 3 * hd];
                    // SAFETY: AVX2 and FMA are present (checked).
                    unsafe { attend_group_avx2::<3>(&q, &kv, n_keys, 0.125, &mut s5, &mut o5) };
                    assert_eq!(o1, o5, "avx2, n_keys {n_keys}");
                    assert_eq!(s1, s5, "avx2 scores, n_keys {n_keys}");
                    let (mut s6, mut o6) = (vec![0f32; n_keys], vec![0f32; hd]);
                    // SAFETY: as above.
                    unsafe {
                        attend_group_avx2::<1>(&q[hd..2 * hd], &kv, n_keys, 0.125, &mut s6, &mut o6)
                    };
                    assert_eq!(&o1[hd..2 * hd], &o6[..]);
                    let (mut s7, mut o7) = (vec![0f32; 2 * n_keys], vec![0f32; 2 * hd]);
                    // SAFETY: as above.
                    unsafe {
                        attend_group_avx2::<2>(&q[..2 * hd], &kv, n_keys, 0.125, &mut s7, &mut o7)
                    };
                    assert_eq!(&o1[..2 * hd], &o7[..]);
                }
            }
        }
    }

    #[test]
    fn multiversioned_kernels_agree_with_baseline() {
        // The fast and base copies of a kernel must give identical bits.
        let d = 64;
        let x: Vec<f32> = (0..d * 3)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 1.0 + (i as f32) / 100.0).collect();
        let mut a = vec![0f32; d * 3];
        rms_norm_rows(&x, &w, 1e-5, &mut a);
        let mut b = vec![0f32; d * 3];
        for (xr, or) in x.chunks_exact(d).zip(b.chunks_exact_mut(d)) {
            rms_norm(xr, &w, 1e-5, or);
        }
        assert_eq!(a, b);
    }
}
