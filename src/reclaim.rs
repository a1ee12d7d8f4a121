//! Reclamation: what dead work left behind, found and removed.
//!
//! Only artefacts novasnap names or marks as its own are considered: disk snapshots named
//! `novasnap-<image id>` in the instance pool, copies in Glance's pools carrying the
//! `novasnap.image_id` metadata, and `novasnap-<image id>` directories under
//! `snapshots_directory`. Each belongs to one Glance image, whose state decides, as
//! [`crate::disposal`] says once for all removals: while the image is `queued` or `saving`
//! its cast is still in the broker (novasnap acknowledges only at the end) and a redelivery
//! will need the artefact; an image with data keeps its copy; an image Glance cannot tell
//! about keeps everything; only an image whose work is over loses its copy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};
use uuid::Uuid;

use crate::disposal::{OwnerImage, Remover};
use crate::image::{ImageError, ImageService};
use crate::pipeline::direct::{DISK_SNAPSHOT_PREFIX, OWNER_METADATA_KEY};
use crate::request::RequestContext;
use crate::storage::{BlockStorage, RbdImage, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("listing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One leftover and what is done with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub artefact: Artefact,
    pub image_id: Uuid,
    /// The owning image's state, as found (`gone` when Glance does not know it, `unknown`
    /// when Glance did not answer).
    pub image_state: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Artefact {
    DiskSnapshot { disk: RbdImage, snapshot: String },
    Copy(RbdImage),
    TempDir(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The owning image may still need it, or Glance cannot tell: left alone.
    Keep,
    Remove,
}

impl Finding {
    fn new(artefact: Artefact, remove: bool, owner: OwnerImage) -> Self {
        let action = if remove { Action::Remove } else { Action::Keep };
        Self { artefact, image_id: owner.id, image_state: owner.state, action }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.artefact {
            Artefact::DiskSnapshot { disk, snapshot } => format!("disk snapshot {disk}@{snapshot}"),
            Artefact::Copy(image) => format!("copy {image}"),
            Artefact::TempDir(path) => format!("temporary directory {}", path.display()),
        };
        let action = match self.action {
            Action::Keep => "keep",
            Action::Remove => "remove",
        };
        write!(f, "{action:6} {what} (image {} is {})", self.image_id, self.image_state)
    }
}

pub struct Reclaimer {
    pub storage: Option<Arc<dyn BlockStorage>>,
    pub images: Arc<dyn ImageService>,
    /// The pool of instance disks (`[libvirt] images_rbd_pool`).
    pub disk_pool: String,
    /// Glance's pools, where copies are made (`[novasnap] glance_pools`).
    pub glance_pools: Vec<String>,
    pub snapshots_directory: PathBuf,
}

impl Reclaimer {
    /// Finds every leftover and, unless `dry_run`, removes those whose work is over.
    pub async fn run(&self, dry_run: bool) -> Result<Vec<Finding>, ReclaimError> {
        let mut findings = Vec::new();
        let ctx = RequestContext::default();
        let images = self.images.as_ref();
        let scratch =
            |artefact, owner: OwnerImage| Finding::new(artefact, owner.scratch_disposable(Remover::Reclaimer), owner);
        if let Some(storage) = &self.storage {
            for disk in storage.list_images(&self.disk_pool).await? {
                let disk = RbdImage::new(self.disk_pool.clone(), disk);
                for snap in storage.list_snapshots(&disk).await? {
                    let Some(image_id) = owner_of_name(&snap.name) else { continue };
                    let owner = OwnerImage::look(images, &ctx, image_id).await;
                    findings.push(scratch(Artefact::DiskSnapshot { disk: disk.clone(), snapshot: snap.name }, owner));
                }
            }
            for pool in &self.glance_pools {
                for name in storage.list_images(pool).await? {
                    let copy = RbdImage::new(pool.clone(), name);
                    let owner = match storage.metadata(&copy, OWNER_METADATA_KEY).await {
                        Ok(owner) => owner,
                        // Removed by Glance between the listing and now.
                        Err(StorageError::NotFound(_)) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    let Some(image_id) = owner.and_then(|o| Uuid::parse_str(&o).ok()) else { continue };
                    let owner = OwnerImage::look(images, &ctx, image_id).await;
                    let remove = owner.copy_disposable(&copy, Remover::Reclaimer);
                    findings.push(Finding::new(Artefact::Copy(copy), remove, owner));
                }
            }
        }
        for (dir, image_id) in temp_dirs(&self.snapshots_directory).await? {
            findings.push(scratch(Artefact::TempDir(dir), OwnerImage::look(images, &ctx, image_id).await));
        }
        // Copies before disk snapshots: a copy not yet flattened keeps its parent
        // snapshot busy.
        findings.sort_by_key(|f| !matches!(f.artefact, Artefact::Copy(_)));
        for finding in &findings {
            info!(dry_run, "reclaim: {finding}");
            if !dry_run && finding.action == Action::Remove {
                if let Err(e) = self.remove(&finding.artefact).await {
                    warn!(error = %e, "reclaim: could not remove {finding}");
                }
            }
        }
        Ok(findings)
    }

    async fn remove(&self, artefact: &Artefact) -> Result<(), ReclaimError> {
        let storage = self.storage.as_deref();
        match (artefact, storage) {
            (Artefact::DiskSnapshot { disk, snapshot }, Some(storage)) => {
                Ok(storage.remove_snapshot(disk, snapshot).await?)
            }
            (Artefact::Copy(copy), Some(storage)) => Ok(storage.remove_image(copy).await?),
            (Artefact::TempDir(dir), _) => match tokio::fs::remove_dir_all(dir).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ReclaimError::Io { path: dir.clone(), source }),
            },
            (_, None) => Ok(()),
        }
    }
}

/// The image id in a `novasnap-<simple uuid>` name.
fn owner_of_name(name: &str) -> Option<Uuid> {
    let id = name.strip_prefix(DISK_SNAPSHOT_PREFIX)?;
    (id.len() == 32).then(|| Uuid::try_parse(id).ok()).flatten()
}

async fn temp_dirs(root: &Path) -> Result<Vec<(PathBuf, Uuid)>, ReclaimError> {
    let mut found = Vec::new();
    let mut entries = match tokio::fs::read_dir(root).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(source) => return Err(ReclaimError::Io { path: root.to_owned(), source }),
    };
    let io = |source| ReclaimError::Io { path: root.to_owned(), source };
    while let Some(entry) = entries.next_entry().await.map_err(io)? {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(owner_of_name) else {
            continue;
        };
        if entry.file_type().await.map_err(io)?.is_dir() {
            found.push((entry.path(), id));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_novasnap_names_are_recognised() {
        let id = Uuid::new_v4();
        assert_eq!(owner_of_name(&format!("novasnap-{}", id.simple())), Some(id));
        assert_eq!(owner_of_name(&format!("novasnap-{id}")), None, "hyphenated is not our form");
        assert_eq!(owner_of_name("snap"), None);
        assert_eq!(owner_of_name("novasnap-nothex0000000000000000000000000"), None);
    }

    #[tokio::test]
    async fn temp_dirs_are_found_by_name_and_others_ignored() {
        let root = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        std::fs::create_dir(root.path().join(format!("novasnap-{}", id.simple()))).unwrap();
        std::fs::create_dir(root.path().join("someone-elses")).unwrap();
        std::fs::write(root.path().join(format!("novasnap-{}", Uuid::new_v4().simple())), b"a file").unwrap();
        let found = temp_dirs(root.path()).await.unwrap();
        assert_eq!(found, vec![(root.path().join(format!("novasnap-{}", id.simple())), id)]);
    }
}
