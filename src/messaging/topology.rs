//! What novasnap declares on the broker, and how: the queues and exchanges oslo.messaging's
//! rabbit driver declares for the same roles (`_drivers/impl_rabbit.py`
//! `declare_topic_consumer`, `declare_direct_consumer`, `topic_send`), so that novasnap and
//! Nova's own services can declare them in any order without a PRECONDITION_FAILED — plus
//! novasnap's own work and dead-letter queues.
//!
//! Only `compute.<host>` of nova-compute's queues is consumed; the `compute` topic queue and
//! the `compute_fanout` exchange are nova-compute's alone and never declared here.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use tracing::{error, warn};

use super::{amqp, MessagingError};
use crate::config::{MessagingConfig, QueueOptions};

/// The compute RPC topic nova-api casts snapshots to (`nova.compute.rpcapi.RPC_TOPIC`).
pub const COMPUTE_TOPIC: &str = "compute";
/// nova-compute's second RPC server, with the same endpoints (`RPC_TOPIC_ALT`, Nova ≥ 33):
/// where everything novasnap does not serve is forwarded.
pub const COMPUTE_ALT_TOPIC: &str = "compute-alt";

/// A queue as the broker reports it to a passive declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub messages: u32,
    pub consumers: u32,
}

pub struct Topology<'a> {
    pub config: &'a MessagingConfig,
    pub host: &'a str,
}

impl Topology<'_> {
    fn queues(&self) -> &QueueOptions {
        &self.config.transport.queues
    }

    /// `compute.<host>`: what nova-api's snapshot casts are routed to.
    pub fn server_queue(&self) -> String {
        format!("{COMPUTE_TOPIC}.{}", self.host)
    }

    /// `compute-alt.<host>`: nova-compute's second RPC server, the forwarding target.
    pub fn alt_server_queue(&self) -> String {
        format!("{COMPUTE_ALT_TOPIC}.{}", self.host)
    }

    /// novasnap's own queue of snapshot casts taken from `compute.<host>`: only novasnap
    /// replicas consume it, so a cast novasnap has taken is never handed to nova-compute,
    /// whatever happens to the replica working on it.
    pub fn work_queue(&self) -> String {
        format!("novasnap.snapshots.{}", self.host)
    }

    /// The control exchange as oslo's `topic_send` declares it.
    pub async fn declare_control_exchange(
        &self,
        channel: &mut Channel,
        connection: &Connection,
    ) -> Result<(), MessagingError> {
        let q = self.queues();
        let options = ExchangeDeclareOptions { durable: q.durable(), auto_delete: q.auto_delete, ..Default::default() };
        declare_exchange(channel, connection, &self.config.control_exchange, ExchangeKind::Topic, options).await
    }

    /// `compute.<host>` exactly as nova-compute's RPC server declares it
    /// (`declare_topic_consumer`), bound to the control exchange.
    pub async fn declare_server_queue(
        &self,
        channel: &mut Channel,
        connection: &Connection,
    ) -> Result<String, MessagingError> {
        self.declare_control_exchange(channel, connection).await?;
        let queue = self.server_queue();
        let q = self.queues();
        let options = QueueDeclareOptions { durable: q.durable(), auto_delete: q.auto_delete, ..Default::default() };
        declare_queue(channel, connection, &queue, options, queue_arguments(q, q.quorum, 0)).await?;
        channel
            .queue_bind(
                &queue,
                &self.config.control_exchange,
                &queue,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)?;
        Ok(queue)
    }

    /// The work queue: durable (it holds casts novasnap has acknowledged to the broker),
    /// quorum where the cloud uses quorum queues (without oslo's delivery limit: a cast
    /// redelivered after crashes must not be dropped), reached through the default exchange.
    pub async fn declare_work_queue(
        &self,
        channel: &mut Channel,
        connection: &Connection,
    ) -> Result<String, MessagingError> {
        let queue = self.work_queue();
        declare_queue(
            channel,
            connection,
            &queue,
            QueueDeclareOptions { durable: true, ..Default::default() },
            queue_type(self.queues().quorum),
        )
        .await?;
        Ok(queue)
    }

    /// The dead-letter exchange and its queue, bounded in length and age so hostile input
    /// cannot fill the broker.
    pub async fn declare_dead_letter(
        &self,
        channel: &mut Channel,
        connection: &Connection,
    ) -> Result<(), MessagingError> {
        let m = self.config;
        declare_exchange(
            channel,
            connection,
            &m.dead_letter_exchange,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
        )
        .await?;
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(m.dead_letter_max_length as i64));
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(m.dead_letter_ttl.as_millis() as i64));
        declare_queue(
            channel,
            connection,
            &m.dead_letter_queue,
            QueueDeclareOptions { durable: true, ..Default::default() },
            args,
        )
        .await?;
        channel
            .queue_bind(
                &m.dead_letter_queue,
                &m.dead_letter_exchange,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)
    }

    /// A reply queue for RPC calls, as oslo's `declare_direct_consumer` makes `reply_<hex>`:
    /// durable and quorum with `rabbit_transient_quorum_queue`, expiring after
    /// `rabbit_transient_queues_ttl` unused (none with 0).
    pub async fn declare_reply_queue(
        &self,
        channel: &mut Channel,
        connection: &Connection,
        name: &str,
    ) -> Result<(), MessagingError> {
        let q = self.queues();
        let args = queue_arguments(q, q.transient_quorum, q.transient_ttl_seconds);
        let options = QueueDeclareOptions { durable: q.transient_quorum, ..Default::default() };
        declare_queue(channel, connection, name, options, args).await
    }
}

