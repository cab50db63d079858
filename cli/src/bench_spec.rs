//! `tandem bench speculative`: what prompt-lookup speculation gains on
//! chat prompts of two kinds, ones whose answer repeats the prompt (fix a
//! text, reformat a list, annotate code) and open-ended ones, each prompt
//! decoded alone with speculation off and with each draft length, greedy.
//! It checks that every run produced the same tokens as the run without
//! speculation (the engine tests prove it; this says so for these prompts).

use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tandem_engine::model::Model;
use tandem_engine::sampler::SamplingParams;
use tandem_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
use tandem_engine::speculative::SpeculativeConfig;
use tandem_model::chat::{ChatMessage, ChatTemplate};
use tandem_model::weights::ModelSource;

use super::median;

#[derive(clap::Args)]
pub struct SpecArgs {
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    #[arg(long, env = "TANDEM_THREADS", value_parser = crate::thread_arg)]
    pub threads: Option<usize>,
    /// Draft lengths to compare with no speculation, e.g. 2,4,8.
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4, 8])]
    pub draft_tokens: Vec<usize>,
    /// Tokens generated per prompt at most.
    #[arg(long, default_value_t = 160)]
    pub max_tokens: usize,
    /// Repetitions; each figure is the median.
    #[arg(long, default_value_t = 3, value_parser = crate::positive)]
    pub runs: usize,
    /// Also write the figures as JSON here.
    #[arg(long, value_parser = crate::output_file)]
    pub json: Option<PathBuf>,
}

/// Prompts whose answers repeat much of the prompt.
const GROUNDED: &[&str] = &[
    "Fix the spelling mistakes in this text and return the corrected text only:\n\
     The quick brown fox jumpd over the lazy dog. It was a sunny day and the \
     fox was very hapy. The dog did not mind, becuase he was sleeping under a \
     big tree near the river.",
    "Rewrite this list as a JSON array of objects with the keys \"name\", \
     \"age\" and \"city\":\nAlice, 31, Paris\nBob, 45, Berlin\nCarla, 27, Madrid\n\
     Dmitri, 38, Moscow",
    "Add a docstring to this Python function and return the whole function:\n\
     def area(width, height):\n    if width < 0 or height < 0:\n        raise \
     ValueError(\"negative size\")\n    return width * height",
    "Repeat the following sentence exactly three times, one per line: \
     Machine learning models learn patterns from data.",
    "Convert this CSV to a Markdown table:\ncity,country,population\n\
     Tokyo,Japan,37400000\nDelhi,India,28500000\nShanghai,China,25600000\n\
     Cairo,Egypt,20900000\nMumbai,India,20000000",
    "Rename the variable x to count in this code and return the code:\n\
     def tally(items):\n    x = 0\n    for item in items:\n        if item.valid:\n\
     \x20           x += 1\n    print(\"valid items:\", x)\n    return x",
    "Add a title to this paragraph and return the paragraph with its title:\n\
     Bees are flying insects closely related to wasps and ants. They are known \
     for their role in pollination and for producing honey. There are over \
     16,000 known species of bees in seven recognized biological families.",
    "Sort these words alphabetically, one per line: pear, apple, mango, banana, \
     cherry, kiwi, grape, lemon",
];

/// Open-ended prompts: little of the answer is in the prompt.
const OPEN: &[&str] = &[
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "What are three good habits for staying healthy? Explain each briefly.",
    "Describe the city of Rome in a few sentences.",
    "Why is the sky blue?",
    "Give me some advice for a job interview.",
    "Write a poem about autumn leaves.",
    "What should I pack for a weekend hiking trip?",
];

struct Outcome {
    tokens: Vec<Vec<u32>>,
    seconds: f64,
    steps: u64,
    generated: u64,
    drafted: u64,
    accepted: u64,
}

/// Decodes each prompt alone (one request in the scheduler at a time).
fn decode_alone(
    model: &Model,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    spec: SpeculativeConfig,
    eos: &[u32],
) -> Result<Outcome> {
    let mut out = Outcome {
        tokens: Vec::new(),
        seconds: 0.0,
        steps: 0,
        generated: 0,
        drafted: 0,
        accepted: 0,
    };
    for (i, p) in prompts.iter().enumerate() {
        let pool = model.pool_for_tokens(p.len() + max_tokens + 16, 16);
        let cfg = SchedulerConfig {
            speculative: spec,
            ..Default::default()
        };
        let mut sched = Scheduler::new(cfg, pool, model.config.context_length);
        let (tx, rx) = channel();
        sched.add(
            Request {
                id: i as u64,
                prompt: p.clone(),
                params: SamplingParams::greedy(),
                max_tokens: Some(max_tokens),
                stop_tokens: eos.to_vec(),
                priority: 0,
                generated: vec![],
                guide: None,
                adapter: 0,
            },
            Box::new(tx),
        )?;
        // The prompt's steps (and the first token) are not decoding.
        while sched.has_work() && sched.stats().generated_tokens == 0 {
            sched.step(model)?;
        }
        let t0 = Instant::now();
        let steps0 = sched.stats().steps;
        while sched.has_work() {
            sched.step(model)?;
        }
        out.seconds += t0.elapsed().as_secs_f64();
        let st = sched.stats();
        out.steps += st.steps - steps0;
        out.generated += st.generated_tokens.saturating_sub(1);
        out.drafted += st.draft_tokens;
        out.accepted += st.accepted_draft_tokens;
        let mut toks = Vec::new();
        for e in rx.try_iter() {
            match e {
                Event::Token(t) => toks.push(t.token),
                Event::Error(m) => bail!("prompt {i} failed: {m}"),
                _ => {}
            }
        }
        out.tokens.push(toks);
    }
    Ok(out)
}

