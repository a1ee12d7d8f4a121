//! Which of novasnap's artefacts may be removed, decided once, here, from what Glance says of
//! the image each one was made for. A failing request's cleanup and reclamation both ask.
//!
//! | the image in Glance                              | fate       | a failing request removes | reclamation removes |
//! |--------------------------------------------------|------------|---------------------------|---------------------|
//! | gone (404), killed, deleted, pending_delete      | Over       | image, copy, scratch      | copy, scratch       |
//! | queued, saving                                   | Unfinished | image, copy, scratch      | nothing: resumable  |
//! | active, deactivated, importing, uploading, other | Keep       | scratch                   | scratch             |
//! | Glance did not answer                            | Unknown    | scratch                   | nothing             |
//!
//! *Scratch* is what Glance never holds: the disk snapshot `novasnap-<image id>` and the
//! temporary directory. The *copy* is `<glance pool>/<image id>`, and only one novasnap has
//! proven its own; once the image carries its `rbd://` location it is Glance's and is never
//! removed, whatever the image's state.

use uuid::Uuid;

use crate::image::{parse_rbd_url, ImageError, ImageService, ImageStatus};
use crate::request::RequestContext;
use crate::storage::RbdImage;

/// What an image's state means for the work done for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The work for it is over: nothing made for it is needed any more.
    Over,
    /// Not filled yet: the request filling it may be running, or be delivered again.
    Unfinished,
    /// It holds data, or is being given data by someone: keep what it may use.
    Keep,
    /// Glance could not be asked: nothing is removed on a guess.
    Unknown,
}

impl Fate {
    fn of(status: &ImageStatus) -> Self {
        match status {
            ImageStatus::Killed | ImageStatus::Deleted | ImageStatus::PendingDelete => Self::Over,
            ImageStatus::Queued | ImageStatus::Saving => Self::Unfinished,
            ImageStatus::Active
            | ImageStatus::Deactivated
            | ImageStatus::Importing
            | ImageStatus::Uploading
            | ImageStatus::Other(_) => Self::Keep,
        }
    }
}

/// Who asks whether something may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remover {
    /// The request that made it, failing now: its own unfinished image is its to discard.
    FailingRequest,
    /// Reclamation, for work that may be in flight elsewhere.
    Reclaimer,
}

/// The image an artefact was made for, as Glance showed it just now.
#[derive(Debug, Clone)]
pub struct OwnerImage {
    pub id: Uuid,
    pub fate: Fate,
    /// The state as found, for logs and reclamation's listing (`gone` when Glance has no
    /// such image, `unknown` when it did not answer).
    pub state: String,
    locations: Vec<String>,
}

impl OwnerImage {
    /// Asks Glance; any answer but the image or 404 is [`Fate::Unknown`].
    pub async fn look(images: &dyn ImageService, ctx: &RequestContext, id: Uuid) -> Self {
        match images.get(ctx, id).await {
            Ok(image) => Self {
                id,
                fate: Fate::of(&image.status),
                state: format!("{:?}", image.status).to_lowercase(),
                locations: image.locations,
            },
            Err(ImageError::NotFound(_)) => Self { id, fate: Fate::Over, state: "gone".into(), locations: vec![] },
            Err(e) => {
                tracing::warn!(image = %id, error = %e, "Glance cannot tell the image's state: nothing made for it is removed");
                Self { id, fate: Fate::Unknown, state: "unknown".into(), locations: vec![] }
            }
        }
    }

    /// The Glance image itself may be deleted.
    pub fn image_disposable(&self, by: Remover) -> bool {
        by == Remover::FailingRequest && matches!(self.fate, Fate::Over | Fate::Unfinished)
    }

    /// The copy in Glance's pool, proven novasnap's, may be removed.
    pub fn copy_disposable(&self, copy: &RbdImage, by: Remover) -> bool {
        let fate_allows = match by {
            Remover::FailingRequest => matches!(self.fate, Fate::Over | Fate::Unfinished),
            Remover::Reclaimer => self.fate == Fate::Over,
        };
        fate_allows && !self.registers(copy)
    }

    /// The disk snapshot and temporary files made for the image may be removed.
    pub fn scratch_disposable(&self, by: Remover) -> bool {
        match by {
            Remover::FailingRequest => true,
            Remover::Reclaimer => matches!(self.fate, Fate::Over | Fate::Keep),
        }
    }

    /// The image carries `copy` as one of its locations: the copy is Glance's.
    pub fn registers(&self, copy: &RbdImage) -> bool {
        self.locations
            .iter()
            .filter_map(|url| parse_rbd_url(url))
            .any(|(_, pool, name, _)| pool == copy.pool && name == copy.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(fate: Fate, locations: &[&str]) -> OwnerImage {
        OwnerImage {
            id: Uuid::nil(),
            fate,
            state: String::new(),
            locations: locations.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn every_state_has_one_fate() {
        use ImageStatus::*;
        for (status, fate) in [
            (Killed, Fate::Over),
            (Deleted, Fate::Over),
            (PendingDelete, Fate::Over),
            (Queued, Fate::Unfinished),
            (Saving, Fate::Unfinished),
            (Active, Fate::Keep),
            (Deactivated, Fate::Keep),
            (Importing, Fate::Keep),
            (Uploading, Fate::Keep),
            (Other("new_in_glance_40".into()), Fate::Keep),
        ] {
            assert_eq!(Fate::of(&status), fate, "{status:?}");
        }
    }

    #[test]
    fn unknown_removes_nothing_but_a_failing_requests_scratch() {
        let unknown = owner(Fate::Unknown, &[]);
        let copy = RbdImage::new("images", "x");
        for by in [Remover::FailingRequest, Remover::Reclaimer] {
            assert!(!unknown.image_disposable(by) && !unknown.copy_disposable(&copy, by));
        }
        assert!(unknown.scratch_disposable(Remover::FailingRequest));
        assert!(!unknown.scratch_disposable(Remover::Reclaimer));
    }

    #[test]
    fn a_registered_copy_is_never_disposable() {
        let copy = RbdImage::new("images", "9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b");
        let over = owner(Fate::Over, &["rbd://fsid/images/9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b/snap"]);
        assert!(!over.copy_disposable(&copy, Remover::Reclaimer));
        assert!(!over.copy_disposable(&copy, Remover::FailingRequest));
        assert!(owner(Fate::Over, &["rbd://fsid/images/other/snap"]).copy_disposable(&copy, Remover::Reclaimer));
    }

    #[test]
    fn unfinished_work_is_discarded_only_by_its_own_request() {
        let queued = owner(Fate::Unfinished, &[]);
        let copy = RbdImage::new("images", "x");
        assert!(
            queued.image_disposable(Remover::FailingRequest) && queued.copy_disposable(&copy, Remover::FailingRequest)
        );
        assert!(!queued.copy_disposable(&copy, Remover::Reclaimer) && !queued.scratch_disposable(Remover::Reclaimer));
        let active = owner(Fate::Keep, &[]);
        assert!(!active.image_disposable(Remover::FailingRequest));
        assert!(!active.copy_disposable(&copy, Remover::FailingRequest));
        assert!(active.scratch_disposable(Remover::Reclaimer));
    }
}
