//! The cluster [`Backend`]: picks a decode worker (and, when disaggregating,
//! a prefill worker), opens the decode stream and relays its tokens.
//!
//! The router's own time is recorded here: `tandem_router_dispatch_seconds`
//! is the front end's share (request accepted to `generate`, tokenisation
//! excluded) plus the dispatcher's (to the decode call handed to the
//! transport).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::{ClusterSecret, PeerList, Role};
use tandem_proto::worker as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{
    Backend, BoxFuture, DispatchError, Finish, GenerationInput, SampledToken, TokenEvent,
    TokenStream,
};
use crate::policy::{block_hashes, DisaggPolicy, Picker, PrefixIndex, RoutePolicy};
use crate::workers::{self, ConnectError, Worker};

/// How the dispatcher finds and uses its workers.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub route: RoutePolicy,
    pub disagg: DisaggPolicy,
    pub secret: ClusterSecret,
    /// The model fingerprint every worker must serve.
    pub fingerprint: String,
    /// Longest wait for a worker to come up at start.
    pub connect_timeout: Duration,
    pub load_poll: Duration,
}

pub struct Dispatcher {
    decode: Vec<Arc<Worker>>,
    prefill: Vec<Arc<Worker>>,
    picker: Picker,
    disagg: DisaggPolicy,
    index: PrefixIndex,
    secret: ClusterSecret,
    block_size: usize,
    max_sequence_tokens: usize,
}

