//! Tensor- and pipeline-parallel workers: one process per rank, rank 0
//! speaking for the worker.
//!
//! # Shape
//! A worker of `tp × pp` ranks has `pp` pipeline stages of `tp` ranks each;
//! rank `stage * tp + tp_rank`. A stage holds a contiguous range of layers
//! and that range's KV; inside a stage, ranks split (Megatron) the query
//! and KV heads, the FFN and the vocabulary: Q/K/V and gate/up are
//! column-parallel (each rank its output rows), the attention output and
//! FFN down projections row-parallel (each rank its input columns, then an
//! all-reduce), the LM head vocabulary-parallel (rank 0 gathers the
//! logits). With fewer KV heads than ranks, each KV head is replicated on
//! `tp / n_kv_heads` ranks.
//!
//! # Exactness
//! Logits are bit-identical to the single process. Column-parallel and
//! vocabulary-parallel outputs are computed exactly as before, row by row.
//! Row-parallel ones hand over one partial per reduction chunk, which every
//! rank adds in the single-process order (see `model::RowProj`). Pipeline
//! stages pass the hidden state unchanged.
//!
//! # Steps
//! Rank 0 runs the scheduler and owns the block tables. Each step it sends
//! every other rank a step message (the sequences' tokens, positions and
//! block tables, and the copy-on-write block copies made since the last
//! step); every rank's pool has the same block count and mirrors rank 0's
//! allocation. With `pp > 1` a step's sequences are split into up to `pp`
//! micro-batches, so stage 1 works on the first while stage 0 computes the
//! second. The last stage sends its logits to rank 0 after its last
//! micro-batch: every message then flows one way along the pipeline until
//! rank 0 has sent all it will, so no two ranks can block writing to each
//! other.
//!
//! # Failure
//! Every wait has a deadline and a rank that dies closes its sockets, so the
//! others fail at once: followers exit, and rank 0 reports the worker
//! broken ([`ShardedModel::broken`]) so the process can leave the
//! cluster. When idle, rank 0 sends a keep-alive a few times per deadline.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tandem_model::config::ModelConfig;
use tandem_model::weights::ModelSource;

use crate::comm::{CommConfig, CommError, Communicator, TcpCommunicator};
use crate::cpu::{split, ExpandWeights, REDUCTION_CHUNK};
use crate::error::{EngineError, Result};
use crate::executor::Executor;
use crate::kv::{BlockId, KvLayout, KvPool, KvStaging, SeqKv};
use crate::model::{
    show_written, split_logits, written_blocks, LayerKv, Logits, Model, SeqStep, StepRows,
};

/// Which part of a sharded worker a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// `stage * tp + tp_rank`.
    pub rank: usize,
}

/// A rank's attention heads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadShard {
    pub q: Range<usize>,
    pub kv: Range<usize>,
}

/// The experts of a mixture that tensor-parallel rank `tp_rank` of `tp`
/// holds (expert parallelism: each rank holds whole experts, the earlier
/// ranks one more when they do not divide). Loading and the exchange of
/// expert outputs both place experts by it.
pub(crate) fn expert_share(n_experts: usize, tp: usize, tp_rank: usize) -> Range<usize> {
    split(n_experts, tp, tp_rank)
}

impl ShardSpec {
    /// The whole model in one process.
    pub fn solo() -> Self {
        Self {
            tp: 1,
            pp: 1,
            rank: 0,
        }
    }

    pub fn world(&self) -> usize {
        self.tp * self.pp
    }
    pub fn tp_rank(&self) -> usize {
        self.rank % self.tp
    }
    pub fn stage(&self) -> usize {
        self.rank / self.tp
    }
    /// The rank of `tp_rank` in `stage`.
    pub fn rank_of(&self, stage: usize, tp_rank: usize) -> usize {
        stage * self.tp + tp_rank
    }
    /// This stage's layers (earlier stages take one more when they do not divide).
    pub fn layers(&self, n_layers: usize) -> Range<usize> {
        split(n_layers, self.pp, self.stage())
    }
    /// The experts of a mixture this rank holds (see [`expert_share`]).
    pub fn experts(&self, n_experts: usize) -> Range<usize> {
        expert_share(n_experts, self.tp, self.tp_rank())
    }
    /// This rank's rows of the LM head.
    pub fn vocab_rows(&self, vocab: usize) -> Range<usize> {
        self.vocab_rows_of(self.tp_rank(), vocab)
    }
    /// `tp_rank`'s rows of the LM head.
    fn vocab_rows_of(&self, tp_rank: usize, vocab: usize) -> Range<usize> {
        split(vocab, self.tp, tp_rank)
    }

