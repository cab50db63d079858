//! The seam between scheduling and computing: what the scheduler and the
//! workers need from a model executor. The CPU [`Model`](crate::model::Model)
//! implements it; a CUDA executor (device weights, device KV) will implement
//! the same contract, so nothing above this trait changes.

use tandem_model::config::ModelConfig;
use tandem_model::lora::LoraAdapter;

use crate::error::{EngineError, Result};
use crate::kv::{BlockId, KvLayout, KvPool, KvStaging, SeqKv};
use crate::model::{LayerKv, SeqStep};

pub trait Executor: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// Block layout of this executor's KV cache.
    fn kv_layout(&self, block_size: usize) -> KvLayout;

    /// Bytes one block of `block_size` tokens takes where this executor
    /// keeps its KV (what a KV memory budget is divided by): the layout's
    /// by default; less on a device that holds KV in a narrower type than
    /// the layout it exchanges.
    fn kv_block_bytes(&self, block_size: usize) -> usize {
        self.kv_layout(block_size).block_bytes()
    }

    /// One step over a batch (see `Model::forward_observed` for the contract:
    /// bit-identical per sequence whatever the batch; `on_layer` sees each
    /// layer's new KV as soon as it is written).
    fn forward_observed(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        on_layer: &mut dyn FnMut(LayerKv<'_>),
    ) -> Result<Vec<Vec<f32>>>;

    /// The layout KV travels in between workers: the whole model's, even
    /// where this executor's pool holds only a shard of each block.
    fn wire_layout(&self, block_size: usize) -> KvLayout {
        self.kv_layout(block_size)
    }

    /// Whether KV from a peer may be received straight into the pool's
    /// blocks (`KvPool::transfer_writer`), with nothing left for
    /// [`Executor::install`] to do. True where the pool holds the whole
    /// KV in the wire layout, as the default `install` assumes; an
    /// executor that overrides `install` (device memory, shards on other
    /// ranks) returns false and gets a staging buffer instead.
    fn receives_in_pool(&self) -> bool {
        true
    }

    /// Writes KV received in [`Executor::wire_layout`] into `kv`'s blocks
    /// (on every rank of a sharded worker).
    fn install(&self, pool: &mut KvPool, kv: &SeqKv, staging: &KvStaging) -> Result<()> {
        for layer in 0..pool.layout().n_layers {
            for (bi, &b) in kv.blocks.iter().enumerate() {
                pool.region_mut(layer, b)
                    .copy_from_slice(staging.region(layer, bi));
            }
        }
        Ok(())
    }

    /// The whole-model KV of `blocks` (in [`Executor::wire_layout`]), when
    /// `pool` holds only this rank's shard of it; `None` when `pool` holds
    /// it all and can be read directly.
    fn gather(&self, _pool: &KvPool, _blocks: &[BlockId]) -> Result<Option<KvStaging>> {
        Ok(None)
    }

    /// Called once on the pool the scheduler will use with this executor
    /// (a sharded executor asks it to record copy-on-write copies, which
    /// its other ranks repeat).
    fn prepare_pool(&self, _pool: &mut KvPool) {}

    /// A pool of `n_blocks` blocks of `block_size` tokens, prepared for
    /// this executor. By default the pool holds the KV in host memory
    /// (written up front, see `KvPool::new`); an executor that keeps the KV
    /// itself (device memory) returns a pool that only allocates blocks.
    fn new_pool(&self, block_size: usize, n_blocks: usize) -> KvPool {
        let mut pool = KvPool::new(self.kv_layout(block_size), n_blocks);
        self.prepare_pool(&mut pool);
        pool
    }

    /// A pool of its own big enough for `tokens` tokens in blocks of
    /// `block_size` (one request run alone, benchmarks; the scheduler
    /// shares one pool among many).
    fn pool_for_tokens(&self, tokens: usize, block_size: usize) -> KvPool {
        let blocks = self.kv_layout(block_size).blocks_for(tokens).max(1);
        self.new_pool(block_size, blocks)
    }

    fn forward(&self, pool: &mut KvPool, batch: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>> {
        self.forward_observed(pool, batch, &mut |_: LayerKv<'_>| {})
    }

    /// Prepares, once before serving from `pool`, what the first steps
    /// would otherwise pay for: a device executor captures its decode-step
    /// graphs for batches of up to `max_batch` sequences. Nothing by
    /// default. Writes nothing a sequence reads.
    fn warm_up(&self, _pool: &mut KvPool, _max_batch: usize) -> Result<()> {
        Ok(())
    }

    /// Tokens routed to each expert of a mixture-of-experts model, summed
    /// over the layers this process computes; empty by default.
    fn expert_tokens(&self) -> Vec<u64> {
        Vec::new()
    }

    /// The LoRA adapters this executor holds, by number
    /// ([`crate::kv::SeqKv::adapter`] names them). None by default.
    fn adapters(&self) -> Vec<AdapterInfo> {
        Vec::new()
    }

    /// Starts holding `lora` under `name` and returns its number: never
    /// one given before, so a number a request carries cannot come to mean
    /// another adapter. Executors that serve no adapters refuse.
    fn add_adapter(&self, name: &str, _lora: LoraAdapter) -> Result<u32> {
        Err(EngineError::Unsupported(format!(
            "LoRA adapter {name:?}: this executor serves no adapters (sharded and CUDA workers serve none)"
        )))
    }

    /// Frees adapter `id`'s weights. The caller makes sure that no
    /// sequence runs with it any more (a step naming it is refused).
    fn remove_adapter(&self, id: u32) -> Result<()> {
        Err(EngineError::Unsupported(format!(
            "LoRA adapter {id}: this executor serves no adapters"
        )))
    }
}

/// One LoRA adapter an executor holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    /// What [`crate::kv::SeqKv::adapter`] calls it (1 and up).
    pub id: u32,
    /// What requests call it.
    pub name: String,
    /// sha256 of its files: a prefill and a decode worker that pair must
    /// hold the same.
    pub fingerprint: String,
}

impl Executor for crate::model::Model {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn kv_layout(&self, block_size: usize) -> KvLayout {
        crate::model::Model::kv_layout(self, block_size)
    }
    fn forward_observed(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        on_layer: &mut dyn FnMut(LayerKv<'_>),
    ) -> Result<Vec<Vec<f32>>> {
        crate::model::Model::forward_observed(self, pool, batch, on_layer)
    }
    fn adapters(&self) -> Vec<AdapterInfo> {
        crate::model::Model::adapters(self)
    }
    fn expert_tokens(&self) -> Vec<u64> {
        crate::model::Model::expert_tokens(self)
    }
    fn add_adapter(&self, name: &str, lora: LoraAdapter) -> Result<u32> {
        crate::model::Model::add_adapter(self, name, lora)
    }
    fn remove_adapter(&self, id: u32) -> Result<()> {
        crate::model::Model::remove_adapter(self, id)
    }
}
