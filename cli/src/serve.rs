//! `tandem prefill`, `tandem decode`, `tandem router`: one role per process,
//! each on one port (gRPC and HTTP), announcing readiness on stdout.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_cluster::server::NodeLabels;
use tandem_cluster::{
    ClusterSecret, Drain, EtcdConfig, EtcdTls, Membership, MembershipEvent, NodeRecord, NodeServer,
    PeerList, Readiness, ReadyLine, Registration, Role, SecretCheck,
};
use tandem_engine::engine::{AdapterLimits, Engine, EngineConfig};
use tandem_engine::executor::Executor;
use tandem_engine::guided::Grammars;
use tandem_engine::scheduler::SchedulerConfig;
use tandem_engine::shard::ShardedModel;
use tandem_engine::speculative::SpeculativeConfig;
use tandem_kv_transfer::TransferConfig;
use tandem_model::weights::ModelSource;
use tandem_proto::worker::WorkerServer;
use tandem_router::dispatcher::Dispatcher;
use tokio_util::sync::CancellationToken;

/// Flags every role shares.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeArgs {
    /// A .gguf file or a Hugging Face directory (default: the installed default model).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Address to listen on (an IP address, or a name such as localhost).
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1", value_parser = tandem_cluster::peers::resolve_host)]
    pub host: IpAddr,
    /// The node's one port, gRPC and HTTP (0 picks a free one and announces it).
    #[arg(long, env = "TANDEM_PORT", default_value_t = 0)]
    pub port: u16,
    /// Shared by every node of the cluster; worker and KV ports refuse callers without it.
    #[arg(long, env = "TANDEM_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Static peers, `ROLE=HOST:PORT,...` (the router's view of the
    /// cluster; a host name is looked up once, at start).
    #[arg(long, env = "TANDEM_PEERS")]
    pub peers: Option<PeerList>,
    /// etcd endpoints for discovery, `URL[,URL...]`: workers register there
    /// and the router watches (instead of --peers).
    #[arg(long, env = "TANDEM_ETCD")]
    pub etcd: Option<String>,
    /// Key prefix of this cluster in etcd (several clusters may share one etcd).
    #[arg(long, env = "TANDEM_ETCD_PREFIX", default_value = "/tandem/v1")]
    pub etcd_prefix: String,
    /// Lease TTL of a node's registration: well above etcd hiccups, so an
    /// interruption does not drop healthy nodes.
    #[arg(long, env = "TANDEM_ETCD_LEASE_TTL_SECS", default_value_t = 30)]
    pub etcd_lease_ttl_secs: u64,
    /// etcd user (with --etcd-password).
    #[arg(long, env = "TANDEM_ETCD_USER")]
    pub etcd_user: Option<String>,
    #[arg(long, env = "TANDEM_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// CA certificate (PEM) for etcd over TLS.
    #[arg(long, env = "TANDEM_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd mutual TLS.
    #[arg(long, env = "TANDEM_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "TANDEM_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// The address other nodes reach this one at (default: --host; needed
    /// when --host is a wildcard such as 0.0.0.0).
    #[arg(long, env = "TANDEM_ADVERTISE_HOST")]
    pub advertise_host: Option<IpAddr>,
    /// This node's id (default: role and port).
    #[arg(long, env = "TANDEM_NODE_ID")]
    pub node_id: Option<String>,
    /// On SIGTERM, how long in-flight requests may take to finish before the node exits.
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

