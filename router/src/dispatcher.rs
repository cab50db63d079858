//! The cluster [`Backend`]: picks a decode worker (and, when disaggregating,
//! a prefill worker), opens the decode stream and relays its tokens, and
//! survives worker failures:
//!
//! - a worker that refuses a connection is marked down at once (before any
//!   membership change says so) and the request goes to another one;
//! - a full worker (bounded queue) makes the request try the next one, and
//!   when all are full the client gets 503 with `Retry-After`;
//! - a remote prefill that fails before the first token is retried on
//!   another prefill worker, or prefilled on the decode worker itself, and
//!   that prefill→decode pair is kept apart for a while ([`PairHealth`]);
//! - a decode worker that dies mid-stream is replaced: the request is
//!   resumed on another decode worker with the tokens already sent
//!   (re-prefilled there, counted as output), so the client sees one
//!   continuous stream with no token duplicated or dropped; counter-based
//!   sampling makes the continuation exactly what the dead worker would
//!   have produced.
//!
//! The router's own time is recorded here: `tandem_router_dispatch_seconds`
//! is the front end's share (request accepted to `generate`, tokenisation
//! excluded) plus the dispatcher's (to the decode call handed to the
//! transport).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tandem_cluster::metrics::RequestTimer;
use tandem_cluster::{ClusterSecret, Drain, DrainGuard, PeerList, Role};
use tandem_proto::worker as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{
    AdapterError, Backend, BoxFuture, DispatchError, Finish, GenerationInput, SampledToken,
    TokenEvent, TokenStream,
};
use crate::pairs::{PairHealth, Peer};
use crate::policy::{block_hashes, DisaggPolicy, Picker, PrefixIndex, RoutePolicy};
use crate::workers::{self, ConnectError, InFlightGuard, Worker};

/// Decode workers tried for one request (admission and resumption each).
const MAX_ATTEMPTS: usize = 3;

/// How often a request waiting for a decode worker looks again.
const WORKER_WAIT_POLL: Duration = Duration::from_millis(50);

/// How the dispatcher finds and uses its workers.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub route: RoutePolicy,
    pub disagg: DisaggPolicy,
    pub secret: ClusterSecret,
    /// The model fingerprint every worker must serve.
    pub fingerprint: String,
    /// Longest wait for a worker to come up when it is added.
    pub connect_timeout: Duration,
    pub load_poll: Duration,
    /// Longest a request waits for a decode worker when every one is gone
    /// or failed it (a restart): it opens, or resumes, on the worker's
    /// next life instead of failing at once.
    pub worker_wait: Duration,
}

/// The router's workers, which may change while it serves.
#[derive(Default)]
struct Members {
    decode: Vec<Arc<Worker>>,
    prefill: Vec<Arc<Worker>>,
}

struct Shared {
    members: RwLock<Members>,
    picker: Picker,
    disagg: DisaggPolicy,
    index: PrefixIndex,
    cfg: DispatcherConfig,
    drain: Drain,
    shutdown: CancellationToken,
    block_size: AtomicUsize,
    /// Prefill→decode pairs whose KV hand-over failed lately.
    pairs: PairHealth,
    /// Held while a request picks its workers and counts itself on them.
    picking: std::sync::Mutex<()>,
    /// Held while LoRA adapters are loaded or unloaded: one change at a
    /// time, so two loads of one name cannot each undo the other's.
    adapter_changes: tokio::sync::Mutex<()>,
    /// Adapters loaded and unloaded through the API: workers that join or
    /// restart are brought to it.
    runtime_adapters: std::sync::Mutex<crate::adapters::Wanted>,
}

pub struct Dispatcher {
    shared: Arc<Shared>,
}

impl Dispatcher {
    /// A dispatcher with no workers yet (they join through [`Dispatcher::add`]).
    pub fn new(cfg: DispatcherConfig, drain: Drain, shutdown: CancellationToken) -> Self {
        Self {
            shared: Arc::new(Shared {
                members: RwLock::default(),
                picker: Picker::new(cfg.route),
                disagg: cfg.disagg,
                index: PrefixIndex::new(1 << 20),
                cfg,
                drain,
                shutdown,
                block_size: AtomicUsize::new(16),
                pairs: PairHealth::default(),
                picking: std::sync::Mutex::new(()),
                adapter_changes: tokio::sync::Mutex::new(()),
                runtime_adapters: Default::default(),
            }),
        }
    }

    /// Connects to every static peer (waiting up to `connect_timeout` each).
    pub async fn connect(
        peers: &PeerList,
        cfg: DispatcherConfig,
        drain: Drain,
        shutdown: CancellationToken,
    ) -> Result<Self, ConnectError> {
        let d = Self::new(cfg, drain, shutdown);
        for p in &peers.0 {
            if p.role != Role::Router {
                d.add(p.addr, p.role).await?;
            }
        }
        Ok(d)
    }

