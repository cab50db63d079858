//! The OpenAI-compatible HTTP API: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{model}`
//! (and `POST /v1/responses` and `POST /v1/messages`, translated to chat
//! in [`super::responses`] and [`super::messages`]).
//!
//! Request bodies are parsed by hand (not with axum's `Json`) so every bad
//! input becomes a 400 in OpenAI's error shape naming the offending `param`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use futures_util::stream::SelectAll;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tandem_model::chat::ChatMessage;
use tandem_model::tokenizer::Tokenizer;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use super::choice::{choice_stream, ChoiceDecoder, ChoiceOut, ChoiceStream, TokenInfo};
use super::params::{GenParams, Prepared};
use super::relay::record_relay;
use super::tools::{CallPiece, ToolChoice};
use super::{random_id, unix_now, ApiError, ApiState, FinishReason};
use crate::dispatch::{DispatchError, SampledToken, TokenStream};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// Longest a client may leave its request body idle: one that sends its
/// headers and then stalls would otherwise hold its connection and a task
/// for ever (nginx's `client_body_timeout` is 60 s).
pub const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The `/v1` routes (guarded by the API key when one is set). Merge them into
/// the node's router; they install no global fallback.
pub fn openai_routes(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*model}", get(get_model))
        .route("/v1/responses", post(super::responses::create))
        .route("/v1/messages", post(super::messages::create))
        .route(
            "/v1/messages/count_tokens",
            post(super::messages::count_tokens),
        )
        .route("/v1/load_lora_adapter", post(super::lora::load))
        .route("/v1/unload_lora_adapter", post(super::lora::unload))
        .route("/v1/{*rest}", any(unknown_route))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(refuse_unreadable_bodies))
        .layer(middleware::map_request(body_idle_timeout))
        .with_state(state)
}

/// Refuses, before reading any of it, a body that cannot be taken: one
/// whose `content-length` already exceeds [`MAX_BODY_BYTES`] (413 at once:
/// the body limit alone would only see it while reading, after the client
/// had sent it all, or never, for a client that waits for an answer
/// first), and a compressed one (415: the JSON parser would only call it
/// malformed).
async fn refuse_unreadable_bodies(req: Request, next: Next) -> Response {
    let h = req.headers();
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let encoding = h
        .get(header::CONTENT_ENCODING)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|e| !e.is_empty() && e != "identity");
    let mut e = match (declared, encoding) {
        (Some(n), _) if n > MAX_BODY_BYTES as u64 => ApiError::invalid(
            format!("the request body is {n} bytes; at most {MAX_BODY_BYTES} are accepted"),
            None,
        ),
        (_, Some(enc)) => ApiError::invalid(
            format!("content-encoding '{enc}' is not supported: send the body uncompressed"),
            None,
        ),
        _ => return next.run(req).await,
    };
    e.status = if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    };
    let endpoint = endpoint_of(req.uri().path());
    count_request(endpoint, e.status);
    if is_anthropic(endpoint) {
        return super::messages::error_response(&e);
    }
    e.into_response()
}

/// Fails the request body (the request is answered 400 and the connection
/// closed) once the client sends nothing for [`BODY_IDLE_TIMEOUT`].
async fn body_idle_timeout(req: Request) -> Request {
    req.map(|b| Body::new(TimeoutBody::new(BODY_IDLE_TIMEOUT, b)))
}

async fn require_api_key(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let auth = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let x_api_key = h.get("x-api-key").and_then(|v| v.to_str().ok());
    let checked = match (auth, x_api_key) {
        (None, Some(key)) => state.check_api_key(key),
        (auth, _) => state.check_bearer(auth),
    };
    match checked {
        Ok(()) => next.run(req).await,
        Err(mut e) => {
            let endpoint = endpoint_of(req.uri().path());
            count_request(endpoint, e.status);
            if is_anthropic(endpoint) {
                // Anthropic's clients send the key as `x-api-key`.
                e.message = e.message.replace(
                    "Pass it as 'Authorization: Bearer KEY'",
                    "Pass it as 'x-api-key: KEY' (or 'Authorization: Bearer KEY')",
                );
                return super::messages::error_response(&e);
            }
            e.into_response()
        }
    }
}

/// Whether errors on `endpoint` take Anthropic's shape (the Messages API).
fn is_anthropic(endpoint: &str) -> bool {
    matches!(endpoint, "messages" | "messages_count_tokens")
}

fn endpoint_of(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/responses" => "responses",
        "/v1/messages" => "messages",
        "/v1/messages/count_tokens" => "messages_count_tokens",
        p if p.starts_with("/v1/models") => "models",
        "/v1/load_lora_adapter" | "/v1/unload_lora_adapter" => "lora_adapters",
        "/tokenize" => "tokenize",
        "/detokenize" => "detokenize",
        _ => "other",
    }
}

/// The status a request is counted under when its client hung up before
/// the answer began (nginx's "client closed request").
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Awaits `answer` and counts the request under its status, or under
/// [`CLIENT_CLOSED_REQUEST`] when the client went away first (the server
/// then drops this future, and the count happens on drop).
pub(super) async fn counted(
    endpoint: &'static str,
    answer: impl std::future::Future<Output = Response>,
) -> Response {
    struct Unanswered(&'static str);
    impl Drop for Unanswered {
        fn drop(&mut self) {
            if let Ok(closed) = StatusCode::from_u16(CLIENT_CLOSED_REQUEST) {
                count_request(self.0, closed);
            }
        }
    }
    let unanswered = Unanswered(endpoint);
    let resp = answer.await;
    std::mem::forget(unanswered);
    count_request(endpoint, resp.status());
    resp
}

pub(super) fn count_request(endpoint: &'static str, status: StatusCode) {
    metrics::counter!(
        tandem_cluster::metrics::REQUESTS,
        "endpoint" => endpoint,
        "status" => status.as_u16().to_string()
    )
    .increment(1);
}

async fn unknown_route(req: Request) -> Response {
    let e = ApiError::not_found(format!(
        "Unknown request URL: {} {}",
        req.method(),
        req.uri().path()
    ));
    count_request("other", e.status);
    e.into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    let mut e = ApiError::invalid(
        format!(
            "Method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
        None,
    )
    .with_code("method_not_allowed");
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    count_request(endpoint_of(req.uri().path()), e.status);
    e.into_response()
}

async fn list_models(State(state): State<Arc<ApiState>>) -> Response {
    count_request("models", StatusCode::OK);
    let mut data = vec![model_card(&state, "")];
    // An adapter named like the served model is shadowed by it (`up`
    // refuses one at start): listed once, as the model it is.
    data.extend(
        state
            .backend
            .adapters()
            .iter()
            .filter(|a| **a != state.served_model_name)
            .map(|a| model_card(&state, a)),
    );
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(state): State<Arc<ApiState>>, Path(model): Path<String>) -> Response {
    let model = model.trim_start_matches('/');
    json_answer(
        "models",
        state
            .check_model(model)
            .map(|adapter| model_card(&state, &adapter)),
    )
}

/// vLLM's `/tokenize`: the token ids of a `prompt` (as `/v1/completions`
/// tokenizes it) or of `messages` (the chat template applied, as
/// `/v1/chat/completions` does), so a client can count tokens against the
/// context with the server's own tokenizer and template.
async fn tokenize(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = request_object(&state, body).and_then(|m| {
        let tokens = if field(&m, "messages").is_some() {
            let end = ApiState::turn_end(&m)?;
            state.chat_prompt_with_tools(&parse_messages(&m)?, None, end)?
        } else {
            let mut prompts = parse_prompts(&state, &m)?;
            if prompts.len() != 1 {
                return Err(ApiError::bad_param(
                    "prompt",
                    format!("one prompt at a time, got {}", prompts.len()),
                ));
            }
            prompts.swap_remove(0).ids
        };
        let mut answer = json!({
            "count": tokens.len(),
            "max_model_len": state.context_length,
            "tokens": tokens,
        });
        // vLLM's `return_token_strs`: each token as the vocabulary spells it.
        if boolean(&m, "return_token_strs")?.unwrap_or(false) {
            answer["token_strs"] = tokens
                .iter()
                .map(|&id| {
                    state
                        .tokenizer
                        .id_to_token(id)
                        .map_or(Value::Null, Value::String)
                })
                .collect();
        }
        Ok(answer)
    });
    json_answer("tokenize", answer)
}

/// vLLM's `/detokenize`: the text of `tokens` (special tokens included).
async fn detokenize(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = request_object(&state, body).and_then(|m| {
        let v = field(&m, "tokens")
            .ok_or_else(|| ApiError::invalid("'tokens' is required", Some("tokens")))?;
        let vocab = state.tokenizer.vocab_size();
        let ids = v
            .as_array()
            .ok_or_else(|| wrong_type("tokens", "an array of token ids", v))?
            .iter()
            .enumerate()
            .map(|(i, x)| match x.as_u64() {
                Some(id) if id < vocab as u64 => Ok(id as u32),
                Some(id) => Err(ApiError::bad_param(
                    "tokens",
                    format!("token id {id} is outside the vocabulary (size {vocab})"),
                )),
                None => Err(bad_token_id("tokens", i, x)),
            })
            .collect::<Result<Vec<u32>, ApiError>>()?;
        let text = state
            .tokenizer
            .decode(&ids, false)
            .map_err(|e| ApiError::internal(format!("detokenizing: {e}")))?;
        Ok(json!({ "prompt": text }))
    });
    json_answer("detokenize", answer)
}

/// The body of a small JSON endpoint as an object, its `model` (if given)
/// checked against the served one.
fn request_object(
    state: &ApiState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let m = parse_object(body)?;
    check_model_field(state, &m)?;
    Ok(m)
}

/// The answer of a small JSON endpoint, counted under `endpoint`.
fn json_answer(endpoint: &'static str, r: Result<Value, ApiError>) -> Response {
    let resp = match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    };
    count_request(endpoint, resp.status());
    resp
}

/// The card of the served model, or of one of its LoRA adapters (whose
/// `parent` is the served model, as in vLLM).
fn model_card(state: &ApiState, adapter: &str) -> Value {
    let mut card = json!({
        "id": state.answer_model(adapter),
        "object": "model",
        "created": state.created,
        "owned_by": "tandem",
        "root": state.served_model_name,
        "parent": Value::Null,
        "max_model_len": state.context_length,
    });
    if !adapter.is_empty() {
        card["root"] = json!(adapter);
        card["parent"] = json!(state.served_model_name);
    }
    card
}

// ---------------------------------------------------------------------------
// Request parsing helpers

pub(super) fn field<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Element `i` of the array `param` is not a token id: says which, and
/// what it is (a negative or fractional number, a string).
fn bad_token_id(param: &str, i: usize, got: &Value) -> ApiError {
    ApiError::bad_param(
        param,
        format!(
            "'{param}[{i}]' must be a token id (an integer from 0 to {}), got {got}",
            u32::MAX
        ),
    )
    .with_code("invalid_type")
}

pub(super) fn wrong_type(param: &str, want: &str, got: &Value) -> ApiError {
    ApiError::bad_param(
        param,
        format!("'{param}' must be {want}, got {}", type_name(got)),
    )
    .with_code("invalid_type")
}

fn num(m: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match field(m, k) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| wrong_type(k, "a number", v)),
    }
}

