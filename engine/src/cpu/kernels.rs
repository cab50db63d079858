//! SIMD kernels, written once over a 16-lane vector abstraction ([`Isa`])
//! and instantiated per instruction set in `x86.rs`.
//!
//! Everything here is `#[inline(always)]`: the code only becomes real
//! machine code inside the `#[target_feature]` entry points of `x86.rs`,
//! which is what lets the intrinsics inline into it.
//!
//! Every accumulator is 16 per-row chains of the reduction-order contract
//! (see the parent module): a chain only ever sees `fma(w[k], x[k], acc)` in
//! increasing `k` within one 64-input chunk, starting from zero, and chunk
//! partials are added left to right.

// Index loops over small fixed-size arrays of registers read clearer (and
// unroll the same) as `for i in 0..N`.
#![allow(clippy::needless_range_loop)]

use std::cell::RefCell;

use super::{
    float_offset, unit_offset, Format, Kernel, PackedMatrix, FLOAT_UNIT, PANEL, REDUCTION_CHUNK,
};

/// Sixteen f32 lanes (one zmm, or two ymm) and the operations the kernels need.
pub(super) trait Isa: Copy {
    type V: Copy;
    /// 32 vector registers (AVX-512) rather than 16: room for more
    /// independent accumulators.
    const WIDE: bool;
    /// Hint that the cache line at `p` will be read soon (any address).
    unsafe fn prefetch(p: *const u8);
    unsafe fn zero() -> Self::V;
    /// Broadcast of `*p`.
    unsafe fn splat(p: *const f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, rounded once.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// 16 IEEE halves at `p`, widened.
    unsafe fn f16(p: *const u8) -> Self::V;
    /// 16 bfloat16 at `p`, widened.
    unsafe fn bf16(p: *const u8) -> Self::V;
    /// 16 `i8` at `p`, converted.
    unsafe fn q8(p: *const u8) -> Self::V;
    /// The constant [`Isa::q4x8`] needs for a nibble bias (a lookup table
    /// of `bias + 0..16`, or the bias itself).
    unsafe fn q4_aux(bias: f32) -> Self::V;
    /// 64 bytes at `p`, 16 row lanes of 32 bits, each holding 8 nibbles
    /// (input `i` in bits `4i..4i+4`): `out[i]` = nibble `i` + bias, as f32.
    unsafe fn q4x8<const BIASED: bool>(p: *const u8, aux: Self::V, out: &mut [Self::V; 8]);
}

/// Inputs expanded per [`Fmt::decode`] call, at most.
const MAX_STEP: usize = 8;

/// How a packed panel's weights are read (one type per [`Format`]).
trait Fmt {
    /// Inputs per block ([`FLOAT_UNIT`] for float formats).
    const SUB: usize;
    /// Inputs per [`Fmt::decode`] (divides `SUB` for quantised formats).
    const STEP: usize;
    /// Bytes of packed data one [`Fmt::decode`] reads.
    const STEP_BYTES: usize;
    /// The block holding input `k0` (a multiple of `SUB`): pointer, scale, offset.
    /// (`cols`: the matrix's, for [`unit_offset`].)
    unsafe fn block<I: Isa>(panel: *const u8, cols: usize, k0: usize) -> (*const u8, I::V, I::V);
    /// Exact weights of the block's inputs `j .. j + STEP` into `w[..STEP]`
    /// (`j` a multiple of `STEP`).
    unsafe fn decode<I: Isa>(
        b: *const u8,
        j: usize,
        sc: I::V,
        of: I::V,
        aux: I::V,
        w: &mut [I::V; MAX_STEP],
    );
    /// Exact weight of the block's input `j` (tails shorter than `STEP`).
    #[inline(always)]
    unsafe fn one<I: Isa>(b: *const u8, j: usize, sc: I::V, of: I::V, aux: I::V) -> I::V {
        let mut w = [I::zero(); MAX_STEP];
        Self::decode::<I>(b, j / Self::STEP * Self::STEP, sc, of, aux, &mut w);
        w[j % Self::STEP]
    }
}

struct FF32;
struct FF16;
struct FBF16;
struct FQ8<const S: usize, const H: bool>;
struct FQ4<const S: usize, const BIASED: bool, const H: bool>;

/// Pointer to the quantised sub-block holding input `k0`, its scales and
/// offsets (f16 when `H`, see `Format::params_bytes`), and where its `q` start.
#[inline(always)]
unsafe fn qblock<I: Isa, const H: bool>(
    panel: *const u8,
    cols: usize,
    k0: usize,
    sub: usize,
    q_bytes: usize,
) -> (*const u8, I::V, I::V) {
    let ph = if H { 64 } else { 128 };
    let b = panel.add(unit_offset(cols, sub, ph + q_bytes, k0));
    if H {
        (b.add(ph), I::f16(b), I::f16(b.add(32)))
    } else {
        (
            b.add(ph),
            I::load(b as *const f32),
            I::load(b.add(64) as *const f32),
        )
    }
}

impl Fmt for FF32 {
    const SUB: usize = FLOAT_UNIT;
    const STEP: usize = 4;
    const STEP_BYTES: usize = 4 * PANEL * 4;
    #[inline(always)]
    unsafe fn block<I: Isa>(panel: *const u8, cols: usize, k0: usize) -> (*const u8, I::V, I::V) {
        (panel.add(float_offset(cols, 4, k0)), I::zero(), I::zero())
    }
    #[inline(always)]
    unsafe fn decode<I: Isa>(
        b: *const u8,
        j: usize,
        _: I::V,
        _: I::V,
        _: I::V,
        w: &mut [I::V; MAX_STEP],
    ) {
        for i in 0..Self::STEP {
            w[i] = I::load(b.add((j + i) * PANEL * 4) as *const f32);
        }
    }
    #[inline(always)]
    unsafe fn one<I: Isa>(b: *const u8, j: usize, _: I::V, _: I::V, _: I::V) -> I::V {
        I::load(b.add(j * PANEL * 4) as *const f32)
    }
}

impl Fmt for FF16 {
    const SUB: usize = FLOAT_UNIT;
    const STEP: usize = 4;
    const STEP_BYTES: usize = 4 * PANEL * 2;
    #[inline(always)]
    unsafe fn block<I: Isa>(panel: *const u8, cols: usize, k0: usize) -> (*const u8, I::V, I::V) {
        (panel.add(float_offset(cols, 2, k0)), I::zero(), I::zero())
    }
    #[inline(always)]
    unsafe fn decode<I: Isa>(
        b: *const u8,
        j: usize,
        _: I::V,
        _: I::V,
        _: I::V,
        w: &mut [I::V; MAX_STEP],
    ) {
        for i in 0..Self::STEP {
            w[i] = I::f16(b.add((j + i) * PANEL * 2));
        }
    }
    #[inline(always)]
    unsafe fn one<I: Isa>(b: *const u8, j: usize, _: I::V, _: I::V, _: I::V) -> I::V {
        I::f16(b.add(j * PANEL * 2))
    }
}

impl Fmt for FBF16 {
    const SUB: usize = FLOAT_UNIT;
    const STEP: usize = 4;
    const STEP_BYTES: usize = 4 * PANEL * 2;
    #[inline(always)]
    unsafe fn block<I: Isa>(panel: *const u8, cols: usize, k0: usize) -> (*const u8, I::V, I::V) {
        (panel.add(float_offset(cols, 2, k0)), I::zero(), I::zero())
    }
    #[inline(always)]
    unsafe fn decode<I: Isa>(
        b: *const u8,
        j: usize,
        _: I::V,
        _: I::V,
        _: I::V,
        w: &mut [I::V; MAX_STEP],
    ) {
        for i in 0..Self::STEP {
            w[i] = I::bf16(b.add((j + i) * PANEL * 2));
        }
    }
    #[inline(always)]
    unsafe fn one<I: Isa>(b: *const u8, j: usize, _: I::V, _: I::V, _: I::V) -> I::V {
        I::bf16(b.add(j * PANEL * 2))
    }
}

impl<const S: usize, const H: bool> Fmt for FQ8<S, H> {
    const SUB: usize = S;
    const STEP: usize = 4;
    const STEP_BYTES: usize = 4 * PANEL;
    #[inline(always)]
    unsafe fn block<I: Isa>(panel: *const u8, cols: usize, k0: usize) -> (*const u8, I::V, I::V) {
        qblock::<I, H>(panel, cols, k0, S, S * PANEL)
    }
    #[inline(always)]
    unsafe fn decode<I: Isa>(
        b: *const u8,
        j: usize,
        sc: I::V,
        of: I::V,
        _: I::V,
        w: &mut [I::V; MAX_STEP],
    ) {
        for i in 0..Self::STEP {
            w[i] = I::fma(sc, I::q8(b.add((j + i) * PANEL)), of);
        }
    }
}

impl<const S: usize, const BIASED: bool, const H: bool> Fmt for FQ4<S, BIASED, H> {
    const SUB: usize = S;
    const STEP: usize = 8;
    const STEP_BYTES: usize = 64;
    #[inline(always)]
    unsafe fn block<I: Isa>(panel: *const u8, cols: usize, k0: usize) -> (*const u8, I::V, I::V) {
        qblock::<I, H>(panel, cols, k0, S, S * PANEL / 2)
    }
    #[inline(always)]
    unsafe fn decode<I: Isa>(
        b: *const u8,
        j: usize,
        sc: I::V,
        of: I::V,
        aux: I::V,
        w: &mut [I::V; MAX_STEP],
    ) {
        I::q4x8::<BIASED>(b.add(j / 8 * 64), aux, w);
        for v in w.iter_mut() {
            *v = I::fma(sc, *v, of);
        }
    }
}

// ---------------------------------------------------------------------------
// Fused path (few tokens): expand weights in registers, use them at once.

/// How far ahead of the decode position the fused kernel prefetches
/// (bytes; 1-2 KiB measured best, ~20% faster one-token decode than none).
const PREFETCH_AHEAD: usize = 2048;

/// Partials of `CG` consecutive chunks of equal length `len` (starting at
/// input `k0`) for `T` tokens of one panel.
#[inline(always)]
unsafe fn fused_group<I: Isa, F: Fmt, const T: usize, const CG: usize>(
    panel: *const u8,
    aux: I::V,
    x: *const f32,
    cols: usize,
    k0: usize,
    len: usize,
) -> [[I::V; T]; CG] {
    let ldx = cols;
    let mut acc = [[I::zero(); T]; CG];
    let mut j0 = 0;
    while j0 < len {
        let seg = if F::SUB < len - j0 { F::SUB } else { len - j0 };
        let mut bp = [std::ptr::null::<u8>(); CG];
        let mut sc = [I::zero(); CG];
        let mut of = [I::zero(); CG];
        for c in 0..CG {
            (bp[c], sc[c], of[c]) = F::block::<I>(panel, cols, k0 + c * REDUCTION_CHUNK + j0);
        }
        let xs = x.add(k0 + j0);
        let mut j = 0;
        while j + F::STEP <= seg {
            for c in 0..CG {
                // Software prefetch: decode streams from memory, and the
                // hardware prefetchers alone leave it well below bandwidth.
                I::prefetch(bp[c].wrapping_add(j / F::STEP * F::STEP_BYTES + PREFETCH_AHEAD));
                let mut w = [I::zero(); MAX_STEP];
                F::decode::<I>(bp[c], j, sc[c], of[c], aux, &mut w);
                let xk = xs.add(c * REDUCTION_CHUNK + j);
                for (i, wi) in w.iter().enumerate().take(F::STEP) {
                    for t in 0..T {
                        acc[c][t] = I::fma(*wi, I::splat(xk.add(t * ldx + i)), acc[c][t]);
                    }
                }
            }
            j += F::STEP;
        }
        while j < seg {
            for c in 0..CG {
                let w0 = F::one::<I>(bp[c], j, sc[c], of[c], aux);
                let xk = xs.add(c * REDUCTION_CHUNK + j);
                for t in 0..T {
                    acc[c][t] = I::fma(w0, I::splat(xk.add(t * ldx)), acc[c][t]);
                }
            }
            j += 1;
        }
        j0 += seg;
    }
    acc
}

/// Adds chunk partials, in chunk order, into the running totals.
#[inline(always)]
unsafe fn fold<I: Isa, const T: usize, const CG: usize>(
    tot: &mut [I::V; T],
    acc: [[I::V; T]; CG],
    first_chunk: usize,
) {
    for (c, a) in acc.iter().enumerate() {
        for t in 0..T {
            tot[t] = if first_chunk + c == 0 {
                a[t]
            } else {
                I::add(tot[t], a[t])
            };
        }
    }
}

/// All outputs of one panel for `T` tokens, interleaving `CG` chunks.
#[inline(always)]
unsafe fn fused_panel<I: Isa, F: Fmt, const T: usize, const CG: usize>(
    panel: *const u8,
    bias: I::V,
    x: *const f32,
    cols: usize,
    out: *mut f32,
    ldo: usize,
) {
    let full = cols / REDUCTION_CHUNK;
    let rem = cols % REDUCTION_CHUNK;
    let mut tot = [I::zero(); T];
    let mut c = 0;
    while c + CG <= full {
        let a =
            fused_group::<I, F, T, CG>(panel, bias, x, cols, c * REDUCTION_CHUNK, REDUCTION_CHUNK);
        fold::<I, T, CG>(&mut tot, a, c);
        c += CG;
    }
    let left = full - c;
    if CG > 3 && left == 3 {
        let a =
            fused_group::<I, F, T, 3>(panel, bias, x, cols, c * REDUCTION_CHUNK, REDUCTION_CHUNK);
        fold::<I, T, 3>(&mut tot, a, c);
    } else if CG > 2 && left == 2 {
        let a =
            fused_group::<I, F, T, 2>(panel, bias, x, cols, c * REDUCTION_CHUNK, REDUCTION_CHUNK);
        fold::<I, T, 2>(&mut tot, a, c);
    } else if CG > 1 && left == 1 {
        let a =
            fused_group::<I, F, T, 1>(panel, bias, x, cols, c * REDUCTION_CHUNK, REDUCTION_CHUNK);
        fold::<I, T, 1>(&mut tot, a, c);
    }
    if rem > 0 {
        let a = fused_group::<I, F, T, 1>(panel, bias, x, cols, full * REDUCTION_CHUNK, rem);
        fold::<I, T, 1>(&mut tot, a, full);
    }
    for (t, v) in tot.iter().enumerate() {
        I::store(out.add(t * ldo), *v);
    }
}

#[inline(always)]
unsafe fn fused_panels<I: Isa, F: Fmt>(
    w: &PackedMatrix,
    bias: I::V,
    x: *const f32,
    tokens: usize,
    out: *mut f32,
    p0: usize,
    p1: usize,
) {
    let (rows, cols) = (w.rows, w.cols);
    let base = w.bytes().as_ptr();
    let mut scratch = [0f32; 4 * PANEL];
    for p in p0..p1 {
        let panel = base.add(p * w.panel_bytes);
        let valid = PANEL.min(rows - p * PANEL);
        let mut t = 0;
        while t < tokens {
            // Each pass expands the panel's weights once for its tokens:
            // three tokens take one pass of three, not two passes (2 + 1).
            let nt = (tokens - t).min(4);
            let (o, ldo) = if valid == PANEL {
                (out.add(t * rows + p * PANEL), rows)
            } else {
                (scratch.as_mut_ptr(), PANEL)
            };
            let xt = x.add(t * cols);
            // Independent chains: tokens × chunks walked side by side
            // (`CHUNK_GROUP` chunks make one sequential stream, see
            // `unit_offset`), as many as the registers allow.
            match (nt, I::WIDE) {
                (4, true) => fused_panel::<I, F, 4, 4>(panel, bias, xt, cols, o, ldo),
                (4, false) => fused_panel::<I, F, 4, 1>(panel, bias, xt, cols, o, ldo),
                (3, true) => fused_panel::<I, F, 3, 4>(panel, bias, xt, cols, o, ldo),
                (3, false) => fused_panel::<I, F, 3, 1>(panel, bias, xt, cols, o, ldo),
                (2, true) => fused_panel::<I, F, 2, 4>(panel, bias, xt, cols, o, ldo),
                (2, false) => fused_panel::<I, F, 2, 2>(panel, bias, xt, cols, o, ldo),
                _ => fused_panel::<I, F, 1, 4>(panel, bias, xt, cols, o, ldo),
            }
            if valid < PANEL {
                for tt in 0..nt {
                    std::ptr::copy_nonoverlapping(
                        scratch.as_ptr().add(tt * PANEL),
                        out.add((t + tt) * rows + p * PANEL),
                        valid,
                    );
                }
            }
            t += nt;
        }
    }
}

/// Calls `$body` with `$F` bound to the matrix's format type.
macro_rules! with_format {
    ($fmt:expr, $F:ident => $body:expr) => {
        match $fmt {
            Format::F32 => {
                type $F = FF32;
                $body
            }
            Format::F16 => {
                type $F = FF16;
                $body
            }
            Format::BF16 => {
                type $F = FBF16;
                $body
            }
            Format::Q8 {
                sub: 32,
                half: false,
            } => {
                type $F = FQ8<32, false>;
                $body
            }
            Format::Q8 {
                sub: 32,
                half: true,
            } => {
                type $F = FQ8<32, true>;
                $body
            }
            Format::Q8 {
                sub: 16,
                half: false,
            } => {
                type $F = FQ8<16, false>;
                $body
            }
            Format::Q8 {
                sub: 16,
                half: true,
            } => {
                type $F = FQ8<16, true>;
                $body
            }
            Format::Q4 {
                sub: 32,
                bias: 0,
                half: false,
            } => {
                type $F = FQ4<32, false, false>;
                $body
            }
            Format::Q4 {
                sub: 32,
                half: false,
                ..
            } => {
                type $F = FQ4<32, true, false>;
                $body
            }
            Format::Q4 {
                sub: 32,
                bias: 0,
                half: true,
            } => {
                type $F = FQ4<32, false, true>;
                $body
            }
            Format::Q4 {
                sub: 32,
                half: true,
                ..
            } => {
                type $F = FQ4<32, true, true>;
                $body
            }
            f => unreachable!("no kernel for packed format {f:?}"),
        }
    };
}

fn bias_of(fmt: Format) -> f32 {
    match fmt {
        Format::Q4 { bias, .. } => bias as f32,
        _ => 0.0,
    }
}

/// Fused task body: panels `p0..p1`, all tokens.
#[inline(always)]
pub(super) unsafe fn fused_task_generic<I: Isa>(
    w: &PackedMatrix,
    x: &[f32],
    tokens: usize,
    out: *mut f32,
    p0: usize,
    p1: usize,
) {
    let bias = I::q4_aux(bias_of(w.fmt));
    with_format!(w.fmt, F => fused_panels::<I, F>(w, bias, x.as_ptr(), tokens, out, p0, p1))
}

// ---------------------------------------------------------------------------
// GEMM path (many tokens): expand weights into f32 once, reuse across tokens.
//
// A task owns `NP` panels (`NP × 16` output rows) and a block of tokens, and
// walks `K` one reduction chunk at a time: the chunk's `NP × 64` weights are
// expanded into a small buffer (8 KiB, stays in L1), or read in place from
// the matrix's pre-expanded f32 copy when it keeps one (see
// `PackedMatrix::expand_f32`), and every token tile of the block runs over
// them before the next chunk. Chunk partials go into a per-task output tile
// (`tokens × NP·16` f32, contiguous) that is copied to `out` at the end.
// Adding partials straight into `out`, whose rows are `rows` floats apart,
// put every token of a tile in the same L1 set whenever `rows × 4` is a
// multiple of 4 KiB (the 3072-row gate/up and 49152-row head matrices of
// the default model): ~2% of a 32-token GEMM.

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; PANEL]);

