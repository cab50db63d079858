//! CUDA backend (feature `cuda`): the same forward pass as the CPU
//! [`Model`], on one NVIDIA GPU, behind the same [`Executor`] contract.
//!
//! - Weights are dequantised once at load (from the CPU model's packed
//!   matrices, so both backends multiply by the same values) and kept on the
//!   device as f32 ([`Weights::F32`]) or BF16 ([`Weights::Bf16`]).
//! - Matrix multiplies are cuBLAS: `sgemm` on the f32 path, left in cuBLAS's
//!   default math mode (TF32 is never enabled, so the f32 path is true f32
//!   and is compared token for token with the CPU); `GemmEx` with BF16
//!   weights and activations, f32 accumulation and f32 output on the BF16
//!   path (activations are rounded to BF16 just before each multiply).
//! - Everything else is a handful of small kernels compiled with NVRTC at
//!   load (see `kernels`): embedding lookup, RMSNorm, bias + RoPE (both
//!   styles), the KV write, paged attention, SiLU-and-multiply, residual add.
//!   Attention has four kernels over the same block tables: for decode
//!   rows (a step's one token, a few draft tokens), flash-decoding: a
//!   row's keys cut into fixed parts by position, a thread block per part
//!   and KV head (its query heads together), merged in order, so a row's
//!   output does not depend on its batch (`kernels::SplitPlan`); one
//!   thread block per query token, the reference it is checked against
//!   (and what heads wider than 256 use); and flash-style tiles of 16
//!   query tokens that share each tile of keys and values read into
//!   shared memory (prompt chunks; see `kernels::AttentionPlan`), in f32
//!   on the CUDA cores for the f32 path, on the tensor cores for BF16
//!   models (`mma.sync` on BF16 queries, keys, values and softmax
//!   weights, f32 sums; `TANDEM_CUDA_ATTENTION=cuda-cores` keeps the f32
//!   kernel).
//! - The paged KV cache lives in device memory, per layer, in the
//!   [`KvLayout`] of the CPU pool, its values f32 or, beside BF16 weights,
//!   BF16 ([`KvPrecision`]: half the bytes a decode step reads). Installing
//!   and gathering KV are per layer one copy across the bus of all the
//!   sequence's blocks (f32, the layout peers exchange) and one kernel that
//!   scatters (or gathers) them by block id, converting. The
//!   scheduler's [`KvPool`] only allocates block ids (a
//!   [`KvPool::new_tracking`] pool is enough); copy-on-write copies it makes
//!   are recorded ([`KvPool::record_copies`]) and repeated on the device
//!   before each step.
//! - Sampling stays on the host, but what it reads is cut down on the
//!   device where it can be: a sequence that asks for [`Logits::Greedy`]
//!   gets its argmax picked there and one id copied back instead of the
//!   vocabulary's logits; one that asks for [`Logits::TopK`] gets its `k`
//!   largest logits selected there (a radix select, ties to the lower id,
//!   as `sampler::top_k_of`), and the host draws from them exactly what it
//!   would from the whole row. The others get host logits like the CPU.
//!
//! Unlike the CPU kernels, cuBLAS does not promise one summation order
//! whatever the batch (it picks algorithms by shape), so a sequence's
//! logits match across batch sizes, prompt chunkings and the CPU within a
//! float32 tolerance, not bit for bit (`tests/cuda_backend.rs` states the
//! tolerances).
//!
//! The scheduler's pool comes from [`Executor::new_pool`]: a
//! [`KvPool::new_tracking`] pool, which allocates blocks and holds no host
//! copy of the KV.
//!
//! One executor holds the device KV of one pool at a time: a step, install
//! or gather on another pool rebinds the device KV to it (same contents
//! contract as a new pool: nothing is read before it is written), and the
//! previous pool is refused from then on with an error rather than read
//! with someone else's KV.
//!
//! # Libraries
//!
//! cudarc loads the driver, cuBLAS and NVRTC at run time. Built with its
//! `cuda-12080` bindings, it looks for `libcublas.so`, `libcublas.so.12`,
//! ... (and the same for NVRTC) but not for the `.so.13` names that CUDA 13
//! pip wheels ship, so with CUDA 13 put a folder on `LD_LIBRARY_PATH` that
//! links `libcublas.so` and `libnvrtc.so` to them (`bench/gpu_check.sh` does
//! this). The functions used (`cublasCreate_v2`, `cublasSgemm_v2`,
//! `cublasGemmEx`, NVRTC's program calls) keep their ABI in 13.x. A missing
//! library is an error from [`check_available`], never a panic.

mod graphs;
mod kernels;

pub mod bench;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use tandem_model::config::{ModelConfig, RopeStyle};
use tandem_model::weights::ModelSource;

use crate::cpu::{ExpandWeights, PackedMatrix};
use crate::error::{EngineError, Result};
use crate::executor::Executor;
use crate::kv::{BlockId, KvDtype, KvLayout, KvPool, KvStaging, SeqKv};
use crate::model::{
    check_step, encode_greedy, encode_top_k, written_blocks_between, LayerKv, Logits, Model,
    SeqStep, StepRows,
};

use graphs::{Graph, GraphBuffers, GraphSet};
use kernels::{int, AttentionArgs, AttentionPlan, Kernels, KvCopy, SplitPlan};

/// How the device holds the weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// f32, multiplied with `sgemm`: the path compared with the CPU.
    F32,
    /// BF16 (rounded to nearest even from the dequantised f32), multiplied
    /// with BF16 activations and f32 accumulation: half the bytes, logits
    /// within a looser tolerance of the CPU's.
    Bf16,
}

impl Weights {
    fn bytes_per_weight(self) -> usize {
        match self {
            Weights::F32 => 4,
            Weights::Bf16 => 2,
        }
    }
}

/// How the device holds the paged KV cache. The host's layout (transfers,
/// gathers, the CPU pool) is f32 either way: KV crosses between the two
/// through a kernel that converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPrecision {
    /// f32: what the FP32 path keeps, so that it matches the CPU.
    F32,
    /// BF16, rounded to nearest even as each token's K and V are written
    /// (or installed): half the bytes a decode step reads, and twice the
    /// tokens in the same device memory; attention still computes in f32.
    Bf16,
}

impl KvPrecision {
    /// What a model with `weights` keeps its KV in: the weights'
    /// precision, unless `TANDEM_CUDA_KV=f32` keeps f32 KV beside BF16
    /// weights (BF16 KV beside f32 weights is never chosen: that path is
    /// the one compared with the CPU).
    pub fn for_weights(weights: Weights) -> Self {
        let f32_asked = std::env::var("TANDEM_CUDA_KV").is_ok_and(|v| v.trim() == "f32");
        match weights {
            Weights::Bf16 if !f32_asked => KvPrecision::Bf16,
            _ => KvPrecision::F32,
        }
    }

    /// Bytes of one value.
    pub fn bytes(self) -> usize {
        match self {
            KvPrecision::F32 => 4,
            KvPrecision::Bf16 => 2,
        }
    }
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::Cuda(format!("{what}: {e:?}"))
}

/// Which of the libraries the backend needs fail to load (empty: all load).
fn missing_libraries() -> Vec<&'static str> {
    let mut missing = Vec::new();
    // SAFETY: each call only tries to open a shared library.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            missing.push("the CUDA driver (libcuda.so.1)");
        }
        if !cudarc::cublas::sys::is_culib_present() {
            missing.push("cuBLAS (libcublas.so or .so.12)");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            missing.push("NVRTC (libnvrtc.so or .so.12)");
        }
    }
    missing
}

/// Whether the CUDA driver, cuBLAS and NVRTC load on this machine.
pub fn available() -> bool {
    missing_libraries().is_empty()
}

/// [`available`], as an error that says what is missing and how to fix it.
pub fn check_available() -> Result<()> {
    let missing = missing_libraries();
    if missing.is_empty() {
        return Ok(());
    }
    Err(EngineError::Cuda(format!(
        "cannot load {}; put their folders on LD_LIBRARY_PATH (CUDA 13 pip wheels ship only \
         libcublas.so.13 and libnvrtc.so.13: link them as libcublas.so and libnvrtc.so in a \
         folder on the path, as bench/gpu_check.sh does)",
        missing.join(", ")
    )))
}

/// Whether decode steps replay CUDA graphs: yes, unless the environment
/// says `TANDEM_CUDA_GRAPHS=0` (every step then launches kernel by kernel).
fn graphs_wanted() -> bool {
    std::env::var("TANDEM_CUDA_GRAPHS").map_or(true, |v| v.trim() != "0")
}

/// Whether BF16 decode multiplies use the matrix-vector kernel: only when
/// `TANDEM_CUDA_GEMV=1` asks. On an H200 it is slower than cuBLAS so far
/// (a batch-1 step of the Llama-3-8B shape: 16.7 ms against 12.9 ms, see
/// BENCHMARKS.md), though closer to exact; the benchmark times both.
fn gemv_wanted() -> bool {
    std::env::var("TANDEM_CUDA_GEMV").is_ok_and(|v| v.trim() == "1")
}

/// A device address for a kernel or cuBLAS argument. Event tracking is off
/// and everything runs on one stream, so stream order alone keeps reads
/// after writes: the guard cudarc returns has nothing to do.
fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// The context, the one stream everything runs on, cuBLAS and the kernels.
struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Copies KV out to the host while `stream` computes (an observed
    /// step's layers, see `CudaModel::stream_layers`).
    copies: Arc<CudaStream>,
    blas: CudaBlas,
    /// cuBLAS's workspace, set explicitly so that a multiply captured into
    /// a graph never allocates (declared after `blas`: dropped after it).
    _blas_workspace: CudaSlice<u8>,
    k: Kernels,
}

/// cuBLAS workspace: what NVIDIA recommends for Hopper, enough elsewhere.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

