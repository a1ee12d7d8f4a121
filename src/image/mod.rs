//! The image-service boundary: Glance v2 over HTTP.
//!
//! [`ImageService`] is the contract; `glance.rs` implements it with `reqwest`, through the
//! identity boundary's [`crate::identity::Adapter`] (endpoint, tokens).

pub mod glance;

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Classify, Disposition};
use crate::identity::IdentityError;
use crate::request::RequestContext;

/// Glance image status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageStatus {
    Queued,
    Saving,
    Uploading,
    Importing,
    Active,
    Killed,
    Deleted,
    PendingDelete,
    Deactivated,
    Other(String),
}

impl ImageStatus {
    pub fn parse(s: &str) -> Self {
        match s {
            "queued" => Self::Queued,
            "saving" => Self::Saving,
            "uploading" => Self::Uploading,
            "importing" => Self::Importing,
            "active" => Self::Active,
            "killed" => Self::Killed,
            "deleted" => Self::Deleted,
            "pending_delete" => Self::PendingDelete,
            "deactivated" => Self::Deactivated,
            other => Self::Other(other.to_string()),
        }
    }
}

/// `rbd://fsid/pool/image/snap` → (fsid, pool, image, snap).
pub fn parse_rbd_url(url: &str) -> Option<(String, String, String, String)> {
    let parts: Vec<&str> = url.strip_prefix("rbd://")?.split('/').collect();
    match parts.as_slice() {
        [fsid, pool, image, snap] if parts.iter().all(|p| !p.is_empty()) => {
            let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
            Some((decode(fsid), decode(pool), decode(image), decode(snap)))
        }
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub id: Uuid,
    pub name: Option<String>,
    pub status: ImageStatus,
    pub size: Option<u64>,
    pub checksum: Option<String>,
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    pub created_at: Option<String>,
    /// Location URLs, when Glance shows them (`show_multiple_locations`, or the first as
    /// `direct_url` with `show_image_direct_url`).
    pub locations: Vec<String>,
    /// Every other top-level field: base and custom properties.
    pub properties: BTreeMap<String, Value>,
}

#[cfg(test)]
impl Image {
    /// An image as nova-api leaves it for a snapshot: queued, no data, no formats.
    pub(crate) fn queued(id: Uuid, created_at: Option<&str>) -> Self {
        Self {
            id,
            name: Some("snap".into()),
            status: ImageStatus::Queued,
            size: None,
            checksum: None,
            disk_format: None,
            container_format: None,
            created_at: created_at.map(String::from),
            locations: vec![],
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0} not found in Glance")]
    NotFound(Uuid),
    /// Glance shows no such image to novasnap's own credentials, which lack the admin role:
    /// it may be another project's, alive. Not proof that it is gone.
    #[error("image {0} not visible to novasnap's own credentials (no admin role): it may exist in another project")]
    NotVisible(Uuid),
    #[error("Glance refuses to add a location to image {id}: {reason}")]
    LocationsRefused { id: Uuid, reason: String },
    #[error("Glance's location import task for image {id} failed: {message}")]
    LocationImportFailed { id: Uuid, message: String },
    #[error("Glance {operation} on {target}: HTTP {status}: {body}")]
    Http { operation: &'static str, target: String, status: u16, body: String },
    #[error("Glance {operation}: {message}")]
    Transport { operation: &'static str, message: String },
    #[error("upload to image {id}: source failed: {message}")]
    Source { id: Uuid, message: String },
    /// Keystone: credentials, tokens, the catalog.
    #[error("Glance: {0}")]
    Identity(#[from] IdentityError),
}

impl Classify for ImageError {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Http { status, .. } if *status >= 500 || *status == 429 || *status == 408 => Disposition::Transient,
            Self::Transport { .. } | Self::LocationImportFailed { .. } => Disposition::Transient,
            Self::Identity(e) => e.disposition(),
            _ => Disposition::Permanent,
        }
    }
}

/// A JSON-patch-free view of the properties to set: key → value (None removes).
pub type ImageProperties = BTreeMap<String, Value>;

#[async_trait]
pub trait ImageService: Send + Sync {
    async fn get(&self, ctx: &RequestContext, id: Uuid) -> Result<Image, ImageError>;

    /// Sets top-level fields (disk_format, container_format, custom properties).
    /// Setting what is already set succeeds.
    async fn update(&self, ctx: &RequestContext, id: Uuid, properties: &ImageProperties) -> Result<Image, ImageError>;

    /// Registers `url` as the image's location (locations API, else PATCH
    /// `add /locations/-`), which makes a queued image active. Succeeds if the image already
    /// has that location. `LocationsRefused` means Glance will not take locations at all.
    async fn add_location(&self, ctx: &RequestContext, id: Uuid, url: &str) -> Result<(), ImageError>;

    /// Streams the image's bytes into Glance (`PUT /v2/images/{id}/file`, chunked).
    async fn upload(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        data: BoxStream<'static, Result<Bytes, std::io::Error>>,
        size: Option<u64>,
    ) -> Result<(), ImageError>;

    /// Deletes the image; succeeds if it is gone.
    async fn delete(&self, ctx: &RequestContext, id: Uuid) -> Result<(), ImageError>;

    /// Images whose properties match all of `filters` (e.g. `instance_uuid`,
    /// `image_type=backup`, `backup_type`), newest first.
    async fn list(&self, ctx: &RequestContext, filters: &[(&str, &str)]) -> Result<Vec<Image>, ImageError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_urls_parse() {
        let (fsid, pool, image, snap) = parse_rbd_url("rbd://f-1/images/abc/snap").unwrap();
        assert_eq!((fsid.as_str(), pool.as_str(), image.as_str(), snap.as_str()), ("f-1", "images", "abc", "snap"));
        assert!(parse_rbd_url("rbd://f/images/abc").is_none());
        assert!(parse_rbd_url("rbd://f//abc/snap").is_none());
        assert!(parse_rbd_url("http://x/y/z/w").is_none());
    }
}
