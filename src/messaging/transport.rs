//! The transport layer: AMQP connections to the brokers of a transport URL as oslo's rabbit
//! driver makes them (`impl_rabbit.py` `Connection.__init__`, `ensure_connection`,
//! `ensure`, kombu's `Connection._ensure_connection`): the hosts shuffled once, then tried
//! in turn (`round-robin`) or at random (`shuffle`); after every host failed once, a wait
//! that grows linearly (`rabbit_retry_interval`, `+rabbit_retry_backoff`, at most
//! `rabbit_interval_max`); an established connection that is lost is tried again after
//! `kombu_reconnect_delay` (plus up to `kombu_reconnect_splay`). TLS ([`super::tls`]), the
//! login method, heartbeats and IPv6 hosts as oslo has them. Publishing with a publisher
//! confirm that is awaited for a bounded time (a broker under a memory or disk alarm blocks
//! publishers indefinitely).

use std::sync::Mutex;
use std::time::Duration;

use lapin::auth::SASLMechanism;
use lapin::options::BasicPublishOptions;
use lapin::publisher_confirm::Confirmation;
use lapin::tcp::{HandshakeResult, RustlsConnector, TcpStream};
use lapin::types::FieldTable;
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rand::seq::SliceRandom;
use rand::Rng;
use tracing::{info, warn};

use super::compression::compress;
use super::{amqp, heartbeatless, tls, MessagingError};
use crate::config::{BrokerEndpoint, Compression, FailoverStrategy, LoginMethod, RabbitConfig};

/// Bound on one connection attempt, so a black-holed broker does not hang start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The largest AMQP frame this end proposes (the broker's own, 128 KiB, is the usual
/// answer; the lower of the two holds). lapin keeps two buffers of 32 frames per connection,
/// zero-filled to that size as the connection opens: at 128 KiB, 16 MiB of the idle worker's
/// resident memory for its two connections. Nova's casts and the calls the relay passes on
/// are tens of KiB, a few frames each at this size; what is in a message is not changed.
const FRAME_MAX: u32 = 16 * 1024;

/// The brokers of one transport and the order they are tried in, shared by every
/// connection novasnap opens on it.
pub struct Transport {
    pub config: RabbitConfig,
    order: Mutex<Order>,
}

struct Order {
    brokers: Vec<BrokerEndpoint>,
    next: usize,
}

impl Transport {
    pub fn new(config: &RabbitConfig) -> Self {
        let mut brokers = config.brokers.clone();
        // `Connection.__init__`: `random.shuffle(url.hosts)` when there are several.
        brokers.shuffle(&mut rand::thread_rng());
        Self { config: config.clone(), order: Mutex::new(Order { brokers, next: 0 }) }
    }

    /// The next broker to try, by `kombu_failover_strategy`.
    fn next_broker(&self) -> BrokerEndpoint {
        let mut order = self.order.lock().expect("broker order lock");
        let index = match self.config.failover {
            FailoverStrategy::RoundRobin => order.next % order.brokers.len(),
            FailoverStrategy::Shuffle => rand::thread_rng().gen_range(0..order.brokers.len()),
        };
        order.next = index + 1;
        order.brokers[index].clone()
    }