impl Device {
    /// Opens GPU `ordinal` with kernels for a device KV of `kv`.
    fn open(ordinal: usize, kv: KvPrecision) -> Result<Self> {
        check_available()?;
        let n = CudaContext::device_count().map_err(|e| cuda_err("counting GPUs", e))?;
        if ordinal >= n.max(0) as usize {
            return Err(EngineError::Cuda(format!(
                "GPU {ordinal} requested, {n} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| cuda_err(&format!("opening GPU {ordinal}"), e))?;
        // SAFETY: one stream runs everything, so no cross-stream events are needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating a stream", e))?;
        let copies = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating the copy stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("creating cuBLAS", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
            .map_err(|e| cuda_err("allocating the cuBLAS workspace", e))?;
        // SAFETY: the workspace is live device memory of the stated size
        // and outlives the handle (field order); the handle's stream is
        // the only one that uses it.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                ptr(&workspace, &stream) as *mut std::ffi::c_void,
                BLAS_WORKSPACE_BYTES,
            )
        }
        .result()
        .map_err(|e| cuda_err("setting the cuBLAS workspace", e))?;
        let k = Kernels::load(&ctx, stream.clone(), kv)?;
        Ok(Self {
            ctx,
            stream,
            copies,
            blas,
            _blas_workspace: workspace,
            k,
        })
    }

    /// `out = x · Wᵀ` for `t` rows of `x` (`[t, w.cols]` f32) into `out`
    /// (`[t, w.rows]` f32), by cuBLAS, or for BF16 weights and a decode
    /// step of few tokens by the matrix-vector kernel when `gemv` says so
    /// (an attempt at the memory bandwidth cuBLAS leaves unused on such
    /// shapes; see `gemv_wanted`).
    /// `xb`: BF16 scratch of at least `t * w.cols`, which holds `x` in
    /// BF16 already when `x_in_xb` (the kernel that wrote `x` wrote it
    /// there too: no copy then).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        w: &DevMatrix,
        x: u64,
        t: usize,
        out: u64,
        (xb, x_in_xb): (u64, bool),
        gemv: bool,
    ) -> Result<()> {
        if t == 0 {
            return Ok(());
        }
        let (m, n, k) = (
            int(w.rows, "matrix rows")?,
            int(t, "tokens")?,
            int(w.cols, "matrix cols")?,
        );
        let (alpha, beta) = (1f32, 0f32);
        let handle = *self.blas.handle();
        // Row-major out[t][r] = Σ_k W[r][k]·x[t][k] is, column-major,
        // out (m × n) = Wᵀ-as-stored (k × m, transposed) · x (k × n).
        let op_t = blas_sys::cublasOperation_t::CUBLAS_OP_T;
        let op_n = blas_sys::cublasOperation_t::CUBLAS_OP_N;
        match &w.data {
            DevData::F32(wd) => {
                let wp = ptr(wd, &self.stream);
                // SAFETY: shapes checked at load and by the callers' buffer sizes.
                unsafe {
                    blas::sgemm(
                        handle,
                        op_t,
                        op_n,
                        m,
                        n,
                        k,
                        &alpha,
                        wp as *const f32,
                        k,
                        x as *const f32,
                        k,
                        &beta,
                        out as *mut f32,
                        m,
                    )
                }
                .map_err(|e| cuda_err("cuBLAS sgemm", e))
            }
            DevData::Bf16(wd) => {
                if !x_in_xb {
                    self.k.f32_to_bf16(x, xb, t * w.cols)?;
                }
                let wp = ptr(wd, &self.stream);
                if gemv && Kernels::gemv_fits(w.cols, t) {
                    return self.k.gemv_bf16(wp, xb, out, w.rows, w.cols, t);
                }
                let bf16 = blas_sys::cudaDataType::CUDA_R_16BF;
                // SAFETY: as above; alpha and beta are f32 host values, as
                // CUBLAS_COMPUTE_32F expects.
                unsafe {
                    blas::gemm_ex(
                        handle,
                        op_t,
                        op_n,
                        m,
                        n,
                        k,
                        &alpha as *const f32 as *const _,
                        wp as *const _,
                        bf16,
                        k,
                        xb as *const _,
                        bf16,
                        k,
                        &beta as *const f32 as *const _,
                        out as *mut _,
                        blas_sys::cudaDataType::CUDA_R_32F,
                        m,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                    )
                }
                .map_err(|e| cuda_err("cuBLAS GemmEx (bf16)", e))
            }
        }
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the CUDA context", e))
    }

    fn sync(&self, what: &str) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err(&format!("{what} (stream synchronise)"), e))
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
        what: &str,
    ) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
            cuda_err(
                &format!(
                    "allocating {what} ({} MB)",
                    n * std::mem::size_of::<T>() / 1_000_000
                ),
                e,
            )
        })
    }

    fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| cuda_err(&format!("uploading {what}"), e))
    }
}

/// A weight matrix on the device, row-major `[rows, cols]`.
struct DevMatrix {
    rows: usize,
    cols: usize,
    data: DevData,
}

enum DevData {
    F32(CudaSlice<f32>),
    /// BF16 bit patterns.
    Bf16(CudaSlice<u16>),
}

impl DevMatrix {
    fn from_host(dev: &Device, rows: usize, cols: usize, w: &[f32], ty: Weights) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(EngineError::Cuda(format!(
                "matrix [{rows}, {cols}] given {} values",
                w.len()
            )));
        }
        let data = match ty {
            Weights::F32 => DevData::F32(dev.upload(w, "weights")?),
            Weights::Bf16 => {
                let bits: Vec<u16> = w
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                DevData::Bf16(dev.upload(&bits, "weights")?)
            }
        };
        Ok(Self { rows, cols, data })
    }

    /// Random entries in `[-scale, scale]`, generated on the device.
    fn random(
        dev: &Device,
        rows: usize,
        cols: usize,
        ty: Weights,
        seed: u64,
        scale: f32,
    ) -> Result<Self> {
        let n = rows * cols;
        let data = match ty {
            Weights::F32 => {
                let s = dev.zeros::<f32>(n, "weights")?;
                dev.k
                    .fill_uniform_f32(ptr(&s, &dev.stream), n, seed, scale)?;
                DevData::F32(s)
            }
            Weights::Bf16 => {
                let s = dev.zeros::<u16>(n, "weights")?;
                dev.k
                    .fill_uniform_bf16(ptr(&s, &dev.stream), n, seed, scale)?;
                DevData::Bf16(s)
            }
        };
        Ok(Self { rows, cols, data })
    }

    fn nbytes(&self) -> usize {
        self.rows
            * self.cols
            * match self.data {
                DevData::F32(_) => 4,
                DevData::Bf16(_) => 2,
            }
    }
}

/// One layer's device weights (Q/K/V fused by rows, gate/up fused by rows).
struct DevLayer {
    attn_norm: CudaSlice<f32>,
    qkv: DevMatrix,
    qkv_bias: Option<CudaSlice<f32>>,
    /// Per-head query and key norms (Qwen3), applied before RoPE.
    qk_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    wo: DevMatrix,
    ffn_norm: CudaSlice<f32>,
    gate_up: DevMatrix,
    down: DevMatrix,
}

/// The device KV of the bound pool: per layer, `n_blocks` regions of
/// `layout.block_floats()` values (of the model's [`KvPrecision`]) in the
/// [`KvLayout`].
struct DeviceKv {
    pool_id: u64,
    /// Blocks of the pool; each layer's buffer has one more, the sink that
    /// padding rows of a decode graph write to.
    n_blocks: usize,
    block_size: usize,
    /// Raw bytes: f32 or BF16 values, as the kernels were compiled.
    layers: Vec<CudaSlice<u8>>,
    /// Decode graphs captured over these buffers.
    graphs: GraphSet,
}

/// The blocks an observed step writes, and where their KV goes as each
/// layer is written (see [`CudaModel::stream_layers`]).
struct ExportTap {
    /// How many pool blocks the step writes, and their ids (in
    /// `written_blocks` order) on the device.
    n_blocks: usize,
    ids_d: u64,
    /// `n_layers × n_blocks` blocks, layer-major.
    buf: u64,
    /// Recorded once a layer's blocks are in `buf`.
    written: Vec<cudarc::driver::CudaEvent>,
    /// Per sequence: its blocks renumbered into the host copy, and the
    /// positions the step writes.
    views: Vec<SeqKv>,
    positions: Vec<std::ops::Range<usize>>,
    layout: KvLayout,
}

/// Per-token floats of a pass's activation buffers, as
/// [`CudaModel::enqueue`] reads and writes them: the eager scratch and the
/// graph buffers both size theirs from this.
#[derive(Debug, Clone, Copy)]
struct Widths {
    hidden: usize,
    /// A token's Q, K and V.
    qkv: usize,
    /// The attention output: every query head.
    attn: usize,
    ffn: usize,
    /// The widest input of a multiply (its BF16 copy).
    gemm_in: usize,
}

impl Widths {
    fn of(c: &ModelConfig) -> Self {
        let attn = c.n_heads * c.head_dim;
        Self {
            hidden: c.hidden,
            qkv: attn + 2 * c.n_kv_heads * c.head_dim,
            attn,
            ffn: c.ffn,
            gemm_in: c.hidden.max(attn).max(c.ffn),
        }
    }
}

/// Device addresses of one forward pass's buffers and metadata, and its
/// counts (see [`CudaModel::enqueue`]).
struct Pass {
    n_tok: usize,
    x: u64,
    xn: u64,
    qkv: u64,
    attn: u64,
    proj: u64,
    gate_up: u64,
    act: u64,
    /// 0 unless the weights are BF16.
    xb: u64,
    tok: u64,
    pos: u64,
    seq: u64,
    blk: u64,
    toff: u64,
    tables: u64,
    /// The rows whose logits are computed (0: rows `0..n_want`).
    want_rows: u64,
    n_want: usize,
    logits: u64,
    /// Tokens for the per-token attention kernel (0: tokens
    /// `0..n_att_rows`), and the tiles of the tiled one.
    att_rows: u64,
    n_att_rows: usize,
    tiles: u64,
    n_tiles: usize,
    /// Scratch of the split attention kernel, which then takes the
    /// per-token rows (0: the per-token kernel takes them).
    att_part: u64,
    /// Rows of `logits` whose argmax goes to `ids` (0: rows `0..n_greedy`).
    greedy_rows: u64,
    n_greedy: usize,
    ids: u64,
}

/// Grow-only work buffers of one step.
#[derive(Default)]
struct Scratch {
    x: Option<CudaSlice<f32>>,
    xn: Option<CudaSlice<f32>>,
    qkv: Option<CudaSlice<f32>>,
    attn: Option<CudaSlice<f32>>,
    proj: Option<CudaSlice<f32>>,
    gate_up: Option<CudaSlice<f32>>,
    act: Option<CudaSlice<f32>>,
    /// BF16 copy of a multiply's input (BF16 weights only).
    xb: Option<CudaSlice<u16>>,
    logits: Option<CudaSlice<f32>>,
    /// Greedy choices of the step's [`Logits::Greedy`] rows.
    ids: Option<CudaSlice<i32>>,
    /// The [`Logits::TopK`] rows and their `k`, and their candidates.
    top_meta: Option<CudaSlice<i32>>,
    top_vals: Option<CudaSlice<f32>>,
    top_ids: Option<CudaSlice<i32>>,
    /// Block ids and one layer's blocks, for moving KV to and from the host.
    block_ids: Option<CudaSlice<i32>>,
    block_buf: Option<CudaSlice<f32>>,
    /// Every layer of the blocks an observed step writes.
    export_buf: Option<CudaSlice<f32>>,
    meta: Option<CudaSlice<i32>>,
    /// Partial outputs of the split attention kernel.
    att_part: Option<CudaSlice<f32>>,
}

/// Mutable device state, behind the executor's lock.
#[derive(Default)]
struct State {
    kv: Option<DeviceKv>,
    /// Pools whose device KV was given to another pool.
    retired: HashSet<u64>,
    scratch: Scratch,
}

