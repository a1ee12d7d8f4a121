//! The transport layer: an AMQP connection to the first broker of `transport_url` that
//! answers, as oslo's rabbit driver fails over between hosts.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use tracing::{info, warn};

use super::MessagingError;
use crate::config::{BrokerEndpoint, MessagingConfig};

/// Bound on one connection attempt, so a black-holed broker does not hang start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to the first broker that answers, naming the connection `name` (shown by
/// `rabbitmqctl list_connections client_properties`).
pub async fn connect(config: &MessagingConfig, name: &str) -> Result<(Connection, BrokerEndpoint), MessagingError> {
    let mut errors = Vec::new();
    for broker in &config.brokers {
        let separator = if broker.amqp_uri.contains('?') { '&' } else { '?' };
        let uri = format!("{}{separator}heartbeat={}", broker.amqp_uri, config.heartbeat.as_secs().max(1));
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
