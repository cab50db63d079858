//! gRPC transport: `tandem.v1.KvTransfer/Transfer`, a bidirectional stream.
//!
//! The sender streams `KvFrame`s (handshake, batches of blocks, end); the
//! receiver answers `Accepted` (or `Refused`) right after the handshake and
//! `Done` (or `Failed`) at the end. HTTP/2 flow control is the backpressure;
//! tonic's defaults (64 KiB windows, 4 MiB messages) would throttle KV, so
//! both windows and the message limits are raised.
//!
//! The transfer lease works as on TCP ([`TransferConfig::lease`]): while a
//! side has nothing to say it sends a heartbeat every third of the lease
//! (the sender an empty batch of blocks, the receiver a reply without a
//! kind), and each side waits at most one lease for the other.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tandem_engine::kv::KvLayout;
use tandem_proto::kv as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};

use crate::error::{KvTransferError, Result};
use crate::frame::{encode_payload_bytes, frame_seed, payload_len};
use crate::layout::{self, Handshake, TransferSummary};
use crate::sink::{Assembler, KvSink};
use crate::tcp::check_region;
use crate::transport::{
    with_deadline, BlockRegion, KvReceiver, KvSender, KvTransport, ReceiverConfig, ReceiverInner,
    TransferConfig,
};

/// Largest gRPC message either side accepts (a batch of blocks is about
/// `TransferConfig::batch_bytes`; this only bounds a hostile peer).
pub const MAX_MESSAGE: usize = 64 << 20;
/// HTTP/2 per-stream window: one layer of a long prompt in flight.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 per-connection window: several transfers share one connection.
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Frames queued between the sender's encoder and the HTTP/2 connection.
const SEND_QUEUE: usize = 4;

/// The tonic service: validates handshakes and hands accepted transfers to
/// the application through a channel.
pub struct GrpcKvService {
    cfg: Arc<ReceiverConfig>,
    incoming: mpsc::Sender<KvReceiver>,
}

/// The service, ready to add to a tonic router (with raised message
/// limits), and the stream of accepted transfers.
pub fn kv_service(
    cfg: ReceiverConfig,
) -> (
    pb::KvTransferServer<GrpcKvService>,
    mpsc::Receiver<KvReceiver>,
) {
    let (tx, rx) = mpsc::channel(64);
    let svc = GrpcKvService {
        cfg: Arc::new(cfg),
        incoming: tx,
    };
    (
        pb::KvTransferServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        rx,
    )
}

/// A tonic server builder with tandem's HTTP/2 settings for KV.
pub fn server_builder() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(1 << 20)
        .tcp_nodelay(true)
}

/// Serves the KV service (plus `grpc.health.v1.Health` and reflection) on
/// `addr` until `cancel`; returns the bound address, the server task and
/// the accepted transfers.
pub async fn serve(
    addr: SocketAddr,
    cfg: ReceiverConfig,
    cancel: CancellationToken,
) -> Result<(
    SocketAddr,
    tokio::task::JoinHandle<Result<()>>,
    mpsc::Receiver<KvReceiver>,
)> {
    let sock = crate::tcp::socket_for(&addr, cfg.transfer.socket_buffer)?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    let listener = sock.listen(1024)?;
    let bound = listener.local_addr()?;
    let (svc, rx) = kv_service(cfg);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::KvTransferServer<GrpcKvService>>()
        .await;
    let reflection =
        tandem_proto::reflection_service().map_err(|e| KvTransferError::Grpc(e.to_string()))?;
    let task = tokio::spawn(async move {
        server_builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(svc)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                cancel.cancelled_owned(),
            )
            .await
            .map_err(|e| KvTransferError::Grpc(e.to_string()))
    });
    Ok((bound, task, rx))
}

#[tonic::async_trait]
impl pb::KvTransfer for GrpcKvService {
    type TransferStream = ReceiverStream<Result<pb::KvReply, Status>>;

