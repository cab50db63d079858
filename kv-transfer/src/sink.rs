//! Where received KV goes: straight into the blocks the decode worker
//! reserved, and the bookkeeping that proves every expected slot arrived.

use tandem_engine::engine::Reservation;
use tandem_engine::kv::{KvLayout, KvPool, KvStaging, SeqKv};

use crate::error::{KvTransferError, Result};
use crate::frame::{decode_payload, verify_in_place};
use crate::layout::TransferSummary;

/// The destination of a transfer. `layer` is the pool's layer index (the
/// stage-local one under pipeline parallelism), `block` the index of the
/// block within the sequence.
pub trait KvSink: Send {
    /// The whole (layer, block) region to write into, or `None` if there is
    /// no such block (the transfer then fails as a protocol error).
    fn region_mut(&mut self, layer: usize, block: usize) -> Option<&mut [f32]>;
}

/// Writes into a [`KvPool`] through a sequence's reserved block table
/// (`Scheduler::reserve_for_transfer`, then `pool_mut()`).
pub struct PoolSink<'a> {
    pool: &'a mut KvPool,
    kv: &'a SeqKv,
}

impl<'a> PoolSink<'a> {
    pub fn new(pool: &'a mut KvPool, kv: &'a SeqKv) -> Self {
        Self { pool, kv }
    }
}

impl KvSink for PoolSink<'_> {
    fn region_mut(&mut self, layer: usize, block: usize) -> Option<&mut [f32]> {
        let b = *self.kv.blocks.get(block)?;
        if layer >= self.pool.layout().n_layers {
            return None;
        }
        Some(self.pool.region_mut(layer, b))
    }
}

/// Receives into the blocks a decode worker reserved (or the staging buffer
/// the reservation keeps where the engine holds its KV elsewhere), off the
/// engine thread; the decode worker then hands it to `Engine::install`.
impl KvSink for Reservation {
    fn region_mut(&mut self, layer: usize, block: usize) -> Option<&mut [f32]> {
        Reservation::region_mut(self, layer, block)
    }
}

/// Receives into a staging buffer (gathering KV for a process of its own).
impl KvSink for KvStaging {
    fn region_mut(&mut self, layer: usize, block: usize) -> Option<&mut [f32]> {
        self.get_region_mut(layer, block)
    }
}

/// Applies block frames to a sink and tracks, per (layer, block), how many
/// slots have arrived, so `finish` can refuse a transfer that lost a frame.
pub(crate) struct Assembler<'s, S: KvSink + ?Sized> {
    layout: KvLayout,
    tokens: usize,
    n_blocks: usize,
    /// Slots received per (layer, block), `layer * n_blocks + block`.
    got: Vec<u32>,
    sink: &'s mut S,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
}

impl<'s, S: KvSink + ?Sized> Assembler<'s, S> {
    pub(crate) fn new(layout: KvLayout, tokens: u64, sink: &'s mut S) -> Self {
        let tokens = tokens as usize;
        let n_blocks = layout.blocks_for(tokens);
        Self {
            layout,
            tokens,
            n_blocks,
            got: vec![0; layout.n_layers * n_blocks],
            sink,
            frames: 0,
            bytes: 0,
        }
    }

    fn slots_of(&self, block: usize) -> usize {
        (self.tokens - block * self.layout.block_size).min(self.layout.block_size)
    }

    /// The destination region of a frame, after checking it is one we expect.
    pub(crate) fn dest(&mut self, layer: u32, block: u32, slots: u32) -> Result<&mut [f32]> {
        let (li, bi, n) = (layer as usize, block as usize, slots as usize);
        if li >= self.layout.n_layers || bi >= self.n_blocks || n == 0 || n > self.slots_of(bi) {
            return Err(KvTransferError::Protocol(format!(
                "frame for layer {layer} block {block} with {slots} slots is outside the {} tokens x {} layers announced",
                self.tokens, self.layout.n_layers
            )));
        }
        self.sink
            .region_mut(li, bi)
            .filter(|r| r.len() == self.layout.block_floats())
            .ok_or_else(|| {
                KvTransferError::Protocol(format!(
                    "no reserved block for layer {layer} block {block}"
                ))
            })
    }

    fn record(&mut self, layer: u32, block: u32, slots: u32, bytes: usize) {
        let g = &mut self.got[layer as usize * self.n_blocks + block as usize];
        *g = (*g).max(slots);
        self.frames += 1;
        self.bytes += bytes as u64;
    }

    /// A frame whose payload is in a buffer: unpack it into the sink.
    pub(crate) fn block(
        &mut self,
        layer: u32,
        block: u32,
        slots: u32,
        crc: u32,
        payload: &[u8],
    ) -> Result<()> {
        let layout = self.layout;
        let dest = self.dest(layer, block, slots)?;
        decode_payload(&layout, layer, block, slots as usize, crc, payload, dest)?;
        self.record(layer, block, slots, payload.len());
        Ok(())
    }

    /// A full block already read into `dest(layer, block, block_size)`.
    pub(crate) fn block_in_place(&mut self, layer: u32, block: u32, crc: u32) -> Result<()> {
        let layout = self.layout;
        let bs = layout.block_size as u32;
        let dest = self.dest(layer, block, bs)?;
        verify_in_place(&layout, layer, block, crc, dest)?;
        self.record(layer, block, bs, layout.block_floats() * 4);
        Ok(())
    }

    pub(crate) fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The sender says it is done after `frames` block frames.
    pub(crate) fn finish(&self, frames: u64) -> Result<TransferSummary> {
        if frames != self.frames {
            return Err(KvTransferError::Protocol(format!(
                "sender sent {frames} block frames, {} arrived",
                self.frames
            )));
        }
        for (i, &g) in self.got.iter().enumerate() {
            let (layer, block) = (i / self.n_blocks.max(1), i % self.n_blocks.max(1));
            if g as usize != self.slots_of(block) {
                return Err(KvTransferError::Protocol(format!(
                    "transfer ended with layer {layer} block {block} holding {g} of {} slots",
                    self.slots_of(block)
                )));
            }
        }
        Ok(TransferSummary {
            frames: self.frames,
            bytes: self.bytes,
        })
    }
}
