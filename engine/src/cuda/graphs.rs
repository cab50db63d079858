//! CUDA graphs for decode steps.
//!
//! A decode step of a small model, or of a small batch, is dozens of short
//! kernels and multiplies per layer; launching each from the host costs
//! more than running it. A step whose sequences each bring one token (and
//! want its logits or greedy id) is instead replayed from a graph captured
//! once per batch size bucket ([`BUCKETS`]): the batch is padded up to its
//! bucket, and the graph reads everything that changes from step to step
//! (token ids, positions, block tables) out of device metadata uploaded
//! just before the launch, so a captured graph serves any decode step of
//! its bucket.
//!
//! What a graph bakes in, and so must not move while it lives: the layers'
//! KV buffers (graphs belong to the device KV and are dropped with it), and
//! the activation, logits and metadata buffers (their own, [`GraphBuffers`],
//! never the eager path's, which grow; buffers for a larger bucket replace
//! the old ones and drop every graph captured with them).
//!
//! Padding rows write their KV into a sink block past the pool's blocks
//! and read only it; their logits are computed and ignored.

use std::collections::HashMap;

use cudarc::driver::{sys as driver_sys, CudaGraph, CudaSlice};

use crate::error::{EngineError, Result};
use crate::kv::BlockId;
use crate::model::{Logits, SeqStep};

use super::kernels::int;

/// Batch sizes a graph is captured for; a decode batch runs in the
/// smallest that holds it, a larger one eagerly.
pub(super) const BUCKETS: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// The bucket a batch of `n` decode steps runs in, if any.
pub(super) fn bucket(n: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|&b| b >= n)
}

/// Whether `batch` is a decode step a graph can replay: each sequence one
/// token, wanting the last row's logits, its greedy id or its top-k (which
/// is selected after the graph, from the logits it leaves).
pub(super) fn replayable(batch: &[SeqStep<'_>]) -> bool {
    !batch.is_empty()
        && batch.iter().all(|s| {
            s.tokens.len() == 1
                && matches!(s.logits, Logits::Last | Logits::Greedy | Logits::TopK(_))
        })
}

/// Where each part of a bucket-`b` graph's metadata starts (in `i32`s):
/// token ids, positions, sequence of each row, block of each row, block
/// table offsets (all `b` long), then the block tables, packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MetaLayout {
    pub b: usize,
}

impl MetaLayout {
    pub fn tok(self) -> usize {
        0
    }
    pub fn pos(self) -> usize {
        self.b
    }
    pub fn seq(self) -> usize {
        2 * self.b
    }
    pub fn blk(self) -> usize {
        3 * self.b
    }
    pub fn toff(self) -> usize {
        4 * self.b
    }
    pub fn tables(self) -> usize {
        5 * self.b
    }
    /// Metadata words for `b` rows whose tables hold `table_words` entries
    /// in all (the sink's included).
    pub fn words(self, table_words: usize) -> usize {
        self.tables() + table_words
    }
}

