//! Radix prefix cache (SGLang's RadixAttention idea) at block granularity.
//!
//! Each edge of the tree is one full block of token ids; a node owns one
//! reference to the KV block holding those tokens (given the tokens before
//! it). A request whose prompt starts with cached blocks shares them instead
//! of recomputing. Unreferenced leaves (only the cache holds their block)
//! are evicted least-recently-used first when the pool runs short.

use std::collections::HashMap;

use crate::kv::{BlockId, KvPool};

struct Node {
    block: BlockId,
    parent: usize,
    /// The block's tokens (the edge label from the parent).
    key: Box<[u32]>,
    children: HashMap<Box<[u32]>, usize>,
    last_used: u64,
}

/// Hit and miss counters (per lookup, and in tokens).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixStats {
    pub hits: u64,
    pub misses: u64,
    pub hit_tokens: u64,
    pub evicted_blocks: u64,
}

pub struct PrefixCache {
    block_size: usize,
    /// Slot 0 is the root (no block).
    nodes: Vec<Option<Node>>,
    free_slots: Vec<usize>,
    clock: u64,
    pub stats: PrefixStats,
}

const ROOT: usize = 0;

impl PrefixCache {
    pub fn new(block_size: usize) -> Self {
        let root = Node {
            block: BlockId::MAX,
            parent: ROOT,
            key: Box::new([]),
            children: HashMap::new(),
            last_used: 0,
        };
        Self {
            block_size,
            nodes: vec![Some(root)],
            free_slots: Vec::new(),
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("live node")
    }
    fn node_mut(&mut self, i: usize) -> &mut Node {
        self.nodes[i].as_mut().expect("live node")
    }

    /// Blocks cached (each holds one pool reference).
    pub fn cached_blocks(&self) -> usize {
        // Every slot but the root is live or on the free list.
        self.nodes.len() - 1 - self.free_slots.len()
    }

    /// The key of `chunk` under its parent: the tokens themselves, except
    /// that a first block computed with LoRA adapter `adapter` (not 0)
    /// also carries the adapter's number. Keys and values computed with
    /// different adapters differ, so each adapter's prefixes form a tree of
    /// their own under the root, and one eviction order serves them all.
    fn key<'a>(depth: usize, adapter: u32, chunk: &'a [u32]) -> std::borrow::Cow<'a, [u32]> {
        if depth == 0 && adapter != 0 {
            let mut k = chunk.to_vec();
            k.push(adapter);
            k.into()
        } else {
            chunk.into()
        }
    }

    /// Node path of the longest cached prefix of `tokens`, in whole blocks.
    fn walk(&self, adapter: u32, tokens: &[u32]) -> Vec<usize> {
        let mut path = Vec::new();
        let mut cur = ROOT;
        for (depth, chunk) in tokens.chunks_exact(self.block_size).enumerate() {
            match self
                .node(cur)
                .children
                .get(&*Self::key(depth, adapter, chunk))
            {
                Some(&next) => {
                    path.push(next);
                    cur = next;
                }
                None => break,
            }
        }
        path
    }

    /// How many leading tokens of `tokens` are cached (a multiple of the
    /// block size). Read-only and cheap: what a router asks.
    pub fn cached_prefix_len(&self, adapter: u32, tokens: &[u32]) -> usize {
        self.walk(adapter, tokens).len() * self.block_size
    }

    /// The blocks of the longest cached prefix of `tokens`, each retained
    /// once for the caller (who releases them with the sequence). Counts a
    /// hit or a miss.
    pub fn acquire(&mut self, pool: &mut KvPool, adapter: u32, tokens: &[u32]) -> Vec<BlockId> {
        let path = self.walk(adapter, tokens);
        self.clock += 1;
        let now = self.clock;
        let mut blocks = Vec::with_capacity(path.len());
        for &n in &path {
            self.node_mut(n).last_used = now;
            let b = self.node(n).block;
            pool.retain(b);
            blocks.push(b);
        }
        if blocks.is_empty() {
            self.stats.misses += 1;
        } else {
            self.stats.hits += 1;
            self.stats.hit_tokens += (blocks.len() * self.block_size) as u64;
        }
        blocks
    }

    /// Records the full blocks of `tokens` (held in `blocks`, the sequence's
    /// block table) so later requests can share them. Blocks already cached
    /// for the same tokens are kept; new nodes take their own reference.
    pub fn insert(&mut self, pool: &mut KvPool, adapter: u32, tokens: &[u32], blocks: &[BlockId]) {
        self.clock += 1;
        let now = self.clock;
        let mut cur = ROOT;
        for (depth, (chunk, &b)) in tokens.chunks_exact(self.block_size).zip(blocks).enumerate() {
            let chunk = Self::key(depth, adapter, chunk);
            let next = match self.node(cur).children.get(&*chunk) {
                Some(&n) => n,
                None => {
                    pool.retain(b);
                    let node = Node {
                        block: b,
                        parent: cur,
                        key: chunk.clone().into(),
                        children: HashMap::new(),
                        last_used: now,
                    };
                    let slot = match self.free_slots.pop() {
                        Some(s) => {
                            self.nodes[s] = Some(node);
                            s
                        }
                        None => {
                            self.nodes.push(Some(node));
                            self.nodes.len() - 1
                        }
                    };
                    self.node_mut(cur).children.insert(chunk.into(), slot);
                    slot
                }
            };
            self.node_mut(next).last_used = now;
            cur = next;
        }
    }

    /// Frees up to `want` blocks by dropping least-recently-used leaves that
    /// nobody else holds. Returns the number of blocks returned to the pool.
    pub fn evict(&mut self, pool: &mut KvPool, want: usize) -> usize {
        let mut freed = 0;
        while freed < want {
            // Evictable leaves, least recently used first. One scan serves many
            // evictions; a parent that becomes a leaf joins the next round.
            let mut victims: Vec<(u64, usize)> = self
                .nodes
                .iter()
                .enumerate()
                .skip(1)
                .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
                .filter(|(_, n)| n.children.is_empty() && pool.refcount(n.block) == 1)
                .map(|(i, n)| (n.last_used, i))
                .collect();
            if victims.is_empty() {
                break;
            }
            victims.sort_unstable();
            for (_, v) in victims {
                if freed >= want {
                    break;
                }
                let node = self.nodes[v].take().expect("live");
                self.node_mut(node.parent).children.remove(&node.key);
                self.free_slots.push(v);
                pool.release(node.block);
                self.stats.evicted_blocks += 1;
                freed += 1;
            }
        }
        freed
    }

    /// Drops every node (and its reference), e.g. before shutting down.
    pub fn clear(&mut self, pool: &mut KvPool) {
        for n in self.nodes.iter_mut().skip(1) {
            if let Some(node) = n.take() {
                pool.release(node.block);
            }
        }
        self.nodes.truncate(1);
        self.node_mut(ROOT).children.clear();
        self.free_slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvDtype, KvLayout, SeqKv};
    use proptest::prelude::*;

    fn pool(n: usize) -> KvPool {
        KvPool::new(
            KvLayout {
                dtype: KvDtype::F32,
                n_layers: 1,
                n_kv_heads: 1,
                head_dim: 2,
                block_size: 4,
            },
            n,
        )
    }

    fn seq_with(p: &mut KvPool, tokens: usize) -> SeqKv {
        let mut s = SeqKv::default();
        p.reserve(&mut s, tokens).unwrap();
        s.len = tokens;
        s
    }

    #[test]
    fn shares_whole_blocks_and_counts_hits() {
        let mut p = pool(16);
        let mut c = PrefixCache::new(4);
        let toks: Vec<u32> = (0..10).collect();
        let mut a = seq_with(&mut p, 10);
        c.insert(&mut p, 0, &toks, &a.blocks);
        assert_eq!(c.cached_blocks(), 2, "only full blocks are cached");
        assert_eq!(c.cached_prefix_len(0, &toks), 8);
        assert_eq!(c.cached_prefix_len(0, &[0, 1, 2, 3, 9, 9, 9, 9]), 4);
        let got = c.acquire(&mut p, 0, &[0, 1, 2, 3, 4, 5, 6, 7, 100]);
        assert_eq!(got, a.blocks[..2]);
        assert_eq!(c.stats.hits, 1);
        assert!(c.acquire(&mut p, 0, &[42; 8]).is_empty());
        assert_eq!(c.stats.misses, 1);
        for b in got {
            p.release(b);
        }
        p.free_seq(&mut a);
        assert_eq!(p.used_blocks(), 2, "the cache still holds its blocks");
        assert_eq!(c.evict(&mut p, 10), 2);
        assert_eq!(p.used_blocks(), 0);
    }

    #[test]
    fn eviction_skips_blocks_in_use_and_goes_lru_first() {
        let mut p = pool(16);
        let mut c = PrefixCache::new(4);
        let mut a = seq_with(&mut p, 4);
        let mut b = seq_with(&mut p, 4);
        c.insert(&mut p, 0, &[1, 1, 1, 1], &a.blocks);
        c.insert(&mut p, 0, &[2, 2, 2, 2], &b.blocks);
        p.free_seq(&mut a);
        // b still uses its block: only a's can go.
        assert_eq!(c.evict(&mut p, 5), 1);
        assert_eq!(c.cached_prefix_len(0, &[2, 2, 2, 2]), 4);
        p.free_seq(&mut b);
        assert_eq!(c.evict(&mut p, 5), 1);
        assert_eq!(p.used_blocks(), 0);
    }

    #[test]
    fn each_adapter_shares_only_its_own_prefixes() {
        let mut p = pool(16);
        let mut c = PrefixCache::new(4);
        let toks: Vec<u32> = (0..8).collect();
        let a = seq_with(&mut p, 8);
        c.insert(&mut p, 1, &toks, &a.blocks);
        assert_eq!(c.cached_prefix_len(1, &toks), 8);
        assert_eq!(c.cached_prefix_len(0, &toks), 0, "not the base model's");
        assert_eq!(c.cached_prefix_len(2, &toks), 0, "not another adapter's");
        // A base-model chunk equal to the adapter's key is still apart.
        assert_eq!(c.cached_prefix_len(0, &[0, 1, 2, 3, 1]), 0);
        let b = seq_with(&mut p, 8);
        c.insert(&mut p, 0, &toks, &b.blocks);
        assert_eq!(c.acquire(&mut p, 0, &toks), b.blocks);
        assert_eq!(c.acquire(&mut p, 1, &toks), a.blocks);
    }

    proptest! {
        /// Random workloads of insert / acquire / free / evict never leak or
        /// double-free: after everyone lets go and the cache is cleared, every
        /// block is free and every refcount is zero.
        #[test]
        fn no_leaks_no_double_frees(ops in proptest::collection::vec((0u8..4, 0u32..4, 1usize..14), 1..60)) {
            let mut p = pool(64);
            let mut c = PrefixCache::new(4);
            let mut live: Vec<(Vec<u32>, SeqKv)> = Vec::new();
            for (op, alphabet, len) in ops {
                match op {
                    0 | 1 => {
                        // A request: share what is cached, compute the rest.
                        let toks: Vec<u32> = (0..len as u32).map(|i| (i * 7 + alphabet) % 3).collect();
                        let adapter = alphabet % 2;
                        let mut s = SeqKv::default();
                        s.blocks = c.acquire(&mut p, adapter, &toks);
                        s.len = s.blocks.len() * 4;
                        let more = len - s.len.min(len);
                        if p.reserve(&mut s, more).is_err() {
                            c.evict(&mut p, 8);
                            p.free_seq(&mut s);
                            continue;
                        }
                        s.len = len.max(s.len);
                        c.insert(&mut p, adapter, &toks, &s.blocks);
                        live.push((toks, s));
                    }
                    2 => {
                        if let Some((_, mut s)) = live.pop() {
                            p.free_seq(&mut s);
                        }
                    }
                    _ => {
                        c.evict(&mut p, 3);
                    }
                }
                prop_assert!(p.used_blocks() <= p.n_blocks());
            }
            for (_, mut s) in live.drain(..) {
                p.free_seq(&mut s);
            }
            c.clear(&mut p);
            prop_assert_eq!(p.free_blocks(), p.n_blocks());
            for b in 0..p.n_blocks() as u32 {
                prop_assert_eq!(p.refcount(b), 0);
            }
        }
    }
}
