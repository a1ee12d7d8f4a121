//! The RPC server: oslo's topology for `Target(topic='compute', server=<host>)`, casts
//! consumed with a bounded prefetch, decoded, checked, and handed to the worker.
//!
//! Unlike oslo, which acknowledges a cast before dispatching it, novasnap acknowledges
//! only when the handler says the outcome is durable ([`Handled::Done`]); a worker that
//! dies mid-snapshot leaves the cast to be redelivered, and the pipeline resumes.
//!
//! **consumer_timeout.** RabbitMQ closes a channel whose delivery stays unacknowledged
//! longer than `consumer_timeout` (30 min by default). A snapshot longer than that loses
//! its channel: the cast is requeued and delivered again (here or to another replica),
//! where it waits on the instance lease until the first run ends, then is acknowledged as
//! a duplicate; the first run's own ack fails harmlessly. Nothing is lost or done twice,
//! but every cast in flight on that channel makes the same detour, so operators with
//! snapshots longer than 30 minutes should raise `consumer_timeout` in rabbitmq.conf
//! (or, on RabbitMQ ≥ 3.12, set a `consumer-timeout` policy on the compute queues).
//!
//! Bad input is never requeued: it is published to novasnap's dead-letter exchange with
//! the reason in the `x-novasnap-reason` header, logged, and acknowledged.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::envelope::{self, Rejection};
use super::{dispatcher, Handled, MessagingError, SnapshotHandler};
use crate::config::Config;

const TOPIC: &str = "compute";
/// Reconnect backoff bounds after a lost connection.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

fn amqp(e: lapin::Error) -> MessagingError {
    MessagingError::Amqp(e.to_string())
}

