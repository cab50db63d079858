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
//!
//! Both ends write and read the messages themselves ([`crate::grpc_wire`])
//! rather than through tonic's codec, which gathers each message into a
//! buffer of its own: a payload is copied once on each side, as on TCP.
//! The bytes are those of the generated code, so any gRPC client or server
//! of `KvTransfer` interoperates.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tandem_engine::kv::KvLayout;
use tandem_proto::http2;
use tandem_proto::kv as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Status, Streaming};

use crate::error::{KvTransferError, Result};
use crate::frame::payload_len;
use crate::grpc_wire::{blocks_message, grpc_message, BodyReader};
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
/// Largest first message (the handshake) taken from a caller.
const MAX_HANDSHAKE: usize = 64 << 10;
/// Frames queued between the sender's encoder and the HTTP/2 connection.
const SEND_QUEUE: usize = 4;
/// The service's name and its one method's path, as in the generated code.
const SERVICE: &str = "tandem.v1.KvTransfer";
const TRANSFER_PATH: &str = "/tandem.v1.KvTransfer/Transfer";

/// The `KvTransfer` service: validates handshakes and hands accepted
/// transfers to the application through a channel. Add it to a tonic
/// server built by [`server_builder`] (its HTTP/2 windows and frame size).
#[derive(Clone)]
pub struct GrpcKvService {
    cfg: Arc<ReceiverConfig>,
    incoming: mpsc::Sender<KvReceiver>,
}

impl tonic::server::NamedService for GrpcKvService {
    const NAME: &'static str = SERVICE;
}

/// The service and the stream of the transfers it accepts.
pub fn kv_service(cfg: ReceiverConfig) -> (GrpcKvService, mpsc::Receiver<KvReceiver>) {
    let (tx, rx) = mpsc::channel(64);
    let svc = GrpcKvService {
        cfg: Arc::new(cfg),
        incoming: tx,
    };
    (svc, rx)
}

/// A tonic server builder with tandem's HTTP/2 settings for KV.
pub fn server_builder() -> Server {
    Server::builder()
        .initial_stream_window_size(http2::STREAM_WINDOW)
        .initial_connection_window_size(http2::CONNECTION_WINDOW)
        .max_frame_size(http2::MAX_FRAME)
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
    reporter.set_serving::<GrpcKvService>().await;
    let (reflection, reflection_v1alpha) = tandem_proto::reflection_services(
        &[tandem_proto::kv::SERVICE],
        &[tonic_health::pb::FILE_DESCRIPTOR_SET],
    )
    .map_err(|e| KvTransferError::Grpc(e.to_string()))?;
    let task = tokio::spawn(async move {
        server_builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
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

type Reply = http_body::Frame<Bytes>;

impl tower_service::Service<http::Request<tonic::body::Body>> for GrpcKvService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move { Ok(svc.transfer(req).await) })
    }
}

impl GrpcKvService {
    /// One `Transfer` call: reads and checks the handshake, then answers
    /// with a stream of replies whose end carries status OK. The transfer
    /// itself (and its final reply) is the application's, through the
    /// [`KvReceiver`] handed over.
    async fn transfer(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        if req.uri().path() != TRANSFER_PATH {
            return Status::unimplemented(format!("{} is not served here", req.uri().path()))
                .into_http();
        }
        let cfg = &self.cfg.transfer;
        let mut inbound = BodyReader::new(req.into_body(), cfg.lease, MAX_MESSAGE);
        let first = with_deadline("handshake read", cfg.io_timeout, async {
            match inbound.next_message().await? {
                None => Err(KvTransferError::PeerGone("no handshake".into())),
                // Nothing of a caller not yet checked is buffered beyond
                // what a handshake needs.
                Some(len) if len > MAX_HANDSHAKE => Err(KvTransferError::Protocol(format!(
                    "a first message of {len} bytes (a handshake takes at most {MAX_HANDSHAKE})"
                ))),
                Some(len) => inbound.frame(len, |_| Ok(())).await,
            }
        })
        .await;
        let first = match first {
            Ok(f) => f,
            Err(e) => return Status::invalid_argument(e.to_string()).into_http(),
        };
        let (tx, rx) = mpsc::channel::<Reply>(4);
        let replies = Replies(tx);
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
                replies.try_send(&layout::refusal(&e));
            }
            Ok(hs) => {
                replies.try_send(&pb::KvReply {
                    kind: Some(pb::ReplyKind::Accepted(true)),
                    shared_memory: false,
                });
                let r = KvReceiver {
                    handshake: hs,
                    cfg: cfg.clone(),
                    inner: ReceiverInner::Grpc(GrpcIncoming {
                        inbound,
                        reply: replies,
                    }),
                };
                if self.incoming.send(r).await.is_err() {
                    return Status::unavailable("the KV receiver is shutting down").into_http();
                }
            }
        }
        // The replies, then status OK once every holder of the sender is
        // done (an outcome the client reads from the replies themselves).
        let ok = tokio_stream::once(Reply::trailers(http::HeaderMap::from_iter([(
            http::HeaderName::from_static("grpc-status"),
            http::HeaderValue::from_static("0"),
        )])));
        let body = ReceiverStream::new(rx).chain(ok).map(Ok::<_, Status>);
        let mut resp = http::Response::new(tonic::body::Body::new(
            http_body_util::StreamBody::new(body),
        ));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        resp
    }
}

/// The reply half of a transfer's call: framed `KvReply` messages.
#[derive(Clone)]
pub(crate) struct Replies(mpsc::Sender<Reply>);

