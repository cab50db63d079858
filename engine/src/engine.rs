//! The engine as a service: the scheduler on a dedicated thread, driven
//! through channels (mistral.rs-style engine thread, TGI-style per-request
//! streams).
//!
//! `submit` validates a request on the caller's thread (so a request that
//! can never run is refused at once, with the reason), then hands it to the
//! engine thread, which runs iteration-level scheduling until the queue is
//! empty and then sleeps on its command channel. Each request gets its own
//! stream of [`Event`]s; dropping the stream cancels the request.
//!
//! Disaggregated serving: a prefill worker submits with
//! [`Engine::submit_with_export`] (the prompt's KV streams out layer by
//! layer through a [`KvExport`]); a decode worker [`Engine::reserve`]s
//! blocks, receives the KV off the engine thread through the
//! [`Reservation`] (straight into the reserved blocks of a host pool, into
//! a [`KvStaging`] where the executor keeps the KV elsewhere), and
//! [`Engine::install`]s it, which joins the request into the running batch.
//!
//! Parallel sampling: a [`RequestSpec`] with `n > 1` runs its prompt once
//! and forks into `n` choices sharing the prompt's KV blocks (see
//! `scheduler`); each choice has its own event stream.
//!
//! LoRA adapters come and go while the engine serves
//! ([`Engine::load_adapter`], [`Engine::unload_adapter`]). Both run on the
//! engine thread, between steps. An unloaded adapter's name is refused at
//! once; its weights stay until the last sequence that runs with it ends,
//! so unloading fails no request.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use tandem_model::config::ModelConfig;
use tandem_model::lora::LoraAdapter;

use crate::error::{EngineError, Result};
use crate::executor::{AdapterInfo, Executor};
use crate::guided::Grammars;
use crate::kv::{BlockWriter, KvLayout, KvStaging, SeqKv};
use crate::sampler::{Sampled, SamplingParams};
use crate::scheduler::{
    Event, EventSink, KvExport, Request, Scheduler, SchedulerConfig, SchedulerStats, MAX_CHOICES,
};

/// How to size and run the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes of KV cache.
    pub kv_cache_bytes: usize,
    /// Longest a [`Engine::reserve`] waits for blocks the pool cannot spare
    /// yet (they come back as running sequences finish) before it fails
    /// with `OutOfBlocks`.
    pub reserve_wait: Duration,
    /// The model's vocabulary as grammars see it: guided decoding
    /// ([`SamplingParams::response_format`]) needs it; without it, such
    /// requests are refused.
    pub grammars: Option<Arc<Grammars>>,
    /// What [`Engine::load_adapter`] accepts.
    pub adapter_limits: AdapterLimits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            block_size: 16,
            kv_cache_bytes: 1 << 30,
            reserve_wait: Duration::from_secs(60),
            grammars: None,
            adapter_limits: AdapterLimits::default(),
        }
    }
}

/// How many LoRA adapters an engine holds at most, and of what rank: a
/// load past either is refused with the limit's name, so loading
/// adapters while serving cannot exhaust the worker's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterLimits {
    /// Adapters held at once (those unloaded but still finishing count).
    pub max_adapters: usize,
    /// Largest rank `r` of an adapter's update matrices.
    pub max_rank: usize,
}

impl Default for AdapterLimits {
    fn default() -> Self {
        Self {
            max_adapters: 32,
            max_rank: 256,
        }
    }
}

impl AdapterLimits {
    /// No limit (the plain path and the benchmarks: one adapter, given on
    /// the command line).
    pub const NONE: Self = Self {
        max_adapters: usize::MAX,
        max_rank: usize::MAX,
    };

    /// Refuses `lora` (to be called `name`) beside `held` adapters.
    pub fn check(&self, held: usize, name: &str, lora: &LoraAdapter) -> Result<()> {
        if lora.rank > self.max_rank {
            return Err(EngineError::Adapter(format!(
                "LoRA adapter {name:?} has rank {}, above this worker's --max-lora-rank {}",
                lora.rank, self.max_rank
            )));
        }
        if held >= self.max_adapters {
            return Err(EngineError::Adapter(format!(
                "this worker holds {held} LoRA adapters, its --max-lora-adapters; unload one before loading {name:?}"
            )));
        }
        Ok(())
    }
}

/// A request before the engine assigns it an id.
#[derive(Debug, Clone, Default)]
pub struct RequestSpec {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop_tokens: Vec<u32>,
    pub priority: i32,
    /// Tokens already generated elsewhere (see `Request::generated`).
    pub generated: Vec<u32>,
    /// Choices (parallel samples of the prompt); 0 means 1. Choice `i`
    /// samples with key `params.request_key + i`, exactly as a separate
    /// request with that key would.
    pub n: usize,
    /// The LoRA adapter: 0 for the base model, else the model's adapter of
    /// that number (see [`Engine::adapter_id`]).
    pub adapter: u32,
}

