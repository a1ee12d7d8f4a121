//! The driver layer's decoding: AMQP body → the oslo message (a JSON object), as
//! oslo.messaging's rabbit driver does it (kombu decode by content type, then
//! `_drivers/common.py` `deserialize_msg`).
//!
//! Accepted content types: `application/json` (what oslo sends) and, for the same
//! envelope in MessagePack, `application/msgpack`, `application/x-msgpack` and
//! `application/vnd.msgpack`. Anything else — no content type included, as oslo rejects
//! it — is refused with a [`Rejection`] naming why.

use lapin::types::ShortString;
use lapin::BasicProperties;
use serde_json::{Map, Value};

/// Why a message cannot be accepted; its text goes into the dead-letter headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("body of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("no content_type: oslo only accepts application/json")]
    NoContentType,
    #[error("unsupported content_type {0:?}")]
    ContentType(String),
    #[error("unsupported compression {0:?} (novasnap reads application/x-gzip and application/x-bz2)")]
    Compression(String),
    #[error("body is not valid {format}: {reason}")]
    Syntax { format: &'static str, reason: String },
    #[error("body is not an object")]
    NotAnObject,
    #[error("unsupported envelope version {0:?} (only 2.0 and the bare 1.0 form)")]
    EnvelopeVersion(String),
    #[error("oslo.message is not a JSON object string: {0}")]
    InnerMessage(String),
    #[error("no such method {0:?}: novasnap serves snapshot_instance and backup_instance")]
    NoSuchMethod(String),
    #[error("unsupported RPC version {requested} (namespace {namespace:?}); novasnap serves {supported}")]
    UnsupportedVersion { requested: String, namespace: Option<String>, supported: String },
    #[error("argument {name}: {reason}")]
    BadArgument { name: &'static str, reason: String },
    #[error("context: {0}")]
    BadContext(String),
}

/// Longest reason kept in logs and dead-letter headers: a cast may carry megabytes in the
/// field it is refused for, and RabbitMQ closes the connection over a header larger than its
/// frame size (131072 bytes by default).
pub const REASON_LIMIT: usize = 512;

impl Rejection {
    /// The reason as it may be logged and sent: control characters escaped (a version with a
    /// newline must not forge a log line), at most [`REASON_LIMIT`] bytes.
    pub fn reason(&self) -> String {
        let mut escaped = String::new();
        for c in self.to_string().chars() {
            if c.is_control() {
                escaped.extend(c.escape_default());
            } else {
                escaped.push(c);
            }
        }
        if escaped.len() <= REASON_LIMIT {
            return escaped;
        }
        let cut = (0..=REASON_LIMIT - 3).rev().find(|&i| escaped.is_char_boundary(i)).unwrap_or(0);
        format!("{}...", &escaped[..cut])
    }

    /// A short machine-readable class for the `x-novasnap-reason-class` header.
    pub fn class(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::NoContentType | Self::ContentType(_) => "content_type",
            Self::Compression(_) => "compression",
            Self::Syntax { .. } | Self::NotAnObject | Self::InnerMessage(_) => "malformed",
            Self::EnvelopeVersion(_) => "envelope_version",
            Self::NoSuchMethod(_) => "no_such_method",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::BadArgument { .. } | Self::BadContext(_) => "bad_argument",
        }
    }
}

const MSGPACK_TYPES: &[&str] = &["application/msgpack", "application/x-msgpack", "application/vnd.msgpack"];

/// Decodes a delivery: its body decompressed as kombu would (the `compression` header),
/// then by content type.
pub fn decode_delivery(
    properties: &BasicProperties,
    body: &[u8],
    limit: usize,
) -> Result<Map<String, Value>, Rejection> {
    let body = super::compression::decompressed(properties, body, limit)?;
    decode(properties.content_type().as_ref().map(ShortString::as_str), &body, limit)
}

