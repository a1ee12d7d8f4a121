//! The RPC server: one session on the broker holds the [`relay`](super::relay) in front of
//! `compute.<host>` and the consumer of novasnap's work queue, where the relay puts the
//! snapshot and backup casts it takes. Casts are decoded, checked and handed to the worker,
//! at most `max_concurrent_snapshots` at a time; the rest wait in the work queue, which only
//! novasnap replicas consume.
//!
//! Unlike oslo, which acknowledges a cast before dispatching it, novasnap acknowledges a
//! cast only when the handler says its outcome is durable ([`Handled::Done`]); a worker that
//! dies mid-snapshot leaves the cast to be redelivered to a replica, and the pipeline resumes.
//!
//! **Acknowledgements across reconnects.** A delivery can only be acknowledged on the channel
//! it came on. When that channel or its connection goes (a broker restart, a network cut,
//! RabbitMQ's `consumer_timeout` closing a channel whose delivery stayed unacknowledged), the
//! broker requeues the cast and delivers it again. A redelivery of a cast whose snapshot is
//! still running here does not start a second run nor take a concurrency slot: it joins the
//! running one, which acknowledges the newest delivery when it ends. The old connection is
//! closed at once, with its threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use lapin::acker::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use uuid::Uuid;

use super::deadletter::dead_letter;
use super::relay::Relay;
use super::topology::{consumer_arguments, Topology};
use super::transport::Transport;
use super::{amqp, dispatcher, envelope, Handled, MessagingError, SnapshotHandler};
use crate::config::Config;
use crate::error::Classify;

/// The snapshots running in this process, by image: the delivery each will settle.
type InFlight = Arc<Mutex<HashMap<Uuid, Acker>>>;