thread_local! {
    /// Per-thread scratch of the GEMM path: one chunk of expanded weights
    /// (`[panel][k][16]`, `NP × REDUCTION_CHUNK` lines), then the task's
    /// output tile (`[token][NP × 16]`).
    static GEMM_BUF: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// How far ahead of its consumption [`expand_range`] prefetches (bytes).
const EXPAND_AHEAD: usize = 4096;

/// Expands inputs `k0..k1` of one panel into `buf` (`[k1 - k0][16]` f32),
/// exactly. `k0` is a multiple of `F::SUB` (every chunk start is).
///
/// Software prefetch: the packed panel comes from memory (decode streams
/// the whole model each step), and each task starts a fresh stream that the
/// hardware prefetchers pick up late. The walk is in `k` order, not memory
/// order (see `unit_offset`), so `pf`, a linear cursor kept across the
/// chunks of one panel, runs `EXPAND_AHEAD` bytes ahead of the bytes
/// consumed so far; it runs on into the next panel, which the next task
/// expands.
#[inline(always)]
unsafe fn expand_range<I: Isa, F: Fmt>(
    panel: *const u8,
    aux: I::V,
    cols: usize,
    k0: usize,
    k1: usize,
    buf: *mut f32,
    pf: &mut *const u8,
) {
    let mut k = k0;
    while k < k1 {
        let seg = if F::SUB < k1 - k { F::SUB } else { k1 - k };
        let (b, sc, of) = F::block::<I>(panel, cols, k);
        let dst = buf.add((k - k0) * PANEL);
        let mut j = 0;
        while j + F::STEP <= seg {
            I::prefetch(*pf);
            *pf = pf.wrapping_add(F::STEP_BYTES);
            let mut w = [I::zero(); MAX_STEP];
            F::decode::<I>(b, j, sc, of, aux, &mut w);
            for (i, wi) in w.iter().enumerate().take(F::STEP) {
                I::store(dst.add((j + i) * PANEL), *wi);
            }
            j += F::STEP;
        }
        while j < seg {
            I::store(dst.add(j * PANEL), F::one::<I>(b, j, sc, of, aux));
            j += 1;
        }
        k += seg;
    }
}

/// One reduction chunk for `TT` tokens × `NP` panels: `len` inputs of each
/// token (`x`, rows `ldx` apart) against weights `w` (`[k][16]` per panel,
/// panels `pstride` floats apart). The chunk's partials are stored into
/// `out` (rows `ldo` apart) when `first`, else added to it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<I: Isa, const NP: usize, const TT: usize, const PF: bool>(
    w: *const f32,
    pstride: usize,
    x: *const f32,
    ldx: usize,
    len: usize,
    out: *mut f32,
    ldo: usize,
    first: bool,
    pf: *const u8,
) {
    let mut acc = [[I::zero(); TT]; NP];
    for k in 0..len {
        if PF {
            for p in 0..NP {
                I::prefetch(pf.wrapping_add((p * pstride + k * PANEL) * 4));
            }
        }
        let mut wv = [I::zero(); NP];
        for p in 0..NP {
            wv[p] = I::load(w.add(p * pstride + k * PANEL));
        }
        for t in 0..TT {
            let xb = I::splat(x.add(t * ldx + k));
            for p in 0..NP {
                acc[p][t] = I::fma(wv[p], xb, acc[p][t]);
            }
        }
    }
    for p in 0..NP {
        for t in 0..TT {
            let o = out.add(t * ldo + p * PANEL);
            let v = if first {
                acc[p][t]
            } else {
                I::add(I::load(o), acc[p][t])
            };
            I::store(o, v);
        }
    }
}

