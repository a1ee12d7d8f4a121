//! Nova-style notifications, sent as oslo.messaging's `Notifier` sends them to each of its
//! drivers (`[oslo_messaging_notifications] driver`, every line): `messagingv2` publishes
//! envelope 2.0, `messaging` format 1.0, `log` logs the message. Published on the
//! notification transport (`[oslo_messaging_notifications] transport_url`, else the RPC
//! one) with the request context redacted, routing key `<topic>.<priority>` on the
//! configured exchange, compressed under that transport's `kombu_compression`, publisher
//! confirms on (awaited off the snapshot's path, see [`AmqpNotifier`]), tried again as
//! `[oslo_messaging_notifications] retry` says. Like oslo, the notifier declares the
//! exchange and a queue per routing key, so notifications are kept until a listener
//! consumes them.

use std::collections::HashSet;

use async_trait::async_trait;
use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::payload::{notifications_for, Notification};
use super::topology::queue_arguments;
use super::transport::{oslo_publication, publish_confirmed, Transport};
use super::{amqp, MessagingError, Notifier, SnapshotEvent};
use crate::config::{Config, NotificationDriver, NotificationFormat};
use crate::request::SnapshotRequest;

/// Notifications waiting for the publisher, at most: beyond, new ones are dropped (and
/// logged) rather than stall a snapshot behind a broker that blocks publishers.
const OUTBOX: usize = 1024;

/// Publishes notifications on a task of its own, in order, so a snapshot never waits for a
/// broker's confirm (a RabbitMQ under a memory or disk alarm blocks publishers until it
/// clears); each publish waits at most `[novasnap] confirm_timeout`.
pub struct AmqpNotifier {
    config: Config,
    outbox: mpsc::Sender<Outgoing>,
}

enum Outgoing {
    Publish {
        exchange: String,
        routing_key: String,
        body: Vec<u8>,
        event_type: &'static str,
    },
    /// Answered once everything queued before it was published (or given up).
    Flush(oneshot::Sender<()>),
}

/// The publisher task's side: the broker link, opened and reopened as needed.
struct Publisher {
    config: Config,
    transport: Transport,
    link: Option<Link>,
}

/// A connection with its confirming channel and the routing keys already declared on it.
struct Link {
    _connection: Connection,
    channel: Channel,
    /// Exchanges, and (exchange, routing key) queues, declared on this connection.
    declared: HashSet<(String, String)>,
}

