//! The router's client-facing API layer: the OpenAI-compatible HTTP API and
//! the gRPC `tandem.v1.Generate` service, in front of a [`Backend`].
//!
//! This layer owns the chat template, tokenisation, parameter validation,
//! incremental detokenisation and stop strings; it knows nothing of workers.
//!
//! * [`params`]: one validation path turning parsed parameters into
//!   [`crate::dispatch::GenerationInput`]s (HTTP and gRPC share it);
//! * [`choice`]: [`ChoiceDecoder`], detokenisation + stop strings of one choice;
//! * [`openai`]: the axum routes ([`responses`]: OpenAI's Responses API,
//!   [`messages`]: Anthropic's Messages API, both translations of chat);
//!   [`grpc`]: the tonic service; `lora`: vLLM's runtime LoRA endpoints;
//! * [`relay`]: the router's own per-token relay latency.

use std::sync::Arc;

use tandem_model::chat::{ChatMessage, ChatTemplate};
use tandem_model::tokenizer::Tokenizer;

use crate::dispatch::Backend;

pub mod choice;
pub mod error;
pub mod grpc;
mod lora;
pub mod messages;
pub mod openai;
pub mod params;
pub mod relay;
pub mod responses;
mod rewrite;
pub mod tools;

#[cfg(test)]
mod tests;

pub use choice::{ChoiceDecoder, ChoiceDelta, FinishReason, TokenInfo};
pub use error::ApiError;
pub use grpc::{generate_service, GenerateApi};
pub use openai::openai_routes;
pub use params::GenParams;

/// How a chat prompt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEnd {
    /// The assistant's turn opened (`add_generation_prompt`, the default).
    Open,
    /// After the last message, as the template closes it.
    Closed,
    /// Inside the last message, right after its text: the model goes on
    /// with it (an answer the client began).
    ContinueFinal,
}
pub use relay::relay_latency_summary;

/// End-of-turn tokens of common chat formats: when the template writes one
/// and the vocabulary has it, generation stops on it (the tokenizer's
/// `eos_ids` normally holds it already).
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
];

/// Everything the front ends need, shared by every request.
pub struct ApiState {
    pub backend: Arc<dyn Backend>,
    pub tokenizer: Arc<Tokenizer>,
    /// `None` when the model ships no chat template (chat requests get a 400).
    pub chat_template: Option<ChatTemplate>,
    pub served_model_name: String,
    /// Maximum prompt + completion tokens.
    pub context_length: usize,
    /// When set, `/v1` and the gRPC service require `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Ids that end a generation without being emitted.
    pub stop_token_ids: Vec<u32>,
    /// Unix time the state was built (`created` of `/v1/models`).
    pub created: u64,
    /// Whether `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` may
    /// change the served adapters (off unless asked for: see `lora`).
    pub runtime_lora: bool,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("served_model_name", &self.served_model_name)
            .field("context_length", &self.context_length)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("stop_token_ids", &self.stop_token_ids)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl ApiState {
    /// Builds the chat template (with the model's BOS/EOS texts, as `tandem
    /// generate` does) and the stop token ids (`eos_ids` plus the template's
    /// end-of-turn token when the vocabulary knows it).
    pub fn new(
        backend: Arc<dyn Backend>,
        tokenizer: Arc<Tokenizer>,
        served_model_name: String,
        context_length: usize,
        api_key: Option<String>,
    ) -> Result<Self, String> {
        if context_length < 2 {
            return Err(format!("context length {context_length} is too small"));
        }
        if served_model_name.is_empty() {
            return Err("the served model name is empty".into());
        }
        let chat_template = match tokenizer.chat_template() {
            Some(src) => {
                // Same as cli/src/generate.rs: the texts of the BOS/EOS ids.
                let name = |id: Option<u32>| {
                    id.and_then(|i| tokenizer.decode(&[i], false).ok())
                        .unwrap_or_default()
                };
                Some(
                    ChatTemplate::new(
                        src,
                        &name(tokenizer.bos_id()),
                        &name(tokenizer.eos_ids().first().copied()),
                    )
                    .map_err(|e| format!("the model's chat template does not compile: {e}"))?,
                )
            }
            None => None,
        };
        let mut stop_token_ids = tokenizer.eos_ids().to_vec();
        if let Some(src) = tokenizer.chat_template() {
            for name in END_OF_TURN {
                if !src.contains(name) {
                    continue;
                }
                if let Some(id) = tokenizer.token_to_id(name) {
                    if tokenizer.is_special(id) && !stop_token_ids.contains(&id) {
                        stop_token_ids.push(id);
                    }
                }
            }
        }
        let api_key = api_key.filter(|k| !k.is_empty());
        Ok(Self {
            backend,
            tokenizer,
            chat_template,
            served_model_name,
            context_length,
            api_key,
            stop_token_ids,
            created: unix_now(),
            runtime_lora: false,
        })
    }

    /// Renders a conversation with the generation prompt and tokenizes it
    /// exactly as `tandem generate --chat` does (`encode(text, false)`: the
    /// template writes its own special tokens).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        self.chat_prompt_with_tools(messages, None, TurnEnd::Open)
    }

