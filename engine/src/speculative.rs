//! Speculative decoding by prompt lookup: draft tokens come from the
//! sequence itself (the tokens that followed the latest earlier occurrence
//! of its last few tokens), and the model checks a sequence's draft in the
//! same forward step that computes its next token.
//!
//! Decoding one token at a time reads every weight once per token; a step
//! over `1 + d` tokens of one sequence reads them once for all, so each
//! draft token the model agrees with is a token gained for the price of a
//! row of compute. Drafts pay off where output repeats its input: code
//! edits, quoting, extraction, summaries, JSON that echoes field names, and
//! the loops small models fall into.
//!
//! Verification never changes the output. A draft token is kept only when
//! the token the request samples at that position (its own sampler, with
//! its temperature, penalties, grammar, key and position) is that token:
//! sampling is counter-based and the kernels give a position the same
//! logits however many tokens a step computes, so every token emitted is
//! exactly what decoding one token per step would have emitted, and a
//! sampled request keeps its seed's output. For a deterministic draft this
//! accepts as often as rejection sampling would (a token is kept with the
//! probability the model gives it).

/// How the scheduler drafts (see [`crate::scheduler::SchedulerConfig`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeculativeConfig {
    /// Draft tokens per sequence per step at most; 0 turns speculation off.
    pub tokens: usize,
    /// Shortest suffix looked up (in tokens).
    pub ngram_min: usize,
    /// Longest suffix looked up; longer matches are tried first.
    pub ngram_max: usize,
    /// Draft only while at most this many sequences decode in a step:
    /// beyond that a step is compute-bound, and rows the model rejects cost
    /// more than the steps that accepted drafts save.
    pub max_batch: usize,
    /// What one more token costs a one-sequence step, as a share of the
    /// step (about 0.35 for the CPU kernels at a few tokens; far less on a
    /// GPU). With each sequence's acceptance rate it sets how long a draft
    /// is worth verifying ([`draft_len`]).
    pub token_cost: f32,
}

impl SpeculativeConfig {
    /// Speculation off.
    pub const OFF: Self = Self {
        tokens: 0,
        ngram_min: 2,
        ngram_max: 4,
        max_batch: 4,
        token_cost: 0.35,
    };

    /// `tokens` draft tokens per step with the default lookup.
    pub fn ngram(tokens: usize) -> Self {
        Self {
            tokens,
            ..Self::OFF
        }
    }

    pub fn enabled(&self) -> bool {
        self.tokens > 0 && self.max_batch > 0 && self.ngram_min >= 1
    }
}

impl Default for SpeculativeConfig {
    fn default() -> Self {
        Self::OFF
    }
}

/// A sequence's acceptance rate before anything was drafted for it.
pub const INITIAL_ACCEPTANCE: f32 = 0.5;

/// Weight of each new observation in a sequence's acceptance rate (an
/// exponential moving average: recent text predicts the next draft best).
const ACCEPTANCE_WEIGHT: f32 = 0.2;

/// `rate` after observing one draft token kept (or not).
pub fn observe(rate: f32, kept: bool) -> f32 {
    rate + ACCEPTANCE_WEIGHT * (f32::from(u8::from(kept)) - rate)
}

/// How many of `available` draft tokens to verify for a sequence whose
/// draft tokens are kept at `rate`: the length that maximises expected
/// tokens per unit of step time, `(1 − rate^(d+1)) / (1 − rate)` tokens
/// (draft tokens are kept up to the first miss, and the step always yields
/// one more) over `1 + token_cost · d`. 0 when no draft beats decoding
/// alone: then the draft's first token is still compared with what the
/// sequence samples, so the rate keeps up with the text.
pub fn draft_len(rate: f32, token_cost: f32, available: usize) -> usize {
    let rate = rate.clamp(0.0, 0.999) as f64;
    let cost = token_cost.max(0.0) as f64;
    let mut best = (0, 1.0f64);
    let mut expected = 1.0; // tokens per step with a draft of d
    let mut p = 1.0; // rate^d
    for d in 1..=available {
        p *= rate;
        expected += p;
        let gain = expected / (1.0 + cost * d as f64);
        if gain > best.1 * 1.02 {
            best = (d, gain);
        }
    }
    best.0
}

