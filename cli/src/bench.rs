//! `tandem bench …`: benchmarks that print their figures (and write JSON).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use tandem_engine::executor::Executor;
use tandem_engine::kv::SeqKv;
use tandem_engine::model::{Logits, Model, SeqStep};
use tandem_engine::sampler::argmax;
use tandem_model::weights::ModelSource;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode throughput of the engine in-process.
    Engine(EngineArgs),
    /// KV transfer throughput over loopback (TCP, gRPC) against raw TCP.
    KvTransfer(kv::KvArgs),
    /// The cluster through its OpenAI API: TTFT colocated vs disaggregated, router latency.
    Serve(Box<serve::ServeArgs>),
    /// The CPU communicator's all-reduce latency against a raw loopback socket.
    Comm(comm::CommArgs),
    /// Prompt-lookup speculative decoding against plain decoding, greedy.
    Speculative(spec::SpecArgs),
}

#[path = "bench_comm.rs"]
mod comm;
#[path = "bench_kv.rs"]
mod kv;
#[path = "bench_serve.rs"]
mod serve;
#[path = "bench_spec.rs"]
mod spec;

#[derive(clap::Args)]
pub struct EngineArgs {
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    #[arg(long, env = "TANDEM_THREADS", value_parser = crate::thread_arg)]
    pub threads: Option<usize>,
    /// Keep an f32 copy of the weights for batched steps (auto|on|off).
    #[arg(long, env = "TANDEM_EXPAND_WEIGHTS", default_value = "auto")]
    pub expand_weights: tandem_engine::cpu::ExpandWeights,
    /// Prompt length for the prefill figure.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated for the decode figures.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Batch sizes for aggregate decode throughput (128-token prompts), e.g. 1,4,16,32,64.
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Shared system-prompt length for the prefix-cache TTFT figure (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub prefix_tokens: usize,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = crate::positive)]
    pub runs: usize,
    /// Also write the figures as JSON here.
    #[arg(long, value_parser = crate::output_file)]
    pub json: Option<PathBuf>,
    /// Run every sequence with the LoRA adapter in this directory (PEFT's
    /// format): what serving through an adapter costs.
    #[arg(long)]
    pub lora: Option<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Engine(a) => engine(a),
        BenchCommand::KvTransfer(a) => kv::run(a),
        BenchCommand::Serve(a) => serve::run(*a),
        BenchCommand::Comm(a) => comm::run(a),
        BenchCommand::Speculative(a) => spec::run(a),
    }
}