    async fn transfer(
        &self,
        req: Request<Streaming<pb::KvFrame>>,
    ) -> Result<Response<Self::TransferStream>, Status> {
        let mut inbound = req.into_inner();
        let cfg = &self.cfg.transfer;
        let (tx, rx) = mpsc::channel(4);
        let first = with_deadline("handshake read", cfg.io_timeout, async {
            inbound.message().await.map_err(Into::into)
        })
        .await
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let hs = match first.and_then(|f| f.kind) {
            Some(pb::FrameKind::Handshake(h)) => Handshake::from_proto(&h),
            _ => Err(KvTransferError::Protocol(
                "the first frame is not a handshake".into(),
            )),
        }
        .and_then(|hs| hs.verify(&self.cfg.expected, &self.cfg.secret).map(|()| hs));
        match hs {
            Err(e) => {
                tracing::warn!(class = e.class(), error = %e, "KV transfer refused");
                let _ = tx.try_send(Ok(layout::refusal(&e)));
            }
            Ok(hs) => {
                let _ = tx.try_send(Ok(pb::KvReply {
                    kind: Some(pb::ReplyKind::Accepted(true)),
                    shared_memory: false,
                }));
                let r = KvReceiver {
                    handshake: hs,
                    cfg: cfg.clone(),
                    inner: ReceiverInner::Grpc(GrpcIncoming { inbound, reply: tx }),
                };
                if self.incoming.send(r).await.is_err() {
                    return Err(Status::unavailable("the KV receiver is shutting down"));
                }
            }
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// An error reading the sender's stream: a broken body (the sender died or
/// reset the stream) is the peer gone; a message we cannot decode is theirs.
fn inbound_error(s: Status) -> KvTransferError {
    match s.code() {
        tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::Unavailable
        | tonic::Code::Aborted => {
            KvTransferError::PeerGone(format!("{}: {}", s.code(), s.message()))
        }
        _ => KvTransferError::Protocol(format!("{}: {}", s.code(), s.message())),
    }
}

pub(crate) struct GrpcIncoming {
    inbound: Streaming<pb::KvFrame>,
    reply: mpsc::Sender<Result<pb::KvReply, Status>>,
}

impl GrpcIncoming {
    pub(crate) async fn receive<S: KvSink + ?Sized>(
        mut self,
        layout: KvLayout,
        tokens: u64,
        cfg: &TransferConfig,
        sink: &mut S,
    ) -> Result<TransferSummary> {
        let mut asm = Assembler::new(layout, tokens, sink);
        let reply = self.reply.clone();
        let _beats = beat_every(cfg.heartbeat_every(), move || {
            let reply = reply.clone();
            async move { reply.send(Ok(pb::KvReply::default())).await.is_ok() }
        });
        let r = async {
            loop {
                let msg = match tokio::time::timeout(cfg.lease, self.inbound.message()).await {
                    Err(_) => {
                        return Err(KvTransferError::LeaseExpired {
                            peer: "sender",
                            after: cfg.lease,
                        })
                    }
                    Ok(m) => m.map_err(inbound_error)?,
                };
                match msg.and_then(|m| m.kind) {
                    None => {
                        return Err(KvTransferError::PeerGone(
                            "stream ended before the End frame".into(),
                        ))
                    }
                    Some(pb::FrameKind::Blocks(b)) => {
                        for blk in &b.blocks {
                            asm.block(blk.layer, blk.block, blk.slots, blk.crc32c, &blk.payload)?;
                        }
                    }
                    Some(pb::FrameKind::End(e)) => return asm.finish(e.frames),
                    Some(pb::FrameKind::Handshake(_)) => {
                        return Err(KvTransferError::Protocol(
                            "second handshake in one transfer".into(),
                        ))
                    }
                }
            }
        }
        .await;
        let reply = layout::outcome(&r);
        drop(_beats);
        // Best effort: a dead sender cannot hear it, and the outcome here stands.
        let _ = tokio::time::timeout(cfg.io_timeout, self.reply.send(Ok(reply))).await;
        r
    }
}

/// Runs `beat` every `every` until dropped (or until `beat` says the peer
/// is gone). A beat in progress is never interrupted: stopping takes
/// effect between beats.
fn beat_every<F, Fut>(every: std::time::Duration, mut beat: F) -> Beats
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !beat().await {
                return;
            }
        }
    });
    Beats(stop)
}

/// Stops the heartbeats of [`beat_every`] when dropped.
struct Beats(CancellationToken);

impl Drop for Beats {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The next reply that is not a heartbeat, waiting at most one lease for
/// each message.
async fn next_reply(
    replies: &mut Streaming<pb::KvReply>,
    lease: std::time::Duration,
) -> Result<Option<pb::KvReply>> {
    loop {
        let msg = match tokio::time::timeout(lease, replies.message()).await {
            Err(_) => {
                return Err(KvTransferError::LeaseExpired {
                    peer: "receiver",
                    after: lease,
                })
            }
            Ok(m) => m?,
        };
        match msg {
            Some(pb::KvReply { kind: None, .. }) => continue,
            other => return Ok(other),
        }
    }
}

/// Client side: a channel to a receiver (one HTTP/2 connection, shared by
/// every transfer to that peer).
#[derive(Debug, Clone)]
pub struct GrpcTransport {
    channel: Channel,
    cfg: TransferConfig,
}

impl GrpcTransport {
    pub async fn connect_to(addr: SocketAddr, cfg: TransferConfig) -> Result<Self> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| KvTransferError::Grpc(e.to_string()))?
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .tcp_nodelay(true)
            .connect_timeout(cfg.io_timeout)
            .connect()
            .await
            .map_err(|e| KvTransferError::Grpc(e.to_string()))?;
        Ok(Self { channel, cfg })
    }
}

impl KvTransport for GrpcTransport {
    type Sender = GrpcSender;

