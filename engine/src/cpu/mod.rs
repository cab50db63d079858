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
//!
//! (IMPLEMENTATION IN PROGRESS: this module currently holds the scalar
//! reference; SIMD kernels and packing replace its internals.)

pub mod pool;

use tandem_model::quant::{dequantize_row, GgmlType};
use tandem_model::weights::TensorRef;

use crate::error::{EngineError, Result};
pub use pool::ThreadPool;

/// Inputs per reduction chunk (see the module docs).
pub const REDUCTION_CHUNK: usize = 64;

/// A weight matrix `[rows × cols]` in the layout the kernels read.
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl PackedMatrix {
    /// Packs a 2-D tensor (row-major `[rows, cols]`).
    pub fn from_tensor(t: &TensorRef<'_>) -> Result<Self> {
        if t.shape.len() != 2 {
            return Err(EngineError::Unsupported(format!("expected a matrix, got shape {:?}", t.shape)));
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let mut data = vec![0f32; rows * cols];
        let row_bytes = t.ty.bytes_for(cols)?;
        for r in 0..rows {
            dequantize_row(t.ty, &t.bytes[r * row_bytes..(r + 1) * row_bytes], &mut data[r * cols..(r + 1) * cols])?;
        }
        Ok(Self { rows, cols, data })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Writes row `r`, dequantised exactly, into `out` (embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.data[r * self.cols..(r + 1) * self.cols]);
    }
    /// Bytes held by the packed weights.
    pub fn nbytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// `out[t][n] = Σ_k W[n][k] · x[t][k]` for `t < tokens`; `x` is `tokens × cols`,
/// `out` is `tokens × rows`, both row-major.
pub fn matmul(pool: &ThreadPool, w: &PackedMatrix, x: &[f32], tokens: usize, out: &mut [f32]) {
    let _ = pool;
    assert_eq!(x.len(), tokens * w.cols);
    assert_eq!(out.len(), tokens * w.rows);
    for t in 0..tokens {
        let xt = &x[t * w.cols..(t + 1) * w.cols];
        for n in 0..w.rows {
            let wr = &w.data[n * w.cols..(n + 1) * w.cols];
            let mut total = 0f32;
            for (c, (wc, xc)) in wr.chunks(REDUCTION_CHUNK).zip(xt.chunks(REDUCTION_CHUNK)).enumerate() {
                let mut p = 0f32;
                for (a, b) in wc.iter().zip(xc) {
                    p = a.mul_add(*b, p);
                }
                total = if c == 0 { p } else { total + p };
            }
            out[t * w.rows + n] = total;
        }
    }
}

#[allow(dead_code)]
fn _type_used(_: GgmlType) {}
