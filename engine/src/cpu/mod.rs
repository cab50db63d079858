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
/// kernel; above, the panel-buffer GEMM. Both give identical bits. Measured
/// on the default model (one Zen 4 core, per CPU-second): fused 292 / 303 /
/// 306 tok at 8 / 16 / 32 tokens, GEMM 209 / 272 / 322.
const FUSED_MAX_TOKENS: usize = 16;

/// [`FUSED_MAX_TOKENS`] for a matrix with an f32 copy, whose GEMM skips the
/// expansion. Measured on the default model (2 threads, per CPU-second):
/// fused 239 / 254 tok at 8 / 16 tokens, GEMM over the copy 171 / 293.
const FUSED_MAX_TOKENS_F32_COPY: usize = 8;

/// Whether a model's matrices keep an f32 copy of their weights for the
/// many-token path (see [`PackedMatrix::expand_f32`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpandWeights {
    /// On when the copies take at most a quarter of the memory the system
    /// reports available at load time (`MemAvailable`); off where that is
    /// unknown.
    #[default]
    Auto,
    On,
    Off,
}

impl ExpandWeights {
    pub fn name(self) -> &'static str {
        match self {
            ExpandWeights::Auto => "auto",
            ExpandWeights::On => "on",
            ExpandWeights::Off => "off",
        }
    }

    /// Whether copies of `copy_bytes` in all are made under this policy.
    pub fn decide(self, copy_bytes: usize) -> bool {
        match self {
            ExpandWeights::On => true,
            ExpandWeights::Off => false,
            ExpandWeights::Auto => {
                available_memory().is_some_and(|avail| copy_bytes as u64 <= avail / 4)
            }
        }
    }
}

impl std::fmt::Display for ExpandWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ExpandWeights {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(ExpandWeights::Auto),
            "on" | "true" | "1" => Ok(ExpandWeights::On),
            "off" | "false" | "0" => Ok(ExpandWeights::Off),
            other => Err(EngineError::Unsupported(format!(
                "expand-weights {other:?}: expected auto, on or off"
            ))),
        }
    }
}

/// Memory this process may still take, in bytes (Linux only): the
/// system's `MemAvailable`, or less where a cgroup v2 limit (a container's
/// memory limit) leaves less room.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let system = kib * 1024;
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    // "max" (no limit) does not parse, and neither does a cgroup v1 host.
    let cgroup =
        read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
    Some(cgroup.map_or(system, |c| c.min(system)))
}

/// Storage of one panel's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `[k][16]` f32.
    F32,
    /// `[k][16]` IEEE half (exactly widened in registers).
    F16,
    /// `[k][16]` bfloat16.
    BF16,
    /// Sub-blocks of `sub` inputs: parameters (see [`Format::params_bytes`]),
    /// then `sub/8` groups of 64 bytes: 16 little-endian `u32`, one per row,
    /// holding that row's `q[k] - bias` for 8 consecutive `k` (the `i`-th in
    /// bits `4i..4i+4`).
    Q4 { sub: usize, bias: i8, half: bool },
    /// Sub-blocks of `sub` inputs: parameters, then `sub` groups of 16 `i8`
    /// (row-interleaved `q`).
    Q8 { sub: usize, half: bool },
}

impl Format {
    /// Bytes of a quantised sub-block's parameters: `scale[16]` then
    /// `offset[16]`, as f32, or as f16 (`half`) when every value of the
    /// matrix is exactly an f16 (Q4_0, Q4_1, Q8_0 store f16 `d` and `m`), which
    /// saves a sixth of the bytes that decode streams.
    fn params_bytes(self) -> usize {
        match self {
            Format::Q4 { half: true, .. } | Format::Q8 { half: true, .. } => 64,
            _ => 128,
        }
    }
    /// Bytes of one sub-block of a panel (quantised formats).
    fn subblock_bytes(self) -> usize {
        match self {
            Format::Q4 { sub, .. } => self.params_bytes() + sub * 8,
            Format::Q8 { sub, .. } => self.params_bytes() + sub * 16,
            _ => unreachable!("float formats have no sub-blocks"),
        }
    }
    fn panel_bytes(self, cols: usize) -> usize {
        let b = match self {
            Format::F32 => cols * PANEL * 4,
            Format::F16 | Format::BF16 => cols * PANEL * 2,
            Format::Q4 { sub, .. } | Format::Q8 { sub, .. } => cols / sub * self.subblock_bytes(),
        };
        b.div_ceil(64) * 64
    }
}

