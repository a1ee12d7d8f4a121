//! librbd's C API (the `ceph` crate covers librados but not librbd) as a small safe
//! wrapper, on the pools of [`super::rados`].
//!
//! Invariants that hold throughout:
//! - every pointer passed to librbd is either a handle this module opened and has not yet
//!   closed, or a NUL-terminated `CString` / buffer that outlives the call;
//! - a negative return is `-errno` and is turned into [`Errno`] before anything else;
//! - these calls block: callers run them on the blocking pool, never on the executor.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ceph::rados::rados_ioctx_t;

pub use super::rados::Pool;
pub use super::Errno;
use super::{check, cstr};

type RbdImageT = *mut c_void;
type ProgressFn = extern "C" fn(offset: u64, total: u64, data: *mut c_void) -> c_int;
type DiffFn = extern "C" fn(offset: u64, len: usize, exists: c_int, data: *mut c_void) -> c_int;

/// `RBD_SNAP_NAMESPACE_TYPE_USER` of librbd.h's `rbd_snap_namespace_type_t`.
const RBD_SNAP_NAMESPACE_TYPE_USER: c_int = 0;

#[repr(C)]
struct RbdSnapInfo {
    id: u64,
    size: u64,
    name: *const c_char,
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_open(io: rados_ioctx_t, name: *const c_char, image: *mut RbdImageT, snap: *const c_char) -> c_int;
    fn rbd_open_read_only(io: rados_ioctx_t, name: *const c_char, image: *mut RbdImageT, snap: *const c_char) -> c_int;
    fn rbd_close(image: RbdImageT) -> c_int;
    fn rbd_get_size(image: RbdImageT, size: *mut u64) -> c_int;
    fn rbd_get_features(image: RbdImageT, features: *mut u64) -> c_int;
    fn rbd_get_parent_info(
        image: RbdImageT,
        pool: *mut c_char,
        pool_len: usize,
        name: *mut c_char,
        name_len: usize,
        snap: *mut c_char,
        snap_len: usize,
    ) -> c_int;
    fn rbd_snap_list(image: RbdImageT, snaps: *mut RbdSnapInfo, max: *mut c_int) -> c_int;
    fn rbd_snap_list_end(snaps: *mut RbdSnapInfo);
    fn rbd_snap_get_namespace_type(image: RbdImageT, snap_id: u64, namespace_type: *mut c_int) -> c_int;
    fn rbd_snap_exists(image: RbdImageT, snap: *const c_char, exists: *mut bool) -> c_int;
    fn rbd_snap_create(image: RbdImageT, snap: *const c_char) -> c_int;
    fn rbd_snap_remove(image: RbdImageT, snap: *const c_char) -> c_int;
    fn rbd_snap_protect(image: RbdImageT, snap: *const c_char) -> c_int;
    fn rbd_snap_unprotect(image: RbdImageT, snap: *const c_char) -> c_int;
    fn rbd_snap_is_protected(image: RbdImageT, snap: *const c_char, protected: *mut c_int) -> c_int;
    fn rbd_clone(
        p_io: rados_ioctx_t,
        p_name: *const c_char,
        p_snap: *const c_char,
        c_io: rados_ioctx_t,
        c_name: *const c_char,
        features: u64,
        order: *mut c_int,
    ) -> c_int;
    fn rbd_flatten_with_progress(image: RbdImageT, cb: ProgressFn, data: *mut c_void) -> c_int;
    fn rbd_rebuild_object_map(image: RbdImageT, cb: ProgressFn, data: *mut c_void) -> c_int;
    fn rbd_update_features(image: RbdImageT, features: u64, enabled: u8) -> c_int;
    fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    fn rbd_list(io: rados_ioctx_t, names: *mut c_char, size: *mut usize) -> c_int;
    fn rbd_read(image: RbdImageT, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    fn rbd_write(image: RbdImageT, ofs: u64, len: usize, buf: *const c_char) -> isize;
    fn rbd_resize(image: RbdImageT, size: u64) -> c_int;
    fn rbd_diff_iterate2(
        image: RbdImageT,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: DiffFn,
        arg: *mut c_void,
    ) -> c_int;
    fn rbd_metadata_set(image: RbdImageT, key: *const c_char, value: *const c_char) -> c_int;
    fn rbd_metadata_get(image: RbdImageT, key: *const c_char, value: *mut c_char, len: *mut usize) -> c_int;
    fn rbd_metadata_remove(image: RbdImageT, key: *const c_char) -> c_int;
}

/// The librbd calls made in a pool.
impl Pool {
    /// Opens `name` read-only, at `snap` if given, to look at it. A read-only handle
    /// registers no watch on the image header; it is closed, like a writable one, by
    /// `closer` once the image has gone quiet (see [`DeferredClose`]), never reused.
    pub fn open_read_only(&self, name: &str, snap: Option<&str>, closer: &DeferredClose) -> Result<Image, Errno> {
        self.open(name, snap, Use::Look, closer)
    }

