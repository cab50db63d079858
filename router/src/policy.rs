//! Routing policies: which decode worker runs a request, which prefill
//! worker computes its prompt, and whether to disaggregate at all.
//!
//! Prefix affinity is tracked at the router (as SGLang's router and
//! Dynamo's KV router do) instead of asking every worker per request: the
//! router hashes the prompt block by block (a chain hash, so a block's hash
//! names its whole prefix) and remembers which workers last received each
//! hash. That costs microseconds and no round trip; it is approximate
//! (a worker may have evicted the blocks since), which only costs a cache
//! miss, never a wrong answer. It is kept per life of a worker
//! ([`Peer`]): a worker that restarted has an empty cache, and what it
//! held before must not draw prompts to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::pairs::Peer;
use crate::workers::{Worker, WorkerLoad};

/// How workers are chosen (`--route-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RoutePolicy {
    /// Fewest requests in flight, then most free KV blocks; prefill workers
    /// by longest cached prefix first.
    #[default]
    PrefixAffinity,
    /// Fewest requests in flight, then most free KV blocks; no affinity.
    LeastLoaded,
    /// In turn.
    RoundRobin,
}

impl std::str::FromStr for RoutePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefix-affinity" => Ok(Self::PrefixAffinity),
            "least-loaded" => Ok(Self::LeastLoaded),
            "round-robin" => Ok(Self::RoundRobin),
            o => Err(format!(
                "unknown route policy {o:?} (prefix-affinity, least-loaded, round-robin)"
            )),
        }
    }
}

/// When to skip the prefill tier (conditional disaggregation).
#[derive(Debug, Clone, Copy)]
pub struct DisaggPolicy {
    /// Prompts shorter than this are prefilled on the decode worker.
    pub min_prompt_tokens: usize,
    /// Prompts of which the decode worker caches at least this fraction are
    /// prefilled there.
    pub max_cached_fraction: f32,
}

impl Default for DisaggPolicy {
    fn default() -> Self {
        Self {
            min_prompt_tokens: 32,
            max_cached_fraction: 0.5,
        }
    }
}

/// Block-chain hashes of a prompt (whole blocks only).
/// Blocks computed with a LoRA adapter (`adapter` not empty) hash apart
/// from the base model's: their keys and values differ.
pub fn block_hashes(adapter: &str, tokens: &[u32], block: usize) -> Vec<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in adapter.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    tokens
        .chunks_exact(block.max(1))
        .map(|c| {
            for &t in c {
                h ^= t as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
                h ^= h >> 29;
            }
            h
        })
        .collect()
}

/// Which workers were last sent which prefix blocks, bounded in size.
pub struct PrefixIndex {
    inner: Mutex<IndexInner>,
    capacity: usize,
}

#[derive(Default)]
struct IndexInner {
    /// Hash → (worker life, tick) for each worker holding it.
    map: HashMap<u64, Vec<(Peer, u64)>>,
    tick: u64,
}

impl PrefixIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            capacity,
        }
    }

    /// Leading blocks of `hashes` that `worker` was sent in this life.
    pub fn matched(&self, hashes: &[u64], worker: Peer) -> usize {
        let Ok(g) = self.inner.lock() else { return 0 };
        hashes
            .iter()
            .take_while(|h| {
                g.map
                    .get(h)
                    .is_some_and(|v| v.iter().any(|(a, _)| *a == worker))
            })
            .count()
    }

    /// Forgets every block of a worker's earlier lives at `addr` (a worker
    /// joined there afresh).
    pub fn forget(&self, addr: std::net::SocketAddr) {
        let Ok(mut g) = self.inner.lock() else { return };
        g.map.retain(|_, v| {
            v.retain(|(p, _)| p.addr != addr);
            !v.is_empty()
        });
    }

    /// Notes that `worker` now holds these blocks.
    pub fn record(&self, hashes: &[u64], worker: Peer) {
        let Ok(mut g) = self.inner.lock() else { return };
        g.tick += 1;
        let tick = g.tick;
        for h in hashes {
            let v = g.map.entry(*h).or_default();
            match v.iter_mut().find(|(a, _)| *a == worker) {
                Some(e) => e.1 = tick,
                None => v.push((worker, tick)),
            }
        }
        if g.map.len() > self.capacity {
            // Drop the older half: cheap, amortised, and good enough for a hint.
            let mut ticks: Vec<u64> = g
                .map
                .values()
                .map(|v| v.iter().map(|e| e.1).max().unwrap_or(0))
                .collect();
            let mid = ticks.len() / 2;
            let (_, cut, _) = ticks.select_nth_unstable(mid);
            let cut = *cut;
            g.map
                .retain(|_, v| v.iter().map(|e| e.1).max().unwrap_or(0) > cut);
        }
    }
}

/// Picks workers under a policy.
pub struct Picker {
    pub policy: RoutePolicy,
    rr: AtomicUsize,
}