    /// Connects to a worker, checks it, and starts routing to it.
    pub async fn add(&self, addr: SocketAddr, role: Role) -> Result<(), ConnectError> {
        let s = &self.shared;
        let w = workers::connect(
            addr,
            role,
            &s.cfg.fingerprint,
            &s.cfg.secret,
            s.cfg.connect_timeout,
        )
        .await?;
        let mut m = s.members.write().expect("members lock");
        // KV moves between the roles block by block: a worker whose blocks
        // differ in size from the others' could take no hand-over, and
        // its refusals would be blamed on the healthy workers it pairs with.
        let other = m.decode.iter().chain(&m.prefill).find(|x| x.addr != addr);
        if let Some(o) = other.filter(|o| o.info.block_size != w.info.block_size) {
            return Err(ConnectError::BlockSize {
                addr,
                theirs: w.info.block_size,
                ours: o.info.block_size,
                other: o.addr,
            });
        }
        if role == Role::Decode {
            s.block_size
                .store((w.info.block_size as usize).max(1), Ordering::Relaxed);
        }
        let list = match role {
            Role::Decode => &mut m.decode,
            _ => &mut m.prefill,
        };
        if let Some(old) = list.iter().position(|x| x.addr == addr) {
            list[old].remove();
            list.remove(old);
        }
        // A worker that joins has an empty cache, whatever ran there before.
        s.index.forget(addr);
        let shared = Arc::downgrade(&self.shared);
        workers::spawn_load_poll(
            w.clone(),
            s.cfg.secret.clone(),
            s.cfg.load_poll,
            s.shutdown.clone(),
            move |w| {
                if let Some(s) = shared.upgrade() {
                    s.restore_adapters(w.clone());
                }
            },
        );
        s.restore_adapters(w.clone());
        list.push(w);
        publish_counts(&m);
        tracing::info!(%addr, %role, "worker joined");
        Ok(())
    }

    /// Stops routing to a worker (it left the cluster).
    pub fn remove(&self, addr: SocketAddr) {
        let mut guard = self.shared.members.write().expect("members lock");
        let m = &mut *guard;
        for list in [&mut m.decode, &mut m.prefill] {
            list.retain(|w| {
                if w.addr == addr {
                    w.remove();
                    tracing::info!(%addr, "worker left");
                    false
                } else {
                    true
                }
            });
        }
        publish_counts(m);
    }

    /// Decode and prefill workers that answer (not marked down); also sets
    /// `tandem_router_workers_healthy` to them (the router's readiness
    /// check calls this, every 100 ms from the health task).
    pub fn healthy_workers(&self) -> (usize, usize) {
        let m = self.shared.members.read().expect("members lock");
        let up = |l: &[Arc<Worker>]| l.iter().filter(|w| w.load().healthy).count();
        let counts = (up(&m.decode), up(&m.prefill));
        let gauge = |role: &'static str, n: usize| {
            metrics::gauge!(tandem_cluster::metrics::ROUTER_WORKERS_HEALTHY, "worker_role" => role)
                .set(n as f64)
        };
        gauge("decode", counts.0);
        gauge("prefill", counts.1);
        counts
    }

    /// Longest prompt + completion some decode worker can hold (0 with
    /// none): a request is sent to one that can hold it.
    pub fn max_sequence_tokens(&self) -> usize {
        let m = self.shared.members.read().expect("members lock");
        m.decode
            .iter()
            .map(|w| w.info.max_sequence_tokens as usize)
            .max()
            .unwrap_or(0)
    }

    pub fn decode_workers(&self) -> Vec<Arc<Worker>> {
        self.shared
            .members
            .read()
            .expect("members lock")
            .decode
            .clone()
    }

    pub fn prefill_workers(&self) -> Vec<Arc<Worker>> {
        self.shared
            .members
            .read()
            .expect("members lock")
            .prefill
            .clone()
    }

    async fn start(&self, input: GenerationInput) -> Result<TokenStream, DispatchError> {
        let t0 = Instant::now();
        let front = input.frontend_time;
        let s = &self.shared;
        let Some(drain_guard) = s.drain.enter() else {
            return Err(DispatchError::Unavailable("the router is draining".into()));
        };
        count_adapter(&input.adapter, 1);
        let hashes = block_hashes(
            &input.adapter,
            &input.prompt,
            s.block_size.load(Ordering::Relaxed),
        );
        let req = pb::DecodeRequest {
            request_id: input.request_id.clone(),
            prompt: input.prompt,
            sampling: Some(sampling_to_proto(&input.sampling)),
            max_tokens: input.max_tokens,
            stop_token_ids: input.stop_token_ids,
            priority: 0,
            prefill_address: String::new(),
            generated: Vec::new(),
            n: 1,
            adapter: input.adapter,
        };
        let mut attempt = Attempt {
            req,
            hashes,
            failed: Vec::new(),
            timing: Some((t0, input.frontend_time)),
        };
        let opened = s.open(&mut attempt).await?;
        let (tx, rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let relay = Relay {
            shared: s.clone(),
            attempt,
            opened: Some(opened),
            generated: Vec::new(),
            scored: false,
            resumes: 0,
            cancel: cancel.clone(),
            tx,
            _drain: Arc::new(drain_guard),
        };
        tokio::spawn(relay.run());
        let mut timer = RequestTimer::new(t0.checked_sub(front).unwrap_or(t0));
        timer.admitted();
        Ok(TokenStream::new(rx, cancel.drop_guard()).timed(timer))
    }

    /// Parallel sampling: the choices of one request as one decode call
    /// carrying `n`, when they differ only in their request key (choice `i`
    /// has the first one's key plus `i`, as the front ends build them); the
    /// decode worker computes the prompt once and forks its KV. Anything
    /// else runs as one generation per choice.
    async fn start_choices(
        &self,
        inputs: Vec<GenerationInput>,
    ) -> Result<Vec<TokenStream>, DispatchError> {
        if inputs.len() < 2 || !shares_prompt(&inputs) {
            let futs = inputs.into_iter().map(|input| self.start(input));
            return futures_util::future::try_join_all(futs).await;
        }
        let t0 = Instant::now();
        let s = &self.shared;
        let Some(drain_guard) = s.drain.enter() else {
            return Err(DispatchError::Unavailable("the router is draining".into()));
        };
        let n = inputs.len();
        let first = inputs.into_iter().next().expect("two or more choices");
        let front = first.frontend_time;
        // Per-choice ids are `{base}-{index}`: the call is named by the base.
        let request_id = first
            .request_id
            .strip_suffix("-0")
            .unwrap_or(&first.request_id)
            .to_string();
        count_adapter(&first.adapter, n as u64);
        let hashes = block_hashes(
            &first.adapter,
            &first.prompt,
            s.block_size.load(Ordering::Relaxed),
        );
        let req = pb::DecodeRequest {
            request_id,
            prompt: first.prompt,
            sampling: Some(sampling_to_proto(&first.sampling)),
            max_tokens: first.max_tokens,
            stop_token_ids: first.stop_token_ids,
            priority: 0,
            prefill_address: String::new(),
            generated: Vec::new(),
            n: n as u32,
            adapter: first.adapter,
        };
        let mut attempt = Attempt {
            req,
            hashes,
            failed: Vec::new(),
            timing: Some((t0, front)),
        };
        let opened = s.open(&mut attempt).await?;
        let (cancelled_tx, cancelled) = mpsc::unbounded_channel();
        let mut choices = Vec::with_capacity(n);
        let mut streams = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::channel(64);
            let cancel = CancellationToken::new();
            // Tells the relay when the front end lets go of this choice.
            let (token, notify) = (cancel.clone(), cancelled_tx.clone());
            tokio::spawn(async move {
                token.cancelled().await;
                let _ = notify.send(i);
            });
            let mut timer = RequestTimer::new(t0.checked_sub(front).unwrap_or(t0));
            timer.admitted();
            streams.push(TokenStream::new(rx, cancel.clone().drop_guard()).timed(timer));
            choices.push(ChoiceSlot {
                tx,
                cancel,
                generated: Vec::new(),
                scored: false,
                done: false,
            });
        }
        let relay = ParallelRelay {
            shared: s.clone(),
            attempt,
            opened: Some(opened),
            choices,
            cancelled,
            _drain: Arc::new(drain_guard),
        };
        tokio::spawn(relay.run());
        Ok(streams)
    }
}

