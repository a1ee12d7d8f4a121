//! The retry policy: exponential backoff with jitter, a bounded number of attempts, a log
//! line per retry. Only faults classified [`Transient`](crate::error::Disposition) are retried.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::error::Classify;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the first retry; doubled on each further one.
    pub initial_delay: Duration,
    /// Ceiling on a single delay, so a long outage is polled at a steady rate.
    pub max_delay: Duration,
    /// Retries after the first attempt; the step fails with the last error beyond this.
    pub max_retries: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { initial_delay: Duration::from_millis(500), max_delay: Duration::from_secs(30), max_retries: 8 }
    }
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails permanently, or the retries are spent.
    /// `what` names the step in the log line of each retry.
    pub async fn run<T, E, F, Fut>(&self, what: &str, op: F) -> Result<T, E>
    where
        E: Classify + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries)
            .with_jitter();
        op.retry(backoff)
            .when(|e: &E| e.is_transient())
            .notify(|e: &E, delay: Duration| {
                tracing::warn!(step = what, error = %e, retry_in = ?delay, "transient fault, retrying");
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Disposition;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, thiserror::Error)]
    #[error("{0:?}")]
    struct Fault(Disposition);
    impl Classify for Fault {
        fn disposition(&self) -> Disposition {
            self.0
        }
    }

    fn fast(max_retries: usize) -> RetryPolicy {
        RetryPolicy { initial_delay: Duration::from_millis(1), max_delay: Duration::from_millis(2), max_retries }
    }

    #[tokio::test]
    async fn transient_faults_are_retried_until_success() {
        let calls = AtomicUsize::new(0);
        let out = fast(5)
            .run("t", || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(Fault(Disposition::Transient))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_faults_fail_at_once() {
        let calls = AtomicUsize::new(0);
        let out: Result<(), _> = fast(5)
            .run("t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fault(Disposition::Permanent))
            })
            .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let calls = AtomicUsize::new(0);
        let out: Result<(), _> = fast(3)
            .run("t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Fault(Disposition::Transient))
            })
            .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