/// [`micro`] for a run-time token count `nt <= 12`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_n<I: Isa, const NP: usize>(
    nt: usize,
    w: *const f32,
    pstride: usize,
    x: *const f32,
    ldx: usize,
    len: usize,
    out: *mut f32,
    ldo: usize,
    first: bool,
    pf: *const u8,
) {
    let a = (w, pstride, x, ldx, len, out, ldo, first, pf);
    macro_rules! go {
        ($($n:literal)*) => {
            if pf.is_null() {
                match nt {
                    $($n => micro::<I, NP, $n, false>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7, a.8),)*
                    _ => unreachable!("token tile of {nt}"),
                }
            } else {
                match nt {
                    $($n => micro::<I, NP, $n, true>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7, a.8),)*
                    _ => unreachable!("token tile of {nt}"),
                }
            }
        };
    }
    go!(1 2 3 4 5 6 7 8 9 10 11 12)
}

/// Register blocking of the GEMM path for one kernel family.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    /// Panels per task (and per microkernel call).
    pub np: usize,
    /// Tokens per task.
    pub token_block: usize,
}

pub(super) fn gemm_geometry(kernel: Kernel) -> Geometry {
    match kernel {
        Kernel::Avx512 => Geometry {
            np: 2,
            token_block: 96,
        },
        _ => Geometry {
            np: 1,
            token_block: 96,
        },
    }
}

