//! Every metric name tandem exports, in one place, with its help text and
//! histogram buckets.
//!
//! Names follow Prometheus conventions and the field's (vLLM, SGLang,
//! Dynamo): `tandem_` prefix, base units (seconds, bytes), `_total` on
//! counters only. The same latency name is recorded by every role it makes
//! sense for; the process-wide labels `model`, `role` (router|prefill|decode)
//! and `worker_id` tell them apart, so a dashboard filters with
//! `{role="decode"}` instead of learning a name per role. Other labels are
//! low-cardinality (`endpoint`, `status`, `prefill`, `direction`, `reason`,
//! `stage`, `worker_role`): never request ids or error text.

use std::time::{Duration, Instant};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

// Request latency, every role that sees the request (histograms).
/// Router: request accepted → first token out (label `endpoint`). Decode
/// worker: request received → first token sampled (label `prefill`:
/// local|remote).
pub const TTFT: &str = "tandem_time_to_first_token_seconds";
/// Time between consecutive tokens of one sequence (router: as relayed;
/// decode worker: as sampled).
pub const INTER_TOKEN_LATENCY: &str = "tandem_inter_token_latency_seconds";
/// Request received → last token (router: label `endpoint`).
pub const REQUEST_DURATION: &str = "tandem_request_duration_seconds";
/// Received → admitted by a decode worker (router: including retries on full
/// workers; decode worker: waiting for a KV reservation or a queue slot;
/// prefill worker: until the prompt's first layer is computed).
pub const REQUEST_QUEUE_TIME: &str = "tandem_request_queue_time_seconds";
/// Admitted → first token: the prompt computed (locally or on a prefill
/// worker) and, when disaggregated, its KV moved. Prefill worker: prompt
/// received → computed and its KV confirmed by the decode worker.
pub const REQUEST_PREFILL_TIME: &str = "tandem_request_prefill_time_seconds";
/// First token → last token.
pub const REQUEST_DECODE_TIME: &str = "tandem_request_decode_time_seconds";

// Requests and tokens.
/// Router: API requests by `endpoint` and `status` (HTTP code, or the gRPC
/// code name for `endpoint="grpc"`).
pub const REQUESTS: &str = "tandem_requests_total";
/// Router: prompt tokens of admitted requests.
pub const PROMPT_TOKENS: &str = "tandem_prompt_tokens_total";
/// Router: tokens relayed to clients. Workers: tokens the engine sampled.
pub const GENERATED_TOKENS: &str = "tandem_generated_tokens_total";
/// Workers: prompt tokens the engine computed (prefix-cache hits excluded).
pub const PROMPT_TOKENS_COMPUTED: &str = "tandem_prompt_tokens_computed_total";
/// Prefill worker: prompt tokens prefilled for decode workers.
pub const PREFILL_PROMPT_TOKENS: &str = "tandem_prefill_prompt_tokens_total";
/// Workers: draft tokens verified by speculative decoding, and those kept
/// (their ratio is the acceptance rate).
pub const SPEC_DRAFT_TOKENS: &str = "tandem_spec_decode_draft_tokens_total";
pub const SPEC_ACCEPTED_TOKENS: &str = "tandem_spec_decode_accepted_tokens_total";
/// Workers serving a mixture of experts: tokens the router sent to each
/// expert, summed over the worker's layers (label `expert`).
pub const MOE_EXPERT_TOKENS: &str = "tandem_moe_expert_tokens_total";

