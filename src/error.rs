//! One classification of faults, used by the single retry policy in [`crate::retry`].
//!
//! Every boundary (messaging, hypervisor, storage, image) has its own `thiserror` enum and
//! implements [`Classify`] exactly once, next to the enum, so "is this worth retrying?" is
//! answered where the error is understood and nowhere else.

/// Whether trying the same operation again may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Busy, timed out, connection lost, 5xx: retry with backoff.
    Transient,
    /// Wrong input, missing object, refused by policy: retrying cannot help.
    Permanent,
}

pub trait Classify {
    fn disposition(&self) -> Disposition;

    fn is_transient(&self) -> bool {
        self.disposition() == Disposition::Transient
    }
}