/// oslo's `_get_queue_arguments(rabbit_ha_queues, ttl, quorum, quorum_config, False)`:
/// `x-ha-policy`, the quorum type with its limits, `x-expires` (seconds; 0 sets none).
/// Integers are typed as py-amqp writes Python ints (32-bit when they fit), so a peer's
/// declaration and novasnap's are equivalent to the broker.
pub fn queue_arguments(q: &QueueOptions, quorum: bool, ttl_seconds: i64) -> FieldTable {
    let mut args = FieldTable::default();
    if q.ha {
        args.insert("x-ha-policy".into(), AMQPValue::LongString("all".into()));
    }
    if quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        for (name, value) in [
            ("x-delivery-limit", q.quorum_delivery_limit),
            ("x-max-in-memory-length", q.quorum_max_memory_length),
            ("x-max-in-memory-bytes", q.quorum_max_memory_bytes),
        ] {
            if value != 0 {
                args.insert(name.into(), python_int(value));
            }
        }
    }
    if ttl_seconds > 0 {
        args.insert("x-expires".into(), python_int(ttl_seconds * 1000));
    }
    args
}

/// `x-queue-type: quorum` alone, or no argument.
fn queue_type(quorum: bool) -> FieldTable {
    let mut args = FieldTable::default();
    if quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    }
    args
}

/// A Python int as py-amqp encodes it in a field table: signed 32-bit when it fits.
fn python_int(value: i64) -> AMQPValue {
    match i32::try_from(value) {
        Ok(small) => AMQPValue::LongInt(small),
        Err(_) => AMQPValue::LongLongInt(value),
    }
}

/// Arguments of every `basic.consume` novasnap makes on the transport: oslo's consumers ask
/// for `x-cancel-on-ha-failover` with `enable_cancel_on_failover` (`Consumer.declare`).
pub fn consumer_arguments(q: &QueueOptions) -> FieldTable {
    let mut args = FieldTable::default();
    if q.cancel_on_failover {
        args.insert("x-cancel-on-ha-failover".into(), AMQPValue::Boolean(true));
    }
    args
}

/// The queue's state, or None when it does not exist. A passive declare of a missing queue
/// closes its channel, so it runs on a channel of its own.
pub async fn queue_state(connection: &Connection, name: &str) -> Result<Option<QueueState>, MessagingError> {
    let channel = connection.create_channel().await.map_err(amqp)?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match channel.queue_declare(name, passive, FieldTable::default()).await {
        Ok(queue) => {
            let _ = channel.close(200, "looked").await;
            Ok(Some(QueueState { messages: queue.message_count(), consumers: queue.consumer_count() }))
        }
        Err(e) if e.to_string().contains("NOT_FOUND") => Ok(None),
        Err(e) => Err(amqp(e)),
    }
}

/// Declares an exchange; one another peer declared with other flags (PRECONDITION_FAILED,
/// which closes the channel) is used as it is, and the mismatch logged.
async fn declare_exchange(
    channel: &mut Channel,
    connection: &Connection,
    name: &str,
    kind: ExchangeKind,
    options: ExchangeDeclareOptions,
) -> Result<(), MessagingError> {
    match channel.exchange_declare(name, kind.clone(), options, FieldTable::default()).await {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
            error!(exchange = name, error = %e, "exchange exists with other flags than configured; using it as it is");
            *channel = reopen(channel, connection).await?;
            let passive = ExchangeDeclareOptions { passive: true, ..options };
            channel.exchange_declare(name, kind, passive, FieldTable::default()).await.map_err(amqp)
        }
        Err(e) => Err(amqp(e)),
    }
}

/// Declares a queue. Another peer may have declared it with other flags
/// (PRECONDITION_FAILED, which closes the channel): as oslo does, a queue whose only
/// difference is `x-expires` is deleted and declared again; for any other difference the
/// existing queue is used as it is, and the mismatch logged.
async fn declare_queue(
    channel: &mut Channel,
    connection: &Connection,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> Result<(), MessagingError> {
    match channel.queue_declare(name, options, args.clone()).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
            *channel = reopen(channel, connection).await?;
            if e.to_string().contains("x-expires") {
                warn!(queue = name, error = %e, "queue declared with another x-expires; deleting and declaring it again, as oslo does");
                channel.queue_delete(name, Default::default()).await.map_err(amqp)?;
                channel.queue_declare(name, options, args).await.map_err(amqp)?;
            } else {
                error!(queue = name, error = %e, "queue exists with other flags than configured; using it as it is");
                let passive = QueueDeclareOptions { passive: true, ..options };
                channel.queue_declare(name, passive, FieldTable::default()).await.map_err(amqp)?;
            }
            Ok(())
        }
        Err(e) => Err(amqp(e)),
    }
}

/// A new channel with the old one's confirm mode, after the broker closed the old one.
async fn reopen(old: &Channel, connection: &Connection) -> Result<Channel, MessagingError> {
    let channel = connection.create_channel().await.map_err(amqp)?;
    if old.status().confirm() {
        channel.confirm_select(Default::default()).await.map_err(amqp)?;
    }
    Ok(channel)
}