fn as_int(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    if v.is_u64() {
        return Some(i64::MAX);
    }
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
        _ => None,
    }
}

fn int(m: &Map<String, Value>, k: &str) -> Result<Option<i64>, ApiError> {
    match field(m, k) {
        None => Ok(None),
        Some(v) => as_int(v)
            .map(Some)
            .ok_or_else(|| wrong_type(k, "an integer", v)),
    }
}

pub(super) fn boolean(m: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match field(m, k) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| wrong_type(k, "a boolean", v)),
    }
}

pub(super) fn string<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, ApiError> {
    match field(m, k) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| wrong_type(k, "a string", v)),
    }
}

pub(super) fn parse_object(
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|e| {
        let mut err = ApiError::invalid(format!("could not read the request body: {e}"), None);
        err.status = e.status();
        if err.status.is_server_error() || err.status.is_success() {
            err.status = StatusCode::BAD_REQUEST;
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if c.is::<TimeoutError>() {
                err.status = StatusCode::REQUEST_TIMEOUT;
            }
            cause = c.source();
        }
        err
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        // serde_json reads `\ud800` not followed by its low half as a
        // hex escape cut short: say what is wrong with it.
        let hint = if e.to_string().contains("hex escape") {
            " (a \\u escape of half a UTF-16 surrogate pair, such as \\ud800 alone, is not a character)"
        } else {
            ""
        };
        ApiError::invalid(
            format!("We could not parse the JSON body of your request: {e}{hint}"),
            None,
        )
        .with_code("invalid_json")
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::invalid(
            format!(
                "the request body must be a JSON object, got {}",
                type_name(&other)
            ),
            None,
        )
        .with_code("invalid_json")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completions => "completions",
        }
    }
}

const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "prompt_logprobs",
    "user",
    "logit_bias",
    "ignore_eos",
    "include_stop_str_in_output",
    "min_tokens",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "structured_outputs",
];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "audio",
    "modalities",
    "prediction",
    "metadata",
    "store",
    "service_tier",
    "add_generation_prompt",
    "continue_final_message",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "best_of", "suffix"];

/// 400 for known OpenAI fields that tandem does not support (their harmless
/// values, e.g. `best_of: 1` or `suffix: ""`, pass).
fn check_unsupported(m: &Map<String, Value>, ep: Endpoint) -> Result<(), ApiError> {
    // vLLM's other output constraints: refused, never silently dropped.
    for k in [
        "guided_grammar",
        "guided_decoding_backend",
        "guided_whitespace_pattern",
    ] {
        if field(m, k).is_some() {
            return Err(ApiError::unsupported(
                k,
                " (the output constraints are response_format, guided_json, guided_regex \
                 and guided_choice)",
            ));
        }
    }
    if let Some(Value::Object(o)) = field(m, "structured_outputs") {
        for k in o.keys() {
            if !["json", "regex", "choice", "json_object"].contains(&k.as_str())
                && field(o, k).is_some()
            {
                let p = format!("structured_outputs.{k}");
                return Err(ApiError::unsupported(
                    &p,
                    " (structured_outputs takes json, regex, choice or json_object)",
                ));
            }
        }
    }
    if let Some(v) = field(m, "best_of") {
        if as_int(v) != Some(1) {
            return Err(ApiError::unsupported("best_of", " (only 1)"));
        }
    }
    // vLLM's other sampling and output extensions: refused unless they ask
    // for what happens anyway (their one harmless value), never silently
    // dropped.
    let extensions: [(&str, Option<Value>, &str); 5] = [
        (
            "allowed_token_ids",
            Some(json!([])),
            " (logit_bias can steer tokens)",
        ),
        (
            "bad_words",
            Some(json!([])),
            " (logit_bias can steer tokens)",
        ),
        (
            "truncate_prompt_tokens",
            None,
            " (prompts are never cut: one longer than the context is refused)",
        ),
        ("use_beam_search", Some(json!(false)), " (sampling only)"),
        (
            "skip_special_tokens",
            Some(json!(true)),
            " (only true: special tokens write no text)",
        ),
    ];
    for (k, harmless, why) in extensions {
        if field(m, k).is_some_and(|v| Some(v) != harmless.as_ref()) {
            return Err(ApiError::unsupported(k, why));
        }
    }
    match ep {
        Endpoint::Chat => {
            for k in ["functions", "audio", "prediction"] {
                if field(m, k).is_some() {
                    return Err(ApiError::unsupported(
                        k,
                        " (legacy functions, audio and predicted outputs are not available; \
                         'tools' are)",
                    ));
                }
            }
            if let Some(v) = field(m, "function_call") {
                if v.as_str() != Some("none") {
                    return Err(ApiError::unsupported(
                        "function_call",
                        " (legacy functions; use 'tools' and 'tool_choice')",
                    ));
                }
            }
            if field(m, "chat_template").is_some() {
                return Err(ApiError::unsupported(
                    "chat_template",
                    " (a request's own template; the model's is used)",
                ));
            }
            if field(m, "echo").is_some_and(|v| v.as_bool() != Some(false)) {
                return Err(ApiError::unsupported(
                    "echo",
                    " on chat (legacy completions echo their prompt)",
                ));
            }
            if let Some(v) = field(m, "modalities") {
                let text_only = v
                    .as_array()
                    .is_some_and(|a| a.iter().all(|x| x.as_str() == Some("text")));
                if !text_only {
                    return Err(ApiError::unsupported("modalities", " (only [\"text\"])"));
                }
            }
        }
        Endpoint::Completions => {
            if let Some(v) = field(m, "suffix") {
                if v.as_str() != Some("") {
                    return Err(ApiError::unsupported("suffix", ""));
                }
            }
        }
    }
    let extra = match ep {
        Endpoint::Chat => CHAT_FIELDS,
        Endpoint::Completions => COMPLETION_FIELDS,
    };
    for k in m.keys() {
        if !COMMON_FIELDS.contains(&k.as_str()) && !extra.contains(&k.as_str()) {
            tracing::debug!(field = %k, endpoint = ep.label(), "ignoring unknown request field");
        }
    }
    Ok(())
}

