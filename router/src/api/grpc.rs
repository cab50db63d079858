//! The gRPC `tandem.v1.Generate` service (unary and server-streaming), with
//! the same validation, tokenisation and detokenisation as the HTTP API.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{Stream, StreamExt};
use tandem_model::chat::ChatMessage;
use tandem_proto::generate::{
    FinishReason as PbFinish, Generate, GenerateRequest, GenerateResponse, GenerateServer,
    GenerateStreamResponse, Input, PromptTokenLogprob, TokenLogprob, Usage,
};
use tonic::{Request, Response, Status};

use super::choice::{choice_stream, ChoiceDecoder, ChoiceOut, ChoiceStream};
use super::openai::{start_all, Ttft};
use super::params::{GenParams, Prepared};
use super::relay::record_relay;
use super::{random_id, ApiError, ApiState, FinishReason};
use crate::dispatch::SampledToken;

/// The `tandem.v1.Generate` implementation.
#[derive(Debug, Clone)]
pub struct GenerateApi {
    state: Arc<ApiState>,
}

impl GenerateApi {
    pub fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }
}

/// The tonic service to add to the node's gRPC server. Requests may be as
/// large as the HTTP API's bodies (tonic's own default is 4 MiB), so a
/// prompt that fits one API fits the other.
pub fn generate_service(state: Arc<ApiState>) -> GenerateServer<GenerateApi> {
    GenerateServer::new(GenerateApi::new(state))
        .max_decoding_message_size(super::openai::MAX_BODY_BYTES)
}

fn pb_finish(f: Option<FinishReason>) -> i32 {
    match f {
        Some(FinishReason::Stop) => PbFinish::Stop as i32,
        Some(FinishReason::Length) => PbFinish::Length as i32,
        None => PbFinish::Unspecified as i32,
    }
}

fn count(endpoint: &'static str, code: tonic::Code) {
    metrics::counter!(
        tandem_cluster::metrics::REQUESTS,
        "endpoint" => endpoint,
        "status" => format!("grpc_{}", code as i32)
    )
    .increment(1);
}

/// Counts one call in `tandem_requests_total` under the status it ended
/// with: the first error sent, OK once the finish went out, and CANCELLED
/// when the client went away before either (the call's future or stream is
/// dropped then, so counting happens on drop).
struct CallCount {
    endpoint: &'static str,
    code: Option<tonic::Code>,
}

impl CallCount {
    fn new(endpoint: &'static str) -> Self {
        Self {
            endpoint,
            code: None,
        }
    }

    /// Records how the call ended; the first word stands.
    fn ended(&mut self, code: tonic::Code) {
        self.code.get_or_insert(code);
    }
}

impl Drop for CallCount {
    fn drop(&mut self) {
        count(self.endpoint, self.code.unwrap_or(tonic::Code::Cancelled));
    }
}

struct Started {
    request_id: String,
    /// The prompt's token ids (its scores name them).
    prompt: Vec<u32>,
    prepared: Prepared,
    choice: ChoiceStream,
    start: Instant,
}

