//! CPU backend: packed weights, matrix kernels, thread pool.
//!
//! # The reduction-order contract
//!
//! Every output `y[t][n] = Σ_k W[n][k]·x[t][k]` is computed in one fixed order
//! that depends only on `k`'s length, never on the thread count, the batch
//! size, the token's position in the batch, how a prompt was chunked, or
//! whether the GEMV (one token) or GEMM (many tokens) path computed it:
//!
//! 1. `K` is cut into chunks of [`REDUCTION_CHUNK`] (64) consecutive inputs
//!    (the last chunk may be shorter).
//! 2. Within chunk `c`, the partial `p_c` is one sequential chain of fused
//!    multiply-adds in increasing `k`: `p = 0; p = fma(w[k], x[k], p)`.
//! 3. The output is the left-to-right sum of the partials:
//!    `y = ((p_0 + p_1) + p_2) + …`.
//! 4. Weights are the exact f32 values of the reference dequantisation
//!    (`tandem_model::quant`), so any packing reproduces them bit for bit.
//!
//! A tensor-parallel split of `K` at chunk boundaries can therefore
//! reproduce the single-process result exactly: each rank computes its
//! chunks' partials and the reduction adds them in chunk order.
//! [`matmul_reference`] is the contract written as plain scalar code.
//!
//! # How the kernels keep it while being fast
//!
//! The kernels vectorise along *output rows*, never along `k`: weights are
//! repacked at load time into panels of [`PANEL`] (16) rows in which, for
//! each `k`, the 16 rows' weights are adjacent. One 16-lane vector
//! accumulator then holds 16 independent per-row chains, and
//! `acc = fma(w[k][rows], broadcast(x[t][k]), acc)` is exactly step 2 for
//! each of them. Independent chains (other chunks of the same panel, other
//! tokens, other panels) hide the FMA latency.
//!
//! Quantised weights stay compressed in the panels (see [`PackedMatrix`]) and
//! are expanded in registers with one `fma(scale, q, offset)` per weight,
//! exactly as the reference does, so one-token decode (GEMV) streams ~5-6
//! bits per weight. Few tokens use that fused path directly; many tokens
//! (prefill GEMM) first expand a pair of panels into an L2-resident f32
//! buffer and reuse it across tiles of tokens with a register-blocked
//! microkernel.
//!
//! Kernels: AVX-512, AVX2+FMA, or portable scalar, chosen once at run time
//! (`is_x86_feature_detected!`); `TANDEM_KERNEL=scalar|avx2|avx512` forces
//! one. All give bit-identical results.

mod kernels;
pub mod pool;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use tandem_model::quant::{for_each_subblock, subblock_len, GgmlType};
use tandem_model::weights::TensorRef;

use crate::error::{EngineError, Result};
pub use pool::ThreadPool;

/// Inputs per reduction chunk (see the module docs).
pub const REDUCTION_CHUNK: usize = 64;

/// Output rows per packed panel (one AVX-512 vector, two AVX2 vectors).
pub const PANEL: usize = 16;

/// Up to this many tokens, matmul uses the fused (dequantise-in-register)
/// kernel; above, the panel-buffer GEMM. Both give identical bits.
const FUSED_MAX_TOKENS: usize = 4;

/// Storage of one panel's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `[k][16]` f32.
    F32,
    /// `[k][16]` IEEE half (exactly widened in registers).
    F16,
    /// `[k][16]` bfloat16.
    BF16,
    /// Sub-blocks of `sub` inputs: `scale[16] f32, offset[16] f32`, then
    /// `sub/2` groups of 16 bytes, byte `r` holding row `r`'s
    /// `q[k] - bias` (low nibble) and `q[k+1] - bias` (high nibble).
    Q4 { sub: usize, bias: i8 },
    /// Sub-blocks of `sub` inputs: `scale[16] f32, offset[16] f32`, then
    /// `sub` groups of 16 `i8` (row-interleaved `q`).
    Q8 { sub: usize },
}

