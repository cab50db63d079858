//! The seam between the serving roles and the wire: a sender that streams
//! layers as they are computed, and a receiver that writes into reserved
//! blocks. TCP (with a shared-memory data plane between processes of one
//! host) and gRPC implement it, and NCCL under feature `cuda`.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::{KvTransferError, Result};
use crate::layout::{ClusterSecret, Handshake, LayoutDescriptor, TransferSummary};
use crate::sink::KvSink;

/// One (layer, block) region to send: `data` is the whole pool region
/// (`KvPool::region`), of which the first `slots` tokens are sent.
#[derive(Debug, Clone, Copy)]
pub struct BlockRegion<'a> {
    /// Index of the block within the sequence.
    pub block: u32,
    pub slots: u32,
    pub data: &'a [f32],
}

/// Deadlines and buffer sizes shared by both sides.
#[derive(Debug, Clone)]
pub struct TransferConfig {
    /// Longest wait for any single read or write (a stalled peer fails here).
    pub io_timeout: Duration,
    /// Longest a whole transfer may take (a transfer that never completes
    /// must not hold reserved blocks forever), plus
    /// [`PREFILL_ALLOWANCE_PER_TOKEN`] for each prompt token: see
    /// [`TransferConfig::deadline_for`].
    pub transfer_timeout: Duration,
    /// Each side holds its part of a transfer (the sender its computed
    /// layers, the receiver its reserved blocks) under a lease that the
    /// peer's frames renew; both send a heartbeat every third of it while
    /// they have nothing else to send. A peer silent for a whole lease is
    /// taken as hung and the transfer fails explicitly on this side
    /// ([`KvTransferError::LeaseExpired`]), so neither side frees or waits
    /// on the strength of a guess.
    pub lease: Duration,
    /// SO_SNDBUF / SO_RCVBUF for TCP sockets; large, so one layer of a long
    /// prompt is in flight without waiting for the reader.
    pub socket_buffer: usize,
    /// Approximate bytes per write (TCP) or per gRPC message.
    pub batch_bytes: usize,
    /// Raw TCP only. A sender offers a shared-memory ring for the payload
    /// when its receiver's address is a loopback one; a receiver maps an
    /// offered ring when this is set, and declines it otherwise (the
    /// payload then travels on the socket). See [`crate::shm`].
    pub shared_memory: bool,
    /// Largest shared-memory ring a sender offers, in bytes (a transfer
    /// that fits in less gets less; a larger one reuses the ring as the
    /// receiver frees it).
    pub shared_memory_ring: usize,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(10),
            transfer_timeout: Duration::from_secs(120),
            lease: Duration::from_secs(30),
            socket_buffer: 8 << 20,
            batch_bytes: 1 << 20,
            shared_memory: true,
            shared_memory_ring: 4 << 20,
        }
    }
}

/// What a receiver accepts.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub expected: LayoutDescriptor,
    pub secret: ClusterSecret,
    pub transfer: TransferConfig,
}

/// How a prefill worker reaches a decode worker.
pub trait KvTransport: Send + Sync {
    type Sender: KvSender;
    /// Connects, sends the handshake and waits for the receiver to accept
    /// it: an incompatible pair fails here, before any KV moves.
    fn connect(&self, handshake: Handshake) -> impl Future<Output = Result<Self::Sender>> + Send;
}

/// One transfer in flight, sender side. Dropping it without `finish`
/// aborts the transfer: the receiver sees the peer gone and fails.
pub trait KvSender: Send {
    /// Sends blocks of one layer (call as soon as the layer is computed).
    /// Returns once the data is handed to the transport; flow control makes
    /// it wait when the receiver falls behind.
    fn send_layer_blocks(
        &mut self,
        layer: u32,
        blocks: &[BlockRegion<'_>],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Ends the transfer and waits for the receiver to confirm that every
    /// block arrived and verified.
    fn finish(self) -> impl Future<Output = Result<TransferSummary>> + Send;
}

/// One accepted transfer, receiver side: the handshake is verified; the
/// caller looks up (or reserves) the blocks for `handshake().request_id`
/// and calls [`KvReceiver::receive_into`].
pub struct KvReceiver {
    pub(crate) handshake: Handshake,
    pub(crate) cfg: TransferConfig,
    pub(crate) inner: ReceiverInner,
}

pub(crate) enum ReceiverInner {
    Tcp(crate::tcp::TcpIncoming),
    Grpc(crate::grpc::GrpcIncoming),
    #[cfg(feature = "cuda")]
    Nccl(crate::nccl::NcclIncoming),
}

impl KvReceiver {
    pub fn handshake(&self) -> &Handshake {
        &self.handshake
    }

    /// Receives the whole transfer into `sink`. Any error (checksum, peer
    /// gone, deadline, cancellation, missing blocks) is returned promptly;
    /// the sink's blocks then hold partial data and the caller must release
    /// them (`Scheduler::release`). The sender is told the outcome.
    pub async fn receive_into<S: KvSink + ?Sized>(
        self,
        sink: &mut S,
        cancel: &CancellationToken,
    ) -> Result<TransferSummary> {
        let layout = self.handshake.layout.layout;
        let tokens = self.handshake.tokens;
        let deadline = self.cfg.deadline_for(tokens as usize);
        let work = async move {
            match self.inner {
                ReceiverInner::Tcp(t) => t.receive(layout, tokens, &self.cfg, sink).await,
                ReceiverInner::Grpc(g) => g.receive(layout, tokens, &self.cfg, sink).await,
                #[cfg(feature = "cuda")]
                ReceiverInner::Nccl(n) => n.receive(layout, tokens, &self.cfg, sink).await,
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(KvTransferError::Cancelled),
            r = tokio::time::timeout(deadline, work) => r.unwrap_or(Err(KvTransferError::Timeout { what: "whole transfer", after: deadline })),
        }
    }
}

/// Time allowed per prompt token on top of a fixed deadline, for a
/// transfer that streams while its prompt is computed: a long prompt on a
/// busy CPU worker takes minutes, and failing it at a fixed deadline
/// throws the work away and marks a healthy worker down. 25 ms is a
/// prefill of 40 tokens/s, far below any worker's (a dead or hung peer is
/// caught sooner by the lease).
pub const PREFILL_ALLOWANCE_PER_TOKEN: Duration = Duration::from_millis(25);

impl TransferConfig {
    /// The whole-transfer deadline for a prompt of `tokens`.
    pub fn deadline_for(&self, tokens: usize) -> Duration {
        self.transfer_timeout + PREFILL_ALLOWANCE_PER_TOKEN * tokens.min(u32::MAX as usize) as u32
    }

    /// How often a side with nothing to send says it is still there.
    pub fn heartbeat_every(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(1))
    }
}

/// Runs `f` under the I/O deadline.
pub(crate) async fn with_deadline<T>(
    what: &'static str,
    after: Duration,
    f: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(after, f)
        .await
        .unwrap_or(Err(KvTransferError::Timeout { what, after }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_longer_prompt_gets_a_longer_deadline() {
        let cfg = TransferConfig::default();
        assert_eq!(cfg.deadline_for(0), cfg.transfer_timeout);
        assert_eq!(
            cfg.deadline_for(8_000),
            cfg.transfer_timeout + Duration::from_secs(200)
        );
        // A peer's absurd token count cannot overflow the arithmetic.
        assert!(cfg.deadline_for(usize::MAX) > cfg.transfer_timeout);
    }
}
