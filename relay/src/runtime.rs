//! The async runtime `petrel-relay run` starts, sized by `workerThreads`.
//!
//! Measured on a 2-CPU machine shared with Redis (1 KB messages through
//! `smtp-source`, relay and `smtp-sink`): one event loop used about 0.24 ms
//! of CPU per message against 0.34 ms with two worker threads, and Redis
//! 0.11 ms against 0.14, because tasks woke each other across threads
//! (3.5 context switches per message against 1.8) and Redis got its
//! commands in smaller writes. More threads pay off only with CPUs to
//! spare beyond what Redis and the peers use.

use tokio::runtime::{Builder, Runtime};

/// CPUs at or below which one event loop is the default.
const SINGLE_LOOP_MAX_CPUS: usize = 2;

/// Threads to run: the configured count, else one event loop on a small
/// CPU budget and one thread per CPU above it.
pub fn threads(configured: Option<u16>, cpus: usize) -> usize {
    match configured {
        Some(n) => usize::from(n.max(1)),
        None if cpus <= SINGLE_LOOP_MAX_CPUS => 1,
        None => cpus,
    }
}

/// The CPUs this process may use (cgroup quotas included), 1 if unknown.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A runtime with `threads` threads: a current-thread runtime for 1.
pub fn build(threads: usize) -> std::io::Result<Runtime> {
    if threads <= 1 {
        Builder::new_current_thread().enable_all().build()
    } else {
        Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_cpu_budget_gets_one_loop_and_a_large_one_a_thread_per_cpu() {
        assert_eq!(threads(None, 1), 1);
        assert_eq!(threads(None, 2), 1);
        assert_eq!(threads(None, 3), 3);
        assert_eq!(threads(None, 16), 16);
    }

    #[test]
    fn a_configured_count_wins() {
        assert_eq!(threads(Some(4), 2), 4);
        assert_eq!(threads(Some(1), 16), 1);
        // Validation refuses 0; should one get here, it means one loop.
        assert_eq!(threads(Some(0), 16), 1);
    }

    #[test]
    fn both_flavours_run_tasks_and_the_blocking_pool() {
        for n in [1, 2] {
            let rt = build(n).unwrap();
            let got = rt.block_on(async {
                let spawned = tokio::spawn(async { 20 }).await.unwrap();
                let blocking = tokio::task::spawn_blocking(|| 22).await.unwrap();
                spawned + blocking
            });
            assert_eq!(got, 42);
        }
    }
}
