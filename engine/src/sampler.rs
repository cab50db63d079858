//! Token sampling: penalties, temperature, top-k, top-p, min-p, and a
//! counter-based random source.
//!
//! The random number for output position `i` of a request is a pure function
//! of `(seed, request key, i)`, so the same request samples the same tokens
//! whatever the batch, after preemption, or when another worker resumes it.

use crate::error::{EngineError, Result};
use crate::guided::ResponseFormat;

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
    /// Output positions below this cannot end the sequence: the ids in
    /// [`SamplingParams::min_tokens_masked`] are never sampled there
    /// (OpenAI-style `min_tokens`, with vLLM's semantics).
    pub min_tokens: u32,
    /// The ids that would end the sequence (its stop tokens). They travel
    /// with the sampling parameters because a prefill worker samples the
    /// first token without knowing the request's stop tokens otherwise.
    pub min_tokens_masked: Vec<u32>,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`):
    /// `(token id, bias in [-100, 100])`, each id once. As with the
    /// penalties, reported log-probabilities are the model's, unbiased.
    pub logit_bias: Vec<(u32, f32)>,
    /// What the output must look like (OpenAI's `response_format`): held
    /// to it by [`crate::guided`]'s mask.
    pub response_format: ResponseFormat,
    /// Score the prompt: report each prompt token's log-probability given
    /// the tokens before it, with this many top alternatives per position
    /// (vLLM's `prompt_logprobs`; OpenAI's `echo` with `logprobs`). Such a
    /// prompt is computed whole, not taken from the prefix cache, since
    /// cached blocks carry no logits.
    pub prompt_logprobs: Option<usize>,
}

/// Most alternatives reported per position ([`SamplingParams::top_logprobs`],
/// [`SamplingParams::prompt_logprobs`]), as OpenAI allows.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Largest bias magnitude [`SamplingParams::logit_bias`] accepts (OpenAI's).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

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
            min_tokens: 0,
            min_tokens_masked: Vec::new(),
            logit_bias: Vec::new(),
            response_format: ResponseFormat::Text,
            prompt_logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether [`sample`] at output position `pos` is the plain argmax of
    /// the raw logits, with no log-probabilities to report: then a step
    /// needs only that id from the executor ([`crate::model::Logits::Greedy`]),
    /// not the vocabulary's logits.
    pub fn is_plain_greedy_at(&self, pos: u64) -> bool {
        self.temperature == 0.0 && self.raw_logits_at(pos)
    }

    /// `Some(k)` when [`sample`] at output position `pos` draws from the
    /// `k` largest raw logits alone (a temperature, top-k of at most
    /// [`MAX_DEVICE_TOP_K`] and below the vocabulary, no penalties, no
    /// masked stop ids there, no log-probabilities): then a step needs
    /// only those `k` from the executor ([`crate::model::Logits::TopK`]),
    /// and [`sample_top_k`] draws from them what `sample` would.
    pub fn top_k_only_at(&self, pos: u64, vocab: usize) -> Option<usize> {
        let k = self.top_k;
        (self.temperature != 0.0
            && (1..=MAX_DEVICE_TOP_K).contains(&k)
            && k < vocab
            && self.raw_logits_at(pos))
        .then_some(k)
    }

    /// Whether `sample` at `pos` reads the raw logits as they are: no
    /// penalty or mask changes them, and no log-probability is reported.
    fn raw_logits_at(&self, pos: u64) -> bool {
        !self.logprobs
            && self.top_logprobs == 0
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.logit_bias.is_empty()
            && self.response_format.is_text()
            && (pos >= self.min_tokens as u64 || self.min_tokens_masked.is_empty())
    }

    /// Rejects values with no meaning, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Sampling(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be a finite number >= 0, got {}",
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
                "repetition_penalty must be a finite number > 0, got {}",
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
        for &(id, b) in &self.logit_bias {
            if !(b.is_finite() && (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&b)) {
                return bad(format!(
                    "logit_bias for token {id} must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {b}"
                ));
            }
        }
        let mut ids: Vec<u32> = self.logit_bias.iter().map(|&(id, _)| id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("logit_bias names token {} twice", w[0]));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}",
                self.top_logprobs
            ));
        }
        if let Some(k) = self.prompt_logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return bad(format!(
                "prompt_logprobs must be at most {MAX_TOP_LOGPROBS}, got {k}"
            ));
        }
        Ok(())
    }

    /// Rejects token ids that the model's vocabulary (`vocab` ids) lacks.
    pub fn validate_vocab(&self, vocab: usize) -> Result<()> {
        let outside = self
            .logit_bias
            .iter()
            .map(|&(id, _)| id)
            .find(|&id| id as usize >= vocab);
        match outside {
            Some(id) => Err(EngineError::Sampling(format!(
                "token id {id} is outside the vocabulary (size {vocab})"
            ))),
            None => Ok(()),
        }
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
    /// Where it was computed (a prompt's scores): `token`'s 1-based rank
    /// in the distribution, one more than the number of likelier tokens.
    pub rank: Option<u32>,
}

/// Largest top-k a step asks an executor to select for the sampler
/// ([`SamplingParams::top_k_only_at`]); larger ones get whole logits.
pub const MAX_DEVICE_TOP_K: usize = 256;

impl Sampled {
    /// A token with nothing reported about it: what [`sample`] returns
    /// when no log-probability is asked for.
    pub fn bare(token: u32) -> Self {
        Self {
            token,
            logprob: 0.0,
            top: Vec::new(),
            rank: None,
        }
    }
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
    // Two vectorised passes (the maximum, then its first position) beat one
    // compare-and-branch per logit.
    let m = crate::ops::max_value(logits);
    logits.iter().position(|&v| v == m).unwrap_or(0) as u32
}

fn log_softmax_at(logits: &[f32], max: f32, log_z: f64, id: u32) -> f32 {
    ((logits[id as usize] - max) as f64 - log_z) as f32
}

/// The largest logit and the log of the softmax normaliser relative to it:
/// what [`log_softmax_at`] needs.
fn log_normaliser(logits: &[f32]) -> (f32, f64) {
    let max = crate::ops::max_value(logits);
    let log_z = logits
        .iter()
        .map(|&v| ((v - max) as f64).exp())
        .sum::<f64>()
        .ln();
    (max, log_z)
}

/// How likely the model found `token` after a position whose raw logits
/// are `logits`, with its `top` most likely tokens: one entry of a
/// prompt's log-probabilities ([`SamplingParams::prompt_logprobs`]). The
/// same numbers [`sample`] reports for a sampled token, and its rank.
pub fn score(logits: &[f32], token: u32, top: usize) -> Sampled {
    let (max, log_z) = log_normaliser(logits);
    let own = logits[token as usize];
    let likelier = logits.iter().filter(|&&v| v > own).count();
    Sampled {
        token,
        logprob: log_softmax_at(logits, max, log_z, token),
        top: top_k_of(logits, top)
            .into_iter()
            .map(|(i, _)| (i, log_softmax_at(logits, max, log_z, i)))
            .collect(),
        rank: Some(likelier as u32 + 1),
    }
}

/// Orders candidates by weight, heaviest first, ties by id: a total order.
fn heavier(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Draws a token from `l` (penalties applied) at the request's temperature,
/// after top-k, top-p and min-p, with the uniform number of `pos`.
///
/// Only as much of the vocabulary is sorted as the filters need: top-k
/// sorts its `k` candidates; top-p selects growing heaviest prefixes until
/// one holds the mass it wants, then sorts that prefix; with neither, the
/// candidates are walked in id order. (Sorting all 49k candidates of a
/// small model's vocabulary took milliseconds per token.)
fn draw(params: &SamplingParams, l: &[f32], pos: u64) -> u32 {
    if params.top_k > 0 && params.top_k < l.len() {
        return draw_top_k(params, &top_k_of(l, params.top_k), pos);
    }
    // Candidates with their weights exp((logit - max) / T), in id order.
    let m = crate::ops::max_value(l);
    let mut w = vec![0f32; l.len()];
    crate::ops::exp_weights(l, m, 1.0 / params.temperature, &mut w);
    let cands: Vec<(f32, u32)> = w
        .into_iter()
        .zip(0u32..)
        .filter(|&(w, _)| w > 0.0)
        .collect();
    if cands.is_empty() {
        // Every logit is -inf (all masked): nothing can be drawn fairly.
        return argmax(l);
    }
    draw_among(params, cands, false, pos)
}

/// The `k` largest logits of `l` as `(id, logit)`, largest first, ties to
/// the lower id: the order sampling ranks top-k candidates in, so a device
/// that selects them the same way hands [`sample_top_k`] the same list.
pub fn top_k_of(l: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(l.len());
    if k == 0 {
        return Vec::new();
    }
    if k <= SMALL_TOP_K {
        return small_top_k(l, k);
    }
    let mut idx: Vec<u32> = (0..l.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, by_logit);
    idx.truncate(k);
    idx.sort_unstable_by(by_logit);
    idx.into_iter().map(|i| (i, l[i as usize])).collect()
}

/// Up to this `k`, [`top_k_of`] keeps its candidates in one pass instead of
/// selecting among the indices of the whole row.
const SMALL_TOP_K: usize = 64;

/// [`top_k_of`] for a small `k`: one pass over the row keeping the `k`
/// best in order. Most values lose one comparison against the worst kept,
/// so a 49k vocabulary costs tens of microseconds, where selecting among
/// its indices allocates and shuffles them all (scoring a prompt does this
/// for every position). Ids arrive in ascending order, so a later equal
/// value ranks after the ones kept: ties go to the lower id, as in the
/// select.
fn small_top_k(l: &[f32], k: usize) -> Vec<(u32, f32)> {
    use std::cmp::Ordering::{Greater, Less};
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in l.iter().enumerate() {
        if top.len() == k && v.total_cmp(&top[k - 1].1) != Greater {
            continue;
        }
        let at = top.partition_point(|&(_, w)| w.total_cmp(&v) != Less);
        top.insert(at, (i as u32, v));
        top.truncate(k);
    }
    top
}

/// [`draw`] after top-k: from the candidates `top` ([`top_k_of`]'s list,
/// largest first), with top-p and min-p applied within them.
fn draw_top_k(params: &SamplingParams, top: &[(u32, f32)], pos: u64) -> u32 {
    let Some(&(_, m)) = top.first() else {
        return 0;
    };
    let inv_t = 1.0 / params.temperature;
    let cands: Vec<(f32, u32)> = top
        .iter()
        .map(|&(i, v)| (crate::ops::exp((v - m) * inv_t), i))
        .collect();
    draw_among(params, cands, true, pos)
}

/// Top-p, min-p and the draw itself over weighted candidates (`sorted`:
/// heaviest first, else in id order).
fn draw_among(
    params: &SamplingParams,
    mut cands: Vec<(f32, u32)>,
    mut sorted: bool,
    pos: u64,
) -> u32 {
    // top-p: the smallest heaviest prefix whose mass reaches top_p of all.
    if params.top_p < 1.0 {
        let total: f64 = cands.iter().map(|c| c.0 as f64).sum();
        let want = params.top_p as f64 * total;
        // cands[..done] are heavier than the rest and hold `mass` < want;
        // only the slice that crosses `want` is sorted, so the cut is exact
        // (the kept set is the same as with a full sort; the order within
        // cands[..done] is fixed by the logits, which is all a draw needs).
        let (mut done, mut mass) = (0usize, 0.0f64);
        let n = cands.len();
        if !sorted {
            let mut k = 64.min(n);
            loop {
                if k < n {
                    cands[done..].select_nth_unstable_by(k - done - 1, heavier);
                }
                let more: f64 = cands[done..k].iter().map(|c| c.0 as f64).sum();
                if mass + more >= want || k == n {
                    // Halve the crossing slice until it is small, then sort it.
                    let mut hi = k;
                    while hi - done > 64 {
                        let mid = done + (hi - done) / 2;
                        cands[done..hi].select_nth_unstable_by(mid - done - 1, heavier);
                        let half: f64 = cands[done..mid].iter().map(|c| c.0 as f64).sum();
                        if mass + half >= want {
                            hi = mid;
                        } else {
                            mass += half;
                            done = mid;
                        }
                    }
                    cands[done..hi].sort_unstable_by(heavier);
                    cands.truncate(hi);
                    break;
                }
                mass += more;
                done = k;
                k = (k * 4).min(n);
            }
            sorted = done == 0;
        }
        let mut cut = cands.len();
        for (i, c) in cands.iter().enumerate().skip(done) {
            mass += c.0 as f64;
            if mass >= want {
                cut = i + 1;
                break;
            }
        }
        cands.truncate(cut);
    }
    // min-p: drop tokens below min_p × the top token's weight (which is 1).
    if params.min_p > 0.0 {
        let top = if sorted {
            cands[0].0
        } else {
            cands.iter().map(|c| c.0).fold(0.0, f32::max)
        };
        let floor = top * params.min_p;
        if sorted {
            let keep = cands.iter().take_while(|c| c.0 >= floor).count().max(1);
            cands.truncate(keep);
        } else {
            cands.retain(|c| c.0 >= floor);
        }
    }
    let total: f64 = cands.iter().map(|c| c.0 as f64).sum();
    let u = uniform(params.seed, params.request_key, pos) * total;
    let mut acc = 0.0;
    for c in &cands {
        acc += c.0 as f64;
        if u < acc {
            return c.1;
        }
    }
    // Rounding left u at the total: the last candidate that can be drawn.
    cands
        .iter()
        .rev()
        .find(|c| c.0 > 0.0)
        .map_or(cands[0].1, |c| c.1)
}

/// What [`sample`] returns at `pos` when [`SamplingParams::top_k_only_at`]
/// says so, from the top-k candidates alone ([`top_k_of`]'s list, as an
/// executor selected them).
pub fn sample_top_k(params: &SamplingParams, top: &[(u32, f32)], pos: u64) -> Sampled {
    Sampled::bare(draw_top_k(params, top, pos))
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
    sample_masked(params, logits, context, output_start, pos, None)
}

/// [`sample`] among the ids that `allowed` marks alone (a guide's mask;
/// ids past its end are not allowed). At least one must be. Reported
/// log-probabilities stay the model's, as with the penalties.
pub fn sample_masked(
    params: &SamplingParams,
    logits: &[f32],
    context: &[u32],
    output_start: usize,
    pos: u64,
    allowed: Option<&[bool]>,
) -> Sampled {
    // Raw log-probabilities for reporting.
    let want_lp = params.logprobs || params.top_logprobs > 0;
    let (max, log_z) = if want_lp {
        log_normaliser(logits)
    } else {
        (0.0, 0.0)
    };

    let masked = pos < params.min_tokens as u64 && !params.min_tokens_masked.is_empty();
    let penalised = params.repetition_penalty != 1.0
        || params.presence_penalty != 0.0
        || params.frequency_penalty != 0.0
        || !params.logit_bias.is_empty();
    let mut work: Vec<f32>;
    let l: &[f32] = if penalised || masked || allowed.is_some() {
        work = logits.to_vec();
        if let Some(allowed) = allowed {
            for (i, v) in work.iter_mut().enumerate() {
                if !allowed.get(i).copied().unwrap_or(false) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        if masked {
            for &t in &params.min_tokens_masked {
                if let Some(v) = work.get_mut(t as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        if params.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in context {
                if seen.insert(t) {
                    let v = &mut work[t as usize];
                    // A penalty near 0 favours seen tokens without bound:
                    // the largest finite logit, so the softmax stays finite.
                    *v = if *v > 0.0 {
                        (*v / params.repetition_penalty).min(f32::MAX)
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
        // After the penalties, as vLLM orders them; ids were checked
        // against the vocabulary at admission.
        for &(t, b) in &params.logit_bias {
            if let Some(v) = work.get_mut(t as usize) {
                *v += b;
            }
        }
        &work
    } else {
        logits
    };

    let token = if params.temperature == 0.0 {
        argmax(l)
    } else {
        draw(params, l, pos)
    };

    let (logprob, top) = if want_lp {
        let lp = log_softmax_at(logits, max, log_z, token);
        let mut top = Vec::new();
        if params.top_logprobs > 0 {
            top = top_k_of(logits, params.top_logprobs)
                .into_iter()
                .map(|(i, _)| (i, log_softmax_at(logits, max, log_z, i)))
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
        rank: None,
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

    /// A tiny repetition penalty (accepted: it is > 0) favours the seen
    /// tokens as hard as floats allow, without infinities or NaNs.
    #[test]
    fn a_tiny_repetition_penalty_stays_finite() {
        for temperature in [0.0, 1.0] {
            let p = SamplingParams {
                temperature,
                repetition_penalty: 1e-40,
                logprobs: true,
                ..Default::default()
            };
            for key in 0..20 {
                let p = SamplingParams {
                    seed: key,
                    ..p.clone()
                };
                let s = sample(&p, &logits(), &[2, 3], 0, key);
                assert!([2, 3].contains(&s.token), "{s:?}");
                assert!(s.logprob.is_finite(), "{s:?}");
            }
        }
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
    fn min_tokens_masks_the_stop_tokens_until_reached() {
        // Tokens 1 and 3 tie for the top logit; both stop the sequence.
        let mut p = SamplingParams {
            min_tokens: 2,
            min_tokens_masked: vec![1, 3],
            logprobs: true,
            ..Default::default()
        };
        let l = logits();
        for pos in 0..2 {
            let s = sample(&p, &l, &[], 0, pos);
            assert_eq!(s.token, 2, "greedy at position {pos}");
            // Log-probabilities stay those of the model's distribution.
            let z: f64 = l.iter().map(|&v| ((v - 3.0) as f64).exp()).sum();
            assert!((s.logprob as f64 - ((-1.0f64).exp() / z).ln()).abs() < 1e-6);
        }
        assert_eq!(
            sample(&p, &l, &[], 0, 2).token,
            1,
            "unmasked from min_tokens on"
        );
        // Sampled at any temperature, a masked token is never drawn.
        p.temperature = 2.0;
        p.seed = 11;
        for pos in 0..2 {
            for key in 0..200 {
                p.request_key = key;
                let t = sample(&p, &l, &[], 0, pos).token;
                assert!(t != 1 && t != 3, "drew stop token {t}");
            }
        }
        // Masking everything draws something rather than panicking.
        p.min_tokens_masked = (0..l.len() as u32).collect();
        let _ = sample(&p, &l, &[], 0, 0);
    }

    /// The kept set and probabilities by a full sort, as a reference.
    fn naive_kept(p: &SamplingParams, l: &[f32]) -> Vec<(u32, f64)> {
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        idx.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b)));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let m = l[idx[0] as usize] as f64;
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i as usize] as f64 - m) / p.temperature as f64).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut cut = w.len();
        let mut acc = 0.0;
        for (i, x) in w.iter().enumerate() {
            acc += x;
            if acc >= p.top_p as f64 * total {
                cut = i + 1;
                break;
            }
        }
        let cut = cut.min(
            w.iter()
                .take_while(|&&x| x >= p.min_p as f64)
                .count()
                .max(1),
        );
        let kept: f64 = w[..cut].iter().sum();
        idx[..cut]
            .iter()
            .zip(&w)
            .map(|(&i, &x)| (i, x / kept))
            .collect()
    }

    #[test]
    fn filters_keep_what_a_full_sort_keeps_and_draw_in_proportion() {
        // A peaked head over a long flat tail, so that top-p's prefix is
        // found in several rounds of selection.
        let mut x = 99u64;
        let l: Vec<f32> = (0..5000)
            .map(|i| {
                x = mix(x);
                let noise = (x >> 40) as f32 / 16_777_216.0;
                if i % 97 == 5 {
                    6.0 + noise
                } else {
                    noise * 4.0
                }
            })
            .collect();
        for (top_k, top_p, min_p) in [
            (0, 1.0, 0.0),
            (0, 0.3, 0.0),
            (0, 0.9, 0.0),
            (0, 0.99, 0.0),
            (0, 1.0, 0.05),
            (0, 0.9, 0.2),
            (60, 0.8, 0.0),
            (7, 1.0, 0.0),
        ] {
            let p = SamplingParams {
                temperature: 0.9,
                top_k,
                top_p,
                min_p,
                seed: 3,
                ..Default::default()
            };
            let want = naive_kept(&p, &l);
            let prob: std::collections::HashMap<u32, f64> = want.iter().copied().collect();
            let n = 4_000;
            let mut count = std::collections::HashMap::<u32, usize>::new();
            for pos in 0..n {
                let t = sample(&p, &l, &[], 0, pos).token;
                assert!(
                    prob.contains_key(&t),
                    "{top_k}/{top_p}/{min_p}: drew {t} outside the kept set"
                );
                *count.entry(t).or_default() += 1;
            }
            // The heaviest tokens come up as often as their probability says.
            for &(t, q) in want.iter().take(3) {
                let got = count.get(&t).copied().unwrap_or(0) as f64 / n as f64;
                let sd = (q * (1.0 - q) / n as f64).sqrt();
                assert!(
                    (got - q).abs() < 5.0 * sd + 1e-3,
                    "{top_k}/{top_p}/{min_p}: token {t} drawn {got}, want {q}"
                );
            }
        }
    }

    /// Where the predicate says plain greedy, `sample` is exactly the
    /// argmax with nothing else reported; each thing it checks, changed
    /// alone, makes `sample` do more than that on some logits.
    #[test]
    fn plain_greedy_is_what_sample_does() {
        let l = vec![0.5, 2.0, 2.0, -1.0, 1.5];
        let ctx = [1u32, 4, 1];
        let plain = SamplingParams {
            min_tokens: 2,
            min_tokens_masked: vec![1],
            ..SamplingParams::greedy()
        };
        // Past min_tokens: plain.
        assert!(plain.is_plain_greedy_at(2));
        let s = sample(&plain, &l, &ctx, 1, 2);
        assert_eq!(s, Sampled::bare(argmax(&l)));
        // Below it the stop id is masked: not plain, and not the argmax.
        assert!(!plain.is_plain_greedy_at(1));
        assert_ne!(sample(&plain, &l, &ctx, 1, 1).token, argmax(&l));
        // Sampling at a temperature draws (and may well draw the argmax).
        let warm = SamplingParams {
            temperature: 0.7,
            ..SamplingParams::greedy()
        };
        assert!(!warm.is_plain_greedy_at(5));
        let others = [
            SamplingParams {
                logprobs: true,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                top_logprobs: 2,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                repetition_penalty: 3.0,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                presence_penalty: 1.0,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                frequency_penalty: 1.0,
                ..SamplingParams::greedy()
            },
        ];
        for p in &others {
            assert!(!p.is_plain_greedy_at(5), "{p:?}");
            let s = sample(p, &l, &ctx, 1, 5);
            assert!(
                s.token != argmax(&l) || s.logprob != 0.0 || !s.top.is_empty(),
                "{p:?} sampled like plain greedy"
            );
        }
    }

    /// Where the predicate says top-k only, drawing from the top-k list
    /// gives `sample`'s token for every seed, whatever top-p and min-p do
    /// within it; what the predicate rules out changes `sample`'s inputs.
    #[test]
    fn top_k_candidates_draw_what_sample_draws() {
        let l: Vec<f32> = (0..500u32)
            .map(|i| ((i * 7919 % 613) as f32 / 61.3) - 5.0 + if i % 97 == 0 { 3.0 } else { 0.0 })
            .collect();
        let ctx = [3u32, 9, 3];
        for (k, top_p, min_p, t) in [
            (1, 1.0, 0.0, 0.8),
            (5, 1.0, 0.0, 1.0),
            (40, 0.9, 0.0, 0.7),
            (256, 0.95, 0.05, 1.3),
            (100, 1.0, 0.2, 2.0),
        ] {
            for seed in 0..200 {
                let p = SamplingParams {
                    temperature: t,
                    top_k: k,
                    top_p,
                    min_p,
                    seed,
                    request_key: 11,
                    ..SamplingParams::default()
                };
                assert_eq!(p.top_k_only_at(4, l.len()), Some(k));
                let top = top_k_of(&l, k);
                assert_eq!(top.len(), k);
                assert_eq!(
                    sample_top_k(&p, &top, 4),
                    sample(&p, &l, &ctx, 1, 4),
                    "k={k} top_p={top_p} min_p={min_p} t={t} seed={seed}"
                );
            }
        }
        let base = SamplingParams {
            temperature: 0.7,
            top_k: 50,
            ..SamplingParams::default()
        };
        assert_eq!(
            base.top_k_only_at(0, 50),
            None,
            "k not below the vocabulary"
        );
        for p in [
            SamplingParams {
                temperature: 0.0,
                ..base.clone()
            },
            SamplingParams {
                top_k: 0,
                ..base.clone()
            },
            SamplingParams {
                top_k: MAX_DEVICE_TOP_K + 1,
                ..base.clone()
            },
            SamplingParams {
                logprobs: true,
                ..base.clone()
            },
            SamplingParams {
                top_logprobs: 1,
                ..base.clone()
            },
            SamplingParams {
                repetition_penalty: 1.1,
                ..base.clone()
            },
            SamplingParams {
                presence_penalty: 0.5,
                ..base.clone()
            },
            SamplingParams {
                frequency_penalty: 0.5,
                ..base.clone()
            },
            SamplingParams {
                min_tokens: 9,
                min_tokens_masked: vec![2],
                ..base.clone()
            },
        ] {
            assert_eq!(p.top_k_only_at(4, 500), None, "{p:?}");
        }
        // Ties at the cut go to the lower ids, largest first.
        let tied = [1.0, 3.0, 2.0, 3.0, 2.0, 2.0];
        assert_eq!(
            top_k_of(&tied, 4),
            vec![(1, 3.0), (3, 3.0), (2, 2.0), (4, 2.0)]
        );
    }

    proptest::proptest! {
        /// The one-pass top-k of small `k` and the select of larger ones
        /// both give the head of the whole row sorted (by value, largest
        /// first, ties to the lower id), with ties, infinities and NaN.
        #[test]
        fn top_k_is_the_head_of_the_sorted_row(
            raw in proptest::collection::vec(0u8..12, 1..300),
            k in 1usize..120,
        ) {
            let l: Vec<f32> = raw
                .iter()
                .map(|&b| match b {
                    0 => f32::NEG_INFINITY,
                    1 => f32::INFINITY,
                    2 => f32::NAN,
                    b => b as f32 * 0.5 - 2.0,
                })
                .collect();
            let mut sorted: Vec<(u32, f32)> =
                l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            sorted.truncate(k);
            let got = top_k_of(&l, k);
            let bits = |v: &[(u32, f32)]| v.iter().map(|&(i, x)| (i, x.to_bits())).collect::<Vec<_>>();
            proptest::prop_assert_eq!(bits(&got), bits(&sorted));
        }
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

    #[test]
    fn logit_bias_shifts_the_draw_but_not_the_reported_logprobs() {
        let l = logits();
        let plain = sample(&SamplingParams::greedy(), &l, &[], 0, 0);
        assert_eq!(plain.token, 1);
        // Banning the greedy pick (and its tie) leaves the next best.
        let p = SamplingParams {
            logit_bias: vec![(1, -100.0), (3, -100.0)],
            logprobs: true,
            top_logprobs: 2,
            ..Default::default()
        };
        assert!(!p.is_plain_greedy_at(0));
        let s = sample(&p, &l, &[], 0, 0);
        assert_eq!(s.token, 2);
        // Reported log-probabilities are the model's: token 1 still tops them.
        let unbiased = sample(
            &SamplingParams {
                logprobs: true,
                top_logprobs: 2,
                ..Default::default()
            },
            &l,
            &[],
            0,
            0,
        );
        assert_eq!(s.top, unbiased.top);
        let lp2 = unbiased.top[0].1 - (3.0 - 2.0);
        assert!((s.logprob - lp2).abs() < 1e-6, "{} vs {lp2}", s.logprob);
        // A large positive bias forces a token, at any temperature, in a
        // top-k draw too (the bias applies before the top-k cut).
        for (temperature, top_k) in [(0.0, 0), (1.5, 0), (1.0, 2)] {
            let p = SamplingParams {
                temperature,
                top_k,
                seed: 9,
                logit_bias: vec![(4, 100.0)],
                ..Default::default()
            };
            assert_eq!(p.top_k_only_at(0, l.len()), None);
            for pos in 0..32 {
                assert_eq!(sample(&p, &l, &[], 0, pos).token, 4);
            }
        }
        // Bias and penalties add up: -1 on token 1 and a presence penalty
        // of 1 on token 3 (in the output) leave token 2 (2.0) on top.
        let p = SamplingParams {
            logit_bias: vec![(1, -1.5)],
            presence_penalty: 1.5,
            ..Default::default()
        };
        assert_eq!(sample(&p, &l, &[3], 0, 0).token, 2);
    }

    #[test]
    fn logit_bias_is_checked() {
        let with = |b: Vec<(u32, f32)>| SamplingParams {
            logit_bias: b,
            ..Default::default()
        };
        for bad in [
            vec![(1, 100.5)],
            vec![(1, f32::NAN)],
            vec![(1, f32::NEG_INFINITY)],
            vec![(2, 1.0), (2, -1.0)],
        ] {
            let e = with(bad.clone()).validate().unwrap_err().to_string();
            assert!(e.contains("logit_bias"), "{bad:?}: {e}");
        }
        assert!(with(vec![(5, -100.0), (6, 100.0)]).validate().is_ok());
        assert!(with(vec![(5, 1.0)]).validate_vocab(6).is_ok());
        let e = with(vec![(6, 1.0)]).validate_vocab(6).unwrap_err();
        assert!(e.to_string().contains("token id 6"), "{e}");
    }
}
