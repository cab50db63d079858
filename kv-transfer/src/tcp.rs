//! Raw TCP transport: the fast path between hosts without GPUs.
//!
//! One connection carries one transfer: handshake frame, then block frames
//! (header + packed payload), then an End frame; the receiver answers the
//! handshake and the end with a Reply frame. Sockets get large buffers and
//! `TCP_NODELAY`; every read and write has a deadline. Full blocks are read
//! straight into the reserved region (the socket read is the only copy) and
//! checksummed while the region is still in cache.
//!
//! After the handshake both sides send a Heartbeat frame every third of the
//! lease ([`TransferConfig::lease`]) and each waits at most one lease for
//! the next frame from the other. A sender whose prompt waits in a busy
//! prefill queue therefore keeps its transfer alive, a hung peer is detected
//! within a lease on both sides, and the sender hears a receiver's failure
//! (a bad checksum, say) while it is still sending, not only at the end.
//!
//! Between two processes of one host the payload can skip the socket: the
//! sender offers a shared-memory ring in its handshake and, if the receiver
//! maps it, writes each payload there and sends only its header
//! ([`crate::shm`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tandem_engine::kv::KvLayout;
use tandem_proto::kv as pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::error::{KvTransferError, Result};
use crate::frame::{
    encode_payload_into, encode_payload_vec, frame_seed, payload_len, FrameHeader, FrameKind,
    HEADER_LEN,
};
use crate::layout::{self, Handshake, TransferSummary};
use crate::shm::{DataPlane, RecvRing, SendRing};
use crate::sink::{Assembler, KvSink};
use crate::transport::{
    with_deadline, BlockRegion, KvReceiver, KvSender, KvTransport, ReceiverConfig, ReceiverInner,
    TransferConfig,
};

/// Control messages (handshake, replies) are small; refuse anything larger
/// before allocating for it.
const MAX_CONTROL: usize = 64 * 1024;
/// Read buffer of the receiver.
const READ_BUFFER: usize = 256 * 1024;

pub(crate) fn io_err(e: std::io::Error) -> KvTransferError {
    use std::io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
            KvTransferError::PeerGone(e.to_string())
        }
        _ => KvTransferError::Io(e),
    }
}

/// A socket with large buffers (set before connect/listen, so the TCP
/// window scale is negotiated for them).
pub(crate) fn socket_for(addr: &SocketAddr, buffer: usize) -> Result<TcpSocket> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_send_buffer_size(buffer as u32)?;
    s.set_recv_buffer_size(buffer as u32)?;
    Ok(s)
}

pub(crate) async fn read_header<R: AsyncReadExt + Unpin>(
    r: &mut R,
    cfg: &TransferConfig,
) -> Result<FrameHeader> {
    let mut h = [0u8; HEADER_LEN];
    with_deadline("frame header read", cfg.io_timeout, async {
        r.read_exact(&mut h).await.map_err(io_err)
    })
    .await?;
    FrameHeader::decode(&h)
}

/// Reads the next frame header during a transfer, skipping heartbeats: the
/// `peer` must say something within every `lease`.
pub(crate) async fn next_header<R: AsyncReadExt + Unpin>(
    r: &mut R,
    lease: Duration,
    peer: &'static str,
) -> Result<FrameHeader> {
    loop {
        let mut h = [0u8; HEADER_LEN];
        match tokio::time::timeout(lease, r.read_exact(&mut h)).await {
            Err(_) => return Err(KvTransferError::LeaseExpired { peer, after: lease }),
            Ok(r) => r.map_err(io_err)?,
        };
        if let Some(h) = unless_heartbeat(FrameHeader::decode(&h)?)? {
            return Ok(h);
        }
    }
}

/// `h`, or `None` for a (well-formed) heartbeat.
fn unless_heartbeat(h: FrameHeader) -> Result<Option<FrameHeader>> {
    if h.kind != FrameKind::Heartbeat {
        return Ok(Some(h));
    }
    expect_empty(&h)?;
    Ok(None)
}

/// Heartbeat and Credit frames carry nothing but their kind.
fn expect_empty(h: &FrameHeader) -> Result<()> {
    if h.byte_len != 0 {
        return Err(KvTransferError::Protocol(format!(
            "{:?} frame of {} bytes",
            h.kind, h.byte_len
        )));
    }
    Ok(())
}

