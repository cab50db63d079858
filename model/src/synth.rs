//! Seeded synthetic checkpoints for any supported architecture and shape.
//!
//! Tests, fixtures and large-shape benchmarks need models whose exact bytes
//! we control and that we can make at any size (a llama3-8b shape without
//! downloading 16 GB). [`synth`] writes one, either as a GGUF file or as a
//! Hugging Face directory, from a [`SynthSpec`].
//!
//! ## What the weights are
//!
//! Every value is a pure function of `(seed, Hugging Face tensor name,
//! element index in the Hugging Face layout)` through a counter-based
//! generator (splitmix64), so:
//! - the same spec always gives the same bytes, on any machine and thread count;
//! - a GGUF and a safetensors checkpoint with the same seed hold the *same
//!   model* (up to the storage type's rounding), which lets one reference
//!   output cover both formats;
//! - any row can be generated on its own, so large shapes are written
//!   streaming, a few rows at a time, on all cores, never holding a whole
//!   tensor (let alone the model) in memory.
//!
//! Values are scaled like a trained model so activations stay sane through
//! the layers and greedy decoding produces varied tokens: matrices are
//! normal-ish (sum of four uniforms) with std `1/sqrt(fan_in)`, except Q and
//! K with `2/sqrt(fan_in)` (attention scores of std ~4: peaked enough that
//! the context, not just the current token, decides the next one); the
//! token embedding has std 0.02 (small next to what the layers add, so a
//! tied LM head does not keep echoing the current token); RMSNorm weights
//! are `1 ± 0.05`; qwen2's q/k/v biases have std 0.05. Measured with
//! `reference/synth_reference.py` on `tiny`: 16 greedy steps give 11-16
//! distinct tokens per prompt and almost no immediate repeats (with the
//! plain `1/sqrt(fan_in)` Q/K and a 0.05 embedding, half the prompts got
//! stuck on one token).
//!
//! ## GGUF
//!
//! Metadata keys are the ones llama.cpp's converter writes. Matrices are
//! stored in the requested type, 1-D tensors (norms, biases) in F32. The
//! token embedding uses the requested type, except Q8_0 under the 4-bit
//! legacy types (as the default SmolLM2 Q4_1 file does). A matrix whose
//! rows are not a whole number of blocks of the requested type falls back
//! to Q8_0, or to F16 when rows are not a multiple of 32 either, as
//! llama.cpp's quantiser also falls back.
//!
//! For llama, the rows of Q and K are stored in llama.cpp's converter
//! order: inside each head, Hugging Face row `a * head_dim/2 + i` (a ∈ {0,1})
//! becomes GGUF row `2 * i + a`, so the GGUF is meant to be run with the
//! interleaved ("normal") RoPE, and loaders that undo the permutation
//! (transformers) get the Hugging Face model back. qwen2 GGUFs are not permuted.
//!
//! The quantisers here are simple and valid, not llama.cpp's optimising ones:
//! they round to the nearest level of a min/max (or abs-max) grid.
//!
//! ## Hugging Face
//!
//! `config.json`, `generation_config.json`, `model.safetensors` (one shard)
//! or `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`,
//! `tokenizer.json` (built with the `tokenizers` crate) and `tokenizer_config.json`.
//!
//! ## Tokenizers
//!
//! The vocabulary has exactly `vocab_size` tokens. [`SynthTokenizer::Gpt2`]:
//! `<|endoftext|>` (0), `<|im_start|>` (1, BOS), `<|im_end|>` (2, EOS), the
//! 256 byte tokens in GPT-2's byte-to-unicode form, then merges of common
//! English letter pairs and words, then systematic letter extensions until
//! the vocabulary is full; ChatML chat template. [`SynthTokenizer::SentencePiece`]:
//! `<unk>`, `<s>` (BOS), `</s>` (EOS), `<0x00>`..`<0xFF>`, `▁`, `a`..`z`, then
//! `▁`-prefixed word pieces built the same way, with decreasing scores.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use crate::config::Arch;
use crate::config::{ModelConfig, MoeConfig, RopeScaling, RopeStyle};
use crate::error::{ModelError, Result};
use crate::gguf::MetaValue;
use crate::quant::GgmlType;

// ---------------------------------------------------------------------------
// Spec
// ---------------------------------------------------------------------------

/// Everything that decides a synthetic checkpoint's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    pub arch: Arch,
    pub shape: SynthShape,
    pub seed: u64,
    pub format: SynthFormat,
    pub tokenizer: SynthTokenizer,
}

/// The model's dimensions. Presets by name: [`SynthShape::preset`].
#[derive(Debug, Clone, PartialEq)]
pub struct SynthShape {
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The tokenizer is generated with exactly this many tokens.
    pub vocab_size: usize,
    pub context_length: usize,
    /// No separate LM head: it reuses the token embedding.
    pub tie_embeddings: bool,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Mixture-of-experts FFNs in place of the dense ones: a Mixtral
    /// checkpoint for [`Arch::Llama`], Qwen3-MoE for [`Arch::Qwen3`],
    /// Qwen2-MoE (with a shared expert) for [`Arch::Qwen2`].
    pub moe: Option<MoeConfig>,
}

impl SynthShape {
    /// Names accepted by [`SynthShape::preset`].
    pub const PRESETS: &'static [&'static str] = &[
        "tiny",
        "tiny-mqa",
        "tiny-moe",
        "tiny-moe-shared",
        "smollm2-135m",
        "moe-8x135m",
        "llama3-8b",
    ];

    /// A named shape:
    /// - `tiny`: 2 layers, hidden 256, FFN 512, 4 heads / 2 KV heads of 64,
    ///   vocab 384, context 512, tied embeddings (a few MB: unit tests, fixtures);
    /// - `tiny-mqa`: `tiny` with one KV head and a separate LM head;
    /// - `tiny-moe`: `tiny` with 4 experts of FFN 256 per layer, 2 used;
    /// - `tiny-moe-shared`: 4 experts of FFN 128, 2 used, their weights not
    ///   renormalised, and a shared expert of FFN 256 (Qwen2-MoE's layout);
    /// - `smollm2-135m`: the default model's real shape;
    /// - `moe-8x135m`: `smollm2-135m` with 8 experts of half its FFN per
    ///   layer, 2 used (a token computes what a dense `smollm2-135m` token
    ///   does, from four times the FFN weights);
    /// - `llama3-8b`: Llama 3 8B (32 layers, 4096, 14336, 32/8 heads of 128,
    ///   vocab 128256, context 8192, RoPE base 500000).
    pub fn preset(name: &str) -> Result<Self> {
        let tiny = SynthShape {
            n_layers: 2,
            hidden: 256,
            ffn: 512,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            vocab_size: 384,
            context_length: 512,
            tie_embeddings: true,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            moe: None,
        };
        let smollm2 = SynthShape {
            n_layers: 30,
            hidden: 576,
            ffn: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            context_length: 8192,
            tie_embeddings: true,
            rope_theta: 100000.0,
            rms_eps: 1e-5,
            moe: None,
        };
        Ok(match name {
            "tiny" => tiny,
            "tiny-mqa" => SynthShape {
                n_kv_heads: 1,
                tie_embeddings: false,
                ..tiny
            },
            "tiny-moe" => SynthShape {
                ffn: 256,
                moe: Some(MoeConfig {
                    experts: 4,
                    experts_used: 2,
                    expert_ffn: 256,
                    norm_topk_prob: true,
                    shared_expert_ffn: None,
                }),
                ..tiny
            },
            "tiny-moe-shared" => SynthShape {
                ffn: 256,
                moe: Some(MoeConfig {
                    experts: 4,
                    experts_used: 2,
                    expert_ffn: 128,
                    norm_topk_prob: false,
                    shared_expert_ffn: Some(256),
                }),
                ..tiny
            },
            "smollm2-135m" => smollm2,
            "moe-8x135m" => SynthShape {
                ffn: smollm2.ffn / 2,
                moe: Some(MoeConfig {
                    experts: 8,
                    experts_used: 2,
                    expert_ffn: smollm2.ffn / 2,
                    norm_topk_prob: true,
                    shared_expert_ffn: None,
                }),
                ..smollm2
            },
            "llama3-8b" => SynthShape {
                n_layers: 32,
                hidden: 4096,
                ffn: 14336,
                n_heads: 32,
                n_kv_heads: 8,
                head_dim: 128,
                vocab_size: 128256,
                context_length: 8192,
                tie_embeddings: false,
                rope_theta: 500000.0,
                rms_eps: 1e-5,
                moe: None,
            },
            other => {
                return Err(ModelError::Config(format!(
                    "unknown synthetic shape '{other}' (known: {})",
                    Self::PRESETS.join(", ")
                )))
            }
        })
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthFormat {
    /// One `.gguf` file; matrices in `weight_type`, norms and biases F32.
    Gguf { weight_type: GgmlType },
    /// A Hugging Face directory; every tensor in `dtype` (F32, F16 or BF16),
    /// split over `shards` files (1 = a single `model.safetensors`).
    Safetensors { dtype: GgmlType, shards: usize },
}

/// Which kind of tokenizer the checkpoint carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthTokenizer {
    /// GPT-2-style byte-level BPE with ChatML control tokens (SmolLM2, Qwen2).
    Gpt2,
    /// SentencePiece/llama-style pieces with byte fallback.
    SentencePiece,
}

impl SynthTokenizer {
    /// `gpt2` (or `bpe`), `sentencepiece` (or `spm`, `llama`).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "gpt2" | "bpe" => Ok(SynthTokenizer::Gpt2),
            "sentencepiece" | "spm" | "llama" => Ok(SynthTokenizer::SentencePiece),
            other => Err(ModelError::Config(format!(
                "unknown synthetic tokenizer '{other}' (known: gpt2, sentencepiece)"
            ))),
        }
    }
}