    /// Whether `cfg` can be split this way; the reason when not.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let bad = |why: String| Err(EngineError::Shard(why));
        if self.tp == 0 || self.pp == 0 || self.rank >= self.world() {
            return bad(format!(
                "rank {} of tp {} × pp {}",
                self.rank, self.tp, self.pp
            ));
        }
        if self.pp > cfg.n_layers {
            return bad(format!(
                "{} pipeline stages for {} layers",
                self.pp, cfg.n_layers
            ));
        }
        if self.tp == 1 {
            return Ok(());
        }
        if let Some(moe) = &cfg.moe {
            // Expert parallel: each rank holds whole experts, at least one.
            if moe.experts < self.tp {
                return bad(format!(
                    "{} experts cannot give each of tp {} ranks one",
                    moe.experts, self.tp
                ));
            }
        }
        let (nh, nkv, hd, tp) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.tp);
        if !nh.is_multiple_of(tp) {
            return bad(format!("{nh} attention heads do not split over tp {tp}"));
        }
        if !(nkv.is_multiple_of(tp) || tp.is_multiple_of(nkv)) {
            return bad(format!(
                "{nkv} KV heads neither split over tp {tp} nor replicate evenly on it"
            ));
        }
        // The row-parallel shards must start and end on reduction chunks,
        // or their partials would not be the single process's.
        if !(nh / tp * hd).is_multiple_of(REDUCTION_CHUNK) {
            return bad(format!(
                "each rank's {} attention dims are not a multiple of {REDUCTION_CHUNK} \
                 (the exact reduction needs whole chunks)",
                nh / tp * hd
            ));
        }
        // A dense FFN splits by columns; a mixture by whole experts.
        let ffn_splits =
            cfg.ffn.is_multiple_of(tp) && (cfg.ffn / tp).is_multiple_of(REDUCTION_CHUNK);
        if cfg.moe.is_none() && !ffn_splits {
            return bad(format!(
                "FFN width {} does not split over tp {tp} in whole {REDUCTION_CHUNK}-wide chunks",
                cfg.ffn
            ));
        }
        Ok(())
    }

    /// This rank's query heads and the KV heads they attend with.
    pub fn heads(&self, cfg: &ModelConfig) -> Result<HeadShard> {
        self.validate(cfg)?;
        let (nh, nkv, tp, r) = (cfg.n_heads, cfg.n_kv_heads, self.tp, self.tp_rank());
        let q = split(nh, tp, r);
        let kv = if tp <= nkv {
            split(nkv, tp, r)
        } else {
            let g = r / (tp / nkv);
            g..g + 1
        };
        Ok(HeadShard { q, kv })
    }
}

/// How a rank finds the others.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    pub spec: ShardSpec,
    /// Rendezvous of the whole worker (rank 0 listens), then one per stage
    /// for its tensor-parallel group (when `tp > 1`).
    pub rendezvous: Vec<SocketAddr>,
    /// Shared by the ranks of one worker (strays are refused).
    pub session: u64,
    /// Longest wait for any peer; rank 0 keeps idle followers alive within it.
    pub timeout: Duration,
    pub threads: usize,
    pub expand: ExpandWeights,
}

impl ShardOptions {
    /// Free loopback rendezvous addresses for a worker of this shape.
    pub fn local_rendezvous(tp: usize, pp: usize) -> std::io::Result<Vec<SocketAddr>> {
        let n = 1 + if tp > 1 { pp } else { 0 };
        // Hold every listener until all are picked, so they differ.
        let ls = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        ls.iter().map(|l| l.local_addr()).collect()
    }

    fn check(&self) -> Result<()> {
        let want = 1 + if self.spec.tp > 1 { self.spec.pp } else { 0 };
        if self.rendezvous.len() != want {
            return Err(EngineError::Shard(format!(
                "tp {} × pp {} needs {want} rendezvous addresses, got {}",
                self.spec.tp,
                self.spec.pp,
                self.rendezvous.len()
            )));
        }
        Ok(())
    }
}

/// A rank's connections: to every rank of the worker, and to its stage's
/// tensor-parallel group.
struct Links {
    world: TcpCommunicator,
    tp: Option<TcpCommunicator>,
}

