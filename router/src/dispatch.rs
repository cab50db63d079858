//! The seam between the API front ends (OpenAI HTTP, gRPC Generate) and the
//! cluster: a validated, tokenized request goes in, a stream of sampled
//! tokens comes out. The front ends own templates, tokenisation,
//! detokenisation and stop strings; the backend owns worker choice,
//! disaggregation and KV placement.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;

/// Sampling as the workers see it: every field explicit.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
    /// Distinguishes requests (and the choices of one request) that share a seed.
    pub request_key: u64,
    pub logprobs: bool,
    pub top_logprobs: u32,
    /// Output positions below this cannot sample `min_tokens_masked`.
    pub min_tokens: u32,
    /// The stop token ids, masked before `min_tokens`.
    pub min_tokens_masked: Vec<u32>,
    /// `(token id, bias)`, ids ascending and distinct.
    pub logit_bias: Vec<(u32, f32)>,
    /// JSON mode: the output is held to a JSON object.
    pub json_object: bool,
    /// The output is held to JSON valid against this schema (JSON text).
    pub json_schema: Option<String>,
    /// The output is text matching this regular expression, whole.
    pub regex: Option<String>,
    /// The output is exactly one of these strings (none: no such constraint).
    pub choice: Vec<String>,
    /// Score the prompt, with this many top alternatives per position: the
    /// stream opens with [`TokenEvent::PromptLogprobs`].
    pub prompt_logprobs: Option<u32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            request_key: 0,
            logprobs: false,
            top_logprobs: 0,
            min_tokens: 0,
            min_tokens_masked: Vec::new(),
            logit_bias: Vec::new(),
            json_object: false,
            json_schema: None,
            regex: None,
            choice: Vec::new(),
            prompt_logprobs: None,
        }
    }
}

/// One generation (one choice) to run.
#[derive(Debug, Clone)]
pub struct GenerationInput {
    /// For logs and worker-side cancellation; unique per choice.
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    /// `None`: until the context is full.
    pub max_tokens: Option<u32>,
    /// End the generation without being emitted (EOS and friends).
    pub stop_token_ids: Vec<u32>,
    /// The LoRA adapter to run with, by name; empty: the base model.
    pub adapter: String,
    /// Time the front end spent on the request before handing it over,
    /// tokenisation excluded: the dispatcher adds its own share and records
    /// the router's accept-to-dispatch latency.
    pub frontend_time: std::time::Duration,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (stop strings are the front end's business).
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first; empty unless asked for.
    pub top: Vec<(u32, f32)>,
    /// The token's 1-based rank in the distribution, where the worker
    /// computed it (a prompt's scores).
    pub rank: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// The prompt's log-probabilities ([`Sampling::prompt_logprobs`]): one
    /// per prompt token after the first, before the first token.
    PromptLogprobs(Vec<SampledToken>),
    Token(SampledToken),
    Finished {
        reason: Finish,
        prompt_tokens: u32,
        completion_tokens: u32,
        cached_tokens: u32,
        /// The stop token that ended it (not sent as a token), if one did.
        stop_token: Option<u32>,
    },
    /// The generation failed after it started; nothing follows.
    Error(DispatchError),
}

impl TokenEvent {
    /// Whether nothing follows this event on its stream.
    pub fn ends_stream(&self) -> bool {
        matches!(self, TokenEvent::Finished { .. } | TokenEvent::Error(_))
    }
}

/// Failures the front ends turn into status codes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    /// The request can never run (a worker refused it as invalid): 400.
    #[error("{0}")]
    Invalid(String),
    /// No worker can take it now (queues full, no workers up): 503 + Retry-After.
    #[error("{0}")]
    Unavailable(String),
    /// A worker failed mid-request: 500 (or an error event when streaming).
    #[error("{0}")]
    Internal(String),
}

/// Tokens of one generation. Dropping it cancels the generation on the
/// workers and frees its KV blocks.
pub struct TokenStream {
    pub events: mpsc::Receiver<TokenEvent>,
    /// Cancels the generation when dropped.
    pub cancel_on_drop: tokio_util::sync::DropGuard,
    /// Records the generation's phases and inter-token latency as
    /// [`TokenStream::next`] hands out its events.
    timer: Option<tandem_cluster::metrics::RequestTimer>,
}

impl TokenStream {
    pub fn new(
        events: mpsc::Receiver<TokenEvent>,
        cancel_on_drop: tokio_util::sync::DropGuard,
    ) -> Self {
        Self {
            events,
            cancel_on_drop,
            timer: None,
        }
    }

    /// Times the generation with `timer` (already marked admitted).
    pub fn timed(mut self, timer: tandem_cluster::metrics::RequestTimer) -> Self {
        self.timer = Some(timer);
        self
    }

    pub async fn next(&mut self) -> Option<TokenEvent> {
        let ev = self.events.recv().await;
        if let Some(t) = self.timer.as_mut() {
            match &ev {
                Some(TokenEvent::Token(_)) => {
                    t.token();
                }
                Some(TokenEvent::Finished { .. }) => {
                    t.finished();
                }
                _ => {}
            }
        }
        ev
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What runs generations: the cluster dispatcher in production.
pub trait Backend: Send + Sync + 'static {
    /// Admits one generation. Errors here mean nothing was started.
    fn generate(&self, input: GenerationInput)
        -> BoxFuture<'_, Result<TokenStream, DispatchError>>;

    /// Admits the choices of one request (`inputs[i]` is choice `i`), all or
    /// nothing: on an error the ones already admitted are dropped, which
    /// cancels them. This default runs each choice as a generation of its
    /// own; a backend that can share the prompt among the choices (parallel
    /// sampling) overrides it, with the same tokens per choice.
    fn generate_choices(
        &self,
        inputs: Vec<GenerationInput>,
    ) -> BoxFuture<'_, Result<Vec<TokenStream>, DispatchError>> {
        Box::pin(futures_util::future::try_join_all(
            inputs.into_iter().map(|input| self.generate(input)),
        ))
    }

    /// The LoRA adapters requests may name (as their `model`), sorted.
    /// None by default.
    fn adapters(&self) -> Vec<String> {
        Vec::new()
    }

    /// Loads the LoRA adapter in directory `path` (on the workers'
    /// machines) under `name`, everywhere or nowhere. Refused by default.
    fn load_adapter(&self, name: String, _path: String) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move {
            Err(AdapterError::Invalid(format!(
                "LoRA adapter {name:?}: this backend cannot load adapters"
            )))
        })
    }

    /// Stops serving the LoRA adapter `name` everywhere (requests running
    /// with it finish). Refused by default.
    fn unload_adapter(&self, name: String) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move {
            Err(AdapterError::NotFound(format!(
                "LoRA adapter {name:?} is not loaded"
            )))
        })
    }
}

/// Why a LoRA adapter was not loaded or unloaded. Nothing changed either
/// way: a load that some worker refused is undone on the others.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The files do not fit the model, the name is taken, …: 400.
    #[error("{0}")]
    Invalid(String),
    /// No worker serves an adapter of that name: 404.
    #[error("{0}")]
    NotFound(String),
    /// No worker to change, or one did not answer: 503.
    #[error("{0}")]
    Unavailable(String),
}
