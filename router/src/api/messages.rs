//! Anthropic's Messages API (`POST /v1/messages`), for clients written
//! against it (Anthropic's SDKs, and tools that speak it to local models),
//! served like the Responses API as a translation of chat completions: the
//! request becomes the chat request it stands for (`system` the system
//! message, content blocks text, `tool_use` / `tool_result` blocks the
//! chat tool turns, `input_schema` tools chat tools), and the chat answer
//! becomes a message with content blocks, a `stop_reason` and usage, or
//! the Messages stream's events. Errors come in Anthropic's shape.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::openai::{field, wrong_type};
use super::rewrite::expect;
use super::{random_id, ApiError, ApiState};

/// Chat-request fields the Messages API names differently.
const RENAMED: &[(&str, &str)] = &[
    ("max_completion_tokens", "max_tokens"),
    ("stop", "stop_sequences"),
    ("response_format", "output_config.format"),
];

/// Anthropic's spelling of chat's tool choices `"auto"`, `"required"`, a
/// named function and `"none"`.
const TOOL_CHOICES: [&str; 4] = [
    "{\"type\": \"auto\"}",
    "{\"type\": \"any\"}",
    "{\"type\": \"tool\", \"name\": ...}",
    "{\"type\": \"none\"}",
];

/// An error in Anthropic's shape, with the status of the OpenAI one.
pub(super) fn error_response(e: &ApiError) -> Response {
    let kind = match e.status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
        s if s.is_client_error() => "invalid_request_error",
        _ => "api_error",
    };
    let message = match &e.param {
        Some(p) if !e.message.contains(p.as_str()) => format!("{p}: {}", e.message),
        _ => e.message.clone(),
    };
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (e.status, axum::Json(body)).into_response()
}

/// The text of a string or a list of text blocks.
fn blocks_text(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => out.push_str(expect(
                        b.get("text"),
                        &format!("{param}[{j}].text"),
                        "a string",
                        Value::as_str,
                    )?),
                    other => {
                        return Err(ApiError::unsupported(
                            &format!("{param}[{j}].type"),
                            &format!(" (block type '{}'; only text here)", other.unwrap_or("")),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(wrong_type(param, "a string or an array of text blocks", v)),
    }
}

/// One Messages message as chat messages (a user turn with tool results
/// becomes one `tool` message per result, then the rest of its text).
fn chat_messages(i: usize, msg: &Value, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let p = format!("messages[{i}]");
    let role = expect(
        msg.get("role"),
        &format!("{p}.role"),
        "a string",
        Value::as_str,
    )?;
    if role != "user" && role != "assistant" {
        return Err(ApiError::bad_param(
            &format!("{p}.role"),
            format!("'{p}.role' must be \"user\" or \"assistant\", got {role:?}"),
        ));
    }
    let content = msg.get("content").ok_or_else(|| {
        ApiError::invalid(
            format!("'{p}.content' is required"),
            Some(&format!("{p}.content")),
        )
    })?;
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Value::Array(b) => b,
        _ => {
            return Err(wrong_type(
                &format!("{p}.content"),
                "a string or an array of blocks",
                content,
            ))
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bp = format!("{p}.content[{j}]");
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => {
                let tp = format!("{bp}.text");
                let t = expect(b.get("text"), &tp, "a string", Value::as_str)?;
                if t.is_empty() {
                    // As Anthropic's API says it.
                    return Err(ApiError::bad_param(
                        &tp,
                        format!("'{tp}': text content blocks must be non-empty"),
                    ));
                }
                text.push_str(t);
            }
            "tool_use" if role == "assistant" => {
                let s = |k: &str| expect(b.get(k), &format!("{bp}.{k}"), "a string", Value::as_str);
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({
                    "id": s("id")?,
                    "type": "function",
                    "function": {"name": s("name")?, "arguments": input.to_string()},
                }));
            }
            "tool_result" if role == "user" => {
                let id = expect(
                    b.get("tool_use_id"),
                    &format!("{bp}.tool_use_id"),
                    "a string",
                    Value::as_str,
                )?;
                let result = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => blocks_text(c, &format!("{bp}.content"))?,
                };
                out.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
            }
            // Earlier reasoning carries nothing this server reads back.
            "thinking" | "redacted_thinking" => {}
            other => {
                return Err(ApiError::unsupported(
                    &format!("{bp}.type"),
                    &format!(" (block type '{other}' in a {role} message)"),
                ))
            }
        }
    }
    if !calls.is_empty() {
        let content = if text.is_empty() {
            Value::Null
        } else {
            json!(text)
        };
        out.push(json!({"role": "assistant", "content": content, "tool_calls": calls}));
    } else if !text.is_empty() || blocks.is_empty() {
        out.push(json!({"role": role, "content": text}));
    }
    Ok(())
}