/// Flags of the two worker roles.
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Compute threads (default, or 0: all cores).
    #[arg(long, env = "TANDEM_THREADS", value_parser = crate::thread_arg)]
    pub threads: Option<usize>,
    /// Keep an f32 copy of the weights for batched steps (auto|on|off): faster
    /// batched decode for 4 bytes of memory per weight; auto = when it fits.
    #[arg(long, env = "TANDEM_EXPAND_WEIGHTS", default_value = "auto")]
    pub expand_weights: tandem_engine::cpu::ExpandWeights,
    /// Where the engine runs: cpu, cuda[:N] (f32 weights) or cuda-bf16[:N]
    /// (needs a binary built with `--features cuda`).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: crate::device::Device,
    /// KV cache size: bytes with a unit (`512MiB`, `2GB`) or a share of RAM (`25%`).
    #[arg(long, env = "TANDEM_KV_CACHE_MEMORY", default_value = "1GiB")]
    pub kv_cache_memory: String,
    /// Tokens per KV block.
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = 16, value_parser = crate::positive)]
    pub block_size: usize,
    /// Tokens per forward step (decodes plus prefill chunks).
    #[arg(long, env = "TANDEM_MAX_STEP_TOKENS", default_value_t = 512, value_parser = crate::positive)]
    pub max_step_tokens: usize,
    /// Sequences in the running batch at most.
    #[arg(long, env = "TANDEM_MAX_RUNNING", default_value_t = 256, value_parser = crate::positive)]
    pub max_running: usize,
    /// A LoRA adapter to serve besides the base model, as NAME=DIR (PEFT's
    /// adapter_config.json and adapter_model.safetensors in DIR); requests
    /// name it as their `model`. Repeat the flag (or separate with commas in
    /// TANDEM_LORA) for more. Prefill and decode workers need the same ones.
    #[arg(long = "lora", env = "TANDEM_LORA", value_delimiter = ',')]
    pub loras: Vec<crate::lora::LoraArg>,
    /// LoRA adapters held at once, those of --lora and those loaded while
    /// serving (the router's --allow-runtime-lora); a load past it is refused.
    #[arg(long, env = "TANDEM_MAX_LORA_ADAPTERS", default_value_t = 32, value_parser = crate::positive)]
    pub max_lora_adapters: usize,
    /// Largest rank of a LoRA adapter this worker loads.
    #[arg(long, env = "TANDEM_MAX_LORA_RANK", default_value_t = 256, value_parser = crate::positive)]
    pub max_lora_rank: usize,
    /// Tensor-parallel ranks: one process each, started by this one, which
    /// speaks for the worker (--threads are shared among all ranks).
    #[arg(long, env = "TANDEM_TP", default_value_t = 1)]
    pub tp: usize,
    /// Pipeline-parallel stages (of --tp ranks each).
    #[arg(long, env = "TANDEM_PP", default_value_t = 1)]
    pub pp: usize,
    /// Raw-TCP port for incoming KV (decode workers with `--kv-transport
    /// tcp`; 0 picks a free one).
    #[arg(long, env = "TANDEM_KV_PORT", default_value_t = 0)]
    pub kv_port: u16,
    /// How KV arrives (decode workers; prefill workers follow the address a
    /// decode worker gives them): `tcp`, length-prefixed frames on the raw
    /// `--kv-port`; `grpc`, the `tandem.v1.KvTransfer` service on the
    /// node's one port, for networks that pass gRPC and little else.
    #[arg(long, env = "TANDEM_KV_TRANSPORT", value_enum, default_value_t = KvTransportArg::Tcp)]
    pub kv_transport: KvTransportArg,
    /// Move KV between a prefill and a decode worker on one host through
    /// shared memory instead of the socket (a prefill worker offers it to
    /// decode workers on loopback addresses; a decode worker maps what it is
    /// offered). Off: the payload always travels on the socket.
    #[arg(long, env = "TANDEM_KV_SHARED_MEMORY", default_value_t = true, action = clap::ArgAction::Set)]
    pub kv_shared_memory: bool,
    /// What a decode worker does when a prompt's KV does not arrive (the
    /// prefill worker failed or vanished, the transfer broke): `fail`, the
    /// router prefills it again elsewhere and marks the prefill worker down;
    /// `recompute`, this worker computes the prompt itself (logged, and
    /// counted in `tandem_kv_recomputed_total`).
    #[arg(long, env = "TANDEM_ON_KV_FAILURE", value_enum, default_value_t = KvFailureArg::Fail)]
    pub on_kv_failure: KvFailureArg,
    /// Decode workers refuse new requests while this many wait for the batch (bounded queue).
    #[arg(long, env = "TANDEM_MAX_WAITING", default_value_t = 256, value_parser = crate::positive)]
    pub max_waiting: usize,
    /// How long a decode worker keeps a transfer waiting for KV blocks its
    /// pool cannot spare yet (running sequences give them back as they
    /// finish) before refusing it as overloaded; 0 refuses at once, so the
    /// router moves on to another decode worker.
    #[arg(long, env = "TANDEM_KV_RESERVE_TIMEOUT_SECS", default_value_t = 60)]
    pub kv_reserve_timeout_secs: u64,
    #[command(flatten)]
    pub speculative: SpeculativeArgs,
}

