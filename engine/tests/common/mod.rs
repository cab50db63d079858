//! Helpers shared by the engine's integration tests (each `tests/*.rs` is
//! its own crate and includes this module).

use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tandem_engine::engine::RequestHandle;
use tandem_engine::sampler::Sampled;
use tandem_engine::scheduler::Event;

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

/// Every choice's events until `Finished`, choice by choice.
pub fn collect_all(h: RequestHandle) -> Vec<Vec<Sampled>> {
    let mut out = Vec::new();
    for mut rx in std::iter::once(h.events).chain(h.more) {
        let mut got = Vec::new();
        loop {
            match rx.blocking_recv().expect("stream ends with Finished") {
                Event::Token(s) => got.push(s),
                Event::PromptLogprobs(_) => panic!("prompt scores were not asked for"),
                Event::Finished { .. } => break,
                Event::Error(e) => panic!("request failed: {e}"),
            }
        }
        out.push(got);
    }
    out
}
