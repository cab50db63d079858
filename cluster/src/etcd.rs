//! Cluster membership through etcd: what a node's record looks like, where it
//! lives, and how to reach etcd.
//!
//! Every node registers one [`NodeRecord`] (JSON) under
//! `{prefix}/nodes/{role}/{id}`, attached to a lease that the node keeps
//! alive ([`crate::Registration`]). When a node dies, its lease expires and
//! etcd deletes the key; a watcher ([`crate::Membership`]) turns puts and
//! deletes under `{prefix}/nodes/` into `Up`/`Down` events. The prefix
//! (default `/tandem/v1`) lets several clusters share one etcd.
//!
//! Leases default to 30 s: a brief etcd interruption (a leader election, a
//! restart) must not expire every lease and make the whole cluster
//! re-register and reroute; a crashed node is noticed through failed RPCs long
//! before its lease expires anyway.
//!
//! # Load reports do not go through etcd
//!
//! Per-node load (free KV blocks, queue depth, running batch) goes directly
//! from each worker to the router: the router already polls every worker's
//! `Load` RPC every 100 ms. It is deliberately *not* written to etcd. Every
//! etcd write goes through Raft consensus (a quorum round trip and an fsync on
//! each member) and is kept in the MVCC history until compaction; etcd is
//! built for small, rarely changing state such as membership and
//! configuration. Publishing load every 100 ms from every node would turn
//! etcd into a hot write path whose load grows linearly with cluster size,
//! wake every watcher for each report, and make routing freshness depend on
//! consensus latency. etcd therefore only carries membership (one write when
//! a node joins or its static capacity changes, plus lease keep-alives every
//! ttl/3, which are cheap leader-local operations).

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Role;

/// Default key prefix; several clusters can share an etcd with other prefixes.
pub const DEFAULT_PREFIX: &str = "/tandem/v1";

/// Default lease time-to-live.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// What one node tells the cluster about itself (the etcd value, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// [`crate::PROTOCOL_VERSION`] of the node; watchers skip other versions.
    pub protocol_version: u32,
    #[serde(with = "role_serde")]
    pub role: Role,
    pub id: String,
    /// The node's one port (gRPC + HTTP).
    pub addr: SocketAddr,
    /// Where a decode worker takes KV (its raw-TCP KV port, or `addr` with
    /// gRPC KV).
    pub kv_addr: Option<SocketAddr>,
    pub model_fingerprint: String,
    pub tp_size: u32,
    pub pp_size: u32,
    pub capacity_blocks: u32,
}

impl NodeRecord {
    /// A record with this crate's protocol version, no KV address, TP = PP = 1
    /// and no capacity; set the other fields directly.
    pub fn new(role: Role, id: impl Into<String>, addr: SocketAddr) -> NodeRecord {
        NodeRecord {
            protocol_version: crate::PROTOCOL_VERSION,
            role,
            id: id.into(),
            addr,
            kv_addr: None,
            model_fingerprint: String::new(),
            tp_size: 1,
            pp_size: 1,
            capacity_blocks: 0,
        }
    }

    /// The etcd key of this record under `prefix`.
    pub fn key(&self, prefix: &str) -> String {
        node_key(prefix, self.role, &self.id)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("NodeRecord serialises")
    }

    pub fn from_json(bytes: &[u8]) -> Result<NodeRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

mod role_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::Role;

    pub fn serialize<S: Serializer>(role: &Role, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(role.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `{prefix}/nodes/` : the directory every record lives under.
pub fn nodes_prefix(prefix: &str) -> String {
    format!("{}/nodes/", prefix.trim_end_matches('/'))
}

/// `{prefix}/nodes/{role}/{id}`.
pub fn node_key(prefix: &str, role: Role, id: &str) -> String {
    format!("{}{}/{}", nodes_prefix(prefix), role.as_str(), id)
}

/// The role and id named by a key under `{prefix}/nodes/`, if it is one.
pub fn parse_node_key(prefix: &str, key: &str) -> Option<(Role, String)> {
    let rest = key.strip_prefix(&nodes_prefix(prefix))?;
    let (role, id) = rest.split_once('/')?;
    if id.is_empty() {
        return None;
    }
    Some((role.parse().ok()?, id.to_string()))
}

/// TLS towards etcd (rustls): the CA that signed etcd's certificate and,
/// for client-certificate authentication, this node's certificate and key
/// (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How to reach etcd and where tandem's keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port` (with `tls`).
    pub endpoints: Vec<String>,
    /// Key prefix, default [`DEFAULT_PREFIX`].
    pub prefix: String,
    /// Lease time-to-live (whole seconds, at least 1), default 30 s.
    pub lease_ttl: Duration,
    /// etcd user name and password.
    pub user: Option<(String, String)>,
    pub tls: Option<EtcdTls>,
}

impl EtcdConfig {
    /// A configuration with the defaults for everything but the endpoints.
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            lease_ttl: DEFAULT_LEASE_TTL,
            user: None,
            tls: None,
        }
    }