impl Format {
    /// Bytes of one sub-block of a panel (quantised formats).
    fn subblock_bytes(self) -> usize {
        match self {
            Format::Q4 { sub, .. } => 128 + sub * 8,
            Format::Q8 { sub } => 128 + sub * 16,
            _ => unreachable!("float formats have no sub-blocks"),
        }
    }
    fn panel_bytes(self, cols: usize) -> usize {
        let b = match self {
            Format::F32 => cols * PANEL * 4,
            Format::F16 | Format::BF16 => cols * PANEL * 2,
            Format::Q4 { sub, .. } | Format::Q8 { sub } => cols / sub * self.subblock_bytes(),
        };
        b.div_ceil(64) * 64
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

/// A weight matrix `[rows × cols]` in the layout the kernels read.
///
/// Rows are grouped in panels of [`PANEL`] (the last one zero-padded);
/// within a panel the weights are stored `k`-major, 16 rows side by side,
/// in one of the [`Format`]s: floats as themselves (F16/BF16 widen exactly
/// in registers), 4-bit types (Q4_0, Q4_1, Q4_K) as nibbles with per-row
/// f32 scale and offset per sub-block, other quantised types (Q8_0, Q5_K,
/// Q6_K) as `i8` with the same parameters. `fma(scale, q, offset)` gives the
/// reference's exact value.
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    ty: GgmlType,
    fmt: Format,
    panel_bytes: usize,
    data: Vec<Align64>,
}

impl PackedMatrix {
    /// Packs a 2-D tensor (row-major `[rows, cols]`).
    pub fn from_tensor(t: &TensorRef<'_>) -> Result<Self> {
        if t.shape.len() != 2 {
            return Err(EngineError::Unsupported(format!("expected a matrix, got shape {:?}", t.shape)));
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let row_bytes = t.ty.bytes_for(cols)?;
        if t.bytes.len() < rows * row_bytes {
            return Err(EngineError::Unsupported(format!(
                "{} tensor [{rows}, {cols}] needs {} bytes, has {}",
                t.ty.name(),
                rows * row_bytes,
                t.bytes.len()
            )));
        }
        let row = |r: usize| &t.bytes[r * row_bytes..(r + 1) * row_bytes];
        let fmt = match t.ty {
            GgmlType::F32 => Format::F32,
            GgmlType::F16 => Format::F16,
            GgmlType::BF16 => Format::BF16,
            ty => {
                let sub = subblock_len(ty);
                if REDUCTION_CHUNK % sub != 0 || sub % 2 != 0 {
                    return Err(EngineError::Unsupported(format!("{} sub-blocks of {sub}", ty.name())));
                }
                // 4-bit storage when every q fits one nibble after a common bias.
                let (mut lo, mut hi) = (i8::MAX, i8::MIN);
                if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K) {
                    for r in 0..rows {
                        for_each_subblock(ty, row(r), |sb| {
                            for &q in &sb.q[..sb.len] {
                                lo = lo.min(q);
                                hi = hi.max(q);
                            }
                        })?;
                    }
                }
                if rows > 0 && (hi as i32) - (lo as i32) <= 15 {
                    Format::Q4 { sub, bias: lo }
                } else {
                    Format::Q8 { sub }
                }
            }
        };
        let panels = rows.div_ceil(PANEL);
        let panel_bytes = fmt.panel_bytes(cols);
        let mut data = vec![Align64([0; 64]); (panels * panel_bytes).div_ceil(64)];
        // SAFETY: `Align64` is plain bytes.
        let bytes: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u8, data.len() * 64) };
        for r in 0..rows {
            let (p, l) = (r / PANEL, r % PANEL);
            let panel = &mut bytes[p * panel_bytes..(p + 1) * panel_bytes];
            let src = row(r);
            match fmt {
                Format::F32 | Format::F16 | Format::BF16 => {
                    let e = if fmt == Format::F32 { 4 } else { 2 };
                    for k in 0..cols {
                        panel[(k * PANEL + l) * e..(k * PANEL + l + 1) * e].copy_from_slice(&src[k * e..(k + 1) * e]);
                    }
                }
                Format::Q4 { sub, bias } | Format::Q8 { sub } => {
                    let sbb = fmt.subblock_bytes();
                    let is_q4 = matches!(fmt, Format::Q4 { .. });
                    let bias = if let Format::Q4 { bias, .. } = fmt { bias } else { 0 };
                    let mut i = 0usize;
                    let mut bad = None;
                    for_each_subblock(t.ty, src, |sb| {
                        if sb.len != sub {
                            bad = Some(sb.len);
                            return;
                        }
                        let b = &mut panel[i * sbb..(i + 1) * sbb];
                        b[l * 4..l * 4 + 4].copy_from_slice(&sb.scale.to_le_bytes());
                        b[64 + l * 4..64 + l * 4 + 4].copy_from_slice(&sb.offset.to_le_bytes());
                        if is_q4 {
                            for j in (0..sub).step_by(2) {
                                let q0 = (sb.q[j] - bias) as u8;
                                let q1 = (sb.q[j + 1] - bias) as u8;
                                b[128 + (j / 2) * PANEL + l] = q0 | (q1 << 4);
                            }
                        } else {
                            for j in 0..sub {
                                b[128 + j * PANEL + l] = sb.q[j] as u8;
                            }
                        }
                        i += 1;
                    })?;
                    if let Some(len) = bad {
                        return Err(EngineError::Unsupported(format!(
                            "{} sub-block of {len}, expected {sub}",
                            t.ty.name()
                        )));
                    }
                }
            }
        }
        Ok(Self { rows, cols, ty: t.ty, fmt, panel_bytes, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The tensor's type in the model file.
    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    /// Writes row `r`, dequantised exactly, into `out` (embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} of a {}-row matrix", self.rows);
        assert_eq!(out.len(), self.cols);
        let panel = self.panel(r / PANEL);
        for (k, o) in out.iter_mut().enumerate() {
            *o = weight_at(self.fmt, panel, r % PANEL, k);
        }
    }

    /// Bytes held by the packed weights.
    pub fn nbytes(&self) -> usize {
        self.data.len() * 64
    }

    fn n_panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `Align64` is plain bytes.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.data.len() * 64) }
    }
    fn panel(&self, p: usize) -> &[u8] {
        &self.bytes()[p * self.panel_bytes..(p + 1) * self.panel_bytes]
    }
}

