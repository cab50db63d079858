//! OpenAI's Responses API (`POST /v1/responses`), served as a translation
//! of chat completions: the request becomes a chat request (input items
//! become messages, `instructions` the system message, `text.format` the
//! `response_format`, flat function tools chat tools), runs through the
//! chat path (template, validation, routing, tool calls, streaming), and
//! its answer is rewritten as a response object, or as the Responses
//! stream's typed events. One generation path serves both APIs, so a
//! response says exactly what the same chat request would.
//!
//! Responses are not stored: `previous_response_id` and `background` are
//! refused with a 400 saying so (send the conversation in `input`, as with
//! `store: false`), and the object says `"store": false`.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::openai::{field, wrong_type};
use super::rewrite::expect;
use super::{random_id, unix_now, ApiError, ApiState};

/// Chat-request fields the Responses API names differently, for errors the
/// chat path reports.
const RENAMED: &[(&str, &str)] = &[
    ("messages", "input"),
    ("max_completion_tokens", "max_output_tokens"),
    ("response_format", "text.format"),
];

/// The Responses API's spelling of chat's tool choices `"auto"`,
/// `"required"`, a named function and `"none"`.
const TOOL_CHOICES: [&str; 4] = [
    "\"auto\"",
    "\"required\"",
    "{\"type\": \"function\", \"name\": ...}",
    "\"none\"",
];

/// The text of a content part list (`input_text`, `output_text`, `text`).
fn content_text(v: &Value, param: &str) -> Result<Value, ApiError> {
    match v {
        Value::String(_) => Ok(v.clone()),
        Value::Array(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let p = format!("{param}[{j}]");
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "input_text" | "output_text" | "text" => {
                        let text = expect(
                            part.get("text"),
                            &format!("{p}.text"),
                            "a string",
                            Value::as_str,
                        )?;
                        out.push(json!({"type": "text", "text": text}));
                    }
                    "refusal" => {
                        let text = part.get("refusal").and_then(Value::as_str).unwrap_or("");
                        out.push(json!({"type": "text", "text": text}));
                    }
                    other => {
                        return Err(ApiError::unsupported(
                            &format!("{p}.type"),
                            &format!(" (content part type '{other}'; only text)"),
                        ))
                    }
                }
            }
            Ok(Value::Array(out))
        }
        _ => Err(wrong_type(
            param,
            "a string or an array of content parts",
            v,
        )),
    }
}

/// `input` (a string, or a list of items) as chat messages.
fn input_messages(input: &Value) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        Value::String(s) => return Ok(vec![json!({"role": "user", "content": s})]),
        Value::Array(items) => items,
        _ => {
            return Err(wrong_type(
                "input",
                "a string or an array of input items",
                input,
            ))
        }
    };
    let mut out: Vec<Value> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let p = format!("input[{i}]");
        let o = item
            .as_object()
            .ok_or_else(|| wrong_type(&p, "an object", item))?;
        let kind = o.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "message" => {
                let role = expect(
                    o.get("role"),
                    &format!("{p}.role"),
                    "a string",
                    Value::as_str,
                )?;
                let content = o.get("content").ok_or_else(|| {
                    ApiError::invalid(
                        format!("'{p}.content' is required"),
                        Some(&format!("{p}.content")),
                    )
                })?;
                out.push(json!({"role": role, "content": content_text(content, &format!("{p}.content"))?}));
            }
            "function_call" => {
                let s = |k: &str| -> Result<&str, ApiError> {
                    expect(o.get(k), &format!("{p}.{k}"), "a string", Value::as_str)
                };
                let call = json!({
                    "id": s("call_id")?,
                    "type": "function",
                    "function": {"name": s("name")?, "arguments": s("arguments")?},
                });
                // Consecutive calls are one assistant turn.
                match out.last_mut() {
                    Some(last)
                        if last["role"] == "assistant" && last.get("tool_calls").is_some() =>
                    {
                        last["tool_calls"]
                            .as_array_mut()
                            .expect("an array")
                            .push(call);
                    }
                    _ => out
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let call_id = expect(
                    o.get("call_id"),
                    &format!("{p}.call_id"),
                    "a string",
                    Value::as_str,
                )?;
                let output = match o.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ Value::Array(_)) => match content_text(v, &format!("{p}.output"))? {
                        Value::Array(parts) => parts
                            .iter()
                            .filter_map(|x| x["text"].as_str())
                            .collect::<String>(),
                        other => other.as_str().unwrap_or_default().to_string(),
                    },
                    other => {
                        let got = other.unwrap_or(&Value::Null);
                        return Err(wrong_type(&format!("{p}.output"), "a string", got));
                    }
                };
                out.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            // Earlier reasoning carries nothing this server reads back.
            "reasoning" => {}
            other => {
                return Err(ApiError::unsupported(
                    &format!("{p}.type"),
                    &format!(" (input item type '{other}'; messages and function calls are)"),
                ))
            }
        }
    }
    Ok(out)
}

