//! Generation of one sequence: prefill in chunks, then decode token by token.
//! The batching scheduler (many sequences) builds on the same `forward`.

use crate::error::{EngineError, Result};
use crate::executor::Executor;
use crate::guided::Grammars;
use crate::kv::SeqKv;
use crate::model::{Logits, Model, SeqStep};
use crate::sampler::{sample_masked, score, Sampled, SamplingParams};

/// Prompt tokens per forward call while prefilling; bounds activation memory.
pub const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// `None`: until the context is full.
    pub max_tokens: Option<usize>,
    /// Token ids that end generation (EOS, end of turn), not included in the output.
    pub stop_tokens: Vec<u32>,
    /// The executor's LoRA adapter to run with (0: the base model).
    pub adapter: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was sampled (or the caller stopped it).
    Stop,
    /// `max_tokens` reached or the context is full.
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

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub sampled: Vec<Sampled>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Logits of the last prompt position (the first sampled distribution).
    pub prompt_logits: Vec<f32>,
    /// The prompt's log-probabilities, when `params.prompt_logprobs` asks
    /// for them: one per prompt token after the first.
    pub prompt_logprobs: Option<Vec<Sampled>>,
}

impl Model {
    /// Runs one request to completion. `on_token` sees each sampled token
    /// (stop tokens included) and may return `false` to stop early.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_token: impl FnMut(&Sampled) -> bool,
    ) -> Result<Generation> {
        generate(self, req, on_token)
    }
}

/// [`Model::generate`] on any executor (a sharded worker's rank 0 too).
pub fn generate(
    model: &dyn Executor,
    req: &GenerateRequest,
    on_token: impl FnMut(&Sampled) -> bool,
) -> Result<Generation> {
    generate_guided(model, req, None, on_token)
}

/// [`generate`] with the model's grammars, for a request with a
/// `response_format` (refused without them).
pub fn generate_guided(
    model: &dyn Executor,
    req: &GenerateRequest,
    grammars: Option<&Grammars>,
    mut on_token: impl FnMut(&Sampled) -> bool,
) -> Result<Generation> {
    req.params.validate()?;
    let mut guide = Grammars::guide_for(grammars, &req.params.response_format, &[])?;
    req.params.validate_vocab(model.config().vocab_size)?;
    let ctx = model.config().context_length;
    if req.prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    if req.prompt.len() >= ctx {
        return Err(EngineError::ContextOverflow {
            prompt: req.prompt.len(),
            requested: req.max_tokens.unwrap_or(1),
            context: ctx,
        });
    }
    let room = ctx - req.prompt.len();
    let max_tokens = match req.max_tokens {
        Some(n) if n > room => {
            return Err(EngineError::ContextOverflow {
                prompt: req.prompt.len(),
                requested: n,
                context: ctx,
            })
        }
        Some(n) => n,
        None => room,
    };
    // A private pool holding exactly this request (the scheduler shares one among many).
    let mut pool = model.pool_for_tokens(req.prompt.len() + max_tokens, 16);
    let mut kv = SeqKv {
        adapter: req.adapter,
        ..SeqKv::default()
    };
    let mut last = Vec::new();
    let mut prompt_logprobs = req.params.prompt_logprobs.map(|_| Vec::new());
    let vocab = model.config().vocab_size;
    let chunks: Vec<&[u32]> = req.prompt.chunks(PREFILL_CHUNK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let start = i * PREFILL_CHUNK;
        let want = if prompt_logprobs.is_some() {
            Logits::All
        } else if i + 1 == chunks.len() {
            Logits::Last
        } else {
            Logits::None
        };
        let mut step = [SeqStep {
            kv: &mut kv,
            tokens: chunk,
            logits: want,
        }];
        last = model
            .forward(&mut pool, &mut step)?
            .pop()
            .unwrap_or_default();
        if let (Some(lp), Some(top)) = (prompt_logprobs.as_mut(), req.params.prompt_logprobs) {
            // Row j scores the prompt token after chunk position j.
            for (j, row) in last.chunks_exact(vocab).enumerate() {
                if let Some(&next) = req.prompt.get(start + j + 1) {
                    lp.push(score(row, next, top));
                }
            }
            last.drain(..last.len() - vocab);
        }
    }
    let prompt_logits = last.clone();
    let mut context = req.prompt.clone();
    let mut tokens = Vec::new();
    let mut sampled = Vec::new();
    let mut finish = FinishReason::Length;
    while tokens.len() < max_tokens {
        // Guided: the same mask as the scheduler's.
        let allowed = match guide.as_mut() {
            Some(g) => match g.next_allowed(&req.stop_tokens)? {
                Some(a) => Some(a),
                None => {
                    finish = FinishReason::Stop;
                    break;
                }
            },
            None => None,
        };
        let s = sample_masked(
            &req.params,
            &last,
            &context,
            req.prompt.len(),
            tokens.len() as u64,
            allowed.as_deref(),
        );
        let keep_going = on_token(&s);
        let tok = s.token;
        if req.stop_tokens.contains(&tok) {
            finish = FinishReason::Stop;
            break;
        }
        if let Some(g) = guide.as_mut() {
            g.advance(tok)?;
        }
        tokens.push(tok);
        context.push(tok);
        sampled.push(s);
        if !keep_going {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() == max_tokens {
            break;
        }
        let mut step = [SeqStep {
            kv: &mut kv,
            tokens: &[tok],
            logits: Logits::Last,
        }];
        last = model
            .forward(&mut pool, &mut step)?
            .pop()
            .unwrap_or_default();
    }
    Ok(Generation {
        tokens,
        sampled,
        finish,
        prompt_tokens: req.prompt.len(),
        prompt_logits,
        prompt_logprobs,
    })
}