/// Deterministic prompt ids spread over the vocabulary (speed does not depend on them).
fn prompt_ids(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| {
            let z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03);
            (100 + (z >> 17) % (vocab as u64 - 100)) as u32
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Prefills `batch` sequences of `prompt` tokens, then decodes `gen` steps
/// with all of them in each forward call; returns decode seconds.
fn batched_decode(
    model: &Model,
    batch: usize,
    prompt: usize,
    gen: usize,
    adapter: u32,
) -> Result<f64> {
    Ok(decode_steps(model, batch, prompt, gen, adapter)?
        .iter()
        .sum())
}

/// [`batched_decode`] on any executor (a sharded worker too), returning
/// the seconds of each decode step.
pub(crate) fn decode_steps(
    model: &dyn Executor,
    batch: usize,
    prompt: usize,
    gen: usize,
    adapter: u32,
) -> Result<Vec<f64>> {
    let vocab = model.config().vocab_size;
    let mut pool = model.pool_for_tokens(batch * (prompt + gen + 16), 16);
    let mut seqs: Vec<SeqKv> = (0..batch)
        .map(|_| SeqKv {
            adapter,
            ..SeqKv::default()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| prompt_ids(prompt, vocab, b as u64))
        .collect();
    let mut next = Vec::with_capacity(batch);
    for (kv, p) in seqs.iter_mut().zip(&prompts) {
        let mut step = [SeqStep {
            kv,
            tokens: p,
            logits: Logits::Last,
        }];
        next.push(argmax(&model.forward(&mut pool, &mut step)?[0]));
    }
    let mut times = Vec::with_capacity(gen);
    for _ in 0..gen {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut steps: Vec<SeqStep<'_>> = seqs
            .iter_mut()
            .zip(&toks)
            .map(|(kv, t)| SeqStep {
                kv,
                tokens: t,
                logits: Logits::Last,
            })
            .collect();
        let t0 = Instant::now();
        let logits = model.forward(&mut pool, &mut steps)?;
        times.push(t0.elapsed().as_secs_f64());
        next = logits.iter().map(|l| argmax(l)).collect();
    }
    Ok(times)
}

/// Time to first token through the scheduler for a request whose first
/// `shared` tokens (a system prompt) are cold, then for a different request
/// with the same system prompt, served from the radix prefix cache.
fn prefix_ttft(model: &Model, shared: usize, runs: usize, adapter: u32) -> Result<(f64, f64)> {
    use tandem_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
    let vocab = model.config.vocab_size;
    let system = prompt_ids(shared, vocab, 99);
    let ttft = |sched: &mut Scheduler, id: u64| -> Result<f64> {
        let mut prompt = system.clone();
        prompt.extend(prompt_ids(24, vocab, 1000 + id));
        let (tx, rx) = std::sync::mpsc::channel();
        let req = Request {
            id,
            prompt,
            params: Default::default(),
            max_tokens: Some(1),
            stop_tokens: vec![],
            priority: 0,
            generated: vec![],
            guide: None,
            adapter,
        };
        let t0 = Instant::now();
        sched.add(req, Box::new(tx))?;
        loop {
            sched.step(model)?;
            if let Ok(Event::Token(_)) = rx.try_recv() {
                let dt = t0.elapsed().as_secs_f64();
                while sched.has_work() {
                    sched.step(model)?;
                }
                return Ok(dt);
            }
        }
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let pool = model.pool_for_tokens(4 * (shared + 64), 16);
        let cfg = SchedulerConfig {
            max_step_tokens: 2048,
            ..Default::default()
        };
        let mut sched = Scheduler::new(cfg, pool, model.config.context_length);
        cold.push(ttft(&mut sched, 2 * r as u64)?);
        warm.push(ttft(&mut sched, 2 * r as u64 + 1)?);
    }
    Ok((median(cold), median(warm)))
}

/// Milliseconds the sampler takes per token on `logits` (a real
/// distribution: the prefill's last position), for common settings. The
/// scheduler samples every running sequence after each step, so this adds
/// up with the batch.
fn sampling_cost(logits: &[f32]) -> Vec<(&'static str, f64)> {
    use tandem_engine::sampler::{sample, SamplingParams};
    if logits.is_empty() {
        return Vec::new();
    }
    let settings = [
        ("greedy", SamplingParams::greedy()),
        (
            "t=1",
            SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
        ),
        (
            "t=0.8 top_p=0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                ..Default::default()
            },
        ),
        (
            "t=0.7 top_k=40",
            SamplingParams {
                temperature: 0.7,
                top_k: 40,
                ..Default::default()
            },
        ),
    ];
    let n = 200u64;
    settings
        .into_iter()
        .map(|(name, p)| {
            let t0 = Instant::now();
            for pos in 0..n {
                std::hint::black_box(sample(&p, logits, &[], 0, pos));
            }
            (name, t0.elapsed().as_secs_f64() * 1e3 / n as f64)
        })
        .collect()
}

fn engine(a: EngineArgs) -> Result<()> {
    let path = crate::model_path(a.model.clone())?;
    let src = ModelSource::open(&path).with_context(|| format!("loading {}", path.display()))?;
    let threads = crate::thread_count(a.threads);
    let t_load = Instant::now();
    let mut model = Model::load_with(&src, threads, a.expand_weights)?;
    let loras = crate::lora::unnamed(a.lora.as_deref());
    crate::lora::attach(
        &mut model,
        &loras,
        tandem_engine::engine::AdapterLimits::NONE,
    )?;
    let adapter = loras.len() as u32;
    let load_s = t_load.elapsed().as_secs_f64();
    let runs = a.runs.max(1);
    let vocab = model.config.vocab_size;
    if let Some(dir) = &a.lora {
        println!(
            "every sequence runs with the LoRA adapter in {}",
            dir.display()
        );
    }
    println!(
        "model {} ({:.1} MB packed weights, f32 copies {:.1} MB: expand-weights {}), {} threads, loaded in {:.2} s",
        path.display(),
        model.weight_bytes() as f64 / 1e6,
        model.f32_copy_bytes() as f64 / 1e6,
        a.expand_weights,
        threads,
        load_s
    );
    if model.active_weight_bytes() != model.weight_bytes() {
        println!(
            "mixture of experts: {:.1} MB of the packed weights read per token",
            model.active_weight_bytes() as f64 / 1e6
        );
    }

    // Each figure's sequences must fit the context: say which flag does not.
    let context = model.config.context_length;
    let decode_prompt = if a.batch.is_empty() { 16 } else { 128 };
    for (flag, tokens) in [
        ("--prompt-tokens", a.prompt_tokens),
        (
            "--gen-tokens (after its decode prompt)",
            decode_prompt + a.gen_tokens,
        ),
        // The shared prefix, a 24-token question, and the first token.
        ("--prefix-tokens (with its question)", a.prefix_tokens + 25),
    ] {
        if tokens > context {
            anyhow::bail!("{flag} makes a sequence of {tokens} tokens, beyond the model's context of {context}");
        }
    }

    // Prefill: the whole prompt in one forward call.
    let prompt = prompt_ids(a.prompt_tokens, vocab, 0);
    let mut prefill = Vec::new();
    let mut last_logits = Vec::new();
    for _ in 0..runs {
        let mut pool = model.pool_for_tokens(prompt.len(), 16);
        let mut kv = SeqKv {
            adapter,
            ..SeqKv::default()
        };
        let t0 = Instant::now();
        let mut step = [SeqStep {
            kv: &mut kv,
            tokens: &prompt,
            logits: Logits::Last,
        }];
        let mut out = model.forward(&mut pool, &mut step)?;
        prefill.push(prompt.len() as f64 / t0.elapsed().as_secs_f64());
        last_logits = out.pop().unwrap_or_default();
    }
    let prefill_tok_s = median(prefill);
    println!(
        "prefill  {:>5} tokens: {:>8.1} tok/s",
        a.prompt_tokens, prefill_tok_s
    );

    let sampling = sampling_cost(&last_logits);
    println!(
        "sample   per token: {}",
        sampling
            .iter()
            .map(|(name, ms)| format!("{name} {ms:.3} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Decode at batch 1.
    let mut decode = Vec::new();
    for _ in 0..runs {
        let secs = batched_decode(&model, 1, 16, a.gen_tokens, adapter)?;
        decode.push(a.gen_tokens as f64 / secs);
    }
    let decode_tok_s = median(decode);
    println!(
        "decode   batch 1, {} tokens: {:>8.1} tok/s ({:.2} ms/token, {:.1} GB/s of weights)",
        a.gen_tokens,
        decode_tok_s,
        1e3 / decode_tok_s,
        model.active_weight_bytes() as f64 * decode_tok_s / 1e9
    );

    let mut batched = Vec::new();
    for &b in &a.batch {
        let mut v = Vec::new();
        for _ in 0..runs {
            let secs = batched_decode(&model, b, 128, a.gen_tokens, adapter)?;
            v.push(secs);
        }
        let secs = median(v);
        let tok_s = (b * a.gen_tokens) as f64 / secs;
        let ms_step = secs * 1e3 / a.gen_tokens as f64;
        println!("decode   batch {b:>3}: {tok_s:>8.1} tok/s aggregate, {ms_step:.2} ms per step");
        batched
            .push(serde_json::json!({"batch": b, "decode_tok_s": tok_s, "ms_per_step": ms_step}));
    }
    let mut prefix = serde_json::Value::Null;
    if a.prefix_tokens > 0 {
        let (cold, warm) = prefix_ttft(&model, a.prefix_tokens, runs, adapter)?;
        println!(
            "prefix   {} shared tokens: TTFT cold {:.1} ms, cached {:.1} ms ({:.1}x lower)",
            a.prefix_tokens,
            cold * 1e3,
            warm * 1e3,
            cold / warm
        );
        prefix = serde_json::json!({"shared_tokens": a.prefix_tokens, "ttft_cold_s": cold, "ttft_cached_s": warm, "ratio": cold / warm});
    }
    if let Some(out) = a.json {
        let j = serde_json::json!({
            "model": path.display().to_string(),
            "threads": threads,
            "expand_weights": a.expand_weights.name(),
            "f32_copy_bytes": model.f32_copy_bytes(),
            "prefill_tokens": a.prompt_tokens,
            "prefill_tok_s": prefill_tok_s,
            "decode_tokens": a.gen_tokens,
            "decode_tok_s": decode_tok_s,
            "batched": batched,
            "prefix_cache": prefix,
            "sampling_ms_per_token": sampling.iter().map(|(n, ms)| (n.to_string(), serde_json::json!(ms))).collect::<serde_json::Map<_, _>>(),
            "runs": runs,
            "lora": a.lora.as_ref().map(|d| d.display().to_string()),
        });
        std::fs::write(&out, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
