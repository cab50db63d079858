//! `tandem up`: a whole cluster on this machine. Starts N prefill and M
//! decode workers (or M plain workers with `--colocated`) and a router as
//! child processes of this binary, each on a free port it announces, splits
//! the cores among the workers, and prints the URL. A node that dies is
//! started again on the same port (the router's static peer list names
//! it, and its load poll brings it back); one that keeps dying
//! ([`MAX_RESTARTS`] within [`RESTART_WINDOW`]) stops the cluster with its
//! exit status. Stops them all on Ctrl-C or SIGTERM.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_cluster::{Peer, PeerList, ReadyLine, Role};

use crate::serve::{KvFailureArg, KvTransportArg};

#[derive(clap::Args, Clone, Debug)]
pub struct UpArgs {
    /// A .gguf file or a Hugging Face directory (default: the installed default model).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Prefill workers.
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Decode workers.
    #[arg(long, default_value_t = 1)]
    pub decode: usize,
    /// Plain workers that prefill and decode (no prefill tier), for comparison.
    #[arg(long)]
    pub colocated: bool,
    /// The router's port (the OpenAI API is at http://HOST:PORT/v1).
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Address the router listens on (an IP address, or a name such as localhost).
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1", value_parser = tandem_cluster::peers::resolve_host)]
    pub host: std::net::IpAddr,
    /// Bearer key clients must present.
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true, value_parser = crate::api_key)]
    pub api_key: Option<String>,
    /// Cores to use in all (default: every core).
    #[arg(long, value_parser = crate::positive)]
    pub cores: Option<usize>,
    /// KV cache per worker (see `tandem decode --help`).
    #[arg(long, default_value = "1GiB", value_parser = checked(crate::serve::parse_size))]
    pub kv_cache_memory: String,
    /// Prompts shorter than this skip the prefill tier.
    #[arg(long, default_value_t = 32)]
    pub disagg_min_tokens: usize,
    /// prefix-affinity, least-loaded or round-robin (see `tandem router --help`).
    #[arg(long, default_value = "prefix-affinity", value_parser = checked(|s| s.parse::<tandem_router::policy::RoutePolicy>().map_err(anyhow::Error::msg)))]
    pub route_policy: String,
    /// The model name clients use (default: the model file's stem).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// A LoRA adapter every worker serves, as NAME=DIR (see `tandem decode
    /// --help`); requests name it as their `model`. Repeatable.
    #[arg(long = "lora", value_delimiter = ',')]
    pub loras: Vec<crate::lora::LoraArg>,
    /// Let clients load and unload LoRA adapters while the cluster serves
    /// (see `tandem router --help`).
    #[arg(long)]
    pub allow_runtime_lora: bool,
    /// Tensor-parallel ranks of each prefill worker (one process each).
    #[arg(long, default_value_t = 1)]
    pub prefill_tp: usize,
    /// Pipeline stages of each prefill worker.
    #[arg(long, default_value_t = 1)]
    pub prefill_pp: usize,
    /// Tensor-parallel ranks of each decode worker (shapes may differ from
    /// the prefill workers': KV is mapped between them).
    #[arg(long, default_value_t = 1)]
    pub decode_tp: usize,
    /// Pipeline stages of each decode worker.
    #[arg(long, default_value_t = 1)]
    pub decode_pp: usize,
    /// What the decode workers' KV ports speak (see `tandem decode --help`).
    #[arg(long, env = "TANDEM_KV_TRANSPORT", value_enum, default_value_t = KvTransportArg::Tcp)]
    pub kv_transport: KvTransportArg,
    /// What the decode workers do when a prompt's KV does not arrive (see
    /// `tandem decode --help`).
    #[arg(long, env = "TANDEM_ON_KV_FAILURE", value_enum, default_value_t = KvFailureArg::Fail)]
    pub on_kv_failure: KvFailureArg,
    /// Speculative decoding on the decode (or colocated) workers (see
    /// `tandem decode --help`).
    #[command(flatten)]
    pub speculative: crate::serve::SpeculativeArgs,
}

