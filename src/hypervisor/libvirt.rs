//! [`Hypervisor`] over libvirt (`virt` 0.5, plus `crate::ffi::libvirt` for block jobs and
//! the guest agent's filesystem freeze).
//!
//! One connection, shared by every call at once (libvirt connections are thread-safe):
//! the lock guards only getting and replacing it, so a call that hangs (a QEMU monitor that
//! does not answer) holds up no other guest's. Keepalive, run by libvirt's event loop on a
//! thread of its own, closes a connection whose libvirtd stopped answering, so calls on it
//! fail instead of waiting for ever. Reopened when libvirtd restarts; every call on the
//! blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::{Error, ErrorNumber};
use virt::sys;

use super::{DiskSource, Guest, Hypervisor, HypervisorError, PowerState, Progress, RootDisk};
use crate::config::LibvirtConfig;
use crate::ffi::libvirt as ffi;

/// How long an aborted block job may take to go away.
const ABORT_WAIT: Duration = Duration::from_secs(60);
/// How often block-job progress is polled.
const JOB_POLL: Duration = Duration::from_millis(200);
/// libvirt keepalive: a probe after this many seconds of silence from libvirtd, and the
/// connection closed after this many unanswered probes (15 s of a libvirtd that answers
/// nothing).
const KEEPALIVE_INTERVAL: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;
/// Bound on opening a connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct LibvirtHypervisor {
    inner: Arc<Inner>,
}

struct Inner {
    uri: String,
    connection: Mutex<Shared>,
    /// Bound on one live block copy.
    copy_timeout: Duration,
}

/// The connection every call shares, and how many have been opened: a call that found its
/// connection dead replaces only that one.
#[derive(Default)]
struct Shared {
    connection: Option<Connect>,
    generation: u64,
}

fn code(e: &Error) -> i32 {
    e.code().to_raw() as i32
}

/// Errors meaning the connection itself is gone (libvirtd restarted).
fn is_disconnect(e: &Error) -> bool {
    e.code().is_any(vec![ErrorNumber::NoConnect, ErrorNumber::SystemError, ErrorNumber::Rpc, ErrorNumber::InvalidConn])
}

/// libvirt's default event loop, registered once per process before the first connection
/// (keepalive needs one) and run on a thread of its own.
fn start_event_loop() -> Result<(), HypervisorError> {
    static STARTED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let started = STARTED.get_or_init(|| {
        virt::event::event_register_default_impl().map_err(|e| format!("registering libvirt's event loop: {e}"))?;
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::warn!(error = %e, "libvirt event loop iteration failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map(drop)
            .map_err(|e| format!("starting libvirt's event loop thread: {e}"))
    });
    started.clone().map_err(HypervisorError::Connection)
}

impl Inner {
    /// The shared connection and its generation, opened (with keepalive) if there is none.
    fn connection(&self) -> Result<(u64, Connect), HypervisorError> {
        let mut shared = self.connection.lock().expect("libvirt connection lock");
        if let Some(open) = shared.connection.as_ref() {
            return Ok((shared.generation, open.clone()));
        }
        let open = self.open()?;
        if let Err(e) = open.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
            tracing::warn!(uri = %self.uri, error = %e, "libvirt keepalive not enabled");
        }
        shared.generation += 1;
        shared.connection = Some(open.clone());
        Ok((shared.generation, open))
    }

    /// Opens a connection, waiting at most [`OPEN_TIMEOUT`]: keepalive does not cover the
    /// opening, and a libvirtd that accepts but never answers would hold it for ever. The
    /// opening thread is left to finish by itself then (its connection, if any, closed).
    fn open(&self) -> Result<Connect, HypervisorError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let uri = self.uri.clone();
        std::thread::Builder::new()
            .name("libvirt-open".into())
            .spawn(move || {
                let _ = tx.send(Connect::open(Some(&uri)));
            })
            .map_err(|e| HypervisorError::Connection(format!("{}: cannot start opening: {e}", self.uri)))?;
        match rx.recv_timeout(OPEN_TIMEOUT) {
            Ok(opened) => opened.map_err(|e| HypervisorError::Connection(format!("{}: {e}", self.uri))),
            Err(_) => Err(HypervisorError::Connection(format!("{}: no answer within {OPEN_TIMEOUT:?}", self.uri))),
        }
    }

    /// Forgets the dead connection of `generation`, unless another call has replaced it.
    fn replace(&self, generation: u64, dead: Connect) {
        let mut shared = self.connection.lock().expect("libvirt connection lock");
        if shared.generation == generation {
            // Closing a dead connection may fail (and virt panics then): the handles leak.
            if let Some(old) = shared.connection.take() {
                std::mem::forget(old);
            }
        }
        std::mem::forget(dead);
    }

    /// Runs `f` with the connection, opening it if needed and once more if libvirtd went
    /// away under it. The connection lock is not held while `f` runs.
    fn with_connection<T>(
        &self,
        uuid: Uuid,
        operation: &'static str,
        f: impl Fn(&Connect) -> Result<T, Error>,
    ) -> Result<T, HypervisorError> {
        for attempt in 0..2 {
            let (generation, connection) = self.connection()?;
            match f(&connection) {
                Ok(value) => return Ok(value),
                // A connection keepalive closed fails with errors of all kinds: ask it.
                Err(e) if attempt == 0 && (is_disconnect(&e) || !connection.is_alive().unwrap_or(false)) => {
                    tracing::warn!(uri = %self.uri, error = %e, "libvirt connection lost; reconnecting");
                    self.replace(generation, connection);
                }
                Err(e) => return Err(libvirt_error(operation, uuid, e)),
            }
        }
        Err(HypervisorError::Connection(format!("{}: connection lost twice", self.uri)))
    }

    fn domain(&self, conn: &Connect, uuid: Uuid) -> Result<Domain, Error> {
        conn.lookup_domain_by_uuid_string(&uuid.to_string())
    }
}