/// Consumes until `shutdown` is cancelled, reconnecting (with backoff, across the
/// configured brokers) whenever the connection is lost. On shutdown: consumers are
/// cancelled, in-flight snapshots get `[novasnap] shutdown_grace` to finish, and whatever
/// is still unacknowledged then goes back to the broker with the connection.
pub async fn serve(
    config: &Config,
    handler: Arc<dyn SnapshotHandler>,
    shutdown: CancellationToken,
) -> Result<(), MessagingError> {
    let limit = Arc::new(Semaphore::new(config.worker.max_concurrent_snapshots));
    let tracker = TaskTracker::new();
    let mut delay = RECONNECT_MIN;
    // Connections stay open until the in-flight work is done: its acks need them.
    let mut connections = Vec::new();
    while !shutdown.is_cancelled() {
        match Session::open(config).await {
            Ok(session) => {
                delay = RECONNECT_MIN;
                let result = session.consume(config, &handler, &limit, &tracker, &shutdown).await;
                connections.push(session.connection);
                if let Err(e) = result {
                    warn!(error = %e, "lost the broker; reconnecting");
                }
            }
            Err(e) => warn!(error = %e, retry_in = ?delay, "cannot set up consuming; retrying"),
        }
        if shutdown.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
    tracker.close();
    if !tracker.is_empty() {
        info!(in_flight = tracker.len(), grace = ?config.worker.shutdown_grace, "waiting for in-flight snapshots");
    }
    if tokio::time::timeout(config.worker.shutdown_grace, tracker.wait()).await.is_err() {
        warn!(
            in_flight = tracker.len(),
            "grace period over: unfinished casts go back to the broker for another replica"
        );
    }
    for connection in connections {
        let _ = connection.close(200, "novasnap stopping").await;
    }
    Ok(())
}

struct Session {
    connection: Connection,
    consume: Channel,
    /// Publishes dead letters, with confirms.
    publish: Channel,
    queues: Vec<String>,
}

impl Session {
    async fn open(config: &Config) -> Result<Self, MessagingError> {
        let (connection, _) =
            super::transport::connect(&config.messaging, &format!("novasnap:{}", config.host)).await?;
        let publish = connection.create_channel().await.map_err(amqp)?;
        publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp)?;
        let mut session =
            Self { consume: connection.create_channel().await.map_err(amqp)?, connection, publish, queues: Vec::new() };
        session.declare(config).await?;
        let prefetch = u16::try_from(config.worker.max_concurrent_snapshots).unwrap_or(u16::MAX);
        session.consume.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(amqp)?;
        Ok(session)
    }

    /// oslo's declarations for an RPC server of `compute` on `host` (see
    /// `fixtures/oslo/topology/rpc_server.*`), plus novasnap's dead-letter queue.
    async fn declare(&mut self, config: &Config) -> Result<(), MessagingError> {
        let m = &config.messaging;
        let durable = m.durable_queues || m.quorum_queues;
        self.declare_exchange(
            &m.control_exchange,
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable, ..Default::default() },
        )
        .await?;
        let fanout = format!("{TOPIC}_fanout");
        self.declare_exchange(
            &fanout,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable, auto_delete: true, ..Default::default() },
        )
        .await?;
        let mut queue_args = FieldTable::default();
        if m.quorum_queues {
            queue_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        let options =
            QueueDeclareOptions { durable, auto_delete: m.auto_delete && !m.quorum_queues, ..Default::default() };
        let server_queue = format!("{TOPIC}.{}", config.host);
        for queue in [TOPIC.to_string(), server_queue] {
            self.declare_queue(&queue, options, queue_args.clone()).await?;
            self.consume
                .queue_bind(&queue, &m.control_exchange, &queue, QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(amqp)?;
            self.queues.push(queue);
        }
        // The per-process fanout queue: transient, expiring when no one uses it.
        let fanout_queue = format!("{TOPIC}_fanout_{}", uuid::Uuid::new_v4().simple());
        let mut fanout_args = FieldTable::default();
        fanout_args.insert("x-expires".into(), AMQPValue::LongLongInt(m.transient_queues_ttl.as_millis() as i64));
        let fanout_durable = m.transient_quorum_queues;
        if fanout_durable {
            fanout_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        self.declare_queue(
            &fanout_queue,
            QueueDeclareOptions { durable: fanout_durable, ..Default::default() },
            fanout_args,
        )
        .await?;
        self.consume
            .queue_bind(&fanout_queue, &fanout, TOPIC, QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(amqp)?;
        self.queues.push(fanout_queue);

        self.publish
            .exchange_declare(
                &m.dead_letter_exchange,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        self.publish
            .queue_declare(
                &m.dead_letter_queue,
                QueueDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        self.publish
            .queue_bind(
                &m.dead_letter_queue,
                &m.dead_letter_exchange,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        Ok(())
    }

    /// Declares an exchange; one another peer declared with other flags (PRECONDITION_FAILED,
    /// which closes the channel) is used as it is, and the mismatch logged.
    async fn declare_exchange(
        &mut self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeDeclareOptions,
    ) -> Result<(), MessagingError> {
        match self.consume.exchange_declare(name, kind.clone(), options, FieldTable::default()).await {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
                error!(exchange = name, error = %e, "exchange exists with other flags than configured; using it as it is");
                self.consume = self.connection.create_channel().await.map_err(amqp)?;
                let passive = ExchangeDeclareOptions { passive: true, ..options };
                self.consume.exchange_declare(name, kind, passive, FieldTable::default()).await.map_err(amqp)
            }
            Err(e) => Err(amqp(e)),
        }
    }

    /// Declares a queue. Another peer may have declared it with other flags
    /// (PRECONDITION_FAILED, which closes the channel): as oslo does, a queue whose only
    /// difference is `x-expires` is deleted and declared again; for any other difference
    /// the existing queue is used as it is, and the mismatch logged.
    async fn declare_queue(
        &mut self,
        name: &str,
        options: QueueDeclareOptions,
        args: FieldTable,
    ) -> Result<(), MessagingError> {
        match self.consume.queue_declare(name, options, args.clone()).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
                self.consume = self.connection.create_channel().await.map_err(amqp)?;
                if e.to_string().contains("x-expires") {
                    warn!(queue = name, error = %e, "queue declared with another x-expires; deleting and declaring it again, as oslo does");
                    self.consume.queue_delete(name, QueueDeleteOptions::default()).await.map_err(amqp)?;
                    self.consume.queue_declare(name, options, args).await.map_err(amqp)?;
                } else {
                    error!(queue = name, error = %e, "queue exists with other flags than configured; using it as it is");
                    let passive = QueueDeclareOptions { passive: true, ..options };
                    self.consume.queue_declare(name, passive, FieldTable::default()).await.map_err(amqp)?;
                }
                Ok(())
            }
            Err(e) => Err(amqp(e)),
        }
    }

    async fn consume(
        &self,
        config: &Config,
        handler: &Arc<dyn SnapshotHandler>,
        limit: &Arc<Semaphore>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<(), MessagingError> {
        let mut tags = Vec::new();
        let mut streams = Vec::new();
        for queue in &self.queues {
            let tag = format!("novasnap-{}-{}", config.host, uuid::Uuid::new_v4().simple());
            let consumer = self
                .consume
                .basic_consume(queue, &tag, BasicConsumeOptions::default(), FieldTable::default())
                .await
                .map_err(amqp)?;
            tags.push(tag);
            streams.push(consumer);
        }
        info!(queues = ?self.queues, exchange = %config.messaging.control_exchange, "consuming casts");
        let mut deliveries = futures::stream::select_all(streams);
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => {
                    for tag in &tags {
                        let _ = self.consume.basic_cancel(tag, BasicCancelOptions::default()).await;
                    }
                    info!("no longer taking casts");
                    return Ok(());
                }
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => return Err(amqp(e)),
                    None => return Err(MessagingError::Amqp("consumer stream ended".into())),
                },
            };
            let content_type = delivery.properties.content_type().as_ref().map(ShortString::as_str);
            let request = envelope::decode(content_type, &delivery.data, config.messaging.max_message_bytes)
                .and_then(|message| dispatcher::dispatch(&message));
            let request = match request {
                Ok(request) => request,
                Err(rejection) => {
                    self.dead_letter(config, &delivery, &rejection).await?;
                    continue;
                }
            };
            let permit = tokio::select! {
                permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = shutdown.cancelled() => {
                    // Not started: straight back to the broker.
                    let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tracker.spawn(async move {
                let handled = handler.handle(request).await;
                drop(permit);
                let settled = match handled {
                    Handled::Done => delivery.acker.ack(BasicAckOptions::default()).await,
                    Handled::Requeue => {
                        delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
                    }
                };
                if let Err(e) = settled {
                    // The channel is gone: the broker redelivers the cast, and the
                    // ledger recognises it as done.
                    warn!(error = %e, ?handled, "could not settle the cast with the broker");
                }
            });
        }
    }

    /// Keeps a refused message, with why, in the dead-letter queue; then acknowledges it.
    /// If the dead letter cannot be stored, the message is requeued and the session
    /// ends: nothing is dropped.
    async fn dead_letter(
        &self,
        config: &Config,
        delivery: &Delivery,
        rejection: &Rejection,
    ) -> Result<(), MessagingError> {
        warn!(
            exchange = %delivery.exchange, routing_key = %delivery.routing_key, reason = %rejection,
            "refusing a cast; dead-lettered to {}", config.messaging.dead_letter_exchange
        );
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert("x-novasnap-reason".into(), AMQPValue::LongString(rejection.to_string().into()));
        headers.insert("x-novasnap-reason-class".into(), AMQPValue::LongString(rejection.class().into()));
        headers.insert("x-novasnap-original-exchange".into(), AMQPValue::LongString(delivery.exchange.as_str().into()));
        headers.insert(
            "x-novasnap-original-routing-key".into(),
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
        let mut properties = BasicProperties::default().with_headers(headers).with_delivery_mode(2);
        if let Some(ct) = delivery.properties.content_type() {
            properties = properties.with_content_type(ct.clone());
        }
        if let Some(ce) = delivery.properties.content_encoding() {
            properties = properties.with_content_encoding(ce.clone());
        }
        let stored = async {
            let confirm = self
                .publish
                .basic_publish(
                    &config.messaging.dead_letter_exchange,
                    "",
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties,
                )
                .await?
                .await?;
            Ok::<_, lapin::Error>(confirm.is_ack())
        }
        .await;
        match stored {
            Ok(true) => delivery.acker.ack(BasicAckOptions::default()).await.map_err(amqp),
            other => {
                let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                Err(MessagingError::Amqp(format!("dead letter not stored ({other:?}); message requeued")))
            }
        }
    }
}