// Router internals.
pub const ROUTER_RELAY: &str = "tandem_router_relay_seconds";
pub const ROUTER_DISPATCH: &str = "tandem_router_dispatch_seconds";
pub const ROUTER_DISPATCHED: &str = "tandem_router_dispatched_total";
pub const ROUTER_LORA_REQUESTS: &str = "tandem_router_lora_requests_total";
pub const ROUTER_UNAVAILABLE: &str = "tandem_router_unavailable_total";
pub const ROUTER_RESUMED: &str = "tandem_router_resumed_total";
pub const ROUTER_PREFILL_RETRIES: &str = "tandem_router_prefill_retries_total";
/// Workers the router routes to (label `worker_role`: prefill|decode).
pub const ROUTER_WORKERS: &str = "tandem_router_workers";
/// Of those, the ones the router may send work to now: the last call and
/// load poll worked (label `worker_role`).
pub const ROUTER_WORKERS_HEALTHY: &str = "tandem_router_workers_healthy";
pub const ROUTER_WORKERS_MARKED_DOWN: &str = "tandem_router_workers_marked_down_total";

// Worker engine state.
pub const WAITING_SEQUENCES: &str = "tandem_waiting_sequences";
pub const RUNNING_SEQUENCES: &str = "tandem_running_sequences";
pub const KV_BLOCKS: &str = "tandem_kv_blocks";
pub const KV_BLOCKS_USED: &str = "tandem_kv_blocks_used";
pub const KV_BLOCKS_CACHED: &str = "tandem_kv_blocks_cached";
pub const PREFIX_CACHE_HITS: &str = "tandem_prefix_cache_hits_total";
pub const PREFIX_CACHE_MISSES: &str = "tandem_prefix_cache_misses_total";
pub const PREEMPTIONS: &str = "tandem_preemptions_total";
pub const DECODE_REFUSED: &str = "tandem_decode_refused_total";

// Disaggregation.
pub const KV_TRANSFER_BYTES: &str = "tandem_kv_transfer_bytes_total";
pub const KV_TRANSFER_FAILURES: &str = "tandem_kv_transfer_failures_total";
/// Decode worker: remote prefills whose KV did not arrive and that it
/// computed itself (`--on-kv-failure recompute`).
pub const KV_RECOMPUTED: &str = "tandem_kv_recomputed_total";
pub const KV_TRANSFER_SECONDS: &str = "tandem_kv_transfer_seconds";
/// Requests in each disaggregation stage (label `stage`): see [`Stage`].
pub const STAGE_REQUESTS: &str = "tandem_stage_requests";

/// Buckets of the request latencies (seconds): 1 ms to 2 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
    3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
];
/// Buckets of the inter-token latency: finer where decode steps land.
pub const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];
/// Buckets of the router's own per-request and per-token overheads, which
/// are tens of microseconds.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.00002, 0.00003, 0.00005, 0.000075, 0.0001, 0.00015, 0.00025, 0.0005, 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.1,
];

/// The buckets each histogram is exported with.
pub fn buckets_of(name: &str) -> &'static [f64] {
    match name {
        INTER_TOKEN_LATENCY => INTER_TOKEN_BUCKETS,
        ROUTER_RELAY | ROUTER_DISPATCH => OVERHEAD_BUCKETS,
        _ => LATENCY_BUCKETS,
    }
}

/// Every histogram, for the exporter's bucket settings.
pub const HISTOGRAMS: &[&str] = &[
    TTFT,
    INTER_TOKEN_LATENCY,
    REQUEST_DURATION,
    REQUEST_QUEUE_TIME,
    REQUEST_PREFILL_TIME,
    REQUEST_DECODE_TIME,
    ROUTER_RELAY,
    ROUTER_DISPATCH,
    KV_TRANSFER_SECONDS,
];