    /// Opens `name` for changes: the image's idle writable handle if there is one (so one
    /// handle keeps the image's exclusive lock instead of several passing it around), else a
    /// new one. `closer` closes it once the image has gone quiet.
    pub fn open_writable(&self, name: &str, closer: &DeferredClose) -> Result<Image, Errno> {
        self.open(name, None, Use::Change, closer)
    }

    fn open(&self, name: &str, snap: Option<&str>, purpose: Use, closer: &DeferredClose) -> Result<Image, Errno> {
        let name = cstr(name)?;
        let snap = snap.map(cstr).transpose()?;
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let key = closer_key(self, &name);
        if let Some(OpenHandle(handle)) = closer.begin(&key, purpose) {
            return Ok(Image::new(handle, purpose, closer, key));
        }
        let mut handle: RbdImageT = std::ptr::null_mut();
        // SAFETY: io is a live ioctx (self borrows it); name/snap outlive the call (a null
        // snapshot name opens the image head); on success librbd stores an open handle in
        // `handle`, which `Image` hands back to the closer once.
        let ret = unsafe {
            match purpose {
                Use::Look => rbd_open_read_only(self.io(), name.as_ptr(), &mut handle, snap_ptr),
                Use::Change => rbd_open(self.io(), name.as_ptr(), &mut handle, snap_ptr),
            }
        };
        if let Err(e) = check(ret) {
            closer.state.end(key, purpose, None);
            return Err(e);
        }
        Ok(Image::new(handle, purpose, closer, key))
    }

    /// Clones `parent@snap` (parent in `parent_pool`) as `child` in this pool.
    pub fn clone_image(
        &self,
        parent_pool: &Pool,
        parent: &str,
        snap: &str,
        child: &str,
        features: u64,
    ) -> Result<(), Errno> {
        let (parent, snap, child) = (cstr(parent)?, cstr(snap)?, cstr(child)?);
        let mut order: c_int = 0;
        // SAFETY: both ioctxs are live; strings outlive the call; order is a valid out-pointer.
        check(unsafe {
            rbd_clone(parent_pool.io(), parent.as_ptr(), snap.as_ptr(), self.io(), child.as_ptr(), features, &mut order)
        })
        .map(drop)
    }

    pub fn remove(&self, name: &str) -> Result<(), Errno> {
        let name = cstr(name)?;
        // SAFETY: live ioctx, NUL-terminated name.
        check(unsafe { rbd_remove(self.io(), name.as_ptr()) }).map(drop)
    }

