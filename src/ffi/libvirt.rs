//! Block jobs through `virt::sys`: abort, progress, and the shallow block copy Nova's live
//! snapshot uses; the guest agent's filesystem freeze and thaw. `virt` 0.5 has no safe API
//! for these.

use std::ffi::CString;

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

fn disk_name(disk: &str) -> Result<CString, Error> {
    CString::new(disk).map_err(|_| Error::last_error())
}

/// Progress of the block job on `disk`: `Some((cur, end))`, or None when there is none.
pub fn block_job_info(domain: &Domain, disk: &str) -> Result<Option<(u64, u64)>, Error> {
    let disk = disk_name(disk)?;
    let mut info = sys::virDomainBlockJobInfo { type_: 0, bandwidth: 0, cur: 0, end: 0 };
    // SAFETY: the domain pointer is live for as long as `domain` is borrowed; `disk` is
    // NUL-terminated and outlives the call; `info` is a valid out-pointer.
    let ret = unsafe { sys::virDomainGetBlockJobInfo(domain.as_ptr(), disk.as_ptr(), &mut info, 0) };
    match ret {
        r if r < 0 => Err(Error::last_error()),
        0 => Ok(None),
        _ => Ok(Some((info.cur, info.end))),
    }
}

/// Aborts the block job on `disk` and waits for libvirt to end it (no pivot: the guest
/// stays on its original disk).
pub fn block_job_abort(domain: &Domain, disk: &str) -> Result<(), Error> {
    let disk = disk_name(disk)?;
    // SAFETY: live domain pointer; NUL-terminated disk name outliving the call.
    let ret = unsafe { sys::virDomainBlockJobAbort(domain.as_ptr(), disk.as_ptr(), 0) };
    if ret < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// Starts copying the top layer of `disk` into the existing qcow2 image `dest` (a delta
/// over the same backing file), as Nova's `_live_snapshot` does. A transient job, so the
/// domain may stay persistent (Nova's older route undefines it for the copy, and a crash
/// there loses the definition).
pub fn block_copy_shallow(domain: &Domain, disk: &str, dest: &str) -> Result<(), Error> {
    let disk = disk_name(disk)?;
    let dest_xml =
        CString::new(format!("<disk type='file'><driver type='qcow2'/><source file='{}'/></disk>", xml_escape(dest)))
            .map_err(|_| Error::last_error())?;
    let flags = sys::VIR_DOMAIN_BLOCK_COPY_SHALLOW
        | sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        | sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
    // SAFETY: live domain pointer; both strings NUL-terminated and outliving the call; no
    // typed parameters (null pointer with a count of 0 is what libvirt documents).
    let ret = unsafe {
        sys::virDomainBlockCopy(domain.as_ptr(), disk.as_ptr(), dest_xml.as_ptr(), std::ptr::null_mut(), 0, flags)
    };
    if ret < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// Freezes every filesystem of the guest through its QEMU guest agent
/// (`guest-fsfreeze-freeze`), as Nova's `Guest.freeze_filesystems` does. How many were frozen.
pub fn fs_freeze(domain: &Domain) -> Result<u32, Error> {
    // SAFETY: live domain pointer; a null mountpoint list with a count of 0 is what libvirt
    // documents for "every mounted filesystem"; no flags are defined.
    let ret = unsafe { sys::virDomainFSFreeze(domain.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if ret < 0 {
        return Err(Error::last_error());
    }
    Ok(ret as u32)
}

/// Thaws the guest's filesystems (`guest-fsfreeze-thaw`). How many were thawed: 0 for a
/// guest that was not frozen, which the agent answers without error.
pub fn fs_thaw(domain: &Domain) -> Result<u32, Error> {
    // SAFETY: as for `fs_freeze`: live domain pointer, null list with a count of 0, no flags.
    let ret = unsafe { sys::virDomainFSThaw(domain.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if ret < 0 {
        return Err(Error::last_error());
    }
    Ok(ret as u32)
}