/// Whether the choices can run as one parallel-sampling call: the same
/// prompt and parameters, with consecutive request keys.
fn shares_prompt(inputs: &[GenerationInput]) -> bool {
    let first = &inputs[0];
    inputs.iter().enumerate().all(|(i, x)| {
        let mut sampling = x.sampling.clone();
        sampling.request_key = sampling.request_key.wrapping_sub(i as u64);
        x.prompt == first.prompt
            && sampling == first.sampling
            && x.max_tokens == first.max_tokens
            && x.stop_token_ids == first.stop_token_ids
            && x.adapter == first.adapter
    })
}

impl Backend for Dispatcher {
    fn generate(
        &self,
        input: GenerationInput,
    ) -> BoxFuture<'_, Result<TokenStream, DispatchError>> {
        Box::pin(self.start(input))
    }

    fn generate_choices(
        &self,
        inputs: Vec<GenerationInput>,
    ) -> BoxFuture<'_, Result<Vec<TokenStream>, DispatchError>> {
        Box::pin(self.start_choices(inputs))
    }

    fn load_adapter(&self, name: String, path: String) -> BoxFuture<'_, Result<(), AdapterError>> {
        let s = self.shared.clone();
        Box::pin(finish_even_if_dropped(async move {
            let _one = s.adapter_changes.lock().await;
            // A worker that is down gets it when it comes back (see
            // `restore_adapters`), rather than failing the load for all.
            let workers: Vec<Arc<Worker>> = s
                .all_workers()
                .into_iter()
                .filter(|w| w.load().healthy)
                .collect();
            crate::adapters::load(&workers, &s.cfg.secret, &name, &path).await?;
            lock(&s.runtime_adapters).loaded(&name, &path);
            Ok(())
        }))
    }

    fn unload_adapter(&self, name: String) -> BoxFuture<'_, Result<(), AdapterError>> {
        let s = self.shared.clone();
        Box::pin(finish_even_if_dropped(async move {
            let _one = s.adapter_changes.lock().await;
            // Noted first: a worker that fails to unload it now is asked
            // again when it comes back.
            lock(&s.runtime_adapters).unloaded(&name);
            let workers = s.all_workers();
            crate::adapters::unload(&workers, &s.cfg.secret, &name).await
        }))
    }

    /// The adapters some decode worker serves.
    fn adapters(&self) -> Vec<String> {
        let m = self.shared.members.read().expect("members lock");
        let mut names: Vec<String> = m.decode.iter().flat_map(|w| w.adapter_names()).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Runs an adapter change on its own task: a client that hangs up while
/// the workers load must not leave the change half done (some workers
/// with the adapter, none undone).
async fn finish_even_if_dropped(
    change: impl std::future::Future<Output = Result<(), AdapterError>> + Send + 'static,
) -> Result<(), AdapterError> {
    tokio::spawn(change).await.unwrap_or_else(|e| {
        Err(AdapterError::Unavailable(format!(
            "the adapter change stopped: {e}"
        )))
    })
}

/// `tandem_router_lora_requests_total{adapter}`: `n` generations with `adapter`.
fn count_adapter(adapter: &str, n: u64) {
    if !adapter.is_empty() {
        metrics::counter!(tandem_cluster::metrics::ROUTER_LORA_REQUESTS, "adapter" => adapter.to_string())
            .increment(n);
    }
}

/// The fingerprint of the adapter `name` on worker `w` (`Some("")` for
/// the base model, `None` when `w` does not serve it).
fn adapter_on(w: &Worker, name: &str) -> Option<String> {
    if name.is_empty() {
        return Some(String::new());
    }
    w.adapter(name)
}

/// `tandem_router_workers{worker_role}`: the workers the router routes to.
fn publish_counts(m: &Members) {
    metrics::gauge!(tandem_cluster::metrics::ROUTER_WORKERS, "worker_role" => "decode")
        .set(m.decode.len() as f64);
    metrics::gauge!(tandem_cluster::metrics::ROUTER_WORKERS, "worker_role" => "prefill")
        .set(m.prefill.len() as f64);
}

/// One request's routing state across (re)tries.
struct Attempt {
    req: pb::DecodeRequest,
    hashes: Vec<u64>,
    /// Workers that failed this request: not tried again for it in that
    /// life (a restarted one may take it).
    failed: Vec<Peer>,
    /// Accepted-at and front-end time, for the first dispatch only.
    timing: Option<(Instant, Duration)>,
}

/// An admitted request: its stream and the workers it holds.
struct Opened {
    stream: tonic::Streaming<pb::DecodeEvent>,
    decode: Arc<Worker>,
    prefill: Option<Arc<Worker>>,
    guards: (InFlightGuard, Option<InFlightGuard>),
    /// The decode worker computed the prompt itself (`PrefillRecomputed`).
    recomputed: bool,
}

impl Opened {
    /// The first token arrived: the prefill leg is over (its in-flight
    /// count released), and its hand-over worked unless the decode worker
    /// said it computed the prompt itself.
    fn prefill_done(&mut self, pairs: &PairHealth) {
        if self.guards.1.take().is_some() && !self.recomputed {
            if let Some(p) = &self.prefill {
                pairs.succeeded(p.peer(), self.decode.peer());
            }
        }
    }

    /// The decode worker computes the prompt itself: the hand-over from
    /// the prefill worker failed, though the request goes on.
    fn recomputed(&mut self, pairs: &PairHealth, why: &str) {
        self.recomputed = true;
        if let Some(p) = &self.prefill {
            tracing::warn!(prefill = %p.addr, decode = %self.decode.addr, error = %why, "the decode worker recomputed a prompt whose KV did not arrive");
            pairs.failed(p.peer(), self.decode.peer(), Instant::now());
        }
    }
}

/// Failures that say "this worker is gone", as opposed to "this request is bad".
fn is_connection_failure(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal | Code::Aborted
    )
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Brings `w` (a worker that joined, or came back) to the adapters
    /// loaded and unloaded through the API, in the background: until it
    /// has an adapter it gets no request for it.
    fn restore_adapters(self: &Arc<Self>, w: Arc<Worker>) {
        let s = self.clone();
        // After any change in progress (it may not have seen `w`).
        tokio::spawn(async move {
            let _one = s.adapter_changes.lock().await;
            let wanted = lock(&s.runtime_adapters).clone();
            crate::adapters::restore(&w, &s.cfg.secret, &wanted).await;
        });
    }

    /// Every worker the router routes to, decode workers first.
    fn all_workers(&self) -> Vec<Arc<Worker>> {
        let m = self.members.read().expect("members lock");
        m.decode.iter().chain(&m.prefill).cloned().collect()
    }

    fn pick(&self, a: &Attempt) -> Option<(Arc<Worker>, Option<Arc<Worker>>)> {
        let m = self.members.read().ok()?;
        let adapter = a.req.adapter.as_str();
        let ok = |w: &&Arc<Worker>| !a.failed.contains(&w.peer());
        let mut decode: Vec<Arc<Worker>> = m
            .decode
            .iter()
            .filter(ok)
            .filter(|w| adapter_on(w, adapter).is_some())
            .cloned()
            .collect();
        // Not a decode worker whose pool can never hold the request while
        // another can: with none that can, any, whose refusal says why.
        let wanted = a.req.prompt.len() + a.req.max_tokens.unwrap_or(1) as usize;
        if decode
            .iter()
            .any(|w| w.info.max_sequence_tokens as usize >= wanted)
        {
            decode.retain(|w| w.info.max_sequence_tokens as usize >= wanted);
        }
        let prefill: Vec<Arc<Worker>> = m.prefill.iter().filter(ok).cloned().collect();
        drop(m);
        let matched = |w: &Worker| self.index.matched(&a.hashes, w.peer());
        let decode = self.picker.decode(&decode, matched)?.clone();
        // A resumed stream is prefilled where it resumes.
        if !a.req.generated.is_empty() {
            return Some((decode, None));
        }
        let n = a.req.prompt.len();
        // A scored prompt is computed whole wherever it runs.
        let scored = a
            .req
            .sampling
            .as_ref()
            .is_some_and(|s| s.prompt_logprobs.is_some());
        let cached = match scored {
            true => 0,
            false => self.index.matched(&a.hashes, decode.peer()) * self.block_size(),
        };
        let local = n < self.disagg.min_prompt_tokens
            || cached as f32 >= self.disagg.max_cached_fraction * n as f32;
        let prefill = if local {
            None
        } else {
            // Not a prefill worker whose hand-over to this decode worker
            // failed lately; with none left, the decode worker prefills.
            let now = Instant::now();
            // Only one that runs the same adapter (the same files): its
            // keys and values are what the decode worker would compute.
            let want = adapter_on(&decode, adapter);
            let reachable: Vec<Arc<Worker>> = prefill
                .into_iter()
                .filter(|p| !self.pairs.avoided(p.peer(), decode.peer(), now))
                .filter(|p| adapter_on(p, adapter) == want)
                .collect();
            self.picker.prefill(&reachable, matched).cloned()
        };
        Some((decode, prefill))
    }

    /// [`Shared::pick`], with the picked workers' in-flight counts raised
    /// before another request picks: requests arriving together see each
    /// other's choices and spread over the workers.
    #[allow(clippy::type_complexity)]
    fn pick_and_track(
        &self,
        a: &Attempt,
    ) -> Option<(
        Arc<Worker>,
        Option<Arc<Worker>>,
        (InFlightGuard, Option<InFlightGuard>),
    )> {
        let _one_at_a_time = self.picking.lock().unwrap_or_else(|e| e.into_inner());
        let (decode, prefill) = self.pick(a)?;
        let guards = (decode.track(), prefill.as_ref().map(|p| p.track()));
        Some((decode, prefill, guards))
    }

    fn block_size(&self) -> usize {
        self.block_size.load(Ordering::Relaxed)
    }

    /// Admits the request on a decode worker, trying others when one is
    /// unreachable or full.
    async fn open(&self, a: &mut Attempt) -> Result<Opened, DispatchError> {
        let mut last = DispatchError::Unavailable("no decode workers".into());
        // Every decode worker gone, or gone for this request (it failed it):
        // wait a while for one to come back (a restart) before giving up.
        let mut gone = true;
        let wait_until = Instant::now() + self.cfg.worker_wait;
        let mut tries = 0;
        while tries < MAX_ATTEMPTS {
            let Some((decode, prefill, guards)) = self.pick_and_track(a) else {
                if !gone || Instant::now() >= wait_until || self.shutdown.is_cancelled() {
                    break;
                }
                tokio::time::sleep(WORKER_WAIT_POLL).await;
                continue;
            };
            tries += 1;
            gone = false;
            a.req.prefill_address = prefill
                .as_ref()
                .map(|p| p.addr.to_string())
                .unwrap_or_default();
            let mut client = decode.client.clone();
            let call = self.cfg.secret.attach(tonic::Request::new(a.req.clone()));
            if let Some((t0, front)) = a.timing.take() {
                metrics::histogram!(tandem_cluster::metrics::ROUTER_DISPATCH)
                    .record((front + t0.elapsed()).as_secs_f64());
            }
            metrics::counter!(tandem_cluster::metrics::ROUTER_DISPATCHED, "prefill" => if prefill.is_some() { "remote" } else { "local" }).increment(1);
            let first = match client.decode(call).await {
                Ok(r) => {
                    let mut stream = r.into_inner();
                    stream.message().await.map(|m| (stream, m))
                }
                Err(s) => Err(s),
            };
            match first {
                Ok((
                    stream,
                    Some(pb::DecodeEvent {
                        kind: Some(pb::DecodeEventKind::Admitted(_)),
                        ..
                    }),
                )) => {
                    self.index.record(&a.hashes, decode.peer());
                    if let Some(p) = &prefill {
                        self.index.record(&a.hashes, p.peer());
                    }
                    return Ok(Opened {
                        stream,
                        decode,
                        prefill,
                        guards,
                        recomputed: false,
                    });
                }
                Ok((
                    _,
                    Some(pb::DecodeEvent {
                        kind: Some(pb::DecodeEventKind::Error(e)),
                        ..
                    }),
                )) if e.code != "overloaded" => return Err(worker_error(&e)),
                Ok((_, Some(pb::DecodeEvent { kind: Some(_), .. })))
                | Ok((_, Some(pb::DecodeEvent { kind: None, .. }))) => {
                    // The client hears why, not where: worker addresses
                    // are the operator's (the log has them).
                    tracing::debug!(worker = %decode.addr, "decode worker full");
                    last = DispatchError::Unavailable("the decode workers are full".into());
                }
                Ok((_, None)) => {
                    decode.mark_down();
                    gone = true;
                    tracing::warn!(worker = %decode.addr, "decode worker closed the stream");
                    last = DispatchError::Unavailable("a decode worker closed the stream".into());
                }
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    last = DispatchError::Unavailable(s.message().to_string());
                }
                Err(s) if is_connection_failure(&s) => {
                    decode.mark_down();
                    gone = true;
                    tracing::warn!(worker = %decode.addr, error = %s.message(), "decode worker unreachable");
                    // A worker being stopped or restarted says so: the
                    // client learns to retry, not that something broke.
                    last = DispatchError::Unavailable(if s.message().contains("draining") {
                        "a decode worker is draining (being stopped or restarted) and no other took the request; retry shortly".into()
                    } else {
                        "a decode worker is unreachable".into()
                    });
                }
                Err(s) => return Err(status_error(s)),
            }
            a.failed.push(decode.peer());
        }
        metrics::counter!(tandem_cluster::metrics::ROUTER_UNAVAILABLE).increment(1);
        Err(last)
    }
}

