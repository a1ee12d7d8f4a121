//! Progress of long steps (flatten, extract, upload) as log lines and `instance.update`
//! notifications carrying `progress`, at most one per `progress_interval`, so subscribers
//! can draw a progress bar without being flooded.

use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::info;

use crate::hypervisor::Progress;
use crate::messaging::{Notifier, SnapshotEvent, TaskState};
use crate::request::SnapshotRequest;

pub struct ProgressReporter {
    sender: Arc<watch::Sender<u8>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ProgressReporter {
    pub fn start(
        notifier: Arc<dyn Notifier>,
        req: &SnapshotRequest,
        task_state: TaskState,
        step: &'static str,
        interval: std::time::Duration,
    ) -> Self {
        let (sender, mut receiver) = watch::channel(0u8);
        let (stop, mut stopped) = oneshot::channel();
        let req = req.clone();
        let task = tokio::spawn(async move {
            let mut last = None;
            let publish = |percent: u8| {
                info!(instance = %req.instance.uuid, image = %req.image_id, step, percent, "progress");
                let (notifier, req) = (notifier.clone(), req.clone());
                async move {
                    if let Err(e) = notifier.notify(&req, SnapshotEvent::Progress { task_state, percent }).await {
                        tracing::warn!(error = %e, "progress notification not published");
                    }
                }
            };
            // The boundary may keep its callback (and so the sender) alive past the step:
            // the end of reporting is signalled separately, and cuts the interval short.
            loop {
                tokio::select! {
                    biased;
                    changed = receiver.changed() => if changed.is_err() { break },
                    _ = &mut stopped => break,
                }
                let percent = *receiver.borrow_and_update();
                if last != Some(percent) {
                    last = Some(percent);
                    publish(percent).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = &mut stopped => break,
                }
            }
            let percent = *receiver.borrow();
            if last.map_or(percent > 0, |last| last != percent) {
                publish(percent).await;
            }
        });
        Self { sender: Arc::new(sender), stop, task }
    }

    /// The callback a boundary calls from any thread, as often as it likes.
    pub fn callback(&self) -> Progress {
        let sender = self.sender.clone();
        Arc::new(move |percent: u8| {
            sender.send_replace(percent.min(100));
        })
    }

    /// Ends reporting; the last value seen is published before this returns.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
