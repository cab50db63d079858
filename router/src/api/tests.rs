//! In-process tests of the HTTP and gRPC front ends against a scripted backend
//! and the default model's real tokenizer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tandem_model::chat::ChatMessage;
use tandem_model::tokenizer::Tokenizer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::*;
use crate::dispatch::{
    Backend, BoxFuture, DispatchError, Finish, GenerationInput, SampledToken, Sampling, TokenEvent,
    TokenStream,
};

const MODEL: &str = "smollm2-test";
const CTX: usize = 8192;

fn tokenizer() -> Arc<Tokenizer> {
    static T: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        let path = tandem_model::default_model_path();
        assert!(
            path.exists(),
            "the default model is missing at {} (run `tandem model fetch`); these tests need its tokenizer",
            path.display()
        );
        let src = tandem_model::weights::ModelSource::open(&path).expect("open the default model");
        Arc::new(src.tokenizer().expect("build the tokenizer"))
    })
    .clone()
}

fn ids(text: &str) -> Vec<u32> {
    tokenizer().encode(text, false).unwrap()
}

/// Emits scripted tokens; records what it was asked and what was cancelled.
#[derive(Default)]
struct Script {
    /// Tokens per choice index (the last entry repeats for higher indices).
    tokens: Vec<Vec<u32>>,
    finish: Option<Finish>,
    /// `generate` itself fails.
    refuse: Option<DispatchError>,
    /// An error event after this many tokens.
    error_after: Option<(usize, DispatchError)>,
    /// Stay open (no finish) after the tokens, until cancelled.
    hang: bool,
    /// Extra completion tokens the backend reports (e.g. an EOS).
    extra_completion: u32,
    /// The stop token the backend reports ending on.
    stop_token: Option<u32>,
    /// The LoRA adapters the backend says its workers serve.
    adapters: Vec<String>,
}

struct Scripted {
    script: Script,
    inputs: Mutex<Vec<GenerationInput>>,
    cancelled: Arc<AtomicUsize>,
}

impl Scripted {
    fn new(script: Script) -> Arc<Self> {
        Arc::new(Self {
            script,
            inputs: Mutex::new(Vec::new()),
            cancelled: Arc::new(AtomicUsize::new(0)),
        })
    }
    fn inputs(&self) -> Vec<GenerationInput> {
        self.inputs.lock().unwrap().clone()
    }
}

impl Backend for Scripted {
    fn adapters(&self) -> Vec<String> {
        self.script.adapters.clone()
    }

    fn generate(
        &self,
        input: GenerationInput,
    ) -> BoxFuture<'_, Result<TokenStream, DispatchError>> {
        Box::pin(async move {
            self.inputs.lock().unwrap().push(input.clone());
            if let Some(e) = &self.script.refuse {
                return Err(e.clone());
            }
            let index: usize = input
                .request_id
                .rsplit('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let toks = self
                .script
                .tokens
                .get(index)
                .or(self.script.tokens.last())
                .cloned()
                .unwrap_or_default();
            let (tx, rx) = mpsc::channel(4);
            let cancel = CancellationToken::new();
            let guard = cancel.clone().drop_guard();
            let cancelled = self.cancelled.clone();
            let finish = self.script.finish.unwrap_or(Finish::Stop);
            let error_after = self.script.error_after.clone();
            let hang = self.script.hang;
            let extra = self.script.extra_completion;
            let stop_token = self.script.stop_token;
            let top_n = input.sampling.top_logprobs as usize;
            let prompt_len = input.prompt.len() as u32;
            // Scores -1, -2, ... for the prompt's tokens after the first,
            // each with `k` alternatives.
            let scores = input.sampling.prompt_logprobs.map(|k| {
                input.prompt[1..]
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| SampledToken {
                        id,
                        logprob: -1.0 - i as f32,
                        top: (0..k).map(|j| (id + j, -0.5 - j as f32)).collect(),
                        rank: Some(i as u32 + 1),
                    })
                    .collect::<Vec<_>>()
            });
            let max = input.max_tokens.map(|m| m as usize);
            // Counts generations dropped before they finished.
            let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
            {
                let (cancel, finished) = (cancel.clone(), finished.clone());
                tokio::spawn(async move {
                    cancel.cancelled().await;
                    if !finished.load(Ordering::SeqCst) {
                        cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
            tokio::spawn(async move {
                let run = async {
                    if let Some(lp) = scores {
                        if tx.send(TokenEvent::PromptLogprobs(lp)).await.is_err() {
                            return;
                        }
                    }
                    let mut sent = 0usize;
                    for (i, &id) in toks.iter().enumerate() {
                        if let Some((after, e)) = &error_after {
                            if i == *after {
                                let _ = tx.send(TokenEvent::Error(e.clone())).await;
                                return;
                            }
                        }
                        if max.is_some_and(|m| sent >= m) {
                            break;
                        }
                        let top = (0..top_n as u32)
                            .map(|k| (id + k, -0.5 - k as f32))
                            .collect();
                        let ev = TokenEvent::Token(SampledToken {
                            id,
                            logprob: -0.25,
                            top,
                            rank: None,
                        });
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                        sent += 1;
                    }
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    let reason = if max.is_some_and(|m| sent >= m) {
                        Finish::Length
                    } else {
                        finish
                    };
                    finished.store(true, Ordering::SeqCst);
                    let _ = tx
                        .send(TokenEvent::Finished {
                            reason,
                            prompt_tokens: prompt_len,
                            completion_tokens: sent as u32 + extra,
                            cached_tokens: 0,
                            stop_token: (reason == Finish::Stop).then_some(stop_token).flatten(),
                        })
                        .await;
                };
                tokio::select! {
                    _ = run => {}
                    _ = cancel.cancelled() => {}
                }
            });
            Ok(TokenStream::new(rx, guard))
        })
    }
}

fn state_with(backend: Arc<Scripted>, api_key: Option<&str>) -> Arc<ApiState> {
    Arc::new(
        ApiState::new(
            backend,
            tokenizer(),
            MODEL.to_string(),
            CTX,
            api_key.map(str::to_string),
        )
        .expect("ApiState::new"),
    )
}

fn text_script(text: &str) -> Script {
    Script {
        tokens: vec![ids(text)],
        ..Default::default()
    }
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut b = Request::builder().method(method).uri(uri);
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    let req = b
        .body(
            body.map(|s| Body::from(s.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), app.clone().oneshot(req))
        .await
        .expect("request timed out")
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("body timed out")
        .unwrap()
        .to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn post(app: &axum::Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let (s, _, b) = call(app, "POST", uri, Some(&body.to_string()), None).await;
    (s, serde_json::from_str(&b).unwrap_or(Value::String(b)))
}

/// Posts a streaming request, which must be answered 200, and returns its
/// SSE chunks parsed, without the closing `[DONE]`.
async fn stream_chunks(app: &axum::Router, uri: &str, body: &Value) -> Vec<Value> {
    let (s, _, text) = call(app, "POST", uri, Some(&body.to_string()), None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    sse_events(&text)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// SSE `data:` payloads (the last one may be `[DONE]`).
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}

fn assert_error(status: StatusCode, v: &Value, want: StatusCode, param: Option<&str>, ctx: &str) {
    assert_eq!(status, want, "{ctx}: {v}");
    let e = &v["error"];
    assert!(e.is_object(), "{ctx}: no error object in {v}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{ctx}: {v}"
    );
    assert!(e["type"].is_string(), "{ctx}: {v}");
    assert!(e.as_object().unwrap().contains_key("param"), "{ctx}: {v}");
    assert!(e.as_object().unwrap().contains_key("code"), "{ctx}: {v}");
    if let Some(p) = param {
        assert_eq!(e["param"], json!(p), "{ctx}: {v}");
    }
}

fn chat_body(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// The endpoint a test body is for: chat if it has messages.
fn route_of(body: &Value) -> &'static str {
    if body.get("messages").is_some() {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    }
}

/// A completion long enough for any script here (without `max_tokens`
/// completions stop at 16 tokens).
fn cmpl_body(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 256});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test]
async fn bad_inputs_are_400_with_param() {
    let app = openai_routes(state_with(Scripted::new(text_script("Hello")), None));
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    let long_prompt = "hello ".repeat(9000);
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        // vLLM extensions that would otherwise be silently dropped.
        (
            chat,
            chat_body(json!({"allowed_token_ids": [1, 2]})),
            Some("allowed_token_ids"),
        ),
        (
            cmpl,
            cmpl_body(json!({"bad_words": ["Hello"]})),
            Some("bad_words"),
        ),
        (
            cmpl,
            cmpl_body(json!({"truncate_prompt_tokens": 5})),
            Some("truncate_prompt_tokens"),
        ),
        (
            chat,
            chat_body(json!({"use_beam_search": true})),
            Some("use_beam_search"),
        ),
        (
            chat,
            chat_body(json!({"skip_special_tokens": false})),
            Some("skip_special_tokens"),
        ),
        (
            chat,
            chat_body(json!({"chat_template": "{{ messages }}"})),
            Some("chat_template"),
        ),
        (chat, chat_body(json!({"echo": true})), Some("echo")),
        (
            chat,
            chat_body(json!({"temperature": "hot"})),
            Some("temperature"),
        ),
        (
            chat,
            chat_body(json!({"temperature": 2.5})),
            Some("temperature"),
        ),
        (
            chat,
            chat_body(json!({"temperature": -0.1})),
            Some("temperature"),
        ),
        (chat, chat_body(json!({"top_p": 0})), Some("top_p")),
        (chat, chat_body(json!({"top_p": 1.01})), Some("top_p")),
        (
            chat,
            chat_body(json!({"presence_penalty": 2.5})),
            Some("presence_penalty"),
        ),
        (
            chat,
            chat_body(json!({"frequency_penalty": -3})),
            Some("frequency_penalty"),
        ),
        (
            chat,
            chat_body(json!({"max_tokens": 0})),
            Some("max_tokens"),
        ),
        (
            chat,
            chat_body(json!({"max_tokens": -5})),
            Some("max_tokens"),
        ),
        (
            chat,
            chat_body(json!({"max_tokens": 1.5})),
            Some("max_tokens"),
        ),
        (
            chat,
            chat_body(json!({"max_completion_tokens": 0})),
            Some("max_completion_tokens"),
        ),
        (chat, chat_body(json!({"n": 0})), Some("n")),
        (chat, chat_body(json!({"n": 65})), Some("n")),
        (
            chat,
            chat_body(json!({"stop": (0..65).map(|i| i.to_string()).collect::<Vec<_>>()})),
            Some("stop"),
        ),
        (chat, chat_body(json!({"stop": 5})), Some("stop")),
        (chat, chat_body(json!({"stream": "yes"})), Some("stream")),
        (chat, chat_body(json!({"seed": "x"})), Some("seed")),
        (
            chat,
            chat_body(json!({"top_logprobs": 21, "logprobs": true})),
            Some("top_logprobs"),
        ),
        (
            chat,
            chat_body(json!({"top_logprobs": 3})),
            Some("top_logprobs"),
        ),
        (chat, chat_body(json!({"logprobs": 3})), Some("logprobs")),
        (chat, chat_body(json!({"messages": []})), Some("messages")),
        (chat, chat_body(json!({"messages": "hi"})), Some("messages")),
        (chat, json!({"model": MODEL}), Some("messages")),
        (
            chat,
            chat_body(json!({"messages": [{"role": "user"}]})),
            Some("messages[0].content"),
        ),
        (
            chat,
            chat_body(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            Some("messages[0].role"),
        ),
        (
            chat,
            chat_body(json!({"messages": [{"role": "user", "content": 5}]})),
            Some("messages[0].content"),
        ),
        (
            chat,
            chat_body(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            Some("messages[0].content[0].type"),
        ),
        // Tools: "auto" (the default) is refused, saying what to send.
        (
            chat,
            chat_body(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
            Some("tool_choice"),
        ),
        (
            chat,
            chat_body(json!({"tools": [{"type": "retrieval"}], "tool_choice": "required"})),
            Some("tools[0].type"),
        ),
        (
            chat,
            chat_body(
                json!({"tools": [{"type": "function", "function": {"name": "no spaces"}}], "tool_choice": "required"}),
            ),
            Some("tools[0].function.name"),
        ),
        (
            chat,
            chat_body(
                json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            Some("tool_choice"),
        ),
        (
            chat,
            chat_body(
                json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "guided_regex": "a+"}),
            ),
            Some("guided_regex"),
        ),
        (
            chat,
            chat_body(json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})),
            Some("messages[0].tool_calls"),
        ),
        (
            chat,
            chat_body(json!({"tool_choice": "auto"})),
            Some("tool_choice"),
        ),
        (
            chat,
            chat_body(json!({"functions": [{"name": "f"}]})),
            Some("functions"),
        ),
        (
            chat,
            chat_body(json!({"function_call": "auto"})),
            Some("function_call"),
        ),
        (
            chat,
            chat_body(json!({"response_format": {"type": "json_schema", "json_schema": {}}})),
            Some("response_format"),
        ),
        (
            chat,
            chat_body(json!({"response_format": {"type": "yaml"}})),
            Some("response_format"),
        ),
        (
            cmpl,
            cmpl_body(json!({"response_format": "json"})),
            Some("response_format"),
        ),
        (
            chat,
            chat_body(json!({"logit_bias": {"50256": -100}})),
            Some("logit_bias"),
        ),
        (
            chat,
            chat_body(json!({"logit_bias": {"7": 100.5}})),
            Some("logit_bias"),
        ),
        (
            chat,
            chat_body(json!({"logit_bias": {"seven": 1}})),
            Some("logit_bias"),
        ),
        (
            chat,
            chat_body(json!({"logit_bias": [[7, 1]]})),
            Some("logit_bias"),
        ),
        (
            chat,
            chat_body(json!({"audio": {"voice": "alloy"}})),
            Some("audio"),
        ),
        (
            chat,
            chat_body(json!({"modalities": ["text", "audio"]})),
            Some("modalities"),
        ),
        (
            chat,
            chat_body(json!({"prediction": {"type": "content", "content": "x"}})),
            Some("prediction"),
        ),
        (
            chat,
            chat_body(json!({"max_tokens": 100000})),
            Some("max_tokens"),
        ),
        (
            chat,
            chat_body(json!({"messages": [{"role": "user", "content": long_prompt}]})),
            Some("messages"),
        ),
        // No output at all needs the prompt echoed or scored.
        (
            cmpl,
            cmpl_body(json!({"max_tokens": 0})),
            Some("max_tokens"),
        ),
        (
            cmpl,
            cmpl_body(json!({"max_tokens": 0, "logprobs": 1})),
            Some("max_tokens"),
        ),
        (
            cmpl,
            cmpl_body(json!({"max_tokens": -1, "echo": true, "logprobs": 1})),
            Some("max_tokens"),
        ),
        (cmpl, cmpl_body(json!({"best_of": 2})), Some("best_of")),
        (cmpl, cmpl_body(json!({"suffix": "end"})), Some("suffix")),
        (
            cmpl,
            cmpl_body(json!({"logit_bias": {"1": "high"}})),
            Some("logit_bias"),
        ),
        (cmpl, cmpl_body(json!({"logprobs": 6})), Some("logprobs")),
        (cmpl, cmpl_body(json!({"logprobs": true})), Some("logprobs")),
        (cmpl, json!({"model": MODEL}), Some("prompt")),
        (cmpl, cmpl_body(json!({"prompt": []})), Some("prompt")),
        (cmpl, cmpl_body(json!({"prompt": ["a", 5]})), Some("prompt")),
        (
            cmpl,
            cmpl_body(json!({"prompt": [[1, 2], "b", {"x": 1}]})),
            Some("prompt"),
        ),
        (
            cmpl,
            cmpl_body(json!({"prompt": vec!["a"; 65]})),
            Some("prompt"),
        ),
        (
            cmpl,
            cmpl_body(json!({"prompt": [[1, 2], [99_999_999]], "echo": true})),
            Some("prompt"),
        ),
        (
            cmpl,
            cmpl_body(json!({"prompt": vec!["a"; 9], "n": 16})),
            Some("n"),
        ),
        (
            cmpl,
            cmpl_body(json!({"prompt": [1, 999999]})),
            Some("prompt"),
        ),
        (cmpl, cmpl_body(json!({"prompt": [1, -1]})), Some("prompt")),
        (cmpl, cmpl_body(json!({"prompt": {"a": 1}})), Some("prompt")),
        (cmpl, cmpl_body(json!({"prompt": ""})), Some("prompt")),
        (
            cmpl,
            cmpl_body(json!({"prompt": long_prompt})),
            Some("prompt"),
        ),
        (
            cmpl,
            cmpl_body(json!({"max_tokens": 8190})),
            Some("max_tokens"),
        ),
        (
            cmpl,
            cmpl_body(json!({"repetition_penalty": 0})),
            Some("repetition_penalty"),
        ),
        (cmpl, cmpl_body(json!({"min_p": 1.5})), Some("min_p")),
        (cmpl, cmpl_body(json!({"top_k": -2})), Some("top_k")),
        (
            cmpl,
            cmpl_body(json!({"stream_options": 3})),
            Some("stream_options"),
        ),
        (
            chat,
            chat_body(json!({"stream_options": {"include_usage": true}})),
            Some("stream_options"),
        ),
    ];
    for (uri, body, param) in cases {
        let ctx = format!("{uri} {body}");
        let ctx = &ctx[..ctx.len().min(300)];
        let (s, v) = post(&app, uri, body).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, param, ctx);
        assert_eq!(v["error"]["type"], "invalid_request_error", "{ctx}");
        if param.is_some_and(|p| ["max_tokens", "messages", "prompt"].contains(&p))
            && v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("context length")
        {
            assert_eq!(v["error"]["code"], "context_length_exceeded", "{ctx}");
        }
    }
    // Context overflow is reported with its own code.
    let (s, v) = post(&app, chat, chat_body(json!({"max_tokens": 100000}))).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, Some("max_tokens"), "ctx");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // A scored prompt as long as the context: the message speaks of the
    // prompt, not of a completion the client did not ask for.
    let whole: Vec<u32> = vec![1; CTX];
    let body = cmpl_body(json!({"prompt": whole, "max_tokens": 0, "echo": true, "logprobs": 1}));
    let (s, v) = post(&app, cmpl, body).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, Some("prompt"), "scored");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("at most {} tokens", CTX - 1)),
        "{message}"
    );
    assert!(!message.contains("completion"), "{message}");

    // A bad token id is named by its place, and the message gives the
    // value as sent (not rounded to the workers' single precision).
    for (uri, body, param, words) in [
        (
            cmpl,
            cmpl_body(json!({"prompt": [504, -3]})),
            "prompt",
            "'prompt[1]' must be a token id",
        ),
        (
            cmpl,
            cmpl_body(json!({"stop_token_ids": [1.5]})),
            "stop_token_ids",
            "'stop_token_ids[0]'",
        ),
        (
            "/detokenize",
            json!({"tokens": [7, 8, -1]}),
            "tokens",
            "'tokens[2]' must be a token id",
        ),
        (chat, chat_body(json!({"top_p": -0.1})), "top_p", "got -0.1"),
        (
            cmpl,
            cmpl_body(json!({"prompt": ["a", ""]})),
            "prompt",
            "prompt 1 of the batch",
        ),
    ] {
        let (s, v) = post(&app, uri, body).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, Some(param), words);
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{message}");
    }
    // Half a surrogate pair: the message says so, not only that an escape
    // ended early.
    let raw = r#"{"model": "m", "messages": [{"role": "user", "content": "\ud800 x"}]}"#;
    let (s, _, b) = call(&app, "POST", chat, Some(raw), None).await;
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_error(s, &v, StatusCode::BAD_REQUEST, None, raw);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("surrogate"),
        "{v}"
    );

    // Bodies that are not JSON objects, or not JSON at all: 400, never 422.
    for raw in ["{not json", "[1,2]", "", "null", "\"x\""] {
        for uri in [chat, cmpl] {
            let (s, _, b) = call(&app, "POST", uri, Some(raw), None).await;
            let v: Value = serde_json::from_str(&b).unwrap();
            assert_error(s, &v, StatusCode::BAD_REQUEST, None, raw);
        }
    }
}

