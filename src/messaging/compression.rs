//! Bodies compressed as kombu compresses them (`kombu/compression.py`): the body alone,
//! the method named by the `compression` header (`application/x-gzip`: zlib's format;
//! `application/x-bz2`). Every kombu consumer decompresses what carries the header
//! (`kombu.message.Message.decode`), whatever its own `kombu_compression`; publishers
//! compress when `kombu_compression` is set.

use std::borrow::Cow;
use std::io::Read;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use super::envelope::Rejection;
use crate::config::Compression;

/// The `compression` header kombu sets and reads.
const HEADER: &str = "compression";

/// The compression a delivery's headers name; Ok(None) for an uncompressed body.
fn named(properties: &BasicProperties) -> Result<Option<Compression>, Rejection> {
    let Some(value) = properties.headers().as_ref().and_then(|h| h.inner().get(HEADER)) else { return Ok(None) };
    let name = match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => return Err(Rejection::Compression(format!("{other:?}"))),
    };
    Compression::from_content_type(&name).map(Some).ok_or(Rejection::Compression(name))
}

/// The body as the sender serialised it: decompressed when the headers say so, at most
/// `limit` bytes of it (a small compressed body may hold gigabytes).
pub fn decompressed<'a>(
    properties: &BasicProperties,
    body: &'a [u8],
    limit: usize,
) -> Result<Cow<'a, [u8]>, Rejection> {
    let Some(method) = named(properties)? else { return Ok(Cow::Borrowed(body)) };
    let mut out = Vec::new();
    let read = match method {
        Compression::Zlib => flate2::read::ZlibDecoder::new(body).take(limit as u64 + 1).read_to_end(&mut out),
        Compression::Bzip2 => bzip2::read::BzDecoder::new(body).take(limit as u64 + 1).read_to_end(&mut out),
    };
    read.map_err(|e| Rejection::Syntax { format: method.content_type(), reason: e.to_string() })?;
    if out.len() > limit {
        return Err(Rejection::TooLarge { size: out.len(), limit });
    }
    Ok(Cow::Owned(out))
}

/// `body` compressed as `method`, and the header that says so added to `headers`.
pub fn compress(method: Compression, body: &[u8], headers: &mut FieldTable) -> Vec<u8> {
    use std::io::Write;
    let written = match method {
        Compression::Zlib => {
            let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(body).and_then(|()| encoder.finish())
        }
        Compression::Bzip2 => {
            let mut encoder = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
            encoder.write_all(body).and_then(|()| encoder.finish())
        }
    };
    headers.insert(HEADER.into(), AMQPValue::LongString(method.content_type().into()));
    written.expect("compressing into memory cannot fail")
}

/// The same method again, for a body novasnap changes and sends on (a dead letter).
pub fn method_of(properties: &BasicProperties) -> Option<Compression> {
    named(properties).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(HEADER.into(), AMQPValue::LongString(value.into()));
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn what_kombu_compresses_comes_back() {
        let body = br#"{"oslo.version": "2.0", "oslo.message": "{}"}"#.repeat(50);
        for method in [Compression::Zlib, Compression::Bzip2] {
            let mut headers = FieldTable::default();
            let packed = compress(method, &body, &mut headers);
            assert!(packed.len() < body.len());
            let properties = BasicProperties::default().with_headers(headers);
            assert_eq!(decompressed(&properties, &packed, 1 << 20).unwrap().as_ref(), &body[..]);
            assert_eq!(method_of(&properties), Some(method));
        }
    }

    #[test]
    fn python_s_zlib_bytes_are_read() {
        // zlib.compress(b'{"a": 1}') in CPython 3.11, what kombu sends for "gzip".
        let python = b"x\x9c\xabVJT\xb2R0\xac\x05\x00\t\xe5\x02)";
        let out = decompressed(&with_header("application/x-gzip"), python, 100).unwrap();
        assert_eq!(out.as_ref(), br#"{"a": 1}"#);
    }

    #[test]
    fn unknown_methods_and_bombs_are_refused() {
        assert_eq!(
            decompressed(&with_header("application/x-lzma"), b"x", 10),
            Err(Rejection::Compression("application/x-lzma".into()))
        );
        let mut headers = FieldTable::default();
        let bomb = compress(Compression::Zlib, &vec![b' '; 1 << 20], &mut headers);
        let properties = BasicProperties::default().with_headers(headers);
        assert!(matches!(decompressed(&properties, &bomb, 1000), Err(Rejection::TooLarge { .. })));
        assert_eq!(decompressed(&BasicProperties::default(), b"plain", 10).unwrap().as_ref(), b"plain");
    }
}
