//! `tandem model synth`: writes a seeded synthetic checkpoint (GGUF file or
//! Hugging Face directory) for any supported architecture and shape, through
//! `tandem_model::synth`. The same arguments always give the same bytes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tandem_model::synth::{
    parse_ggml_type, synth, Arch, SynthFormat, SynthShape, SynthSpec, SynthTokenizer,
};
use tandem_model::weights::ModelSource;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One .gguf file.
    Gguf,
    /// A Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    Safetensors,
}

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Architecture: llama, qwen2 or qwen3 (per-head query/key norms). With
    /// a mixture-of-experts shape, llama writes Mixtral, qwen3 Qwen3-MoE
    /// (both tiny-moe) and qwen2 Qwen2-MoE (tiny-moe-shared).
    #[arg(long, env = "TANDEM_SYNTH_ARCH")]
    pub arch: String,
    /// Shape preset: tiny, tiny-mqa, tiny-moe (4 experts, 2 used),
    /// tiny-moe-shared (the same with a shared expert),
    /// smollm2-135m, moe-8x135m (smollm2-135m with 8 experts of half its FFN, 2 used), llama3-8b.
    #[arg(long, env = "TANDEM_SYNTH_SHAPE")]
    pub shape: String,
    /// Seed: every weight is a pure function of (seed, tensor name, index).
    #[arg(long, env = "TANDEM_SYNTH_SEED")]
    pub seed: u64,
    /// Output: a .gguf file, or a directory for safetensors (no env var on
    /// purpose: a stray variable should never choose what gets overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Output format (default: gguf when --out ends in .gguf, else safetensors).
    #[arg(long, value_enum, env = "TANDEM_SYNTH_FORMAT")]
    pub format: Option<Format>,
    /// GGUF matrix type: f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q5_k, q6_k [default: q8_0].
    #[arg(long, env = "TANDEM_SYNTH_WEIGHT_TYPE")]
    pub weight_type: Option<String>,
    /// Safetensors dtype: f32, f16 or bf16 [default: bf16].
    #[arg(long, env = "TANDEM_SYNTH_DTYPE")]
    pub dtype: Option<String>,
    /// Safetensors files to split the weights over (1 = model.safetensors) [default: 1].
    #[arg(long, env = "TANDEM_SYNTH_SHARDS")]
    pub shards: Option<usize>,
    /// Tokenizer: gpt2 (byte-level BPE, ChatML) or sentencepiece.
    #[arg(long, env = "TANDEM_SYNTH_TOKENIZER", default_value = "gpt2")]
    pub tokenizer: String,
}

impl SynthArgs {
    /// The spec these arguments describe (validated by `synth` itself).
    pub fn spec(&self) -> Result<SynthSpec> {
        let arch = Arch::parse(&self.arch).with_context(|| format!("--arch {}", self.arch))?;
        let shape = SynthShape::preset(&self.shape).context("--shape")?;
        let tokenizer = SynthTokenizer::parse(&self.tokenizer).context("--tokenizer")?;
        let format = match self.format() {
            Format::Gguf => {
                let name = self.weight_type.as_deref().unwrap_or("q8_0");
                SynthFormat::Gguf {
                    weight_type: parse_ggml_type(name)
                        .with_context(|| format!("--weight-type {name}"))?,
                }
            }
            Format::Safetensors => {
                let name = self.dtype.as_deref().unwrap_or("bf16");
                SynthFormat::Safetensors {
                    dtype: parse_ggml_type(name).with_context(|| format!("--dtype {name}"))?,
                    shards: self.shards.unwrap_or(1),
                }
            }
        };
        Ok(SynthSpec {
            arch,
            shape,
            seed: self.seed,
            format,
            tokenizer,
        })
    }
}

impl SynthArgs {
    fn format(&self) -> Format {
        self.format.unwrap_or_else(|| default_format(&self.out))
    }

    /// Flags that the chosen format does not use (set on the command line
    /// or in the environment): worth a warning, since they change nothing.
    fn ignored_flags(&self) -> Vec<&'static str> {
        match self.format() {
            Format::Gguf => [
                ("--dtype", self.dtype.is_some()),
                ("--shards", self.shards.is_some()),
            ]
            .into_iter()
            .filter_map(|(f, set)| set.then_some(f))
            .collect(),
            Format::Safetensors => {
                if self.weight_type.is_some() {
                    vec!["--weight-type"]
                } else {
                    vec![]
                }
            }
        }
    }
}

fn default_format(out: &Path) -> Format {
    if out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        Format::Gguf
    } else {
        Format::Safetensors
    }
}

/// Total bytes of a file, or of the regular files directly inside a directory.
fn written_bytes(path: &Path) -> Result<u64> {
    let md = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if md.is_file() {
        return Ok(md.len());
    }
    let mut total = 0;
    for e in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let md = e?.metadata()?;
        if md.is_file() {
            total += md.len();
        }
    }
    Ok(total)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