    /// One round: each broker tried once (kombu sleeps only when a round completes),
    /// naming the connection `name` (shown by `rabbitmqctl list_connections
    /// client_properties`). A TLS setting that cannot be used is a permanent error.
    pub async fn connect(&self, name: &str) -> Result<(Connection, BrokerEndpoint), MessagingError> {
        let mut errors = Vec::new();
        for _ in 0..self.config.brokers.len() {
            let broker = self.next_broker();
            match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_to(&broker, name)).await {
                Ok(Ok(connection)) => {
                    info!(broker = %broker.address(), name, tls = self.config.tls.is_some(), "connected to RabbitMQ");
                    return Ok((connection, broker));
                }
                Ok(Err(e @ MessagingError::Tls(_))) => return Err(e),
                Ok(Err(e)) => {
                    warn!(broker = %broker.address(), error = %e, "cannot connect to RabbitMQ");
                    errors.push(format!("{}: {e}", broker.address()));
                }
                Err(_) => {
                    warn!(broker = %broker.address(), "RabbitMQ connection timed out");
                    errors.push(format!("{}: timed out", broker.address()));
                }
            }
        }
        Err(MessagingError::Amqp(format!("no broker reachable: {}", errors.join("; "))))
    }

    async fn connect_to(&self, broker: &BrokerEndpoint, name: &str) -> Result<Connection, MessagingError> {
        let tls = self.config.tls.as_ref().map(tls::client_config).transpose()?;
        if self.config.tls.as_ref().is_some_and(|t| t.ca_file.is_none()) {
            warn!(
                broker = %broker.address(),
                "TLS without [oslo_messaging_rabbit] ssl_ca_file: the broker's certificate chain is checked against the \
                 system's CAs, not its name (as oslo.messaging does); set ssl_ca_file to check the name too"
            );
        }
        let uri = AMQPUri {
            scheme: if tls.is_some() { AMQPScheme::AMQPS } else { AMQPScheme::AMQP },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo { username: broker.username.clone(), password: broker.password.clone() },
                host: broker.host.clone(),
                port: broker.port,
            },
            vhost: broker.vhost.clone(),
            query: AMQPQueryString {
                frame_max: Some(FRAME_MAX),
                heartbeat: Some(self.config.heartbeat.map_or(0, |h| h.as_secs() as u16)),
                auth_mechanism: Some(match self.config.login_method {
                    LoginMethod::AmqPlain => SASLMechanism::AMQPlain,
                    LoginMethod::Plain => SASLMechanism::Plain,
                    LoginMethod::External => SASLMechanism::External,
                    LoginMethod::RabbitCrDemo => SASLMechanism::RabbitCrDemo,
                }),
                ..Default::default()
            },
        };
        let (host, port, heartbeats) = (broker.host.clone(), broker.port, self.config.heartbeat.is_some());
        let runtime = tokio::runtime::Handle::current();
        // lapin's own signature: the handshake error is its type, boxed or not.
        #[allow(clippy::result_large_err)]
        let connect = move |_: &AMQPUri| -> HandshakeResult {
            if !heartbeats {
                // The timer is made inside the runtime: this thread is lapin's, not tokio's.
                let bounded =
                    async { tokio::time::timeout(CONNECT_TIMEOUT, heartbeatless::connect(&host, port, tls)).await };
                let stream = runtime
                    .block_on(bounded)
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out"))??;
                return Ok(TcpStream::try_from(stream)?);
            }
            // By host and port, not through a URL: an IPv6 address is no "domain" to the URL
            // parser lapin uses (it would connect to localhost).
            let stream = TcpStream::connect_timeout((host.as_str(), port), CONNECT_TIMEOUT)?;
            match tls {
                Some(config) => stream.into_rustls(&RustlsConnector::from(config), &host),
                None => Ok(stream),
            }
        };
        let properties = ConnectionProperties::default().with_connection_name(name.to_string().into());
        Connection::connector(uri, Box::new(connect), properties).await.map_err(amqp)
    }

    /// The waits between rounds of [`Transport::connect`] that all failed.
    pub fn backoff(&self) -> Backoff {
        let r = &self.config.reconnect;
        Backoff { next: r.interval_start, step: r.interval_step, max: r.interval_max }
    }

    /// What is waited after an established connection was lost, before the first round
    /// (`Connection.ensure` `on_error`: `kombu_reconnect_delay`, plus a random splay).
    pub fn reconnect_delay(&self) -> Duration {
        let r = &self.config.reconnect;
        r.reconnect_delay + r.reconnect_splay.mul_f64(rand::thread_rng().gen::<f64>())
    }
}

/// kombu's `retry_over_time` intervals: `fxrange(start, max + start, step)` clamped to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    step: Duration,
    max: Duration,
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next.min(self.max);
        self.next = wait + self.step;
        Some(wait)
    }
}

/// A body with the properties oslo's kombu producer gives what it publishes (JSON, utf-8,
/// persistent, priority 0, headers), compressed as `kombu_compression` says.
pub fn oslo_publication(body: &[u8], compression: Option<Compression>) -> (Vec<u8>, BasicProperties) {
    let mut headers = FieldTable::default();
    let body = match compression {
        Some(method) => compress(method, body, &mut headers),
        None => body.to_vec(),
    };
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(headers);
    (body, properties)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn transport(url: &str, strategy: &str) -> Transport {
        let text = format!(
            "[DEFAULT]\ntransport_url = {url}\n[oslo_messaging_rabbit]\nkombu_failover_strategy = {strategy}\n"
        );
        let config = Config::from_text(&text).unwrap();
        Transport::new(&config.messaging.transport)
    }

    #[test]
    fn round_robin_visits_every_broker_once_a_round_from_a_shuffled_start() {
        let t = transport("rabbit://u:p@a,u:p@b,u:p@c/", "round-robin");
        let first: Vec<String> = (0..3).map(|_| t.next_broker().host).collect();
        let mut seen = first.clone();
        seen.sort();
        assert_eq!(seen, ["a", "b", "c"]);
        let second: Vec<String> = (0..3).map(|_| t.next_broker().host).collect();
        assert_eq!(first, second, "the same order, round after round");
    }

    #[test]
    fn shuffle_draws_a_broker_at_random_each_time() {
        let t = transport("rabbit://u:p@a,u:p@b/", "shuffle");
        let drawn: std::collections::BTreeSet<String> = (0..64).map(|_| t.next_broker().host).collect();
        assert_eq!(drawn.len(), 2);
    }

    #[test]
    fn waits_grow_linearly_to_the_maximum_as_kombu_s() {
        let waits = |start, step, max| {
            Backoff { next: Duration::from_secs(start), step: Duration::from_secs(step), max: Duration::from_secs(max) }
                .take(6)
                .map(|d| d.as_secs())
                .collect::<Vec<_>>()
        };
        assert_eq!(waits(1, 2, 30), [1, 3, 5, 7, 9, 11]);
        assert_eq!(waits(1, 2, 4), [1, 3, 4, 4, 4, 4]);
        assert_eq!(waits(2, 0, 30), [2, 2, 2, 2, 2, 2]);
    }
}
