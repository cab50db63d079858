//! One streamed request against an OpenAI-compatible endpoint, timed on
//! the client: time to first token, the gap before every later chunk that
//! carries text, the end-to-end latency and the token counts.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::workload::{Prompt, Request};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/completions` (prompt text or token ids as they are).
    Completions,
    /// `/v1/chat/completions` (the prompt as one user message; token-id prompts still go to completions).
    Chat,
}

/// The client-side record of one request.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Record {
    pub class: &'static str,
    /// Seconds from the start of the run to the send.
    pub sent_s: f64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub ttft_s: f64,
    pub e2e_s: f64,
    /// Gaps between successive chunks that carried text, after the first.
    #[serde(skip)]
    pub itl_s: Vec<f64>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
}

impl Record {
    /// Time per output token after the first.
    pub fn tpot(&self) -> Option<f64> {
        (self.ok && self.output_tokens > 1)
            .then(|| (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) as f64)
    }
}

pub struct Target {
    pub base: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub api_key: Option<String>,
    pub temperature: f64,
    pub ignore_eos: bool,
    pub timeout: Duration,
}

fn body(t: &Target, r: &Request) -> Value {
    let mut b = json!({
        "model": t.model,
        "max_tokens": r.max_tokens,
        "temperature": t.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if t.ignore_eos {
        b["ignore_eos"] = json!(true);
    }
    match (&r.prompt, t.endpoint) {
        (Prompt::Text(p), Endpoint::Chat) => {
            b["messages"] = json!([{"role": "user", "content": p}]);
        }
        (Prompt::Text(p), Endpoint::Completions) => b["prompt"] = json!(p),
        (Prompt::Ids(ids), _) => b["prompt"] = json!(ids),
    }
    b
}

/// Sends `r` and times it; failures come back as a record with `ok: false`.
pub async fn send(http: &reqwest::Client, t: &Target, r: &Request, sent_s: f64) -> Record {
    let mut rec = Record {
        class: r.class,
        sent_s,
        prompt_tokens: match &r.prompt {
            Prompt::Ids(ids) => ids.len(),
            Prompt::Text(_) => 0,
        },
        ..Default::default()
    };
    let t0 = Instant::now();
    let result = tokio::time::timeout(t.timeout, stream(http, t, r, t0, &mut rec)).await;
    rec.e2e_s = t0.elapsed().as_secs_f64();
    match result {
        Ok(Ok(())) => {
            // A model may end at once (its first token is a stop token):
            // a completed request, with no first token to time.
            if rec.output_tokens == 0 {
                rec.ttft_s = rec.e2e_s;
            }
            rec.ok = true;
        }
        Ok(Err(e)) => rec.error = Some(e),
        Err(_) => rec.error = Some(format!("timed out after {:?}", t.timeout)),
    }
    rec
}

async fn stream(
    http: &reqwest::Client,
    t: &Target,
    r: &Request,
    t0: Instant,
    rec: &mut Record,
) -> Result<(), String> {
    let path = match (t.endpoint, &r.prompt) {
        (Endpoint::Chat, Prompt::Text(_)) => "chat/completions",
        _ => "completions",
    };
    let mut req = http
        .post(format!("{}/{path}", t.base.trim_end_matches('/')))
        .json(&body(t, r));
    if let Some(k) = &t.api_key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| format!("sending: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!(
            "HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        ));
    }
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    let mut chunks_with_text = 0usize;
    let mut usage_tokens = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("reading the stream: {e}"))?;
        buf.extend_from_slice(&chunk);
        while let Some(end) = find_event_end(&buf) {
            let event: Vec<u8> = buf.drain(..end).collect();
            let event = String::from_utf8_lossy(&event);
            for line in event.lines() {
                let Some(data) = line.trim().strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data.is_empty() || data == "[DONE]" {
                    continue;
                }
                let v: Value =
                    serde_json::from_str(data).map_err(|e| format!("a stream chunk: {e}"))?;
                if let Some(err) = v.get("error") {
                    return Err(format!("stream error: {err}"));
                }
                let has_text = v["choices"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        let s = c["text"]
                            .as_str()
                            .or_else(|| c["delta"]["content"].as_str());
                        s.is_some_and(|s| !s.is_empty())
                    })
                });
                if has_text {
                    let now = Instant::now();
                    match last {
                        None => rec.ttft_s = (now - t0).as_secs_f64(),
                        Some(prev) => rec.itl_s.push((now - prev).as_secs_f64()),
                    }
                    last = Some(now);
                    chunks_with_text += 1;
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    if let Some(n) = u["completion_tokens"].as_u64() {
                        usage_tokens = Some(n as usize);
                    }
                    if let Some(n) = u["prompt_tokens"].as_u64() {
                        rec.prompt_tokens = n as usize;
                    }
                }
            }
        }
    }
    // Servers that send no usage: one token per chunk, as they stream.
    rec.output_tokens = usage_tokens.unwrap_or(chunks_with_text);
    Ok(())
}

/// End (exclusive) of the first complete SSE event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_on_either_line_ending() {
        assert_eq!(find_event_end(b"data: 1\n\ndata: 2"), Some(9));
        assert_eq!(find_event_end(b"data: 1\r\n\r\n"), Some(11));
        assert_eq!(find_event_end(b"data: 1\n"), None);
    }

    #[test]
    fn tpot_needs_two_tokens() {
        let mut r = Record {
            ok: true,
            ttft_s: 0.1,
            e2e_s: 1.1,
            output_tokens: 11,
            ..Default::default()
        };
        assert!((r.tpot().unwrap() - 0.1).abs() < 1e-12);
        r.output_tokens = 1;
        assert_eq!(r.tpot(), None);
    }
}
