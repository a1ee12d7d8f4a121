//! The crate's only `unsafe` code: safe wrappers over the C libraries' calls that their
//! Rust crates do not cover. Every `unsafe` block states the invariant it relies on.
//!
//! - [`rados`]: librados (the cluster connection and its options, pools, the ledger's
//!   locks and omaps);
//! - [`rbd`]: librbd (images, snapshots, clones, flatten, reads, metadata);
//! - [`libvirt`]: the block-job and filesystem freeze/thaw calls `virt` 0.5 has no safe
//!   API for.
//!
//! All of them block: callers run them on the blocking pool. And one process-wide setting of
//! glibc's allocator, [`map_large_allocations_apart`].
#![allow(unsafe_code)]

use std::ffi::{c_int, CString};

pub mod libvirt;
pub mod rados;
pub mod rbd;

/// `errno` from a failed librados/librbd call (positive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// A negative return as the `Errno` it carries.
fn check(ret: c_int) -> Result<c_int, Errno> {
    if ret < 0 {
        Err(Errno(-ret))
    } else {
        Ok(ret)
    }
}

/// Has glibc's malloc serve every allocation of 128 KiB or more from a mapping of its own,
/// unmapped when freed, instead of its default, which after the first such free serves
/// allocations up to 32 MiB from its arenas and keeps what they held. librbd's flatten reads
/// and writes whole objects (4 MiB) with up to `rbd_concurrent_management_ops` of them in
/// flight: with the default, one 1 GiB direct snapshot took the worker's peak RSS from 66 to
/// 204–247 MiB, with this to 116–120 MiB (the bench's worker and guests, four runs each). The
/// cost: fresh pages for each object, some 10% of a lone 1 GiB flatten on the bench's
/// machine. Called once, first thing in `main`.
pub fn map_large_allocations_apart() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of glibc's allocator; it is called before any
    // other thread exists (no concurrent malloc or mallopt), and 128 KiB is glibc's own
    // default threshold, so no allocation changes in kind, only the dynamic raising stops.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn cstr(s: &str) -> Result<CString, Errno> {
    CString::new(s).map_err(|_| Errno(libc::EINVAL))
}