/// Speculative decoding by prompt lookup (the output is the same with or
/// without it; see `tandem bench speculative` for what it gains).
#[derive(clap::Args, Clone, Debug)]
pub struct SpeculativeArgs {
    /// Draft tokens a decoding sequence may verify per step, taken from
    /// what followed an earlier occurrence of its last tokens (0: off).
    /// Pays off where answers repeat their prompt (edits, extraction,
    /// code). On CPUs keep it at 7 or less (steps of up to 8 tokens run
    /// the one-pass kernel).
    #[arg(long, env = "TANDEM_SPECULATIVE_TOKENS", default_value_t = 0, value_parser = speculative_tokens)]
    pub speculative_tokens: usize,
    /// Draft only while at most this many sequences decode.
    #[arg(long, env = "TANDEM_SPECULATIVE_MAX_BATCH", default_value_t = 4)]
    pub speculative_max_batch: usize,
    /// Shortest and longest suffix looked up, as MIN..MAX.
    #[arg(long, env = "TANDEM_SPECULATIVE_NGRAM", default_value = "2..4", value_parser = parse_ngram)]
    pub speculative_ngram: (usize, usize),
    /// What one more token costs a step, as a share of a one-token step;
    /// with each sequence's acceptance rate it sets the draft length
    /// (default: 0.35 on CPUs, 0.05 on GPUs).
    #[arg(long, env = "TANDEM_SPECULATIVE_TOKEN_COST", value_parser = speculative_token_cost)]
    pub speculative_token_cost: Option<f32>,
}

/// `--speculative-tokens`: at most 64.
fn speculative_tokens(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= 64 => Ok(n),
        Ok(n) => Err(format!("at most 64, got {n}")),
        Err(e) => Err(e.to_string()),
    }
}

/// `--speculative-token-cost`: a share of a one-token step, 0 to 10.
fn speculative_token_cost(s: &str) -> std::result::Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(c) if (0.0..=10.0).contains(&c) => Ok(c),
        Ok(c) => Err(format!("must be between 0 and 10, got {c}")),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_ngram(s: &str) -> std::result::Result<(usize, usize), String> {
    let (lo, hi) = s
        .split_once("..")
        .ok_or_else(|| format!("expected MIN..MAX, got {s:?}"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("expected MIN..MAX with whole numbers, got {s:?}"))
    };
    let (lo, hi) = (num(lo)?, num(hi)?);
    if lo == 0 || hi < lo || hi > 64 {
        return Err(format!("need 1 <= MIN <= MAX <= 64, got {s:?}"));
    }
    Ok((lo, hi))
}

impl SpeculativeArgs {
    /// The same settings as command-line flags (for the workers `up` starts).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--speculative-tokens".to_string(),
            self.speculative_tokens.to_string(),
            "--speculative-max-batch".into(),
            self.speculative_max_batch.to_string(),
            "--speculative-ngram".into(),
            format!("{}..{}", self.speculative_ngram.0, self.speculative_ngram.1),
        ];
        if let Some(c) = self.speculative_token_cost {
            v.extend(["--speculative-token-cost".into(), c.to_string()]);
        }
        v
    }

    pub fn config(&self, device: crate::device::Device) -> SpeculativeConfig {
        let token_cost = self.speculative_token_cost.unwrap_or(match device {
            crate::device::Device::Cpu => 0.35,
            crate::device::Device::Cuda { .. } => 0.05,
        });
        SpeculativeConfig {
            tokens: self.speculative_tokens,
            ngram_min: self.speculative_ngram.0,
            ngram_max: self.speculative_ngram.1,
            max_batch: self.speculative_max_batch,
            token_cost,
        }
    }
}

/// `--kv-transport`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvTransportArg {
    Tcp,
    Grpc,
}

impl KvTransportArg {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Grpc => "grpc",
        }
    }
}

impl From<KvTransportArg> for tandem_decode::KvTransportKind {
    fn from(a: KvTransportArg) -> Self {
        match a {
            KvTransportArg::Tcp => Self::Tcp,
            KvTransportArg::Grpc => Self::Grpc,
        }
    }
}

/// `--on-kv-failure`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvFailureArg {
    Fail,
    Recompute,
}

impl KvFailureArg {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fail => "fail",
            Self::Recompute => "recompute",
        }
    }
}

impl From<KvFailureArg> for tandem_decode::KvFailurePolicy {
    fn from(a: KvFailureArg) -> Self {
        match a {
            KvFailureArg::Fail => Self::Fail,
            KvFailureArg::Recompute => Self::Recompute,
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct RouterArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Bearer key clients must present on /v1 (and gRPC Generate).
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true, value_parser = crate::api_key)]
    pub api_key: Option<String>,
    /// Web origins whose pages may call the API from a browser (CORS):
    /// `https://app.example.com`, or `*` for any; comma-separated or
    /// repeated. None by default.
    #[arg(long, env = "TANDEM_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// The model name clients use (default: the model file's stem).
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// prefix-affinity, least-loaded or round-robin.
    #[arg(long, env = "TANDEM_ROUTE_POLICY", default_value = "prefix-affinity")]
    pub route_policy: tandem_router::policy::RoutePolicy,
    /// Prompts shorter than this are prefilled on the decode worker.
    #[arg(long, env = "TANDEM_DISAGG_MIN_TOKENS", default_value_t = 32)]
    pub disagg_min_tokens: usize,
    /// Prompts the decode worker caches at least this fraction of are prefilled there.
    #[arg(long, env = "TANDEM_DISAGG_MAX_CACHED", default_value_t = 0.5)]
    pub disagg_max_cached_fraction: f32,
    /// Longest wait for the workers at start.
    #[arg(long, default_value_t = 120)]
    pub connect_timeout_secs: u64,
    /// Longest a request waits for a decode worker when none is left to
    /// take it (all gone or failed it, as while the only one restarts):
    /// a stream cut by a dying worker resumes on the restarted one.
    #[arg(long, env = "TANDEM_WORKER_WAIT_SECS", default_value_t = 10.0)]
    pub worker_wait_secs: f64,
    /// Let clients load and unload LoRA adapters while the cluster serves
    /// (POST /v1/load_lora_adapter and /v1/unload_lora_adapter, as in
    /// vLLM). The adapter's path is read on every worker's machine: set
    /// an --api-key where untrusted clients reach the router.
    #[arg(long, env = "TANDEM_ALLOW_RUNTIME_LORA")]
    pub allow_runtime_lora: bool,
}

