//! Every metric name tandem exports, in one place, with its help text.
//! Names follow Prometheus conventions: `tandem_` prefix, base units
//! (seconds, bytes), `_total` on counters only. Labels are low-cardinality
//! (`role`, `endpoint`, `status`, `prefill`, `direction`, `reason`): never
//! request ids or error text.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

// Router.
pub const ROUTER_REQUESTS: &str = "tandem_router_requests_total";
pub const ROUTER_PROMPT_TOKENS: &str = "tandem_router_prompt_tokens_total";
pub const ROUTER_GENERATED_TOKENS: &str = "tandem_router_generated_tokens_total";
pub const ROUTER_TTFT: &str = "tandem_router_time_to_first_token_seconds";
pub const ROUTER_REQUEST_DURATION: &str = "tandem_router_request_duration_seconds";
pub const ROUTER_RELAY: &str = "tandem_router_relay_seconds";
pub const ROUTER_DISPATCH: &str = "tandem_router_dispatch_seconds";
pub const ROUTER_DISPATCHED: &str = "tandem_router_dispatched_total";
pub const ROUTER_UNAVAILABLE: &str = "tandem_router_unavailable_total";
pub const ROUTER_RESUMED: &str = "tandem_router_resumed_total";
pub const ROUTER_PREFILL_RETRIES: &str = "tandem_router_prefill_retries_total";
pub const ROUTER_WORKERS: &str = "tandem_router_workers";
pub const ROUTER_WORKERS_MARKED_DOWN: &str = "tandem_router_workers_marked_down_total";

// Workers (label `role`).
pub const WAITING_SEQUENCES: &str = "tandem_waiting_sequences";
pub const RUNNING_SEQUENCES: &str = "tandem_running_sequences";
pub const KV_BLOCKS: &str = "tandem_kv_blocks";
pub const KV_BLOCKS_USED: &str = "tandem_kv_blocks_used";
pub const KV_BLOCKS_CACHED: &str = "tandem_kv_blocks_cached";
pub const PREFIX_CACHE_HITS: &str = "tandem_prefix_cache_hits_total";
pub const PREFIX_CACHE_MISSES: &str = "tandem_prefix_cache_misses_total";
pub const PREEMPTIONS: &str = "tandem_preemptions_total";
pub const GENERATED_TOKENS: &str = "tandem_generated_tokens_total";
pub const PROMPT_TOKENS_COMPUTED: &str = "tandem_prompt_tokens_computed_total";
pub const DECODE_TTFT: &str = "tandem_decode_time_to_first_token_seconds";
pub const DECODE_REFUSED: &str = "tandem_decode_refused_total";
pub const PREFILL_DURATION: &str = "tandem_prefill_seconds";
pub const PREFILL_PROMPT_TOKENS: &str = "tandem_prefill_prompt_tokens_total";
pub const KV_TRANSFER_BYTES: &str = "tandem_kv_transfer_bytes_total";
pub const KV_TRANSFER_FAILURES: &str = "tandem_kv_transfer_failures_total";
pub const KV_TRANSFER_SECONDS: &str = "tandem_kv_transfer_seconds";
/// Requests in each disaggregation stage (label `stage`).
pub const STAGE_REQUESTS: &str = "tandem_stage_requests";

