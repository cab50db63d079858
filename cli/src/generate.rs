//! `tandem generate`: the engine in-process, for one prompt or a chat.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use std::sync::Arc;

use tandem_engine::cpu::ExpandWeights;
use tandem_engine::executor::Executor;
use tandem_engine::generate::{generate_guided, GenerateRequest};
use tandem_engine::guided::{Grammars, ResponseFormat};
use tandem_engine::sampler::SamplingParams;
use tandem_model::chat::{ChatMessage, ChatTemplate};
use tandem_model::detok::IncrementalDecoder;
use tandem_model::tokenizer::Tokenizer;
use tandem_model::weights::ModelSource;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A .gguf file or a Hugging Face directory (default: the installed default model).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// The prompt; without it, read the terminal (with --chat: an interactive chat).
    #[arg(long)]
    pub prompt: Option<String>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate (default: until a stop token or the context is full).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Added to a token's logit before sampling, as `ID=BIAS` (repeatable;
    /// OpenAI's `logit_bias`, BIAS in [-100, 100]).
    #[arg(long = "logit-bias", value_name = "ID=BIAS", value_parser = parse_bias)]
    pub logit_bias: Vec<(u32, f32)>,
    /// JSON mode: the output is held to a JSON object (OpenAI's
    /// `response_format: {"type": "json_object"}`).
    #[arg(long, conflicts_with = "json_schema")]
    pub json_object: bool,
    /// The output is held to JSON valid against this schema (its JSON text).
    #[arg(long, value_name = "SCHEMA", conflicts_with_all = ["regex", "choice"])]
    pub json_schema: Option<String>,
    /// The output is text matching this regular expression, whole.
    #[arg(long, value_name = "REGEX", conflicts_with_all = ["json_object", "choice"])]
    pub regex: Option<String>,
    /// The output is exactly one of these strings (repeat the flag).
    #[arg(long, value_name = "TEXT", conflicts_with = "json_object")]
    pub choice: Vec<String>,
    /// Score the prompt: each prompt token's log-probability given the ones
    /// before it, with this many top alternatives (at most 20). Printed to
    /// stderr, or as `prompt_logprobs` with `--json`. `--max-tokens 0`
    /// scores the prompt alone.
    #[arg(long, value_name = "K")]
    pub prompt_logprobs: Option<usize>,
    /// Worker threads (default, or 0: all cores).
    #[arg(long, env = "TANDEM_THREADS", value_parser = crate::thread_arg)]
    pub threads: Option<usize>,
    /// Tensor-parallel ranks (one process each; the output is the same bits).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Pipeline-parallel stages (one process per rank of each).
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Where the engine runs: cpu, cuda[:N] (f32 weights) or cuda-bf16[:N]
    /// (needs a binary built with `--features cuda`).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: crate::device::Device,
    /// Print one JSON line `{"text", "token_ids", "prompt_tokens", "finish_reason"}` instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Run with the LoRA adapter in this directory (PEFT's format).
    #[arg(long)]
    pub lora: Option<PathBuf>,
}

struct Loaded {
    model: Arc<dyn Executor>,
    /// The other ranks of a sharded model (stopped when dropped, after `model`).
    _ranks: Option<crate::shard::Ranks>,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
}

fn load(args: &GenerateArgs) -> Result<Loaded> {
    let path = crate::model_path(args.model.clone())?;
    let src = ModelSource::open(&path).context("loading the model")?;
    let tokenizer = src.tokenizer().context("building the tokenizer")?;
    let template = match tokenizer.chat_template() {
        Some(t) => {
            let name = |id: Option<u32>| {
                id.and_then(|i| tokenizer.decode(&[i], false).ok())
                    .unwrap_or_default()
            };
            Some(ChatTemplate::new(
                t,
                &name(tokenizer.bos_id()),
                &name(tokenizer.eos_ids().first().copied()),
            )?)
        }
        None => None,
    };
    let threads = crate::thread_count(args.threads);
    let loras = crate::lora::unnamed(args.lora.as_deref());
    crate::device::check_sharding(args.device, args.tp, args.pp, loras.len())?;
    let (model, ranks): (Arc<dyn Executor>, _) = if args.tp * args.pp == 1 {
        let m = crate::device::load_whole(
            &src,
            args.device,
            threads,
            ExpandWeights::Auto,
            &loras,
            tandem_engine::engine::AdapterLimits::NONE,
        )?;
        (m, None)
    } else {
        let (m, ranks) =
            crate::shard::start(&path, &src, args.tp, args.pp, threads, ExpandWeights::Auto)?;
        (m, Some(ranks))
    };
    Ok(Loaded {
        model,
        _ranks: ranks,
        tokenizer,
        template,
    })
}