fn libvirt_error(operation: &'static str, uuid: Uuid, e: Error) -> HypervisorError {
    if e.code().is(ErrorNumber::NoDomain) {
        return HypervisorError::GuestNotFound(uuid);
    }
    HypervisorError::Libvirt { operation, uuid, code: code(&e), message: e.message().to_string() }
}

/// The root disk from a domain's XML: a `<disk device='disk'>` of `/domain/devices` — never
/// an element of `<metadata>`, where Nova's `<nova:flavor>` holds a `<nova:disk>` — whose
/// `<target dev>` is the instance's `root_device_name` when the cast carries one (`/dev/vda`
/// names `vda`), else the first, as Nova's root is its first disk.
pub fn root_disk_from_xml(uuid: Uuid, xml: &str, root_device: Option<&str>) -> Result<RootDisk, HypervisorError> {
    let no_disk = |reason: String| HypervisorError::NoRootDisk { uuid, reason };
    let doc = roxmltree::Document::parse(xml).map_err(|e| no_disk(format!("unreadable domain XML: {e}")))?;
    let devices = doc
        .root_element()
        .children()
        .find(|n| n.is_element() && n.tag_name().name() == "devices" && n.tag_name().namespace().is_none())
        .ok_or_else(|| no_disk("no <devices>".into()))?;
    let target_of = |disk: &roxmltree::Node| {
        disk.children().find(|n| n.has_tag_name("target")).and_then(|t| t.attribute("dev")).map(str::to_string)
    };
    let mut disks = devices.children().filter(|n| {
        n.is_element() && n.tag_name().name() == "disk" && n.attribute("device").unwrap_or("disk") == "disk"
    });
    let wanted = root_device.map(|d| d.trim_start_matches("/dev/"));
    let disk = match wanted {
        Some(dev) => disks.find(|d| target_of(d).as_deref() == Some(dev)).ok_or_else(|| {
            no_disk(format!("no <disk device='disk'> with <target dev='{dev}'> (the instance's root_device_name)"))
        })?,
        None => disks.next().ok_or_else(|| no_disk("no <disk device='disk'> in <devices>".into()))?,
    };
    let child = |tag: &str| disk.children().find(|n| n.has_tag_name(tag));
    let source = child("source").ok_or_else(|| no_disk("disk without <source>".into()))?;
    let target =
        child("target").and_then(|t| t.attribute("dev")).ok_or_else(|| no_disk("disk without <target dev>".into()))?;
    let format = child("driver").and_then(|d| d.attribute("type")).unwrap_or("raw").to_string();
    let source = match disk.attribute("type") {
        Some("network") if source.attribute("protocol") == Some("rbd") => {
            let name = source.attribute("name").ok_or_else(|| no_disk("rbd source without name".into()))?;
            let (pool, image) =
                name.split_once('/').ok_or_else(|| no_disk(format!("rbd source {name} is not pool/image")))?;
            DiskSource::Rbd { pool: pool.to_string(), image: image.to_string() }
        }
        Some("file") => {
            DiskSource::File(source.attribute("file").ok_or_else(|| no_disk("file source without file".into()))?.into())
        }
        Some("block") => {
            DiskSource::Block(source.attribute("dev").ok_or_else(|| no_disk("block source without dev".into()))?.into())
        }
        other => return Err(no_disk(format!("disk type {other:?} is not supported"))),
    };
    Ok(RootDisk { source, format, target: target.to_string() })
}