impl Links {
    fn connect(o: &ShardOptions) -> Result<Self> {
        o.check()?;
        let s = o.spec;
        let cfg = |rank, world_size, rendezvous, salt: u64| CommConfig {
            rank,
            world_size,
            rendezvous,
            session: o.session ^ salt,
            timeout: o.timeout,
        };
        let world = TcpCommunicator::connect(&cfg(s.rank, s.world(), o.rendezvous[0], 0))?;
        let tp = if s.tp > 1 {
            let stage = s.stage();
            Some(TcpCommunicator::connect(&cfg(
                s.tp_rank(),
                s.tp,
                o.rendezvous[1 + stage],
                0x5441_4745_0000_0000 | (stage as u64 + 1),
            ))?)
        } else {
            None
        };
        Ok(Self { world, tp })
    }

    fn tp(&mut self) -> Option<&mut dyn Communicator> {
        self.tp.as_mut().map(|c| c as &mut dyn Communicator)
    }
}

// ---------------------------------------------------------------------------
// Step messages (rank 0 → every other rank), as u32 words carried in f32
// bit patterns (the communicator moves bytes; nothing is computed on them).

const MSG_KEEPALIVE: u32 = 1;
const MSG_STEP: u32 = 2;
const MSG_SHUTDOWN: u32 = 3;
/// Whole-model KV for some blocks, to store (a decode worker's received prompt).
const MSG_INSTALL: u32 = 4;
/// Asks for the rank's shard of some blocks (a prefill worker's export).
const MSG_GATHER: u32 = 5;

/// Words of an install or gather request: the pool's size and block size
/// (so a follower can make its pool before its first step), then the blocks.
fn blocks_msg(pool: &KvPool, blocks: &[BlockId]) -> Vec<f32> {
    let mut w = vec![
        pool.n_blocks() as u32,
        pool.layout().block_size as u32,
        blocks.len() as u32,
    ];
    w.extend(blocks);
    words_to_f32(&w)
}

/// Decodes [`blocks_msg`]: `(n_blocks, block_size, blocks)`.
fn parse_blocks_msg(w: &[u32]) -> Result<(usize, usize, Vec<BlockId>)> {
    let bad = || EngineError::Shard("malformed block message from rank 0".into());
    let (&n, &bs, &nb) = match w {
        [n, bs, nb, ..] => (n, bs, nb),
        _ => return Err(bad()),
    };
    let blocks = &w[3..];
    if bs == 0 || blocks.len() != nb as usize || blocks.iter().any(|&b| b >= n) {
        return Err(bad());
    }
    Ok((n as usize, bs as usize, blocks.to_vec()))
}

/// One rank's share of the whole-model KV layout.
struct RankKv {
    rank: usize,
    layers: Range<usize>,
    kv_heads: Range<usize>,
    layout: KvLayout,
}

impl RankKv {
    fn of(spec: ShardSpec, cfg: &ModelConfig, block_size: usize) -> Result<Self> {
        let layers = spec.layers(cfg.n_layers);
        let kv_heads = spec.heads(cfg)?.kv;
        let layout = KvLayout {
            dtype: crate::kv::KvDtype::F32,
            n_layers: layers.len(),
            n_kv_heads: kv_heads.len(),
            head_dim: cfg.head_dim,
            block_size,
        };
        Ok(Self {
            rank: spec.rank,
            layers,
            kv_heads,
            layout,
        })
    }

    /// The K run and the V run of this rank's heads: (offset in a whole
    /// region, offset in a shard region, length).
    fn runs(&self, full: &KvLayout) -> [(usize, usize, usize); 2] {
        let n = self.layout.n_kv_heads * self.layout.head_dim * self.layout.block_size;
        let h0 = self.kv_heads.start;
        [
            (full.k_offset(h0), self.layout.k_offset(0), n),
            (full.v_offset(h0), self.layout.v_offset(0), n),
        ]
    }

    /// This rank's shard of `blocks` of `staging` (whole model), layer-major.
    fn cut(&self, full: &KvLayout, staging: &KvStaging, blocks: usize) -> Vec<f32> {
        let bf = self.layout.block_floats();
        let mut out = vec![0f32; self.layers.len() * blocks * bf];
        for (li, layer) in self.layers.clone().enumerate() {
            for b in 0..blocks {
                let src = staging.region(layer, b);
                let dst = &mut out[(li * blocks + b) * bf..(li * blocks + b + 1) * bf];
                for (fo, so, n) in self.runs(full) {
                    dst[so..so + n].copy_from_slice(&src[fo..fo + n]);
                }
            }
        }
        out
    }