/// Chunks whose data are interleaved in a panel (see [`unit_offset`]).
pub(crate) const CHUNK_GROUP: usize = 4;

/// Inputs per storage unit of the float formats.
pub(crate) const FLOAT_UNIT: usize = 16;

/// Byte offset in a panel of the storage unit (a quantised sub-block, or
/// [`FLOAT_UNIT`] inputs of a float format) that starts at input `k`.
///
/// Units are not stored in plain `k` order: the full chunks are taken in
/// groups of [`CHUNK_GROUP`] and, inside a group, the units are interleaved
/// (unit 0 of each chunk, then unit 1 of each chunk, …). The one-token
/// kernel walks [`CHUNK_GROUP`] chunks side by side (independent chains
/// hide the FMA latency), and this order makes that walk one sequential
/// stream through memory, which the hardware prefetchers follow; four
/// separate short streams per panel measured ~1.5x slower from DRAM.
/// A final partial chunk follows in plain order.
#[inline(always)]
pub(crate) fn unit_offset(cols: usize, unit: usize, unit_bytes: usize, k: usize) -> usize {
    let per_chunk = REDUCTION_CHUNK / unit;
    let nfull = cols / REDUCTION_CHUNK;
    let ch = k / REDUCTION_CHUNK;
    if ch >= nfull {
        return nfull * per_chunk * unit_bytes + (k - nfull * REDUCTION_CHUNK) / unit * unit_bytes;
    }
    let (g, c) = (ch / CHUNK_GROUP, ch % CHUNK_GROUP);
    let gsize = CHUNK_GROUP.min(nfull - g * CHUNK_GROUP);
    let u = (k % REDUCTION_CHUNK) / unit;
    (g * CHUNK_GROUP * per_chunk + u * gsize + c) * unit_bytes
}

/// Byte offset of input `k` of a float-format panel with `e`-byte elements.
#[inline(always)]
pub(crate) fn float_offset(cols: usize, e: usize, k: usize) -> usize {
    let unit_bytes = FLOAT_UNIT * PANEL * e;
    unit_offset(cols, FLOAT_UNIT, unit_bytes, k - k % FLOAT_UNIT) + (k % FLOAT_UNIT) * PANEL * e
}

/// Zeroed, 64-byte aligned bytes for packed weights. Buffers of 2 MiB and
/// more are 2 MiB aligned and, on Linux, asked to live in transparent huge
/// pages: decode streams the whole model every token, and 4 KiB pages cost
/// a TLB miss every 64 cache lines.
struct PackedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: a plain owned allocation.
unsafe impl Send for PackedBuf {}
unsafe impl Sync for PackedBuf {}

impl PackedBuf {
    const HUGE: usize = 2 << 20;

