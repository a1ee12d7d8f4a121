//! Nova-style notifications, published as oslo.messaging's notifier driver publishes them:
//! envelope 2.0 (or 1.0 for the `messaging` driver), the request context redacted, routing
//! key `<topic>.<priority>` on the configured exchange, publisher confirms on. Like oslo,
//! the notifier declares the exchange and a queue per routing key, so notifications are
//! kept until a listener consumes them.

use std::collections::HashSet;

use async_trait::async_trait;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use super::payload::{notifications_for, Notification};
use super::{MessagingError, Notifier, SnapshotEvent};
use crate::config::{Config, NotificationFormat};
use crate::request::SnapshotRequest;

pub struct AmqpNotifier {
    config: Config,
    link: Mutex<Option<Link>>,
}

/// A connection with its confirming channel and the routing keys already declared on it.
struct Link {
    _connection: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

fn amqp(e: lapin::Error) -> MessagingError {
    MessagingError::Amqp(e.to_string())
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
        let notifier = Self { config: config.clone(), link: Mutex::new(None) };
        if config.notifications.enabled {
            *notifier.link.lock().await = Some(notifier.open().await?);
        }
        Ok(notifier)
    }

    async fn open(&self) -> Result<Link, MessagingError> {
        let (connection, _) =
            super::transport::connect(&self.config.messaging, &format!("novasnap-notifier:{}", self.config.host))
                .await?;
        let channel = connection.create_channel().await.map_err(amqp)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp)?;
        let durable = self.config.messaging.durable_queues;
        channel
            .exchange_declare(
                &self.config.notifications.exchange,
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        Ok(Link { _connection: connection, channel, declared: HashSet::new() })
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

    async fn publish(&self, link: &mut Link, routing_key: &str, body: &[u8]) -> Result<(), MessagingError> {
        let exchange = &self.config.notifications.exchange;
        if !link.declared.contains(routing_key) {
            let durable = self.config.messaging.durable_queues;
            let options = QueueDeclareOptions { durable, ..Default::default() };
            link.channel.queue_declare(routing_key, options, FieldTable::default()).await.map_err(amqp)?;
            link.channel
                .queue_bind(routing_key, exchange, routing_key, QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(amqp)?;
            link.declared.insert(routing_key.to_string());
        }
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(FieldTable::default());
        let confirm = link
            .channel
            .basic_publish(exchange, routing_key, BasicPublishOptions::default(), body, properties)
            .await
            .map_err(amqp)?
            .await
            .map_err(amqp)?;
        if !confirm.is_ack() {
            return Err(MessagingError::NotConfirmed { exchange: exchange.clone(), routing_key: routing_key.into() });
        }
        Ok(())
    }
}

#[async_trait]
impl Notifier for AmqpNotifier {
    async fn notify(&self, req: &SnapshotRequest, event: SnapshotEvent) -> Result<(), MessagingError> {
        if !self.config.notifications.enabled {
            return Ok(());
        }
        let glance = self.config.glance.api_servers.first().map(String::as_str).unwrap_or("");
        let mut link = self.link.lock().await;
        for n in notifications_for(req, &event, glance) {
            let publisher_id = if n.versioned {
                format!("nova-compute:{}", self.config.host)
            } else {
                format!("compute.{}", self.config.host)
            };
            let body = message_body(req, &n, &publisher_id, self.config.notifications.envelope_v2);
            for topic in self.topics(n.versioned) {
                let routing_key = format!("{topic}.{}", n.priority.to_lowercase());
                // One reconnect per publish: a broker that restarted since the last one.
                for attempt in 0..2 {
                    if link.is_none() {
                        *link = Some(self.open().await?);
                    }
                    match self.publish(link.as_mut().expect("just opened"), &routing_key, &body).await {
                        Ok(()) => {
                            debug!(event_type = n.event_type, routing_key, "notification published");
                            break;
                        }
                        Err(e) if attempt == 0 => {
                            warn!(error = %e, "notification publish failed; reconnecting");
                            *link = None;
                        }
                        Err(e) => {
                            *link = None;
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
