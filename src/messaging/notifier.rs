//! Nova-style notifications, published as oslo.messaging's notifier driver publishes them:
//! envelope 2.0 (or 1.0 for the `messaging` driver), the request context redacted, routing
//! key `<topic>.<priority>` on the configured exchange, publisher confirms on (awaited off the
//! snapshot's path, see [`AmqpNotifier`]). Like oslo,
//! the notifier declares the exchange and a queue per routing key, so notifications are
//! kept until a listener consumes them.

use std::collections::HashSet;

use async_trait::async_trait;
use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::payload::{notifications_for, Notification};
use super::transport::publish_confirmed;
use super::{amqp, MessagingError, Notifier, SnapshotEvent};
use crate::config::{Config, NotificationFormat};
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
        let mut publisher = Publisher { config: config.clone(), link: None };
        if config.notifications.enabled {
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
                    // One reconnect per publish: a broker that restarted since the last one.
                    let mut result = self.publish(&exchange, &routing_key, &body).await;
                    if let Err(e) = &result {
                        warn!(error = %e, "notification publish failed; reconnecting");
                        self.link = None;
                        result = self.publish(&exchange, &routing_key, &body).await;
                    }
                    match result {
                        Ok(()) => debug!(event_type, routing_key, "notification published"),
                        Err(e) => {
                            self.link = None;
                            warn!(event_type, routing_key, error = %e, "notification not published");
                        }
                    }
                }
            }
        }
    }

    async fn open(&self) -> Result<Link, MessagingError> {
        let (connection, _) =
            super::transport::connect(&self.config.messaging, &format!("novasnap-notifier:{}", self.config.host))
                .await?;
        let channel = connection.create_channel().await.map_err(amqp)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp)?;
        Ok(Link { _connection: connection, channel, declared: HashSet::new() })
    }

    /// The confirming channel, with the exchange and `routing_key`'s queue declared and bound
    /// as oslo's `notify_send` declares them (`_publish_and_creates_default_queue`): topic
    /// exchange and queue durable with `amqp_durable_queues` or quorum queues, the queue a
    /// quorum queue on a quorum-queue cloud.
    async fn channel_for(&mut self, exchange: &str, routing_key: &str) -> Result<Channel, MessagingError> {
        if self.link.is_none() {
            self.link = Some(self.open().await?);
        }
        let link = self.link.as_mut().expect("just opened");
        let m = &self.config.messaging;
        let durable = m.durable_queues || m.quorum_queues;
        if link.declared.insert((exchange.to_string(), String::new())) {
            let options = ExchangeDeclareOptions { durable, auto_delete: m.auto_delete, ..Default::default() };
            let declared =
                link.channel.exchange_declare(exchange, ExchangeKind::Topic, options, FieldTable::default()).await;
            if let Err(e) = declared {
                link.declared.remove(&(exchange.to_string(), String::new()));
                return Err(amqp(e));
            }
        }
        if !link.declared.contains(&(exchange.to_string(), routing_key.to_string())) {
            let mut args = FieldTable::default();
            if m.quorum_queues {
                args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
            }
            let options = QueueDeclareOptions { durable, auto_delete: m.auto_delete, ..Default::default() };
            link.channel.queue_declare(routing_key, options, args).await.map_err(amqp)?;
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
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(FieldTable::default());
        publish_confirmed(
            &channel,
            exchange,
            routing_key,
            false,
            body,
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
        if !self.config.notifications.enabled {
            return Ok(());
        }
        let glance = self.config.glance.api_servers.first().map(String::as_str).unwrap_or("");
        for n in notifications_for(req, &event, glance) {
            let publisher_id = if n.versioned {
                format!("nova-compute:{}", self.config.host)
            } else {
                format!("compute.{}", self.config.host)
            };
            let body = message_body(req, &n, &publisher_id, self.config.notifications.envelope_v2);
            for topic in self.topics(n.versioned) {
                let routing_key = format!("{topic}.{}", n.priority.to_lowercase());
                let exchange = if n.nova_exchange {
                    self.config.messaging.control_exchange.clone()
                } else {
                    self.config.notifications.exchange.clone()
                };
                let outgoing =
                    Outgoing::Publish { exchange, routing_key, body: body.clone(), event_type: n.event_type };
                self.outbox.try_send(outgoing).map_err(|_| {
                    MessagingError::Amqp(format!(
                        "{OUTBOX} notifications are waiting for the broker; dropping this one"
                    ))
                })?;
            }
        }
        Ok(())
    }
}
