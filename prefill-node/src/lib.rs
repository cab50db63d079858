//! The prefill worker (`tandem prefill`): computes prompts, batched and
//! chunked by the engine's scheduler with its own radix prefix cache, and
//! streams each prompt's KV, layer by layer as the layers finish, to the
//! decode worker that asked for it. It answers with the first sampled token
//! once the decode worker has confirmed every block (with `n > 1` choices,
//! every choice's first token, all sampled from the one prompt pass).
//!
//! [`convert`] holds the proto ↔ engine conversions both worker roles use.

pub mod convert;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tandem_cluster::metrics::{self as metrics_names, InStage, Stage};
use tandem_cluster::{ClusterSecret, Drain, Role};
use tandem_engine::engine::{Engine, RequestSpec};
use tandem_engine::scheduler::{Event, ExportBlock, KvExport};
use tandem_kv_transfer::{
    BlockRegion, DataPlane, GrpcTransport, Handshake, KvSender, KvTransferError, KvTransport,
    LayoutDescriptor, TcpSender, TcpTransport, TransferConfig, TransferSummary,
};
use tandem_proto::worker as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// Who this worker is and how it sends KV.
#[derive(Debug, Clone)]
pub struct PrefillConfig {
    pub node_id: String,
    pub model_fingerprint: String,
    pub secret: ClusterSecret,
    pub transfer: TransferConfig,
    pub threads: u32,
}

/// The `tandem.v1.Worker` service of a prefill worker.
pub struct PrefillService {
    engine: Arc<Engine>,
    cfg: PrefillConfig,
    layout: LayoutDescriptor,
    drain: Drain,
    /// One HTTP/2 connection per decode worker that takes KV over gRPC.
    grpc_peers: Mutex<HashMap<SocketAddr, GrpcTransport>>,
}

/// Where a decode worker takes a prompt's KV: `host:port` (or
/// `tcp://host:port`) for the TCP transport, `grpc://host:port` for gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvTarget {
    Tcp(SocketAddr),
    Grpc(SocketAddr),
}

impl KvTarget {
    /// The address, whatever the transport.
    pub fn addr(&self) -> SocketAddr {
        match *self {
            Self::Tcp(a) | Self::Grpc(a) => a,
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let addr = |a: &str| a.parse::<SocketAddr>().map_err(|e| format!("{s:?}: {e}"));
        if let Some(a) = s.strip_prefix("grpc://") {
            Ok(Self::Grpc(addr(a)?))
        } else {
            Ok(Self::Tcp(addr(s.strip_prefix("tcp://").unwrap_or(s))?))
        }
    }
}

impl std::fmt::Display for KvTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Grpc(a) => write!(f, "grpc://{a}"),
        }
    }
}

/// How a sender's payload travels, for the log (gRPC's is its socket).
trait Plane {
    fn plane(&self) -> DataPlane;
}

impl Plane for TcpSender {
    fn plane(&self) -> DataPlane {
        self.data_plane()
    }
}

impl Plane for tandem_kv_transfer::GrpcSender {
    fn plane(&self) -> DataPlane {
        DataPlane::Socket
    }
}

impl PrefillService {
    /// `drain` counts the prefills in flight and refuses new ones once the
    /// node drains.
    pub fn new(engine: Arc<Engine>, cfg: PrefillConfig, drain: Drain) -> Self {
        // Reads 0 from the start, not "no data" until the first failure.
        metrics::counter!(metrics_names::KV_TRANSFER_FAILURES, "direction" => "sent").absolute(0);
        let layout = LayoutDescriptor::new(cfg.model_fingerprint.clone(), engine.kv_layout());
        Self {
            engine,
            cfg,
            layout,
            drain,
            grpc_peers: Mutex::default(),
        }
    }

    /// The gRPC transport to `addr`, connecting on first use.
    async fn grpc_peer(&self, addr: SocketAddr) -> Result<GrpcTransport, KvTransferError> {
        if let Some(t) = self.grpc_peers.lock().expect("peer map").get(&addr) {
            return Ok(t.clone());
        }
        let t = GrpcTransport::connect_to(addr, self.cfg.transfer.clone()).await?;
        self.grpc_peers
            .lock()
            .expect("peer map")
            .insert(addr, t.clone());
        Ok(t)
    }