/// Registers the help text and unit of every metric (once per process).
pub fn describe() {
    let h = |name: &'static str, help: &'static str| describe_histogram!(name, Unit::Seconds, help);
    h(
        TTFT,
        "Time to first token: router, request accepted to first token sent (by endpoint); decode worker, request received to first token sampled (by where the prompt was prefilled)",
    );
    h(
        INTER_TOKEN_LATENCY,
        "Time between consecutive tokens of a sequence",
    );
    h(
        REQUEST_DURATION,
        "End-to-end request latency, received to last token",
    );
    h(
        REQUEST_QUEUE_TIME,
        "Received to admitted: router, until a decode worker admitted it; decode worker, waiting for KV blocks or a queue slot; prefill worker, until the prompt's first layer was computed",
    );
    h(
        REQUEST_PREFILL_TIME,
        "Admitted to first token: the prompt computed and, when disaggregated, its KV moved (prefill worker: until the decode worker confirmed the KV)",
    );
    h(REQUEST_DECODE_TIME, "First token to last token");
    h(
        ROUTER_RELAY,
        "Router time per relayed token (received to sent)",
    );
    h(
        ROUTER_DISPATCH,
        "Router time from request accepted to decode call sent, tokenisation excluded",
    );
    h(
        KV_TRANSFER_SECONDS,
        "KV transfer duration, connection to confirmation, by direction",
    );
    let c = |name: &'static str, help: &'static str| describe_counter!(name, Unit::Count, help);
    c(
        REQUESTS,
        "API requests by endpoint and status (HTTP code, 499 when the client left before the answer began, or grpc_N with gRPC status code N)",
    );
    c(PROMPT_TOKENS, "Prompt tokens of admitted requests");
    c(
        GENERATED_TOKENS,
        "Generated tokens (router: relayed to clients; workers: sampled by the engine)",
    );
    c(
        PROMPT_TOKENS_COMPUTED,
        "Prompt tokens computed by the engine (cached ones excluded)",
    );
    c(
        PREFILL_PROMPT_TOKENS,
        "Prompt tokens prefilled for decode workers",
    );
    c(
        SPEC_DRAFT_TOKENS,
        "Draft tokens verified by speculative decoding",
    );
    c(
        SPEC_ACCEPTED_TOKENS,
        "Draft tokens kept by speculative decoding (each one a token without a step of its own)",
    );
    c(
        MOE_EXPERT_TOKENS,
        "Mixture of experts: tokens routed to each expert, summed over the worker's layers (a sharded worker's first pipeline stage)",
    );
    c(
        ROUTER_DISPATCHED,
        "Decode calls by where the prompt is prefilled (local or remote)",
    );
    c(
        ROUTER_LORA_REQUESTS,
        "Generations run with a LoRA adapter, by adapter (one per choice)",
    );
    c(
        ROUTER_UNAVAILABLE,
        "Requests refused because no worker could take them",
    );
    c(
        ROUTER_RESUMED,
        "Streams resumed on another decode worker after a failure",
    );
    c(
        ROUTER_PREFILL_RETRIES,
        "Prompts prefilled again after a prefill worker failed",
    );
    c(
        ROUTER_WORKERS_MARKED_DOWN,
        "Workers marked down after a connection error",
    );
    c(
        PREFIX_CACHE_HITS,
        "Admissions that reused cached prefix blocks",
    );
    c(PREFIX_CACHE_MISSES, "Admissions with no cached prefix");
    c(
        PREEMPTIONS,
        "Sequences preempted (recomputed later) when the pool ran dry",
    );
    c(
        DECODE_REFUSED,
        "Requests a decode worker refused, by reason",
    );
    c(
        KV_TRANSFER_FAILURES,
        "KV transfers that failed, by direction",
    );
    c(
        KV_RECOMPUTED,
        "Remote prefills whose KV did not arrive and that the decode worker computed itself",
    );
    describe_counter!(
        KV_TRANSFER_BYTES,
        Unit::Bytes,
        "KV bytes moved between workers, by direction"
    );
    let g = |name: &'static str, help: &'static str| describe_gauge!(name, Unit::Count, help);
    g(
        ROUTER_WORKERS,
        "Workers the router routes to, by worker role",
    );
    g(
        ROUTER_WORKERS_HEALTHY,
        "Workers the router routes to that answer (not marked down), by worker role",
    );
    g(
        WAITING_SEQUENCES,
        "Sequences waiting for a place in the batch (on a decode worker, with the transfers waiting for KV blocks)",
    );
    g(RUNNING_SEQUENCES, "Sequences in the running batch");
    g(KV_BLOCKS, "KV cache blocks in the pool");
    g(
        KV_BLOCKS_USED,
        "KV cache blocks in use (sequences and prefix cache)",
    );
    g(
        KV_BLOCKS_CACHED,
        "KV cache blocks held by the radix prefix cache",
    );
    g(
        STAGE_REQUESTS,
        "Requests in each disaggregation stage: prefill_waiting and transfer_in_flight (prefill worker), waiting_for_kv (decode worker)",
    );
}

