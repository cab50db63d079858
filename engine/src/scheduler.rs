//! Iteration-level scheduling (Orca) over the paged KV pool.
//!
//! Every step runs one forward call over all running sequences: one token
//! for each decoding sequence, then prompt chunks (chunked prefill) for the
//! ones still prefilling, within a token budget, so a long prompt never
//! stalls running decodes for more than one chunk. Requests join between
//! steps and leave as soon as they finish. When the pool runs out, the
//! prefix cache gives back unreferenced blocks first; then the most recently
//! admitted sequence (lowest priority first) is preempted: its blocks are
//! freed and it is recomputed later from its tokens so far. No request is
//! lost, and because sampling is counter-based and kernels are
//! batch-invariant, a preempted request produces the same tokens.
//!
//! Parallel sampling (`n > 1` choices of one prompt) shares the prompt's
//! KV: the request runs as one sequence until its prompt is computed, then
//! forks into `n` sequences whose block tables point at the same blocks
//! (each holder counted in the pool's refcounts). Full blocks stay shared
//! for the sequences' lifetime; the partial last block is copied on write,
//! lazily: the first choice to append into it while it is shared gets a
//! private copy (`KvPool::reserve`), and the last holder writes in place.
//! Choice `i` samples with request key `request_key + i` (wrapping), the
//! key a separate request for that choice would carry, and its first token
//! comes from the same prompt logits, so choice `i` produces exactly the
//! tokens of that separate request. After the fork each choice is an
//! ordinary sequence: it is preempted, recomputed, cancelled and finished on
//! its own.
//!
//! With speculation on ([`SchedulerConfig::speculative`]), a decoding
//! sequence may add draft tokens from prompt lookup to its step while few
//! sequences decode: the step computes them as a short chunk with every
//! row's logits, the sequence samples row by row and keeps draft tokens
//! while they are what it samples, and the KV of the rest is dropped
//! ([`KvPool::truncate`]). Output is unchanged by construction (see
//! [`crate::speculative`]).
//!
//! The scheduler is synchronous and owns its state; `engine` runs it on a
//! dedicated thread behind channels.

use std::collections::VecDeque;

use crate::error::{EngineError, Result};
use crate::executor::Executor;
use crate::generate::FinishReason;
use crate::guided::Guide;
use crate::kv::{KvPool, SeqKv};
use crate::model::{greedy_token, top_k_candidates, LayerKv, Logits, SeqStep};
use crate::prefix_cache::{PrefixCache, PrefixStats};
use crate::sampler::{argmax, sample, sample_masked, sample_top_k, score, Sampled, SamplingParams};
use crate::speculative::{self, propose_ngram, SpeculativeConfig};

/// Most choices (parallel samples) one request may ask for.
pub const MAX_CHOICES: usize = 64;

/// Most prompt positions scored ([`SamplingParams::prompt_logprobs`]) in
/// one step: each brings a whole vocabulary row of logits (~200 KB for a
/// 49k vocabulary), so a long scored prompt is computed in chunks of at
/// most this many tokens whatever the step budget.
pub const MAX_SCORED_ROWS: usize = 512;

/// Tunables of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens per forward step (decodes plus prefill chunks).
    pub max_step_tokens: usize,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Share prompt prefixes through the radix cache.
    pub prefix_cache: bool,
    /// Draft tokens by prompt lookup and verify them in the decode step
    /// (off by default; the output is the same either way).
    pub speculative: SpeculativeConfig,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_step_tokens: 512,
            max_running: 256,
            prefix_cache: true,
            speculative: SpeculativeConfig::OFF,
        }
    }
}

/// A request as the engine receives it.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// `None`: until the context (or the whole pool) is full.
    pub max_tokens: Option<usize>,
    /// Token ids that end the request (not emitted).
    pub stop_tokens: Vec<u32>,
    /// Higher runs first; ties in arrival order.
    pub priority: i32,
    /// Tokens this request already generated elsewhere (a stream resumed
    /// after its worker died): they are computed with the prompt and count
    /// as output, so sampling positions, penalties and `max_tokens` carry on
    /// exactly where the stream stopped.
    pub generated: Vec<u32>,
    /// Holds the output to `params.response_format` (guided decoding),
    /// advanced past `generated`; `None` for free text.
    pub guide: Option<Guide>,
    /// The LoRA adapter it runs with: 0 for the base model, else the
    /// executor's adapter of that number (see [`SeqKv::adapter`]).
    pub adapter: u32,
}

/// What a request's stream carries.
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt's log-probabilities, when the request asked for them
    /// ([`SamplingParams::prompt_logprobs`]): one entry per prompt token
    /// after the first (the first has no context to be scored in), sent
    /// once the prompt is computed, before the first token.
    PromptLogprobs(Vec<Sampled>),
    Token(Sampled),
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens served from the prefix cache (at the last admission).
        cached_tokens: usize,
        /// The stop token that ended it, which is not sent as a token
        /// (vLLM's `stop_reason` names one the client asked to stop at).
        stop_token: Option<u32>,
    },
    Error(String),
}

/// Where a sequence's events go. Returns `false` when nobody listens any
/// more (the request is then cancelled).
pub trait EventSink: Send {
    fn send(&mut self, e: Event) -> bool;
}

impl EventSink for std::sync::mpsc::Sender<Event> {
    fn send(&mut self, e: Event) -> bool {
        std::sync::mpsc::Sender::send(self, e).is_ok()
    }
}

impl EventSink for tokio::sync::mpsc::UnboundedSender<Event> {
    fn send(&mut self, e: Event) -> bool {
        tokio::sync::mpsc::UnboundedSender::send(self, e).is_ok()
    }
}

/// One block of one layer, as exported: `data` is the whole pool region of
/// the block (`KvPool::region`), of which the first `slots` token slots are
/// valid.
pub struct ExportBlock<'a> {
    /// Index of the block within the sequence.
    pub block: u32,
    pub slots: u32,
    pub data: &'a [f32],
}

