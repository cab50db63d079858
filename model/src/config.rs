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
    /// A mixture-of-experts FFN in every layer (Mixtral, Qwen2-MoE,
    /// Qwen3-MoE) in place of the dense one. Left out of the serialised config when
    /// absent, so a dense model's fingerprint is what it always was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
}

/// A sparse mixture-of-experts FFN: a linear router scores the `experts`
/// SwiGLU experts for each token, and the token runs through its
/// `experts_used` best, their outputs summed with the router's softmax
/// weights (Mixtral, Qwen2-MoE, Qwen3-MoE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoeConfig {
    pub experts: usize,
    pub experts_used: usize,
    /// Each expert's intermediate size.
    pub expert_ffn: usize,
    /// The chosen experts' softmax weights are rescaled to sum to one
    /// (Mixtral always; Qwen-MoE when its config says so).
    pub norm_topk_prob: bool,
    /// The intermediate size of an expert every token runs through, its
    /// output scaled by a sigmoid gate of its own (Qwen2-MoE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_ffn: Option<usize>,
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
        if let Some(m) = &self.moe {
            if m.experts == 0 || m.experts_used == 0 || m.experts_used > m.experts {
                return bad(format!(
                    "{} experts used of {}: must be between 1 and the expert count",
                    m.experts_used, m.experts
                ));
            }
            if m.expert_ffn == 0 {
                return bad("the experts' intermediate size is zero".into());
            }
        }
        Ok(())
    }

    /// Reads `{arch}.*` keys. Tensor presence decides tied embeddings and q/k/v bias.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch_name = meta_str(file, "general.architecture")?;
        // llama.cpp names the Qwen mixtures architectures of their own;
        // Mixtral is a llama with experts.
        let arch = match arch_name {
            "qwen2moe" => Arch::Qwen2,
            "qwen3moe" => Arch::Qwen3,
            other => Arch::parse(other)?,
        };
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
        let ffn = meta_usize(file, &k("feed_forward_length"))?;
        let moe = match file.get(&k("expert_count")) {
            None => None,
            Some(v) => {
                let experts = v
                    .as_u64()
                    .ok_or_else(|| type_err(&k("expert_count"), "integer"))?
                    as usize;
                let expert_ffn = match file.get(&k("expert_feed_forward_length")) {
                    Some(_) => meta_usize(file, &k("expert_feed_forward_length"))?,
                    None => ffn,
                };
                let qwen2moe = arch_name == "qwen2moe";
                let shared_expert_ffn = if qwen2moe {
                    Some(meta_usize(file, &k("expert_shared_feed_forward_length"))?)
                } else {
                    None
                };
                // llama.cpp renormalises the chosen weights of Mixtral and
                // Qwen3-MoE, not of Qwen2-MoE.
                (experts > 0).then_some(MoeConfig {
                    experts,
                    experts_used: meta_usize(file, &k("expert_used_count"))?,
                    expert_ffn,
                    norm_topk_prob: !qwen2moe,
                    shared_expert_ffn,
                })
            }
        };
        if arch_name.ends_with("moe") && moe.is_none() {
            return Err(ModelError::MissingMetadata(k("expert_count")));
        }
        // Shared experts by count (DeepSeek's layout) are another design.
        if let Some(f) = file.get(&k("expert_shared_count")) {
            if f.as_u64() != Some(0) {
                return Err(ModelError::Config(format!(
                    "{}: shared experts are not supported",
                    k("expert_shared_count")
                )));
            }
        }
        let cfg = ModelConfig {
            arch,
            n_layers: meta_usize(file, &k("block_count"))?,
            hidden,
            ffn,
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
            moe,
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
        let arch = match model_type {
            "mixtral" => Arch::Llama,
            "qwen2_moe" => Arch::Qwen2,
            "qwen3_moe" => Arch::Qwen3,
            other => Arch::parse(other)?,
        };
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
        let moe = match model_type {
            "mixtral" => Some(MoeConfig {
                experts: num("num_local_experts")?,
                experts_used: num("num_experts_per_tok")?,
                expert_ffn: num("intermediate_size")?,
                norm_topk_prob: true,
                shared_expert_ffn: None,
            }),
            "qwen2_moe" | "qwen3_moe" => {
                // Layers that keep a dense MLP are not served: every layer
                // must be sparse.
                let step = v.get("decoder_sparse_step").and_then(|x| x.as_u64());
                let dense_layers = v
                    .get("mlp_only_layers")
                    .and_then(|x| x.as_array())
                    .is_some_and(|a| !a.is_empty());
                if step.is_some_and(|s| s != 1) || dense_layers {
                    return Err(ModelError::Config(
                        format!("config.json: {model_type} with dense layers (decoder_sparse_step > 1 or mlp_only_layers) is not supported"),
                    ));
                }
                let shared_expert_ffn = match model_type {
                    "qwen2_moe" => Some(num("shared_expert_intermediate_size")?).filter(|&n| n > 0),
                    _ => None,
                };
                Some(MoeConfig {
                    experts: num("num_experts")?,
                    experts_used: num("num_experts_per_tok")?,
                    expert_ffn: num("moe_intermediate_size")?,
                    norm_topk_prob: v
                        .get("norm_topk_prob")
                        .and_then(|x| x.as_bool())
                        .unwrap_or(false),
                    shared_expert_ffn,
                })
            }
            _ => None,
        };
        if model_type == "mixtral" {
            // Mixtral's sliding window changes attention for long prompts;
            // refused rather than silently attending too far.
            if let Some(w) = v.get("sliding_window").and_then(|x| x.as_u64()) {
                if (w as usize) < num("max_position_embeddings")? {
                    return Err(ModelError::Config(format!(
                        "config.json: a sliding window of {w} tokens is not supported"
                    )));
                }
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
            // Qwen2-MoE says whether it has them (its default: yes).
            qkv_bias: arch == Arch::Qwen2
                && v.get("qkv_bias").and_then(|x| x.as_bool()) != Some(false),
            qk_norm: arch == Arch::Qwen3,
            moe,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mixtral() -> serde_json::Value {
        serde_json::json!({
            "model_type": "mixtral", "hidden_size": 256, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 384, "max_position_embeddings": 512,
            "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": null,
        })
    }

    fn qwen3_moe() -> serde_json::Value {
        serde_json::json!({
            "model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 1024,
            "moe_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 384,
            "max_position_embeddings": 512, "num_experts": 16, "num_experts_per_tok": 4,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
        })
    }

    #[test]
    fn mixture_of_experts_configs_are_read() {
        let c = ModelConfig::from_hf_config(&mixtral(), true).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            c.moe,
            Some(MoeConfig {
                experts: 8,
                experts_used: 2,
                expert_ffn: 128,
                norm_topk_prob: true,
                shared_expert_ffn: None
            })
        );
        let c = ModelConfig::from_hf_config(&qwen3_moe(), true).unwrap();
        assert_eq!(c.arch, Arch::Qwen3);
        assert!(c.qk_norm);
        // Qwen3-MoE's own default does not renormalise.
        assert_eq!(
            c.moe,
            Some(MoeConfig {
                experts: 16,
                experts_used: 4,
                expert_ffn: 64,
                norm_topk_prob: false,
                shared_expert_ffn: None
            })
        );
        let mut v = qwen3_moe();
        v["norm_topk_prob"] = true.into();
        let c = ModelConfig::from_hf_config(&v, true).unwrap();
        assert!(c.moe.unwrap().norm_topk_prob);
        // Qwen2-MoE: Qwen3-MoE's routing, a shared expert, Q/K/V biases.
        let mut v = qwen3_moe();
        v["model_type"] = "qwen2_moe".into();
        v["shared_expert_intermediate_size"] = 512.into();
        let c = ModelConfig::from_hf_config(&v, true).unwrap();
        assert_eq!((c.arch, c.qkv_bias, c.qk_norm), (Arch::Qwen2, true, false));
        assert_eq!(c.moe.unwrap().shared_expert_ffn, Some(512));
        v["qkv_bias"] = false.into();
        assert!(!ModelConfig::from_hf_config(&v, true).unwrap().qkv_bias);
        // A dense model's serialised config (and so its fingerprint) has
        // no trace of the field.
        let mut dense = mixtral();
        dense["model_type"] = "llama".into();
        let c = ModelConfig::from_hf_config(&dense, true).unwrap();
        assert_eq!(c.moe, None);
        assert!(!serde_json::to_string(&c).unwrap().contains("moe"));
    }

    #[test]
    fn unservable_mixtures_are_refused_with_the_reason() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                {
                    let mut v = qwen3_moe();
                    v["mlp_only_layers"] = serde_json::json!([1]);
                    v
                },
                "dense layers",
            ),
            (
                {
                    let mut v = qwen3_moe();
                    v["decoder_sparse_step"] = 2.into();
                    v
                },
                "dense layers",
            ),
            (
                {
                    let mut v = mixtral();
                    v["sliding_window"] = 128.into();
                    v
                },
                "sliding window",
            ),
            (
                {
                    let mut v = mixtral();
                    v["num_experts_per_tok"] = 9.into();
                    v
                },
                "experts used",
            ),
            (
                {
                    let mut v = mixtral();
                    v["num_local_experts"] = 0.into();
                    v
                },
                "experts used",
            ),
            (
                {
                    let mut v = qwen3_moe();
                    v.as_object_mut().unwrap().remove("moe_intermediate_size");
                    v
                },
                "moe_intermediate_size",
            ),
        ];
        for (v, why) in cases {
            let err = ModelConfig::from_hf_config(&v, true)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{err} (wanted {why:?})");
        }
        // A window as long as the context changes nothing: served.
        let mut v = mixtral();
        v["sliding_window"] = 512.into();
        assert!(ModelConfig::from_hf_config(&v, true).is_ok());
    }
}