impl RequestSpec {
    /// The number of choices (`n`, where 0 means 1).
    pub fn choices(&self) -> usize {
        self.n.max(1)
    }
}

/// One event stream per choice, and the handle's streams.
fn choice_channels(
    n: usize,
) -> (
    Vec<UnboundedSender<Event>>,
    UnboundedReceiver<Event>,
    Vec<UnboundedReceiver<Event>>,
) {
    let (txs, mut rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded_channel()).unzip();
    let first = rxs.remove(0);
    (txs, first, rxs)
}

fn sinks(txs: &[UnboundedSender<Event>]) -> Vec<Box<dyn EventSink>> {
    txs.iter()
        .map(|t| Box::new(t.clone()) as Box<dyn EventSink>)
        .collect()
}

/// Tells every choice why its request was refused.
fn refuse(txs: &[UnboundedSender<Event>], e: &EngineError) {
    for t in txs {
        let _ = t.send(Event::Error(e.to_string()));
    }
}

enum Command {
    Submit(Request, Vec<UnboundedSender<Event>>),
    SubmitExport(Request, Vec<UnboundedSender<Event>>, Box<dyn KvExport>),
    /// Reserve blocks for `tokens` prompt tokens under reservation `id`;
    /// the reply carries a writer for them when the KV may be received in
    /// place ([`Executor::receives_in_pool`]).
    Reserve {
        id: u64,
        tokens: usize,
        reply: ReserveReply,
    },
    /// Give a reservation's blocks back (unknown ids are ignored).
    Release(u64),
    Install {
        reservation: u64,
        /// `None`: the KV was written in place.
        staging: Option<KvStaging>,
        req: Request,
        firsts: Vec<Sampled>,
        sinks: Vec<UnboundedSender<Event>>,
        reply: tokio::sync::oneshot::Sender<Result<()>>,
    },
    Cancel(u64),
    CancelChoice(u64, usize),
    CachedPrefix(u32, Vec<u32>, mpsc::Sender<usize>),
    AddAdapter(String, Box<LoraAdapter>, mpsc::Sender<Result<AdapterInfo>>),
    RemoveAdapter(String, mpsc::Sender<Result<()>>),
    Shutdown,
}

type ReserveReply = tokio::sync::oneshot::Sender<Result<Option<BlockWriter>>>;

/// Reservations the pool could not serve when they came, in arrival order.
/// A decode worker under load would otherwise fail every transfer that
/// arrives while its batch holds the pool; instead the transfer waits
/// (bounded in time, and in number by the worker's queue limit, as the
/// scheduler counts these as waiting) until finished sequences give blocks
/// back. Served strictly in order, so a long prompt is not starved by
/// shorter ones behind it.
struct ReservationQueue {
    waiting: VecDeque<WaitingReservation>,
    /// Longest a reservation waits before it is refused (`OutOfBlocks`).
    patience: Duration,
}

struct WaitingReservation {
    id: u64,
    tokens: usize,
    reply: ReserveReply,
    since: Instant,
}

impl ReservationQueue {
    fn new(patience: Duration) -> Self {
        Self {
            waiting: VecDeque::new(),
            patience,
        }
    }

    fn push(&mut self, id: u64, tokens: usize, reply: ReserveReply) {
        self.waiting.push_back(WaitingReservation {
            id,
            tokens,
            reply,
            since: Instant::now(),
        });
    }

    /// Drops a waiting reservation whose caller went away.
    fn forget(&mut self, id: u64) {
        self.waiting.retain(|w| w.id != id);
    }

    /// When the oldest waiting reservation runs out of patience.
    fn deadline(&self) -> Option<Instant> {
        self.waiting.front().map(|w| w.since + self.patience)
    }

    /// Grants what the pool can spare now, oldest first, refuses what has
    /// waited too long, and tells the scheduler how many still wait.
    /// `grant` records the granted blocks and returns the reply's writer.
    fn serve(
        &mut self,
        sched: &mut Scheduler,
        mut grant: impl FnMut(&mut Scheduler, u64, SeqKv) -> Option<BlockWriter>,
    ) {
        while let Some(w) = self.waiting.front() {
            if w.reply.is_closed() {
                // Its caller is gone; the Release it sent is still queued.
                self.waiting.pop_front();
                continue;
            }
            let outcome = match sched.reserve_for_transfer(w.tokens) {
                Ok(Some(kv)) => Ok(grant(sched, w.id, kv)),
                Ok(None) if w.since.elapsed() < self.patience => break,
                Ok(None) => Err(EngineError::OutOfBlocks {
                    needed: sched.pool().layout().blocks_for(w.tokens),
                    free: sched.pool().free_blocks(),
                }),
                Err(e) => Err(e),
            };
            let w = self.waiting.pop_front().expect("front exists");
            // A caller that went away meanwhile sends Release after this.
            let _ = w.reply.send(outcome);
        }
        sched.set_transfers_waiting(self.waiting.len());
    }
}

