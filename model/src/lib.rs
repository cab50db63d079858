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
pub mod quant;
pub mod safetensors_dir;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use error::ModelError;