/// Reads the payload of control frame `h` (size-checked) and checks its CRC.
pub(crate) async fn read_control_payload<R: AsyncReadExt + Unpin>(
    r: &mut R,
    h: &FrameHeader,
    cfg: &TransferConfig,
) -> Result<Vec<u8>> {
    if h.byte_len as usize > MAX_CONTROL {
        return Err(KvTransferError::Protocol(format!(
            "{:?} frame of {} bytes",
            h.kind, h.byte_len
        )));
    }
    let mut buf = vec![0u8; h.byte_len as usize];
    with_deadline("control frame read", cfg.io_timeout, async {
        r.read_exact(&mut buf).await.map_err(io_err)
    })
    .await?;
    let actual = crate::frame::crc32c(&buf);
    if actual != h.crc {
        return Err(KvTransferError::Checksum {
            layer: 0,
            block: 0,
            expected: h.crc,
            actual,
        });
    }
    Ok(buf)
}

/// The write half of a transfer's socket, shared by the data path and the
/// heartbeat task (whole frames are written under the lock).
pub(crate) type Writer = Arc<Mutex<OwnedWriteHalf>>;

/// Sends a heartbeat every [`TransferConfig::heartbeat_every`] until
/// dropped. Stopping never interrupts a frame half-written: the task only
/// exits between frames.
pub(crate) struct Heartbeats(CancellationToken);

impl Heartbeats {
    pub(crate) fn start(w: Writer, request_id: u64, cfg: TransferConfig) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cfg.heartbeat_every());
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let mut s = w.lock().await;
                if token.is_cancelled() {
                    return;
                }
                let beat = write_control(&mut *s, FrameKind::Heartbeat, request_id, &[], &cfg);
                if beat.await.is_err() {
                    return;
                }
            }
        });
        Self(stop)
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Aborts a reading task when its transfer ends.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads a control frame of `kind` (handshake phase) and checks its CRC.
pub(crate) async fn read_control<R: AsyncReadExt + Unpin>(
    r: &mut R,
    kind: FrameKind,
    cfg: &TransferConfig,
) -> Result<(FrameHeader, Vec<u8>)> {
    let h = read_header(r, cfg).await?;
    if h.kind != kind {
        return Err(KvTransferError::Protocol(format!(
            "expected a {kind:?} frame, got {:?} of {} bytes",
            h.kind, h.byte_len
        )));
    }
    let buf = read_control_payload(r, &h, cfg).await?;
    Ok((h, buf))
}

pub(crate) async fn write_control<W: AsyncWriteExt + Unpin>(
    s: &mut W,
    kind: FrameKind,
    request_id: u64,
    payload: &[u8],
    cfg: &TransferConfig,
) -> Result<()> {
    let mut buf = FrameHeader::control(kind, request_id, payload)
        .encode()
        .to_vec();
    buf.extend_from_slice(payload);
    with_deadline("control frame write", cfg.io_timeout, async {
        s.write_all(&buf).await.map_err(io_err)
    })
    .await
}

/// Tells the sender how its transfer ended. Best effort: a dead sender
/// cannot hear it, and the outcome on this side stands.
pub(crate) async fn tell_sender(w: &Writer, r: &Result<TransferSummary>, cfg: &TransferConfig) {
    let reply = layout::outcome(r).encode_to_vec();
    let mut w = w.lock().await;
    let _ = write_control(&mut *w, FrameKind::Reply, 0, &reply, cfg).await;
}

/// Client side: where to send KV over TCP.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    pub addr: SocketAddr,
    pub cfg: TransferConfig,
}

impl TcpTransport {
    pub fn new(addr: SocketAddr, cfg: TransferConfig) -> Self {
        Self { addr, cfg }
    }

