//! A real etcd (Debian `etcd-server`) for the tests, on loopback ports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_cluster::EtcdConfig;

pub fn etcd_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    });
    match on_path {
        Some(p) => p,
        None if std::path::Path::new("/usr/bin/etcd").is_file() => "/usr/bin/etcd".into(),
        None => panic!(
            "etcd not found on PATH: these tests need a real etcd; the setup script \
             (scripts/common.sh) installs the Debian package `etcd-server`"
        ),
    }
}

fn free_port_pair() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// A throwaway etcd on loopback ports, with its data in a temporary
/// directory; killed when dropped.
pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd on two free loopback ports (up to three tries).
    pub fn start() -> Etcd {
        let mut last = String::new();
        for _ in 0..3 {
            let (client_port, peer_port) = free_port_pair();
            let mut e = Etcd {
                child: None,
                client_port,
                peer_port,
                dir: tempfile::tempdir().unwrap(),
            };
            match e.spawn() {
                Ok(()) => return e,
                Err(msg) => last = msg,
            }
        }
        panic!("etcd did not start after 3 tries: {last}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn config(&self, prefix: &str, ttl: Duration) -> EtcdConfig {
        let mut cfg = EtcdConfig::new(vec![self.endpoint()]);
        cfg.prefix = prefix.to_string();
        cfg.lease_ttl = ttl;
        cfg
    }

    fn spawn(&mut self) -> Result<(), String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new(etcd_binary())
            .args(["--name", "default"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawning etcd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                return Err(format!("etcd exited ({status}): {tail}"));
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        Err("etcd did not become healthy within 15 s".into())
    }

    fn healthy(&self) -> bool {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Kills etcd (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.stop();
        let mut last = String::new();
        for _ in 0..3 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("etcd did not restart: {last}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
