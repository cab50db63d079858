//! `tandem model synth`: writes a seeded synthetic checkpoint (GGUF file or
//! Hugging Face directory) for any supported architecture and shape, through
//! `tandem_model::synth`. The same arguments always give the same bytes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tandem_model::synth::{parse_ggml_type, synth, Arch, SynthFormat, SynthShape, SynthSpec, SynthTokenizer};
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
    /// Architecture: llama or qwen2.
    #[arg(long, env = "TANDEM_SYNTH_ARCH")]
    pub arch: String,
    /// Shape preset: tiny, tiny-mqa, smollm2-135m, llama3-8b.
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
    /// GGUF matrix type: f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q5_k, q6_k.
    #[arg(long, env = "TANDEM_SYNTH_WEIGHT_TYPE", default_value = "q8_0")]
    pub weight_type: String,
    /// Safetensors dtype: f32, f16 or bf16.
    #[arg(long, env = "TANDEM_SYNTH_DTYPE", default_value = "bf16")]
    pub dtype: String,
    /// Safetensors files to split the weights over (1 = model.safetensors).
    #[arg(long, env = "TANDEM_SYNTH_SHARDS", default_value_t = 1)]
    pub shards: usize,
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
        let format = match self.format.unwrap_or_else(|| default_format(&self.out)) {
            Format::Gguf => SynthFormat::Gguf {
                weight_type: parse_ggml_type(&self.weight_type).with_context(|| format!("--weight-type {}", self.weight_type))?,
            },
            Format::Safetensors => SynthFormat::Safetensors {
                dtype: parse_ggml_type(&self.dtype).with_context(|| format!("--dtype {}", self.dtype))?,
                shards: self.shards,
            },
        };
        Ok(SynthSpec { arch, shape, seed: self.seed, format, tokenizer })
    }
}

fn default_format(out: &Path) -> Format {
    if out.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
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
    if let SynthFormat::Gguf { .. } = spec.format {
        if args.out.is_dir() {
            bail!("--out {} is a directory; a GGUF needs a file path (or pass --format safetensors)", args.out.display());
        }
    } else if args.out.is_file() {
        bail!("--out {} is a file; safetensors output is a directory (or pass --format gguf)", args.out.display());
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
    let src = ModelSource::open(&args.out).with_context(|| format!("reopening {}", args.out.display()))?;
    let table = src.tensor_table();
    let params: u64 = table.iter().map(|(_, _, shape)| shape.iter().product::<usize>() as u64).sum();
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
        assert_eq!(default_format(Path::new("a/b.gguf.d/")), Format::Safetensors);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(12), "12 B");
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(3 * 1024 * 1024), "3.00 MiB");
    }
}
