//! Detokenisation and stop strings of one choice, in one place for every
//! front end.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::Stream;
use tandem_model::detok::{IncrementalDecoder, StopMatcher};
use tandem_model::tokenizer::Tokenizer;

use crate::dispatch::{DispatchError, Finish, SampledToken, TokenEvent, TokenStream};

/// Why a choice ended, as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One sampled token with what the logprobs outputs need.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
    /// Characters of (pre-stop-string) text decoded before this token.
    pub text_offset: usize,
}

/// What one backend event produced for the client.
#[derive(Debug, Clone)]
pub struct ChoiceDelta {
    /// Text safe to send now (whole characters, no partial stop string).
    pub text: String,
    /// Tokens consumed by this event (zero or one).
    pub tokens: Vec<TokenInfo>,
    /// The prompt's log-probabilities, on the delta that brings them (one
    /// per prompt token after the first).
    pub prompt_logprobs: Option<Vec<SampledToken>>,
    /// Set on the last delta of the choice.
    pub finish: Option<FinishReason>,
    /// Completion tokens of the whole choice (meaningful with `finish`).
    pub completion_tokens: u32,
    /// Prompt tokens served from a prefix cache (meaningful with `finish`).
    pub cached_tokens: u32,
    /// The stop string that ended the choice (with `finish`), if one did.
    pub stop_string: Option<String>,
    /// The token of the request's `stop_token_ids` that ended it, if one
    /// did (not the model's own end-of-text tokens).
    pub stop_token: Option<u32>,
    /// When the event arrived from the backend (relay latency starts here).
    pub received: Instant,
}

impl ChoiceDelta {
    /// Nothing to tell the client.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
            && self.tokens.is_empty()
            && self.finish.is_none()
            && self.prompt_logprobs.is_none()
    }
}

/// Turns a choice's [`TokenEvent`]s into client text: UTF-8-safe incremental
/// detokenisation (special tokens skipped), then stop strings held back and
/// cut.
pub struct ChoiceDecoder {
    detok: IncrementalDecoder<Arc<Tokenizer>>,
    stop: StopMatcher,
    stops: Vec<String>,
    decoded_chars: usize,
    token_ids: Vec<u32>,
    finished: Option<FinishReason>,
    /// Stop strings are matched only in the text of later tokens.
    min_tokens: usize,
    /// Only the prompt is wanted (`max_tokens: 0` with its scores): the
    /// choice ends, with no output, where the first token would come.
    score_only: bool,
    /// The stop string that ends the choice stays in its text.
    keep_stop: bool,
    /// The request's own stop tokens (see [`ChoiceDelta::stop_token`]).
    stop_token_ids: Vec<u32>,
}