/// What a request asks for besides the prompt.
struct Common {
    params: GenParams,
    stream: bool,
    include_usage: bool,
    /// vLLM's `continuous_usage_stats`: every chunk carries the usage so far.
    continuous_usage: bool,
}

/// vLLM's structured-output extensions: `guided_json`, `guided_regex`,
/// `guided_choice`, or the same under `structured_outputs` (`json`,
/// `regex`, `choice`, and `json_object`). [`GenParams::build`] refuses more than one
/// constraint, counting `response_format`.
fn guided_extensions(m: &Map<String, Value>, p: &mut GenParams) -> Result<(), ApiError> {
    let nested = match field(m, "structured_outputs") {
        None => None,
        Some(Value::Object(o)) => Some(o),
        Some(v) => return Err(wrong_type("structured_outputs", "an object", v)),
    };
    let pick = |flat: &'static str, key: &str| -> Option<(&'static str, &Value)> {
        field(m, flat)
            .or_else(|| nested.and_then(|o| field(o, key)))
            .map(|v| (flat, v))
    };
    if let Some((param, v)) = pick("guided_json", "json") {
        if p.json_object || p.json_schema.is_some() {
            return Err(ApiError::bad_param(
                param,
                format!("give either 'response_format' or '{param}', not both"),
            ));
        }
        let schema = match v {
            Value::String(s) => serde_json::from_str::<Value>(s)
                .map_err(|e| ApiError::bad_param(param, format!("'{param}' is not JSON: {e}")))?,
            other => other.clone(),
        };
        if !(schema.is_object() || schema.is_boolean()) {
            return Err(wrong_type(param, "a JSON schema object", &schema));
        }
        p.json_schema = Some(schema.to_string());
    }
    if let Some((param, v)) = pick("guided_regex", "regex") {
        let rx = v.as_str().ok_or_else(|| wrong_type(param, "a string", v))?;
        if rx.is_empty() {
            return Err(ApiError::bad_param(param, format!("'{param}' is empty")));
        }
        p.regex = Some(rx.to_string());
    }
    if let Some((param, v)) = pick("guided_choice", "choice") {
        let want = "a non-empty array of strings";
        let choice: Vec<String> = v
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| wrong_type(param, want, v))?
            .iter()
            .map(|c| {
                c.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong_type(param, want, c))
            })
            .collect::<Result<_, _>>()?;
        p.choice = choice;
    }
    let json_object = nested.and_then(|o| field(o, "json_object"));
    match json_object {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => p.json_object = true,
        Some(v) => return Err(wrong_type("structured_outputs.json_object", "a boolean", v)),
    }
    Ok(())
}

/// `max_tokens` of a completion that does not give it.
const DEFAULT_COMPLETION_TOKENS: i64 = 16;

fn parse_common(m: &Map<String, Value>, ep: Endpoint) -> Result<Common, ApiError> {
    let mut p = GenParams::default();
    let mct = int(m, "max_completion_tokens")?;
    let mt = int(m, "max_tokens")?;
    if ep == Endpoint::Chat && mct.is_some() {
        p.max_tokens = mct;
        p.max_tokens_param = "max_completion_tokens";
    } else {
        // Legacy completions default to 16 tokens, as OpenAI's and vLLM's
        // do; chat runs to the end of the context.
        p.max_tokens = mt;
        if ep == Endpoint::Completions {
            p.default_max_tokens = Some(DEFAULT_COMPLETION_TOKENS);
        }
        p.max_tokens_param = "max_tokens";
    }
    p.ignore_eos = boolean(m, "ignore_eos")?.unwrap_or(false);
    p.stop_in_output = boolean(m, "include_stop_str_in_output")?.unwrap_or(false);
    p.min_tokens = int(m, "min_tokens")?;
    p.temperature = num(m, "temperature")?;
    p.top_p = num(m, "top_p")?;
    p.top_k = int(m, "top_k")?;
    p.min_p = num(m, "min_p")?;
    p.repetition_penalty = num(m, "repetition_penalty")?;
    p.presence_penalty = num(m, "presence_penalty")?;
    p.frequency_penalty = num(m, "frequency_penalty")?;
    p.seed = match field(m, "seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| wrong_type("seed", "an integer", v))?,
        ),
    };
    p.stop = match field(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong_type("stop", "a string or an array of strings", x))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    p.stop_token_ids = match field(m, "stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .filter(|&id| id <= u32::MAX as u64)
                    .map(|id| id as u32)
                    .ok_or_else(|| bad_token_id("stop_token_ids", i, x))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong_type("stop_token_ids", "an array of token ids", v)),
    };
    p.n = int(m, "n")?;
    // vLLM takes it on completions too.
    match field(m, "response_format") {
        None => {}
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => p.json_object = true,
            Some("json_schema") => {
                // {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
                let schema = o
                    .get("json_schema")
                    .and_then(Value::as_object)
                    .and_then(|j| j.get("schema"))
                    .filter(|s| s.is_object() || s.is_boolean())
                    .ok_or_else(|| {
                        ApiError::bad_param(
                            "response_format",
                            "'response_format.json_schema.schema' must be a JSON schema object",
                        )
                    })?;
                p.json_schema = Some(schema.to_string());
            }
            _ => {
                return Err(ApiError::bad_param(
                    "response_format",
                    "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                ))
            }
        },
        Some(v) => return Err(wrong_type("response_format", "an object", v)),
    }
    guided_extensions(m, &mut p)?;
    p.logit_bias = match field(m, "logit_bias") {
        None => Vec::new(),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| {
                let id = k.trim().parse::<u32>().map_err(|_| {
                    ApiError::bad_param(
                        "logit_bias",
                        format!("'logit_bias' keys must be token ids, got '{k}'"),
                    )
                })?;
                let bias = v
                    .as_f64()
                    .ok_or_else(|| wrong_type("logit_bias", "an object of numbers", v))?;
                Ok((id, bias))
            })
            .collect::<Result<_, ApiError>>()?,
        Some(v) => return Err(wrong_type("logit_bias", "an object", v)),
    };
    match ep {
        Endpoint::Chat => {
            let lp = boolean(m, "logprobs")?.unwrap_or(false);
            let top = int(m, "top_logprobs")?;
            if let Some(t) = top {
                if !(0..=20).contains(&t) {
                    return Err(ApiError::bad_param(
                        "top_logprobs",
                        format!("'top_logprobs' must be between 0 and 20, got {t}"),
                    ));
                }
                if !lp && t > 0 {
                    return Err(ApiError::bad_param(
                        "top_logprobs",
                        "'logprobs' must be true when 'top_logprobs' is set",
                    ));
                }
            }
            p.logprobs = lp.then(|| top.unwrap_or(0) as u32);
        }
        Endpoint::Completions => {
            if let Some(k) = int(m, "logprobs")? {
                if !(0..=5).contains(&k) {
                    return Err(ApiError::bad_param(
                        "logprobs",
                        format!("'logprobs' must be between 0 and 5, got {k}"),
                    ));
                }
                p.logprobs = Some(k as u32);
            }
        }
    }
    let stream = boolean(m, "stream")?.unwrap_or(false);
    let (include_usage, continuous_usage) = match field(m, "stream_options") {
        None => (false, false),
        // As OpenAI and vLLM refuse it: options for a stream not asked for
        // are a client's mistake, not something to ignore.
        Some(_) if !stream => {
            return Err(ApiError::bad_param(
                "stream_options",
                "'stream_options' is only allowed when 'stream' is true",
            ))
        }
        Some(Value::Object(o)) => {
            let include = boolean(o, "include_usage")?.unwrap_or(false);
            // As in vLLM, continuous stats need `include_usage`.
            let continuous = boolean(o, "continuous_usage_stats")?.unwrap_or(false);
            (include, include && continuous)
        }
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    Ok(Common {
        params: p,
        stream,
        include_usage,
        continuous_usage,
    })
}