/// The disaggregation stages a request passes through, each a gauge of
/// `tandem_stage_requests{stage}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Prefill worker: prompt accepted, no layer computed yet.
    PrefillWaiting,
    /// Prefill worker: KV layers going out, until the decode worker confirms.
    TransferInFlight,
    /// Decode worker: blocks reserved, KV not all arrived and installed.
    WaitingForKv,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::PrefillWaiting => "prefill_waiting",
            Stage::TransferInFlight => "transfer_in_flight",
            Stage::WaitingForKv => "waiting_for_kv",
        }
    }
}

/// Counts a request in a disaggregation stage while it is held.
pub struct InStage(Stage);

impl InStage {
    pub fn enter(stage: Stage) -> Self {
        metrics::gauge!(STAGE_REQUESTS, "stage" => stage.as_str()).increment(1.0);
        Self(stage)
    }
}

impl Drop for InStage {
    fn drop(&mut self) {
        metrics::gauge!(STAGE_REQUESTS, "stage" => self.0.as_str()).decrement(1.0);
    }
}

/// One sequence's phases on one node: queue (received → admitted), prefill
/// (admitted → first token), decode (first → last token), and the gap
/// between tokens. Time to first token and the total are returned to the
/// caller, which records them with its own labels.
#[derive(Debug, Clone)]
pub struct RequestTimer {
    received: Instant,
    admitted: Option<Instant>,
    first: Option<Instant>,
    last: Option<Instant>,
    done: bool,
}

impl RequestTimer {
    pub fn new(received: Instant) -> Self {
        Self {
            received,
            admitted: None,
            first: None,
            last: None,
            done: false,
        }
    }

    /// The request got its place (records the queue time, once).
    pub fn admitted(&mut self) {
        if self.admitted.is_none() {
            let now = Instant::now();
            metrics::histogram!(REQUEST_QUEUE_TIME)
                .record(now.duration_since(self.received).as_secs_f64());
            self.admitted = Some(now);
        }
    }

    /// A token came out. Returns the time to first token on the first one.
    pub fn token(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let ttft = match self.last {
            Some(prev) => {
                metrics::histogram!(INTER_TOKEN_LATENCY)
                    .record(now.duration_since(prev).as_secs_f64());
                None
            }
            None => {
                self.admitted();
                let from = self.admitted.unwrap_or(self.received);
                metrics::histogram!(REQUEST_PREFILL_TIME)
                    .record(now.duration_since(from).as_secs_f64());
                self.first = Some(now);
                Some(now.duration_since(self.received))
            }
        };
        self.last = Some(now);
        ttft
    }

    /// The sequence finished normally (records the decode phase, once).
    /// Returns the request's duration.
    pub fn finished(&mut self) -> Option<Duration> {
        if std::mem::replace(&mut self.done, true) {
            return None;
        }
        let now = Instant::now();
        if let Some(first) = self.first {
            metrics::histogram!(REQUEST_DECODE_TIME)
                .record(now.duration_since(first).as_secs_f64());
        }
        Some(now.duration_since(self.received))
    }
}