/// A submitted request: its id (for `cancel`) and its event streams.
/// Dropping a choice's stream cancels that choice (at its next event).
#[derive(Debug)]
pub struct RequestHandle {
    pub id: u64,
    /// Choice 0's events (the only choice unless the request asked for more).
    pub events: UnboundedReceiver<Event>,
    /// Events of choices 1..n, in order (empty for one choice).
    pub more: Vec<UnboundedReceiver<Event>>,
}

/// Where a reservation's KV is written before [`Engine::install`].
enum Landing {
    /// The reserved blocks themselves: nothing is copied at install, and no
    /// memory beyond the pool is needed while the KV arrives.
    InPlace(BlockWriter),
    /// A buffer the executor installs from (device memory, shards of a
    /// sharded worker).
    Staged(KvStaging),
}

/// Blocks reserved for a prompt whose KV will arrive from elsewhere, and
/// where to write that KV: its (layer, block) regions
/// ([`Reservation::region_mut`]), in [`Engine::kv_layout`].
/// Dropping it without [`Engine::install`] gives the blocks back.
pub struct Reservation {
    id: u64,
    tokens: usize,
    layout: KvLayout,
    /// `None` only once handed to `install`.
    landing: Option<Landing>,
    /// `None` once handed to `install` (the engine thread owns the blocks).
    tx: Option<mpsc::Sender<Command>>,
}

impl Reservation {
    /// Prompt tokens the reserved blocks hold.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The layout to write in (the engine's [`Engine::kv_layout`]).
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    /// Blocks per layer.
    pub fn n_blocks(&self) -> usize {
        self.layout.blocks_for(self.tokens)
    }
    /// Whether writes go straight into the reserved blocks (else into a
    /// staging buffer the engine installs from).
    pub fn in_place(&self) -> bool {
        matches!(self.landing, Some(Landing::InPlace(_)))
    }
    /// The (layer, `block`-th block of the prompt) region to write, or
    /// `None` when out of range.
    pub fn region_mut(&mut self, layer: usize, block: usize) -> Option<&mut [f32]> {
        // Both landings hold exactly this reservation's layers and blocks.
        match self.landing.as_mut()? {
            Landing::InPlace(w) => w.region_mut(layer, block),
            Landing::Staged(s) => s.get_region_mut(layer, block),
        }
    }
    /// Writes all of `staging` (KV gathered elsewhere, in this layout and
    /// for this many tokens).
    pub fn fill_from(&mut self, staging: &KvStaging) -> Result<()> {
        if *staging.layout() != self.layout || staging.tokens() != self.tokens {
            return Err(EngineError::Unsupported(format!(
                "staged KV of {} tokens in {:?} for a reservation of {} tokens in {:?}",
                staging.tokens(),
                staging.layout(),
                self.tokens,
                self.layout
            )));
        }
        for layer in 0..self.layout.n_layers {
            for block in 0..self.n_blocks() {
                let dst = self.region_mut(layer, block).ok_or_else(installed)?;
                dst.copy_from_slice(staging.region(layer, block));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("id", &self.id)
            .field("tokens", &self.tokens)
            .field("in_place", &self.in_place())
            .finish()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // The writer goes first: the engine may reuse the blocks as soon
        // as it reads the release.
        self.landing = None;
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Command::Release(self.id));
        }
    }
}

pub struct Engine {
    tx: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    next_id: AtomicU64,
    context_length: usize,
    vocab_size: usize,
    /// For guided decoding, if it can be served.
    grammars: Option<Arc<Grammars>>,
    pool_tokens: usize,
    layout: KvLayout,
    total_blocks: usize,
    stats: Arc<Mutex<SchedulerStats>>,
    /// The LoRA adapters requests may name; the engine thread writes it
    /// as adapters are loaded and unloaded.
    adapters: Arc<RwLock<AdapterTable>>,
    /// What an adapter loaded at run time is checked against.
    model_config: ModelConfig,
    /// For counters the executor keeps itself ([`Engine::expert_tokens`]).
    executor: Arc<dyn Executor>,
}

