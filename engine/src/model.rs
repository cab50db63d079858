//! The transformer forward pass (llama family and qwen2) over a batch of
//! sequences, each bringing any number of new tokens.
//!
//! One call runs every new token of every sequence through each layer, so
//! each weight matrix is read once per step for the whole batch. Every
//! output is computed in an order that depends only on that token's own
//! inputs (see `cpu` and `ops`), so a sequence gets the same bits alone or
//! in a batch, in one prompt chunk or many.

use tandem_model::config::{ModelConfig, RopeScaling, RopeStyle};
use tandem_model::quant::GgmlType;
use tandem_model::weights::{ModelSource, TensorRef};

use crate::cpu::{matmul, ExpandWeights, PackedMatrix, ThreadPool};
use crate::error::{EngineError, Result};
use crate::kv::{KvDtype, KvLayout, KvPool, SeqKv};
use crate::ops;

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

    fn nbytes(&self) -> usize {
        self.parts.iter().map(|p| p.nbytes()).sum()
    }

    fn matrices_mut(&mut self) -> impl Iterator<Item = &mut PackedMatrix> {
        self.parts.iter_mut()
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Proj,
    qkv_bias: Option<Vec<f32>>,
    wo: Proj,
    ffn_norm: Vec<f32>,
    gate_up: Proj,
    down: Proj,
}

/// Which logits a sequence wants from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    /// The last new token's (the next-token distribution).
    Last,
    /// Every new token's (scoring a prompt).
    All,
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

/// A loaded model, ready to run on the CPU.
pub struct Model {
    pub config: ModelConfig,
    embd: PackedMatrix,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    lm_head: Option<PackedMatrix>,
    rope: Rope,
    pool: ThreadPool,
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
        let mut m = Self::load_packed(src, threads)?;
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

    /// The matrices the forward pass multiplies by (layers, then the LM head).
    fn matrices_mut(&mut self) -> impl Iterator<Item = &mut PackedMatrix> {
        let head = match &mut self.lm_head {
            Some(h) => h,
            None => &mut self.embd,
        };
        self.layers
            .iter_mut()
            .flat_map(|l| {
                l.qkv
                    .matrices_mut()
                    .chain(l.wo.matrices_mut())
                    .chain(l.gate_up.matrices_mut())
                    .chain(l.down.matrices_mut())
            })
            .chain(std::iter::once(head))
    }

    /// Bytes held by f32 weight copies (0 when none were made).
    pub fn f32_copy_bytes(&self) -> usize {
        let head = self.lm_head.as_ref().unwrap_or(&self.embd);
        self.layers
            .iter()
            .flat_map(|l| {
                l.qkv
                    .parts
                    .iter()
                    .chain(&l.wo.parts)
                    .chain(&l.gate_up.parts)
                    .chain(&l.down.parts)
            })
            .chain(std::iter::once(head))
            .filter(|w| w.has_f32_copy())
            .map(|w| w.expanded_nbytes())
            .sum()
    }

