//! `tandem bench serve`: the cluster through its OpenAI API.
//!
//! With `--url`, it loads a running router. Without, it starts two clusters
//! on this machine in turn, colocated (one worker) and disaggregated (one
//! prefill and one decode worker), giving the prefill the same number of
//! threads on both sides, and prints:
//! - time to first token for long prompts on idle workers, and the
//!   disaggregation overhead (disaggregated / colocated − 1);
//! - the router's own latency (dispatch: request accepted → decode call
//!   handed to the transport; relay: token received → bytes handed to the
//!   client), read from the router's `/metrics` summaries.
//!
//! Prompts are token ids (via `/v1/completions`), distinct per request so no
//! prefix cache helps.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tandem_cluster::Role;

use crate::up::{peers_of, random_secret, spawn, stop_all, Node};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A running router's API base (`http://HOST:PORT/v1`); default: start clusters here.
    #[arg(long)]
    pub url: Option<String>,
    /// Start both a colocated and a disaggregated cluster and compare them (the default without --url).
    #[arg(long)]
    pub compare: bool,
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Requests per cluster.
    #[arg(long, default_value_t = 8)]
    pub requests: usize,
    /// Requests in flight at once (1: idle workers, for latency).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 1000)]
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Extra short requests (8-token prompts) after the long ones, so the
    /// router's latency quantiles rest on enough samples.
    #[arg(long, default_value_t = 100)]
    pub latency_requests: usize,
    /// Threads of the worker that prefills (both clusters), and of the decode worker.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One request's client-side timings.
struct Sample {
    ttft: f64,
    total: f64,
    tokens: usize,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((s.len() - 1) as f64 * p).round() as usize;
    s[i]
}

/// Distinct, deterministic prompt ids (no prefix sharing across requests).
fn prompt(n: usize, salt: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| {
            let z = (i + 1 + salt * 1_000_003).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            1000 + (z >> 40) as u32 % 40_000
        })
        .collect()
}

