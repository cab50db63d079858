//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading a model. Each variant names
/// the file or tensor involved so the message is actionable on its own.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // The OS error is in the message and not also the error's source (a
    // field named `source` would be one), so a chain printed whole (`{:#}`)
    // says it once.
    #[error("cannot open model file {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not a valid GGUF file: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    #[error("{path}: truncated: {reason}")]
    Truncated { path: PathBuf, reason: String },
    #[error("unsupported tensor type {0} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)")]
    UnsupportedType(String),
    #[error("unsupported architecture '{0}' (supported: llama, mistral, qwen2, qwen3)")]
    UnsupportedArchitecture(String),
    #[error("missing metadata key '{0}'")]
    MissingMetadata(String),
    #[error("metadata key '{key}' has the wrong type: expected {expected}")]
    MetadataType { key: String, expected: &'static str },
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("safetensors {path}: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
