//! Helpers for the end-to-end tests: start real `tandem` processes on
//! loopback (each with `--port 0`, read back from its readiness line) and
//! stop them when the test ends, whatever happens.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tandem_cluster::{ReadyLine, Role};

pub mod etcd;

/// The secret the test clusters share.
pub const SECRET: &str = "e2e-test-secret";

/// The `tandem` binary of this build (cargo builds it before the tests of
/// the workspace run: the cli package has integration tests of its own).
pub fn tandem_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    let bin = dir.join("tandem");
    assert!(
        bin.exists(),
        "the tandem binary is missing at {}; build the workspace first (cargo build --release --workspace)",
        bin.display()
    );
    bin
}

/// The default model, which the tests require.
pub fn model_path() -> PathBuf {
    let p = tandem_model::default_model_path();
    assert!(
        p.exists(),
        "the default model is not installed at {}; run `tandem model fetch` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A running node; SIGKILLed when dropped.
pub struct Node {
    pub child: Child,
    pub ready: ReadyLine,
}

impl Node {
    /// Starts `tandem ROLE ARGS... --port 0` and waits for its readiness line.
    pub fn start(role: Role, args: &[&str]) -> Node {
        Self::start_with_env(role, args, &[])
    }

    pub fn start_with_env(role: Role, args: &[&str], env: &[(&str, &str)]) -> Node {
        Self::start_at(role, 0, args, env)
    }

    /// [`Node::start_with_env`] on `port` (0: any free one), as a node
    /// restarted where it was.
    pub fn start_at(role: Role, port: u16, args: &[&str], env: &[(&str, &str)]) -> Node {
        let port = port.to_string();
        let mut cmd = Command::new(tandem_bin());
        cmd.arg(role.as_str())
            .args(["--port", &port, "--host", "127.0.0.1"])
            .args(args)
            .env("TANDEM_CLUSTER_SECRET", SECRET)
            .env_remove("TANDEM_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting tandem");
        let ready = wait_ready(&mut child, Duration::from_secs(120));
        Node { child, ready }
    }

    pub fn addr(&self) -> SocketAddr {
        self.ready.addr
    }

    /// SIGKILL, as a crash would, and reaps it; a node already gone is
    /// left be.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        self.child.kill().expect("killing a node");
        self.child.wait().expect("reaping a node");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the child's stdout until its readiness line (and keeps draining
/// it afterwards so the child never blocks on a full pipe).
pub fn wait_ready(child: &mut Child, timeout: Duration) -> ReadyLine {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(r) = ReadyLine::parse(&line) {
                let _ = tx.send(r);
            }
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = rx.recv_timeout(Duration::from_millis(100)) {
            return r;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("node exited before it was ready: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "node not ready within {timeout:?}"
        );
    }
}

/// Cluster tests run one at a time: two cores cannot host two clusters
/// calmly, and time bounds in the tests assume the machine is theirs.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A router in front of some workers.
pub struct Cluster {
    /// First, so it stops before the workers it polls (fields drop in order).
    pub router: Node,
    pub prefill: Vec<Node>,
    pub decode: Vec<Node>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    pub prefill: usize,
    pub decode: usize,
    pub threads: usize,
    /// Extra flags for every worker.
    pub worker_args: Vec<String>,
    /// Extra flags for the prefill workers only.
    pub prefill_args: Vec<String>,
    /// Extra flags for the decode workers only.
    pub decode_args: Vec<String>,
    /// Extra flags for the router.
    pub router_args: Vec<String>,
    /// Discover through this etcd endpoint (under `etcd_prefix`) instead of `--peers`.
    pub etcd: Option<(String, String)>,
    /// The model every node serves (default: the default model).
    pub model: Option<PathBuf>,
}

impl ClusterSpec {
    fn model(&self) -> String {
        self.model
            .clone()
            .unwrap_or_else(model_path)
            .to_string_lossy()
            .into_owned()
    }
}

impl Cluster {
    /// `prefill` prefill workers (0: colocated) and `decode` decode workers
    /// of `threads` threads each; every prompt is disaggregated when there
    /// are prefill workers (`--disagg-min-tokens 0`) unless `router_args`
    /// says otherwise.
    pub fn start(prefill: usize, decode: usize, threads: usize, router_args: &[&str]) -> Cluster {
        Self::start_spec(ClusterSpec {
            prefill,
            decode,
            threads,
            router_args: router_args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    pub fn start_spec(spec: ClusterSpec) -> Cluster {
        let turn = one_at_a_time();
        let prefill: Vec<Node> = (0..spec.prefill)
            .map(|_| Self::worker(&spec, Role::Prefill))
            .collect();
        let decode: Vec<Node> = (0..spec.decode)
            .map(|_| Self::worker(&spec, Role::Decode))
            .collect();
        let model = spec.model();
        let mut args: Vec<String> = vec!["--model".into(), model];
        match &spec.etcd {
            Some((url, prefix)) => args.extend([
                "--etcd".into(),
                url.clone(),
                "--etcd-prefix".into(),
                prefix.clone(),
            ]),
            None => {
                let peers = prefill
                    .iter()
                    .map(|n| format!("prefill={}", n.addr()))
                    .chain(decode.iter().map(|n| format!("decode={}", n.addr())))
                    .collect::<Vec<_>>()
                    .join(",");
                args.extend(["--peers".into(), peers]);
            }
        }
        if !spec.router_args.iter().any(|a| a == "--disagg-min-tokens") {
            args.extend(["--disagg-min-tokens".into(), "0".into()]);
        }
        args.extend(spec.router_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let router = Node::start(Role::Router, &args);
        Cluster {
            prefill,
            decode,
            router,
            _turn: turn,
        }
    }

    /// Starts one more worker as `spec` describes (it joins through etcd).
    pub fn worker(spec: &ClusterSpec, role: Role) -> Node {
        Self::worker_at(spec, role, 0)
    }

    /// [`Cluster::worker`] on `port` (0: any free one), as a worker
    /// restarted where it was.
    pub fn worker_at(spec: &ClusterSpec, role: Role, port: u16) -> Node {
        let model = spec.model();
        let mut args: Vec<String> = vec![
            "--model".into(),
            model,
            "--threads".into(),
            spec.threads.max(1).to_string(),
        ];
        let own = match role {
            Role::Prefill => &spec.prefill_args,
            _ => &spec.decode_args,
        };
        if !spec
            .worker_args
            .iter()
            .chain(own)
            .any(|a| a == "--kv-cache-memory")
        {
            args.extend(["--kv-cache-memory".into(), "256MiB".into()]);
        }
        if let Some((url, prefix)) = &spec.etcd {
            args.extend([
                "--etcd".into(),
                url.clone(),
                "--etcd-prefix".into(),
                prefix.clone(),
            ]);
        }
        args.extend(spec.worker_args.iter().cloned());
        args.extend(own.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Node::start_at(role, port, &args, &[])
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.router.addr())
    }
}
