//! The router's view of its workers: a gRPC client per worker, what the
//! worker said about itself at connect time, and its load, refreshed by a
//! background poll and corrected at once by the router's own in-flight
//! counts (the poll lags; the counts do not).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_cluster::{ClusterSecret, Role, PROTOCOL_VERSION};
use tandem_proto::worker as pb;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// One connected worker.
pub struct Worker {
    pub addr: SocketAddr,
    pub role: Role,
    pub info: pb::NodeInfo,
    pub client: pb::WorkerClient<Channel>,
    /// The last load poll (its adapter list moved to `adapters`).
    load: Mutex<pb::LoadReport>,
    /// The LoRA adapters the worker serves, as its newest answer said:
    /// `info.adapters` at connect time, then each load poll's and each
    /// `LoadAdapter`/`UnloadAdapter` reply's.
    adapters: Mutex<AdapterView>,
    /// Requests this router has sent and not seen finish.
    in_flight: AtomicU32,
    /// False after a failed call or load poll, true again after a good poll.
    healthy: std::sync::atomic::AtomicBool,
    /// Set when the worker leaves the cluster: its poll stops.
    removed: std::sync::atomic::AtomicBool,
    /// The last load poll failed (the worker did not answer at all).
    poll_failed: std::sync::atomic::AtomicBool,
    /// Which of the router's connections to a worker this is (see
    /// [`crate::pairs::Peer`]).
    joined: u64,
    /// Times a load poll succeeded after one failed: the worker was gone
    /// (died, restarted, unreachable) and is back.
    returns: AtomicU64,
}

/// A worker's adapters as the router last knew them.
#[derive(Debug, Default)]
pub struct AdapterView {
    /// The worker process that listed them (0: not known yet).
    instance: u64,
    /// Its count of adapter changes when it listed them.
    version: u64,
    list: Vec<pb::LoraAdapter>,
}

impl AdapterView {
    /// Takes `l` unless it is older than what is held: a listing of the
    /// same process made before fewer changes (a load poll answered just
    /// before an adapter change and received after the change's reply).
    /// Another process's listing always wins: the worker restarted.
    pub fn take(&mut self, l: pb::AdapterList) {
        if l.instance != self.instance || l.adapters_version >= self.version {
            self.instance = l.instance;
            self.version = l.adapters_version;
            self.list = l.adapters;
        }
    }
}

/// Numbers each connection to a worker, so that one which joins again at
/// an address is not mistaken for the one that was there.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// A snapshot for routing decisions.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLoad {
    pub in_flight: u32,
    pub running: u32,
    pub waiting: u32,
    pub free_blocks: u32,
    pub total_blocks: u32,
    /// Blocks holding reusable (prefix-cached) KV, as the last poll saw.
    pub cached_blocks: u32,
    pub healthy: bool,
}

impl Worker {
    pub fn load(&self) -> WorkerLoad {
        let l = self
            .load
            .lock()
            .map(|l| pb::LoadReport {
                adapters: Vec::new(),
                ..*l
            })
            .unwrap_or_default();
        WorkerLoad {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            running: l.running,
            waiting: l.waiting,
            free_blocks: l.free_blocks,
            total_blocks: l.total_blocks,
            cached_blocks: l.cached_blocks,
            healthy: self.healthy.load(Ordering::Relaxed),
        }
    }

    fn adapter_view(&self) -> std::sync::MutexGuard<'_, AdapterView> {
        self.adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The fingerprint of the LoRA adapter `name` on this worker (`None`
    /// when it does not serve it).
    pub fn adapter(&self, name: &str) -> Option<String> {
        let v = self.adapter_view();
        v.list
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.fingerprint.clone())
    }

    /// The names of the LoRA adapters this worker serves.
    pub fn adapter_names(&self) -> Vec<String> {
        let v = self.adapter_view();
        v.list.iter().map(|a| a.name.clone()).collect()
    }

    /// Takes the worker's word for the adapters it serves, unless an
    /// answer it gave later is already in (see [`AdapterView::take`]).
    pub fn take_adapters(&self, list: pb::AdapterList) {
        self.adapter_view().take(list);
    }

    /// Stops counting on adapter `name` here (the worker said it has none).
    pub fn forget_adapter(&self, name: &str) {
        self.adapter_view().list.retain(|a| a.name != name);
    }

