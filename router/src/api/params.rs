//! Parameter validation shared by the HTTP and gRPC front ends: parsed
//! parameters in, [`GenerationInput`]s out.

use crate::dispatch::{GenerationInput, Sampling};

use super::{ApiError, ApiState};

/// Most stop strings per request: OpenAI takes 4, but vLLM and Anthropic
/// set no limit and agent frameworks send more; this bounds the matching.
pub const MAX_STOP: usize = 64;
/// Most choices of one prompt: what a worker forks from one prompt's KV
/// (the engine's `MAX_CHOICES`). A request's prompts × n are held to
/// [`super::openai::MAX_CHOICES`].
pub const MAX_N: i64 = 64;

/// Generation parameters as the client gave them (`None` = default).
/// Ranges are checked by [`GenParams::build`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenParams {
    /// Already checked > 0 by the parsers where the wire type is signed.
    pub max_tokens: Option<i64>,
    /// Name of the field `max_tokens` came from (for error `param`s).
    pub max_tokens_param: &'static str,
    /// `max_tokens` when the request does not give it (legacy completions'
    /// 16), at most what the context leaves; without it, the rest of the
    /// context.
    pub default_max_tokens: Option<i64>,
    /// vLLM's `include_stop_str_in_output`: the stop string that ends a
    /// choice is part of its text.
    pub stop_in_output: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Extra ids that end the generation (added to the model's).
    pub stop_token_ids: Vec<u32>,
    pub n: Option<i64>,
    /// `Some(k)`: return log-probabilities with the top `k` alternatives.
    pub logprobs: Option<u32>,
    /// Do not stop on the model's own end-of-sequence tokens (vLLM's
    /// `ignore_eos`; load generators send it to get exact output lengths).
    pub ignore_eos: bool,
    /// The completion has at least this many tokens (vLLM's `min_tokens`).
    pub min_tokens: Option<i64>,
    /// `(token id, bias)` as given (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f64)>,
    /// JSON mode (`response_format: {"type": "json_object"}`).
    pub json_object: bool,
    /// Structured output: the schema's JSON text.
    pub json_schema: Option<String>,
    /// vLLM's `guided_regex`.
    pub regex: Option<String>,
    /// vLLM's `guided_choice`.
    pub choice: Vec<String>,
    /// Score the prompt with the top `k` alternatives per position (OpenAI's
    /// `echo` with `logprobs`). With it, `max_tokens` may be 0: the prompt
    /// alone is scored.
    pub prompt_logprobs: Option<u32>,
    /// The answer repeats the prompt (completions' `echo`): with it too,
    /// `max_tokens` may be 0, and the prompt is all that comes back.
    pub echo: bool,
    /// The LoRA adapter the request's `model` names; empty: the base model.
    pub adapter: String,
}

/// Largest bias magnitude `logit_bias` accepts (OpenAI's range).
pub const MAX_LOGIT_BIAS: f64 = 100.0;

/// Validated parameters, ready to run.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub inputs: Vec<GenerationInput>,
    pub prompt_tokens: usize,
    pub stop: Vec<String>,
    pub logprobs: Option<u32>,
    /// Tokens before which stop strings are not matched.
    pub min_tokens: usize,
    /// The stop string that ends a choice stays in its text.
    pub stop_in_output: bool,
    /// The request's own `stop_token_ids` (the model's end-of-text
    /// tokens not among them).
    pub stop_token_ids: Vec<u32>,
    /// `max_tokens: 0` on a scored or echoed prompt: the workers generate
    /// one token, which the front end drops
    /// ([`super::ChoiceDecoder::score_only`]).
    pub score_only: bool,
}

fn check_range(
    param: &str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    lo_open: bool,
) -> Result<(), ApiError> {
    // Checked as the workers will see it: a value that rounds to 0 in
    // single precision is 0.
    let Some(given) = v else {
        return Ok(());
    };
    let v = given as f32 as f64;
    let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
    if ok {
        Ok(())
    } else {
        let lb = if lo_open { "(" } else { "[" };
        Err(ApiError::bad_param(
            param,
            format!("'{param}' must be in {lb}{lo}, {hi}], got {given}"),
        ))
    }
}

