//! The transformer forward pass (llama family, qwen2, qwen3, and the
//! mixture-of-experts Mixtral, Qwen2-MoE and Qwen3-MoE) over a batch of
//! sequences, each bringing any number of new tokens.
//!
//! One call runs every new token of every sequence through each layer, so
//! each weight matrix is read once per step for the whole batch. Every
//! output is computed in an order that depends only on that token's own
//! inputs (see `cpu` and `ops`), so a sequence gets the same bits alone or
//! in a batch, in one prompt chunk or many.

use std::sync::PoisonError;

use tandem_model::config::{ModelConfig, MoeConfig, RopeScaling, RopeStyle};
use tandem_model::lora::{LoraAdapter, LoraPair, Target};
use tandem_model::quant::GgmlType;
use tandem_model::weights::{ModelSource, TensorRef};

use crate::comm::Communicator;
use crate::cpu::{matmul, ExpandWeights, PackedMatrix, ThreadPool, REDUCTION_CHUNK};
use crate::error::{EngineError, Result};
use crate::executor::Executor;
use crate::kv::{BlockId, KvDtype, KvLayout, KvPool, SeqKv};
use crate::ops;
use crate::shard::ShardSpec;

/// A projection made of one or more stacked weight matrices, e.g. Q, K and V
/// fused into one so the activations are read once. Matrices are fused when
/// they share a type; otherwise they run one after another into their rows.
struct Proj {
    parts: Vec<PackedMatrix>,
    rows: usize,
}

impl Proj {
    fn new(parts: &[TensorRef<'_>]) -> Result<Self> {
        let cols = parts[0].shape[1];
        let rows = parts.iter().map(|p| p.shape[0]).sum();
        let same_type = parts
            .iter()
            .all(|p| p.ty == parts[0].ty && p.shape[1] == cols);
        let packed = if parts.len() > 1 && same_type {
            // Rows are independent in every GGML type: stacking the bytes stacks the rows.
            let bytes: Vec<u8> = parts.iter().flat_map(|p| p.bytes.iter().copied()).collect();
            let shape = [rows, cols];
            vec![PackedMatrix::from_tensor(&TensorRef {
                ty: parts[0].ty,
                shape: &shape,
                bytes: &bytes,
            })?]
        } else {
            parts
                .iter()
                .map(PackedMatrix::from_tensor)
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Self {
            parts: packed,
            rows,
        })
    }

    /// `out` is `tokens × rows`.
    fn apply(&self, pool: &ThreadPool, x: &[f32], tokens: usize, out: &mut [f32]) {
        if self.parts.len() == 1 {
            matmul(pool, &self.parts[0], x, tokens, out);
            return;
        }
        let mut off = 0;
        for p in &self.parts {
            let mut tmp = vec![0f32; tokens * p.rows()];
            matmul(pool, p, x, tokens, &mut tmp);
            for t in 0..tokens {
                out[t * self.rows + off..t * self.rows + off + p.rows()]
                    .copy_from_slice(&tmp[t * p.rows()..(t + 1) * p.rows()]);
            }
            off += p.rows();
        }
    }

    fn matrices_mut(&mut self) -> impl Iterator<Item = &mut PackedMatrix> {
        self.parts.iter_mut()
    }
}

/// A row-parallel projection (attention output, FFN down): whole in a
/// single process; in a tensor-parallel rank, this rank's input columns cut
/// into [`REDUCTION_CHUNK`]-wide matrices, one per reduction chunk.
///
/// Why per chunk: the kernels' contract adds chunk partials in chunk order,
/// `((p0 + p1) + p2) + …`. A rank that summed its own chunks first would
/// add in another order and change the bits; a rank that hands over each
/// chunk's partial lets every rank fold all of them in the single-process
/// order, so sharded logits are bit-identical by construction. The price is
/// `chunks per rank` times the bytes of a plain all-reduce.
enum RowProj {
    Whole(Proj),
    Chunks(Vec<PackedMatrix>),
}

impl RowProj {
    /// Matrices that may get an f32 copy (the chunks already are f32).
    fn matrices_mut(&mut self) -> Box<dyn Iterator<Item = &mut PackedMatrix> + '_> {
        match self {
            RowProj::Whole(p) => Box::new(p.matrices_mut()),
            RowProj::Chunks(_) => Box::new(std::iter::empty()),
        }
    }

    fn matrices(&self) -> Box<dyn Iterator<Item = &PackedMatrix> + '_> {
        match self {
            RowProj::Whole(p) => Box::new(p.parts.iter()),
            RowProj::Chunks(c) => Box::new(c.iter()),
        }
    }

    /// `out = input · Wᵀ` (`tokens × rows`), all-reducing the chunk
    /// partials across the tensor-parallel group in the kernels' order.
    fn apply(
        &self,
        pool: &ThreadPool,
        input: &[f32],
        tokens: usize,
        out: &mut [f32],
        tp: &mut Option<&mut dyn Communicator>,
    ) -> Result<()> {
        let chunks = match self {
            RowProj::Whole(p) => {
                p.apply(pool, input, tokens, out);
                return Ok(());
            }
            RowProj::Chunks(c) => c,
        };
        let rows = out.len() / tokens.max(1);
        let in_cols = input.len() / tokens.max(1);
        let part = tokens * rows;
        let mut partials = vec![0f32; chunks.len() * part];
        let mut slice = vec![0f32; tokens * REDUCTION_CHUNK];
        for (i, m) in chunks.iter().enumerate() {
            let c0 = i * REDUCTION_CHUNK;
            for t in 0..tokens {
                slice[t * REDUCTION_CHUNK..(t + 1) * REDUCTION_CHUNK]
                    .copy_from_slice(&input[t * in_cols + c0..t * in_cols + c0 + REDUCTION_CHUNK]);
            }
            matmul(
                pool,
                m,
                &slice,
                tokens,
                &mut partials[i * part..(i + 1) * part],
            );
        }
        let all = match tp {
            Some(comm) => {
                let mut all = vec![0f32; partials.len() * comm.world_size()];
                comm.all_gather(&partials, &mut all)?;
                all
            }
            None => partials,
        };
        // Rank-major, then chunk: the global chunk order.
        out.copy_from_slice(&all[..part]);
        for p in all[part..].chunks_exact(part) {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Proj,
    qkv_bias: Option<Vec<f32>>,
    /// Per-head RMSNorm weights of the queries and the keys (qwen3).
    qk_norm: Option<QkNorm>,
    wo: RowProj,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
}

/// A layer's feed-forward block.
enum Ffn {
    /// One SwiGLU MLP: gate and up stacked, then down.
    Dense { gate_up: Proj, down: RowProj },
    /// A mixture of experts (see [`MoeConfig`]).
    Moe(Moe),
}

impl Ffn {
    fn matrices_mut(&mut self) -> Box<dyn Iterator<Item = &mut PackedMatrix> + '_> {
        match self {
            Ffn::Dense { gate_up, down } => {
                Box::new(gate_up.matrices_mut().chain(down.matrices_mut()))
            }
            Ffn::Moe(m) => Box::new(
                m.router.matrices_mut().chain(
                    m.experts
                        .iter_mut()
                        .chain(m.shared.as_mut().map(|s| &mut s.expert))
                        .flat_map(|e| e.gate_up.matrices_mut().chain(e.down.matrices_mut())),
                ),
            ),
        }
    }

    fn matrices(&self) -> Box<dyn Iterator<Item = &PackedMatrix> + '_> {
        match self {
            Ffn::Dense { gate_up, down } => Box::new(gate_up.parts.iter().chain(down.matrices())),
            Ffn::Moe(m) => Box::new(
                m.router.parts.iter().chain(
                    m.experts
                        .iter()
                        .chain(m.shared.as_ref().map(|s| &s.expert))
                        .flat_map(|e| e.gate_up.parts.iter().chain(e.down.parts.iter())),
                ),
            ),
        }
    }
}

