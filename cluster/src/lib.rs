//! What every tandem node shares, whatever its role:
//!
//! - [`ready`]: the one stdout line a node started with `--port 0` prints
//!   once it serves, and that parents (`tandem up`, tests) wait for;
//! - [`secret`]: the cluster secret that guards worker ports;
//! - [`server`]: one listener serving gRPC and plain HTTP (`/health`,
//!   `/ready`, `/metrics`) side by side;
//! - [`peers`]: the static peer list (`--peers`) for a single machine;
//! - [`drain`]: graceful drain (stop taking work, finish what is in flight).

pub mod drain;
pub mod etcd;
pub mod membership;
pub mod metrics;
pub mod peers;
pub mod ready;
pub mod secret;
pub mod server;

pub use drain::{Drain, DrainGuard};
pub use etcd::{EtcdConfig, EtcdTls, NodeRecord};
pub use membership::{Membership, MembershipEvent, Registration};
pub use peers::{Peer, PeerList};
pub use ready::ReadyLine;
pub use secret::{ClusterSecret, SecretCheck};
pub use server::{NodeServer, Readiness};

/// Version of the worker control protocol (worker.proto). Bumped on any
/// incompatible change; the router refuses workers with another version.
pub const PROTOCOL_VERSION: u32 = 2;

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Prefill,
    Decode,
    Router,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Router => "router",
        }
    }

    pub fn to_proto(self) -> tandem_proto::worker::Role {
        match self {
            Role::Prefill => tandem_proto::worker::Role::Prefill,
            Role::Decode => tandem_proto::worker::Role::Decode,
            Role::Router => tandem_proto::worker::Role::Router,
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            "router" => Ok(Role::Router),
            other => Err(format!(
                "unknown role {other:?} (expected prefill, decode or router)"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