impl Picker {
    pub fn new(policy: RoutePolicy) -> Self {
        Self {
            policy,
            rr: AtomicUsize::new(0),
        }
    }

    fn least_loaded_key(l: &WorkerLoad) -> (bool, u32, u32) {
        (
            !l.healthy,
            l.in_flight.max(l.running + l.waiting),
            u32::MAX - l.free_blocks,
        )
    }

    /// The next healthy worker in turn (any worker when none is healthy).
    /// `workers` must not be empty.
    fn round_robin<'a>(&self, workers: &'a [Arc<Worker>]) -> &'a Arc<Worker> {
        let healthy: Vec<_> = workers.iter().filter(|w| w.load().healthy).collect();
        let pool: Vec<_> = if healthy.is_empty() {
            workers.iter().collect()
        } else {
            healthy
        };
        pool[self.rr.fetch_add(1, Ordering::Relaxed) % pool.len()]
    }

    /// Round robin and least-loaded pick the same way in both tiers; only
    /// prefix affinity differs by tier.
    fn pick<'a>(
        &self,
        workers: &'a [Arc<Worker>],
        affinity: impl FnOnce(&'a [Arc<Worker>]) -> Option<&'a Arc<Worker>>,
    ) -> Option<&'a Arc<Worker>> {
        if workers.is_empty() {
            return None;
        }
        match self.policy {
            RoutePolicy::RoundRobin => Some(self.round_robin(workers)),
            RoutePolicy::LeastLoaded => workers
                .iter()
                .min_by_key(|w| Self::least_loaded_key(&w.load())),
            RoutePolicy::PrefixAffinity => affinity(workers),
        }
    }

    /// A decode worker: healthy first, then fewest requests in flight, then
    /// (under prefix affinity) the longest cached prefix, then most free
    /// KV blocks.
    pub fn decode<'a>(
        &self,
        workers: &'a [Arc<Worker>],
        matched: impl Fn(&Worker) -> usize,
    ) -> Option<&'a Arc<Worker>> {
        self.pick(workers, |ws| {
            ws.iter().min_by_key(|w| {
                let (sick, busy, full) = Self::least_loaded_key(&w.load());
                // Affinity breaks ties in load, it never overrides it: a
                // cached prefix is worth less than a queue.
                (sick, busy, usize::MAX - matched(w), full)
            })
        })
    }

    /// A prefill worker: longest cached prefix among the least busy.
    pub fn prefill<'a>(
        &self,
        workers: &'a [Arc<Worker>],
        matched: impl Fn(&Worker) -> usize,
    ) -> Option<&'a Arc<Worker>> {
        self.pick(workers, |ws| {
            let least = ws
                .iter()
                .map(|w| Self::least_loaded_key(&w.load()).1)
                .min()
                .unwrap_or(0);
            // A worker at most one request busier than the least busy one
            // may win on affinity.
            ws.iter()
                .filter(|w| w.load().healthy)
                .filter(|w| Self::least_loaded_key(&w.load()).1 <= least + 1)
                .max_by_key(|w| (matched(w), u32::MAX - w.load().in_flight))
                .or_else(|| ws.iter().min_by_key(|w| Self::least_loaded_key(&w.load())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_hashes_name_whole_prefixes() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[40] = 999;
        let (ha, hb) = (block_hashes("", &a, 16), block_hashes("", &b, 16));
        assert_eq!(ha.len(), 4);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        // A change in block 2 changes every later hash too.
        assert_ne!(ha[3], hb[3]);
        assert!(block_hashes("", &a[..15], 16).is_empty());
    }

    #[test]
    fn index_tracks_per_worker_prefixes_and_stays_bounded() {
        let idx = PrefixIndex::new(100);
        let life = |port: u16, returns: u64| Peer {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            joined: 0,
            returns,
        };
        let (w1, w2) = (life(1, 0), life(2, 0));
        let p: Vec<u32> = (0..160).collect();
        let h = block_hashes("", &p, 16);
        idx.record(&h[..6], w1);
        idx.record(&h, w2);
        assert_eq!(idx.matched(&h, w1), 6);
        assert_eq!(idx.matched(&h, w2), 10);
        // A worker's next life starts with nothing cached; forgetting an
        // address drops all of its lives.
        assert_eq!(idx.matched(&h, life(2, 1)), 0);
        idx.record(&h[..2], life(2, 1));
        idx.forget(w2.addr);
        assert_eq!(idx.matched(&h, w2), 0);
        assert_eq!(idx.matched(&h, life(2, 1)), 0);
        assert_eq!(idx.matched(&h, w1), 6);
        for i in 0..50u32 {
            let q: Vec<u32> = (0..64).map(|t| t + 1000 * (i + 1)).collect();
            idx.record(&block_hashes("", &q, 16), w1);
        }
        assert!(idx.inner.lock().unwrap().map.len() <= 100);
    }
}