pub fn run(args: SynthArgs) -> Result<()> {
    let spec = args.spec()?;
    for flag in args.ignored_flags() {
        eprintln!(
            "warning: {flag} does not apply to {:?} output; ignored",
            args.format()
        );
    }
    if let SynthFormat::Gguf { .. } = spec.format {
        if args.out.is_dir() {
            bail!(
                "--out {} is a directory; a GGUF needs a file path (or pass --format safetensors)",
                args.out.display()
            );
        }
    } else if args.out.is_file() {
        bail!(
            "--out {} is a file; safetensors output is a directory (or pass --format gguf)",
            args.out.display()
        );
    }
    spec.validate().context("invalid synthetic model spec")?;
    let data = spec.estimated_bytes().context("sizing the checkpoint")?;
    eprintln!(
        "writing {} {} (seed {}, {:?}) to {}: about {} of tensor data",
        spec.arch.name(),
        args.shape,
        spec.seed,
        spec.format,
        args.out.display(),
        human(data)
    );
    synth(&spec, &args.out).with_context(|| format!("writing {}", args.out.display()))?;

    // Report from what was written, read back as any loader would.
    let src = ModelSource::open(&args.out)
        .with_context(|| format!("reopening {}", args.out.display()))?;
    let table = src.tensor_table();
    let params: u64 = table
        .iter()
        .map(|(_, _, shape)| shape.iter().product::<usize>() as u64)
        .sum();
    let bytes = written_bytes(&args.out)?;
    let c = &src.config;
    println!(
        "wrote {}: {} ({bytes} bytes), {params} parameters in {} tensors; {} layers, hidden {}, ffn {}, {}/{} heads of {}, vocab {}",
        args.out.display(),
        human(bytes),
        table.len(),
        c.n_layers,
        c.hidden,
        c.ffn,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.vocab_size
    );
    if let Some(m) = &c.moe {
        println!(
            "  mixture of experts: {} experts of ffn {} per layer, {} used per token",
            m.experts, m.expert_ffn, m.experts_used
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(default_format(Path::new("a/b.gguf")), Format::Gguf);
        assert_eq!(default_format(Path::new("a/B.GGUF")), Format::Gguf);
        assert_eq!(default_format(Path::new("a/b")), Format::Safetensors);
        assert_eq!(
            default_format(Path::new("a/b.gguf.d/")),
            Format::Safetensors
        );
    }

    fn args(v: &[&str]) -> SynthArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            a: SynthArgs,
        }
        let mut argv = vec!["synth"];
        argv.extend_from_slice(v);
        W::try_parse_from(argv).unwrap().a
    }

    #[test]
    fn flags_make_the_spec() {
        let a = args(&[
            "--arch",
            "qwen2",
            "--shape",
            "tiny-mqa",
            "--seed",
            "7",
            "--out",
            "x.gguf",
            "--weight-type",
            "q4_k",
        ]);
        let s = a.spec().unwrap();
        assert_eq!(s.arch, Arch::Qwen2);
        assert_eq!(s.seed, 7);
        assert_eq!(s.shape, SynthShape::preset("tiny-mqa").unwrap());
        assert_eq!(
            s.format,
            SynthFormat::Gguf {
                weight_type: tandem_model::quant::GgmlType::Q4K
            }
        );
        assert_eq!(s.tokenizer, SynthTokenizer::Gpt2);
        assert!(a.ignored_flags().is_empty());

        let a = args(&[
            "--arch",
            "llama",
            "--shape",
            "tiny",
            "--seed",
            "1",
            "--out",
            "dir",
            "--shards",
            "2",
            "--tokenizer",
            "spm",
        ]);
        let s = a.spec().unwrap();
        assert_eq!(
            s.format,
            SynthFormat::Safetensors {
                dtype: tandem_model::quant::GgmlType::BF16,
                shards: 2
            }
        );
        assert_eq!(s.tokenizer, SynthTokenizer::SentencePiece);

        let a = args(&[
            "--arch", "llama", "--shape", "tiny", "--seed", "1", "--out", "m.gguf", "--dtype",
            "f16", "--shards", "2",
        ]);
        assert_eq!(a.ignored_flags(), vec!["--dtype", "--shards"]);
        let a = args(&[
            "--arch",
            "llama",
            "--shape",
            "tiny",
            "--seed",
            "1",
            "--out",
            "m.gguf",
            "--format",
            "safetensors",
            "--weight-type",
            "q4_k",
        ]);
        assert_eq!(a.ignored_flags(), vec!["--weight-type"]);

        for (flag, bad) in [
            ("--arch", "gpt3"),
            ("--shape", "huge"),
            ("--weight-type", "q3_k"),
            ("--tokenizer", "wordpiece"),
        ] {
            let mut v = vec![
                "--arch", "llama", "--shape", "tiny", "--seed", "1", "--out", "m.gguf",
            ];
            match v.iter().position(|a| *a == flag) {
                Some(i) => v[i + 1] = bad,
                None => v.extend_from_slice(&[flag, bad]),
            }
            let err = format!("{:#}", args(&v).spec().unwrap_err());
            assert!(err.contains(bad), "{flag} {bad}: {err}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(12), "12 B");
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(3 * 1024 * 1024), "3.00 MiB");
    }
}