    /// Splits a comma-separated endpoint list (`--etcd URL[,URL]`). Blank
    /// entries are ignored; an entry without a scheme gets `http://`.
    pub fn parse_endpoints(list: &str) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for raw in list.split(',') {
            let e = raw.trim();
            if e.is_empty() {
                continue;
            }
            let url = if e.contains("://") {
                e.to_string()
            } else {
                format!("http://{e}")
            };
            let uri: http::Uri = url
                .parse()
                .map_err(|err| format!("etcd endpoint {e:?} is not a URL: {err}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) {
                return Err(format!(
                    "etcd endpoint {e:?}: the scheme must be http:// or https://"
                ));
            }
            let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
                return Err(format!("etcd endpoint {e:?} has no host"));
            };
            // Without a port the client would dial 80 or 443 and retry there
            // forever; etcd's own default is 2379, so say so.
            if authority.port_u16().is_none() {
                return Err(format!(
                    "etcd endpoint {e:?} has no port (etcd listens on 2379 by default: {}:2379)",
                    authority.host()
                ));
            }
            if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
                return Err(format!(
                    "etcd endpoint {e:?}: give only the scheme, host and port"
                ));
            }
            out.push(url);
        }
        if out.is_empty() {
            return Err(format!("no etcd endpoint in {list:?}"));
        }
        Ok(out)
    }

    /// [`EtcdConfig::new`] over [`EtcdConfig::parse_endpoints`].
    pub fn from_endpoint_list(list: &str) -> Result<EtcdConfig, String> {
        Ok(EtcdConfig::new(Self::parse_endpoints(list)?))
    }

    /// The lease TTL in whole seconds, as etcd wants it (rounded up, >= 1).
    pub fn lease_ttl_secs(&self) -> i64 {
        let ms = self.lease_ttl.as_millis().max(1);
        ms.div_ceil(1000) as i64
    }
}

/// How long one unary etcd call may take before it counts as failed.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects a fresh client (no request is sent without credentials).
pub(crate) async fn connect(cfg: &EtcdConfig) -> Result<etcd_client::Client, String> {
    let mut opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        // Detects a silently dead connection under long-lived watch and
        // keep-alive streams.
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some((user, password)) = &cfg.user {
        opts = opts
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    if let Some(tls) = &cfg.tls {
        let ca =
            std::fs::read(&tls.ca).map_err(|e| format!("etcd TLS CA {}: {e}", tls.ca.display()))?;
        let mut t =
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                let c = std::fs::read(cert)
                    .map_err(|e| format!("etcd TLS certificate {}: {e}", cert.display()))?;
                let k = std::fs::read(key)
                    .map_err(|e| format!("etcd TLS key {}: {e}", key.display()))?;
                t = t.identity(etcd_client::Identity::from_pem(c, k));
            }
            (None, None) => {}
            _ => return Err("etcd TLS: a client certificate needs both cert and key".into()),
        }
        opts = opts.with_tls(t);
    }
    match tokio::time::timeout(
        CALL_TIMEOUT,
        etcd_client::Client::connect(&cfg.endpoints, Some(opts)),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connecting to etcd {:?}: {e}", cfg.endpoints)),
        Err(_) => Err(format!("connecting to etcd {:?}: timed out", cfg.endpoints)),
    }
}

/// Runs one etcd call bounded by [`CALL_TIMEOUT`], errors as strings.
pub(crate) async fn bounded<T, F>(what: &str, fut: F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("etcd {what}: {e}")),
        Err(_) => Err(format!("etcd {what}: timed out")),
    }
}

/// Jittered exponential backoff, 100 ms doubling up to 5 s; each delay is
/// drawn uniformly from [d/2, d] so that a cluster does not reconnect in step.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Backoff {
        Backoff { next: Self::MIN }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::MIN;
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let frac = (r % 1_000_000) as f64 / 1_000_000.0;
        d.mul_f64(0.5 + 0.5 * frac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_json_and_keys() {
        let mut r = NodeRecord::new(Role::Decode, "d-1", "127.0.0.1:9000".parse().unwrap());
        r.kv_addr = Some("127.0.0.1:9001".parse().unwrap());
        let json = r.to_json();
        assert!(json.contains("\"role\":\"decode\""), "{json}");
        assert_eq!(NodeRecord::from_json(json.as_bytes()).unwrap(), r);
        assert_eq!(r.key("/tandem/v1"), "/tandem/v1/nodes/decode/d-1");
        assert_eq!(r.key("/tandem/v1/"), "/tandem/v1/nodes/decode/d-1");
        assert_eq!(
            parse_node_key("/tandem/v1", "/tandem/v1/nodes/prefill/a/b"),
            Some((Role::Prefill, "a/b".to_string()))
        );
        assert_eq!(parse_node_key("/tandem/v1", "/tandem/v1/nodes/x/a"), None);
        assert_eq!(parse_node_key("/tandem/v1", "/other/nodes/decode/a"), None);
    }

    #[test]
    fn endpoints_and_ttl() {
        assert_eq!(
            EtcdConfig::parse_endpoints("http://127.0.0.1:2379, 10.0.0.2:2379,").unwrap(),
            vec!["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert!(EtcdConfig::parse_endpoints(" , ").is_err());
        assert!(EtcdConfig::parse_endpoints("ftp://x:1").is_err());
        for bad in [
            "notaurl",
            "http://exa mple:2379",
            "https://etcd",
            "http://:2379",
            "etcd:2379/v3",
        ] {
            let err = EtcdConfig::parse_endpoints(bad).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert!(EtcdConfig::parse_endpoints("notaurl")
            .unwrap_err()
            .contains("notaurl:2379"));
        assert_eq!(
            EtcdConfig::parse_endpoints("https://[::1]:2379/").unwrap(),
            vec!["https://[::1]:2379/"]
        );
        let mut c = EtcdConfig::new(vec![]);
        assert_eq!(c.lease_ttl_secs(), 30);
        c.lease_ttl = Duration::from_millis(1500);
        assert_eq!(c.lease_ttl_secs(), 2);
        c.lease_ttl = Duration::ZERO;
        assert_eq!(c.lease_ttl_secs(), 1);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(5));
        }
        let d = b.next_delay();
        assert!(d >= Duration::from_millis(2500), "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