    /// Puts this rank's shard (layer-major, as [`RankKv::cut`] makes it)
    /// into `staging`.
    fn paste(&self, full: &KvLayout, shard: &[f32], staging: &mut KvStaging, blocks: usize) {
        let bf = self.layout.block_floats();
        for (li, layer) in self.layers.clone().enumerate() {
            for b in 0..blocks {
                let src = &shard[(li * blocks + b) * bf..(li * blocks + b + 1) * bf];
                let dst = staging.region_mut(layer, b);
                for (fo, so, n) in self.runs(full) {
                    dst[fo..fo + n].copy_from_slice(&src[so..so + n]);
                }
            }
        }
    }
}

/// A follower's shard of `blocks` of its pool, layer-major.
fn read_shard(pool: &KvPool, blocks: &[BlockId]) -> Vec<f32> {
    let bf = pool.layout().block_floats();
    let mut out = Vec::with_capacity(pool.layout().n_layers * blocks.len() * bf);
    for layer in 0..pool.layout().n_layers {
        for &b in blocks {
            out.extend_from_slice(pool.region(layer, b));
        }
    }
    out
}

/// Writes a shard of `blocks` (layer-major) into the pool.
fn write_shard(pool: &mut KvPool, blocks: &[BlockId], data: &[f32]) {
    let bf = pool.layout().block_floats();
    for layer in 0..pool.layout().n_layers {
        for (i, &b) in blocks.iter().enumerate() {
            let o = (layer * blocks.len() + i) * bf;
            pool.region_mut(layer, b).copy_from_slice(&data[o..o + bf]);
        }
    }
}

fn words_to_f32(w: &[u32]) -> Vec<f32> {
    w.iter().map(|&x| f32::from_bits(x)).collect()
}

fn send_header(world: &mut TcpCommunicator, kind: u32, body: usize) -> Result<(), CommError> {
    let h = words_to_f32(&[kind, body as u32]);
    for r in 1..world.world_size() {
        world.send(r, &h)?;
    }
    Ok(())
}

/// One sequence of a step message.
struct SeqMsg {
    len: usize,
    logits: Logits,
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
}

struct StepMsg {
    n_blocks: usize,
    block_size: usize,
    copies: Vec<(BlockId, BlockId)>,
    /// Sequences per micro-batch, in order.
    micro: Vec<usize>,
    seqs: Vec<SeqMsg>,
}

impl StepMsg {
    fn encode(&self) -> Vec<u32> {
        let mut w = vec![
            self.n_blocks as u32,
            self.block_size as u32,
            self.copies.len() as u32,
            self.micro.len() as u32,
            self.seqs.len() as u32,
        ];
        for &(a, b) in &self.copies {
            w.extend([a, b]);
        }
        w.extend(self.micro.iter().map(|&m| m as u32));
        for s in &self.seqs {
            let l = match s.logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => 2,
                Logits::Greedy => 3,
                // k >= 1, so codes from 5 on.
                Logits::TopK(k) => 4 + k as u32,
            };
            w.extend([
                s.len as u32,
                l,
                s.tokens.len() as u32,
                s.blocks.len() as u32,
            ]);
            w.extend(&s.tokens);
            w.extend(&s.blocks);
        }
        w
    }

    fn decode(w: &[u32]) -> Result<Self> {
        let bad = || EngineError::Shard("malformed step message from rank 0".into());
        let mut it = w.iter().map(|&x| x as usize);
        let mut next = || it.next().ok_or_else(bad);
        let n_blocks = next()?;
        let block_size = next()?;
        let (n_copies, n_micro, n_seqs) = (next()?, next()?, next()?);
        let mut copies = Vec::new();
        for _ in 0..n_copies {
            copies.push((next()? as BlockId, next()? as BlockId));
        }
        let mut micro = Vec::new();
        for _ in 0..n_micro {
            micro.push(next()?);
        }
        let mut seqs = Vec::new();
        for _ in 0..n_seqs {
            let len = next()?;
            let logits = match next()? {
                0 => Logits::None,
                1 => Logits::Last,
                2 => Logits::All,
                3 => Logits::Greedy,
                c if c >= 5 => Logits::TopK(c - 4),
                _ => return Err(bad()),
            };
            let (nt, nb) = (next()?, next()?);
            let tokens = (0..nt)
                .map(|_| next().map(|t| t as u32))
                .collect::<Result<_>>()?;
            let blocks = (0..nb)
                .map(|_| next().map(|b| b as BlockId))
                .collect::<Result<_>>()?;
            seqs.push(SeqMsg {
                len,
                logits,
                tokens,
                blocks,
            });
        }
        if block_size == 0
            || micro.iter().sum::<usize>() != seqs.len()
            || seqs
                .iter()
                .any(|s| s.blocks.iter().any(|&b| b as usize >= n_blocks))
        {
            return Err(bad());
        }
        Ok(Self {
            n_blocks,
            block_size,
            copies,
            micro,
            seqs,
        })
    }
}