/// A decode batch's metadata padded to bucket `b`: row `r < batch.len()`
/// is sequence `r`'s one token; the padding rows hold token 0 at position
/// 0 of a table whose only block is `sink`.
pub(super) fn padded_meta(
    batch: &[SeqStep<'_>],
    b: usize,
    block_size: usize,
    sink: BlockId,
) -> Result<Vec<i32>> {
    // An empty batch is all padding: what warming up captures with.
    if batch.len() > b || !(batch.is_empty() || replayable(batch)) {
        return Err(EngineError::Cuda(format!(
            "a graph of {b} rows cannot replay this step of {} sequences",
            batch.len()
        )));
    }
    let l = MetaLayout { b };
    let table_words: usize = batch.iter().map(|s| s.kv.blocks.len()).sum::<usize>() + 1;
    let mut m = vec![0i32; l.words(table_words)];
    let mut off = 0usize;
    for (r, s) in batch.iter().enumerate() {
        let pos = s.kv.len;
        m[l.tok() + r] = s.tokens[0] as i32;
        m[l.pos() + r] = int(pos, "position")?;
        m[l.seq() + r] = int(r, "row")?;
        let blk = s.kv.blocks.get(pos / block_size).ok_or_else(|| {
            EngineError::Cuda(format!("row {r}: no block reserved for position {pos}"))
        })?;
        m[l.blk() + r] = *blk as i32;
        m[l.toff() + r] = int(off, "block table offset")?;
        for (i, &blk) in s.kv.blocks.iter().enumerate() {
            m[l.tables() + off + i] = blk as i32;
        }
        off += s.kv.blocks.len();
    }
    let sink = int(sink as usize, "sink block")?;
    m[l.tables() + off] = sink;
    for r in batch.len()..b {
        m[l.seq() + r] = int(r, "row")?;
        m[l.blk() + r] = sink;
        m[l.toff() + r] = int(off, "block table offset")?;
    }
    Ok(m)
}

/// The fixed buffers every graph of a set reads and writes, sized for
/// `rows` rows and `meta_words` words of metadata.
pub(super) struct GraphBuffers {
    pub rows: usize,
    pub meta_words: usize,
    pub x: CudaSlice<f32>,
    pub xn: CudaSlice<f32>,
    pub qkv: CudaSlice<f32>,
    pub attn: CudaSlice<f32>,
    pub proj: CudaSlice<f32>,
    pub gate_up: CudaSlice<f32>,
    pub act: CudaSlice<f32>,
    /// BF16 copies of multiply inputs (BF16 weights; one element otherwise).
    pub xb: CudaSlice<u16>,
    pub logits: CudaSlice<f32>,
    pub ids: CudaSlice<i32>,
    pub meta: CudaSlice<i32>,
    /// Partial outputs of the split attention kernel (one element when the
    /// per-token kernel runs instead).
    pub att_part: CudaSlice<f32>,
}

/// A captured graph. cudarc leaves `CudaGraph` neither `Send` nor `Sync`
/// because graph calls must be serialised: every use is under the
/// executor's state lock, which serialises them.
pub(super) struct Graph(pub CudaGraph);

// SAFETY: see the type's docs: only ever touched under the state mutex.
unsafe impl Send for Graph {}

/// The graphs of one device KV, and the buffers they were captured with.
#[derive(Default)]
pub(super) struct GraphSet {
    pub buffers: Option<GraphBuffers>,
    pub graphs: HashMap<usize, Graph>,
}

/// Graph instantiation flags: none.
pub(super) fn instantiate_flags() -> driver_sys::CUgraphInstantiate_flags {
    driver_sys::CUgraphInstantiate_flags(0)
}

/// Capture mode: only this thread's calls are captured (the executor's
/// lock keeps other threads off its stream meanwhile).
pub(super) const CAPTURE_MODE: driver_sys::CUstreamCaptureMode =
    driver_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::SeqKv;

    #[test]
    fn buckets_hold_the_batch() {
        assert_eq!(bucket(1), Some(1));
        assert_eq!(bucket(3), Some(4));
        assert_eq!(bucket(64), Some(64));
        assert_eq!(bucket(65), Some(128));
        assert_eq!(bucket(129), None);
    }

    /// Three decode rows padded to four: each real row reads its own
    /// table; the padding row reads and writes only the sink.
    #[test]
    fn padded_metadata_keeps_real_rows_and_parks_padding_in_the_sink() {
        let bs = 4;
        let mut kvs = [
            SeqKv {
                blocks: vec![7, 2],
                len: 5,
                adapter: 0,
            },
            SeqKv {
                blocks: vec![3],
                len: 0,
                adapter: 0,
            },
            SeqKv {
                blocks: vec![9, 4, 1],
                len: 8,
                adapter: 0,
            },
        ];
        let toks = [[11u32], [12], [13]];
        let kinds = [Logits::Greedy, Logits::Last, Logits::TopK(3)];
        let batch = super::super::test_steps(&mut kvs, &toks, &kinds);
        assert!(replayable(&batch));
        let m = padded_meta(&batch, 4, bs, 100).unwrap();
        let l = MetaLayout { b: 4 };
        assert_eq!(&m[l.tok()..l.pos()], &[11, 12, 13, 0]);
        assert_eq!(&m[l.pos()..l.seq()], &[5, 0, 8, 0]);
        assert_eq!(&m[l.seq()..l.blk()], &[0, 1, 2, 3]);
        // Position 5 is in the second block, 0 in the first, 8 in the third.
        assert_eq!(&m[l.blk()..l.toff()], &[2, 3, 1, 100]);
        assert_eq!(&m[l.toff()..l.tables()], &[0, 2, 3, 6]);
        assert_eq!(&m[l.tables()..], &[7, 2, 3, 9, 4, 1, 100]);
        assert_eq!(m.len(), l.words(7));
        // Too many rows, or a prefill among them: not for a graph.
        assert!(padded_meta(&batch, 2, bs, 100).is_err());
        // No rows: all padding (warming up), reading and writing the sink.
        let empty = padded_meta(&[], 2, bs, 100).unwrap();
        assert_eq!(empty, vec![0, 0, 0, 0, 0, 1, 100, 100, 0, 0, 100]);
        drop(batch);
        let mut kv = SeqKv::default();
        let prefill = [SeqStep {
            kv: &mut kv,
            tokens: &[1, 2],
            logits: Logits::Last,
        }];
        assert!(!replayable(&prefill));
    }
}