    pub fn list(&self) -> Result<Vec<String>, Errno> {
        let mut size: usize = 4096;
        loop {
            let mut buf = vec![0u8; size];
            // SAFETY: buf holds `size` writable bytes; librbd writes at most that many and
            // sets `size` to what it needs when ERANGE.
            let ret = unsafe { rbd_list(self.io(), buf.as_mut_ptr().cast(), &mut size) };
            match check(ret) {
                Ok(len) => {
                    return Ok(buf[..len as usize]
                        .split(|b| *b == 0)
                        .filter(|n| !n.is_empty())
                        .map(|n| String::from_utf8_lossy(n).into_owned())
                        .collect())
                }
                Err(Errno(libc::ERANGE)) => size = size.max(buf.len() * 2),
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a handle was opened for.
#[derive(Clone, Copy, PartialEq)]
enum Use {
    /// Read-only, possibly at a snapshot: its view may be stale once dropped.
    Look,
    /// Writable head, kept current by its header watch: reusable.
    Change,
}

/// An open RBD image, handed back to its [`DeferredClose`] when dropped.
pub struct Image {
    handle: RbdImageT,
    /// Whether the handle may serve a later `open_writable`: a writable one on which no
    /// call failed (a failure may come from a handle librbd gave up on, e.g. blocklisted).
    reusable: Cell<bool>,
    purpose: Use,
    /// The closer's state, and the image's key there.
    closer: Arc<Shared>,
    key: ImageKey,
}

// SAFETY: a librbd image handle may be used from any thread, one call at a time; `Image`
// is not `Sync` and every method takes `&self`/`&mut self` on the one owner.
unsafe impl Send for Image {}

impl Image {
    fn new(handle: RbdImageT, purpose: Use, closer: &DeferredClose, key: ImageKey) -> Self {
        Self { handle, reusable: Cell::new(purpose == Use::Change), purpose, closer: closer.state.clone(), key }
    }

    /// Like [`check`], and a failed call makes the handle not reusable.
    fn check(&self, ret: c_int) -> Result<c_int, Errno> {
        let result = check(ret);
        if result.is_err() {
            self.reusable.set(false);
        }
        result
    }

    /// Runs `f` with a NUL-terminated copy of `s`; see [`Image::check`].
    fn with_c(&self, s: &str, f: impl FnOnce(*const c_char) -> c_int) -> Result<c_int, Errno> {
        let c = cstr(s)?;
        self.check(f(c.as_ptr()))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let key = std::mem::take(&mut self.key);
        self.closer.end(key, self.purpose, Some((OpenHandle(self.handle), self.reusable.get())));
    }
}

/// An open handle on its way to `rbd_close`.
struct OpenHandle(RbdImageT);

// SAFETY: held by value, by the closer's bookkeeping or (reused) by exactly one new `Image`;
// nothing else uses the handle once the `Image` that had it dropped it.
unsafe impl Send for OpenHandle {}

impl OpenHandle {
    fn close(self) {
        // SAFETY: the handle came from a successful rbd_open and, wrapped in this value that
        // is consumed here, is closed exactly once.
        unsafe { rbd_close(self.0) };
    }
}

/// How long an image's handles stay open after the last call on any of them.
const QUIET: Duration = Duration::from_secs(1);

/// The same for an image no other client watches (see [`DeferredClose::settle_own`]).
const OWN_QUIET: Duration = Duration::from_millis(100);

/// Which image a handle is open on: its pool's ioctx and its name.
type ImageKey = (usize, CString);

fn closer_key(pool: &Pool, name: &CStr) -> ImageKey {
    (pool.io() as usize, name.to_owned())
}

/// One image's handles: those done with, waiting to close (a writable one among them may be
/// reused), and how many are in use.
struct ImageHandles {
    /// Writable handles on which nothing failed: the next `open_writable` takes one.
    reusable: Vec<OpenHandle>,
    /// Read-only handles, and writable ones a call failed on: only closed.
    retired: Vec<OpenHandle>,
    in_use: usize,
    /// Writable handles that exist (in use, or idle in `reusable`): at most one, so that a
    /// second change waits for the first one's handle instead of opening another.
    writable: usize,
    last_used: Instant,
}

impl ImageHandles {
    /// When its idle handles may close: never while one is in use.
    fn quiet_at(&self, quiet: Duration) -> Option<Instant> {
        (self.in_use == 0).then_some(self.last_used + quiet)
    }

    fn close_idle(&mut self) {
        self.writable = self.writable.saturating_sub(self.reusable.len());
        self.reusable.drain(..).chain(self.retired.drain(..)).for_each(OpenHandle::close);
    }
}

#[derive(Default)]
struct Handles {
    images: HashMap<ImageKey, ImageHandles>,
    stopped: bool,
}

impl Handles {
    fn image(&mut self, key: ImageKey) -> &mut ImageHandles {
        self.images.entry(key).or_insert_with(|| ImageHandles {
            reusable: Vec::new(),
            retired: Vec::new(),
            in_use: 0,
            writable: 0,
            last_used: Instant::now(),
        })
    }
}

/// The closer's state, shared with every [`Image`].
#[derive(Default)]
struct Shared {
    handles: Mutex<Handles>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Handles> {
        // A panic while holding it leaves plain bookkeeping behind: still usable.
        self.handles.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for a change to the handles, or until `at` if given.
    fn wait<'a>(&self, handles: MutexGuard<'a, Handles>, at: Option<Instant>) -> MutexGuard<'a, Handles> {
        match at {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                self.changed.wait_timeout(handles, wait).unwrap_or_else(|p| p.into_inner()).0
            }
            None => self.changed.wait(handles).unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// A handle on `key` opened for `purpose` is done with (`handle`, and whether it may be
    /// reused), or was never opened (None).
    fn end(&self, key: ImageKey, purpose: Use, handle: Option<(OpenHandle, bool)>) {
        let mut handles = self.lock();
        if handles.stopped {
            drop(handles);
            if let Some((handle, _)) = handle {
                handle.close();
            }
            return;
        }
        let image = handles.image(key);
        image.in_use = image.in_use.saturating_sub(1);
        image.last_used = Instant::now();
        // A writable handle that is not kept for reuse is one fewer (a failed call retires
        // it; a failed open made none).
        if purpose == Use::Change && !matches!(handle, Some((_, true))) {
            image.writable = image.writable.saturating_sub(1);
        }
        match handle {
            Some((handle, true)) => image.reusable.push(handle),
            Some((handle, false)) => image.retired.push(handle),
            None => {}
        }
        self.changed.notify_all();
    }

    /// Closes the idle handles of every image quiet by now; returns when the next one will be.
    fn close_quiet(handles: &mut Handles) -> Option<Instant> {
        let now = Instant::now();
        handles.images.retain(|_, image| match image.quiet_at(QUIET) {
            Some(at) if at <= now => {
                image.close_idle();
                false
            }
            _ => true,
        });
        handles.images.values().filter_map(|image| image.quiet_at(QUIET)).min()
    }
}

/// Closes image handles on its own thread, once their image has seen no call on any of them
/// for [`QUIET`]; until then an idle writable handle serves the image's next change.
///
/// A writable handle watches the image header. When it is closed while a notification is
/// still being handled (the header update QEMU's librbd sends after performing a snapshot
/// operation a handle asked of it, as the exclusive-lock owner), Ceph 16.2's librbd can
/// destroy the image watcher under the pending work and abort the whole process
/// (`FAILED ceph_assert(m_pending_ops == 0)` in `~AsyncOpTracker`, "The futex facility
/// returned an unexpected error code", or an uncaught `std::system_error`). Each call on an
/// image notifies every handle open on it, so none of them closes until calls on the image
/// have stopped for a while: then no notification is left in flight. Read-only handles close
/// the same way, so no `rbd_close` runs on a worker thread between calls on an image; and
/// changes go through one writable handle per image, which keeps the exclusive lock (when
/// the guest does not hold it) instead of several of ours passing it between them.
pub struct DeferredClose {
    state: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl DeferredClose {
    pub fn start() -> std::io::Result<Self> {
        let state = Arc::new(Shared::default());
        let shared = state.clone();
        let thread = std::thread::Builder::new().name("rbd-close".into()).spawn(move || {
            let mut handles = shared.lock();
            while !handles.stopped {
                let next = Shared::close_quiet(&mut handles);
                handles = shared.wait(handles, next);
            }
            handles.images.drain().for_each(|(_, mut image)| image.close_idle());
        })?;
        Ok(Self { state, thread: Some(thread) })
    }

    /// A handle on `key` is about to be used: counted in use from now, so the image's idle
    /// handles stay open meanwhile. For a change, returns the image's idle writable handle to
    /// reuse, or None when the caller is to open it; while another caller uses it, waits for
    /// it to come back, so that an image never has two writable handles of ours.
    fn begin(&self, key: &ImageKey, purpose: Use) -> Option<OpenHandle> {
        let mut handles = self.state.lock();
        loop {
            let image = handles.image(key.clone());
            if purpose == Use::Look {
                image.in_use += 1;
                return None;
            }
            if let Some(handle) = image.reusable.pop() {
                image.in_use += 1;
                return Some(handle);
            }
            if image.writable == 0 {
                image.writable = 1;
                image.in_use += 1;
                return None;
            }
            handles = self.state.wait(handles, None);
        }
    }

    /// Returns once no handle of ours is open on `name` in `pool`, its idle ones closed when
    /// the image has gone quiet: an image cannot be removed while one of them still watches it.
    pub fn settle(&self, pool: &Pool, name: &str) {
        self.settle_after(pool, name, QUIET);
    }

    /// [`settle`](Self::settle) for an image only novasnap's handles watch and no other
    /// client holds the lock of (a copy novasnap made, before it hands it to Glance): every
    /// notification about it came from a call of ours, and librbd sends a header update with
    /// a synchronous `notify2`, which returns once every watcher, our own included, has
    /// acknowledged it. What is left in flight is our watcher's own bookkeeping after its
    /// acknowledgement, which [`OWN_QUIET`] outlasts; the second [`QUIET`] is for images
    /// whose lock owner (QEMU) acts for us and notifies when it pleases.
    pub fn settle_own(&self, pool: &Pool, name: &str) {
        self.settle_after(pool, name, OWN_QUIET);
    }

    fn settle_after(&self, pool: &Pool, name: &str, quiet: Duration) {
        let Ok(name) = cstr(name) else { return };
        let key = closer_key(pool, &name);
        let mut handles = self.state.lock();
        loop {
            let Some(image) = handles.images.get_mut(&key) else { return };
            let quiet_at = image.quiet_at(quiet);
            if quiet_at.is_some_and(|at| at <= Instant::now()) {
                image.close_idle();
                handles.images.remove(&key);
                return;
            }
            handles = self.state.wait(handles, quiet_at);
        }
    }
}

impl Drop for DeferredClose {
    /// Closes every idle handle before the connection the handles belong to goes away.
    fn drop(&mut self) {
        self.state.lock().stopped = true;
        self.state.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Image {
    pub fn size(&self) -> Result<u64, Errno> {
        let mut size = 0u64;
        // SAFETY: open handle; valid out-pointer.
        self.check(unsafe { rbd_get_size(self.handle, &mut size) })?;
        Ok(size)
    }

    pub fn features(&self) -> Result<u64, Errno> {
        let mut features = 0u64;
        // SAFETY: open handle; valid out-pointer.
        self.check(unsafe { rbd_get_features(self.handle, &mut features) })?;
        Ok(features)
    }

    /// (pool, image, snapshot) of the parent, or None for an image that is not a clone.
    pub fn parent(&self) -> Result<Option<(String, String, String)>, Errno> {
        const LEN: usize = 4096;
        let (mut pool, mut name, mut snap) = (vec![0u8; LEN], vec![0u8; LEN], vec![0u8; LEN]);
        // SAFETY: open handle; three LEN-byte buffers librbd fills with NUL-terminated
        // strings (ERANGE if one would not fit).
        let ret = unsafe {
            rbd_get_parent_info(
                self.handle,
                pool.as_mut_ptr().cast(),
                LEN,
                name.as_mut_ptr().cast(),
                LEN,
                snap.as_mut_ptr().cast(),
                LEN,
            )
        };
        match self.check(ret) {
            Ok(_) => {
                let text = |b: &[u8]| {
                    CStr::from_bytes_until_nul(b).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
                };
                Ok(Some((text(&pool), text(&name), text(&snap))))
            }
            Err(Errno(libc::ENOENT)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Names of the user's snapshots: not those librbd keeps in its trash namespace (a
    /// removed snapshot that still has clone children), which have no name to address them by.
    pub fn snapshots(&self) -> Result<Vec<String>, Errno> {
        let mut max: c_int = 16;
        loop {
            let mut snaps: Vec<RbdSnapInfo> = Vec::with_capacity(max as usize + 1);
            // SAFETY: `snaps` has room for `max` entries plus librbd's terminating entry;
            // on success librbd fills `ret` entries whose names it owns until
            // rbd_snap_list_end, called before the buffer is dropped.
            let ret = unsafe { rbd_snap_list(self.handle, snaps.as_mut_ptr(), &mut max) };
            match self.check(ret) {
                Ok(count) => {
                    // SAFETY: librbd initialised `count` entries.
                    unsafe { snaps.set_len(count as usize) };
                    let mut names = Vec::with_capacity(snaps.len());
                    let mut failed = None;
                    for snap in &snaps {
                        let mut namespace: c_int = -1;
                        // SAFETY: the handle is open; librbd writes one enum value.
                        match self.check(unsafe { rbd_snap_get_namespace_type(self.handle, snap.id, &mut namespace) }) {
                            Ok(_) if namespace == RBD_SNAP_NAMESPACE_TYPE_USER => {
                                // SAFETY: each name is a NUL-terminated string owned by librbd.
                                names.push(unsafe { CStr::from_ptr(snap.name) }.to_string_lossy().into_owned());
                            }
                            Ok(_) => {}
                            // Removed since the listing.
                            Err(Errno(libc::ENOENT)) => {}
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    // SAFETY: releases what rbd_snap_list allocated in these entries.
                    unsafe { rbd_snap_list_end(snaps.as_mut_ptr()) };
                    return failed.map_or(Ok(names), Err);
                }
                Err(Errno(libc::ERANGE)) => continue, // `max` now holds the count needed
                Err(e) => return Err(e),
            }
        }
    }

    pub fn snap_exists(&self, snap: &str) -> Result<bool, Errno> {
        let mut exists = false;
        // SAFETY: open handle; NUL-terminated name; valid out-pointer.
        self.with_c(snap, |s| unsafe { rbd_snap_exists(self.handle, s, &mut exists) })?;
        Ok(exists)
    }

    pub fn snap_is_protected(&self, snap: &str) -> Result<bool, Errno> {
        let mut protected: c_int = 0;
        // SAFETY: open handle; NUL-terminated name; valid out-pointer.
        self.with_c(snap, |s| unsafe { rbd_snap_is_protected(self.handle, s, &mut protected) })?;
        Ok(protected != 0)
    }

    pub fn snap_create(&self, snap: &str) -> Result<(), Errno> {
        // SAFETY: open handle; NUL-terminated name.
        self.with_c(snap, |s| unsafe { rbd_snap_create(self.handle, s) }).map(drop)
    }

    pub fn snap_remove(&self, snap: &str) -> Result<(), Errno> {
        // SAFETY: open handle; NUL-terminated name.
        self.with_c(snap, |s| unsafe { rbd_snap_remove(self.handle, s) }).map(drop)
    }

    pub fn snap_protect(&self, snap: &str) -> Result<(), Errno> {
        // SAFETY: open handle; NUL-terminated name.
        self.with_c(snap, |s| unsafe { rbd_snap_protect(self.handle, s) }).map(drop)
    }

    pub fn snap_unprotect(&self, snap: &str) -> Result<(), Errno> {
        // SAFETY: open handle; NUL-terminated name.
        self.with_c(snap, |s| unsafe { rbd_snap_unprotect(self.handle, s) }).map(drop)
    }

    /// Flattens, calling `progress(done, total)` as librbd reports; `progress` returning
    /// false stops the flatten (librbd starts no more object copies and fails ECANCELED).
    pub fn flatten(&self, progress: &mut dyn FnMut(u64, u64) -> bool) -> Result<(), Errno> {
        extern "C" fn trampoline(offset: u64, total: u64, data: *mut c_void) -> c_int {
            // SAFETY: `data` is the `&mut &mut dyn FnMut` passed below, alive for the
            // whole rbd_flatten_with_progress call, which invokes us on its own thread
            // only while it runs.
            let progress = unsafe { &mut *(data as *mut &mut dyn FnMut(u64, u64) -> bool) };
            // A negative return makes librbd's object throttle stop starting copies.
            if progress(offset, total) {
                0
            } else {
                -libc::ECANCELED
            }
        }
        let mut progress = progress;
        let data = &mut progress as *mut &mut dyn FnMut(u64, u64) -> bool as *mut c_void;
        // SAFETY: open handle; `data` outlives the call (see trampoline).
        self.check(unsafe { rbd_flatten_with_progress(self.handle, trampoline, data) }).map(drop)
    }

    /// Turns `features` (RBD_FEATURE_* bits) on or off.
    pub fn update_features(&self, features: u64, enabled: bool) -> Result<(), Errno> {
        // SAFETY: open handle; plain values.
        self.check(unsafe { rbd_update_features(self.handle, features, u8::from(enabled)) }).map(drop)
    }

    /// Rebuilds the object map from the objects that exist in RADOS.
    pub fn rebuild_object_map(&self) -> Result<(), Errno> {
        extern "C" fn ignore(_offset: u64, _total: u64, _data: *mut c_void) -> c_int {
            0
        }
        // SAFETY: open handle; the callback uses no data, so a null pointer is fine.
        self.check(unsafe { rbd_rebuild_object_map(self.handle, ignore, std::ptr::null_mut()) }).map(drop)
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        // SAFETY: open handle; buf is writable for its full length.
        let ret = unsafe { rbd_read(self.handle, offset, buf.len(), buf.as_mut_ptr().cast()) };
        if ret < 0 {
            return Err(Errno(-ret as i32));
        }
        Ok(ret as usize)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), Errno> {
        // SAFETY: open handle; buf is readable for its full length and outlives the call.
        let ret = unsafe { rbd_write(self.handle, offset, buf.len(), buf.as_ptr().cast()) };
        match ret {
            n if n < 0 => Err(Errno(-n as i32)),
            n if n as usize != buf.len() => Err(Errno(libc::EIO)),
            _ => Ok(()),
        }
    }

    pub fn resize(&self, size: u64) -> Result<(), Errno> {
        // SAFETY: open handle; a plain value.
        self.check(unsafe { rbd_resize(self.handle, size) }).map(drop)
    }

    /// Every whole object the image (at the snapshot it was opened at) holds itself, from
    /// the beginning of time and without its parent's, as `(offset, len, exists)`: what a
    /// clone changed over its parent. `exists` false marks an extent discarded in the image
    /// (it reads as zeros, not as the parent's data).
    pub fn own_extents(&self) -> Result<Vec<(u64, u64, bool)>, Errno> {
        extern "C" fn collect(offset: u64, len: usize, exists: c_int, data: *mut c_void) -> c_int {
            // SAFETY: `data` is the Vec passed below, alive for the whole rbd_diff_iterate2
            // call, during which librbd reports one extent at a time. Nothing but a push
            // happens here: librbd may call from a thread of its own, where I/O could deadlock.
            let extents = unsafe { &mut *(data as *mut Vec<(u64, u64, bool)>) };
            extents.push((offset, len as u64, exists != 0));
            0
        }
        let size = self.size()?;
        let mut extents: Vec<(u64, u64, bool)> = Vec::new();
        let data = &mut extents as *mut Vec<(u64, u64, bool)> as *mut c_void;
        // SAFETY: open handle; a null from-snapshot means from the beginning of time; `data`
        // outlives the call (see `collect`).
        self.check(unsafe { rbd_diff_iterate2(self.handle, std::ptr::null(), 0, size, 0, 1, collect, data) })?;
        Ok(extents)
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> Result<(), Errno> {
        let (key, value) = (cstr(key)?, cstr(value)?);
        // SAFETY: open handle; NUL-terminated key and value.
        self.check(unsafe { rbd_metadata_set(self.handle, key.as_ptr(), value.as_ptr()) }).map(drop)
    }

    /// Removes `key`; a key that is not there is no error.
    pub fn metadata_remove(&self, key: &str) -> Result<(), Errno> {
        let key = cstr(key)?;
        // SAFETY: open handle; NUL-terminated key.
        let ret = unsafe { rbd_metadata_remove(self.handle, key.as_ptr()) };
        // A key already gone is the outcome asked for, not a failure of the handle.
        self.check(if ret == -libc::ENOENT { 0 } else { ret }).map(drop)
    }

    pub fn metadata_get(&self, key: &str) -> Result<Option<String>, Errno> {
        let key = cstr(key)?;
        let mut len: usize = 256;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: open handle; buf holds `len` writable bytes; on ERANGE librbd sets
            // `len` to the size needed.
            let ret = unsafe { rbd_metadata_get(self.handle, key.as_ptr(), buf.as_mut_ptr().cast(), &mut len) };
            match self.check(ret) {
                Ok(_) => {
                    let value =
                        CStr::from_bytes_until_nul(&buf).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    return Ok(Some(value));
                }
                Err(Errno(libc::ENOENT)) => return Ok(None),
                Err(Errno(libc::ERANGE)) => len = len.max(buf.len() * 2),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two changes of one image at once: the second waits for the first one's writable
    /// handle instead of opening a second (the keys and bookkeeping only: no librbd).
    #[test]
    fn a_second_change_waits_for_the_images_writable_handle() {
        let closer = Arc::new(DeferredClose::start().unwrap());
        let key: ImageKey = (1, CString::new("disk").unwrap());
        assert!(closer.begin(&key, Use::Change).is_none(), "the first change opens the handle");
        let second = {
            let (closer, key) = (closer.clone(), key.clone());
            std::thread::spawn(move || {
                let handle = closer.begin(&key, Use::Change);
                closer.state.end(key, Use::Change, None);
                handle.is_none()
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(!second.is_finished(), "the second change waits while the first has the handle");
        // The first one's open failed: the second may open one now.
        closer.state.end(key.clone(), Use::Change, None);
        assert!(second.join().unwrap());
        assert!(closer.begin(&key, Use::Look).is_none(), "looks never wait");
        closer.state.end(key, Use::Look, None);
    }
}
