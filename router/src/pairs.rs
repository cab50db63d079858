//! Prefill→decode pairs whose KV hand-over failed, kept apart for a while.
//!
//! A decode worker that reports `prefill_failed` cannot say whether the
//! prefill worker is broken for everyone or only unreachable from it (a
//! firewall, a wrong advertised address, a mismatched layout). The
//! dispatcher marks the prefill worker down, which only lasts until the next
//! load poll finds it alive; this table keeps the failing *pair* apart
//! beyond that, so a prefill worker that serves every other decode worker
//! is not paired again and again with the one it cannot reach. A pair
//! waits [`FIRST_BACKOFF`] after its first failure, twice as long after each
//! failure that follows within [`MAX_BACKOFF`] of the last, up to
//! [`MAX_BACKOFF`]. Failures while the pair is avoided count as the one
//! that started it: no new hand-over is sent to an avoided pair, so they
//! belong to requests dispatched before it (one broken link fails every
//! transfer in flight on it at once, which would otherwise double the wait
//! once per request). A hand-over that works clears it, and so does either
//! worker coming back after its load polls failed (restarted, or back on
//! the network: [`Peer::returns`]), since whatever broke the pair may be
//! gone with that.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a pair is avoided after its first failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// The longest a pair is avoided, and how long its record lasts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// One life of a worker: its address, which connection of the router's
/// it is (a worker that joins again at the address, through discovery,
/// is a new one), and how many times the router saw it come back after
/// failed load polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub joined: u64,
    pub returns: u64,
}

impl Peer {
    fn life(self) -> (u64, u64) {
        (self.joined, self.returns)
    }
}

#[derive(Debug, Clone, Copy)]
struct Strike {
    failed_at: Instant,
    backoff: Duration,
    /// The two workers' lives when it failed.
    lives: ((u64, u64), (u64, u64)),
}

/// Failing (prefill, decode) pairs and how long each is avoided.
#[derive(Debug, Default)]
pub struct PairHealth {
    strikes: Mutex<HashMap<(SocketAddr, SocketAddr), Strike>>,
}

impl PairHealth {
    /// The hand-over from `prefill` to `decode` failed at `now`.
    pub fn failed(&self, prefill: Peer, decode: Peer, now: Instant) {
        let mut m = self.strikes.lock().unwrap_or_else(|e| e.into_inner());
        // Forget what is long over, so the table stays small.
        m.retain(|_, s| now.saturating_duration_since(s.failed_at) < MAX_BACKOFF);
        let lives = (prefill.life(), decode.life());
        let backoff = match m.get(&(prefill.addr, decode.addr)) {
            // The incident that started the wait (see the module docs).
            Some(s) if s.lives == lives && now < s.failed_at + s.backoff => return,
            Some(s) if s.lives == lives => (s.backoff * 2).min(MAX_BACKOFF),
            _ => FIRST_BACKOFF,
        };
        m.insert(
            (prefill.addr, decode.addr),
            Strike {
                failed_at: now,
                backoff,
                lives,
            },
        );
        let (prefill, decode) = (prefill.addr, decode.addr);
        tracing::warn!(%prefill, %decode, backoff_secs = backoff.as_secs(), "KV hand-over failed; pair avoided");
    }

    /// A hand-over from `prefill` to `decode` worked: the pair is healthy.
    pub fn succeeded(&self, prefill: Peer, decode: Peer) {
        let mut m = self.strikes.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(&(prefill.addr, decode.addr));
    }