    /// A shared-memory ring to offer a receiver on this host: as large as
    /// the whole transfer up to `shared_memory_ring`, and at least two full
    /// blocks. `None` (payload on the socket) for a remote receiver, when
    /// turned off, or when the ring cannot be made.
    fn ring_for(&self, h: &Handshake) -> Option<(SendRing, pb::SharedMemoryOffer)> {
        if !self.cfg.shared_memory || !self.addr.ip().is_loopback() {
            return None;
        }
        let l = &h.layout.layout;
        let tokens = h.tokens as usize;
        let per_layer: usize = (0..l.blocks_for(tokens))
            .map(|b| payload_len(l, (tokens - b * l.block_size).min(l.block_size)))
            .sum();
        let full = payload_len(l, l.block_size);
        let most = self.cfg.shared_memory_ring.max(2 * full);
        let want = (per_layer * l.n_layers).clamp(2 * full, most);
        match SendRing::take(want) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(error = %e, "no shared-memory ring; KV goes over the socket");
                None
            }
        }
    }
}

impl KvTransport for TcpTransport {
    type Sender = TcpSender;

    async fn connect(&self, handshake: Handshake) -> Result<TcpSender> {
        let cfg = self.cfg.clone();
        let sock = socket_for(&self.addr, cfg.socket_buffer)?;
        let mut stream = with_deadline("connect", cfg.io_timeout, async {
            sock.connect(self.addr).await.map_err(io_err)
        })
        .await?;
        stream.set_nodelay(true)?;
        let mut hs = handshake.to_proto();
        let ring = self.ring_for(&handshake).map(|(ring, offer)| {
            hs.shared_memory = Some(offer);
            ring
        });
        write_control(
            &mut stream,
            FrameKind::Handshake,
            handshake.request_id,
            &hs.encode_to_vec(),
            &cfg,
        )
        .await?;
        let (_, reply) = read_control(&mut stream, FrameKind::Reply, &cfg).await?;
        let reply = pb::KvReply::decode(reply.as_slice()).ok();
        let mapped = reply.as_ref().is_some_and(|r| r.shared_memory);
        layout::accepted(reply)?;
        // Declined: the ring is dropped and freed.
        let ring = ring.filter(|_| mapped);
        let (reader, writer) = stream.into_split();
        let writer = Arc::new(Mutex::new(writer));
        let (tx, outcome) = oneshot::channel();
        let credits = Arc::new(Notify::new());
        let listen = tokio::spawn(listen_to_receiver(reader, cfg.clone(), tx, credits.clone()));
        Ok(TcpSender {
            heartbeats: Heartbeats::start(writer.clone(), handshake.request_id, cfg.clone()),
            writer,
            outcome,
            _listen: AbortOnDrop(listen),
            buf: Vec::with_capacity(cfg.batch_bytes + (1 << 20)),
            layout: handshake.layout.layout,
            request_id: handshake.request_id,
            frames: 0,
            cfg,
            corrupt: false,
            ring,
            credits,
        })
    }
}

/// Sender side: waits for the receiver's reply, renewing the lease on each
/// heartbeat and passing on its credits (shared-memory ring space); reports
/// the reply, or why none will come, and then wakes a sender waiting for
/// credit so that it hears it too.
pub(crate) async fn listen_to_receiver(
    mut r: OwnedReadHalf,
    cfg: TransferConfig,
    tx: oneshot::Sender<Result<pb::KvReply>>,
    credits: Arc<Notify>,
) {
    let reply = async {
        let h = loop {
            let h = next_header(&mut r, cfg.lease, "receiver").await?;
            if h.kind != FrameKind::Credit {
                break h;
            }
            expect_empty(&h)?;
            credits.notify_one();
        };
        if h.kind != FrameKind::Reply {
            return Err(KvTransferError::Protocol(format!(
                "expected a Reply frame, got {:?}",
                h.kind
            )));
        }
        let bytes = read_control_payload(&mut r, &h, &cfg).await?;
        pb::KvReply::decode(bytes.as_slice())
            .map_err(|e| KvTransferError::Protocol(format!("bad reply: {e}")))
    }
    .await;
    let _ = tx.send(reply);
    credits.notify_one();
}