    /// [`ApiState::chat_prompt`] with the request's `tools` for the
    /// template, ending as `end` says.
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        end: TurnEnd,
    ) -> Result<Vec<u32>, ApiError> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "this model has no chat template; use /v1/completions",
                Some("messages"),
            )
        })?;
        let size: usize = messages.iter().map(|m| m.content.len()).sum();
        let mut text = off_the_runtime(size, || {
            t.render_with_tools(messages, tools, end == TurnEnd::Open)
        })
        .map_err(|e| ApiError::invalid(format!("{e}"), Some("messages")))?;
        if end == TurnEnd::ContinueFinal {
            // Cut after the final message's text, as transformers'
            // `continue_final_message` does: whatever closes the turn goes.
            let last = messages.last().map(|m| m.content.trim()).unwrap_or("");
            if last.is_empty() {
                return Err(ApiError::bad_param(
                    "messages",
                    "continuing the final message needs one with text",
                ));
            }
            let at = text.rfind(last).ok_or_else(|| {
                ApiError::bad_param(
                    "messages",
                    "the chat template does not write the final message as given, so it cannot be continued",
                )
            })?;
            text.truncate(at + last.len());
        }
        self.encode(&text, false, "messages")
    }

    /// The request's `tools`, `tool_choice` and `parallel_tool_calls`,
    /// read for the call format of the model's chat template.
    pub(crate) fn request_tools(
        &self,
        m: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<tools::Tools>, ApiError> {
        let format = self
            .chat_template
            .as_ref()
            .and_then(|t| tools::CallFormat::of_template(t.source()));
        tools::parse(m, format)
    }

    /// How a chat prompt ends: how `add_generation_prompt` and
    /// `continue_final_message` (vLLM's, from transformers) ask for it.
    pub fn turn_end(m: &serde_json::Map<String, serde_json::Value>) -> Result<TurnEnd, ApiError> {
        let open = openai::boolean(m, "add_generation_prompt")?;
        let cont = openai::boolean(m, "continue_final_message")?.unwrap_or(false);
        match (cont, open) {
            (true, Some(true)) => Err(ApiError::bad_param(
                "continue_final_message",
                "'continue_final_message' and 'add_generation_prompt' cannot both be true",
            )),
            (true, _) => Ok(TurnEnd::ContinueFinal),
            (false, Some(false)) => Ok(TurnEnd::Closed),
            (false, _) => Ok(TurnEnd::Open),
        }
    }

    /// Tokenizes a raw prompt exactly as `tandem generate --prompt` does
    /// (`encode(text, true)`: BOS when the model asks for it).
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.encode(text, true, "prompt")
    }

    /// Tokenizes a prompt's text. One far beyond the context (a body may
    /// carry 32 MiB, seconds of the router's CPU) is refused from its head
    /// alone: when the first [`PROBE_BYTES_PER_TOKEN`] × context bytes
    /// already make more tokens than the context holds (give or take the
    /// word the cut splits), so does the whole.
    fn encode(&self, text: &str, add_special: bool, param: &str) -> Result<Vec<u32>, ApiError> {
        let tokenize = |t: &str| {
            off_the_runtime(t.len(), || self.tokenizer.encode(t, add_special))
                .map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e}")))
        };
        let ctx = self.context_length;
        let probe = ctx.saturating_mul(PROBE_BYTES_PER_TOKEN);
        if text.len() > probe {
            let mut cut = probe;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let head = tokenize(&text[..cut])?.len();
            if head > ctx + CUT_SLACK_TOKENS {
                return Err(ApiError::invalid(
                    format!(
                        "This model's maximum context length is {ctx} tokens. However, your \
                         prompt has more than {} tokens: its first {cut} of {} bytes alone \
                         make {head}.",
                        head - CUT_SLACK_TOKENS,
                        text.len()
                    ),
                    Some(param),
                )
                .with_code("context_length_exceeded"));
            }
        }
        tokenize(text)
    }

    /// Checks that `name` is the served model or one of its LoRA adapters
    /// (404 `model_not_found` otherwise), and says which adapter: empty
    /// for the base model.
    pub fn check_model(&self, name: &str) -> Result<String, ApiError> {
        if name == self.served_model_name {
            Ok(String::new())
        } else if self.backend.adapters().iter().any(|a| a == name) {
            Ok(name.to_string())
        } else {
            Err(ApiError::model_not_found(name))
        }
    }

    /// The `model` an answer names: the adapter a request ran with, else
    /// the served model.
    pub fn answer_model(&self, adapter: &str) -> String {
        if adapter.is_empty() {
            self.served_model_name.clone()
        } else {
            adapter.to_string()
        }
    }

    /// Constant-time check of a `Bearer` credential against the API key.
    /// Checks an `x-api-key` header (Anthropic's clients send the key so).
    pub fn check_api_key(&self, given: &str) -> Result<(), ApiError> {
        match &self.api_key {
            Some(key) if !ct_eq(given.trim().as_bytes(), key.as_bytes()) => {
                Err(ApiError::unauthorized("Incorrect API key provided."))
            }
            _ => Ok(()),
        }
    }

    pub fn check_bearer(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let Some(value) = authorization else {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer KEY'.",
            ));
        };
        let given = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or("")
            .trim();
        if ct_eq(given.as_bytes(), key.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Incorrect API key provided."))
        }
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random id suffix (24 hex digits).
pub(crate) fn random_id() -> String {
    format!("{:024x}", rand::random::<u128>() >> 32)
}