impl ChoiceDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>, stops: &[String]) -> Self {
        Self {
            detok: IncrementalDecoder::new(tokenizer, true),
            stop: StopMatcher::new(stops),
            stops: stops.to_vec(),
            decoded_chars: 0,
            token_ids: Vec::new(),
            finished: None,
            min_tokens: 0,
            score_only: false,
            keep_stop: false,
            stop_token_ids: Vec::new(),
        }
    }

    /// Puts the stop string that ended the choice back at the end of its
    /// text, when asked to.
    fn keep(&self, delta: &mut ChoiceDelta) {
        if let (true, Some(s)) = (self.keep_stop, &delta.stop_string) {
            delta.text.push_str(s);
        }
    }

    /// Only the prompt is wanted (`max_tokens: 0` with its scores): the
    /// workers generate one token, which is dropped here, and the choice
    /// ends with `length` and no output.
    pub fn score_only(mut self, yes: bool) -> Self {
        self.score_only = yes;
        self
    }

    /// The stop string that ends the choice stays at the end of its text
    /// (vLLM's `include_stop_str_in_output`).
    pub fn keep_stop_string(mut self, yes: bool) -> Self {
        self.keep_stop = yes;
        self
    }

    /// The request's `stop_token_ids`: one that ends the choice is named
    /// as its stop reason.
    pub fn with_stop_token_ids(mut self, ids: &[u32]) -> Self {
        self.stop_token_ids = ids.to_vec();
        self
    }

    /// The first `n` tokens' text is sent as it is: a stop string can only
    /// end the choice in text that follows them (vLLM's `min_tokens`).
    pub fn with_min_tokens(mut self, n: usize) -> Self {
        self.min_tokens = n;
        self
    }

    /// Token ids received so far (up to the one that completed a stop string).
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Feeds one backend event. After the returned delta has `finish` set,
    /// the choice is over (drop the [`TokenStream`] to cancel the rest).
    pub fn push(&mut self, event: TokenEvent) -> Result<ChoiceDelta, DispatchError> {
        let received = Instant::now();
        let mut delta = ChoiceDelta {
            text: String::new(),
            tokens: Vec::new(),
            prompt_logprobs: None,
            finish: None,
            completion_tokens: self.token_ids.len() as u32,
            cached_tokens: 0,
            stop_string: None,
            stop_token: None,
            received,
        };
        if let Some(f) = self.finished {
            delta.finish = Some(f);
            return Ok(delta);
        }
        match event {
            TokenEvent::PromptLogprobs(lp) => delta.prompt_logprobs = Some(lp),
            TokenEvent::Token(_) | TokenEvent::Finished { .. } if self.score_only => {
                // The prompt is all there is: its length was the limit.
                self.finished = Some(FinishReason::Length);
                delta.finish = self.finished;
                delta.completion_tokens = 0;
            }
            TokenEvent::Token(t) => {
                let piece = self
                    .detok
                    .push(t.id)
                    .map_err(|e| DispatchError::Internal(format!("detokenising: {e}")))?;
                self.token_ids.push(t.id);
                delta.tokens.push(TokenInfo {
                    id: t.id,
                    logprob: t.logprob,
                    top: t.top,
                    text_offset: self.decoded_chars,
                });
                self.decoded_chars += piece.chars().count();
                delta.completion_tokens = self.token_ids.len() as u32;
                if self.token_ids.len() <= self.min_tokens {
                    // Nothing is held back yet: the matcher starts after.
                    delta.text = piece;
                    return Ok(delta);
                }
                let step = self.stop.push(&piece);
                delta.text = step.text;
                if let Some(i) = step.stopped {
                    self.finished = Some(FinishReason::Stop);
                    delta.finish = self.finished;
                    delta.stop_string = self.stops.get(i).cloned();
                    self.keep(&mut delta);
                }
            }
            TokenEvent::Finished {
                reason,
                completion_tokens,
                cached_tokens,
                stop_token,
                ..
            } => {
                let own_stop = stop_token.filter(|t| self.stop_token_ids.contains(t));
                // vLLM's `include_stop_str_in_output` keeps the text of a
                // stop token too (a special one writes none).
                let mut tail = match own_stop {
                    Some(t) if self.keep_stop => self
                        .detok
                        .push(t)
                        .map_err(|e| DispatchError::Internal(format!("detokenising: {e}")))?,
                    _ => String::new(),
                };
                tail.push_str(&self.detok.finish());
                let step = self.stop.push(&tail);
                delta.text = step.text;
                let reason = if let Some(i) = step.stopped {
                    delta.stop_string = self.stops.get(i).cloned();
                    self.keep(&mut delta);
                    FinishReason::Stop
                } else {
                    delta.text.push_str(&self.stop.finish());
                    delta.stop_token = own_stop;
                    match reason {
                        Finish::Stop => FinishReason::Stop,
                        Finish::Length => FinishReason::Length,
                    }
                };
                self.finished = Some(reason);
                delta.finish = Some(reason);
                // The backend may count a stop token it did not emit.
                delta.completion_tokens = completion_tokens.max(self.token_ids.len() as u32);
                delta.cached_tokens = cached_tokens;
            }
            TokenEvent::Error(e) => return Err(e),
        }
        Ok(delta)
    }
}

/// What a running choice yields.
#[derive(Debug, Clone)]
pub enum ChoiceOut {
    Delta(ChoiceDelta),
    Error(DispatchError),
}

pub type ChoiceStream = Pin<Box<dyn Stream<Item = (usize, ChoiceOut)> + Send>>;

/// Runs one choice: yields its non-empty deltas, ends after the finishing
/// one (or an error), and drops the [`TokenStream`] at that point, which
/// cancels the generation on the workers (a stop string ends it early).
pub fn choice_stream(index: usize, tokens: TokenStream, decoder: ChoiceDecoder) -> ChoiceStream {
    Box::pin(futures_util::stream::unfold(
        Some((tokens, decoder)),
        move |state| async move {
            let (mut tokens, mut decoder) = state?;
            loop {
                let Some(event) = tokens.next().await else {
                    let e = DispatchError::Internal(
                        "the generation ended without a finish event".into(),
                    );
                    return Some(((index, ChoiceOut::Error(e)), None));
                };
                match decoder.push(event) {
                    Err(e) => return Some(((index, ChoiceOut::Error(e)), None)),
                    Ok(d) if d.finish.is_some() => {
                        drop(tokens);
                        return Some(((index, ChoiceOut::Delta(d)), None));
                    }
                    Ok(d) if d.is_empty() => continue,
                    Ok(d) => return Some(((index, ChoiceOut::Delta(d)), Some((tokens, decoder)))),
                }
            }
        },
    ))
}
