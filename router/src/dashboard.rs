//! The ops dashboard the router serves: one self-contained page
//! (`GET /dashboard`, HTML/CSS/JS embedded in the binary, no external
//! assets, charts hand-drawn on `<canvas>`) and the JSON it polls every
//! second (`GET /dashboard/api/state`).
//!
//! The dashboard is **not** behind the API key: like `/metrics`, `/health`
//! and `/ready` it is for operators, and it shows only cluster state (worker
//! addresses, load, KV usage) and aggregate rates, never request contents.
//! Keep the router's port off the public internet, or put the dashboard
//! behind a proxy, when that matters.
//!
//! The numbers come from two places, neither of them the API layer:
//! - nodes: [`Dispatcher::decode_workers`] / [`Dispatcher::prefill_workers`]
//!   and [`crate::workers::Worker::load`] (the router's view: its own
//!   in-flight count plus the worker's last polled load report);
//! - series: a task started by [`dashboard_routes`] renders the process's
//!   Prometheus handle once a second, parses the router's counters and
//!   summaries, and keeps the last [`SERIES_LEN`] samples in a ring buffer.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::dispatcher::Dispatcher;
use crate::workers::Worker;

/// Samples kept (one a second: five minutes).
pub const SERIES_LEN: usize = 300;
/// How often the sampler runs.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Trailing window (in samples) over which TPOT is estimated.
const TPOT_WINDOW: usize = 10;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The page with its stylesheet and script inlined: one response, no
/// further requests but the JSON polls.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    INDEX_HTML
        .replacen("/*STYLE*/", STYLE_CSS, 1)
        .replacen("/*APP*/", APP_JS, 1)
});

/// One worker as the dashboard shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeView {
    pub role: &'static str,
    pub addr: String,
    pub healthy: bool,
    pub in_flight: u32,
    pub running: u32,
    pub waiting: u32,
    pub free_blocks: u32,
    pub total_blocks: u32,
    pub cached_blocks: u32,
}

impl NodeView {
    fn of(w: &Worker) -> Self {
        let l = w.load();
        NodeView {
            role: w.role.as_str(),
            addr: w.addr.to_string(),
            healthy: l.healthy,
            in_flight: l.in_flight,
            running: l.running,
            waiting: l.waiting,
            free_blocks: l.free_blocks,
            total_blocks: l.total_blocks,
            cached_blocks: l.cached_blocks,
        }
    }
}

/// One sample of the router's rates, taken every [`SAMPLE_EVERY`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// Unix time of the sample, milliseconds.
    pub t_ms: u64,
    /// Generated (completion) tokens per second over the last interval.
    pub tokens_per_s: f64,
    /// Requests (`tandem_router_requests_total`, every endpoint and status)
    /// per second over the last interval.
    pub requests_per_s: f64,
    /// Time to first token, seconds: the exporter's summary quantiles (a
    /// rolling window of about a minute; the larger value across endpoints),
    /// `None` when no first token was recorded in the last interval.
    pub ttft_p50_s: Option<f64>,
    pub ttft_p99_s: Option<f64>,
    /// Mean time to first token over the last interval (exact: sum/count deltas).
    pub ttft_mean_s: Option<f64>,
    /// Estimated mean time per output token over the last ~10 s: (request
    /// duration − TTFT) summed over the requests that finished, divided by the
    /// tokens generated after each first token. No TPOT metric exists, so this
    /// is a mean, not a p50; `None` when there is nothing to estimate from.
    pub tpot_mean_s: Option<f64>,
}

/// The `/dashboard/api/state` body.
#[derive(Debug, Clone, Serialize)]
pub struct DashboardState {
    pub nodes: Vec<NodeView>,
    pub series: Vec<Sample>,
    /// Seconds between samples.
    pub sample_every_s: f64,
}

/// Cumulative totals read from one render of the Prometheus handle.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub generated_tokens: f64,
    pub requests: f64,
    pub ttft_sum: f64,
    pub ttft_count: f64,
    pub ttft_p50: Option<f64>,
    pub ttft_p99: Option<f64>,
    pub duration_sum: f64,
    pub duration_count: f64,
}