/// Parses a tensor type name as users write it: `q4_k`, `Q4_K`, `q4k`, `bf16`, ...
pub fn parse_ggml_type(name: &str) -> Result<GgmlType> {
    let n: String = name
        .to_ascii_uppercase()
        .chars()
        .filter(|c| *c != '_')
        .collect();
    Ok(match n.as_str() {
        "F32" => GgmlType::F32,
        "F16" => GgmlType::F16,
        "BF16" => GgmlType::BF16,
        "Q80" => GgmlType::Q8_0,
        "Q40" => GgmlType::Q4_0,
        "Q41" => GgmlType::Q4_1,
        "Q4K" => GgmlType::Q4K,
        "Q5K" => GgmlType::Q5K,
        "Q6K" => GgmlType::Q6K,
        _ => return Err(ModelError::UnsupportedType(name.to_string())),
    })
}

impl SynthSpec {
    /// The config a reader should derive from the written checkpoint.
    pub fn model_config(&self) -> ModelConfig {
        let s = &self.shape;
        let gguf = matches!(self.format, SynthFormat::Gguf { .. });
        ModelConfig {
            arch: self.arch,
            n_layers: s.n_layers,
            hidden: s.hidden,
            ffn: s.ffn,
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            head_dim: s.head_dim,
            rope_theta: s.rope_theta,
            rope_style: if gguf && self.arch == Arch::Llama {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Neox
            },
            rope_scaling: RopeScaling::None,
            rms_eps: s.rms_eps,
            vocab_size: s.vocab_size,
            context_length: s.context_length,
            tie_embeddings: s.tie_embeddings,
            qkv_bias: self.arch == Arch::Qwen2,
            qk_norm: self.arch == Arch::Qwen3,
            moe: s.moe,
        }
    }