/// The adapter a request's `model` names (empty for the base model).
pub(super) fn check_model_field(
    state: &ApiState,
    m: &Map<String, Value>,
) -> Result<String, ApiError> {
    match string(m, "model")? {
        // Lenient like vLLM: a missing model means the served one.
        None => Ok(String::new()),
        Some(name) => state.check_model(name),
    }
}

/// Chat messages: `content` as a string, as text parts, or null.
fn parse_messages(m: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let v = field(m, "messages")
        .ok_or_else(|| ApiError::invalid("'messages' is required", Some("messages")))?;
    let arr = v
        .as_array()
        .ok_or_else(|| wrong_type("messages", "an array", v))?;
    if arr.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "'messages' must contain at least one message",
        ));
    }
    let mut out = Vec::with_capacity(arr.len());
    for (i, msg) in arr.iter().enumerate() {
        let p = format!("messages[{i}]");
        let o = msg
            .as_object()
            .ok_or_else(|| wrong_type(&p, "an object", msg))?;
        let rp = format!("{p}.role");
        let role = match o.get("role") {
            Some(Value::String(r)) => r.as_str(),
            Some(v) => return Err(wrong_type(&rp, "a string", v)),
            None => return Err(ApiError::invalid(format!("'{rp}' is required"), Some(&rp))),
        };
        let role = match role {
            "system" | "user" | "assistant" => role,
            "developer" => "system",
            "tool" => "tool",
            "function" => {
                return Err(ApiError::unsupported(
                    &rp,
                    " (legacy function messages; use 'tool' messages)",
                ))
            }
            other => {
                return Err(ApiError::bad_param(
                    &rp,
                    format!(
                    "'{rp}' must be one of system, developer, user, assistant, tool; got '{other}'"
                ),
                ))
            }
        };
        for k in ["function_call", "audio"] {
            if field(o, k).is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
                return Err(ApiError::unsupported(&format!("{p}.{k}"), ""));
            }
        }
        // An assistant's earlier calls, and the answer a tool gave.
        let tp = format!("{p}.tool_calls");
        let tool_calls = match field(o, "tool_calls") {
            Some(v) if role == "assistant" => Some(super::tools::history_calls(&tp, v)?),
            Some(_) => {
                return Err(ApiError::bad_param(
                    &tp,
                    format!("only assistant messages carry '{tp}'"),
                ))
            }
            None => None,
        };
        let tool_call_id = match field(o, "tool_call_id") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => return Err(wrong_type(&format!("{p}.tool_call_id"), "a string", v)),
            None => None,
        };
        let cp = format!("{p}.content");
        let content = match o.get("content") {
            None | Some(Value::Null) => {
                if role == "assistant" {
                    String::new()
                } else {
                    return Err(ApiError::invalid(format!("'{cp}' is required"), Some(&cp)));
                }
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let pp = format!("{cp}[{j}]");
                    let po = part
                        .as_object()
                        .ok_or_else(|| wrong_type(&pp, "an object", part))?;
                    match po.get("type").and_then(Value::as_str) {
                        Some("text") => {}
                        Some(other) => {
                            return Err(ApiError::unsupported(
                                &format!("{pp}.type"),
                                &format!(" (content part type '{other}'; only 'text')"),
                            ))
                        }
                        None => {
                            return Err(ApiError::invalid(
                                format!("'{pp}.type' is required"),
                                Some(&format!("{pp}.type")),
                            ))
                        }
                    }
                    match po.get("text") {
                        Some(Value::String(t)) => texts.push(t.as_str()),
                        Some(v) => return Err(wrong_type(&format!("{pp}.text"), "a string", v)),
                        None => {
                            return Err(ApiError::invalid(
                                format!("'{pp}.text' is required"),
                                Some(&format!("{pp}.text")),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
            Some(v) => return Err(wrong_type(&cp, "a string or an array of content parts", v)),
        };
        let mut msg = ChatMessage::new(role, content);
        msg.tool_calls = tool_calls;
        msg.tool_call_id = tool_call_id;
        out.push(msg);
    }
    Ok(out)
}

/// Most prompts in one `/v1/completions` request.
pub const MAX_PROMPTS: usize = 64;
/// Most choices in one request: prompts × `n`.
pub const MAX_CHOICES: usize = 128;

/// One prompt of a completions request.
struct PromptIn {
    ids: Vec<u32>,
    /// The prompt as the client wrote it, when it came as text (for `echo`).
    text: Option<String>,
}

/// `prompt`: a string, token ids, or a batch: an array of strings or of
/// token-id arrays (each its own prompt, as in OpenAI's API).
fn parse_prompts(state: &ApiState, m: &Map<String, Value>) -> Result<Vec<PromptIn>, ApiError> {
    let v = field(m, "prompt")
        .ok_or_else(|| ApiError::invalid("'prompt' is required", Some("prompt")))?;
    let want = "a string, token ids, or an array of either";
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .filter(|&id| id <= u32::MAX as u64)
                    .map(|id| id as u32)
                    .ok_or_else(|| bad_token_id("prompt", i, x))
            })
            .collect()
    };
    let one = |v: &Value| -> Result<PromptIn, ApiError> {
        match v {
            Value::String(s) => Ok(PromptIn {
                ids: state.text_prompt(s)?,
                text: Some(s.clone()),
            }),
            Value::Array(a) => Ok(PromptIn {
                ids: ids(a)?,
                text: None,
            }),
            other => Err(wrong_type("prompt", want, other)),
        }
    };
    match v {
        Value::Array(a) if a.is_empty() => Err(ApiError::bad_param("prompt", "'prompt' is empty")),
        // Token ids of one prompt.
        Value::Array(a) if a[0].is_number() => Ok(vec![one(v)?]),
        Value::Array(a) => {
            if a.len() > MAX_PROMPTS {
                return Err(ApiError::bad_param(
                    "prompt",
                    format!("at most {MAX_PROMPTS} prompts per request, got {}", a.len()),
                ));
            }
            a.iter()
                .map(|p| match p {
                    Value::String(_) | Value::Array(_) => one(p),
                    other => Err(wrong_type("prompt", want, other)),
                })
                .collect()
        }
        other => Ok(vec![one(other)?]),
    }
}

// ---------------------------------------------------------------------------
// Running

/// Records time to first token once per request.
pub(crate) struct Ttft {
    start: Instant,
    done: AtomicBool,
    endpoint: &'static str,
}

impl Ttft {
    pub(crate) fn new(start: Instant, endpoint: &'static str) -> Arc<Self> {
        Arc::new(Self {
            start,
            done: AtomicBool::new(false),
            endpoint,
        })
    }
    pub(crate) fn mark(&self) {
        if !self.done.swap(true, Ordering::Relaxed) {
            metrics::histogram!(tandem_cluster::metrics::TTFT, "endpoint" => self.endpoint)
                .record(self.start.elapsed().as_secs_f64());
        }
    }
}

/// Admits every choice (all or nothing: on an error the ones already
/// admitted are dropped, which cancels them). The backend may run them as
/// one parallel-sampling request sharing the prompt.
pub(crate) async fn start_all(
    state: &ApiState,
    prepared: &Prepared,
) -> Result<Vec<TokenStream>, ApiError> {
    state
        .backend
        .generate_choices(prepared.inputs.clone())
        .await
        .map_err(ApiError::from)
}

/// A worker's refusal of the request's output constraint (its grammar
/// does not compile) names the field it came from: the tools'
/// `parameters` when a call is forced, else the constraint given.
fn name_constraint(mut e: ApiError, m: &Map<String, Value>, forced_call: bool) -> ApiError {
    const REFUSED: &str = "invalid response format: ";
    let Some(at) = e.message.find(REFUSED).filter(|_| e.param.is_none()) else {
        return e;
    };
    let why = e.message[at + REFUSED.len()..].to_string();
    let given = [
        "response_format",
        "guided_json",
        "guided_regex",
        "guided_choice",
    ]
    .into_iter()
    .find(|k| field(m, k).is_some())
    .unwrap_or("structured_outputs");
    let (param, what) = match forced_call {
        true => ("tools", "a tool's 'parameters' schema"),
        false => (given, "the output format"),
    };
    e.message = format!("{what} cannot be used: {why}");
    e.param = Some(param.to_string());
    e
}

