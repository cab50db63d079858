//! How the model runs: CPU kernels, the transformer forward pass, the KV
//! cache and the sampler. Token ids in, token ids (and logits) out.

pub mod cpu;
pub mod error;
pub mod generate;
pub mod model;
pub mod ops;
pub mod sampler;

pub use error::EngineError;