    /// Marks the worker down at once (a connection error): routing avoids
    /// it until a load poll succeeds again.
    pub fn mark_down(&self) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(worker = %self.addr, "marked down");
            metrics::counter!(tandem_cluster::metrics::ROUTER_WORKERS_MARKED_DOWN).increment(1);
        }
    }

    /// Which life of the worker this is: its address, and how many times
    /// it came back after a load poll found it gone (see [`crate::pairs`]).
    pub fn peer(&self) -> crate::pairs::Peer {
        crate::pairs::Peer {
            addr: self.addr,
            joined: self.joined,
            returns: self.returns.load(Ordering::Relaxed),
        }
    }

    /// Stops routing to and polling this worker.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Relaxed);
        self.healthy.store(false, Ordering::Relaxed);
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// Counts a request until the guard drops.
    pub fn track(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }
}

pub struct InFlightGuard(Arc<Worker>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("worker {addr}: {msg}")]
    Unreachable { addr: SocketAddr, msg: String },
    #[error("worker {addr} speaks protocol version {theirs}, this router {ours}")]
    Version {
        addr: SocketAddr,
        theirs: u32,
        ours: u32,
    },
    #[error("worker {addr} serves model {theirs}, this router {ours}")]
    Model {
        addr: SocketAddr,
        theirs: String,
        ours: String,
    },
    #[error("worker {addr} keeps KV in blocks of {theirs} tokens, worker {other} in blocks of {ours}: start every worker of a cluster with the same --block-size")]
    BlockSize {
        addr: SocketAddr,
        theirs: u32,
        ours: u32,
        other: SocketAddr,
    },
    #[error("worker {addr} is a {theirs:?} worker, expected {expected}")]
    Role {
        addr: SocketAddr,
        theirs: pb::Role,
        expected: Role,
    },
}

/// How often a router waiting for a worker at start says so.
const CONNECT_WAIT_LOG_EVERY: Duration = Duration::from_secs(5);

/// An error and its causes on one line: tonic's own text ("transport
/// error") leaves out what went wrong ("Connection refused").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    with_causes(e.to_string(), e.source())
}

/// A failed call's message, with its transport cause where it has one.
fn status_text(s: &tonic::Status) -> String {
    with_causes(s.message().to_string(), std::error::Error::source(s))
}