impl Dispatcher {
    /// Connects to every peer (waiting up to `connect_timeout` for each) and
    /// starts polling their load.
    pub async fn connect(
        peers: &PeerList,
        cfg: DispatcherConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, ConnectError> {
        let mut decode = Vec::new();
        let mut prefill = Vec::new();
        for p in &peers.0 {
            let w = workers::connect(
                p.addr,
                p.role,
                &cfg.fingerprint,
                &cfg.secret,
                cfg.connect_timeout,
            )
            .await?;
            match p.role {
                Role::Decode => decode.push(w),
                Role::Prefill => prefill.push(w),
                Role::Router => {}
            }
        }
        let all: Vec<_> = decode.iter().chain(&prefill).cloned().collect();
        workers::spawn_load_poll(all, cfg.secret.clone(), cfg.load_poll, shutdown);
        let block_size = decode
            .first()
            .map(|w| w.info.block_size as usize)
            .unwrap_or(16)
            .max(1);
        let max_sequence_tokens = decode
            .iter()
            .map(|w| w.info.max_sequence_tokens as usize)
            .min()
            .unwrap_or(0);
        Ok(Self {
            decode,
            prefill,
            picker: Picker::new(cfg.route),
            disagg: cfg.disagg,
            index: PrefixIndex::new(1 << 20),
            secret: cfg.secret,
            block_size,
            max_sequence_tokens,
        })
    }

    /// Longest prompt + completion every decode worker can hold.
    pub fn max_sequence_tokens(&self) -> usize {
        self.max_sequence_tokens
    }

    pub fn decode_workers(&self) -> &[Arc<Worker>] {
        &self.decode
    }

    pub fn prefill_workers(&self) -> &[Arc<Worker>] {
        &self.prefill
    }

    async fn start(&self, input: GenerationInput) -> Result<TokenStream, DispatchError> {
        let t0 = Instant::now();
        let input_frontend = input.frontend_time;
        let hashes = block_hashes(&input.prompt, self.block_size);
        let decode = self
            .picker
            .decode(&self.decode, |w| self.index.matched(&hashes, w.addr))
            .ok_or_else(|| DispatchError::Unavailable("no decode workers".into()))?
            .clone();
        let n = input.prompt.len();
        let cached_on_decode = self.index.matched(&hashes, decode.addr) * self.block_size;
        let local = n < self.disagg.min_prompt_tokens
            || cached_on_decode as f32 >= self.disagg.max_cached_fraction * n as f32;
        let prefill = if local {
            None
        } else {
            self.picker
                .prefill(&self.prefill, |w| self.index.matched(&hashes, w.addr))
                .cloned()
        };
        let req = pb::DecodeRequest {
            request_id: input.request_id.clone(),
            prompt: input.prompt,
            sampling: Some(sampling_to_proto(&input.sampling)),
            max_tokens: input.max_tokens,
            stop_token_ids: input.stop_token_ids,
            priority: 0,
            prefill_address: prefill
                .as_ref()
                .map(|p| p.addr.to_string())
                .unwrap_or_default(),
        };
        let decode_guard = decode.track();
        let prefill_guard = prefill.as_ref().map(|p| p.track());
        let mut client = decode.client.clone();
        let call = self.secret.attach(tonic::Request::new(req.clone()));
        metrics::histogram!("tandem_router_dispatch_seconds")
            .record((input_frontend + t0.elapsed()).as_secs_f64());
        metrics::counter!("tandem_router_dispatched_total", "prefill" => if prefill.is_some() { "remote" } else { "local" }).increment(1);
        let mut stream = client
            .decode(call)
            .await
            .map_err(status_error)?
            .into_inner();
        // The first event says whether the worker admitted the request.
        match stream.message().await.map_err(status_error)? {
            Some(pb::DecodeEvent {
                kind: Some(pb::DecodeEventKind::Admitted(_)),
            }) => {}
            Some(pb::DecodeEvent {
                kind: Some(pb::DecodeEventKind::Error(e)),
            }) => return Err(worker_error(&e)),
            other => {
                return Err(DispatchError::Internal(format!(
                    "decode worker {} answered {other:?} instead of admitting",
                    decode.addr
                )))
            }
        }
        self.index.record(&hashes, decode.addr);
        if let Some(p) = &prefill {
            self.index.record(&hashes, p.addr);
        }
        let (tx, rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let relay = Relay {
            decode: decode.clone(),
            secret: self.secret.clone(),
            retry_local: prefill.is_some().then_some(req),
            cancel: cancel.clone(),
            tx,
            _guards: (decode_guard, prefill_guard),
        };
        tokio::spawn(relay.run(stream));
        Ok(TokenStream {
            events: rx,
            cancel_on_drop: cancel.drop_guard(),
        })
    }
}

impl Backend for Dispatcher {
    fn generate(
        &self,
        input: GenerationInput,
    ) -> BoxFuture<'_, Result<TokenStream, DispatchError>> {
        Box::pin(self.start(input))
    }
}

/// Moves one request's events from its decode stream to the front end.
struct Relay {
    decode: Arc<Worker>,
    secret: ClusterSecret,
    /// The request, kept when its prompt was prefilled remotely: if that
    /// prefill fails before any token, the decode worker prefills it itself.
    retry_local: Option<pb::DecodeRequest>,
    cancel: CancellationToken,
    tx: mpsc::Sender<TokenEvent>,
    _guards: (workers::InFlightGuard, Option<workers::InFlightGuard>),
}

impl Relay {
    async fn run(mut self, mut stream: tonic::Streaming<pb::DecodeEvent>) {
        let mut sent_token = false;
        loop {
            let msg = tokio::select! {
                _ = self.cancel.cancelled() => return,
                m = stream.message() => m,
            };
            let ev = match msg {
                Ok(Some(pb::DecodeEvent { kind: Some(k) })) => k,
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let _ = self
                        .tx
                        .send(TokenEvent::Error(DispatchError::Internal(format!(
                            "decode worker {} ended the stream without finishing",
                            self.decode.addr
                        ))))
                        .await;
                    return;
                }
                Err(s) => {
                    let _ = self.tx.send(TokenEvent::Error(status_error(s))).await;
                    return;
                }
            };
            let out = match ev {
                pb::DecodeEventKind::Admitted(_) => continue,
                pb::DecodeEventKind::Token(t) => {
                    sent_token = true;
                    TokenEvent::Token(SampledToken {
                        id: t.token_id,
                        logprob: t.logprob,
                        top: t.top.iter().map(|x| (x.token_id, x.logprob)).collect(),
                    })
                }
                pb::DecodeEventKind::Finished(f) => TokenEvent::Finished {
                    reason: if f.reason() == pb::FinishReason::Length {
                        Finish::Length
                    } else {
                        Finish::Stop
                    },
                    prompt_tokens: f.prompt_tokens,
                    completion_tokens: f.completion_tokens,
                    cached_tokens: f.cached_tokens,
                },
                pb::DecodeEventKind::Error(e) => {
                    if !sent_token && e.code == "prefill_failed" {
                        if let Some(mut req) = self.retry_local.take() {
                            tracing::warn!(request = %req.request_id, error = %e.message, "remote prefill failed; prefilling on the decode worker");
                            metrics::counter!("tandem_router_prefill_fallbacks_total").increment(1);
                            req.prefill_address.clear();
                            let mut client = self.decode.client.clone();
                            match client
                                .decode(self.secret.attach(tonic::Request::new(req)))
                                .await
                            {
                                Ok(s) => {
                                    stream = s.into_inner();
                                    continue;
                                }
                                Err(s) => TokenEvent::Error(status_error(s)),
                            }
                        } else {
                            TokenEvent::Error(worker_error(&e))
                        }
                    } else {
                        TokenEvent::Error(worker_error(&e))
                    }
                }
            };
            let last = !matches!(out, TokenEvent::Token(_));
            if self.tx.send(out).await.is_err() || last {
                return;
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
