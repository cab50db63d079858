//! The paged KV cache: a pool of fixed-size blocks shared by all sequences.
//!
//! # Layout (the contract the KV transfer reuses)
//!
//! KV is stored as f32: activations are f32 end to end and the cache is part
//! of the fidelity contract (f16 would halve the bytes and perturb logits by
//! ~1e-3). One layer's blocks live in one array, block after block; inside a
//! block, K comes first, then V, each head-major:
//!
//! ```text
//! layer L: [block 0][block 1]...      block = [K: kv_head][dim][slot] [V: kv_head][slot][dim]
//! ```
//!
//! K is dimension-major inside a head (`[dim][slot]`): attention scores a
//! whole block of keys with one broadcast-FMA per dimension. V is slot-major
//! (`[slot][dim]`): the weighted sum adds whole rows. So (layer, block) is
//! one contiguous region, and a tensor-parallel peer's head range is one
//! contiguous run inside K and one inside V.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

pub type BlockId = u32;

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    F32,
}

/// Everything a peer must agree on to read our blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub dtype: KvDtype,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
}

impl KvLayout {
    /// Floats of one (layer, block) region: K and V of every head.
    pub fn block_floats(&self) -> usize {
        2 * self.n_kv_heads * self.head_dim * self.block_size
    }
    /// Bytes of one block across all layers.
    pub fn block_bytes(&self) -> usize {
        self.n_layers * self.block_floats() * 4
    }
    /// Bytes of KV per token.
    pub fn token_bytes(&self) -> usize {
        self.block_bytes() / self.block_size
    }
    /// Offset of K of `head` inside a (layer, block) region.
    pub fn k_offset(&self, head: usize) -> usize {
        head * self.head_dim * self.block_size
    }
    /// Offset of V of `head` inside a (layer, block) region.
    pub fn v_offset(&self, head: usize) -> usize {
        (self.n_kv_heads + head) * self.head_dim * self.block_size
    }
    /// Blocks needed for `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// One sequence's view of the pool: its block table and token count.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqKv {
    pub blocks: Vec<BlockId>,
    /// Tokens whose K and V are written.
    pub len: usize,
    /// The LoRA adapter its keys and values are computed with: 0 for the
    /// base model, else the executor's adapter of that number (see
    /// [`crate::executor::Executor::adapters`]). Sequences of one batch may
    /// differ.
    pub adapter: u32,
}

impl SeqKv {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One layer's block array, shared between the pool and the
/// [`BlockWriter`]s of its reserved blocks.
///
/// The array is reached only through raw pointers and through slices of
/// single blocks, never as one slice of the whole layer: a writer fills its
/// reserved blocks on another thread while the engine reads the blocks of
/// running sequences, and a whole-layer reference would claim both.
struct LayerMemory {
    ptr: NonNull<f32>,
    len: usize,
}

// SAFETY: the memory is owned (freed once, in `drop`); who may touch which
// block at a time is the pool's and the writers' contract (see `BlockWriter`).
unsafe impl Send for LayerMemory {}
unsafe impl Sync for LayerMemory {}

impl LayerMemory {
    fn new(data: Vec<f32>) -> Self {
        let len = data.len();
        let ptr = NonNull::from(Box::leak(data.into_boxed_slice())).cast::<f32>();
        Self { ptr, len }
    }

    /// Start of block `b` of `block_floats` floats. Panics when out of range.
    fn block(&self, b: usize, block_floats: usize) -> *mut f32 {
        assert!(
            (b + 1) * block_floats <= self.len,
            "block {b} of a layer of {}",
            self.len / block_floats.max(1)
        );
        // SAFETY: in bounds of the `len` floats allocated in `new`.
        unsafe { self.ptr.as_ptr().add(b * block_floats) }
    }
}

impl Drop for LayerMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from `Box::leak` in `new`, and this is
        // the only owner.
        drop(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ))
        });
    }
}

/// One layer of a pool, for reading the blocks of sequences one runs
/// (attention). Like `&[f32]` of the whole layer, except that it lends out
/// one block at a time, so that blocks reserved for a transfer may be
/// written meanwhile.
#[derive(Clone, Copy)]
pub struct PoolLayer<'a> {
    ptr: *const f32,
    n_blocks: usize,
    block_floats: usize,
    _layer: PhantomData<&'a [f32]>,
}

// SAFETY: it only reads, and only blocks no writer holds (see `block`).
unsafe impl Send for PoolLayer<'_> {}
unsafe impl Sync for PoolLayer<'_> {}