/// GEMM task body: panel group `grp` (`NP` panels), tokens `t0..t1`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_task_generic<I: Isa, const NP: usize, const TT: usize>(
    w: &PackedMatrix,
    x: &[f32],
    tokens: usize,
    out: *mut f32,
    grp: usize,
    t0: usize,
    t1: usize,
) {
    let _ = tokens;
    let (rows, cols) = (w.rows, w.cols);
    let p0 = grp * NP;
    let np = NP.min(w.n_panels() - p0);
    let valid = (np * PANEL).min(rows - p0 * PANEL);
    let ntok = t1 - t0;
    let tile = NP * PANEL;
    let base = w.bytes().as_ptr();
    let bias = I::q4_aux(bias_of(w.fmt));
    let expanded = w.expanded_ptr();
    // The buffer's pointer leaves the `with` closure so that the kernels run
    // in this (inlined, target-feature) function, not in a closure compiled
    // without the features. Only this function touches the buffer.
    let wbuf = GEMM_BUF.with(|cell| {
        let mut v = cell.borrow_mut();
        let need = NP * REDUCTION_CHUNK + ntok * NP;
        if v.len() < need {
            v.resize(need, Line([0.0; PANEL]));
        }
        v.as_mut_ptr() as *mut f32
    });
    let obuf = wbuf.add(NP * REDUCTION_CHUNK * PANEL);
    let mut pf = [std::ptr::null::<u8>(); NP];
    for p in 0..np {
        pf[p] = base
            .wrapping_add((p0 + p) * w.panel_bytes)
            .wrapping_add(EXPAND_AHEAD);
    }
    let xs = x.as_ptr().add(t0 * cols);
    let mut k0 = 0;
    while k0 < cols {
        let len = if cols - k0 < REDUCTION_CHUNK {
            cols - k0
        } else {
            REDUCTION_CHUNK
        };
        let mut pfp = std::ptr::null::<u8>();
        let (wp, pstride) = match expanded {
            Some(e) => {
                // Read in place. The copy is 4 bytes a weight and comes
                // from memory: the first token tile asks for the next
                // chunk, one line per panel per input, while this chunk is
                // computed (~1 us ahead at 32 tokens). Measured on the
                // default model, one thread, 32 tokens: 97 GFLOP per
                // CPU-second against 89 without the software prefetch, 72
                // with the whole next chunk asked for at once (the burst
                // stalls on the miss queue), and 87-90 expanding on the fly.
                let here = e.add(p0 * cols * PANEL + k0 * PANEL);
                if k0 + len < cols {
                    pfp = here.add(len * PANEL) as *const u8;
                }
                (here, cols * PANEL)
            }
            None => {
                for p in 0..np {
                    let panel = base.add((p0 + p) * w.panel_bytes);
                    let dst = wbuf.add(p * REDUCTION_CHUNK * PANEL);
                    with_format!(w.fmt, F => expand_range::<I, F>(
                        panel, bias, cols, k0, k0 + len, dst, &mut pf[p]
                    ));
                }
                (wbuf as *const f32, REDUCTION_CHUNK * PANEL)
            }
        };
        let mut t = 0;
        while t < ntok {
            let nt = TT.min(ntok - t);
            let xt = xs.add(t * cols + k0);
            let o = obuf.add(t * tile);
            // Only the first tile prefetches.
            let pf = if t == 0 { pfp } else { std::ptr::null() };
            if np == NP {
                micro_n::<I, NP>(nt, wp, pstride, xt, cols, len, o, tile, k0 == 0, pf);
            } else {
                micro_n::<I, 1>(nt, wp, pstride, xt, cols, len, o, tile, k0 == 0, pf);
            }
            t += nt;
        }
        k0 += len;
    }
    for t in 0..ntok {
        std::ptr::copy_nonoverlapping(
            obuf.add(t * tile),
            out.add((t0 + t) * rows + p0 * PANEL),
            valid,
        );
    }
}

