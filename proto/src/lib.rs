//! tandem's wire types: the `.proto` files of package `tandem.v1` and the
//! tonic/prost code generated from them at build time.
//!
//! The generated module stays private so prost types do not leak into
//! engine or router logic; this crate re-exports the types callers use, and
//! nodes convert to their own types at the edge (`From`/`TryFrom`).

mod pb {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("tandem.v1");
}

/// The public generation API.
pub mod generate {
    pub use crate::pb::generate_client::GenerateClient;
    pub use crate::pb::generate_request::Input;
    pub use crate::pb::generate_server::{Generate, GenerateServer};
    /// The service's full name, as reflection lists it.
    pub const SERVICE: &str = crate::pb::generate_server::SERVICE_NAME;
    pub use crate::pb::{
        ChatMessage, ChatMessages, FinishReason, GenerateRequest, GenerateResponse,
        GenerateStreamResponse, PromptTokenLogprob, SamplingParams, TokenBias, TokenIds,
        TokenLogprob, Usage,
    };
}

/// The KV transfer service (prefill → decode).
pub mod kv {
    pub use crate::pb::kv_frame::Kind as FrameKind;
    pub use crate::pb::kv_reply::Kind as ReplyKind;
    pub use crate::pb::kv_transfer_client::KvTransferClient;
    pub use crate::pb::kv_transfer_server::{KvTransfer, KvTransferServer};
    /// The service's full name, as reflection lists it.
    pub const SERVICE: &str = crate::pb::kv_transfer_server::SERVICE_NAME;
    pub use crate::pb::{
        KvBlock, KvBlocks, KvDone, KvEnd, KvFailed, KvFrame, KvHandshake, KvLayout, KvRefused,
        KvReply, SharedMemoryOffer,
    };
}

/// The worker control protocol (router → workers, decode → prefill).
pub mod worker {
    pub use crate::pb::decode_event::Kind as DecodeEventKind;
    pub use crate::pb::worker_client::WorkerClient;
    pub use crate::pb::worker_server::{Worker, WorkerServer};
    /// The service's full name, as reflection lists it.
    pub const SERVICE: &str = crate::pb::worker_server::SERVICE_NAME;
    pub use crate::pb::{
        AdapterList, Admitted, CachedPrefixRequest, CachedPrefixResponse, CancelRequest,
        CancelResponse, DecodeEvent, DecodeRequest, Finished, InfoRequest, LoadAdapterRequest,
        LoadReport, LoadRequest, LoraAdapter, NodeInfo, PrefillRecomputed, PrefillRequest,
        PrefillResponse, PromptLogprobs, Role, SampledToken, UnloadAdapterRequest, WorkerError,
        WorkerSampling,
    };
    pub use crate::pb::{FinishReason, TokenBias, TokenLogprob};

    /// Metadata key carrying the cluster secret on every worker call.
    pub const SECRET_METADATA: &str = "x-tandem-cluster-secret";

    /// Largest worker reply a worker client accepts. tonic's 4 MiB default
    /// is below a long prompt's scores (`PromptLogprobs`: ~200 bytes per
    /// token with 20 alternatives, so 32k tokens are ~7 MB).
    pub const MAX_REPLY_BYTES: usize = 256 << 20;
}

/// HTTP/2 settings of every endpoint that carries KV over gRPC: a node's
/// one port, the standalone KV server and the KV client. The defaults of
/// tonic and hyper (64 KiB to 1 MiB windows, 16 KiB frames) would throttle
/// KV, and cut nearly every block across two frames.
pub mod http2 {
    /// Bytes in flight per stream: one layer of a long prompt.
    pub const STREAM_WINDOW: u32 = 16 << 20;
    /// Bytes in flight per connection: several transfers share one.
    pub const CONNECTION_WINDOW: u32 = 64 << 20;
    /// Largest DATA frame a receiver takes: a batch of blocks (about 1 MiB)
    /// in one or two.
    pub const MAX_FRAME: u32 = 1 << 20;
}

/// Encoded `FileDescriptorSet` of every tandem.v1 file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tandem_v1_descriptor");

/// The gRPC server reflection services of a node that serves `services`
/// (full names, such as [`generate::SERVICE`]), described by tandem.v1 and
/// the `extra` encoded descriptor sets (health checking, say), so tools
/// such as grpcurl work against any node without local .proto files: v1,
/// and v1alpha, which grpcio's reflection client and older tools still
/// ask. Only what the node serves is listed (every role shares one
/// descriptor set), with health checking and reflection itself.
#[allow(clippy::type_complexity)]
pub fn reflection_services(
    services: &[&str],
    extra: &[&'static [u8]],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        let b = extra.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET),
            |b, set| b.register_encoded_file_descriptor_set(set),
        );
        services
            .iter()
            .copied()
            .chain(ALWAYS_SERVED)
            .fold(b, |b, name| b.with_service_name(name))
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// What every node serves besides its own services.
const ALWAYS_SERVED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_lists_both_services() {
        let set = prost_types_free_names(super::FILE_DESCRIPTOR_SET);
        for name in [
            "tandem/v1/generate.proto",
            "tandem/v1/kv_transfer.proto",
            "GenerateStream",
            "KvTransfer",
            "tandem/v1/worker.proto",
            "Prefill",
        ] {
            assert!(set.contains(name), "{name} missing from the descriptor set");
        }
        assert!(super::reflection_services(&[super::generate::SERVICE], &[]).is_ok());
    }

    /// Cheap check without prost-types: the names appear in the encoded set.
    fn prost_types_free_names(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn kv_frame_round_trips_with_bytes_payload() {
        use super::kv::*;
        let f = KvFrame {
            kind: Some(FrameKind::Blocks(KvBlocks {
                request_id: 7,
                blocks: vec![KvBlock {
                    layer: 1,
                    block: 2,
                    slots: 3,
                    crc32c: 4,
                    payload: vec![1u8, 2, 3].into(),
                }],
            })),
        };
        let back = KvFrame::decode(f.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, f);
    }
}
