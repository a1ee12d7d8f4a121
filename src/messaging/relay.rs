//! The front of `compute.<host>`: novasnap consumes nova-compute's own server queue ahead of
//! it (RabbitMQ consumer priority, `x-priority`), takes the snapshot and backup casts into
//! its work queue, and forwards every other message unchanged to nova-compute's second RPC
//! server, `compute-alt.<host>` (Nova ≥ 33 runs it with the same endpoints: `nova/service.py`
//! `Service.start`, `nova/compute/rpcapi.py` `RPC_TOPIC_ALT`). A call's reply then goes from
//! nova-compute straight to the caller's reply queue.
//!
//! Every delivery is settled within one publisher confirm: the original is acknowledged
//! only once the broker has confirmed the copy (work queue, forward or dead letter), so the
//! consumer always has room in its prefetch window and keeps its priority, and what it
//! holds in memory is bounded by `[novasnap] relay_prefetch` deliveries. A forward no queue
//! is bound for (nova-compute's `compute-alt` server is gone) is requeued, not lost, and
//! novasnap steps aside — it stops consuming `compute.<host>`, so nova-compute serves
//! everything itself — until `compute-alt.<host>` is back. When novasnap is stopped or dies,
//! nova-compute, the other consumer of `compute.<host>`, serves every message as before.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::AMQPValue;
use lapin::{Channel, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::deadletter::dead_letter;
use super::dispatcher::{self, Route};
use super::envelope::{self, Rejection};
use super::topology::{consumer_arguments, queue_state, Topology};
use super::transport::{publish_confirmed, Published};
use super::{amqp, MessagingError};
use crate::config::Config;

/// How often a relay that stepped aside looks for `compute-alt.<host>` again.
const WAIT_POLL: Duration = Duration::from_secs(5);
/// At start-up, how long a nova-compute seen on `compute.<host>` without `compute-alt` is
/// given to declare it (Nova starts its two RPC servers one after the other).
const ALT_GRACE: Duration = Duration::from_secs(10);

/// Where novasnap stands before the host's nova-compute.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Front {
    /// In front: snapshots taken, the rest forwarded to `compute-alt.<host>`.
    Relay,
    /// `[novasnap] serve_whole_host`: novasnap alone; what it does not serve is refused.
    WholeHost,
    /// Not consuming `compute.<host>`, for the reason given; nova-compute (if any) serves it.
    Aside(String),
}

/// How one consuming stint ended.
enum Ended {
    Shutdown,
    SteppedAside,
}

pub struct Relay<'a> {
    pub config: &'a Config,
    pub connection: &'a Connection,
    /// Confirm-mode channel for the copies (work queue, forwards, dead letters).
    pub publish: Channel,
}

