//! The one error type of this crate.

use std::time::Duration;

/// Why a KV transfer failed. Every failure is explicit: the caller (decode
/// worker) releases the blocks it reserved, and the router may retry.
#[derive(Debug, thiserror::Error)]
pub enum KvTransferError {
    /// The peers disagree on something that changes how blocks are read;
    /// refused at the handshake, before any KV moves.
    #[error("KV handshake refused: {field} differs (local {local}, remote {remote})")]
    Mismatch {
        field: &'static str,
        local: String,
        remote: String,
    },
    /// The peer does not hold the cluster secret.
    #[error("KV handshake refused: wrong cluster secret")]
    BadSecret,
    /// The receiver refused us; it named the field (as it sees it).
    #[error(
        "KV handshake refused by the receiver: {field} differs (receiver {local}, ours {remote})"
    )]
    Refused {
        class: String,
        field: String,
        local: String,
        remote: String,
    },
    /// A frame's payload does not match its checksum.
    #[error("KV frame checksum mismatch (layer {layer}, block {block}): expected {expected:#010x}, got {actual:#010x}")]
    Checksum {
        layer: u32,
        block: u32,
        expected: u32,
        actual: u32,
    },
    /// The peer broke the protocol (bad header, out-of-range block, missing blocks…).
    #[error("KV protocol error: {0}")]
    Protocol(String),
    /// The peer went away before the transfer finished (killed, crashed, closed).
    #[error("KV peer closed the transfer before it finished: {0}")]
    PeerGone(String),
    /// A read or write, or the whole transfer, passed its deadline.
    #[error("KV transfer timed out ({what} after {after:?})")]
    Timeout { what: &'static str, after: Duration },
    /// The peer sent nothing, not even a heartbeat, for a whole lease: it
    /// is hung or gone, and this side gives up its part of the transfer.
    #[error("KV transfer lease expired: the {peer} sent nothing for {after:?}")]
    LeaseExpired { peer: &'static str, after: Duration },
    /// Cancelled by the caller.
    #[error("KV transfer cancelled")]
    Cancelled,
    /// The remote side reported a failure.
    #[error("KV transfer failed on the peer ({class}): {message}")]
    Remote { class: String, message: String },
    #[error("KV transport I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("KV gRPC transport: {0}")]
    Grpc(String),
    /// The CUDA driver or NCCL failed (or could not be loaded at all).
    #[cfg(feature = "cuda")]
    #[error("KV NCCL transport: {0}")]
    Cuda(String),
}

impl KvTransferError {
    /// Low-cardinality class for metric labels and wire replies (never the
    /// message, which carries request-specific detail).
    pub fn class(&self) -> &'static str {
        match self {
            Self::Mismatch { .. } | Self::Refused { .. } => "layout_mismatch",
            Self::BadSecret => "unauthenticated",
            Self::Checksum { .. } => "checksum",
            Self::Protocol(_) => "protocol",
            Self::PeerGone(_) => "peer_gone",
            Self::Timeout { .. } => "timeout",
            Self::LeaseExpired { .. } => "lease_expired",
            Self::Cancelled => "cancelled",
            Self::Remote { .. } => "remote",
            Self::Io(_) => "io",
            Self::Grpc(_) => "grpc",
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => "cuda",
        }
    }

    /// Whether the router may retry the request elsewhere (configuration
    /// mismatches will fail again on the same pair).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Self::Mismatch { .. } | Self::Refused { .. } | Self::BadSecret | Self::Cancelled
        )
    }
}

impl From<tonic::Status> for KvTransferError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Aborted => {
                Self::PeerGone(s.message().to_string())
            }
            tonic::Code::DeadlineExceeded => Self::Timeout {
                what: "grpc call",
                after: Duration::ZERO,
            },
            _ => Self::Grpc(format!("{}: {}", s.code(), s.message())),
        }
    }
}

pub type Result<T, E = KvTransferError> = std::result::Result<T, E>;