impl Replies {
    /// Queues `r` unless the queue is full (only at the handshake, where it
    /// is empty).
    fn try_send(&self, r: &pb::KvReply) {
        let _ = self.0.try_send(Reply::data(grpc_message(r)));
    }

    /// Sends `r`; false once the call is gone.
    async fn send(&self, r: &pb::KvReply) -> bool {
        self.0.send(Reply::data(grpc_message(r))).await.is_ok()
    }
}

pub(crate) struct GrpcIncoming {
    inbound: BodyReader,
    reply: Replies,
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
            async move { reply.send(&pb::KvReply::default()).await }
        });
        let r = async {
            loop {
                let Some(len) = self.inbound.next_message().await? else {
                    return Err(KvTransferError::PeerGone(
                        "stream ended before the End frame".into(),
                    ));
                };
                let frame = self
                    .inbound
                    .frame(len, |b| {
                        asm.block(b.layer, b.block, b.slots, b.crc32c, &b.payload)
                    })
                    .await?;
                match frame.map(|f| f.kind) {
                    // A batch of blocks, already taken in.
                    None => {}
                    Some(Some(pb::FrameKind::Blocks(b))) => {
                        for blk in &b.blocks {
                            asm.block(blk.layer, blk.block, blk.slots, blk.crc32c, &blk.payload)?;
                        }
                    }
                    Some(Some(pb::FrameKind::End(e))) => return asm.finish(e.frames),
                    Some(Some(pb::FrameKind::Handshake(_))) => {
                        return Err(KvTransferError::Protocol(
                            "second handshake in one transfer".into(),
                        ))
                    }
                    Some(None) => {
                        return Err(KvTransferError::Protocol("a frame of no kind".into()))
                    }
                }
            }
        }
        .await;
        let reply = layout::outcome(&r);
        drop(_beats);
        // Best effort: a dead sender cannot hear it, and the outcome here stands.
        let _ = tokio::time::timeout(cfg.io_timeout, self.reply.send(&reply)).await;
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
            .initial_stream_window_size(http2::STREAM_WINDOW)
            .initial_connection_window_size(http2::CONNECTION_WINDOW)
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
        let (tx, rx) = mpsc::channel::<Bytes>(SEND_QUEUE);
        let hs = pb::KvFrame {
            kind: Some(pb::FrameKind::Handshake(handshake.to_proto())),
        };
        tx.send(grpc_message(&hs))
            .await
            .map_err(|_| KvTransferError::PeerGone("send queue closed".into()))?;
        let mut replies = with_deadline("connect", cfg.io_timeout, async {
            open_call(self.channel.clone(), rx).await
        })
        .await?;
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
                tx.send(grpc_message(&empty)).await.is_ok()
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

/// Starts a `Transfer` call whose request body is the framed messages of
/// `body`, and returns the stream of replies. What tonic's generated client
/// does, minus its encoder.
async fn open_call(
    mut channel: Channel,
    body: mpsc::Receiver<Bytes>,
) -> Result<Streaming<pb::KvReply>> {
    use tower_service::Service;
    let grpc = |e: &dyn std::fmt::Display| KvTransferError::Grpc(e.to_string());
    let frames = ReceiverStream::new(body).map(|m| Ok::<_, Status>(http_body::Frame::data(m)));
    let req = http::Request::builder()
        .method(http::Method::POST)
        .version(http::Version::HTTP_2)
        .uri(TRANSFER_PATH)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
        .map_err(|e| grpc(&e))?;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| grpc(&e))?;
    let resp = channel.call(req).await.map_err(|e| grpc(&e))?;
    // A call refused before any reply (unknown method, a server error)
    // carries its status in the headers.
    if let Some(status) = Status::from_header_map(resp.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status.into());
        }
    }
    let code = resp.status();
    Ok(Streaming::new_response(
        tonic_prost::ProstDecoder::<pb::KvReply>::default(),
        resp.into_body(),
        code,
        None,
        Some(MAX_MESSAGE),
    ))
}

/// One gRPC transfer, sender side.
pub struct GrpcSender {
    /// Empty batches while the prefill has nothing to send; stopped (so the
    /// request stream can end) at `finish`.
    beats: Option<Beats>,
    tx: Option<mpsc::Sender<Bytes>>,
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

    async fn push(&mut self, message: Bytes) -> Result<()> {
        let tx = self.tx.as_ref().ok_or(KvTransferError::Cancelled)?;
        let sent = with_deadline("frame write", self.cfg.io_timeout, async {
            tx.send(message)
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
        for b in blocks {
            check_region(&self.layout, b)?;
        }
        // Batches of about `batch_bytes`, each one message.
        let mut rest = blocks;
        while !rest.is_empty() {
            let mut size = 0usize;
            let n = rest
                .iter()
                .position(|b| {
                    size += payload_len(&self.layout, b.slots as usize);
                    size >= self.cfg.batch_bytes
                })
                .map_or(rest.len(), |i| i + 1);
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            let corrupt = std::mem::take(&mut self.corrupt);
            let message = blocks_message(&self.layout, self.request_id, layer, batch, corrupt);
            self.frames += batch.len() as u64;
            self.push(message).await?;
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
        self.push(grpc_message(&end)).await?;
        self.tx = None;
        self.beats = None;
        let reply = next_reply(&mut self.replies, self.cfg.lease).await?;
        layout::done(reply)
    }
}
