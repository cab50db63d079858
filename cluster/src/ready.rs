//! The readiness announcement: a node bound with `--port 0` prints exactly
//! one line `TANDEM_READY role=… addr=…[ kv=…]` on stdout once it accepts
//! requests. Parents read the address from it instead of picking a port
//! themselves, so there is no bind-then-release race.

use std::net::SocketAddr;

use crate::Role;

const PREFIX: &str = "TANDEM_READY";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    pub role: Role,
    /// The node's one port: gRPC and HTTP.
    pub addr: SocketAddr,
    /// Where a decode worker takes KV: its raw-TCP KV port, or its one port
    /// (`addr`) when it takes KV over gRPC.
    pub kv: Option<SocketAddr>,
}

impl ReadyLine {
    /// Prints the line and flushes stdout.
    pub fn announce(&self) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{self}");
        let _ = out.flush();
    }

    /// Parses a line; `None` for any other output.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix(PREFIX)?;
        let (mut role, mut addr, mut kv) = (None, None, None);
        for field in rest.split_whitespace() {
            let (k, v) = field.split_once('=')?;
            match k {
                "role" => role = v.parse().ok(),
                "addr" => addr = v.parse().ok(),
                "kv" => kv = v.parse().ok(),
                _ => {}
            }
        }
        Some(Self {
            role: role?,
            addr: addr?,
            kv,
        })
    }
}

impl std::fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX} role={} addr={}", self.role, self.addr)?;
        if let Some(kv) = self.kv {
            write!(f, " kv={kv}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_other_output() {
        let l = ReadyLine {
            role: Role::Decode,
            addr: "127.0.0.1:4000".parse().unwrap(),
            kv: Some("[::1]:4001".parse().unwrap()),
        };
        assert_eq!(ReadyLine::parse(&l.to_string()), Some(l));
        assert_eq!(ReadyLine::parse("INFO loading model"), None);
        assert_eq!(ReadyLine::parse("TANDEM_READY role=decode"), None);
        assert_eq!(
            ReadyLine::parse("TANDEM_READY role=x addr=127.0.0.1:1"),
            None
        );
    }
}
