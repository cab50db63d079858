//! How the model runs: CPU kernels, the transformer forward pass, the KV
//! cache and the sampler. Token ids in, token ids (and logits) out.

pub mod comm;
#[cfg(feature = "cuda")]
pub mod comm_nccl;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod executor;
pub mod generate;
pub mod guided;
pub mod kv;
pub mod model;
pub mod ops;
pub mod prefix_cache;
pub mod sampler;
pub mod scheduler;
pub mod shard;
pub mod speculative;

pub use error::EngineError;
