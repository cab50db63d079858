//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or built from
//! the vocabulary embedded in a GGUF file (GPT-2 byte-level BPE and
//! SentencePiece/llama kinds).
//!
//! (IMPLEMENTATION IN PROGRESS: API fixed, bodies being filled in.)

use std::path::Path;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let _ = file;
        Err(ModelError::Tokenizer("not yet implemented".into()))
    }
    /// Loads `tokenizer.json` (+ `tokenizer_config.json` for BOS/EOS and the chat template).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let _ = dir;
        Err(ModelError::Tokenizer("not yet implemented".into()))
    }
    /// Encodes text; `add_special` adds BOS when the model asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let _ = (text, add_special, &self.inner, self.add_bos);
        Err(ModelError::Tokenizer("not yet implemented".into()))
    }
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let _ = (ids, skip_special);
        Err(ModelError::Tokenizer("not yet implemented".into()))
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    /// Token ids that end generation (EOS, and `<|im_end|>`-style end-of-turn tokens).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    /// The whole vocabulary sorted by id (the fingerprint hashes it).
    pub fn vocab_sorted(&self) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = self.inner.get_vocab(true).into_iter().map(|(s, i)| (i, s)).collect();
        v.sort();
        v
    }
    /// The chat template shipped with the model, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}
