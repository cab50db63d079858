//! LoRA adapters in PEFT's on-disk format: a directory holding
//! `adapter_config.json` and `adapter_model.safetensors`.
//!
//! An adapter adds `scale · B·(A·x)` to the output of some of a layer's
//! projections, with `A` of `rank × in` and `B` of `out × rank`. Many
//! adapters of one base model can then share its weights, each request
//! naming the adapter it runs with (S-LoRA). What is read here is checked
//! against the base model's shapes at load, so a mismatched adapter is an
//! error naming the tensor, never a wrong answer later.
//!
//! The matrices are kept in Hugging Face's row order, except that on a
//! model whose llama Q/K rows llama.cpp permuted (GGUF llama, interleaved
//! rotary pairs), `B`'s rows of `q_proj` and `k_proj` are permuted the
//! same way, so the delta lands on the rows the engine's weights hold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::config::{ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// A projection an adapter may target, by its Hugging Face module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module name in Hugging Face checkpoints and PEFT configs.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_module(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.module() == name)
    }

    /// `(in, out)` features of this projection in `cfg`.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let (q, kv) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        match self {
            Target::Q => (cfg.hidden, q),
            Target::K | Target::V => (cfg.hidden, kv),
            Target::O => (q, cfg.hidden),
            Target::Gate | Target::Up => (cfg.hidden, cfg.ffn),
            Target::Down => (cfg.ffn, cfg.hidden),
        }
    }
}

/// One projection's low-rank update.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `rank × in`, row-major.
    pub a: Vec<f32>,
    /// `out × rank`, row-major (rows permuted as the base model's, see the
    /// module docs).
    pub b: Vec<f32>,
    pub rank: usize,
    /// `lora_alpha / rank` (or `/ √rank` with rsLoRA).
    pub scale: f32,
}

/// A loaded adapter, checked against its base model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub dir: PathBuf,
    pub rank: usize,
    pub alpha: f32,
    /// Per layer, the projections this adapter updates.
    pub layers: Vec<BTreeMap<Target, LoraPair>>,
    /// sha256 (hex) of the weights file and the config: what two nodes
    /// compare to know they run the same adapter.
    pub fingerprint: String,
}

impl LoraAdapter {
    /// The number of projections updated, over all layers.
    pub fn n_pairs(&self) -> usize {
        self.layers.iter().map(|l| l.len()).sum()
    }
}

fn bad(dir: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Other(format!("LoRA adapter {}: {}", dir.display(), reason.into()))
}

/// What this reader takes from `adapter_config.json`.
struct AdapterConfig {
    rank: usize,
    alpha: f32,
    rslora: bool,
}