/// The `q` quantile of a Prometheus histogram, given its cumulative buckets
/// `(upper bound, count)` in increasing bound order (the last may be
/// `+Inf`): linear interpolation inside the bucket, as PromQL's
/// `histogram_quantile` does. `None` without observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total.is_nan() || total <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (i, &(le, n)) in buckets.iter().enumerate() {
        // Empty buckets are skipped, as PromQL does.
        if n >= rank && n > below {
            if le.is_infinite() {
                // Above the largest finite bound: that bound is all we know.
                return Some(if i > 0 { buckets[i - 1].0 } else { f64::NAN });
            }
            return Some(lower + (le - lower) * (rank - below) / (n - below));
        }
        lower = le;
        below = n;
    }
    buckets.iter().rev().find(|b| b.0.is_finite()).map(|b| b.0)
}

/// A histogram's cumulative buckets read from Prometheus text exposition:
/// every `NAME_bucket{...,le="X"} N` line whose labels include all of
/// `labels` (`key="value"` pairs), summed over the other labels, sorted by
/// bound.
pub fn parse_buckets(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((lbl, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let matches = labels
            .iter()
            .all(|(k, v)| lbl.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if !matches {
            continue;
        }
        let le = lbl
            .split(',')
            .find_map(|kv| kv.strip_prefix("le=\"")?.strip_suffix('"'));
        let (Some(le), Ok(n)) = (le, value.trim().parse::<f64>()) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        match by_le.iter_mut().find(|(b, _)| *b == le) {
            Some(slot) => slot.1 += n,
            None => by_le.push((le, n)),
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_le
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        // 10 observations: 4 in (0, 1], 4 in (1, 2], 2 above 2.
        let b = [(1.0, 4.0), (2.0, 8.0), (f64::INFINITY, 10.0)];
        assert_eq!(histogram_quantile(0.2, &b), Some(0.5));
        assert_eq!(histogram_quantile(0.6, &b), Some(1.5));
        assert_eq!(histogram_quantile(0.99, &b), Some(2.0));
        assert_eq!(histogram_quantile(0.5, &[(1.0, 0.0)]), None);
        assert_eq!(histogram_quantile(1.5, &b), None);
        assert_eq!(histogram_quantile(0.5, &[]), None);
    }

    #[test]
    fn buckets_parse_with_label_filters_summed_over_the_rest() {
        let text = "\
# TYPE x_seconds histogram
x_seconds_bucket{model=\"m\",role=\"router\",endpoint=\"a\",le=\"0.1\"} 1
x_seconds_bucket{model=\"m\",role=\"router\",endpoint=\"a\",le=\"+Inf\"} 2
x_seconds_bucket{model=\"m\",role=\"router\",endpoint=\"b\",le=\"0.1\"} 3
x_seconds_bucket{model=\"m\",role=\"router\",endpoint=\"b\",le=\"+Inf\"} 3
x_seconds_bucket{model=\"m\",role=\"decode\",le=\"0.1\"} 100
x_seconds_sum{model=\"m\",role=\"router\",endpoint=\"a\"} 9
y_seconds_bucket{le=\"0.1\"} 7
";
        let all = parse_buckets(text, "x_seconds", &[("role", "router")]);
        assert_eq!(all, vec![(0.1, 4.0), (f64::INFINITY, 5.0)]);
        let a = parse_buckets(text, "x_seconds", &[("endpoint", "a")]);
        assert_eq!(a, vec![(0.1, 1.0), (f64::INFINITY, 2.0)]);
        assert!(parse_buckets(text, "z_seconds", &[]).is_empty());
    }

    #[test]
    fn every_histogram_has_increasing_buckets() {
        for name in HISTOGRAMS {
            let b = buckets_of(name);
            assert!(!b.is_empty() && b.windows(2).all(|w| w[0] < w[1]), "{name}");
        }
    }

    #[test]
    fn a_timer_reports_ttft_once_and_the_duration_once() {
        let mut t = RequestTimer::new(Instant::now());
        t.admitted();
        assert!(t.token().is_some());
        assert!(t.token().is_none());
        assert!(t.finished().is_some());
        assert!(t.finished().is_none());
    }
}
