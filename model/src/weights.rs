//! One view over both file formats: tensors by their GGUF names.
//!
//! The engine asks for `blk.3.attn_q.weight` whatever the file; Hugging Face
//! names are mapped here, so nothing downstream knows which format it runs.

use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::quant::GgmlType;
use crate::safetensors_dir::HfDir;
use crate::tokenizer::Tokenizer;

/// A tensor's bytes and how to read them. `shape` is row-major (outermost
/// first); for a weight matrix it is `[rows (outputs), cols (inputs)]`.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    pub ty: GgmlType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

enum Files {
    Gguf {
        file: GgufFile,
        shapes: Vec<Vec<usize>>,
    },
    Hf(HfDir),
}

/// An opened model: its files, config and tokenizer.
pub struct ModelSource {
    pub path: PathBuf,
    pub config: ModelConfig,
    files: Files,
}

impl ModelSource {
    /// Opens a `.gguf` file or a Hugging Face directory.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            cause: source,
        })?;
        if meta.is_dir() {
            let hf = HfDir::open(path)?;
            let has_lm_head = hf.tensor("lm_head.weight").is_some();
            let config = ModelConfig::from_hf_config(&hf.config, has_lm_head)?;
            Ok(Self {
                path: path.to_path_buf(),
                config,
                files: Files::Hf(hf),
            })
        } else {
            let file = GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&file)?;
            let shapes = file.tensors.iter().map(|t| t.shape()).collect();
            Ok(Self {
                path: path.to_path_buf(),
                config,
                files: Files::Gguf { file, shapes },
            })
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.files, Files::Gguf { .. })
    }

    /// The GGUF file, when the model is one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.files {
            Files::Gguf { file, .. } => Some(file),
            Files::Hf(_) => None,
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.files {
            Files::Gguf { file, .. } => Tokenizer::from_gguf(file),
            Files::Hf(hf) => Tokenizer::from_hf_dir(&hf.dir),
        }
    }

    /// A tensor by GGUF name, if present.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        match &self.files {
            Files::Gguf { file, shapes } => {
                let idx = file.tensors.iter().position(|t| t.name == name)?;
                let info = &file.tensors[idx];
                Some(TensorRef {
                    ty: info.ty,
                    shape: &shapes[idx],
                    bytes: file.tensor_bytes(info),
                })
            }
            Files::Hf(hf) => {
                let t = hf_names(name).iter().find_map(|n| hf.tensor(n))?;
                Some(TensorRef {
                    ty: t.ty,
                    shape: t.shape,
                    bytes: t.bytes,
                })
            }
        }
    }

    /// A tensor by GGUF name, checked against the expected row-major shape.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<TensorRef<'_>> {
        let t = self
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if t.shape != expected {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                got: t.shape.to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }

    /// Every tensor as (GGUF name, type, row-major shape), sorted by name.
    pub fn tensor_table(&self) -> Vec<(String, GgmlType, Vec<usize>)> {
        let mut v: Vec<(String, GgmlType, Vec<usize>)> = match &self.files {
            Files::Gguf { file, shapes } => file
                .tensors
                .iter()
                .zip(shapes)
                .map(|(t, s)| (t.name.clone(), t.ty, s.clone()))
                .collect(),
            Files::Hf(hf) => hf
                .tensor_names()
                .into_iter()
                .filter_map(|n| {
                    let g = gguf_name(&n)?;
                    let t = hf.tensor(&n)?;
                    Some((g, t.ty, t.shape.to_vec()))
                })
                .collect(),
        };
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// GGUF tensor names and their Hugging Face counterparts, per layer.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    // Qwen2-MoE's shared expert and its gate.
    ("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight"),
    (
        "ffn_gate_shexp.weight",
        "mlp.shared_expert.gate_proj.weight",
    ),
    ("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"),
    (
        "ffn_down_shexp.weight",
        "mlp.shared_expert.down_proj.weight",
    ),
];