/// A prompt of megabytes is refused from its head, as too long for the
/// context, whether it comes as a completion's prompt or a chat message:
/// the rest is never tokenized, and nothing is generated.
#[tokio::test]
async fn prompts_far_beyond_the_context_are_refused_from_their_head() {
    let backend = Scripted::new(text_script("Hello"));
    let app = openai_routes(state_with(backend.clone(), None));
    let huge = "hello ".repeat(2_000_000);
    for (uri, body, param) in [
        (
            "/v1/completions",
            cmpl_body(json!({"prompt": huge})),
            "prompt",
        ),
        (
            "/v1/chat/completions",
            chat_body(json!({"messages": [{"role": "user", "content": huge}]})),
            "messages",
        ),
    ] {
        let (s, v) = post(&app, uri, body).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, Some(param), uri);
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        let head = format!("its first {} of", CTX * 16);
        assert!(message.contains(&head), "{message}");
    }
    assert!(backend.inputs().is_empty());
}

#[tokio::test]
async fn tolerated_fields_pass() {
    let backend = Scripted::new(text_script("Hello"));
    let app = openai_routes(state_with(backend.clone(), None));
    for body in [
        chat_body(json!({"some_future_field": {"x": 1}, "user": "u1"})),
        chat_body(
            json!({"response_format": {"type": "text"}, "logit_bias": {}, "tool_choice": "none"}),
        ),
        chat_body(
            json!({"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
        ),
        chat_body(json!({"temperature": null, "max_tokens": null, "stop": null})),
        chat_body(json!({"top_k": -1, "min_p": 0.1, "repetition_penalty": 1.1, "seed": -3})),
        // vLLM extensions at what happens anyway.
        chat_body(
            json!({"use_beam_search": false, "skip_special_tokens": true,
            "bad_words": [], "allowed_token_ids": null, "echo": false}),
        ),
    ] {
        let (s, v) = post(&app, "/v1/chat/completions", body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{body}: {v}");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    }
    for body in [
        cmpl_body(json!({"echo": false, "best_of": 1, "suffix": ""})),
        cmpl_body(json!({"prompt": ["Once upon a time"]})),
        cmpl_body(json!({"prompt": [[1, 2, 3]]})),
        cmpl_body(json!({"prompt": [1, 2, 3]})),
    ] {
        let (s, v) = post(&app, "/v1/completions", body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{body}: {v}");
        assert_eq!(v["choices"][0]["text"], "Hello");
    }
    let inputs = backend.inputs();
    // developer → system; text parts become the content.
    let t = tokenizer();
    let st = state_with(Scripted::new(Script::default()), None);
    let want = st
        .chat_prompt(&[
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ])
        .unwrap();
    assert_eq!(inputs[2].prompt, want);
    assert_eq!(inputs[4].sampling.top_k, 0);
    assert!((inputs[4].sampling.min_p - 0.1).abs() < 1e-6);
    assert_eq!(inputs[4].sampling.seed, (-3i64) as u64);
    assert_eq!(inputs.last().unwrap().prompt, vec![1, 2, 3]);
    assert_eq!(inputs[inputs.len() - 2].prompt, vec![1, 2, 3]);
    assert_eq!(
        inputs[7].prompt,
        t.encode("Once upon a time", true).unwrap()
    );
}

#[tokio::test]
async fn prompts_tokenize_like_tandem_generate() {
    let backend = Scripted::new(text_script("ok"));
    let st = state_with(backend.clone(), None);
    let app = openai_routes(st.clone());
    let t = tokenizer();
    // Independent rendering, as cli/src/generate.rs does it.
    let name = |id: Option<u32>| {
        id.map(|i| t.decode(&[i], false).unwrap())
            .unwrap_or_default()
    };
    let tmpl = tandem_model::chat::ChatTemplate::new(
        t.chat_template().unwrap(),
        &name(t.bos_id()),
        &name(t.eos_ids().first().copied()),
    )
    .unwrap();
    let msgs = vec![
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "What is 2+2? Answer: ünïcødé 🦀"),
    ];
    let want = t.encode(&tmpl.render(&msgs, true).unwrap(), false).unwrap();
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2? Answer: ünïcødé 🦀"}
        ], "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let inputs = backend.inputs();
    assert_eq!(inputs[0].prompt, want);
    assert_eq!(
        inputs[0].prompt[0],
        t.bos_id().unwrap(),
        "starts with <|im_start|>"
    );
    assert_eq!(v["usage"]["prompt_tokens"], json!(want.len()));
    assert_eq!(inputs[0].max_tokens, Some(5));
    assert_eq!(inputs[0].sampling.temperature, 0.0);
    // Stop ids: the tokenizer's EOS set (which holds <|im_end|>).
    assert_eq!(inputs[0].stop_token_ids, t.eos_ids().to_vec());
    assert!(inputs[0]
        .stop_token_ids
        .contains(&t.token_to_id("<|im_end|>").unwrap()));

    let (s, _) = post(
        &app,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "The capital of France"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let inputs = backend.inputs();
    assert_eq!(
        inputs[1].prompt,
        t.encode("The capital of France", true).unwrap()
    );
    // Omitted max_tokens: OpenAI's 16 for completions; default temperature 1.
    assert_eq!(inputs[1].max_tokens, Some(16));
    assert_eq!(inputs[1].sampling.temperature, 1.0);
    assert_eq!(inputs[1].sampling.top_p, 1.0);
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let app = openai_routes(state_with(
        Scripted::new(text_script("Hello")),
        Some("sekret"),
    ));
    let body = chat_body(json!({})).to_string();
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("sekret"),
        Some("Basic sekret"),
    ] {
        let (s, h, b) = call(&app, "POST", "/v1/chat/completions", Some(&body), auth).await;
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_error(s, &v, StatusCode::UNAUTHORIZED, None, &format!("{auth:?}"));
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(h.contains_key("www-authenticate"));
    }
    let (s, _, _) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, b) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        Some("Bearer sekret"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _, _) = call(&app, "GET", "/v1/models", None, Some("Bearer sekret")).await;
    assert_eq!(s, StatusCode::OK);
}

/// An adapter named like the served model is shadowed by it: listed once,
/// as the model, and requests for the name run the base model.
#[tokio::test]
async fn an_adapter_named_like_the_model_is_listed_once() {
    let script = Script {
        adapters: vec![MODEL.to_string(), "sql".to_string()],
        ..text_script("Hello")
    };
    let backend = Scripted::new(script);
    let app = openai_routes(state_with(backend.clone(), None));
    let (s, _, b) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&b).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL, "sql"], "{v}");
    let (s, v) = post(&app, "/v1/completions", cmpl_body(json!({"model": MODEL}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(backend.inputs()[0].adapter, "");
}

/// The runtime LoRA endpoints: off unless asked for, behind the API key,
/// and every bad body refused before the backend is asked.
#[tokio::test]
async fn runtime_lora_endpoints_are_guarded_and_checked() {
    let load = r#"{"lora_name": "sql", "lora_path": "/adapters/sql"}"#;
    let off = openai_routes(state_with(Scripted::new(text_script("Hello")), None));
    for uri in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"] {
        let (s, _, b) = call(&off, "POST", uri, Some(load), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{uri}: {b}");
        assert!(b.contains("--allow-runtime-lora"), "{b}");
    }

    let mut state = ApiState::new(
        Scripted::new(text_script("Hello")),
        tokenizer(),
        MODEL.to_string(),
        CTX,
        Some("sekret".into()),
    )
    .unwrap();
    state.runtime_lora = true;
    let on = openai_routes(Arc::new(state));
    let (s, _, _) = call(&on, "POST", "/v1/load_lora_adapter", Some(load), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "the API key guards them too");
    let key = Some("Bearer sekret");
    for (body, param) in [
        (r#"{"lora_path": "/a"}"#, "lora_name"),
        (r#"{"lora_name": "sql"}"#, "lora_path"),
        (r#"{"lora_name": "sql", "lora_path": " "}"#, "lora_path"),
        (r#"{"lora_name": "", "lora_path": "/a"}"#, "lora_name"),
        (r#"{"lora_name": "a\nb", "lora_path": "/a"}"#, "lora_name"),
        (r#"{"lora_name": 7, "lora_path": "/a"}"#, "lora_name"),
        (
            r#"{"lora_name": "smollm2-test", "lora_path": "/a"}"#,
            "lora_name",
        ),
        (
            r#"{"lora_name": "sql", "lora_path": "/a", "load_inplace": true}"#,
            "load_inplace",
        ),
    ] {
        let (s, _, b) = call(&on, "POST", "/v1/load_lora_adapter", Some(body), key).await;
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_error(s, &v, StatusCode::BAD_REQUEST, Some(param), body);
    }
    let long = json!({"lora_name": "x".repeat(257), "lora_path": "/a"}).to_string();
    let (s, _, _) = call(&on, "POST", "/v1/load_lora_adapter", Some(&long), key).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = call(&on, "POST", "/v1/load_lora_adapter", Some("[1]"), key).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A well-formed request reaches the backend, whose refusal is the answer.
    let (s, _, b) = call(&on, "POST", "/v1/load_lora_adapter", Some(load), key).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b.contains("cannot load adapters"), "{b}");
    let unload = r#"{"lora_name": "sql", "lora_int_id": 1}"#;
    let (s, _, b) = call(&on, "POST", "/v1/unload_lora_adapter", Some(unload), key).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
}

#[tokio::test]
async fn models_and_unknown_model() {
    let app = openai_routes(state_with(Scripted::new(text_script("Hello")), None));
    let (s, _, b) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    let (s, _, b) = call(&app, "GET", &format!("/v1/models/{MODEL}"), None, None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _, b) = call(&app, "GET", "/v1/models/gpt-4o", None, None).await;
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_error(s, &v, StatusCode::NOT_FOUND, Some("model"), "get model");
    assert_eq!(v["error"]["code"], "model_not_found");
    for (uri, body) in [
        (
            "/v1/chat/completions",
            chat_body(json!({"model": "gpt-4o"})),
        ),
        ("/v1/completions", cmpl_body(json!({"model": "gpt-4o"}))),
    ] {
        let (s, v) = post(&app, uri, body).await;
        assert_error(s, &v, StatusCode::NOT_FOUND, Some("model"), uri);
        assert_eq!(v["error"]["code"], "model_not_found");
    }
    let (s, _, b) = call(&app, "GET", "/v1/nope", None, None).await;
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_error(s, &v, StatusCode::NOT_FOUND, None, "unknown route");
    let (s, _, b) = call(&app, "GET", "/v1/chat/completions", None, None).await;
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_error(s, &v, StatusCode::METHOD_NOT_ALLOWED, None, "wrong method");
}

#[tokio::test]
async fn backend_errors_map_to_status() {
    for (err, want) in [
        (
            DispatchError::Unavailable("queues full".into()),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            DispatchError::Internal("boom".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (
            DispatchError::Invalid("nope".into()),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let backend = Scripted::new(Script {
            refuse: Some(err.clone()),
            ..Default::default()
        });
        let app = openai_routes(state_with(backend, None));
        for stream in [false, true] {
            let body = chat_body(json!({"stream": stream})).to_string();
            let (s, h, b) = call(&app, "POST", "/v1/chat/completions", Some(&body), None).await;
            let v: Value = serde_json::from_str(&b).unwrap();
            assert_error(s, &v, want, None, &format!("{err:?}"));
            if want == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(h.get("retry-after").unwrap(), "1");
            }
        }
    }
}

async fn stream_text(app: &axum::Router, uri: &str, body: Value) -> (String, Vec<Value>) {
    let (s, h, b) = call(app, "POST", uri, Some(&body.to_string()), None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&b);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{b}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut text = String::new();
    for c in &chunks {
        for ch in c["choices"].as_array().unwrap() {
            let piece = ch["delta"]["content"]
                .as_str()
                .or(ch["text"].as_str())
                .unwrap_or("");
            assert!(!piece.contains('\u{FFFD}'), "replacement char in {c}");
            text.push_str(piece);
        }
    }
    (text, chunks)
}

#[tokio::test]
async fn streaming_matches_non_streaming() {
    let text = "The quick brown fox jumps over the lazy dog. Ünïcødé: 日本語 🦀🚀!";
    let backend = Scripted::new(Script {
        tokens: vec![ids(text)],
        extra_completion: 1,
        ..Default::default()
    });
    let app = openai_routes(state_with(backend, None));
    for (uri, body) in [
        ("/v1/chat/completions", chat_body(json!({}))),
        ("/v1/completions", cmpl_body(json!({}))),
    ] {
        let (s, full) = post(&app, uri, body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{full}");
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        sb["stream_options"] = json!({"include_usage": true});
        let (streamed, chunks) = stream_text(&app, uri, sb).await;
        let ch = &full["choices"][0];
        let full_text = ch["message"]["content"]
            .as_str()
            .or(ch["text"].as_str())
            .unwrap();
        assert_eq!(full_text, text);
        assert_eq!(streamed, text);
        assert_eq!(ch["finish_reason"], "stop");
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage, &full["usage"], "usage");
        // The backend counted one unemitted stop token.
        assert_eq!(
            full["usage"]["completion_tokens"],
            json!(ids(text).len() + 1)
        );
        assert_eq!(
            full["usage"]["total_tokens"],
            json!(full["usage"]["prompt_tokens"].as_u64().unwrap() + ids(text).len() as u64 + 1)
        );
        if uri.contains("chat") {
            assert_eq!(full["object"], "chat.completion");
            assert!(full["id"].as_str().unwrap().starts_with("chatcmpl-"));
            assert_eq!(ch["message"]["role"], "assistant");
            assert_eq!(
                chunks[0]["choices"][0]["delta"],
                json!({"role": "assistant", "content": ""})
            );
            assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        } else {
            assert_eq!(full["object"], "text_completion");
            assert!(full["id"].as_str().unwrap().starts_with("cmpl-"));
        }
        let finishes: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .filter(|c| !c["finish_reason"].is_null())
            .collect();
        assert_eq!(finishes.len(), 1);
        assert_eq!(finishes[0]["finish_reason"], "stop");
    }
}

#[tokio::test]
async fn include_usage_chunk_is_last() {
    let app = openai_routes(state_with(
        Scripted::new(text_script("Hello there, friend")),
        None,
    ));
    let (_, chunks) = stream_text(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"stream": true, "stream_options": {"include_usage": true}, "n": 2})),
    )
    .await;
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["completion_tokens"],
        json!(2 * ids("Hello there, friend").len())
    );
    for c in rest {
        assert!(c.as_object().unwrap().contains_key("usage"));
        assert!(c["usage"].is_null(), "{c}");
    }
    // vLLM's continuous_usage_stats: every chunk counts what went out so
    // far, never fewer than before, and the last says it all.
    let (_, chunks) = stream_text(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"stream": true, "n": 2,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true}})),
    )
    .await;
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(
        last["usage"]["completion_tokens"],
        json!(2 * ids("Hello there, friend").len())
    );
    let prompt = last["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0);
    let mut before = 0;
    for c in rest {
        let u = &c["usage"];
        assert_eq!(u["prompt_tokens"].as_u64(), Some(prompt), "{c}");
        let now = u["completion_tokens"].as_u64().unwrap();
        assert!(now >= before, "{c}");
        assert_eq!(u["total_tokens"].as_u64(), Some(prompt + now), "{c}");
        before = now;
    }
    assert_eq!(rest[0]["usage"]["completion_tokens"], 0);
    assert!(before > 0);
    // Without include_usage: no usage key, no usage chunk.
    let (_, chunks) = stream_text(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"stream": true})),
    )
    .await;
    for c in &chunks {
        assert!(!c.as_object().unwrap().contains_key("usage"), "{c}");
        assert!(!c["choices"].as_array().unwrap().is_empty());
    }
}

