//! Helpers shared by the engine's integration tests (each `tests/*.rs` is
//! its own crate and includes this module).

use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tandem_engine::engine::RequestHandle;
use tandem_engine::generate::FinishReason;
use tandem_engine::kv::SeqKv;
use tandem_engine::model::{Logits, Model, SeqStep};
use tandem_engine::sampler::Sampled;
use tandem_engine::scheduler::Event;
use tokio::sync::mpsc::UnboundedReceiver;

/// The installed default model; fails loudly when it is missing.
pub fn model_path() -> PathBuf {
    let p = tandem_model::default_model_path();
    assert!(
        p.exists(),
        "default model missing at {}: run `tandem model fetch`",
        p.display()
    );
    p
}

/// Drives a future on this thread (the engine answers from its own
/// thread, so no runtime is needed).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(Instant::now() < deadline, "future never completed");
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// How a stream ended: its `Finished` event.
#[allow(dead_code)] // not every test file reads every field
pub struct Ended {
    pub reason: FinishReason,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// One choice's tokens until its `Finished` event. The request must not
/// fail, nor have asked for its prompt's scores.
pub fn drain(rx: &mut UnboundedReceiver<Event>) -> (Vec<Sampled>, Ended) {
    let mut got = Vec::new();
    loop {
        match rx.blocking_recv().expect("stream ends with Finished") {
            Event::Token(s) => got.push(s),
            Event::PromptLogprobs(_) => panic!("prompt scores were not asked for"),
            Event::Finished {
                reason,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                let end = Ended {
                    reason,
                    completion_tokens,
                    cached_tokens,
                };
                return (got, end);
            }
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
}

/// Every choice's events until `Finished`, choice by choice.
pub fn collect_all(h: RequestHandle) -> Vec<Vec<Sampled>> {
    std::iter::once(h.events)
        .chain(h.more)
        .map(|mut rx| drain(&mut rx).0)
        .collect()
}

/// The last-position logits of `prompt` scored alone from an empty cache.
pub fn prompt_logits(m: &Model, prompt: &[u32]) -> Vec<f32> {
    let mut pool = m.pool_for_tokens(prompt.len(), 16);
    let mut kv = SeqKv::default();
    let mut step = [SeqStep {
        kv: &mut kv,
        tokens: prompt,
        logits: Logits::Last,
    }];
    m.forward(&mut pool, &mut step).unwrap().pop().unwrap()
}

/// Equal to the bit.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Asserts that each prompt's logits are the bits it gets alone when all
/// are run in one forward call; that the last prompt run in chunks cut at
/// `cuts` (increasing, inside it) ends with the same bits; and that one
/// decode step after it equals scoring the whole sequence. Returns each
/// prompt's logits alone.
pub fn assert_batching_and_chunking_keep_bits(
    m: &Model,
    prompts: &[Vec<u32>],
    cuts: &[usize],
    what: &str,
) -> Vec<Vec<f32>> {
    let alone: Vec<Vec<f32>> = prompts.iter().map(|p| prompt_logits(m, p)).collect();
    // Room for every prompt at once, each rounded up to whole blocks.
    let tokens: usize = prompts.iter().map(|p| p.len() + 17).sum();
    let mut pool = m.pool_for_tokens(tokens, 16);
    let mut kvs: Vec<SeqKv> = prompts.iter().map(|_| SeqKv::default()).collect();
    let mut steps: Vec<SeqStep<'_>> = kvs
        .iter_mut()
        .zip(prompts)
        .map(|(kv, p)| SeqStep {
            kv,
            tokens: p,
            logits: Logits::Last,
        })
        .collect();
    let together = m.forward(&mut pool, &mut steps).unwrap();
    drop(steps);
    for kv in kvs.iter_mut() {
        pool.free_seq(kv);
    }
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert!(same_bits(a, b), "{what}: prompt {i} changed when batched");
    }
    let p = prompts.last().expect("a prompt");
    let mut kv = SeqKv::default();
    let mut last = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain([&p.len()]) {
        let mut step = [SeqStep {
            kv: &mut kv,
            tokens: &p[start..end],
            logits: Logits::Last,
        }];
        last = m.forward(&mut pool, &mut step).unwrap().pop().unwrap();
        start = end;
    }
    let alone_last = alone.last().unwrap();
    assert!(
        same_bits(&last, alone_last),
        "{what}: chunked prefill changed the logits"
    );
    let next = tandem_engine::sampler::argmax(alone_last);
    let mut step = [SeqStep {
        kv: &mut kv,
        tokens: &[next],
        logits: Logits::Last,
    }];
    let stepwise = m.forward(&mut pool, &mut step).unwrap().pop().unwrap();
    let mut whole = p.clone();
    whole.push(next);
    assert!(
        same_bits(&stepwise, &prompt_logits(m, &whole)),
        "{what}: a decode step differs from scoring the whole sequence"
    );
    alone
}