/// The chat request a Messages request stands for.
fn chat_request(m: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    if let Some(t) = field(m, "thinking") {
        if t.get("type").and_then(Value::as_str) != Some("disabled") {
            return Err(ApiError::unsupported(
                "thinking",
                " (extended thinking is not available)",
            ));
        }
    }
    let mut c = Map::new();
    let mut messages = Vec::new();
    match field(m, "system") {
        None => {}
        Some(v) => messages.push(json!({"role": "system", "content": blocks_text(v, "system")?})),
    }
    let given = m
        .get("messages")
        .ok_or_else(|| ApiError::invalid("'messages' is required", Some("messages")))?;
    let arr = given
        .as_array()
        .ok_or_else(|| wrong_type("messages", "an array", given))?;
    if arr.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "'messages' must contain at least one message",
        ));
    }
    for (i, msg) in arr.iter().enumerate() {
        chat_messages(i, msg, &mut messages)?;
    }
    // A final assistant message is the start of the answer (Anthropic's
    // "prefill"): the model continues it, and the answer holds only what
    // it adds.
    let prefilled = messages.last().is_some_and(|l| {
        l["role"] == "assistant" && l.get("tool_calls").is_none() && l["content"].is_string()
    });
    if prefilled {
        c.insert("add_generation_prompt".into(), json!(false));
        c.insert("continue_final_message".into(), json!(true));
    }
    c.insert("messages".into(), Value::Array(messages));
    let max = m
        .get("max_tokens")
        .ok_or_else(|| ApiError::invalid("'max_tokens' is required", Some("max_tokens")))?;
    c.insert("max_completion_tokens".into(), max.clone());
    // Anthropic's range, narrower than chat's 0 to 2.
    if let Some(t) = field(m, "temperature") {
        if t.as_f64().is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            return Err(ApiError::bad_param(
                "temperature",
                format!("'temperature' must be between 0 and 1, got {t}"),
            ));
        }
    }
    for k in ["model", "temperature", "top_p", "top_k", "stream"] {
        if let Some(v) = field(m, k) {
            c.insert(k.into(), v.clone());
        }
    }
    // Structured output: `output_config.format` (a JSON schema); `effort`
    // has no meaning here.
    let format = field(m, "output_config").and_then(|o| o.get("format"));
    if let Some(format) = format.filter(|v| !v.is_null()) {
        match format.get("type").and_then(Value::as_str) {
            Some("json_schema") => {
                let schema = format.get("schema").ok_or_else(|| {
                    ApiError::invalid(
                        "'output_config.format.schema' is required",
                        Some("output_config.format.schema"),
                    )
                })?;
                c.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}),
                );
            }
            other => {
                return Err(ApiError::unsupported(
                    "output_config.format.type",
                    &format!(" ({:?}; only json_schema)", other.unwrap_or("")),
                ))
            }
        }
    }
    if let Some(v) = field(m, "stop_sequences") {
        c.insert("stop".into(), v.clone());
    }
    if c.get("stream").and_then(Value::as_bool) == Some(true) {
        // Usage on every chunk: `message_start` reports the prompt's size.
        c.insert(
            "stream_options".into(),
            json!({"include_usage": true, "continuous_usage_stats": true}),
        );
    }
    if let Some(tools) = field(m, "tools") {
        let arr = tools
            .as_array()
            .ok_or_else(|| wrong_type("tools", "an array", tools))?;
        let mut out = Vec::with_capacity(arr.len());
        for (i, t) in arr.iter().enumerate() {
            // Server tools (web search, code execution, …) carry a type.
            if let Some(kind) = t
                .get("type")
                .and_then(Value::as_str)
                .filter(|k| *k != "custom")
            {
                return Err(ApiError::unsupported(
                    &format!("tools[{i}].type"),
                    &format!(" (tool type '{kind}'; only client tools with an input_schema)"),
                ));
            }
            let mut f = Map::new();
            if let Some(v) = t.get("name") {
                f.insert("name".into(), v.clone());
            }
            if let Some(v) = t.get("description") {
                f.insert("description".into(), v.clone());
            }
            if let Some(v) = t.get("input_schema") {
                f.insert("parameters".into(), v.clone());
            }
            out.push(json!({"type": "function", "function": f}));
        }
        if !out.is_empty() {
            c.insert("tools".into(), Value::Array(out));
        }
    }
    if let Some(tc) = field(m, "tool_choice") {
        let choice = match tc.get("type").and_then(Value::as_str) {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => {
                let name = expect(
                    tc.get("name"),
                    "tool_choice.name",
                    "a string",
                    Value::as_str,
                )?;
                json!({"type": "function", "function": {"name": name}})
            }
            _ => {
                return Err(ApiError::unsupported(
                    "tool_choice",
                    " (auto, any, tool or none)",
                ))
            }
        };
        c.insert("tool_choice".into(), choice);
        if tc.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
            c.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    Ok(c)
}

