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
//!   histograms, and keeps the last [`SERIES_LEN`] samples in a ring buffer.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use tandem_cluster::metrics::{self as m, histogram_quantile, parse_buckets};

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
    /// Requests (`tandem_requests_total`, every endpoint and status) per
    /// second over the last interval.
    pub requests_per_s: f64,
    /// Time to first token over the last interval, seconds: quantiles
    /// interpolated in the histogram's buckets (what PromQL's
    /// `histogram_quantile` over the interval gives) and the exact mean;
    /// `None` when no first token was recorded in the interval.
    pub ttft_p50_s: Option<f64>,
    pub ttft_p99_s: Option<f64>,
    pub ttft_mean_s: Option<f64>,
    /// Time per output token (the inter-token latency) over the last
    /// ~10 s, likewise; `None` when no second token came out.
    pub tpot_p50_s: Option<f64>,
    pub tpot_p99_s: Option<f64>,
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

/// A histogram's cumulative state: buckets `(upper bound, count)`, sum.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
}

impl Histogram {
    fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// Observations since `old`: quantile `q`, mean, count.
    fn since(&self, old: &Histogram, q: f64) -> Option<f64> {
        let delta: Vec<(f64, f64)> = self
            .buckets
            .iter()
            .map(|&(le, n)| {
                let before = old.buckets.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
                (le, (n - before).max(0.0))
            })
            .collect();
        histogram_quantile(q, &delta)
    }

    fn mean_since(&self, old: &Histogram) -> Option<f64> {
        let n = self.count() - old.count();
        (n > 0.0).then(|| (self.sum - old.sum) / n)
    }
}

/// Cumulative totals read from one render of the Prometheus handle.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub generated_tokens: f64,
    pub requests: f64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

/// Parses the router's series out of Prometheus text exposition.
pub fn parse_totals(text: &str) -> Totals {
    let mut t = Totals::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find('{') {
            Some(i) => match line[i..].find('}') {
                Some(j) => (&line[..i], &line[i + j + 1..]),
                None => continue,
            },
            None => match line.split_once(' ') {
                Some((n, r)) => (n, r),
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
        match name.strip_suffix("_sum") {
            Some(m::TTFT) => t.ttft.sum += v,
            Some(m::INTER_TOKEN_LATENCY) => t.itl.sum += v,
            _ if name == m::GENERATED_TOKENS => t.generated_tokens += v,
            _ if name == m::REQUESTS => t.requests += v,
            _ => {}
        }
    }
    t.ttft.buckets = parse_buckets(text, m::TTFT, &[]);
    t.itl.buckets = parse_buckets(text, m::INTER_TOKEN_LATENCY, &[]);
    t
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
        if let Some(prev) = self.totals.back() {
            let dt = dt.max(1e-3);
            let rate = |a: f64, b: f64| ((a - b).max(0.0)) / dt;
            let old = &self.totals[self.totals.len().saturating_sub(TPOT_WINDOW)];
            if self.samples.len() == SERIES_LEN {
                self.samples.pop_front();
            }
            self.samples.push_back(Sample {
                t_ms,
                tokens_per_s: rate(now.generated_tokens, prev.generated_tokens),
                requests_per_s: rate(now.requests, prev.requests),
                ttft_p50_s: now.ttft.since(&prev.ttft, 0.5),
                ttft_p99_s: now.ttft.since(&prev.ttft, 0.99),
                ttft_mean_s: now.ttft.mean_since(&prev.ttft),
                tpot_p50_s: now.itl.since(&old.itl, 0.5),
                tpot_p99_s: now.itl.since(&old.itl, 0.99),
                tpot_mean_s: now.itl.mean_since(&old.itl),
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

    const TEXT: &str = r#"# TYPE tandem_requests_total counter
tandem_requests_total{model="m",role="router",endpoint="completions",status="200"} 7
tandem_requests_total{model="m",role="router",endpoint="chat_completions",status="400"} 3
tandem_generated_tokens_total{model="m",role="router",endpoint="completions"} 140
# TYPE tandem_time_to_first_token_seconds histogram
tandem_time_to_first_token_seconds_bucket{endpoint="completions",le="0.05"} 4
tandem_time_to_first_token_seconds_bucket{endpoint="completions",le="0.1"} 6
tandem_time_to_first_token_seconds_bucket{endpoint="completions",le="+Inf"} 6
tandem_time_to_first_token_seconds_sum{endpoint="completions"} 0.3
tandem_time_to_first_token_seconds_count{endpoint="completions"} 6
tandem_time_to_first_token_seconds_bucket{endpoint="chat_completions",le="0.05"} 0
tandem_time_to_first_token_seconds_bucket{endpoint="chat_completions",le="0.1"} 0
tandem_time_to_first_token_seconds_bucket{endpoint="chat_completions",le="+Inf"} 2
tandem_time_to_first_token_seconds_sum{endpoint="chat_completions"} 0.5
tandem_time_to_first_token_seconds_count{endpoint="chat_completions"} 2
# TYPE tandem_inter_token_latency_seconds histogram
tandem_inter_token_latency_seconds_bucket{le="0.01"} 100
tandem_inter_token_latency_seconds_bucket{le="0.02"} 132
tandem_inter_token_latency_seconds_bucket{le="+Inf"} 132
tandem_inter_token_latency_seconds_sum 1.32
tandem_inter_token_latency_seconds_count 132
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
        assert_eq!(
            t.ttft.buckets,
            vec![(0.05, 4.0), (0.1, 6.0), (f64::INFINITY, 8.0)]
        );
        assert!((t.ttft.sum - 0.8).abs() < 1e-12);
        assert_eq!(t.itl.count(), 132.0);
        assert_eq!(parse_totals(""), Totals::default());
    }

    #[test]
    fn series_rates_and_ring() {
        let mut s = Series::default();
        s.push(0, 1.0, Totals::default());
        assert!(s.samples().is_empty());
        let t = parse_totals(TEXT);
        s.push(1000, 1.0, t.clone());
        let x = s.samples()[0];
        assert_eq!(x.tokens_per_s, 140.0);
        assert_eq!(x.requests_per_s, 10.0);
        // 8 first tokens: the 4th is the bucket (0, 0.05]'s last.
        assert_eq!(x.ttft_p50_s, Some(0.05));
        assert!((x.ttft_mean_s.unwrap() - 0.1).abs() < 1e-12);
        assert!((x.tpot_mean_s.unwrap() - 0.01).abs() < 1e-12);
        // The 66th of 132 gaps lies in the first bucket.
        assert!((x.tpot_p50_s.unwrap() - 0.0066).abs() < 1e-12);
        // Nothing new: zero rates, no TTFT; TPOT still over its window.
        s.push(2000, 1.0, t.clone());
        let y = s.samples()[1];
        assert_eq!(
            (y.tokens_per_s, y.ttft_p50_s, y.ttft_mean_s),
            (0.0, None, None)
        );
        assert!(y.tpot_mean_s.is_some());
        for i in 0..2 * SERIES_LEN as u64 {
            s.push(3000 + i, 1.0, t.clone());
        }
        assert_eq!(s.samples().len(), SERIES_LEN);
        assert_eq!(s.samples().last().unwrap().tpot_mean_s, None);
    }
}
