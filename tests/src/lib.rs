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
        let mut cmd = Command::new(tandem_bin());
        cmd.arg(role.as_str())
            .args(["--port", "0", "--host", "127.0.0.1"])
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

impl Cluster {
    /// `prefill` prefill workers (0: colocated) and `decode` decode workers
    /// of `threads` threads each; every prompt is disaggregated when there
    /// are prefill workers (`--disagg-min-tokens 0`) unless `router_args`
    /// says otherwise.
    pub fn start(prefill: usize, decode: usize, threads: usize, router_args: &[&str]) -> Cluster {
        let turn = one_at_a_time();
        let model = model_path();
        let model = model.to_str().expect("utf-8 path");
        let t = threads.to_string();
        let worker = [
            "--model",
            model,
            "--threads",
            &t,
            "--kv-cache-memory",
            "256MiB",
        ];
        let prefill: Vec<Node> = (0..prefill)
            .map(|_| Node::start(Role::Prefill, &worker))
            .collect();
        let decode: Vec<Node> = (0..decode)
            .map(|_| Node::start(Role::Decode, &worker))
            .collect();
        let peers = prefill
            .iter()
            .map(|n| format!("prefill={}", n.addr()))
            .chain(decode.iter().map(|n| format!("decode={}", n.addr())))
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec!["--model", model, "--peers", &peers];
        if !router_args.contains(&"--disagg-min-tokens") {
            args.extend(["--disagg-min-tokens", "0"]);
        }
        args.extend_from_slice(router_args);
        let router = Node::start(Role::Router, &args);
        Cluster {
            prefill,
            decode,
            router,
            _turn: turn,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.router.addr())
    }
}
