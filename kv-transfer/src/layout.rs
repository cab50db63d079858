//! What a prefill and a decode worker must agree on before KV moves, and
//! the handshake that checks it.
//!
//! A peer with another model, another block size or another TP/PP split
//! would write blocks that *parse* but mean something else: silently wrong
//! attention. So both sides compare every field at connect time and refuse
//! a mismatch with an error naming the field.

use subtle::ConstantTimeEq;
use tandem_engine::kv::{KvDtype, KvLayout};
use tandem_proto::kv as pb;

use crate::error::{KvTransferError, Result};

/// Version of the KV wire protocol (handshake, frames, replies). Bumped on
/// any incompatible change; peers with another version are refused.
pub const PROTOCOL_VERSION: u32 = 3;

/// The receiver's (or sender's) view of the KV it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutDescriptor {
    pub protocol_version: u32,
    /// `tandem_model::fingerprint::fingerprint` of the loaded model.
    pub model_fingerprint: String,
    /// The cache layout of *this rank's* shard (its KV heads, its layers).
    pub layout: KvLayout,
    pub tp_rank: u32,
    pub tp_size: u32,
    /// Layers `[start, end)` this pipeline stage holds.
    pub pp_layers: std::ops::Range<u32>,
}

impl LayoutDescriptor {
    /// An unsharded worker (TP 1, one PP stage holding every layer).
    pub fn new(model_fingerprint: impl Into<String>, layout: KvLayout) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            model_fingerprint: model_fingerprint.into(),
            layout,
            tp_rank: 0,
            tp_size: 1,
            pp_layers: 0..layout.n_layers as u32,
        }
    }

    /// Refuses `remote` unless it matches us field by field; the error names
    /// the first field that differs.
    pub fn check(&self, remote: &LayoutDescriptor) -> Result<()> {
        fn eq<T: PartialEq + std::fmt::Debug>(
            field: &'static str,
            local: T,
            remote: T,
        ) -> Result<()> {
            if local == remote {
                Ok(())
            } else {
                Err(KvTransferError::Mismatch {
                    field,
                    local: format!("{local:?}"),
                    remote: format!("{remote:?}"),
                })
            }
        }
        let (l, r) = (&self.layout, &remote.layout);
        eq(
            "protocol_version",
            self.protocol_version,
            remote.protocol_version,
        )?;
        eq(
            "model_fingerprint",
            &self.model_fingerprint,
            &remote.model_fingerprint,
        )?;
        eq("dtype", l.dtype, r.dtype)?;
        eq("n_layers", l.n_layers, r.n_layers)?;
        eq("n_kv_heads", l.n_kv_heads, r.n_kv_heads)?;
        eq("head_dim", l.head_dim, r.head_dim)?;
        eq("block_size", l.block_size, r.block_size)?;
        eq("tp_size", self.tp_size, remote.tp_size)?;
        eq("tp_rank", self.tp_rank, remote.tp_rank)?;
        eq("pp_layers", &self.pp_layers, &remote.pp_layers)?;
        Ok(())
    }
}

fn dtype_name(d: KvDtype) -> &'static str {
    match d {
        KvDtype::F32 => "f32",
    }
}

impl From<&LayoutDescriptor> for pb::KvLayout {
    fn from(d: &LayoutDescriptor) -> Self {
        pb::KvLayout {
            protocol_version: d.protocol_version,
            model_fingerprint: d.model_fingerprint.clone(),
            dtype: dtype_name(d.layout.dtype).into(),
            n_layers: d.layout.n_layers as u32,
            n_kv_heads: d.layout.n_kv_heads as u32,
            head_dim: d.layout.head_dim as u32,
            block_size: d.layout.block_size as u32,
            tp_rank: d.tp_rank,
            tp_size: d.tp_size,
            pp_layer_start: d.pp_layers.start,
            pp_layer_end: d.pp_layers.end,
        }
    }
}

impl TryFrom<&pb::KvLayout> for LayoutDescriptor {
    type Error = KvTransferError;
    fn try_from(p: &pb::KvLayout) -> Result<Self> {
        let dtype = match p.dtype.as_str() {
            "f32" => KvDtype::F32,
            other => {
                return Err(KvTransferError::Mismatch {
                    field: "dtype",
                    local: "f32".into(),
                    remote: other.into(),
                })
            }
        };
        Ok(Self {
            protocol_version: p.protocol_version,
            model_fingerprint: p.model_fingerprint.clone(),
            layout: KvLayout {
                dtype,
                n_layers: p.n_layers as usize,
                n_kv_heads: p.n_kv_heads as usize,
                head_dim: p.head_dim as usize,
                block_size: p.block_size as usize,
            },
            tp_rank: p.tp_rank,
            tp_size: p.tp_size,
            pp_layers: p.pp_layer_start..p.pp_layer_end,
        })
    }
}

/// The cluster secret. Debug never prints it.
#[derive(Clone, Default)]
pub struct ClusterSecret(Vec<u8>);

impl ClusterSecret {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self(secret.into())
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Constant-time comparison, so timing does not reveal how many leading
    /// bytes a guess got right (the length may leak; it is not secret).
    pub fn matches(&self, other: &[u8]) -> bool {
        self.0.len() == other.len() && bool::from(self.0.as_slice().ct_eq(other))
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// The first message of every transfer: who we are, what we send, and for
/// which request.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub layout: LayoutDescriptor,
    pub secret: ClusterSecret,
    pub request_id: u64,
    /// Prompt tokens whose KV follows.
    pub tokens: u64,
}

impl Handshake {
    /// The receiver's check: secret first (an outsider learns nothing about
    /// our layout), then every layout field.
    pub fn verify(&self, expected: &LayoutDescriptor, secret: &ClusterSecret) -> Result<()> {
        if !secret.matches(self.secret.as_bytes()) {
            return Err(KvTransferError::BadSecret);
        }
        expected.check(&self.layout)
    }