/// A model on one GPU (see the module docs).
pub struct CudaModel {
    config: ModelConfig,
    weights: Weights,
    kv_precision: KvPrecision,
    dev: Device,
    /// f32 always (a lookup reads a few rows).
    embd: CudaSlice<f32>,
    layers: Vec<DevLayer>,
    out_norm: CudaSlice<f32>,
    head: DevMatrix,
    inv_freq: CudaSlice<f32>,
    state: Mutex<State>,
    /// Replay decode steps from CUDA graphs (see `graphs`).
    graphs: std::sync::atomic::AtomicBool,
    /// BF16 multiplies of few tokens by the matrix-vector kernel (off
    /// unless asked, see `gemv_wanted`).
    gemv: std::sync::atomic::AtomicBool,
    /// Decode rows' attention by the split kernel (see
    /// `kernels::split_wanted`), cut as `split_plan` says.
    split: std::sync::atomic::AtomicBool,
    split_plan: SplitPlan,
    /// Prompt tiles by the tensor-core kernel (BF16 models whose heads fit
    /// it, see `kernels::tensor_cores_wanted`).
    tensor_cores: std::sync::atomic::AtomicBool,
}

/// Which attention kernels a model of `c` with `weights` starts with:
/// whether decode rows take the split kernel and how it cuts them, and
/// whether prompt tiles take the tensor cores.
fn attention_choices(c: &ModelConfig, weights: Weights) -> (bool, SplitPlan, bool) {
    (
        kernels::split_wanted(c),
        SplitPlan::for_context(c.context_length),
        weights == Weights::Bf16 && kernels::mma_fits(c.head_dim) && kernels::tensor_cores_wanted(),
    )
}

/// `[rows, cols]` f32 of matrices stacked by rows, exactly as the CPU
/// kernels decode them.
fn dequantise(parts: &[PackedMatrix], what: &str) -> Result<(usize, usize, Vec<f32>)> {
    let cols = parts.first().map(|p| p.cols()).unwrap_or(0);
    if parts.is_empty() || parts.iter().any(|p| p.cols() != cols) {
        return Err(EngineError::Cuda(format!(
            "{what}: matrices to stack have different widths"
        )));
    }
    let rows: usize = parts.iter().map(|p| p.rows()).sum();
    let mut out = vec![0f32; rows * cols];
    let mut r0 = 0;
    for p in parts {
        for r in 0..p.rows() {
            p.row_into(r, &mut out[(r0 + r) * cols..(r0 + r + 1) * cols]);
        }
        r0 += p.rows();
    }
    Ok((rows, cols, out))
}

/// Makes sure `slot` holds at least `n` elements; returns its address.
fn ensure<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &Device,
    slot: &mut Option<CudaSlice<T>>,
    n: usize,
    what: &str,
) -> Result<u64> {
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = None; // free the old one first
        *slot = Some(dev.zeros::<T>(n, what)?);
    }
    match slot {
        Some(s) => Ok(ptr(s, &dev.stream)),
        None => Err(EngineError::Cuda(format!("{what}: no buffer"))),
    }
}

impl CudaModel {
    /// Loads a model file on GPU `ordinal`: through the CPU loader (one
    /// thread, no f32 copies), whose matrices are then dequantised and
    /// uploaded.
    pub fn load(src: &ModelSource, ordinal: usize, weights: Weights) -> Result<Self> {
        let cpu = Model::load_with(src, 1, ExpandWeights::Off)?;
        Self::from_model(&cpu, ordinal, weights)
    }

    /// The CPU model's weights on GPU `ordinal` (a whole model, not a
    /// shard), its KV kept as [`KvPrecision::for_weights`] says.
    pub fn from_model(m: &Model, ordinal: usize, weights: Weights) -> Result<Self> {
        Self::from_model_with_kv(m, ordinal, weights, KvPrecision::for_weights(weights))
    }