impl GenerateApi {
    fn check_auth<T>(&self, req: &Request<T>) -> Result<(), ApiError> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.state.check_bearer(auth)
    }

    /// Validates, tokenizes and admits the request.
    async fn start(&self, req: Request<GenerateRequest>) -> Result<Started, ApiError> {
        self.check_auth(&req)?;
        let req = req.into_inner();
        let state = &self.state;
        let adapter = if req.model.is_empty() {
            String::new()
        } else {
            state.check_model(&req.model)?
        };
        let (prompt, prompt_param) = match req.input {
            None => {
                return Err(ApiError::invalid(
                    "the request has no input (text, token_ids or messages)",
                    Some("input"),
                ))
            }
            Some(Input::Text(t)) => (state.text_prompt(&t)?, "text"),
            Some(Input::TokenIds(ids)) => (ids.ids, "token_ids"),
            Some(Input::Messages(m)) => {
                if m.messages.is_empty() {
                    return Err(ApiError::bad_param(
                        "messages",
                        "'messages' must contain at least one message",
                    ));
                }
                let mut msgs = Vec::with_capacity(m.messages.len());
                for (i, msg) in m.messages.into_iter().enumerate() {
                    let role = match msg.role.as_str() {
                        "system" | "user" | "assistant" => msg.role,
                        "developer" => "system".to_string(),
                        other => {
                            return Err(ApiError::bad_param(
                                &format!("messages[{i}].role"),
                                format!("role must be one of system, developer, user, assistant; got '{other}'"),
                            ))
                        }
                    };
                    msgs.push(ChatMessage::new(role, msg.content));
                }
                (state.chat_prompt(&msgs)?, "messages")
            }
        };
        let s = req.sampling.unwrap_or_default();
        if s.logprobs > 20 {
            return Err(ApiError::bad_param(
                "logprobs",
                format!(
                    "at most 20 top log-probabilities are supported, got {}",
                    s.logprobs
                ),
            ));
        }
        let params = GenParams {
            max_tokens: s.max_tokens.map(i64::from),
            max_tokens_param: "max_tokens",
            // Absent: the rest of the context.
            default_max_tokens: None,
            stop_in_output: false,
            temperature: s.temperature.map(f64::from),
            top_p: s.top_p.map(f64::from),
            top_k: s.top_k.map(i64::from),
            min_p: s.min_p.map(f64::from),
            repetition_penalty: s.repetition_penalty.map(f64::from),
            presence_penalty: s.presence_penalty.map(f64::from),
            frequency_penalty: s.frequency_penalty.map(f64::from),
            seed: s.seed,
            stop: s.stop,
            stop_token_ids: s.stop_token_ids,
            n: None,
            logprobs: (s.logprobs > 0).then_some(s.logprobs),
            ignore_eos: s.ignore_eos,
            min_tokens: s.min_tokens.map(i64::from),
            logit_bias: s
                .logit_bias
                .iter()
                .map(|b| (b.token_id, f64::from(b.bias)))
                .collect(),
            json_object: s.json_object,
            json_schema: (!s.json_schema.is_empty()).then_some(s.json_schema),
            regex: (!s.regex.is_empty()).then_some(s.regex),
            choice: s.choice,
            prompt_logprobs: s.prompt_logprobs,
            echo: false,
            adapter,
        };
        let request_id = if req.request_id.is_empty() {
            format!("gen-{}", random_id())
        } else {
            req.request_id
        };
        let start = Instant::now();
        let prepared = params.build(state, prompt.clone(), &request_id, prompt_param)?;
        metrics::counter!(tandem_cluster::metrics::PROMPT_TOKENS, "endpoint" => "grpc")
            .increment(prepared.prompt_tokens as u64);
        let mut streams = start_all(state, &prepared).await?;
        let ts = streams
            .pop()
            .ok_or_else(|| ApiError::internal("no generation started"))?;
        let choice = choice_stream(
            0,
            ts,
            ChoiceDecoder::new(state.tokenizer.clone(), &prepared.stop)
                .with_min_tokens(prepared.min_tokens)
                .score_only(prepared.score_only),
        );
        Ok(Started {
            request_id,
            prompt,
            prepared,
            choice,
            start,
        })
    }
}

