//! LoRA adapters loaded and unloaded while the cluster serves (vLLM's
//! `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`), on every worker
//! or on none: a prefill and a decode worker that pair must compute an
//! adapter's keys and values from the same files, and a request for it
//! must find a decode worker wherever it lands.
//!
//! The router only relays: each worker reads the files from its own disk,
//! checks them against its model and answers with the adapters it serves
//! now, which the router then routes by.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tandem_cluster::ClusterSecret;
use tandem_proto::worker as pb;
use tonic::Code;

use crate::dispatch::AdapterError;
use crate::workers::Worker;

/// Longest a worker may take to read and check an adapter's files.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a worker may take to answer an unload (it does not wait for the
/// requests still running with the adapter).
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Loads adapter `name` from `path` on every worker in `workers`. When one
/// refuses, the others that took it unload it again, and the first refusal
/// is the answer.
pub async fn load(
    workers: &[Arc<Worker>],
    secret: &ClusterSecret,
    name: &str,
    path: &str,
) -> Result<(), AdapterError> {
    if workers.is_empty() {
        return Err(AdapterError::Unavailable(
            "no worker is up to load the adapter on".into(),
        ));
    }
    let req = pb::LoadAdapterRequest {
        name: name.to_string(),
        path: path.to_string(),
    };
    let answers = join_all(workers.iter().map(|w| {
        let mut call = secret.attach(tonic::Request::new(req.clone()));
        call.set_timeout(LOAD_TIMEOUT);
        let mut client = w.client.clone();
        async move { client.load_adapter(call).await }
    }))
    .await;
    let mut refusal = None;
    let mut took = Vec::new();
    for (w, answer) in workers.iter().zip(answers) {
        match answer {
            Ok(list) => {
                w.take_adapters(list.into_inner());
                took.push(w.clone());
            }
            Err(status) => {
                tracing::warn!(worker = %w.addr, adapter = name, error = %status.message(), "loading a LoRA adapter failed");
                refusal.get_or_insert_with(|| refused(w, &status));
            }
        }
    }
    let Some(refusal) = refusal else {
        tracing::info!(
            adapter = name,
            path,
            workers = workers.len(),
            "LoRA adapter loaded"
        );
        return Ok(());
    };
    if took.is_empty() {
        return Err(refusal);
    }
    if let Err(e) = unload(&took, secret, name).await {
        // Routing follows what the workers say they serve, so a worker
        // left holding the adapter is still paired correctly.
        tracing::warn!(adapter = name, error = %e, "undoing a partial adapter load failed");
    }
    Err(refusal)
}

/// Unloads adapter `name` from every worker in `workers` that serves it.
pub async fn unload(
    workers: &[Arc<Worker>],
    secret: &ClusterSecret,
    name: &str,
) -> Result<(), AdapterError> {
    let holding: Vec<&Arc<Worker>> = workers
        .iter()
        .filter(|w| w.adapter(name).is_some())
        .collect();
    if holding.is_empty() {
        return Err(AdapterError::NotFound(format!(
            "LoRA adapter {name:?} is not loaded"
        )));
    }
    let req = pb::UnloadAdapterRequest {
        name: name.to_string(),
    };
    let answers = join_all(holding.iter().map(|w| {
        let mut call = secret.attach(tonic::Request::new(req.clone()));
        call.set_timeout(UNLOAD_TIMEOUT);
        let mut client = w.client.clone();
        async move { client.unload_adapter(call).await }
    }))
    .await;
    let mut first_error = None;
    for (w, answer) in holding.iter().zip(answers) {
        match answer {
            Ok(list) => w.take_adapters(list.into_inner()),
            // It went already (its list was stale): what was asked.
            Err(status) if status.code() == Code::NotFound => {
                w.forget_adapter(name);
            }
            Err(status) => {
                tracing::warn!(worker = %w.addr, adapter = name, error = %status.message(), "unloading a LoRA adapter failed");
                first_error.get_or_insert_with(|| refused(w, &status));
            }
        }
    }
    match first_error {
        None => {
            tracing::info!(
                adapter = name,
                workers = holding.len(),
                "LoRA adapter unloaded"
            );
            Ok(())
        }
        // The others have let it go; asking again reaches only the ones
        // that still hold it.
        Some(AdapterError::Unavailable(m)) => Err(AdapterError::Unavailable(format!(
            "{m}; the other workers unloaded it: ask again to unload it there"
        ))),
        Some(e) => Err(e),
    }
}

/// What clients made of the adapters through the API, which the router
/// holds workers that join or come back to.
#[derive(Debug, Default, Clone)]
pub struct Wanted {
    /// Loaded, as `(name, path)` in load order.
    loaded: Vec<(String, String)>,
    /// Unloaded: a worker started with one (`--lora`) serves it again
    /// after a restart.
    unloaded: Vec<String>,
}

impl Wanted {
    pub fn loaded(&mut self, name: &str, path: &str) {
        self.unloaded.retain(|n| n != name);
        self.loaded.push((name.to_string(), path.to_string()));
    }

    pub fn unloaded(&mut self, name: &str) {
        self.loaded.retain(|(n, _)| n != name);
        if !self.unloaded.iter().any(|n| n == name) {
            self.unloaded.push(name.to_string());
        }
    }
}

/// Brings `w` (a worker that joined the cluster, or restarted) to what
/// clients asked for through the API: unloads the adapters they unloaded
/// and loads those they loaded. A worker that refuses a load runs without
/// the adapter, and requests for it go to the others.
pub async fn restore(w: &Arc<Worker>, secret: &ClusterSecret, wanted: &Wanted) {
    for name in &wanted.unloaded {
        if w.adapter(name).is_some() {
            if let Err(e) = unload(std::slice::from_ref(w), secret, name).await {
                tracing::warn!(worker = %w.addr, adapter = %name, error = %e, "a worker kept a LoRA adapter unloaded at run time");
            }
        }
    }
    for (name, path) in &wanted.loaded {
        if w.adapter(name).is_none() {
            if let Err(e) = load(std::slice::from_ref(w), secret, name, path).await {
                tracing::warn!(worker = %w.addr, adapter = %name, error = %e, "a worker did not take a LoRA adapter loaded at run time; it serves without it");
            }
        }
    }
}

/// A worker's refusal as the client is told it.
fn refused(w: &Worker, status: &tonic::Status) -> AdapterError {
    let msg = format!("worker {}: {}", w.addr, status.message());
    match status.code() {
        Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition => {
            AdapterError::Invalid(msg)
        }
        Code::NotFound => AdapterError::NotFound(msg),
        _ => AdapterError::Unavailable(msg),
    }
}