/// Receives a sequence's prompt KV as it is computed (on the engine thread:
/// keep it quick, e.g. copy and send on a channel). Every prompt position of
/// every layer reaches it at least once: blocks served from the prefix cache
/// when the sequence is admitted, then each layer's blocks as soon as a step
/// writes them (a block partially filled by one prefill chunk is exported
/// again, with more slots, by the next). After a preemption the prompt is
/// exported again (identical data). The exporter is dropped when the
/// sequence leaves the scheduler, after its `Finished` (or `Error`) event:
/// that is the end-of-export signal.
pub trait KvExport: Send {
    /// Layer `layer`'s KV of these blocks is final up to `slots`. Return
    /// false to abandon: the request is then cancelled (blocks freed, no
    /// more events).
    fn export(&mut self, layer: usize, blocks: &[ExportBlock<'_>]) -> bool;
}

struct Seq {
    /// Unique per sequence (the choices of one request share `req.id`).
    uid: u64,
    /// Which choice of its request this sequence is (0 unless forked).
    choice: usize,
    /// Choices still to be forked from this sequence once its prompt is
    /// computed, with their index and event sink (empty for `n = 1`, and
    /// after the fork).
    fork: Vec<(usize, Box<dyn EventSink>)>,
    req: Request,
    /// Prompt followed by the tokens generated so far.
    tokens: Vec<u32>,
    n_prompt: usize,
    /// The last token generated can end the request but is not yet in the KV.
    limit: usize,
    kv: SeqKv,
    cached_tokens: usize,
    /// Order of (re)admission: the youngest is preempted first.
    admitted_at: u64,
    arrival: u64,
    sink: Box<dyn EventSink>,
    prompt_cached: bool,
    /// Where the prompt KV is exported, if anywhere (prefill worker).
    export: Option<Box<dyn KvExport>>,
    /// Tokens obtained from the prefix cache at the last admission that the
    /// exporter has not seen yet.
    export_cached: usize,
    /// The prompt's log-probabilities so far, while they are wanted and not
    /// yet sent ([`SamplingParams::prompt_logprobs`]).
    prompt_lp: Option<Vec<Sampled>>,
    /// How often its draft tokens are kept (speculative decoding).
    draft_rate: f32,
    /// The stop token it sampled, once it has (see [`Event::Finished`]).
    stop_token: Option<u32>,
}

impl Seq {
    fn pending(&self) -> usize {
        self.tokens.len() - self.kv.len
    }
    fn generated(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerStats {
    pub waiting: usize,
    pub running: usize,
    pub free_blocks: usize,
    pub total_blocks: usize,
    /// Blocks the prefix cache holds (shared with running sequences or not).
    pub cached_blocks: usize,
    pub preemptions: u64,
    pub steps: u64,
    pub prompt_tokens_computed: u64,
    pub generated_tokens: u64,
    pub prefix: PrefixStats,
    /// Draft tokens verified (speculative decoding), and how many of them
    /// the model agreed with (each one a token without a step of its own).
    pub draft_tokens: u64,
    pub accepted_draft_tokens: u64,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: KvPool,
    cache: PrefixCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    clock: u64,
    context_length: usize,
    stats: SchedulerStats,
    /// See [`Scheduler::set_transfers_waiting`].
    transfers_waiting: usize,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, pool: KvPool, context_length: usize) -> Self {
        let bs = pool.layout().block_size;
        Self {
            cfg,
            cache: PrefixCache::new(bs),
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            clock: 0,
            context_length,
            stats: SchedulerStats::default(),
            transfers_waiting: 0,
        }
    }

    /// Tokens one sequence can ever hold: the context, or the whole pool if smaller.
    pub fn max_sequence_tokens(&self) -> usize {
        self.context_length
            .min(self.pool.n_blocks() * self.pool.layout().block_size)
    }

    /// Checks a request before it is queued: what can never run is refused
    /// now, with the reason, instead of starving in the queue.
    pub fn validate(req: &Request, context_length: usize, pool_tokens: usize) -> Result<usize> {
        req.params.validate()?;
        if !req.params.response_format.is_text() && req.guide.is_none() {
            return Err(EngineError::Unsupported(
                "a guided request (response_format) came without its guide".into(),
            ));
        }
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(max) = req.max_tokens {
            if req.generated.len() >= max {
                return Err(EngineError::Unsupported(format!(
                    "{} tokens already generated of max_tokens {max}: nothing to resume",
                    req.generated.len()
                )));
            }
        }
        let cap = context_length.min(pool_tokens);
        let wanted = req.prompt.len() + req.max_tokens.unwrap_or(1);
        if wanted > context_length {
            return Err(EngineError::ContextOverflow {
                prompt: req.prompt.len(),
                requested: req.max_tokens.unwrap_or(1),
                context: context_length,
            });
        }
        if wanted > cap {
            return Err(EngineError::TooLargeForPool {
                tokens: wanted,
                capacity: pool_tokens,
            });
        }
        Ok(match req.max_tokens {
            Some(n) => req.prompt.len() + n,
            None => cap,
        })
    }

    /// Queues a request. Errors (bad parameters, cannot fit) are returned,
    /// not sent on the sink.
    pub fn add(&mut self, req: Request, sink: Box<dyn EventSink>) -> Result<()> {
        self.add_parallel(req, vec![sink], None)
    }

    /// [`Scheduler::add`], exporting the prompt's KV to `export` as it is
    /// computed (see [`KvExport`]).
    pub fn add_with_export(
        &mut self,
        req: Request,
        sink: Box<dyn EventSink>,
        export: Box<dyn KvExport>,
    ) -> Result<()> {
        self.add_parallel(req, vec![sink], Some(export))
    }

    /// Queues a request with one choice per sink (parallel sampling): the
    /// prompt is computed once and shared (see the module docs); choice `i`
    /// reports on `sinks[i]` and samples with request key
    /// `req.params.request_key + i`. One sink is [`Scheduler::add`].
    pub fn add_parallel(
        &mut self,
        req: Request,
        sinks: Vec<Box<dyn EventSink>>,
        export: Option<Box<dyn KvExport>>,
    ) -> Result<()> {
        let pool_tokens = self.pool.n_blocks() * self.pool.layout().block_size;
        let limit = Self::validate(&req, self.context_length, pool_tokens)?;
        Self::validate_choices(&req, sinks.len())?;
        self.clock += 1;
        if export.is_some() && !req.generated.is_empty() {
            return Err(EngineError::Unsupported(
                "a resumed request cannot export its KV".into(),
            ));
        }
        let mut tokens = req.prompt.clone();
        tokens.extend_from_slice(&req.generated);
        if tokens.len() >= limit {
            return Err(EngineError::ContextOverflow {
                prompt: req.prompt.len(),
                requested: req.generated.len() + 1,
                context: limit,
            });
        }
        let mut sinks = sinks.into_iter();
        let sink = sinks.next().expect("validated: at least one choice");
        // A resumed stream sent its prompt's log-probabilities before.
        let prompt_lp =
            (req.params.prompt_logprobs.is_some() && req.generated.is_empty()).then(Vec::new);
        let seq = Seq {
            uid: self.clock,
            choice: 0,
            fork: sinks.enumerate().map(|(i, s)| (i + 1, s)).collect(),
            tokens,
            n_prompt: req.prompt.len(),
            limit,
            kv: SeqKv {
                adapter: req.adapter,
                ..SeqKv::default()
            },
            req,
            cached_tokens: 0,
            admitted_at: 0,
            arrival: self.clock,
            sink,
            prompt_cached: false,
            export,
            export_cached: 0,
            prompt_lp,
            draft_rate: speculative::INITIAL_ACCEPTANCE,
            stop_token: None,
        };
        self.enqueue(seq);
        Ok(())
    }

    /// The number of choices must be in `1..=MAX_CHOICES`, and a resumed
    /// stream (tokens already generated) is one choice: its siblings, if it
    /// had any, resume as requests of their own.
    fn validate_choices(req: &Request, n: usize) -> Result<()> {
        if n == 0 || n > MAX_CHOICES {
            return Err(EngineError::Unsupported(format!(
                "a request may ask for 1 to {MAX_CHOICES} choices, got {n}"
            )));
        }
        if n > 1 && !req.generated.is_empty() {
            return Err(EngineError::Unsupported(
                "a resumed request has one choice".into(),
            ));
        }
        Ok(())
    }

    /// Reserves blocks for a prompt whose KV will arrive from a prefill
    /// worker (disaggregated serving), evicting cached prefixes if needed.
    /// `Ok(None)` when the pool cannot spare them now: the caller waits
    /// (see [`Scheduler::set_transfers_waiting`]) and asks again. The rule
    /// is admission's: room for the whole prompt plus a block for each
    /// running sequence to grow into (the rest of its prompt, for one
    /// still computing it), so a transfer does not land only to have the
    /// batch's growth preempt it. The caller writes the blocks
    /// (see `KvPool::transfer_writer`), then hands them over with
    /// [`Scheduler::add_prefilled`], or gives them back with
    /// [`Scheduler::release`] if the transfer fails.
    pub fn reserve_for_transfer(&mut self, prompt_tokens: usize) -> Result<Option<SeqKv>> {
        let need = self.pool.layout().blocks_for(prompt_tokens);
        // A prompt admitted and still computing was promised room for the
        // rest of it: a reservation must not take that room away.
        let promised: usize = self
            .running
            .iter()
            .map(|s| self.blocks_needed(s, s.pending()).max(1))
            .sum();
        if !self.make_room(need + promised) {
            return Ok(None);
        }
        let mut kv = SeqKv::default();
        self.pool.reserve(&mut kv, prompt_tokens)?;
        Ok(Some(kv))
    }

    /// How many transfers wait for blocks ([`Scheduler::reserve_for_transfer`]
    /// said not now). While any do and the batch is not empty, no waiting
    /// request is admitted, so a stream of short local prompts cannot
    /// starve a long transferred one (an empty batch admits as usual: a
    /// waiting request may hold cached blocks the transfer needs, and only
    /// running it gives them back). They also count as waiting in [`Scheduler::stats`], where a worker's
    /// load report and its bounded queue see them.
    pub fn set_transfers_waiting(&mut self, n: usize) {
        self.transfers_waiting = n;
    }

    /// Returns reserved blocks (a transfer that failed or was cancelled).
    pub fn release(&mut self, mut kv: SeqKv) {
        self.pool.free_seq(&mut kv);
    }

    /// The pool, writable: where received KV is written.
    pub fn pool_mut(&mut self) -> &mut KvPool {
        &mut self.pool
    }

    /// Joins a sequence whose prompt KV was computed elsewhere: `kv` holds
    /// the whole prompt (`kv.len == prompt.len()`), and `first` is the token
    /// the prefill worker sampled from the last prompt position. The request
    /// continues here exactly as if it had been prefilled locally.
    pub fn add_prefilled(
        &mut self,
        req: Request,
        kv: SeqKv,
        first: Sampled,
        sink: Box<dyn EventSink>,
    ) -> Result<()> {
        self.add_prefilled_parallel(req, kv, vec![first], vec![sink])
    }

    /// [`Scheduler::add_prefilled`] for parallel sampling: `firsts[i]` is
    /// choice `i`'s first token (sampled from the prompt's last logits with
    /// key `request_key + i`) and `sinks[i]` its stream. The choices share
    /// `kv` (forked, copy-on-write of the partial last block).
    pub fn add_prefilled_parallel(
        &mut self,
        req: Request,
        mut kv: SeqKv,
        firsts: Vec<Sampled>,
        sinks: Vec<Box<dyn EventSink>>,
    ) -> Result<()> {
        let pool_tokens = self.pool.n_blocks() * self.pool.layout().block_size;
        let checked = if !req.generated.is_empty() {
            Err(EngineError::Unsupported(
                "a resumed request is prefilled where it resumes".into(),
            ))
        } else if firsts.len() != sinks.len() {
            Err(EngineError::Unsupported(format!(
                "{} first tokens for {} choices",
                firsts.len(),
                sinks.len()
            )))
        } else {
            Self::validate(&req, self.context_length, pool_tokens)
                .and_then(|l| Self::validate_choices(&req, sinks.len()).map(|()| l))
        };
        let limit = match checked {
            Ok(l) => l,
            Err(e) => {
                self.pool.free_seq(&mut kv);
                return Err(e);
            }
        };
        if kv.len != req.prompt.len() {
            let got = kv.len;
            self.pool.free_seq(&mut kv);
            return Err(EngineError::Unsupported(format!(
                "transferred KV covers {got} tokens, the prompt has {}",
                req.prompt.len()
            )));
        }
        // The transferred prompt is cached here as a locally computed one
        // would be, also when every choice ends with its first token (the
        // router expects it here next time).
        kv.adapter = req.adapter;
        if self.cfg.prefix_cache {
            self.cache
                .insert(&mut self.pool, req.adapter, &req.prompt, &kv.blocks);
        }
        self.clock += 1;
        let arrival = self.clock;
        let n_prompt = req.prompt.len();
        let key_base = req.params.request_key;
        for (choice, (first, mut sink)) in firsts.into_iter().zip(sinks).enumerate() {
            let mut tokens = req.prompt.clone();
            let first_token = first.token;
            let stop = req.stop_tokens.contains(&first_token);
            if !stop {
                tokens.push(first.token);
                self.stats.generated_tokens += 1;
            }
            let finished = if stop {
                Some(FinishReason::Stop)
            } else if tokens.len() >= limit {
                Some(FinishReason::Length)
            } else {
                None
            };
            // A guided choice's grammar moves past the first token too.
            let mut guide = req.guide.clone();
            if let (false, Some(g)) = (stop, guide.as_mut()) {
                if let Err(e) = g.advance(first.token) {
                    sink.send(Event::Error(format!(
                        "the prefilled first token breaks the response format: {e}"
                    )));
                    continue;
                }
            }
            let listening = stop || sink.send(Event::Token(first));
            let reason = finished.or(if listening {
                None
            } else {
                Some(FinishReason::Stop)
            });
            if let Some(reason) = reason {
                sink.send(Event::Finished {
                    reason,
                    prompt_tokens: n_prompt,
                    completion_tokens: tokens.len() - n_prompt,
                    cached_tokens: 0,
                    stop_token: stop.then_some(first_token),
                });
                continue;
            }
            let mut creq = req.clone();
            creq.params.request_key = key_base.wrapping_add(choice as u64);
            creq.guide = guide;
            self.clock += 1;
            // Each running choice holds its own reference to every block.
            let ckv = self.pool.fork(&kv);
            self.running.push(Seq {
                uid: self.clock,
                choice,
                fork: Vec::new(),
                tokens,
                n_prompt,
                limit,
                req: creq,
                kv: ckv,
                cached_tokens: 0,
                admitted_at: self.clock,
                arrival,
                sink,
                prompt_cached: self.cfg.prefix_cache,
                export: None,
                export_cached: 0,
                prompt_lp: None,
                draft_rate: speculative::INITIAL_ACCEPTANCE,
                stop_token: None,
            });
        }
        // The reservation's own references (the choices hold theirs).
        self.pool.free_seq(&mut kv);
        Ok(())
    }

    /// Waiting queue order: priority (high first), then arrival.
    fn enqueue(&mut self, seq: Seq) {
        let key = (-(seq.req.priority as i64), seq.arrival);
        let at = self
            .waiting
            .iter()
            .position(|s| (-(s.req.priority as i64), s.arrival) > key)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
    }

    /// Cancels a request (every choice of it) wherever it is; its blocks
    /// are freed at once.
    pub fn cancel(&mut self, id: u64) -> bool {
        let mut found = false;
        while let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            let mut s = self.waiting.remove(i).expect("index");
            self.pool.free_seq(&mut s.kv);
            found = true;
        }
        while let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            let mut s = self.running.remove(i);
            self.pool.free_seq(&mut s.kv);
            found = true;
        }
        found
    }

    /// Cancels one choice of a request (its client stopped reading it, e.g.
    /// at a stop string); the other choices carry on. A choice not yet
    /// forked is dropped from its parent's fork list; a parent cancelled
    /// before its fork hands its place to the next pending choice (nothing
    /// has been sampled yet, so it can become that choice outright).
    pub fn cancel_choice(&mut self, id: u64, choice: usize) -> bool {
        let all = self.waiting.iter_mut().chain(self.running.iter_mut());
        let mut remove = None;
        for s in all {
            if s.req.id != id {
                continue;
            }
            if let Some(p) = s.fork.iter().position(|(c, _)| *c == choice) {
                s.fork.remove(p);
                return true;
            }
            if s.choice == choice {
                if s.fork.is_empty() {
                    remove = Some(s.uid);
                } else {
                    let (next, sink) = s.fork.remove(0);
                    let base = s.req.params.request_key.wrapping_sub(s.choice as u64);
                    s.req.params.request_key = base.wrapping_add(next as u64);
                    s.choice = next;
                    s.sink = sink;
                    return true;
                }
                break;
            }
        }
        let Some(uid) = remove else {
            return false;
        };
        if let Some(i) = self.waiting.iter().position(|s| s.uid == uid) {
            let mut s = self.waiting.remove(i).expect("index");
            self.pool.free_seq(&mut s.kv);
        } else if let Some(i) = self.running.iter().position(|s| s.uid == uid) {
            let mut s = self.running.remove(i);
            self.pool.free_seq(&mut s.kv);
        }
        true
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Whether a waiting or running sequence runs with LoRA adapter `id`.
    pub fn uses_adapter(&self, id: u32) -> bool {
        self.waiting
            .iter()
            .chain(&self.running)
            .any(|s| s.kv.adapter == id)
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            waiting: self.waiting.len() + self.transfers_waiting,
            running: self.running.len(),
            free_blocks: self.pool.free_blocks(),
            total_blocks: self.pool.n_blocks(),
            cached_blocks: self.cache.cached_blocks(),
            prefix: self.cache.stats,
            ..self.stats
        }
    }

    /// How many leading tokens of `tokens` the prefix cache holds.
    pub fn cached_prefix_len(&self, adapter: u32, tokens: &[u32]) -> usize {
        self.cache.cached_prefix_len(adapter, tokens)
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    /// Ends every request with an error event and frees its blocks (after
    /// an internal failure, or at shutdown).
    pub fn fail_all(&mut self, msg: &str) {
        let mut all: Vec<Seq> = self.running.drain(..).collect();
        all.extend(self.waiting.drain(..));
        for mut s in all {
            self.pool.free_seq(&mut s.kv);
            s.sink.send(Event::Error(msg.to_string()));
            for (_, mut sink) in s.fork.drain(..) {
                sink.send(Event::Error(msg.to_string()));
            }
        }
    }

    /// Frees the prefix cache's blocks (e.g. at shutdown, or in tests to
    /// check that nothing else holds blocks).
    pub fn clear_prefix_cache(&mut self) {
        self.cache.clear(&mut self.pool);
    }

    /// Gets `n` free blocks by evicting cached prefixes; false if impossible.
    fn make_room(&mut self, n: usize) -> bool {
        if self.pool.free_blocks() < n {
            let short = n - self.pool.free_blocks();
            self.cache.evict(&mut self.pool, short);
        }
        self.pool.free_blocks() >= n
    }

    /// Blocks `seq` needs for `tokens` more tokens (including a copy-on-write).
    fn blocks_needed(&self, seq: &Seq, tokens: usize) -> usize {
        let bs = self.pool.layout().block_size;
        let need = self
            .pool
            .layout()
            .blocks_for(seq.kv.len + tokens)
            .saturating_sub(seq.kv.blocks.len());
        let cow = !seq.kv.len.is_multiple_of(bs)
            && tokens > 0
            && self.pool.refcount(seq.kv.blocks[seq.kv.len / bs]) > 1;
        need + usize::from(cow)
    }

    /// Moves waiting requests into the running batch, in order, while there
    /// is room for their whole prompt.
    fn admit(&mut self) {
        let held = self.transfers_waiting > 0 && !self.running.is_empty();
        while self.running.len() < self.cfg.max_running && !held {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            // A prompt being scored computes every position's logits.
            if s.kv.blocks.is_empty() && self.cfg.prefix_cache && s.prompt_lp.is_none() {
                // Share cached whole blocks, but always compute the last token
                // (its logits start generation).
                let upto = s.tokens.len() - 1;
                s.kv.blocks = self
                    .cache
                    .acquire(&mut self.pool, s.kv.adapter, &s.tokens[..upto]);
                s.kv.len = s.kv.blocks.len() * self.pool.layout().block_size;
                s.cached_tokens = s.kv.len;
                if s.export.is_some() {
                    s.export_cached = s.kv.len;
                }
            }
            // Room for the whole rest of the prompt, plus a block for each
            // running sequence to grow into. Admitting on the first chunk
            // alone let a long prompt start while decodes held most of the
            // pool; their growth then preempted it half computed (it is the
            // youngest), again and again under pressure.
            let headroom = self.running.len();
            let need = self.blocks_needed(&s, s.pending()) + headroom;
            if !self.make_room(need) {
                // Not now: keep its place (and its shared blocks) at the front.
                self.waiting.push_front(s);
                break;
            }
            self.clock += 1;
            s.admitted_at = self.clock;
            self.running.push(s);
        }
    }

    /// Runs one iteration. Returns false when there was nothing to do.
    pub fn step(&mut self, model: &dyn Executor) -> Result<bool> {
        self.admit();
        self.export_cached_blocks(model)?;
        if self.running.is_empty() {
            return Ok(false);
        }
        // Plan by sequence uid (indices move when someone is preempted).
        let mut budget = self.cfg.max_step_tokens;
        let mut plan_ids: Vec<(u64, usize)> = Vec::new();
        let by_age = |running: &[Seq], decode: bool| -> Vec<u64> {
            let mut v: Vec<&Seq> = running
                .iter()
                .filter(|s| (s.pending() == 1) == decode)
                .collect();
            v.sort_by_key(|s| s.admitted_at);
            v.iter().map(|s| s.uid).collect()
        };
        // 1. Decodes, oldest first: each needs one slot; preempt the youngest
        //    (possibly itself) when the pool is dry.
        for id in by_age(&self.running, true) {
            if budget == 0 {
                break;
            }
            while let Some(idx) = self.running.iter().position(|s| s.uid == id) {
                let need = self.blocks_needed(&self.running[idx], 1);
                if self.make_room(need) {
                    self.pool.reserve(&mut self.running[idx].kv, 1)?;
                    plan_ids.push((id, 1));
                    budget -= 1;
                    break;
                }
                let victim = self.youngest_except(&plan_ids);
                match victim {
                    Some(v) => self.preempt(v),
                    None => break,
                }
            }
        }
        // 1b. Speculation: while few sequences decode, each may add draft
        //     tokens to its step, if budget and free blocks allow (a draft
        //     never preempts, waits, or evicts a cached prefix).
        let mut drafts: Vec<(u64, Vec<u32>)> = Vec::new();
        // Sequences whose draft was not worth verifying: the draft's first
        // token, to compare with what they sample.
        let mut shadows: Vec<(u64, u32)> = Vec::new();
        let spec = self.cfg.speculative;
        if spec.enabled() && plan_ids.len() <= spec.max_batch {
            for (id, take) in plan_ids.iter_mut() {
                let id = *id;
                let Some(idx) = self.running.iter().position(|s| s.uid == id) else {
                    continue;
                };
                let s = &self.running[idx];
                // Room for the drafts and the token after them.
                let room = s.limit.saturating_sub(s.tokens.len() + 1);
                let k = spec.tokens.min(budget).min(room);
                let draft = propose_ngram(&s.tokens, spec.ngram_min, spec.ngram_max, k);
                let Some(&first) = draft.first() else {
                    continue;
                };
                let d = speculative::draft_len(s.draft_rate, spec.token_cost, draft.len());
                if d == 0 {
                    shadows.push((id, first));
                    continue;
                }
                let draft = draft[..d].to_vec();
                if self.blocks_needed(s, 1 + draft.len()) > self.pool.free_blocks() {
                    continue;
                }
                self.pool
                    .reserve(&mut self.running[idx].kv, 1 + draft.len())?;
                *take += draft.len();
                budget -= draft.len();
                drafts.push((id, draft));
            }
        }
        // 2. Prefill chunks, oldest first, with what budget and memory allow;
        //    a prefill never preempts anyone. Prompts being scored take
        //    chunks that keep the step's logits rows bounded.
        let bs = self.pool.layout().block_size;
        let mut scored_rows = MAX_SCORED_ROWS;
        for id in by_age(&self.running, false) {
            if budget == 0 {
                break;
            }
            let idx = self
                .running
                .iter()
                .position(|s| s.uid == id)
                .expect("running");
            let scoring = self.running[idx].prompt_lp.is_some();
            if scoring && scored_rows == 0 {
                continue;
            }
            let mut take = self.running[idx].pending().min(budget);
            if scoring {
                take = take.min(scored_rows);
            }
            while take > 0 {
                let need = self.blocks_needed(&self.running[idx], take);
                if self.make_room(need) {
                    break;
                }
                // Shrink to what the free blocks hold (whole blocks after the partial one).
                let s = &self.running[idx];
                let room = (s.kv.blocks.len() * bs).saturating_sub(s.kv.len)
                    + self.pool.free_blocks() * bs;
                take = if room < take { room } else { take - 1 };
            }
            if take > 0 {
                self.pool.reserve(&mut self.running[idx].kv, take)?;
                plan_ids.push((id, take));
                budget -= take;
                if scoring {
                    scored_rows -= take;
                }
            }
        }
        let mut plan: Vec<(usize, usize)> = plan_ids
            .iter()
            .map(|&(id, t)| {
                (
                    self.running
                        .iter()
                        .position(|s| s.uid == id)
                        .expect("planned"),
                    t,
                )
            })
            .collect();
        if plan.is_empty() {
            // Nothing can run: the decodes preempted one another down to
            // none, or the prompts still computing found no block. Blocks
            // held outside the batch (reservations for transfers in
            // flight, which end in an install or a release) or by prompts
            // that were all admitted against the same free blocks cause
            // it. Not a failure: the youngest gives its blocks back and
            // waits to be admitted again, so the others (or, once a
            // transfer lands, the pool) move on.
            if let Some(v) = self.youngest_except(&[]) {
                self.preempt(v);
            }
            return Ok(true);
        }
        plan.sort_by_key(|(o, _)| *o);

        // Forward over the plan.
        let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(plan.len());
        let mut wants = Vec::with_capacity(plan.len());
        // Per batch entry: its exporter and prompt length, when this step
        // writes prompt positions of a sequence that exports.
        let mut exporters: Vec<Option<(&mut Box<dyn KvExport>, usize)>> =
            Vec::with_capacity(plan.len());
        // Per batch entry: the draft tokens its step verifies (empty: none).
        let mut step_drafts: Vec<Vec<u32>> = Vec::with_capacity(plan.len());
        {
            let mut rest: &mut [Seq] = &mut self.running;
            let mut base = 0;
            for &(idx, take) in &plan {
                let (_, tail) = rest.split_at_mut(idx - base);
                let (s, tail2) = tail.split_first_mut().expect("planned index");
                // The drafts ride in `tokens` for the forward call alone.
                let draft = match drafts.iter().position(|(id, _)| *id == s.uid) {
                    Some(i) => drafts.swap_remove(i).1,
                    None => Vec::new(),
                };
                s.tokens.extend_from_slice(&draft);
                let start = s.kv.len;
                let last = start + take == s.tokens.len();
                let pos = s.generated() as u64;
                let vocab = model.config().vocab_size;
                let scoring = s.prompt_lp.is_some() && start < s.n_prompt;
                let want = match last {
                    _ if scoring || !draft.is_empty() => Logits::All,
                    false => Logits::None,
                    true if s.req.params.is_plain_greedy_at(pos) => Logits::Greedy,
                    true => match s.req.params.top_k_only_at(pos, vocab) {
                        Some(k) => Logits::TopK(k),
                        None => Logits::Last,
                    },
                };
                wants.push(want);
                exporters.push(match s.export.as_mut() {
                    Some(e) if start < s.n_prompt => Some((e, s.n_prompt)),
                    _ => None,
                });
                step_drafts.push(draft);
                steps.push(SeqStep {
                    kv: &mut s.kv,
                    tokens: &s.tokens[start..start + take],
                    logits: want,
                });
                rest = tail2;
                base = idx + 1;
            }
        }
        let mut abandoned = vec![false; plan.len()];
        let logits = if exporters.iter().any(Option::is_some) {
            let mut on_layer = |l: LayerKv<'_>| {
                let Some((exp, n_prompt)) = exporters[l.seq].as_mut() else {
                    return;
                };
                // Prompt positions only: generated tokens' KV stays here.
                let end = l.positions.end.min(*n_prompt);
                if abandoned[l.seq] || l.positions.start >= end {
                    return;
                }
                let blocks: Vec<ExportBlock<'_>> = (l.positions.start / bs..=(end - 1) / bs)
                    .map(|b| ExportBlock {
                        block: b as u32,
                        slots: (end - b * bs).min(bs) as u32,
                        data: l.pool.region(l.layer, l.kv.blocks[b]),
                    })
                    .collect();
                if !exp.export(l.layer, &blocks) {
                    abandoned[l.seq] = true;
                }
            };
            model.forward_observed(&mut self.pool, &mut steps, &mut on_layer)
        } else {
            model.forward(&mut self.pool, &mut steps)
        };
        drop(steps);
        drop(exporters);
        // The drafts leave `tokens` again, whatever the step did.
        for (&(idx, _), draft) in plan.iter().zip(&step_drafts) {
            let s = &mut self.running[idx];
            s.tokens.truncate(s.tokens.len() - draft.len());
        }
        let logits = logits?;
        self.stats.steps += 1;

        // Sample, emit, retire.
        let mut finished = Vec::new();
        let mut forked: Vec<Seq> = Vec::new();
        for (k, &(idx, take)) in plan.iter().enumerate() {
            let s = &mut self.running[idx];
            if s.kv.len <= s.n_prompt {
                self.stats.prompt_tokens_computed += take as u64;
            }
            if abandoned[k] {
                finished.push((idx, None));
                continue;
            }
            if wants[k] == Logits::None {
                continue;
            }
            let mut row = &logits[k][..];
            if !step_drafts[k].is_empty() {
                let reason =
                    verify_drafts(s, row, &step_drafts[k], &mut self.pool, &mut self.stats);
                if let Some(reason) = reason {
                    finished.push((idx, Some(reason)));
                }
                continue;
            }
            if wants[k] == Logits::All {
                // One row per computed token: rows score the prompt tokens
                // that follow them; the last row starts generation.
                let vocab = row.len() / take;
                let start = s.kv.len - take;
                if let (Some(lp), Some(top)) = (s.prompt_lp.as_mut(), s.req.params.prompt_logprobs)
                {
                    for (j, r) in row.chunks_exact(vocab).enumerate() {
                        if let Some(&next) = s.tokens[..s.n_prompt].get(start + j + 1) {
                            lp.push(score(r, next, top));
                        }
                    }
                }
                if s.kv.len < s.tokens.len() {
                    continue;
                }
                row = &row[row.len() - vocab..];
                if let Some(lp) = s.prompt_lp.take() {
                    for (_, sink) in s.fork.iter_mut() {
                        sink.send(Event::PromptLogprobs(lp.clone()));
                    }
                    s.sink.send(Event::PromptLogprobs(lp));
                }
            }
            if !s.prompt_cached && self.cfg.prefix_cache && s.kv.len >= s.n_prompt {
                self.cache.insert(
                    &mut self.pool,
                    s.kv.adapter,
                    &s.tokens[..s.n_prompt],
                    &s.kv.blocks,
                );
                s.prompt_cached = true;
            }
            // Parallel sampling: the other choices branch off here, sharing
            // the prompt's blocks, and sample their first token from the
            // same logits with their own key.
            for mut c in self.fork_choices(idx) {
                match sample_next(&mut c, row, wants[k], &mut self.stats) {
                    Some(reason) => self.retire(c, reason),
                    None => forked.push(c),
                }
            }
            let s = &mut self.running[idx];
            let before = s.tokens.len();
            let reason = sample_next(s, row, wants[k], &mut self.stats);
            if let Some(&(_, first)) = shadows.iter().find(|(id, _)| *id == s.uid) {
                if s.tokens.len() > before {
                    s.draft_rate = speculative::observe(s.draft_rate, s.tokens[before] == first);
                }
            }
            if let Some(reason) = reason {
                finished.push((idx, Some(reason)));
            }
        }
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (idx, reason) in finished {
            let mut s = self.running.remove(idx);
            let Some(reason) = reason else {
                // The exporter gave up: cancelled, silently (like `cancel`).
                self.pool.free_seq(&mut s.kv);
                continue;
            };
            self.retire(s, reason);
        }
        self.running.extend(forked);
        Ok(true)
    }

    /// Ends a sequence that left the running batch: its computed blocks go
    /// to the prefix cache, its references back to the pool, and its
    /// `Finished` event out (its exporter, if any, drops after that).
    fn retire(&mut self, mut s: Seq, reason: FinishReason) {
        if self.cfg.prefix_cache {
            let computed = s.kv.len;
            self.cache.insert(
                &mut self.pool,
                s.kv.adapter,
                &s.tokens[..computed],
                &s.kv.blocks,
            );
        }
        self.pool.free_seq(&mut s.kv);
        let done = Event::Finished {
            reason,
            prompt_tokens: s.n_prompt,
            completion_tokens: s.generated(),
            cached_tokens: s.cached_tokens,
            stop_token: s.stop_token,
        };
        s.sink.send(done);
        // `s` (and its exporter) drops here, after `Finished`.
    }

    /// Forks the pending choices of running sequence `idx` (whose prompt
    /// has just been computed): each gets a block table sharing every block
    /// (one more reference each), a copy of the tokens, and its own key.
    fn fork_choices(&mut self, idx: usize) -> Vec<Seq> {
        let pending = std::mem::take(&mut self.running[idx].fork);
        let mut out = Vec::with_capacity(pending.len());
        for (choice, sink) in pending {
            self.clock += 1;
            let kv = self.pool.fork(&self.running[idx].kv);
            let p = &self.running[idx];
            let mut req = p.req.clone();
            let base = p.req.params.request_key.wrapping_sub(p.choice as u64);
            req.params.request_key = base.wrapping_add(choice as u64);
            out.push(Seq {
                uid: self.clock,
                choice,
                fork: Vec::new(),
                req,
                tokens: p.tokens.clone(),
                n_prompt: p.n_prompt,
                limit: p.limit,
                kv,
                cached_tokens: p.cached_tokens,
                admitted_at: self.clock,
                arrival: p.arrival,
                sink,
                prompt_cached: p.prompt_cached,
                // The prompt's KV is exported once, by the parent.
                export: None,
                export_cached: 0,
                prompt_lp: None,
                draft_rate: speculative::INITIAL_ACCEPTANCE,
                stop_token: None,
            });
        }
        out
    }

    /// Hands the blocks a sequence got from the prefix cache at admission
    /// (computed by an earlier request) to its exporter; cancels the
    /// sequences whose exporter gives up.
    fn export_cached_blocks(&mut self, model: &dyn Executor) -> Result<()> {
        let bs = self.pool.layout().block_size;
        let mut abandoned = Vec::new();
        for s in self.running.iter_mut() {
            if s.export_cached == 0 {
                continue;
            }
            let upto = s.export_cached.min(s.n_prompt).min(s.kv.len);
            s.export_cached = 0;
            let Some(exp) = s.export.as_mut() else {
                continue;
            };
            if upto == 0 {
                continue;
            }
            let nb = upto.div_ceil(bs);
            // A sharded worker's pool holds a shard of each block: gather them whole.
            let gathered = model.gather(&self.pool, &s.kv.blocks[..nb])?;
            let n_layers = match &gathered {
                Some(g) => g.layout().n_layers,
                None => self.pool.layout().n_layers,
            };
            for layer in 0..n_layers {
                let blocks: Vec<ExportBlock<'_>> = (0..nb)
                    .map(|b| ExportBlock {
                        block: b as u32,
                        slots: (upto - b * bs).min(bs) as u32,
                        data: match &gathered {
                            Some(g) => g.region(layer, b),
                            None => self.pool.region(layer, s.kv.blocks[b]),
                        },
                    })
                    .collect();
                if !exp.export(layer, &blocks) {
                    abandoned.push(s.req.id);
                    break;
                }
            }
        }
        for id in abandoned {
            self.cancel(id);
        }
        Ok(())
    }

    /// The youngest running sequence (lowest priority first) not already
    /// planned for this step.
    fn youngest_except(&self, planned: &[(u64, usize)]) -> Option<usize> {
        self.running
            .iter()
            .enumerate()
            .filter(|(_, s)| !planned.iter().any(|(id, _)| *id == s.uid))
            .min_by_key(|(_, s)| (s.req.priority, std::cmp::Reverse(s.admitted_at)))
            .map(|(i, _)| i)
    }

    /// Frees a running sequence's blocks and queues it for recomputation.
    fn preempt(&mut self, idx: usize) {
        let mut s = self.running.remove(idx);
        self.pool.free_seq(&mut s.kv);
        s.prompt_cached = false;
        if let Some(lp) = s.prompt_lp.as_mut() {
            // Scored again as the prompt is recomputed.
            lp.clear();
        }
        self.stats.preemptions += 1;
        tracing::debug!(
            id = s.req.id,
            tokens = s.tokens.len(),
            "preempted (will recompute)"
        );
        self.enqueue(s);
    }
}

/// Samples `s`'s next token from `logits` (its last position, as `kind`
/// asked) and emits it. Returns why the sequence ends, if it does.
fn sample_next(
    s: &mut Seq,
    logits: &[f32],
    kind: Logits,
    stats: &mut SchedulerStats,
) -> Option<FinishReason> {
    let pos = s.generated() as u64;
    if let Some(guide) = s.req.guide.as_mut() {
        // Guided: only what keeps the output inside the grammar; a
        // finished grammar leaves only the stop tokens (or, without any,
        // nothing: the sequence ends there).
        let allowed = match guide.next_allowed(&s.req.stop_tokens) {
            Ok(Some(a)) => a,
            Ok(None) => return Some(FinishReason::Stop),
            Err(e) => {
                s.sink.send(Event::Error(e.to_string()));
                return Some(FinishReason::Stop);
            }
        };
        let sampled = sample_masked(
            &s.req.params,
            logits,
            &s.tokens,
            s.n_prompt,
            pos,
            Some(&allowed),
        );
        if !s.req.stop_tokens.contains(&sampled.token) {
            if let Err(e) = guide.advance(sampled.token) {
                s.sink.send(Event::Error(e.to_string()));
                return Some(FinishReason::Stop);
            }
        }
        return emit(s, sampled, stats);
    }
    // The step asked for less than the whole row where `sample` would
    // read no more: the greedy id, or the top-k candidates.
    let sampled = match kind {
        Logits::Greedy => {
            debug_assert!(s.req.params.is_plain_greedy_at(pos));
            // An executor that sent the whole row anyway is read the same way.
            Sampled::bare(greedy_token(logits).unwrap_or_else(|| argmax(logits)))
        }
        Logits::TopK(_) => sample_top_k(&s.req.params, &top_k_candidates(logits), pos),
        _ => sample(&s.req.params, logits, &s.tokens, s.n_prompt, pos),
    };
    emit(s, sampled, stats)
}

/// Samples `s`'s tokens from the rows of a step that verified `draft`
/// (one row after each of its last token and the draft tokens), keeping
/// draft tokens while the sampled token is the draft's, then releases the
/// KV of the rejected ones. Returns why the sequence ends, if it does.
fn verify_drafts(
    s: &mut Seq,
    rows: &[f32],
    draft: &[u32],
    pool: &mut KvPool,
    stats: &mut SchedulerStats,
) -> Option<FinishReason> {
    let vocab = rows.len() / (draft.len() + 1);
    // The step wrote the last token's KV and the draft's after it.
    let base = s.kv.len - draft.len() - 1;
    let mut accepted = 0;
    let mut reason = None;
    for (j, row) in rows.chunks_exact(vocab).enumerate() {
        let before = s.tokens.len();
        reason = sample_next(s, row, Logits::Last, stats);
        let sampled = s.tokens.len() > before;
        let kept = sampled && draft.get(j) == s.tokens.last();
        if sampled && j < draft.len() {
            s.draft_rate = speculative::observe(s.draft_rate, kept);
        }
        if reason.is_some() || !kept {
            break;
        }
        accepted += 1;
    }
    stats.draft_tokens += draft.len() as u64;
    stats.accepted_draft_tokens += accepted as u64;
    // KV stays for the last token and the accepted drafts; never past the
    // tokens (a sequence that ends on a stop token may hold all of them).
    let valid = (base + 1 + accepted).min(s.tokens.len());
    pool.truncate(&mut s.kv, valid);
    reason
}

/// Ends `s` on a stop token, else appends `sampled` and sends it on.
fn emit(s: &mut Seq, sampled: Sampled, stats: &mut SchedulerStats) -> Option<FinishReason> {
    let tok = sampled.token;
    if s.req.stop_tokens.contains(&tok) {
        s.stop_token = Some(tok);
        return Some(FinishReason::Stop);
    }
    s.tokens.push(tok);
    stats.generated_tokens += 1;
    if !s.sink.send(Event::Token(sampled)) {
        return Some(FinishReason::Stop);
    }
    if s.tokens.len() >= s.limit {
        return Some(FinishReason::Length);
    }
    None
}