/// The exact weight of lane `l`, input `k` of a packed panel (scalar).
fn weight_at(fmt: Format, panel: &[u8], l: usize, k: usize) -> f32 {
    let f32_at = |o: usize| f32::from_le_bytes(panel[o..o + 4].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes([panel[o], panel[o + 1]]);
    match fmt {
        Format::F32 => f32_at((k * PANEL + l) * 4),
        Format::F16 => half::f16::from_bits(u16_at((k * PANEL + l) * 2)).to_f32(),
        Format::BF16 => half::bf16::from_bits(u16_at((k * PANEL + l) * 2)).to_f32(),
        Format::Q4 { sub, bias } => {
            let base = (k / sub) * fmt.subblock_bytes();
            let j = k % sub;
            let byte = panel[base + 128 + (j / 2) * PANEL + l];
            let q = if j % 2 == 0 { byte & 15 } else { byte >> 4 } as i32 + bias as i32;
            f32_at(base + l * 4).mul_add(q as f32, f32_at(base + 64 + l * 4))
        }
        Format::Q8 { sub } => {
            let base = (k / sub) * fmt.subblock_bytes();
            let q = panel[base + 128 + (k % sub) * PANEL + l] as i8;
            f32_at(base + l * 4).mul_add(q as f32, f32_at(base + 64 + l * 4))
        }
    }
}

/// Which kernel family computes [`matmul`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    Avx2,
    Avx512,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
        }
    }
    /// Parses a `TANDEM_KERNEL` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Kernel::Scalar),
            "avx2" => Some(Kernel::Avx2),
            "avx512" | "avx-512" => Some(Kernel::Avx512),
            _ => None,
        }
    }
    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
    /// The best kernel this CPU runs.
    pub fn best() -> Self {
        [Kernel::Avx512, Kernel::Avx2].into_iter().find(|k| k.available()).unwrap_or(Kernel::Scalar)
    }
}

/// The kernel [`matmul`] uses: `TANDEM_KERNEL` if set (and runnable here),
/// else the best available; decided once per process.
pub fn selected_kernel() -> Kernel {
    static SELECTED: OnceLock<Kernel> = OnceLock::new();
    *SELECTED.get_or_init(|| match std::env::var("TANDEM_KERNEL") {
        Ok(v) if !v.trim().is_empty() => match Kernel::parse(&v) {
            Some(k) if k.available() => k,
            Some(k) => {
                tracing::warn!("TANDEM_KERNEL={v}: this CPU cannot run {}, using {}", k.name(), Kernel::best().name());
                Kernel::best()
            }
            None => {
                tracing::warn!("TANDEM_KERNEL={v} is not one of scalar|avx2|avx512, using {}", Kernel::best().name());
                Kernel::best()
            }
        },
        _ => Kernel::best(),
    })
}

/// `out[t][n] = Σ_k W[n][k] · x[t][k]` for `t < tokens`; `x` is `tokens × cols`,
/// `out` is `tokens × rows`, both row-major.
pub fn matmul(pool: &ThreadPool, w: &PackedMatrix, x: &[f32], tokens: usize, out: &mut [f32]) {
    matmul_with(selected_kernel(), pool, w, x, tokens, out)
}

