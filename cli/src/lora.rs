//! LoRA adapters on the command line: `--lora NAME=DIR` for the workers
//! and `generate`, and `tandem model synth-lora`, which writes a seeded
//! random adapter for a model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tandem_engine::engine::AdapterLimits;
use tandem_engine::model::Model;
use tandem_model::lora::{LoraSynthSpec, Target};
use tandem_model::weights::ModelSource;

/// One `--lora NAME=DIR`: the adapter in DIR (PEFT's format), served
/// under NAME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraArg {
    pub name: String,
    pub dir: PathBuf,
}

impl std::str::FromStr for LoraArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, dir) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=DIR (the name requests give as their model, the adapter's directory)"))?;
        let name = name.trim();
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err(format!(
                "{s:?}: the adapter name must be non-empty, without spaces or commas"
            ));
        }
        if dir.is_empty() {
            return Err(format!("{s:?}: the adapter directory is empty"));
        }
        Ok(Self {
            name: name.to_string(),
            dir: PathBuf::from(dir),
        })
    }
}

/// The name of the one adapter of `generate --lora DIR` (see [`unnamed`]).
const UNNAMED: &str = "adapter";

impl std::fmt::Display for LoraArg {
    /// As given on the command line: `NAME=DIR`, or `DIR` for [`unnamed`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name == UNNAMED {
            write!(f, "{}", self.dir.display())
        } else {
            write!(f, "{}={}", self.name, self.dir.display())
        }
    }
}

/// The one adapter of `generate --lora DIR` or `bench engine --lora DIR`
/// (adapter 1), if given.
pub fn unnamed(dir: Option<&std::path::Path>) -> Vec<LoraArg> {
    dir.map(|d| LoraArg {
        name: UNNAMED.into(),
        dir: d.to_path_buf(),
    })
    .into_iter()
    .collect()
}

/// Refuses two adapters under one name.
pub fn check_names(loras: &[LoraArg]) -> Result<()> {
    for (i, a) in loras.iter().enumerate() {
        if loras[..i].iter().any(|b| b.name == a.name) {
            bail!("--lora {}: the name {:?} is given twice", a, a.name);
        }
    }
    Ok(())
}

/// Refuses an adapter named like the model the router serves: requests
/// naming it would get the base model, never the adapter.
pub fn check_not_served(loras: &[LoraArg], served: &str) -> Result<()> {
    if let Some(a) = loras.iter().find(|a| a.name == served) {
        bail!(
            "--lora {a}: {:?} is the served model's name, so requests for it would get the base model; name the adapter otherwise (or set --served-model-name)",
            a.name
        );
    }
    Ok(())
}

/// Loads each adapter (checked against `model`'s shapes and `limits`)
/// into `model`.
pub fn attach(model: &mut Model, loras: &[LoraArg], limits: AdapterLimits) -> Result<()> {
    check_names(loras)?;
    for (held, a) in loras.iter().enumerate() {
        let lora = tandem_model::lora::load(&a.dir, &model.config)
            .with_context(|| format!("--lora {a}"))?;
        limits
            .check(held, &a.name, &lora)
            .with_context(|| format!("--lora {a}"))?;
        tracing::info!(
            name = %a.name,
            rank = lora.rank,
            projections = lora.n_pairs(),
            "LoRA adapter loaded"
        );
        model
            .add_adapter(&a.name, lora)
            .with_context(|| format!("--lora {a}"))?;
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct SynthLoraArgs {
    /// The base model the adapter is for (a .gguf file or a Hugging Face
    /// directory; default: the installed default model).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Rank of the update matrices.
    #[arg(long, default_value_t = 8, value_parser = crate::positive)]
    pub rank: usize,
    /// `lora_alpha`: the update is scaled by alpha / rank.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Projections to adapt, comma-separated: q_proj, k_proj, v_proj,
    /// o_proj, gate_proj, up_proj, down_proj, or `all`.
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// Standard deviation of the B matrices' entries: how far the adapter
    /// moves the model.
    #[arg(long, default_value_t = 0.02)]
    pub b_std: f32,
    /// Seed: every value is a pure function of (seed, tensor name, index).
    #[arg(long)]
    pub seed: u64,
    /// Output directory (adapter_config.json and adapter_model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_targets(s: &str) -> Result<Vec<Target>> {
    if s.trim() == "all" {
        return Ok(Target::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim) {
        let t = Target::from_module(name).with_context(|| {
            format!("--targets {name:?}: expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all")
        })?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

pub fn run_synth(args: SynthLoraArgs) -> Result<()> {
    if !(args.alpha.is_finite() && args.b_std.is_finite() && args.b_std >= 0.0) {
        bail!("--alpha and --b-std must be finite, --b-std at least 0");
    }
    let targets = parse_targets(&args.targets)?;
    let path = crate::model_path(args.model.clone())?;
    let src = ModelSource::open(&path).context("loading the model")?;
    let spec = LoraSynthSpec {
        rank: args.rank,
        alpha: args.alpha,
        targets,
        seed: args.seed,
        b_std: args.b_std,
    };
    tandem_model::lora::synth(&src.config, &spec, &args.out)
        .with_context(|| format!("writing the adapter to {}", args.out.display()))?;
    eprintln!(
        "wrote a rank-{} LoRA adapter for {} to {}",
        args.rank,
        path.display(),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_flags_parse_and_refuse_clearly() {
        let a: LoraArg = "sql=/tmp/a=b".parse().unwrap();
        assert_eq!(a.name, "sql");
        assert_eq!(a.dir, PathBuf::from("/tmp/a=b"));
        for bad in ["nodir", "=dir", "a b=dir", "x=", "a,b=dir"] {
            assert!(bad.parse::<LoraArg>().is_err(), "{bad} should be refused");
        }
        let twice = vec![a.clone(), a];
        assert!(check_names(&twice).is_err());
        let err = check_not_served(&twice, "sql").unwrap_err().to_string();
        assert!(err.contains("served model"), "{err}");
        assert!(check_not_served(&twice, "smollm2").is_ok());
        assert_eq!(
            parse_targets("q_proj, v_proj,q_proj").unwrap(),
            vec![Target::Q, Target::V]
        );
        assert!(parse_targets("qkv").is_err());
    }
}
