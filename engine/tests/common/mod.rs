//! Helpers shared by the engine's integration tests (each `tests/*.rs` is
//! its own crate and includes this module).

use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tandem_engine::engine::RequestHandle;
use tandem_engine::generate::FinishReason;
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
