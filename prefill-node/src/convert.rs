//! Conversions between the worker protocol and the engine, shared by the
//! prefill and decode workers.

use std::path::Path;
use std::sync::Arc;

use tandem_cluster::{Role, PROTOCOL_VERSION};
use tandem_engine::engine::Engine;
use tandem_engine::generate::FinishReason;
use tandem_engine::guided::ResponseFormat;
use tandem_engine::sampler::{Sampled, SamplingParams};
use tandem_engine::scheduler::Event;
use tandem_engine::EngineError;
use tandem_proto::worker as pb;
use tonic::Status;

/// The engine's sampling parameters from the wire (validated by the engine
/// when the request is submitted).
pub fn sampling(s: Option<&pb::WorkerSampling>) -> Result<SamplingParams, Status> {
    let s = s.ok_or_else(|| Status::invalid_argument("sampling parameters are missing"))?;
    Ok(SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        request_key: s.request_key,
        top_logprobs: s.top_logprobs as usize,
        logprobs: s.logprobs,
        min_tokens: s.min_tokens,
        min_tokens_masked: s.min_tokens_masked.clone(),
        logit_bias: s.logit_bias.iter().map(|b| (b.token_id, b.bias)).collect(),
        // Empty strings are unset fields on the wire.
        response_format: ResponseFormat::from_fields(
            s.json_object,
            (!s.json_schema.is_empty()).then(|| s.json_schema.clone()),
            (!s.regex.is_empty()).then(|| s.regex.clone()),
            s.choice.clone(),
        ),
        prompt_logprobs: s.prompt_logprobs.map(|k| k as usize),
    })
}

pub fn sampled_to_proto(s: &Sampled) -> pb::SampledToken {
    pb::SampledToken {
        token_id: s.token,
        logprob: s.logprob,
        top: s
            .top
            .iter()
            .map(|&(token_id, logprob)| pb::TokenLogprob { token_id, logprob })
            .collect(),
        rank: s.rank,
    }
}

pub fn prompt_logprobs_to_proto(lp: &[Sampled]) -> pb::PromptLogprobs {
    pb::PromptLogprobs {
        tokens: lp.iter().map(sampled_to_proto).collect(),
    }
}

pub fn prompt_logprobs_from_proto(lp: &pb::PromptLogprobs) -> Vec<Sampled> {
    lp.tokens.iter().map(sampled_from_proto).collect()
}

pub fn sampled_from_proto(s: &pb::SampledToken) -> Sampled {
    Sampled {
        token: s.token_id,
        logprob: s.logprob,
        top: s.top.iter().map(|t| (t.token_id, t.logprob)).collect(),
        rank: s.rank,
    }
}

