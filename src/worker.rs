//! The worker: what happens to a decoded cast between the consumer and the pipeline.
//! Duplicates are recognised through the shared ledger, one instance is snapshotted by one
//! task at a time across all replicas, and the outcome decides ack or hand-back.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use crate::messaging::{Handled, SnapshotHandler};
use crate::pipeline::{Failure, Outcome, SnapshotPipeline};
use crate::request::SnapshotRequest;
use crate::storage::WorkLedger;

/// How long a cast waits before it goes back to the broker unfinished: keeps a fault that has
/// not cleared from spinning the same cast through the broker.
const HANDBACK_DELAY: Duration = Duration::from_secs(5);

pub struct Worker {
    pipeline: SnapshotPipeline,
    ledger: Arc<dyn WorkLedger>,
    /// How long a cast may take from here to its end (`[novasnap] snapshot_timeout`).
    snapshot_timeout: Duration,
}

impl Worker {
    pub fn new(pipeline: SnapshotPipeline, ledger: Arc<dyn WorkLedger>, snapshot_timeout: Duration) -> Self {
        Self { pipeline, ledger, snapshot_timeout }
    }

    async fn already_done(&self, unique_id: Option<&str>) -> bool {
        let Some(id) = unique_id else { return false };
        match self.ledger.is_done(id).await {
            Ok(done) => done,
            Err(e) => {
                // The pipeline is idempotent on its own; the ledger only saves work.
                warn!(unique_id = id, error = %e, "ledger unreadable; handling the cast as new");
                false
            }
        }
    }

    async fn handle_request(&self, req: SnapshotRequest) -> Handled {
        let unique_id = req.unique_id.as_deref();
        if self.already_done(unique_id).await {
            info!("duplicate cast: already carried to its end, ignoring");
            return Handled::Done;
        }
        let deadline = Instant::now() + self.snapshot_timeout;
        let lease = match self.ledger.lock_instance(req.instance.uuid, deadline).await {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                warn!(timeout = ?self.snapshot_timeout, "instance lease still held elsewhere at the snapshot's deadline; handing the cast back");
                return Handled::Requeue;
            }
            Err(e) => {
                warn!(error = %e, "cannot take the instance lease; handing the cast back");
                tokio::time::sleep(HANDBACK_DELAY).await;
                return Handled::Requeue;
            }
        };
        // A duplicate may have finished while this one waited for the lease.
        if self.already_done(unique_id).await {
            info!("duplicate cast: finished by another delivery while waiting, ignoring");
            return Handled::Done;
        }
        // Long blocking calls (a flatten, a block copy) stop at the deadline too.
        let in_flight = lease.in_flight().clone();
        let stop_at_deadline = tokio::spawn({
            let in_flight = in_flight.clone();
            async move {
                tokio::time::sleep_until(deadline).await;
                in_flight.stop();
            }
        });
        let outcome = in_flight.scope(self.pipeline.run(&req, &lease, deadline)).await;
        stop_at_deadline.abort();
        match outcome {
            Ok(Outcome::Completed { direct }) => info!(direct, "snapshot completed"),
            Ok(Outcome::AlreadyDone) => info!("snapshot was already completed"),
            // The pipeline has cleaned up and reported; retrying the cast cannot help.
            Err(Failure { error, unsettled: None }) => warn!(%error, "snapshot ended in failure"),
            Err(Failure { error, unsettled: Some(why) }) => {
                tracing::error!(%error, unsettled = %why, "snapshot failed and its failure is not settled; handing the cast back so that a redelivery puts it right");
                drop(lease);
                // A redelivery at once would most likely meet the same fault.
                tokio::time::sleep(HANDBACK_DELAY).await;
                return Handled::Requeue;
            }
        }
        if let Some(id) = unique_id {
            if let Err(e) = self.ledger.mark_done(id).await {
                warn!(unique_id = id, error = %e, "could not record the cast as done");
            }
        }
        Handled::Done
    }
}

#[async_trait]
impl SnapshotHandler for Worker {
    async fn handle(&self, req: SnapshotRequest) -> Handled {
        let span = tracing::info_span!(
            "snapshot",
            request_id = req.context.request_id.as_deref().unwrap_or("-"),
            instance = %req.instance.uuid,
            image = %req.image_id,
        );
        self.handle_request(req).instrument(span).await
    }
}