/// [`matmul`] with an explicit kernel (tests and benchmarks compare them).
/// Panics if this CPU cannot run `kernel`.
pub fn matmul_with(kernel: Kernel, pool: &ThreadPool, w: &PackedMatrix, x: &[f32], tokens: usize, out: &mut [f32]) {
    assert_eq!(x.len(), tokens * w.cols, "x must be tokens × cols");
    assert_eq!(out.len(), tokens * w.rows, "out must be tokens × rows");
    assert!(kernel.available(), "this CPU cannot run the {} kernel", kernel.name());
    if tokens == 0 || w.rows == 0 {
        return;
    }
    if w.cols == 0 {
        out.fill(0.0);
        return;
    }
    let outp = SendPtr(out.as_mut_ptr());
    let panels = w.n_panels();
    if kernel == Kernel::Scalar {
        let n_tasks = panels.min(pool.threads() * 4);
        pool.run(n_tasks, &|i| {
            let (p0, p1) = split(panels, n_tasks, i);
            scalar_panels(w, x, tokens, outp, p0, p1);
        });
        return;
    }
    if tokens <= FUSED_MAX_TOKENS {
        // Decode: split the panels evenly, a few tasks per thread so that a
        // thread slowed by another process does not hold up the rest.
        let n_tasks = panels.min(pool.threads() * 4);
        pool.run(n_tasks, &|i| {
            let (p0, p1) = split(panels, n_tasks, i);
            // SAFETY: the kernel was checked to be available; tasks write
            // disjoint panels of `out`.
            unsafe { kernels::fused_task(kernel, w, x, tokens, outp.0, p0, p1) };
        });
    } else {
        let g = kernels::gemm_geometry(kernel);
        let groups = panels.div_ceil(g.np);
        let blocks = tokens.div_ceil(g.token_block);
        pool.run(groups * blocks, &|i| {
            let (grp, blk) = (i % groups, i / groups);
            let t0 = blk * g.token_block;
            let t1 = (t0 + g.token_block).min(tokens);
            // SAFETY: as above; each task writes its own rows × tokens block.
            unsafe { kernels::gemm_task(kernel, w, x, tokens, outp.0, grp, t0, t1) };
        });
    }
}

/// The `i`-th of `n` near-equal contiguous parts of `0..len`.
fn split(len: usize, n: usize, i: usize) -> (usize, usize) {
    let (q, r) = (len / n, len % n);
    let start = i * q + i.min(r);
    (start, start + q + usize::from(i < r))
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint parts of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Portable kernel over the packed layout: expands a panel, then runs the
/// contract's chains row by row.
fn scalar_panels(w: &PackedMatrix, x: &[f32], tokens: usize, out: SendPtr, p0: usize, p1: usize) {
    let cols = w.cols;
    let mut buf = vec![0f32; cols * PANEL];
    for p in p0..p1 {
        let panel = w.panel(p);
        for k in 0..cols {
            for l in 0..PANEL {
                buf[k * PANEL + l] = weight_at(w.fmt, panel, l, k);
            }
        }
        for t in 0..tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            for l in 0..PANEL.min(w.rows - p * PANEL) {
                let mut total = 0f32;
                for (c, xc) in xt.chunks(REDUCTION_CHUNK).enumerate() {
                    let mut acc = 0f32;
                    for (j, xv) in xc.iter().enumerate() {
                        acc = buf[(c * REDUCTION_CHUNK + j) * PANEL + l].mul_add(*xv, acc);
                    }
                    total = if c == 0 { acc } else { total + acc };
                }
                // SAFETY: row `p*16+l` of token `t` belongs to this task.
                unsafe { *out.0.add(t * w.rows + p * PANEL + l) = total };
            }
        }
    }
}

/// The reduction-order contract as plain code, over a row-major `[rows × cols]`
/// f32 matrix: the definition every kernel must match bit for bit.
pub fn matmul_reference(w: &[f32], rows: usize, cols: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
    assert_eq!(w.len(), rows * cols);
    assert_eq!(x.len(), tokens * cols);
    assert_eq!(out.len(), tokens * rows);
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for n in 0..rows {
            let wr = &w[n * cols..(n + 1) * cols];
            let mut total = 0f32;
            for (c, (wc, xc)) in wr.chunks(REDUCTION_CHUNK).zip(xt.chunks(REDUCTION_CHUNK)).enumerate() {
                let mut p = 0f32;
                for (a, b) in wc.iter().zip(xc) {
                    p = a.mul_add(*b, p);
                }
                total = if c == 0 { p } else { total + p };
            }
            out[t * rows + n] = total;
        }
    }
}

#[cfg(test)]
mod tests;
