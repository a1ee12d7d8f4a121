//! RPC calls to Nova's services, as oslo.messaging's RPC client makes them: the request on the
//! control exchange with the topic as routing key, `_msg_id` and `_reply_q` in the message,
//! `expiration` set to the timeout; the reply on a `reply_<hex>` queue of this process
//! (declared as oslo's `declare_direct_consumer` does), matched by `_msg_id`
//! (fixtures `rpc_call.echo.oslo.json`, `rpc_reply.*`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Map, Value};
use tokio::sync::{oneshot, Mutex};
use tracing::{debug, warn};

use super::topology::{consumer_arguments, Topology};
use super::transport::{oslo_publication, publish_confirmed, Published, Transport};
use super::{amqp, envelope, MessagingError};
use crate::config::Config;
use crate::error::{Classify, Disposition};

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("RPC {method} to {topic}: {source}")]
    Transport {
        method: String,
        topic: String,
        #[source]
        source: MessagingError,
    },
    #[error("RPC {method} to {topic}: no queue for the topic (is the service deployed?)")]
    NoServer { method: String, topic: String },
    #[error("RPC {method} to {topic}: no reply within {seconds}s")]
    Timeout { method: String, topic: String, seconds: u64 },
    /// The server raised: oslo's serialised failure (`class`, `module`, `message`).
    #[error("RPC {method}: {module}.{class}: {message}")]
    Remote { method: String, class: String, module: String, message: String },
}

impl Classify for RpcError {
    fn disposition(&self) -> Disposition {
        match self {
            // The server is away, restarting, or slow: it may answer next time.
            Self::Transport { .. } | Self::NoServer { .. } | Self::Timeout { .. } => Disposition::Transient,
            // What the server said; the caller knows which of its errors may pass.
            Self::Remote { .. } => Disposition::Permanent,
        }
    }
}

type Pending = Arc<SyncMutex<HashMap<String, oneshot::Sender<Value>>>>;

/// A connection, its confirming channel, and the reply queue consumed on it.
struct Link {
    connection: Connection,
    channel: Channel,
    reply_queue: String,
}

pub struct RpcClient {
    config: Config,
    transport: Transport,
    link: Mutex<Option<Link>>,
    pending: Pending,
}

impl RpcClient {
    /// Connects on the first call.
    pub fn new(config: &Config) -> Self {
        Self {
            config: config.clone(),
            transport: Transport::new(&config.messaging.transport),
            link: Mutex::default(),
            pending: Pending::default(),
        }
    }