    /// Runs one prompt and ships its KV; the body of `Prefill`.
    async fn prefill(&self, req: pb::PrefillRequest) -> Result<pb::PrefillResponse, Status> {
        let started = Instant::now();
        let kv_addr = KvTarget::parse(&req.kv_address)
            .map_err(|e| Status::invalid_argument(format!("kv_address {e}")))?;
        let params = convert::sampling(req.sampling.as_ref())?;
        let tokens = req.prompt.len();
        // The decode worker checks stop tokens and max_tokens; here the
        // prompt runs to its first sampled token, whatever it is: one per
        // choice, all from the one prompt pass (choice i with key + i).
        let n = req.n.max(1) as usize;
        let spec = RequestSpec {
            prompt: req.prompt,
            params,
            max_tokens: Some(1),
            stop_tokens: Vec::new(),
            priority: 0,
            generated: Vec::new(),
            n,
            adapter: convert::adapter_id(&self.engine, &req.adapter)?,
        };
        let waiting = InStage::enter(Stage::PrefillWaiting);
        let (tx, layers) = mpsc::unbounded_channel();
        let mut handle = self
            .engine
            .submit_with_export(spec, Box::new(ChannelExport(tx)))
            .map_err(convert::engine_status)?;
        let _cancel = CancelOnDrop(self.engine.clone(), handle.id);

        // Connect while the first chunk computes; layers queue meanwhile.
        let handshake = Handshake {
            layout: self.layout.clone(),
            secret: tandem_kv_transfer::ClusterSecret::new(self.cfg.secret.as_str().as_bytes()),
            request_id: req.transfer_id,
            tokens: tokens as u64,
        };
        let transfer_id = req.transfer_id;
        // Owns the layers' receiver: a transfer that fails drops it, and
        // the engine stops exporting (and computing) for nobody.
        let ship = async move {
            let mut layers = layers;
            match kv_addr {
                KvTarget::Tcp(a) => {
                    let t = TcpTransport::new(a, self.cfg.transfer.clone());
                    stream_kv(&t, handshake, transfer_id, waiting, started, &mut layers).await
                }
                KvTarget::Grpc(a) => {
                    let t = self.grpc_peer(a).await?;
                    let r =
                        stream_kv(&t, handshake, transfer_id, waiting, started, &mut layers).await;
                    if matches!(
                        r,
                        Err(KvTransferError::Grpc(_) | KvTransferError::PeerGone(_))
                    ) {
                        // The next transfer to this peer reconnects.
                        self.grpc_peers.lock().expect("peer map").remove(&a);
                    }
                    r
                }
            }
        };
        let events = async {
            // Choice by choice (the channels buffer the others meanwhile).
            let mut firsts = Vec::with_capacity(n);
            let mut cached = 0;
            let mut scores = None;
            let choices = std::iter::once(&mut handle.events).chain(handle.more.iter_mut());
            for (i, rx) in choices.enumerate() {
                let mut first = None;
                loop {
                    match rx.recv().await {
                        // Every choice gets the same; choice 0's are kept.
                        Some(Event::PromptLogprobs(lp)) => {
                            if i == 0 {
                                scores = Some(lp);
                            }
                        }
                        Some(Event::Token(s)) => first = Some(s),
                        Some(Event::Finished { cached_tokens, .. }) => {
                            if i == 0 {
                                cached = cached_tokens;
                            }
                            match first.take() {
                                Some(f) => firsts.push(f),
                                None => {
                                    return Err(Status::internal(
                                        "prefill finished without a token",
                                    ))
                                }
                            }
                            break;
                        }
                        Some(Event::Error(e)) => return Err(Status::internal(e)),
                        None => return Err(Status::internal("the engine dropped the request")),
                    }
                }
            }
            Ok((firsts, cached, scores))
        };
        let (shipped, sampled) = tokio::join!(ship, events);
        let (firsts, cached, scores) = sampled?;
        let summary = shipped.map_err(|e| {
            metrics::counter!(metrics_names::KV_TRANSFER_FAILURES, "direction" => "sent")
                .increment(1);
            Status::unavailable(format!("KV transfer to {kv_addr} failed: {e}"))
        })?;
        metrics::histogram!(metrics_names::REQUEST_PREFILL_TIME)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(metrics_names::PREFILL_PROMPT_TOKENS).increment(tokens as u64);
        metrics::counter!(metrics_names::KV_TRANSFER_BYTES, "direction" => "sent")
            .increment(summary.bytes);
        Ok(pb::PrefillResponse {
            first: firsts.first().map(convert::sampled_to_proto),
            cached_tokens: cached as u32,
            frames: summary.frames,
            bytes: summary.bytes,
            firsts: if n > 1 {
                firsts.iter().map(convert::sampled_to_proto).collect()
            } else {
                Vec::new()
            },
            prompt_logprobs: scores.as_deref().map(convert::prompt_logprobs_to_proto),
        })
    }
}