/// The adapters requests may name, and how many changes made it so.
#[derive(Debug, Default)]
struct AdapterTable {
    /// Counts loads and unloads: of two listings, the higher is newer.
    version: u64,
    list: Vec<AdapterInfo>,
}

/// Adapters unloaded while sequences still ran with them: their weights
/// are freed once none does.
#[derive(Default)]
struct RetiringAdapters(Vec<AdapterInfo>);

impl RetiringAdapters {
    /// Frees the weights of every retiring adapter no sequence uses.
    fn free_unused(&mut self, model: &dyn Executor, sched: &Scheduler) {
        self.0.retain(|a| {
            if sched.uses_adapter(a.id) {
                return true;
            }
            if let Err(e) = model.remove_adapter(a.id) {
                tracing::warn!(adapter = %a.name, error = %e, "freeing an unloaded LoRA adapter failed");
            } else {
                tracing::info!(adapter = %a.name, "unloaded LoRA adapter freed");
            }
            false
        });
    }
}

/// The adapters the executor holds, as the engine thread keeps them:
/// those requests may name, and those unloaded but still finishing.
fn held<'a>(
    table: &'a AdapterTable,
    retiring: &'a RetiringAdapters,
) -> impl Iterator<Item = &'a AdapterInfo> {
    table.list.iter().chain(&retiring.0)
}

/// Refuses a request whose adapter the executor no longer holds (it was
/// unloaded between the request's check and its arrival here).
fn check_adapter(
    table: &RwLock<AdapterTable>,
    retiring: &RetiringAdapters,
    req: &Request,
) -> Result<()> {
    let table = table.read().unwrap_or_else(PoisonError::into_inner);
    if req.adapter == 0 || held(&table, retiring).any(|a| a.id == req.adapter) {
        Ok(())
    } else {
        Err(EngineError::Adapter(format!(
            "LoRA adapter {} was unloaded",
            req.adapter
        )))
    }
}

/// Engine-thread side of [`Engine::load_adapter`].
fn add_adapter(
    model: &dyn Executor,
    table: &RwLock<AdapterTable>,
    retiring: &RetiringAdapters,
    limits: AdapterLimits,
    name: &str,
    lora: LoraAdapter,
) -> Result<AdapterInfo> {
    if let Some(a) = retiring.0.iter().find(|a| a.name == name) {
        return Err(EngineError::Adapter(format!(
            "LoRA adapter {:?} was unloaded and still runs requests from before; load it again once they finish",
            a.name
        )));
    }
    let count = held(
        &table.read().unwrap_or_else(PoisonError::into_inner),
        retiring,
    )
    .count();
    limits.check(count, name, &lora)?;
    let fingerprint = lora.fingerprint.clone();
    let id = model.add_adapter(name, lora)?;
    let info = AdapterInfo {
        id,
        name: name.to_string(),
        fingerprint,
    };
    let mut t = table.write().unwrap_or_else(PoisonError::into_inner);
    t.list.push(info.clone());
    t.version += 1;
    Ok(info)
}

fn shut_down() -> EngineError {
    EngineError::Sampling("engine has shut down".into())
}

/// A reservation without its landing: it was handed to `install` already.
fn installed() -> EngineError {
    EngineError::Unsupported("the reservation was installed already".into())
}

/// Engine-thread side of `Engine::install`: copies the staged KV (if the
/// KV was not written in place) into the reserved blocks and joins the
/// request. Frees the blocks on any error.
fn install(
    model: &dyn Executor,
    sched: &mut Scheduler,
    mut kv: SeqKv,
    staging: Option<&KvStaging>,
    req: Request,
    firsts: Vec<Sampled>,
    sinks: Vec<Box<dyn EventSink>>,
) -> Result<()> {
    let layout = model.wire_layout(sched.pool().layout().block_size);
    let tokens = req.prompt.len();
    let problem = if let Some(staging) = staging.filter(|s| *s.layout() != layout) {
        Some(format!(
            "staged KV layout {:?} differs from the engine's {:?}",
            staging.layout(),
            layout
        ))
    } else if layout.blocks_for(tokens) != kv.blocks.len()
        || staging.is_some_and(|s| s.tokens() != tokens)
    {
        Some(format!(
            "the reservation holds {} blocks, the staged KV {:?} tokens and the prompt {tokens} tokens",
            kv.blocks.len(),
            staging.map(KvStaging::tokens),
        ))
    } else {
        None
    };
    if let Some(msg) = problem {
        sched.release(kv);
        return Err(EngineError::Unsupported(msg));
    }
    if let Some(staging) = staging {
        if let Err(e) = model.install(sched.pool_mut(), &kv, staging) {
            sched.release(kv);
            return Err(e);
        }
    }
    kv.len = tokens;
    sched.add_prefilled_parallel(req, kv, firsts, sinks)
}