impl Relay<'_> {
    fn topology(&self) -> Topology<'_> {
        Topology { config: &self.config.messaging, host: &self.config.host }
    }

    /// Runs until `shutdown`. `starting` is true on the process's first session: only then is
    /// a nova-compute without `compute-alt` a reason to refuse to run.
    pub async fn run(&self, shutdown: &CancellationToken, starting: bool) -> Result<(), MessagingError> {
        let mut front = self.front(starting).await?;
        loop {
            match &front {
                Front::Aside(reason) => {
                    info!(queue = %self.topology().server_queue(), reason, "not consuming compute.<host>: nova-compute serves it");
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(WAIT_POLL) => {}
                        }
                        let next = self.front(false).await?;
                        if !matches!(next, Front::Aside(_)) {
                            front = next;
                            break;
                        }
                    }
                }
                Front::Relay | Front::WholeHost => match self.consume(&front, shutdown).await? {
                    Ended::Shutdown => return Ok(()),
                    Ended::SteppedAside => {
                        front = Front::Aside(format!("{} has no queue", self.topology().alt_server_queue()));
                    }
                },
            }
        }
    }

    async fn front(&self, starting: bool) -> Result<Front, MessagingError> {
        if self.config.messaging.serve_whole_host {
            return Ok(Front::WholeHost);
        }
        let topology = self.topology();
        let alt = topology.alt_server_queue();
        if queue_state(self.connection, &alt).await?.is_some() {
            return Ok(Front::Relay);
        }
        let server = queue_state(self.connection, &topology.server_queue()).await?;
        if server.is_none_or(|s| s.consumers == 0) {
            return Ok(Front::Aside(format!("nova-compute's {alt} is not declared yet")));
        }
        if starting {
            tokio::time::sleep(ALT_GRACE).await;
            if queue_state(self.connection, &alt).await?.is_some() {
                return Ok(Front::Relay);
            }
            return Err(MessagingError::NoComputeAlt(format!(
                "nova-compute consumes {} but has no {alt} RPC server (Nova older than 33?): novasnap cannot \
                 forward what it does not serve, so it will not sit in front of it. Set [novasnap] \
                 serve_whole_host = true to have novasnap alone serve the host.",
                topology.server_queue()
            )));
        }
        Ok(Front::Aside(format!("{alt} is gone while nova-compute still consumes compute.<host>")))
    }

    async fn consume(&self, front: &Front, shutdown: &CancellationToken) -> Result<Ended, MessagingError> {
        let topology = self.topology();
        let mut channel = self.connection.create_channel().await.map_err(amqp)?;
        let queue = topology.declare_server_queue(&mut channel, self.connection).await?;
        channel.basic_qos(self.config.messaging.relay_prefetch, BasicQosOptions::default()).await.map_err(amqp)?;
        let mut args = consumer_arguments(&self.config.messaging.transport.queues);
        args.insert("x-priority".into(), AMQPValue::LongInt(self.config.messaging.consumer_priority));
        let tag = format!("novasnap-relay-{}-{}", self.config.host, uuid::Uuid::new_v4().simple());
        let mut deliveries =
            channel.basic_consume(&queue, &tag, BasicConsumeOptions::default(), args).await.map_err(amqp)?;
        info!(%queue, priority = self.config.messaging.consumer_priority, mode = ?front, "in front of nova-compute");
        let step_aside = Arc::new(Notify::new());
        let routing = TaskTracker::new();
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ended::Shutdown,
                _ = step_aside.notified() => break Ended::SteppedAside,
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let route = RouteOne {
                            config: self.config.clone(),
                            publish: self.publish.clone(),
                            whole_host: *front == Front::WholeHost,
                            step_aside: step_aside.clone(),
                        };
                        routing.spawn(route.run(delivery));
                    }
                    Some(Err(e)) => return Err(amqp(e)),
                    None => return Err(MessagingError::Amqp("relay consumer stream ended".into())),
                },
            }
        };
        // Cancelled before the channel closes: what this consumer still holds is settled by
        // the routing tasks, and nothing more comes.
        let _ = channel.basic_cancel(&tag, BasicCancelOptions::default()).await;
        routing.close();
        routing.wait().await;
        let _ = channel.close(200, "relay stopping").await;
        if let Ended::SteppedAside = ended {
            error!(
                queue = %topology.alt_server_queue(),
                "forward unroutable: nova-compute's compute-alt RPC server is gone; stepping aside so nova-compute \
                 serves compute.<host> itself until it is back"
            );
        }
        Ok(ended)
    }
}

/// The routing of one delivery: decided, copied, confirmed, settled. The work queue and the
/// dead-letter exchange are declared before the relay starts.
struct RouteOne {
    config: Config,
    publish: Channel,
    whole_host: bool,
    step_aside: Arc<Notify>,
}

impl RouteOne {
    async fn run(self, delivery: Delivery) {
        let m = &self.config.messaging;
        let route =
            envelope::decode_delivery(&delivery.properties, &delivery.data, m.max_message_bytes).map(|message| {
                match dispatcher::route(&message) {
                    // Alone on the host, the messages nova-compute would have served are refused.
                    Route::Forward if self.whole_host => match dispatcher::dispatch(&message) {
                        Ok(request) => Route::Serve(Box::new(request)),
                        Err(rejection) => Route::Refuse(rejection),
                    },
                    route => route,
                }
            });
        let topology = Topology { config: m, host: &self.config.host };
        let (exchange, routing_key, forward) = match route {
            Err(rejection) | Ok(Route::Refuse(rejection)) => return self.refuse(&delivery, &rejection).await,
            Ok(Route::Serve(_)) => (String::new(), topology.work_queue(), false),
            Ok(Route::Forward) => (m.control_exchange.clone(), topology.alt_server_queue(), true),
        };
        let copied = publish_confirmed(
            &self.publish,
            &exchange,
            &routing_key,
            true,
            &delivery.data,
            delivery.properties.clone(),
            m.confirm_timeout,
        )
        .await;
        let settled = match copied {
            Ok(Published::Routed) => {
                debug!(%routing_key, "passed on");
                delivery.acker.ack(BasicAckOptions::default()).await
            }
            Ok(Published::Unroutable) => {
                if forward {
                    self.step_aside.notify_one();
                } else {
                    error!(%routing_key, "the work queue is gone (deleted by hand?); the cast goes back to compute.<host>");
                }
                delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
            }
            Err(e) => {
                warn!(%routing_key, error = %e, "could not pass the message on; it goes back to compute.<host>");
                delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
            }
        };
        if let Err(e) = settled {
            // The channel is gone: the broker requeues the original, and a copy the broker
            // confirmed is there too. A cast taken twice is recognised by the work ledger; a
            // message forwarded twice, by nova-compute's own duplicate check on `_unique_id`
            // (oslo.messaging `_drivers/amqp.py` `_MsgIdCache`).
            warn!(%routing_key, error = %e, "could not settle a message of compute.<host>");
        }
    }

    async fn refuse(&self, delivery: &Delivery, rejection: &Rejection) {
        dead_letter(&self.config.messaging, &self.publish, delivery, rejection).await
    }
}