/// A mixture-of-experts FFN: the router's matrix and each expert's SwiGLU
/// (on a tensor-parallel rank, the experts it holds).
struct Moe {
    /// `experts × hidden`: each token's score for each expert (all of
    /// them, on every rank).
    router: Proj,
    /// The experts `local`, in order.
    experts: Vec<Expert>,
    /// Which experts this process holds: all of them, or a rank's share.
    local: std::ops::Range<usize>,
    used: usize,
    norm_topk_prob: bool,
    /// The expert every token runs through (Qwen2-MoE).
    shared: Option<SharedExpert>,
    /// Tokens routed to each expert (all of them, counted on every rank):
    /// how evenly the router spreads the load (see [`Model::expert_tokens`]).
    routed: Vec<std::sync::atomic::AtomicU64>,
}

/// An expert every token runs through, its output scaled by
/// `sigmoid(gate · x)`.
struct SharedExpert {
    expert: Expert,
    /// `hidden` weights of the gate's one output.
    gate: Vec<f32>,
}

struct Expert {
    /// Gate then up, stacked by rows (`2·expert_ffn × hidden`).
    gate_up: Proj,
    /// `hidden × expert_ffn`.
    down: Proj,
}

impl Moe {
    /// Chooses each token's experts from its router scores (`tokens ×
    /// experts`), as Mixtral and Qwen3-MoE do: a softmax over all experts,
    /// the `used` most probable (the lower index first on equal
    /// probabilities), their probabilities rescaled to sum to one when the
    /// model says so. Returns, per expert, its `(token, weight)` pairs in
    /// token order.
    fn route(&self, scores: &[f32]) -> Vec<Vec<(usize, f32)>> {
        let n = self.router.rows;
        let mut routes = vec![Vec::new(); n];
        let mut probs = vec![0f32; n];
        let mut order: Vec<usize> = Vec::with_capacity(n);
        for (t, row) in scores.chunks_exact(n).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (p, &s) in probs.iter_mut().zip(row) {
                *p = (s - max).exp();
                sum += *p;
            }
            for p in probs.iter_mut() {
                *p /= sum;
            }
            order.clear();
            order.extend(0..n);
            // total_cmp: a NaN score sorts first rather than panicking.
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let chosen = &order[..self.used];
            let norm = if self.norm_topk_prob {
                chosen.iter().map(|&e| probs[e]).sum::<f32>()
            } else {
                1.0
            };
            for &e in chosen {
                routes[e].push((t, probs[e] / norm));
            }
        }
        routes
    }
}

/// Per-head RMSNorm weights of the queries and the keys, one per head
/// dimension, applied to every head before RoPE.
struct QkNorm {
    q: Vec<f32>,
    k: Vec<f32>,
}

/// Which logits a sequence wants from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    /// The last new token's (the next-token distribution).
    Last,
    /// Every new token's (scoring a prompt).
    All,
    /// Only the greedy choice after the last new token: the row returned
    /// is one value, the id of the largest logit (lowest id on ties, as
    /// [`crate::sampler::argmax`]), read with [`greedy_token`]. What a
    /// request whose sampling is a plain argmax asks for (see
    /// [`crate::sampler::SamplingParams::is_plain_greedy_at`]): an executor
    /// that keeps the logits in device memory picks there and copies back
    /// one id instead of the vocabulary.
    Greedy,
    /// Only the `k` largest logits after the last new token, as
    /// [`crate::sampler::top_k_of`] selects them: the row returned is `k`
    /// `(id, logit)` pairs, largest first, read with [`top_k_candidates`].
    /// What a request that samples from its top-k alone asks for (see
    /// [`crate::sampler::SamplingParams::top_k_only_at`]).
    TopK(usize),
}

/// Vocabularies up to this size travel exactly as `f32` ids in a
/// [`Logits::Greedy`] or [`Logits::TopK`] row.
pub(crate) const MAX_ID_VOCAB: usize = 1 << 24;

/// The [`Logits::Greedy`] row carrying `id`.
pub fn encode_greedy(id: u32) -> Vec<f32> {
    vec![id as f32]
}

/// A [`Logits::TopK`] row of `(id, logit)` pairs.
pub fn encode_top_k(top: &[(u32, f32)]) -> Vec<f32> {
    top.iter().flat_map(|&(i, v)| [i as f32, v]).collect()
}

/// The `(id, logit)` pairs of a [`Logits::TopK`] row.
pub fn top_k_candidates(row: &[f32]) -> Vec<(u32, f32)> {
    row.chunks_exact(2).map(|p| (p[0] as u32, p[1])).collect()
}

/// The token a [`Logits::Greedy`] row carries; `None` for a row of another
/// kind (not one value).
pub fn greedy_token(row: &[f32]) -> Option<u32> {
    match row {
        [id] => Some(*id as u32),
        _ => None,
    }
}

/// One layer of one sequence's new KV, just written (see [`Model::forward_observed`]).
pub struct LayerKv<'a> {
    /// Index of the sequence in the step's batch.
    pub seq: usize,
    pub layer: usize,
    pub pool: &'a KvPool,
    pub kv: &'a SeqKv,
    /// Positions written by this step.
    pub positions: std::ops::Range<usize>,
}

/// One sequence's part of a step.
pub struct SeqStep<'a> {
    pub kv: &'a mut SeqKv,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// Rotary embedding frequencies, one per pair of head dimensions.
struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
}

impl Rope {
    fn new(cfg: &ModelConfig, freq_factors: Option<Vec<f32>>) -> Self {
        let hd = cfg.head_dim;
        let mut inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / hd as f32))
            .collect();
        match cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original_max_position / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        if let Some(ff) = freq_factors {
            for (f, d) in inv_freq.iter_mut().zip(ff) {
                *f /= d;
            }
        }
        Self {
            inv_freq,
            style: cfg.rope_style,
        }
    }

    /// cos and sin tables for one position.
    fn table(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for (i, f) in self.inv_freq.iter().enumerate() {
            let a = pos as f32 * f;
            cos[i] = (a as f64).cos() as f32;
            sin[i] = (a as f64).sin() as f32;
        }
    }

    /// Rotates one head in place.
    fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = x.len() / 2;
        for i in 0..half {
            let (a_idx, b_idx) = match self.style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (a, b) = (x[a_idx], x[b_idx]);
            x[a_idx] = a * cos[i] - b * sin[i];
            x[b_idx] = b * cos[i] + a * sin[i];
        }
    }
}

/// A loaded model, ready to run on the CPU: the whole model, or one rank's
/// shard of it (see [`crate::shard`]).
pub struct Model {
    /// The whole model's configuration (also on a shard).
    pub config: ModelConfig,
    shard: ShardSpec,
    /// The token embedding (first pipeline stage only).
    embd: Option<PackedMatrix>,
    /// This stage's layers.
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    /// The LM head's rows this rank computes, when it is not the embedding
    /// itself (tied weights in a single process). Last stage only.
    lm_head: Option<PackedMatrix>,
    /// Whether this rank computes logits (the last pipeline stage).
    has_head: bool,
    /// This rank's query and KV heads.
    heads: crate::shard::HeadShard,
    rope: Rope,
    pool: ThreadPool,
    /// LoRA adapters by number: slot `i` holds adapter `i + 1`, `None`
    /// once removed (numbers are not reused). Behind a lock because
    /// adapters come and go while the model serves (see
    /// [`Model::add_adapter`]); the forward pass only reads it.
    adapters: std::sync::RwLock<Vec<Option<Adapter>>>,
}

/// A LoRA adapter as the forward pass applies it.
struct Adapter {
    name: String,
    fingerprint: String,
    layers: Vec<std::collections::BTreeMap<Target, LoraWeights>>,
}

/// One projection's update as [`ops::lora_update`] reads it.
struct LoraWeights {
    /// `rank × in`.
    a: Vec<f32>,
    /// `B` transposed: `rank × out`.
    bt: Vec<f32>,
    rank: usize,
    scale: f32,
}

impl LoraWeights {
    fn of(p: LoraPair) -> Self {
        let out = p.b.len() / p.rank;
        let mut bt = vec![0f32; p.b.len()];
        for (o, row) in p.b.chunks_exact(p.rank).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                bt[r * out + o] = v;
            }
        }
        Self {
            a: p.a,
            bt,
            rank: p.rank,
            scale: p.scale,
        }
    }
}

/// A raw pointer that tasks of one kernel call share to write disjoint rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes a disjoint range; the pool joins before the buffer is used again.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A method (not a field access) so closures capture the whole wrapper.
    fn at(self, off: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer the pointer came from.
        unsafe { self.0.add(off) }
    }
}

