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
            let addr = addr
                .parse()
                .map_err(|e| format!("peer {item:?}: bad address: {e}"))?;
            out.push(Peer { role, addr });
        }
        Ok(Self(out))
    }
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
    }
}