pub fn run(a: SpecArgs) -> Result<()> {
    let path = crate::model_path(a.model.clone())?;
    let src = ModelSource::open(&path).with_context(|| format!("loading {}", path.display()))?;
    let tokenizer = src.tokenizer().context("building the tokenizer")?;
    let source = tokenizer
        .chat_template()
        .context("this benchmark needs a model with a chat template")?;
    let name = |id: Option<u32>| {
        id.and_then(|i| tokenizer.decode(&[i], false).ok())
            .unwrap_or_default()
    };
    let template = ChatTemplate::new(
        source,
        &name(tokenizer.bos_id()),
        &name(tokenizer.eos_ids().first().copied()),
    )?;
    let threads = crate::thread_count(a.threads);
    let model = Model::load_with(&src, threads, tandem_engine::cpu::ExpandWeights::Auto)?;
    let eos = tokenizer.eos_ids().to_vec();
    let encode = |texts: &[&str]| -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| {
                let text = template.render(&[ChatMessage::new("user", *t)], true)?;
                Ok(tokenizer.encode(&text, false)?)
            })
            .collect()
    };
    let sets = [("grounded", encode(GROUNDED)?), ("open", encode(OPEN)?)];
    let runs = a.runs.max(1);
    let mut configs = vec![0usize];
    configs.extend(a.draft_tokens.iter().copied().filter(|&k| k > 0));
    println!(
        "model {}, {} threads; greedy, up to {} tokens per prompt, each prompt alone; medians of {}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        threads,
        a.max_tokens,
        runs
    );
    println!(
        "{:<9} {:>6} {:>7} {:>9} {:>8} {:>11} {:>10} {:>9}",
        "prompts", "draft", "tokens", "tok/s", "speedup", "tok/step", "accepted", "same"
    );
    let mut rows = Vec::new();
    for (set, prompts) in &sets {
        let spec_of = |k: usize| {
            if k == 0 {
                SpeculativeConfig::OFF
            } else {
                SpeculativeConfig::ngram(k)
            }
        };
        // Rounds alternate the settings (each round starting one later), so
        // a machine that speeds up or slows down during the run weighs on
        // all of them alike; speedups are medians of same-round ratios.
        let mut rates = vec![Vec::new(); configs.len()];
        let mut last: Vec<Option<Outcome>> = configs.iter().map(|_| None).collect();
        for r in 0..runs {
            for j in 0..configs.len() {
                let c = (j + r) % configs.len();
                let o = decode_alone(&model, prompts, a.max_tokens, spec_of(configs[c]), &eos)?;
                rates[c].push(o.generated as f64 / o.seconds);
                last[c] = Some(o);
            }
        }
        let base_tokens = last[0].as_ref().map(|o| o.tokens.clone());
        for (c, &k) in configs.iter().enumerate() {
            let o = last[c].take().expect("runs >= 1");
            let tok_s = median(rates[c].clone());
            let speedup = median(rates[c].iter().zip(&rates[0]).map(|(x, b)| x / b).collect());
            let same = base_tokens.as_ref() == Some(&o.tokens);
            let per_step = o.generated as f64 / o.steps.max(1) as f64;
            let accept = o.accepted as f64 / o.drafted.max(1) as f64;
            println!(
                "{:<9} {:>6} {:>7} {:>9.1} {:>7.2}x {:>11.2} {:>9.0}% {:>9}",
                set,
                if k == 0 { "off".into() } else { k.to_string() },
                o.generated,
                tok_s,
                speedup,
                per_step,
                accept * 100.0,
                if same { "yes" } else { "NO" }
            );
            rows.push(serde_json::json!({
                "prompts": set, "draft_tokens": k, "tok_s": tok_s,
                "speedup": speedup, "tokens_per_step": per_step,
                "drafted": o.drafted, "accepted": o.accepted,
                "generated": o.generated, "same_tokens": same,
            }));
            if !same {
                bail!("speculation with {k} draft tokens changed the output of the {set} prompts");
            }
        }
    }
    if let Some(out) = a.json {
        let j = serde_json::json!({
            "model": path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "threads": threads,
            "max_tokens": a.max_tokens, "runs": runs, "results": rows,
        });
        std::fs::write(&out, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