/// Moves one request's events from its decode stream to the front end,
/// replacing failed workers on the way.
struct Relay {
    shared: Arc<Shared>,
    attempt: Attempt,
    opened: Option<Opened>,
    /// Tokens sent to the front end so far.
    generated: Vec<u32>,
    /// See [`ChoiceSlot::scored`].
    scored: bool,
    resumes: usize,
    cancel: CancellationToken,
    tx: mpsc::Sender<TokenEvent>,
    /// Shared by the choices of a parallel request resumed one by one.
    _drain: Arc<DrainGuard>,
}

enum Next {
    Forward(TokenEvent),
    Skip,
    /// The decode worker failed: resume elsewhere.
    Resume(String),
    /// The remote prefill failed before any token: prefill elsewhere.
    Reprefill(String),
}

impl Relay {
    async fn run(mut self) {
        loop {
            let Some(opened) = self.opened.as_mut() else {
                return;
            };
            let msg = tokio::select! {
                _ = self.cancel.cancelled() => return,
                m = opened.stream.message() => m,
            };
            let next = match msg {
                Ok(Some(pb::DecodeEvent { kind: Some(k), .. })) => self.on_event(k),
                Ok(Some(_)) => Next::Skip,
                Ok(None) => Next::Resume("the stream ended without finishing".into()),
                Err(s) if is_connection_failure(&s) => Next::Resume(s.message().to_string()),
                Err(s) => Next::Forward(TokenEvent::Error(status_error(s))),
            };
            let out = match next {
                Next::Skip => continue,
                Next::Forward(ev) => ev,
                Next::Reprefill(why) => match self.reprefill(why).await {
                    Ok(()) => continue,
                    Err(e) => TokenEvent::Error(e),
                },
                // A client that hangs up while the request waits for a
                // decode worker to come back ends the wait.
                Next::Resume(why) => {
                    let cancel = self.cancel.clone();
                    let resumed = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = self.resume(why) => r,
                    };
                    match resumed {
                        Ok(None) => continue,
                        Ok(Some(done)) => done,
                        Err(e) => TokenEvent::Error(e),
                    }
                }
            };
            let last = out.ends_stream();
            if self.tx.send(out).await.is_err() || last {
                return;
            }
        }
    }

    fn on_event(&mut self, k: pb::DecodeEventKind) -> Next {
        match k {
            pb::DecodeEventKind::Admitted(_) => Next::Skip,
            pb::DecodeEventKind::PromptLogprobs(_) if self.scored => Next::Skip,
            pb::DecodeEventKind::PromptLogprobs(lp) => {
                self.scored = true;
                Next::Forward(prompt_logprobs_event(&lp))
            }
            pb::DecodeEventKind::Token(t) => {
                self.generated.push(t.token_id);
                if let Some(o) = self.opened.as_mut() {
                    // The prefill leg is over once a token arrives.
                    o.prefill_done(&self.shared.pairs);
                }
                Next::Forward(token_event(&t))
            }
            pb::DecodeEventKind::Finished(f) => Next::Forward(finished_event(&f)),
            pb::DecodeEventKind::Recomputed(r) => {
                if let Some(o) = self.opened.as_mut() {
                    o.recomputed(&self.shared.pairs, &r.reason);
                }
                Next::Skip
            }
            pb::DecodeEventKind::Error(e)
                if e.code == "prefill_failed" && self.generated.is_empty() =>
            {
                Next::Reprefill(e.message)
            }
            pb::DecodeEventKind::Error(e) => Next::Forward(TokenEvent::Error(worker_error(&e))),
        }
    }

    /// The prefill leg failed: try another prefill worker, else prefill on a
    /// decode worker.
    async fn reprefill(&mut self, why: String) -> Result<(), DispatchError> {
        reopen_after_prefill_failure(&self.shared, &mut self.attempt, &mut self.opened, why).await
    }

    /// The decode worker failed mid-stream: continue on another one with the
    /// tokens already sent. `Some(event)` when nothing is left to generate.
    async fn resume(&mut self, why: String) -> Result<Option<TokenEvent>, DispatchError> {
        let Some(dead) = self.opened.take() else {
            return Err(DispatchError::Internal(why));
        };
        dead.decode.mark_down();
        self.attempt.failed.push(dead.decode.peer());
        tracing::warn!(worker = %dead.decode.addr, error = %why, "decode worker failed mid-stream");
        if self.resumes >= MAX_ATTEMPTS {
            return Err(DispatchError::Internal(format!(
                "a decode worker failed ({why}) and {} resumptions were used up",
                self.resumes
            )));
        }
        self.resumes += 1;
        let why = format!("a decode worker failed: {why}");
        drop(dead);
        self.continue_elsewhere(&why).await
    }

    /// Opens the stream again on another decode worker, with the tokens
    /// already sent as `generated`. `Some(event)` when nothing is left to
    /// generate.
    async fn continue_elsewhere(&mut self, why: &str) -> Result<Option<TokenEvent>, DispatchError> {
        let req = &mut self.attempt.req;
        let n = self.generated.len();
        if req.max_tokens.is_some_and(|m| n >= m as usize) {
            // Everything asked for was already sent.
            return Ok(Some(TokenEvent::Finished {
                reason: Finish::Length,
                prompt_tokens: req.prompt.len() as u32,
                completion_tokens: n as u32,
                cached_tokens: 0,
                stop_token: None,
            }));
        }
        tracing::warn!(request = %req.request_id, sent = n, error = %why, "resuming elsewhere");
        metrics::counter!(tandem_cluster::metrics::ROUTER_RESUMED).increment(1);
        req.generated = self.generated.clone();
        req.prefill_address.clear();
        self.opened = Some(self.shared.open(&mut self.attempt).await?);
        Ok(None)
    }
}