    fn load_packed(src: &ModelSource, threads: usize) -> Result<Self> {
        let cfg = src.config.clone();
        let (h, qd, kvd, ffn) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
        let embd =
            PackedMatrix::from_tensor(&src.tensor("token_embd.weight", &[cfg.vocab_size, h])?)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let name = |s: &str| format!("blk.{l}.{s}");
            let t = |s: &str, shape: &[usize]| src.tensor(&name(s), shape);
            let vec = |s: &str, n: usize| -> Result<Vec<f32>> { f32_vector(t(s, &[n])?, &name(s)) };
            let qkv_bias = if cfg.qkv_bias {
                let mut b = vec("attn_q.bias", qd)?;
                b.extend(vec("attn_k.bias", kvd)?);
                b.extend(vec("attn_v.bias", kvd)?);
                Some(b)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vec("attn_norm.weight", h)?,
                qkv: Proj::new(&[
                    t("attn_q.weight", &[qd, h])?,
                    t("attn_k.weight", &[kvd, h])?,
                    t("attn_v.weight", &[kvd, h])?,
                ])?,
                qkv_bias,
                wo: Proj::new(&[t("attn_output.weight", &[h, qd])?])?,
                ffn_norm: vec("ffn_norm.weight", h)?,
                gate_up: Proj::new(&[
                    t("ffn_gate.weight", &[ffn, h])?,
                    t("ffn_up.weight", &[ffn, h])?,
                ])?,
                down: Proj::new(&[t("ffn_down.weight", &[h, ffn])?])?,
            });
        }
        let out_norm = f32_vector(
            src.tensor("output_norm.weight", &[h])?,
            "output_norm.weight",
        )?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(PackedMatrix::from_tensor(
                &src.tensor("output.weight", &[cfg.vocab_size, h])?,
            )?)
        };
        let freq_factors = match src.get("rope_freqs.weight") {
            Some(t) => Some(f32_vector(t, "rope_freqs.weight")?),
            None => None,
        };
        let rope = Rope::new(&cfg, freq_factors);
        Ok(Self {
            config: cfg,
            embd,
            layers,
            out_norm,
            lm_head,
            rope,
            pool: ThreadPool::new(threads),
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Bytes of packed weights (what one decode step reads).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.nbytes() + l.wo.nbytes() + l.gate_up.nbytes() + l.down.nbytes())
            .sum();
        layers + self.lm_head.as_ref().unwrap_or(&self.embd).nbytes()
    }

    /// The KV block layout of this model with `block_size` tokens per block.
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            dtype: KvDtype::F32,
            n_layers: self.config.n_layers,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            block_size,
        }
    }

    /// A KV pool big enough for `tokens` tokens in blocks of `block_size`.
    pub fn pool_for_tokens(&self, tokens: usize, block_size: usize) -> KvPool {
        let layout = self.kv_layout(block_size);
        KvPool::new(layout, layout.blocks_for(tokens).max(1))
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
        let c = &self.config;
        let (h, hd, nh, nkv) = (c.hidden, c.head_dim, c.n_heads, c.n_kv_heads);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let qkv_rows = qd + 2 * kvd;
        // Validate everything before touching any cache.
        for s in batch.iter() {
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
        let layout = *pool.layout();
        let n_tok: usize = batch.iter().map(|s| s.tokens.len()).sum();
        // Per token: which sequence, and its position.
        let mut tok_pos = Vec::with_capacity(n_tok);
        let mut starts = Vec::with_capacity(batch.len());
        for s in batch.iter() {
            starts.push(tok_pos.len());
            for i in 0..s.tokens.len() {
                tok_pos.push(s.kv.len + i);
            }
        }
        let mut x = vec![0f32; n_tok * h];
        for (row, tok) in x
            .chunks_exact_mut(h)
            .zip(batch.iter().flat_map(|s| s.tokens.iter()))
        {
            self.embd.row_into(*tok as usize, row);
        }
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
        let mut gate_up = vec![0f32; n_tok * 2 * c.ffn];
        let mut act = vec![0f32; n_tok * c.ffn];
        let scale = 1.0 / (hd as f32).sqrt();
        let n_rep = nh / nkv;

        for (li, layer) in self.layers.iter().enumerate() {
            ops::rms_norm_rows(&x, &layer.attn_norm, c.rms_eps, &mut xn);
            layer.qkv.apply(&self.pool, &xn, n_tok, &mut qkv);
            for (t, row) in qkv.chunks_exact_mut(qkv_rows).enumerate() {
                if let Some(b) = &layer.qkv_bias {
                    for (v, bi) in row.iter_mut().zip(b) {
                        *v += bi;
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
            let batch_ref: &[SeqStep<'_>] = batch;
            let qkv_ref = &qkv;
            let starts_ref = &starts;
            let tokpos = &tok_pos;
            let layer_kv = pool.layer(li);
            self.pool.run(tasks.len(), &|ti| {
                let (si, g, b0, b1) = tasks[ti];
                let s = &batch_ref[si];
                let paged = ops::PagedKv {
                    layer: layer_kv,
                    blocks: &s.kv.blocks,
                    block_size: layout.block_size,
                    block_floats: layout.block_floats(),
                    k_off: layout.k_offset(g),
                    v_off: layout.v_offset(g),
                };
                let first = starts_ref[si] + b0;
                let n_keys_first = tokpos[first] + 1;
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
                    seq: si,
                    layer: li,
                    pool,
                    kv: s.kv,
                    positions: s.kv.len..s.kv.len + s.tokens.len(),
                });
            }
            layer.wo.apply(&self.pool, &attn, n_tok, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            ops::rms_norm_rows(&x, &layer.ffn_norm, c.rms_eps, &mut xn);
            layer.gate_up.apply(&self.pool, &xn, n_tok, &mut gate_up);
            ops::silu_mul_rows(&mut gate_up, c.ffn);
            // Compact the activated halves into `ffn` columns for the down projection.
            for (a, g) in act
                .chunks_exact_mut(c.ffn)
                .zip(gate_up.chunks_exact(2 * c.ffn))
            {
                a.copy_from_slice(&g[..c.ffn]);
            }
            layer.down.apply(&self.pool, &act, n_tok, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
        }
        for s in batch.iter_mut() {
            s.kv.len += s.tokens.len();
        }

        // Final norm and LM head, only for the rows that want logits.
        let mut rows = Vec::new();
        for (si, s) in batch.iter().enumerate() {
            match s.logits {
                Logits::None => {}
                Logits::Last => rows.push(starts[si] + s.tokens.len() - 1),
                Logits::All => rows.extend(starts[si]..starts[si] + s.tokens.len()),
            }
        }
        let mut sel = vec![0f32; rows.len() * h];
        for (dst, &r) in sel.chunks_exact_mut(h).zip(&rows) {
            ops::rms_norm(&x[r * h..(r + 1) * h], &self.out_norm, c.rms_eps, dst);
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embd);
        let mut logits = vec![0f32; rows.len() * c.vocab_size];
        if !rows.is_empty() {
            matmul(&self.pool, head, &sel, rows.len(), &mut logits);
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut off = 0;
        for s in batch.iter() {
            let n = match s.logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => s.tokens.len(),
            };
            out.push(logits[off * c.vocab_size..(off + n) * c.vocab_size].to_vec());
            off += n;
        }
        Ok(out)
    }
}