/// Parses the router's series out of Prometheus text exposition.
pub fn parse_totals(text: &str) -> Totals {
    let mut t = Totals::default();
    let max = |a: Option<f64>, b: f64| Some(a.map_or(b, |a| a.max(b)));
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(i) => match line[i..].find('}') {
                Some(j) => (&line[..i], &line[i + 1..i + j], &line[i + j + 1..]),
                None => continue,
            },
            None => match line.split_once(' ') {
                Some((n, r)) => (n, "", r),
                None => continue,
            },
        };
        // The value is the first field after the name/labels (a timestamp may follow).
        let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if !v.is_finite() {
            continue;
        }
        match name {
            "tandem_router_generated_tokens_total" => t.generated_tokens += v,
            "tandem_router_requests_total" => t.requests += v,
            "tandem_router_time_to_first_token_seconds_sum" => t.ttft_sum += v,
            "tandem_router_time_to_first_token_seconds_count" => t.ttft_count += v,
            "tandem_router_request_duration_seconds_sum" => t.duration_sum += v,
            "tandem_router_request_duration_seconds_count" => t.duration_count += v,
            "tandem_router_time_to_first_token_seconds" => match label(labels, "quantile") {
                Some("0.5") => t.ttft_p50 = max(t.ttft_p50, v),
                Some("0.99") => t.ttft_p99 = max(t.ttft_p99, v),
                _ => {}
            },
            _ => {}
        }
    }
    t
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// Turns consecutive totals into samples; keeps the ring buffer.
#[derive(Debug, Default)]
pub struct Series {
    totals: VecDeque<Totals>,
    samples: VecDeque<Sample>,
}

impl Series {
    /// Adds the totals read `dt` seconds after the previous ones.
    pub fn push(&mut self, t_ms: u64, dt: f64, now: Totals) {
        if let Some(prev) = self.totals.back().copied() {
            let dt = dt.max(1e-3);
            let rate = |a: f64, b: f64| ((a - b).max(0.0)) / dt;
            let d_ttft = now.ttft_count - prev.ttft_count;
            let fresh = d_ttft > 0.0;
            let mut tpot = None;
            if let Some(old) = self
                .totals
                .get(self.totals.len().saturating_sub(TPOT_WINDOW))
            {
                let decode_time =
                    (now.duration_sum - old.duration_sum) - (now.ttft_sum - old.ttft_sum);
                let after_first = (now.generated_tokens - old.generated_tokens)
                    - (now.ttft_count - old.ttft_count);
                if now.duration_count > old.duration_count && decode_time > 0.0 && after_first > 0.0
                {
                    tpot = Some(decode_time / after_first);
                }
            }
            if self.samples.len() == SERIES_LEN {
                self.samples.pop_front();
            }
            self.samples.push_back(Sample {
                t_ms,
                tokens_per_s: rate(now.generated_tokens, prev.generated_tokens),
                requests_per_s: rate(now.requests, prev.requests),
                ttft_p50_s: if fresh { now.ttft_p50 } else { None },
                ttft_p99_s: if fresh { now.ttft_p99 } else { None },
                ttft_mean_s: fresh.then(|| (now.ttft_sum - prev.ttft_sum) / d_ttft),
                tpot_mean_s: tpot,
            });
        }
        if self.totals.len() > TPOT_WINDOW {
            self.totals.pop_front();
        }
        self.totals.push_back(now);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }
}

struct Dash {
    dispatcher: Arc<Dispatcher>,
    series: Mutex<Series>,
}

/// `GET /dashboard` (the page, script and stylesheet inlined) and
/// `GET /dashboard/api/state` (JSON). Not behind the API key (see the module
/// docs). Starts the once-a-second sampler, which ends with the runtime or
/// when these routes are dropped. Call from within a Tokio runtime.
pub fn dashboard_routes(dispatcher: Arc<Dispatcher>) -> Router {
    let dash = Arc::new(Dash {
        dispatcher,
        series: Mutex::new(Series::default()),
    });
    tokio::spawn(sample_loop(Arc::downgrade(&dash)));
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/api/state", get(state))
        .with_state(dash)
}

