//! The blocking work of one request, counted and stoppable.
//!
//! librbd, librados and libvirt calls block, so they run on tokio's blocking pool, and a
//! thread there runs on when the future that waited for it is dropped (a step cancelled, a
//! deadline passed, a shutdown). The request's instance lease must outlive every such call:
//! until it has returned, another replica must not start on the same instance. So the
//! worker runs each request inside [`InFlight::scope`], and every blocking call made inside
//! it through [`spawn_blocking`] counts as in flight until it returns; the lease is released
//! only once none is ([`InFlight::settled`]).
//!
//! The scope also carries a stop signal (lease lost, deadline passed) that long blocking
//! calls (a flatten, a block copy) observe through [`stop_signal`], so they end early
//! instead of running on for an hour.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

tokio::task_local! {
    static CURRENT: InFlight;
}

/// One request's blocking calls.
#[derive(Clone, Default)]
pub struct InFlight {
    calls: TaskTracker,
    stop: CancellationToken,
}

impl InFlight {
    /// Blocking calls counted here are asked to stop once `stop` is cancelled.
    pub fn new(stop: CancellationToken) -> Self {
        Self { calls: TaskTracker::new(), stop }
    }

    /// Asks the blocking calls counted here to stop.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Runs `work` with its blocking calls counted here.
    pub fn scope<F: Future>(&self, work: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self.clone(), work)
    }

    /// Returns once every blocking call counted here has returned; none may start after.
    pub async fn settled(&self) {
        self.calls.close();
        self.calls.wait().await;
    }
}

/// [`tokio::task::spawn_blocking`], counted as in flight by the current request, if any.
pub fn spawn_blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let in_flight = CURRENT.try_with(|current| current.calls.token()).ok();
    tokio::task::spawn_blocking(move || {
        let _in_flight = in_flight;
        f()
    })
}

/// The current request's stop signal, for a long blocking call to check as it goes (None
/// outside a request: never stopped).
pub fn stop_signal() -> Option<CancellationToken> {
    CURRENT.try_with(|current| current.stop.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn settled_waits_for_a_blocking_call_its_caller_gave_up_on() {
        let work = InFlight::default();
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let call = work.scope(async move {
            spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(300));
                flag.store(true, Ordering::SeqCst);
            })
            .await
        });
        // The caller stops waiting at once, as a cancelled step does.
        assert!(tokio::time::timeout(Duration::from_millis(10), call).await.is_err());
        work.settled().await;
        assert!(finished.load(Ordering::SeqCst), "settled only once the call has returned");
    }

    #[tokio::test]
    async fn calls_outside_a_request_are_not_counted() {
        spawn_blocking(|| ()).await.unwrap();
        assert!(stop_signal().is_none());
        let stop = CancellationToken::new();
        let work = InFlight::new(stop.clone());
        stop.cancel();
        assert!(work.scope(async { stop_signal().unwrap().is_cancelled() }).await);
    }
}