fn read_config(dir: &Path) -> Result<(AdapterConfig, Vec<u8>)> {
    let bytes = std::fs::read(dir.join(ADAPTER_CONFIG))
        .map_err(|e| bad(dir, format!("cannot read {ADAPTER_CONFIG}: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| bad(dir, format!("{ADAPTER_CONFIG} is not JSON: {e}")))?;
    let peft_type = v
        .get("peft_type")
        .and_then(|t| t.as_str())
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(bad(
            dir,
            format!("peft_type {peft_type:?}: only LORA adapters are served"),
        ));
    }
    let rank = v
        .get("r")
        .and_then(|r| r.as_u64())
        .filter(|&r| r > 0)
        .ok_or_else(|| bad(dir, "\"r\" (the rank) must be a positive integer"))?
        as usize;
    let alpha = match v.get("lora_alpha") {
        None | Some(serde_json::Value::Null) => rank as f64,
        Some(a) => a
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| bad(dir, "\"lora_alpha\" must be a number"))?,
    } as f32;
    let flag = |key: &str| v.get(key).and_then(|b| b.as_bool()).unwrap_or(false);
    for (key, what) in [
        ("use_dora", "DoRA"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D layouts)"),
    ] {
        if flag(key) {
            return Err(bad(dir, format!("{what} is not supported")));
        }
    }
    if let Some(b) = v.get("bias").and_then(|b| b.as_str()) {
        if b != "none" {
            return Err(bad(
                dir,
                format!("bias {b:?}: only adapters without biases are served"),
            ));
        }
    }
    let nonempty = |key: &str| match v.get(key) {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    for key in ["modules_to_save", "rank_pattern", "alpha_pattern"] {
        if nonempty(key) {
            return Err(bad(dir, format!("{key:?} is not supported")));
        }
    }
    Ok((
        AdapterConfig {
            rank,
            alpha,
            rslora: flag("use_rslora"),
        },
        bytes,
    ))
}

/// `(layer, target, is_b)` of a PEFT tensor name such as
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`
/// (an adapter name before `.weight`, as in `lora_A.default.weight`, is
/// accepted).
fn parse_name(name: &str) -> Option<(usize, Target, bool)> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let mut parts = rest.split('.');
    let parent = parts.next()?;
    let target = Target::from_module(parts.next()?)?;
    if parent != target.parent() {
        return None;
    }
    let is_b = match parts.next()? {
        "lora_A" => false,
        "lora_B" => true,
        _ => return None,
    };
    let tail: Vec<&str> = parts.collect();
    match tail.as_slice() {
        ["weight"] | [_, "weight"] => Some((layer, target, is_b)),
        _ => None,
    }
}

/// llama.cpp's Q/K row permutation: the Hugging Face row at engine row `r`.
pub fn permuted_source_row(r: usize, head_dim: usize) -> usize {
    let (head, within) = (r / head_dim, r % head_dim);
    head * head_dim + (within % 2) * (head_dim / 2) + within / 2
}

/// Reads the adapter in `dir` and checks it against `cfg`, the base model
/// it is to run on.
pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<LoraAdapter> {
    let (ac, config_bytes) = read_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let cannot = |e: std::io::Error| bad(dir, format!("cannot read {ADAPTER_WEIGHTS}: {e}"));
    let file = std::fs::File::open(&path).map_err(cannot)?;
    // SAFETY: read-only map; the bytes are copied out before it is dropped.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(cannot)?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let scale = if ac.rslora {
        ac.alpha / (ac.rank as f32).sqrt()
    } else {
        ac.alpha / ac.rank as f32
    };
    type Halves = (Option<Vec<f32>>, Option<Vec<f32>>);
    let mut found: BTreeMap<(usize, Target), Halves> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let (layer, target, is_b) = parse_name(&name).ok_or_else(|| {
            bad(
                dir,
                format!(
                    "tensor {name}: only lora_A/lora_B of the layers' q/k/v/o and gate/up/down projections are served"
                ),
            )
        })?;
        if layer >= cfg.n_layers {
            return Err(bad(
                dir,
                format!("tensor {name}: the base model has {} layers", cfg.n_layers),
            ));
        }
        let (inp, out) = target.dims(cfg);
        let expected = if is_b {
            vec![out, ac.rank]
        } else {
            vec![ac.rank, inp]
        };
        if view.shape() != expected.as_slice() {
            return Err(ModelError::TensorShape {
                name: format!("{} (LoRA adapter {})", name, dir.display()),
                got: view.shape().to_vec(),
                expected,
            });
        }
        let ty = crate::safetensors_dir::dtype_to_ggml(view.dtype(), &name, &path)?;
        let mut values = vec![0f32; view.shape().iter().product()];
        crate::quant::dequantize_row(ty, view.data(), &mut values)?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad(dir, format!("tensor {name} holds a NaN or infinity")));
        }
        let slot = found.entry((layer, target)).or_default();
        let half = if is_b { &mut slot.1 } else { &mut slot.0 };
        if half.replace(values).is_some() {
            return Err(bad(dir, format!("tensor {name} is present twice")));
        }
    }
    if found.is_empty() {
        return Err(bad(dir, format!("{ADAPTER_WEIGHTS} holds no LoRA tensors")));
    }
    let permute = cfg.rope_style == RopeStyle::Interleaved;
    let mut layers = vec![BTreeMap::new(); cfg.n_layers];
    for ((layer, target), halves) in found {
        let (Some(a), Some(b)) = halves else {
            return Err(bad(
                dir,
                format!(
                    "layer {layer} {}: lora_A and lora_B come in pairs",
                    target.module()
                ),
            ));
        };
        let b = if permute && matches!(target, Target::Q | Target::K) {
            let r = ac.rank;
            let rows = b.len() / r;
            let mut p = vec![0f32; b.len()];
            for row in 0..rows {
                let src = permuted_source_row(row, cfg.head_dim);
                p[row * r..(row + 1) * r].copy_from_slice(&b[src * r..(src + 1) * r]);
            }
            p
        } else {
            b
        };
        layers[layer].insert(
            target,
            LoraPair {
                a,
                b,
                rank: ac.rank,
                scale,
            },
        );
    }
    let mut h = Sha256::new();
    h.update(&config_bytes);
    h.update(&mmap[..]);
    Ok(LoraAdapter {
        dir: dir.to_path_buf(),
        rank: ac.rank,
        alpha: ac.alpha,
        layers,
        fingerprint: hex::encode(&h.finalize()[..16]),
    })
}

/// What [`synth`] writes.
#[derive(Debug, Clone)]
pub struct LoraSynthSpec {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<Target>,
    pub seed: u64,
    /// Standard deviation of `B`'s entries (`A`'s is `1/√in`, so `A·x` of
    /// a normalised `x` has entries of about 1).
    pub b_std: f32,
}

/// Writes a seeded random adapter for a model of `cfg` into `out` (made if
/// absent), in PEFT's format: what tests and benchmarks serve when no
/// trained adapter is at hand. The same spec writes the same bytes.
pub fn synth(cfg: &ModelConfig, spec: &LoraSynthSpec, out: &Path) -> Result<()> {
    if spec.rank == 0 || spec.targets.is_empty() {
        return Err(ModelError::Config(
            "a LoRA adapter needs a rank of at least 1 and one target".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|cause| ModelError::Write {
        path: out.to_path_buf(),
        cause,
    })?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..cfg.n_layers {
        for &t in &spec.targets {
            let (inp, outp) = t.dims(cfg);
            let base = format!(
                "base_model.model.model.layers.{layer}.{}.{}",
                t.parent(),
                t.module()
            );
            for (half, rows, cols, std) in [
                ("lora_A", spec.rank, inp, 1.0 / (inp as f32).sqrt()),
                ("lora_B", outp, spec.rank, spec.b_std),
            ] {
                let name = format!("{base}.{half}.weight");
                let key = crate::synth::tensor_key(spec.seed, &name);
                let mut bytes = Vec::with_capacity(rows * cols * 4);
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    crate::synth::gen_row(key, crate::synth::Init::Normal(std), r, &mut row);
                    bytes.extend(row.iter().flat_map(|v| v.to_le_bytes()));
                }
                tensors.push((name, vec![rows, cols], bytes));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Other(format!("LoRA tensor {name}: {e}")))
        })
        .collect::<Result<_>>()?;
    let weights = out.join(ADAPTER_WEIGHTS);
    safetensors::serialize_to_file(views, None, &weights).map_err(|e| ModelError::Safetensors {
        path: weights.clone(),
        reason: e.to_string(),
    })?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "target_modules": spec.targets.iter().map(|t| t.module()).collect::<Vec<_>>(),
        "inference_mode": true,
    });
    let path = out.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("a JSON value prints");
    std::fs::write(&path, text + "\n").map_err(|cause| ModelError::Write { path, cause })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_and_without_an_adapter_name() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, Target::Q, false))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"),
            Some((0, Target::Down, true))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.q_proj.lora_B.weight"),
            None
        );
        assert_eq!(parse_name("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(
            parse_name("base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"),
            None
        );
    }

    #[test]
    fn the_permutation_is_a_bijection_per_head() {
        let hd = 8;
        let mut seen: Vec<usize> = (0..3 * hd).map(|r| permuted_source_row(r, hd)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..3 * hd).collect::<Vec<_>>());
    }
}