async fn one_request(
    http: &reqwest::Client,
    base: &str,
    model: &str,
    ids: Vec<u32>,
    max_tokens: usize,
) -> Result<Sample> {
    let body = json!({
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/completions"))
        .json(&body)
        .send()
        .await
        .context("sending a request")?;
    if !r.status().is_success() {
        bail!(
            "HTTP {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    let mut stream = r.bytes_stream();
    let mut ttft = None;
    let mut buf = String::new();
    let mut tokens = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("reading the stream")?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).context("a stream chunk")?;
            if v.get("error").is_some() {
                bail!("stream error: {v}");
            }
            let has_text = v["choices"]
                .as_array()
                .and_then(|c| c.first())
                .and_then(|c| c["text"].as_str())
                .is_some_and(|t| !t.is_empty());
            if has_text && ttft.is_none() {
                ttft = Some(t0.elapsed().as_secs_f64());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
    }
    let total = t0.elapsed().as_secs_f64();
    Ok(Sample {
        ttft: ttft.unwrap_or(total),
        total,
        tokens,
    })
}

/// The router's own latency quantiles from its /metrics.
async fn router_latency(http: &reqwest::Client, base: &str) -> Result<Value> {
    let root = base.trim_end_matches('/').trim_end_matches("/v1");
    let text = http
        .get(format!("{root}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let q = |name: &str, quantile: &str| -> Option<f64> {
        let key = format!("{name}{{quantile=\"{quantile}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
    };
    let count = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
            .and_then(|v| v.trim().parse().ok())
    };
    let mut out = serde_json::Map::new();
    for (key, name) in [
        ("dispatch", "tandem_router_dispatch_seconds"),
        ("relay", "tandem_router_relay_seconds"),
    ] {
        out.insert(
            key.into(),
            json!({
                "p50_ms": q(name, "0.5").map(|s| s * 1e3),
                "p99_ms": q(name, "0.99").map(|s| s * 1e3),
                "count": count(name),
            }),
        );
    }
    Ok(Value::Object(out))
}

async fn load(a: &ServeArgs, base: &str, model: &str, salt: u64) -> Result<Value> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    // One warm-up request (page faults, connection set-up).
    one_request(&http, base, model, prompt(a.prompt_tokens, salt), 2).await?;
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut next = 0;
    while next < a.requests {
        let wave = a.concurrency.max(1).min(a.requests - next);
        let futs = (0..wave).map(|i| {
            let ids = prompt(a.prompt_tokens, salt + 1 + (next + i) as u64);
            one_request(&http, base, model, ids, a.max_tokens)
        });
        for r in futures_util::future::join_all(futs).await {
            samples.push(r?);
        }
        next += wave;
    }
    let wall = t0.elapsed().as_secs_f64();
    for i in 0..a.latency_requests {
        one_request(&http, base, model, prompt(8, salt + 100_000 + i as u64), 8).await?;
    }
    let ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let tpot: Vec<f64> = samples
        .iter()
        .filter(|s| s.tokens > 1)
        .map(|s| (s.total - s.ttft) / (s.tokens - 1) as f64)
        .collect();
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    Ok(json!({
        "requests": samples.len(),
        "ttft_p50_ms": percentile(&ttft, 0.5) * 1e3,
        "ttft_p99_ms": percentile(&ttft, 0.99) * 1e3,
        "tpot_p50_ms": percentile(&tpot, 0.5) * 1e3,
        "output_tokens_per_s": tokens as f64 / wall,
        "router": router_latency(&http, base).await?,
    }))
}

/// Starts a cluster; returns its nodes (router last) and API base.
fn start(
    model: &std::path::Path,
    prefill_threads: Option<usize>,
    decode_threads: usize,
) -> Result<(Vec<Node>, String)> {
    let secret = random_secret();
    let m = model.display().to_string();
    let worker = |t: usize| -> Vec<String> {
        [
            "--model",
            &m,
            "--port",
            "0",
            "--threads",
            &t.to_string(),
            "--kv-cache-memory",
            "512MiB",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut nodes = Vec::new();
    if let Some(t) = prefill_threads {
        nodes.push(spawn(Role::Prefill, &worker(t), &secret, "prefill")?);
    }
    nodes.push(spawn(
        Role::Decode,
        &worker(decode_threads),
        &secret,
        "decode",
    )?);
    let peers = peers_of(&nodes);
    let args: Vec<String> = [
        "--model",
        &m,
        "--port",
        "0",
        "--peers",
        &peers.to_string(),
        "--disagg-min-tokens",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let router = spawn(Role::Router, &args, &secret, "router")?;
    let base = format!("http://{}/v1", router.ready.addr);
    nodes.push(router);
    Ok((nodes, base))
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.requests == 0 || a.prompt_tokens == 0 || a.max_tokens == 0 {
        bail!("--requests, --prompt-tokens and --max-tokens must be positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let model = crate::model_path(a.model.clone())?;
    let name = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = if let Some(url) = &a.url {
        let r = rt.block_on(load(&a, url, &name, 1))?;
        println!("{}", serde_json::to_string_pretty(&r)?);
        r
    } else {
        let _ = a.compare;
        eprintln!(
            "bench serve: {}-token prompts, {} requests, concurrency {}; prefill on {} thread(s) in both clusters, decode worker {} thread(s)",
            a.prompt_tokens, a.requests, a.concurrency, a.threads, a.threads
        );
        let (nodes, base) = start(&model, None, a.threads)?;
        let colocated = rt.block_on(load(&a, &base, &name, 1))?;
        stop_all(nodes);
        let (nodes, base) = start(&model, Some(a.threads), a.threads)?;
        let disagg = rt.block_on(load(&a, &base, &name, 1))?;
        stop_all(nodes);
        let c = colocated["ttft_p50_ms"].as_f64().unwrap_or(f64::NAN);
        let d = disagg["ttft_p50_ms"].as_f64().unwrap_or(f64::NAN);
        let overhead = d / c - 1.0;
        println!(
            "TTFT p50 ({} prompt tokens): colocated {:.1} ms, disaggregated {:.1} ms, overhead {:+.1}%",
            a.prompt_tokens,
            c,
            d,
            overhead * 100.0
        );
        for (label, r) in [("colocated", &colocated), ("disaggregated", &disagg)] {
            println!(
                "{label}: TTFT p99 {:.1} ms, TPOT p50 {:.2} ms, router dispatch p99 {:.3} ms, relay p99 {:.3} ms",
                r["ttft_p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["tpot_p50_ms"].as_f64().unwrap_or(f64::NAN),
                r["router"]["dispatch"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["router"]["relay"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
            );
        }
        json!({
            "prompt_tokens": a.prompt_tokens,
            "threads": a.threads,
            "colocated": colocated,
            "disaggregated": disagg,
            "ttft_overhead": overhead,
        })
    };
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