/// Decodes an AMQP body into the oslo message object.
pub fn decode(content_type: Option<&str>, body: &[u8], limit: usize) -> Result<Map<String, Value>, Rejection> {
    if body.len() > limit {
        return Err(Rejection::TooLarge { size: body.len(), limit });
    }
    // Parameters such as `; charset=utf-8` do not change the format.
    let media = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let outer: Value = match media.as_deref() {
        None | Some("") => return Err(Rejection::NoContentType),
        Some("application/json") => {
            serde_json::from_slice(body).map_err(|e| Rejection::Syntax { format: "JSON", reason: e.to_string() })?
        }
        Some(m) if MSGPACK_TYPES.contains(&m) => rmp_serde::from_slice(body)
            .map_err(|e| Rejection::Syntax { format: "MessagePack", reason: e.to_string() })?,
        Some(other) => return Err(Rejection::ContentType(other.to_string())),
    };
    let Value::Object(outer) = outer else { return Err(Rejection::NotAnObject) };
    match outer.get("oslo.version") {
        // Message format 1.0: the message itself, no envelope.
        None => Ok(outer),
        Some(Value::String(v)) if v == "2.0" => {
            let inner = outer
                .get("oslo.message")
                .and_then(Value::as_str)
                .ok_or_else(|| Rejection::InnerMessage("missing".into()))?;
            match serde_json::from_str(inner) {
                Ok(Value::Object(message)) => Ok(message),
                Ok(_) => Err(Rejection::InnerMessage("not an object".into())),
                Err(e) => Err(Rejection::InnerMessage(e.to_string())),
            }
        }
        Some(other) => Err(Rejection::EnvelopeVersion(other.as_str().map_or_else(|| other.to_string(), String::from))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMIT: usize = 1 << 20;

    #[test]
    fn envelope_2_0_and_bare_1_0_decode_to_the_same_message() {
        let message = json!({"method": "snapshot_instance", "args": {}});
        let v2 = json!({"oslo.version": "2.0", "oslo.message": message.to_string()}).to_string();
        let v1 = message.to_string();
        let a = decode(Some("application/json"), v2.as_bytes(), LIMIT).unwrap();
        let b = decode(Some("application/json"), v1.as_bytes(), LIMIT).unwrap();
        assert_eq!(a, b);
        assert_eq!(a["method"], "snapshot_instance");
    }

    #[test]
    fn msgpack_bodies_carry_the_same_envelope() {
        let envelope = json!({"oslo.version": "2.0", "oslo.message": json!({"method": "m"}).to_string()});
        let body = rmp_serde::to_vec_named(&envelope).unwrap();
        for ct in MSGPACK_TYPES {
            assert_eq!(decode(Some(ct), &body, LIMIT).unwrap()["method"], "m");
        }
        assert!(matches!(
            decode(Some("application/msgpack"), b"\xc1", LIMIT),
            Err(Rejection::Syntax { format: "MessagePack", .. })
        ));
    }

    #[test]
    fn reasons_are_short_and_escaped() {
        let long = Rejection::NoSuchMethod("m".repeat(200_000));
        assert!(long.reason().len() <= REASON_LIMIT);
        let forged = Rejection::UnsupportedVersion {
            requested: "7.0\nERROR novasnap forged".into(),
            namespace: None,
            supported: "6.5".into(),
        };
        assert!(!forged.reason().contains('\n'), "{}", forged.reason());
        assert!(forged.reason().contains("\\n"));
    }

    #[test]
    fn each_bad_input_class_is_named() {
        let ok = br#"{"method": "x"}"#;
        assert_eq!(decode(None, ok, LIMIT), Err(Rejection::NoContentType));
        assert_eq!(decode(Some("text/plain"), ok, LIMIT), Err(Rejection::ContentType("text/plain".into())));
        assert!(matches!(decode(Some("application/json"), b"{nope", LIMIT), Err(Rejection::Syntax { .. })));
        assert_eq!(decode(Some("application/json"), b"[1,2]", LIMIT), Err(Rejection::NotAnObject));
        let v3 = json!({"oslo.version": "3.0", "oslo.message": "{}"}).to_string();
        assert_eq!(
            decode(Some("application/json"), v3.as_bytes(), LIMIT),
            Err(Rejection::EnvelopeVersion("3.0".into()))
        );
        let broken = json!({"oslo.version": "2.0", "oslo.message": "{not json"}).to_string();
        assert!(matches!(decode(Some("application/json"), broken.as_bytes(), LIMIT), Err(Rejection::InnerMessage(_))));
        assert_eq!(decode(Some("application/json"), ok, 4), Err(Rejection::TooLarge { size: ok.len(), limit: 4 }));
        assert!(decode(Some("application/json; charset=utf-8"), ok, LIMIT).is_ok());
    }
}