impl Engine {
    /// Sizes the KV pool and starts the engine thread.
    pub fn start(model: Arc<dyn Executor>, cfg: EngineConfig) -> Self {
        let block_bytes = model.kv_block_bytes(cfg.block_size).max(1);
        let pool = model.new_pool(cfg.block_size, (cfg.kv_cache_bytes / block_bytes).max(1));
        let layout = model.wire_layout(cfg.block_size);
        // Received KV goes straight into the reserved blocks where the pool
        // holds it all, as the model reads it.
        let in_place = model.receives_in_pool() && pool.holds_kv() && *pool.layout() == layout;
        let pool_tokens = pool.n_blocks() * cfg.block_size;
        let context_length = model.config().context_length;
        let vocab_size = model.config().vocab_size;
        let total_blocks = pool.n_blocks();
        let adapters = Arc::new(RwLock::new(AdapterTable {
            version: 0,
            list: model.adapters(),
        }));
        let table = adapters.clone();
        let model_config = model.config().clone();
        let executor = model.clone();
        let adapter_limits = cfg.adapter_limits;
        let reserve_wait = cfg.reserve_wait;
        let max_batch = cfg.scheduler.max_running;
        let grammars = cfg.grammars;
        let mut sched = Scheduler::new(cfg.scheduler, pool, context_length);
        // Before the first request, so that it does not pay for it; a
        // failure only loses the head start.
        if let Err(e) = model.warm_up(sched.pool_mut(), max_batch) {
            tracing::warn!(error = %e, "warming the executor up failed; serving without it");
        }
        let stats = Arc::new(Mutex::new(sched.stats()));
        let (tx, rx) = mpsc::channel::<Command>();
        let stats_w = stats.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || {
                // Blocks reserved for transfers, by reservation id.
                let mut reserved: HashMap<u64, SeqKv> = HashMap::new();
                // Reservations waiting for blocks, oldest first.
                let mut queue = ReservationQueue::new(reserve_wait);
                // Whether the last step did anything: when it did not (all
                // waiting work is blocked on memory that only a command can
                // free), the thread sleeps on the channel instead of spinning.
                let mut progressed = true;
                let mut retiring = RetiringAdapters::default();
                'outer: loop {
                    // Block for a command when idle (until the oldest waiting
                    // reservation's deadline, if any); otherwise take what is
                    // queued.
                    let mut first = if sched.has_work() && progressed {
                        None
                    } else {
                        // No deadline: wait for ever (`recv_timeout` takes
                        // a wait too long to add to now as no limit).
                        let wait = queue.deadline().map_or(Duration::MAX, |at| {
                            at.saturating_duration_since(Instant::now())
                        });
                        match rx.recv_timeout(wait) {
                            Ok(c) => Some(c),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    };
                    loop {
                        let cmd = match first.take() {
                            Some(c) => c,
                            None => match rx.try_recv() {
                                Ok(c) => c,
                                Err(mpsc::TryRecvError::Empty) => break,
                                Err(mpsc::TryRecvError::Disconnected) => break 'outer,
                            },
                        };
                        match cmd {
                            Command::Submit(req, txs) => {
                                if let Err(e) = check_adapter(&table, &retiring, &req)
                                    .and_then(|()| sched.add_parallel(req, sinks(&txs), None))
                                {
                                    refuse(&txs, &e);
                                }
                            }
                            Command::SubmitExport(req, txs, export) => {
                                if let Err(e) = check_adapter(&table, &retiring, &req).and_then(|()| {
                                    sched.add_parallel(req, sinks(&txs), Some(export))
                                }) {
                                    refuse(&txs, &e);
                                }
                            }
                            Command::Reserve { id, tokens, reply } => {
                                queue.push(id, tokens, reply);
                            }
                            Command::Release(id) => {
                                if let Some(kv) = reserved.remove(&id) {
                                    sched.release(kv);
                                }
                                // Or it was still waiting (its caller gave up).
                                queue.forget(id);
                            }
                            Command::Install {
                                reservation,
                                staging,
                                req,
                                firsts,
                                sinks: txs,
                                reply,
                            } => {
                                let r = match reserved.remove(&reservation) {
                                    Some(kv) => match check_adapter(&table, &retiring, &req) {
                                        Ok(()) => install(model.as_ref(), &mut sched, kv, staging.as_ref(), req, firsts, sinks(&txs)),
                                        Err(e) => {
                                            sched.release(kv);
                                            Err(e)
                                        }
                                    },
                                    None => Err(EngineError::Unsupported(format!(
                                        "no reservation {reservation}"
                                    ))),
                                };
                                let _ = reply.send(r);
                            }
                            Command::Cancel(id) => {
                                sched.cancel(id);
                            }
                            Command::CancelChoice(id, choice) => {
                                sched.cancel_choice(id, choice);
                            }
                            Command::CachedPrefix(adapter, tokens, reply) => {
                                let _ = reply.send(sched.cached_prefix_len(adapter, &tokens));
                            }
                            Command::AddAdapter(name, lora, reply) => {
                                let _ = reply.send(add_adapter(model.as_ref(), &table, &retiring, adapter_limits, &name, *lora));
                            }
                            Command::RemoveAdapter(name, reply) => {
                                let mut t = table.write().unwrap_or_else(PoisonError::into_inner);
                                let r = match t.list.iter().position(|a| a.name == name) {
                                    Some(i) => {
                                        retiring.0.push(t.list.remove(i));
                                        t.version += 1;
                                        Ok(())
                                    }
                                    None => Err(EngineError::Adapter(format!(
                                        "LoRA adapter {name:?} is not loaded"
                                    ))),
                                };
                                drop(t);
                                // Freed now if nothing runs with it, so that
                                // a load right after the reply has its room.
                                retiring.free_unused(model.as_ref(), &sched);
                                let _ = reply.send(r);
                            }
                            Command::Shutdown => break 'outer,
                        }
                    }
                    // Reservations first: while one waits, the batch admits
                    // nothing new (see `Scheduler::set_transfers_waiting`).
                    queue.serve(&mut sched, |sched, id, kv| {
                        // SAFETY: fresh blocks (refcount 1) of no sequence;
                        // they stay in `reserved`, which only Release and
                        // Install take them from, and the `Reservation`
                        // drops the writer before it sends either.
                        let writer = in_place.then(|| unsafe { sched.pool().transfer_writer(&kv) });
                        reserved.insert(id, kv);
                        writer
                    });
                    progressed = true;
                    if sched.has_work() {
                        match sched.step(model.as_ref()) {
                            Ok(did) => progressed = did,
                            Err(e) => {
                                tracing::error!(error = %e, "engine step failed; failing running requests");
                                sched.fail_all(&e.to_string());
                            }
                        }
                    }
                    // After cancels as well as steps: either can end the
                    // last sequence of an unloaded adapter.
                    if !retiring.0.is_empty() {
                        retiring.free_unused(model.as_ref(), &sched);
                    }
                    if let Ok(mut s) = stats_w.lock() {
                        *s = sched.stats();
                    }
                }
                // Writers of these blocks may still be alive; no harm, as
                // nothing reads or reuses the pool from here on (writers
                // keep its memory).
                for (_, kv) in reserved.drain() {
                    sched.release(kv);
                }
                // Waiting reservations are answered by dropping their reply:
                // the caller sees the engine shut down.
                drop(queue);
                sched.fail_all("engine shut down");
            })
            .expect("spawning the engine thread");
        Self {
            tx,
            thread: Some(thread),
            next_id: AtomicU64::new(1),
            context_length,
            vocab_size,
            grammars,
            pool_tokens,
            layout,
            total_blocks,
            stats,
            adapters,
            model_config,
            executor,
        }
    }

    /// A validated request with a fresh id.
    fn request(&self, spec: RequestSpec) -> Result<Request> {
        let n = spec.choices();
        if n > MAX_CHOICES {
            return Err(EngineError::Unsupported(format!(
                "a request may ask for 1 to {MAX_CHOICES} choices, got {n}"
            )));
        }
        if n > 1 && !spec.generated.is_empty() {
            return Err(EngineError::Unsupported(
                "a resumed request has one choice".into(),
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut req = Request {
            id,
            prompt: spec.prompt,
            params: spec.params,
            max_tokens: spec.max_tokens,
            stop_tokens: spec.stop_tokens,
            priority: spec.priority,
            generated: spec.generated,
            guide: None,
            adapter: spec.adapter,
        };
        if spec.adapter != 0
            && !self
                .adapter_table()
                .list
                .iter()
                .any(|a| a.id == spec.adapter)
        {
            return Err(EngineError::Unsupported(format!(
                "LoRA adapter {} is not loaded",
                spec.adapter
            )));
        }
        req.guide = Grammars::guide_for(
            self.grammars.as_deref(),
            &req.params.response_format,
            &req.generated,
        )?;
        Scheduler::validate(&req, self.context_length, self.pool_tokens)?;
        req.params.validate_vocab(self.vocab_size)?;
        Ok(req)
    }

    /// Validates and queues a request (`spec.n` choices).
    pub fn submit(&self, spec: RequestSpec) -> Result<RequestHandle> {
        let (txs, events, more) = choice_channels(spec.choices());
        let req = self.request(spec)?;
        let id = req.id;
        if self.tx.send(Command::Submit(req, txs)).is_err() {
            return Err(shut_down());
        }
        Ok(RequestHandle { id, events, more })
    }

    /// [`Engine::submit`], streaming the prompt's KV to `export` layer by
    /// layer as it is computed (see [`KvExport`]); `export` is dropped after
    /// the request's last event.
    pub fn submit_with_export(
        &self,
        spec: RequestSpec,
        export: Box<dyn KvExport>,
    ) -> Result<RequestHandle> {
        let (txs, events, more) = choice_channels(spec.choices());
        let req = self.request(spec)?;
        let id = req.id;
        if self
            .tx
            .send(Command::SubmitExport(req, txs, export))
            .is_err()
        {
            return Err(shut_down());
        }
        Ok(RequestHandle { id, events, more })
    }

    /// Reserves blocks for `tokens` prompt tokens whose KV will arrive from
    /// elsewhere, evicting cached prefixes if needed. When the pool cannot
    /// spare them now, the reservation waits in line (counted as waiting in
    /// [`Engine::stats`]) until finished sequences give blocks back, and
    /// fails with `OutOfBlocks` after `EngineConfig::reserve_wait`. The
    /// engine thread answers between steps; this awaits without blocking
    /// the runtime, and dropping the future gives up the place in line.
    pub async fn reserve(&self, tokens: usize) -> Result<Reservation> {
        if tokens == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if tokens > self.max_sequence_tokens() {
            return Err(EngineError::TooLargeForPool {
                tokens,
                capacity: self.pool_tokens,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Armed before asking: if this future is dropped midway, the
        // reservation is released all the same. Declared before `answer`,
        // so dropped after it: a writer still in the channel is gone before
        // the release is sent.
        let mut reservation = Reservation {
            id,
            tokens,
            layout: self.layout,
            landing: None,
            tx: Some(self.tx.clone()),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self
            .tx
            .send(Command::Reserve { id, tokens, reply })
            .is_err()
        {
            reservation.tx = None;
            return Err(shut_down());
        }
        match answer.await {
            Ok(Ok(writer)) => {
                reservation.landing = Some(match writer {
                    Some(w) => Landing::InPlace(w),
                    // Allocated here, not on the engine thread.
                    None => Landing::Staged(KvStaging::new(self.layout, tokens)),
                });
                Ok(reservation)
            }
            Ok(Err(e)) => {
                reservation.tx = None;
                Err(e)
            }
            Err(_) => Err(shut_down()),
        }
    }

    /// Joins the request into the running batch as if it had been
    /// prefilled here (`Scheduler::add_prefilled_parallel`), its prompt's
    /// KV having been written through `reservation` (copied in from the
    /// staging buffer, where it was not written in place); `firsts` are the
    /// tokens the prefill worker sampled, one per choice (`spec.n` of
    /// them), each the first event of its choice's stream. A request that
    /// scores its prompt (`spec.params.prompt_logprobs`) brings the scores
    /// the prefill worker computed, one per prompt token after the first:
    /// every choice's stream opens with them.
    /// `spec.prompt.len()` must equal `reservation.tokens()`; otherwise, or
    /// if the request is invalid, an error is returned and the blocks are
    /// freed.
    pub async fn install(
        &self,
        mut reservation: Reservation,
        spec: RequestSpec,
        firsts: Vec<Sampled>,
        prompt_logprobs: Option<Vec<Sampled>>,
    ) -> Result<RequestHandle> {
        let tokens = reservation.tokens;
        let scored = prompt_logprobs.as_ref().map(Vec::len);
        let wanted = spec
            .params
            .prompt_logprobs
            .map(|_| tokens.saturating_sub(1));
        if scored != wanted {
            return Err(EngineError::Unsupported(format!(
                "install: {} prompt log-probabilities for a prompt of {tokens} tokens that {}",
                scored.map_or("no".to_string(), |n| n.to_string()),
                if wanted.is_some() {
                    "asks for them"
                } else {
                    "does not ask for them"
                }
            )));
        }
        if firsts.len() != spec.choices() {
            return Err(EngineError::Unsupported(format!(
                "install: {} first tokens for {} choices",
                firsts.len(),
                spec.choices()
            )));
        }
        if spec.prompt.len() != tokens {
            return Err(EngineError::Unsupported(format!(
                "install: reservation for {tokens} tokens, prompt of {}",
                spec.prompt.len()
            )));
        }
        // Errors above drop `reservation`, which releases the blocks.
        let (txs, events, more) = choice_channels(spec.choices());
        let req = self.request(spec)?;
        if let Some(lp) = prompt_logprobs {
            // Ahead of anything the engine thread sends on these streams.
            for t in &txs {
                let _ = t.send(Event::PromptLogprobs(lp.clone()));
            }
        }
        let id = req.id;
        let (reply, answer) = tokio::sync::oneshot::channel();
        // The writer is dropped here, before the engine thread is told.
        let staging = match reservation.landing.take() {
            Some(Landing::Staged(s)) => Some(s),
            Some(Landing::InPlace(_)) => None,
            None => return Err(installed()),
        };
        let tx = reservation.tx.take().ok_or_else(shut_down)?;
        let cmd = Command::Install {
            reservation: reservation.id,
            staging,
            req,
            firsts,
            sinks: txs,
            reply,
        };
        if tx.send(cmd).is_err() {
            return Err(shut_down());
        }
        match answer.await {
            Ok(Ok(())) => Ok(RequestHandle { id, events, more }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(shut_down()),
        }
    }

    /// The layout KV travels in to and from this engine (to size a
    /// [`KvStaging`]): the whole model's, also on a sharded worker.
    pub fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    /// Blocks in the KV pool.
    pub fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    /// Cancels a request (all its choices); its KV blocks are freed on the
    /// engine thread.
    pub fn cancel(&self, id: u64) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    /// Cancels one choice of a request; the others carry on.
    pub fn cancel_choice(&self, id: u64, choice: usize) {
        let _ = self.tx.send(Command::CancelChoice(id, choice));
    }

    /// Leading tokens of `tokens` the prefix cache holds as computed with
    /// LoRA adapter `adapter` (0: the base model).
    pub fn cached_prefix_len(&self, adapter: u32, tokens: Vec<u32>) -> usize {
        let (rtx, rrx) = mpsc::channel();
        if self
            .tx
            .send(Command::CachedPrefix(adapter, tokens, rtx))
            .is_err()
        {
            return 0;
        }
        rrx.recv().unwrap_or(0)
    }

    /// Counters as of the last step.
    pub fn stats(&self) -> SchedulerStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    fn adapter_table(&self) -> std::sync::RwLockReadGuard<'_, AdapterTable> {
        self.adapters.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// `(name, fingerprint)` of the LoRA adapters requests may name, in
    /// the order they were loaded.
    pub fn adapters(&self) -> Vec<(String, String)> {
        self.adapters_versioned().1
    }

    /// [`Engine::adapters`] with the number of loads and unloads that made
    /// the list (read together): of two listings, the higher is newer.
    pub fn adapters_versioned(&self) -> (u64, Vec<(String, String)>) {
        let t = self.adapter_table();
        let list = t
            .list
            .iter()
            .map(|a| (a.name.clone(), a.fingerprint.clone()))
            .collect();
        (t.version, list)
    }

    /// The number of the adapter called `name` (see [`RequestSpec::adapter`]).
    pub fn adapter_id(&self, name: &str) -> Option<u32> {
        self.adapter_table()
            .list
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.id)
    }

    /// Loads the PEFT adapter in `dir` (checked against the model's shapes)
    /// and serves it under `name` from the next step on. Blocks while the
    /// files are read and until the engine thread has taken the adapter.
    pub fn load_adapter(&self, name: &str, dir: &Path) -> Result<AdapterInfo> {
        if name.is_empty() {
            return Err(EngineError::Adapter("a LoRA adapter needs a name".into()));
        }
        if self.adapter_id(name).is_some() {
            return Err(EngineError::Adapter(format!(
                "a LoRA adapter called {name:?} is loaded already"
            )));
        }
        let lora = tandem_model::lora::load(dir, &self.model_config)?;
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .send(Command::AddAdapter(name.to_string(), Box::new(lora), rtx))
            .map_err(|_| shut_down())?;
        rrx.recv().map_err(|_| shut_down())?
    }

    /// Stops serving the adapter called `name`: requests that name it are
    /// refused from now on, those running with it finish, and its weights
    /// are freed after them.
    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .send(Command::RemoveAdapter(name.to_string(), rtx))
            .map_err(|_| shut_down())?;
        rrx.recv().map_err(|_| shut_down())?
    }

    /// Tokens routed to each expert of a mixture-of-experts model since it
    /// loaded (see [`Executor::expert_tokens`]); empty for a dense model.
    pub fn expert_tokens(&self) -> Vec<u64> {
        self.executor.expert_tokens()
    }

    /// Tokens one sequence may hold (context or pool, whichever is smaller).
    pub fn max_sequence_tokens(&self) -> usize {
        self.context_length.min(self.pool_tokens)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
