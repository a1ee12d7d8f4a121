//! The transport layer: AMQP connections to the first broker of `transport_url` that
//! answers, as oslo's rabbit driver fails over between hosts; the reconnect backoff every
//! user of the broker shares; and publishing with a publisher confirm that is awaited for a
//! bounded time (a broker under a memory or disk alarm blocks publishers indefinitely).

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::publisher_confirm::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tracing::{info, warn};

use super::{amqp, MessagingError};
use crate::config::{BrokerEndpoint, MessagingConfig};

/// Bound on one connection attempt, so a black-holed broker does not hang start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Delays between reconnection attempts: doubled from the first to the last.
pub const RECONNECT_MIN: Duration = Duration::from_secs(1);
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Connects to the first broker that answers, naming the connection `name` (shown by
/// `rabbitmqctl list_connections client_properties`).
pub async fn connect(config: &MessagingConfig, name: &str) -> Result<(Connection, BrokerEndpoint), MessagingError> {
    let mut errors = Vec::new();
    for broker in &config.brokers {
        let separator = if broker.amqp_uri.contains('?') { '&' } else { '?' };
        // oslo's heartbeat_timeout_threshold = 0 turns heartbeats off; so does lapin's 0.
        let uri = format!("{}{separator}heartbeat={}", broker.amqp_uri, config.heartbeat.as_secs());
        let properties = ConnectionProperties::default().with_connection_name(name.to_string().into());
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&uri, properties)).await {
            Ok(Ok(connection)) => {
                info!(broker = %broker.display, name, "connected to RabbitMQ");
                return Ok((connection, broker.clone()));
            }
            Ok(Err(e)) => {
                warn!(broker = %broker.display, error = %e, "cannot connect to RabbitMQ; trying the next host");
                errors.push(format!("{}: {e}", broker.display));
            }
            Err(_) => {
                warn!(broker = %broker.display, "RabbitMQ connection timed out; trying the next host");
                errors.push(format!("{}: timed out", broker.display));
            }
        }
    }
    Err(MessagingError::Amqp(format!("no broker reachable: {}", errors.join("; "))))
}

/// The next delay of a reconnect loop.
pub fn next_delay(delay: Duration) -> Duration {
    (delay * 2).min(RECONNECT_MAX)
}

/// How the broker took a confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Confirmed, and (for a mandatory publish) routed to at least one queue.
    Routed,
    /// A mandatory publish no queue is bound for: the broker returned it.
    Unroutable,
}

/// One publish on a channel in confirm mode, its confirm awaited for at most `limit`.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    body: &[u8],
    properties: BasicProperties,
    limit: Duration,
) -> Result<Published, MessagingError> {
    let options = BasicPublishOptions { mandatory, ..Default::default() };
    let confirmed = tokio::time::timeout(limit, async {
        channel.basic_publish(exchange, routing_key, options, body, properties).await?.await
    })
    .await
    .map_err(|_| MessagingError::ConfirmTimeout {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        seconds: limit.as_secs(),
    })?
    .map_err(amqp)?;
    match confirmed {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Published::Routed),
        Confirmation::Ack(Some(_)) => Ok(Published::Unroutable),
        Confirmation::Nack(_) => {
            Err(MessagingError::NotConfirmed { exchange: exchange.into(), routing_key: routing_key.into() })
        }
    }
}