/// Adds the decoded choices of one prompt to `all`, numbered from `first`.
fn decoders(
    state: &ApiState,
    prepared: &Prepared,
    streams: Vec<TokenStream>,
    first: usize,
    all: &mut SelectAll<ChoiceStream>,
) {
    for (i, ts) in streams.into_iter().enumerate() {
        let dec = ChoiceDecoder::new(state.tokenizer.clone(), &prepared.stop)
            .with_min_tokens(prepared.min_tokens)
            .keep_stop_string(prepared.stop_in_output)
            .with_stop_token_ids(&prepared.stop_token_ids)
            .score_only(prepared.score_only);
        all.push(choice_stream(first + i, ts, dec));
    }
}

/// vLLM's `stop_reason` of a choice's last delta: the stop string that
/// ended it, or the token of the request's `stop_token_ids`; `null` for
/// the model's own end of text or a length limit.
fn stop_reason(d: &super::ChoiceDelta) -> Value {
    match (&d.stop_string, d.stop_token) {
        (Some(s), _) => json!(s),
        (None, Some(t)) => json!(t),
        (None, None) => Value::Null,
    }
}

/// One finished choice.
#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<TokenInfo>,
    /// The prompt's log-probabilities (echo with logprobs).
    prompt_logprobs: Option<Vec<SampledToken>>,
    finish: Option<FinishReason>,
    /// vLLM's `stop_reason`: the stop string or token that ended it.
    stop_reason: Value,
    completion_tokens: u32,
    cached_tokens: u32,
}

struct Ctx {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    /// The API the request came in by, as the metrics label it.
    label: &'static str,
    logprobs: Option<u32>,
    include_usage: bool,
    continuous_usage: bool,
    prompt_tokens: usize,
    /// Choices per prompt: choice `i` answers prompt `i / per_prompt`.
    per_prompt: usize,
    /// Per prompt, the text its choices begin with (`echo`), else empty.
    echo: Vec<String>,
    /// Per prompt, when its scores were asked for (`echo` with `logprobs`,
    /// or `prompt_logprobs`), its token ids and whether it came as text;
    /// else empty.
    scored_prompts: Vec<(Vec<u32>, bool)>,
    /// The echoed prompt comes with its scores in `logprobs` (OpenAI's
    /// legacy `echo` with `logprobs`).
    echo_scored: bool,
    /// vLLM's `prompt_logprobs`: the prompt's scores in vLLM's shape, with
    /// this many alternatives per position.
    prompt_logprobs: Option<u32>,
    /// The output may hold tool calls (chat with `tools`, unless
    /// `tool_choice` is `"none"`).
    tools: Option<super::tools::Tools>,
    tokenizer: Arc<Tokenizer>,
    start: Instant,
}

impl Ctx {
    fn prompts(&self) -> usize {
        self.echo.len()
    }
}

fn usage_json(prompt: usize, completion: u64, cached: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt as u64 + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn token_str(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    tok.token_bytes(id)
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| token_str(tok, id).into_bytes())
}

/// `logprobs` for generated tokens; completions count text offsets from
/// `base_offset` (the echoed prompt's length).
fn logprobs_json(ctx: &Ctx, tokens: &[TokenInfo], base_offset: usize) -> Value {
    let Some(k) = ctx.logprobs else {
        return Value::Null;
    };
    let tok = &*ctx.tokenizer;
    match ctx.endpoint {
        Endpoint::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let top: Vec<Value> = t
                        .top
                        .iter()
                        .take(k as usize)
                        .map(|&(id, lp)| {
                            json!({"token": token_str(tok, id), "logprob": lp, "bytes": token_bytes(tok, id)})
                        })
                        .collect();
                    json!({
                        "token": token_str(tok, t.id),
                        "logprob": t.logprob,
                        "bytes": token_bytes(tok, t.id),
                        "top_logprobs": top,
                    })
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Endpoint::Completions => {
            let entries: Vec<LpEntry> = tokens
                .iter()
                .map(|t| LpEntry {
                    id: t.id,
                    scored: Some((t.logprob, &t.top[..])),
                    text_offset: base_offset + t.text_offset,
                })
                .collect();
            completion_logprobs(tok, k, &entries)
        }
    }
}

/// One position of a completion's `logprobs` object.
pub(super) struct LpEntry<'a> {
    pub id: u32,
    /// Its log-probability and the top alternatives; `None` for the first
    /// prompt token, which nothing before it scores.
    pub scored: Option<(f32, &'a [(u32, f32)])>,
    /// Characters of text before it.
    pub text_offset: usize,
}

/// OpenAI's legacy `logprobs` object: parallel arrays, `null` where a
/// position has no score. Each `top_logprobs` holds the `k` likeliest
/// tokens and the position's own token (sampled or echoed) when it is not
/// among them: "up to logprobs + 1 elements", as OpenAI documents it (so
/// `logprobs: 0` gives the own token alone).
pub(super) fn completion_logprobs(tok: &Tokenizer, k: u32, entries: &[LpEntry<'_>]) -> Value {
    let top: Vec<Value> = entries
        .iter()
        .map(|e| match e.scored {
            None => Value::Null,
            Some((own, top)) => {
                let mut m = Map::new();
                for &(id, lp) in top.iter().take(k as usize) {
                    m.entry(token_str(tok, id)).or_insert(json!(lp));
                }
                if !top.iter().take(k as usize).any(|&(id, _)| id == e.id) {
                    m.entry(token_str(tok, e.id)).or_insert(json!(own));
                }
                Value::Object(m)
            }
        })
        .collect();
    json!({
        "tokens": entries.iter().map(|e| token_str(tok, e.id)).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.scored.map(|s| s.0)).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": entries.iter().map(|e| e.text_offset).collect::<Vec<_>>(),
    })
}

/// The `logprobs` of an echoed prompt (`echo` with `logprobs`): its tokens,
/// the first unscored, each scored by the model given the ones before it.
fn prompt_logprobs_json(ctx: &Ctx, prompt: usize, scores: &[SampledToken]) -> Value {
    let tok = &*ctx.tokenizer;
    let (ids, as_text) = &ctx.scored_prompts[prompt];
    // Offsets into the echoed text: the client's own (special tokens the
    // tokenizer added, such as BOS, are not in it), or the ids decoded with
    // their special tokens.
    let mut detok = tandem_model::detok::IncrementalDecoder::new(tok, *as_text);
    let mut chars = 0;
    let entries: Vec<LpEntry> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let text_offset = chars;
            chars += detok.push(id).map(|p| p.chars().count()).unwrap_or(0);
            LpEntry {
                id,
                scored: i
                    .checked_sub(1)
                    .and_then(|j| scores.get(j))
                    .map(|s| (s.logprob, &s.top[..])),
                text_offset,
            }
        })
        .collect();
    completion_logprobs(tok, ctx.logprobs.unwrap_or(0), &entries)
}

/// A finished chat choice's message and finish reason: the tool calls when
/// the output holds any, else the text. As in vLLM, calls the model chose
/// (required or auto) that complete finish with `tool_calls`, a named one
/// with `stop`.
fn chat_message(ctx: &Ctx, c: &Collected) -> (Value, Option<&'static str>) {
    let finish = c.finish.map(FinishReason::as_str);
    let tools = ctx.tools.as_ref();
    match tools.and_then(|t| t.parse_calls(&c.text)) {
        // A required choice cut before its first call's name.
        Some(out) if out.calls.is_empty() => (
            json!({"role": "assistant", "content": null, "refusal": null}),
            finish,
        ),
        Some(out) => {
            let named = tools.is_some_and(|t| t.named().is_some());
            let finish = match c.finish {
                Some(FinishReason::Stop) if !named => Some("tool_calls"),
                _ => finish,
            };
            let message = json!({
                "role": "assistant",
                "content": out.content,
                "refusal": null,
                "tool_calls": super::tools::calls_json(&out.calls, false),
            });
            (message, finish)
        }
        None => (
            json!({"role": "assistant", "content": c.text, "refusal": null}),
            finish,
        ),
    }
}