fn secret(node: &NodeArgs) -> Result<ClusterSecret> {
    match &node.cluster_secret {
        Some(s) if !s.is_empty() => Ok(ClusterSecret::new(s.clone())),
        _ => bail!("--cluster-secret (or TANDEM_CLUSTER_SECRET) is required: worker ports accept only peers holding it"),
    }
}

/// The etcd settings, when discovery goes through etcd.
fn etcd_config(node: &NodeArgs) -> Result<Option<EtcdConfig>> {
    let Some(list) = &node.etcd else {
        return Ok(None);
    };
    let mut cfg = EtcdConfig::from_endpoint_list(list).map_err(anyhow::Error::msg)?;
    cfg.prefix = node.etcd_prefix.trim_end_matches('/').to_string();
    if node.etcd_lease_ttl_secs < 2 {
        bail!("--etcd-lease-ttl-secs must be at least 2");
    }
    cfg.lease_ttl = Duration::from_secs(node.etcd_lease_ttl_secs);
    cfg.user = match (&node.etcd_user, &node.etcd_password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        (None, None) => None,
        _ => bail!("--etcd-user and --etcd-password go together"),
    };
    cfg.tls = match (&node.etcd_ca, &node.etcd_cert, &node.etcd_key) {
        (None, None, None) => None,
        (Some(ca), cert, key) => Some(EtcdTls {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, _, _) => bail!("--etcd-cert/--etcd-key need --etcd-ca"),
    };
    Ok(Some(cfg))
}

/// The model's name on the API and on `/metrics` when no
/// `--served-model-name` is given: the file name without its extension.
pub(crate) fn model_name(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tandem".into())
}

/// Exports the engine's scheduler counters on the worker's /metrics once a
/// second: queue depth, running sequences, KV blocks, prefix-cache hits and
/// misses, preemptions, and a mixture's tokens per expert.
async fn publish_engine_stats(engine: Arc<Engine>, shutdown: CancellationToken) {
    loop {
        let s = engine.stats();
        metrics::gauge!(tandem_cluster::metrics::WAITING_SEQUENCES).set(s.waiting as f64);
        metrics::gauge!(tandem_cluster::metrics::RUNNING_SEQUENCES).set(s.running as f64);
        metrics::gauge!(tandem_cluster::metrics::KV_BLOCKS).set(s.total_blocks as f64);
        metrics::gauge!(tandem_cluster::metrics::KV_BLOCKS_USED)
            .set(s.total_blocks.saturating_sub(s.free_blocks) as f64);
        metrics::gauge!(tandem_cluster::metrics::KV_BLOCKS_CACHED).set(s.cached_blocks as f64);
        metrics::counter!(tandem_cluster::metrics::PREFIX_CACHE_HITS).absolute(s.prefix.hits);
        metrics::counter!(tandem_cluster::metrics::PREFIX_CACHE_MISSES).absolute(s.prefix.misses);
        metrics::counter!(tandem_cluster::metrics::PREEMPTIONS).absolute(s.preemptions);
        metrics::counter!(tandem_cluster::metrics::GENERATED_TOKENS).absolute(s.generated_tokens);
        metrics::counter!(tandem_cluster::metrics::PROMPT_TOKENS_COMPUTED)
            .absolute(s.prompt_tokens_computed);
        metrics::counter!(tandem_cluster::metrics::SPEC_DRAFT_TOKENS).absolute(s.draft_tokens);
        metrics::counter!(tandem_cluster::metrics::SPEC_ACCEPTED_TOKENS)
            .absolute(s.accepted_draft_tokens);
        for (expert, n) in engine.expert_tokens().into_iter().enumerate() {
            metrics::counter!(tandem_cluster::metrics::MOE_EXPERT_TOKENS, "expert" => expert.to_string())
                .absolute(n);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Binds the node's one port.
async fn bind(node: &NodeArgs) -> Result<NodeServer> {
    NodeServer::bind(SocketAddr::new(node.host, node.port))
        .await
        .with_context(|| format!("binding {}:{}", node.host, node.port))
}

/// The address peers reach `bound` at.
fn advertised(node: &NodeArgs, bound: SocketAddr) -> Result<SocketAddr> {
    let host = node.advertise_host.unwrap_or(bound.ip());
    if host.is_unspecified() {
        bail!(
            "--host {} is a wildcard: pass --advertise-host with the address peers reach this node at",
            bound.ip()
        );
    }
    Ok(SocketAddr::new(host, bound.port()))
}

/// Parses `512MiB`, `2GB`, `1073741824` or `25%` (of RAM).
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let pct: f64 = p
            .trim()
            .parse()
            .with_context(|| format!("bad percentage {s:?}"))?;
        if !(pct > 0.0 && pct <= 100.0) {
            bail!("memory share {s:?} must be in (0%, 100%]");
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no MemTotal in /proc/meminfo")?;
        return Ok((kib * 1024.0 * pct / 100.0) as usize);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("bad size {s:?} (try 512MiB, 2GB or 25%)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        u => bail!("unknown size unit {u:?} in {s:?}"),
    };
    let bytes = n * mult;
    // NaN-safe: `n` came from a float parse.
    if bytes.is_nan() || bytes < 1.0 {
        bail!("size {s:?} must be positive");
    }
    Ok(bytes as usize)
}

/// Refuses a KV cache the machine cannot hold beside the weights. Each
/// rank allocates its pool whole at start: more than the memory left
/// would abort the process or, zero-filled page by page, push the machine
/// into the OOM killer.
fn check_memory(args: &WorkerArgs, kv_bytes: usize, model: &std::path::Path) -> Result<()> {
    const GIB: f64 = (1u64 << 30) as f64;
    let Some(avail) = tandem_engine::cpu::available_memory() else {
        return Ok(());
    };
    // The weights, about their file's size (a directory's shards are not
    // counted: the check is for gross mistakes, not a tight fit).
    let weights = std::fs::metadata(model)
        .ok()
        .filter(|m| m.is_file())
        .map_or(0, |m| m.len());
    let ranks = (args.tp * args.pp) as u64;
    let need = kv_bytes as u64 * ranks + weights;
    if need > avail {
        let each = if ranks > 1 {
            format!(" for each of {ranks} ranks")
        } else {
            String::new()
        };
        bail!(
            "--kv-cache-memory {}{each} ({:.2} GiB in all, with {:.2} GiB of weights) is more than the {:.2} GiB of memory available",
            args.kv_cache_memory,
            need as f64 / GIB,
            weights as f64 / GIB,
            avail as f64 / GIB,
        );
    }
    Ok(())
}

/// A worker's engine, and what keeps a sharded one running.
struct Started {
    engine: Arc<Engine>,
    fingerprint: String,
    threads: usize,
    /// Rank 0 of a sharded worker, and its other ranks' processes.
    sharded: Option<(Arc<ShardedModel>, crate::shard::Ranks)>,
}

fn adapter_limits(args: &WorkerArgs) -> AdapterLimits {
    AdapterLimits {
        max_adapters: args.max_lora_adapters,
        max_rank: args.max_lora_rank,
    }
}

/// Loads the model and starts the engine of a worker.
fn start_engine(args: &WorkerArgs) -> Result<Started> {
    let kv_bytes = parse_size(&args.kv_cache_memory)?;
    let path = crate::model_path(args.node.model.clone())?;
    check_memory(args, kv_bytes, &path)?;
    let src = ModelSource::open(&path).context("loading the model")?;
    let tokenizer = src.tokenizer().context("building the tokenizer")?;
    let fingerprint = tandem_model::fingerprint::fingerprint(&src, &tokenizer);
    let threads = crate::thread_count(args.threads);
    crate::device::check_sharding(args.device, args.tp, args.pp, args.loras.len())?;
    let (model, sharded): (Arc<dyn Executor>, _) = if args.tp * args.pp == 1 {
        let m = crate::device::load_whole(
            &src,
            args.device,
            threads,
            args.expand_weights,
            &args.loras,
            adapter_limits(args),
        )?;
        (m, None)
    } else {
        let (m, ranks) =
            crate::shard::start(&path, &src, args.tp, args.pp, threads, args.expand_weights)?;
        (m.clone(), Some((m, ranks)))
    };
    // The engine keeps at least one block: a budget that holds none (or a
    // huge --block-size) would be overrun, so it is refused here.
    let block_bytes = model.kv_block_bytes(args.block_size);
    if block_bytes > kv_bytes {
        bail!(
            "--kv-cache-memory {} holds no KV block of this model: a block of --block-size {} tokens takes {} bytes",
            args.kv_cache_memory,
            args.block_size,
            block_bytes
        );
    }
    let engine = Engine::start(
        model,
        EngineConfig {
            scheduler: SchedulerConfig {
                max_step_tokens: args.max_step_tokens,
                max_running: args.max_running,
                speculative: args.speculative.config(args.device),
                ..Default::default()
            },
            block_size: args.block_size,
            kv_cache_bytes: kv_bytes,
            reserve_wait: Duration::from_secs(args.kv_reserve_timeout_secs),
            // Without them the worker still serves free text; requests with
            // a response_format are then refused, saying why.
            grammars: Grammars::from_tokenizer(&tokenizer)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "structured output is unavailable for this model")
                })
                .ok(),
            adapter_limits: adapter_limits(args),
        },
    );
    let blocks = engine.stats().total_blocks;
    let tokens = blocks * args.block_size;
    let context = src.config.context_length;
    if tokens < context {
        tracing::warn!(
            "--kv-cache-memory {} holds {tokens} tokens, less than the model's context of {context}: longer requests are refused",
            args.kv_cache_memory
        );
    }
    Ok(Started {
        engine: Arc::new(engine),
        fingerprint,
        threads,
        sharded,
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on SIGINT or SIGTERM.
async fn signalled() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// On SIGINT/SIGTERM: stop taking work (not ready; new requests refused),
/// let in-flight requests finish within `timeout`, then stop the server.
/// The node leaves etcd first, so routers stop sending it work at once.
fn drain_on_signal(
    drain: Drain,
    readiness: Readiness,
    registration: Option<Registration>,
    timeout: Duration,
    shutdown: CancellationToken,
    leave: CancellationToken,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = signalled() => {}
            _ = leave.cancelled() => {}
            _ = shutdown.cancelled() => return,
        }
        tracing::info!(in_flight = drain.in_flight(), "draining");
        readiness.set(false);
        drain.start();
        if let Some(r) = registration {
            let _ = tokio::task::spawn_blocking(move || r.deregister(Duration::from_secs(2))).await;
        }
        if !drain.wait_idle(timeout).await {
            tracing::warn!(
                in_flight = drain.in_flight(),
                "drain deadline passed; stopping with requests in flight"
            );
        }
        shutdown.cancel();
    });
}

pub fn run_worker(role: Role, args: WorkerArgs) -> Result<()> {
    let etcd = etcd_config(&args.node)?;
    let secret = secret(&args.node)?;
    let model_name = model_name(&crate::model_path(args.node.model.clone())?);
    let Started {
        engine,
        fingerprint,
        threads,
        sharded,
    } = start_engine(&args)?;
    let rt = runtime()?;
    // A sharded worker whose rank failed leaves the cluster, as on SIGTERM.
    let leave = CancellationToken::new();
    let why_broken = Arc::new(std::sync::Mutex::new(None::<String>));
    if let Some((m, _)) = &sharded {
        let (m, leave, why) = (Arc::downgrade(m), leave.clone(), why_broken.clone());
        rt.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(m) = m.upgrade() else { return };
                if let Some(reason) = m.broken() {
                    tracing::error!(%reason, "a rank of this worker failed; leaving the cluster");
                    *why.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                    leave.cancel();
                    return;
                }
            }
        });
    }
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let drain = Drain::default();
        let readiness = Readiness::default();
        let server = bind(&args.node).await?;
        let addr = server.local_addr();
        let public = advertised(&args.node, addr)?;
        let node_id = args
            .node
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{role}-{public}"));
        // Before anything records: the labels are fixed at installation.
        tandem_cluster::server::install_metrics(&NodeLabels {
            model: model_name,
            role,
            worker_id: node_id.clone(),
        });
        let mut record = NodeRecord::new(role, node_id.clone(), public);
        record.model_fingerprint = fingerprint.clone();
        record.capacity_blocks = engine.total_blocks() as u32;
        record.tp_size = args.tp as u32;
        record.pp_size = args.pp as u32;
        let transfer = TransferConfig {
            shared_memory: args.kv_shared_memory,
            ..TransferConfig::default()
        };
        let check = SecretCheck(secret.clone());
        let (routes, services, kv) = match role {
            Role::Prefill => {
                let svc = tandem_prefill::PrefillService::new(
                    engine.clone(),
                    tandem_prefill::PrefillConfig {
                        node_id,
                        model_fingerprint: fingerprint,
                        secret,
                        transfer,
                        threads: threads as u32,
                    },
                    drain.clone(),
                );
                (
                    tonic::service::Routes::new(WorkerServer::with_interceptor(svc, check)),
                    vec![tandem_proto::worker::SERVICE],
                    None,
                )
            }
            Role::Decode => {
                let mut svc = tandem_decode::DecodeService::start(
                    engine.clone(),
                    tandem_decode::DecodeConfig {
                        node_id,
                        model_fingerprint: fingerprint,
                        secret,
                        transfer,
                        threads: threads as u32,
                        prefill_timeout: Duration::from_secs(300),
                        max_waiting: args.max_waiting,
                        kv_transport: args.kv_transport.into(),
                        on_kv_failure: args.on_kv_failure.into(),
                    },
                    SocketAddr::new(args.node.host, args.kv_port),
                    Some(public.ip()),
                    public,
                    drain.clone(),
                    shutdown.clone(),
                )
                .await
                .context("binding the KV port")?;
                let kv = svc.kv_addr();
                let kv_service = svc.take_kv_service();
                let mut routes =
                    tonic::service::Routes::new(WorkerServer::with_interceptor(svc, check));
                let mut services = vec![tandem_proto::worker::SERVICE];
                if let Some(k) = kv_service {
                    routes = routes.add_service(k);
                    services.push(tandem_proto::kv::SERVICE);
                }
                (routes, services, Some(kv))
            }
            Role::Router => unreachable!("workers only"),
        };
        record.kv_addr = kv;
        let serve = tokio::spawn(server.serve(
            routes,
            services,
            axum::Router::new(),
            readiness.clone(),
            shutdown.clone(),
        ));
        // Serving before registering: a router that sees the record can connect.
        let registration = etcd.map(|cfg| Registration::start(cfg, record));
        readiness.set(true);
        drain_on_signal(
            drain,
            readiness,
            registration,
            Duration::from_secs(args.node.drain_timeout_secs),
            shutdown.clone(),
            leave,
        );
        tokio::spawn(publish_engine_stats(engine.clone(), shutdown.clone()));
        ReadyLine { role, addr, kv }.announce();
        tracing::info!(%addr, ?kv, %role, "serving");
        serve.await.context("server task")?.context("serving")?;
        anyhow::Ok(())
    })?;
    drop(rt);
    // The engine is gone: rank 0's last reference stops the other ranks.
    drop(sharded);
    if let Some(why) = why_broken.lock().unwrap_or_else(|e| e.into_inner()).take() {
        bail!("the sharded worker failed: {why}");
    }
    Ok(())
}