/// Sequences per micro-batch: up to `pp` near-equal groups.
fn micro_batches(n_seqs: usize, pp: usize) -> Vec<usize> {
    let m = if pp > 1 { pp.min(n_seqs).max(1) } else { 1 };
    (0..m).map(|i| split(n_seqs, m, i).len()).collect()
}

// ---------------------------------------------------------------------------
// Rank 0

struct Rank0State {
    links: Links,
    last_sent: Instant,
}

/// Set when the worker can no longer run: a rank failed or vanished.
#[derive(Default)]
struct Broken {
    why: Mutex<Option<String>>,
}

impl Broken {
    fn set(&self, why: String) {
        let mut w = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            tracing::error!("sharded worker broken: {why}");
            *w = Some(why);
        }
    }
    fn get(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Rank 0 of a sharded worker: the executor the engine drives. Its other
/// ranks run [`run_follower`] in their own processes.
pub struct ShardedModel {
    model: Model,
    spec: ShardSpec,
    state: Arc<Mutex<Rank0State>>,
    broken: Arc<Broken>,
}

impl ShardedModel {
    /// Loads rank 0's shard and waits for every other rank to join.
    pub fn start(src: &ModelSource, o: &ShardOptions) -> Result<Self> {
        if o.spec.rank != 0 {
            return Err(EngineError::Shard(
                "only rank 0 drives a sharded worker".into(),
            ));
        }
        o.spec.validate(&src.config)?;
        let model = Model::load_shard(src, o.threads, o.expand, o.spec)?;
        let links = Links::connect(o)?;
        let state = Arc::new(Mutex::new(Rank0State {
            links,
            last_sent: Instant::now(),
        }));
        let broken = Arc::new(Broken::default());
        let watched = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .links
            .world
            .peer_handles()?;
        spawn_keepalive(Arc::downgrade(&state), broken.clone(), o.timeout / 4);
        spawn_hangup_watch(watched, broken.clone());
        Ok(Self {
            model,
            spec: o.spec,
            state,
            broken,
        })
    }

    pub fn spec(&self) -> ShardSpec {
        self.spec
    }

    /// Why the worker is broken, if it is.
    pub fn broken(&self) -> Option<String> {
        self.broken.get()
    }

    /// Every rank's share of the KV layout with `block_size`.
    fn ranks(&self, block_size: usize) -> Result<Vec<RankKv>> {
        (0..self.spec.world())
            .map(|rank| {
                RankKv::of(
                    ShardSpec { rank, ..self.spec },
                    &self.model.config,
                    block_size,
                )
            })
            .collect()
    }

    fn full_layout(&self, block_size: usize) -> KvLayout {
        let c = &self.model.config;
        KvLayout {
            dtype: crate::kv::KvDtype::F32,
            n_layers: c.n_layers,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            block_size,
        }
    }

    fn install_on_ranks(
        &self,
        st: &mut Rank0State,
        pool: &mut KvPool,
        kv: &SeqKv,
        staging: &KvStaging,
    ) -> Result<()> {
        let bs = pool.layout().block_size;
        let full = self.full_layout(bs);
        if *staging.layout() != full || staging.n_blocks() != kv.blocks.len() {
            return Err(EngineError::Unsupported(format!(
                "staged KV ({:?}, {} blocks) does not fit {} blocks of {full:?}",
                staging.layout(),
                staging.n_blocks(),
                kv.blocks.len()
            )));
        }
        let ranks = self.ranks(bs)?;
        let words = blocks_msg(pool, &kv.blocks);
        send_header(&mut st.links.world, MSG_INSTALL, words.len())?;
        for r in &ranks[1..] {
            st.links.world.send(r.rank, &words)?;
            st.links
                .world
                .send(r.rank, &r.cut(&full, staging, kv.blocks.len()))?;
        }
        st.last_sent = Instant::now();
        write_shard(
            pool,
            &kv.blocks,
            &ranks[0].cut(&full, staging, kv.blocks.len()),
        );
        Ok(())
    }

    fn gather_from_ranks(
        &self,
        st: &mut Rank0State,
        pool: &KvPool,
        blocks: &[BlockId],
    ) -> Result<KvStaging> {
        let bs = pool.layout().block_size;
        let full = self.full_layout(bs);
        let ranks = self.ranks(bs)?;
        let words = blocks_msg(pool, blocks);
        send_header(&mut st.links.world, MSG_GATHER, words.len())?;
        for r in &ranks[1..] {
            st.links.world.send(r.rank, &words)?;
        }
        st.last_sent = Instant::now();
        let mut staging = KvStaging::new(full, blocks.len() * bs);
        ranks[0].paste(&full, &read_shard(pool, blocks), &mut staging, blocks.len());
        for r in &ranks[1..] {
            let mut shard = vec![0f32; r.layers.len() * blocks.len() * r.layout.block_floats()];
            st.links.world.recv(r.rank, &mut shard)?;
            r.paste(&full, &shard, &mut staging, blocks.len());
        }
        Ok(staging)
    }

    /// Runs a step; with an observer, gathers the step's new KV from every
    /// rank afterwards and shows it whole, layer by layer (a sharded
    /// prefill worker exports once the step is done, not layer by layer).
    fn run(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        on_layer: Option<&mut dyn FnMut(LayerKv<'_>)>,
    ) -> Result<Vec<Vec<f32>>> {
        if let Some(why) = self.broken.get() {
            return Err(EngineError::Shard(why));
        }
        self.model.check_step(batch)?;
        Model::reserve_step(pool, batch)?;
        let before: Vec<usize> = batch.iter().map(|q| q.kv.len).collect();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.step(&mut st, pool, batch).and_then(|logits| {
            if let Some(on_layer) = on_layer {
                self.show_step_kv(&mut st, pool, batch, &before, on_layer)?;
            }
            Ok(logits)
        });
        if let Err(e) = &r {
            // Any failure past the checks leaves the ranks out of step.
            self.broken.set(e.to_string());
        }
        r
    }

    fn show_step_kv(
        &self,
        st: &mut Rank0State,
        pool: &KvPool,
        batch: &[SeqStep<'_>],
        before: &[usize],
        on_layer: &mut dyn FnMut(LayerKv<'_>),
    ) -> Result<()> {
        // The blocks each sequence wrote, numbered in one gathered pool.
        let (ids, views) = written_blocks(batch, before, pool.layout().block_size);
        let gathered = self.gather_from_ranks(st, pool, &ids)?.into_pool();
        show_written(
            on_layer,
            &gathered,
            &views,
            before,
            self.model.config.n_layers,
        );
        Ok(())
    }

    fn step(
        &self,
        st: &mut Rank0State,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
    ) -> Result<Vec<Vec<f32>>> {
        let s = self.spec;
        let m = &self.model;
        let micro = micro_batches(batch.len(), s.pp);
        let msg = StepMsg {
            n_blocks: pool.n_blocks(),
            block_size: pool.layout().block_size,
            copies: pool.take_copies(),
            micro: micro.clone(),
            seqs: batch
                .iter()
                .map(|q| SeqMsg {
                    len: q.kv.len,
                    logits: q.logits,
                    tokens: q.tokens.to_vec(),
                    blocks: q.kv.blocks.clone(),
                })
                .collect(),
        };
        let body = words_to_f32(&msg.encode());
        send_header(&mut st.links.world, MSG_STEP, body.len())?;
        for r in 1..s.world() {
            st.links.world.send(r, &body)?;
        }
        st.last_sent = Instant::now();

        // Stage 0's share of every micro-batch.
        let last_stage = s.pp - 1;
        let mut local_logits = Vec::new();
        let mut lo = 0;
        let mut mb_rows = Vec::new();
        for &n in &micro {
            let mb = &batch[lo..lo + n];
            let rows = StepRows::of(mb);
            let mut x = m.embed(mb)?;
            m.run_layers(pool, mb, &rows, &mut x, lo, &mut |_| {}, st.links.tp())?;
            let want = rows.logit_rows(mb);
            if last_stage == 0 {
                local_logits.push(m.head_logits(&x, &want)?);
            } else {
                st.links.world.send(s.rank_of(1, 0), &x)?;
            }
            mb_rows.push(want.len());
            lo += n;
        }
        for q in batch.iter_mut() {
            q.kv.len += q.tokens.len();
        }

        // Gather the vocabulary slices of the last stage, micro-batch by micro-batch.
        let vocab = m.config.vocab_size;
        let total_rows: usize = mb_rows.iter().sum();
        let mut logits = vec![0f32; total_rows * vocab];
        let mut row0 = 0;
        let mut local = local_logits.into_iter();
        for &nr in &mb_rows {
            for t in 0..s.tp {
                let cols = s.vocab_rows_of(t, vocab);
                let w = cols.len();
                let part = if s.rank_of(last_stage, t) == 0 {
                    local.next().unwrap_or_default()
                } else {
                    let mut p = vec![0f32; nr * w];
                    st.links.world.recv(s.rank_of(last_stage, t), &mut p)?;
                    p
                };
                for r in 0..nr {
                    logits[(row0 + r) * vocab + cols.start..(row0 + r) * vocab + cols.end]
                        .copy_from_slice(&part[r * w..(r + 1) * w]);
                }
            }
            row0 += nr;
        }
        Ok(split_logits(batch, &logits, vocab))
    }
}

impl ShardedModel {
    /// Runs `f` with the links, marking the worker broken if it fails.
    fn checked<T>(&self, f: impl FnOnce(&mut Rank0State) -> Result<T>) -> Result<T> {
        if let Some(why) = self.broken.get() {
            return Err(EngineError::Shard(why));
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut st);
        if let Err(e) = &r {
            self.broken.set(e.to_string());
        }
        r
    }
}

impl Executor for ShardedModel {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }
    /// Rank 0's counts: the first pipeline stage's layers.
    fn expert_tokens(&self) -> Vec<u64> {
        self.model.expert_tokens()
    }

    /// Rank 0's shard of the layout (its stage's layers, its KV heads).
    fn kv_layout(&self, block_size: usize) -> KvLayout {
        self.model.kv_layout(block_size)
    }

    fn wire_layout(&self, block_size: usize) -> KvLayout {
        self.full_layout(block_size)
    }

    fn prepare_pool(&self, pool: &mut KvPool) {
        pool.record_copies();
    }

    fn forward_observed(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        on_layer: &mut dyn FnMut(LayerKv<'_>),
    ) -> Result<Vec<Vec<f32>>> {
        self.run(pool, batch, Some(on_layer))
    }

    fn forward(&self, pool: &mut KvPool, batch: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>> {
        self.run(pool, batch, None)
    }

    /// The KV is split across the ranks: received into a staging buffer,
    /// scattered to the ranks at install.
    fn receives_in_pool(&self) -> bool {
        false
    }

    fn install(&self, pool: &mut KvPool, kv: &SeqKv, staging: &KvStaging) -> Result<()> {
        self.checked(|st| self.install_on_ranks(st, pool, kv, staging))
    }

    fn gather(&self, pool: &KvPool, blocks: &[BlockId]) -> Result<Option<KvStaging>> {
        self.checked(|st| self.gather_from_ranks(st, pool, blocks))
            .map(Some)
    }
}

impl Drop for ShardedModel {
    fn drop(&mut self) {
        // Marked first (no error: this is the normal end), so the watcher
        // does not take the ranks' leaving for a failure, and the
        // keep-alive stops.
        let was_broken = {
            let mut w = self.broken.why.lock().unwrap_or_else(|e| e.into_inner());
            let was = w.is_some();
            w.get_or_insert_with(|| "the worker shut down".into());
            was
        };
        if !was_broken {
            if let Ok(mut st) = self.state.lock() {
                let _ = send_header(&mut st.links.world, MSG_SHUTDOWN, 0);
            }
        }
    }
}

/// Marks the worker broken the moment another rank's process goes away
/// (its connection to rank 0 hangs up), even while the worker is idle.
fn spawn_hangup_watch(peers: Vec<(usize, std::net::TcpStream)>, broken: Arc<Broken>) {
    let r = std::thread::Builder::new()
        .name("shard-watch".into())
        .spawn(move || loop {
            if broken.get().is_some() {
                return;
            }
            if let Some(rank) = crate::comm::wait_for_hangup(&peers, Duration::from_millis(500)) {
                broken.set(format!("rank {rank} went away"));
                return;
            }
        });
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot start the rank watcher");
    }
}

/// Sends a keep-alive to idle followers every `period`, until the model is
/// dropped or broken.
fn spawn_keepalive(state: Weak<Mutex<Rank0State>>, broken: Arc<Broken>, period: Duration) {
    let period = period.max(Duration::from_millis(100));
    let r = std::thread::Builder::new()
        .name("shard-keepalive".into())
        .spawn(move || loop {
            std::thread::sleep(period);
            if broken.get().is_some() {
                return;
            }
            let Some(state) = state.upgrade() else { return };
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            if st.last_sent.elapsed() < period {
                continue;
            }
            if let Err(e) = send_header(&mut st.links.world, MSG_KEEPALIVE, 0) {
                broken.set(e.to_string());
                return;
            }
            st.last_sent = Instant::now();
        });
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot start the keep-alive thread");
    }
}

// ---------------------------------------------------------------------------
// Followers

/// Runs rank `o.spec.rank > 0` of a sharded worker until rank 0 shuts it
/// down (`Ok`) or the worker breaks (`Err`).
pub fn run_follower(src: &ModelSource, o: &ShardOptions) -> Result<()> {
    let s = o.spec;
    if s.rank == 0 {
        return Err(EngineError::Shard(
            "rank 0 runs ShardedModel, not a follower".into(),
        ));
    }
    s.validate(&src.config)?;
    let model = Model::load_shard(src, o.threads, o.expand, s)?;
    let mut links = Links::connect(o)?;
    let mut pool: Option<KvPool> = None;
    let h = model.config.hidden;
    let (stage, last_stage) = (s.stage(), s.pp - 1);
    loop {
        let mut hdr = [0f32; 2];
        links.world.recv(0, &mut hdr)?;
        let (kind, len) = (hdr[0].to_bits(), hdr[1].to_bits() as usize);
        if kind == MSG_KEEPALIVE {
            continue;
        }
        if kind == MSG_SHUTDOWN {
            return Ok(());
        }
        let mut body = vec![0f32; len];
        links.world.recv(0, &mut body)?;
        let words: Vec<u32> = body.iter().map(|x| x.to_bits()).collect();
        if kind == MSG_INSTALL || kind == MSG_GATHER {
            let (n_blocks, bs, blocks) = parse_blocks_msg(&words)?;
            let layout = model.kv_layout(bs);
            let p = match &mut pool {
                Some(p) if p.n_blocks() == n_blocks && *p.layout() == layout => p,
                _ => pool.insert(KvPool::new_mirror(layout, n_blocks)),
            };
            if kind == MSG_INSTALL {
                let mut data = vec![0f32; layout.n_layers * blocks.len() * layout.block_floats()];
                links.world.recv(0, &mut data)?;
                write_shard(p, &blocks, &data);
            } else {
                links.world.send(0, &read_shard(p, &blocks))?;
            }
            continue;
        }
        if kind != MSG_STEP {
            return Err(EngineError::Shard(format!(
                "unknown message {kind} from rank 0"
            )));
        }
        let msg = StepMsg::decode(&words)?;
        let layout = model.kv_layout(msg.block_size);
        let p = match &mut pool {
            Some(p) if p.n_blocks() == msg.n_blocks && *p.layout() == layout => p,
            _ => pool.insert(KvPool::new_mirror(layout, msg.n_blocks)),
        };
        for &(a, b) in &msg.copies {
            p.apply_copy(a, b)?;
        }
        let mut kvs: Vec<SeqKv> = msg
            .seqs
            .iter()
            .map(|q| SeqKv {
                blocks: q.blocks.clone(),
                len: q.len,
                adapter: 0,
            })
            .collect();
        let mut steps: Vec<SeqStep<'_>> = kvs
            .iter_mut()
            .zip(&msg.seqs)
            .map(|(kv, q)| SeqStep {
                kv,
                tokens: &q.tokens,
                logits: q.logits,
            })
            .collect();
        model.check_step(&steps)?;
        for q in &steps {
            if p.layout().blocks_for(q.kv.len + q.tokens.len()) > q.kv.blocks.len() {
                return Err(EngineError::Shard(
                    "rank 0 sent a sequence without room for its tokens".into(),
                ));
            }
        }
        let mut out = Vec::new();
        let mut lo = 0;
        for &n in &msg.micro {
            let mb = &mut steps[lo..lo + n];
            let rows = StepRows::of(mb);
            let mut x = if stage == 0 {
                model.embed(mb)?
            } else {
                let mut x = vec![0f32; rows.n_tok() * h];
                links
                    .world
                    .recv(s.rank_of(stage - 1, s.tp_rank()), &mut x)?;
                x
            };
            model.run_layers(p, mb, &rows, &mut x, lo, &mut |_| {}, links.tp())?;
            if stage < last_stage {
                links.world.send(s.rank_of(stage + 1, s.tp_rank()), &x)?;
            } else {
                out.push(model.head_logits(&x, &rows.logit_rows(mb))?);
            }
            lo += n;
        }
        for l in &out {
            links.world.send(0, l)?;
        }
    }
}
