//! Engine errors.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
    #[error("prompt of {prompt} tokens plus {requested} new tokens exceeds the context length {context}")]
    ContextOverflow {
        prompt: usize,
        requested: usize,
        context: usize,
    },
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    #[error("request needs {tokens} tokens of KV cache but the whole pool holds {capacity}")]
    TooLargeForPool { tokens: usize, capacity: usize },
    #[error("KV cache exhausted: {needed} blocks needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A LoRA adapter could not be loaded or unloaded (the message says
    /// which and why).
    #[error("{0}")]
    Adapter(String),
    /// A rank of a sharded worker failed or vanished: the worker is down.
    /// (Not a `source`: the message already carries it.)
    #[error("sharded worker: {0}")]
    Comm(crate::comm::CommError),
    #[error("sharded worker: {0}")]
    Shard(String),
    /// The CUDA backend failed: a library that does not load, a device
    /// call, a kernel that does not compile (the message says which).
    #[error("CUDA: {0}")]
    Cuda(String),
}

impl From<crate::comm::CommError> for EngineError {
    fn from(e: crate::comm::CommError) -> Self {
        EngineError::Comm(e)
    }
}

impl EngineError {
    /// Low-cardinality class for metrics and API error types.
    pub fn class(&self) -> &'static str {
        match self {
            EngineError::Model(_) => "model",
            EngineError::ContextOverflow { .. }
            | EngineError::EmptyPrompt
            | EngineError::BadToken { .. } => "invalid_request",
            EngineError::Sampling(_) => "invalid_request",
            EngineError::Unsupported(_) => "unsupported",
            EngineError::Adapter(_) => "invalid_request",
            EngineError::OutOfBlocks { .. } => "overloaded",
            EngineError::TooLargeForPool { .. } => "invalid_request",
            EngineError::Comm(_) | EngineError::Shard(_) | EngineError::Cuda(_) => "unavailable",
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
