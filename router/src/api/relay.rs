//! The router's own added latency per token: from a [`crate::dispatch::TokenEvent`]
//! received to the bytes handed to the response body. Recorded in the
//! histogram `tandem_router_relay_seconds` and in a ring buffer of the last
//! [`RELAY_WINDOW`] samples for [`relay_latency_summary`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Samples kept for [`relay_latency_summary`].
pub const RELAY_WINDOW: usize = 10_000;

static SAMPLES: Mutex<VecDeque<f64>> = Mutex::new(VecDeque::new());

/// Records one relay sample that started at `received`.
pub fn record_relay(received: Instant) {
    let s = received.elapsed().as_secs_f64();
    metrics::histogram!(tandem_cluster::metrics::ROUTER_RELAY).record(s);
    let mut q = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    if q.len() == RELAY_WINDOW {
        q.pop_front();
    }
    q.push_back(s);
}

/// `(p50, p99, samples)` in seconds over the last [`RELAY_WINDOW`] relayed
/// tokens (zeros when none).
pub fn relay_latency_summary() -> (f64, f64, usize) {
    let mut v: Vec<f64> = {
        let q = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().copied().collect()
    };
    if v.is_empty() {
        return (0.0, 0.0, 0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    (q(0.50), q(0.99), v.len())
}

/// Forgets the samples (e.g. between benchmark phases).
pub fn reset_relay_latency() {
    SAMPLES.lock().unwrap_or_else(|p| p.into_inner()).clear();
}
