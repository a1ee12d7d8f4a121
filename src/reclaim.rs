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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use crate::disposal::{OwnerImage, Remover};
use crate::image::{ImageError, ImageService};
use crate::pipeline::direct::{disk_snapshot_name, DISK_SNAPSHOT_PREFIX, OWNER_METADATA_KEY};
use crate::request::RequestContext;
use crate::storage::{BlockStorage, NotedWork, RbdImage, StorageError, WorkLedger};

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
    /// A snapshot of the instance holds its lease (on any replica): left alone this time.
    InFlight,
    Remove,
}

impl Finding {
    fn new(artefact: Artefact, action: Action, owner: &OwnerImage) -> Self {
        Self { artefact, image_id: owner.id, image_state: owner.state.clone(), action }
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
            Action::InFlight => "in use",
            Action::Remove => "remove",
        };
        write!(f, "{action:6} {what} (image {} is {})", self.image_id, self.image_state)
    }
}

pub struct Reclaimer {
    pub storage: Option<Arc<dyn BlockStorage>>,
    pub images: Arc<dyn ImageService>,
    /// The index of work that may have left artefacts, and the instance leases.
    pub ledger: Arc<dyn WorkLedger>,
    /// The pool of instance disks (`[libvirt] images_rbd_pool`).
    pub disk_pool: String,
    /// Glance's pools, where copies are made (`[novasnap] glance_pools`).
    pub glance_pools: Vec<String>,
    pub snapshots_directory: PathBuf,
}

/// Where reclamation looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The work the ledger notes: only the artefacts named after those images are looked
    /// at, so a pass opens no other disk (the periodic pass).
    Noted,
    /// Also every disk of the disk pool and every image of Glance's pools, for leftovers of
    /// work no ledger noted (made by novasnap before it kept the index).
    Everything,
}

/// One image's leftovers, as found.
struct Candidate {
    instance: Option<Uuid>,
    noted: bool,
    artefacts: Vec<Artefact>,
}

impl Reclaimer {
    /// Finds the leftovers in `scope` and, unless `dry_run`, removes those whose work is
    /// over. Each image's are looked at under its instance's lease, taken without waiting:
    /// while a snapshot of that instance runs (on any replica), they are left alone.
    pub async fn run(&self, dry_run: bool, scope: Scope) -> Result<Vec<Finding>, ReclaimError> {
        let mut candidates: BTreeMap<Uuid, Candidate> = BTreeMap::new();
        for work in self.ledger.noted_work().await? {
            let artefacts = self.artefacts_of(&work).await?;
            candidates.insert(work.image, Candidate { instance: Some(work.instance), noted: true, artefacts });
        }
        if scope == Scope::Everything {
            for (image_id, artefact) in self.scan().await? {
                let candidate = candidates.entry(image_id).or_insert_with(|| Candidate {
                    instance: None,
                    noted: false,
                    artefacts: Vec::new(),
                });
                if !candidate.artefacts.contains(&artefact) {
                    candidate.artefacts.push(artefact);
                }
            }
        }
        let mut findings = Vec::new();
        for (image_id, mut candidate) in candidates {
            // Copies before disk snapshots: a copy not yet flattened keeps its parent busy.
            candidate.artefacts.sort_by_key(|a| !matches!(a, Artefact::Copy(_)));
            findings.extend(self.settle(image_id, candidate, dry_run).await?);
        }
        Ok(findings)
    }

