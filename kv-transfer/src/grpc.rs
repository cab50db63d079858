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
//! The sender writes its request body itself rather than through tonic's
//! codec: a batch of blocks becomes one gRPC message whose payloads are
//! copied straight from the KV into the bytes that go to HTTP/2, where the
//! codec would have copied them once more (into a message, then into its
//! encode buffer). The bytes are exactly what prost would encode, so any
//! gRPC client of `KvTransfer` interoperates.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use tandem_engine::kv::KvLayout;
use tandem_proto::kv as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};

use crate::error::{KvTransferError, Result};
use crate::frame::{copy_payload, frame_seed, payload_crc, payload_len};
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
/// The method's path, as the generated client would send it.
const TRANSFER_PATH: &str = "/tandem.v1.KvTransfer/Transfer";
/// A gRPC message's prefix: a compression flag (0: none) and the length,
/// big-endian.
const GRPC_PREFIX: usize = 5;

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

/// `msg` as one framed gRPC message.
fn grpc_message(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(GRPC_PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).expect("the buffer has room");
    buf.freeze()
}

/// Field numbers of the messages [`blocks_message`] writes by hand.
const FRAME_BLOCKS: u32 = 2;
const BLOCKS_REQUEST_ID: u32 = 1;
const BLOCKS_BLOCK: u32 = 2;
const BLOCK_PAYLOAD: u32 = 5;

/// Bytes of a length-delimited field `tag` holding `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A `KvFrame` holding `blocks` of `layer` as one framed gRPC message, the
/// same bytes prost would encode. Each payload is checksummed first, since
/// its CRC precedes it on the wire, and then copied once, from the KV into
/// the message; the second read finds the block in cache. With `corrupt`,
/// the first payload has a bit flipped after its checksum (a test hook).
fn blocks_message(
    l: &KvLayout,
    request_id: u64,
    layer: u32,
    blocks: &[BlockRegion<'_>],
    corrupt: bool,
) -> Bytes {
    let heads: Vec<(pb::KvBlock, usize)> = blocks
        .iter()
        .map(|b| {
            let slots = b.slots as usize;
            let head = pb::KvBlock {
                layer,
                block: b.block,
                slots: b.slots,
                crc32c: payload_crc(l, b.data, slots, frame_seed(layer, b.block, b.slots)),
                payload: Bytes::new(),
            };
            let len = head.encoded_len() + delimited_len(BLOCK_PAYLOAD, payload_len(l, slots));
            (head, len)
        })
        .collect();
    let id_len = if request_id != 0 {
        key_len(BLOCKS_REQUEST_ID) + encoded_len_varint(request_id)
    } else {
        0
    };
    let blocks_len = id_len
        + heads
            .iter()
            .map(|(_, len)| delimited_len(BLOCKS_BLOCK, *len))
            .sum::<usize>();
    let frame_len = delimited_len(FRAME_BLOCKS, blocks_len);
    let mut buf = BytesMut::with_capacity(GRPC_PREFIX + frame_len);
    buf.put_u8(0);
    buf.put_u32(frame_len as u32);
    encode_key(FRAME_BLOCKS, WireType::LengthDelimited, &mut buf);
    encode_varint(blocks_len as u64, &mut buf);
    if request_id != 0 {
        prost::encoding::uint64::encode(BLOCKS_REQUEST_ID, &request_id, &mut buf);
    }
    for (i, (b, (head, len))) in blocks.iter().zip(&heads).enumerate() {
        encode_key(BLOCKS_BLOCK, WireType::LengthDelimited, &mut buf);
        encode_varint(*len as u64, &mut buf);
        head.encode(&mut buf).expect("the buffer has room");
        let slots = b.slots as usize;
        encode_key(BLOCK_PAYLOAD, WireType::LengthDelimited, &mut buf);
        encode_varint(payload_len(l, slots) as u64, &mut buf);
        let at = buf.len();
        copy_payload(l, b.data, slots, |c| buf.extend_from_slice(c));
        if corrupt && i == 0 {
            buf[at] ^= 0x01;
        }
    }
    debug_assert_eq!(buf.len(), GRPC_PREFIX + frame_len);
    buf.freeze()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_payload_vec;
    use tandem_engine::kv::KvDtype;

    /// What prost encodes for the same blocks, framed.
    fn prost_message(
        l: &KvLayout,
        request_id: u64,
        layer: u32,
        blocks: &[BlockRegion<'_>],
    ) -> Bytes {
        let blocks = blocks
            .iter()
            .map(|b| {
                let mut payload = Vec::new();
                let crc32c = encode_payload_vec(
                    l,
                    b.data,
                    b.slots as usize,
                    frame_seed(layer, b.block, b.slots),
                    &mut payload,
                );
                pb::KvBlock {
                    layer,
                    block: b.block,
                    slots: b.slots,
                    crc32c,
                    payload: payload.into(),
                }
            })
            .collect();
        grpc_message(&pb::KvFrame {
            kind: Some(pb::FrameKind::Blocks(pb::KvBlocks { request_id, blocks })),
        })
    }

    #[test]
    fn hand_written_blocks_are_the_bytes_prost_writes() {
        // Lengths, ids and layers of one and of several varint bytes.
        let l = KvLayout {
            dtype: KvDtype::F32,
            n_layers: 3,
            n_kv_heads: 2,
            head_dim: 16,
            block_size: 8,
        };
        let data: Vec<Vec<f32>> = (0..4)
            .map(|b| {
                (0..l.block_floats())
                    .map(|i| (b * 1000 + i) as f32 * 0.37)
                    .collect()
            })
            .collect();
        let regions = |slots: &[u32]| -> Vec<BlockRegion<'_>> {
            slots
                .iter()
                .enumerate()
                .map(|(i, &s)| BlockRegion {
                    block: i as u32 * 300,
                    slots: s,
                    data: &data[i],
                })
                .collect()
        };
        for (request_id, layer, slots) in [
            (0u64, 0u32, vec![8u32]),
            (1, 2, vec![8, 8, 8, 1]),
            (u64::MAX, 1, vec![3]),
            (77, 200, vec![]),
        ] {
            let r = regions(&slots);
            let ours = blocks_message(&l, request_id, layer, &r, false);
            assert_eq!(ours, prost_message(&l, request_id, layer, &r), "{slots:?}");
            // And it decodes to the same blocks.
            let frame = pb::KvFrame::decode(&ours[GRPC_PREFIX..]).unwrap();
            let Some(pb::FrameKind::Blocks(b)) = frame.kind else {
                panic!("not a blocks frame")
            };
            assert_eq!(b.blocks.len(), slots.len());
        }
        // The corruption hook flips one payload bit and nothing else.
        let r = regions(&[8, 8]);
        let good = blocks_message(&l, 5, 1, &r, false);
        let bad = blocks_message(&l, 5, 1, &r, true);
        let differ: Vec<usize> = (0..good.len()).filter(|&i| good[i] != bad[i]).collect();
        assert_eq!(differ.len(), 1);
        assert_eq!(good[differ[0]] ^ bad[differ[0]], 1);
    }
}