impl<'a> PoolLayer<'a> {
    /// A layer held in a plain slice of whole blocks (tests, references).
    pub fn from_slice(layer: &'a [f32], block_floats: usize) -> Self {
        assert!(
            block_floats > 0 && layer.len().is_multiple_of(block_floats),
            "a layer of {} floats is not whole blocks of {block_floats}",
            layer.len()
        );
        Self {
            ptr: layer.as_ptr(),
            n_blocks: layer.len() / block_floats,
            block_floats,
            _layer: PhantomData,
        }
    }

    /// The (this layer, `b`) region. Panics when out of range.
    pub fn block(&self, b: BlockId) -> &'a [f32] {
        assert!(
            (b as usize) < self.n_blocks,
            "block {b} of {}",
            self.n_blocks
        );
        // SAFETY: in bounds; `b` is a block of a sequence the caller runs,
        // which no `BlockWriter` holds (writers hold only reserved blocks,
        // which join a sequence after their writer is gone).
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.add(b as usize * self.block_floats),
                self.block_floats,
            )
        }
    }

    /// The start of block 0, for kernels that address blocks themselves;
    /// they may read only blocks of the sequences they run, as [`Self::block`].
    pub fn as_ptr(&self) -> *const f32 {
        self.ptr
    }
}

/// The block pool with reference counts (blocks shared by a cached prefix or
/// by forked sequences are counted once per holder).
pub struct KvPool {
    layout: KvLayout,
    n_blocks: usize,
    /// Per layer: `n_blocks * block_floats` floats.
    layers: Arc<[LayerMemory]>,
    refs: Vec<u32>,
    free: Vec<BlockId>,
    /// Block copies made by copy-on-write since the last
    /// [`KvPool::take_copies`], when recording (see [`KvPool::record_copies`]).
    copies: Option<Vec<(BlockId, BlockId)>>,
    /// Blocks are allocated by another pool (a sharded worker's rank 0):
    /// this one only holds the contents.
    mirror: bool,
    /// Unique per pool in this process: an executor that keeps the KV
    /// itself (device memory) tells which pool's blocks it holds.
    id: u64,
}