    async fn open(&self) -> Result<Link, MessagingError> {
        let name = format!("novasnap-rpc:{}", self.config.host);
        let (connection, _) = self.transport.connect(&name).await?;
        let mut channel = connection.create_channel().await.map_err(amqp)?;
        channel.confirm_select(Default::default()).await.map_err(amqp)?;
        let reply_queue = format!("reply_{}", uuid::Uuid::new_v4().simple());
        let topology = Topology { config: &self.config.messaging, host: &self.config.host };
        topology.declare_reply_queue(&mut channel, &connection, &reply_queue).await?;
        // oslo's listening connections take `rabbit_qos_prefetch_count` (`_set_qos`).
        let q = &self.config.messaging.transport;
        if q.qos_prefetch_count > 0 {
            channel.basic_qos(q.qos_prefetch_count, BasicQosOptions::default()).await.map_err(amqp)?;
        }
        let mut replies = channel
            .basic_consume(&reply_queue, &reply_queue, BasicConsumeOptions::default(), consumer_arguments(&q.queues))
            .await
            .map_err(amqp)?;
        let pending = self.pending.clone();
        let limit = self.config.messaging.max_message_bytes;
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                let reply = match envelope::decode_delivery(&delivery.properties, &delivery.data, limit) {
                    Ok(reply) => reply,
                    Err(e) => {
                        warn!(reason = %e.reason(), "unreadable RPC reply; ignored");
                        continue;
                    }
                };
                let Some(id) = reply.get("_msg_id").and_then(Value::as_str) else { continue };
                // oslo ≥ 18 sends one reply with `ending`; older servers a result, then an ending.
                if reply.get("ending").and_then(Value::as_bool) == Some(false)
                    && reply.get("failure").is_none_or(Value::is_null)
                {
                    continue;
                }
                if let Some(waiter) = pending.lock().expect("pending calls lock").remove(id) {
                    let _ = waiter.send(Value::Object(reply));
                }
            }
            debug!("reply consumer ended");
        });
        Ok(Link { connection, channel, reply_queue })
    }

    /// Calls `method` on `topic` with keyword `args` at `version`, with the request
    /// `context` (`_context_*` keys without the prefix), waiting at most
    /// `[DEFAULT] rpc_response_timeout` for the reply's `result`.
    pub async fn call(
        &self,
        context: &Map<String, Value>,
        topic: &str,
        method: &str,
        args: Value,
        version: &str,
    ) -> Result<Value, RpcError> {
        let timeout = self.config.messaging.rpc_response_timeout;
        let transport = |source| RpcError::Transport { method: method.into(), topic: topic.into(), source };
        let (channel, reply_queue) = {
            let mut link = self.link.lock().await;
            let open =
                link.as_ref().is_some_and(|l| l.connection.status().connected() && l.channel.status().connected());
            if !open {
                *link = Some(self.open().await.map_err(transport)?);
            }
            let link = link.as_ref().expect("just opened");
            (link.channel.clone(), link.reply_queue.clone())
        };
        let msg_id = uuid::Uuid::new_v4().simple().to_string();
        let mut message = Map::new();
        message.insert("method".into(), method.into());
        message.insert("args".into(), args);
        message.insert("version".into(), version.into());
        message.insert("_msg_id".into(), msg_id.clone().into());
        message.insert("_reply_q".into(), reply_queue.into());
        message.insert("_timeout".into(), Value::Null);
        message.insert("_unique_id".into(), uuid::Uuid::new_v4().simple().to_string().into());
        for (key, value) in context {
            message.insert(format!("_context_{key}"), value.clone());
        }
        let body = json!({"oslo.version": "2.0", "oslo.message": Value::Object(message).to_string()}).to_string();
        let (body, properties) = oslo_publication(body.as_bytes(), self.config.messaging.transport.compression);
        let properties = properties.with_expiration(timeout.as_millis().to_string().into());
        let (waiter, reply) = oneshot::channel();
        self.pending.lock().expect("pending calls lock").insert(msg_id.clone(), waiter);
        let outcome = self.send_and_wait(&channel, topic, &body, properties, timeout, reply).await;
        self.pending.lock().expect("pending calls lock").remove(&msg_id);
        let reply = match outcome {
            Ok(reply) => reply,
            Err(Wait::Publish(e)) => {
                *self.link.lock().await = None;
                return Err(transport(e));
            }
            Err(Wait::Unroutable) => return Err(RpcError::NoServer { method: method.into(), topic: topic.into() }),
            Err(Wait::Timeout) => {
                return Err(RpcError::Timeout {
                    method: method.into(),
                    topic: topic.into(),
                    seconds: timeout.as_secs(),
                })
            }
            Err(Wait::LinkLost) => {
                *self.link.lock().await = None;
                return Err(transport(MessagingError::Amqp("connection lost while waiting for the reply".into())));
            }
        };
        match reply.get("failure") {
            None | Some(Value::Null) => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
            Some(failure) => Err(remote_error(method, failure)),
        }
    }

    async fn send_and_wait(
        &self,
        channel: &Channel,
        topic: &str,
        body: &[u8],
        properties: BasicProperties,
        timeout: Duration,
        reply: oneshot::Receiver<Value>,
    ) -> Result<Value, Wait> {
        let exchange = &self.config.messaging.control_exchange;
        let confirm = self.config.messaging.confirm_timeout;
        match publish_confirmed(channel, exchange, topic, true, body, properties, confirm).await {
            Ok(Published::Routed) => {}
            Ok(Published::Unroutable) => return Err(Wait::Unroutable),
            Err(e) => return Err(Wait::Publish(e)),
        }
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(Wait::LinkLost),
            Err(_) => Err(Wait::Timeout),
        }
    }
}

enum Wait {
    Publish(MessagingError),
    Unroutable,
    Timeout,
    LinkLost,
}

/// oslo's serialised failure (`_drivers/common.py` `serialize_remote_exception`): a JSON
/// string with the exception's class, module and message.
fn remote_error(method: &str, failure: &Value) -> RpcError {
    let parsed: Value = match failure {
        Value::String(text) => serde_json::from_str(text).unwrap_or_else(|_| json!({"message": text})),
        other => other.clone(),
    };
    let field = |k: &str| parsed.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    RpcError::Remote {
        method: method.into(),
        class: field("class"),
        module: field("module"),
        message: field("message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oslo_failures_name_class_module_and_message() {
        let fixture = crate::messaging::dispatcher::tests::fixture("rpc_reply.failure_no_such_method.oslo.json");
        let reply =
            envelope::decode(Some("application/json"), fixture["body_raw_utf8"].as_str().unwrap().as_bytes(), 1 << 20)
                .unwrap();
        match remote_error("no_such_method", &reply["failure"]) {
            RpcError::Remote { class, module, message, .. } => {
                assert_eq!(class, "NoSuchMethod");
                assert_eq!(module, "oslo_messaging.rpc.dispatcher");
                assert!(message.contains("no_such_method"));
            }
            other => panic!("{other:?}"),
        }
    }
}
