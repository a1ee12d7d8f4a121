//! The crate's only `unsafe` code: safe wrappers over the C libraries' calls that their
//! Rust crates do not cover. Every `unsafe` block states the invariant it relies on.
//!
//! - [`rbd`]: librbd (images, snapshots, clones, flatten, reads, metadata);
//! - [`libvirt`]: the block-job calls `virt` 0.5 has no safe API for.
//!
//! All of them block: callers run them on the blocking pool.
#![allow(unsafe_code)]

pub mod libvirt;
pub mod rbd;