/// Consumes until `shutdown` is cancelled, reconnecting (with backoff, across the
/// configured brokers) whenever the connection is lost. On shutdown: consumers are
/// cancelled, in-flight snapshots get `[novasnap] shutdown_grace` to finish, and whatever
/// is still unacknowledged then goes back to the broker with the connection.
pub async fn serve(
    config: &Config,
    handler: Arc<dyn SnapshotHandler>,
    shutdown: CancellationToken,
) -> Result<(), MessagingError> {
    let work = Work {
        config: config.clone(),
        handler,
        limit: Arc::new(Semaphore::new(config.worker.max_concurrent_snapshots)),
        tracker: TaskTracker::new(),
        in_flight: InFlight::default(),
    };
    let transport = Transport::new(&config.messaging.transport);
    let mut backoff = transport.backoff();
    let mut starting = true;
    let mut last: Option<(Connection, Channel)> = None;
    while !shutdown.is_cancelled() {
        let wait = match session(config, &transport, &work, &shutdown, starting).await {
            Ok(open) => {
                last = Some(open);
                break;
            }
            Err(Ended { error, .. }) if !error.is_transient() => return Err(error),
            Err(Ended { error, connected: true }) => {
                backoff = transport.backoff();
                let wait = transport.reconnect_delay();
                warn!(error = %error, retry_in = ?wait, "lost the broker; reconnecting");
                wait
            }
            Err(Ended { error, connected: false }) => {
                let wait = backoff.next().expect("endless");
                warn!(error = %error, retry_in = ?wait, "no broker reachable; trying again");
                wait
            }
        };
        starting = false;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    work.tracker.close();
    if !work.tracker.is_empty() {
        info!(in_flight = work.tracker.len(), grace = ?config.worker.shutdown_grace, "waiting for in-flight snapshots");
    }
    if tokio::time::timeout(config.worker.shutdown_grace, work.tracker.wait()).await.is_err() {
        warn!(
            in_flight = work.tracker.len(),
            "grace period over: unfinished casts go back to the broker for another replica"
        );
    }
    if let Some((connection, _work_channel)) = last {
        let _ = connection.close(200, "novasnap stopping").await;
    }
    Ok(())
}

/// One connection: the relay and the work consumer, until either fails or shutdown. Returns
/// the connection and the work consumer's channel, both still open, on shutdown: in-flight
/// snapshots acknowledge their casts on that channel, and lapin closes a channel when its
/// last handle is dropped. Otherwise closes the connection.
async fn session(
    config: &Config,
    transport: &Transport,
    work: &Work,
    shutdown: &CancellationToken,
    starting: bool,
) -> Result<(Connection, Channel), Ended> {
    let (connection, _) = transport
        .connect(&format!("novasnap:{}", config.host))
        .await
        .map_err(|error| Ended { error, connected: false })?;
    let result = async {
        let mut publish = connection.create_channel().await.map_err(amqp)?;
        publish.confirm_select(Default::default()).await.map_err(amqp)?;
        // Where the relay copies to exists before it takes anything.
        let topology = Topology { config: &config.messaging, host: &config.host };
        topology.declare_work_queue(&mut publish, &connection).await?;
        topology.declare_dead_letter(&mut publish, &connection).await?;
        let relay = Relay { config, connection: &connection, publish: publish.clone() };
        let ((), work_channel) =
            tokio::try_join!(relay.run(shutdown, starting), work.consume(&connection, publish.clone(), shutdown))?;
        Ok(work_channel)
    }
    .await;
    match result {
        Ok(work_channel) => Ok((connection, work_channel)),
        Err(error) => {
            // Its deliveries are the broker's again: nothing more can be settled on it.
            let _ = connection.close(320, "novasnap reconnecting").await;
            Err(Ended { error, connected: true })
        }
    }
}

/// Why a session ended before shutdown, and whether it had reached a broker (which decides
/// the wait before the next: oslo's `kombu_reconnect_delay` after a lost connection, the
/// retry intervals after a round of brokers that all failed).
struct Ended {
    error: MessagingError,
    connected: bool,
}

struct Work {
    config: Config,
    handler: Arc<dyn SnapshotHandler>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    in_flight: InFlight,
}

impl Work {
    async fn consume(
        &self,
        connection: &Connection,
        publish: Channel,
        shutdown: &CancellationToken,
    ) -> Result<Channel, MessagingError> {
        let queue = Topology { config: &self.config.messaging, host: &self.config.host }.work_queue();
        let channel = connection.create_channel().await.map_err(amqp)?;
        let prefetch = u16::try_from(self.config.worker.max_concurrent_snapshots).unwrap_or(u16::MAX);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(amqp)?;
        let tag = format!("novasnap-{}-{}", self.config.host, Uuid::new_v4().simple());
        let mut deliveries = channel
            .basic_consume(
                &queue,
                &tag,
                BasicConsumeOptions::default(),
                consumer_arguments(&self.config.messaging.transport.queues),
            )
            .await
            .map_err(amqp)?;
        info!(%queue, "consuming snapshot casts");
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = channel.basic_cancel(&tag, BasicCancelOptions::default()).await;
                    info!("no longer taking casts");
                    return Ok(channel);
                }
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => return Err(amqp(e)),
                    None => return Err(MessagingError::Amqp("consumer stream ended".into())),
                },
            };
            self.start(delivery, &publish, shutdown).await;
        }
    }

    /// Decodes one cast and starts it, joins it to the same cast running here, or refuses it.
    async fn start(&self, delivery: Delivery, publish: &Channel, shutdown: &CancellationToken) {
        let m = &self.config.messaging;
        let request = envelope::decode_delivery(&delivery.properties, &delivery.data, m.max_message_bytes)
            .and_then(|message| dispatcher::dispatch(&message));
        let request = match request {
            Ok(request) => request,
            Err(rejection) => return dead_letter(m, publish, &delivery, &rejection).await,
        };
        let image = request.image_id;
        {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            if let Some(acker) = in_flight.get_mut(&image) {
                info!(%image, "cast delivered again while its snapshot runs here; the running one will settle it");
                *acker = delivery.acker;
                return;
            }
        }
        let permit = tokio::select! {
            permit = self.limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => {
                // Not started: straight back to the broker.
                let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                return;
            }
        };
        self.in_flight.lock().expect("in-flight lock").insert(image, delivery.acker);
        let (handler, in_flight) = (self.handler.clone(), self.in_flight.clone());
        self.tracker.spawn(async move {
            let handled = handler.handle(request).await;
            drop(permit);
            let acker = in_flight.lock().expect("in-flight lock").remove(&image).expect("registered above");
            let settled = match handled {
                Handled::Done => acker.ack(BasicAckOptions::default()).await,
                Handled::Requeue => acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await,
            };
            if let Err(e) = settled {
                // The channel is gone and no redelivery has joined yet: the broker delivers
                // the cast again, and the ledger recognises it as done.
                warn!(error = %e, ?handled, "could not settle the cast with the broker");
            }
        });
    }
}
