//! The decode worker (`tandem decode`): admits requests, reserving KV blocks
//! for the prompt at admission; has the prompt's KV computed by the prefill
//! worker the router named (which streams it, layer by layer, to this
//! worker's raw-TCP KV port, or over gRPC to its one port) or computes it
//! here; joins the sequence into the
//! continuous batch and streams the tokens back.
//!
//! Received KV lands straight in the blocks reserved at admission, written
//! by the transfer's task while the engine thread goes on decoding the
//! rest of the batch; installing it only joins the sequence. (An engine
//! that keeps its KV elsewhere, on a device or in the shards of a sharded
//! worker, has the reservation stage it and copies it in at install.)
//!
//! Parallel sampling (`n > 1`): the request is one engine request whose
//! choices share the prompt's KV blocks (fork + copy-on-write); with a
//! remote prefill, the prefill worker samples every choice's first token
//! from the one prompt pass. The choices' events share the `Decode` stream,
//! tagged with their `index`; `Cancel` with an index stops one choice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_cluster::metrics::{self as metrics_names, InStage, RequestTimer, Stage};
use tandem_cluster::{ClusterSecret, Drain, Role};
use tandem_engine::engine::{Engine, RequestHandle, RequestSpec, Reservation};
use tandem_kv_transfer::{
    grpc, CancellationToken, KvReceiver, LayoutDescriptor, ReceiverConfig, TcpKvListener,
    TransferConfig,
};
use tandem_prefill::convert;
use tandem_prefill::{CancelOnDrop, KvTarget};
use tandem_proto::worker as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Who this worker is and how it receives KV.
#[derive(Debug, Clone)]
pub struct DecodeConfig {
    pub node_id: String,
    pub model_fingerprint: String,
    pub secret: ClusterSecret,
    pub transfer: TransferConfig,
    pub threads: u32,
    /// Longest a remote prefill (compute plus transfer) may take, plus
    /// `tandem_kv_transfer::PREFILL_ALLOWANCE_PER_TOKEN` per prompt token.
    pub prefill_timeout: Duration,
    /// New requests are refused (the router tries another worker or answers
    /// 503) while this many wait for a place in the batch: the queue stays
    /// bounded under overload.
    pub max_waiting: usize,
    /// How KV arrives.
    pub kv_transport: KvTransportKind,
    /// What a failed remote prefill (the prefill worker or the KV transfer)
    /// does to the request.
    pub on_kv_failure: KvFailurePolicy,
}

/// What a decode worker does when a prompt's KV does not arrive (the
/// prefill worker failed or vanished, the transfer broke or timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvFailurePolicy {
    /// Fail the request to the router, which prefills it again on another
    /// prefill worker (or on a decode worker when none is left) and marks
    /// the failed one down: a broken prefill worker or KV path shows up in
    /// the router's retry and marked-down counters at once.
    #[default]
    Fail,
    /// Compute the prompt here instead, with a warning and
    /// `tandem_kv_recomputed_total`: no round trip through the router, and
    /// the prefill worker is not marked down, but the router is told
    /// (`PrefillRecomputed`) and keeps that prefill worker away from this
    /// one for a while; every recomputed prompt costs this worker's decode
    /// batch a prefill.
    Recompute,
}

/// How a decode worker takes KV. The prefill worker follows: the decode
/// worker hands it the address with its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvTransportKind {
    /// Length-prefixed frames on a raw TCP socket (with the shared-memory
    /// ring for prefill workers on this host): the fast path.
    #[default]
    Tcp,
    /// The `tandem.v1.KvTransfer` gRPC service over HTTP/2 on the node's
    /// own port: one port per node, for networks that pass gRPC and little
    /// else (meshes, gRPC-aware proxies).
    Grpc,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<KvReceiver>>>>;

/// The `tandem.v1.Worker` service of a decode worker.
pub struct DecodeService {
    inner: Arc<Inner>,
    /// With gRPC KV: the `KvTransfer` service, for the node's port.
    kv_service: Option<grpc::GrpcKvService>,
}

struct Inner {
    engine: Arc<Engine>,
    cfg: DecodeConfig,
    /// Where prefill workers send KV, with the transport's scheme.
    kv_target: KvTarget,
    /// Transfers expected, by transfer id: the KV listener hands each
    /// accepted connection to the request that reserved blocks for it.
    pending: Pending,
    next_transfer: AtomicU64,
    /// Engine ids by client request id, for `Cancel`.
    by_request: Mutex<HashMap<String, u64>>,
    drain: Drain,
    prefill_clients: Mutex<HashMap<String, pb::WorkerClient<Channel>>>,
}

