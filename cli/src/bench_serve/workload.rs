//! What to send: prompts from the shipped data sets (`bench/data/*.jsonl`)
//! or synthetic token-id prompts of given lengths, and when to send them
//! (Poisson arrivals at a rate, or a fixed number in flight).

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp};
use serde::Deserialize;

/// The prompt sets shipped with the repository (see `bench/data/make_dataset.py`).
const CHAT: &str = include_str!("../../../bench/data/chat.jsonl");
const DOCS: &str = include_str!("../../../bench/data/docs.jsonl");

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    /// Short chat-like requests (~10-90 prompt tokens, 24-256 wanted).
    Chat,
    /// Long documents with an instruction (~400-1900 prompt tokens, 32-160 wanted).
    Docs,
    /// Four chat requests for each document request.
    Mixed,
    /// Distinct token-id prompts of --input-tokens, --output-tokens wanted.
    Synthetic,
}

#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// One request to send.
#[derive(Clone, Debug)]
pub struct Request {
    /// The stream it belongs to ("main", or "long" for the long-prompt stream).
    pub class: &'static str,
    pub prompt: Prompt,
    pub max_tokens: usize,
}

#[derive(Deserialize)]
struct Row {
    prompt: String,
    max_tokens: usize,
}

fn rows(text: &'static str, what: &str) -> Result<Vec<Row>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{what} data set, line {}", i + 1))
        })
        .collect()
}

/// Distinct, deterministic token ids (no prefix shared between salts).
pub fn synthetic_ids(n: usize, salt: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| {
            let z = (i + 1 + salt * 1_000_003).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            1000 + (z >> 40) as u32 % 40_000
        })
        .collect()
}

pub struct Spec {
    pub dataset: Dataset,
    pub input_tokens: usize,
    pub output_tokens: usize,
    /// Overrides the data set's wanted lengths when set.
    pub max_tokens: Option<usize>,
    pub seed: u64,
}

/// `n` requests drawn (seeded) from the spec's data set.
pub fn requests(spec: &Spec, n: usize, class: &'static str, salt: u64) -> Result<Vec<Request>> {
    let mut rng = StdRng::seed_from_u64(spec.seed ^ salt.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let chat = rows(CHAT, "chat")?;
    let docs = rows(DOCS, "docs")?;
    if chat.is_empty() || docs.is_empty() {
        bail!("a shipped data set is empty");
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (prompt, wanted) = match spec.dataset {
            Dataset::Synthetic => (
                // The seed is mixed, not added: with `seed + salt + i`, run
                // `seed + 1` sent run `seed`'s prompts shifted by one, which
                // the prefix cache then served.
                Prompt::Ids(synthetic_ids(
                    spec.input_tokens,
                    spec.seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ (salt << 32 | i as u64),
                )),
                spec.output_tokens,
            ),
            d => {
                let from_docs = match d {
                    Dataset::Docs => true,
                    Dataset::Chat => false,
                    _ => rng.random_range(0..5) == 0,
                };
                let set = if from_docs { &docs } else { &chat };
                let r = &set[rng.random_range(0..set.len())];
                (Prompt::Text(r.prompt.clone()), r.max_tokens)
            }
        };
        out.push(Request {
            class,
            prompt,
            max_tokens: spec.max_tokens.unwrap_or(wanted).max(1),
        });
    }
    Ok(out)
}

/// Send times (seconds from the start) of `n` Poisson arrivals at `rate`/s;
/// the first request goes at once.
pub fn poisson_arrivals(n: usize, rate: f64, seed: u64) -> Result<Vec<f64>> {
    if !(rate.is_finite() && rate > 0.0) {
        bail!("the arrival rate must be positive, not {rate}");
    }
    let exp = Exp::new(rate).map_err(|e| anyhow::anyhow!("arrival rate {rate}: {e}"))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    Ok((0..n)
        .map(|i| {
            if i > 0 {
                t += exp.sample(&mut rng);
            }
            t
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_sets_parse_and_have_the_promised_shape() {
        let chat = rows(CHAT, "chat").unwrap();
        let docs = rows(DOCS, "docs").unwrap();
        assert!(chat.len() >= 100 && docs.len() >= 10);
        let mean = |r: &[Row]| r.iter().map(|r| r.prompt.len()).sum::<usize>() / r.len();
        // Characters, about four per token.
        assert!(mean(&chat) < 400, "chat prompts are short");
        assert!(mean(&docs) > 2000, "documents are long");
    }

    #[test]
    fn poisson_arrivals_have_the_asked_rate_and_are_seeded() {
        let a = poisson_arrivals(20_000, 4.0, 7).unwrap();
        let b = poisson_arrivals(20_000, 4.0, 7).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0], 0.0);
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        let rate = (a.len() - 1) as f64 / a[a.len() - 1];
        assert!((rate - 4.0).abs() < 0.15, "{rate}");
        assert!(poisson_arrivals(3, 0.0, 1).is_err());
    }

    fn spec_like(s: &Spec) -> Spec {
        Spec {
            dataset: Dataset::Synthetic,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
            max_tokens: s.max_tokens,
            seed: s.seed,
        }
    }

    #[test]
    fn requests_are_deterministic_and_synthetic_ones_distinct() {
        let spec = Spec {
            dataset: Dataset::Synthetic,
            input_tokens: 32,
            output_tokens: 8,
            max_tokens: None,
            seed: 1,
        };
        let r = requests(&spec, 3, "main", 0).unwrap();
        let ids: Vec<_> = r
            .iter()
            .map(|r| match &r.prompt {
                Prompt::Ids(v) => v.clone(),
                Prompt::Text(_) => panic!("synthetic prompts are ids"),
            })
            .collect();
        assert!(ids.iter().all(|v| v.len() == 32));
        assert_ne!(ids[0][0], ids[1][0]);
        assert_eq!(r[0].max_tokens, 8);
        // Runs with neighbouring seeds share no prompt (nor its first block:
        // the prefix cache would serve it).
        let firsts = |seed: u64| -> Vec<Vec<u32>> {
            let s = Spec {
                seed,
                ..spec_like(&spec)
            };
            requests(&s, 20, "main", 0)
                .unwrap()
                .iter()
                .map(|r| match &r.prompt {
                    Prompt::Ids(v) => v[..16].to_vec(),
                    Prompt::Text(_) => unreachable!(),
                })
                .collect()
        };
        let (one, two) = (firsts(1), firsts(2));
        assert!(
            one.iter().all(|p| !two.contains(p)),
            "seeds 1 and 2 overlap"
        );
        let spec = Spec {
            dataset: Dataset::Mixed,
            ..spec
        };
        let a = requests(&spec, 50, "main", 0).unwrap();
        let b = requests(&spec, 50, "main", 0).unwrap();
        let text = |r: &[Request]| -> Vec<String> {
            r.iter()
                .map(|r| match &r.prompt {
                    Prompt::Text(t) => t.clone(),
                    Prompt::Ids(_) => panic!("data set prompts are text"),
                })
                .collect()
        };
        assert_eq!(text(&a), text(&b));
        assert!(text(&a).iter().any(|t| t.len() > 2000), "some documents");
    }
}