/// Registers the help text and unit of every metric (once per process).
pub fn describe() {
    describe_counter!(
        ROUTER_REQUESTS,
        Unit::Count,
        "HTTP API requests by endpoint and status code"
    );
    describe_counter!(
        ROUTER_PROMPT_TOKENS,
        Unit::Count,
        "Prompt tokens of admitted requests"
    );
    describe_counter!(
        ROUTER_GENERATED_TOKENS,
        Unit::Count,
        "Tokens relayed to clients"
    );
    describe_histogram!(
        ROUTER_TTFT,
        Unit::Seconds,
        "Time from request accepted to its first token"
    );
    describe_histogram!(
        ROUTER_REQUEST_DURATION,
        Unit::Seconds,
        "End-to-end request latency"
    );
    describe_histogram!(
        ROUTER_RELAY,
        Unit::Seconds,
        "Router time per relayed token (received to sent)"
    );
    describe_histogram!(
        ROUTER_DISPATCH,
        Unit::Seconds,
        "Router time from request accepted to decode call sent, tokenisation excluded"
    );
    describe_counter!(
        ROUTER_DISPATCHED,
        Unit::Count,
        "Decode calls by where the prompt is prefilled (local or remote)"
    );
    describe_counter!(
        ROUTER_UNAVAILABLE,
        Unit::Count,
        "Requests refused because no worker could take them"
    );
    describe_counter!(
        ROUTER_RESUMED,
        Unit::Count,
        "Streams resumed on another decode worker after a failure"
    );
    describe_counter!(
        ROUTER_PREFILL_RETRIES,
        Unit::Count,
        "Prompts prefilled again after a prefill worker failed"
    );
    describe_gauge!(
        ROUTER_WORKERS,
        Unit::Count,
        "Workers the router routes to, by role"
    );
    describe_counter!(
        ROUTER_WORKERS_MARKED_DOWN,
        Unit::Count,
        "Workers marked down after a connection error"
    );
    describe_gauge!(
        WAITING_SEQUENCES,
        Unit::Count,
        "Sequences waiting for a place in the batch"
    );
    describe_gauge!(
        RUNNING_SEQUENCES,
        Unit::Count,
        "Sequences in the running batch"
    );
    describe_gauge!(KV_BLOCKS, Unit::Count, "KV cache blocks in the pool");
    describe_gauge!(
        KV_BLOCKS_USED,
        Unit::Count,
        "KV cache blocks in use (sequences and prefix cache)"
    );
    describe_gauge!(
        KV_BLOCKS_CACHED,
        Unit::Count,
        "KV cache blocks held by the radix prefix cache"
    );
    describe_counter!(
        PREFIX_CACHE_HITS,
        Unit::Count,
        "Admissions that reused cached prefix blocks"
    );
    describe_counter!(
        PREFIX_CACHE_MISSES,
        Unit::Count,
        "Admissions with no cached prefix"
    );
    describe_counter!(
        PREEMPTIONS,
        Unit::Count,
        "Sequences preempted (recomputed later) when the pool ran dry"
    );
    describe_counter!(
        GENERATED_TOKENS,
        Unit::Count,
        "Tokens sampled by the engine"
    );
    describe_counter!(
        PROMPT_TOKENS_COMPUTED,
        Unit::Count,
        "Prompt tokens computed by the engine (cached ones excluded)"
    );
    describe_histogram!(
        DECODE_TTFT,
        Unit::Seconds,
        "Decode worker: request admitted to first token, by where the prompt was prefilled"
    );
    describe_counter!(
        DECODE_REFUSED,
        Unit::Count,
        "Requests a decode worker refused, by reason"
    );
    describe_histogram!(
        PREFILL_DURATION,
        Unit::Seconds,
        "Prefill worker: prompt computed and its KV confirmed by the decode worker"
    );
    describe_counter!(
        PREFILL_PROMPT_TOKENS,
        Unit::Count,
        "Prompt tokens prefilled for decode workers"
    );
    describe_counter!(
        KV_TRANSFER_BYTES,
        Unit::Bytes,
        "KV bytes moved between workers, by direction"
    );
    describe_counter!(
        KV_TRANSFER_FAILURES,
        Unit::Count,
        "KV transfers that failed, by direction"
    );
    describe_histogram!(
        KV_TRANSFER_SECONDS,
        Unit::Seconds,
        "KV transfer duration, connection to confirmation, by direction"
    );
    describe_gauge!(
        STAGE_REQUESTS,
        Unit::Count,
        "Requests in each disaggregation stage: prefill_in_flight (prefill worker), waiting_for_kv (decode worker)"
    );
}

/// Counts a request in a disaggregation stage while it is held.
pub struct InStage(&'static str);

impl InStage {
    pub fn enter(stage: &'static str) -> Self {
        metrics::gauge!(STAGE_REQUESTS, "stage" => stage).increment(1.0);
        Self(stage)
    }
}

impl Drop for InStage {
    fn drop(&mut self) {
        metrics::gauge!(STAGE_REQUESTS, "stage" => self.0).decrement(1.0);
    }
}