impl DecodeService {
    /// Starts taking KV as `cfg.kv_transport` says. TCP: binds the KV port
    /// on `kv_bind` and accepts transfers; `kv_host` is the address prefill
    /// workers reach it at (the bound one when `None`; needed when binding a
    /// wildcard address). gRPC: the transfers come through the `KvTransfer`
    /// service ([`Self::take_kv_service`]) on the node's own port, which
    /// prefill workers reach at `node`.
    pub async fn start(
        engine: Arc<Engine>,
        cfg: DecodeConfig,
        kv_bind: SocketAddr,
        kv_host: Option<std::net::IpAddr>,
        node: SocketAddr,
        drain: Drain,
        shutdown: CancellationToken,
    ) -> Result<Self, tandem_kv_transfer::KvTransferError> {
        // Failure counters read 0 from the start, not "no data" until the
        // first failure (dashboards and alerts on their rate need them).
        metrics::counter!(metrics_names::KV_TRANSFER_FAILURES, "direction" => "received")
            .absolute(0);
        metrics::counter!(metrics_names::KV_RECOMPUTED).absolute(0);
        let expected = LayoutDescriptor::new(cfg.model_fingerprint.clone(), engine.kv_layout());
        let receiver = ReceiverConfig {
            expected,
            secret: tandem_kv_transfer::ClusterSecret::new(cfg.secret.as_str().as_bytes()),
            transfer: cfg.transfer.clone(),
        };
        let pending: Pending = Arc::default();
        let (kv_target, kv_service) = match cfg.kv_transport {
            KvTransportKind::Tcp => {
                let listener = TcpKvListener::bind(kv_bind, receiver).await?;
                let mut addr = listener.local_addr()?;
                if let Some(h) = kv_host {
                    addr.set_ip(h);
                }
                tokio::spawn(accept_loop(listener, pending.clone(), shutdown));
                (KvTarget::Tcp(addr), None)
            }
            KvTransportKind::Grpc => {
                let (svc, incoming) = grpc::kv_service(receiver);
                tokio::spawn(grpc_accept_loop(incoming, pending.clone()));
                (KvTarget::Grpc(node), Some(svc))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                cfg,
                kv_target,
                pending,
                next_transfer: AtomicU64::new(1),
                by_request: Mutex::default(),
                drain,
                prefill_clients: Mutex::default(),
            }),
            kv_service,
        })
    }

    /// The `KvTransfer` service to serve on the node's port (gRPC KV; once).
    pub fn take_kv_service(&mut self) -> Option<grpc::GrpcKvService> {
        self.kv_service.take()
    }

    /// Where prefill workers send this worker's KV.
    pub fn kv_addr(&self) -> SocketAddr {
        self.inner.kv_target.addr()
    }
}

/// Accepts KV connections; each handshake runs on its own task so a slow
/// peer holds up nobody, then goes to the request that expects it.
async fn accept_loop(listener: TcpKvListener, pending: Pending, shutdown: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = listener.accept_connection() => c,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "KV accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let pending = pending.clone();
        tokio::spawn(async move {
            let rx = match conn.handshake().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "KV handshake refused");
                    return;
                }
            };
            deliver(&pending, rx);
        });
    }
}

/// Hands transfers accepted by the gRPC service (handshake verified) to
/// the requests that expect them; ends with the server.
async fn grpc_accept_loop(mut incoming: mpsc::Receiver<KvReceiver>, pending: Pending) {
    while let Some(rx) = incoming.recv().await {
        deliver(&pending, rx);
    }
}

/// Gives an accepted transfer to the request that reserved blocks for it.
/// One nobody expects (its request gave up) is dropped: the sender sees
/// the transfer fail.
fn deliver(pending: &Pending, rx: KvReceiver) {
    let id = rx.handshake().request_id;
    let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
    match waiter {
        Some(w) => {
            let _ = w.send(rx);
        }
        None => tracing::warn!(transfer = id, "KV for a transfer nobody expects"),
    }
}