    /// The handshake as the first `KvFrame` of a gRPC transfer carries it.
    pub fn to_proto(&self) -> pb::KvHandshake {
        pb::KvHandshake {
            layout: Some((&self.layout).into()),
            cluster_secret: self.secret.as_bytes().to_vec(),
            request_id: self.request_id,
            tokens: self.tokens,
            shared_memory: None,
        }
    }

    pub(crate) fn from_proto(p: &pb::KvHandshake) -> Result<Self> {
        let layout = p
            .layout
            .as_ref()
            .ok_or_else(|| KvTransferError::Protocol("handshake without layout".into()))?;
        Ok(Self {
            layout: layout.try_into()?,
            secret: ClusterSecret::new(p.cluster_secret.clone()),
            request_id: p.request_id,
            tokens: p.tokens,
        })
    }
}

/// The receiver's final answer: the counts it verified, or why it failed.
pub(crate) fn outcome(r: &Result<TransferSummary>) -> pb::KvReply {
    match r {
        Ok(s) => pb::KvReply {
            kind: Some(pb::ReplyKind::Done(pb::KvDone {
                frames: s.frames,
                bytes: s.bytes,
            })),
            shared_memory: false,
        },
        Err(e) => refusal(e),
    }
}

/// How a refusal travels back to the sender, so it sees the same typed error.
pub(crate) fn refusal(e: &KvTransferError) -> pb::KvReply {
    let kind = match e {
        KvTransferError::Mismatch {
            field,
            local,
            remote,
        } => pb::ReplyKind::Refused(pb::KvRefused {
            class: e.class().into(),
            field: (*field).into(),
            local: local.clone(),
            remote: remote.clone(),
        }),
        KvTransferError::BadSecret => pb::ReplyKind::Refused(pb::KvRefused {
            class: e.class().into(),
            field: "cluster_secret".into(),
            local: String::new(),
            remote: String::new(),
        }),
        other => pb::ReplyKind::Failed(pb::KvFailed {
            class: other.class().into(),
            message: other.to_string(),
        }),
    };
    pb::KvReply {
        kind: Some(kind),
        shared_memory: false,
    }
}

/// The sender's reading of the receiver's answer to the handshake.
pub(crate) fn accepted(reply: Option<pb::KvReply>) -> Result<()> {
    match reply.and_then(|r| r.kind) {
        Some(pb::ReplyKind::Accepted(true)) => Ok(()),
        Some(pb::ReplyKind::Refused(r)) if r.field == "cluster_secret" => {
            Err(KvTransferError::BadSecret)
        }
        Some(pb::ReplyKind::Refused(r)) => Err(KvTransferError::Refused {
            class: r.class,
            field: r.field,
            local: r.local,
            remote: r.remote,
        }),
        Some(pb::ReplyKind::Failed(f)) => Err(KvTransferError::Remote {
            class: f.class,
            message: f.message,
        }),
        Some(_) => Err(KvTransferError::Protocol(
            "unexpected reply to the handshake".into(),
        )),
        None => Err(KvTransferError::PeerGone(
            "no reply to the handshake".into(),
        )),
    }
}

/// The sender's reading of the receiver's final answer.
pub(crate) fn done(reply: Option<pb::KvReply>) -> Result<TransferSummary> {
    match reply.and_then(|r| r.kind) {
        Some(pb::ReplyKind::Done(d)) => Ok(TransferSummary {
            frames: d.frames,
            bytes: d.bytes,
        }),
        Some(pb::ReplyKind::Failed(f)) => Err(KvTransferError::Remote {
            class: f.class,
            message: f.message,
        }),
        Some(_) => Err(KvTransferError::Protocol("unexpected final reply".into())),
        None => Err(KvTransferError::PeerGone("no final reply".into())),
    }
}

/// What a finished transfer moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransferSummary {
    /// Block frames.
    pub frames: u64,
    /// Payload bytes (KV only, no headers).
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> LayoutDescriptor {
        LayoutDescriptor::new(
            "abc",
            KvLayout {
                dtype: KvDtype::F32,
                n_layers: 4,
                n_kv_heads: 2,
                head_dim: 8,
                block_size: 16,
            },
        )
    }

    #[test]
    fn mismatch_names_the_field() {
        let mut r = desc();
        r.layout.block_size = 32;
        let e = desc().check(&r).unwrap_err();
        assert!(
            matches!(
                e,
                KvTransferError::Mismatch {
                    field: "block_size",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.class(), "layout_mismatch");
        let mut r = desc();
        r.model_fingerprint = "other".into();
        assert!(matches!(
            desc().check(&r),
            Err(KvTransferError::Mismatch {
                field: "model_fingerprint",
                ..
            })
        ));
        assert!(desc().check(&desc()).is_ok());
    }

    #[test]
    fn descriptor_round_trips_through_proto() {
        let mut d = desc();
        d.tp_rank = 1;
        d.tp_size = 2;
        d.pp_layers = 2..4;
        let p: pb::KvLayout = (&d).into();
        assert_eq!(LayoutDescriptor::try_from(&p).unwrap(), d);
    }

    #[test]
    fn secret_compare() {
        let s = ClusterSecret::new("s3cret");
        assert!(s.matches(b"s3cret"));
        assert!(!s.matches(b"s3creT"));
        assert!(!s.matches(b"s3cre"));
        assert_eq!(format!("{s:?}"), "ClusterSecret(..)");
    }
}
