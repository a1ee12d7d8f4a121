//! The qemu-img steps of the standard path, on files (and on RBD through qemu's rbd driver).
//!
//! qemu-img runs as a child process, so nothing here blocks the executor; its stderr is
//! kept for the error message.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::process::Command;

use super::{RbdImage, StorageError};

/// What `qemu-img info` says about a disk file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    // The absolute path; `backing-filename` may be relative to the image.
    #[serde(rename = "full-backing-filename")]
    pub backing_file: Option<PathBuf>,
    #[serde(rename = "backing-filename-format")]
    pub backing_format: Option<String>,
}

async fn qemu_img(operation: &'static str, args: &[&OsStr]) -> Result<Vec<u8>, StorageError> {
    let output = Command::new("qemu-img")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| StorageError::QemuImg { operation, message: format!("cannot run qemu-img: {e}") })?;
    if !output.status.success() {
        return Err(StorageError::QemuImg {
            operation,
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output.stdout)
}

/// `qemu-img info` of a disk file. `-U` because a running guest holds the write lock.
pub async fn image_info(path: &Path) -> Result<FileImageInfo, StorageError> {
    let out = qemu_img("info", &["info".as_ref(), "-U".as_ref(), "--output=json".as_ref(), path.as_os_str()]).await?;
    serde_json::from_slice(&out).map_err(|e| StorageError::QemuImg {
        operation: "info",
        message: format!("{}: unreadable output: {e}", path.display()),
    })
}

/// Creates an empty qcow2 delta of `size` bytes over `backing` (or standalone), the
/// target a shallow block copy writes into. Replaces any delta a dead try left.
pub async fn create_delta(
    path: &Path,
    backing: Option<&Path>,
    backing_format: Option<&str>,
    size: u64,
) -> Result<(), StorageError> {
    let size = size.to_string();
    let mut args: Vec<&OsStr> = vec!["create".as_ref(), "-f".as_ref(), "qcow2".as_ref()];
    if let Some(backing) = backing {
        args.extend(["-b".as_ref(), backing.as_os_str()]);
        args.extend([OsStr::new("-F"), OsStr::new(backing_format.unwrap_or("raw"))]);
    }
    args.extend([path.as_os_str(), size.as_ref()]);
    qemu_img("create", &args).await.map(drop)
}

/// Converts `source` (format `source_format`) into a complete, standalone `dest` of
/// `dest_format`, as Nova's `images.convert_image` does.
pub async fn convert(source: &Path, source_format: &str, dest: &Path, dest_format: &str) -> Result<(), StorageError> {
    qemu_img(
        "convert",
        &[
            "convert".as_ref(),
            "-U".as_ref(),
            "-f".as_ref(),
            source_format.as_ref(),
            "-O".as_ref(),
            dest_format.as_ref(),
            source.as_os_str(),
            dest.as_os_str(),
        ],
    )
    .await
    .map(drop)
}

/// How qemu names an RBD snapshot as a source: `rbd:pool/image@snap[:conf=…]`.
pub fn rbd_source(disk: &RbdImage, snap: &str, ceph_conf: Option<&Path>) -> String {
    match ceph_conf {
        Some(conf) => format!("rbd:{}/{}@{}:conf={}", disk.pool, disk.name, snap, conf.display()),
        None => format!("rbd:{}/{}@{}", disk.pool, disk.name, snap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_source_names_the_snapshot_and_conf() {
        let disk = RbdImage::new("vms", "abc_disk");
        assert_eq!(rbd_source(&disk, "s1", None), "rbd:vms/abc_disk@s1");
        assert_eq!(
            rbd_source(&disk, "s1", Some(Path::new("/etc/ceph/ceph.conf"))),
            "rbd:vms/abc_disk@s1:conf=/etc/ceph/ceph.conf"
        );
    }

    /// Real qemu-img: a delta over a backing file, converted, has the backing file's bytes.
    #[tokio::test]
    async fn delta_over_backing_converts_to_the_backing_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, &data).unwrap();
        let delta = dir.path().join("delta.qcow2");
        create_delta(&delta, Some(&base), Some("raw"), data.len() as u64).await.unwrap();
        let info = image_info(&delta).await.unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, data.len() as u64);
        assert_eq!(info.backing_file.as_deref(), Some(base.as_path()));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
        let out = dir.path().join("out.raw");
        convert(&delta, "qcow2", &out, "raw").await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }

    #[tokio::test]
    async fn a_missing_source_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = convert(&dir.path().join("nope"), "raw", &dir.path().join("out"), "raw").await.unwrap_err();
        assert!(matches!(err, StorageError::QemuImg { operation: "convert", .. }), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