/// Bytes per context token from which a prompt's head is tokenized first,
/// to refuse it without tokenizing the rest (see [`ApiState::encode`]).
/// Well above a tokenizer's usual average (3 to 5 bytes a token), so a
/// prompt that fits is rarely probed, and then costs its head twice.
const PROBE_BYTES_PER_TOKEN: usize = 16;

/// Tokens by which a text cut short may tokenize longer than its part of
/// the whole (the cut word in pieces).
const CUT_SLACK_TOKENS: usize = 64;

/// Texts from this many bytes up are rendered and tokenized off the async
/// workers.
const BLOCKING_TEXT_BYTES: usize = 64 << 10;

/// Runs `f`, which works through `bytes` of text, where it cannot hold up
/// other requests: a prompt of megabytes takes seconds to tokenize, and
/// on the router's few async workers that would stall every other request
/// and the health checks with it. Small texts run in place (handing the
/// worker over costs more than they take).
fn off_the_runtime<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h)
            if bytes >= BLOCKING_TEXT_BYTES && h.runtime_flavor() == RuntimeFlavor::MultiThread =>
        {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The CORS layer that lets browsers call the API from `origins` (`*`:
/// from anywhere; else exact origins such as `https://app.example.com`).
/// `None` without origins: browsers may then call it only from its own.
/// A preflight is answered before the API key is checked, as browsers send
/// none with it; the request that follows still needs the key.
pub fn cors(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, String> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    let origins: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| {
                let ok = (o.starts_with("http://") || o.starts_with("https://"))
                    && !o
                        .trim_end_matches('/')
                        .contains(|c: char| c.is_whitespace());
                let value = axum::http::HeaderValue::from_str(o.trim_end_matches('/'));
                match value {
                    Ok(v) if ok => Ok(v),
                    _ => Err(format!(
                        "CORS origin {o:?} is not an origin (scheme://host[:port], or *)"
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(Any)
            .allow_headers(Any)
            .max_age(std::time::Duration::from_secs(600)),
    ))
}
