//! A fixed-size thread pool for data-parallel kernels.
//!
//! (IMPLEMENTATION IN PROGRESS: currently runs tasks on the caller.)

/// Runs `n_tasks` closures over exactly `threads` threads.
pub struct ThreadPool {
    threads: usize,
}

impl ThreadPool {
    pub fn new(threads: usize) -> Self {
        Self { threads: threads.max(1) }
    }
    pub fn threads(&self) -> usize {
        self.threads
    }
    /// Calls `f(i)` for every `i < n_tasks`, spread over the pool, and returns
    /// when all are done.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        for i in 0..n_tasks {
            f(i);
        }
    }
}