/// One TCP transfer, sender side.
pub struct TcpSender {
    writer: Writer,
    /// The receiver's reply (or why it will not come), from the listening
    /// task.
    outcome: oneshot::Receiver<Result<pb::KvReply>>,
    _listen: AbortOnDrop,
    heartbeats: Heartbeats,
    /// Frames encoded but not yet written (about `batch_bytes`).
    buf: Vec<u8>,
    layout: KvLayout,
    request_id: u64,
    frames: u64,
    cfg: TransferConfig,
    corrupt: bool,
    /// The receiver mapped our shared-memory ring: payloads go there, and
    /// only their headers on the socket.
    ring: Option<SendRing>,
    /// Woken when the receiver frees ring space (or the transfer ends).
    credits: Arc<Notify>,
}

impl TcpSender {
    fn ring_bytes(&self) -> usize {
        self.ring.as_ref().map_or(0, |r| r.capacity() as usize)
    }

    /// How this transfer's payload travels.
    pub fn data_plane(&self) -> DataPlane {
        match self.ring {
            Some(_) => DataPlane::SharedMemory,
            None => DataPlane::Socket,
        }
    }

    /// Where in the ring the next frame of `n` bytes goes, once there is
    /// room. The headers written so far go out first, so that the receiver
    /// can free what they describe.
    async fn ring_room(&mut self, n: usize) -> Result<u64> {
        loop {
            let ring = self.ring.as_ref().expect("ring_room without a ring");
            if let Some(start) = ring.room_for(n) {
                return Ok(start);
            }
            let credit = self.credits.clone();
            let credit = credit.notified();
            self.flush_buf().await?;
            self.check_receiver()?;
            let ring = self.ring.as_ref().expect("ring_room without a ring");
            if let Some(start) = ring.room_for(n) {
                return Ok(start);
            }
            let after = self.cfg.io_timeout;
            if tokio::time::timeout(after, credit).await.is_err() {
                return Err(KvTransferError::Timeout {
                    what: "shared-memory ring space",
                    after,
                });
            }
        }
    }

    /// Packs one region into the ring and queues its header.
    async fn ring_frame(&mut self, layer: u32, b: &BlockRegion<'_>) -> Result<()> {
        let (l, slots) = (self.layout, b.slots as usize);
        let n = payload_len(&l, slots);
        let start = self.ring_room(n).await?;
        let ring = self.ring.as_mut().expect("ring_frame without a ring");
        let seed = frame_seed(layer, b.block, b.slots);
        let crc = ring.write(start, n, |push| {
            encode_payload_into(&l, b.data, slots, seed, |c| push(c))
        });
        if std::mem::take(&mut self.corrupt) {
            ring.flip_last_byte();
        }
        let h = FrameHeader::block(layer, b.block, b.slots, self.request_id, n as u32, crc);
        self.buf.extend_from_slice(&h.encode());
        Ok(())
    }

    async fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut s = self.writer.lock().await;
        let b = &self.buf;
        with_deadline("frame write", self.cfg.io_timeout, async {
            s.write_all(b).await.map_err(io_err)
        })
        .await?;
        drop(s);
        self.buf.clear();
        Ok(())
    }

    /// Fails fast when the receiver already gave up (it replies early only
    /// to refuse) or went silent for a lease.
    fn check_receiver(&mut self) -> Result<()> {
        use oneshot::error::TryRecvError;
        match self.outcome.try_recv() {
            Err(TryRecvError::Empty) => Ok(()),
            Ok(Ok(reply)) => match layout::done(Some(reply)) {
                Err(e) => Err(e),
                Ok(_) => Err(KvTransferError::Protocol(
                    "the receiver confirmed before the end".into(),
                )),
            },
            Ok(Err(e)) => Err(e),
            Err(TryRecvError::Closed) => Err(KvTransferError::PeerGone(
                "the receiver already ended the transfer".into(),
            )),
        }
    }

    /// Test hook: the next block frame's payload gets one bit flipped after
    /// its checksum is computed (what a bad NIC or memory would do).
    #[doc(hidden)]
    pub fn corrupt_next_frame(&mut self) {
        self.corrupt = true;
    }
}

pub(crate) fn check_region(l: &KvLayout, b: &BlockRegion<'_>) -> Result<()> {
    if b.data.len() != l.block_floats() || b.slots == 0 || b.slots as usize > l.block_size {
        return Err(KvTransferError::Protocol(format!(
            "block {} region of {} floats with {} slots (layout wants {} floats, 1..={} slots)",
            b.block,
            b.data.len(),
            b.slots,
            l.block_floats(),
            l.block_size
        )));
    }
    Ok(())
}