/// One choice of a parallel request, as the relay sees it.
struct ChoiceSlot {
    tx: mpsc::Sender<TokenEvent>,
    /// Cancelled when the front end drops the choice's [`TokenStream`].
    cancel: CancellationToken,
    /// Tokens sent to the front end so far.
    generated: Vec<u32>,
    /// The prompt's log-probabilities were sent (a worker that takes over
    /// before the first token computes them again).
    scored: bool,
    /// Finished, failed, or given up by the front end: nothing more to send.
    done: bool,
}

/// A worker's sampled token as the front ends see it.
fn token_event(t: &pb::SampledToken) -> TokenEvent {
    TokenEvent::Token(sampled_token(t))
}

fn sampled_token(t: &pb::SampledToken) -> SampledToken {
    SampledToken {
        id: t.token_id,
        logprob: t.logprob,
        top: t.top.iter().map(|x| (x.token_id, x.logprob)).collect(),
        rank: t.rank,
    }
}

/// A prompt's scores as the front ends see them.
fn prompt_logprobs_event(lp: &pb::PromptLogprobs) -> TokenEvent {
    TokenEvent::PromptLogprobs(lp.tokens.iter().map(sampled_token).collect())
}

/// A worker's end of a choice as the front ends see it.
fn finished_event(f: &pb::Finished) -> TokenEvent {
    TokenEvent::Finished {
        reason: if f.reason() == pb::FinishReason::Length {
            Finish::Length
        } else {
            Finish::Stop
        },
        prompt_tokens: f.prompt_tokens,
        completion_tokens: f.completion_tokens,
        // A resumed request's worker prefilled the prompt and the tokens
        // already sent, and counts its cache hits over both: only the
        // prompt's count as cached prompt tokens.
        cached_tokens: f.cached_tokens.min(f.prompt_tokens),
        stop_token: f.stop_token,
    }
}

