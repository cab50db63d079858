//! Token sampling: penalties, temperature, top-k, top-p, min-p, and a
//! counter-based random source.
//!
//! The random number for output position `i` of a request is a pure function
//! of `(seed, request key, i)`, so the same request samples the same tokens
//! whatever the batch, after preemption, or when another worker resumes it.

use crate::error::{EngineError, Result};

/// What a request asks of the sampler. Defaults are the neutral values.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// Multiplicative penalty on tokens seen in prompt or output (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once from tokens present in the output (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output (OpenAI semantics).
    pub frequency_penalty: f32,
    pub seed: u64,
    /// Distinguishes requests that share a seed; fixed for a request's lifetime.
    pub request_key: u64,
    /// Number of top alternatives to report with log-probabilities (0 = none).
    pub top_logprobs: usize,
    /// Report the chosen token's log-probability.
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            request_key: 0,
            top_logprobs: 0,
            logprobs: false,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Rejects values with no meaning, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Sampling(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if self.top_logprobs > 20 {
            return bad(format!(
                "top_logprobs must be at most 20, got {}",
                self.top_logprobs
            ));
        }
        Ok(())
    }
}

/// One sampled token with its log-probabilities (from the model's raw
/// distribution, before penalties and temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// SplitMix64 finaliser: a strong 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform number in [0, 1) for output position `pos` of a request.
pub fn uniform(seed: u64, request_key: u64, pos: u64) -> f64 {
    let z = mix(mix(mix(seed) ^ request_key) ^ pos);
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Greedy choice: the highest logit, lowest id on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax_at(logits: &[f32], max: f32, log_z: f64, id: u32) -> f32 {
    ((logits[id as usize] - max) as f64 - log_z) as f32
}

/// Samples the token for output position `pos`.
///
/// `context` is the prompt followed by the output so far (for the repetition
/// penalty); `output_start` is where the output begins in it.
pub fn sample(
    params: &SamplingParams,
    logits: &[f32],
    context: &[u32],
    output_start: usize,
    pos: u64,
) -> Sampled {
    // Raw log-probabilities for reporting.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let want_lp = params.logprobs || params.top_logprobs > 0;
    let log_z = if want_lp {
        logits
            .iter()
            .map(|&v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln()
    } else {
        0.0
    };

    let penalised = params.repetition_penalty != 1.0
        || params.presence_penalty != 0.0
        || params.frequency_penalty != 0.0;
    let mut work: Vec<f32>;
    let l: &[f32] = if penalised {
        work = logits.to_vec();
        if params.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in context {
                if seen.insert(t) {
                    let v = &mut work[t as usize];
                    *v = if *v > 0.0 {
                        *v / params.repetition_penalty
                    } else {
                        *v * params.repetition_penalty
                    };
                }
            }
        }
        if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in &context[output_start.min(context.len())..] {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                work[t as usize] -= params.presence_penalty + params.frequency_penalty * n as f32;
            }
        }
        &work
    } else {
        logits
    };

    let token = if params.temperature == 0.0 {
        argmax(l)
    } else {
        // Candidates sorted by logit (descending), ties by id: a total order.
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        let keep = if params.top_k > 0 {
            params.top_k.min(l.len())
        } else {
            l.len()
        };
        let cmp = |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b));
        if keep < idx.len() {
            idx.select_nth_unstable_by(keep - 1, cmp);
            idx.truncate(keep);
        }
        idx.sort_unstable_by(cmp);
        let m = l[idx[0] as usize];
        let t = params.temperature as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((l[i as usize] - m) as f64) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        // top-p: smallest prefix whose mass reaches top_p (at least one token).
        let mut cut = probs.len();
        if params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p / total;
                if acc >= params.top_p as f64 {
                    cut = i + 1;
                    break;
                }
            }
        }
        // min-p: drop tokens below min_p × the top probability.
        if params.min_p > 0.0 {
            let floor = probs[0] * params.min_p as f64;
            cut = cut.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        probs.truncate(cut);
        let total: f64 = probs.iter().sum();
        let u = uniform(params.seed, params.request_key, pos) * total;
        let mut acc = 0.0;
        let mut chosen = idx[cut - 1];
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                chosen = idx[i];
                break;
            }
        }
        chosen
    };

    let (logprob, top) = if want_lp {
        let lp = log_softmax_at(logits, max, log_z, token);
        let mut top = Vec::new();
        if params.top_logprobs > 0 {
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            let n = params.top_logprobs.min(idx.len());
            let cmp = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            idx.select_nth_unstable_by(n - 1, cmp);
            idx.truncate(n);
            idx.sort_unstable_by(cmp);
            top = idx
                .iter()
                .map(|&i| (i, log_softmax_at(logits, max, log_z, i)))
                .collect();
        }
        (lp, top)
    } else {
        (0.0, Vec::new())
    };
    Sampled {
        token,
        logprob,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 3.0, -1.0, 0.5]
    }

    #[test]
    fn greedy_picks_lowest_id_among_ties() {
        assert_eq!(
            sample(&SamplingParams::greedy(), &logits(), &[], 0, 0).token,
            1
        );
    }

    #[test]
    fn same_key_same_token_different_keys_vary() {
        let mut p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let l = logits();
        let a: Vec<u32> = (0..64).map(|i| sample(&p, &l, &[], 0, i).token).collect();
        let b: Vec<u32> = (0..64).map(|i| sample(&p, &l, &[], 0, i).token).collect();
        assert_eq!(a, b);
        p.request_key = 1;
        let c: Vec<u32> = (0..64).map(|i| sample(&p, &l, &[], 0, i).token).collect();
        assert_ne!(a, c);
        // Several distinct tokens appear at temperature 1.
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() >= 3, "{a:?}");
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: 3,
            ..Default::default()
        };
        for i in 0..32 {
            assert_eq!(sample(&p, &logits(), &[], 0, i).token, 1);
        }
    }

    #[test]
    fn top_p_restricts_to_the_nucleus() {
        // Tokens 1 and 3 hold most of the mass at low temperature.
        let p = SamplingParams {
            temperature: 0.5,
            top_p: 0.5,
            seed: 11,
            ..Default::default()
        };
        for i in 0..64 {
            let t = sample(&p, &logits(), &[], 0, i).token;
            assert!(t == 1 || t == 3, "{t}");
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.3,
            seed: 5,
            ..Default::default()
        };
        for i in 0..64 {
            let t = sample(&p, &logits(), &[], 0, i).token;
            assert!([1, 2, 3].contains(&t), "{t}");
        }
    }

    #[test]
    fn penalties_change_the_greedy_choice() {
        let rep = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Token 1 was seen: 3.0 / 2 = 1.5, so token 3 wins.
        assert_eq!(sample(&rep, &logits(), &[1], 1, 0).token, 3);
        let freq = SamplingParams {
            frequency_penalty: 1.0,
            ..Default::default()
        };
        // Tokens 1 and 3 each generated twice: 3 - 2 = 1; token 2 wins with 2.0.
        assert_eq!(sample(&freq, &logits(), &[1, 1, 3, 3], 0, 0).token, 2);
        // Prompt tokens do not count for frequency penalties.
        assert_eq!(sample(&freq, &logits(), &[1, 1, 3, 3], 4, 0).token, 1);
    }

    #[test]
    fn logprobs_are_normalised() {
        let p = SamplingParams {
            logprobs: true,
            top_logprobs: 3,
            ..Default::default()
        };
        let s = sample(&p, &logits(), &[], 0, 0);
        assert_eq!(s.top.len(), 3);
        assert_eq!(s.top[0].0, 1);
        assert_eq!(s.top[1].0, 3);
        assert!((s.top[0].1 - s.logprob).abs() < 1e-7);
        let total: f64 = logits().iter().map(|&v| ((v - 3.0) as f64).exp()).sum();
        assert!((s.logprob as f64 - (1.0 / total).ln()).abs() < 1e-6);
    }

    #[test]
    fn validation_names_the_parameter() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        assert!(SamplingParams::default().validate().is_ok());
    }
}