/// A value parser that checks a flag the way the node that receives it
/// will, and keeps its text to pass on: a bad value is refused here, with
/// clap's message, before any node starts.
fn checked<T: 'static>(
    check: fn(&str) -> Result<T>,
) -> impl Fn(&str) -> std::result::Result<String, String> + Clone + Send + Sync + 'static {
    move |s| {
        check(s)
            .map(|_| s.to_string())
            .map_err(|e| format!("{e:#}"))
    }
}

/// Threads for each prefill and each decode worker. Prefill is compute
/// bound and decode memory bound, so on few cores they share evenly; every
/// worker gets at least one.
pub fn split_cores(cores: usize, prefill: usize, decode: usize) -> (usize, usize) {
    let cores = cores.max(1);
    if prefill == 0 {
        return (0, (cores / decode.max(1)).max(1));
    }
    let prefill_cores = (cores / 2)
        .max(prefill)
        .min(cores.saturating_sub(decode).max(prefill));
    let decode_cores = cores.saturating_sub(prefill_cores).max(decode);
    (
        (prefill_cores / prefill).max(1),
        (decode_cores / decode.max(1)).max(1),
    )
}

/// A child node; killed when dropped.
pub struct Node {
    pub role: Role,
    child: Child,
    pub ready: ReadyLine,
}

impl Drop for Node {
    fn drop(&mut self) {
        // SIGTERM first so a node can drain; then make sure.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The static peer list naming `nodes`.
pub fn peers_of<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> PeerList {
    PeerList(
        nodes
            .into_iter()
            .map(|n| Peer {
                role: n.role,
                addr: n.ready.addr,
            })
            .collect(),
    )
}

/// Stops nodes newest first (the router before the workers it polls).
pub fn stop_all(mut nodes: Vec<Node>) {
    while let Some(n) = nodes.pop() {
        drop(n);
    }
}

/// The binary to start nodes from: the one running, even after its file was
/// replaced (an upgrade or a rebuild while the cluster runs). Its path then
/// names nothing, or a newer build; `/proc/self/exe` still opens this one,
/// so a restarted node is the same version as the rest of the cluster.
fn this_binary() -> Result<PathBuf> {
    let proc_exe = PathBuf::from("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe);
    }
    std::env::current_exe().context("locating this binary")
}

/// Starts `tandem ROLE ... --port 0` and waits for its readiness line.
pub fn spawn(role: Role, args: &[String], secret: &str, log_prefix: &str) -> Result<Node> {
    let mut cmd = Command::new(this_binary()?);
    // `ps` shows the name this was started by, not `/proc/self/exe`.
    if let Some(name) = std::env::args_os().next() {
        cmd.arg0(name);
    }
    cmd.arg(role.as_str())
        .args(args)
        .env("TANDEM_CLUSTER_SECRET", secret)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // The children die with us, even if we are killed.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the {role} node"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    let prefix = log_prefix.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if !sent {
                if let Some(r) = ReadyLine::parse(&line) {
                    let _ = tx.send(r);
                    sent = true;
                    continue;
                }
            }
            println!("[{prefix}] {line}");
        }
    });
    let mut node = Node {
        role,
        child,
        ready: ReadyLine {
            role,
            addr: ([127, 0, 0, 1], 0).into(),
            kv: None,
        },
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => {
                node.ready = r;
                return Ok(node);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(status) = node.child.try_wait()? {
                    bail!("the {role} node exited before it was ready ({status})");
                }
                if Instant::now() > deadline {
                    bail!("the {role} node was not ready within 300 s");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = node.child.wait()?;
                bail!("the {role} node exited before it was ready ({status})");
            }
        }
    }
}

pub fn random_secret() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    hex::encode(b)
}