    async fn connect(&self, handshake: Handshake) -> Result<GrpcSender> {
        let cfg = self.cfg.clone();
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let hs = pb::KvFrame {
            kind: Some(pb::FrameKind::Handshake(handshake.to_proto())),
        };
        tx.send(hs)
            .await
            .map_err(|_| KvTransferError::PeerGone("send queue closed".into()))?;
        let mut client = pb::KvTransferClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let resp = with_deadline("connect", cfg.io_timeout, async {
            client
                .transfer(ReceiverStream::new(rx))
                .await
                .map_err(Into::into)
        })
        .await?;
        let mut replies = resp.into_inner();
        let first = with_deadline("handshake reply", cfg.io_timeout, async {
            replies.message().await.map_err(Into::into)
        })
        .await?;
        layout::accepted(first)?;
        let beat_tx = tx.clone();
        let request_id = handshake.request_id;
        let beats = beat_every(cfg.heartbeat_every(), move || {
            let tx = beat_tx.clone();
            async move {
                let empty = pb::KvFrame {
                    kind: Some(pb::FrameKind::Blocks(pb::KvBlocks {
                        request_id,
                        blocks: Vec::new(),
                    })),
                };
                tx.send(empty).await.is_ok()
            }
        });
        Ok(GrpcSender {
            beats: Some(beats),
            tx: Some(tx),
            replies,
            layout: handshake.layout.layout,
            request_id: handshake.request_id,
            frames: 0,
            cfg,
            corrupt: false,
        })
    }
}

/// One gRPC transfer, sender side.
pub struct GrpcSender {
    /// Empty batches while the prefill has nothing to send; stopped (so the
    /// request stream can end) at `finish`.
    beats: Option<Beats>,
    tx: Option<mpsc::Sender<pb::KvFrame>>,
    replies: Streaming<pb::KvReply>,
    layout: KvLayout,
    request_id: u64,
    frames: u64,
    cfg: TransferConfig,
    corrupt: bool,
}

impl GrpcSender {
    /// Test hook: flips a bit of the next block's payload after its checksum.
    #[doc(hidden)]
    pub fn corrupt_next_frame(&mut self) {
        self.corrupt = true;
    }

    async fn push(&mut self, frame: pb::KvFrame) -> Result<()> {
        let tx = self.tx.as_ref().ok_or(KvTransferError::Cancelled)?;
        let sent = with_deadline("frame write", self.cfg.io_timeout, async {
            tx.send(frame)
                .await
                .map_err(|_| KvTransferError::PeerGone("the call ended".into()))
        })
        .await;
        if sent.is_err() {
            // The call ended: its status (or the receiver's Failed reply) says why.
            let why = tokio::time::timeout(
                self.cfg.io_timeout,
                next_reply(&mut self.replies, self.cfg.lease),
            )
            .await;
            if let Ok(r) = why {
                return Err(match r {
                    Ok(reply) => layout::done(reply)
                        .err()
                        .unwrap_or(KvTransferError::PeerGone("the call ended".into())),
                    Err(s) => s,
                });
            }
        }
        sent
    }
}

impl KvSender for GrpcSender {
    async fn send_layer_blocks(&mut self, layer: u32, blocks: &[BlockRegion<'_>]) -> Result<()> {
        let mut batch = Vec::new();
        let mut size = 0usize;
        for b in blocks {
            check_region(&self.layout, b)?;
            let mut payload = BytesMut::with_capacity(payload_len(&self.layout, b.slots as usize));
            let crc = encode_payload_bytes(
                &self.layout,
                b.data,
                b.slots as usize,
                frame_seed(layer, b.block, b.slots),
                &mut payload,
            );
            if std::mem::take(&mut self.corrupt) {
                payload[0] ^= 0x01;
            }
            size += payload.len();
            batch.push(pb::KvBlock {
                layer,
                block: b.block,
                slots: b.slots,
                crc32c: crc,
                payload: payload.freeze(),
            });
            self.frames += 1;
            if size >= self.cfg.batch_bytes {
                let blocks = std::mem::take(&mut batch);
                size = 0;
                self.push(pb::KvFrame {
                    kind: Some(pb::FrameKind::Blocks(pb::KvBlocks {
                        request_id: self.request_id,
                        blocks,
                    })),
                })
                .await?;
            }
        }
        if !batch.is_empty() {
            self.push(pb::KvFrame {
                kind: Some(pb::FrameKind::Blocks(pb::KvBlocks {
                    request_id: self.request_id,
                    blocks: batch,
                })),
            })
            .await?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<TransferSummary> {
        let end = pb::KvFrame {
            kind: Some(pb::FrameKind::End(pb::KvEnd {
                request_id: self.request_id,
                frames: self.frames,
            })),
        };
        self.push(end).await?;
        self.tx = None;
        self.beats = None;
        let reply = next_reply(&mut self.replies, self.cfg.lease).await?;
        layout::done(reply)
    }
}
