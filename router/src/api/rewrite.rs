//! What the APIs served as translations of chat (Responses, Messages)
//! share: reading a chat SSE answer back, chunk by chunk, and sending
//! their own events in its place.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{Map, Value};

use super::{ApiError, ApiState};

/// Another API's view of a chat stream.
pub(super) trait ChatEvents: Send + 'static {
    /// One chat chunk (a `data:` payload). An error chunk (`{"error":…}`)
    /// ends the stream after this call.
    fn chunk(&mut self, c: &Value);
    /// The chat stream's `[DONE]`: close what is open.
    fn end(&mut self);
    /// The next event ready to send.
    fn next_event(&mut self) -> Option<Bytes>;
}

/// The event-stream response that rewrites `answer` (a chat SSE response)
/// through `events`. Dropping it (the client hung up) drops the chat body,
/// which cancels the generation.
pub(super) fn rewrite_chat_stream(answer: Response, events: impl ChatEvents) -> Response {
    struct St<E> {
        ev: E,
        body: axum::body::BodyDataStream,
        buf: Vec<u8>,
        done: bool,
    }
    let st = St {
        ev: events,
        body: answer.into_body().into_data_stream(),
        buf: Vec::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.ev.next_event() {
                return Some((Ok::<Bytes, Infallible>(b), st));
            }
            if st.done {
                return None;
            }
            // The chat stream's events end with a blank line.
            if let Some(end) = st.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = st.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
                    if data == "[DONE]" {
                        st.ev.end();
                        st.done = true;
                    } else if let Ok(v) = serde_json::from_str::<Value>(data) {
                        st.ev.chunk(&v);
                        st.done |= v.get("error").is_some();
                    }
                }
                continue;
            }
            let broken = match st.body.next().await {
                Some(Ok(b)) => {
                    st.buf.extend_from_slice(&b);
                    continue;
                }
                Some(Err(e)) => format!("the chat stream broke: {e}"),
                None => "the chat stream ended early".to_string(),
            };
            st.ev.chunk(&ApiError::internal(broken).body());
            st.done = true;
        }
    });
    super::openai::sse_body(stream)
}

/// `v`, found at `param` (`None`: missing), read by `as_t`, else the
/// invalid-type error naming `param`, what it must be, and what it was.
pub(super) fn expect<'a, T>(
    v: Option<&'a Value>,
    param: &str,
    want: &str,
    as_t: impl Fn(&'a Value) -> Option<T>,
) -> Result<T, ApiError> {
    let got = v.unwrap_or(&Value::Null);
    as_t(got).ok_or_else(|| super::openai::wrong_type(param, want, got))
}

/// A JSON object (a request body).
type Object = Map<String, Value>;

/// Parses a translated API's request, runs the chat request `to_chat`
/// makes of it, and returns the request, whether the answer streams, and
/// the chat answer. Its token and latency metrics carry `endpoint`.
pub(super) async fn run_as_chat(
    state: &Arc<ApiState>,
    body: Result<Bytes, BytesRejection>,
    endpoint: &'static str,
    to_chat: fn(&Object) -> Result<Object, ApiError>,
) -> Result<(Object, bool, Response), ApiError> {
    let m = super::openai::parse_object(body)?;
    let chat = to_chat(&m)?;
    let stream = chat.get("stream").and_then(Value::as_bool) == Some(true);
    let answer = super::openai::chat(state.clone(), chat, endpoint).await?;
    Ok((m, stream, answer))
}

/// A whole (not streamed) chat answer, parsed.
pub(super) async fn chat_json(answer: Response) -> Result<Value, ApiError> {
    let bytes = axum::body::to_bytes(answer.into_body(), usize::MAX)
        .await
        .map_err(|e| ApiError::internal(format!("reading the chat answer: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("parsing the chat answer: {e}")))
}

/// Reports an error the chat path found under the translated API's names:
/// `renamed` maps chat fields (and what is under them) to the API's, tools
/// are flat there (no `function` object), and `choices` spells the tool
/// choices (see [`respell_choices`]).
pub(super) fn rename_param(e: &mut ApiError, renamed: &[(&str, &str)], choices: [&str; 4]) {
    let Some(p) = e.param.clone() else {
        return;
    };
    if p == "tool_choice" && e.message.contains(CHAT_CHOICES) {
        respell_choices(e, choices);
        return;
    }
    let found = renamed.iter().find(|(from, _)| {
        p == *from || p.starts_with(&format!("{from}[")) || p.starts_with(&format!("{from}."))
    });
    if let Some((from, to)) = found {
        let to_param = p.replacen(from, to, 1);
        // Messages quote the fields they name.
        e.message = e.message.replace(&format!("'{from}"), &format!("'{to}"));
        e.param = Some(to_param);
    } else if p.starts_with("tools[") || p.starts_with("tool_choice") {
        e.param = Some(p.replacen(".function", "", 1));
        e.message = e.message.replacen(".function", "", 1);
    }
}

/// How chat's refusals of `tool_choice` spell the choices to send instead.
pub(super) const CHAT_CHOICES: &str = "{\"type\": \"function\", \"function\": {\"name\": ...}}";

/// Rewrites chat's refusal of `tool_choice` with the translated API's
/// spelling of the choices: `[auto, any, named, none]` for chat's
/// `"auto"`, `"required"`, a named function and `"none"`.
fn respell_choices(e: &mut ApiError, [auto, any, named, none]: [&str; 4]) {
    e.message = e
        .message
        .replace(
            &format!("\"required\" or {CHAT_CHOICES}"),
            &format!("{any} or {named}"),
        )
        .replace(CHAT_CHOICES, named)
        .replace("\"none\" for text", &format!("{none} for text"))
        .replace("as \"auto\"", &format!("as {auto}"));
}
