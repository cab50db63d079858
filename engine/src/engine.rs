//! The engine as a service: the scheduler on a dedicated thread, driven
//! through channels (mistral.rs-style engine thread, TGI-style per-request
//! streams).
//!
//! `submit` validates a request on the caller's thread (so a request that
//! can never run is refused at once, with the reason), then hands it to the
//! engine thread, which runs iteration-level scheduling until the queue is
//! empty and then sleeps on its command channel. Each request gets its own
//! stream of [`Event`]s; dropping the stream cancels the request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::Result;
use crate::executor::Executor;
use crate::kv::KvPool;
use crate::sampler::SamplingParams;
use crate::scheduler::{Event, Request, Scheduler, SchedulerConfig, SchedulerStats};

/// How to size and run the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes of KV cache.
    pub kv_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            block_size: 16,
            kv_cache_bytes: 1 << 30,
        }
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
}

enum Command {
    Submit(Request, UnboundedSender<Event>),
    Cancel(u64),
    CachedPrefix(Vec<u32>, mpsc::Sender<usize>),
    Shutdown,
}

/// A submitted request: its id (for `cancel`) and its event stream.
pub struct RequestHandle {
    pub id: u64,
    pub events: UnboundedReceiver<Event>,
}

pub struct Engine {
    tx: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    next_id: AtomicU64,
    context_length: usize,
    pool_tokens: usize,
    stats: Arc<Mutex<SchedulerStats>>,
}

impl Engine {
    /// Sizes the KV pool and starts the engine thread.
    pub fn start(model: Arc<dyn Executor>, cfg: EngineConfig) -> Self {
        let layout = model.kv_layout(cfg.block_size);
        let pool = KvPool::with_budget(layout, cfg.kv_cache_bytes);
        let pool_tokens = pool.n_blocks() * cfg.block_size;
        let context_length = model.config().context_length;
        let mut sched = Scheduler::new(cfg.scheduler, pool, context_length);
        let stats = Arc::new(Mutex::new(sched.stats()));
        let (tx, rx) = mpsc::channel::<Command>();
        let stats_w = stats.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || {
                'outer: loop {
                    // Block for a command when idle; otherwise take what is queued.
                    let mut first = if sched.has_work() {
                        None
                    } else {
                        match rx.recv() {
                            Ok(c) => Some(c),
                            Err(_) => break,
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
                            Command::Submit(req, sink) => {
                                if let Err(e) = sched.add(req, Box::new(sink.clone())) {
                                    let _ = sink.send(Event::Error(e.to_string()));
                                }
                            }
                            Command::Cancel(id) => {
                                sched.cancel(id);
                            }
                            Command::CachedPrefix(tokens, reply) => {
                                let _ = reply.send(sched.cached_prefix_len(&tokens));
                            }
                            Command::Shutdown => break 'outer,
                        }
                    }
                    if sched.has_work() {
                        if let Err(e) = sched.step(model.as_ref()) {
                            tracing::error!(error = %e, "engine step failed; failing running requests");
                            sched.fail_all(&e.to_string());
                        }
                    }
                    if let Ok(mut s) = stats_w.lock() {
                        *s = sched.stats();
                    }
                }
                sched.fail_all("engine shut down");
            })
            .expect("spawning the engine thread");
        Self {
            tx,
            thread: Some(thread),
            next_id: AtomicU64::new(1),
            context_length,
            pool_tokens,
            stats,
        }
    }

    /// Validates and queues a request.
    pub fn submit(&self, spec: RequestSpec) -> Result<RequestHandle> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = Request {
            id,
            prompt: spec.prompt,
            params: spec.params,
            max_tokens: spec.max_tokens,
            stop_tokens: spec.stop_tokens,
            priority: spec.priority,
        };
        Scheduler::validate(&req, self.context_length, self.pool_tokens)?;
        let (etx, erx) = unbounded_channel();
        if self.tx.send(Command::Submit(req, etx)).is_err() {
            return Err(crate::EngineError::Sampling("engine has shut down".into()));
        }
        Ok(RequestHandle { id, events: erx })
    }

    /// Cancels a request; its KV blocks are freed on the engine thread.
    pub fn cancel(&self, id: u64) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    /// Leading tokens of `tokens` held by the prefix cache.
    pub fn cached_prefix_len(&self, tokens: Vec<u32>) -> usize {
        let (rtx, rrx) = mpsc::channel();
        if self.tx.send(Command::CachedPrefix(tokens, rtx)).is_err() {
            return 0;
        }
        rrx.recv().unwrap_or(0)
    }

    /// Counters as of the last step.
    pub fn stats(&self) -> SchedulerStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
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
