//! The model's hyper-parameters, read from GGUF metadata or `config.json`.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// Supported architecture families. Mistral is a llama for our purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen2's layout without the Q/K/V bias, with each query and key head
    /// RMS-normalised before RoPE.
    Qwen3,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "mistral" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
///
/// llama.cpp's converter permutes the rows of llama Q/K weights so that the
/// rotated pairs are adjacent (`Interleaved`, pairs `(2i, 2i+1)`); Hugging Face
/// checkpoints and qwen2 GGUFs rotate the two halves (`Neox`, pairs `(i, i+d/2)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    Interleaved,
    Neox,
}

/// RoPE frequency scaling, where the model declares one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    pub vocab_size: usize,
    pub context_length: usize,
    /// The LM head reuses the token embedding.
    pub tie_embeddings: bool,
    /// Q/K/V projections carry a bias (qwen2).
    pub qkv_bias: bool,
    /// Each query and key head is RMS-normalised (its own weights, one per
    /// head dimension, shared by the heads) before RoPE (qwen3).
    #[serde(default)]
    pub qk_norm: bool,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.n_layers == 0 || self.hidden == 0 || self.ffn == 0 || self.vocab_size == 0 {
            return bad(format!("zero-sized dimension in {self:?}"));
        }
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad(format!(
                "head_count {} must be a non-zero multiple of head_count_kv {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even", self.head_dim));
        }
        if self.context_length == 0 {
            return bad("context length is zero".into());
        }
        // NaN is not positive either.
        let positive = |x: f32| x.partial_cmp(&0.0) == Some(std::cmp::Ordering::Greater);
        if !positive(self.rms_eps) || !positive(self.rope_theta) {
            return bad("rms epsilon and rope base must be positive".into());
        }
        Ok(())
    }

    /// Reads `{arch}.*` keys. Tensor presence decides tied embeddings and q/k/v bias.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch_name = meta_str(file, "general.architecture")?;
        let arch = Arch::parse(arch_name)?;
        let k = |s: &str| format!("{arch_name}.{s}");
        let hidden = meta_usize(file, &k("embedding_length"))?;
        let n_heads = meta_usize(file, &k("attention.head_count"))?;
        let n_kv_heads = match file.get(&k("attention.head_count_kv")) {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| type_err(&k("attention.head_count_kv"), "integer"))?
                as usize,
            None => n_heads,
        };
        let head_dim = match file.get(&k("attention.key_length")) {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| type_err(&k("attention.key_length"), "integer"))?
                as usize,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let vocab_size = match file.get(&k("vocab_size")) {
            Some(v) => {
                v.as_u64()
                    .ok_or_else(|| type_err(&k("vocab_size"), "integer"))? as usize
            }
            None => match file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
                Some(a) => a.len(),
                None => file
                    .tensor_info("token_embd.weight")
                    .and_then(|t| t.dims.get(1).copied())
                    .ok_or_else(|| ModelError::MissingMetadata(k("vocab_size")))?
                    as usize,
            },
        };
        let rope_scaling = match file.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: meta_f32(file, &k("rope.scaling.factor"))?,
            },
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "unsupported rope scaling type '{other}'"
                )))
            }
        };
        let cfg = ModelConfig {
            arch,
            n_layers: meta_usize(file, &k("block_count"))?,
            hidden,
            ffn: meta_usize(file, &k("feed_forward_length"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_theta: match file.get(&k("rope.freq_base")) {
                Some(_) => meta_f32(file, &k("rope.freq_base"))?,
                None => 10000.0,
            },
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 | Arch::Qwen3 => RopeStyle::Neox,
            },
            rope_scaling,
            rms_eps: meta_f32(file, &k("attention.layer_norm_rms_epsilon"))?,
            vocab_size,
            context_length: meta_usize(file, &k("context_length"))?,
            tie_embeddings: file.tensor_info("output.weight").is_none(),
            qkv_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
            qk_norm: file.tensor_info("blk.0.attn_q_norm.weight").is_some(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`. `has_lm_head` says whether the
    /// checkpoint carries `lm_head.weight` (some tie without saying so).
    pub fn from_hf_config(v: &serde_json::Value, has_lm_head: bool) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .ok_or_else(|| ModelError::Config("config.json has no model_type".into()))?;
        let arch = Arch::parse(model_type)?;
        let num = |key: &str| -> Result<usize> {
            v.get(key)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| {
                    ModelError::Config(format!("config.json: missing or invalid '{key}'"))
                })
        };
        let float = |key: &str, default: f64| -> Result<f32> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default as f32),
                Some(x) => x.as_f64().map(|f| f as f32).ok_or_else(|| {
                    ModelError::Config(format!("config.json: '{key}' is not a number"))
                }),
            }
        };
        let hidden = num("hidden_size")?;
        let n_heads = num("num_attention_heads")?;
        let n_kv_heads = num("num_key_value_heads").unwrap_or(n_heads);
        let head_dim = match v.get("head_dim").and_then(|x| x.as_u64()) {
            Some(h) => h as usize,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(serde_json::Value::Null) => RopeScaling::None,
            Some(rs) => {
                let ty = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(|x| x.as_str())
                    .unwrap_or("default");
                let f = |key: &str| -> Result<f32> {
                    rs.get(key)
                        .and_then(|x| x.as_f64())
                        .map(|x| x as f32)
                        .ok_or_else(|| ModelError::Config(format!("rope_scaling: missing '{key}'")))
                };
                match ty {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: f("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position: f("original_max_position_embeddings")?,
                    },
                    other => {
                        return Err(ModelError::Config(format!(
                            "unsupported rope scaling type '{other}'"
                        )))
                    }
                }
            }
        };
        // Llama's and Qwen3's optional biases also add one to the output
        // projection (and the MLP's): weights the forward pass has no
        // place for, so refused rather than silently dropped.
        for key in ["attention_bias", "mlp_bias"] {
            if arch != Arch::Qwen2 && v.get(key).and_then(|x| x.as_bool()) == Some(true) {
                return Err(ModelError::Config(format!(
                    "config.json: '{key}: true' (projection biases) is not supported for {}",
                    arch.name()
                )));
            }
        }
        let tie = v
            .get("tie_word_embeddings")
            .and_then(|x| x.as_bool())
            .unwrap_or(false)
            || !has_lm_head;
        let cfg = ModelConfig {
            arch,
            n_layers: num("num_hidden_layers")?,
            hidden,
            ffn: num("intermediate_size")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_theta: float("rope_theta", 10000.0)?,
            rope_style: RopeStyle::Neox,
            rope_scaling,
            rms_eps: float("rms_norm_eps", 1e-6)?,
            vocab_size: num("vocab_size")?,
            context_length: num("max_position_embeddings")?,
            tie_embeddings: tie,
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Qwen3,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn type_err(key: &str, expected: &'static str) -> ModelError {
    ModelError::MetadataType {
        key: key.to_string(),
        expected,
    }
}

fn meta_str<'a>(file: &'a GgufFile, key: &str) -> Result<&'a str> {
    file.get(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?
        .as_str()
        .ok_or_else(|| type_err(key, "string"))
}

fn meta_usize(file: &GgufFile, key: &str) -> Result<usize> {
    Ok(file
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?
        .as_u64()
        .ok_or_else(|| type_err(key, "unsigned integer"))? as usize)
}

fn meta_f32(file: &GgufFile, key: &str) -> Result<f32> {
    Ok(file
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?
        .as_f64()
        .ok_or_else(|| type_err(key, "number"))? as f32)
}