/// The chat request a Responses request stands for.
fn chat_request(m: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    for (k, why) in [
        (
            "previous_response_id",
            " (responses are not stored: send the whole conversation in 'input')",
        ),
        (
            "conversation",
            " (responses are not stored: send the whole conversation in 'input')",
        ),
        ("background", " (responses run in the foreground)"),
        ("prompt", " (stored prompt templates are not available)"),
    ] {
        match m.get(k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(_) => return Err(ApiError::unsupported(k, why)),
        }
    }
    let mut c = Map::new();
    let mut messages = Vec::new();
    match field(m, "instructions") {
        None => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(v) => return Err(wrong_type("instructions", "a string", v)),
    }
    let input = m
        .get("input")
        .ok_or_else(|| ApiError::invalid("'input' is required", Some("input")))?;
    messages.extend(input_messages(input)?);
    c.insert("messages".into(), Value::Array(messages));
    for k in [
        "model",
        "temperature",
        "top_p",
        "stream",
        "parallel_tool_calls",
        "seed",
        "user",
    ] {
        if let Some(v) = field(m, k) {
            c.insert(k.into(), v.clone());
        }
    }
    if let Some(v) = field(m, "max_output_tokens") {
        c.insert("max_completion_tokens".into(), v.clone());
    }
    if let Some(n) = m
        .get("top_logprobs")
        .and_then(Value::as_u64)
        .filter(|&n| n > 0)
    {
        c.insert("logprobs".into(), json!(true));
        c.insert("top_logprobs".into(), json!(n));
    }
    if c.get("stream").and_then(Value::as_bool) == Some(true) {
        c.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let format = field(m, "text").and_then(|t| t.get("format"));
    if let Some(format) = format.filter(|v| !v.is_null()) {
        let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "text" => {}
            "json_object" => {
                c.insert("response_format".into(), json!({"type": "json_object"}));
            }
            "json_schema" => {
                let mut schema = Map::new();
                for k in ["name", "schema", "strict", "description"] {
                    if let Some(v) = format.get(k) {
                        schema.insert(k.into(), v.clone());
                    }
                }
                c.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": schema}),
                );
            }
            other => {
                return Err(ApiError::unsupported(
                    "text.format.type",
                    &format!(" ('{other}'; text, json_object or json_schema)"),
                ))
            }
        }
    }
    if let Some(tools) = field(m, "tools") {
        let arr = tools
            .as_array()
            .ok_or_else(|| wrong_type("tools", "an array", tools))?;
        let mut out = Vec::with_capacity(arr.len());
        for (i, t) in arr.iter().enumerate() {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(ApiError::unsupported(
                    &format!("tools[{i}].type"),
                    &format!(" (tool type '{kind}'; only function tools)"),
                ));
            }
            let mut f = Map::new();
            for k in ["name", "description", "parameters", "strict"] {
                if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                    f.insert(k.into(), v.clone());
                }
            }
            out.push(json!({"type": "function", "function": f}));
        }
        if !out.is_empty() {
            c.insert("tools".into(), Value::Array(out));
        }
    }
    match field(m, "tool_choice") {
        None => {}
        Some(Value::String(s)) => {
            c.insert("tool_choice".into(), json!(s));
        }
        Some(v) if v.get("type").and_then(Value::as_str) == Some("function") => {
            let name = expect(v.get("name"), "tool_choice.name", "a string", Value::as_str)?;
            c.insert(
                "tool_choice".into(),
                json!({"type": "function", "function": {"name": name}}),
            );
        }
        Some(_) => {
            return Err(ApiError::unsupported(
                "tool_choice",
                " (\"auto\", \"none\", \"required\" or a function)",
            ))
        }
    }
    Ok(c)
}

/// What a response object repeats of its request.
struct Echo {
    id: String,
    created_at: u64,
    model: String,
    request: Map<String, Value>,
}

impl Echo {
    /// The response object with `status`, `output` and `usage`.
    fn object(&self, status: &str, output: Vec<Value>, usage: Value, incomplete: Value) -> Value {
        let r = &self.request;
        let get = |k: &str, default: Value| r.get(k).cloned().unwrap_or(default);
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            // When it ended; a response in progress or cut short has none.
            "completed_at": (status == "completed").then(super::unix_now),
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": get("instructions", Value::Null),
            "max_output_tokens": get("max_output_tokens", Value::Null),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": get("parallel_tool_calls", json!(true)),
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": false,
            "temperature": get("temperature", json!(1.0)),
            "text": get("text", json!({"format": {"type": "text"}})),
            "tool_choice": get("tool_choice", json!("auto")),
            "tools": get("tools", json!([])),
            "top_p": get("top_p", json!(1.0)),
            "top_logprobs": get("top_logprobs", Value::Null),
            "truncation": "disabled",
            "usage": usage,
            "user": get("user", Value::Null),
            "metadata": get("metadata", json!({})),
        })
    }
}

