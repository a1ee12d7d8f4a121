//! `LibvirtHypervisor` against the real libvirtd, on throwaway guests of its own (never the
//! stack's demo guests): lookup and disk parsing, power states, idempotent suspend/resume,
//! stale block jobs, and the live shallow block copy of a qcow2 disk.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use novasnap::config::LibvirtConfig;
use novasnap::hypervisor::libvirt::LibvirtHypervisor;
use novasnap::hypervisor::{DiskSource, Hypervisor, HypervisorError, PowerState};
use novasnap::storage::files;
use tokio::process::Command;
use uuid::Uuid;

struct ThrowawayGuest {
    uuid: Uuid,
    name: String,
    disk: PathBuf,
    base: PathBuf,
    _dir: tempfile::TempDir,
}

impl ThrowawayGuest {
    /// A running domain on a qcow2 overlay (with data of its own) over a raw base.
    async fn start() -> Self {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (base, disk) = (dir.path().join("base.raw"), dir.path().join("disk.qcow2"));
        std::fs::write(&base, (0..8u32 << 20).map(|i| (i % 253) as u8).collect::<Vec<u8>>()).unwrap();
        let ok = |s: std::process::ExitStatus| assert!(s.success());
        ok(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&disk)
            .status()
            .await
            .unwrap());
        ok(Command::new("qemu-io").args(["-c", "write -P 0x5a 1M 2M"]).arg(&disk).output().await.unwrap().status);
        let (uuid, name) = (Uuid::new_v4(), unique("novasnap-test"));
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>32</memory>\
             <os><type arch='x86_64'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
             <target dev='vda' bus='virtio'/></disk></devices></domain>",
            disk.display()
        );
        let xml_file = dir.path().join("domain.xml");
        std::fs::write(&xml_file, xml).unwrap();
        virsh(&["define", xml_file.to_str().unwrap()]).await;
        virsh(&["start", &name]).await;
        Self { uuid, name, disk, base, _dir: dir }
    }
}

impl Drop for ThrowawayGuest {
    fn drop(&mut self) {
        for args in [vec!["destroy", &self.name], vec!["undefine", "--managed-save", &self.name]] {
            let _ = std::process::Command::new("virsh").args(["-c", "qemu:///system"]).args(args).output();
        }
    }
}

async fn hypervisor() -> LibvirtHypervisor {
    let config = LibvirtConfig {
        connection_uri: "qemu:///system".into(),
        images_type: "default".into(),
        snapshot_image_format: None,
        snapshots_directory: "/var/tmp".into(),
        disable_live_snapshot: false,
        ephemeral_encryption: false,
        block_copy_timeout: Duration::from_secs(120),
    };
    LibvirtHypervisor::connect(&config).await.expect("libvirtd reachable")
}

async fn raw_sha256(path: &Path, format: &str) -> String {
    let out = tempfile::NamedTempFile::new().unwrap();
    files::convert(path, format, out.path(), "raw").await.unwrap();
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(out.path()).unwrap()))
}

#[tokio::test]
async fn finds_guests_and_their_root_disk() {
    let hv = hypervisor().await;
    let guest = ThrowawayGuest::start().await;
    let found = hv.find_guest(guest.uuid, None).await.unwrap();
    assert_eq!(found.domain_name, guest.name);
    assert_eq!(found.power_state, PowerState::Running);
    assert_eq!(found.root_disk.source, DiskSource::File(guest.disk.clone()));
    assert_eq!((found.root_disk.format.as_str(), found.root_disk.target.as_str()), ("qcow2", "vda"));
    let missing = Uuid::new_v4();
    assert!(matches!(hv.find_guest(missing, None).await, Err(HypervisorError::GuestNotFound(u)) if u == missing));
}

#[tokio::test]
async fn suspend_and_resume_are_idempotent_and_keep_paused_guests_paused() {
    let hv = hypervisor().await;
    let guest = ThrowawayGuest::start().await;
    for _ in 0..2 {
        hv.suspend(guest.uuid).await.unwrap();
    }
    assert_eq!(hv.power_state(guest.uuid).await.unwrap(), PowerState::Suspended);
    assert_eq!(domain_state(&guest.name).await, "shut off");
    for _ in 0..2 {
        hv.resume(guest.uuid, false).await.unwrap();
    }
    assert_eq!(hv.power_state(guest.uuid).await.unwrap(), PowerState::Running);

    hv.suspend(guest.uuid).await.unwrap();
    hv.resume(guest.uuid, true).await.unwrap();
    assert_eq!(hv.power_state(guest.uuid).await.unwrap(), PowerState::Paused);
    hv.resume(guest.uuid, true).await.unwrap();
    assert_eq!(domain_state(&guest.name).await, "paused");
}