fn power_state(domain: &Domain) -> Result<PowerState, Error> {
    let (state, _) = domain.state()?;
    Ok(match state.known() {
        Some(DomainState::Running | DomainState::Blocked) => PowerState::Running,
        Some(DomainState::Paused) => PowerState::Paused,
        Some(DomainState::Shutdown) => PowerState::Shutdown,
        // A managed save is a suspend the pipeline (or Nova) must resume from.
        Some(DomainState::Shutoff) if domain.has_managed_save(0)? => PowerState::Suspended,
        Some(DomainState::Shutoff) => PowerState::Shutdown,
        Some(DomainState::Crashed) => PowerState::Crashed,
        Some(DomainState::PMSuspended) => PowerState::Suspended,
        Some(DomainState::NoState) | None => PowerState::NoState,
    })
}

impl LibvirtHypervisor {
    pub async fn connect(config: &LibvirtConfig) -> Result<Self, HypervisorError> {
        start_event_loop()?;
        let inner = Arc::new(Inner {
            uri: config.connection_uri.clone(),
            connection: Mutex::default(),
            copy_timeout: config.block_copy_timeout,
        });
        let probe = inner.clone();
        tokio::task::spawn_blocking(move || probe.with_connection(Uuid::nil(), "connect", |c| c.is_alive()))
            .await
            .map_err(|e| HypervisorError::Connection(e.to_string()))??;
        Ok(Self { inner })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        let inner = self.inner.clone();
        crate::inflight::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| HypervisorError::Connection(format!("blocking task failed: {e}")))?
    }
}

#[async_trait]
impl Hypervisor for LibvirtHypervisor {
    async fn find_guest(&self, uuid: Uuid, root_device: Option<&str>) -> Result<Guest, HypervisorError> {
        let (name, state, xml) = self
            .blocking(move |inner| {
                inner.with_connection(uuid, "find guest", |c| {
                    let domain = inner.domain(c, uuid)?;
                    Ok((domain.name()?, power_state(&domain)?, domain.xml_desc(0)?))
                })
            })
            .await?;
        Ok(Guest {
            uuid,
            domain_name: name,
            power_state: state,
            root_disk: root_disk_from_xml(uuid, &xml, root_device)?,
        })
    }

    async fn power_state(&self, uuid: Uuid) -> Result<PowerState, HypervisorError> {
        self.blocking(move |inner| inner.with_connection(uuid, "power state", |c| power_state(&inner.domain(c, uuid)?)))
            .await
    }

    async fn abort_block_job(&self, uuid: Uuid, disk: &str) -> Result<(), HypervisorError> {
        let disk = disk.to_string();
        self.blocking(move |inner| {
            let aborted = inner.with_connection(uuid, "abort block job", |c| {
                let domain = inner.domain(c, uuid)?;
                // A guest that is not running has no block job (and libvirt refuses to look).
                if !domain.is_active()? {
                    return Ok(false);
                }
                match ffi::block_job_info(&domain, &disk)? {
                    None => Ok(false),
                    Some(_) => match ffi::block_job_abort(&domain, &disk) {
                        Ok(()) => Ok(true),
                        // Ended between the look and the abort.
                        Err(e) if e.message().contains("no active block job") => Ok(false),
                        Err(e) => Err(e),
                    },
                }
            })?;
            if aborted {
                wait_for_no_job(inner, uuid, &disk, ABORT_WAIT)?;
                tracing::info!(%uuid, disk, "block job aborted");
            }
            Ok(())
        })
        .await
    }