/// gRPC status for an engine refusal: invalid input is the caller's fault,
/// a full pool is a retryable overload.
pub fn engine_status(e: EngineError) -> Status {
    match e.class() {
        "invalid_request" | "unsupported" => Status::invalid_argument(e.to_string()),
        "overloaded" => Status::resource_exhausted(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// An engine event on the wire.
pub fn event_to_proto(e: Event) -> pb::DecodeEvent {
    use pb::DecodeEventKind as K;
    let kind = match e {
        Event::PromptLogprobs(lp) => K::PromptLogprobs(prompt_logprobs_to_proto(&lp)),
        Event::Token(s) => K::Token(sampled_to_proto(&s)),
        Event::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            stop_token,
        } => K::Finished(pb::Finished {
            reason: match reason {
                FinishReason::Stop => pb::FinishReason::Stop,
                FinishReason::Length => pb::FinishReason::Length,
            } as i32,
            prompt_tokens: prompt_tokens as u32,
            completion_tokens: completion_tokens as u32,
            cached_tokens: cached_tokens as u32,
            stop_token,
        }),
        Event::Error(message) => K::Error(pb::WorkerError {
            code: "internal".into(),
            message,
        }),
    };
    pb::DecodeEvent {
        kind: Some(kind),
        index: 0,
    }
}

pub fn node_info(
    engine: &Engine,
    role: Role,
    node_id: &str,
    fingerprint: &str,
    kv_address: String,
    threads: u32,
) -> pb::NodeInfo {
    let stats = engine.stats();
    pb::NodeInfo {
        protocol_version: PROTOCOL_VERSION,
        role: role.to_proto() as i32,
        node_id: node_id.to_string(),
        model_fingerprint: fingerprint.to_string(),
        kv_address,
        max_sequence_tokens: engine.max_sequence_tokens() as u32,
        block_size: engine.kv_layout().block_size as u32,
        total_blocks: stats.total_blocks as u32,
        tp_size: 1,
        pp_size: 1,
        threads,
        adapters: adapter_list(engine).adapters,
    }
}

/// The LoRA adapters `engine` serves, as the protocol lists them.
pub fn adapter_list(engine: &Engine) -> pb::AdapterList {
    let (version, list) = engine.adapters_versioned();
    pb::AdapterList {
        adapters: list
            .into_iter()
            .map(|(name, fingerprint)| pb::LoraAdapter { name, fingerprint })
            .collect(),
        instance: instance(),
        adapters_version: version,
    }
}

/// `LoadAdapter` for either kind of worker: reads the files off the async
/// workers, then answers with the adapters served.
pub async fn load_adapter(
    engine: &Arc<Engine>,
    req: pb::LoadAdapterRequest,
) -> Result<pb::AdapterList, Status> {
    if req.name.is_empty() || req.path.is_empty() {
        return Err(Status::invalid_argument(
            "loading a LoRA adapter needs a name and a path",
        ));
    }
    if engine.adapter_id(&req.name).is_some() {
        return Err(Status::already_exists(format!(
            "a LoRA adapter called {:?} is loaded already",
            req.name
        )));
    }
    let e = engine.clone();
    let (name, path) = (req.name.clone(), req.path.clone());
    let info = tokio::task::spawn_blocking(move || e.load_adapter(&name, Path::new(&path)))
        .await
        .map_err(|e| Status::internal(format!("loading the adapter stopped: {e}")))?
        .map_err(|e| Status::invalid_argument(format!("loading {:?}: {e}", req.name)))?;
    tracing::info!(adapter = %info.name, path = %req.path, fingerprint = %info.fingerprint, "LoRA adapter loaded");
    Ok(adapter_list(engine))
}

/// `UnloadAdapter` for either kind of worker.
pub async fn unload_adapter(
    engine: &Arc<Engine>,
    req: pb::UnloadAdapterRequest,
) -> Result<pb::AdapterList, Status> {
    if engine.adapter_id(&req.name).is_none() {
        return Err(Status::not_found(format!(
            "LoRA adapter {:?} is not served here",
            req.name
        )));
    }
    let e = engine.clone();
    let name = req.name.clone();
    tokio::task::spawn_blocking(move || e.unload_adapter(&name))
        .await
        .map_err(|e| Status::internal(format!("unloading the adapter stopped: {e}")))?
        .map_err(|e| Status::not_found(e.to_string()))?;
    tracing::info!(adapter = %req.name, "LoRA adapter unloaded");
    Ok(adapter_list(engine))
}

/// The engine's number of the LoRA adapter a request names (empty: the
/// base model, 0).
pub fn adapter_id(engine: &Engine, name: &str) -> Result<u32, Status> {
    if name.is_empty() {
        return Ok(0);
    }
    engine.adapter_id(name).ok_or_else(|| {
        let served: Vec<String> = engine.adapters().into_iter().map(|(n, _)| n).collect();
        Status::invalid_argument(format!(
            "LoRA adapter {name:?} is not served here (served: {})",
            if served.is_empty() {
                "none".to_string()
            } else {
                served.join(", ")
            }
        ))
    })
}

/// This process's `LoadReport::instance`: random, never 0.
fn instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish().max(1)
    })
}

pub fn load_report(engine: &Engine, in_flight: u32) -> pb::LoadReport {
    let s = engine.stats();
    let adapters = adapter_list(engine);
    pb::LoadReport {
        instance: instance(),
        waiting: s.waiting as u32,
        running: s.running as u32,
        free_blocks: s.free_blocks as u32,
        total_blocks: s.total_blocks as u32,
        in_flight,
        cached_blocks: s.cached_blocks as u32,
        adapters: adapters.adapters,
        adapters_version: adapters.adapters_version,
    }
}

/// `Engine::cached_prefix_len` waits for the engine thread: keep it off
/// the async workers.
pub async fn cached_prefix(engine: &Arc<Engine>, adapter: u32, tokens: Vec<u32>) -> u32 {
    let e = engine.clone();
    tokio::task::spawn_blocking(move || e.cached_prefix_len(adapter, tokens) as u32)
        .await
        .unwrap_or(0)
}
