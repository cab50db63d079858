//! Static discovery for one machine: `--peers prefill=ADDR,decode=ADDR,...`.

use std::net::SocketAddr;

use crate::Role;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerList(pub Vec<Peer>);

impl PeerList {
    pub fn of(&self, role: Role) -> impl Iterator<Item = SocketAddr> + '_ {
        self.0
            .iter()
            .filter(move |p| p.role == role)
            .map(|p| p.addr)
    }
}

impl std::str::FromStr for PeerList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (role, addr) = item
                .split_once('=')
                .ok_or_else(|| format!("peer {item:?} is not ROLE=HOST:PORT"))?;
            let role: Role = role.parse()?;
            let addr = resolve(addr).map_err(|e| format!("peer {item:?}: {e}"))?;
            out.push(Peer { role, addr });
        }
        Ok(Self(out))
    }
}

/// `HOST:PORT` as an address: an IP address as written, or a name (a
/// Kubernetes Service, `localhost`) looked up once, now, taking its first
/// address.
pub fn resolve(hostport: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = hostport.parse() {
        return Ok(a);
    }
    if hostport
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(format!("{hostport:?} is not HOST:PORT"));
    }
    hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {hostport:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport:?} resolves to no address"))
}

/// A host to listen on: an IP address, or a name resolved to its first
/// address (`localhost`).
pub fn resolve_host(host: &str) -> Result<std::net::IpAddr, String> {
    if let Ok(ip) = host.parse() {
        return Ok(ip);
    }
    resolve(&format!("{host}:0"))
        .map(|a| a.ip())
        .map_err(|_| format!("{host:?} is neither an IP address nor a name that resolves"))
}

impl std::fmt::Display for PeerList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={}", p.role, p.addr)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let l: PeerList = "prefill=127.0.0.1:1, decode=[::1]:2".parse().unwrap();
        assert_eq!(l.of(Role::Prefill).count(), 1);
        assert_eq!(l.of(Role::Decode).next(), Some("[::1]:2".parse().unwrap()));
        assert_eq!(l.to_string().parse::<PeerList>().unwrap(), l);
        assert!("prefill:127.0.0.1:1".parse::<PeerList>().is_err());
        assert!("gpu=127.0.0.1:1".parse::<PeerList>().is_err());
        assert!("decode=localhost".parse::<PeerList>().is_err());
        assert!("decode=:80".parse::<PeerList>().is_err());
        // Names are looked up (here in /etc/hosts).
        let named: PeerList = "decode=localhost:7002".parse().unwrap();
        assert!(named.0[0].addr.ip().is_loopback());
        assert_eq!(named.0[0].addr.port(), 7002);
        assert!(resolve_host("localhost").unwrap().is_loopback());
        assert_eq!(
            resolve_host("::1").unwrap(),
            std::net::IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
        );
        assert!(resolve_host("no such host!").is_err());
    }
}