/// A chat answer's usage as Responses usage.
fn usage(u: &Value) -> Value {
    if u.is_null() {
        return Value::Null;
    }
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let cached = u
        .pointer("/prompt_tokens_details/cached_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    json!({
        "input_tokens": n("prompt_tokens"),
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": n("completion_tokens"),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": n("total_tokens"),
    })
}

/// `status` and `incomplete_details` for a chat finish reason.
fn status_of(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        _ => ("completed", Value::Null),
    }
}

fn message_item(id: &str, text: &str, status: &str, logprobs: Value) -> Value {
    json!({
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": [text_part(text, logprobs)],
    })
}

fn text_part(text: &str, logprobs: Value) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

fn call_item(call: &Value, status: &str) -> Value {
    let call_id = call["id"].as_str().unwrap_or_default();
    json!({
        "type": "function_call",
        "id": format!("fc_{}", call_id.trim_start_matches("call_")),
        "call_id": call_id,
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": status,
    })
}

/// Chat's per-token log-probabilities as Responses ones.
fn logprobs(lp: &Value) -> Value {
    let Some(content) = lp.get("content").and_then(Value::as_array) else {
        return json!([]);
    };
    Value::Array(
        content
            .iter()
            .map(|t| {
                json!({
                    "token": t["token"],
                    "logprob": t["logprob"],
                    "bytes": t["bytes"],
                    "top_logprobs": t["top_logprobs"],
                })
            })
            .collect(),
    )
}

/// The output items of a whole chat message; `status` is the last
/// item's (`incomplete` when the output was cut), the others' `completed`.
fn output_items(id: &str, message: &Value, lp: Value, status: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let text = message["content"].as_str().unwrap_or_default();
    let calls = message["tool_calls"].as_array().filter(|c| !c.is_empty());
    if !text.is_empty() || calls.is_none() {
        let status = if calls.is_some() { "completed" } else { status };
        out.push(message_item(&format!("msg_{id}"), text, status, lp));
    }
    let calls = calls.map(Vec::as_slice).unwrap_or_default();
    for (i, call) in calls.iter().enumerate() {
        let last = i + 1 == calls.len();
        out.push(call_item(call, if last { status } else { "completed" }));
    }
    out
}

pub(super) async fn create(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    super::openai::counted("responses", async {
        match run(state, body).await {
            Ok(r) => r,
            Err(mut e) => {
                super::rewrite::rename_param(&mut e, RENAMED, TOOL_CHOICES);
                e.into_response()
            }
        }
    })
    .await
}

async fn run(
    state: Arc<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (m, stream, answer) =
        super::rewrite::run_as_chat(&state, body, "responses", chat_request).await?;
    let echo = Echo {
        id: format!("resp_{}", random_id()),
        created_at: unix_now(),
        model: state.answer_model(&super::openai::check_model_field(&state, &m)?),
        request: m,
    };
    if stream {
        return Ok(stream_response(echo, answer));
    }
    let c = super::rewrite::chat_json(answer).await?;
    let choice = &c["choices"][0];
    let (status, incomplete) = status_of(choice["finish_reason"].as_str());
    let item_id = echo.id.trim_start_matches("resp_").to_string();
    let output = output_items(
        &item_id,
        &choice["message"],
        logprobs(&choice["logprobs"]),
        status,
    );
    Ok(axum::Json(echo.object(status, output, usage(&c["usage"]), incomplete)).into_response())
}

/// Rewrites a chat SSE stream as the Responses stream's events: a message
/// item while text comes, a function call item per call as its pieces
/// come; each item is done when the next begins.
struct Events {
    echo: Echo,
    seq: u64,
    msg_id: String,
    /// The item being written.
    open: Option<OpenItem>,
    /// The items done.
    output: Vec<Value>,
    text: String,
    logprobs: Vec<Value>,
    finish: Option<String>,
    usage: Value,
    out: VecDeque<Bytes>,
}

enum OpenItem {
    Message {
        index: usize,
        id: String,
    },
    /// Chat call `chat`, as chat shapes it (`id`, `function.name`,
    /// `function.arguments` so far).
    Call {
        chat: u64,
        index: usize,
        call: Value,
    },
}

impl Events {
    fn emit(&mut self, kind: &str, mut v: Value) {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.out
            .push_back(Bytes::from(format!("event: {kind}\ndata: {v}\n\n")));
    }