#[tokio::test]
async fn live_copy_onto_a_delta_ended_by_an_abort_carries_the_disk_and_leaves_no_job() {
    let hv = hypervisor().await;
    let guest = ThrowawayGuest::start().await;
    hv.abort_block_job(guest.uuid, "vda").await.unwrap(); // no job: fine
    let expected = raw_sha256(&guest.disk, "qcow2").await;

    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let delta = dir.path().join("delta.qcow2");
    let info = files::image_info(&guest.disk).await.unwrap();
    assert_eq!(info.backing_file.as_deref(), Some(guest.base.as_path()));
    files::create_delta(&delta, info.backing_file.as_deref(), info.backing_format.as_deref(), info.virtual_size)
        .await
        .unwrap();
    let last = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let seen = last.clone();
    hv.live_copy(guest.uuid, "vda", &delta, Arc::new(move |p| seen.store(p, std::sync::atomic::Ordering::Relaxed)))
        .await
        .unwrap();
    assert_eq!(last.load(std::sync::atomic::Ordering::Relaxed), 100);
    // In sync and still mirroring: ending the job is the copy's point in time.
    hv.abort_block_job(guest.uuid, "vda").await.unwrap();
    assert_eq!(raw_sha256(&delta, "qcow2").await, expected, "the delta over the base holds the disk's contents");
    assert_eq!(hv.power_state(guest.uuid).await.unwrap(), PowerState::Running);
    let found = hv.find_guest(guest.uuid, None).await.unwrap();
    assert_eq!(found.root_disk.source, DiskSource::File(guest.disk.clone()), "the guest stays on its own disk");
    let jobs = virsh(&["blockjob", &guest.name, "vda", "--info"]).await;
    assert!(jobs.contains("No current block job"), "{jobs}");
    let persistent = virsh(&["dominfo", &guest.name]).await;
    assert!(persistent.lines().any(|l| l.starts_with("Persistent:") && l.ends_with("yes")), "{persistent}");
}

/// A process paused (SIGSTOP) while this lives, resumed when it is dropped (also when the
/// test fails).
struct Paused(String);

impl Paused {
    async fn pause(pid: String) -> Self {
        assert!(Command::new("kill").args(["-STOP", &pid]).status().await.unwrap().success(), "kill -STOP {pid}");
        Self(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

fn pid_file(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_string()
}

/// One guest's QEMU stops answering its monitor (paused) in the middle of a managed save:
/// calls on every other guest go on at once, instead of queuing behind the hung one.
#[tokio::test]
async fn a_hung_qemu_monitor_holds_up_no_other_guests_calls() {
    let hv = hypervisor().await;
    let (stuck, other) = (ThrowawayGuest::start().await, ThrowawayGuest::start().await);
    let qemu = Paused::pause(pid_file(format!("/var/run/libvirt/qemu/{}.pid", stuck.name))).await;
    let hung = tokio::spawn({
        let (hv, uuid) = (hv.clone(), stuck.uuid);
        async move { hv.suspend(uuid).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!hung.is_finished(), "the managed save waits on the paused QEMU");

    let others = async {
        assert_eq!(hv.power_state(other.uuid).await.unwrap(), PowerState::Running);
        hv.suspend(other.uuid).await.unwrap();
        hv.resume(other.uuid, false).await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(30), others).await.expect("another guest's calls are not held up");
    drop(qemu);
    let _ = tokio::time::timeout(Duration::from_secs(60), hung).await;
}

/// libvirtd stops answering (paused) with a call in flight: keepalive closes the connection
/// and the call fails within a bound, instead of waiting for libvirtd for ever; once libvirtd
/// answers again, the next call reconnects.
#[tokio::test]
async fn a_call_to_a_libvirtd_that_stopped_answering_fails_within_a_bound() {
    let hv = hypervisor().await;
    let guest = ThrowawayGuest::start().await;
    assert_eq!(hv.power_state(guest.uuid).await.unwrap(), PowerState::Running);
    let started = std::time::Instant::now();
    let result = {
        let _libvirtd =
            Paused::pause(pid_file(Path::new(&env("NOVASNAP_STACK_STATE")).join("libvirt/libvirtd.pid"))).await;
        tokio::time::timeout(Duration::from_secs(90), hv.power_state(guest.uuid)).await
    };
    let err = result.expect("an error, not a hang").unwrap_err();
    assert!(matches!(err, HypervisorError::Connection(_) | HypervisorError::Libvirt { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    let back = wait_until(Duration::from_secs(60), || async { hv.power_state(guest.uuid).await.is_ok() }).await;
    assert!(back.is_some(), "the next call reconnects");
}