/// A tool call's `input`: its arguments, which are a JSON object for a
/// whole call; a call cut short by `max_tokens` (`stop_reason` says so)
/// has the empty input, never keys its tool does not take.
fn call_input(arguments: &str) -> Value {
    match serde_json::from_str(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    }
}

fn tool_use_block(call: &Value) -> Value {
    json!({
        "type": "tool_use",
        "id": call["id"],
        "name": call["function"]["name"],
        "input": call_input(call["function"]["arguments"].as_str().unwrap_or("")),
    })
}

/// `stop_reason` and `stop_sequence` for a chat choice's finish (and
/// whether the answer holds tool calls).
fn stop_of(finish: Option<&str>, stop_string: &Value, calls: bool) -> (&'static str, Value) {
    match finish {
        Some("length") => ("max_tokens", Value::Null),
        _ if calls => ("tool_use", Value::Null),
        _ if stop_string.is_string() => ("stop_sequence", stop_string.clone()),
        _ => ("end_turn", Value::Null),
    }
}

/// Anthropic's usage of a chat usage. Its `input_tokens` are the prompt
/// tokens not read from the cache: clients add the three input counts up
/// for the prompt's size.
fn usage(u: &Value) -> Value {
    let n = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let cached = n("/prompt_tokens_details/cached_tokens");
    json!({
        "input_tokens": n("/prompt_tokens").saturating_sub(cached),
        "output_tokens": n("/completion_tokens"),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    })
}

/// A refusal the chat path found, under the Messages API's names.
fn refusal(mut e: ApiError) -> Response {
    super::rewrite::rename_param(&mut e, RENAMED, TOOL_CHOICES);
    if let Some(p) = e.param.as_mut().filter(|p| p.starts_with("tools[")) {
        *p = p.replace(".parameters", ".input_schema");
    }
    error_response(&e)
}

/// Anthropic's `count_tokens`: the prompt a Messages request would have
/// (system, messages, tools), without running it.
pub(super) async fn count_tokens(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let counted = super::openai::parse_object(body).and_then(|mut m| {
        // Only a request to run needs to say how long its answer may be,
        // or how its tools may be chosen: the tools are in the prompt
        // whatever the choice ("auto", which a run may refuse, counts as
        // "any" does).
        m.entry("max_tokens").or_insert(json!(1));
        let auto = match m.get("tool_choice") {
            None | Some(Value::Null) => true,
            Some(c) => c.get("type").and_then(Value::as_str) == Some("auto"),
        };
        if auto && m.contains_key("tools") {
            m.insert("tool_choice".into(), json!({"type": "any"}));
        }
        let chat = chat_request(&m)?;
        let tokens = super::openai::chat_prompt_of(&state, &chat)?;
        Ok(json!({"input_tokens": tokens.len()}))
    });
    let resp = match counted {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => refusal(e),
    };
    super::openai::count_request("messages_count_tokens", resp.status());
    resp
}

pub(super) async fn create(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    super::openai::counted("messages", async {
        match run(state, body).await {
            Ok(r) => r,
            Err(e) => refusal(e),
        }
    })
    .await
}

async fn run(
    state: Arc<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (m, stream, answer) =
        super::rewrite::run_as_chat(&state, body, "messages", chat_request).await?;
    let id = format!("msg_{}", random_id());
    let model = state.answer_model(&super::openai::check_model_field(&state, &m)?);
    if stream {
        return Ok(stream_response(id, model, answer));
    }
    let c = super::rewrite::chat_json(answer).await?;
    let choice = &c["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        content.push(tool_use_block(call));
    }
    let calls = content.iter().any(|b| b["type"] == "tool_use");
    let (stop_reason, stop_sequence) = stop_of(
        choice["finish_reason"].as_str(),
        &choice["stop_reason"],
        calls,
    );
    Ok(axum::Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage(&c["usage"]),
    }))
    .into_response())
}

