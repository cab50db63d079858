//! Chat templates (Jinja, as Hugging Face writes them) rendered with minijinja.
//!
//! (IMPLEMENTATION IN PROGRESS: API fixed, bodies being filled in.)

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    source: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let _ = (bos_token, eos_token);
        Ok(Self { source: source.to_string() })
    }
    /// Renders the conversation; `add_generation_prompt` appends the assistant header.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let _ = (messages, add_generation_prompt, &self.source);
        Err(ModelError::ChatTemplate("not yet implemented".into()))
    }
}
