//! novasnap takes over OpenStack Nova's instance snapshots.
//!
//! The crate is laid out by external system, as the file tree shows:
//! - [`messaging`]: oslo.messaging-compatible RPC consumer and notifier over RabbitMQ;
//! - [`hypervisor`]: the libvirt guest (lookup, power state, block jobs, suspend/resume);
//! - [`storage`]: Ceph RADOS/RBD (snapshots, clones, flatten, reads) and local files;
//! - [`image`]: the Glance image service;
//! - [`nova`]: Nova's record of the instance, kept through nova-conductor;
//! - [`pipeline`]: the snapshot itself, told top to bottom over the traits of the above.
//!
//! [`config`] holds every option in one place; [`error`] and [`retry`] hold the one
//! transient/permanent classification and the one retry policy.

#![deny(unsafe_code)]

pub mod app;
pub mod config;
pub mod disposal;
pub mod error;
mod ffi;
pub mod hypervisor;
pub mod identity;
pub mod image;
pub mod inflight;
pub mod logging;
pub mod messaging;
pub mod nova;
pub mod pipeline;
pub mod reclaim;
pub mod request;
pub mod retry;
pub mod storage;
pub mod worker;

pub use ffi::map_large_allocations_apart;
