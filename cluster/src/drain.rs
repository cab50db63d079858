//! Graceful drain: on SIGTERM a node stops taking new work, lets what is in
//! flight finish (bounded by a deadline), then exits.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Shared by a node's services: counts work in flight and refuses new work
/// once draining.
#[derive(Clone, Default, Debug)]
pub struct Drain {
    draining: Arc<AtomicBool>,
    in_flight: Arc<AtomicU32>,
}

/// Held while one piece of work is in flight.
#[derive(Debug)]
pub struct DrainGuard(Arc<AtomicU32>);

impl Drop for DrainGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drain {
    /// Stops new work from entering.
    pub fn start(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Admits one piece of work, or `None` when draining.
    pub fn enter(&self) -> Option<DrainGuard> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = DrainGuard(self.in_flight.clone());
        if self.is_draining() {
            return None;
        }
        Some(guard)
    }

    /// Waits until nothing is in flight; false if `timeout` passed first.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.in_flight() == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_new_work_once_draining_and_waits_for_the_rest() {
        let d = Drain::default();
        let g = d.enter().expect("open");
        assert_eq!(d.in_flight(), 1);
        d.start();
        assert!(d.enter().is_none());
        assert_eq!(d.in_flight(), 1, "a refused entry is not counted");
        assert!(!d.wait_idle(Duration::from_millis(50)).await);
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.wait_idle(Duration::from_secs(5)).await })
        };
        drop(g);
        assert!(waiter.await.unwrap());
    }
}