/// At most `k` tokens that followed the latest earlier occurrence of the
/// last `n` tokens of `tokens`, for the longest `n` in
/// `ngram_min..=ngram_max` that occurs earlier; empty when none does.
pub fn propose_ngram(tokens: &[u32], ngram_min: usize, ngram_max: usize, k: usize) -> &[u32] {
    let len = tokens.len();
    if k == 0 || ngram_min == 0 {
        return &[];
    }
    for n in (ngram_min..=ngram_max).rev() {
        if n >= len {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Starts of earlier occurrences, latest first (the suffix itself,
        // at `len - n`, is excluded).
        if let Some(i) = (0..len - n)
            .rev()
            .find(|&i| tokens[i] == suffix[0] && tokens[i..i + n] == *suffix)
        {
            let from = i + n;
            return &tokens[from..(from + k).min(len)];
        }
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn drafts_what_followed_the_latest_match() {
        // ... 5 6 7 [8 9] ... 5 6 7 [1 2] ... 5 6 7 -> the latest: 1 2
        let t = [5, 6, 7, 8, 9, 0, 5, 6, 7, 1, 2, 3, 5, 6, 7];
        assert_eq!(propose_ngram(&t, 2, 4, 2), &[1, 2]);
        assert_eq!(propose_ngram(&t, 2, 4, 10), &[1, 2, 3, 5, 6, 7]);
    }

    #[test]
    fn longer_suffixes_win() {
        // The 1-gram [7] last occurred before 4, the 3-gram [5 6 7] before 8.
        let t = [5, 6, 7, 8, 1, 7, 4, 5, 6, 7];
        assert_eq!(propose_ngram(&t, 1, 3, 1), &[8]);
        assert_eq!(propose_ngram(&t, 1, 1, 1), &[4]);
    }

    #[test]
    fn nothing_without_an_earlier_match() {
        assert!(propose_ngram(&[1, 2, 3, 4], 1, 3, 4).is_empty());
        assert!(propose_ngram(&[1], 1, 3, 4).is_empty());
        assert!(propose_ngram(&[], 1, 3, 4).is_empty());
        assert!(propose_ngram(&[1, 1, 1], 1, 3, 0).is_empty());
        assert!(propose_ngram(&[1, 1, 1], 0, 0, 3).is_empty());
    }

    #[test]
    fn a_loop_drafts_its_own_continuation() {
        let t = [9, 1, 2, 3, 1, 2, 3, 1, 2];
        assert_eq!(propose_ngram(&t, 2, 4, 3), &[3, 1, 2]);
        assert_eq!(propose_ngram(&[4, 4, 4, 4], 2, 4, 3), &[4]);
    }

    #[test]
    fn drafts_grow_with_the_acceptance_rate() {
        assert_eq!(draft_len(0.1, 0.25, 8), 0);
        assert_eq!(draft_len(0.3, 0.25, 8), 1);
        let mid = draft_len(0.7, 0.25, 8);
        let high = draft_len(0.95, 0.25, 8);
        assert!((1..high).contains(&mid), "{mid} {high}");
        assert_eq!(draft_len(0.95, 0.25, 2), 2, "no more than is available");
        assert_eq!(draft_len(0.8, 0.0, 6), 6, "free tokens: draft all");
        assert_eq!(draft_len(0.99, 0.25, 0), 0);
    }

    #[test]
    fn the_rate_follows_what_is_kept() {
        let mut r = INITIAL_ACCEPTANCE;
        for _ in 0..20 {
            r = observe(r, true);
        }
        assert!(r > 0.95, "{r}");
        for _ in 0..20 {
            r = observe(r, false);
        }
        assert!(r < 0.05, "{r}");
    }

    proptest! {
        /// Whatever it drafts followed an earlier copy of the suffix it
        /// matched: a match of at least `ngram_min` tokens ends right
        /// before the draft.
        #[test]
        fn drafts_follow_a_real_match(
            t in proptest::collection::vec(0u32..4, 0..64),
            lo in 1usize..4, extra in 0usize..3, k in 1usize..6,
        ) {
            let hi = lo + extra;
            let d = propose_ngram(&t, lo, hi, k);
            prop_assert!(d.len() <= k);
            if !d.is_empty() {
                let found = (lo..=hi).any(|n| {
                    n < t.len() && (0..t.len() - n).any(|i| {
                        t[i..i + n] == t[t.len() - n..]
                            && t[i + n..].starts_with(d)
                            && (d.len() == k || i + n + d.len() == t.len())
                    })
                });
                prop_assert!(found, "{t:?} drafted {d:?}");
            } else {
                // Not even the shortest suffix occurs earlier.
                let n = lo;
                prop_assert!(n >= t.len() || !(0..t.len() - n).any(|i| t[i..i + n] == t[t.len() - n..]));
            }
        }
    }
}