/// The prefill leg failed before any token: marks that prefill worker down
/// (until the next load poll) and the pair apart (see [`PairHealth`]), and
/// opens the request again, on another prefill worker or, with none left,
/// prefilling on a decode worker. Shared by the one-choice and the
/// parallel relays.
async fn reopen_after_prefill_failure(
    shared: &Shared,
    attempt: &mut Attempt,
    opened: &mut Option<Opened>,
    why: String,
) -> Result<(), DispatchError> {
    if let Some(o) = opened.take() {
        if let Some(p) = &o.prefill {
            tracing::warn!(request = %attempt.req.request_id, prefill = %p.addr, decode = %o.decode.addr, error = %why, "prefill failed; retrying elsewhere");
            p.mark_down();
            shared
                .pairs
                .failed(p.peer(), o.decode.peer(), Instant::now());
            attempt.failed.push(p.peer());
        }
    }
    metrics::counter!(tandem_cluster::metrics::ROUTER_PREFILL_RETRIES).increment(1);
    *opened = Some(shared.open(attempt).await?);
    Ok(())
}

/// Relays a parallel-sampling request: one decode stream carrying every
/// choice's events (tagged with the choice's index), fanned out to the
/// choices' [`TokenStream`]s.
///
/// - A choice the front end drops (a stop string ended it) is cancelled on
///   the worker alone (`Cancel` with its index); the others carry on.
/// - A remote prefill that fails before any token is retried elsewhere,
///   the whole request at once, as for one choice.
/// - A decode worker that dies mid-stream: each unfinished choice resumes
///   as a request of its own (`n = 1`, its key, the tokens it already sent
///   as `generated`) through [`Relay`], because the choices have diverged
///   and no longer share anything but the prompt. Counter-based sampling
///   makes each continuation exact, as for a single stream.
struct ParallelRelay {
    shared: Arc<Shared>,
    attempt: Attempt,
    opened: Option<Opened>,
    choices: Vec<ChoiceSlot>,
    /// Indices of the choices the front end let go of.
    cancelled: mpsc::UnboundedReceiver<usize>,
    _drain: Arc<DrainGuard>,
}

