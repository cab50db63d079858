//! The seam between scheduling and computing: what the scheduler and the
//! workers need from a model executor. The CPU [`Model`](crate::model::Model)
//! implements it; a CUDA executor (device weights, device KV) will implement
//! the same contract, so nothing above this trait changes.

use tandem_model::config::ModelConfig;

use crate::error::Result;
use crate::kv::{KvLayout, KvPool};
use crate::model::{LayerKv, SeqStep};

pub trait Executor: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// Block layout of this executor's KV cache.
    fn kv_layout(&self, block_size: usize) -> KvLayout;

    /// One step over a batch (see `Model::forward_observed` for the contract:
    /// bit-identical per sequence whatever the batch; `on_layer` sees each
    /// layer's new KV as soon as it is written).
    fn forward_observed(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        on_layer: &mut dyn FnMut(LayerKv<'_>),
    ) -> Result<Vec<Vec<f32>>>;

    fn forward(&self, pool: &mut KvPool, batch: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>> {
        self.forward_observed(pool, batch, &mut |_: LayerKv<'_>| {})
    }
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
}
