//! The crate's only `unsafe` code: safe wrappers over the C libraries' calls that their
//! Rust crates do not cover. Every `unsafe` block states the invariant it relies on.
//!
//! - [`rados`]: librados (the cluster connection and its options, pools, the ledger's
//!   locks and omaps);
//! - [`rbd`]: librbd (images, snapshots, clones, flatten, reads, metadata);
//! - [`libvirt`]: the block-job and filesystem freeze/thaw calls `virt` 0.5 has no safe
//!   API for.
//!
//! All of them block: callers run them on the blocking pool.
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

fn cstr(s: &str) -> Result<CString, Errno> {
    CString::new(s).map_err(|_| Errno(libc::EINVAL))
}