/// Writes panels `p0..p1` of `w`, expanded exactly, into `dst`
/// (`[panel][cols][16]` f32, panel `p` at `p * cols * 16`): the values the
/// GEMM path computes on the fly, so reading them instead changes no bit.
#[inline(always)]
pub(super) unsafe fn expand_panels_generic<I: Isa>(
    w: &PackedMatrix,
    p0: usize,
    p1: usize,
    dst: *mut f32,
) {
    let bias = I::q4_aux(bias_of(w.fmt));
    let base = w.bytes().as_ptr();
    let cols = w.cols;
    with_format!(w.fmt, F => {
        for p in p0..p1 {
            let panel = base.add(p * w.panel_bytes);
            let mut pf = panel.wrapping_add(EXPAND_AHEAD);
            expand_range::<I, F>(panel, bias, cols, 0, cols, dst.add(p * cols * PANEL), &mut pf);
        }
    })
}

/// Runs a fused task with the given (available, non-scalar) kernel.
///
/// # Safety
/// `kernel` must be available on this CPU; `out` must be `tokens × rows`
/// and no other thread may write panels `p0..p1` of it meanwhile.
pub(super) unsafe fn fused_task(
    kernel: Kernel,
    w: &PackedMatrix,
    x: &[f32],
    tokens: usize,
    out: *mut f32,
    p0: usize,
    p1: usize,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => super::x86::fused_task_avx512(w, x, tokens, out, p0, p1),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => super::x86::fused_task_avx2(w, x, tokens, out, p0, p1),
        _ => unreachable!("the scalar kernel has its own path"),
    }
}

/// Runs a GEMM task with the given (available, non-scalar) kernel.
///
/// # Safety
/// As [`fused_task`], for panel group `grp` and tokens `t0..t1`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_task(
    kernel: Kernel,
    w: &PackedMatrix,
    x: &[f32],
    tokens: usize,
    out: *mut f32,
    grp: usize,
    t0: usize,
    t1: usize,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => super::x86::gemm_task_avx512(w, x, tokens, out, grp, t0, t1),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => super::x86::gemm_task_avx2(w, x, tokens, out, grp, t0, t1),
        _ => unreachable!("the scalar kernel has its own path"),
    }
}

/// Expands panels `p0..p1` with the given (available, non-scalar) kernel
/// (see [`expand_panels_generic`]).
///
/// # Safety
/// `kernel` must be available on this CPU; `dst` must hold
/// `n_panels × cols × 16` f32.
pub(super) unsafe fn expand_panels(
    kernel: Kernel,
    w: &PackedMatrix,
    p0: usize,
    p1: usize,
    dst: *mut f32,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => super::x86::expand_panels_avx512(w, p0, p1, dst),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => super::x86::expand_panels_avx2(w, p0, p1, dst),
        _ => unreachable!("the scalar kernel has its own path"),
    }
}