fn params(args: &GenerateArgs) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        logit_bias: args.logit_bias.clone(),
        prompt_logprobs: args.prompt_logprobs,
        response_format: ResponseFormat::from_fields(
            args.json_object,
            args.json_schema.clone(),
            args.regex.clone(),
            args.choice.clone(),
        ),
        ..Default::default()
    }
}

/// `ID=BIAS` of `--logit-bias`.
fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ID=BIAS, got '{s}'"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("'{id}' is not a token id"))?;
    let bias = bias
        .trim()
        .parse()
        .map_err(|_| format!("'{bias}' is not a number"))?;
    Ok((id, bias))
}

/// Generates from `prompt_text`, streaming text to stdout unless `json`.
///
/// Chat-rendered text carries its own special tokens (`add_special` false);
/// a raw prompt gets BOS when the model asks for it.
fn complete(
    l: &Loaded,
    args: &GenerateArgs,
    prompt_text: &str,
    add_special: bool,
) -> Result<String> {
    let prompt = l.tokenizer.encode(prompt_text, add_special)?;
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenisation");
    }
    let req = GenerateRequest {
        prompt: prompt.clone(),
        params: params(args),
        max_tokens: args.max_tokens,
        stop_tokens: l.tokenizer.eos_ids().to_vec(),
        adapter: args.lora.is_some() as u32,
    };
    let mut out = std::io::stdout().lock();
    // Streams whole characters only: byte-level BPE splits them across tokens.
    let mut detok = IncrementalDecoder::new(&l.tokenizer, true);
    let stream = !args.json;
    let grammars = if req.params.response_format.is_text() {
        None
    } else {
        Some(Grammars::from_tokenizer(&l.tokenizer)?)
    };
    let gen = generate_guided(l.model.as_ref(), &req, grammars.as_deref(), |s| {
        if stream && !req.stop_tokens.contains(&s.token) {
            if let Ok(piece) = detok.push(s.token) {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        }
        true
    })?;
    let text = l.tokenizer.decode(&gen.tokens, true)?;
    // Prompt token i is scored by entry i - 1.
    let scores = gen.prompt_logprobs.as_ref().map(|lp| {
        prompt
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let s = i.checked_sub(1).and_then(|j| lp.get(j));
                (id, s)
            })
            .collect::<Vec<_>>()
    });
    if args.json {
        let mut line = serde_json::json!({
            "text": text,
            "token_ids": gen.tokens,
            "prompt_tokens": gen.prompt_tokens,
            "finish_reason": gen.finish.as_str(),
        });
        if let Some(scores) = &scores {
            line["prompt_logprobs"] = scores
                .iter()
                .map(|(id, s)| {
                    serde_json::json!({
                        "token_id": id,
                        "logprob": s.map(|s| s.logprob),
                        "top": s.map(|s| s.top.clone()).unwrap_or_default(),
                    })
                })
                .collect();
        }
        writeln!(out, "{line}")?;
    } else {
        if let Some(scores) = &scores {
            // A table on stderr, so that stdout stays the completion.
            for (id, s) in scores {
                let piece = l.tokenizer.decode(&[*id], false).unwrap_or_default();
                match s {
                    Some(s) => eprintln!("{id}\t{:.6}\t{piece:?}", s.logprob),
                    None => eprintln!("{id}\t-\t{piece:?}"),
                }
            }
        }
        out.write_all(detok.finish().as_bytes())?;
        writeln!(out)?;
    }
    Ok(text)
}

fn render(l: &Loaded, messages: &[ChatMessage]) -> Result<String> {
    let t = l
        .template
        .as_ref()
        .context("this model has no chat template; run without --chat")?;
    Ok(t.render(messages, true)?)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.max_tokens == Some(0) && args.prompt_logprobs.is_none() {
        bail!("--max-tokens 0 generates nothing; it goes with --prompt-logprobs, to score the prompt alone");
    }
    let l = load(&args)?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(ChatMessage::new("system", s.clone()));
    }
    if let Some(p) = &args.prompt {
        if args.chat {
            messages.push(ChatMessage::new("user", p.clone()));
            complete(&l, &args, &render(&l, &messages)?, false)?;
        } else {
            complete(&l, &args, p, true)?;
        }
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !args.chat {
        let mut text = String::new();
        for line in stdin.lock().lines() {
            text.push_str(&line?);
            text.push('\n');
        }
        complete(&l, &args, text.trim_end_matches('\n'), true)?;
        return Ok(());
    }
    eprintln!(
        "chatting with {} (empty line or Ctrl-D to quit)",
        args.model
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the default model".into())
    );
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(ChatMessage::new("user", line.trim_end().to_string()));
        let reply = complete(&l, &args, &render(&l, &messages)?, false)?;
        messages.push(ChatMessage::new("assistant", reply));
    }
    Ok(())
}