fn f32_vector(t: TensorRef<'_>, name: &str) -> Result<Vec<f32>> {
    let mut out = vec![0f32; t.n_elements()];
    if t.ty.is_float() || t.ty == GgmlType::F32 {
        tandem_model::quant::dequantize_row(t.ty, t.bytes, &mut out)?;
        Ok(out)
    } else {
        Err(EngineError::Unsupported(format!(
            "{name}: a vector must be a float type, got {}",
            t.ty.name()
        )))
    }
}

/// Rows `r0..r1` of a row-major matrix tensor (rows are independent in
/// every GGML type, so this is a byte range).
fn row_bytes<'a>(t: &TensorRef<'a>, r0: usize, r1: usize) -> Result<&'a [u8]> {
    let rb = t.ty.bytes_for(t.shape[1])?;
    t.bytes.get(r0 * rb..r1 * rb).ok_or_else(|| {
        EngineError::Unsupported(format!(
            "{} tensor {:?} is shorter than {r1} rows",
            t.ty.name(),
            t.shape
        ))
    })
}

/// Rows `r0..r1` of a matrix tensor, in the file's type (column-parallel
/// shards: a rank's output rows).
struct RowPart<'a> {
    ty: GgmlType,
    shape: [usize; 2],
    bytes: &'a [u8],
}

impl<'a> RowPart<'a> {
    fn of(t: &TensorRef<'a>, r0: usize, r1: usize) -> Result<Self> {
        Ok(Self {
            ty: t.ty,
            shape: [r1 - r0, t.shape[1]],
            bytes: row_bytes(t, r0, r1)?,
        })
    }

    fn tensor(&self) -> TensorRef<'_> {
        TensorRef {
            ty: self.ty,
            shape: &self.shape,
            bytes: self.bytes,
        }
    }
}

/// Packs rows `r0..r1` of `t` as they are.
fn pack_rows(t: &TensorRef<'_>, r0: usize, r1: usize) -> Result<PackedMatrix> {
    PackedMatrix::from_tensor(&RowPart::of(t, r0, r1)?.tensor())
}

/// Columns `c0..c1` of `t` (a multiple of [`REDUCTION_CHUNK`] wide, from a
/// chunk boundary), one f32 matrix per reduction chunk, holding exactly the
/// values the kernels decode from the file's type.
fn column_chunks(t: &TensorRef<'_>, c0: usize, c1: usize) -> Result<Vec<PackedMatrix>> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    if !c0.is_multiple_of(REDUCTION_CHUNK) || !(c1 - c0).is_multiple_of(REDUCTION_CHUNK) {
        return Err(EngineError::Unsupported(format!(
            "columns {c0}..{c1} do not follow the {REDUCTION_CHUNK}-wide reduction chunks"
        )));
    }
    let full = PackedMatrix::from_tensor(t)?;
    let n = (c1 - c0) / REDUCTION_CHUNK;
    let mut bufs = vec![Vec::with_capacity(rows * REDUCTION_CHUNK * 4); n];
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        full.row_into(r, &mut row);
        for (i, b) in bufs.iter_mut().enumerate() {
            let k = c0 + i * REDUCTION_CHUNK;
            for v in &row[k..k + REDUCTION_CHUNK] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let shape = [rows, REDUCTION_CHUNK];
    bufs.iter()
        .map(|b| {
            PackedMatrix::from_tensor(&TensorRef {
                ty: GgmlType::F32,
                shape: &shape,
                bytes: b,
            })
        })
        .collect()
}

/// Layer `l`'s experts and router. Each expert's matrices are read from
/// llama.cpp's stacked `ffn_{gate,up,down}_exps.weight` (`[experts, rows,
/// cols]`, one expert's rows after another) when the file has them, else
/// from per-expert tensors (`ffn_gate.{e}.weight`, Hugging Face names mapped).
fn load_moe(
    src: &ModelSource,
    l: usize,
    h: usize,
    moe: &MoeConfig,
    local: std::ops::Range<usize>,
) -> Result<Moe> {
    let (n, eff) = (moe.experts, moe.expert_ffn);
    let router = src.tensor(&format!("blk.{l}.ffn_gate_inp.weight"), &[n, h])?;
    let expert = |proj: &str, e: usize, rows: usize, cols: usize| -> Result<RowPart<'_>> {
        let stacked = format!("blk.{l}.{proj}_exps.weight");
        if src.get(&stacked).is_some() {
            let t = src.tensor(&stacked, &[n, rows, cols])?;
            let rb = t.ty.bytes_for(cols)?;
            let bytes = t
                .bytes
                .get(e * rows * rb..(e + 1) * rows * rb)
                .ok_or_else(|| {
                    EngineError::Unsupported(format!("{stacked} is shorter than its shape"))
                })?;
            Ok(RowPart {
                ty: t.ty,
                shape: [rows, cols],
                bytes,
            })
        } else {
            let t = src.tensor(&format!("blk.{l}.{proj}.{e}.weight"), &[rows, cols])?;
            RowPart::of(&t, 0, rows)
        }
    };
    let mut experts = Vec::with_capacity(local.len());
    for e in local.clone() {
        let (g, u) = (expert("ffn_gate", e, eff, h)?, expert("ffn_up", e, eff, h)?);
        experts.push(Expert {
            gate_up: Proj::new(&[g.tensor(), u.tensor()])?,
            down: Proj::new(&[expert("ffn_down", e, h, eff)?.tensor()])?,
        });
    }
    let shared = match moe.shared_expert_ffn {
        None => None,
        Some(sff) => {
            let name = |s: &str| format!("blk.{l}.ffn_{s}_shexp.weight");
            // A vector in llama.cpp's files, a one-row matrix in Hugging Face's.
            let gate_name = format!("blk.{l}.ffn_gate_inp_shexp.weight");
            let gate = src
                .get(&gate_name)
                .ok_or_else(|| tandem_model::ModelError::MissingTensor(gate_name.clone()))?;
            if gate.n_elements() != h || gate.shape.iter().filter(|&&d| d != 1).count() > 1 {
                return Err(tandem_model::ModelError::TensorShape {
                    name: gate_name,
                    got: gate.shape.to_vec(),
                    expected: vec![h],
                }
                .into());
            }
            let (g, u) = (
                src.tensor(&name("gate"), &[sff, h])?,
                src.tensor(&name("up"), &[sff, h])?,
            );
            Some(SharedExpert {
                expert: Expert {
                    gate_up: Proj::new(&[g, u])?,
                    down: Proj::new(&[src.tensor(&name("down"), &[h, sff])?])?,
                },
                gate: f32_vector(gate, &gate_name)?,
            })
        }
    };
    Ok(Moe {
        router: Proj::new(&[router])?,
        experts,
        local,
        used: moe.experts_used,
        norm_topk_prob: moe.norm_topk_prob,
        shared,
        routed: (0..moe.experts).map(|_| Default::default()).collect(),
    })
}

/// Where a step's tokens sit in the activation rows.
pub(crate) struct StepRows {
    /// Per token: its position in its sequence.
    pub tok_pos: Vec<usize>,
    /// Per sequence: its first row.
    pub starts: Vec<usize>,
}