pub fn run(args: UpArgs) -> Result<()> {
    if [
        args.prefill_tp,
        args.prefill_pp,
        args.decode_tp,
        args.decode_pp,
    ]
    .contains(&0)
    {
        bail!("--prefill-tp/--prefill-pp/--decode-tp/--decode-pp must be at least 1");
    }
    if args.decode == 0 {
        bail!("--decode must be at least 1");
    }
    let prefill = if args.colocated { 0 } else { args.prefill };
    let model = crate::model_path(args.model.clone())?;
    let cores = args.cores.unwrap_or_else(|| crate::thread_count(None));
    let here = crate::thread_count(None);
    if cores > here {
        tracing::warn!(
            "--cores {cores} is more than the {here} this machine has: the workers' threads will compete for them"
        );
    }
    let (p_threads, d_threads) = split_cores(cores, prefill, args.decode);
    let secret = std::env::var("TANDEM_CLUSTER_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(random_secret);
    let host = args.host.to_string();
    let model_s = model.display().to_string();
    crate::lora::check_names(&args.loras)?;
    let served = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| crate::serve::model_name(&model));
    crate::lora::check_not_served(&args.loras, &served)?;
    if !args.loras.is_empty()
        && args.prefill_tp * args.prefill_pp * args.decode_tp * args.decode_pp > 1
    {
        bail!("--lora with --prefill-tp/--prefill-pp/--decode-tp/--decode-pp: LoRA adapters run on unsharded workers only for now");
    }
    let worker_args = |threads: usize, tp: usize, pp: usize| -> Vec<String> {
        let loras = args
            .loras
            .iter()
            .flat_map(|l| ["--lora".to_string(), l.to_string()]);
        vec![
            "--tp".into(),
            tp.to_string(),
            "--pp".into(),
            pp.to_string(),
            "--model".into(),
            model_s.clone(),
            "--host".into(),
            host.clone(),
            "--port".into(),
            "0".into(),
            "--threads".into(),
            threads.to_string(),
            "--kv-cache-memory".into(),
            args.kv_cache_memory.clone(),
        ]
        .into_iter()
        .chain(loras)
        .collect()
    };
    if prefill > 0 {
        crate::notice(&format!(
            "tandem up: {cores} cores: {prefill} prefill worker(s) x {p_threads} thread(s), {} decode worker(s) x {d_threads} thread(s)",
            args.decode
        ));
    } else {
        crate::notice(&format!(
            "tandem up: {cores} cores: {} colocated worker(s) x {d_threads} thread(s)",
            args.decode
        ));
    }
    let mut nodes: Vec<Supervised> = Vec::new();
    for i in 0..prefill {
        nodes.push(Supervised::start(
            Role::Prefill,
            worker_args(p_threads, args.prefill_tp, args.prefill_pp),
            &secret,
            format!("prefill-{i}"),
        )?);
    }
    for i in 0..args.decode {
        let mut decode_args = worker_args(d_threads, args.decode_tp, args.decode_pp);
        decode_args.extend([
            "--kv-transport".into(),
            args.kv_transport.as_str().into(),
            "--on-kv-failure".into(),
            args.on_kv_failure.as_str().into(),
        ]);
        decode_args.extend(args.speculative.to_args());
        nodes.push(Supervised::start(
            Role::Decode,
            decode_args,
            &secret,
            format!("decode-{i}"),
        )?);
    }
    let peers = peers_of(nodes.iter().map(|n| &n.node));
    let mut router_args = vec![
        "--model".into(),
        model_s.clone(),
        "--host".into(),
        host.clone(),
        "--port".into(),
        args.port.to_string(),
        "--peers".into(),
        peers.to_string(),
        "--disagg-min-tokens".into(),
        args.disagg_min_tokens.to_string(),
        "--route-policy".into(),
        args.route_policy.clone(),
    ];
    if let Some(name) = &args.served_model_name {
        router_args.extend(["--served-model-name".into(), name.clone()]);
    }
    if args.allow_runtime_lora {
        router_args.push("--allow-runtime-lora".into());
    }
    // The key travels in the environment, not on the command line.
    if let Some(key) = &args.api_key {
        std::env::set_var("TANDEM_API_KEY", key);
    }
    let router = Supervised::start(Role::Router, router_args, &secret, "router".into())?;
    let url = format!("http://{}/v1", router.node.ready.addr);
    println!("tandem serving {} at {url}", model.display());
    println!("TANDEM_URL {url}");
    nodes.push(router);

    // Wait for a signal, restarting nodes that die.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let s = stop.clone();
        signal_flag(sig, s)?;
    }
    let stop_nodes = |nodes: Vec<Supervised>| stop_all(nodes.into_iter().map(|n| n.node).collect());
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            crate::notice("tandem up: stopping");
            stop_nodes(nodes);
            return Ok(());
        }
        for i in 0..nodes.len() {
            if let Some(status) = nodes[i].node.child.try_wait()? {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Ctrl-C reaches the whole process group: the children
                    // exit as we do, and are not to be started again.
                    break;
                }
                if let Err(e) = nodes[i].restart(status, &secret) {
                    stop_nodes(nodes);
                    return Err(e);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node dying more often than this within [`RESTART_WINDOW`] stops the
/// cluster: restarting a node that cannot run only hides why.
pub const MAX_RESTARTS: usize = 3;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// The pause before the second restart within [`RESTART_WINDOW`] (twice
/// this before the third, and so on).
pub const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// A node `tandem up` started, with what it takes to start it again.
struct Supervised {
    node: Node,
    args: Vec<String>,
    log_prefix: String,
    /// When it was restarted, within the last [`RESTART_WINDOW`].
    restarts: VecDeque<Instant>,
}

impl Supervised {
    fn start(role: Role, args: Vec<String>, secret: &str, log_prefix: String) -> Result<Self> {
        let node = spawn(role, &args, secret, &log_prefix)?;
        Ok(Self {
            node,
            args,
            log_prefix,
            restarts: VecDeque::new(),
        })
    }

    /// Starts the node again, on the port it had, after it exited with
    /// `status`; an error when it has died too often to go on. A new
    /// process that dies before it is ready is one more death, and is
    /// started again under the same rule.
    fn restart(&mut self, status: std::process::ExitStatus, secret: &str) -> Result<()> {
        let role = self.node.role;
        let port = self.node.ready.addr.port();
        let mut why = format!("exited ({status})");
        loop {
            let now = Instant::now();
            while self
                .restarts
                .front()
                .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
            {
                self.restarts.pop_front();
            }
            if self.restarts.len() >= MAX_RESTARTS {
                bail!(
                    "the {role} node {why}, its {}th time within {} s; stopped the cluster",
                    MAX_RESTARTS + 1,
                    RESTART_WINDOW.as_secs()
                );
            }
            // The first restart is at once; another within the window
            // waits a little longer each time, so that a cause that passes
            // (its port still held for a moment) does not use up the
            // restarts in milliseconds.
            let wait = RESTART_PAUSE * self.restarts.len() as u32;
            self.restarts.push_back(now);
            crate::notice(&format!(
                "tandem up: the {role} node {why}; starting it again on port {port}{}",
                if wait.is_zero() {
                    String::new()
                } else {
                    format!(" in {} s", wait.as_secs_f64())
                }
            ));
            std::thread::sleep(wait);
            let args = with_port(&self.args, port);
            match spawn(role, &args, secret, &self.log_prefix) {
                Ok(node) => {
                    self.node = node;
                    return Ok(());
                }
                Err(e) => why = format!("failed to start again ({e:#})"),
            }
        }
    }
}

/// `args` with the value of `--port` replaced by `port`.
fn with_port(args: &[String], port: u16) -> Vec<String> {
    let mut out = args.to_vec();
    if let Some(i) = out.iter().position(|a| a == "--port") {
        if let Some(v) = out.get_mut(i + 1) {
            *v = port.to_string();
        }
    }
    out
}

/// Sets `flag` when `sig` arrives.
fn signal_flag(sig: i32, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    use std::sync::OnceLock;
    static FLAG: OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> = OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_signal(_: i32) {
        if let Some(f) = FLAG.get() {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let r = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    if r == libc::SIG_ERR {
        bail!("cannot install a handler for signal {sig}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{split_cores, with_port};

    #[test]
    fn a_restarted_node_keeps_its_port() {
        let args: Vec<String> = ["--model", "m", "--port", "0", "--threads", "2"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            with_port(&args, 4321),
            ["--model", "m", "--port", "4321", "--threads", "2"].map(String::from)
        );
    }

    #[test]
    fn every_worker_gets_a_core_and_the_split_is_even() {
        assert_eq!(split_cores(2, 1, 1), (1, 1));
        assert_eq!(split_cores(16, 1, 1), (8, 8));
        assert_eq!(split_cores(16, 2, 2), (4, 4));
        assert_eq!(split_cores(2, 0, 1), (0, 2));
        assert_eq!(split_cores(1, 1, 1), (1, 1));
        assert_eq!(split_cores(8, 3, 1), (1, 4));
    }
}