/// Rewrites a chat SSE stream as the Messages stream's events: text
/// blocks as the text comes, a `tool_use` block per call as its pieces
/// come (its `input` as `input_json_delta`s).
struct Events {
    /// `message_start` without its usage, until the first chunk brings it.
    start: Option<Value>,
    /// The open block's index, and the chat call index of an open
    /// `tool_use` block (`None` for a text block).
    open: Option<(usize, Option<u64>)>,
    blocks: usize,
    /// A `tool_use` block went out.
    calls: bool,
    finish: Option<String>,
    stop_string: Value,
    usage: Value,
    out: VecDeque<Bytes>,
}

impl Events {
    fn emit(&mut self, kind: &str, mut v: Value) {
        v["type"] = json!(kind);
        self.out
            .push_back(Bytes::from(format!("event: {kind}\ndata: {v}\n\n")));
    }

    /// Sends `message_start` if it has not gone out yet.
    fn started(&mut self, usage: &Value) {
        if let Some(mut message) = self.start.take() {
            message["usage"] = json!({
                "input_tokens": usage["input_tokens"].as_u64().unwrap_or(0),
                "output_tokens": 0,
                "cache_read_input_tokens": usage["cache_read_input_tokens"].as_u64().unwrap_or(0),
                "cache_creation_input_tokens": 0,
            });
            self.emit("message_start", json!({"message": message}));
        }
    }

    fn close_block(&mut self) {
        if let Some((i, _)) = self.open.take() {
            self.emit("content_block_stop", json!({"index": i}));
        }
    }

    /// The open block if it is `want` (a text block, or the tool_use block
    /// of chat call `want`), else a new one that `block` describes.
    fn block(&mut self, want: Option<u64>, block: impl FnOnce() -> Value) -> usize {
        match self.open {
            Some((i, open)) if open == want => i,
            _ => {
                self.close_block();
                let i = self.blocks;
                self.blocks += 1;
                self.open = Some((i, want));
                self.emit(
                    "content_block_start",
                    json!({"index": i, "content_block": block()}),
                );
                i
            }
        }
    }

    fn on_chunk(&mut self, c: &Value) {
        if let Some(e) = c.get("error") {
            self.started(&Value::Null);
            // As the same failure before the stream would be named.
            let kind = match (e["type"].as_str(), e["code"].as_str()) {
                (Some("invalid_request_error"), _) => "invalid_request_error",
                (_, Some("service_unavailable")) => "overloaded_error",
                _ => "api_error",
            };
            self.emit(
                "error",
                json!({"error": {"type": kind, "message": e["message"]}}),
            );
            return;
        }
        if !c["usage"].is_null() {
            self.usage = usage(&c["usage"]);
        }
        let u = self.usage.clone();
        self.started(&u);
        let Some(choice) = c["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            let index = self.block(None, || json!({"type": "text", "text": ""}));
            self.emit(
                "content_block_delta",
                json!({"index": index, "delta": {"type": "text_delta", "text": text}}),
            );
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let n = call["index"].as_u64().unwrap_or(0);
            let f = &call["function"];
            let index = self.block(
                Some(n),
                || json!({"type": "tool_use", "id": call["id"], "name": f["name"], "input": {}}),
            );
            self.calls = true;
            if let Some(args) = f["arguments"].as_str().filter(|a| !a.is_empty()) {
                self.emit(
                    "content_block_delta",
                    json!({"index": index, "delta": {"type": "input_json_delta", "partial_json": args}}),
                );
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
            self.stop_string = choice["stop_reason"].clone();
        }
    }

    fn on_end(&mut self) {
        let u = self.usage.clone();
        self.started(&u);
        self.close_block();
        let (stop_reason, stop_sequence) =
            stop_of(self.finish.as_deref(), &self.stop_string, self.calls);
        let usage = std::mem::take(&mut self.usage);
        self.emit(
            "message_delta",
            json!({"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": usage}),
        );
        self.emit("message_stop", json!({}));
    }
}

impl super::rewrite::ChatEvents for Events {
    fn chunk(&mut self, c: &Value) {
        self.on_chunk(c);
    }
    fn end(&mut self) {
        self.on_end();
    }
    fn next_event(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }
}

/// The Messages stream over a chat SSE answer.
fn stream_response(id: String, model: String, answer: Response) -> Response {
    let start = json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null,
    });
    let ev = Events {
        start: Some(start),
        open: None,
        blocks: 0,
        calls: false,
        finish: None,
        stop_string: Value::Null,
        usage: Value::Null,
        out: VecDeque::new(),
    };
    super::rewrite::rewrite_chat_stream(answer, ev)
}