/// vLLM's `prompt_logprobs` parameter: 0 to 20 alternatives per position.
fn prompt_logprobs_param(m: &Map<String, Value>) -> Result<Option<u32>, ApiError> {
    match int(m, "prompt_logprobs")? {
        None => Ok(None),
        Some(k) if (0..=20).contains(&k) => Ok(Some(k as u32)),
        Some(k) => Err(ApiError::bad_param(
            "prompt_logprobs",
            format!("'prompt_logprobs' must be between 0 and 20, got {k}"),
        )),
    }
}

/// A prompt's scores in vLLM's shape: per prompt token, `null` for the
/// first, else an object keyed by token id (as a string) holding the
/// prompt token and the top alternatives, each with its `logprob`, its
/// 1-based `rank` and its `decoded_token`.
fn vllm_prompt_logprobs(ctx: &Ctx, scores: Option<&[SampledToken]>) -> Value {
    let (Some(k), Some(scores)) = (ctx.prompt_logprobs, scores) else {
        return Value::Null;
    };
    let tok = &*ctx.tokenizer;
    let entry = |id: u32, lp: f32, rank: Option<u32>| json!({"logprob": lp, "rank": rank, "decoded_token": token_str(tok, id)});
    let mut out = vec![Value::Null];
    for s in scores {
        let mut m = Map::new();
        m.insert(s.id.to_string(), entry(s.id, s.logprob, s.rank));
        for (r, &(id, lp)) in s.top.iter().take(k as usize).enumerate() {
            m.entry(id.to_string())
                .or_insert_with(|| entry(id, lp, Some(r as u32 + 1)));
        }
        out.push(Value::Object(m));
    }
    Value::Array(out)
}

/// `logprobs` for a whole echoed completion: the prompt's, then the output's.
fn echoed_logprobs_json(ctx: &Ctx, prompt: usize, c: &Collected) -> Value {
    let mut v = prompt_logprobs_json(ctx, prompt, c.prompt_logprobs.as_deref().unwrap_or(&[]));
    let base = ctx.echo[prompt].chars().count();
    let out = logprobs_json(ctx, &c.tokens, base);
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(Value::Array(a)), Some(Value::Array(b))) = (v.get_mut(key), out.get(key)) {
            a.extend(b.iter().cloned());
        }
    }
    v
}

async fn chat_completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, body, Endpoint::Chat).await
}

async fn completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, body, Endpoint::Completions).await
}

/// Runs a chat request given as its parsed body (a translated API's
/// request) and returns the chat answer, streamed or whole; its token and
/// latency metrics carry the translated API's `endpoint` label.
pub(super) async fn chat(
    state: Arc<ApiState>,
    m: Map<String, Value>,
    endpoint: &'static str,
) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(&m)
        .map_err(|e| ApiError::internal(format!("encoding the chat request: {e}")))?;
    run(state, Ok(Bytes::from(body)), Endpoint::Chat, endpoint).await
}

async fn handle(
    state: Arc<ApiState>,
    body: Result<Bytes, BytesRejection>,
    ep: Endpoint,
) -> Response {
    counted(ep.label(), async {
        match run(state, body, ep, ep.label()).await {
            Ok(r) => r,
            Err(e) => {
                if e.status.is_server_error() {
                    tracing::warn!(endpoint = ep.label(), status = %e.status, error = %e.message, "request failed");
                } else {
                    tracing::debug!(endpoint = ep.label(), status = %e.status, error = %e.message, "request rejected");
                }
                e.into_response()
            }
        }
    })
    .await
}

/// The prompt a chat request's `messages` (and `tools`) make, as the chat
/// route would compute it, without running it.
pub(super) fn chat_prompt_of(
    state: &ApiState,
    m: &Map<String, Value>,
) -> Result<Vec<u32>, ApiError> {
    check_model_field(state, m)?;
    let tools = state.request_tools(m)?;
    let end = ApiState::turn_end(m)?;
    state.chat_prompt_with_tools(&parse_messages(m)?, tools.as_ref().map(|t| &t.defs), end)
}

/// Runs a chat or completions request; `label` names the API it came in
/// by in the token and latency metrics.
async fn run(
    state: Arc<ApiState>,
    body: Result<Bytes, BytesRejection>,
    ep: Endpoint,
    label: &'static str,
) -> Result<Response, ApiError> {
    let accepted = Instant::now();
    let m = parse_object(body)?;
    check_unsupported(&m, ep)?;
    let mut common = parse_common(&m, ep)?;
    common.params.adapter = check_model_field(&state, &m)?;
    let tools = match ep {
        Endpoint::Chat => state.request_tools(&m)?,
        Endpoint::Completions => None,
    };
    if let Some(schema) = tools.as_ref().and_then(|t| t.schema()) {
        // A forced call is held to its JSON: the one output constraint
        // there is. `response_format` shapes a text answer, and there is
        // none, so it is set aside (as OpenAI does); vLLM's guided outputs
        // ask for the output itself, so they conflict.
        let guided = [
            "guided_json",
            "guided_regex",
            "guided_choice",
            "structured_outputs",
        ]
        .into_iter()
        .find(|k| field(&m, k).is_some());
        if let Some(k) = guided {
            return Err(ApiError::bad_param(
                k,
                format!("'{k}' cannot be combined with a forced tool call ('tool_choice' \"required\" or a named function)"),
            ));
        }
        common.params.json_object = false;
        common.params.json_schema = Some(schema);
    }
    let (prompts, prompt_param, tokenizing) = match ep {
        Endpoint::Chat => {
            let messages = parse_messages(&m)?;
            let t = Instant::now();
            // vLLM's `add_generation_prompt: false` leaves the assistant's
            // turn unopened; `continue_final_message` continues the last
            // message (an assistant's answer begun by the client).
            let end = ApiState::turn_end(&m)?;
            let ids =
                state.chat_prompt_with_tools(&messages, tools.as_ref().map(|t| &t.defs), end)?;
            (vec![PromptIn { ids, text: None }], "messages", t.elapsed())
        }
        Endpoint::Completions => {
            let t = Instant::now();
            (parse_prompts(&state, &m)?, "prompt", t.elapsed())
        }
    };
    let echo = ep == Endpoint::Completions && boolean(&m, "echo")?.unwrap_or(false);
    // An echoed prompt comes with its log-probabilities when they are asked
    // for (lm-evaluation-harness scores continuations this way); vLLM's
    // `prompt_logprobs` asks for them in its own shape. The workers score
    // with the larger of the two counts; each output takes its own.
    let echo_scored = echo && common.params.logprobs.is_some();
    let vllm_scores = prompt_logprobs_param(&m)?;
    let echo_k = common.params.logprobs.filter(|_| echo_scored);
    common.params.prompt_logprobs = echo_k.max(vllm_scores);
    common.params.echo = echo;
    let mut scored_prompts = Vec::new();
    let start = Instant::now();
    let id = match ep {
        Endpoint::Chat => format!("chatcmpl-{}", random_id()),
        Endpoint::Completions => format!("cmpl-{}", random_id()),
    };
    // The router's own time so far: everything but the template and tokenizer.
    let own = accepted.elapsed().saturating_sub(tokenizing);
    let batch = prompts.len() > 1;
    let mut groups = Vec::with_capacity(prompts.len());
    let mut echoes = Vec::with_capacity(prompts.len());
    for (p, prompt) in prompts.into_iter().enumerate() {
        // Choice ids stay `{id}-{choice}` for one prompt, as before.
        let base = if batch {
            format!("{id}-{p}")
        } else {
            id.clone()
        };
        // Checked (ids in the vocabulary) before they are echoed.
        let mut prepared = common
            .params
            .build(&state, prompt.ids.clone(), &base, prompt_param)
            .map_err(|mut e| {
                // Of a batch, say which prompt.
                if batch && e.param.as_deref() == Some(prompt_param) {
                    e.message = format!("prompt {p} of the batch: {}", e.message);
                }
                e
            })?;
        for input in &mut prepared.inputs {
            input.frontend_time = own;
        }
        if common.params.prompt_logprobs.is_some() {
            scored_prompts.push((prompt.ids.clone(), prompt.text.is_some()));
        }
        let echoed = match (echo, prompt.text) {
            (false, _) => String::new(),
            (true, Some(text)) => text,
            (true, None) => state
                .tokenizer
                .decode(&prompt.ids, false)
                .map_err(|e| ApiError::internal(format!("detokenizing the prompt: {e}")))?,
        };
        groups.push(prepared);
        echoes.push(echoed);
    }
    let per_prompt = groups[0].inputs.len();
    if groups.len() * per_prompt > MAX_CHOICES {
        return Err(ApiError::bad_param(
            "n",
            format!(
                "at most {MAX_CHOICES} choices per request (prompts × n), got {}",
                groups.len() * per_prompt
            ),
        ));
    }
    let prompt_tokens: usize = groups.iter().map(|g| g.prompt_tokens).sum();
    metrics::counter!(tandem_cluster::metrics::PROMPT_TOKENS, "endpoint" => label)
        .increment(prompt_tokens as u64);
    // All or nothing: if one prompt is refused, the admitted ones are
    // dropped, which cancels them.
    let streams = futures_util::future::try_join_all(groups.iter().map(|g| start_all(&state, g)))
        .await
        .map_err(|e| {
            name_constraint(e, &m, tools.as_ref().is_some_and(|t| t.schema().is_some()))
        })?;
    let ctx = Ctx {
        id,
        created: unix_now(),
        model: state.answer_model(&common.params.adapter),
        endpoint: ep,
        label,
        logprobs: groups[0].logprobs,
        include_usage: common.include_usage,
        continuous_usage: common.continuous_usage,
        prompt_tokens,
        per_prompt,
        echo: echoes,
        scored_prompts,
        echo_scored,
        prompt_logprobs: vllm_scores,
        tools: tools.filter(|t| t.calls()),
        tokenizer: state.tokenizer.clone(),
        start,
    };
    let mut choices = SelectAll::new();
    for (p, (g, s)) in groups.iter().zip(streams).enumerate() {
        decoders(&state, g, s, p * per_prompt, &mut choices);
    }
    let ttft = Ttft::new(start, label);
    if common.stream {
        Ok(sse_response(ctx, choices, ttft))
    } else {
        complete(ctx, choices, ttft).await
    }
}