/// Connects to the decode worker and streams the prompt's KV, each layer as
/// the engine exports it, then waits for the worker's confirmation.
/// `waiting` ends (and the queue time is recorded) when the first layer is
/// out of the engine.
async fn stream_kv<T>(
    transport: &T,
    handshake: Handshake,
    transfer_id: u64,
    waiting: InStage,
    started: Instant,
    layers: &mut mpsc::UnboundedReceiver<(u32, Vec<OwnedBlock>)>,
) -> Result<TransferSummary, KvTransferError>
where
    T: KvTransport,
    T::Sender: Plane,
{
    let mut sender = transport.connect(handshake).await?;
    let connected = Instant::now();
    tracing::debug!(transfer_id, plane = ?sender.plane(), "KV transfer connected");
    let mut waiting = Some(waiting);
    let mut _sending = None;
    while let Some((layer, blocks)) = layers.recv().await {
        if waiting.take().is_some() {
            // The prompt's first layer is computed: out of the queue.
            metrics::histogram!(metrics_names::REQUEST_QUEUE_TIME)
                .record(started.elapsed().as_secs_f64());
            _sending = Some(InStage::enter(Stage::TransferInFlight));
        }
        let regions: Vec<BlockRegion<'_>> = blocks
            .iter()
            .map(|b: &OwnedBlock| BlockRegion {
                block: b.block,
                slots: b.slots,
                data: &b.data,
            })
            .collect();
        sender.send_layer_blocks(layer, &regions).await?;
    }
    let done = sender.finish().await;
    metrics::histogram!(metrics_names::KV_TRANSFER_SECONDS, "direction" => "sent")
        .record(connected.elapsed().as_secs_f64());
    done
}

#[tonic::async_trait]
impl pb::Worker for PrefillService {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(convert::node_info(
            &self.engine,
            Role::Prefill,
            &self.cfg.node_id,
            &self.cfg.model_fingerprint,
            String::new(),
            self.cfg.threads,
        )))
    }

    async fn load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::LoadReport>, Status> {
        Ok(Response::new(convert::load_report(
            &self.engine,
            self.drain.in_flight(),
        )))
    }

    type DecodeStream = tokio_stream::wrappers::ReceiverStream<Result<pb::DecodeEvent, Status>>;

    async fn decode(
        &self,
        _: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        Err(Status::unimplemented(
            "this is a prefill worker; send Decode to a decode worker",
        ))
    }

    async fn prefill(
        &self,
        req: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let _g = self
            .drain
            .enter()
            .ok_or_else(|| Status::unavailable("this prefill worker is draining"))?;
        let req = req.into_inner();
        let span = tracing::info_span!("prefill", request_id = %req.request_id);
        tracing::Instrument::instrument(self.prefill(req), span)
            .await
            .map(Response::new)
    }

    async fn cancel(
        &self,
        _: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        // A prefill is cancelled by dropping its call.
        Ok(Response::new(pb::CancelResponse { found: false }))
    }

    async fn cached_prefix(
        &self,
        req: Request<pb::CachedPrefixRequest>,
    ) -> Result<Response<pb::CachedPrefixResponse>, Status> {
        let req = req.into_inner();
        let adapter = convert::adapter_id(&self.engine, &req.adapter)?;
        let n = convert::cached_prefix(&self.engine, adapter, req.tokens).await;
        Ok(Response::new(pb::CachedPrefixResponse { tokens: n }))
    }

    async fn load_adapter(
        &self,
        req: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::AdapterList>, Status> {
        convert::load_adapter(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn unload_adapter(
        &self,
        req: Request<pb::UnloadAdapterRequest>,
    ) -> Result<Response<pb::AdapterList>, Status> {
        convert::unload_adapter(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }
}

/// One exported block, copied out of the pool.
struct OwnedBlock {
    block: u32,
    slots: u32,
    data: Vec<f32>,
}

/// Copies exported layers out of the engine thread onto a channel that the
/// shipping task drains; a closed channel (the call was dropped) abandons
/// the request.
struct ChannelExport(mpsc::UnboundedSender<(u32, Vec<OwnedBlock>)>);

impl KvExport for ChannelExport {
    fn export(&mut self, layer: usize, blocks: &[ExportBlock<'_>]) -> bool {
        let owned = blocks
            .iter()
            .map(|b| OwnedBlock {
                block: b.block,
                slots: b.slots,
                data: b.data.to_vec(),
            })
            .collect();
        self.0.send((layer as u32, owned)).is_ok()
    }
}

/// Cancels an engine request when the RPC that owns it goes away.
pub struct CancelOnDrop(pub Arc<Engine>, pub u64);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::KvTarget;

    #[test]
    fn kv_targets_parse_with_and_without_a_scheme() {
        let a = "127.0.0.1:7001".parse().unwrap();
        let v6 = "[::1]:7001".parse().unwrap();
        assert_eq!(KvTarget::parse("127.0.0.1:7001"), Ok(KvTarget::Tcp(a)));
        assert_eq!(
            KvTarget::parse("tcp://127.0.0.1:7001"),
            Ok(KvTarget::Tcp(a))
        );
        assert_eq!(
            KvTarget::parse("grpc://127.0.0.1:7001"),
            Ok(KvTarget::Grpc(a))
        );
        assert_eq!(KvTarget::parse("grpc://[::1]:7001"), Ok(KvTarget::Grpc(v6)));
        for t in [KvTarget::Tcp(a), KvTarget::Grpc(v6)] {
            assert_eq!(KvTarget::parse(&t.to_string()), Ok(t));
        }
        for bad in [
            "",
            "grpc://",
            "http://127.0.0.1:7001",
            "127.0.0.1",
            "grpc://host:1",
        ] {
            let e = KvTarget::parse(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