    async fn suspend(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        self.blocking(move |inner| {
            inner.with_connection(uuid, "managed save", |c| {
                let domain = inner.domain(c, uuid)?;
                if domain.is_active()? {
                    domain.managed_save(0)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn resume(&self, uuid: Uuid, paused: bool) -> Result<(), HypervisorError> {
        self.blocking(move |inner| {
            inner.with_connection(uuid, "resume", |c| {
                let domain = inner.domain(c, uuid)?;
                if !domain.is_active()? {
                    let flags = if paused { sys::VIR_DOMAIN_START_PAUSED } else { 0 };
                    match domain.create_with_flags(flags) {
                        Ok(_) => return Ok(()),
                        // Started meanwhile by someone else (an operator, a script bringing
                        // guests up): bring it to the wanted state below.
                        Err(e) if e.code().is(ErrorNumber::OperationInvalid) && domain.is_active()? => {}
                        Err(e) => return Err(e),
                    }
                }
                match (power_state(&domain)?, paused) {
                    (PowerState::Running, true) => domain.suspend(),
                    (PowerState::Paused, false) => domain.resume(),
                    _ => Ok(()),
                }
            })
        })
        .await
    }

    async fn live_copy(&self, uuid: Uuid, disk: &str, dest: &Path, progress: Progress) -> Result<(), HypervisorError> {
        let (disk, dest) = (disk.to_string(), dest.to_string_lossy().into_owned());
        let stop = crate::inflight::stop_signal().unwrap_or_default();
        self.blocking(move |inner| {
            // A job left by an earlier try would make the copy fail: clear it first.
            inner.with_connection(uuid, "abort block job", |c| {
                let domain = inner.domain(c, uuid)?;
                if ffi::block_job_info(&domain, &disk)?.is_some() {
                    ffi::block_job_abort(&domain, &disk)?;
                }
                Ok(())
            })?;
            wait_for_no_job(inner, uuid, &disk, ABORT_WAIT)?;
            inner.with_connection(uuid, "block copy", |c| {
                ffi::block_copy_shallow(&inner.domain(c, uuid)?, &disk, &dest)
            })?;
            let start = Instant::now();
            loop {
                let job = inner
                    .with_connection(uuid, "block job info", |c| ffi::block_job_info(&inner.domain(c, uuid)?, &disk))?;
                match job {
                    Some((cur, end)) if end > 0 && cur == end => break,
                    Some((cur, end)) => progress((cur.saturating_mul(100) / end.max(1)).min(99) as u8),
                    None => {
                        return Err(HypervisorError::Libvirt {
                            operation: "block copy",
                            uuid,
                            code: 0,
                            message: format!("the copy job on {disk} ended before it was in sync"),
                        })
                    }
                }
                // Past its own bound, or its request stopped (deadline, lease lost).
                if start.elapsed() > inner.copy_timeout || stop.is_cancelled() {
                    let _ = inner.with_connection(uuid, "abort block job", |c| {
                        ffi::block_job_abort(&inner.domain(c, uuid)?, &disk)
                    });
                    let seconds = start.elapsed().as_secs();
                    return Err(HypervisorError::BlockJobTimeout { uuid, disk, seconds });
                }
                std::thread::sleep(JOB_POLL);
            }
            // In sync: the caller ends the job (without pivoting) at the copy's point in time.
            progress(100);
            Ok(())
        })
        .await
    }

    async fn freeze_filesystems(&self, uuid: Uuid) -> Result<u32, HypervisorError> {
        self.blocking(move |inner| {
            inner
                .with_connection(uuid, "freeze filesystems", |c| ffi::fs_freeze(&inner.domain(c, uuid)?))
                .map_err(agent_error)
        })
        .await
    }

    async fn thaw_filesystems(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        self.blocking(move |inner| {
            let thawed = inner
                .with_connection(uuid, "thaw filesystems", |c| {
                    let domain = inner.domain(c, uuid)?;
                    // A guest that is not running has nothing frozen (and no agent to ask).
                    if !domain.is_active()? {
                        return Ok(0);
                    }
                    ffi::fs_thaw(&domain)
                })
                .map_err(agent_error)?;
            // The pipeline logs the thaw with how long the guest was held.
            tracing::debug!(%uuid, filesystems = thawed, "thaw filesystems");
            Ok(())
        })
        .await
    }
}

/// A libvirt error of a guest agent call as what it says of the agent: not configured in
/// the domain (VIR_ERR_ARGUMENT_UNSUPPORTED), not connected (libvirt's
/// `qemuDomainAgentAvailable` refuses before sending anything while the guest end of the
/// channel is closed), or not answering or failing (the VIR_ERR_AGENT_* codes). Any other
/// (a libvirtd restarting, a guest gone) is unchanged.
fn agent_error(e: HypervisorError) -> HypervisorError {
    match e {
        HypervisorError::Libvirt { operation, uuid, code, message }
            if code == sys::VIR_ERR_ARGUMENT_UNSUPPORTED as i32 =>
        {
            HypervisorError::AgentNotConfigured { operation, uuid, message }
        }
        HypervisorError::Libvirt { operation, uuid, code, message }
            if code == sys::VIR_ERR_AGENT_UNRESPONSIVE as i32 && message.contains("agent is not connected") =>
        {
            HypervisorError::AgentNotConnected { operation, uuid, message }
        }
        HypervisorError::Libvirt { operation, uuid, code, message }
            if [
                sys::VIR_ERR_AGENT_UNRESPONSIVE,
                sys::VIR_ERR_AGENT_UNSYNCED,
                sys::VIR_ERR_AGENT_COMMAND_TIMEOUT,
                sys::VIR_ERR_AGENT_COMMAND_FAILED,
            ]
            .contains(&(code as sys::virErrorNumber)) =>
        {
            HypervisorError::Agent { operation, uuid, code, message }
        }
        other => other,
    }
}

fn wait_for_no_job(inner: &Inner, uuid: Uuid, disk: &str, limit: Duration) -> Result<(), HypervisorError> {
    let start = Instant::now();
    while inner
        .with_connection(uuid, "block job info", |c| ffi::block_job_info(&inner.domain(c, uuid)?, disk))?
        .is_some()
    {
        if start.elapsed() > limit {
            return Err(HypervisorError::BlockJobTimeout { uuid, disk: disk.to_string(), seconds: limit.as_secs() });
        }
        std::thread::sleep(JOB_POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Result<RootDisk, HypervisorError> {
        root_disk_from_xml(Uuid::nil(), xml, None)
    }

    #[test]
    fn rbd_file_and_block_roots_are_recognised() {
        let rbd = parse(
            "<domain><devices><disk type='network' device='disk'><driver name='qemu' type='raw'/>\
             <source protocol='rbd' name='vms/abc_disk'><host name='127.0.0.1' port='6789'/></source>\
             <target dev='vda' bus='virtio'/></disk></devices></domain>",
        )
        .unwrap();
        assert_eq!(rbd.source, DiskSource::Rbd { pool: "vms".into(), image: "abc_disk".into() });
        assert_eq!((rbd.format.as_str(), rbd.target.as_str()), ("raw", "vda"));

        let file = parse(
            "<domain><devices><disk type='file' device='cdrom'><source file='/x.iso'/><target dev='hdc'/></disk>\
             <disk type='file' device='disk'><driver type='qcow2'/><source file='/var/lib/d/disk'/><target dev='vda'/></disk>\
             </devices></domain>",
        )
        .unwrap();
        assert_eq!(file.source, DiskSource::File("/var/lib/d/disk".into()), "the cdrom is skipped");
        assert_eq!(file.format, "qcow2");

        let block = parse("<domain><devices><disk type='block'><source dev='/dev/vg/lv'/><target dev='sda'/></disk></devices></domain>").unwrap();
        assert_eq!(block.source, DiskSource::Block("/dev/vg/lv".into()));
    }

    /// What Nova's libvirt driver writes: `<nova:instance>` metadata before `<devices>`, its
    /// flavor with a `<nova:disk>` element, and (here) a config drive after the root disk.
    const NOVA_XML: &str = "<domain type='qemu'><name>instance-00000001</name>\
        <metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>\
        <nova:flavor name='tiny'><nova:memory>256</nova:memory><nova:disk>1</nova:disk><nova:swap>0</nova:swap></nova:flavor>\
        <nova:root type='image' uuid='x'/></nova:instance></metadata>\
        <devices><disk type='network' device='disk'><driver name='qemu' type='raw'/>\
        <source protocol='rbd' name='vms/abc_disk'/><target dev='vda' bus='virtio'/></disk>\
        <disk type='network' device='disk'><driver type='raw'/><source protocol='rbd' name='vms/abc_disk.config'/>\
        <target dev='vdb' bus='virtio'/></disk></devices></domain>";

    #[test]
    fn nova_metadata_is_never_taken_for_the_root_disk() {
        let root = parse(NOVA_XML).unwrap();
        assert_eq!(root.source, DiskSource::Rbd { pool: "vms".into(), image: "abc_disk".into() });
        let by_name = root_disk_from_xml(Uuid::nil(), NOVA_XML, Some("/dev/vdb")).unwrap();
        assert_eq!(by_name.source, DiskSource::Rbd { pool: "vms".into(), image: "abc_disk.config".into() });
        let err = root_disk_from_xml(Uuid::nil(), NOVA_XML, Some("/dev/sda")).unwrap_err().to_string();
        assert!(err.contains("root_device_name"), "{err}");
    }

    #[test]
    fn a_domain_without_a_usable_disk_is_a_clear_error() {
        assert!(parse("<domain><devices/></domain>").unwrap_err().to_string().contains("no <disk"));
        assert!(parse("<domain><devices><disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='vda'/></disk></devices></domain>")
            .unwrap_err()
            .to_string()
            .contains("not supported"));
        assert!(parse("not xml").is_err());
    }
}