    /// Whether `prefill` should not hand KV to `decode` at `now`: their
    /// pair failed within its backoff, and neither has come back since.
    pub fn avoided(&self, prefill: Peer, decode: Peer, now: Instant) -> bool {
        let m = self.strikes.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&(prefill.addr, decode.addr)).is_some_and(|s| {
            s.lives == (prefill.life(), decode.life())
                && now.saturating_duration_since(s.failed_at) < s.backoff
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Peer {
        Peer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            joined: 0,
            returns: 0,
        }
    }

    #[test]
    fn a_failed_pair_is_avoided_for_a_doubling_while_and_cleared_by_success() {
        let h = PairHealth::default();
        let (p, d, other) = (addr(1), addr(2), addr(3));
        let t0 = Instant::now();
        assert!(!h.avoided(p, d, t0));
        h.failed(p, d, t0);
        // Only that pair, only for the first backoff.
        assert!(h.avoided(p, d, t0 + FIRST_BACKOFF / 2));
        assert!(!h.avoided(p, other, t0));
        assert!(!h.avoided(other, d, t0));
        assert!(!h.avoided(p, d, t0 + FIRST_BACKOFF));
        // Failing again soon after: twice as long, then four times.
        let t1 = t0 + FIRST_BACKOFF;
        h.failed(p, d, t1);
        assert!(h.avoided(p, d, t1 + FIRST_BACKOFF * 3 / 2));
        assert!(!h.avoided(p, d, t1 + FIRST_BACKOFF * 2));
        let t2 = t1 + FIRST_BACKOFF * 2;
        h.failed(p, d, t2);
        assert!(h.avoided(p, d, t2 + FIRST_BACKOFF * 3));
        // Capped: each failure right after the wait before it ran out.
        let (mut t, mut wait) = (t2, FIRST_BACKOFF * 4);
        for _ in 0..3 {
            t += wait;
            h.failed(p, d, t);
            wait = (wait * 2).min(MAX_BACKOFF);
        }
        assert_eq!(wait, MAX_BACKOFF);
        assert!(h.avoided(p, d, t + MAX_BACKOFF - Duration::from_secs(1)));
        assert!(!h.avoided(p, d, t + MAX_BACKOFF));
        // A hand-over that works clears it at once.
        h.succeeded(p, d);
        assert!(!h.avoided(p, d, t));
        // A failure long after the last starts over at the first backoff.
        h.failed(p, d, t);
        let later = t + MAX_BACKOFF;
        h.failed(p, d, later);
        assert!(h.avoided(p, d, later + FIRST_BACKOFF / 2));
        assert!(!h.avoided(p, d, later + FIRST_BACKOFF));
    }

    /// Transfers in flight on a pair when it broke all fail at once: the
    /// pair waits the first backoff, not one doubling per transfer.
    #[test]
    fn failures_while_avoided_are_one_incident() {
        let h = PairHealth::default();
        let (p, d) = (addr(1), addr(2));
        let t = Instant::now();
        for i in 0..8 {
            h.failed(p, d, t + Duration::from_millis(i));
        }
        assert!(h.avoided(p, d, t + FIRST_BACKOFF - Duration::from_secs(1)));
        assert!(!h.avoided(p, d, t + FIRST_BACKOFF));
        // Failing again once the wait is over doubles it.
        h.failed(p, d, t + FIRST_BACKOFF);
        assert!(h.avoided(p, d, t + FIRST_BACKOFF * 3 - Duration::from_secs(1)));
        assert!(!h.avoided(p, d, t + FIRST_BACKOFF * 3));
    }

    /// A worker that comes back after its polls failed (restarted) is not
    /// held to its old life's failures, on either side of the pair; its next
    /// failure starts over at the first backoff.
    #[test]
    fn a_worker_that_came_back_starts_over() {
        let h = PairHealth::default();
        let (p, d) = (addr(1), addr(2));
        let t0 = Instant::now();
        h.failed(p, d, t0);
        let t = t0 + FIRST_BACKOFF;
        h.failed(p, d, t);
        let back = Peer { returns: 1, ..p };
        assert!(h.avoided(p, d, t + FIRST_BACKOFF));
        assert!(!h.avoided(back, d, t + Duration::from_secs(2)));
        assert!(!h.avoided(p, Peer { returns: 3, ..d }, t + Duration::from_secs(2)));
        h.failed(back, d, t + Duration::from_secs(2));
        assert!(h.avoided(back, d, t + Duration::from_secs(2) + FIRST_BACKOFF / 2));
        assert!(!h.avoided(back, d, t + Duration::from_secs(2) + FIRST_BACKOFF));
    }
}