    /// `general.architecture` of the GGUF: llama.cpp names Qwen3-MoE
    /// apart, and Mixtral is a llama with experts.
    fn gguf_arch(&self) -> &'static str {
        match (self.arch, self.shape.moe.is_some()) {
            (Arch::Qwen2, true) => "qwen2moe",
            (Arch::Qwen3, true) => "qwen3moe",
            (a, _) => a.name(),
        }
    }

    /// Checks the spec before anything is written.
    pub fn validate(&self) -> Result<()> {
        self.model_config().validate()?;
        if let Some(m) = &self.shape.moe {
            // What each family's files can say: Qwen2-MoE always has a
            // shared expert and llama.cpp reads it without renormalising;
            // Mixtral and Qwen3-MoE have none and renormalise.
            let fits = match self.arch {
                Arch::Qwen2 => m.shared_expert_ffn.is_some() && !m.norm_topk_prob,
                Arch::Llama | Arch::Qwen3 => m.shared_expert_ffn.is_none() && m.norm_topk_prob,
            };
            if !fits {
                return Err(ModelError::Config(format!(
                    "this mixture of experts is not one a {} checkpoint can describe (Mixtral and Qwen3-MoE: renormalised, no shared expert; Qwen2-MoE: a shared expert, not renormalised)",
                    self.arch.name()
                )));
            }
            if self.arch == Arch::Llama && m.expert_ffn != self.shape.ffn {
                return Err(ModelError::Config(
                    "a Mixtral checkpoint's FFN size is its experts'".into(),
                ));
            }
        }
        let min = min_vocab(self.tokenizer);
        if self.shape.vocab_size < min {
            return Err(ModelError::Config(format!(
                "vocab size {} is below the {min} tokens the {:?} synthetic tokenizer needs",
                self.shape.vocab_size, self.tokenizer
            )));
        }
        match self.format {
            SynthFormat::Gguf { .. } => {}
            SynthFormat::Safetensors { dtype, shards } => {
                if !dtype.is_float() {
                    return Err(ModelError::UnsupportedType(format!(
                        "{} in safetensors (use F32, F16 or BF16)",
                        dtype.name()
                    )));
                }
                let n = plan(self).len();
                if shards == 0 || shards > n {
                    return Err(ModelError::Config(format!(
                        "shards must be between 1 and the number of tensors ({n}), got {shards}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Bytes of tensor data the checkpoint will hold (headers not counted).
    pub fn estimated_bytes(&self) -> Result<u64> {
        let mut total = 0u64;
        for t in plan(self) {
            total += t.ty.bytes_for(t.n_elements())? as u64;
        }
        Ok(total)
    }
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

/// Writes the checkpoint: a `.gguf` file at `out`, or a Hugging Face
/// directory at `out` (created if needed; earlier weight files in it are
/// replaced). A GGUF is written to a temporary name and renamed at the end,
/// so an interrupted run never leaves a valid-looking partial file.
pub fn synth(spec: &SynthSpec, out: &Path) -> Result<()> {
    spec.validate()?;
    let vocab = build_vocab(spec.tokenizer, spec.shape.vocab_size)?;
    match spec.format {
        SynthFormat::Gguf { .. } => write_gguf_file(spec, &vocab, out),
        SynthFormat::Safetensors { dtype, shards } => {
            write_hf_dir(spec, &vocab, dtype, shards, out)
        }
    }
}

// ---------------------------------------------------------------------------
// Tensor plan and value generation
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// Normal-ish with this standard deviation.
    Normal(f32),
    /// RMSNorm weight: 1 + small noise.
    Norm,
}

/// One tensor to write.
#[derive(Debug, Clone)]
struct Planned {
    hf: String,
    gguf: String,
    /// Row-major (`[rows, cols]` or `[n]`), as in the Hugging Face file.
    shape: Vec<usize>,
    init: Init,
    /// Storage type in this format.
    ty: GgmlType,
    /// GGUF llama Q/K: rows stored in llama.cpp's interleaved-RoPE order;
    /// the value is the head dimension.
    permute_head_dim: Option<usize>,
    /// A GGUF's stacked experts (`shape` is `[experts, rows, cols]`): the
    /// Hugging Face name of each expert's matrix, whose values its slice
    /// holds (empty for any other tensor).
    stack: Vec<String>,
}

impl Planned {
    fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
    fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            [e, r, c] => (e * r, *c),
            _ => (1, self.n_elements()),
        }
    }
}

/// Storage type of a matrix in a GGUF whose weights are `want`, falling
/// back when a row is not a whole number of blocks.
fn gguf_matrix_type(want: GgmlType, cols: usize) -> GgmlType {
    if cols.is_multiple_of(want.block_elems()) {
        want
    } else if !want.is_float() && cols.is_multiple_of(32) {
        GgmlType::Q8_0
    } else {
        GgmlType::F16
    }
}

fn plan(spec: &SynthSpec) -> Vec<Planned> {
    let s = &spec.shape;
    let (gguf, weight_ty) = match spec.format {
        SynthFormat::Gguf { weight_type } => (true, weight_type),
        SynthFormat::Safetensors { dtype, .. } => (false, dtype),
    };
    let matrix_ty = |cols: usize| {
        if gguf {
            gguf_matrix_type(weight_ty, cols)
        } else {
            weight_ty
        }
    };
    let vec_ty = if gguf { GgmlType::F32 } else { weight_ty };
    let q_dim = s.n_heads * s.head_dim;
    let kv_dim = s.n_kv_heads * s.head_dim;
    let permute = gguf && spec.arch == Arch::Llama;
    let mut v = Vec::new();

    let embd_ty = if gguf {
        let want = match weight_ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => GgmlType::Q8_0,
            t => t,
        };
        gguf_matrix_type(want, s.hidden)
    } else {
        weight_ty
    };
    v.push(Planned {
        hf: "model.embed_tokens.weight".into(),
        gguf: "token_embd.weight".into(),
        shape: vec![s.vocab_size, s.hidden],
        init: Init::Normal(0.02),
        ty: embd_ty,
        permute_head_dim: None,
        stack: vec![],
    });
    for l in 0..s.n_layers {
        let mut push = |g: &str, h: &str, shape: Vec<usize>, init: Init, perm: bool| {
            let ty = if shape.len() == 1 {
                vec_ty
            } else {
                matrix_ty(shape[1])
            };
            v.push(Planned {
                hf: format!("model.layers.{l}.{h}"),
                gguf: format!("blk.{l}.{g}"),
                shape,
                init,
                ty,
                permute_head_dim: (perm && permute).then_some(s.head_dim),
                stack: vec![],
            });
        };
        let fan = |n: usize| Init::Normal(1.0 / (n as f32).sqrt());
        let qk = Init::Normal(2.0 / (s.hidden as f32).sqrt());
        let bias = Init::Normal(0.05);
        push(
            "attn_norm.weight",
            "input_layernorm.weight",
            vec![s.hidden],
            Init::Norm,
            false,
        );
        push(
            "attn_q.weight",
            "self_attn.q_proj.weight",
            vec![q_dim, s.hidden],
            qk,
            true,
        );
        push(
            "attn_k.weight",
            "self_attn.k_proj.weight",
            vec![kv_dim, s.hidden],
            qk,
            true,
        );
        push(
            "attn_v.weight",
            "self_attn.v_proj.weight",
            vec![kv_dim, s.hidden],
            fan(s.hidden),
            false,
        );
        if spec.arch == Arch::Qwen2 {
            push(
                "attn_q.bias",
                "self_attn.q_proj.bias",
                vec![q_dim],
                bias,
                false,
            );
            push(
                "attn_k.bias",
                "self_attn.k_proj.bias",
                vec![kv_dim],
                bias,
                false,
            );
            push(
                "attn_v.bias",
                "self_attn.v_proj.bias",
                vec![kv_dim],
                bias,
                false,
            );
        }
        if spec.arch == Arch::Qwen3 {
            push(
                "attn_q_norm.weight",
                "self_attn.q_norm.weight",
                vec![s.head_dim],
                Init::Norm,
                false,
            );
            push(
                "attn_k_norm.weight",
                "self_attn.k_norm.weight",
                vec![s.head_dim],
                Init::Norm,
                false,
            );
        }
        push(
            "attn_output.weight",
            "self_attn.o_proj.weight",
            vec![s.hidden, q_dim],
            fan(q_dim),
            false,
        );
        push(
            "ffn_norm.weight",
            "post_attention_layernorm.weight",
            vec![s.hidden],
            Init::Norm,
            false,
        );
        let Some(moe) = &s.moe else {
            push(
                "ffn_gate.weight",
                "mlp.gate_proj.weight",
                vec![s.ffn, s.hidden],
                fan(s.hidden),
                false,
            );
            push(
                "ffn_up.weight",
                "mlp.up_proj.weight",
                vec![s.ffn, s.hidden],
                fan(s.hidden),
                false,
            );
            push(
                "ffn_down.weight",
                "mlp.down_proj.weight",
                vec![s.hidden, s.ffn],
                fan(s.ffn),
                false,
            );
            continue;
        };
        // Mixtral's names, or Qwen-MoE's (see `weights::MOE_NAMES`).
        let mixtral = spec.arch == Arch::Llama;
        push(
            "ffn_gate_inp.weight",
            if mixtral {
                "block_sparse_moe.gate.weight"
            } else {
                "mlp.gate.weight"
            },
            vec![moe.experts, s.hidden],
            fan(s.hidden),
            false,
        );
        let eff = moe.expert_ffn;
        for (g, hf, shape, init) in [
            (
                "ffn_gate",
                if mixtral { "w1" } else { "gate_proj" },
                [eff, s.hidden],
                fan(s.hidden),
            ),
            (
                "ffn_up",
                if mixtral { "w3" } else { "up_proj" },
                [eff, s.hidden],
                fan(s.hidden),
            ),
            (
                "ffn_down",
                if mixtral { "w2" } else { "down_proj" },
                [s.hidden, eff],
                fan(eff),
            ),
        ] {
            let hf_of = |e: usize| {
                if mixtral {
                    format!("block_sparse_moe.experts.{e}.{hf}.weight")
                } else {
                    format!("mlp.experts.{e}.{hf}.weight")
                }
            };
            if gguf {
                // llama.cpp's current layout: one 3-D tensor per projection.
                v.push(Planned {
                    hf: format!("model.layers.{l}.{}", hf_of(0)),
                    gguf: format!("blk.{l}.{g}_exps.weight"),
                    shape: vec![moe.experts, shape[0], shape[1]],
                    init,
                    ty: matrix_ty(shape[1]),
                    permute_head_dim: None,
                    stack: (0..moe.experts)
                        .map(|e| format!("model.layers.{l}.{}", hf_of(e)))
                        .collect(),
                });
            } else {
                for e in 0..moe.experts {
                    v.push(Planned {
                        hf: format!("model.layers.{l}.{}", hf_of(e)),
                        gguf: format!("blk.{l}.{g}.{e}.weight"),
                        shape: shape.to_vec(),
                        init,
                        ty: matrix_ty(shape[1]),
                        permute_head_dim: None,
                        stack: vec![],
                    });
                }
            }
        }
        if let Some(sff) = moe.shared_expert_ffn {
            // The gate is one row: a vector in llama.cpp's files.
            v.push(Planned {
                hf: format!("model.layers.{l}.mlp.shared_expert_gate.weight"),
                gguf: format!("blk.{l}.ffn_gate_inp_shexp.weight"),
                shape: if gguf {
                    vec![s.hidden]
                } else {
                    vec![1, s.hidden]
                },
                init: fan(s.hidden),
                ty: vec_ty,
                permute_head_dim: None,
                stack: vec![],
            });
            for (g, hf, shape, init) in [
                ("gate", "gate_proj", [sff, s.hidden], fan(s.hidden)),
                ("up", "up_proj", [sff, s.hidden], fan(s.hidden)),
                ("down", "down_proj", [s.hidden, sff], fan(sff)),
            ] {
                v.push(Planned {
                    hf: format!("model.layers.{l}.mlp.shared_expert.{hf}.weight"),
                    gguf: format!("blk.{l}.ffn_{g}_shexp.weight"),
                    shape: shape.to_vec(),
                    init,
                    ty: matrix_ty(shape[1]),
                    permute_head_dim: None,
                    stack: vec![],
                });
            }
        }
    }
    v.push(Planned {
        hf: "model.norm.weight".into(),
        gguf: "output_norm.weight".into(),
        shape: vec![s.hidden],
        init: Init::Norm,
        ty: vec_ty,
        permute_head_dim: None,
        stack: vec![],
    });
    if !s.tie_embeddings {
        v.push(Planned {
            hf: "lm_head.weight".into(),
            gguf: "output.weight".into(),
            shape: vec![s.vocab_size, s.hidden],
            init: Init::Normal(1.0 / (s.hidden as f32).sqrt()),
            ty: matrix_ty(s.hidden),
            permute_head_dim: None,
            stack: vec![],
        });
    }
    v
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Per-tensor key: the seed mixed with a hash of the Hugging Face name, so
/// tensors are independent and the format does not change the values.
pub(crate) fn tensor_key(seed: u64, hf_name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in hf_name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(seed ^ splitmix64(h))
}

/// A standard normal-ish value for element `idx`: the sum of four 16-bit
/// uniforms, centred and scaled to unit variance (bounded by ±3.46, which
/// also keeps quantisation grids free of outliers).
#[inline]
fn std_normalish(key: u64, idx: u64) -> f32 {
    let r = splitmix64(key ^ idx.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
    (s as f32 / 65535.0 - 2.0) * 3f32.sqrt()
}

/// Generates row `hf_row` (in the Hugging Face layout) of a tensor.
pub(crate) fn gen_row(key: u64, init: Init, hf_row: usize, out: &mut [f32]) {
    let base = (hf_row * out.len()) as u64;
    for (i, o) in out.iter_mut().enumerate() {
        let z = std_normalish(key, base + i as u64);
        *o = match init {
            Init::Normal(std) => z * std,
            Init::Norm => 1.0 + 0.05 * z,
        };
    }
}

/// Generates, encodes and writes one tensor, a batch of rows at a time,
/// the rows of a batch spread over the machine's cores.
fn write_tensor_data(w: &mut dyn Write, seed: u64, t: &Planned, path: &Path) -> Result<()> {
    let key = tensor_key(seed, &t.hf);
    let (rows, cols) = t.rows_cols();
    // A stacked tensor's slices hold each expert's own values.
    let stack_keys: Vec<u64> = t.stack.iter().map(|n| tensor_key(seed, n)).collect();
    let slice_rows = rows / stack_keys.len().max(1);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(32);
    let rows_per_task = ((1usize << 18) / cols.max(1)).max(1);
    let encode = |a: usize, b: usize| -> Result<Vec<u8>> {
        let mut row = vec![0f32; cols];
        let mut out = Vec::with_capacity(t.ty.bytes_for(cols)? * (b - a));
        for r in a..b {
            let src = match t.permute_head_dim {
                Some(hd) => crate::lora::permuted_source_row(r, hd),
                None => r,
            };
            match stack_keys.get(r / slice_rows.max(1)) {
                Some(&k) => gen_row(k, t.init, src % slice_rows, &mut row),
                None => gen_row(key, t.init, src, &mut row),
            }
            quantize_row(t.ty, &row, &mut out)?;
        }
        Ok(out)
    };
    let mut r0 = 0;
    while r0 < rows {
        let mut tasks = Vec::new();
        let mut a = r0;
        while a < rows && tasks.len() < threads {
            let b = (a + rows_per_task).min(rows);
            tasks.push((a, b));
            a = b;
        }
        r0 = a;
        let bufs: Vec<Result<Vec<u8>>> = if tasks.len() == 1 {
            vec![encode(tasks[0].0, tasks[0].1)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = tasks
                    .iter()
                    .map(|&(a, b)| s.spawn(move || encode(a, b)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(ModelError::Other("synth worker thread panicked".into()))
                        })
                    })
                    .collect()
            })
        };
        for b in bufs {
            w.write_all(&b?).map_err(|e| io_err(path, e))?;
        }
    }
    Ok(())
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Write {
        path: path.to_path_buf(),
        cause: source,
    }
}

// ---------------------------------------------------------------------------
// Quantisers
// ---------------------------------------------------------------------------

/// Encodes `x` (a whole number of blocks) in `ty`, appending to `out`.
///
/// Round-to-nearest on a per-block grid: valid bytes that dequantise close
/// to `x`, not llama.cpp's error-minimising search.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    let n = x.len();
    let need = ty.bytes_for(n)?;
    out.reserve(need);
    match ty {
        GgmlType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => x.chunks_exact(32).for_each(|b| q8_0(b, out)),
        GgmlType::Q4_0 => x.chunks_exact(32).for_each(|b| q4_0(b, out)),
        GgmlType::Q4_1 => x.chunks_exact(32).for_each(|b| q4_1(b, out)),
        GgmlType::Q4K => x.chunks_exact(256).for_each(|b| qk_min(b, 15, out)),
        GgmlType::Q5K => x.chunks_exact(256).for_each(|b| qk_min(b, 31, out)),
        GgmlType::Q6K => x.chunks_exact(256).for_each(|b| q6_k(b, out)),
    }
    Ok(())
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = f16_round(amax / 127.0);
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16_bytes(d));
    out.extend(
        x.iter()
            .map(|v| ((v * id).round().clamp(-127.0, 127.0) as i8) as u8),
    );
}

fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    // The value of largest magnitude maps to level 0 (-8 * d), as in ggml.
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = f16_round(max / -8.0);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * id).round() + 8.0).clamp(0.0, 15.0) as u8;
    out.extend_from_slice(&f16_bytes(d));
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[j + 16]) << 4));
    }
}

fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let d = f16_round((max - min) / 15.0);
    let m = f16_round(min);
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v - m) * id).round().clamp(0.0, 15.0) as u8;
    out.extend_from_slice(&f16_bytes(d));
    out.extend_from_slice(&f16_bytes(m));
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[j + 16]) << 4));
    }
}

/// Packs the 8 six-bit (scale, min) pairs of a Q4_K/Q5_K block into 12 bytes
/// (the inverse of ggml's `get_scale_min_k4`).
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// Q4_K (`nmax` 15) and Q5_K (`nmax` 31): 8 sub-blocks of 32 with 6-bit
/// scales and mins under two f16 super-scales; `w = d*ls*q - dmin*lm`.
fn qk_min(x: &[f32], nmax: u8, out: &mut Vec<u8>) {
    let mut sc = [0f32; 8];
    let mut mn = [0f32; 8];
    for (j, sb) in x.chunks_exact(32).enumerate() {
        // The grid always contains 0 (ggml clamps a positive minimum to 0).
        let lo = sb.iter().fold(0f32, |m, &v| m.min(v));
        let hi = sb.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        sc[j] = (hi - lo) / nmax as f32;
        mn[j] = -lo;
    }
    let max_sc = sc.iter().fold(0f32, |m, &v| m.max(v));
    let max_mn = mn.iter().fold(0f32, |m, &v| m.max(v));
    let d = f16_round(max_sc / 63.0);
    let dmin = f16_round(max_mn / 63.0);
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // Round the scale up so the sub-block's range stays on the grid.
        ls[j] = if d > 0.0 {
            (sc[j] / d).ceil().clamp(0.0, 63.0) as u8
        } else {
            0
        };
        lm[j] = if dmin > 0.0 {
            (mn[j] / dmin).round().clamp(0.0, 63.0) as u8
        } else {
            0
        };
    }
    let mut q = [0u8; 256];
    for j in 0..8 {
        let step = d * ls[j] as f32;
        let off = dmin * lm[j] as f32;
        for i in 0..32 {
            let v = x[j * 32 + i];
            q[j * 32 + i] = if step > 0.0 {
                ((v + off) / step).round().clamp(0.0, nmax as f32) as u8
            } else {
                0
            };
        }
    }
    out.extend_from_slice(&f16_bytes(d));
    out.extend_from_slice(&f16_bytes(dmin));
    out.extend_from_slice(&pack_scale_min_k4(&ls, &lm));
    if nmax == 31 {
        // qh: bit 2g of byte j is the high bit of element 64g + j, bit 2g+1 of element 64g + 32 + j.
        let mut qh = [0u8; 32];
        for g in 0..4 {
            for j in 0..32 {
                qh[j] |= (q[64 * g + j] >> 4) << (2 * g);
                qh[j] |= (q[64 * g + 32 + j] >> 4) << (2 * g + 1);
            }
        }
        out.extend_from_slice(&qh);
    }
    // qs: 64 elements per 32 bytes, sub-block 2g in the low nibbles, 2g+1 in the high.
    for g in 0..4 {
        for j in 0..32 {
            out.push((q[64 * g + j] & 0xF) | ((q[64 * g + 32 + j] & 0xF) << 4));
        }
    }
}

/// Q6_K: 16 sub-blocks of 16 with signed 8-bit scales under one f16 scale;
/// `w = d * sc * (q - 32)`, `q` in 0..63.
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut sb_scale = [0f32; 16];
    for (j, sb) in x.chunks_exact(16).enumerate() {
        sb_scale[j] = sb.iter().fold(0f32, |m, v| m.max(v.abs())) / 31.0;
    }
    let max = sb_scale.iter().fold(0f32, |m, &v| m.max(v));
    let d = f16_round(max / 127.0);
    let mut sc = [0i8; 16];
    let mut q = [0u8; 256];
    for j in 0..16 {
        sc[j] = if d > 0.0 {
            (sb_scale[j] / d).ceil().clamp(0.0, 127.0) as i8
        } else {
            0
        };
        let step = d * sc[j] as f32;
        for i in 0..16 {
            let v = x[j * 16 + i];
            q[j * 16 + i] = if step > 0.0 {
                ((v / step).round() + 32.0).clamp(0.0, 63.0) as u8
            } else {
                32
            };
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for half in 0..2 {
        let (l_off, h_off, e) = (64 * half, 32 * half, 128 * half);
        for l in 0..32 {
            let q1 = q[e + l];
            let q2 = q[e + l + 32];
            let q3 = q[e + l + 64];
            let q4 = q[e + l + 96];
            ql[l_off + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[l_off + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[h_off + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&f16_bytes(d));
}

// ---------------------------------------------------------------------------
// Tokenizer vocabulary
// ---------------------------------------------------------------------------

/// Letters by English frequency: merges are made in this order.
const LETTERS: &str = "etaoinshrdlcumwfgypbvkjxqz";

const BIGRAMS: &[&str] = &[
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed",
    "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le", "ve", "co",
    "me", "de", "hi", "ri", "ro", "ic", "ne", "ea", "ra", "ce",
];

const WORDS: &[&str] = &[
    "the", "and", "of", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are",
    "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by",
    "word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there", "when",
    "up", "use", "your", "how", "said", "an", "each", "she", "which", "do", "their", "time", "if",
    "will", "way", "about", "many", "then", "them", "write", "would", "like", "so", "these", "her",
    "long", "make", "thing", "see", "him", "two", "has", "look", "more", "day", "could", "go",
    "come", "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water",
    "than", "call", "first", "who", "may", "down", "side", "been", "now", "find", "hello", "world",
    "model", "token", "data",
];

const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const SPM_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}";

/// GGUF token types.
const TT_NORMAL: i32 = 1;
const TT_UNKNOWN: i32 = 2;
const TT_CONTROL: i32 = 3;
const TT_BYTE: i32 = 6;

/// A generated vocabulary, in id order.
#[derive(Debug, Clone)]
struct Vocab {
    kind: SynthTokenizer,
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Vec<f32>,
    merges: Vec<(String, String)>,
    bos: u32,
    eos: u32,
    unk: u32,
}

fn min_vocab(kind: SynthTokenizer) -> usize {
    match kind {
        SynthTokenizer::Gpt2 => 3 + 256,
        SynthTokenizer::SentencePiece => 3 + 256 + 1 + 26,
    }
}

/// GPT-2's reversible byte → printable-char map, in its own order (the
/// printable bytes first): the order GPT-2-style vocabularies list them in.
fn gpt2_byte_chars() -> Vec<(u8, char)> {
    let mut v = Vec::with_capacity(256);
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    for b in 0..=255u8 {
        if printable(b) {
            v.push((b, b as char));
        }
    }
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !printable(b) {
            v.push((b, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    v
}

struct VocabBuilder {
    tokens: Vec<String>,
    types: Vec<i32>,
    index: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    /// Ids of merged tokens, in creation order (the fill extends them).
    merged: Vec<u32>,
    limit: usize,
}

impl VocabBuilder {
    fn push(&mut self, s: String, ty: i32) {
        self.index.insert(s.clone(), self.tokens.len() as u32);
        self.tokens.push(s);
        self.types.push(ty);
    }
    fn full(&self) -> bool {
        self.tokens.len() >= self.limit
    }
    /// Adds `s` (and, first, whatever prefixes it needs) as merged tokens.
    /// Returns false once the vocabulary is full.
    fn ensure(&mut self, s: &str) -> bool {
        if self.index.contains_key(s) {
            return true;
        }
        if self.full() {
            return false;
        }
        let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(1).collect();
        // A split into two existing tokens, preferring the longest left part.
        let split = bounds
            .iter()
            .rev()
            .find(|&&k| self.index.contains_key(&s[..k]) && self.index.contains_key(&s[k..]))
            .copied();
        let (a, b) = match split {
            Some(k) => (s[..k].to_string(), s[k..].to_string()),
            None => {
                let Some(&k) = bounds.last() else {
                    // A single character that is not in the base vocabulary.
                    return true;
                };
                if !self.ensure(&s[..k]) {
                    return false;
                }
                if !self.index.contains_key(&s[k..]) || self.full() {
                    return !self.full();
                }
                (s[..k].to_string(), s[k..].to_string())
            }
        };
        let id = self.tokens.len() as u32;
        self.push(format!("{a}{b}"), TT_NORMAL);
        self.merges.push((a, b));
        self.merged.push(id);
        true
    }
    /// Adds common pieces, then extends merged tokens letter by letter until full.
    fn fill(&mut self, space: char) {
        let sp = space.to_string();
        for c in LETTERS.chars() {
            if !self.ensure(&format!("{sp}{c}")) {
                return;
            }
        }
        for b in BIGRAMS {
            if !self.ensure(b) {
                return;
            }
        }
        for w in WORDS {
            if !self.ensure(&format!("{sp}{w}")) || !self.ensure(w) {
                return;
            }
        }
        let mut i = 0;
        while !self.full() && i < self.merged.len() {
            let t = self.tokens[self.merged[i] as usize].clone();
            for c in LETTERS.chars() {
                if !self.ensure(&format!("{t}{c}")) {
                    return;
                }
            }
            i += 1;
        }
    }
}

fn build_vocab(kind: SynthTokenizer, size: usize) -> Result<Vocab> {
    if size < min_vocab(kind) {
        return Err(ModelError::Config(format!(
            "vocab size {size} is below the {} tokens the {kind:?} synthetic tokenizer needs",
            min_vocab(kind)
        )));
    }
    let mut b = VocabBuilder {
        tokens: Vec::with_capacity(size),
        types: Vec::with_capacity(size),
        index: HashMap::with_capacity(size),
        merges: Vec::new(),
        merged: Vec::new(),
        limit: size,
    };
    let space = match kind {
        SynthTokenizer::Gpt2 => {
            for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
                b.push(s.into(), TT_CONTROL);
            }
            for (_, c) in gpt2_byte_chars() {
                b.push(c.to_string(), TT_NORMAL);
            }
            'Ġ'
        }
        SynthTokenizer::SentencePiece => {
            b.push("<unk>".into(), TT_UNKNOWN);
            b.push("<s>".into(), TT_CONTROL);
            b.push("</s>".into(), TT_CONTROL);
            for byte in 0..=255u8 {
                b.push(format!("<0x{byte:02X}>"), TT_BYTE);
            }
            b.push("▁".into(), TT_NORMAL);
            for c in LETTERS.chars() {
                b.push(c.to_string(), TT_NORMAL);
            }
            '▁'
        }
    };
    b.fill(space);
    if b.tokens.len() != size {
        return Err(ModelError::Other(format!(
            "synthetic tokenizer: built {} tokens, wanted {size}",
            b.tokens.len()
        )));
    }
    let (bos, eos, unk, scores) = match kind {
        SynthTokenizer::Gpt2 => (1, 2, 0, vec![0.0; size]),
        SynthTokenizer::SentencePiece => {
            // Pieces after the 259 special/byte tokens score by creation order,
            // so earlier (more frequent) merges win, as SentencePiece's do.
            let scores = (0..size)
                .map(|i| if i < 259 { 0.0 } else { -((i - 259) as f32) })
                .collect();
            (1, 2, 0, scores)
        }
    };
    Ok(Vocab {
        kind,
        tokens: b.tokens,
        types: b.types,
        scores,
        merges: b.merges,
        bos,
        eos,
        unk,
    })
}

fn tk_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("building synthetic tokenizer.json: {e}"))
}

/// Builds the Hugging Face tokenizer with the `tokenizers` crate.
fn hf_tokenizer(v: &Vocab) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::AddedToken;
    let map: tokenizers::models::bpe::Vocab = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let special: Vec<AddedToken> = v
        .tokens
        .iter()
        .zip(&v.types)
        .filter(|(_, &ty)| ty == TT_CONTROL || ty == TT_UNKNOWN)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    match v.kind {
        SynthTokenizer::Gpt2 => {
            use tokenizers::pre_tokenizers::byte_level::ByteLevel;
            let bpe = BPE::builder()
                .vocab_and_merges(map, v.merges.clone())
                .build()
                .map_err(tk_err)?;
            let mut tk = tokenizers::Tokenizer::new(bpe);
            tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            tk.with_decoder(Some(ByteLevel::default()));
            tk.with_post_processor(Some(ByteLevel::new(false, true, true)));
            tk.add_special_tokens(&special);
            Ok(tk)
        }
        SynthTokenizer::SentencePiece => {
            use tokenizers::decoders::byte_fallback::ByteFallback;
            use tokenizers::decoders::fuse::Fuse;
            use tokenizers::decoders::sequence::Sequence as DecSeq;
            use tokenizers::decoders::strip::Strip;
            use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSeq};
            use tokenizers::processors::template::TemplateProcessing;
            let bpe = BPE::builder()
                .vocab_and_merges(map, v.merges.clone())
                .unk_token("<unk>".into())
                .byte_fallback(true)
                .fuse_unk(true)
                .build()
                .map_err(tk_err)?;
            let mut tk = tokenizers::Tokenizer::new(bpe);
            tk.with_normalizer(Some(NormSeq::new(vec![
                Prepend::new("▁".into()).into(),
                Replace::new(" ", "▁").map_err(tk_err)?.into(),
            ])));
            tk.with_decoder(Some(DecSeq::new(vec![
                Replace::new("▁", " ").map_err(tk_err)?.into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
                Strip::new(' ', 1, 0).into(),
            ])));
            let bos = v.tokens[v.bos as usize].clone();
            tk.with_post_processor(Some(
                TemplateProcessing::builder()
                    .try_single(format!("{bos} $A"))
                    .map_err(tk_err)?
                    .try_pair(format!("{bos} $A {bos} $B"))
                    .map_err(tk_err)?
                    .special_tokens(vec![(bos.clone(), v.bos)])
                    .build()
                    .map_err(tk_err)?,
            ));
            tk.add_special_tokens(&special);
            Ok(tk)
        }
    }
}

// ---------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------

const GGUF_ALIGNMENT: u64 = 32;

/// llama.cpp's `general.file_type` for a checkpoint whose matrices are `ty`.
fn llama_file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q4K => 15,
        GgmlType::Q5K => 17,
        GgmlType::Q6K => 18,
        GgmlType::BF16 => 32,
    }
}