const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Mixture-of-experts tensors per layer: the router, then each expert's
/// projections under llama.cpp's per-expert names (`ffn_gate.{e}.weight`;
/// a GGUF may instead stack them in one `ffn_gate_exps.weight`, which the
/// engine also reads). Hugging Face names differ by family: Mixtral's,
/// then Qwen-MoE's; `{e}` is the expert.
const MOE_NAMES: &[(&str, [&str; 2])] = &[
    (
        "ffn_gate_inp.weight",
        ["block_sparse_moe.gate.weight", "mlp.gate.weight"],
    ),
    (
        "ffn_gate.{e}.weight",
        [
            "block_sparse_moe.experts.{e}.w1.weight",
            "mlp.experts.{e}.gate_proj.weight",
        ],
    ),
    (
        "ffn_up.{e}.weight",
        [
            "block_sparse_moe.experts.{e}.w3.weight",
            "mlp.experts.{e}.up_proj.weight",
        ],
    ),
    (
        "ffn_down.{e}.weight",
        [
            "block_sparse_moe.experts.{e}.w2.weight",
            "mlp.experts.{e}.down_proj.weight",
        ],
    ),
];

/// `pattern` with `{e}` standing for a number matches `name`: that number
/// (0 when the pattern has no `{e}`).
fn match_expert(pattern: &str, name: &str) -> Option<usize> {
    match pattern.split_once("{e}") {
        None => (pattern == name).then_some(0),
        Some((pre, post)) => {
            let e = name.strip_prefix(pre)?.strip_suffix(post)?;
            if e.is_empty() || !e.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            e.parse().ok()
        }
    }
}

/// GGUF name → its Hugging Face name (the first where families differ).
pub fn hf_name(gguf: &str) -> Option<String> {
    hf_names(gguf).into_iter().next()
}

/// GGUF name → the Hugging Face names it may have, one per family that
/// names it differently (none for a name outside the model's tensors).
pub fn hf_names(gguf: &str) -> Vec<String> {
    if let Some((_, h)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == gguf) {
        return vec![h.to_string()];
    }
    let Some((layer, suffix)) = gguf
        .strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'))
    else {
        return vec![];
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return vec![];
    };
    if let Some((_, h)) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix) {
        return vec![format!("model.layers.{layer}.{h}")];
    }
    for (g, hs) in MOE_NAMES {
        if let Some(e) = match_expert(g, suffix) {
            return hs
                .iter()
                .map(|h| format!("model.layers.{layer}.{}", h.replace("{e}", &e.to_string())))
                .collect();
        }
    }
    vec![]
}

/// Hugging Face name → GGUF name.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if let Some((g, _)) = LAYER_NAMES.iter().find(|(_, h)| *h == suffix) {
        return Some(format!("blk.{layer}.{g}"));
    }
    MOE_NAMES.iter().find_map(|(g, hs)| {
        let e = hs.iter().find_map(|h| match_expert(h, suffix))?;
        Some(format!("blk.{layer}.{}", g.replace("{e}", &e.to_string())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [
            "token_embd.weight",
            "output.weight",
            "output_norm.weight",
            "blk.0.attn_q.weight",
            "blk.29.ffn_down.weight",
            "blk.3.attn_v.bias",
            "blk.1.ffn_gate_inp.weight",
            "blk.1.ffn_gate.7.weight",
            "blk.0.ffn_down.12.weight",
            "blk.1.ffn_gate_inp_shexp.weight",
            "blk.1.ffn_up_shexp.weight",
        ] {
            for h in hf_names(n) {
                assert_eq!(gguf_name(&h).as_deref(), Some(n), "{h}");
            }
            assert!(hf_name(n).is_some(), "{n}");
        }
        assert_eq!(
            hf_names("blk.2.ffn_up.3.weight"),
            [
                "model.layers.2.block_sparse_moe.experts.3.w3.weight",
                "model.layers.2.mlp.experts.3.up_proj.weight"
            ]
        );
        assert_eq!(hf_name("blk.0.ffn_gate.x.weight"), None);
        assert_eq!(
            gguf_name("model.layers.0.mlp.experts.-1.up_proj.weight"),
            None
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(gguf_name("model.layers.0.mystery.weight"), None);
    }
}
