//! Moving a prompt's KV cache from a prefill worker to a decode worker.
//!
//! - [`layout`]: the [`LayoutDescriptor`] both sides must agree on (protocol
//!   version, model fingerprint, cache layout, TP rank/size, PP stage) and
//!   the [`Handshake`] that checks it, with the cluster secret, before any
//!   KV moves. A mismatch is a typed error naming the field.
//! - [`frame`]: the wire form of one (layer, block) region, packed to the
//!   slots actually written, with a CRC-32C computed while copying.
//! - [`transport`]: the [`KvTransport`] / [`KvSender`] seam (send layer by
//!   layer as the prefill computes it) and the [`KvReceiver`] that writes
//!   straight into the blocks the decode worker reserved ([`KvSink`]).
//! - [`tcp`] (length-prefixed frames, the fast path; between processes of
//!   one host the payload moves through a [`shm`] ring) and [`grpc`] (tonic
//!   bidi stream with raised HTTP/2 windows) implement it; so does `nccl`
//!   (feature `cuda`: control frames over TCP, KV over NCCL send/recv).
//!
//! Every failure (checksum, peer gone, deadline, cancellation, missing
//! blocks) is returned as a [`KvTransferError`], so the decode worker
//! releases its reservation and the router can retry.

pub mod error;
pub mod frame;
pub mod grpc;
mod grpc_wire;
pub mod layout;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod shm;
pub mod sink;
pub mod tcp;
pub mod transport;

pub use error::{KvTransferError, Result};
pub use grpc::{GrpcSender, GrpcTransport};
pub use layout::{ClusterSecret, Handshake, LayoutDescriptor, TransferSummary, PROTOCOL_VERSION};
pub use shm::DataPlane;
pub use sink::{KvSink, PoolSink};
pub use tcp::{PendingKv, TcpKvListener, TcpSender, TcpTransport};
pub use tokio_util::sync::CancellationToken;
pub use transport::{
    BlockRegion, KvReceiver, KvSender, KvTransport, ReceiverConfig, TransferConfig,
    PREFILL_ALLOWANCE_PER_TOKEN,
};

#[cfg(feature = "cuda")]
pub use nccl::{NcclConfig, NcclKvListener, NcclPendingKv, NcclSender, NcclTransport};