impl GenParams {
    /// Validates the parameters against the prompt and the model, and builds
    /// one [`GenerationInput`] per choice (`request_id` = `{base}-{index}`).
    pub fn build(
        &self,
        state: &ApiState,
        prompt: Vec<u32>,
        request_id: &str,
        prompt_param: &str,
    ) -> Result<Prepared, ApiError> {
        let mt_param = if self.max_tokens_param.is_empty() {
            "max_tokens"
        } else {
            self.max_tokens_param
        };
        check_range("temperature", self.temperature, 0.0, 2.0, false)?;
        check_range("top_p", self.top_p, 0.0, 1.0, true)?;
        check_range("min_p", self.min_p, 0.0, 1.0, false)?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0, false)?;
        check_range(
            "frequency_penalty",
            self.frequency_penalty,
            -2.0,
            2.0,
            false,
        )?;
        check_range(
            "repetition_penalty",
            self.repetition_penalty,
            0.0,
            10.0,
            true,
        )?;
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 && k <= u32::MAX as i64 => k as u32,
            Some(k) => {
                return Err(ApiError::bad_param(
                    "top_k",
                    format!("'top_k' must be -1, 0 (off) or a positive integer, got {k}"),
                ))
            }
        };
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::bad_param(
                "n",
                format!("'n' must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        if self.stop.len() > MAX_STOP {
            return Err(ApiError::bad_param(
                "stop",
                format!(
                    "at most {MAX_STOP} stop sequences are allowed, got {}",
                    self.stop.len()
                ),
            ));
        }
        let vocab = state.tokenizer.vocab_size();
        if let Some(&bad) = self.stop_token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::bad_param(
                "stop_token_ids",
                format!("token id {bad} is outside the vocabulary (size {vocab})"),
            ));
        }
        let mut logit_bias = Vec::with_capacity(self.logit_bias.len());
        for &(id, b) in &self.logit_bias {
            if id as usize >= vocab {
                return Err(ApiError::bad_param(
                    "logit_bias",
                    format!("token id {id} is outside the vocabulary (size {vocab})"),
                ));
            }
            if !(b.is_finite() && (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&b)) {
                return Err(ApiError::bad_param(
                    "logit_bias",
                    format!(
                        "the bias for token {id} must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {b}"
                    ),
                ));
            }
            logit_bias.push((id, b as f32));
        }
        logit_bias.sort_unstable_by_key(|&(id, _)| id);
        if let Some(w) = logit_bias.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(ApiError::bad_param(
                "logit_bias",
                format!("token id {} is given more than one bias", w[0].0),
            ));
        }
        let constraints = usize::from(self.json_object)
            + usize::from(self.json_schema.is_some())
            + usize::from(self.regex.is_some())
            + usize::from(!self.choice.is_empty());
        if constraints > 1 {
            return Err(ApiError::bad_param(
                "response_format",
                "give one output constraint: response_format, guided_json, guided_regex or guided_choice",
            ));
        }
        let score_only =
            self.max_tokens == Some(0) && (self.prompt_logprobs.is_some() || self.echo);
        let max_tokens = match self.max_tokens {
            None => None,
            Some(0) if score_only => Some(1),
            Some(m) if m <= 0 => {
                return Err(ApiError::bad_param(
                    mt_param,
                    format!("'{mt_param}' must be at least 1, got {m}"),
                ))
            }
            Some(m) => Some(m),
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                "the prompt is empty after tokenisation",
                Some(prompt_param),
            ));
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::bad_param(
                prompt_param,
                format!("token id {bad} is outside the vocabulary (size {vocab})"),
            ));
        }
        let ctx = state.context_length;
        let p = prompt.len();
        let max_tokens = max_tokens.or_else(|| {
            self.default_max_tokens
                .filter(|_| p < ctx)
                .map(|d| d.min((ctx - p) as i64))
        });
        let exceeded = match max_tokens {
            Some(m) => (p as i64).saturating_add(m) > ctx as i64,
            None => p >= ctx,
        };
        if exceeded {
            let message = match max_tokens {
                // Scoring computes the prompt as a step that would sample
                // one token: the prompt must leave room for it.
                Some(_) if score_only => format!(
                    "This model's maximum context length is {ctx} tokens. However, your prompt \
                     has {p} tokens; a prompt scored with max_tokens 0 may have at most {} \
                     tokens.",
                    ctx - 1
                ),
                Some(m) => format!(
                    "This model's maximum context length is {ctx} tokens. However, you requested \
                     {} tokens ({p} in the prompt, {m} in the completion). Please reduce the \
                     length of the prompt or the completion.",
                    (p as i64).saturating_add(m)
                ),
                None => format!(
                    "This model's maximum context length is {ctx} tokens. However, your prompt \
                     has {p} tokens, which leaves no room for a completion."
                ),
            };
            let param = if max_tokens.is_some() && p < ctx {
                mt_param
            } else {
                prompt_param
            };
            return Err(
                ApiError::invalid(message, Some(param)).with_code("context_length_exceeded")
            );
        }
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(m) if m < 0 => {
                return Err(ApiError::bad_param(
                    "min_tokens",
                    format!("'min_tokens' must be at least 0, got {m}"),
                ))
            }
            Some(m) => {
                let cap = max_tokens.unwrap_or((ctx - p) as i64);
                if m > cap {
                    return Err(ApiError::bad_param(
                        "min_tokens",
                        format!(
                            "'min_tokens' ({m}) must not exceed '{}' ({cap})",
                            if max_tokens.is_some() {
                                mt_param
                            } else {
                                "the room left in the context"
                            }
                        ),
                    ));
                }
                m as u32
            }
        };
        if let Some(k) = self.logprobs {
            if k > 20 {
                return Err(ApiError::bad_param(
                    "top_logprobs",
                    format!("at most 20 top log-probabilities are supported, got {k}"),
                ));
            }
        }
        if let Some(k) = self.prompt_logprobs.filter(|&k| k > 20) {
            return Err(ApiError::bad_param(
                "prompt_logprobs",
                format!("at most 20 top log-probabilities are supported, got {k}"),
            ));
        }

        // Same seed, same output: the key base only varies without a seed.
        let (seed, key_base) = match self.seed {
            Some(s) => (s, 0u64),
            None => (rand::random::<u64>(), rand::random::<u64>() >> 8),
        };
        let mut stop_token_ids = if self.ignore_eos {
            Vec::new()
        } else {
            state.stop_token_ids.clone()
        };
        for &id in &self.stop_token_ids {
            if !stop_token_ids.contains(&id) {
                stop_token_ids.push(id);
            }
        }
        let sampling = Sampling {
            temperature: self.temperature.unwrap_or(1.0) as f32,
            top_k,
            top_p: self.top_p.unwrap_or(1.0) as f32,
            min_p: self.min_p.unwrap_or(0.0) as f32,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0) as f32,
            presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
            seed,
            request_key: key_base,
            logprobs: self.logprobs.is_some(),
            top_logprobs: self.logprobs.unwrap_or(0),
            min_tokens: min_tokens as u32,
            min_tokens_masked: if min_tokens > 0 {
                stop_token_ids.clone()
            } else {
                Vec::new()
            },
            logit_bias,
            json_object: self.json_object,
            json_schema: self.json_schema.clone(),
            regex: self.regex.clone(),
            choice: self.choice.clone(),
            prompt_logprobs: self.prompt_logprobs,
        };
        let inputs = (0..n as u64)
            .map(|i| GenerationInput {
                request_id: format!("{request_id}-{i}"),
                prompt: prompt.clone(),
                sampling: Sampling {
                    request_key: key_base.wrapping_add(i),
                    ..sampling.clone()
                },
                max_tokens: max_tokens.map(|m| m as u32),
                stop_token_ids: stop_token_ids.clone(),
                adapter: self.adapter.clone(),
                frontend_time: std::time::Duration::ZERO,
            })
            .collect();
        // Constrained output (a response format, guided output, forced
        // tool calls) ends where its grammar does: a stop string could only
        // cut it into text that does not parse, under a finish reason that
        // says it is whole.
        let stop = if constraints > 0 {
            Vec::new()
        } else {
            self.stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect()
        };
        Ok(Prepared {
            inputs,
            prompt_tokens: p,
            stop,
            logprobs: self.logprobs,
            min_tokens: min_tokens as usize,
            stop_in_output: self.stop_in_output,
            stop_token_ids: self.stop_token_ids.clone(),
            score_only,
        })
    }
}