impl ParallelRelay {
    async fn run(mut self) {
        loop {
            if self.choices.iter().all(|c| c.done) {
                return;
            }
            let Some(opened) = self.opened.as_mut() else {
                return;
            };
            let msg = tokio::select! {
                Some(i) = self.cancelled.recv() => {
                    self.cancel_choice(i);
                    continue;
                }
                m = opened.stream.message() => m,
            };
            let result = match msg {
                Ok(Some(ev)) => self.on_event(ev).await,
                Ok(None) => Err("the stream ended without finishing every choice".into()),
                Err(s) if is_connection_failure(&s) => Err(s.message().to_string()),
                Err(s) => {
                    let e = status_error(s);
                    self.fail_all(e).await;
                    return;
                }
            };
            if let Err(why) = result {
                self.resume_each(why).await;
                return;
            }
        }
    }

    /// The front end dropped choice `i`: stop it on the worker.
    fn cancel_choice(&mut self, i: usize) {
        let Some(c) = self.choices.get_mut(i) else {
            return;
        };
        if c.done {
            return;
        }
        c.done = true;
        let Some(o) = self.opened.as_ref() else {
            return;
        };
        let mut client = o.decode.client.clone();
        let call = self
            .shared
            .cfg
            .secret
            .attach(tonic::Request::new(pb::CancelRequest {
                request_id: self.attempt.req.request_id.clone(),
                index: Some(i as u32),
            }));
        tokio::spawn(async move {
            // Best effort: if it fails, the choice ends at its own limit.
            let _ = client.cancel(call).await;
        });
    }