async fn complete(
    ctx: Ctx,
    mut choices: SelectAll<ChoiceStream>,
    ttft: Arc<Ttft>,
) -> Result<Response, ApiError> {
    let n = ctx.prompts() * ctx.per_prompt;
    let mut got: Vec<Collected> = (0..n).map(|_| Collected::default()).collect();
    while let Some((i, out)) = choices.next().await {
        match out {
            ChoiceOut::Error(e) => return Err(ApiError::from(e)),
            ChoiceOut::Delta(d) => {
                ttft.mark();
                metrics::counter!(tandem_cluster::metrics::GENERATED_TOKENS, "endpoint" => ctx.label)
                    .increment(d.tokens.len() as u64);
                let c = &mut got[i];
                if d.finish.is_some() {
                    c.stop_reason = stop_reason(&d);
                }
                c.text.push_str(&d.text);
                c.tokens.extend(d.tokens);
                if d.prompt_logprobs.is_some() {
                    c.prompt_logprobs = d.prompt_logprobs;
                }
                if d.finish.is_some() {
                    c.finish = d.finish;
                    c.completion_tokens = d.completion_tokens;
                    c.cached_tokens = d.cached_tokens;
                }
            }
        }
    }
    drop(choices);
    let completion: u64 = got.iter().map(|c| c.completion_tokens as u64).sum();
    // The choices of a prompt share its cached prefix: counted once each.
    let cached = got
        .chunks(ctx.per_prompt)
        .map(|g| g.iter().map(|c| c.cached_tokens).max().unwrap_or(0))
        .sum();
    let choices_json: Vec<Value> = got
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let finish = c.finish.map(FinishReason::as_str);
            let p = i / ctx.per_prompt;
            let lp = if ctx.echo_scored {
                echoed_logprobs_json(&ctx, p, c)
            } else {
                logprobs_json(&ctx, &c.tokens, 0)
            };
            match ctx.endpoint {
                Endpoint::Chat => {
                    let (message, finish) = chat_message(&ctx, c);
                    json!({"index": i, "message": message, "logprobs": lp,
                           "finish_reason": finish, "stop_reason": c.stop_reason})
                }
                Endpoint::Completions => {
                    let mut v = json!({
                        "index": i,
                        "text": format!("{}{}", ctx.echo[p], c.text),
                        "logprobs": lp,
                        "finish_reason": finish,
                        "stop_reason": c.stop_reason,
                    });
                    if ctx.prompt_logprobs.is_some() {
                        v["prompt_logprobs"] =
                            vllm_prompt_logprobs(&ctx, c.prompt_logprobs.as_deref());
                    }
                    v
                }
            }
        })
        .collect();
    let object = match ctx.endpoint {
        Endpoint::Chat => "chat.completion",
        Endpoint::Completions => "text_completion",
    };
    metrics::histogram!(tandem_cluster::metrics::REQUEST_DURATION, "endpoint" => ctx.label)
        .record(ctx.start.elapsed().as_secs_f64());
    let mut body = json!({
        "id": ctx.id,
        "object": object,
        "created": ctx.created,
        "model": ctx.model,
        "system_fingerprint": null,
        "choices": choices_json,
        "usage": usage_json(ctx.prompt_tokens, completion, cached),
    });
    // vLLM puts a chat's prompt scores beside its choices (one prompt).
    if ctx.endpoint == Endpoint::Chat && ctx.prompt_logprobs.is_some() {
        body["prompt_logprobs"] = vllm_prompt_logprobs(&ctx, got[0].prompt_logprobs.as_deref());
    }
    Ok(axum::Json(body).into_response())
}

// ---------------------------------------------------------------------------
// Streaming

struct Sse {
    ctx: Ctx,
    choices: SelectAll<ChoiceStream>,
    /// Per choice, when the output may hold tool calls: a named call's id
    /// once its first piece went out; what a required or auto choice holds
    /// back.
    call_ids: Vec<Option<String>>,
    call_streams: Vec<super::tools::CallStream>,
    /// Per choice, the calls of a required choice as they are written.
    call_scanners: Vec<super::tools::CallScanner>,
    queue: VecDeque<(Bytes, Option<Instant>)>,
    completion_tokens: u64,
    /// Per choice, the tokens generated so far (its final count once it
    /// finished), for `continuous_usage_stats`.
    generated: Vec<u64>,
    /// Per prompt, the longest cached prefix its choices reported.
    cached_tokens: Vec<u32>,
    ttft: Arc<Ttft>,
    done: bool,
}