impl Inner {
    fn prefill_client(&self, addr: &str) -> Result<pb::WorkerClient<Channel>, Status> {
        let mut map = self.prefill_clients.lock().expect("client map");
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::invalid_argument(format!("prefill address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // A prefill worker that stops answering fails the call in ~15 s.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(10));
        let c =
            pb::WorkerClient::new(ep.connect_lazy()).max_decoding_message_size(pb::MAX_REPLY_BYTES);
        map.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Gets the prompt's KV from a prefill worker into `reservation`'s
    /// blocks and joins the request into the batch.
    async fn remote_prefill(
        &self,
        req: &pb::DecodeRequest,
        spec: RequestSpec,
        mut reservation: Reservation,
    ) -> Result<RequestHandle, Status> {
        let _stage = InStage::enter(Stage::WaitingForKv);
        let transfer_id = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending map")
            .insert(transfer_id, tx);
        let _unregister = Unregister(self.pending.clone(), transfer_id);
        let mut client = self.prefill_client(&req.prefill_address)?;
        let mut call = Request::new(pb::PrefillRequest {
            request_id: req.request_id.clone(),
            prompt: spec.prompt.clone(),
            sampling: req.sampling.clone(),
            kv_address: self.kv_target.to_string(),
            transfer_id,
            n: spec.choices() as u32,
            adapter: req.adapter.clone(),
        });
        let prefill_timeout = self.cfg.prefill_timeout
            + tandem_kv_transfer::PREFILL_ALLOWANCE_PER_TOKEN
                * spec.prompt.len().min(u32::MAX as usize) as u32;
        call.set_timeout(prefill_timeout);
        let call = self.cfg.secret.attach(call);
        // Never cancelled: the select below drops the receive instead.
        let cancel = CancellationToken::new();
        let receive = async {
            let receiver = tokio::time::timeout(prefill_timeout, rx)
                .await
                .map_err(|_| Status::unavailable("the prefill worker never connected"))?
                .map_err(|_| Status::internal("KV listener gone"))?;
            let started = Instant::now();
            let r = receiver.receive_into(&mut reservation, &cancel).await;
            metrics::histogram!(metrics_names::KV_TRANSFER_SECONDS, "direction" => "received")
                .record(started.elapsed().as_secs_f64());
            r.map_err(|e| {
                metrics::counter!(metrics_names::KV_TRANSFER_FAILURES, "direction" => "received")
                    .increment(1);
                Status::unavailable(format!("KV transfer failed: {e}"))
            })
        };
        let prefill = client.prefill(call);
        // The first failure of either leg ends both: returning drops the
        // other future (which cancels the prefill call or stops receiving).
        let (summary, reply) = {
            tokio::pin!(receive, prefill);
            let (mut received, mut prefilled) = (None, None);
            while received.is_none() || prefilled.is_none() {
                tokio::select! {
                    r = &mut receive, if received.is_none() => received = Some(r?),
                    p = &mut prefill, if prefilled.is_none() => match p {
                        Ok(r) => prefilled = Some(r.into_inner()),
                        // Whatever broke the prefill leg (the worker died, a
                        // reset stream, a deadline) is worth a retry elsewhere;
                        // only a request the prefill worker calls invalid is not.
                        Err(s) => {
                            let msg = format!(
                                "prefill worker {}: {:?}: {}",
                                req.prefill_address,
                                s.code(),
                                s.message()
                            );
                            return Err(if s.code() == tonic::Code::InvalidArgument {
                                Status::invalid_argument(msg)
                            } else {
                                Status::unavailable(msg)
                            });
                        }
                    },
                }
            }
            (received.expect("received"), prefilled.expect("prefilled"))
        };
        metrics::counter!(metrics_names::KV_TRANSFER_BYTES, "direction" => "received")
            .increment(summary.bytes);
        // One first token per choice (`firsts` is only filled for n > 1).
        let firsts: Vec<_> = if reply.firsts.is_empty() {
            reply
                .first
                .iter()
                .map(convert::sampled_from_proto)
                .collect()
        } else {
            reply
                .firsts
                .iter()
                .map(convert::sampled_from_proto)
                .collect()
        };
        if firsts.len() != spec.choices() {
            return Err(Status::internal(format!(
                "the prefill worker sent {} first tokens for {} choices",
                firsts.len(),
                spec.choices()
            )));
        }
        let scores = reply
            .prompt_logprobs
            .as_ref()
            .map(convert::prompt_logprobs_from_proto);
        self.engine
            .install(reservation, spec, firsts, scores)
            .await
            .map_err(convert::engine_status)
    }

    /// The body of `Decode`: admission, prefill (here or remote), then the
    /// token stream until finished or the client goes away.
    async fn decode(
        self: Arc<Self>,
        req: pb::DecodeRequest,
        out: mpsc::Sender<Result<pb::DecodeEvent, Status>>,
    ) {
        let Some(_g) = self.drain.enter() else {
            let _ = out
                .send(Err(Status::unavailable("this decode worker is draining")))
                .await;
            return;
        };
        let waiting = self.engine.stats().waiting;
        if waiting >= self.cfg.max_waiting {
            metrics::counter!(metrics_names::DECODE_REFUSED, "reason" => "queue_full").increment(1);
            let _ = out
                .send(Err(Status::resource_exhausted(format!(
                    "{waiting} requests are already waiting on this decode worker"
                ))))
                .await;
            return;
        }
        let mut timer = RequestTimer::new(Instant::now());
        let spec = match convert::sampling(req.sampling.as_ref())
            .and_then(|params| Ok((params, convert::adapter_id(&self.engine, &req.adapter)?)))
        {
            Ok((params, adapter)) => RequestSpec {
                prompt: req.prompt.clone(),
                params,
                max_tokens: req.max_tokens.map(|n| n as usize),
                stop_tokens: req.stop_token_ids.clone(),
                priority: req.priority,
                generated: req.generated.clone(),
                n: req.n.max(1) as usize,
                adapter,
            },
            Err(s) => {
                let _ = out.send(Err(s)).await;
                return;
            }
        };
        // A resumed stream is always prefilled here.
        let remote = !req.prefill_address.is_empty() && req.generated.is_empty();
        let admitted = pb::DecodeEvent {
            kind: Some(pb::DecodeEventKind::Admitted(pb::Admitted {
                transferred_tokens: if remote { spec.prompt.len() as u32 } else { 0 },
            })),
            index: 0,
        };
        // Where the prompt ends up prefilled (the timings' label).
        let mut prefilled_remotely = remote;
        let handle = if remote {
            // Admitted once the prompt's blocks are reserved (which may wait
            // for the batch to give blocks back): a worker that cannot find
            // them refuses before admission, so the router can try another.
            let reserved = tokio::select! {
                r = self.engine.reserve(spec.prompt.len()) => r,
                _ = out.closed() => return,
            };
            let reservation = match reserved {
                Ok(r) => r,
                Err(e) => {
                    let _ = out.send(Err(convert::engine_status(e))).await;
                    return;
                }
            };
            timer.admitted();
            let _ = out.send(Ok(admitted)).await;
            let recompute =
                (self.cfg.on_kv_failure == KvFailurePolicy::Recompute).then(|| spec.clone());
            let r = tokio::select! {
                r = self.remote_prefill(&req, spec, reservation) => r,
                _ = out.closed() => return,
            };
            match (r, recompute) {
                (Err(s), Some(spec)) if code_name(s.code()) == "prefill_failed" => {
                    tracing::warn!(
                        request = %req.request_id,
                        prefill = %req.prefill_address,
                        error = %s.message(),
                        "the prompt's KV did not arrive; computing it here (--on-kv-failure recompute)"
                    );
                    metrics::counter!(metrics_names::KV_RECOMPUTED).increment(1);
                    prefilled_remotely = false;
                    // Tell the router, so that it keeps this pair apart.
                    let _ = out
                        .send(Ok(pb::DecodeEvent {
                            kind: Some(pb::DecodeEventKind::Recomputed(pb::PrefillRecomputed {
                                reason: s.message().to_string(),
                            })),
                            index: 0,
                        }))
                        .await;
                    self.engine.submit(spec).map_err(convert::engine_status)
                }
                (r, _) => r,
            }
        } else {
            let h = self.engine.submit(spec).map_err(convert::engine_status);
            if h.is_ok() {
                timer.admitted();
                let _ = out.send(Ok(admitted)).await;
            }
            h
        };
        let mut handle = match handle {
            Ok(h) => h,
            Err(s) => {
                if remote {
                    // Admission already went out: report in-band, to every choice.
                    for index in 0..req.n.max(1) {
                        let _ = out
                            .send(Ok(pb::DecodeEvent {
                                kind: Some(pb::DecodeEventKind::Error(pb::WorkerError {
                                    code: code_name(s.code()).into(),
                                    message: s.message().to_string(),
                                })),
                                index,
                            }))
                            .await;
                    }
                } else {
                    let _ = out.send(Err(s)).await;
                }
                return;
            }
        };
        let _cancel = CancelOnDrop(self.engine.clone(), handle.id);
        if !req.request_id.is_empty() {
            if let Ok(mut m) = self.by_request.lock() {
                m.insert(req.request_id.clone(), handle.id);
            }
        }
        // Every choice's events on the one stream, tagged with its index; the
        // stream ends when every choice has ended (or was cancelled alone).
        // The request's timings follow choice 0.
        let mut choices = tokio_stream::StreamMap::new();
        let receivers = std::iter::once(handle.events).chain(std::mem::take(&mut handle.more));
        for (i, rx) in receivers.enumerate() {
            choices.insert(i as u32, UnboundedReceiverStream::new(rx));
        }
        loop {
            let ev = tokio::select! {
                e = choices.next() => e,
                _ = out.closed() => break,
            };
            let Some((index, ev)) = ev else { break };
            if index == 0 {
                record_event(&mut timer, &ev, prefilled_remotely);
            }
            let last = matches!(
                ev,
                tandem_engine::scheduler::Event::Finished { .. }
                    | tandem_engine::scheduler::Event::Error(_)
            );
            if last {
                choices.remove(&index);
            }
            let mut msg = convert::event_to_proto(ev);
            msg.index = index;
            if out.send(Ok(msg)).await.is_err() || choices.is_empty() {
                break;
            }
        }
        if let Ok(mut m) = self.by_request.lock() {
            m.remove(&req.request_id);
        }
    }
}

/// Feeds one engine event to the request's timer: time to first token (by
/// where the prompt was prefilled), inter-token latency, phases, duration.
fn record_event(timer: &mut RequestTimer, ev: &tandem_engine::scheduler::Event, remote: bool) {
    use tandem_engine::scheduler::Event;
    match ev {
        Event::Token(_) => {
            if let Some(ttft) = timer.token() {
                metrics::histogram!(metrics_names::TTFT, "prefill" => if remote { "remote" } else { "local" })
                    .record(ttft.as_secs_f64());
            }
        }
        Event::Finished { .. } => {
            if let Some(total) = timer.finished() {
                metrics::histogram!(metrics_names::REQUEST_DURATION).record(total.as_secs_f64());
            }
        }
        Event::PromptLogprobs(_) | Event::Error(_) => {}
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::InvalidArgument => "invalid_request",
        tonic::Code::ResourceExhausted => "overloaded",
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => "prefill_failed",
        _ => "internal",
    }
}

/// Forgets an expected transfer (when the request ends first).
struct Unregister(Pending, u64);

impl Drop for Unregister {
    fn drop(&mut self) {
        if let Ok(mut p) = self.0.lock() {
            p.remove(&self.1);
        }
    }
}

#[tonic::async_trait]
impl pb::Worker for DecodeService {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let i = &self.inner;
        Ok(Response::new(convert::node_info(
            &i.engine,
            Role::Decode,
            &i.cfg.node_id,
            &i.cfg.model_fingerprint,
            i.kv_target.to_string(),
            i.cfg.threads,
        )))
    }

    async fn load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::LoadReport>, Status> {
        Ok(Response::new(convert::load_report(
            &self.inner.engine,
            self.inner.drain.in_flight(),
        )))
    }

    type DecodeStream = tokio_stream::wrappers::ReceiverStream<Result<pb::DecodeEvent, Status>>;

    async fn decode(
        &self,
        req: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let req = req.into_inner();
        // The router's request id follows the request into every log line,
        // here and on the prefill worker it names.
        let span = tracing::info_span!("decode", request_id = %req.request_id);
        tokio::spawn(tracing::Instrument::instrument(
            self.inner.clone().decode(req, tx),
            span,
        ));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn prefill(
        &self,
        _: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        Err(Status::unimplemented(
            "this is a decode worker; send Prefill to a prefill worker",
        ))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let pb::CancelRequest {
            request_id: id,
            index,
        } = req.into_inner();
        let found = self
            .inner
            .by_request
            .lock()
            .ok()
            .and_then(|m| m.get(&id).copied());
        if let Some(e) = found {
            match index {
                Some(i) => self.inner.engine.cancel_choice(e, i as usize),
                None => self.inner.engine.cancel(e),
            }
        }
        Ok(Response::new(pb::CancelResponse {
            found: found.is_some(),
        }))
    }

    async fn cached_prefix(
        &self,
        req: Request<pb::CachedPrefixRequest>,
    ) -> Result<Response<pb::CachedPrefixResponse>, Status> {
        let req = req.into_inner();
        let adapter = convert::adapter_id(&self.inner.engine, &req.adapter)?;
        let n = convert::cached_prefix(&self.inner.engine, adapter, req.tokens).await;
        Ok(Response::new(pb::CachedPrefixResponse { tokens: n }))
    }

    async fn load_adapter(
        &self,
        req: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::AdapterList>, Status> {
        convert::load_adapter(&self.inner.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn unload_adapter(
        &self,
        req: Request<pb::UnloadAdapterRequest>,
    ) -> Result<Response<pb::AdapterList>, Status> {
        convert::unload_adapter(&self.inner.engine, req.into_inner())
            .await
            .map(Response::new)
    }
}