impl KvSender for TcpSender {
    async fn send_layer_blocks(&mut self, layer: u32, blocks: &[BlockRegion<'_>]) -> Result<()> {
        self.check_receiver()?;
        if self.ring.is_some() {
            // Headers go out every eighth of the ring (at most every
            // ~batch_bytes), so the receiver copies while we pack.
            let every = self.cfg.batch_bytes.min(self.ring_bytes() / 8);
            let mut since_flush = 0;
            for b in blocks {
                check_region(&self.layout, b)?;
                self.ring_frame(layer, b).await?;
                self.frames += 1;
                since_flush += payload_len(&self.layout, b.slots as usize);
                if since_flush >= every {
                    self.flush_buf().await?;
                    since_flush = 0;
                }
            }
            return self.flush_buf().await;
        }
        for b in blocks {
            check_region(&self.layout, b)?;
            let at = self.buf.len();
            self.buf.extend_from_slice(&[0u8; HEADER_LEN]);
            let crc = encode_payload_vec(
                &self.layout,
                b.data,
                b.slots as usize,
                frame_seed(layer, b.block, b.slots),
                &mut self.buf,
            );
            let h = FrameHeader::block(
                layer,
                b.block,
                b.slots,
                self.request_id,
                (self.buf.len() - at - HEADER_LEN) as u32,
                crc,
            );
            self.buf[at..at + HEADER_LEN].copy_from_slice(&h.encode());
            if std::mem::take(&mut self.corrupt) {
                let last = self.buf.len() - 1;
                self.buf[last] ^= 0x01;
            }
            self.frames += 1;
            if self.buf.len() >= self.cfg.batch_bytes {
                self.flush_buf().await?;
            }
        }
        self.flush_buf().await
    }

    async fn finish(mut self) -> Result<TransferSummary> {
        let end = self.frames.to_le_bytes();
        let mut h = FrameHeader::control(FrameKind::End, self.request_id, &end)
            .encode()
            .to_vec();
        h.extend_from_slice(&end);
        self.buf.extend_from_slice(&h);
        self.flush_buf().await?;
        // The listening task bounds this wait: every read has the lease.
        let reply = (&mut self.outcome)
            .await
            .map_err(|_| KvTransferError::PeerGone("no final reply".into()))??;
        drop(self.heartbeats);
        let summary = layout::done(Some(reply))?;
        if let Some(ring) = self.ring.take() {
            ring.recycle();
        }
        Ok(summary)
    }
}

/// Server side: accepts transfers on a TCP port.
pub struct TcpKvListener {
    listener: TcpListener,
    cfg: Arc<ReceiverConfig>,
}

impl TcpKvListener {
    pub async fn bind(addr: SocketAddr, cfg: ReceiverConfig) -> Result<Self> {
        let s = socket_for(&addr, cfg.transfer.socket_buffer)?;
        s.set_reuseaddr(true)?;
        s.bind(addr)?;
        Ok(Self {
            listener: s.listen(1024)?,
            cfg: Arc::new(cfg),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Waits for a connection and runs its handshake. An error concerns that
    /// one peer (refused, timed out, garbage); the listener keeps working.
    /// A refused peer is told why. Servers with many peers should use
    /// [`TcpKvListener::accept_connection`] and handshake on a task of their
    /// own, so one slow peer cannot hold up the others.
    pub async fn accept(&self) -> Result<KvReceiver> {
        self.accept_connection().await?.handshake().await
    }

    /// Waits for a connection only; the handshake is [`PendingKv::handshake`].
    pub async fn accept_connection(&self) -> Result<PendingKv> {
        let (stream, _) = self.listener.accept().await?;
        stream.set_nodelay(true)?;
        Ok(PendingKv {
            stream,
            cfg: self.cfg.clone(),
        })
    }
}

/// An accepted connection whose handshake has not run yet.
pub struct PendingKv {
    stream: TcpStream,
    cfg: Arc<ReceiverConfig>,
}

impl PendingKv {
    /// Reads and verifies the handshake (under the I/O deadline).
    pub async fn handshake(self) -> Result<KvReceiver> {
        let PendingKv { mut stream, cfg } = self;
        let expected = &cfg.expected;
        let secret = &cfg.secret;
        let cfg = &cfg.transfer;
        let (hs, offer) = async {
            let (_, bytes) = read_control(&mut stream, FrameKind::Handshake, cfg).await?;
            let p = pb::KvHandshake::decode(bytes.as_slice())
                .map_err(|e| KvTransferError::Protocol(e.to_string()))?;
            Ok::<_, KvTransferError>((Handshake::from_proto(&p)?, p.shared_memory))
        }
        .await?;
        if let Err(e) = hs.verify(expected, secret) {
            let _ = write_control(
                &mut stream,
                FrameKind::Reply,
                hs.request_id,
                &layout::refusal(&e).encode_to_vec(),
                cfg,
            )
            .await;
            return Err(e);
        }
        let ring = offer.filter(|_| cfg.shared_memory).and_then(|offer| {
            let l = &hs.layout.layout;
            RecvRing::open(&offer, payload_len(l, l.block_size))
                .map_err(|e| {
                    tracing::debug!(error = %e, pid = offer.pid, "declined a shared-memory ring")
                })
                .ok()
        });
        let ok = pb::KvReply {
            kind: Some(pb::ReplyKind::Accepted(true)),
            shared_memory: ring.is_some(),
        }
        .encode_to_vec();
        write_control(&mut stream, FrameKind::Reply, hs.request_id, &ok, cfg).await?;
        let (reader, writer) = stream.into_split();
        Ok(KvReceiver {
            inner: ReceiverInner::Tcp(TcpIncoming {
                reader: BufReader::with_capacity(READ_BUFFER, reader),
                writer: Arc::new(Mutex::new(writer)),
                request_id: hs.request_id,
                ring,
            }),
            handshake: hs,
            cfg: cfg.clone(),
        })
    }
}

pub(crate) struct TcpIncoming {
    pub(crate) reader: BufReader<OwnedReadHalf>,
    pub(crate) writer: Writer,
    pub(crate) request_id: u64,
    /// The sender's shared-memory ring, when we mapped it.
    pub(crate) ring: Option<RecvRing>,
}

impl TcpIncoming {
    pub(crate) async fn receive<S: KvSink + ?Sized>(
        mut self,
        layout: KvLayout,
        tokens: u64,
        cfg: &TransferConfig,
        sink: &mut S,
    ) -> Result<TransferSummary> {
        let mut asm = Assembler::new(layout, tokens, sink);
        let heartbeats = Heartbeats::start(self.writer.clone(), self.request_id, cfg.clone());
        let ring = self.ring.as_mut();
        let r = Self::frames(&mut self.reader, &self.writer, ring, &mut asm, cfg).await;
        drop(heartbeats);
        tell_sender(&self.writer, &r, cfg).await;
        r
    }

    /// Block frames until the End frame. With a ring, each block's payload
    /// is in it (a credit goes back every quarter ring); otherwise it
    /// follows its header on the socket.
    async fn frames<S: KvSink + ?Sized>(
        r: &mut BufReader<OwnedReadHalf>,
        w: &Writer,
        mut ring: Option<&mut RecvRing>,
        asm: &mut Assembler<'_, S>,
        cfg: &TransferConfig,
    ) -> Result<TransferSummary> {
        let l = *asm.layout();
        let full = payload_len(&l, l.block_size);
        let mut buf = vec![0u8; full];
        loop {
            let h = next_buffered_header(r, cfg.lease, "sender").await?;
            match h.kind {
                FrameKind::Block if h.byte_len as usize > full => {
                    return Err(KvTransferError::Protocol(format!(
                        "block frame of {} bytes",
                        h.byte_len
                    )))
                }
                FrameKind::Block => match ring.as_deref_mut() {
                    Some(ring) => {
                        ring_block(ring, &h, asm, &mut buf)?;
                        if ring.credit_due() {
                            let mut w = w.lock().await;
                            write_control(&mut *w, FrameKind::Credit, h.request_id, &[], cfg)
                                .await?;
                        }
                    }
                    None => socket_block(r, &h, asm, &mut buf, cfg).await?,
                },
                FrameKind::End => return end_frame(r, &h, asm, cfg).await,
                k => return Err(unexpected(k)),
            }
        }
    }
}

/// A block frame's payload from the socket.
async fn socket_block<S: KvSink + ?Sized>(
    r: &mut BufReader<OwnedReadHalf>,
    h: &FrameHeader,
    asm: &mut Assembler<'_, S>,
    buf: &mut [u8],
    cfg: &TransferConfig,
) -> Result<()> {
    let l = *asm.layout();
    let n = h.byte_len as usize;
    if r.buffer().len() >= n {
        // Already read (the buffer holds several frames): unpack it,
        // checksumming as it is copied.
        asm.block(h.layer, h.block, h.slots, h.crc, &r.buffer()[..n])?;
        r.consume(n);
    } else if h.slots as usize == l.block_size && n == payload_len(&l, l.block_size) {
        // Straight into the reserved region.
        let dest: &mut [u8] = bytemuck::cast_slice_mut(asm.dest(h.layer, h.block, h.slots)?);
        with_deadline("frame read", cfg.io_timeout, async {
            r.read_exact(dest).await.map_err(io_err)
        })
        .await?;
        asm.block_in_place(h.layer, h.block, h.crc)?;
    } else {
        let p = &mut buf[..n];
        with_deadline("frame read", cfg.io_timeout, async {
            r.read_exact(p).await.map_err(io_err)
        })
        .await?;
        asm.block(h.layer, h.block, h.slots, h.crc, p)?;
    }
    Ok(())
}

/// A block frame's payload from the shared-memory ring.
fn ring_block<S: KvSink + ?Sized>(
    ring: &mut RecvRing,
    h: &FrameHeader,
    asm: &mut Assembler<'_, S>,
    buf: &mut [u8],
) -> Result<()> {
    let l = *asm.layout();
    let n = h.byte_len as usize;
    if h.slots as usize == l.block_size && n == payload_len(&l, l.block_size) {
        // Straight into the reserved region, checked there.
        let dest: &mut [u8] = bytemuck::cast_slice_mut(asm.dest(h.layer, h.block, h.slots)?);
        ring.read(dest)?;
        asm.block_in_place(h.layer, h.block, h.crc)
    } else {
        let p = &mut buf[..n];
        ring.read(p)?;
        asm.block(h.layer, h.block, h.slots, h.crc, p)
    }
}

/// The next frame header of a transfer, as [`next_header`], taken straight
/// from the read buffer when it is there (it mostly is: one socket read
/// brings many frames), without a timer or a wait.
async fn next_buffered_header(
    r: &mut BufReader<OwnedReadHalf>,
    lease: Duration,
    peer: &'static str,
) -> Result<FrameHeader> {
    while r.buffer().len() >= HEADER_LEN {
        let h = FrameHeader::decode(r.buffer()[..HEADER_LEN].try_into().expect("header length"))?;
        r.consume(HEADER_LEN);
        if let Some(h) = unless_heartbeat(h)? {
            return Ok(h);
        }
    }
    next_header(r, lease, peer).await
}

fn unexpected(k: FrameKind) -> KvTransferError {
    KvTransferError::Protocol(format!("unexpected {k:?} frame during a transfer"))
}

/// Reads the End frame's count and checks the transfer is complete.
async fn end_frame<S: KvSink + ?Sized>(
    r: &mut BufReader<OwnedReadHalf>,
    h: &FrameHeader,
    asm: &mut Assembler<'_, S>,
    cfg: &TransferConfig,
) -> Result<TransferSummary> {
    let mut n = [0u8; 8];
    if h.byte_len != 8 {
        return Err(KvTransferError::Protocol("bad End frame".into()));
    }
    with_deadline("frame read", cfg.io_timeout, async {
        r.read_exact(&mut n).await.map_err(io_err)
    })
    .await?;
    if crate::frame::crc32c(&n) != h.crc {
        return Err(KvTransferError::Checksum {
            layer: 0,
            block: 0,
            expected: h.crc,
            actual: crate::frame::crc32c(&n),
        });
    }
    asm.finish(u64::from_le_bytes(n))
}