impl StepRows {
    pub fn of(batch: &[SeqStep<'_>]) -> Self {
        let mut tok_pos = Vec::new();
        let mut starts = Vec::with_capacity(batch.len());
        for s in batch {
            starts.push(tok_pos.len());
            tok_pos.extend(s.kv.len..s.kv.len + s.tokens.len());
        }
        Self { tok_pos, starts }
    }

    pub fn n_tok(&self) -> usize {
        self.tok_pos.len()
    }

    /// Rows whose logits the sequences asked for, in batch order.
    pub fn logit_rows(&self, batch: &[SeqStep<'_>]) -> Vec<usize> {
        let mut rows = Vec::new();
        for (si, s) in batch.iter().enumerate() {
            let start = self.starts[si];
            match s.logits {
                Logits::None => {}
                Logits::Last | Logits::Greedy | Logits::TopK(_) => {
                    rows.push(start + s.tokens.len() - 1)
                }
                Logits::All => rows.extend(start..start + s.tokens.len()),
            }
        }
        rows
    }
}

/// Splits `rows × vocab` logits (in [`StepRows::logit_rows`] order) per
/// sequence; a [`Logits::Greedy`] row becomes its argmax, a
/// [`Logits::TopK`] row its top-k pairs.
pub(crate) fn split_logits(batch: &[SeqStep<'_>], logits: &[f32], vocab: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(batch.len());
    let mut off = 0;
    for s in batch {
        let n = match s.logits {
            Logits::None => 0,
            Logits::Last | Logits::Greedy | Logits::TopK(_) => 1,
            Logits::All => s.tokens.len(),
        };
        let rows = &logits[off * vocab..(off + n) * vocab];
        out.push(match s.logits {
            Logits::Greedy => encode_greedy(crate::sampler::argmax(rows)),
            Logits::TopK(k) => encode_top_k(&crate::sampler::top_k_of(rows, k)),
            _ => rows.to_vec(),
        });
        off += n;
    }
    out
}

impl Model {
    /// Packs every weight for the CPU kernels and starts a pool of `threads`;
    /// f32 copies of the weights as [`ExpandWeights::Auto`] decides.
    pub fn load(src: &ModelSource, threads: usize) -> Result<Self> {
        Self::load_with(src, threads, ExpandWeights::Auto)
    }

    /// [`Model::load`] with an explicit policy for the f32 weight copies
    /// that speed up batched decode (see [`PackedMatrix::expand_f32`]):
    /// all matrices get one, or none does. Outputs are the same either way.
    pub fn load_with(src: &ModelSource, threads: usize, expand: ExpandWeights) -> Result<Self> {
        Self::load_shard(src, threads, expand, ShardSpec::solo())
    }

    /// Rank `shard.rank`'s part of the model: its pipeline stage's layers,
    /// its tensor-parallel slice of the heads, the FFN and the vocabulary.
    pub fn load_shard(
        src: &ModelSource,
        threads: usize,
        expand: ExpandWeights,
        shard: ShardSpec,
    ) -> Result<Self> {
        let mut m = Self::load_packed(src, threads, shard)?;
        let copy_bytes: usize = m.matrices_mut().map(|w| w.expanded_nbytes()).sum();
        if expand.decide(copy_bytes) {
            for w in m.matrices_mut() {
                w.expand_f32();
            }
        }
        tracing::info!(
            "f32 weight copies ({:.0} MB): {} (expand-weights {expand})",
            copy_bytes as f64 / 1e6,
            if m.f32_copy_bytes() > 0 {
                "made"
            } else {
                "not made"
            }
        );
        Ok(m)
    }

    /// The shard this model holds ([`ShardSpec::solo`] for a whole model).
    pub fn shard(&self) -> ShardSpec {
        self.shard
    }

    /// The matrix the LM head multiplies by, on the last stage.
    fn head(&self) -> Option<&PackedMatrix> {
        if !self.has_head {
            return None;
        }
        self.lm_head.as_ref().or(self.embd.as_ref())
    }

    /// The matrices the forward pass multiplies by (layers, then the LM head).
    fn matrices_mut(&mut self) -> impl Iterator<Item = &mut PackedMatrix> {
        let head = if !self.has_head {
            None
        } else if self.lm_head.is_some() {
            self.lm_head.as_mut()
        } else {
            self.embd.as_mut()
        };
        self.layers
            .iter_mut()
            .flat_map(|l| {
                l.qkv
                    .matrices_mut()
                    .chain(l.wo.matrices_mut())
                    .chain(l.ffn.matrices_mut())
            })
            .chain(head)
    }

    /// Every matrix of the layers and the head, for reading.
    fn matrices(&self) -> impl Iterator<Item = &PackedMatrix> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.qkv
                    .parts
                    .iter()
                    .chain(l.wo.matrices())
                    .chain(l.ffn.matrices())
            })
            .chain(self.head())
    }

    /// Bytes held by f32 weight copies (0 when none were made).
    pub fn f32_copy_bytes(&self) -> usize {
        self.matrices()
            .filter(|w| w.has_f32_copy())
            .map(|w| w.expanded_nbytes())
            .sum()
    }