fn gguf_metadata(spec: &SynthSpec, v: &Vocab, weight_type: GgmlType) -> Vec<(String, MetaValue)> {
    let s = &spec.shape;
    let a = spec.gguf_arch();
    let u32v = |x: usize| MetaValue::U32(x as u32);
    let mut m: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), MetaValue::String(a.into())),
        ("general.type".into(), MetaValue::String("model".into())),
        (
            "general.name".into(),
            MetaValue::String(format!("synthetic {a} seed {}", spec.seed)),
        ),
        (
            "general.alignment".into(),
            MetaValue::U32(GGUF_ALIGNMENT as u32),
        ),
        (
            "general.file_type".into(),
            MetaValue::U32(llama_file_type(weight_type)),
        ),
        ("general.quantization_version".into(), MetaValue::U32(2)),
        (format!("{a}.block_count"), u32v(s.n_layers)),
        (format!("{a}.context_length"), u32v(s.context_length)),
        (format!("{a}.embedding_length"), u32v(s.hidden)),
        (format!("{a}.feed_forward_length"), u32v(s.ffn)),
        (format!("{a}.attention.head_count"), u32v(s.n_heads)),
        (format!("{a}.attention.head_count_kv"), u32v(s.n_kv_heads)),
        (format!("{a}.rope.freq_base"), MetaValue::F32(s.rope_theta)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            MetaValue::F32(s.rms_eps),
        ),
        (format!("{a}.vocab_size"), u32v(s.vocab_size)),
        (format!("{a}.rope.dimension_count"), u32v(s.head_dim)),
    ];
    if let Some(moe) = &s.moe {
        m.push((format!("{a}.expert_count"), u32v(moe.experts)));
        m.push((format!("{a}.expert_used_count"), u32v(moe.experts_used)));
        if spec.arch != Arch::Llama {
            m.push((
                format!("{a}.expert_feed_forward_length"),
                u32v(moe.expert_ffn),
            ));
        }
        if let Some(sff) = moe.shared_expert_ffn {
            m.push((format!("{a}.expert_shared_feed_forward_length"), u32v(sff)));
        }
    }
    // Qwen3's readers (transformers among them) take a default head
    // dimension of 128 unless told, so its converter always writes it.
    if s.n_heads * s.head_dim != s.hidden || spec.arch == Arch::Qwen3 {
        m.push((format!("{a}.attention.key_length"), u32v(s.head_dim)));
        m.push((format!("{a}.attention.value_length"), u32v(s.head_dim)));
    }
    let strings = |xs: &mut dyn Iterator<Item = String>| {
        MetaValue::Array(xs.map(MetaValue::String).collect())
    };
    match v.kind {
        SynthTokenizer::Gpt2 => {
            let pre = match spec.arch {
                Arch::Llama => "smollm",
                Arch::Qwen2 | Arch::Qwen3 => "qwen2",
            };
            m.push((
                "tokenizer.ggml.model".into(),
                MetaValue::String("gpt2".into()),
            ));
            m.push(("tokenizer.ggml.pre".into(), MetaValue::String(pre.into())));
            m.push((
                "tokenizer.ggml.tokens".into(),
                strings(&mut v.tokens.iter().cloned()),
            ));
            m.push((
                "tokenizer.ggml.token_type".into(),
                MetaValue::Array(v.types.iter().map(|&t| MetaValue::I32(t)).collect()),
            ));
            m.push((
                "tokenizer.ggml.merges".into(),
                strings(&mut v.merges.iter().map(|(a, b)| format!("{a} {b}"))),
            ));
            m.push(("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(v.bos)));
            m.push(("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(v.eos)));
            m.push((
                "tokenizer.ggml.unknown_token_id".into(),
                MetaValue::U32(v.unk),
            ));
            m.push((
                "tokenizer.ggml.padding_token_id".into(),
                MetaValue::U32(v.unk),
            ));
            m.push((
                "tokenizer.ggml.add_bos_token".into(),
                MetaValue::Bool(false),
            ));
            m.push((
                "tokenizer.ggml.add_space_prefix".into(),
                MetaValue::Bool(false),
            ));
            m.push((
                "tokenizer.chat_template".into(),
                MetaValue::String(CHATML_TEMPLATE.into()),
            ));
        }
        SynthTokenizer::SentencePiece => {
            m.push((
                "tokenizer.ggml.model".into(),
                MetaValue::String("llama".into()),
            ));
            m.push((
                "tokenizer.ggml.pre".into(),
                MetaValue::String("default".into()),
            ));
            m.push((
                "tokenizer.ggml.tokens".into(),
                strings(&mut v.tokens.iter().cloned()),
            ));
            m.push((
                "tokenizer.ggml.scores".into(),
                MetaValue::Array(v.scores.iter().map(|&s| MetaValue::F32(s)).collect()),
            ));
            m.push((
                "tokenizer.ggml.token_type".into(),
                MetaValue::Array(v.types.iter().map(|&t| MetaValue::I32(t)).collect()),
            ));
            m.push(("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(v.bos)));
            m.push(("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(v.eos)));
            m.push((
                "tokenizer.ggml.unknown_token_id".into(),
                MetaValue::U32(v.unk),
            ));
            m.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true)));
            m.push((
                "tokenizer.ggml.add_eos_token".into(),
                MetaValue::Bool(false),
            ));
            m.push((
                "tokenizer.ggml.add_space_prefix".into(),
                MetaValue::Bool(true),
            ));
            m.push((
                "tokenizer.chat_template".into(),
                MetaValue::String(SPM_TEMPLATE.into()),
            ));
        }
    }
    m
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn meta_type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_meta_payload(buf: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => buf.push(*x),
        MetaValue::I8(x) => buf.push(*x as u8),
        MetaValue::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => buf.push(*x as u8),
        MetaValue::String(s) => put_str(buf, s),
        MetaValue::Array(items) => {
            // Arrays here are never empty and never mixed.
            let ty = items.first().map(meta_type_id).unwrap_or(4);
            buf.extend_from_slice(&ty.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_meta_payload(buf, it);
            }
        }
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// A writer for a file that only appears under its final name once complete.
struct AtomicFile {
    tmp: PathBuf,
    out: PathBuf,
    w: std::io::BufWriter<std::fs::File>,
}

impl AtomicFile {
    fn create(out: &Path) -> Result<Self> {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = out.with_file_name(format!(".{name}.partial"));
        let f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        Ok(Self {
            tmp,
            out: out.to_path_buf(),
            w: std::io::BufWriter::with_capacity(1 << 20, f),
        })
    }
    fn finish(mut self) -> Result<()> {
        self.w.flush().map_err(|e| io_err(&self.tmp, e))?;
        self.w
            .get_ref()
            .sync_all()
            .map_err(|e| io_err(&self.tmp, e))?;
        // After the rename the temporary name is gone, so Drop's cleanup is a no-op.
        std::fs::rename(&self.tmp, &self.out).map_err(|e| io_err(&self.out, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Left behind only on error (finish renames it away first).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn write_gguf_file(spec: &SynthSpec, vocab: &Vocab, out: &Path) -> Result<()> {
    let SynthFormat::Gguf { weight_type } = spec.format else {
        return Err(ModelError::Other("write_gguf_file: not a GGUF spec".into()));
    };
    let tensors = plan(spec);
    let meta = gguf_metadata(spec, vocab, weight_type);

    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut head, k);
        head.extend_from_slice(&meta_type_id(v).to_le_bytes());
        put_meta_payload(&mut head, v);
    }
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in &tensors {
        let n = t.ty.bytes_for(t.n_elements())? as u64;
        put_str(&mut head, &t.gguf);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ty.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        sizes.push(n);
        offset = align_up(offset + n, GGUF_ALIGNMENT);
    }
    head.resize(align_up(head.len() as u64, GGUF_ALIGNMENT) as usize, 0);

    let mut f = AtomicFile::create(out)?;
    f.w.write_all(&head).map_err(|e| io_err(out, e))?;
    for (t, n) in tensors.iter().zip(&sizes) {
        write_tensor_data(&mut f.w, spec.seed, t, out)?;
        let pad = (align_up(*n, GGUF_ALIGNMENT) - n) as usize;
        f.w.write_all(&vec![0u8; pad]).map_err(|e| io_err(out, e))?;
    }
    f.finish()
}

// ---------------------------------------------------------------------------
// Hugging Face directory
// ---------------------------------------------------------------------------

fn st_dtype(ty: GgmlType) -> (&'static str, &'static str) {
    match ty {
        GgmlType::F16 => ("F16", "float16"),
        GgmlType::BF16 => ("BF16", "bfloat16"),
        _ => ("F32", "float32"),
    }
}

fn hf_config(spec: &SynthSpec, v: &Vocab, dtype: GgmlType) -> serde_json::Value {
    let s = &spec.shape;
    let (_, torch) = st_dtype(dtype);
    let mut c = serde_json::json!({
        "architectures": [match spec.arch { Arch::Llama => "LlamaForCausalLM", Arch::Qwen2 => "Qwen2ForCausalLM", Arch::Qwen3 => "Qwen3ForCausalLM" }],
        "model_type": spec.arch.name(),
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.n_layers,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab_size,
        "max_position_embeddings": s.context_length,
        "rope_theta": s.rope_theta,
        "rope_scaling": null,
        "rms_norm_eps": s.rms_eps,
        "tie_word_embeddings": s.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": v.bos,
        "eos_token_id": v.eos,
        "torch_dtype": torch,
        "use_cache": true,
    });
    let o = c.as_object_mut().expect("json! object");
    if let Some(moe) = &s.moe {
        let (arch, model_type) = match spec.arch {
            Arch::Qwen2 => ("Qwen2MoeForCausalLM", "qwen2_moe"),
            Arch::Qwen3 => ("Qwen3MoeForCausalLM", "qwen3_moe"),
            Arch::Llama => ("MixtralForCausalLM", "mixtral"),
        };
        o.insert("architectures".into(), serde_json::json!([arch]));
        o.insert("model_type".into(), model_type.into());
        o.insert("num_experts_per_tok".into(), moe.experts_used.into());
        o.insert("output_router_logits".into(), false.into());
        o.insert("router_aux_loss_coef".into(), 0.001.into());
        if let Some(sff) = moe.shared_expert_ffn {
            o.insert("shared_expert_intermediate_size".into(), sff.into());
            o.insert("qkv_bias".into(), true.into());
        }
        if spec.arch != Arch::Llama {
            o.insert("num_experts".into(), moe.experts.into());
            o.insert("moe_intermediate_size".into(), moe.expert_ffn.into());
            o.insert("norm_topk_prob".into(), moe.norm_topk_prob.into());
            o.insert("decoder_sparse_step".into(), 1.into());
            o.insert("mlp_only_layers".into(), serde_json::json!([]));
        } else {
            o.insert("num_local_experts".into(), moe.experts.into());
            o.insert("sliding_window".into(), serde_json::Value::Null);
            return c;
        }
    }
    match spec.arch {
        Arch::Llama => {
            o.insert("attention_bias".into(), false.into());
            o.insert("mlp_bias".into(), false.into());
        }
        Arch::Qwen3 => {
            o.insert("attention_bias".into(), false.into());
            o.insert("use_sliding_window".into(), false.into());
            o.insert("sliding_window".into(), serde_json::Value::Null);
            o.insert("max_window_layers".into(), s.n_layers.into());
        }
        Arch::Qwen2 => {
            o.insert("use_sliding_window".into(), false.into());
            o.insert("sliding_window".into(), serde_json::Value::Null);
            o.insert("max_window_layers".into(), s.n_layers.into());
        }
    }
    c
}

fn tokenizer_config(spec: &SynthSpec, v: &Vocab) -> serde_json::Value {
    let tok = |id: u32| v.tokens[id as usize].clone();
    let added: serde_json::Map<String, serde_json::Value> = v
        .types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TT_CONTROL || t == TT_UNKNOWN)
        .map(|(i, _)| {
            (
                i.to_string(),
                serde_json::json!({"content": v.tokens[i], "lstrip": false, "normalized": false,
                                   "rstrip": false, "single_word": false, "special": true}),
            )
        })
        .collect();
    let (add_bos, template) = match v.kind {
        SynthTokenizer::Gpt2 => (false, CHATML_TEMPLATE),
        SynthTokenizer::SentencePiece => (true, SPM_TEMPLATE),
    };
    serde_json::json!({
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "added_tokens_decoder": added,
        "bos_token": tok(v.bos),
        "eos_token": tok(v.eos),
        "unk_token": tok(v.unk),
        "pad_token": tok(v.unk),
        "chat_template": template,
        "clean_up_tokenization_spaces": false,
        "model_max_length": spec.shape.context_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

/// `v` with every object's keys in sorted order, so that the files written
/// are the same bytes whether or not serde_json keeps insertion order (a
/// feature any crate in the build may switch on).
fn sorted_keys(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted_keys(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted_keys).collect()),
        other => other.clone(),
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(&sorted_keys(v))
        .map_err(|e| ModelError::Other(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| io_err(path, e))
}

/// Assigns consecutive tensors to `shards` files of roughly equal size,
/// none empty (validate() ensures `shards <= tensors.len()`).
fn assign_shards(sizes: &[u64], shards: usize) -> Vec<usize> {
    let total: u64 = sizes.iter().sum();
    let n = sizes.len();
    let mut out = Vec::with_capacity(n);
    let (mut k, mut acc, mut in_k) = (0usize, 0u64, 0usize);
    for (i, &sz) in sizes.iter().enumerate() {
        let target = total * (k as u64 + 1) / shards as u64;
        let must = n - i == shards - 1 - k;
        if k + 1 < shards && in_k > 0 && (acc >= target || must) {
            k += 1;
            in_k = 0;
        }
        out.push(k);
        acc += sz;
        in_k += 1;
    }
    out
}

fn write_hf_dir(
    spec: &SynthSpec,
    vocab: &Vocab,
    dtype: GgmlType,
    shards: usize,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    // Stale weights from an earlier run with another shard count would be
    // picked up by readers (the index wins over model.safetensors).
    if let Ok(rd) = std::fs::read_dir(out) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = name == crate::safetensors_dir::INDEX_FILE
                || name == crate::safetensors_dir::SINGLE_FILE
                || (name.starts_with("model-")
                    && name.ends_with(".safetensors")
                    && name.contains("-of-"));
            if stale {
                std::fs::remove_file(e.path()).map_err(|err| io_err(&e.path(), err))?;
            }
        }
    }
    let tensors = plan(spec);
    let sizes: Vec<u64> = tensors
        .iter()
        .map(|t| t.ty.bytes_for(t.n_elements()).map(|n| n as u64))
        .collect::<Result<_>>()?;
    let shard_of = assign_shards(&sizes, shards);
    let file_name = |k: usize| {
        if shards == 1 {
            crate::safetensors_dir::SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        }
    };
    let (st_name, _) = st_dtype(dtype);
    let mut weight_map = serde_json::Map::new();
    for k in 0..shards {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut off = 0u64;
        let members: Vec<usize> = (0..tensors.len()).filter(|&i| shard_of[i] == k).collect();
        for &i in &members {
            let t = &tensors[i];
            header.insert(
                t.hf.clone(),
                serde_json::json!({"dtype": st_name, "shape": t.shape, "data_offsets": [off, off + sizes[i]]}),
            );
            off += sizes[i];
            weight_map.insert(t.hf.clone(), file_name(k).into());
        }
        let mut h = serde_json::to_vec(&sorted_keys(&serde_json::Value::Object(header)))
            .map_err(|e| ModelError::Other(e.to_string()))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let path = out.join(file_name(k));
        let mut f = AtomicFile::create(&path)?;
        f.w.write_all(&(h.len() as u64).to_le_bytes())
            .map_err(|e| io_err(&path, e))?;
        f.w.write_all(&h).map_err(|e| io_err(&path, e))?;
        for &i in &members {
            write_tensor_data(&mut f.w, spec.seed, &tensors[i], &path)?;
        }
        f.finish()?;
    }
    if shards > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": sizes.iter().sum::<u64>()},
            "weight_map": weight_map,
        });
        write_json(&out.join(crate::safetensors_dir::INDEX_FILE), &index)?;
    }
    write_json(&out.join("config.json"), &hf_config(spec, vocab, dtype))?;
    write_json(
        &out.join("generation_config.json"),
        &serde_json::json!({"bos_token_id": vocab.bos, "eos_token_id": vocab.eos}),
    )?;
    write_json(
        &out.join("tokenizer_config.json"),
        &tokenizer_config(spec, vocab),
    )?;
    let tk = hf_tokenizer(vocab)?;
    let tk_path = out.join("tokenizer.json");
    tk.save(&tk_path, false).map_err(tk_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;
    use crate::weights::ModelSource;

    const ALL_GGUF_TYPES: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    fn spec(arch: Arch, format: SynthFormat, seed: u64) -> SynthSpec {
        SynthSpec {
            arch,
            shape: SynthShape::preset("tiny").unwrap(),
            seed,
            format,
            tokenizer: SynthTokenizer::Gpt2,
        }
    }

    fn dequant(t: &crate::weights::TensorRef<'_>) -> Vec<f32> {
        let mut out = vec![0f32; t.n_elements()];
        dequantize_row(t.ty, t.bytes, &mut out).unwrap();
        out
    }

    #[test]
    fn presets_parse_and_validate() {
        for name in SynthShape::PRESETS {
            let shape = SynthShape::preset(name).unwrap();
            for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
                for tokenizer in [SynthTokenizer::Gpt2, SynthTokenizer::SentencePiece] {
                    let s = SynthSpec {
                        arch,
                        shape: shape.clone(),
                        seed: 0,
                        format: SynthFormat::Gguf {
                            weight_type: GgmlType::Q4K,
                        },
                        tokenizer,
                    };
                    // A shared expert is Qwen2-MoE's alone, and it has one.
                    let shared = shape.moe.map(|m| m.shared_expert_ffn.is_some());
                    if shared.is_some_and(|sh| sh != (arch == Arch::Qwen2)) {
                        let err = s.validate().unwrap_err().to_string();
                        assert!(err.contains("Qwen2-MoE"), "{err}");
                    } else {
                        s.validate().unwrap();
                    }
                }
            }
        }
        let m = SynthShape::preset("moe-8x135m").unwrap();
        let moe = m.moe.unwrap();
        // Two experts of half the FFN: a dense smollm2-135m token's work.
        assert_eq!(moe.experts_used * moe.expert_ffn, 1536);
        assert_eq!((moe.experts, m.ffn), (8, moe.expert_ffn));
        let l = SynthShape::preset("llama3-8b").unwrap();
        assert_eq!(
            (l.n_layers, l.hidden, l.ffn, l.n_heads, l.n_kv_heads),
            (32, 4096, 14336, 32, 8)
        );
        assert_eq!(
            (l.head_dim, l.vocab_size, l.context_length),
            (128, 128256, 8192)
        );
        let s = SynthShape::preset("smollm2-135m").unwrap();
        assert_eq!(
            (s.n_layers, s.hidden, s.ffn, s.n_heads, s.n_kv_heads),
            (30, 576, 1536, 9, 3)
        );
        assert_eq!(SynthShape::preset("tiny-mqa").unwrap().n_kv_heads, 1);
        let err = SynthShape::preset("huge").unwrap_err().to_string();
        assert!(err.contains("huge") && err.contains("tiny"), "{err}");
    }

    #[test]
    fn llama3_8b_size_is_plausible_without_generating_it() {
        let s = SynthSpec {
            arch: Arch::Llama,
            shape: SynthShape::preset("llama3-8b").unwrap(),
            seed: 1,
            format: SynthFormat::Safetensors {
                dtype: GgmlType::BF16,
                shards: 4,
            },
            tokenizer: SynthTokenizer::Gpt2,
        };
        s.validate().unwrap();
        // 8.03 B parameters as BF16.
        let b = s.estimated_bytes().unwrap();
        assert_eq!(b, 8_030_261_248 * 2, "{b}");
    }

    #[test]
    fn type_names_parse() {
        assert_eq!(parse_ggml_type("q4_k").unwrap(), GgmlType::Q4K);
        assert_eq!(parse_ggml_type("Q8_0").unwrap(), GgmlType::Q8_0);
        assert_eq!(parse_ggml_type("bf16").unwrap(), GgmlType::BF16);
        assert!(parse_ggml_type("q2_k").is_err());
        assert_eq!(
            SynthTokenizer::parse("spm").unwrap(),
            SynthTokenizer::SentencePiece
        );
        assert!(SynthTokenizer::parse("wordpiece").is_err());
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec(
            Arch::Llama,
            SynthFormat::Gguf {
                weight_type: GgmlType::Q8_0,
            },
            0,
        );
        s.shape.vocab_size = 100;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("vocab size 100"));
        let s = spec(
            Arch::Llama,
            SynthFormat::Safetensors {
                dtype: GgmlType::Q4K,
                shards: 1,
            },
            0,
        );
        assert!(s.validate().is_err());
        let s = spec(
            Arch::Llama,
            SynthFormat::Safetensors {
                dtype: GgmlType::F32,
                shards: 0,
            },
            0,
        );
        assert!(s.validate().is_err());
        let s = spec(
            Arch::Llama,
            SynthFormat::Safetensors {
                dtype: GgmlType::F32,
                shards: 1000,
            },
            0,
        );
        assert!(s.validate().is_err());
        let mut s = spec(
            Arch::Llama,
            SynthFormat::Gguf {
                weight_type: GgmlType::Q8_0,
            },
            0,
        );
        s.shape.n_kv_heads = 3;
        assert!(s.validate().is_err());
    }

    /// Quantise → the crate's reference dequantiser → close to the input,
    /// within the grid step of each type.
    #[test]
    fn quantisers_round_trip_through_the_reference_dequantiser() {
        let key = tensor_key(7, "q");
        let mut x = vec![0f32; 1024];
        gen_row(key, Init::Normal(0.05), 0, &mut x);
        // A block of zeros, a constant block and an all-positive block.
        x[256..512].iter_mut().for_each(|v| *v = 0.0);
        x[512..544].iter_mut().for_each(|v| *v = 0.01);
        x[768..1024].iter_mut().for_each(|v| *v = v.abs() + 0.01);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 5e-4),
            (GgmlType::BF16, 4e-3),
            (GgmlType::Q8_0, 1.0 / 127.0),
            (GgmlType::Q4_0, 1.0 / 8.0),
            (GgmlType::Q4_1, 1.0 / 15.0),
            (GgmlType::Q4K, 1.0 / 8.0),
            (GgmlType::Q5K, 1.0 / 16.0),
            (GgmlType::Q6K, 1.0 / 31.0),
        ] {
            let mut bytes = Vec::new();
            quantize_row(ty, &x, &mut bytes).unwrap();
            assert_eq!(bytes.len(), ty.bytes_for(x.len()).unwrap(), "{ty:?}");
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &bytes, &mut y).unwrap();
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= tol * amax + 1e-7,
                "{ty:?}: max error {err}, amax {amax}"
            );
            assert!(
                y[256..512].iter().all(|&v| v == 0.0),
                "{ty:?}: zeros not exact"
            );
            // Not degenerate: the values carry the input's variation.
            let dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            let nx: f32 = x.iter().map(|a| a * a).sum();
            assert!(dot / nx > 0.95, "{ty:?}: correlation {}", dot / nx);
        }
        assert!(quantize_row(GgmlType::Q4K, &x[..100], &mut Vec::new()).is_err());
    }

    #[test]
    fn tiny_gguf_for_every_weight_type_opens_with_the_right_config() {
        let tmp = tempfile::tempdir().unwrap();
        for (i, ty) in ALL_GGUF_TYPES.into_iter().enumerate() {
            let arch = if i % 2 == 0 { Arch::Llama } else { Arch::Qwen2 };
            let s = spec(arch, SynthFormat::Gguf { weight_type: ty }, 3);
            let path = tmp.path().join(format!("tiny-{}.gguf", ty.name()));
            synth(&s, &path).unwrap();
            let m = ModelSource::open(&path).unwrap();
            assert_eq!(m.config, s.model_config(), "{ty:?}");
            let q = m.tensor("blk.1.attn_q.weight", &[256, 256]).unwrap();
            assert_eq!(q.ty, ty);
            let down = m.tensor("blk.0.ffn_down.weight", &[256, 512]).unwrap();
            assert_eq!(down.ty, ty);
            let embd = m.tensor("token_embd.weight", &[384, 256]).unwrap();
            let want_embd = if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1) {
                GgmlType::Q8_0
            } else {
                ty
            };
            assert_eq!(embd.ty, want_embd);
            assert_eq!(
                m.tensor("output_norm.weight", &[256]).unwrap().ty,
                GgmlType::F32
            );
            assert!(m.get("output.weight").is_none(), "tiny ties embeddings");
            assert_eq!(m.get("blk.0.attn_k.bias").is_some(), arch == Arch::Qwen2);
            // Values are sane: norms near 1, embedding std near 0.02.
            let norm = dequant(&m.tensor("blk.0.attn_norm.weight", &[256]).unwrap());
            assert!(norm.iter().all(|v| (0.8..1.2).contains(v)), "{ty:?}");
            let e = dequant(&embd);
            let std = (e.iter().map(|v| v * v).sum::<f32>() / e.len() as f32).sqrt();
            assert!((0.015..0.025).contains(&std), "{ty:?}: embedding std {std}");
            let tok = m.tokenizer().unwrap();
            assert_eq!(tok.vocab_size(), 384);
            assert_eq!(tok.bos_id(), Some(1));
            assert!(tok.eos_ids().contains(&2));
        }
        // Nothing but the GGUF files is left behind.
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            ALL_GGUF_TYPES.len()
        );
    }

    #[test]
    fn tiny_safetensors_one_and_three_shards_open_with_the_right_config() {
        let tmp = tempfile::tempdir().unwrap();
        for (shards, dtype, arch) in [
            (1, GgmlType::F32, Arch::Llama),
            (3, GgmlType::BF16, Arch::Qwen2),
            (3, GgmlType::F16, Arch::Llama),
        ] {
            let mut s = spec(arch, SynthFormat::Safetensors { dtype, shards }, 5);
            s.shape = SynthShape::preset("tiny-mqa").unwrap();
            let dir = tmp
                .path()
                .join(format!("{}-{shards}-{}", arch.name(), dtype.name()));
            synth(&s, &dir).unwrap();
            let m = ModelSource::open(&dir).unwrap();
            assert_eq!(m.config, s.model_config(), "{shards} shards");
            let k = m.tensor("blk.1.attn_k.weight", &[64, 256]).unwrap();
            assert_eq!(k.ty, dtype);
            assert_eq!(m.tensor("output.weight", &[384, 256]).unwrap().ty, dtype);
            let n_st = std::fs::read_dir(&dir)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".safetensors")
                })
                .count();
            assert_eq!(n_st, shards);
            assert_eq!(
                dir.join("model.safetensors.index.json").exists(),
                shards > 1
            );
            let tok = m.tokenizer().unwrap();
            assert_eq!(tok.vocab_size(), 384);
            // The tokenizer actually merges: common words are single tokens.
            let ids = tok.encode("the word", false).unwrap();
            assert_eq!(ids.len(), 2, "{ids:?}");
            assert_eq!(tok.decode(&ids, false).unwrap(), "the word");
        }
        // Re-synthesising with fewer shards replaces the old files.
        let dir = tmp.path().join("llama-3-F16");
        let s = spec(
            Arch::Llama,
            SynthFormat::Safetensors {
                dtype: GgmlType::F16,
                shards: 1,
            },
            5,
        );
        synth(&s, &dir).unwrap();
        assert!(!dir.join("model.safetensors.index.json").exists());
        assert_eq!(ModelSource::open(&dir).unwrap().config, s.model_config());
    }

    #[test]
    fn sentencepiece_tokenizer_loads_from_both_formats() {
        let tmp = tempfile::tempdir().unwrap();
        for format in [
            SynthFormat::Gguf {
                weight_type: GgmlType::Q8_0,
            },
            SynthFormat::Safetensors {
                dtype: GgmlType::F16,
                shards: 1,
            },
        ] {
            let mut s = spec(Arch::Llama, format, 1);
            s.tokenizer = SynthTokenizer::SentencePiece;
            let path = tmp.path().join(match format {
                SynthFormat::Gguf { .. } => "spm.gguf",
                _ => "spm",
            });
            synth(&s, &path).unwrap();
            let m = ModelSource::open(&path).unwrap();
            assert_eq!(m.config, s.model_config());
            let tok = m.tokenizer().unwrap();
            assert_eq!(tok.vocab_size(), 384, "{format:?}");
            assert_eq!(tok.bos_id(), Some(1));
            let ids = tok.encode("the they", true).unwrap();
            assert_eq!(ids.len(), 3, "{format:?}: {ids:?}");
            assert_eq!(ids[0], 1, "{format:?}: {ids:?}");
            assert_eq!(tok.decode(&ids, true).unwrap(), "the they", "{format:?}");
            // Characters outside the pieces fall back to byte tokens and round-trip.
            let ids = tok.encode("Zé!", false).unwrap();
            assert_eq!(
                tok.decode(&ids, true).unwrap(),
                "Zé!",
                "{format:?}: {ids:?}"
            );
        }
    }

    #[test]
    fn vocab_has_exactly_the_requested_size_and_valid_merges() {
        for kind in [SynthTokenizer::Gpt2, SynthTokenizer::SentencePiece] {
            for size in [min_vocab(kind), 384, 5000] {
                let v = build_vocab(kind, size).unwrap();
                assert_eq!(v.tokens.len(), size);
                let set: std::collections::HashSet<&String> = v.tokens.iter().collect();
                assert_eq!(set.len(), size, "duplicate tokens");
                for (a, b) in &v.merges {
                    assert!(set.contains(a) && set.contains(b) && set.contains(&format!("{a}{b}")));
                }
                assert_eq!(v.merges.len(), size - min_vocab(kind));
            }
        }
    }

    #[test]
    fn same_seed_same_bytes_other_seed_differs() {
        let tmp = tempfile::tempdir().unwrap();
        let g = |seed: u64, name: &str| {
            let p = tmp.path().join(name);
            synth(
                &spec(
                    Arch::Qwen2,
                    SynthFormat::Gguf {
                        weight_type: GgmlType::Q4K,
                    },
                    seed,
                ),
                &p,
            )
            .unwrap();
            std::fs::read(p).unwrap()
        };
        let (a, b, c) = (g(42, "a.gguf"), g(42, "b.gguf"), g(43, "c.gguf"));
        assert_eq!(a, b);
        assert_eq!(a.len(), c.len());
        assert_ne!(a, c);
        let st = |seed: u64, name: &str| {
            let d = tmp.path().join(name);
            let s = spec(
                Arch::Llama,
                SynthFormat::Safetensors {
                    dtype: GgmlType::BF16,
                    shards: 2,
                },
                seed,
            );
            synth(&s, &d).unwrap();
            let mut all = Vec::new();
            for f in [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "tokenizer.json",
            ] {
                all.extend(std::fs::read(d.join(f)).unwrap());
            }
            all
        };
        let (a, b, c) = (st(9, "x"), st(9, "y"), st(10, "z"));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    /// A GGUF and a safetensors checkpoint with the same seed hold the same
    /// model; llama Q/K rows follow llama.cpp's permutation in the GGUF.
    #[test]
    fn gguf_and_safetensors_hold_the_same_weights() {
        let tmp = tempfile::tempdir().unwrap();
        for arch in [Arch::Llama, Arch::Qwen2] {
            let g = tmp.path().join(format!("{}.gguf", arch.name()));
            let d = tmp.path().join(arch.name());
            synth(
                &spec(
                    arch,
                    SynthFormat::Gguf {
                        weight_type: GgmlType::F32,
                    },
                    11,
                ),
                &g,
            )
            .unwrap();
            synth(
                &spec(
                    arch,
                    SynthFormat::Safetensors {
                        dtype: GgmlType::F32,
                        shards: 2,
                    },
                    11,
                ),
                &d,
            )
            .unwrap();
            let (mg, md) = (
                ModelSource::open(&g).unwrap(),
                ModelSource::open(&d).unwrap(),
            );
            assert_eq!(mg.tensor_table(), md.tensor_table());
            for (name, _, shape) in mg.tensor_table() {
                let (a, b) = (
                    dequant(&mg.get(&name).unwrap()),
                    dequant(&md.get(&name).unwrap()),
                );
                let permuted = arch == Arch::Llama
                    && (name.contains("attn_q.weight") || name.contains("attn_k.weight"));
                if !permuted {
                    assert_eq!(a, b, "{name}");
                    continue;
                }
                let cols = shape[1];
                let hd = 64;
                for r in 0..shape[0] {
                    let (h, i) = (r / hd, r % hd);
                    let src = h * hd + (i % 2) * (hd / 2) + i / 2;
                    assert_eq!(
                        a[r * cols..(r + 1) * cols],
                        b[src * cols..(src + 1) * cols],
                        "{name} row {r}"
                    );
                }
                assert_ne!(a, b, "{name}: permutation had no effect");
            }
        }
    }

    #[test]
    fn shards_are_balanced_and_never_empty() {
        assert_eq!(assign_shards(&[10, 10, 10, 10], 2), vec![0, 0, 1, 1]);
        assert_eq!(assign_shards(&[100, 1, 1], 3), vec![0, 1, 2]);
        assert_eq!(assign_shards(&[1, 1, 100], 2), vec![0, 0, 1]);
        assert_eq!(assign_shards(&[5], 1), vec![0]);
        let s = assign_shards(&[7; 50], 7);
        for k in 0..7 {
            assert!(s.iter().filter(|&&x| x == k).count() >= 6, "{s:?}");
        }
    }

    #[test]
    fn rows_not_a_whole_block_fall_back() {
        assert_eq!(gguf_matrix_type(GgmlType::Q4K, 576), GgmlType::Q8_0);
        assert_eq!(gguf_matrix_type(GgmlType::Q6K, 1536), GgmlType::Q6K);
        assert_eq!(gguf_matrix_type(GgmlType::Q4_0, 40), GgmlType::F16);
        assert_eq!(gguf_matrix_type(GgmlType::BF16, 40), GgmlType::BF16);
    }
}