fn sse_event(v: &Value) -> Bytes {
    let mut s = String::with_capacity(256);
    s.push_str("data: ");
    s.push_str(&v.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}

impl Sse {
    fn chunk(&self, choice: Value) -> Value {
        let object = match self.ctx.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut v = json!({
            "id": self.ctx.id,
            "object": object,
            "created": self.ctx.created,
            "model": self.ctx.model,
            "system_fingerprint": null,
            "choices": [choice],
        });
        if self.ctx.continuous_usage {
            v["usage"] = usage_json(
                self.ctx.prompt_tokens,
                self.generated.iter().sum(),
                self.cached_tokens.iter().sum(),
            );
        } else if self.ctx.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// Queues the chunk of one delta (none when it carries nothing visible).
    fn on_delta(&mut self, index: usize, d: super::ChoiceDelta) {
        metrics::counter!(tandem_cluster::metrics::GENERATED_TOKENS, "endpoint" => self.ctx.label)
            .increment(d.tokens.len() as u64);
        self.generated[index] += d.tokens.len() as u64;
        if d.finish.is_some() {
            self.generated[index] = d.completion_tokens as u64;
        }
        let p = index / self.ctx.per_prompt;
        if let Some(scores) = &d.prompt_logprobs {
            // The prompt's scores open the choice: an echoed prompt with
            // them, and vLLM's `prompt_logprobs` beside.
            let mut c = match self.ctx.endpoint {
                Endpoint::Chat => {
                    json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": null})
                }
                Endpoint::Completions if self.ctx.echo_scored => {
                    let lp = prompt_logprobs_json(&self.ctx, p, scores);
                    json!({"index": index, "text": self.ctx.echo[p], "logprobs": lp, "finish_reason": null})
                }
                Endpoint::Completions => {
                    json!({"index": index, "text": "", "logprobs": null, "finish_reason": null})
                }
            };
            if self.ctx.prompt_logprobs.is_some() {
                c["prompt_logprobs"] = vllm_prompt_logprobs(&self.ctx, Some(scores));
            }
            let bytes = sse_event(&self.chunk(c));
            self.queue.push_back((bytes, Some(d.received)));
        }
        let wants_lp = self.ctx.logprobs.is_some() && !d.tokens.is_empty();
        if d.text.is_empty() && d.finish.is_none() && !wants_lp {
            return;
        }
        if let Some(_f) = d.finish {
            self.completion_tokens += d.completion_tokens as u64;
            let c = &mut self.cached_tokens[index / self.ctx.per_prompt];
            *c = (*c).max(d.cached_tokens);
        }
        let lp = if wants_lp {
            // Offsets in an echoed completion count the prompt's text.
            let base = match self.ctx.echo_scored {
                true => self.ctx.echo[p].chars().count(),
                false => 0,
            };
            logprobs_json(&self.ctx, &d.tokens, base)
        } else {
            Value::Null
        };
        let finish = d.finish.map(FinishReason::as_str);
        let choice = match self.ctx.endpoint {
            Endpoint::Chat if self.ctx.tools.is_some() => {
                let (delta, finish) = self.call_delta(index, &d.text, d.finish);
                let quiet = delta.as_object().is_some_and(Map::is_empty) && lp.is_null();
                if quiet && finish.is_none() {
                    // A required call's text, held until it is whole.
                    return;
                }
                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
            Endpoint::Chat => {
                let delta = if d.text.is_empty() && d.finish.is_some() {
                    json!({})
                } else {
                    json!({"content": d.text})
                };
                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": index, "text": d.text, "logprobs": lp, "finish_reason": finish})
            }
        };
        let mut choice = choice;
        if d.finish.is_some() {
            choice["stop_reason"] = stop_reason(&d);
        }
        let bytes = sse_event(&self.chunk(choice));
        self.queue.push_back((bytes, Some(d.received)));
    }

    /// The delta of a tool-call choice: a named call streams its
    /// `arguments` (id, type and name on the first piece); a required
    /// choice streams each call as it is written (its name once known,
    /// then its arguments); an auto choice streams its text up to a
    /// `<tool_call>` and its calls when it finishes. Calls that do not
    /// parse (cut by `max_tokens`) go out as text, except a required
    /// choice's, which went out as they came.
    fn call_delta(
        &mut self,
        index: usize,
        text: &str,
        finish: Option<FinishReason>,
    ) -> (Value, Option<&'static str>) {
        let tools = self.ctx.tools.as_ref().expect("a tool-call request");
        let reason = finish.map(FinishReason::as_str);
        if let Some(name) = tools.named() {
            if text.is_empty() {
                return (json!({}), reason);
            }
            let call = match &self.call_ids[index] {
                Some(_) => json!({"index": 0, "function": {"arguments": text}}),
                None => {
                    let id = super::tools::call_id();
                    self.call_ids[index] = Some(id.clone());
                    json!({"index": 0, "id": id, "type": "function",
                           "function": {"name": name, "arguments": text}})
                }
            };
            return (json!({"tool_calls": [call]}), reason);
        }
        let stream = &mut self.call_streams[index];
        let mut content = stream.push(tools, text);
        let mut delta = Map::new();
        let mut reason = reason;
        if let ToolChoice::Required { .. } = tools.choice {
            let scan = &mut self.call_scanners[index];
            let calls: Vec<Value> = scan
                .push(text)
                .into_iter()
                .map(|p| match p {
                    CallPiece::Start { index, name } => json!({
                        "index": index, "id": super::tools::call_id(), "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }),
                    CallPiece::Args { index, text } => {
                        json!({"index": index, "function": {"arguments": text}})
                    }
                })
                .collect();
            if !calls.is_empty() {
                delta.insert("tool_calls".into(), Value::Array(calls));
            }
            if scan.started() > 0 {
                if finish == Some(FinishReason::Stop) {
                    reason = Some("tool_calls");
                }
                return (Value::Object(delta), reason);
            }
        }
        if finish.is_some() {
            let (rest, calls) = stream.finish(tools);
            content.push_str(&rest);
            if let Some(calls) = calls {
                delta.insert("tool_calls".into(), super::tools::calls_json(&calls, true));
                if finish == Some(FinishReason::Stop) {
                    reason = Some("tool_calls");
                }
            }
        }
        if !content.is_empty() {
            delta.insert("content".into(), json!(content));
        }
        (Value::Object(delta), reason)
    }

    fn on_end(&mut self) {
        if self.ctx.include_usage {
            let mut v = self.chunk(Value::Null);
            v["choices"] = json!([]);
            v["usage"] = usage_json(
                self.ctx.prompt_tokens,
                self.completion_tokens,
                self.cached_tokens.iter().sum(),
            );
            self.queue.push_back((sse_event(&v), None));
        }
        self.queue
            .push_back((Bytes::from_static(b"data: [DONE]\n\n"), None));
        self.finish_metrics();
    }

    fn on_error(&mut self, e: DispatchError) {
        let err = ApiError::from(e);
        tracing::warn!(id = %self.ctx.id, error = %err.message, "generation failed mid-stream");
        // The openai client raises APIError on an event with an `error` key;
        // `[DONE]` still closes the stream, as vLLM's does, for clients
        // that wait for it.
        self.queue.push_back((sse_event(&err.body()), None));
        self.queue
            .push_back((Bytes::from_static(b"data: [DONE]\n\n"), None));
        // Cancel the other choices now.
        self.choices = SelectAll::new();
        self.finish_metrics();
    }

    fn finish_metrics(&self) {
        metrics::histogram!(tandem_cluster::metrics::REQUEST_DURATION, "endpoint" => self.ctx.label)
            .record(self.ctx.start.elapsed().as_secs_f64());
    }
}

/// The SSE body. It owns the choices' [`TokenStream`]s: when the client
/// disconnects, hyper drops the body and with it the streams, which cancels
/// the generations on the workers.
fn sse_response(ctx: Ctx, choices: SelectAll<ChoiceStream>, ttft: Arc<Ttft>) -> Response {
    let n = choices.len();
    let mut s = Sse {
        call_ids: vec![None; n],
        call_streams: (0..n).map(|_| Default::default()).collect(),
        call_scanners: (0..n).map(|_| Default::default()).collect(),
        generated: vec![0; n],
        cached_tokens: vec![0; ctx.prompts()],
        ctx,
        choices,
        queue: VecDeque::new(),
        completion_tokens: 0,
        ttft,
        done: false,
    };
    // A forced call has no text: its content is null from the first chunk,
    // as in the whole answer (and OpenAI's stream).
    let content = match s.ctx.tools.as_ref().is_some_and(|t| t.forced()) {
        true => Value::Null,
        false => json!(""),
    };
    for i in 0..n {
        // Chat opens each choice with its role; an echoed completion with
        // its prompt.
        let c = match s.ctx.endpoint {
            Endpoint::Chat => json!({
                "index": i,
                "delta": {"role": "assistant", "content": content},
                "logprobs": null,
                "finish_reason": null,
            }),
            Endpoint::Completions => {
                let echo = &s.ctx.echo[i / s.ctx.per_prompt];
                // A scored prompt is echoed with its scores, once they come.
                if echo.is_empty() || s.ctx.echo_scored {
                    continue;
                }
                json!({"index": i, "text": echo, "logprobs": null, "finish_reason": null})
            }
        };
        let b = sse_event(&s.chunk(c));
        s.queue.push_back((b, None));
    }
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some((bytes, received)) = s.queue.pop_front() {
                if let Some(r) = received {
                    record_relay(r);
                }
                return Some((Ok::<Bytes, std::convert::Infallible>(bytes), s));
            }
            if s.done {
                return None;
            }
            match s.choices.next().await {
                Some((i, ChoiceOut::Delta(d))) => {
                    s.ttft.mark();
                    s.on_delta(i, d);
                }
                Some((_, ChoiceOut::Error(e))) => {
                    s.on_error(e);
                    s.done = true;
                }
                None => {
                    s.on_end();
                    s.done = true;
                }
            }
        }
    });
    sse_body(stream)
}

/// An event-stream response over `events` (unbuffered by proxies).
pub(super) fn sse_body(
    events: impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let mut resp = Response::new(Body::from_stream(events));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