    /// [`CudaModel::from_model`] with the device KV in `kv_precision`.
    pub fn from_model_with_kv(
        m: &Model,
        ordinal: usize,
        weights: Weights,
        kv_precision: KvPrecision,
    ) -> Result<Self> {
        if m.shard().world() != 1 {
            return Err(EngineError::Unsupported(
                "the CUDA backend runs whole models, not shards".into(),
            ));
        }
        if m.config.moe.is_some() {
            return Err(EngineError::Unsupported(
                "mixture-of-experts models run on the CPU executor (--device cpu)".into(),
            ));
        }
        let dev = Device::open(ordinal, kv_precision)?;
        dev.bind()?;
        let c = m.config.clone();
        let embd_m = m.embedding_matrix().ok_or_else(|| {
            EngineError::Unsupported("a whole model has a token embedding".into())
        })?;
        let (_, _, embd_host) = dequantise(std::slice::from_ref(embd_m), "token_embd")?;
        let embd = dev.upload(&embd_host, "the token embedding")?;
        let head_m = m
            .head_matrix()
            .ok_or_else(|| EngineError::Unsupported("a whole model has an LM head".into()))?;
        let head = {
            let (r, k, w) = dequantise(std::slice::from_ref(head_m), "output")?;
            DevMatrix::from_host(&dev, r, k, &w, weights)?
        };
        drop(embd_host);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let lw = m.layer_weights(l)?;
            let mat = |parts: &[PackedMatrix], what: &str| -> Result<DevMatrix> {
                let (r, k, w) = dequantise(parts, &format!("blk.{l}.{what}"))?;
                DevMatrix::from_host(&dev, r, k, &w, weights)
            };
            layers.push(DevLayer {
                attn_norm: dev.upload(lw.attn_norm, "a norm")?,
                qkv: mat(lw.qkv, "qkv")?,
                qkv_bias: match lw.qkv_bias {
                    Some(b) => Some(dev.upload(b, "the qkv bias")?),
                    None => None,
                },
                qk_norm: match lw.qk_norm {
                    Some((q, k)) => Some((
                        dev.upload(q, "the query norm")?,
                        dev.upload(k, "the key norm")?,
                    )),
                    None => None,
                },
                wo: mat(lw.wo, "attn_output")?,
                ffn_norm: dev.upload(lw.ffn_norm, "a norm")?,
                gate_up: mat(lw.gate_up, "gate_up")?,
                down: mat(lw.down, "ffn_down")?,
            });
        }
        let out_norm = dev.upload(m.output_norm(), "the output norm")?;
        let inv_freq = dev.upload(m.rope_inv_freq(), "the RoPE frequencies")?;
        let (split_on, split_plan, tensor_cores_on) = attention_choices(&c, weights);
        let model = Self {
            config: c,
            weights,
            kv_precision,
            dev,
            embd,
            layers,
            out_norm,
            head,
            inv_freq,
            state: Mutex::new(State::default()),
            graphs: std::sync::atomic::AtomicBool::new(graphs_wanted()),
            gemv: std::sync::atomic::AtomicBool::new(gemv_wanted()),
            split: std::sync::atomic::AtomicBool::new(split_on),
            tensor_cores: std::sync::atomic::AtomicBool::new(tensor_cores_on),
            split_plan,
        };
        model.check_shapes()?;
        model.dev.sync("uploading the weights")?;
        Ok(model)
    }

    /// A model of shape `config` with random weights generated on the
    /// device (uniform, scaled by `1/sqrt(fan_in)` so activations stay
    /// finite) and unit norms: for speed figures, where the values do not
    /// matter. RoPE is the plain `rope_theta` schedule.
    pub fn synthetic(
        config: ModelConfig,
        ordinal: usize,
        (weights, kv_precision): (Weights, KvPrecision),
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        let dev = Device::open(ordinal, kv_precision)?;
        dev.bind()?;
        let c = config;
        let (h, qd, kvd, ffn) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let mut seeds = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = || {
            seeds = seeds.wrapping_add(0x632b_e59b_d9b4_e019);
            seeds
        };
        let ones = |n: usize| dev.upload(&vec![1f32; n], "a norm");
        let embd = dev.zeros::<f32>(c.vocab_size * h, "the token embedding")?;
        dev.k
            .fill_uniform_f32(ptr(&embd, &dev.stream), c.vocab_size * h, next(), 1.0)?;
        let scale = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let mut layers = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            layers.push(DevLayer {
                attn_norm: ones(h)?,
                qkv: DevMatrix::random(&dev, qd + 2 * kvd, h, weights, next(), scale(h))?,
                qkv_bias: None,
                qk_norm: match c.qk_norm {
                    true => Some((ones(c.head_dim)?, ones(c.head_dim)?)),
                    false => None,
                },
                wo: DevMatrix::random(&dev, h, qd, weights, next(), scale(qd))?,
                ffn_norm: ones(h)?,
                gate_up: DevMatrix::random(&dev, 2 * ffn, h, weights, next(), scale(h))?,
                down: DevMatrix::random(&dev, h, ffn, weights, next(), scale(ffn))?,
            });
        }
        let head = DevMatrix::random(&dev, c.vocab_size, h, weights, next(), scale(h))?;
        let hd = c.head_dim;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / hd as f32))
            .collect();
        let (split_on, split_plan, tensor_cores_on) = attention_choices(&c, weights);
        let model = Self {
            out_norm: ones(h)?,
            inv_freq: dev.upload(&inv, "the RoPE frequencies")?,
            config: c,
            weights,
            kv_precision,
            embd,
            layers,
            head,
            dev,
            state: Mutex::new(State::default()),
            graphs: std::sync::atomic::AtomicBool::new(graphs_wanted()),
            gemv: std::sync::atomic::AtomicBool::new(gemv_wanted()),
            split: std::sync::atomic::AtomicBool::new(split_on),
            tensor_cores: std::sync::atomic::AtomicBool::new(tensor_cores_on),
            split_plan,
        };
        model.check_shapes()?;
        model.dev.sync("generating the weights")?;
        Ok(model)
    }

    /// Checks every matrix against the configuration once, so that the
    /// launches can trust their sizes.
    fn check_shapes(&self) -> Result<()> {
        let c = &self.config;
        let (h, qd, kvd, ffn) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let want = |m: &DevMatrix, rows: usize, cols: usize, what: &str| {
            if m.rows == rows && m.cols == cols {
                Ok(())
            } else {
                Err(EngineError::Cuda(format!(
                    "{what} is [{}, {}], expected [{rows}, {cols}]",
                    m.rows, m.cols
                )))
            }
        };
        if self.layers.len() != c.n_layers {
            return Err(EngineError::Cuda(format!(
                "{} layers loaded, config says {}",
                self.layers.len(),
                c.n_layers
            )));
        }
        for (i, l) in self.layers.iter().enumerate() {
            want(&l.qkv, qd + 2 * kvd, h, &format!("layer {i} qkv"))?;
            want(&l.wo, h, qd, &format!("layer {i} attn_output"))?;
            want(&l.gate_up, 2 * ffn, h, &format!("layer {i} gate_up"))?;
            want(&l.down, h, ffn, &format!("layer {i} ffn_down"))?;
            if l.qkv_bias.as_ref().is_some_and(|b| b.len() != qd + 2 * kvd) {
                return Err(EngineError::Cuda(format!("layer {i}: qkv bias length")));
            }
            if let Some((q, k)) = &l.qk_norm {
                if q.len() != c.head_dim || k.len() != c.head_dim {
                    return Err(EngineError::Cuda(format!(
                        "layer {i}: query/key norm length"
                    )));
                }
                // The bias would have to come before the norms, and the
                // kernels add it with RoPE, after them: no such model exists.
                if l.qkv_bias.is_some() {
                    return Err(EngineError::Unsupported(format!(
                        "layer {i}: a QKV bias with per-head query/key norms"
                    )));
                }
            }
        }
        want(&self.head, c.vocab_size, h, "output")?;
        if self.embd.len() != c.vocab_size * h {
            return Err(EngineError::Cuda("token embedding size".into()));
        }
        if self.inv_freq.len() != c.head_dim / 2 {
            return Err(EngineError::Cuda("RoPE frequency count".into()));
        }
        if c.head_dim > kernels::ATT_DIMS_PER_THREAD * kernels::ATT_THREADS as usize {
            return Err(EngineError::Unsupported(format!(
                "head_dim {} is too large for the CUDA attention kernel",
                c.head_dim
            )));
        }
        Ok(())
    }

    pub fn weights(&self) -> Weights {
        self.weights
    }

    /// How the device holds the KV cache.
    pub fn kv_precision(&self) -> KvPrecision {
        self.kv_precision
    }

    /// The device's name.
    pub fn device_name(&self) -> String {
        self.dev
            .ctx
            .name()
            .unwrap_or_else(|e| format!("unknown ({e:?})"))
    }

    /// Bytes of the weight matrices one step multiplies by (layers and
    /// LM head; the embedding is only looked up).
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.qkv.nbytes() + l.wo.nbytes() + l.gate_up.nbytes() + l.down.nbytes())
            .sum::<usize>()
            + self.head.nbytes()
    }

    /// Multiply-accumulate count of one token through every matrix (the
    /// LM head included): twice this is the token's matmul FLOPs.
    pub fn matmul_params(&self) -> usize {
        (self.weight_bytes()) / self.weights.bytes_per_weight()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the device KV to `pool` (allocating it when its size
    /// changes) and repeats the copy-on-write copies the pool made since
    /// the last call.
    fn bind_pool(&self, st: &mut State, pool: &mut KvPool) -> Result<()> {
        pool.record_copies();
        let layout = *pool.layout();
        if layout != self.kv_layout(layout.block_size) {
            return Err(EngineError::Cuda(format!(
                "pool layout {layout:?} is not this model's {:?}",
                self.kv_layout(layout.block_size)
            )));
        }
        if pool.n_blocks() >= i32::MAX as usize {
            return Err(EngineError::Cuda("pool has too many blocks".into()));
        }
        let id = pool.id();
        if st.retired.contains(&id) {
            return Err(EngineError::Cuda(format!(
                "pool {id}'s device KV was given to another pool: a CUDA model serves one pool at a time"
            )));
        }
        if st.kv.as_ref().is_some_and(|kv| kv.pool_id != id) {
            if let Some(old) = st.kv.as_mut() {
                st.retired.insert(old.pool_id);
                old.pool_id = id;
            }
        }
        if st
            .kv
            .as_ref()
            .is_some_and(|kv| kv.n_blocks != pool.n_blocks() || kv.block_size != layout.block_size)
        {
            st.kv = None; // free before allocating the new size
        }
        if st.kv.is_none() {
            // One block more than the pool's: the sink.
            let per_layer =
                (pool.n_blocks() + 1) * layout.block_floats() * self.kv_precision.bytes();
            let need = per_layer * layout.n_layers;
            let (free, _) = self
                .dev
                .ctx
                .mem_get_info()
                .map_err(|e| cuda_err("reading free device memory", e))?;
            if need > free {
                return Err(EngineError::Cuda(format!(
                    "device KV for {} blocks needs {:.2} GB, {:.2} GB free",
                    pool.n_blocks(),
                    need as f64 / 1e9,
                    free as f64 / 1e9
                )));
            }
            let layers = (0..layout.n_layers)
                .map(|_| self.dev.zeros::<u8>(per_layer, "device KV"))
                .collect::<Result<Vec<_>>>()?;
            st.kv = Some(DeviceKv {
                pool_id: id,
                n_blocks: pool.n_blocks(),
                block_size: layout.block_size,
                layers,
                graphs: GraphSet::default(),
            });
        }
        let copies = pool.take_copies();
        if let Some(kv) = &st.kv {
            let n = layout.block_floats() * self.kv_precision.bytes();
            for (from, to) in copies {
                if from as usize >= kv.n_blocks || to as usize >= kv.n_blocks {
                    return Err(EngineError::Cuda(format!(
                        "block copy {from} -> {to} outside {} blocks",
                        kv.n_blocks
                    )));
                }
                for layer in &kv.layers {
                    let base = ptr(layer, &self.dev.stream);
                    // SAFETY: both regions lie inside the layer's buffer (checked above).
                    unsafe {
                        cudarc::driver::result::memcpy_dtod_async(
                            base + (to as usize * n) as u64,
                            base + (from as usize * n) as u64,
                            n,
                            self.dev.stream.cu_stream(),
                        )
                    }
                    .map_err(|e| cuda_err("copying a KV block", e))?;
                }
            }
        }
        Ok(())
    }

    /// The device KV, when bound to `pool`.
    fn kv_of<'s>(&self, st: &'s State, pool: &KvPool) -> Result<&'s DeviceKv> {
        match &st.kv {
            Some(kv) if kv.pool_id == pool.id() => Ok(kv),
            _ => Err(EngineError::Cuda(format!(
                "pool {} has no device KV on this model (run a step or install on it first)",
                pool.id()
            ))),
        }
    }

    /// `out = x · Wᵀ` for `t` rows of `x` (`[t, w.cols]` f32) into `out`
    /// (`[t, w.rows]` f32). `xb`: BF16 scratch of at least `t * w.cols`.
    /// `what` names the multiply in a profile (its BF16 copy of `x`
    /// included). `x_in_xb`: see [`Device::matmul`].
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        what: &'static str,
        w: &DevMatrix,
        x: u64,
        t: usize,
        out: u64,
        xb: (u64, bool),
    ) -> Result<()> {
        self.dev.k.timed(what, || {
            self.dev.matmul(w, x, t, out, xb, self.gemv_enabled())
        })
    }

    /// One step (see [`Executor::forward_observed`]), without observers:
    /// replayed from a CUDA graph when it is a decode step of a bucket's
    /// size (see `graphs`), else launched kernel by kernel.
    fn step(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        mut export: Option<&mut dyn FnMut(LayerKv<'_>)>,
    ) -> Result<Vec<Vec<f32>>> {
        check_step(&self.config, &|_| false, batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        Model::reserve_step(pool, batch)?;
        self.dev.bind()?;
        let mut guard = self.lock();
        let st = &mut *guard;
        self.bind_pool(st, pool)?;
        // The blocks the step writes, gathered on the device layer by
        // layer as each is written, when an observer wants them.
        let tap = match export {
            Some(_) => Some(self.export_tap(st, pool, batch)?),
            None => None,
        };
        let picks = RowPicks::of(batch);
        let greedy = &picks.greedy;
        let n_want = StepRows::of(batch).logit_rows(batch).len();
        let vocab = self.config.vocab_size;
        let mut full = vec![0f32; picks.n_full(n_want) * vocab];
        let mut ids = vec![0i32; greedy.len()];
        let graph_rows = graphs::bucket(batch.len())
            .filter(|_| self.graphs_enabled() && graphs::replayable(batch) && tap.is_none());
        let replayed = match graph_rows {
            Some(b) => self.replay_decode(st, pool, batch, b)?,
            None => None,
        };
        let from_graph = replayed.is_some();
        let (logits, ids_d) = match replayed {
            Some(out) => out,
            None => self.run_eager(st, pool, batch, greedy, tap.as_ref())?,
        };
        // While the device goes on with the later layers, hand each layer's
        // new KV to the observer as soon as it is written and copied out.
        if let (Some(tap), Some(on_layer)) = (tap, export.as_mut()) {
            self.stream_layers(tap, &mut **on_layer)?;
        }
        let stream = self.dev.stream.cu_stream();
        // Greedy rows: their ids, not their logits, come back.
        if !greedy.is_empty() {
            let mut all = vec![0i32; if from_graph { n_want } else { greedy.len() }];
            // SAFETY: the device buffer holds at least `all.len()` ids.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut all, ids_d, stream) }
                .map_err(|e| cuda_err("downloading greedy ids", e))?;
            // A graph picks every row; the eager path only the greedy ones.
            if from_graph {
                for (i, &r) in greedy.iter().enumerate() {
                    ids[i] = all[r];
                }
            } else {
                ids = all;
            }
        }
        // Top-k rows: their candidates, selected where the logits are.
        let (top_ids, top_vals) = self.select_top_k(st, logits, &picks.top_k)?;
        // The other rows, a run of consecutive ones per copy.
        let mut dst = 0;
        for run in picks.full_row_runs(n_want) {
            let n = run.len() * vocab;
            // SAFETY: rows `run` lie inside the n_want * vocab floats of the
            // logits buffer; `full` has room for every row not picked.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut full[dst..dst + n],
                    logits + (run.start * vocab * 4) as u64,
                    stream,
                )
            }
            .map_err(|e| cuda_err("downloading logits", e))?;
            dst += n;
        }
        self.dev.sync("the forward pass")?;
        drop(guard);
        for q in batch.iter_mut() {
            q.kv.len += q.tokens.len();
        }
        Ok(assemble_rows(
            batch,
            &full,
            &ids,
            (&top_ids, &top_vals),
            vocab,
        ))
    }

    /// The `TOPK_MAX` candidate slots (ids, then values) of each `(row, k)`
    /// of `top_k`, selected on the device from the step's `logits`.
    fn select_top_k(
        &self,
        st: &mut State,
        logits: u64,
        top_k: &[(usize, usize)],
    ) -> Result<(Vec<i32>, Vec<f32>)> {
        let vocab = self.config.vocab_size;
        let stream = self.dev.stream.cu_stream();
        let n_top = top_k.len();
        if n_top == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut top_ids = vec![0i32; n_top * kernels::TOPK_MAX];
        let mut top_vals = vec![0f32; n_top * kernels::TOPK_MAX];
        let mut meta: Vec<i32> = Vec::with_capacity(2 * n_top);
        for &(r, _) in top_k {
            meta.push(int(r, "top-k row")?);
        }
        for &(_, k) in top_k {
            if k == 0 || k > kernels::TOPK_MAX || k > vocab {
                return Err(EngineError::Cuda(format!("top-{k} of {vocab} logits")));
            }
            meta.push(int(k, "top-k")?);
        }
        let dev = &self.dev;
        let sc = &mut st.scratch;
        let meta_d = ensure(dev, &mut sc.top_meta, meta.len(), "top-k metadata")?;
        let vals_d = ensure(dev, &mut sc.top_vals, top_vals.len(), "top-k values")?;
        let ids_d = ensure(dev, &mut sc.top_ids, top_ids.len(), "top-k ids")?;
        // SAFETY: each buffer holds at least as many elements as its
        // host side (ensured above); the upload from pageable memory
        // completes before the call returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(meta_d, &meta, stream) }
            .map_err(|e| cuda_err("uploading top-k metadata", e))?;
        dev.k.topk_rows(
            logits,
            meta_d,
            meta_d + (n_top * 4) as u64,
            n_top,
            vocab,
            vals_d,
            ids_d,
        )?;
        // SAFETY: as above.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut top_ids, ids_d, stream).and_then(|()| {
                cudarc::driver::result::memcpy_dtoh_async(&mut top_vals, vals_d, stream)
            })
        }
        .map_err(|e| cuda_err("downloading top-k candidates", e))?;
        Ok((top_ids, top_vals))
    }

    /// Whether decode steps replay CUDA graphs (on unless
    /// `TANDEM_CUDA_GRAPHS=0`, or [`CudaModel::set_graphs`] said otherwise).
    fn graphs_enabled(&self) -> bool {
        self.graphs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The batch buckets whose decode graph is captured, smallest first.
    fn captured_graphs(&self, st: &State) -> Vec<usize> {
        let mut b: Vec<usize> = st
            .kv
            .as_ref()
            .map(|kv| kv.graphs.graphs.keys().copied().collect())
            .unwrap_or_default();
        b.sort_unstable();
        b
    }

    /// The batch buckets whose decode graph is captured on the bound device
    /// KV, smallest first (tests).
    pub fn captured_graph_buckets(&self) -> Vec<usize> {
        self.captured_graphs(&self.lock())
    }

    /// Turns graph replay of decode steps on or off (tests compare both).
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn gemv_enabled(&self) -> bool {
        self.gemv.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns the matrix-vector kernel for BF16 decode multiplies on or off
    /// (the benchmark compares it with cuBLAS). Graphs captured with the
    /// other choice are dropped.
    pub fn set_gemv(&self, on: bool) {
        let mut st = self.lock();
        if self.gemv.swap(on, std::sync::atomic::Ordering::Relaxed) != on {
            if let Some(kv) = st.kv.as_mut() {
                kv.graphs.graphs.clear();
            }
        }
    }

    pub(crate) fn split_enabled(&self) -> bool {
        self.split.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns the split (flash-decoding) attention kernel for decode rows
    /// on or off, where the model's heads fit it (the benchmark compares
    /// it with the per-token kernel). Graphs captured with the other
    /// choice are dropped.
    pub fn set_split_attention(&self, on: bool) {
        let on = on && SplitPlan::fits(self.config.head_dim);
        let mut st = self.lock();
        if self.split.swap(on, std::sync::atomic::Ordering::Relaxed) != on {
            if let Some(kv) = st.kv.as_mut() {
                kv.graphs.graphs.clear();
            }
        }
    }

    /// Turns the tensor-core attention of prompt tiles on or off, where the
    /// model is BF16 and its heads fit the kernel (the benchmark compares
    /// it with the f32 tiled kernel). Decode graphs hold no prompt tiles.
    pub fn set_tensor_core_attention(&self, on: bool) {
        let on = on && self.weights == Weights::Bf16 && kernels::mma_fits(self.config.head_dim);
        self.tensor_cores
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Launches `batch` kernel by kernel on the step's scratch buffers;
    /// returns the device addresses of its logits (the wanted rows, in
    /// order) and of the greedy rows' ids.
    fn run_eager(
        &self,
        st: &mut State,
        pool: &KvPool,
        batch: &[SeqStep<'_>],
        greedy: &[usize],
        tap: Option<&ExportTap>,
    ) -> Result<(u64, u64)> {
        let c = &self.config;
        let w = Widths::of(c);
        let bs = pool.layout().block_size;

        let rows = StepRows::of(batch);
        let n_tok = rows.n_tok();
        let want = rows.logit_rows(batch);

        // Per-step metadata, one upload: token ids | positions | sequence
        // of each token | block of each token | table offsets | tables |
        // logit rows | attention tiles | per-token attention rows | greedy rows.
        let mut meta: Vec<i32> = Vec::with_capacity(4 * n_tok + 2 * batch.len() + want.len());
        for s in batch.iter() {
            meta.extend(s.tokens.iter().map(|&t| t as i32));
        }
        let o_pos = meta.len();
        for &p in &rows.tok_pos {
            meta.push(int(p, "position")?);
        }
        let o_seq = meta.len();
        for (si, s) in batch.iter().enumerate() {
            meta.extend(std::iter::repeat_n(si as i32, s.tokens.len()));
        }
        let o_blk = meta.len();
        for s in batch.iter() {
            for i in 0..s.tokens.len() {
                meta.push(s.kv.blocks[(s.kv.len + i) / bs] as i32);
            }
        }
        let o_toff = meta.len();
        let mut off = 0usize;
        for s in batch.iter() {
            meta.push(int(off, "block table offset")?);
            off += s.kv.blocks.len();
        }
        let o_tables = meta.len();
        for s in batch.iter() {
            meta.extend(s.kv.blocks.iter().map(|&b| b as i32));
        }
        let o_rows = meta.len();
        for &r in &want {
            meta.push(int(r, "logit row")?);
        }
        let tok_seq: Vec<usize> = batch
            .iter()
            .enumerate()
            .flat_map(|(si, s)| std::iter::repeat_n(si, s.tokens.len()))
            .collect();
        let plan = AttentionPlan::of(&tok_seq, &rows.tok_pos, c.head_dim)?;
        let o_tiles = meta.len();
        meta.extend(&plan.tiles);
        let o_att_rows = meta.len();
        meta.extend(&plan.rows);
        let o_greedy = meta.len();
        for &r in greedy {
            meta.push(int(r, "greedy row")?);
        }

        let dev = &self.dev;
        let sc = &mut st.scratch;
        let meta_base = ensure(dev, &mut sc.meta, meta.len(), "step metadata")?;
        // SAFETY: the buffer holds at least meta.len() ints (ensured above);
        // the copy from pageable memory completes before the call returns.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(meta_base, &meta, dev.stream.cu_stream())
        }
        .map_err(|e| cuda_err("uploading step metadata", e))?;
        let at = |o: usize| meta_base + (o * 4) as u64;
        let (att_rows, n_att_rows) = if plan.tiles.is_empty() {
            (0, n_tok)
        } else {
            (at(o_att_rows), plan.rows.len())
        };
        let pass = Pass {
            n_tok,
            x: ensure(dev, &mut sc.x, n_tok * w.hidden, "activations")?,
            xn: ensure(dev, &mut sc.xn, n_tok * w.hidden, "activations")?,
            qkv: ensure(dev, &mut sc.qkv, n_tok * w.qkv, "activations")?,
            attn: ensure(dev, &mut sc.attn, n_tok * w.attn, "activations")?,
            proj: ensure(dev, &mut sc.proj, n_tok * w.hidden, "activations")?,
            gate_up: ensure(dev, &mut sc.gate_up, n_tok * 2 * w.ffn, "activations")?,
            act: ensure(dev, &mut sc.act, n_tok * w.ffn, "activations")?,
            xb: if self.weights == Weights::Bf16 {
                ensure(dev, &mut sc.xb, n_tok * w.gemm_in, "bf16 activations")?
            } else {
                0
            },
            tok: at(0),
            pos: at(o_pos),
            seq: at(o_seq),
            blk: at(o_blk),
            toff: at(o_toff),
            tables: at(o_tables),
            want_rows: at(o_rows),
            n_want: want.len(),
            logits: ensure(dev, &mut sc.logits, want.len() * c.vocab_size, "logits")?,
            att_rows,
            n_att_rows,
            tiles: at(o_tiles),
            n_tiles: plan.n_tiles(),
            att_part: if self.split_enabled() && n_att_rows > 0 {
                let n = self
                    .split_plan
                    .part_floats(n_att_rows, c.n_heads, c.head_dim);
                ensure(dev, &mut sc.att_part, n, "attention parts")?
            } else {
                0
            },
            greedy_rows: at(o_greedy),
            n_greedy: greedy.len(),
            ids: ensure(dev, &mut sc.ids, greedy.len(), "greedy ids")?,
        };
        let kvs = self.kv_of(st, pool)?;
        self.enqueue(kvs, &pass, bs, tap)?;
        Ok((pass.logits, pass.ids))
    }

    /// Runs the decode step `batch` padded to `b` rows from its graph,
    /// capturing the graph first if this bucket has none yet; returns the
    /// device addresses of the logits (row `r` = sequence `r`) and of every
    /// row's greedy id. `None` when the capture failed (nothing ran): graphs
    /// are then turned off, with a warning, and the step runs eagerly.
    fn replay_decode(
        &self,
        st: &mut State,
        pool: &KvPool,
        batch: &[SeqStep<'_>],
        b: usize,
    ) -> Result<Option<(u64, u64)>> {
        let c = &self.config;
        let w = Widths::of(c);
        let bs = pool.layout().block_size;
        let kvs = match st.kv.as_mut() {
            Some(kv) if kv.pool_id == pool.id() => kv,
            _ => return Err(EngineError::Cuda("device KV not bound".into())),
        };
        let sink = kvs.n_blocks as BlockId;
        let meta = graphs::padded_meta(batch, b, bs, sink)?;
        let layout = graphs::MetaLayout { b };
        // Room for the longest tables a bucket can bring (every row at the
        // full context, and the sink), or for this step's if longer.
        let meta_words = layout
            .words(b * c.context_length.div_ceil(bs) + 1)
            .max(meta.len());
        let part_floats = if self.split_enabled() {
            self.split_plan.part_floats(b, c.n_heads, c.head_dim)
        } else {
            1
        };
        let dev = &self.dev;
        let fits = kvs.graphs.buffers.as_ref().is_some_and(|g| {
            g.rows >= b && g.meta_words >= meta_words && g.att_part.len() >= part_floats
        });
        if !fits {
            // New buffers: graphs captured with the old ones go first.
            kvs.graphs.graphs.clear();
            kvs.graphs.buffers = None;
            let kb = self.weights == Weights::Bf16;
            kvs.graphs.buffers = Some(GraphBuffers {
                rows: b,
                meta_words,
                x: dev.zeros(b * w.hidden, "graph activations")?,
                xn: dev.zeros(b * w.hidden, "graph activations")?,
                qkv: dev.zeros(b * w.qkv, "graph activations")?,
                attn: dev.zeros(b * w.attn, "graph activations")?,
                proj: dev.zeros(b * w.hidden, "graph activations")?,
                gate_up: dev.zeros(b * 2 * w.ffn, "graph activations")?,
                act: dev.zeros(b * w.ffn, "graph activations")?,
                xb: dev.zeros(if kb { b * w.gemm_in } else { 1 }, "graph bf16 activations")?,
                logits: dev.zeros(b * c.vocab_size, "graph logits")?,
                ids: dev.zeros(b, "graph greedy ids")?,
                meta: dev.zeros(meta_words, "graph metadata")?,
                att_part: dev.zeros(part_floats, "graph attention parts")?,
            });
        }
        let Some(bufs) = kvs.graphs.buffers.as_ref() else {
            return Err(EngineError::Cuda("graph buffers missing".into()));
        };
        let s = &dev.stream;
        let meta_base = ptr(&bufs.meta, s);
        // SAFETY: the buffer holds bufs.meta_words ints, at least
        // meta.len() (checked by `fits`, or allocated so); the copy from
        // pageable memory completes before the call returns, so before the
        // graph reads it.
        unsafe { cudarc::driver::result::memcpy_htod_async(meta_base, &meta, s.cu_stream()) }
            .map_err(|e| cuda_err("uploading graph metadata", e))?;
        let pass = {
            let at = |o: usize| meta_base + (o * 4) as u64;
            Pass {
                n_tok: b,
                x: ptr(&bufs.x, s),
                xn: ptr(&bufs.xn, s),
                qkv: ptr(&bufs.qkv, s),
                attn: ptr(&bufs.attn, s),
                proj: ptr(&bufs.proj, s),
                gate_up: ptr(&bufs.gate_up, s),
                act: ptr(&bufs.act, s),
                xb: if self.weights == Weights::Bf16 {
                    ptr(&bufs.xb, s)
                } else {
                    0
                },
                tok: at(layout.tok()),
                pos: at(layout.pos()),
                seq: at(layout.seq()),
                blk: at(layout.blk()),
                toff: at(layout.toff()),
                tables: at(layout.tables()),
                want_rows: 0,
                n_want: b,
                logits: ptr(&bufs.logits, s),
                att_rows: 0,
                n_att_rows: b,
                tiles: 0,
                n_tiles: 0,
                att_part: if self.split_enabled() {
                    ptr(&bufs.att_part, s)
                } else {
                    0
                },
                greedy_rows: 0,
                n_greedy: b,
                ids: ptr(&bufs.ids, s),
            }
        };
        if !kvs.graphs.graphs.contains_key(&b) {
            match self.capture(kvs, &pass, bs) {
                Ok(graph) => {
                    tracing::debug!(rows = b, "captured a decode step graph");
                    kvs.graphs.graphs.insert(b, Graph(graph));
                }
                Err(e) => {
                    tracing::warn!(
                        rows = b,
                        error = %e,
                        "capturing a decode step graph failed: decode steps run kernel by kernel from now on"
                    );
                    self.set_graphs(false);
                    return Ok(None);
                }
            }
        }
        let Some(graph) = kvs.graphs.graphs.get(&b) else {
            return Err(EngineError::Cuda("decode graph missing".into()));
        };
        graph
            .0
            .launch()
            .map_err(|e| cuda_err(&format!("launching the decode graph of {b} rows"), e))?;
        Ok(Some((pass.logits, pass.ids)))
    }

    /// Captures `pass` into a graph (nothing runs). The capture is ended
    /// whatever happens, so the stream never stays in capture mode.
    fn capture(&self, kvs: &DeviceKv, pass: &Pass, bs: usize) -> Result<CudaGraph> {
        let s = &self.dev.stream;
        s.begin_capture(graphs::CAPTURE_MODE)
            .map_err(|e| cuda_err("starting a graph capture", e))?;
        let queued = self.enqueue(kvs, pass, bs, None);
        let captured = s.end_capture(graphs::instantiate_flags());
        queued?;
        captured
            .map_err(|e| cuda_err("ending the graph capture", e))?
            .ok_or_else(|| EngineError::Cuda("the captured graph is empty".into()))
    }

    /// Queues one forward pass on the stream: every kernel and multiply,
    /// no copy to or from the host and no wait, so that it can be captured
    /// into a graph as well as run.
    /// `tap`: after each layer's KV write, its written blocks are gathered
    /// into the tap's buffer and the layer's event recorded.
    fn enqueue(&self, kvs: &DeviceKv, p: &Pass, bs: usize, tap: Option<&ExportTap>) -> Result<()> {
        let c = &self.config;
        let w = Widths::of(c);
        let (h, hd, nh, nkv, ffn) = (c.hidden, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn);
        let (qd, row_len) = (w.attn, w.qkv);
        let n_tok = p.n_tok;
        let k = &self.dev.k;
        let s = &self.dev.stream;
        k.embed(p.tok, ptr(&self.embd, s), p.x, n_tok, h)?;
        let neox = matches!(c.rope_style, RopeStyle::Neox);
        let att = AttentionArgs {
            qkv: p.qkv,
            kv: 0,
            tok_seq: p.seq,
            pos: p.pos,
            tables: p.tables,
            table_off: p.toff,
            out: p.attn,
            row_len,
            n_heads: nh,
            n_kv: nkv,
            hd,
            bs,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        // Kernels that feed a multiply write its BF16 input too (BF16
        // weights: `xb` is not 0), and a residual add goes into the norm
        // after it.
        let fed = (p.xb, p.xb != 0);
        for (li, l) in self.layers.iter().enumerate() {
            // The previous layer's FFN output joins the residual here.
            let add = if li == 0 { 0 } else { p.proj };
            let norm = ptr(&l.attn_norm, s);
            k.rms_norm(p.x, 0, add, norm, (p.xn, p.xb), n_tok, h, c.rms_eps)?;
            self.gemm("matmul qkv", &l.qkv, p.xn, n_tok, p.qkv, fed)?;
            if let Some((qn, kn)) = &l.qk_norm {
                k.head_norm(
                    p.qkv,
                    ptr(qn, s),
                    ptr(kn, s),
                    n_tok,
                    row_len,
                    nh,
                    nkv,
                    hd,
                    c.rms_eps,
                )?;
            }
            let bias = l.qkv_bias.as_ref().map_or(0, |b| ptr(b, s));
            k.bias_rope(
                p.qkv,
                bias,
                p.pos,
                ptr(&self.inv_freq, s),
                n_tok,
                row_len,
                nh + nkv,
                hd,
                neox,
            )?;
            let kv = ptr(&kvs.layers[li], s);
            k.kv_write(p.qkv, p.pos, p.blk, kv, n_tok, row_len, qd, nkv, hd, bs)?;
            if let Some(t) = tap {
                let bf = t.layout.block_floats();
                let layer_buf = t.buf + (li * t.n_blocks * bf * 4) as u64;
                k.kv_copy(KvCopy::Export, [kv, t.ids_d, layer_buf, 0], t.n_blocks, bf)?;
                t.written[li]
                    .record(s)
                    .map_err(|e| cuda_err("recording a layer's event", e))?;
            }
            let args = AttentionArgs { kv, ..att.clone() };
            if p.att_part != 0 {
                k.attention_split(&args, p.att_rows, p.n_att_rows, p.att_part, self.split_plan)?;
            } else if p.n_att_rows > 0 {
                k.attention(&args, p.att_rows, p.n_att_rows)?;
            }
            if self.tensor_cores.load(std::sync::atomic::Ordering::Relaxed) {
                k.attention_mma(&args, p.tiles, p.n_tiles)?;
            } else {
                k.attention_tiled(&args, p.tiles, p.n_tiles)?;
            }
            self.gemm("matmul o", &l.wo, p.attn, n_tok, p.proj, (p.xb, false))?;
            let norm = ptr(&l.ffn_norm, s);
            k.rms_norm(p.x, 0, p.proj, norm, (p.xn, p.xb), n_tok, h, c.rms_eps)?;
            self.gemm("matmul gate_up", &l.gate_up, p.xn, n_tok, p.gate_up, fed)?;
            k.silu_mul(p.gate_up, (p.act, p.xb), n_tok, ffn)?;
            self.gemm("matmul down", &l.down, p.act, n_tok, p.proj, fed)?;
        }
        if !self.layers.is_empty() {
            k.add_in_place(p.x, p.proj, n_tok * h)?;
        }
        if p.n_want > 0 {
            // The final norm of the wanted rows only, into `xn`'s first rows.
            let norm = ptr(&self.out_norm, s);
            let rows = p.want_rows;
            k.rms_norm(p.x, rows, 0, norm, (p.xn, p.xb), p.n_want, h, c.rms_eps)?;
            self.gemm("matmul head", &self.head, p.xn, p.n_want, p.logits, fed)?;
            k.argmax_rows(p.logits, p.greedy_rows, p.ids, p.n_greedy, c.vocab_size)?;
        }
        Ok(())
    }

    /// Host copies of `blocks` of the bound pool, as staging (layer-major,
    /// block `i` = `blocks[i]`).
    fn download_blocks(
        &self,
        st: &mut State,
        pool: &KvPool,
        blocks: &[BlockId],
    ) -> Result<KvStaging> {
        let layout = *pool.layout();
        let mut staging = KvStaging::new(layout, blocks.len() * layout.block_size);
        if blocks.is_empty() {
            return Ok(staging);
        }
        let (layers, ids) = self.block_ids(st, pool, blocks)?;
        let buf = self.layer_buffer(st, pool, blocks.len())?;
        let n = blocks.len() * layout.block_floats();
        let s = &self.dev.stream;
        for (li, layer) in layers.into_iter().enumerate() {
            // Gather the blocks into the buffer, then one copy to the host.
            self.dev.k.kv_copy(
                KvCopy::Export,
                [layer, ids, buf, 0],
                blocks.len(),
                layout.block_floats(),
            )?;
            // SAFETY: the buffer holds n floats (layer_buffer), the
            // layer's slice of the staging exactly n; the copy to pageable
            // memory completes before the call returns, so before the next
            // gather rewrites the buffer.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(staging.layer_mut(li), buf, s.cu_stream())
            }
            .map_err(|e| cuda_err("downloading KV", e))?;
            debug_assert_eq!(staging.layer_mut(li).len(), n);
        }
        self.dev.sync("downloading KV")?;
        Ok(staging)
    }

    /// The tap of an observed step: which blocks it writes (its blocks are
    /// reserved), their ids on the device, a device buffer for all layers
    /// of them, and one event per layer.
    fn export_tap(
        &self,
        st: &mut State,
        pool: &KvPool,
        batch: &[SeqStep<'_>],
    ) -> Result<ExportTap> {
        let layout = *pool.layout();
        let before: Vec<usize> = batch.iter().map(|s| s.kv.len).collect();
        let after: Vec<usize> = batch.iter().map(|s| s.kv.len + s.tokens.len()).collect();
        let (ids, views) = written_blocks_between(batch, &before, &after, layout.block_size);
        let (_, ids_d) = self.block_ids(st, pool, &ids)?;
        let floats = layout.n_layers * ids.len() * layout.block_floats();
        let buf = ensure(
            &self.dev,
            &mut st.scratch.export_buf,
            floats,
            "KV export buffer",
        )?;
        let written = (0..layout.n_layers)
            .map(|_| {
                self.dev
                    .ctx
                    .new_event(None)
                    .map_err(|e| cuda_err("creating a layer event", e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ExportTap {
            n_blocks: ids.len(),
            ids_d,
            buf,
            written,
            views,
            positions: before.iter().zip(&after).map(|(&a, &b)| a..b).collect(),
            layout,
        })
    }

    /// Hands `on_layer` each layer of the tap in order, as soon as the
    /// device has written it: waits for the layer's event, copies the
    /// layer's blocks to the host on the copy stream (the compute stream
    /// goes on meanwhile) and shows them through a small host pool.
    fn stream_layers(&self, tap: ExportTap, on_layer: &mut dyn FnMut(LayerKv<'_>)) -> Result<()> {
        let (n, bf) = (tap.n_blocks, tap.layout.block_floats());
        let floats = n * bf;
        let mut layer_host = vec![0f32; floats];
        let mut copy = KvStaging::new(tap.layout, n * tap.layout.block_size).into_pool();
        for (li, done) in tap.written.iter().enumerate() {
            done.synchronize()
                .map_err(|e| cuda_err(&format!("waiting for layer {li}"), e))?;
            // SAFETY: the tap's buffer holds n_layers × floats floats and the
            // host buffer `floats`; the copy to pageable memory completes
            // before the call returns.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut layer_host,
                    tap.buf + (li * floats * 4) as u64,
                    self.dev.copies.cu_stream(),
                )
            }
            .map_err(|e| cuda_err("copying a layer's KV out", e))?;
            for (b, region) in layer_host.chunks_exact(bf).enumerate() {
                copy.region_mut(li, b as BlockId).copy_from_slice(region);
            }
            for (si, view) in tap.views.iter().enumerate() {
                on_layer(LayerKv {
                    seq: si,
                    layer: li,
                    pool: &copy,
                    kv: view,
                    positions: tap.positions[si].clone(),
                });
            }
        }
        Ok(())
    }

    /// What moving `blocks` of every layer between the bound device KV and
    /// the host needs: each layer's device address and the block ids on
    /// the device (checked first). Moving a layer is then one copy across
    /// the bus and one kernel (`kv_import`, `kv_export`), not a copy per block
    /// (thousands of small copies from pageable memory for a long prompt).
    fn block_ids(
        &self,
        st: &mut State,
        pool: &KvPool,
        blocks: &[BlockId],
    ) -> Result<(Vec<u64>, u64)> {
        let kv = self.kv_of(st, pool)?;
        if let Some(&b) = blocks.iter().find(|&&b| b as usize >= kv.n_blocks) {
            return Err(EngineError::Cuda(format!(
                "block {b} outside {} blocks",
                kv.n_blocks
            )));
        }
        let s = &self.dev.stream;
        let layers: Vec<u64> = kv.layers.iter().map(|l| ptr(l, s)).collect();
        let ids: Vec<i32> = blocks.iter().map(|&b| b as i32).collect();
        let ids_d = ensure(
            &self.dev,
            &mut st.scratch.block_ids,
            ids.len(),
            "KV block ids",
        )?;
        // SAFETY: the buffer holds at least ids.len() ints; the upload from
        // pageable memory completes before the call returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(ids_d, &ids, s.cu_stream()) }
            .map_err(|e| cuda_err("uploading KV block ids", e))?;
        Ok((layers, ids_d))
    }

    /// A device buffer for one layer's worth of `n` blocks.
    fn layer_buffer(&self, st: &mut State, pool: &KvPool, n: usize) -> Result<u64> {
        let floats = n * pool.layout().block_floats();
        ensure(
            &self.dev,
            &mut st.scratch.block_buf,
            floats,
            "KV transfer buffer",
        )
    }
}

impl Executor for CudaModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            dtype: KvDtype::F32,
            n_layers: self.config.n_layers,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            block_size,
        }
    }

    fn kv_block_bytes(&self, block_size: usize) -> usize {
        self.kv_layout(block_size).block_floats() * self.config.n_layers * self.kv_precision.bytes()
    }

    /// Layer by layer, as the device writes them, `on_layer` sees each
    /// layer's new KV through a host copy of just the blocks the step
    /// wrote, renumbered into a small pool of their own (what a sharded
    /// worker does too): after its KV write, each layer's written blocks
    /// are gathered on the device and an event recorded; the host waits for
    /// layer L's event, copies it out on a second stream and calls
    /// `on_layer` while the device computes the layers after L (the
    /// decode-step graphs are not used for such a step).
    /// [`Executor::forward`] copies nothing.
    fn forward_observed(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        on_layer: &mut dyn FnMut(LayerKv<'_>),
    ) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.step(pool, batch, Some(on_layer))
    }

    fn forward(&self, pool: &mut KvPool, batch: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>> {
        self.step(pool, batch, None)
    }

    /// The KV lives in device memory: received into a host staging buffer,
    /// uploaded at install.
    fn receives_in_pool(&self) -> bool {
        false
    }

    fn install(&self, pool: &mut KvPool, kv: &SeqKv, staging: &KvStaging) -> Result<()> {
        self.dev.bind()?;
        let mut st = self.lock();
        self.bind_pool(&mut st, pool)?;
        let layout = *pool.layout();
        if *staging.layout() != layout {
            return Err(EngineError::Cuda(format!(
                "staged KV layout {:?} is not the pool's {layout:?}",
                staging.layout()
            )));
        }
        let nb = kv.blocks.len().min(staging.n_blocks());
        if nb == 0 {
            return Ok(());
        }
        let (layers, ids) = self.block_ids(&mut st, pool, &kv.blocks[..nb])?;
        let buf = self.layer_buffer(&mut st, pool, nb)?;
        let n = nb * layout.block_floats();
        for (li, layer) in layers.into_iter().enumerate() {
            // One copy of the layer's staged blocks, then scatter them.
            // SAFETY: the buffer holds n floats (layer_buffer) and the
            // staging's layer at least n; the copy from pageable memory is
            // stream-ordered after the previous layer's scatter, which reads
            // the buffer.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    buf,
                    &staging.layer(li)[..n],
                    self.dev.stream.cu_stream(),
                )
            }
            .map_err(|e| cuda_err("uploading KV", e))?;
            self.dev.k.kv_copy(
                KvCopy::Import,
                [buf, 0, layer, ids],
                nb,
                layout.block_floats(),
            )?;
        }
        self.dev.sync("installing KV")
    }

    fn gather(&self, pool: &KvPool, blocks: &[BlockId]) -> Result<Option<KvStaging>> {
        self.dev.bind()?;
        let mut st = self.lock();
        self.download_blocks(&mut st, pool, blocks).map(Some)
    }

    fn prepare_pool(&self, pool: &mut KvPool) {
        pool.record_copies();
    }

    /// Captures (and runs once, on padding rows that touch only the sink
    /// block) the decode graph of every bucket up to the one that holds
    /// `max_batch` sequences.
    fn warm_up(&self, pool: &mut KvPool, max_batch: usize) -> Result<()> {
        if !self.graphs_enabled() {
            return Ok(());
        }
        // The largest bucket when the batch is larger still.
        let largest = graphs::BUCKETS[graphs::BUCKETS.len() - 1];
        let top = graphs::bucket(max_batch.max(1)).unwrap_or(largest);
        self.dev.bind()?;
        let mut st = self.lock();
        self.bind_pool(&mut st, pool)?;
        // Largest first: its buffers then serve every smaller bucket.
        for &b in graphs::BUCKETS.iter().rev().filter(|&&b| b <= top) {
            if self.replay_decode(&mut st, pool, &[], b)?.is_none() {
                break; // capture failed: graphs are off, with a warning
            }
        }
        self.dev.sync("warming up the decode graphs")?;
        tracing::info!(
            buckets = ?self.captured_graphs(&st),
            "decode step graphs captured"
        );
        Ok(())
    }

    /// A tracking pool: the KV lives on the device.
    fn new_pool(&self, block_size: usize, n_blocks: usize) -> KvPool {
        let mut pool = KvPool::new_tracking(self.kv_layout(block_size), n_blocks);
        self.prepare_pool(&mut pool);
        pool
    }
}

/// The rows of a step that come back as less than logits: indices among
/// its logit rows ([`StepRows::logit_rows`] order) of the sequences that
/// asked for [`Logits::Greedy`], and of those that asked for
/// [`Logits::TopK`], with their `k`.
#[derive(Debug, Default, PartialEq)]
struct RowPicks {
    greedy: Vec<usize>,
    top_k: Vec<(usize, usize)>,
}

impl RowPicks {
    fn of(batch: &[SeqStep<'_>]) -> Self {
        let mut picks = Self::default();
        let mut r = 0;
        for s in batch {
            match s.logits {
                Logits::None => {}
                Logits::Last => r += 1,
                Logits::Greedy => {
                    picks.greedy.push(r);
                    r += 1;
                }
                Logits::TopK(k) => {
                    picks.top_k.push((r, k));
                    r += 1;
                }
                Logits::All => r += s.tokens.len(),
            }
        }
        picks
    }

    /// The runs of consecutive rows among `0..n_rows` that are neither
    /// greedy nor top-k: the rows whose logits are copied back.
    fn full_row_runs(&self, n_rows: usize) -> Vec<std::ops::Range<usize>> {
        let mut picked: Vec<usize> = self.greedy.clone();
        picked.extend(self.top_k.iter().map(|&(r, _)| r));
        picked.sort_unstable();
        let mut runs = Vec::new();
        let mut start = 0;
        for &g in picked.iter().chain(std::iter::once(&n_rows)) {
            if g > start {
                runs.push(start..g);
            }
            start = g + 1;
        }
        runs
    }

    fn n_full(&self, n_rows: usize) -> usize {
        n_rows - self.greedy.len() - self.top_k.len()
    }
}

/// Per sequence, what it asked for: `full` holds the other rows in order,
/// `ids` the greedy choices in order, `top` the top-k rows' `TOPK_MAX`
/// candidate ids and values each, in order.
fn assemble_rows(
    batch: &[SeqStep<'_>],
    full: &[f32],
    ids: &[i32],
    top: (&[i32], &[f32]),
    vocab: usize,
) -> Vec<Vec<f32>> {
    let (mut f, mut g, mut t) = (0, 0, 0);
    batch
        .iter()
        .map(|s| match s.logits {
            Logits::None => Vec::new(),
            Logits::Greedy => {
                g += 1;
                encode_greedy(ids[g - 1] as u32)
            }
            Logits::TopK(k) => {
                let base = t * kernels::TOPK_MAX;
                t += 1;
                let pairs: Vec<(u32, f32)> = (base..base + k)
                    .map(|i| (top.0[i] as u32, top.1[i]))
                    .collect();
                encode_top_k(&pairs)
            }
            Logits::Last | Logits::All => {
                let n = if s.logits == Logits::Last {
                    1
                } else {
                    s.tokens.len()
                };
                f += n;
                full[(f - n) * vocab..f * vocab].to_vec()
            }
        })
        .collect()
}

/// Which attention kernels [`paged_attention`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// One thread block per query token, for every token.
    PerToken,
    /// The split (flash-decoding) kernel and its merge, for every token.
    Split,
    /// What a forward step runs: runs of consecutive tokens of one
    /// sequence (prompt chunks) in flash-style tiles, the rest by the
    /// split kernel where the heads fit it, else per token.
    Planned,
    /// As `Planned`, with the tiles on the tensor cores (what a BF16
    /// model runs): BF16 inputs and softmax weights, f32 sums.
    TensorCore,
}

/// Runs the paged-attention kernels alone (tests compare them with a naive
/// reference): `q` is `[tokens, n_heads * head_dim]`, `kv` one layer's
/// blocks in `layout` (held on the device in `kv_precision`: rounded to
/// BF16 there, as an install would), `tables[s]` sequence `s`'s block
/// table, and query token `t` of sequence `tok_seq[t]` attends to its keys
/// `0..=tok_pos[t]`. Returns `[tokens, n_heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    (kernel, kv_precision): (AttentionKernel, KvPrecision),
    ordinal: usize,
    layout: &KvLayout,
    n_heads: usize,
    q: &[f32],
    kv: &[f32],
    tables: &[Vec<BlockId>],
    tok_seq: &[usize],
    tok_pos: &[usize],
) -> Result<Vec<f32>> {
    let (hd, nkv, bs) = (layout.head_dim, layout.n_kv_heads, layout.block_size);
    let n_tok = tok_seq.len();
    let qd = n_heads * hd;
    let bad = |m: String| Err(EngineError::Cuda(format!("paged_attention: {m}")));
    if nkv == 0 || !n_heads.is_multiple_of(nkv) || q.len() != n_tok * qd || tok_pos.len() != n_tok {
        return bad("inconsistent shapes".into());
    }
    let n_blocks = kv.len() / layout.block_floats();
    if !kv.len().is_multiple_of(layout.block_floats()) {
        return bad("kv is not a whole number of blocks".into());
    }
    for (t, (&s, &p)) in tok_seq.iter().zip(tok_pos).enumerate() {
        let table = tables
            .get(s)
            .ok_or_else(|| EngineError::Cuda(format!("token {t}: no sequence {s}")))?;
        if p >= table.len() * bs || table.iter().any(|&b| b as usize >= n_blocks) {
            return bad(format!("token {t}: position or block out of range"));
        }
    }
    let dev = Device::open(ordinal, kv_precision)?;
    dev.bind()?;
    let mut meta: Vec<i32> = Vec::new();
    for &s in tok_seq {
        meta.push(int(s, "sequence")?);
    }
    for &p in tok_pos {
        meta.push(int(p, "position")?);
    }
    let o_off = meta.len();
    let mut off = 0;
    for t in tables {
        meta.push(int(off, "table offset")?);
        off += t.len();
    }
    let o_tables = meta.len();
    for t in tables {
        meta.extend(t.iter().map(|&b| b as i32));
    }
    let plan = AttentionPlan::of(tok_seq, tok_pos, hd)?;
    let o_tiles = meta.len();
    meta.extend(&plan.tiles);
    let o_rows = meta.len();
    meta.extend(&plan.rows);
    let s = &dev.stream;
    let meta_d = dev.upload(&meta, "metadata")?;
    let q_d = dev.upload(q, "queries")?;
    let kv_f32 = dev.upload(kv, "KV")?;
    let kv_d = dev.zeros::<u8>(kv.len() * kv_precision.bytes(), "device KV")?;
    dev.k.kv_copy(
        KvCopy::Import,
        [ptr(&kv_f32, s), 0, ptr(&kv_d, s), 0],
        n_blocks,
        layout.block_floats(),
    )?;
    let out_d = dev.zeros::<f32>(n_tok * qd, "output")?;
    let m = ptr(&meta_d, s);
    let at = |o: usize| m + (o * 4) as u64;
    let args = AttentionArgs {
        qkv: ptr(&q_d, s),
        kv: ptr(&kv_d, s),
        tok_seq: at(0),
        pos: at(n_tok),
        tables: at(o_tables),
        table_off: at(o_off),
        out: ptr(&out_d, s),
        row_len: qd,
        n_heads,
        n_kv: nkv,
        hd,
        bs,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    // Cut as a model whose context is these tables' would cut it.
    let longest = tables.iter().map(|t| t.len() * bs).max().unwrap_or(bs);
    let split = SplitPlan::for_context(longest);
    let part = dev.zeros::<f32>(
        split.part_floats(n_tok.max(1), n_heads, hd),
        "attention parts",
    )?;
    let part = ptr(&part, s);
    match kernel {
        AttentionKernel::PerToken => dev.k.attention(&args, 0, n_tok)?,
        AttentionKernel::Split => dev.k.attention_split(&args, 0, n_tok, part, split)?,
        AttentionKernel::Planned | AttentionKernel::TensorCore => {
            if SplitPlan::fits(hd) {
                dev.k
                    .attention_split(&args, at(o_rows), plan.rows.len(), part, split)?;
            } else if !plan.rows.is_empty() {
                dev.k.attention(&args, at(o_rows), plan.rows.len())?;
            }
            if kernel == AttentionKernel::TensorCore {
                dev.k.attention_mma(&args, at(o_tiles), plan.n_tiles())?;
            } else {
                dev.k.attention_tiled(&args, at(o_tiles), plan.n_tiles())?;
            }
        }
    }
    let out = s
        .clone_dtoh(&out_d)
        .map_err(|e| cuda_err("downloading the attention output", e))?;
    dev.sync("paged attention")?;
    Ok(out)
}

/// Runs one BF16 multiply alone (tests compare the two ways with a
/// reference): `w` `[rows, cols]` rounded to BF16 on upload, `x` `[t,
/// cols]` f32 (rounded to BF16 on the device, as a step does); returns
/// `[t, rows]`. `gemv`: by the matrix-vector kernel where it fits, else by
/// cuBLAS.
pub fn bf16_matmul(
    ordinal: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    gemv: bool,
) -> Result<Vec<f32>> {
    if cols == 0 || !x.len().is_multiple_of(cols) {
        return Err(EngineError::Cuda(
            "bf16_matmul: x is not whole rows of cols".into(),
        ));
    }
    let t = x.len() / cols;
    let dev = Device::open(ordinal, KvPrecision::F32)?;
    dev.bind()?;
    let m = DevMatrix::from_host(&dev, rows, cols, w, Weights::Bf16)?;
    let x_d = dev.upload(x, "activations")?;
    let xb = dev.zeros::<u16>(t * cols, "bf16 activations")?;
    let out = dev.zeros::<f32>(t * rows, "output")?;
    let s = &dev.stream;
    dev.matmul(
        &m,
        ptr(&x_d, s),
        t,
        ptr(&out, s),
        (ptr(&xb, s), false),
        gemv,
    )?;
    let host = s
        .clone_dtoh(&out)
        .map_err(|e| cuda_err("downloading the product", e))?;
    dev.sync("bf16 matmul")?;
    Ok(host)
}

/// A step of sequence `i` bringing `toks[i]` and asking for `kinds[i]`.
#[cfg(test)]
fn test_steps<'a, T: AsRef<[u32]>>(
    kvs: &'a mut [SeqKv],
    toks: &'a [T],
    kinds: &[Logits],
) -> Vec<SeqStep<'a>> {
    kvs.iter_mut()
        .zip(toks)
        .zip(kinds)
        .map(|((kv, t), &logits)| SeqStep {
            kv,
            tokens: t.as_ref(),
            logits,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mixture of experts is refused with the reason before any device
    /// is opened (so here, on a machine without one).
    #[test]
    fn a_mixture_of_experts_is_refused_before_the_device_opens() {
        use tandem_model::synth::{
            synth, Arch, SynthFormat, SynthShape, SynthSpec, SynthTokenizer,
        };
        let path =
            std::env::temp_dir().join(format!("tandem-cuda-moe-{}.gguf", std::process::id()));
        let spec = SynthSpec {
            arch: Arch::Qwen3,
            shape: SynthShape::preset("tiny-moe").unwrap(),
            seed: 1,
            format: SynthFormat::Gguf {
                weight_type: tandem_model::quant::GgmlType::Q8_0,
            },
            tokenizer: SynthTokenizer::Gpt2,
        };
        synth(&spec, &path).unwrap();
        let src = ModelSource::open(&path).unwrap();
        let err = CudaModel::load(&src, 0, Weights::F32)
            .err()
            .unwrap()
            .to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains("mixture-of-experts"), "{err}");
    }

    /// A step mixing every kind of logits request: the greedy rows are
    /// picked out, the others copied in as few runs as possible, and each
    /// sequence gets back exactly what it asked for.
    #[test]
    fn greedy_and_top_k_rows_come_back_as_picks_and_the_rest_as_logits() {
        let mut kvs: Vec<SeqKv> = (0..6).map(|_| SeqKv::default()).collect();
        let toks = [
            vec![1u32],
            vec![2, 3, 4],
            vec![5],
            vec![6, 7],
            vec![8],
            vec![9],
        ];
        let kinds = [
            Logits::Greedy,
            Logits::All,
            Logits::None,
            Logits::Last,
            Logits::TopK(2),
            Logits::Greedy,
        ];
        let batch = test_steps(&mut kvs, &toks, &kinds);
        // Logit rows: 0 greedy, 1..4 All, 4 Last, 5 top-2, 6 greedy.
        let picks = RowPicks::of(&batch);
        assert_eq!(picks.greedy, vec![0, 6]);
        assert_eq!(picks.top_k, vec![(5, 2)]);
        assert_eq!(picks.full_row_runs(7), vec![1..5]);
        assert_eq!(picks.n_full(7), 4);
        assert_eq!(RowPicks::default().full_row_runs(6), vec![0..6]);
        let two = RowPicks {
            greedy: vec![2],
            top_k: vec![(1, 3)],
        };
        assert_eq!(two.full_row_runs(4), vec![0..1, 3..4]);
        let all = RowPicks {
            greedy: vec![0],
            top_k: vec![(1, 3)],
        };
        assert!(all.full_row_runs(2).is_empty());
        let vocab = 2;
        let full: Vec<f32> = (0..4 * vocab).map(|v| v as f32).collect();
        let mut top_ids = vec![0i32; kernels::TOPK_MAX];
        let mut top_vals = vec![0f32; kernels::TOPK_MAX];
        top_ids[..2].copy_from_slice(&[40, 12]);
        top_vals[..2].copy_from_slice(&[2.5, -1.0]);
        let out = assemble_rows(&batch, &full, &[7, 3], (&top_ids, &top_vals), vocab);
        assert_eq!(
            out,
            vec![
                vec![7.0],
                full[..3 * vocab].to_vec(),
                vec![],
                full[3 * vocab..].to_vec(),
                vec![40.0, 2.5, 12.0, -1.0],
                vec![3.0],
            ]
        );
        assert_eq!(
            crate::model::top_k_candidates(&out[4]),
            vec![(40, 2.5), (12, -1.0)]
        );
    }
}