    fn load_packed(src: &ModelSource, threads: usize, shard: ShardSpec) -> Result<Self> {
        let cfg = src.config.clone();
        shard.validate(&cfg)?;
        let heads = shard.heads(&cfg)?;
        let (h, hd, ffn) = (cfg.hidden, cfg.head_dim, cfg.ffn);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let whole = shard.tp == 1;
        let (q0, q1) = (heads.q.start * hd, heads.q.end * hd);
        let (k0, k1) = (heads.kv.start * hd, heads.kv.end * hd);
        let ffn_local = ffn / shard.tp;
        let (f0, f1) = (
            shard.tp_rank() * ffn_local,
            (shard.tp_rank() + 1) * ffn_local,
        );
        let layer_range = shard.layers(cfg.n_layers);
        let first = layer_range.start == 0;
        let last = layer_range.end == cfg.n_layers;

        let embd_t = src.tensor("token_embd.weight", &[cfg.vocab_size, h])?;
        let embd = if first || (last && cfg.tie_embeddings && whole) {
            Some(PackedMatrix::from_tensor(&embd_t)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(layer_range.len());
        for l in layer_range.clone() {
            let name = |s: &str| format!("blk.{l}.{s}");
            let t = |s: &str, shape: &[usize]| src.tensor(&name(s), shape);
            let vec = |s: &str, n: usize| -> Result<Vec<f32>> { f32_vector(t(s, &[n])?, &name(s)) };
            let qkv_bias = if cfg.qkv_bias {
                let q = vec("attn_q.bias", qd)?;
                let k = vec("attn_k.bias", kvd)?;
                let v = vec("attn_v.bias", kvd)?;
                let mut b = q[q0..q1].to_vec();
                b.extend_from_slice(&k[k0..k1]);
                b.extend_from_slice(&v[k0..k1]);
                Some(b)
            } else {
                None
            };
            let qk_norm = if cfg.qk_norm {
                Some(QkNorm {
                    q: vec("attn_q_norm.weight", hd)?,
                    k: vec("attn_k_norm.weight", hd)?,
                })
            } else {
                None
            };
            let (wq, wk, wv) = (
                t("attn_q.weight", &[qd, h])?,
                t("attn_k.weight", &[kvd, h])?,
                t("attn_v.weight", &[kvd, h])?,
            );
            let wo = t("attn_output.weight", &[h, qd])?;
            let (q, k, v) = (
                RowPart::of(&wq, q0, q1)?,
                RowPart::of(&wk, k0, k1)?,
                RowPart::of(&wv, k0, k1)?,
            );
            let ffn_block = match &cfg.moe {
                Some(moe) => Ffn::Moe(load_moe(src, l, h, moe, shard.experts(moe.experts))?),
                None => {
                    let (wg, wu) = (
                        t("ffn_gate.weight", &[ffn, h])?,
                        t("ffn_up.weight", &[ffn, h])?,
                    );
                    let wd = t("ffn_down.weight", &[h, ffn])?;
                    let (g, u) = (RowPart::of(&wg, f0, f1)?, RowPart::of(&wu, f0, f1)?);
                    Ffn::Dense {
                        gate_up: Proj::new(&[g.tensor(), u.tensor()])?,
                        down: if whole {
                            RowProj::Whole(Proj::new(&[wd])?)
                        } else {
                            RowProj::Chunks(column_chunks(&wd, f0, f1)?)
                        },
                    }
                }
            };
            layers.push(Layer {
                attn_norm: vec("attn_norm.weight", h)?,
                qkv: Proj::new(&[q.tensor(), k.tensor(), v.tensor()])?,
                qkv_bias,
                qk_norm,
                wo: if whole {
                    RowProj::Whole(Proj::new(&[wo])?)
                } else {
                    RowProj::Chunks(column_chunks(&wo, q0, q1)?)
                },
                ffn_norm: vec("ffn_norm.weight", h)?,
                ffn: ffn_block,
            });
        }
        let out_norm = f32_vector(
            src.tensor("output_norm.weight", &[h])?,
            "output_norm.weight",
        )?;
        let lm_head = if !last {
            None
        } else {
            let v = shard.vocab_rows(cfg.vocab_size);
            if cfg.tie_embeddings {
                if whole {
                    None // the embedding loaded above
                } else {
                    Some(pack_rows(&embd_t, v.start, v.end)?)
                }
            } else {
                let out = src.tensor("output.weight", &[cfg.vocab_size, h])?;
                Some(pack_rows(&out, v.start, v.end)?)
            }
        };
        let freq_factors = match src.get("rope_freqs.weight") {
            Some(t) => Some(f32_vector(t, "rope_freqs.weight")?),
            None => None,
        };
        let rope = Rope::new(&cfg, freq_factors);
        Ok(Self {
            config: cfg,
            shard,
            embd,
            layers,
            out_norm,
            lm_head,
            has_head: last,
            heads,
            rope,
            pool: ThreadPool::new(threads),
            adapters: Default::default(),
        })
    }

    /// Adds a LoRA adapter under `name`; sequences whose
    /// [`SeqKv::adapter`] is the returned number (1 for the first) run with
    /// it. Only a whole model serves adapters: a shard's projections are
    /// cut differently from the adapter's matrices.
    pub fn add_adapter(&self, name: &str, lora: LoraAdapter) -> Result<u32> {
        if self.shard.world() != 1 {
            return Err(EngineError::Unsupported(
                "LoRA adapters run on an unsharded model".into(),
            ));
        }
        let mut adapters = self
            .adapters
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if name.is_empty() || adapters.iter().flatten().any(|a| a.name == name) {
            return Err(EngineError::Unsupported(format!(
                "adapter name {name:?} is empty or already taken"
            )));
        }
        if self.config.moe.is_some()
            && lora.layers.iter().any(|l| {
                l.keys()
                    .any(|t| matches!(t, Target::Gate | Target::Up | Target::Down))
            })
        {
            return Err(EngineError::Unsupported(format!(
                "adapter {name:?} adapts the MLP, which this mixture-of-experts model does not have (attention-only adapters are served)"
            )));
        }
        if lora.layers.len() != self.layers.len() {
            return Err(EngineError::Unsupported(format!(
                "adapter {name:?} has {} layers, the model {}",
                lora.layers.len(),
                self.layers.len()
            )));
        }
        adapters.push(Some(Adapter {
            name: name.to_string(),
            fingerprint: lora.fingerprint,
            layers: lora
                .layers
                .into_iter()
                .map(|l| {
                    l.into_iter()
                        .map(|(t, p)| (t, LoraWeights::of(p)))
                        .collect()
                })
                .collect(),
        }));
        Ok(adapters.len() as u32)
    }

    /// Tokens the router sent to each expert since the model loaded,
    /// summed over this process's layers (the whole model, or a pipeline
    /// stage's share); empty for a dense model. Every token computed
    /// counts: prompts, decodes and speculative drafts.
    pub fn expert_tokens(&self) -> Vec<u64> {
        let mut sum = Vec::new();
        for l in &self.layers {
            if let Ffn::Moe(m) = &l.ffn {
                sum.resize(m.routed.len(), 0);
                for (s, c) in sum.iter_mut().zip(&m.routed) {
                    *s += c.load(std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        sum
    }

    /// Frees adapter `id`'s weights; a later step that names it is refused.
    pub fn remove_adapter(&self, id: u32) -> Result<()> {
        let mut adapters = self
            .adapters
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match (id as usize)
            .checked_sub(1)
            .and_then(|i| adapters.get_mut(i))
        {
            Some(slot @ Some(_)) => {
                *slot = None;
                Ok(())
            }
            _ => Err(EngineError::Unsupported(format!(
                "no LoRA adapter {id} to remove"
            ))),
        }
    }

    /// The adapters held, by number.
    pub fn adapters(&self) -> Vec<crate::executor::AdapterInfo> {
        let adapters = self.adapters.read().unwrap_or_else(PoisonError::into_inner);
        adapters
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                a.as_ref().map(|a| crate::executor::AdapterInfo {
                    id: i as u32 + 1,
                    name: a.name.clone(),
                    fingerprint: a.fingerprint.clone(),
                })
            })
            .collect()
    }

    /// Adds `scale·B·(A·x)` of `target` in layer `li` to the rows of each
    /// adapted sequence: `x` rows are `x_stride` wide, and the update lands
    /// in columns `out_off..` of `out`'s `out_stride`-wide rows. One task
    /// per token, each summing in a fixed order, so a token's result does
    /// not depend on its batch.
    #[allow(clippy::too_many_arguments)]
    fn add_lora(
        &self,
        adapted: &[(std::ops::Range<usize>, u32)],
        li: usize,
        target: Target,
        x: &[f32],
        x_stride: usize,
        out: &mut [f32],
        out_stride: usize,
        out_off: usize,
    ) {
        // Adapters change only between steps (`check_step` saw each one).
        let adapters = self.adapters.read().unwrap_or_else(PoisonError::into_inner);
        let tasks: Vec<(usize, &LoraWeights)> = adapted
            .iter()
            .filter_map(|(rows, a)| {
                let adapter = adapters.get(*a as usize - 1)?.as_ref()?;
                let pair = adapter.layers[li].get(&target)?;
                Some(rows.clone().map(move |t| (t, pair)))
            })
            .flatten()
            .collect();
        if tasks.is_empty() {
            return;
        }
        let dst = SharedOut(out.as_mut_ptr());
        self.pool.run(tasks.len(), &|ti| {
            let (t, p) = tasks[ti];
            let cols = p.a.len() / p.rank;
            let n_out = p.bt.len() / p.rank;
            // SAFETY: each task owns token `t`'s row; `out` outlives the call.
            let o =
                unsafe { std::slice::from_raw_parts_mut(dst.at(t * out_stride + out_off), n_out) };
            ops::lora_update(
                &p.a,
                &p.bt,
                p.rank,
                &x[t * x_stride..t * x_stride + cols],
                p.scale,
                o,
            );
        });
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// `out = Σ weight·expert(xn)` over each token's chosen experts
    /// (`tokens × hidden`), plus the gated shared expert's output where
    /// the model has one. Each expert runs once, over the rows of the
    /// tokens routed to it; a token's outputs are added in expert order,
    /// then the shared expert's, as `transformers` adds them. The kernels
    /// give a row the same bits whatever rows share its call, so a token's
    /// result does not depend on its batch.
    fn moe_ffn(
        &self,
        moe: &Moe,
        xn: &[f32],
        n_tok: usize,
        out: &mut [f32],
        tp: &mut Option<&mut dyn Communicator>,
    ) -> Result<()> {
        let h = self.config.hidden;
        let mut scores = vec![0f32; n_tok * moe.router.rows];
        moe.router.apply(&self.pool, xn, n_tok, &mut scores);
        let routes = moe.route(&scores);
        for (count, r) in moe.routed.iter().zip(&routes) {
            count.fetch_add(r.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        out.fill(0.0);
        if moe.local.len() == routes.len() {
            for (expert, routes) in moe.experts.iter().zip(&routes) {
                if let Some(y) = self.routed_expert(expert, routes, xn) {
                    for (yr, &(t, w)) in y.chunks_exact(h).zip(routes) {
                        for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(yr) {
                            *o += v * w;
                        }
                    }
                }
            }
        } else {
            self.moe_ffn_parallel(moe, &routes, xn, n_tok, out, tp)?;
        }
        if let Some(sh) = &moe.shared {
            let y = self.expert_forward(&sh.expert, xn, n_tok);
            for ((o, yr), x) in out
                .chunks_exact_mut(h)
                .zip(y.chunks_exact(h))
                .zip(xn.chunks_exact(h))
            {
                let z: f32 = sh.gate.iter().zip(x).map(|(g, v)| g * v).sum();
                let g = 1.0 / (1.0 + (-z).exp());
                for (o, v) in o.iter_mut().zip(yr) {
                    *o += g * v;
                }
            }
        }
        Ok(())
    }

    /// Expert parallelism: each rank runs the experts it holds, writes
    /// `weight·expert(x)` of each (token, chosen expert) into its slot,
    /// and all-gathers the slots; every rank then adds each token's slots
    /// in expert order, from the rank that holds the expert. The products
    /// and the order of the sums are the single process's, so the bits
    /// are too.
    fn moe_ffn_parallel(
        &self,
        moe: &Moe,
        routes: &[Vec<(usize, f32)>],
        xn: &[f32],
        n_tok: usize,
        out: &mut [f32],
        tp: &mut Option<&mut dyn Communicator>,
    ) -> Result<()> {
        let h = self.config.hidden;
        let comm = tp.as_deref_mut().ok_or_else(|| {
            EngineError::Unsupported(
                "a share of the experts runs in a tensor-parallel group".into(),
            )
        })?;
        let (world, used) = (comm.world_size(), moe.used);
        // Each token's chosen experts in expert order: slot j of token t.
        let mut chosen: Vec<Vec<usize>> = vec![Vec::with_capacity(used); n_tok];
        for (e, r) in routes.iter().enumerate() {
            for &(t, _) in r {
                chosen[t].push(e);
            }
        }
        let mut slots = vec![0f32; n_tok * used * h];
        for (expert, e) in moe.experts.iter().zip(moe.local.clone()) {
            let Some(y) = self.routed_expert(expert, &routes[e], xn) else {
                continue;
            };
            for (yr, &(t, w)) in y.chunks_exact(h).zip(&routes[e]) {
                let j = chosen[t].iter().position(|&c| c == e).expect("routed");
                let slot = &mut slots[(t * used + j) * h..(t * used + j + 1) * h];
                for (o, v) in slot.iter_mut().zip(yr) {
                    *o = v * w;
                }
            }
        }
        let mut all = vec![0f32; slots.len() * world];
        comm.all_gather(&slots, &mut all)?;
        let n = routes.len();
        // The rank holding each expert, placed as the ranks loaded them.
        let owner: Vec<usize> = (0..world)
            .flat_map(|r| crate::shard::expert_share(n, world, r).map(move |_| r))
            .collect();
        for (t, o) in out.chunks_exact_mut(h).enumerate() {
            for (j, &e) in chosen[t].iter().enumerate() {
                let off = owner[e] * slots.len() + (t * used + j) * h;
                for (o, v) in o.iter_mut().zip(&all[off..off + h]) {
                    *o += v;
                }
            }
        }
        Ok(())
    }

    /// `expert` over the rows of `xn` its routes name (`None` when no
    /// token was routed to it).
    fn routed_expert(
        &self,
        expert: &Expert,
        routes: &[(usize, f32)],
        xn: &[f32],
    ) -> Option<Vec<f32>> {
        if routes.is_empty() {
            return None;
        }
        let h = self.config.hidden;
        let mut xs = vec![0f32; routes.len() * h];
        for (row, &(t, _)) in xs.chunks_exact_mut(h).zip(routes) {
            row.copy_from_slice(&xn[t * h..(t + 1) * h]);
        }
        Some(self.expert_forward(expert, &xs, routes.len()))
    }

    /// One SwiGLU expert over `tokens` rows of `x` (`tokens × hidden` out).
    fn expert_forward(&self, e: &Expert, x: &[f32], tokens: usize) -> Vec<f32> {
        let eff = e.gate_up.rows / 2;
        let mut gu = vec![0f32; tokens * 2 * eff];
        e.gate_up.apply(&self.pool, x, tokens, &mut gu);
        ops::silu_mul_rows(&mut gu, eff);
        let mut act = vec![0f32; tokens * eff];
        compact_activations(&gu, eff, &mut act);
        let mut y = vec![0f32; tokens * self.config.hidden];
        e.down.apply(&self.pool, &act, tokens, &mut y);
        y
    }

    /// Bytes of packed weights (what one decode step of a dense model reads).
    pub fn weight_bytes(&self) -> usize {
        self.matrices().map(|m| m.nbytes()).sum()
    }

    /// Bytes of packed weights one token reads: all of a dense model's; of
    /// a mixture of experts, the experts' bytes only in the share of experts
    /// a token uses (what a batch-1 decode step streams).
    pub fn active_weight_bytes(&self) -> usize {
        let experts: usize = self
            .layers
            .iter()
            .map(|l| match &l.ffn {
                Ffn::Moe(m) => {
                    let all: usize = m
                        .experts
                        .iter()
                        .flat_map(|e| e.gate_up.parts.iter().chain(&e.down.parts))
                        .map(|w| w.nbytes())
                        .sum();
                    all - all * m.used / m.router.rows
                }
                Ffn::Dense { .. } => 0,
            })
            .sum();
        self.weight_bytes() - experts
    }

    /// The KV block layout of this model (of this rank's layers and KV
    /// heads, on a shard) with `block_size` tokens per block.
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            dtype: KvDtype::F32,
            n_layers: self.layers.len(),
            n_kv_heads: self.heads.kv.len(),
            head_dim: self.config.head_dim,
            block_size,
        }
    }

    /// A KV pool big enough for `tokens` tokens in blocks of `block_size`
    /// (see [`Executor::pool_for_tokens`]).
    pub fn pool_for_tokens(&self, tokens: usize, block_size: usize) -> KvPool {
        Executor::pool_for_tokens(self, tokens, block_size)
    }

    /// Runs one step over a batch of sequences and returns, per sequence,
    /// the logits it asked for (`vocab` floats per token, row-major).
    ///
    /// Blocks for the new tokens are reserved here when the caller has not
    /// done so; if the pool cannot hold them, nothing is computed or written.
    pub fn forward(&self, pool: &mut KvPool, batch: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>> {
        self.forward_observed(pool, batch, &mut |_: LayerKv<'_>| {})
    }

    /// [`Model::forward`], calling `on_layer` as soon as each layer's keys and
    /// values of this step are in the pool, once per sequence: what a prefill
    /// worker streams to a decode worker while the next layers compute.
    ///
    /// Chunk edges: a chunk's positions `start..end` rarely align with
    /// blocks. The observer sees exactly those positions; the blocks that
    /// hold them are `blocks[start / bs ..= (end - 1) / bs]`, the first and
    /// last possibly partial. A block region carries its slot count on the
    /// wire, and a receiver writes only the slots it is sent, so a partial
    /// block completed by the next chunk is simply sent again, whole.
    pub fn forward_observed(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        on_layer: &mut dyn FnMut(LayerKv<'_>),
    ) -> Result<Vec<Vec<f32>>> {
        if self.shard.world() != 1 {
            return Err(EngineError::Unsupported(
                "a shard runs through its sharded executor, not alone".into(),
            ));
        }
        self.check_step(batch)?;
        Self::reserve_step(pool, batch)?;
        let rows = StepRows::of(batch);
        let mut x = self.embed(batch)?;
        self.run_layers(pool, batch, &rows, &mut x, 0, on_layer, None)?;
        for s in batch.iter_mut() {
            s.kv.len += s.tokens.len();
        }
        let want = rows.logit_rows(batch);
        let logits = self.head_logits(&x, &want)?;
        Ok(split_logits(batch, &logits, self.config.vocab_size))
    }

    /// Refuses a step that cannot run, before any cache is touched.
    pub(crate) fn check_step(&self, batch: &[SeqStep<'_>]) -> Result<()> {
        let adapters = self.adapters.read().unwrap_or_else(PoisonError::into_inner);
        check_step(
            &self.config,
            &|id| {
                (id as usize)
                    .checked_sub(1)
                    .and_then(|i| adapters.get(i))
                    .is_some_and(Option::is_some)
            },
            batch,
        )
    }

    /// Reserves every sequence's blocks for its new tokens, all or none.
    pub(crate) fn reserve_step(pool: &mut KvPool, batch: &mut [SeqStep<'_>]) -> Result<()> {
        let needed: usize = batch
            .iter()
            .map(|s| {
                pool.layout()
                    .blocks_for(s.kv.len + s.tokens.len())
                    .saturating_sub(s.kv.blocks.len())
            })
            .sum();
        if needed > pool.free_blocks() {
            return Err(EngineError::OutOfBlocks {
                needed,
                free: pool.free_blocks(),
            });
        }
        for s in batch.iter_mut() {
            pool.reserve(s.kv, s.tokens.len())?;
        }
        Ok(())
    }

    /// The embedding rows of the step's tokens (`tokens × hidden`).
    pub(crate) fn embed(&self, batch: &[SeqStep<'_>]) -> Result<Vec<f32>> {
        let h = self.config.hidden;
        let embd = self.embd.as_ref().ok_or_else(|| {
            EngineError::Unsupported("only the first pipeline stage embeds tokens".into())
        })?;
        let n_tok: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut x = vec![0f32; n_tok * h];
        for (row, tok) in x
            .chunks_exact_mut(h)
            .zip(batch.iter().flat_map(|s| s.tokens.iter()))
        {
            embd.row_into(*tok as usize, row);
        }
        Ok(x)
    }

    /// This rank's logits (its slice of the vocabulary) for `rows` of `x`.
    pub(crate) fn head_logits(&self, x: &[f32], rows: &[usize]) -> Result<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden;
        let head = self.head().ok_or_else(|| {
            EngineError::Unsupported("only the last pipeline stage computes logits".into())
        })?;
        let mut sel = vec![0f32; rows.len() * h];
        for (dst, &r) in sel.chunks_exact_mut(h).zip(rows) {
            ops::rms_norm(&x[r * h..(r + 1) * h], &self.out_norm, c.rms_eps, dst);
        }
        let mut logits = vec![0f32; rows.len() * head.rows()];
        if !rows.is_empty() {
            matmul(&self.pool, head, &sel, rows.len(), &mut logits);
        }
        Ok(logits)
    }

    /// Runs this stage's layers over `x` (`tokens × hidden`, updated in
    /// place), writing the step's keys and values into the pool. The
    /// sequences' `kv.len` is not advanced. `seq_offset` is added to the
    /// sequence index the observer sees (micro-batches of a larger step);
    /// `tp` all-reduces the row-parallel projections of a sharded rank.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_layers(
        &self,
        pool: &mut KvPool,
        batch: &[SeqStep<'_>],
        rows: &StepRows,
        x: &mut [f32],
        seq_offset: usize,
        on_layer: &mut dyn FnMut(LayerKv<'_>),
        mut tp: Option<&mut dyn Communicator>,
    ) -> Result<()> {
        let c = &self.config;
        let (h, hd) = (c.hidden, c.head_dim);
        let (nh, nkv) = (self.heads.q.len(), self.heads.kv.len());
        let (qd, kvd) = (nh * hd, nkv * hd);
        let qkv_rows = qd + 2 * kvd;
        let ffn = c.ffn / self.shard.tp;
        let layout = *pool.layout();
        let n_tok = rows.n_tok();
        let (tok_pos, starts) = (&rows.tok_pos, &rows.starts);
        let half = hd / 2;
        let mut cos = vec![0f32; n_tok * half];
        let mut sin = vec![0f32; n_tok * half];
        for (t, &p) in tok_pos.iter().enumerate() {
            self.rope.table(
                p,
                &mut cos[t * half..(t + 1) * half],
                &mut sin[t * half..(t + 1) * half],
            );
        }

        let mut xn = vec![0f32; n_tok * h];
        let mut qkv = vec![0f32; n_tok * qkv_rows];
        let mut attn = vec![0f32; n_tok * qd];
        let mut proj = vec![0f32; n_tok * h];
        // The dense FFN's buffers (a mixture of experts sizes its own).
        let dense_rows = if c.moe.is_none() { n_tok } else { 0 };
        let mut gate_up = vec![0f32; dense_rows * 2 * ffn];
        let mut act = vec![0f32; dense_rows * ffn];
        let scale = 1.0 / (hd as f32).sqrt();
        // Query heads per KV head on this rank (fewer than the model's when
        // a KV head is replicated across ranks).
        let n_rep = nh / nkv;

        // Token rows of the sequences that run with an adapter.
        let adapted: Vec<(std::ops::Range<usize>, u32)> = batch
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kv.adapter != 0)
            .map(|(si, s)| (starts[si]..starts[si] + s.tokens.len(), s.kv.adapter))
            .collect();
        let lora = |li: usize,
                    target: Target,
                    x: &[f32],
                    xs: usize,
                    out: &mut [f32],
                    os: usize,
                    off: usize| {
            if !adapted.is_empty() {
                self.add_lora(&adapted, li, target, x, xs, out, os, off);
            }
        };

        for (li, layer) in self.layers.iter().enumerate() {
            ops::rms_norm_rows(x, &layer.attn_norm, c.rms_eps, &mut xn);
            layer.qkv.apply(&self.pool, &xn, n_tok, &mut qkv);
            lora(li, Target::Q, &xn, h, &mut qkv, qkv_rows, 0);
            lora(li, Target::K, &xn, h, &mut qkv, qkv_rows, qd);
            lora(li, Target::V, &xn, h, &mut qkv, qkv_rows, qd + kvd);
            for (t, row) in qkv.chunks_exact_mut(qkv_rows).enumerate() {
                if let Some(b) = &layer.qkv_bias {
                    for (v, bi) in row.iter_mut().zip(b) {
                        *v += bi;
                    }
                }
                if let Some(n) = &layer.qk_norm {
                    let (q, k) = row[..qd + kvd].split_at_mut(qd);
                    for head in q.chunks_exact_mut(hd) {
                        ops::rms_norm_in_place(head, &n.q, c.rms_eps);
                    }
                    for head in k.chunks_exact_mut(hd) {
                        ops::rms_norm_in_place(head, &n.k, c.rms_eps);
                    }
                }
                let (cs, sn) = (
                    &cos[t * half..(t + 1) * half],
                    &sin[t * half..(t + 1) * half],
                );
                for head in row[..qd + kvd].chunks_exact_mut(hd) {
                    self.rope.apply(head, cs, sn);
                }
            }
            // Write the new keys and values into each sequence's blocks.
            for (si, s) in batch.iter().enumerate() {
                for i in 0..s.tokens.len() {
                    let row = &qkv[(starts[si] + i) * qkv_rows..(starts[si] + i + 1) * qkv_rows];
                    pool.write_token(li, s.kv, s.kv.len + i, &row[qd..qd + kvd], &row[qd + kvd..]);
                }
            }
            // Attention: tasks over (sequence, KV head, block of query tokens).
            const QBLOCK: usize = 16;
            let mut tasks = Vec::new();
            for (si, s) in batch.iter().enumerate() {
                for g in 0..nkv {
                    for b in (0..s.tokens.len()).step_by(QBLOCK) {
                        tasks.push((si, g, b, (b + QBLOCK).min(s.tokens.len())));
                    }
                }
            }
            let out = SharedOut(attn.as_mut_ptr());
            let qkv_ref = &qkv;
            let layer_kv = pool.layer(li);
            self.pool.run(tasks.len(), &|ti| {
                let (si, g, b0, b1) = tasks[ti];
                let s = &batch[si];
                let paged = ops::PagedKv {
                    layer: layer_kv,
                    blocks: &s.kv.blocks,
                    block_size: layout.block_size,
                    block_floats: layout.block_floats(),
                    k_off: layout.k_offset(g),
                    v_off: layout.v_offset(g),
                };
                let first = starts[si] + b0;
                let n_keys_first = tok_pos[first] + 1;
                let n_q = b1 - b0;
                let mut scores = vec![0f32; n_rep.min(4) * (n_keys_first + n_q)];
                // The group's query heads are adjacent: heads g*n_rep .. (g+1)*n_rep.
                let q_off = first * qkv_rows + g * n_rep * hd;
                let o_off = first * qd + g * n_rep * hd;
                // SAFETY: (token range, head group) pairs are disjoint across
                // tasks, and `attn` outlives the pool call.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(out.at(o_off), (n_q - 1) * qd + n_rep * hd)
                };
                ops::attend_many(
                    &qkv_ref[q_off..],
                    qkv_rows,
                    n_q,
                    hd,
                    n_rep,
                    &paged,
                    n_keys_first,
                    scale,
                    &mut scores,
                    o,
                    qd,
                );
            });
            for (si, s) in batch.iter().enumerate() {
                on_layer(LayerKv {
                    seq: seq_offset + si,
                    layer: li,
                    pool,
                    kv: s.kv,
                    positions: s.kv.len..s.kv.len + s.tokens.len(),
                });
            }
            layer
                .wo
                .apply(&self.pool, &attn, n_tok, &mut proj, &mut tp)?;
            lora(li, Target::O, &attn, qd, &mut proj, h, 0);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            ops::rms_norm_rows(x, &layer.ffn_norm, c.rms_eps, &mut xn);
            match &layer.ffn {
                Ffn::Dense {
                    gate_up: w_gate_up,
                    down,
                } => {
                    w_gate_up.apply(&self.pool, &xn, n_tok, &mut gate_up);
                    lora(li, Target::Gate, &xn, h, &mut gate_up, 2 * ffn, 0);
                    lora(li, Target::Up, &xn, h, &mut gate_up, 2 * ffn, ffn);
                    ops::silu_mul_rows(&mut gate_up, ffn);
                    compact_activations(&gate_up, ffn, &mut act);
                    down.apply(&self.pool, &act, n_tok, &mut proj, &mut tp)?;
                    lora(li, Target::Down, &act, ffn, &mut proj, h, 0);
                }
                Ffn::Moe(moe) => self.moe_ffn(moe, &xn, n_tok, &mut proj, &mut tp)?,
            }
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
        }
        Ok(())
    }
}

/// Copies the activated halves of `gate_up` rows (`2·ffn` wide, after
/// [`ops::silu_mul_rows`]) into `ffn`-wide rows for the down projection.
fn compact_activations(gate_up: &[f32], ffn: usize, act: &mut [f32]) {
    for (a, g) in act.chunks_exact_mut(ffn).zip(gate_up.chunks_exact(2 * ffn)) {
        a.copy_from_slice(&g[..ffn]);
    }
}

/// One layer's weights as the CPU holds them, for a backend that keeps its
/// own copy (the CUDA executor dequantises them once at load).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct LayerWeights<'a> {
    pub attn_norm: &'a [f32],
    /// Q, K and V stacked by rows (one or more matrices, in row order).
    pub qkv: &'a [PackedMatrix],
    pub qkv_bias: Option<&'a [f32]>,
    /// Per-head query and key norm weights (Qwen3), `head_dim` each.
    pub qk_norm: Option<(&'a [f32], &'a [f32])>,
    pub wo: &'a [PackedMatrix],
    pub ffn_norm: &'a [f32],
    /// Gate then up, stacked by rows.
    pub gate_up: &'a [PackedMatrix],
    pub down: &'a [PackedMatrix],
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Model {
    /// Layer `l`'s weights; an error on a tensor-parallel shard (whose
    /// row-parallel projections are cut into reduction chunks).
    pub(crate) fn layer_weights(&self, l: usize) -> Result<LayerWeights<'_>> {
        let layer = self.layers.get(l).ok_or_else(|| {
            EngineError::Unsupported(format!("layer {l} of {}", self.layers.len()))
        })?;
        fn whole(p: &RowProj) -> Result<&[PackedMatrix]> {
            match p {
                RowProj::Whole(p) => Ok(&p.parts),
                RowProj::Chunks(_) => Err(EngineError::Unsupported(
                    "a tensor-parallel shard's weights cannot be copied whole".into(),
                )),
            }
        }
        let Ffn::Dense { gate_up, down } = &layer.ffn else {
            return Err(EngineError::Unsupported(
                "mixture-of-experts models run on the CPU executor (--device cpu)".into(),
            ));
        };
        Ok(LayerWeights {
            attn_norm: &layer.attn_norm,
            qkv: &layer.qkv.parts,
            qkv_bias: layer.qkv_bias.as_deref(),
            qk_norm: layer.qk_norm.as_ref().map(|n| (&n.q[..], &n.k[..])),
            wo: whole(&layer.wo)?,
            ffn_norm: &layer.ffn_norm,
            gate_up: &gate_up.parts,
            down: whole(down)?,
        })
    }

    /// The token embedding (first pipeline stage only).
    pub(crate) fn embedding_matrix(&self) -> Option<&PackedMatrix> {
        self.embd.as_ref()
    }

    /// The LM head's matrix (the embedding itself when tied; last stage only).
    pub(crate) fn head_matrix(&self) -> Option<&PackedMatrix> {
        self.head()
    }

    /// The final norm's weights.
    pub(crate) fn output_norm(&self) -> &[f32] {
        &self.out_norm
    }

    /// RoPE inverse frequencies, one per pair of head dimensions (scaling
    /// and per-model frequency factors applied).
    pub(crate) fn rope_inv_freq(&self) -> &[f32] {
        &self.rope.inv_freq
    }
}

/// Refuses a step that cannot run under `c`, before any cache is touched
/// (every executor checks the same things).
/// `serves`: whether the executor holds LoRA adapter `id` (1 and up).
pub(crate) fn check_step(
    c: &ModelConfig,
    serves: &dyn Fn(u32) -> bool,
    batch: &[SeqStep<'_>],
) -> Result<()> {
    for s in batch {
        if s.kv.adapter != 0 && !serves(s.kv.adapter) {
            return Err(EngineError::Unsupported(format!(
                "LoRA adapter {} is not held by this executor",
                s.kv.adapter
            )));
        }
        if matches!(s.logits, Logits::Greedy | Logits::TopK(_)) && c.vocab_size > MAX_ID_VOCAB {
            return Err(EngineError::Unsupported(format!(
                "greedy and top-k rows carry token ids as f32: a vocabulary of {} is beyond {MAX_ID_VOCAB}",
                c.vocab_size
            )));
        }
        if let Logits::TopK(k) = s.logits {
            if k == 0 || k > crate::sampler::MAX_DEVICE_TOP_K {
                return Err(EngineError::Unsupported(format!(
                    "top-k rows of {k}: 1 to {} are served",
                    crate::sampler::MAX_DEVICE_TOP_K
                )));
            }
        }
        if s.tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if s.kv.len + s.tokens.len() > c.context_length {
            return Err(EngineError::ContextOverflow {
                prompt: s.kv.len,
                requested: s.tokens.len(),
                context: c.context_length,
            });
        }
        if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::BadToken {
                id: bad,
                vocab: c.vocab_size,
            });
        }
    }
    Ok(())
}

/// For an executor whose KV lives elsewhere (other ranks, the device): the
/// blocks each sequence of a step wrote (`before[i]` = its length before
/// the step), numbered `0..` in the order of the returned ids, and each
/// sequence's view of them in a pool that holds only those blocks.
pub(crate) fn written_blocks(
    batch: &[SeqStep<'_>],
    before: &[usize],
    block_size: usize,
) -> (Vec<BlockId>, Vec<SeqKv>) {
    let after: Vec<usize> = batch.iter().map(|q| q.kv.len).collect();
    written_blocks_between(batch, before, &after, block_size)
}

/// [`written_blocks`] for positions `before[i]..after[i]` of sequence `i`
/// (its blocks reserved), before or after the step that writes them.
pub(crate) fn written_blocks_between(
    batch: &[SeqStep<'_>],
    before: &[usize],
    after: &[usize],
    block_size: usize,
) -> (Vec<BlockId>, Vec<SeqKv>) {
    let mut ids = Vec::new();
    let mut views = Vec::with_capacity(batch.len());
    for ((q, &p0), &p1) in batch.iter().zip(before).zip(after) {
        let written = p0 / block_size..=(p1 - 1) / block_size;
        let mut blocks = vec![0; q.kv.blocks.len()];
        for (slot, &b) in blocks[written.clone()]
            .iter_mut()
            .zip(&q.kv.blocks[written])
        {
            *slot = ids.len() as BlockId;
            ids.push(b);
        }
        views.push(SeqKv {
            blocks,
            len: p1,
            adapter: q.kv.adapter,
        });
    }
    (ids, views)
}

/// Shows `on_layer` every layer of the KV a step wrote, from `pool` holding
/// the blocks [`written_blocks`] listed, through its `views`.
pub(crate) fn show_written(
    on_layer: &mut dyn FnMut(LayerKv<'_>),
    pool: &KvPool,
    views: &[SeqKv],
    before: &[usize],
    n_layers: usize,
) {
    for layer in 0..n_layers {
        for (si, view) in views.iter().enumerate() {
            on_layer(LayerKv {
                seq: si,
                layer,
                pool,
                kv: view,
                positions: before[si]..view.len,
            });
        }
    }
}