    /// Decides, and unless `dry_run` removes, one image's leftovers; forgets its note once
    /// nothing of novasnap's is left.
    async fn settle(&self, image_id: Uuid, candidate: Candidate, dry_run: bool) -> Result<Vec<Finding>, ReclaimError> {
        let owner = OwnerImage::look(self.images.as_ref(), &RequestContext::default(), image_id).await;
        let lease = match candidate.instance {
            Some(instance) => match self.ledger.lock_instance(instance, Instant::now()).await? {
                Some(lease) => Some(lease),
                None => {
                    let findings: Vec<Finding> = candidate
                        .artefacts
                        .into_iter()
                        .map(|artefact| Finding::new(artefact, Action::InFlight, &owner))
                        .collect();
                    findings.iter().for_each(|f| info!(dry_run, "reclaim: {f}"));
                    return Ok(findings);
                }
            },
            None => None,
        };
        let mut findings = Vec::new();
        let mut left = false;
        for artefact in candidate.artefacts {
            let remove = match &artefact {
                Artefact::Copy(copy) => owner.copy_disposable(copy, Remover::Reclaimer),
                Artefact::DiskSnapshot { .. } | Artefact::TempDir(_) => owner.scratch_disposable(Remover::Reclaimer),
            };
            let finding = Finding::new(artefact, if remove { Action::Remove } else { Action::Keep }, &owner);
            info!(dry_run, "reclaim: {finding}");
            let glances = matches!(&finding.artefact, Artefact::Copy(copy) if owner.registers(copy));
            left |= !remove && !glances;
            if remove && !dry_run {
                let removed = match &lease {
                    Some(lease) => match lease.confirm().await {
                        Ok(()) => lease.in_flight().scope(self.remove(&finding.artefact)).await,
                        Err(e) => Err(e.into()),
                    },
                    None => self.remove(&finding.artefact).await,
                };
                if let Err(e) = removed {
                    warn!(error = %e, "reclaim: could not remove {finding}");
                    left = true;
                }
            }
            findings.push(finding);
        }
        if candidate.noted && !left && !dry_run {
            self.ledger.forget_work(image_id).await?;
        }
        Ok(findings)
    }

    /// The artefacts of one noted work that exist, looked up by their names.
    async fn artefacts_of(&self, work: &NotedWork) -> Result<Vec<Artefact>, ReclaimError> {
        let mut found = Vec::new();
        if let Some(storage) = &self.storage {
            let snapshot = disk_snapshot_name(work.image);
            if let Some(disk) = &work.disk {
                let snaps = match storage.list_snapshots(disk).await {
                    Ok(snaps) => snaps,
                    Err(StorageError::NotFound(_)) => Vec::new(),
                    Err(e) => return Err(e.into()),
                };
                if snaps.iter().any(|s| s.name == snapshot) {
                    found.push(Artefact::DiskSnapshot { disk: disk.clone(), snapshot });
                }
            }
            for pool in &self.glance_pools {
                let copy = RbdImage::new(pool.clone(), work.image.to_string());
                if let Some(owner) = self.owner_of_copy(storage.as_ref(), &copy).await? {
                    if owner == work.image {
                        found.push(Artefact::Copy(copy));
                    }
                }
            }
        }
        let dir = self.snapshots_directory.join(disk_snapshot_name(work.image));
        if tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) {
            found.push(Artefact::TempDir(dir));
        }
        Ok(found)
    }

    /// The image a copy was made for, from its `novasnap.image_id` metadata: None for an
    /// image that is not novasnap's copy, or is gone.
    async fn owner_of_copy(&self, storage: &dyn BlockStorage, copy: &RbdImage) -> Result<Option<Uuid>, ReclaimError> {
        match storage.metadata(copy, OWNER_METADATA_KEY).await {
            Ok(owner) => Ok(owner.and_then(|o| Uuid::parse_str(&o).ok())),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every artefact of novasnap's in the pools and the snapshots directory, by the image
    /// it was made for: opens every disk and every image of Glance's pools.
    async fn scan(&self) -> Result<Vec<(Uuid, Artefact)>, ReclaimError> {
        let mut found = Vec::new();
        if let Some(storage) = &self.storage {
            for disk in storage.list_images(&self.disk_pool).await? {
                let disk = RbdImage::new(self.disk_pool.clone(), disk);
                for snap in storage.list_snapshots(&disk).await? {
                    let Some(image_id) = owner_of_name(&snap.name) else { continue };
                    found.push((image_id, Artefact::DiskSnapshot { disk: disk.clone(), snapshot: snap.name }));
                }
            }
            for pool in &self.glance_pools {
                for name in storage.list_images(pool).await? {
                    let copy = RbdImage::new(pool.clone(), name);
                    if let Some(image_id) = self.owner_of_copy(storage.as_ref(), &copy).await? {
                        found.push((image_id, Artefact::Copy(copy)));
                    }
                }
            }
        }
        for (dir, image_id) in temp_dirs(&self.snapshots_directory).await? {
            found.push((image_id, Artefact::TempDir(dir)));
        }
        Ok(found)
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