pub fn run_router(args: RouterArgs) -> Result<()> {
    let etcd = etcd_config(&args.node)?;
    let secret = secret(&args.node)?;
    let peers = match (&args.node.peers, &etcd) {
        (Some(p), None) => {
            if p.of(Role::Decode).next().is_none() {
                bail!("--peers names no decode worker");
            }
            Some(p.clone())
        }
        (None, Some(_)) => None,
        (Some(_), Some(_)) => bail!("use either --peers or --etcd, not both"),
        (None, None) => bail!("the router needs --peers ROLE=HOST:PORT,... or --etcd URL"),
    };
    if !(0.0..=1.0).contains(&args.disagg_max_cached_fraction) {
        bail!("--disagg-max-cached-fraction must be in [0, 1]");
    }
    let cors = tandem_router::api::cors(&args.cors_allow_origin)
        .map_err(|e| anyhow::anyhow!("--cors-allow-origin: {e}"))?;
    let path = crate::model_path(args.node.model.clone())?;
    let src = ModelSource::open(&path).context("loading the model")?;
    let tokenizer = src.tokenizer().context("building the tokenizer")?;
    let fingerprint = tandem_model::fingerprint::fingerprint(&src, &tokenizer);
    let context_length = src.config.context_length;
    let served = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| model_name(&path));
    drop(src);
    let rt = runtime()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let drain = Drain::default();
        let readiness = Readiness::default();
        let server = bind(&args.node).await?;
        let addr = server.local_addr();
        let node_id = match &args.node.node_id {
            Some(id) => id.clone(),
            None => format!("router-{}", advertised(&args.node, addr)?),
        };
        tandem_cluster::server::install_metrics(&NodeLabels {
            model: served.clone(),
            role: Role::Router,
            worker_id: node_id.clone(),
        });
        let cfg = tandem_router::dispatcher::DispatcherConfig {
            route: args.route_policy,
            disagg: tandem_router::policy::DisaggPolicy {
                min_prompt_tokens: args.disagg_min_tokens,
                max_cached_fraction: args.disagg_max_cached_fraction,
            },
            secret,
            fingerprint: fingerprint.clone(),
            connect_timeout: Duration::from_secs(args.connect_timeout_secs),
            load_poll: Duration::from_millis(100),
            worker_wait: Duration::try_from_secs_f64(args.worker_wait_secs)
                .context("--worker-wait-secs")?,
        };
        let (dispatcher, context) = match &peers {
            Some(peers) => {
                let d = Dispatcher::connect(peers, cfg, drain.clone(), shutdown.clone())
                    .await
                    .context("connecting to the workers")?;
                let context = context_length.min(d.max_sequence_tokens());
                (Arc::new(d), context)
            }
            None => {
                // Workers come and go; each checks its own pool limits.
                let d = Arc::new(Dispatcher::new(cfg, drain.clone(), shutdown.clone()));
                let m = Membership::watch(etcd.clone().expect("etcd config"));
                tokio::spawn(follow_membership(m, d.clone(), fingerprint.clone()));
                (d, context_length)
            }
        };
        let mut state = tandem_router::api::ApiState::new(
            dispatcher.clone(),
            Arc::new(tokenizer),
            served,
            context,
            args.api_key.clone(),
        )
        .map_err(anyhow::Error::msg)?;
        state.runtime_lora = args.allow_runtime_lora;
        let state = Arc::new(state);
        let routes =
            tonic::service::Routes::new(tandem_router::api::generate_service(state.clone()));
        // Ready only while some decode worker answers: a router without
        // one could only refuse (or hold) requests, so a load balancer
        // should send them elsewhere. The check also keeps
        // `tandem_router_workers_healthy` current (the health task polls it).
        readiness.require({
            let d = dispatcher.clone();
            move || match d.healthy_workers() {
                (0, _) => Err("no decode worker is available"),
                _ => Ok(()),
            }
        });
        let mut http = tandem_router::api::openai_routes(state);
        if let Some(cors) = cors {
            http = http.layer(cors);
        }
        let http = http.merge(tandem_router::dashboard::dashboard_routes(dispatcher));
        let serve = tokio::spawn(server.serve(
            routes,
            vec![tandem_proto::generate::SERVICE],
            http,
            readiness.clone(),
            shutdown.clone(),
        ));
        let registration = match etcd {
            Some(cfg) => {
                let mut record =
                    NodeRecord::new(Role::Router, node_id, advertised(&args.node, addr)?);
                record.model_fingerprint = fingerprint;
                Some(Registration::start(cfg, record))
            }
            None => None,
        };
        readiness.set(true);
        drain_on_signal(
            drain,
            readiness,
            registration,
            Duration::from_secs(args.node.drain_timeout_secs),
            shutdown.clone(),
            CancellationToken::new(),
        );
        ReadyLine {
            role: Role::Router,
            addr,
            kv: None,
        }
        .announce();
        tracing::info!(%addr, "router serving");
        serve.await.context("server task")?.context("serving")?;
        Ok(())
    })
}

