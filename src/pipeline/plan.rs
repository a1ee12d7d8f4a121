//! The decisions Nova's `snapshot()` makes before touching anything, as pure functions:
//! backend type, image format, live or cold, and the image metadata.

use serde_json::{json, Value};

use crate::hypervisor::{DiskSource, Guest, PowerState};
use crate::image::{Image, ImageProperties};
use crate::request::Instance;

/// Which storage backend holds the root disk, from its path as Nova's
/// `get_disk_type_from_path` decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Rbd,
    Lvm,
    File,
}

impl Backend {
    pub fn of(source: &DiskSource) -> Self {
        match source {
            DiskSource::Rbd { .. } => Self::Rbd,
            DiskSource::Block(_) => Self::Lvm,
            DiskSource::File(_) => Self::File,
        }
    }
}

/// The settings that decide a snapshot's shape (from [`crate::config`]).
#[derive(Debug, Clone, Default)]
pub struct PlanSettings {
    pub snapshot_image_format: Option<String>,
    pub disable_live_snapshot: bool,
    pub ephemeral_encryption: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotPlan {
    pub backend: Backend,
    /// The disk's on-disk format (`raw`, `qcow2`).
    pub source_format: String,
    /// The format the image is saved in; rbd and lvm disks are saved raw.
    pub image_format: String,
    /// Snapshot while the guest runs (no suspend).
    pub live: bool,
    /// The power state the guest must be returned to at the end.
    pub original_state: PowerState,
    /// The guest must be started again from its managed save at the end.
    pub resume_after: bool,
    /// An earlier try of this request left the guest in managed save.
    pub suspended_already: bool,
}

impl SnapshotPlan {
    pub fn new(guest: &Guest, instance: &Instance, settings: &PlanSettings) -> Self {
        let backend = Backend::of(&guest.root_disk.source);
        let source_format = guest.root_disk.format.clone();
        let source_type = match backend {
            Backend::Rbd => "rbd".to_string(),
            Backend::Lvm => "lvm".to_string(),
            Backend::File => source_format.clone(),
        };
        let image_format = match settings.snapshot_image_format.clone().unwrap_or(source_type).as_str() {
            "rbd" | "lvm" => "raw".to_string(),
            other => other.to_string(),
        };
        let original_state = original_power_state(guest.power_state, instance);
        let live = backend != Backend::Lvm
            && !settings.ephemeral_encryption
            && !settings.disable_live_snapshot
            && !matches!(guest.power_state, PowerState::Shutdown | PowerState::Suspended);
        let resume_after = !live && matches!(original_state, PowerState::Running | PowerState::Paused);
        let suspended_already = resume_after && guest.power_state == PowerState::Suspended;
        Self { backend, source_format, image_format, live, original_state, resume_after, suspended_already }
    }
}

/// The state the guest was in before this request touched it. A guest found in managed
/// save while Nova still records it active or paused was suspended by an earlier try of
/// this very request (a crash or redelivery): it must be resumed, not left saved.
fn original_power_state(current: PowerState, instance: &Instance) -> PowerState {
    match (current, instance.vm_state.as_deref()) {
        (PowerState::Suspended, Some("active")) => PowerState::Running,
        (PowerState::Suspended, Some("paused")) => PowerState::Paused,
        (state, _) => state,
    }
}

/// Image metadata as Nova's `_create_snapshot_metadata` builds it, plus the base image
/// properties nova-api copies from the instance's system_metadata (`image_*`).
pub fn snapshot_metadata(instance: &Instance, image: &Image, image_format: &str) -> ImageProperties {
    let mut props = ImageProperties::new();
    let disk_format =
        if base_property(instance, "disk_format").as_deref() == Some("ami") { "ami" } else { image_format };
    props.insert("disk_format".into(), json!(disk_format));
    let container_format = image
        .container_format
        .clone()
        .or_else(|| base_property(instance, "container_format"))
        .unwrap_or_else(|| "bare".into());
    props.insert("container_format".into(), json!(container_format));
    props.insert("image_location".into(), json!("snapshot"));
    props.insert("image_state".into(), json!("available"));
    if let Some(owner) = &instance.project_id {
        props.insert("owner_id".into(), json!(owner));
    }
    props.insert("instance_uuid".into(), json!(instance.uuid.to_string()));
    for (key, own) in [
        ("kernel_id", &instance.kernel_id),
        ("ramdisk_id", &instance.ramdisk_id),
        ("os_type", &instance.os_type),
        ("architecture", &instance.architecture),
    ] {
        let value = own.clone().filter(|v| !v.is_empty()).or_else(|| base_property(instance, key));
        if let Some(value) = value {
            props.insert(key.into(), Value::String(value));
        }
    }
    props
}

fn base_property(instance: &Instance, key: &str) -> Option<String> {
    instance.system_metadata.get(&format!("image_{key}")).filter(|v| !v.is_empty()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::RootDisk;
    use std::path::PathBuf;
    use uuid::Uuid;

    fn guest(source: DiskSource, format: &str, state: PowerState) -> Guest {
        Guest {
            uuid: Uuid::nil(),
            domain_name: "instance-00000001".into(),
            power_state: state,
            root_disk: RootDisk { source, format: format.into(), target: "vda".into() },
        }
    }

    fn rbd() -> DiskSource {
        DiskSource::Rbd { pool: "vms".into(), image: "x_disk".into() }
    }

    fn instance(vm_state: &str) -> Instance {
        Instance {
            uuid: Uuid::nil(),
            display_name: None,
            host: None,
            node: None,
            project_id: Some("p1".into()),
            user_id: None,
            image_ref: None,
            vm_state: Some(vm_state.into()),
            task_state: None,
            power_state: None,
            kernel_id: Some(String::new()),
            ramdisk_id: None,
            os_type: Some("linux".into()),
            architecture: None,
            system_metadata: [("image_architecture".to_string(), "x86_64".to_string())].into(),
            object_version: "2.8".into(),
            data: Default::default(),
        }
    }

    #[test]
    fn rbd_disks_are_saved_raw_and_snapshotted_live_when_running() {
        let p =
            SnapshotPlan::new(&guest(rbd(), "raw", PowerState::Running), &instance("active"), &PlanSettings::default());
        assert_eq!((p.backend, p.image_format.as_str(), p.live, p.resume_after), (Backend::Rbd, "raw", true, false));
    }

    #[test]
    fn file_disks_keep_their_format_unless_configured() {
        let g = guest(DiskSource::File(PathBuf::from("/d")), "qcow2", PowerState::Running);
        assert_eq!(SnapshotPlan::new(&g, &instance("active"), &PlanSettings::default()).image_format, "qcow2");
        let s = PlanSettings { snapshot_image_format: Some("raw".into()), ..Default::default() };
        assert_eq!(SnapshotPlan::new(&g, &instance("active"), &s).image_format, "raw");
    }

    #[test]
    fn lvm_encryption_workaround_and_shutdown_force_cold() {
        let i = instance("active");
        let lvm = guest(DiskSource::Block(PathBuf::from("/dev/vg/x")), "raw", PowerState::Running);
        let p = SnapshotPlan::new(&lvm, &i, &PlanSettings::default());
        assert!(!p.live && p.resume_after);
        assert_eq!(p.image_format, "raw");
        let g = guest(rbd(), "raw", PowerState::Paused);
        let p = SnapshotPlan::new(&g, &i, &PlanSettings { disable_live_snapshot: true, ..Default::default() });
        assert!(!p.live && p.resume_after && p.original_state == PowerState::Paused);
        let p = SnapshotPlan::new(&g, &i, &PlanSettings { ephemeral_encryption: true, ..Default::default() });
        assert!(!p.live);
        let p = SnapshotPlan::new(
            &guest(rbd(), "raw", PowerState::Shutdown),
            &instance("stopped"),
            &PlanSettings::default(),
        );
        assert!(!p.live && !p.resume_after);
    }

    #[test]
    fn a_guest_left_saved_by_an_earlier_try_is_resumed() {
        let g = guest(rbd(), "raw", PowerState::Suspended);
        let p = SnapshotPlan::new(&g, &instance("active"), &PlanSettings::default());
        assert_eq!(p.original_state, PowerState::Running);
        assert!(!p.live && p.resume_after && p.suspended_already);
        // A guest the user suspended through Nova stays suspended.
        let p = SnapshotPlan::new(&g, &instance("suspended"), &PlanSettings::default());
        assert!(!p.live && !p.resume_after);
    }

    #[test]
    fn metadata_follows_nova() {
        let image = Image::queued(Uuid::nil(), None);
        let m = snapshot_metadata(&instance("active"), &image, "raw");
        assert_eq!(m["disk_format"], "raw");
        assert_eq!(m["container_format"], "bare");
        assert_eq!(m["image_location"], "snapshot");
        assert_eq!(m["image_state"], "available");
        assert_eq!(m["owner_id"], "p1");
        assert_eq!(m["os_type"], "linux");
        assert_eq!(m["architecture"], "x86_64");
        assert!(!m.contains_key("kernel_id"), "empty kernel_id is not carried");
    }
}