async fn sample_loop(dash: Weak<Dash>) {
    let handle = tandem_cluster::server::metrics_handle();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(d) = dash.upgrade() else { return };
        let totals = parse_totals(&handle.render());
        let now = tokio::time::Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        let t_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Ok(mut s) = d.series.lock() {
            s.push(t_ms, dt, totals);
        };
    }
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE.as_str(),
    )
        .into_response()
}

async fn state(State(dash): State<Arc<Dash>>) -> Response {
    let d = &dash.dispatcher;
    let nodes = d
        .decode_workers()
        .iter()
        .chain(d.prefill_workers().iter())
        .map(|w| NodeView::of(w))
        .collect();
    let series = match dash.series.lock() {
        Ok(s) => s.samples(),
        Err(_) => Vec::new(),
    };
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(DashboardState {
            nodes,
            series,
            sample_every_s: SAMPLE_EVERY.as_secs_f64(),
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE tandem_router_requests_total counter
tandem_router_requests_total{endpoint="completions",status="200"} 7
tandem_router_requests_total{endpoint="chat_completions",status="400"} 3
tandem_router_generated_tokens_total{endpoint="completions"} 140
# TYPE tandem_router_time_to_first_token_seconds summary
tandem_router_time_to_first_token_seconds{endpoint="completions",quantile="0"} 0.01
tandem_router_time_to_first_token_seconds{endpoint="completions",quantile="0.5"} 0.05
tandem_router_time_to_first_token_seconds{endpoint="completions",quantile="0.99"} 0.2
tandem_router_time_to_first_token_seconds{endpoint="chat_completions",quantile="0.5"} 0.07
tandem_router_time_to_first_token_seconds_sum{endpoint="completions"} 0.35
tandem_router_time_to_first_token_seconds_count{endpoint="completions"} 7
tandem_router_request_duration_seconds_sum{endpoint="completions"} 2.35
tandem_router_request_duration_seconds_count{endpoint="completions"} 7
"#;

    #[test]
    fn the_page_is_self_contained() {
        assert!(!PAGE.contains("/*STYLE*/") && !PAGE.contains("/*APP*/"));
        assert!(PAGE.contains("chart-throughput") && PAGE.contains("/dashboard/api/state"));
        assert!(!PAGE.contains("http://") && !PAGE.contains("https://"));
        assert!(!PAGE.contains("<script src") && !PAGE.contains("<link"));
    }

    #[test]
    fn parses_the_router_series() {
        let t = parse_totals(TEXT);
        assert_eq!(t.requests, 10.0);
        assert_eq!(t.generated_tokens, 140.0);
        assert_eq!(t.ttft_p50, Some(0.07));
        assert_eq!(t.ttft_p99, Some(0.2));
        assert_eq!(t.ttft_count, 7.0);
        assert!((t.ttft_sum - 0.35).abs() < 1e-12);
        assert_eq!(t.duration_count, 7.0);
        assert_eq!(parse_totals(""), Totals::default());
    }

    #[test]
    fn series_rates_and_ring() {
        let mut s = Series::default();
        s.push(0, 1.0, Totals::default());
        assert!(s.samples().is_empty());
        let t = parse_totals(TEXT);
        s.push(1000, 1.0, t);
        let x = s.samples()[0];
        assert_eq!(x.tokens_per_s, 140.0);
        assert_eq!(x.requests_per_s, 10.0);
        assert_eq!(x.ttft_p50_s, Some(0.07));
        assert!((x.ttft_mean_s.unwrap() - 0.05).abs() < 1e-12);
        // (2.35 - 0.35) s over 140 - 7 tokens after the first.
        assert!((x.tpot_mean_s.unwrap() - 2.0 / 133.0).abs() < 1e-12);
        // Nothing new: zero rates, no latency.
        s.push(2000, 1.0, t);
        let y = s.samples()[1];
        assert_eq!(
            (y.tokens_per_s, y.ttft_p50_s, y.ttft_mean_s),
            (0.0, None, None)
        );
        for i in 0..2 * SERIES_LEN as u64 {
            s.push(3000 + i, 1.0, t);
        }
        assert_eq!(s.samples().len(), SERIES_LEN);
    }
}