/// A prompt's scores on the wire: one entry per prompt token, the first
/// unscored.
fn prompt_scores(prompt: &[u32], scores: &[SampledToken]) -> Vec<PromptTokenLogprob> {
    prompt
        .iter()
        .enumerate()
        .map(|(i, &token_id)| {
            let s = i.checked_sub(1).and_then(|j| scores.get(j));
            PromptTokenLogprob {
                token_id,
                logprob: s.map(|s| s.logprob),
                rank: s.and_then(|s| s.rank),
                top: s
                    .map(|s| {
                        s.top
                            .iter()
                            .map(|&(token_id, logprob)| TokenLogprob { token_id, logprob })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

fn usage(prompt: usize, completion: u32) -> Usage {
    Usage {
        prompt_tokens: prompt as u32,
        completion_tokens: completion,
        total_tokens: prompt as u32 + completion,
    }
}

pub type GenerateStreamBody =
    Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Generate for GenerateApi {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let mut calls = CallCount::new("grpc_generate");
        let result = async {
            let mut st = self.start(request).await?;
            let ttft = Ttft::new(st.start, "grpc");
            let mut text = String::new();
            let mut ids = Vec::new();
            let mut finish = None;
            let mut completion = 0;
            let mut scored = Vec::new();
            while let Some((_, out)) = st.choice.next().await {
                match out {
                    ChoiceOut::Error(e) => return Err(ApiError::from(e)),
                    ChoiceOut::Delta(d) => {
                        ttft.mark();
                        metrics::counter!(tandem_cluster::metrics::GENERATED_TOKENS, "endpoint" => "grpc")
                            .increment(d.tokens.len() as u64);
                        if let Some(lp) = &d.prompt_logprobs {
                            scored = prompt_scores(&st.prompt, lp);
                        }
                        text.push_str(&d.text);
                        ids.extend(d.tokens.iter().map(|t| t.id));
                        if d.finish.is_some() {
                            finish = d.finish;
                            completion = d.completion_tokens;
                        }
                    }
                }
            }
            metrics::histogram!(tandem_cluster::metrics::REQUEST_DURATION, "endpoint" => "grpc")
                .record(st.start.elapsed().as_secs_f64());
            Ok(GenerateResponse {
                request_id: st.request_id,
                text,
                token_ids: ids,
                finish_reason: pb_finish(finish),
                usage: Some(usage(st.prepared.prompt_tokens, completion)),
                prompt_logprobs: scored,
            })
        }
        .await;
        match result {
            Ok(r) => {
                calls.ended(tonic::Code::Ok);
                Ok(Response::new(r))
            }
            Err(e) => {
                let s = e.to_status();
                calls.ended(s.code());
                Err(s)
            }
        }
    }

    type GenerateStreamStream = GenerateStreamBody;

    /// One message per token (text completed by it, its id, and with
    /// `logprobs = k`: the sampled token's log-probability first, then the
    /// top `k` alternatives); the last message carries the finish reason
    /// and usage. Dropping the stream cancels the generation.
    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let mut calls = CallCount::new("grpc_generate_stream");
        let st = match self.start(request).await {
            Ok(st) => st,
            Err(e) => {
                let s = e.to_status();
                calls.ended(s.code());
                return Err(s);
            }
        };
        let ttft = Ttft::new(st.start, "grpc");
        let start = st.start;
        let prompt_tokens = st.prepared.prompt_tokens;
        let want_lp = st.prepared.logprobs.is_some();
        let request_id = st.request_id;
        let prompt = st.prompt;
        let stream = st.choice.map(move |(_, out)| match out {
            ChoiceOut::Error(e) => {
                let status = ApiError::from(e).to_status();
                calls.ended(status.code());
                Err(status)
            }
            ChoiceOut::Delta(d) => {
                ttft.mark();
                metrics::counter!(tandem_cluster::metrics::GENERATED_TOKENS, "endpoint" => "grpc")
                    .increment(d.tokens.len() as u64);
                let logprobs = if want_lp {
                    d.tokens
                        .iter()
                        .flat_map(|t| {
                            std::iter::once(TokenLogprob {
                                token_id: t.id,
                                logprob: t.logprob,
                            })
                            .chain(t.top.iter().map(|&(id, lp)| {
                                TokenLogprob {
                                    token_id: id,
                                    logprob: lp,
                                }
                            }))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let msg = GenerateStreamResponse {
                    request_id: request_id.clone(),
                    text: d.text,
                    token_ids: d.tokens.iter().map(|t| t.id).collect(),
                    logprobs,
                    finish_reason: pb_finish(d.finish),
                    usage: d.finish.map(|_| usage(prompt_tokens, d.completion_tokens)),
                    prompt_logprobs: d
                        .prompt_logprobs
                        .as_deref()
                        .map(|lp| prompt_scores(&prompt, lp))
                        .unwrap_or_default(),
                };
                record_relay(d.received);
                if d.finish.is_some() {
                    calls.ended(tonic::Code::Ok);
                    metrics::histogram!(tandem_cluster::metrics::REQUEST_DURATION, "endpoint" => "grpc")
                        .record(start.elapsed().as_secs_f64());
                }
                Ok(msg)
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