    /// Handles one event of the decode stream. `Err(why)` when the decode
    /// worker failed and the choices must resume elsewhere.
    async fn on_event(&mut self, ev: pb::DecodeEvent) -> Result<(), String> {
        let i = ev.index as usize;
        let Some(kind) = ev.kind else {
            return Ok(());
        };
        match &kind {
            pb::DecodeEventKind::Admitted(_) => return Ok(()),
            pb::DecodeEventKind::Recomputed(r) => {
                if let Some(o) = self.opened.as_mut() {
                    o.recomputed(&self.shared.pairs, &r.reason);
                }
                return Ok(());
            }
            _ => {}
        }
        if i >= self.choices.len() {
            tracing::warn!(request = %self.attempt.req.request_id, index = i, "event for a choice that does not exist");
            return Ok(());
        }
        let out = match kind {
            pb::DecodeEventKind::Admitted(_) | pb::DecodeEventKind::Recomputed(_) => return Ok(()),
            pb::DecodeEventKind::Token(t) => {
                if let Some(o) = self.opened.as_mut() {
                    // The prefill leg is over once a token arrives.
                    o.prefill_done(&self.shared.pairs);
                }
                if self.choices[i].done {
                    return Ok(());
                }
                self.choices[i].generated.push(t.token_id);
                token_event(&t)
            }
            pb::DecodeEventKind::PromptLogprobs(lp) => {
                if std::mem::replace(&mut self.choices[i].scored, true) {
                    return Ok(());
                }
                prompt_logprobs_event(&lp)
            }
            pb::DecodeEventKind::Finished(f) => finished_event(&f),
            pb::DecodeEventKind::Error(e)
                if e.code == "prefill_failed"
                    && self.choices.iter().all(|c| c.generated.is_empty()) =>
            {
                if let Err(e) = self.reprefill(e.message).await {
                    self.fail_all(e).await;
                }
                return Ok(());
            }
            pb::DecodeEventKind::Error(e) => TokenEvent::Error(worker_error(&e)),
        };
        let c = &mut self.choices[i];
        if c.done {
            return Ok(());
        }
        let last = out.ends_stream();
        if c.tx.send(out).await.is_err() || last {
            c.done = true;
        }
        Ok(())
    }

    /// The prefill leg failed before any token: prefill elsewhere (as
    /// [`Relay::reprefill`]), every choice at once.
    async fn reprefill(&mut self, why: String) -> Result<(), DispatchError> {
        reopen_after_prefill_failure(&self.shared, &mut self.attempt, &mut self.opened, why).await
    }

    /// Ends every unfinished choice with `e`.
    async fn fail_all(&mut self, e: DispatchError) {
        for c in self.choices.iter_mut().filter(|c| !c.done) {
            c.done = true;
            let _ = c.tx.send(TokenEvent::Error(e.clone())).await;
        }
    }

    /// The decode worker failed: each unfinished choice continues as a
    /// single-choice request of its own (see the type's docs).
    async fn resume_each(mut self, why: String) {
        let Some(dead) = self.opened.take() else {
            self.fail_all(DispatchError::Internal(why)).await;
            return;
        };
        dead.decode.mark_down();
        self.attempt.failed.push(dead.decode.peer());
        tracing::warn!(worker = %dead.decode.addr, error = %why, "decode worker failed mid-stream");
        let why = format!("a decode worker failed: {why}");
        drop(dead);
        let base = &self.attempt.req;
        let key = base.sampling.as_ref().map(|s| s.request_key).unwrap_or(0);
        for (i, c) in self.choices.into_iter().enumerate() {
            if c.done {
                continue;
            }
            let mut req = base.clone();
            req.request_id = format!("{}-{i}", base.request_id);
            req.n = 1;
            if let Some(s) = req.sampling.as_mut() {
                s.request_key = key.wrapping_add(i as u64);
            }
            let mut relay = Relay {
                shared: self.shared.clone(),
                attempt: Attempt {
                    req,
                    hashes: self.attempt.hashes.clone(),
                    failed: self.attempt.failed.clone(),
                    timing: None,
                },
                opened: None,
                generated: c.generated,
                scored: c.scored,
                resumes: 1,
                cancel: c.cancel,
                tx: c.tx,
                _drain: self._drain.clone(),
            };
            let tx = relay.tx.clone();
            match relay.continue_elsewhere(&why).await {
                Ok(None) => {
                    tokio::spawn(relay.run());
                }
                Ok(Some(done)) => {
                    let _ = tx.send(done).await;
                }
                Err(e) => {
                    let _ = tx.send(TokenEvent::Error(e)).await;
                }
            }
        }
    }
}

pub fn sampling_to_proto(s: &crate::dispatch::Sampling) -> pb::WorkerSampling {
    pb::WorkerSampling {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        request_key: s.request_key,
        logprobs: s.logprobs,
        top_logprobs: s.top_logprobs,
        min_tokens: s.min_tokens,
        min_tokens_masked: s.min_tokens_masked.clone(),
        logit_bias: s
            .logit_bias
            .iter()
            .map(|&(token_id, bias)| pb::TokenBias { token_id, bias })
            .collect(),
        json_object: s.json_object,
        json_schema: s.json_schema.clone().unwrap_or_default(),
        regex: s.regex.clone().unwrap_or_default(),
        choice: s.choice.clone(),
        prompt_logprobs: s.prompt_logprobs,
    }
}

fn status_error(s: tonic::Status) -> DispatchError {
    use tonic::Code;
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            DispatchError::Invalid(s.message().to_string())
        }
        Code::ResourceExhausted | Code::Unavailable => {
            DispatchError::Unavailable(s.message().to_string())
        }
        _ => DispatchError::Internal(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn worker_error(e: &pb::WorkerError) -> DispatchError {
    match e.code.as_str() {
        "invalid_request" => DispatchError::Invalid(e.message.clone()),
        "overloaded" => DispatchError::Unavailable(e.message.clone()),
        _ => DispatchError::Internal(e.message.clone()),
    }
}