    fn zeroed(len: usize) -> Self {
        let align = if len >= Self::HUGE { Self::HUGE } else { 64 };
        let layout = std::alloc::Layout::from_size_align(len.max(1).div_ceil(64) * 64, align)
            .expect("packed size");
        // SAFETY: non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if align == Self::HUGE {
            // Advice only: failure just leaves small pages.
            // SAFETY: the range is our own allocation, page aligned.
            unsafe {
                libc::madvise(
                    raw as *mut libc::c_void,
                    layout.size() / Self::HUGE * Self::HUGE,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
        Self { ptr, layout }
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for PackedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

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
    data: PackedBuf,
    /// Optional f32 copy of every panel (`[panel][cols][16]`, see
    /// [`PackedMatrix::expand_f32`]).
    expanded: Option<PackedBuf>,
}

impl PackedMatrix {
    /// Packs a 2-D tensor (row-major `[rows, cols]`).
    pub fn from_tensor(t: &TensorRef<'_>) -> Result<Self> {
        if t.shape.len() != 2 {
            return Err(EngineError::Unsupported(format!(
                "expected a matrix, got shape {:?}",
                t.shape
            )));
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
                if !REDUCTION_CHUNK.is_multiple_of(sub) || !sub.is_multiple_of(2) {
                    return Err(EngineError::Unsupported(format!(
                        "{} sub-blocks of {sub}",
                        ty.name()
                    )));
                }
                // 4-bit storage when every q fits one nibble after a common
                // bias; f16 parameters when they are all exact f16 values.
                let (mut lo, mut hi) = (i8::MAX, i8::MIN);
                let mut half = true;
                let is_f16 = |v: f32| half::f16::from_f32(v).to_f32().to_bits() == v.to_bits();
                for r in 0..rows {
                    for_each_subblock(ty, row(r), |sb| {
                        half &= is_f16(sb.scale) && is_f16(sb.offset);
                        for &q in &sb.q[..sb.len] {
                            lo = lo.min(q);
                            hi = hi.max(q);
                        }
                    })?;
                }
                let nibble_type = matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K);
                if nibble_type && sub == 32 && rows > 0 && (hi as i32) - (lo as i32) <= 15 {
                    Format::Q4 {
                        sub,
                        bias: lo,
                        half,
                    }
                } else {
                    Format::Q8 { sub, half }
                }
            }
        };
        let panels = rows.div_ceil(PANEL);
        let panel_bytes = fmt.panel_bytes(cols);
        let mut data = PackedBuf::zeroed(panels * panel_bytes);
        let bytes = data.as_mut_slice();
        for r in 0..rows {
            let (p, l) = (r / PANEL, r % PANEL);
            let panel = &mut bytes[p * panel_bytes..(p + 1) * panel_bytes];
            let src = row(r);
            match fmt {
                Format::F32 | Format::F16 | Format::BF16 => {
                    let e = if fmt == Format::F32 { 4 } else { 2 };
                    for k in 0..cols {
                        let o = float_offset(cols, e, k) + l * e;
                        panel[o..o + e].copy_from_slice(&src[k * e..(k + 1) * e]);
                    }
                }
                Format::Q4 { sub, .. } | Format::Q8 { sub, .. } => {
                    let sbb = fmt.subblock_bytes();
                    let ph = fmt.params_bytes();
                    let is_q4 = matches!(fmt, Format::Q4 { .. });
                    let bias = if let Format::Q4 { bias, .. } = fmt {
                        bias
                    } else {
                        0
                    };
                    let mut i = 0usize;
                    let mut bad = None;
                    for_each_subblock(t.ty, src, |sb| {
                        if sb.len != sub {
                            bad = Some(sb.len);
                            return;
                        }
                        let o = unit_offset(cols, sub, sbb, i * sub);
                        let b = &mut panel[o..o + sbb];
                        if ph == 64 {
                            let h = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
                            b[l * 2..l * 2 + 2].copy_from_slice(&h(sb.scale));
                            b[32 + l * 2..32 + l * 2 + 2].copy_from_slice(&h(sb.offset));
                        } else {
                            b[l * 4..l * 4 + 4].copy_from_slice(&sb.scale.to_le_bytes());
                            b[64 + l * 4..64 + l * 4 + 4].copy_from_slice(&sb.offset.to_le_bytes());
                        }
                        if is_q4 {
                            for j in 0..sub {
                                let q = (sb.q[j] - bias) as u8;
                                b[ph + (j / 8) * 64 + l * 4 + (j % 8) / 2] |= q << (4 * (j % 2));
                            }
                        } else {
                            for j in 0..sub {
                                b[ph + j * PANEL + l] = sb.q[j] as u8;
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
        Ok(Self {
            rows,
            cols,
            ty: t.ty,
            fmt,
            panel_bytes,
            data,
            expanded: None,
        })
    }

    /// Also keeps an f32 copy of the weights, which the many-token (GEMM)
    /// path then reads in place instead of expanding each panel on the fly.
    ///
    /// Why: with a short token dimension (batched decode, 16-64 tokens) the
    /// on-the-fly expansion is a fixed ~4 vector operations per 16 weights
    /// against one FMA per token, about 14% of a 32-token GEMM. The copy
    /// costs 4 bytes per weight of memory (~540 MB for SmolLM2-135M, whose
    /// packed weights are ~100 MB) and makes the GEMM read 4 bytes per
    /// weight instead of ~5/8 (see `BENCHMARKS.md`). One-token and
    /// few-token steps keep reading the compressed panels: they are bound
    /// by memory bandwidth, not by the expansion.
    ///
    /// The copy holds exactly the values the GEMM path expands (the same
    /// code writes them), so results do not change by a single bit.
    /// Idempotent.
    pub fn expand_f32(&mut self) {
        if self.expanded.is_some() || self.rows == 0 || self.cols == 0 {
            return;
        }
        let mut buf = PackedBuf::zeroed(self.n_panels() * self.cols * PANEL * 4);
        let dst = buf.as_mut_slice().as_mut_ptr() as *mut f32;
        let kernel = selected_kernel();
        if kernel == Kernel::Scalar {
            for p in 0..self.n_panels() {
                let panel = self.panel(p);
                for k in 0..self.cols {
                    for l in 0..PANEL {
                        // SAFETY: inside the buffer of n_panels × cols × 16 f32.
                        unsafe {
                            *dst.add((p * self.cols + k) * PANEL + l) =
                                weight_at(self.fmt, self.cols, panel, l, k)
                        };
                    }
                }
            }
        } else {
            // SAFETY: the selected kernel is available; `dst` holds every panel.
            unsafe { kernels::expand_panels(kernel, self, 0, self.n_panels(), dst) };
        }
        self.expanded = Some(buf);
    }

    /// Bytes an [`expand_f32`](Self::expand_f32) copy takes (whether or not it exists).
    pub fn expanded_nbytes(&self) -> usize {
        self.n_panels() * self.cols * PANEL * 4
    }

    /// Whether the matrix keeps an f32 copy (see [`expand_f32`](Self::expand_f32)).
    pub fn has_f32_copy(&self) -> bool {
        self.expanded.is_some()
    }

    fn expanded_ptr(&self) -> Option<*const f32> {
        self.expanded
            .as_ref()
            .map(|b| b.as_slice().as_ptr() as *const f32)
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
            *o = weight_at(self.fmt, self.cols, panel, r % PANEL, k);
        }
    }

    /// Bytes held by the packed weights.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }

    fn n_panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }
    fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }
    fn panel(&self, p: usize) -> &[u8] {
        &self.bytes()[p * self.panel_bytes..(p + 1) * self.panel_bytes]
    }
}

/// The exact weight of lane `l`, input `k` of a packed panel (scalar).
fn weight_at(fmt: Format, cols: usize, panel: &[u8], l: usize, k: usize) -> f32 {
    let f32_at = |o: usize| f32::from_le_bytes(panel[o..o + 4].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes([panel[o], panel[o + 1]]);
    match fmt {
        Format::F32 => f32_at(float_offset(cols, 4, k) + l * 4),
        Format::F16 => half::f16::from_bits(u16_at(float_offset(cols, 2, k) + l * 2)).to_f32(),
        Format::BF16 => half::bf16::from_bits(u16_at(float_offset(cols, 2, k) + l * 2)).to_f32(),
        Format::Q4 { sub, .. } | Format::Q8 { sub, .. } => {
            let base = unit_offset(cols, sub, fmt.subblock_bytes(), k - k % sub);
            let ph = fmt.params_bytes();
            let (scale, offset) = if ph == 64 {
                let h = |o: usize| half::f16::from_bits(u16_at(o)).to_f32();
                (h(base + l * 2), h(base + 32 + l * 2))
            } else {
                (f32_at(base + l * 4), f32_at(base + 64 + l * 4))
            };
            let j = k % sub;
            let q = match fmt {
                Format::Q4 { bias, .. } => {
                    let byte = panel[base + ph + (j / 8) * 64 + l * 4 + (j % 8) / 2];
                    (if j.is_multiple_of(2) {
                        byte & 15
                    } else {
                        byte >> 4
                    }) as i32
                        + bias as i32
                }
                _ => panel[base + ph + j * PANEL + l] as i8 as i32,
            };
            scale.mul_add(q as f32, offset)
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
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
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
        [Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .find(|k| k.available())
            .unwrap_or(Kernel::Scalar)
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
                tracing::warn!(
                    "TANDEM_KERNEL={v}: this CPU cannot run {}, using {}",
                    k.name(),
                    Kernel::best().name()
                );
                Kernel::best()
            }
            None => {
                tracing::warn!(
                    "TANDEM_KERNEL={v} is not one of scalar|avx2|avx512, using {}",
                    Kernel::best().name()
                );
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
pub fn matmul_with(
    kernel: Kernel,
    pool: &ThreadPool,
    w: &PackedMatrix,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
) {
    assert_eq!(x.len(), tokens * w.cols, "x must be tokens × cols");
    assert_eq!(out.len(), tokens * w.rows, "out must be tokens × rows");
    assert!(
        kernel.available(),
        "this CPU cannot run the {} kernel",
        kernel.name()
    );
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
            let p = split(panels, n_tasks, i);
            scalar_panels(w, x, tokens, outp, p.start, p.end);
        });
        return;
    }
    let fused_max = if w.has_f32_copy() {
        FUSED_MAX_TOKENS_F32_COPY
    } else {
        FUSED_MAX_TOKENS
    };
    if tokens <= fused_max {
        // Decode: split the panels evenly, a few tasks per thread so that a
        // thread slowed by another process does not hold up the rest.
        let n_tasks = panels.min(pool.threads() * 4);
        pool.run(n_tasks, &|i| {
            let p = split(panels, n_tasks, i);
            // SAFETY: the kernel was checked to be available; tasks write
            // disjoint panels of `out`.
            unsafe { kernels::fused_task(kernel, w, x, tokens, outp.get(), p.start, p.end) };
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
            unsafe { kernels::gemm_task(kernel, w, x, tokens, outp.get(), grp, t0, t1) };
        });
    }
}

/// The `i`-th of `n` near-equal contiguous parts of `0..len` (the first
/// `len % n` parts one longer).
pub(crate) fn split(len: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    let (q, r) = (len / n, len % n);
    let start = i * q + i.min(r);
    start..start + q + usize::from(i < r)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint parts of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// (A method, so that closures capture the `Sync` wrapper, not the field.)
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Portable kernel over the packed layout: expands a panel, then runs the
/// contract's chains row by row.
fn scalar_panels(w: &PackedMatrix, x: &[f32], tokens: usize, out: SendPtr, p0: usize, p1: usize) {
    let cols = w.cols;
    let mut buf = vec![0f32; cols * PANEL];
    for p in p0..p1 {
        let panel = w.panel(p);
        for k in 0..cols {
            for l in 0..PANEL {
                buf[k * PANEL + l] = weight_at(w.fmt, cols, panel, l, k);
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
                unsafe { *out.get().add(t * w.rows + p * PANEL + l) = total };
            }
        }
    }
}

/// The reduction-order contract as plain code, over a row-major `[rows × cols]`
/// f32 matrix: the definition every kernel must match bit for bit.
pub fn matmul_reference(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
) {
    assert_eq!(w.len(), rows * cols);
    assert_eq!(x.len(), tokens * cols);
    assert_eq!(out.len(), tokens * rows);
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for n in 0..rows {
            let wr = &w[n * cols..(n + 1) * cols];
            let mut total = 0f32;
            for (c, (wc, xc)) in wr
                .chunks(REDUCTION_CHUNK)
                .zip(xt.chunks(REDUCTION_CHUNK))
                .enumerate()
            {
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
