//! Keeping what novasnap refuses: the message, with why, in the dead-letter queue.
//!
//! The copy keeps the body and the properties as they came, with four headers of ours
//! (`x-novasnap-reason`, `-reason-class`, `-original-exchange`, `-original-routing-key`),
//! each short enough for any frame size; the Keystone token a cast carries is not kept. A
//! dead letter that cannot be stored is retried a bounded number of times; then the message
//! is rejected without requeue and logged with what it was, never sent round in a loop.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde_json::Value;
use tracing::{error, warn};

use super::compression;
use super::envelope::Rejection;
use super::transport::publish_confirmed;
use crate::config::MessagingConfig;

/// Tries at storing one dead letter before the message is dropped with a log line.
const ATTEMPTS: u32 = 3;

/// Stores `delivery` in the dead-letter queue with `rejection`, then acknowledges it.
pub async fn dead_letter(config: &MessagingConfig, channel: &Channel, delivery: &Delivery, rejection: &Rejection) {
    let reason = rejection.reason();
    warn!(
        exchange = %delivery.exchange, routing_key = %delivery.routing_key, reason = %reason,
        "refusing a cast; dead-lettered to {}", config.dead_letter_exchange
    );
    let properties = dead_letter_properties(delivery, rejection);
    let body = stored_body(&delivery.properties, &delivery.data, config.max_message_bytes);
    for attempt in 1..=ATTEMPTS {
        let stored = publish_confirmed(
            channel,
            &config.dead_letter_exchange,
            "",
            false,
            &body,
            properties.clone(),
            config.confirm_timeout,
        )
        .await;
        match stored {
            Ok(_) => {
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    warn!(error = %e, "dead letter stored, but the original could not be acknowledged");
                }
                return;
            }
            Err(e) => {
                warn!(attempt, error = %e, "dead letter not stored");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
        }
    }
    let head: String =
        String::from_utf8_lossy(&body[..body.len().min(256)]).chars().flat_map(char::escape_default).collect();
    error!(
        reason = %reason, size = body.len(), head = %head,
        "could not store the refused message in the dead-letter queue; dropping it"
    );
    let _ = delivery.acker.reject(BasicRejectOptions { requeue: false }).await;
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// The original properties with the reason headers added; the original headers stay.
fn dead_letter_properties(delivery: &Delivery, rejection: &Rejection) -> BasicProperties {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert("x-novasnap-reason".into(), text(&rejection.reason()));
    headers.insert("x-novasnap-reason-class".into(), text(rejection.class()));
    headers.insert("x-novasnap-original-exchange".into(), text(delivery.exchange.as_str()));
    headers.insert("x-novasnap-original-routing-key".into(), text(delivery.routing_key.as_str()));
    delivery.properties.clone().with_headers(headers).with_delivery_mode(2)
}

/// The body to keep: without the token, compressed again as it came (kombu's
/// `compression` header stays); kept as it came when it cannot be decompressed.
fn stored_body(properties: &BasicProperties, body: &[u8], limit: usize) -> Vec<u8> {
    let content_type = properties.content_type().as_ref().map(ShortString::as_str);
    match compression::method_of(properties) {
        None => without_token(content_type, body),
        Some(method) => match compression::decompressed(properties, body, limit) {
            Ok(plain) => {
                compression::compress(method, &without_token(content_type, &plain), &mut FieldTable::default())
            }
            Err(_) => body.to_vec(),
        },
    }
}

/// The body with any `_context_auth_token` nulled, in the format it came in; unchanged when
/// it is not an oslo message novasnap can read (then there is no token to find either).
pub fn without_token(content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let msgpack = content_type.is_some_and(|c| c.contains("msgpack"));
    let outer: Option<Value> =
        if msgpack { rmp_serde::from_slice(body).ok() } else { serde_json::from_slice(body).ok() };
    let Some(Value::Object(mut outer)) = outer else { return body.to_vec() };
    let mut changed = null_token(&mut outer);
    if let Some(Value::String(inner)) = outer.get("oslo.message") {
        if let Ok(Value::Object(mut message)) = serde_json::from_str::<Value>(inner) {
            if null_token(&mut message) {
                outer.insert("oslo.message".into(), Value::Object(message).to_string().into());
                changed = true;
            }
        }
    }
    if !changed {
        return body.to_vec();
    }
    let outer = Value::Object(outer);
    if msgpack {
        rmp_serde::to_vec_named(&outer).unwrap_or_else(|_| body.to_vec())
    } else {
        outer.to_string().into_bytes()
    }
}

fn null_token(message: &mut serde_json::Map<String, Value>) -> bool {
    match message.get_mut("_context_auth_token") {
        Some(token) if !token.is_null() => {
            *token = Value::Null;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_token_is_not_kept_in_either_format() {
        let message = json!({"method": "snapshot_instance", "_context_auth_token": "gAAAAsecret"});
        let envelope = json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
        let json_body = envelope.to_string();
        let cleaned = without_token(Some("application/json"), json_body.as_bytes());
        assert!(!String::from_utf8_lossy(&cleaned).contains("gAAAAsecret"));
        assert!(String::from_utf8_lossy(&cleaned).contains("snapshot_instance"));
        let packed = rmp_serde::to_vec_named(&envelope).unwrap();
        let cleaned = without_token(Some("application/msgpack"), &packed);
        assert!(!cleaned.windows(11).any(|w| w == b"gAAAAsecret"));
        let bare = json!({"_context_auth_token": "gAAAAsecret", "x": 1}).to_string();
        assert!(!String::from_utf8_lossy(&without_token(Some("application/json"), bare.as_bytes())).contains("secret"));
    }

    #[test]
    fn a_compressed_cast_is_kept_compressed_as_it_came_without_its_token() {
        let message = json!({"method": "snapshot_instance", "_context_auth_token": "gAAAAsecret"});
        let body = json!({"oslo.version": "2.0", "oslo.message": message.to_string()}).to_string();
        let mut headers = FieldTable::default();
        let packed = compression::compress(crate::config::Compression::Bzip2, body.as_bytes(), &mut headers);
        let properties = BasicProperties::default().with_content_type("application/json".into()).with_headers(headers);
        let stored = stored_body(&properties, &packed, 1 << 20);
        let plain = compression::decompressed(&properties, &stored, 1 << 20).unwrap();
        let text = String::from_utf8_lossy(&plain);
        assert!(text.contains("snapshot_instance") && !text.contains("gAAAAsecret"), "{text}");
    }

    #[test]
    fn what_has_no_token_is_kept_byte_for_byte() {
        for body in [
            &b"{not json"[..],
            b"[1,2]",
            br#"{"oslo.version": "2.0", "oslo.message": "{\"_context_auth_token\": null}"}"#,
        ] {
            assert_eq!(without_token(Some("application/json"), body), body);
        }
    }
}