/// `text`, then each cause in turn that it does not already say.
fn with_causes(mut text: String, mut cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

/// Connects to a worker and checks that it can serve for this router:
/// same protocol version, same model, the expected role.
pub async fn connect(
    addr: SocketAddr,
    expected: Role,
    fingerprint: &str,
    secret: &ClusterSecret,
    timeout: Duration,
) -> Result<Arc<Worker>, ConnectError> {
    let unreachable = |msg: String| ConnectError::Unreachable { addr, msg };
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // A peer that stops answering (killed host, stuck process) fails its
        // streams within ~15 s instead of hanging them.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let mut warned = started;
    let channel = loop {
        match ep.connect().await {
            Ok(c) => break c,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(unreachable(format!(
                    "{} (gave up after {:.0?})",
                    error_chain(&e),
                    started.elapsed()
                )))
            }
            Err(e) => {
                // Say what the wait is for, now and then: a router started
                // before its workers is normal, one pointed at a wrong
                // address should not look hung.
                if warned.elapsed() >= CONNECT_WAIT_LOG_EVERY {
                    warned = tokio::time::Instant::now();
                    tracing::warn!(
                        worker = %addr,
                        role = %expected,
                        error = %error_chain(&e),
                        "waiting for the worker to answer"
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    };
    let mut client = pb::WorkerClient::new(channel).max_decoding_message_size(pb::MAX_REPLY_BYTES);
    // Something that accepts connections but does not answer (not a
    // tandem worker, a stopped process) fails within the timeout too.
    let left = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_secs(2));
    let info = tokio::time::timeout(
        left,
        client.info(secret.attach(tonic::Request::new(pb::InfoRequest {}))),
    )
    .await
    .map_err(|_| {
        unreachable(format!(
            "no answer to a tandem worker's Info call within {:.0?} (is it a tandem {expected} worker?)",
            started.elapsed()
        ))
    })?
    .map_err(|s| unreachable(status_text(&s)))?
    .into_inner();
    if info.protocol_version != PROTOCOL_VERSION {
        return Err(ConnectError::Version {
            addr,
            theirs: info.protocol_version,
            ours: PROTOCOL_VERSION,
        });
    }
    if info.model_fingerprint != fingerprint {
        return Err(ConnectError::Model {
            addr,
            theirs: info.model_fingerprint,
            ours: fingerprint.to_string(),
        });
    }
    if info.role() != expected.to_proto() {
        return Err(ConnectError::Role {
            addr,
            theirs: info.role(),
            expected,
        });
    }
    let load = pb::LoadReport {
        total_blocks: info.total_blocks,
        free_blocks: info.total_blocks,
        ..Default::default()
    };
    Ok(Arc::new(Worker {
        addr,
        role: expected,
        adapters: Mutex::new(AdapterView {
            list: info.adapters.clone(),
            ..Default::default()
        }),
        info,
        client,
        load: Mutex::new(load),
        in_flight: AtomicU32::new(0),
        healthy: true.into(),
        removed: false.into(),
        poll_failed: false.into(),
        joined: CONNECTIONS.fetch_add(1, Ordering::Relaxed),
        returns: AtomicU64::new(0),
    }))
}

/// Polls a worker's load until it is removed or `shutdown`.
/// `on_return` runs each time the worker comes back: it answered again
/// after a failed poll, or a new process answers at its address.
pub fn spawn_load_poll(
    w: Arc<Worker>,
    secret: ClusterSecret,
    every: Duration,
    shutdown: CancellationToken,
    on_return: impl Fn(&Arc<Worker>) + Send + 'static,
) {
    tokio::spawn(async move {
        let mut client = w.client.clone();
        while !w.is_removed() {
            let mut req = secret.attach(tonic::Request::new(pb::LoadRequest {}));
            req.set_timeout(Duration::from_secs(2));
            match client.load(req).await {
                Ok(r) => {
                    let mut r = r.into_inner();
                    w.take_adapters(pb::AdapterList {
                        adapters: std::mem::take(&mut r.adapters),
                        instance: r.instance,
                        adapters_version: r.adapters_version,
                    });
                    // A new process at the address, even one that came
                    // back between two polls, is a new life.
                    let mut restarted = false;
                    if let Ok(mut l) = w.load.lock() {
                        restarted = l.instance != 0 && l.instance != r.instance;
                        *l = r;
                    }
                    w.healthy.store(!w.is_removed(), Ordering::Relaxed);
                    if w.poll_failed.swap(false, Ordering::Relaxed) | restarted {
                        w.returns.fetch_add(1, Ordering::Relaxed);
                        on_return(&w);
                    }
                }
                Err(e) => {
                    w.poll_failed.store(true, Ordering::Relaxed);
                    if w.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(worker = %w.addr, error = %status_text(&e), "load poll failed");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(instance: u64, version: u64, names: &[&str]) -> pb::AdapterList {
        pb::AdapterList {
            adapters: names
                .iter()
                .map(|n| pb::LoraAdapter {
                    name: n.to_string(),
                    fingerprint: format!("fp-{n}"),
                })
                .collect(),
            instance,
            adapters_version: version,
        }
    }

    fn names(v: &AdapterView) -> Vec<&str> {
        v.list.iter().map(|a| a.name.as_str()).collect()
    }

    /// A load's reply (version 1) then a poll answered before the load
    /// (version 0): the poll is older and does not undo the load; a later
    /// poll of the same version, or a restarted process's, is taken.
    #[test]
    fn an_older_listing_of_one_process_does_not_replace_a_newer_one() {
        let mut v = AdapterView::default();
        v.take(listing(7, 0, &[]));
        v.take(listing(7, 1, &["sql"]));
        v.take(listing(7, 0, &[]));
        assert_eq!(names(&v), ["sql"], "a stale poll undid the load");
        v.take(listing(7, 2, &[]));
        assert!(names(&v).is_empty(), "the unload's listing is newer");
        v.take(listing(7, 2, &[]));
        v.take(listing(9, 0, &["chat"]));
        assert_eq!(
            names(&v),
            ["chat"],
            "a restarted worker's own count starts again"
        );
    }
}