/// oslo's wire timestamp: UTC, `YYYY-MM-DD HH:MM:SS.ffffff`.
pub fn oslo_timestamp(now: chrono::DateTime<chrono::Utc>) -> String {
    now.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// The message body oslo's notifier sends: the notification, `_unique_id`, and the
/// request context as `_context_*` keys with the token redacted.
pub fn message_body(req: &SnapshotRequest, n: &Notification, publisher_id: &str, envelope_v2: bool) -> Vec<u8> {
    let mut msg = Map::new();
    msg.insert("message_id".into(), uuid::Uuid::new_v4().to_string().into());
    msg.insert("publisher_id".into(), publisher_id.into());
    msg.insert("event_type".into(), n.event_type.into());
    msg.insert("priority".into(), n.priority.into());
    msg.insert("payload".into(), n.payload.clone());
    msg.insert("timestamp".into(), oslo_timestamp(chrono::Utc::now()).into());
    msg.insert("_unique_id".into(), uuid::Uuid::new_v4().simple().to_string().into());
    for (key, value) in &req.context.redacted {
        msg.insert(format!("_context_{key}"), value.clone());
    }
    msg.insert("_context_auth_token".into(), Value::Null);
    let msg = Value::Object(msg);
    let body =
        if envelope_v2 { serde_json::json!({"oslo.version": "2.0", "oslo.message": msg.to_string()}) } else { msg };
    body.to_string().into_bytes()
}

impl AmqpNotifier {
    /// Connects now, so a broker that is unreachable at start-up is reported at once.
    pub async fn connect(config: &Config) -> Result<Self, MessagingError> {
        let transport = Transport::new(&config.notifications.transport);
        let mut publisher = Publisher { config: config.clone(), transport, link: None };
        if config.notifications.drivers.iter().any(|d| *d != NotificationDriver::Log) {
            publisher.link = Some(publisher.open().await?);
        }
        let (outbox, inbox) = mpsc::channel(OUTBOX);
        tokio::spawn(publisher.run(inbox));
        Ok(Self { config: config.clone(), outbox })
    }

    /// Returns once every notification queued so far was published or given up, or after
    /// `limit`.
    pub async fn flush(&self, limit: std::time::Duration) {
        let (done, flushed) = oneshot::channel();
        if self.outbox.send(Outgoing::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(limit, flushed).await;
        }
    }

    /// Topics a notification goes to, by kind and `notification_format`.
    fn topics(&self, versioned: bool) -> &[String] {
        let n = &self.config.notifications;
        match (versioned, n.format) {
            (true, NotificationFormat::Versioned | NotificationFormat::Both) => &n.versioned_topics,
            (false, NotificationFormat::Unversioned | NotificationFormat::Both) => &n.legacy_topics,
            _ => &[],
        }
    }
}

impl Publisher {
    async fn run(mut self, mut inbox: mpsc::Receiver<Outgoing>) {
        while let Some(outgoing) = inbox.recv().await {
            match outgoing {
                Outgoing::Flush(done) => {
                    let _ = done.send(());
                }
                Outgoing::Publish { exchange, routing_key, body, event_type } => {
                    match self.publish_with_retries(&exchange, &routing_key, &body).await {
                        Ok(()) => debug!(event_type, routing_key, "notification published"),
                        Err(e) => warn!(event_type, routing_key, error = %e, "notification not published"),
                    }
                }
            }
        }
    }

    /// One notification, tried `[oslo_messaging_notifications] retry` more times (or until
    /// published), reconnecting before each: after a lost link `kombu_reconnect_delay`,
    /// then the transport's retry intervals.
    async fn publish_with_retries(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
    ) -> Result<(), MessagingError> {
        let mut backoff = self.transport.backoff();
        let mut tries = 0u32;
        loop {
            let had_link = self.link.is_some();
            let error = match self.publish(exchange, routing_key, body).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            self.link = None;
            if self.config.notifications.retry.is_some_and(|retry| tries >= retry) {
                return Err(error);
            }
            tries += 1;
            let wait = if had_link { self.transport.reconnect_delay() } else { backoff.next().expect("endless") };
            warn!(error = %error, retry_in = ?wait, "notification publish failed; reconnecting");
            tokio::time::sleep(wait).await;
        }
    }

    async fn open(&self) -> Result<Link, MessagingError> {
        let (connection, _) = self.transport.connect(&format!("novasnap-notifier:{}", self.config.host)).await?;
        let channel = connection.create_channel().await.map_err(amqp)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp)?;
        Ok(Link { _connection: connection, channel, declared: HashSet::new() })
    }

    /// The confirming channel, with the exchange and `routing_key`'s queue declared and bound
    /// as oslo's `notify_send` declares them (`_publish_and_creates_default_queue`): topic
    /// exchange and queue durable with `amqp_durable_queues` or quorum queues, auto-delete
    /// with `amqp_auto_delete`, the queue's arguments `_get_queue_arguments(ha, 0, quorum)`
    /// (a quorum queue on a quorum-queue cloud), all of the notification transport.
    async fn channel_for(&mut self, exchange: &str, routing_key: &str) -> Result<Channel, MessagingError> {
        if self.link.is_none() {
            self.link = Some(self.open().await?);
        }
        let link = self.link.as_mut().expect("just opened");
        let q = &self.transport.config.queues;
        let durable = q.durable();
        if link.declared.insert((exchange.to_string(), String::new())) {
            let options = ExchangeDeclareOptions { durable, auto_delete: q.auto_delete, ..Default::default() };
            let declared =
                link.channel.exchange_declare(exchange, ExchangeKind::Topic, options, FieldTable::default()).await;
            if let Err(e) = declared {
                link.declared.remove(&(exchange.to_string(), String::new()));
                return Err(amqp(e));
            }
        }
        if !link.declared.contains(&(exchange.to_string(), routing_key.to_string())) {
            let options = QueueDeclareOptions { durable, auto_delete: q.auto_delete, ..Default::default() };
            link.channel.queue_declare(routing_key, options, queue_arguments(q, q.quorum, 0)).await.map_err(amqp)?;
            link.channel
                .queue_bind(routing_key, exchange, routing_key, QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(amqp)?;
            link.declared.insert((exchange.to_string(), routing_key.to_string()));
        }
        Ok(link.channel.clone())
    }

    async fn publish(&mut self, exchange: &str, routing_key: &str, body: &[u8]) -> Result<(), MessagingError> {
        let channel = self.channel_for(exchange, routing_key).await?;
        let (body, properties) = oslo_publication(body, self.transport.config.compression);
        publish_confirmed(
            &channel,
            exchange,
            routing_key,
            false,
            &body,
            properties,
            self.config.messaging.confirm_timeout,
        )
        .await
        .map(drop)
    }
}

#[async_trait]
impl Notifier for AmqpNotifier {
    async fn notify(&self, req: &SnapshotRequest, event: SnapshotEvent) -> Result<(), MessagingError> {
        let drivers = &self.config.notifications.drivers;
        if drivers.is_empty() {
            return Ok(());
        }
        let glance = self.config.glance.api_servers.first().map(String::as_str).unwrap_or("");
        for n in notifications_for(req, &event, glance) {
            let publisher_id = if n.versioned {
                format!("nova-compute:{}", self.config.host)
            } else {
                format!("compute.{}", self.config.host)
            };
            for topic in self.topics(n.versioned) {
                let routing_key = format!("{topic}.{}", n.priority.to_lowercase());
                let exchange = if n.nova_exchange {
                    self.config.messaging.control_exchange.clone()
                } else {
                    self.config.notifications.exchange.clone()
                };
                // Each driver gets the notification, as oslo's `Notifier._notify` calls each.
                for driver in drivers {
                    let envelope_v2 = match driver {
                        NotificationDriver::MessagingV2 => true,
                        NotificationDriver::Messaging => false,
                        NotificationDriver::Log => {
                            log_notification(&n, &message_body(req, &n, &publisher_id, false));
                            continue;
                        }
                    };
                    let body = message_body(req, &n, &publisher_id, envelope_v2);
                    let outgoing = Outgoing::Publish {
                        exchange: exchange.clone(),
                        routing_key: routing_key.clone(),
                        body,
                        event_type: n.event_type,
                    };
                    self.outbox.try_send(outgoing).map_err(|_| {
                        MessagingError::Amqp(format!(
                            "{OUTBOX} notifications are waiting for the broker; dropping this one"
                        ))
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// The `log` driver (`notify/_impl_log.py` `LogDriver.notify`): the message as JSON, at
/// the notification's priority, under `oslo.messaging.notification.<event_type>`.
fn log_notification(n: &Notification, message: &[u8]) {
    let message = String::from_utf8_lossy(message);
    let logger = format!("oslo.messaging.notification.{}", n.event_type);
    match n.priority {
        "ERROR" | "CRITICAL" => tracing::error!(logger, %message, "notification"),
        "WARN" | "WARNING" => warn!(logger, %message, "notification"),
        "DEBUG" => debug!(logger, %message, "notification"),
        _ => tracing::info!(logger, %message, "notification"),
    }
}
