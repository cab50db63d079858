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
            let nt = match tokens - t {
                n if n >= 4 => 4,
                2 | 3 => 2,
                _ => 1,
            };
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
// GEMM path (many tokens): expand panels once into f32, reuse across tokens.

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; PANEL]);

thread_local! {
    /// Per-thread buffer of expanded panels (`[panel][k][16]` f32).
    static PANEL_BUF: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// How far ahead of its consumption [`expand_panel`] prefetches (bytes).
const EXPAND_AHEAD: usize = 4096;

/// Expands one panel into `buf` (`[cols][16]` f32), exactly.
#[inline(always)]
unsafe fn expand_panel<I: Isa, F: Fmt>(panel: *const u8, aux: I::V, cols: usize, buf: *mut f32) {
    // Software prefetch: the packed panel comes from memory (decode streams
    // the whole model each step), and each task starts a fresh stream that
    // the hardware prefetchers pick up late. The walk below is in `k` order,
    // not memory order (see `unit_offset`), so a linear cursor runs
    // `EXPAND_AHEAD` bytes ahead of the bytes consumed so far; it runs on
    // into the next panel, which the next task expands.
    let mut pf = panel.wrapping_add(EXPAND_AHEAD);
    let mut k0 = 0;
    while k0 < cols {
        let seg = if F::SUB < cols - k0 {
            F::SUB
        } else {
            cols - k0
        };
        let (b, sc, of) = F::block::<I>(panel, cols, k0);
        let mut j = 0;
        while j + F::STEP <= seg {
            I::prefetch(pf);
            pf = pf.wrapping_add(F::STEP_BYTES);
            let mut w = [I::zero(); MAX_STEP];
            F::decode::<I>(b, j, sc, of, aux, &mut w);
            for (i, wi) in w.iter().enumerate().take(F::STEP) {
                I::store(buf.add((k0 + j + i) * PANEL), *wi);
            }
            j += F::STEP;
        }
        while j < seg {
            I::store(buf.add((k0 + j) * PANEL), F::one::<I>(b, j, sc, of, aux));
            j += 1;
        }
        k0 += seg;
    }
}

/// `TT` tokens × `NP` expanded panels (`pstride` floats apart), all chunks.
#[inline(always)]
unsafe fn micro<I: Isa, const NP: usize, const TT: usize>(
    buf: *const f32,
    pstride: usize,
    x: *const f32,
    cols: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut k0 = 0;
    while k0 < cols {
        let len = if cols - k0 < REDUCTION_CHUNK {
            cols - k0
        } else {
            REDUCTION_CHUNK
        };
        let mut acc = [[I::zero(); TT]; NP];
        for k in k0..k0 + len {
            let mut wv = [I::zero(); NP];
            for p in 0..NP {
                wv[p] = I::load(buf.add(p * pstride + k * PANEL));
            }
            for t in 0..TT {
                let xb = I::splat(x.add(t * cols + k));
                for p in 0..NP {
                    acc[p][t] = I::fma(wv[p], xb, acc[p][t]);
                }
            }
        }
        for p in 0..NP {
            for t in 0..TT {
                let o = out.add(t * ldo + p * PANEL);
                let v = if k0 == 0 {
                    acc[p][t]
                } else {
                    I::add(I::load(o), acc[p][t])
                };
                I::store(o, v);
            }
        }
        k0 += len;
    }
}

/// [`micro`] for a run-time token count `nt <= 12`.
#[inline(always)]
unsafe fn micro_n<I: Isa, const NP: usize>(
    nt: usize,
    buf: *const f32,
    pstride: usize,
    x: *const f32,
    cols: usize,
    out: *mut f32,
    ldo: usize,
) {
    match nt {
        1 => micro::<I, NP, 1>(buf, pstride, x, cols, out, ldo),
        2 => micro::<I, NP, 2>(buf, pstride, x, cols, out, ldo),
        3 => micro::<I, NP, 3>(buf, pstride, x, cols, out, ldo),
        4 => micro::<I, NP, 4>(buf, pstride, x, cols, out, ldo),
        5 => micro::<I, NP, 5>(buf, pstride, x, cols, out, ldo),
        6 => micro::<I, NP, 6>(buf, pstride, x, cols, out, ldo),
        7 => micro::<I, NP, 7>(buf, pstride, x, cols, out, ldo),
        8 => micro::<I, NP, 8>(buf, pstride, x, cols, out, ldo),
        9 => micro::<I, NP, 9>(buf, pstride, x, cols, out, ldo),
        10 => micro::<I, NP, 10>(buf, pstride, x, cols, out, ldo),
        11 => micro::<I, NP, 11>(buf, pstride, x, cols, out, ldo),
        12 => micro::<I, NP, 12>(buf, pstride, x, cols, out, ldo),
        _ => unreachable!("token tile of {nt}"),
    }
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
    let base = w.bytes().as_ptr();
    let bias = I::q4_aux(bias_of(w.fmt));
    // The buffer's pointer leaves the `with` closure so that the kernels run
    // in this (inlined, target-feature) function, not in a closure compiled
    // without the features. Only this function touches the buffer.
    let bp = PANEL_BUF.with(|cell| {
        let mut v = cell.borrow_mut();
        if v.len() < NP * cols {
            v.resize(NP * cols, Line([0.0; PANEL]));
        }
        v.as_mut_ptr() as *mut f32
    });
    for p in 0..np {
        let panel = base.add((p0 + p) * w.panel_bytes);
        with_format!(w.fmt, F => expand_panel::<I, F>(panel, bias, cols, bp.add(p * cols * PANEL)));
    }
    let (buf, pstride) = (bp as *const f32, cols * PANEL);
    let mut scratch = [Line([0.0; PANEL]); 2 * 12];
    let sp = scratch.as_mut_ptr() as *mut f32;
    let mut t = t0;
    while t < t1 {
        let nt = TT.min(t1 - t);
        let xt = x.as_ptr().add(t * cols);
        if valid == NP * PANEL {
            micro_n::<I, NP>(
                nt,
                buf,
                pstride,
                xt,
                cols,
                out.add(t * rows + p0 * PANEL),
                rows,
            );
        } else {
            if np == NP {
                micro_n::<I, NP>(nt, buf, pstride, xt, cols, sp, NP * PANEL);
            } else {
                micro_n::<I, 1>(nt, buf, pstride, xt, cols, sp, NP * PANEL);
            }
            for tt in 0..nt {
                std::ptr::copy_nonoverlapping(
                    sp.add(tt * NP * PANEL),
                    out.add((t + tt) * rows + p0 * PANEL),
                    valid,
                );
            }
        }
        t += nt;
    }
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