/// Source of [`KvPool::id`]s.
static NEXT_POOL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_pool_id() -> u64 {
    NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// `n` zeros written now, not left to the allocator's lazily zeroed pages:
/// the pool's memory is claimed when the worker starts (an overcommitted
/// host fails then, not mid-request), and the first requests to reach a
/// block do not pay its page faults inside a decode step. Serving engines
/// on GPUs get the same from allocating device memory up front.
fn touched_zeros(n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    // One write per 4 KiB page; `black_box` keeps the compiler from
    // dropping the stores into memory it knows to be zero.
    for x in v.iter_mut().step_by(1024) {
        *x = std::hint::black_box(0f32);
    }
    v
}

impl KvPool {
    /// A pool of `n_blocks` blocks with host storage, all of it written now
    /// (see [`touched_zeros`]): a worker's KV budget is resident from the
    /// start.
    pub fn new(layout: KvLayout, n_blocks: usize) -> Self {
        let per_layer = n_blocks * layout.block_floats();
        Self {
            layout,
            n_blocks,
            layers: (0..layout.n_layers)
                .map(|_| LayerMemory::new(touched_zeros(per_layer)))
                .collect(),
            refs: vec![0; n_blocks],
            // Pop from the end: hand out low ids first (nicer to read in tests).
            free: (0..n_blocks as BlockId).rev().collect(),
            copies: None,
            mirror: false,
            id: next_pool_id(),
        }
    }

    /// A pool that allocates blocks and counts references but holds no KV:
    /// the executor keeps the contents itself (in device memory, see the
    /// CUDA executor) and learns copy-on-write copies through
    /// [`KvPool::record_copies`], which this pool records from the start.
    /// Its regions and layers are empty: [`KvPool::region`],
    /// [`KvPool::layer`] and [`KvPool::write_token`] panic on it.
    pub fn new_tracking(layout: KvLayout, n_blocks: usize) -> Self {
        Self {
            layout,
            n_blocks,
            layers: Arc::new([]),
            refs: vec![0; n_blocks],
            free: (0..n_blocks as BlockId).rev().collect(),
            copies: Some(Vec::new()),
            mirror: false,
            id: next_pool_id(),
        }
    }

    /// Whether this pool holds the KV contents (false for
    /// [`KvPool::new_tracking`]).
    pub fn holds_kv(&self) -> bool {
        self.layers.len() == self.layout.n_layers
    }

    /// This pool's identity, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A pool whose block tables are decided by another pool of the same
    /// size: a follower rank of a sharded worker holds its shard of every
    /// block, and writes where rank 0's scheduler tells it to.
    pub fn new_mirror(layout: KvLayout, n_blocks: usize) -> Self {
        Self {
            mirror: true,
            ..Self::new(layout, n_blocks)
        }
    }

    /// From now on, remember every copy-on-write copy so that the other
    /// shards of a sharded worker can repeat it ([`KvPool::take_copies`]).
    pub fn record_copies(&mut self) {
        self.copies.get_or_insert_with(Vec::new);
    }

    /// The `(from, to)` copies made since the last call, in order.
    pub fn take_copies(&mut self) -> Vec<(BlockId, BlockId)> {
        self.copies.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Repeats a copy another shard made ([`KvPool::take_copies`]).
    pub fn apply_copy(&mut self, from: BlockId, to: BlockId) -> Result<()> {
        if from as usize >= self.n_blocks || to as usize >= self.n_blocks {
            return Err(EngineError::Unsupported(format!(
                "block copy {from} -> {to} outside a pool of {} blocks",
                self.n_blocks
            )));
        }
        self.copy_block(from, to);
        Ok(())
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    pub fn used_blocks(&self) -> usize {
        self.n_blocks - self.free.len()
    }
    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refs[b as usize]
    }

    /// Takes a free block (refcount 1), or `None` when the pool is exhausted.
    pub fn alloc(&mut self) -> Option<BlockId> {
        let b = self.free.pop()?;
        debug_assert_eq!(self.refs[b as usize], 0);
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Adds a holder to a live block.
    pub fn retain(&mut self, b: BlockId) {
        assert!(self.refs[b as usize] > 0, "retain of free block {b}");
        self.refs[b as usize] += 1;
    }

    /// Drops a holder; the block returns to the free list at zero.
    pub fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        assert!(*r > 0, "double free of block {b}");
        *r -= 1;
        if *r == 0 {
            self.free.push(b);
        }
    }

    /// Releases every block of a sequence and empties it.
    pub fn free_seq(&mut self, seq: &mut SeqKv) {
        for b in seq.blocks.drain(..) {
            self.release(b);
        }
        seq.len = 0;
    }

    /// Keeps the first `len` tokens of `seq` (rejected draft tokens go) and
    /// releases the blocks past them. The slots past `len` in its last block
    /// are written again before anything reads them.
    pub fn truncate(&mut self, seq: &mut SeqKv, len: usize) {
        if len >= seq.len {
            return;
        }
        seq.len = len;
        let keep = self.layout.blocks_for(len);
        for b in seq.blocks.drain(keep..) {
            self.release(b);
        }
    }

    /// Makes `seq` able to hold `new_tokens` more tokens, exclusively owning
    /// every block those tokens will be written to (copy-on-write of a shared
    /// partial last block). On failure nothing changes.
    pub fn reserve(&mut self, seq: &mut SeqKv, new_tokens: usize) -> Result<()> {
        let bs = self.layout.block_size;
        let need = self.layout.blocks_for(seq.len + new_tokens);
        let extra = need.saturating_sub(seq.blocks.len());
        let partial_shared = !seq.len.is_multiple_of(bs)
            && new_tokens > 0
            && self.refs[seq.blocks[seq.len / bs] as usize] > 1;
        let wanted = extra + usize::from(partial_shared);
        if wanted > self.free.len() {
            return Err(EngineError::OutOfBlocks {
                needed: wanted,
                free: self.free.len(),
            });
        }
        if partial_shared {
            let idx = seq.len / bs;
            let old = seq.blocks[idx];
            let new = self.alloc().expect("checked above");
            self.copy_block(old, new);
            self.release(old);
            seq.blocks[idx] = new;
        }
        for _ in 0..extra {
            let b = self.alloc().expect("checked above");
            seq.blocks.push(b);
        }
        Ok(())
    }

    /// A new sequence sharing all of `seq`'s blocks (parallel sampling).
    pub fn fork(&mut self, seq: &SeqKv) -> SeqKv {
        for &b in &seq.blocks {
            self.retain(b);
        }
        seq.clone()
    }

    fn copy_block(&mut self, from: BlockId, to: BlockId) {
        if let Some(log) = &mut self.copies {
            log.push((from, to));
        }
        if from == to {
            return;
        }
        let n = self.layout.block_floats();
        for layer in 0..self.layers.len() {
            let src = self.block_ptr(layer, from);
            let dst = self.block_ptr(layer, to);
            // SAFETY: two distinct in-bounds blocks of the engine's (`&mut
            // self`), neither reserved for a transfer.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
        }
    }

    /// Start of the (layer, block) region. Panics when out of range.
    fn block_ptr(&self, layer: usize, b: BlockId) -> *mut f32 {
        self.layers[layer].block(b as usize, self.layout.block_floats())
    }

    /// One layer's blocks (read by attention).
    pub fn layer(&self, layer: usize) -> PoolLayer<'_> {
        PoolLayer {
            ptr: self.layers[layer].ptr.as_ptr(),
            n_blocks: self.n_blocks,
            block_floats: self.layout.block_floats(),
            _layer: PhantomData,
        }
    }

    /// The (layer, block) region.
    pub fn region(&self, layer: usize, b: BlockId) -> &[f32] {
        self.layer(layer).block(b)
    }

    /// The (layer, block) region, writable. `b` must not be reserved for a
    /// transfer whose [`BlockWriter`] is alive (the engine never asks for
    /// those: they belong to no sequence yet).
    pub fn region_mut(&mut self, layer: usize, b: BlockId) -> &mut [f32] {
        let p = self.block_ptr(layer, b);
        // SAFETY: in bounds; `&mut self` excludes every other borrow of the
        // pool, and no writer holds `b` (above).
        unsafe { std::slice::from_raw_parts_mut(p, self.layout.block_floats()) }
    }

    /// A writer for the blocks of `kv`, for receiving their KV on another
    /// thread while the engine goes on with the rest of the pool: the
    /// prompt's KV lands straight in the blocks the sequence will run on.
    /// Panics on a pool that holds no KV ([`KvPool::holds_kv`]).
    ///
    /// # Safety
    ///
    /// Until the writer is dropped, the caller must not read or write these
    /// blocks through the pool (no sequence may hold them, no copy may
    /// touch them) nor release them; then it must make the writer's drop
    /// happen before its next access (hand it back over a channel, join).
    /// The blocks must be distinct.
    pub unsafe fn transfer_writer(&self, kv: &SeqKv) -> BlockWriter {
        assert!(self.holds_kv(), "a transfer writer on a pool without KV");
        for &b in &kv.blocks {
            assert!(
                (b as usize) < self.n_blocks,
                "block {b} of {}",
                self.n_blocks
            );
        }
        BlockWriter {
            layers: self.layers.clone(),
            blocks: kv.blocks.clone(),
            block_floats: self.layout.block_floats(),
        }
    }

    /// Writes one token's K and V (`kv_dim` floats each) at position `pos` of `seq`.
    pub fn write_token(&mut self, layer: usize, seq: &SeqKv, pos: usize, k: &[f32], v: &[f32]) {
        let l = self.layout;
        let (bs, hd) = (l.block_size, l.head_dim);
        let block = seq.blocks[pos / bs];
        debug_assert!(
            self.mirror || self.refs[block as usize] == 1,
            "writing into a shared block"
        );
        let slot = pos % bs;
        let region = self.region_mut(layer, block);
        for h in 0..l.n_kv_heads {
            let kb = l.k_offset(h);
            for d in 0..hd {
                region[kb + d * bs + slot] = k[h * hd + d];
            }
            let vb = l.v_offset(h) + slot * hd;
            region[vb..vb + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }
}

/// The blocks reserved for one transfer, writable from any thread while the
/// engine runs the rest of the pool ([`KvPool::transfer_writer`]). Block
/// `i` is the reservation's `i`-th block.
pub struct BlockWriter {
    layers: Arc<[LayerMemory]>,
    blocks: Vec<BlockId>,
    block_floats: usize,
}

impl BlockWriter {
    /// The (layer, `i`-th reserved block) region, or `None` when there is
    /// no such block.
    pub fn region_mut(&mut self, layer: usize, i: usize) -> Option<&mut [f32]> {
        let mem = self.layers.get(layer)?;
        let b = *self.blocks.get(i)? as usize;
        let p = mem.block(b, self.block_floats);
        // SAFETY: in bounds (`block` checks); `transfer_writer`'s caller
        // keeps the engine off these blocks while this writer lives; the
        // blocks are distinct and `&mut self` lends one region at a time.
        Some(unsafe { std::slice::from_raw_parts_mut(p, self.block_floats) })
    }
}

impl std::fmt::Debug for BlockWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockWriter")
            .field("blocks", &self.blocks)
            .finish()
    }
}

/// KV for `tokens` tokens, laid out as `n_layers x n_blocks` regions of
/// `layout.block_floats()` floats (layer-major): KV gathered off a pool
/// (a prefill export, a sharded worker's ranks), or received for an engine
/// whose pool does not hold the KV itself (device memory, shards), which
/// `Engine::install` then copies in.
#[derive(Debug, Clone)]
pub struct KvStaging {
    layout: KvLayout,
    tokens: usize,
    data: Vec<f32>,
}

impl KvStaging {
    pub fn new(layout: KvLayout, tokens: usize) -> Self {
        let n = layout.n_layers * layout.blocks_for(tokens) * layout.block_floats();
        Self {
            layout,
            tokens,
            data: vec![0f32; n],
        }
    }
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    /// Blocks per layer.
    pub fn n_blocks(&self) -> usize {
        self.layout.blocks_for(self.tokens)
    }
    fn offset(&self, layer: usize, block: usize) -> usize {
        assert!(
            layer < self.layout.n_layers && block < self.n_blocks(),
            "staging region (layer {layer}, block {block}) out of range"
        );
        (layer * self.n_blocks() + block) * self.layout.block_floats()
    }
    /// The (layer, block) region. Panics when out of range.
    pub fn region(&self, layer: usize, block: usize) -> &[f32] {
        let o = self.offset(layer, block);
        &self.data[o..o + self.layout.block_floats()]
    }
    /// The staged blocks as a pool of their own (block `i` = staged block
    /// `i`), for code that reads KV through a pool.
    pub fn into_pool(self) -> KvPool {
        let n = self.n_blocks();
        let per_layer = n * self.layout.block_floats();
        let mut data = self.data;
        let mut layers = Vec::with_capacity(self.layout.n_layers);
        for _ in 0..self.layout.n_layers {
            let rest = data.split_off(per_layer);
            layers.push(LayerMemory::new(std::mem::replace(&mut data, rest)));
        }
        KvPool {
            layout: self.layout,
            n_blocks: n,
            layers: layers.into(),
            refs: vec![0; n],
            free: Vec::new(),
            copies: None,
            mirror: true,
            id: next_pool_id(),
        }
    }

    /// The (layer, block) region, writable. Panics when out of range.
    pub fn region_mut(&mut self, layer: usize, block: usize) -> &mut [f32] {
        let o = self.offset(layer, block);
        let n = self.layout.block_floats();
        &mut self.data[o..o + n]
    }

    /// Every staged block of one layer, one after another. Panics when
    /// out of range.
    pub fn layer(&self, layer: usize) -> &[f32] {
        let n = self.n_blocks() * self.layout.block_floats();
        &self.data[layer * n..(layer + 1) * n]
    }

    /// [`KvStaging::layer`], writable.
    pub fn layer_mut(&mut self, layer: usize) -> &mut [f32] {
        let n = self.n_blocks() * self.layout.block_floats();
        &mut self.data[layer * n..(layer + 1) * n]
    }

    /// The (layer, block) region, writable, or `None` when out of range
    /// (for writers fed by a peer, who may name any block).
    pub fn get_region_mut(&mut self, layer: usize, block: usize) -> Option<&mut [f32]> {
        (layer < self.layout.n_layers && block < self.n_blocks())
            .then(|| self.region_mut(layer, block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            dtype: KvDtype::F32,
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 4,
            block_size: 4,
        }
    }

    /// A staged layer is its blocks' regions back to back (what a device
    /// executor moves in one copy), and writes through it land in them.
    #[test]
    fn a_staged_layer_is_its_blocks_in_order() {
        let l = layout();
        let mut st = KvStaging::new(l, 3 * l.block_size - 1);
        assert_eq!(st.n_blocks(), 3);
        for layer in 0..l.n_layers {
            for (i, v) in st.layer_mut(layer).iter_mut().enumerate() {
                *v = (layer * 1000 + i) as f32;
            }
        }
        for layer in 0..l.n_layers {
            let joined: Vec<f32> = (0..3).flat_map(|b| st.region(layer, b).to_vec()).collect();
            assert_eq!(st.layer(layer), &joined[..]);
            assert_eq!(
                st.region(layer, 1)[0],
                (layer * 1000 + l.block_floats()) as f32
            );
        }
    }

    #[test]
    fn reserve_allocates_and_fails_cleanly() {
        let mut p = KvPool::new(layout(), 3);
        let mut s = SeqKv::default();
        p.reserve(&mut s, 5).unwrap();
        assert_eq!(s.blocks.len(), 2);
        s.len = 5;
        let e = p.reserve(&mut s, 8).unwrap_err();
        assert!(
            matches!(e, EngineError::OutOfBlocks { needed: 2, free: 1 }),
            "{e}"
        );
        assert_eq!(
            s.blocks.len(),
            2,
            "failed reserve must not change the sequence"
        );
        p.free_seq(&mut s);
        assert_eq!(p.free_blocks(), 3);
    }

    #[test]
    fn fork_then_append_copies_the_shared_partial_block() {
        let mut p = KvPool::new(layout(), 8);
        let mut a = SeqKv::default();
        p.reserve(&mut a, 6).unwrap();
        for pos in 0..6 {
            let k: Vec<f32> = (0..8).map(|i| (pos * 10 + i) as f32).collect();
            p.write_token(0, &a, pos, &k, &k);
        }
        a.len = 6;
        let mut b = p.fork(&a);
        assert_eq!(p.refcount(a.blocks[1]), 2);
        p.reserve(&mut b, 1).unwrap();
        assert_ne!(a.blocks[1], b.blocks[1], "partial block copied on write");
        assert_eq!(a.blocks[0], b.blocks[0], "full block still shared");
        assert_eq!(
            p.region(0, a.blocks[1]),
            p.region(0, b.blocks[1]),
            "copy carries the data"
        );
        p.free_seq(&mut a);
        p.free_seq(&mut b);
        assert_eq!(p.free_blocks(), 8);
    }

    #[test]
    fn layout_offsets_are_head_major() {
        let l = layout();
        assert_eq!(l.block_floats(), 2 * 2 * 4 * 4);
        assert_eq!(l.k_offset(1), 16);
        assert_eq!(l.v_offset(0), 32);
        assert_eq!(l.v_offset(1), 48);
        assert_eq!(l.token_bytes(), 2 * 2 * 2 * 4 * 4);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Random reserve / fork / append / free sequences: refcounts always
        /// equal the number of holders, no block is both free and held, and
        /// everything returns to the free list at the end.
        #[test]
        fn allocator_never_leaks_or_double_frees(ops in proptest::collection::vec((0u8..4, 0usize..6, 1usize..20), 1..80)) {
            let layout = KvLayout { dtype: KvDtype::F32, n_layers: 1, n_kv_heads: 1, head_dim: 2, block_size: 4 };
            let mut p = KvPool::new(layout, 24);
            let mut seqs: Vec<SeqKv> = Vec::new();
            for (op, pick, n) in ops {
                match op {
                    0 => {
                        let mut s = SeqKv::default();
                        if p.reserve(&mut s, n).is_ok() {
                            s.len = n;
                            seqs.push(s);
                        }
                    }
                    1 if !seqs.is_empty() => {
                        let i = pick % seqs.len();
                        let f = p.fork(&seqs[i]);
                        seqs.push(f);
                    }
                    2 if !seqs.is_empty() => {
                        let i = pick % seqs.len();
                        let mut s = std::mem::take(&mut seqs[i]);
                        if p.reserve(&mut s, n).is_ok() {
                            // Every block written to must be exclusively ours.
                            let bs = layout.block_size;
                            for pos in s.len..s.len + n {
                                prop_assert_eq!(p.refcount(s.blocks[pos / bs]), 1);
                            }
                            s.len += n;
                        }
                        seqs[i] = s;
                    }
                    3 if !seqs.is_empty() => {
                        let i = pick % seqs.len();
                        let mut s = seqs.swap_remove(i);
                        p.free_seq(&mut s);
                    }
                    _ => {}
                }
                // Refcount of each block == number of sequences holding it.
                let mut holders = vec![0u32; p.n_blocks()];
                for s in &seqs {
                    for &b in &s.blocks {
                        holders[b as usize] += 1;
                    }
                }
                for (b, &held) in holders.iter().enumerate() {
                    prop_assert_eq!(p.refcount(b as BlockId), held);
                }
                prop_assert_eq!(p.free_blocks(), holders.iter().filter(|&&h| h == 0).count());
            }
            for mut s in seqs.drain(..) {
                p.free_seq(&mut s);
            }
            prop_assert_eq!(p.free_blocks(), p.n_blocks());
        }
    }
}
