//! A fixed-size thread pool for data-parallel kernels.
//!
//! `ThreadPool::new(n)` owns exactly `n - 1` OS threads; the caller of
//! [`ThreadPool::run`] is the n-th and works on the job too, so a pool of one
//! thread starts nothing and runs everything inline.
//!
//! Tasks are handed out dynamically (an atomic counter), which keeps the
//! threads busy even when another process steals a core for a while. Results
//! never depend on which thread ran a task: every kernel task writes a
//! disjoint set of outputs, each computed entirely by one thread.
//!
//! Idle workers spin for a short while (so the next matmul of the same forward
//! pass, microseconds later, starts without a futex wake-up) and then park on
//! a condition variable. Several worker processes share the machine's cores,
//! so the spin is kept short: [`DEFAULT_SPIN`], or `TANDEM_POOL_SPIN_US`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking (see the module docs).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// The job being run: a type- and lifetime-erased pointer to the caller's
/// closure. It is only dereferenced between a worker joining the job and
/// leaving it, and [`ThreadPool::run`] does not return before every joined
/// worker has left, so the closure outlives every use.
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize) + Sync + 'static));
// SAFETY: the pointee is `Sync` and outlives its uses (see above).
unsafe impl Send for JobPtr {}

struct State {
    /// Incremented for every published job.
    epoch: u64,
    /// `Some` while the current job accepts new workers.
    job: Option<(JobPtr, usize)>,
    /// Workers currently inside the job.
    active: usize,
    /// Workers parked on `work_cv`.
    sleepers: usize,
    /// A worker's task panicked during the current job.
    panicked: bool,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    work_cv: Condvar,
    done_cv: Condvar,
    /// Mirror of `State::epoch`, for spinning without the lock.
    epoch: AtomicU64,
    /// Next task index to hand out.
    next: AtomicUsize,
    spin: Duration,
}

/// Runs `n_tasks` closures over exactly `threads` threads.
pub struct ThreadPool {
    threads: usize,
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let spin = std::env::var("TANDEM_POOL_SPIN_US")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_micros)
            .unwrap_or(DEFAULT_SPIN);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                epoch: 0,
                job: None,
                active: 0,
                sleepers: 0,
                panicked: false,
                shutdown: false,
            }),
            work_cv: Condvar::new(),
            done_cv: Condvar::new(),
            epoch: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            spin,
        });
        let handles = (1..threads)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tandem-cpu-{i}"))
                    .spawn(move || worker(&s))
                    .expect("spawning a thread-pool worker")
            })
            .collect();
        Self { threads, shared, handles }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(i)` for every `i < n_tasks`, spread over the pool, and returns
    /// when all are done. A panic in any task is re-raised here.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 || n_tasks <= 1 {
            for i in 0..n_tasks {
                f(i);
            }
            return;
        }
        let sh = &*self.shared;
        // SAFETY: only the lifetime is erased; see `JobPtr`.
        let ptr: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f as *const (dyn Fn(usize) + Sync)) };
        {
            let mut st = sh.state.lock().unwrap();
            sh.next.store(0, Ordering::Relaxed);
            st.epoch += 1;
            st.job = Some((JobPtr(ptr), n_tasks));
            st.panicked = false;
            sh.epoch.store(st.epoch, Ordering::Release);
            if st.sleepers > 0 {
                sh.work_cv.notify_all();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| work_on(sh, f, n_tasks)));
        let mut st = sh.state.lock().unwrap();
        // Close the job: no worker may join it any more.
        st.job = None;
        while st.active > 0 {
            st = sh.done_cv.wait(st).unwrap();
        }
        let worker_panicked = st.panicked;
        drop(st);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if worker_panicked {
            panic!("a thread-pool task panicked");
        }
    }
}

fn work_on(sh: &Shared, f: &(dyn Fn(usize) + Sync), n: usize) {
    loop {
        let i = sh.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }
}

fn worker(sh: &Shared) {
    let mut seen = 0u64;
    loop {
        // Short spin for the next job, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        while sh.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins += 1;
            if spins % 64 == 0 && start.elapsed() >= sh.spin {
                break;
            }
        }
        let mut st = sh.state.lock().unwrap();
        while st.epoch == seen && !st.shutdown {
            st.sleepers += 1;
            st = sh.work_cv.wait(st).unwrap();
            st.sleepers -= 1;
        }
        if st.shutdown {
            return;
        }
        seen = st.epoch;
        let Some((job, n)) = st.job else { continue };
        st.active += 1;
        drop(st);
        // SAFETY: the job is open and `run` waits for `active == 0`.
        let f = unsafe { &*job.0 };
        let r = catch_unwind(AssertUnwindSafe(|| work_on(sh, f, n)));
        let mut st = sh.state.lock().unwrap();
        if r.is_err() {
            st.panicked = true;
            // Stop handing out the remaining tasks.
            sh.next.store(usize::MAX / 2, Ordering::Relaxed);
        }
        st.active -= 1;
        if st.active == 0 {
            sh.done_cv.notify_all();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state.lock().unwrap();
            st.shutdown = true;
            st.epoch += 1;
            self.shared.epoch.store(st.epoch, Ordering::Release);
            self.shared.work_cv.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn pool_runs_every_task_once() {
        for threads in [1, 2, 3, 5] {
            let pool = ThreadPool::new(threads);
            assert_eq!(pool.threads(), threads);
            for n in [0, 1, 2, 7, 100, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn pool_survives_idle_parking_and_many_jobs() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            if round % 500 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            pool.run(4, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 6);
    }

    #[test]
    fn pool_reraises_task_panics() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(64, &|i| {
                if i == 40 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // Still usable afterwards.
        let n = AtomicUsize::new(0);
        pool.run(10, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }
}