#[tokio::test]
async fn stop_string_across_tokens_is_held_back_and_cut() {
    let text = "I think the answer is forty-two, and nothing else matters here.";
    let toks = ids(text);
    let stop = "forty-two";
    // The stop string must span several tokens for this test to mean anything.
    let t = tokenizer();
    let pieces: Vec<String> = toks
        .iter()
        .map(|&i| t.decode(&[i], false).unwrap())
        .collect();
    assert!(!pieces.iter().any(|p| p.contains(stop)), "{pieces:?}");
    let backend = Scripted::new(Script {
        tokens: vec![toks.clone()],
        hang: true, // would never finish on its own: the stop string must end it
        ..Default::default()
    });
    let app = openai_routes(state_with(backend.clone(), None));
    let want = "I think the answer is ";
    for (uri, body) in [
        (
            "/v1/chat/completions",
            chat_body(json!({"stop": [stop, "zzz"]})),
        ),
        ("/v1/completions", cmpl_body(json!({"stop": stop}))),
    ] {
        let (s, v) = post(&app, uri, body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let ch = &v["choices"][0];
        assert_eq!(
            ch["message"]["content"]
                .as_str()
                .or(ch["text"].as_str())
                .unwrap(),
            want
        );
        assert_eq!(ch["finish_reason"], "stop");
        // vLLM's `stop_reason` names the stop string.
        assert_eq!(ch["stop_reason"], "forty-two");
        let mut sb = body;
        sb["stream"] = json!(true);
        let (streamed, chunks) = stream_text(&app, uri, sb).await;
        assert_eq!(streamed, want);
        for c in &chunks {
            let mut c = c.clone();
            c["choices"][0]["stop_reason"] = Value::Null;
            let s = c.to_string();
            assert!(!s.contains("forty") && !s.contains("-two"), "{s}");
        }
        let last = &chunks.last().unwrap()["choices"][0];
        assert_eq!(last["finish_reason"], "stop");
        assert_eq!(last["stop_reason"], "forty-two");
    }
    // Each generation was cancelled when the stop string matched.
    tokio::time::timeout(Duration::from_secs(5), async {
        while backend.cancelled.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the stop string did not cancel the generations");
    // vLLM's include_stop_str_in_output keeps it, streamed or not.
    for stream in [false, true] {
        let body = chat_body(json!({"stop": [stop], "include_stop_str_in_output": true}));
        let got = match stream {
            false => {
                let (_, v) = post(&app, "/v1/chat/completions", body).await;
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
            true => {
                let mut sb = body;
                sb["stream"] = json!(true);
                stream_text(&app, "/v1/chat/completions", sb).await.0
            }
        };
        assert_eq!(got, "I think the answer is forty-two", "stream {stream}");
    }
}

#[tokio::test]
async fn n_choices_differ() {
    let backend = Scripted::new(Script {
        tokens: vec![ids("First answer."), ids("Second, different answer.")],
        ..Default::default()
    });
    let app = openai_routes(state_with(backend.clone(), None));
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"n": 2, "temperature": 0.8})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(choices[0]["message"]["content"], "First answer.");
    assert_eq!(
        choices[1]["message"]["content"],
        "Second, different answer."
    );
    assert_eq!(
        v["usage"]["completion_tokens"],
        json!(ids("First answer.").len() + ids("Second, different answer.").len())
    );
    let inputs = backend.inputs();
    assert_eq!(inputs.len(), 2);
    assert_ne!(
        inputs[0].sampling.request_key,
        inputs[1].sampling.request_key
    );
    assert_eq!(inputs[0].sampling.seed, inputs[1].sampling.seed);
    assert_ne!(inputs[0].request_id, inputs[1].request_id);

    // Streaming: both choices arrive, each with its own finish.
    let (_, chunks) = stream_text(
        &app,
        "/v1/completions",
        cmpl_body(json!({"n": 2, "stream": true})),
    )
    .await;
    let mut texts = [String::new(), String::new()];
    let mut finished = [false, false];
    for c in &chunks {
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            texts[i].push_str(ch["text"].as_str().unwrap());
            if !ch["finish_reason"].is_null() {
                finished[i] = true;
            }
        }
    }
    assert_eq!(
        texts,
        [
            "First answer.".to_string(),
            "Second, different answer.".to_string()
        ]
    );
    assert_eq!(finished, [true, true]);

    // A seed makes the request keys reproducible.
    let (s, _) = post(
        &app,
        "/v1/completions",
        cmpl_body(json!({"n": 2, "seed": 7})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = post(
        &app,
        "/v1/completions",
        cmpl_body(json!({"n": 2, "seed": 7})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let inputs = backend.inputs();
    let n = inputs.len();
    assert_eq!(inputs[n - 1].sampling, inputs[n - 3].sampling);
    assert_eq!(inputs[n - 2].sampling, inputs[n - 4].sampling);
    assert_eq!(inputs[n - 1].sampling.seed, 7);
}

#[tokio::test]
async fn utf8_split_across_tokens_never_yields_replacement_chars() {
    let t = tokenizer();
    let text = "Crabs: 🦀🦀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 — ½ ẞ 漢字";
    let toks = ids(text);
    let split = toks
        .iter()
        .filter(|&&i| std::str::from_utf8(t.token_bytes(i).unwrap()).is_err())
        .count();
    assert!(
        split > 0,
        "no token of {text:?} splits a character: the test would prove nothing"
    );
    let app = openai_routes(state_with(
        Scripted::new(Script {
            tokens: vec![toks],
            ..Default::default()
        }),
        None,
    ));
    for (uri, body) in [
        ("/v1/chat/completions", chat_body(json!({"stream": true}))),
        ("/v1/completions", cmpl_body(json!({"stream": true}))),
    ] {
        let (streamed, chunks) = stream_text(&app, uri, body).await;
        assert_eq!(streamed, text);
        for c in chunks {
            assert!(!c.to_string().contains('\u{FFFD}'));
        }
    }
}

#[tokio::test]
async fn length_finish_and_max_tokens() {
    let backend = Scripted::new(text_script("one two three four five six seven"));
    let app = openai_routes(state_with(backend, None));
    let (s, v) = post(&app, "/v1/completions", cmpl_body(json!({"max_tokens": 3}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"max_completion_tokens": 2, "max_tokens": 5})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

/// A legacy `top_logprobs` object holds the `k` likeliest tokens and the
/// position's own token (sampled or echoed) when it is not among them:
/// "up to logprobs + 1 elements", as OpenAI and vLLM answer.
#[test]
fn legacy_top_logprobs_hold_the_chosen_token() {
    use super::openai::{completion_logprobs, LpEntry};
    let tok = tokenizer();
    let [own, a, b] = [" cat", " dog", " bird"].map(|w| ids(w)[0]);
    let top = [(a, -0.1f32), (b, -0.7)];
    let among = [(own, -0.3f32), (a, -0.4)];
    let entries = [
        LpEntry {
            id: own,
            scored: None,
            text_offset: 0,
        },
        LpEntry {
            id: own,
            scored: Some((-2.5, &top[..])),
            text_offset: 4,
        },
        LpEntry {
            id: own,
            scored: Some((-0.3, &among[..])),
            text_offset: 8,
        },
    ];
    let name = |id: u32| tok.decode(&[id], false).unwrap();
    for k in [0u32, 1, 2] {
        let v = completion_logprobs(&tok, k, &entries);
        let tops = v["top_logprobs"].as_array().unwrap();
        assert_eq!(tops[0], Value::Null);
        let outside = tops[1].as_object().unwrap();
        assert_eq!(outside.len(), k as usize + 1, "{v}");
        assert_eq!(outside[&name(own)], json!(-2.5f32), "{v}");
        if k > 0 {
            assert_eq!(outside[&name(a)], json!(-0.1f32), "{v}");
        }
        // The own token is the likeliest here: `logprobs: 0` still names it.
        let inside = tops[2].as_object().unwrap();
        assert_eq!(inside.len(), (k as usize).max(1), "{v}");
        assert_eq!(inside[&name(own)], json!(-0.3f32), "{v}");
    }
}

/// `echo` with `logprobs` (how lm-evaluation-harness scores text): the
/// prompt's tokens come first in `logprobs`, the first unscored, then the
/// completion's, with text offsets running through both; `max_tokens: 0`
/// scores the prompt alone.
#[tokio::test]
async fn echo_with_logprobs_scores_the_prompt() {
    let backend = Scripted::new(text_script(" and so on"));
    let app = openai_routes(state_with(backend.clone(), None));
    let prompt = "Once upon a time";
    let p_ids = ids(prompt);
    let out = ids(" and so on");
    let body = cmpl_body(json!({"prompt": prompt, "echo": true, "logprobs": 2, "max_tokens": 3}));
    let (s, v) = post(&app, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    let lp = &c["logprobs"];
    let n = p_ids.len() + 3;
    let tokens: Vec<String> = p_ids
        .iter()
        .chain(&out[..3])
        .map(|&id| tokenizer().decode(&[id], false).unwrap())
        .collect();
    assert_eq!(lp["tokens"], json!(tokens));
    let mut want_lp = vec![Value::Null];
    want_lp.extend((0..p_ids.len() - 1).map(|i| json!(-1.0 - i as f32)));
    want_lp.extend(std::iter::repeat_n(json!(-0.25), 3));
    assert_eq!(lp["token_logprobs"], Value::Array(want_lp));
    let top = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), n);
    assert_eq!(top[0], Value::Null);
    assert!(
        top[1..].iter().all(|t| t.as_object().unwrap().len() == 2),
        "{lp}"
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    assert_eq!(offsets[p_ids.len()] as usize, prompt.chars().count());
    let text = c["text"].as_str().unwrap();
    for (t, &o) in tokens.iter().zip(&offsets) {
        assert!(
            text[o as usize..].starts_with(t.as_str()),
            "{t:?} at {o} of {text:?}"
        );
    }
    let inp = backend.inputs().pop().unwrap();
    assert_eq!(inp.sampling.prompt_logprobs, Some(2));

    // The prompt alone, echoed without scores (OpenAI's legacy API allowed
    // that too), then with them.
    let body = cmpl_body(json!({"prompt": prompt, "echo": true, "max_tokens": 0}));
    let (s, v) = post(&app, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], prompt);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 0);
    let body = cmpl_body(json!({"prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 0}));
    let (s, v) = post(&app, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["text"], prompt);
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(
        c["logprobs"]["tokens"].as_array().unwrap().len(),
        p_ids.len()
    );
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(v["usage"]["prompt_tokens"], p_ids.len());
    let inp = backend.inputs().pop().unwrap();
    assert_eq!(
        (inp.max_tokens, inp.sampling.prompt_logprobs),
        (Some(1), Some(1))
    );

    // Streamed: the echoed prompt opens the choice with its scores.
    let body = cmpl_body(
        json!({"prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 2, "stream": true}),
    );
    let chunks = stream_chunks(&app, "/v1/completions", &body).await;
    let first = &chunks[0]["choices"][0];
    assert_eq!(first["text"], prompt);
    assert_eq!(first["logprobs"]["token_logprobs"][0], Value::Null);
    assert_eq!(
        first["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        p_ids.len()
    );
    let all: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(
        all,
        format!("{prompt}{}", tokenizer().decode(&out[..2], false).unwrap())
    );
    let second = &chunks[1]["choices"][0]["logprobs"]["text_offset"][0];
    assert_eq!(second.as_u64().unwrap() as usize, prompt.chars().count());

    // Token ids with a special token: echoed with it, and the offsets
    // index that text.
    let special = tokenizer().encode("<|im_start|>", false).unwrap();
    assert!(special.len() == 1 && tokenizer().is_special(special[0]));
    let ids_in: Vec<u32> = special.iter().copied().chain(p_ids.clone()).collect();
    let body = cmpl_body(json!({"prompt": ids_in, "echo": true, "logprobs": 1, "max_tokens": 1}));
    let (s, v) = post(&app, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    let text = c["text"].as_str().unwrap();
    assert!(text.starts_with("<|im_start|>Once upon"), "{text}");
    let lp = &c["logprobs"];
    for (t, o) in lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["text_offset"].as_array().unwrap())
    {
        let (t, o) = (t.as_str().unwrap(), o.as_u64().unwrap() as usize);
        assert!(text[o..].starts_with(t), "{t:?} at {o} of {text:?}");
    }
}

/// The JSON schema the last generation was held to.
fn last_schema(backend: &Scripted) -> Value {
    let input = backend.inputs().pop().expect("a generation");
    serde_json::from_str(&input.sampling.json_schema.expect("a schema")).unwrap()
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }},
        {"type": "function", "function": {"name": "get_time"}},
    ])
}

/// A named tool choice: the output is the call's arguments, held to the
/// function's schema, and comes back (and streams) as a tool call.
#[tokio::test]
async fn a_named_tool_choice_comes_back_as_its_call() {
    let args = r#"{"city": "Paris"}"#;
    let backend = Scripted::new(text_script(args));
    let app = openai_routes(state_with(backend.clone(), None));
    let choice = json!({"type": "function", "function": {"name": "get_weather"}});
    let body = chat_body(json!({"tools": weather_tools(), "tool_choice": choice}));
    let (s, v) = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["content"], Value::Null);
    let tc = &c["message"]["tool_calls"][0];
    assert_eq!(tc["type"], "function");
    assert!(tc["id"].as_str().unwrap().starts_with("call_"), "{tc}");
    assert_eq!(tc["function"]["name"], "get_weather");
    assert_eq!(tc["function"]["arguments"], args);
    assert_eq!(c["finish_reason"], "stop");
    // Held to the function's parameters.
    let schema = last_schema(&backend);
    assert_eq!(schema, weather_tools()[0]["function"]["parameters"]);

    // Streamed: the arguments in pieces, the call's id and name first.
    let mut body = body;
    body["stream"] = json!(true);
    let chunks = stream_chunks(&app, "/v1/chat/completions", &body).await;
    // The role opens it, with no text content (null, as in the whole answer).
    let opening = &chunks[0]["choices"][0]["delta"];
    assert_eq!(opening["role"], "assistant", "{opening}");
    assert!(opening["content"].is_null(), "{opening}");
    let (mut streamed, mut ids, mut finish) = (String::new(), Vec::new(), None);
    for ev in &chunks {
        let ch = &ev["choices"][0];
        assert!(
            ch["delta"]
                .get("content")
                .is_none_or(|c| c == "" || c.is_null()),
            "{ch}"
        );
        if let Some(calls) = ch["delta"]["tool_calls"].as_array() {
            let t = &calls[0];
            assert_eq!(t["index"], 0);
            if let Some(id) = t["id"].as_str() {
                ids.push(id.to_string());
                assert_eq!(t["function"]["name"], "get_weather");
            }
            streamed += t["function"]["arguments"].as_str().unwrap();
        }
        if !ch["finish_reason"].is_null() {
            finish = Some(ch["finish_reason"].clone());
        }
    }
    assert_eq!(streamed, args);
    assert_eq!(ids.len(), 1, "the id comes once");
    assert_eq!(finish, Some(json!("stop")));

    // A `response_format` beside a forced call shapes no text: the call
    // is held to its own schema, as without it.
    let with_format = chat_body(json!({"tools": weather_tools(), "tool_choice": choice,
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}}}}));
    let (s, v) = post(&app, "/v1/chat/completions", with_format).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        args
    );
    assert_eq!(
        last_schema(&backend),
        weather_tools()[0]["function"]["parameters"]
    );

    // "none": text, free.
    let body = chat_body(json!({"tools": weather_tools(), "tool_choice": "none"}));
    let (s, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], args);
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(backend.inputs().pop().unwrap().sampling.json_schema, None);
}

/// A stop string does not cut constrained output: forced tool calls and
/// a JSON schema come back whole, streamed or not, though the text holds
/// the stop string; free text is still cut by it.
#[tokio::test]
async fn stop_strings_leave_constrained_output_whole() {
    let out = r#"[{"name": "get_weather", "arguments": {"city": "Paris"}}]"#;
    let backend = Scripted::new(text_script(out));
    let app = openai_routes(state_with(backend.clone(), None));
    let forced =
        chat_body(json!({"tools": weather_tools(), "tool_choice": "required", "stop": ["Paris"]}));
    for stream in [false, true] {
        let mut body = forced.clone();
        body["stream"] = json!(stream);
        let (finish, args) = if stream {
            let chunks = stream_chunks(&app, "/v1/chat/completions", &body).await;
            let mut args = String::new();
            let mut finish = Value::Null;
            for ch in &chunks {
                for c in ch["choices"][0]["delta"]["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    args.push_str(c["function"]["arguments"].as_str().unwrap());
                }
                if !ch["choices"][0]["finish_reason"].is_null() {
                    finish = ch["choices"][0]["finish_reason"].clone();
                }
            }
            (finish, args)
        } else {
            let (s, v) = post(&app, "/v1/chat/completions", body).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let c = &v["choices"][0];
            let args = c["message"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap();
            (c["finish_reason"].clone(), args.to_string())
        };
        assert_eq!(finish, "tool_calls", "streamed: {stream}");
        let parsed: Value = serde_json::from_str(&args).expect("whole arguments");
        assert_eq!(parsed, json!({"city": "Paris"}), "streamed: {stream}");
    }
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
    let backend = Scripted::new(text_script(r#"{"city": "Paris"}"#));
    let app = openai_routes(state_with(backend, None));
    let body = chat_body(json!({"stop": ["Paris"], "response_format":
        {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}}));
    let (s, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"], r#"{"city": "Paris"}"#,
        "{v}"
    );
    // Free text: cut where the stop string begins.
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"stop": ["Paris"]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"], r#"{"city": ""#,
        "{v}"
    );
    assert_eq!(v["choices"][0]["stop_reason"], "Paris", "{v}");
}

/// `tool_choice: "required"`: the output is an array of calls, held to
/// each function's schema, sent as the calls (whole when streamed).
#[tokio::test]
async fn a_required_tool_choice_comes_back_as_calls() {
    let out = r#"[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]"#;
    let backend = Scripted::new(text_script(out));
    let app = openai_routes(state_with(backend.clone(), None));
    let body = chat_body(json!({"tools": weather_tools(), "tool_choice": "required"}));
    let (s, v) = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let a: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(a, json!({"city": "Paris"}));
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    let schema = last_schema(&backend);
    assert_eq!(schema["type"], "array");
    assert_eq!(schema["items"]["anyOf"].as_array().unwrap().len(), 2);
    assert!(schema.get("maxItems").is_none());

    // One call at most without parallel calls.
    let mut one = body.clone();
    one["parallel_tool_calls"] = json!(false);
    let (s, _) = post(&app, "/v1/chat/completions", one).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(last_schema(&backend)["maxItems"], 1);

    // Streamed: each call as it is written, its name first (with its id),
    // then its arguments, piece by piece; they add up to the calls.
    let mut body = body;
    body["stream"] = json!(true);
    let chunks = stream_chunks(&app, "/v1/chat/completions", &body).await;
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut pieces = 0;
    for ch in &chunks {
        for c in ch["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = c["index"].as_u64().unwrap() as usize;
            if let Some(name) = c["function"]["name"].as_str() {
                assert_eq!(i, calls.len(), "{ch}");
                calls.push((c["id"].as_str().unwrap().into(), name.into(), String::new()));
            }
            let args = c["function"]["arguments"].as_str().unwrap();
            calls[i].2.push_str(args);
            pieces += usize::from(!args.is_empty());
        }
    }
    assert_eq!(calls.len(), 2, "{chunks:?}");
    assert_eq!(
        (calls[0].1.as_str(), calls[1].1.as_str()),
        ("get_weather", "get_time")
    );
    assert_ne!(calls[0].0, calls[1].0);
    let args: Vec<Value> = calls
        .iter()
        .map(|c| serde_json::from_str(&c.2).unwrap())
        .collect();
    assert_eq!(args, [json!({"city": "Paris"}), json!({})]);
    assert!(pieces > 2, "arguments came whole: {chunks:?}");
    // The same strings as the whole answer's: the arguments as written.
    let whole: Vec<&str> = v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["function"]["arguments"].as_str().unwrap())
        .collect();
    assert_eq!(whole, [calls[0].2.as_str(), calls[1].2.as_str()]);
    assert_eq!(whole[0], r#"{"city": "Paris"}"#);
    let last = chunks
        .iter()
        .rev()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
}

/// A Qwen 2.5-style template: it shows the tools and asks for Hermes calls.
const HERMES_TEMPLATE: &str = "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\nCall a function with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n{%- endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A Llama 3.1-style template: JSON calls, `<|python_tag|>` before them.
const LLAMA_TEMPLATE: &str = "{%- if tools %}Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.{% for t in tools %}{{ t | tojson }}{% endfor %}{%- endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% if m.tool_calls is defined %}<|python_tag|>{% endif %}{% endfor %}assistant: ";

fn app_with_template(script: Script, template: &str) -> (Arc<Scripted>, axum::Router) {
    let backend = Scripted::new(script);
    let mut state =
        ApiState::new(backend.clone(), tokenizer(), MODEL.to_string(), CTX, None).unwrap();
    state.chat_template =
        Some(tandem_model::chat::ChatTemplate::new(template, "", "<|im_end|>").unwrap());
    (backend, openai_routes(Arc::new(state)))
}

fn hermes_app(script: Script) -> (Arc<Scripted>, axum::Router) {
    app_with_template(script, HERMES_TEMPLATE)
}

/// Auto with a Llama 3.1-style template: an output that is JSON calls
/// (`parameters` for the arguments) comes back as calls, whole when
/// streamed; an answer in text stays text, streamed as it comes.
#[tokio::test]
async fn auto_tool_choice_reads_llama_json_calls() {
    let said = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
    let (_, app) = app_with_template(text_script(said), LLAMA_TEMPLATE);
    let body = chat_body(json!({"tools": weather_tools()}));
    let (s, v) = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    assert_eq!(c["message"]["content"], Value::Null);
    let tc = &c["message"]["tool_calls"][0];
    assert_eq!(tc["function"]["name"], "get_weather");
    assert_eq!(tc["function"]["arguments"], r#"{"city":"Paris"}"#);
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let chunks = stream_chunks(&app, "/v1/chat/completions", &sbody).await;
    let content: String = chunks
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "");
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["arguments"], r#"{"city":"Paris"}"#);

    let answer = "Paris is sunny: {\"temp\": 21}";
    let (_, app) = app_with_template(text_script(answer), LLAMA_TEMPLATE);
    let (s, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], answer);
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    let chunks = stream_chunks(&app, "/v1/chat/completions", &sbody).await;
    let pieces: Vec<&str> = chunks
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .filter(|c| !c.is_empty())
        .collect();
    assert!(pieces.len() > 1, "streamed as it comes: {pieces:?}");
    assert_eq!(pieces.concat(), answer);
}

/// `tool_choice: "auto"` (or none given) with a model whose template writes
/// Hermes calls: the model decides; text before a call is content, the
/// calls come back parsed, streamed without a piece of `<tool_call>`
/// leaking into the content; a call cut short stays text.
#[tokio::test]
async fn auto_tool_choice_reads_hermes_calls() {
    let said = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let (backend, app) = hermes_app(text_script(said));
    let body = chat_body(json!({"tools": weather_tools()}));
    let (s, v) = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    assert_eq!(c["message"]["content"], "Let me check.");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let a: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(a, json!({"city": "Paris"}));
    // Free output, with the tools shown to the model.
    let inp = backend.inputs().pop().unwrap();
    assert_eq!(inp.sampling.json_schema, None);
    let prompt = tokenizer().decode(&inp.prompt, false).unwrap();
    assert!(prompt.contains("\"name\": \"get_weather\""), "{prompt}");

    // Streamed: the text, then the call; no `<tool_call>` in the content.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["tool_choice"] = json!("auto");
    let chunks = stream_chunks(&app, "/v1/chat/completions", &sbody).await;
    let (mut content, mut calls, mut finish) = (String::new(), Vec::new(), None);
    for ev in &chunks {
        let ch = &ev["choices"][0];
        content += ch["delta"]["content"].as_str().unwrap_or("");
        if let Some(t) = ch["delta"]["tool_calls"].as_array() {
            calls.extend(t.iter().cloned());
        }
        if !ch["finish_reason"].is_null() {
            finish = Some(ch["finish_reason"].clone());
        }
    }
    assert_eq!(content.trim(), "Let me check.");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(finish, Some(json!("tool_calls")));

    // No call: text, as without tools.
    let (_, app) = hermes_app(text_script("Paris is sunny."));
    let (s, v) = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Paris is sunny.");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // A call cut by max_tokens stays text, streamed or not.
    let (_, app) = hermes_app(text_script(said));
    let mut cut = body;
    cut["max_tokens"] = json!(16);
    let (s, v) = post(&app, "/v1/chat/completions", cut.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "length");
    assert!(
        c["message"]["content"]
            .as_str()
            .unwrap()
            .contains("<tool_call>"),
        "{c}"
    );
    assert!(c["message"].get("tool_calls").is_none());
    cut["stream"] = json!(true);
    let chunks = stream_chunks(&app, "/v1/chat/completions", &cut).await;
    let content: String = chunks
        .iter()
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        content,
        c["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
            .trim_end_matches('\n')
    );
}

/// A conversation that went through a call: the assistant's call and the
/// tool's answer reach the template, and the model answers in text.
#[tokio::test]
async fn tool_results_go_back_to_the_model() {
    let backend = Scripted::new(text_script("It is sunny in Paris."));
    let app = openai_routes(state_with(backend.clone(), None));
    let body = chat_body(json!({
        "tools": weather_tools(),
        "tool_choice": "none",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
    }));
    let (s, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "It is sunny in Paris."
    );
    let prompt = backend.inputs().pop().unwrap().prompt;
    let text = tokenizer().decode(&prompt, false).unwrap();
    assert!(text.contains("sunny, 21 C"), "{text}");
}

/// vLLM's `prompt_logprobs`: per prompt token, `null` for the first, then
/// an object keyed by token id holding the prompt token (with its rank) and
/// the top alternatives; per choice on completions, beside the choices on
/// chat; with `echo` and `logprobs` too, each output keeps its own count.
#[tokio::test]
async fn vllm_prompt_logprobs_come_in_vllms_shape() {
    let backend = Scripted::new(text_script(" and so on"));
    let app = openai_routes(state_with(backend.clone(), None));
    let prompt = "Once upon a time";
    let p_ids = ids(prompt);
    let check = |pl: &Value, k: usize| {
        let a = pl.as_array().unwrap_or_else(|| panic!("{pl}"));
        assert_eq!(a.len(), p_ids.len());
        assert_eq!(a[0], Value::Null);
        for (i, e) in a[1..].iter().enumerate() {
            let id = p_ids[i + 1];
            let own = &e[id.to_string()];
            assert_eq!(own["logprob"], json!(-1.0 - i as f32), "{e}");
            assert_eq!(own["rank"], i + 1, "{e}");
            assert_eq!(
                own["decoded_token"],
                tokenizer().decode(&[id], false).unwrap()
            );
            // The prompt token is the first alternative too (id + 0).
            assert_eq!(e.as_object().unwrap().len(), k.max(1), "{e}");
        }
    };
    let (s, v) = post(
        &app,
        "/v1/completions",
        cmpl_body(json!({"prompt": prompt, "prompt_logprobs": 3, "max_tokens": 2})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    check(&v["choices"][0]["prompt_logprobs"], 3);
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    assert_eq!(
        backend.inputs().pop().unwrap().sampling.prompt_logprobs,
        Some(3)
    );

    // Both shapes at once: the workers score with the larger count.
    let body = cmpl_body(
        json!({"prompt": prompt, "prompt_logprobs": 1, "echo": true, "logprobs": 2, "max_tokens": 1}),
    );
    let (s, v) = post(&app, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    check(&v["choices"][0]["prompt_logprobs"], 1);
    assert_eq!(
        v["choices"][0]["logprobs"]["top_logprobs"][1]
            .as_object()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        backend.inputs().pop().unwrap().sampling.prompt_logprobs,
        Some(2)
    );

    // Chat: beside the choices, for the templated prompt.
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"prompt_logprobs": 0, "max_tokens": 2})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let templated = backend.inputs().pop().unwrap().prompt;
    assert_eq!(
        v["prompt_logprobs"].as_array().unwrap().len(),
        templated.len()
    );
    assert_eq!(v["prompt_logprobs"][0], Value::Null);

    // Streamed, the scores come first, on a chunk of their own.
    let body =
        cmpl_body(json!({"prompt": prompt, "prompt_logprobs": 3, "max_tokens": 2, "stream": true}));
    let chunks = stream_chunks(&app, "/v1/completions", &body).await;
    let first = &chunks[0];
    check(&first["choices"][0]["prompt_logprobs"], 3);
    assert_eq!(first["choices"][0]["text"], "");

    for bad in [json!(21), json!(-1), json!("3")] {
        let (s, v) = post(
            &app,
            "/v1/completions",
            cmpl_body(json!({"prompt_logprobs": bad})),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["param"], "prompt_logprobs", "{v}");
    }
}

#[tokio::test]
async fn a_batch_of_prompts_gets_prompts_times_n_choices_in_order() {
    let backend = Scripted::new(text_script(" and so on"));
    let app = openai_routes(state_with(backend.clone(), None));
    let prompts = ["One", "Two two", "Three three three"];
    let body = cmpl_body(json!({"prompt": prompts, "n": 2, "echo": true}));
    let (s, v) = post(&app, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        // Choice i answers prompt i / n, which it echoes.
        assert_eq!(c["text"], format!("{} and so on", prompts[i / 2]));
    }
    let inputs = backend.inputs();
    assert_eq!(inputs.len(), 6);
    let mut prompt_tokens = 0;
    for (p, text) in prompts.iter().enumerate() {
        let ids = ids(text);
        for i in 0..2 {
            let inp = &inputs[p * 2 + i];
            assert_eq!(inp.prompt, ids, "choice {i} of prompt {p}");
            assert!(
                inp.request_id.ends_with(&format!("-{p}-{i}")),
                "{}",
                inp.request_id
            );
        }
        prompt_tokens += ids.len();
    }
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], 6 * ids(" and so on").len());

    // Streamed, each echoed prompt comes first, then its completion.
    let body =
        cmpl_body(json!({"prompt": [ids("One"), ids("Two two")], "echo": true, "stream": true}));
    let chunks = stream_chunks(&app, "/v1/completions", &body).await;
    let mut per_choice = [String::new(), String::new()];
    for ev in &chunks {
        if let Some(c) = ev["choices"].as_array().and_then(|a| a.first()) {
            per_choice[c["index"].as_u64().unwrap() as usize] += c["text"].as_str().unwrap();
        }
    }
    assert_eq!(per_choice, ["One and so on", "Two two and so on"]);

    // One prompt in an array is one prompt, with the request's own ids.
    let (s, v) = post(
        &app,
        "/v1/completions",
        cmpl_body(json!({"prompt": ["Solo"]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    let last = backend.inputs().pop().unwrap();
    assert!(last.request_id.ends_with("-0") && !last.request_id.contains("-0-"));
}

#[tokio::test]
async fn json_mode_reaches_the_workers_from_either_endpoint() {
    let backend = Scripted::new(text_script("{}"));
    let app = openai_routes(state_with(backend.clone(), None));
    for (uri, body, want) in [
        (
            "/v1/chat/completions",
            chat_body(json!({"response_format": {"type": "json_object"}})),
            true,
        ),
        (
            "/v1/completions",
            cmpl_body(json!({"response_format": {"type": "json_object"}})),
            true,
        ),
        (
            "/v1/chat/completions",
            chat_body(json!({"response_format": {"type": "text"}})),
            false,
        ),
        ("/v1/completions", cmpl_body(json!({})), false),
    ] {
        let (s, v) = post(&app, uri, body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{body}: {v}");
        let inp = backend.inputs().pop().unwrap();
        assert_eq!(inp.sampling.json_object, want, "{body}");
        assert_eq!(inp.sampling.json_schema, None);
    }
    // A schema travels as its JSON text.
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let body = chat_body(json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": true}}}));
    let (s, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let inp = backend.inputs().pop().unwrap();
    let sent: Value = serde_json::from_str(inp.sampling.json_schema.as_deref().unwrap()).unwrap();
    assert_eq!(sent, schema);
    assert!(!inp.sampling.json_object);

    // vLLM's extensions, flat or under `structured_outputs`.
    for (body, check) in [
        (
            cmpl_body(json!({"guided_regex": "[0-9]+"})),
            Box::new(|s: &Sampling| s.regex.as_deref() == Some("[0-9]+"))
                as Box<dyn Fn(&Sampling) -> bool>,
        ),
        (
            cmpl_body(json!({"structured_outputs": {"choice": ["yes", "no"]}})),
            Box::new(|s: &Sampling| s.choice == ["yes", "no"]),
        ),
        (
            chat_body(json!({"guided_json": "{\"type\": \"object\"}"})),
            Box::new(|s: &Sampling| s.json_schema.as_deref() == Some("{\"type\":\"object\"}")),
        ),
    ] {
        let uri = route_of(&body);
        let (s, v) = post(&app, uri, body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{body}: {v}");
        assert!(check(&backend.inputs().pop().unwrap().sampling), "{body}");
    }
    for (body, param) in [
        (
            cmpl_body(json!({"guided_regex": "a", "guided_choice": ["a"]})),
            "response_format",
        ),
        (
            chat_body(json!({"response_format": {"type": "json_object"}, "guided_regex": "a"})),
            "response_format",
        ),
        (
            chat_body(json!({"response_format": {"type": "json_object"}, "guided_json": {}})),
            "guided_json",
        ),
        (cmpl_body(json!({"guided_choice": []})), "guided_choice"),
        (cmpl_body(json!({"guided_regex": ""})), "guided_regex"),
        (cmpl_body(json!({"guided_choice": [1]})), "guided_choice"),
        (cmpl_body(json!({"guided_json": "{oops"})), "guided_json"),
        (
            cmpl_body(json!({"structured_outputs": "regex"})),
            "structured_outputs",
        ),
    ] {
        let uri = route_of(&body);
        let (s, v) = post(&app, uri, body.clone()).await;
        assert_error(
            s,
            &v,
            StatusCode::BAD_REQUEST,
            Some(param),
            &body.to_string(),
        );
    }
}

#[tokio::test]
async fn logit_bias_reaches_the_workers_sorted_by_id() {
    let backend = Scripted::new(text_script("Hello"));
    let app = openai_routes(state_with(backend.clone(), None));
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"logit_bias": {"300": -100, " 7": 2.5, "12": 0}})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let inp = backend.inputs().pop().unwrap();
    assert_eq!(
        inp.sampling.logit_bias,
        vec![(7, 2.5), (12, 0.0), (300, -100.0)]
    );

    // Without the field, nothing is biased; an empty object is the same.
    for body in [cmpl_body(json!({})), cmpl_body(json!({"logit_bias": {}}))] {
        let (s, _) = post(&app, "/v1/completions", body).await;
        assert_eq!(s, StatusCode::OK);
        assert!(backend
            .inputs()
            .pop()
            .unwrap()
            .sampling
            .logit_bias
            .is_empty());
    }
}

/// vLLM's `stop_reason` names the token of the client's `stop_token_ids`
/// that ended a choice, streamed or not, on chat and completions; the
/// model's own end of text leaves it `null`.
#[tokio::test]
async fn a_stop_token_the_client_named_is_the_stop_reason() {
    let eos = tokenizer().eos_ids()[0];
    for (ended_on, asked, want) in [(7, json!([7]), json!(7)), (eos, json!([7]), Value::Null)] {
        let backend = Scripted::new(Script {
            stop_token: Some(ended_on),
            extra_completion: 1,
            ..text_script("Blue")
        });
        let app = openai_routes(state_with(backend, None));
        let extra = json!({"stop_token_ids": asked});
        let (s, v) = post(&app, "/v1/chat/completions", chat_body(extra.clone())).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["stop_reason"], want, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let (s, v) = post(&app, "/v1/completions", cmpl_body(extra.clone())).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["stop_reason"], want, "{v}");
        let mut streamed = chat_body(extra);
        streamed["stream"] = json!(true);
        let chunks = stream_chunks(&app, "/v1/chat/completions", &streamed).await;
        let last = chunks
            .iter()
            .rev()
            .find(|c| !c["choices"][0]["finish_reason"].is_null());
        assert_eq!(
            last.unwrap()["choices"][0]["stop_reason"],
            want,
            "{chunks:?}"
        );
    }
    // With `include_stop_str_in_output`, the client's stop token keeps its
    // text, as vLLM's does; the model's own end of text writes none.
    let bang = tokenizer().token_to_id("!").unwrap();
    for (ended_on, want) in [(bang, "Blue!"), (eos, "Blue")] {
        let backend = Scripted::new(Script {
            stop_token: Some(ended_on),
            extra_completion: 1,
            ..text_script("Blue")
        });
        let app = openai_routes(state_with(backend, None));
        let extra = json!({"stop_token_ids": [bang], "include_stop_str_in_output": true});
        let (s, v) = post(&app, "/v1/completions", cmpl_body(extra.clone())).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["text"], want, "{v}");
        let mut streamed = chat_body(extra);
        streamed["stream"] = json!(true);
        let (text, _) = stream_text(&app, "/v1/chat/completions", streamed).await;
        assert_eq!(text, want);
    }
}

#[tokio::test]
async fn ignore_eos_and_min_tokens_reach_the_workers() {
    let text = "It is forty-two, as always.";
    let backend = Scripted::new(text_script(text));
    let state = state_with(backend.clone(), None);
    let model_stops = state.stop_token_ids.clone();
    assert!(!model_stops.is_empty());
    let app = openai_routes(state);

    // By default the model's end-of-sequence ids stop the generation and
    // nothing is masked.
    let (s, _) = post(&app, "/v1/completions", cmpl_body(json!({}))).await;
    assert_eq!(s, StatusCode::OK);
    let plain = backend.inputs().pop().unwrap();
    assert_eq!(plain.stop_token_ids, model_stops);
    assert_eq!(plain.sampling.min_tokens, 0);
    assert!(plain.sampling.min_tokens_masked.is_empty());

    // ignore_eos drops them; the client's own stop ids remain.
    let (s, _) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"ignore_eos": true, "stop_token_ids": [7]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(backend.inputs().pop().unwrap().stop_token_ids, vec![7]);

    // min_tokens masks exactly the ids that would stop the generation.
    let (s, _) = post(
        &app,
        "/v1/completions",
        cmpl_body(json!({"min_tokens": 3, "max_tokens": 8, "stop_token_ids": [7]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let inp = backend.inputs().pop().unwrap();
    assert_eq!(inp.sampling.min_tokens, 3);
    let mut want = model_stops.clone();
    want.push(7);
    assert_eq!(inp.sampling.min_tokens_masked, want);
    assert_eq!(inp.stop_token_ids, want);

    // A stop string inside the first min_tokens tokens does not end the
    // completion; one after them still does.
    let toks = ids(text);
    let n_before = (1..=toks.len())
        .find(|&k| {
            tokenizer()
                .decode(&toks[..k], false)
                .unwrap()
                .contains("forty-two")
        })
        .unwrap();
    for (min, want) in [(0, "It is "), (n_before, "It is forty-two, as always.")] {
        for stream in [false, true] {
            let body = cmpl_body(
                json!({"stop": ["forty-two", "always"], "min_tokens": min, "stream": stream}),
            );
            let got = if stream {
                stream_text(&app, "/v1/completions", body).await.0
            } else {
                let (s, v) = post(&app, "/v1/completions", body).await;
                assert_eq!(s, StatusCode::OK, "{v}");
                v["choices"][0]["text"].as_str().unwrap().to_string()
            };
            // With min_tokens covering "forty-two", "always" still stops it.
            let want = if min == 0 {
                want.to_string()
            } else {
                want.replace("always.", "")
            };
            assert_eq!(got, want, "min_tokens {min}, stream {stream}");
        }
    }

    // Bad values are 400s naming the parameter.
    for (body, param) in [
        (json!({"min_tokens": -1}), "min_tokens"),
        (json!({"min_tokens": 9, "max_tokens": 8}), "min_tokens"),
        (json!({"min_tokens": "3"}), "min_tokens"),
        (json!({"ignore_eos": "yes"}), "ignore_eos"),
    ] {
        let (s, v) = post(&app, "/v1/completions", cmpl_body(body.clone())).await;
        assert_error(
            s,
            &v,
            StatusCode::BAD_REQUEST,
            Some(param),
            &body.to_string(),
        );
    }
}

#[tokio::test]
async fn error_mid_stream() {
    let backend = Scripted::new(Script {
        tokens: vec![ids("Some words before the failure happens")],
        error_after: Some((3, DispatchError::Internal("worker died".into()))),
        ..Default::default()
    });
    let app = openai_routes(state_with(backend, None));
    let (s, _, b) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(json!({"stream": true})).to_string()),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let events = sse_events(&b);
    let (done, events) = events.split_last().unwrap();
    assert_eq!(done, "[DONE]", "{b}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["message"], "worker died");
    assert_eq!(last["error"]["type"], "server_error");
    let (s, v) = post(&app, "/v1/chat/completions", chat_body(json!({}))).await;
    assert_error(s, &v, StatusCode::INTERNAL_SERVER_ERROR, None, "mid error");
}

#[tokio::test]
async fn client_disconnect_cancels_generation() {
    let backend = Scripted::new(Script {
        tokens: vec![ids("Tokens keep coming")],
        hang: true,
        ..Default::default()
    });
    let app = openai_routes(state_with(backend.clone(), None));
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .body(Body::from(
            chat_body(json!({"stream": true, "n": 2})).to_string(),
        ))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Read a few frames, then hang up.
    for _ in 0..3 {
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("no frame")
            .unwrap()
            .unwrap();
        assert!(f.is_data());
    }
    assert_eq!(backend.cancelled.load(Ordering::SeqCst), 0);
    drop(body);
    tokio::time::timeout(Duration::from_secs(5), async {
        while backend.cancelled.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("dropping the SSE body did not cancel both generations");
}

#[tokio::test]
async fn logprobs_shapes() {
    let text = "Hello world";
    let toks = ids(text);
    let app = openai_routes(state_with(
        Scripted::new(Script {
            tokens: vec![toks.clone()],
            ..Default::default()
        }),
        None,
    ));
    let t = tokenizer();
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"logprobs": true, "top_logprobs": 2})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), toks.len());
    let first = &content[0];
    assert_eq!(first["token"], t.decode(&[toks[0]], false).unwrap());
    assert_eq!(first["logprob"], json!(-0.25));
    assert_eq!(first["bytes"], json!(t.token_bytes(toks[0]).unwrap()));
    assert_eq!(first["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(first["top_logprobs"][0]["bytes"].is_array());
    // Without logprobs: null.
    let (_, v) = post(&app, "/v1/chat/completions", chat_body(json!({}))).await;
    assert!(v["choices"][0]["logprobs"].is_null());

    let (s, v) = post(&app, "/v1/completions", cmpl_body(json!({"logprobs": 3}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), toks.len());
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), toks.len());
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(
        lp["text_offset"][1],
        json!(t.decode(&[toks[0]], false).unwrap().chars().count())
    );

    // Streaming chat carries logprobs per chunk.
    let (_, chunks) = stream_text(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"logprobs": true, "stream": true})),
    )
    .await;
    let n: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    assert_eq!(n, toks.len());
}

#[tokio::test]
async fn relay_latency_is_recorded() {
    let app = openai_routes(state_with(Scripted::new(text_script("a b c d e f")), None));
    let _ = stream_text(&app, "/v1/completions", cmpl_body(json!({"stream": true}))).await;
    let (p50, p99, n) = relay_latency_summary();
    assert!(n >= 1);
    assert!(p50 >= 0.0 && p99 >= p50 && p99 < 1.0, "{p50} {p99}");
}

#[test]
fn state_builds_template_and_stop_ids() {
    let st = state_with(Scripted::new(Script::default()), None);
    assert!(st.chat_template.is_some());
    assert_eq!(st.stop_token_ids, tokenizer().eos_ids().to_vec());
    assert!(ApiState::new(
        Scripted::new(Script::default()),
        tokenizer(),
        String::new(),
        CTX,
        None
    )
    .is_err());
}

// ---------------------------------------------------------------------------
// gRPC

mod grpc_tests {
    use super::*;
    use futures_util::StreamExt;
    use tandem_proto::generate::{
        ChatMessage as PbMsg, ChatMessages, FinishReason as PbFinish, Generate, GenerateRequest,
        Input, SamplingParams, TokenIds,
    };

    fn api(backend: Arc<Scripted>, key: Option<&str>) -> GenerateApi {
        GenerateApi::new(state_with(backend, key))
    }

    fn req(input: Input, sampling: SamplingParams) -> tonic::Request<GenerateRequest> {
        tonic::Request::new(GenerateRequest {
            model: String::new(),
            input: Some(input),
            sampling: Some(sampling),
            request_id: String::new(),
        })
    }

    #[tokio::test]
    async fn unary_and_stream() {
        let text = "Bonjour 🦀 le monde, fin.";
        let backend = Scripted::new(Script {
            tokens: vec![ids(text)],
            ..Default::default()
        });
        let api = api(backend.clone(), None);
        let mut r = req(Input::Text("Say hi".into()), SamplingParams::default());
        r.get_mut().request_id = "my-req".into();
        let resp = api.generate(r).await.unwrap().into_inner();
        assert_eq!(resp.request_id, "my-req");
        assert_eq!(resp.text, text);
        assert_eq!(resp.token_ids, ids(text));
        assert_eq!(resp.finish_reason, PbFinish::Stop as i32);
        let u = resp.usage.unwrap();
        assert_eq!(
            u.prompt_tokens as usize,
            tokenizer().encode("Say hi", true).unwrap().len()
        );
        assert_eq!(u.completion_tokens as usize, ids(text).len());
        assert_eq!(u.total_tokens, u.prompt_tokens + u.completion_tokens);
        assert_eq!(backend.inputs()[0].request_id, "my-req-0");

        // Streaming with chat messages, a stop string and logprobs.
        let sampling = SamplingParams {
            stop: vec!["le monde".into()],
            logprobs: 2,
            max_tokens: Some(50),
            ..Default::default()
        };
        let msgs = Input::Messages(ChatMessages {
            messages: vec![PbMsg {
                role: "user".into(),
                content: "hi".into(),
            }],
        });
        let stream = api
            .generate_stream(req(msgs, sampling))
            .await
            .unwrap()
            .into_inner();
        let msgs: Vec<_> =
            tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>())
                .await
                .unwrap();
        let msgs: Vec<_> = msgs.into_iter().map(Result::unwrap).collect();
        let streamed: String = msgs.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(streamed, "Bonjour 🦀 ");
        let last = msgs.last().unwrap();
        assert_eq!(last.finish_reason, PbFinish::Stop as i32);
        assert!(last.usage.is_some());
        assert!(msgs[..msgs.len() - 1]
            .iter()
            .all(|m| m.usage.is_none() && m.finish_reason == 0));
        assert!(!msgs[0].request_id.is_empty());
        assert_eq!(msgs[0].logprobs.len(), 3, "sampled + 2 alternatives");
        assert_eq!(msgs[0].logprobs[0].token_id, msgs[0].token_ids[0]);
        let inputs = backend.inputs();
        let chat_in = inputs.last().unwrap();
        assert_eq!(
            chat_in.prompt,
            state_with(Scripted::new(Script::default()), None)
                .chat_prompt(&[ChatMessage::new("user", "hi")])
                .unwrap()
        );
        assert_eq!(chat_in.sampling.top_logprobs, 2);
        assert_eq!(chat_in.max_tokens, Some(50));

        // Token ids in.
        let resp = api
            .generate(req(
                Input::TokenIds(TokenIds { ids: vec![1, 2, 3] }),
                SamplingParams::default(),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.usage.unwrap().prompt_tokens, 3);
    }

    #[tokio::test]
    async fn errors_map_to_codes() {
        let api_ = api(Scripted::new(text_script("x")), None);
        for (sampling, what) in [
            (
                SamplingParams {
                    temperature: Some(5.0),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    max_tokens: Some(9000),
                    ..Default::default()
                },
                "context length",
            ),
            (
                SamplingParams {
                    logprobs: 21,
                    ..Default::default()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    stop: vec!["a".into(); 65],
                    ..Default::default()
                },
                "stop",
            ),
        ] {
            let e = api_
                .generate(req(Input::Text("hi".into()), sampling))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
            assert!(e.message().contains(what), "{what}: {}", e.message());
        }
        let e = api_
            .generate(req(
                Input::TokenIds(TokenIds { ids: vec![] }),
                SamplingParams::default(),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = api_
            .generate(req(
                Input::Messages(ChatMessages { messages: vec![] }),
                SamplingParams::default(),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let mut r = req(Input::Text("hi".into()), SamplingParams::default());
        r.get_mut().input = None;
        assert_eq!(
            api_.generate(r).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let mut r = req(Input::Text("hi".into()), SamplingParams::default());
        r.get_mut().model = "other".into();
        assert_eq!(
            api_.generate(r).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        let mut r = req(Input::Text("hi".into()), SamplingParams::default());
        r.get_mut().model = MODEL.into();
        assert!(api_.generate(r).await.is_ok());

        let down = api(
            Scripted::new(Script {
                refuse: Some(DispatchError::Unavailable("busy".into())),
                ..Default::default()
            }),
            None,
        );
        let e = down
            .generate(req(Input::Text("hi".into()), SamplingParams::default()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let e = down
            .generate_stream(req(Input::Text("hi".into()), SamplingParams::default()))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::Unavailable);

        let locked = api(Scripted::new(text_script("x")), Some("k3y"));
        let e = locked
            .generate(req(Input::Text("hi".into()), SamplingParams::default()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut r = req(Input::Text("hi".into()), SamplingParams::default());
        r.metadata_mut()
            .insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            locked.generate(r).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut r = req(Input::Text("hi".into()), SamplingParams::default());
        r.metadata_mut()
            .insert("authorization", "Bearer k3y".parse().unwrap());
        assert!(locked.generate(r).await.is_ok());
    }

    #[tokio::test]
    async fn dropping_the_grpc_stream_cancels() {
        let backend = Scripted::new(Script {
            tokens: vec![ids("a b c")],
            hang: true,
            ..Default::default()
        });
        let api = api(backend.clone(), None);
        let mut stream = api
            .generate_stream(req(Input::Text("hi".into()), SamplingParams::default()))
            .await
            .unwrap()
            .into_inner();
        assert!(stream.next().await.unwrap().is_ok());
        drop(stream);
        tokio::time::timeout(Duration::from_secs(5), async {
            while backend.cancelled.load(Ordering::SeqCst) < 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("dropping the gRPC stream did not cancel");
    }
}

/// A body declared larger than the limit is refused 413 before it is read
/// (here it never comes: the answer must not wait for it); a compressed
/// one 415.
#[tokio::test(start_paused = true)]
async fn a_body_declared_too_large_is_refused_at_once() {
    let app = openai_routes(state_with(Scripted::new(text_script("Hello")), None));
    for uri in ["/v1/completions", "/v1/messages"] {
        let (_tx, rx) = mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
        let req = Request::builder()
            .method("POST")
            .uri(uri)
            .header("content-type", "application/json")
            .header(
                "content-length",
                (openai::MAX_BODY_BYTES as u64 + 1).to_string(),
            )
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(1), app.clone().oneshot(req))
            .await
            .expect("answered without reading the body")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE, "{uri}");
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains("at most"),
            "{v}"
        );
    }
    // A compressed body: 415, saying so, not "invalid JSON".
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(Body::from(vec![0x1f, 0x8b, 8, 0]))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("gzip"),
        "{v}"
    );
}

/// A request body that stalls is answered 408 once it has been idle for
/// `BODY_IDLE_TIMEOUT`; one that is slow but keeps coming is served.
#[tokio::test(start_paused = true)]
async fn a_stalled_request_body_times_out_and_a_slow_one_does_not() {
    let app = openai_routes(state_with(Scripted::new(text_script("Hello")), None));
    let body = cmpl_body(json!({})).to_string().into_bytes();
    // Sends `body` in three parts, `gap` apart; with `stall`, the last never comes.
    let send = |gap: Duration, stall: bool| {
        let (tx, rx) = mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(4);
        let body = body.clone();
        tokio::spawn(async move {
            let third = body.len() / 3;
            for (i, part) in body.chunks(third.max(1)).enumerate() {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                if stall && i == 2 {
                    // Hold the sender open: the body neither ends nor errs.
                    std::future::pending::<()>().await;
                }
                let _ = tx.send(Ok(axum::body::Bytes::copy_from_slice(part))).await;
            }
        });
        Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .header("content-type", "application/json")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap()
    };
    let started = tokio::time::Instant::now();
    let resp = tokio::time::timeout(
        openai::BODY_IDLE_TIMEOUT * 2,
        app.clone().oneshot(send(Duration::from_secs(1), true)),
    )
    .await
    .expect("a stalled body is not waited on for ever")
    .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    let waited = started.elapsed();
    assert!(
        waited >= openai::BODY_IDLE_TIMEOUT
            && waited < openai::BODY_IDLE_TIMEOUT + Duration::from_secs(5),
        "answered after {waited:?}"
    );
    let gap = openai::BODY_IDLE_TIMEOUT - Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    let resp = app.clone().oneshot(send(gap, false)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(started.elapsed() >= gap * 2, "the whole body was read");
}

/// `/tokenize` gives exactly the ids the completion and chat routes hand
/// the backend; `/detokenize` gives the text back; bad input is a 400
/// naming the field.
#[tokio::test]
async fn tokenize_and_detokenize_agree_with_the_generation_routes() {
    let backend = Scripted::new(text_script("Hi"));
    let app = openai_routes(state_with(backend.clone(), None));
    let text = "The quick brown fox, 42 times.";

    let (s, _) = post(&app, "/v1/completions", cmpl_body(json!({"prompt": text}))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = post(&app, "/tokenize", json!({"model": MODEL, "prompt": text})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(
        tokens,
        backend.inputs()[0].prompt,
        "as /v1/completions tokenizes"
    );
    assert_eq!(v["count"], tokens.len());
    assert_eq!(v["max_model_len"], CTX);
    assert!(v.get("token_strs").is_none());
    // vLLM's `return_token_strs`: the vocabulary's spelling of each.
    let body = json!({"prompt": text, "return_token_strs": true});
    let (s, v) = post(&app, "/tokenize", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let strs: Vec<String> = serde_json::from_value(v["token_strs"].clone()).unwrap();
    let t = tokenizer();
    let spelled: Vec<String> = tokens
        .iter()
        .map(|&id| t.id_to_token(id).unwrap())
        .collect();
    assert_eq!(strs, spelled);
    assert!(strs.iter().any(|s| s.contains("quick")), "{strs:?}");

    let messages =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]);
    let (s, _) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"messages": messages})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = post(&app, "/tokenize", json!({"messages": messages})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let chat: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(
        chat,
        backend.inputs()[1].prompt,
        "as /v1/chat/completions templates"
    );
    assert!(chat.len() > tokens.len());

    let (s, v) = post(&app, "/detokenize", json!({"tokens": ids(text)})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["prompt"], text);

    for (uri, body, param) in [
        (
            "/detokenize",
            json!({"tokens": [1, 100000000]}),
            Some("tokens"),
        ),
        ("/detokenize", json!({"tokens": "12"}), Some("tokens")),
        ("/detokenize", json!({}), Some("tokens")),
        ("/tokenize", json!({}), Some("prompt")),
        ("/tokenize", json!({"messages": []}), Some("messages")),
    ] {
        let (s, v) = post(&app, uri, body.clone()).await;
        assert_error(
            s,
            &v,
            StatusCode::BAD_REQUEST,
            param,
            &format!("{uri} {body}"),
        );
    }
    let (s, v) = post(&app, "/tokenize", json!({"model": "other", "prompt": "x"})).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, Some("model"), "wrong model");
}

/// Typed Responses events (`event:` and `data:` lines), in order.
fn response_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut lines = e.lines();
            let kind = lines.next().and_then(|l| l.strip_prefix("event: "));
            let data = lines.next().and_then(|l| l.strip_prefix("data: "));
            let v: Value = serde_json::from_str(data.unwrap_or_else(|| panic!("{e:?}"))).unwrap();
            assert_eq!(kind, v["type"].as_str(), "{e}");
            v
        })
        .collect()
}

/// Sends the chat request with `extra` and checks that the workers got the
/// prompt and limit of the request before it (a translated API's); returns
/// the chat answer.
async fn same_as_chat(app: &axum::Router, backend: &Scripted, extra: Value) -> Value {
    let (s, c) = post(app, "/v1/chat/completions", chat_body(extra)).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let inputs = backend.inputs();
    let (translated, chat) = (&inputs[inputs.len() - 2], &inputs[inputs.len() - 1]);
    assert_eq!(translated.prompt, chat.prompt);
    assert_eq!(translated.max_tokens, chat.max_tokens);
    c
}

/// `/v1/responses` is the chat request it stands for: the same messages
/// (instructions first, items in order, earlier calls and their outputs
/// as tool turns), the same limits and format, and its answer as a
/// response object or as typed events that add up to it.
#[tokio::test]
async fn responses_are_chat_in_the_responses_shape() {
    let backend = Scripted::new(text_script("Paris is the capital."));
    let app = openai_routes(state_with(backend.clone(), None));
    let body = json!({
        "model": MODEL,
        "instructions": "Be brief.",
        "input": "What is the capital of France?",
        "max_output_tokens": 12,
        "temperature": 0,
    });
    let (s, v) = post(&app, "/v1/responses", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "response");
    assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");
    assert_eq!(v["status"], "completed");
    let (created, completed) = (v["created_at"].as_u64(), v["completed_at"].as_u64());
    assert!(created.is_some() && completed >= created, "{v}");
    assert_eq!(v["store"], false);
    assert_eq!(v["instructions"], "Be brief.");
    assert!(v["top_logprobs"].is_null(), "{v}");
    let mut with_top = body.clone();
    with_top["top_logprobs"] = json!(2);
    let (s, w) = post(&app, "/v1/responses", with_top).await;
    assert_eq!(s, StatusCode::OK, "{w}");
    assert_eq!(w["top_logprobs"], 2, "the request's setting, echoed");
    let item = &v["output"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["content"][0]["type"], "output_text");
    assert_eq!(item["content"][0]["text"], "Paris is the capital.");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["input_tokens"].as_u64().unwrap() + u["output_tokens"].as_u64().unwrap()
    );
    // The same prompt and limits as the chat request.
    let c = same_as_chat(
        &app,
        &backend,
        json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
        ], "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(u["input_tokens"], c["usage"]["prompt_tokens"]);

    // Streamed: typed events in order, whose deltas add up to the text.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (s, _, text) = call(&app, "POST", "/v1/responses", Some(&sb.to_string()), None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let events = response_events(&text);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        kinds[kinds.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "Paris is the capital.");
    let done = &events.last().unwrap()["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], deltas);
    assert_eq!(done["usage"]["output_tokens"], v["usage"]["output_tokens"]);

    // Cut by max_output_tokens: incomplete, as OpenAI says it.
    let short = Scripted::new(Script {
        tokens: vec![ids("one two three four five six")],
        ..Default::default()
    });
    let app2 = openai_routes(state_with(short, None));
    let (s, v) = post(
        &app2,
        "/v1/responses",
        json!({"model": MODEL, "input": "Count", "max_output_tokens": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["completed_at"], Value::Null);
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["output"][0]["status"], "incomplete");
}

#[tokio::test]
async fn responses_items_tools_and_formats_become_chat() {
    let args = r#"{"city": "Paris"}"#;
    let backend = Scripted::new(text_script(args));
    let app = openai_routes(state_with(backend.clone(), None));
    let tools = json!([{
        "type": "function", "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }]);
    let body = json!({
        "model": MODEL,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}],
        "tools": tools,
        "tool_choice": {"type": "function", "name": "get_weather"},
    });
    let (s, v) = post(&app, "/v1/responses", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let call = &v["output"][0];
    assert_eq!(call["type"], "function_call", "{v}");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], args);
    assert!(
        call["call_id"].as_str().unwrap().starts_with("call_"),
        "{call}"
    );
    assert_eq!(last_schema(&backend), tools[0]["parameters"]);
    // Streamed, the call's arguments come as they are written (one delta
    // per token), in one item, then whole.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (_, _, text) = call_text(&app, &sb).await;
    let events = response_events(&text);
    let of = |kind: &str| -> Vec<&Value> { events.iter().filter(|e| e["type"] == kind).collect() };
    let args_done = of("response.function_call_arguments.done");
    assert_eq!(args_done.len(), 1, "{text}");
    assert_eq!(args_done[0]["arguments"], args);
    let deltas = of("response.function_call_arguments.delta");
    assert_eq!(deltas.len(), ids(args).len(), "{text}");
    let streamed: String = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, args);
    let added = of("response.output_item.added");
    assert_eq!(added.len(), 1, "{text}");
    assert_eq!(added[0]["item"]["name"], "get_weather");
    assert_eq!(added[0]["item"]["id"], args_done[0]["item_id"]);
    let done = &events.last().unwrap()["response"];
    assert_eq!(done["output"][0]["type"], "function_call");
    assert_eq!(done["output"].as_array().unwrap().len(), 1);
    let seq: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(seq.windows(2).all(|w| w[1] == w[0] + 1), "{seq:?}");

    // The call and its output go back as the chat turns they are.
    let follow = json!({
        "model": MODEL,
        "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": args},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        ],
        "tools": tools,
        "tool_choice": "none",
    });
    let (s, v) = post(&app, "/v1/responses", follow).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    same_as_chat(
        &app,
        &backend,
        json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        ],
        "tools": weather_tools().as_array().unwrap()[..1].to_vec(),
        "tool_choice": "none",
    }),
    )
    .await;

    // text.format json_schema is the chat response_format.
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let (s, v) = post(
        &app,
        "/v1/responses",
        json!({"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema", "name": "t", "schema": schema}}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(last_schema(&backend), schema);
}

async fn call_text(
    app: &axum::Router,
    body: &Value,
) -> (StatusCode, axum::http::HeaderMap, String) {
    call(app, "POST", "/v1/responses", Some(&body.to_string()), None).await
}

#[tokio::test]
async fn responses_refuse_what_they_cannot_do_naming_the_field() {
    let app = openai_routes(state_with(Scripted::new(text_script("Hi")), None));
    let cases = [
        (json!({"model": MODEL}), Some("input")),
        (json!({"model": MODEL, "input": 3}), Some("input")),
        (
            json!({"model": MODEL, "input": "x", "previous_response_id": "resp_1"}),
            Some("previous_response_id"),
        ),
        (
            json!({"model": MODEL, "input": "x", "background": true}),
            Some("background"),
        ),
        (
            json!({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
            Some("input[0].content[0].type"),
        ),
        (
            json!({"model": MODEL, "input": [{"type": "file_search_call"}]}),
            Some("input[0].type"),
        ),
        (
            json!({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}),
            Some("tools[0].type"),
        ),
        (
            json!({"model": MODEL, "input": "x", "max_output_tokens": 0}),
            Some("max_output_tokens"),
        ),
        (
            json!({"model": MODEL, "input": "x", "temperature": "hot"}),
            Some("temperature"),
        ),
        (json!({"model": MODEL, "input": []}), Some("input")),
        (
            json!({"model": MODEL, "input": "x", "text": {"format": {"type": "yaml"}}}),
            Some("text.format.type"),
        ),
        (
            json!({"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "bad name!"}]}),
            Some("tools[0].name"),
        ),
        (
            json!({"model": MODEL, "input": [{"role": "user"}]}),
            Some("input[0].content"),
        ),
    ];
    for (body, param) in cases {
        let (s, v) = post(&app, "/v1/responses", body.clone()).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, param, &body.to_string());
    }
    let (s, v) = post(
        &app,
        "/v1/responses",
        json!({"model": "nope", "input": "x"}),
    )
    .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, Some("model"), "unknown model");
}

#[tokio::test]
async fn a_responses_stream_that_fails_ends_with_response_failed() {
    let backend = Scripted::new(Script {
        tokens: vec![ids("Some words before the failure happens")],
        error_after: Some((3, DispatchError::Internal("worker died".into()))),
        ..Default::default()
    });
    let app = openai_routes(state_with(backend, None));
    let (s, _, text) =
        call_text(&app, &json!({"model": MODEL, "input": "x", "stream": true})).await;
    assert_eq!(s, StatusCode::OK);
    let events = response_events(&text);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.failed", "{text}");
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(last["response"]["error"]["message"], "worker died");
}

/// Anthropic's events (`event:` and `data:` lines, the type in both).
fn message_events(body: &str) -> Vec<Value> {
    response_events(body)
}

async fn post_messages(
    app: &axum::Router,
    body: &Value,
    key: Option<&str>,
) -> (StatusCode, String) {
    post_anthropic(app, "/v1/messages", body, key).await
}

async fn post_anthropic(
    app: &axum::Router,
    uri: &str,
    body: &Value,
    key: Option<&str>,
) -> (StatusCode, String) {
    let mut b = Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01");
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    let resp = app
        .clone()
        .oneshot(b.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

fn anthropic_error(status: StatusCode, body: &str, want: StatusCode, kind: &str, ctx: &str) {
    assert_eq!(status, want, "{ctx}: {body}");
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["type"], "error", "{ctx}: {v}");
    assert_eq!(v["error"]["type"], kind, "{ctx}: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{ctx}: {v}"
    );
}

/// `/v1/messages` is the chat request it stands for (system first, the
/// same limits), answered as a message with content blocks, a stop reason
/// (a stop sequence named) and usage, or as Anthropic's events.
#[tokio::test]
async fn anthropic_messages_are_chat_in_the_messages_shape() {
    let backend = Scripted::new(text_script("Paris. It is lovely."));
    let app = openai_routes(state_with(backend.clone(), None));
    let body = json!({
        "model": MODEL,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "max_tokens": 12,
        "temperature": 0,
    });
    let (s, text) = post_messages(&app, &body, None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"), "{v}");
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "Paris. It is lovely."}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    let c = same_as_chat(
        &app,
        &backend,
        json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ], "max_tokens": 12, "temperature": 0}),
    )
    .await;
    // Anthropic counts the cached part of the prompt apart.
    let u = &v["usage"];
    assert_eq!(
        u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap(),
        c["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{u}"
    );
    assert_eq!(u["output_tokens"], c["usage"]["completion_tokens"]);
    let prompt_tokens = c["usage"]["prompt_tokens"].as_u64().unwrap();

    // count_tokens: the same prompt's size, without running it (no
    // max_tokens needed); a bad request is refused in Anthropic's shape.
    let requests = backend.inputs().len();
    let mut count = body.clone();
    count.as_object_mut().unwrap().remove("max_tokens");
    let (s, text) = post_anthropic(&app, "/v1/messages/count_tokens", &count, None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v, json!({"input_tokens": prompt_tokens}));
    assert_eq!(
        backend.inputs().len(),
        requests,
        "count_tokens ran a request"
    );
    // With tools and no tool choice (a run's "auto"): counted as with
    // any choice, the tools being in the prompt either way.
    let tools = json!([{"name": "f", "input_schema": {"type": "object"}}]);
    let mut counts = Vec::new();
    for choice in [
        None,
        Some(json!({"type": "auto"})),
        Some(json!({"type": "any"})),
    ] {
        let mut c = count.clone();
        c["tools"] = tools.clone();
        if let Some(choice) = choice {
            c["tool_choice"] = choice;
        }
        let (s, text) = post_anthropic(&app, "/v1/messages/count_tokens", &c, None).await;
        assert_eq!(s, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        counts.push(v["input_tokens"].as_u64().expect("a count"));
    }
    assert!(counts.iter().all(|&c| c == counts[2]), "{counts:?}");
    let (s, text) = post_anthropic(
        &app,
        "/v1/messages/count_tokens",
        &json!({"model": MODEL}),
        None,
    )
    .await;
    anthropic_error(
        s,
        &text,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "count_tokens",
    );

    // A stop sequence ends it and is named.
    let mut stop = body.clone();
    stop["stop_sequences"] = json!(["."]);
    let (s, text) = post_messages(&app, &stop, None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["content"][0]["text"], "Paris");
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], ".");

    // Streamed: the events in order, the deltas adding up to the text.
    let mut sb = stop.clone();
    sb["stream"] = json!(true);
    let (s, text) = post_messages(&app, &sb, None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let events = message_events(&text);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[..2], ["message_start", "content_block_start"]);
    // The prompt's size is known from the start.
    let su = &events[0]["message"]["usage"];
    assert_eq!(
        su["input_tokens"].as_u64().unwrap() + su["cache_read_input_tokens"].as_u64().unwrap(),
        prompt_tokens,
        "{su}"
    );
    assert_eq!(su["output_tokens"], 0);
    assert_eq!(
        kinds[kinds.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let streamed: String = events
        .iter()
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| e["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, "Paris");
    let delta = &events[events.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], "stop_sequence");
    assert_eq!(delta["delta"]["stop_sequence"], ".");
    assert!(
        delta["usage"]["output_tokens"].as_u64().unwrap() > 0,
        "{delta}"
    );

    // Cut by max_tokens.
    let mut short = body.clone();
    short["max_tokens"] = json!(2);
    let (_, text) = post_messages(&app, &short, None).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["stop_reason"], "max_tokens", "{v}");
}

#[tokio::test]
async fn anthropic_tools_are_chat_tools() {
    let args = r#"{"city": "Paris"}"#;
    let backend = Scripted::new(text_script(args));
    let app = openai_routes(state_with(backend.clone(), None));
    let tools = json!([{
        "name": "get_weather", "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }]);
    let body = json!({
        "model": MODEL, "max_tokens": 64,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}],
        "tools": tools, "tool_choice": {"type": "tool", "name": "get_weather"},
    });
    let (s, text) = post_messages(&app, &body, None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let block = &v["content"][0];
    assert_eq!(block["type"], "tool_use", "{v}");
    assert_eq!(block["name"], "get_weather");
    assert_eq!(block["input"], json!({"city": "Paris"}));
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(last_schema(&backend), tools[0]["input_schema"]);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (_, text) = post_messages(&app, &sb, None).await;
    let events = message_events(&text);
    let partial: String = events
        .iter()
        .filter(|e| e["delta"]["type"] == "input_json_delta")
        .map(|e| e["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(partial, args);
    // The input streams as it is written: one delta per token, in one block.
    let pieces = events
        .iter()
        .filter(|e| e["delta"]["type"] == "input_json_delta")
        .count();
    assert_eq!(pieces, ids(args).len(), "{text}");
    let starts: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "content_block_start")
        .collect();
    assert_eq!(starts.len(), 1, "{text}");
    assert_eq!(starts[0]["content_block"]["name"], "get_weather");
    assert_eq!(events[events.len() - 2]["delta"]["stop_reason"], "tool_use");

    // tool_use and tool_result blocks go back as the chat turns they are.
    let id = block["id"].as_str().unwrap();
    let follow = json!({
        "model": MODEL, "max_tokens": 16,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [block.clone()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "Sunny"}]},
        ],
        "tools": tools, "tool_choice": {"type": "none"},
    });
    let (s, text) = post_messages(&app, &follow, None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    same_as_chat(
        &app,
        &backend,
        json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": id, "type": "function", "function": {"name": "get_weather", "arguments": block["input"].to_string()}}]},
            {"role": "tool", "tool_call_id": id, "content": "Sunny"},
        ],
        "max_tokens": 16,
        "tools": weather_tools().as_array().unwrap()[..1].to_vec(),
        "tool_choice": "none",
    }),
    )
    .await;

    // output_config.format is the chat response_format.
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let body = json!({
        "model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "x"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    });
    let (s, text) = post_messages(&app, &body, None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(last_schema(&backend), schema);
}

#[tokio::test]
async fn anthropic_errors_come_in_anthropics_shape() {
    let app = openai_routes(state_with(
        Scripted::new(text_script("Hi")),
        Some("sk-test"),
    ));
    let ok =
        json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]});
    let (s, text) = post_messages(&app, &ok, Some("sk-test")).await;
    assert_eq!(s, StatusCode::OK, "x-api-key is accepted: {text}");
    for thinking in [Value::Null, json!({"type": "disabled"})] {
        let mut body = ok.clone();
        body["thinking"] = thinking;
        let (s, text) = post_messages(&app, &body, Some("sk-test")).await;
        assert_eq!(s, StatusCode::OK, "thinking off is fine: {text}");
    }
    let (s, text) = post_messages(&app, &ok, Some("wrong")).await;
    anthropic_error(
        s,
        &text,
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "wrong key",
    );
    let (s, text) = post_messages(&app, &ok, None).await;
    anthropic_error(
        s,
        &text,
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "no key",
    );
    // count_tokens is the Messages API too.
    let count = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    let (s, text) = post_anthropic(&app, "/v1/messages/count_tokens", &count, Some("wrong")).await;
    anthropic_error(
        s,
        &text,
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "count_tokens, wrong key",
    );
    let bad = [
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
        json!({"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "Hi"}]}),
        json!({"model": MODEL, "max_tokens": 4, "messages": []}),
        json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": "Hi"}]}),
        json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
        json!({"model": MODEL, "max_tokens": 4, "thinking": {"type": "enabled", "budget_tokens": 1024}, "messages": [{"role": "user", "content": "Hi"}]}),
        json!({"model": MODEL, "max_tokens": 4, "tools": [{"type": "web_search_20250305", "name": "web_search"}], "messages": [{"role": "user", "content": "Hi"}]}),
        json!({"model": MODEL, "max_tokens": 4, "stop_sequences": vec!["a"; 65], "messages": [{"role": "user", "content": "Hi"}]}),
        json!({"model": MODEL, "max_tokens": 4, "temperature": 1.5, "messages": [{"role": "user", "content": "Hi"}]}),
    ];
    for body in bad {
        let (s, text) = post_messages(&app, &body, Some("sk-test")).await;
        anthropic_error(
            s,
            &text,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &body.to_string(),
        );
    }
    let mut unknown = ok.clone();
    unknown["model"] = json!("claude-nope");
    let (s, text) = post_messages(&app, &unknown, Some("sk-test")).await;
    anthropic_error(
        s,
        &text,
        StatusCode::NOT_FOUND,
        "not_found_error",
        "unknown model",
    );
}

#[tokio::test]
async fn an_anthropic_stream_that_fails_ends_with_an_error_event() {
    let backend = Scripted::new(Script {
        tokens: vec![ids("Some words before the failure happens")],
        error_after: Some((3, DispatchError::Internal("worker died".into()))),
        ..Default::default()
    });
    let app = openai_routes(state_with(backend, None));
    let body = json!({"model": MODEL, "max_tokens": 16, "stream": true,
                      "messages": [{"role": "user", "content": "Hi"}]});
    let (s, text) = post_messages(&app, &body, None).await;
    assert_eq!(s, StatusCode::OK);
    let events = message_events(&text);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{text}");
    assert_eq!(last["error"]["type"], "api_error");
    assert_eq!(last["error"]["message"], "worker died");
}

/// Requests clients send without thinking twice: a completion without
/// `max_tokens` gets OpenAI's 16 (less where the context ends sooner),
/// vLLM constraints tandem lacks are refused by name, `json_object` under
/// `structured_outputs` is the JSON mode, and a value the workers would see
/// as 0 is refused as 0 here.
#[tokio::test]
async fn defaults_and_refusals_match_what_clients_expect() {
    let backend = Scripted::new(text_script("Hello there, friend"));
    let app = openai_routes(state_with(backend.clone(), None));
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Once upon a time"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(backend.inputs().last().unwrap().max_tokens, Some(16));
    let near_end: Vec<u32> = vec![42; CTX - 5];
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"model": MODEL, "prompt": near_end}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(backend.inputs().last().unwrap().max_tokens, Some(5));
    // Chat keeps the rest of the context.
    let (s, _) = post(&app, "/v1/chat/completions", chat_body(json!({}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(backend.inputs().last().unwrap().max_tokens, None);

    for (uri, extra, param) in [
        (
            "/v1/chat/completions",
            json!({"guided_grammar": "root ::= \"a\""}),
            "guided_grammar",
        ),
        (
            "/v1/chat/completions",
            json!({"structured_outputs": {"grammar": "root ::= \"a\""}}),
            "structured_outputs.grammar",
        ),
        (
            "/v1/completions",
            json!({"structured_outputs": {"structural_tag": "{}"}}),
            "structured_outputs.structural_tag",
        ),
        ("/v1/chat/completions", json!({"best_of": 2}), "best_of"),
        ("/v1/chat/completions", json!({"top_p": 1e-300}), "top_p"),
        (
            "/v1/chat/completions",
            json!({"repetition_penalty": 1e-300}),
            "repetition_penalty",
        ),
    ] {
        let mut body = match uri {
            "/v1/completions" => json!({"model": MODEL, "prompt": "Hi"}),
            _ => chat_body(json!({})),
        };
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (s, v) = post(&app, uri, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }

    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"structured_outputs": {"json_object": true}})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(backend.inputs().last().unwrap().sampling.json_object);

    // A limit past any context says so without wrapping around.
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"max_tokens": 9223372036854775777i64})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(!msg.contains('-'), "{msg}");
}

/// `/tokenize` with `add_generation_prompt: false` leaves the assistant's
/// turn unopened, as the chat request with the same flag does.
#[tokio::test]
async fn tokenize_honours_add_generation_prompt() {
    let backend = Scripted::new(text_script("Hi"));
    let app = openai_routes(state_with(backend.clone(), None));
    let messages = json!([{"role": "user", "content": "hi"}]);
    let count = |open: Value| {
        let app = app.clone();
        let messages = messages.clone();
        async move {
            let mut body = json!({"model": MODEL, "messages": messages});
            if !open.is_null() {
                body["add_generation_prompt"] = open;
            }
            let (s, v) = post(&app, "/tokenize", body).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["tokens"].as_array().unwrap().clone()
        }
    };
    let open = count(Value::Null).await;
    assert_eq!(count(json!(true)).await, open);
    let closed = count(json!(false)).await;
    assert!(closed.len() < open.len(), "{closed:?} vs {open:?}");
    assert_eq!(closed[..], open[..closed.len()]);
    let (s, _) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"messages": messages, "add_generation_prompt": false})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<u32> = closed.iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(backend.inputs().last().unwrap().prompt, ids);
}

/// A constraint the workers cannot compile is the client's error, naming
/// the field it came from.
#[tokio::test]
async fn a_refused_constraint_names_its_field() {
    let why = "invalid sampling parameter: invalid response format: no output can match it";
    let backend = Scripted::new(Script {
        refuse: Some(DispatchError::Invalid(why.into())),
        ..Default::default()
    });
    let app = openai_routes(state_with(backend, None));
    let tool =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    for (extra, param) in [
        (json!({"guided_regex": "a"}), "guided_regex"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"structured_outputs": {"regex": "a"}}),
            "structured_outputs",
        ),
        (json!({"tools": tool, "tool_choice": "required"}), "tools"),
    ] {
        let (s, v) = post(&app, "/v1/chat/completions", chat_body(extra.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.ends_with("no output can match it"), "{msg}");
    }
}

/// The translated APIs' refusals speak their own API: Anthropic's and the
/// Responses API's spelling of the tool choices to send instead, and
/// Anthropic's header for the key.
#[tokio::test]
async fn translated_refusals_speak_their_own_api() {
    let backend = Scripted::new(text_script("Hi"));
    let app = openai_routes(state_with(backend.clone(), None));
    let body = json!({
        "model": MODEL, "max_tokens": 8,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [{"name": "w", "input_schema": {"type": "object"}}],
    });
    let (s, text) = post_messages(&app, &body, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(r#"{"type": "any"} or {"type": "tool", "name": ...}"#)
            && msg.contains(r#"{"type": "none"} for text"#)
            && msg.contains(r#"as {"type": "auto"}"#),
        "{msg}"
    );
    assert!(!msg.contains("\"function\""), "{msg}");

    let (s, v) = post(
        &app,
        "/v1/responses",
        json!({"model": MODEL, "input": "Weather?",
               "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(r#""required" or {"type": "function", "name": ...}"#),
        "{msg}"
    );

    let mut empty = body.clone();
    empty["messages"] = json!([{"role": "user", "content": [{"type": "text", "text": ""}]}]);
    let (s, text) = post_messages(&app, &empty, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(text.contains("messages[0].content[0].text"), "{text}");

    let locked = openai_routes(state_with(backend, Some("sk-x")));
    let (s, text) = post_messages(&locked, &body, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(text.contains("x-api-key"), "{text}");
}

/// vLLM's `continue_final_message` (and Anthropic's prefilled answer, a
/// final assistant message): the prompt ends right after the final
/// message's text, inside its turn, so the model goes on with it.
#[tokio::test]
async fn a_final_message_can_be_continued() {
    let backend = Scripted::new(text_script(" Paris."));
    let app = openai_routes(state_with(backend.clone(), None));
    let st = state_with(Scripted::new(Script::default()), None);
    let convo = [
        ChatMessage::new("user", "Capital of France?"),
        ChatMessage::new("assistant", "The capital is"),
    ];
    let rendered = st
        .chat_template
        .as_ref()
        .unwrap()
        .render(&convo, false)
        .unwrap();
    let cut = &rendered[..rendered.rfind("The capital is").unwrap() + "The capital is".len()];
    assert!(rendered.len() > cut.len(), "the template closes the turn");
    let want = tokenizer().encode(cut, false).unwrap();
    let messages = json!([
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "The capital is"},
    ]);
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"messages": messages, "continue_final_message": true})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(backend.inputs().last().unwrap().prompt, want);
    assert_eq!(v["choices"][0]["message"]["content"], " Paris.");
    // /tokenize counts the same prompt.
    let (_, t) = post(
        &app,
        "/tokenize",
        json!({"messages": messages, "continue_final_message": true}),
    )
    .await;
    assert_eq!(t["count"].as_u64(), Some(want.len() as u64), "{t}");
    // Both flags on is a contradiction, as in vLLM.
    let (s, v) = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"messages": messages, "continue_final_message": true,
                         "add_generation_prompt": true})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["param"], "continue_final_message");

    // Anthropic's prefill: the final assistant message is continued.
    let body = json!({"model": MODEL, "max_tokens": 8, "messages": [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": [{"type": "text", "text": "The capital is"}]},
    ]});
    let (s, text) = post_messages(&app, &body, None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert_eq!(backend.inputs().last().unwrap().prompt, want);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["content"][0]["text"], " Paris.");
}

/// A schema reaches the workers with its properties in the client's order:
/// the grammar writes keys in that order, as OpenAI's structured outputs do.
#[tokio::test]
async fn schemas_keep_their_property_order() {
    let backend = Scripted::new(text_script("{}"));
    let app = openai_routes(state_with(backend.clone(), None));
    let schema = json!({"type": "object", "properties": {
        "zeta": {"type": "integer"}, "alpha": {"type": "integer"}, "mid": {"type": "string"},
    }, "required": ["zeta", "alpha", "mid"]});
    for body in [
        chat_body(json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "s", "schema": schema}}})),
        chat_body(json!({"guided_json": schema})),
    ] {
        let (s, v) = post(&app, "/v1/chat/completions", body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let sent = backend
            .inputs()
            .last()
            .unwrap()
            .sampling
            .json_schema
            .clone()
            .unwrap();
        let at = |k: &str| sent.find(&format!("\"{k}\"")).unwrap();
        assert!(
            at("zeta") < at("alpha") && at("alpha") < at("mid"),
            "{sent}"
        );
    }
}

/// With `--cors-allow-origin`, a page from a listed origin may call the
/// API: its preflight is answered without the API key (browsers send
/// none), the answers carry the origin, and the key is still required;
/// other origins get no such header. Without origins there is no CORS.
#[tokio::test]
async fn cors_lets_listed_origins_call_from_a_browser() {
    let origin = "https://app.example.com";
    let app = openai_routes(state_with(Scripted::new(text_script("Hi")), Some("k")))
        .layer(super::cors(&[format!("{origin}/")]).unwrap().unwrap());
    let ask = |method: &str, from: &str, key: Option<&str>| {
        let mut b = Request::builder()
            .method(method)
            .uri("/v1/chat/completions")
            .header("origin", from)
            .header("content-type", "application/json");
        if method == "OPTIONS" {
            b = b.header("access-control-request-method", "POST").header(
                "access-control-request-headers",
                "authorization,content-type",
            );
        }
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        let body = match method {
            "POST" => Body::from(chat_body(json!({})).to_string()),
            _ => Body::empty(),
        };
        let app = app.clone();
        let req = b.body(body).unwrap();
        async move {
            let r = app.oneshot(req).await.unwrap();
            let allowed = r
                .headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status(), allowed)
        }
    };
    let (s, allowed) = ask("OPTIONS", origin, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(allowed.as_deref(), Some(origin));
    assert_eq!(
        ask("POST", origin, None).await,
        (StatusCode::UNAUTHORIZED, Some(origin.into()))
    );
    assert_eq!(
        ask("POST", origin, Some("k")).await,
        (StatusCode::OK, Some(origin.into()))
    );
    assert_eq!(ask("POST", "https://evil.example", Some("k")).await.1, None);
    assert_eq!(ask("OPTIONS", "https://evil.example", None).await.1, None);

    assert!(super::cors(&[]).unwrap().is_none());
    assert!(super::cors(&["*".into()]).unwrap().is_some());
    for bad in ["ftp://x", "app.example.com", "https://a b"] {
        let e = super::cors(&[bad.into()])
            .err()
            .unwrap_or_else(|| panic!("{bad} taken"));
        assert!(e.contains(bad), "{e}");
    }
}