/// Applies etcd membership to the dispatcher: workers that join are
/// connected (and checked) and routed to; workers that leave or whose lease
/// expires are dropped at once.
async fn follow_membership(mut m: Membership, d: Arc<Dispatcher>, fingerprint: String) {
    // Each known worker's address, and what stops its connection attempt
    // (one to a worker that left, or announced itself anew, is given up
    // rather than left retrying until its timeout).
    let mut known: std::collections::HashMap<(Role, String), (SocketAddr, CancellationToken)> =
        Default::default();
    while let Some(ev) = m.events().recv().await {
        match ev {
            MembershipEvent::Up(rec) if rec.role != Role::Router => {
                if rec.model_fingerprint != fingerprint {
                    tracing::warn!(node = %rec.id, "ignoring a worker that serves another model");
                    continue;
                }
                let stop = CancellationToken::new();
                let key = (rec.role, rec.id.clone());
                if let Some((old, connecting)) = known.insert(key, (rec.addr, stop.clone())) {
                    connecting.cancel();
                    if old != rec.addr && !known.values().any(|(a, _)| *a == old) {
                        d.remove(old);
                    }
                }
                let d = d.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = d.add(rec.addr, rec.role) => if let Err(e) = r {
                            tracing::warn!(node = %rec.id, error = %e, "cannot use a worker that joined");
                        },
                    }
                });
            }
            MembershipEvent::Down { role, id } => {
                // Not when another node took the address meanwhile (a
                // restart under a new name, before the old lease ran out).
                if let Some((addr, connecting)) = known.remove(&(role, id)) {
                    connecting.cancel();
                    if !known.values().any(|(a, _)| *a == addr) {
                        d.remove(addr);
                    }
                }
            }
            MembershipEvent::Up(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 3 << 29);
        assert!(parse_size("10%").unwrap() > 0);
        for bad in ["", "abc", "12XB", "0", "-1GB", "0%", "150%"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}