    /// The open message item, opened if need be: its output index and id.
    fn open_message(&mut self) -> (usize, String) {
        if let Some(OpenItem::Message { index, id }) = &self.open {
            return (*index, id.clone());
        }
        self.close_item("completed");
        let index = self.output.len();
        let id = match index {
            0 => self.msg_id.clone(),
            n => format!("{}_{n}", self.msg_id),
        };
        let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
        self.emit(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        self.emit(
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": text_part("", json!([]))}),
        );
        self.open = Some(OpenItem::Message {
            index,
            id: id.clone(),
        });
        (index, id)
    }

    /// The open item of chat call `chat`, opened if need be: its output
    /// index and item id.
    fn open_call(&mut self, chat: u64, id: &Value, name: &Value) -> (usize, Value) {
        if let Some(OpenItem::Call {
            chat: c,
            index,
            call,
        }) = &self.open
        {
            if *c == chat {
                return (*index, call_item(call, "in_progress")["id"].clone());
            }
        }
        self.close_item("completed");
        let index = self.output.len();
        let call = json!({"id": id, "function": {"name": name, "arguments": ""}});
        let item = call_item(&call, "in_progress");
        let item_id = item["id"].clone();
        self.emit(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        self.open = Some(OpenItem::Call { chat, index, call });
        (index, item_id)
    }

    /// Finishes the open item, if any, as `status`.
    fn close_item(&mut self, status: &str) {
        match self.open.take() {
            None => {}
            Some(OpenItem::Message { index, id }) => {
                let text = std::mem::take(&mut self.text);
                let lp = Value::Array(std::mem::take(&mut self.logprobs));
                let item = message_item(&id, &text, status, lp.clone());
                self.emit(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": lp}),
                );
                self.emit(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": item["content"][0]}),
                );
                self.emit(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.output.push(item);
            }
            Some(OpenItem::Call { index, call, .. }) => {
                let done = call_item(&call, status);
                self.emit(
                    "response.function_call_arguments.done",
                    json!({"item_id": done["id"], "output_index": index, "arguments": done["arguments"]}),
                );
                self.emit(
                    "response.output_item.done",
                    json!({"output_index": index, "item": done}),
                );
                self.output.push(done);
            }
        }
    }

    /// One chat chunk (`data:` payload).
    fn on_chunk(&mut self, c: &Value) {
        if let Some(e) = c.get("error") {
            let failed = {
                let mut r = self
                    .echo
                    .object("failed", Vec::new(), Value::Null, Value::Null);
                r["error"] = json!({
                    "code": e["code"].as_str().unwrap_or("server_error"),
                    "message": e["message"],
                });
                r
            };
            self.emit("response.failed", json!({"response": failed}));
            return;
        }
        if !c["usage"].is_null() {
            self.usage = usage(&c["usage"]);
        }
        let Some(choice) = c["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            let (index, id) = self.open_message();
            self.text.push_str(text);
            let lp = logprobs(&choice["logprobs"]);
            if let Some(a) = lp.as_array() {
                self.logprobs.extend(a.iter().cloned());
            }
            let v = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text, "logprobs": lp});
            self.emit("response.output_text.delta", v);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let n = call["index"].as_u64().unwrap_or(0);
            let f = &call["function"];
            let (index, item_id) = self.open_call(n, &call["id"], &f["name"]);
            if let Some(args) = f["arguments"].as_str().filter(|a| !a.is_empty()) {
                if let Some(OpenItem::Call { call, .. }) = &mut self.open {
                    let so_far = call["function"]["arguments"].as_str().unwrap_or_default();
                    call["function"]["arguments"] = json!(format!("{so_far}{args}"));
                }
                self.emit(
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": index, "delta": args}),
                );
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
    }

    /// Closes the items and the response, after the chat stream's end.
    fn on_end(&mut self) {
        let (status, incomplete) = status_of(self.finish.as_deref());
        if self.open.is_none() && self.output.is_empty() {
            // Nothing at all: an empty message.
            self.open_message();
        }
        self.close_item(status);
        let output = std::mem::take(&mut self.output);
        let usage = std::mem::take(&mut self.usage);
        let r = self.echo.object(status, output, usage, incomplete);
        let kind = if status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.emit(kind, json!({"response": r}));
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

/// The Responses stream over a chat SSE answer.
fn stream_response(echo: Echo, answer: Response) -> Response {
    let msg_id = format!("msg_{}", echo.id.trim_start_matches("resp_"));
    let mut ev = Events {
        echo,
        seq: 0,
        msg_id,
        open: None,
        output: Vec::new(),
        text: String::new(),
        logprobs: Vec::new(),
        finish: None,
        usage: Value::Null,
        out: VecDeque::new(),
    };
    let created = ev
        .echo
        .object("in_progress", Vec::new(), Value::Null, Value::Null);
    ev.emit("response.created", json!({"response": created.clone()}));
    ev.emit("response.in_progress", json!({"response": created}));
    super::rewrite::rewrite_chat_stream(answer, ev)
}
