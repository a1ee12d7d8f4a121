//! librados as novasnap uses it, over the `ceph` crate's raw bindings (its safe layer can
//! set no option before connecting, and its I/O contexts may outlive their cluster):
//! - [`Cluster`]: a connection configured before it connects, so novasnap's own timeouts
//!   hold whatever the cluster's ceph.conf says;
//! - [`Pool`]: an I/O context, holding its cluster alive for as long as it lives, in a
//!   RADOS namespace if asked;
//! - the object calls of the work ledger: advisory locks, stat, omap.
//!
//! Same invariants as [`super::rbd`]: live handles and NUL-terminated strings outliving each
//! call, negative returns turned into [`Errno`] first, and every call blocking.

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ceph::rados as sys;

use super::{check, cstr, Errno};

/// A connection to the cluster, shut down when the last [`Pool`] and owner have gone.
pub struct Cluster {
    handle: sys::rados_t,
}

// SAFETY: a connected `rados_t` is thread-safe (librados serialises internally); it is
// shut down once, in Drop, when no Pool refers to it any more.
unsafe impl Send for Cluster {}
// SAFETY: as above; every method takes `&self` and librados locks internally.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connects as `client.<user>` with `conf`, after setting `options` (name, value), which
    /// override the file's.
    pub fn connect(user: &str, conf: &Path, options: &[(&str, String)]) -> Result<Arc<Self>, (String, Errno)> {
        fn at(what: &str) -> impl Fn(Errno) -> (String, Errno) + '_ {
            move |e| (what.to_string(), e)
        }
        let user = cstr(user).map_err(at("user name"))?;
        let conf = cstr(&conf.to_string_lossy()).map_err(at("config path"))?;
        let mut handle: sys::rados_t = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; `user` is NUL-terminated and outlives the call.
        check(unsafe { sys::rados_create(&mut handle, user.as_ptr()) }).map_err(at("create"))?;
        // From here `cluster` owns the handle, and shuts it down on any early return.
        let cluster = Self { handle };
        // SAFETY: a created, not yet connected handle; `conf` outlives the call.
        check(unsafe { sys::rados_conf_read_file(cluster.handle, conf.as_ptr()) }).map_err(at("read config"))?;
        for (name, value) in options {
            let (c_name, c_value) = (cstr(name).map_err(at(name))?, cstr(value).map_err(at(name))?);
            // SAFETY: the handle is not connected yet, as rados_conf_set requires for these
            // options to take effect; both strings outlive the call.
            check(unsafe { sys::rados_conf_set(cluster.handle, c_name.as_ptr(), c_value.as_ptr()) })
                .map_err(at(name))?;
        }
        // SAFETY: a configured handle; blocks until connected or `client_mount_timeout`.
        check(unsafe { sys::rados_connect(cluster.handle) }).map_err(at("connect"))?;
        Ok(Arc::new(cluster))
    }

    /// A configuration value as the connection uses it.
    pub fn conf(&self, name: &str) -> Result<String, Errno> {
        let name = cstr(name)?;
        let mut buf = vec![0u8; 256];
        // SAFETY: live handle; `buf` is writable for its length; librados NUL-terminates.
        check(unsafe { sys::rados_conf_get(self.handle, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
        Ok(text(&buf))
    }

    pub fn fsid(&self) -> Result<String, Errno> {
        let mut buf = vec![0u8; 64];
        // SAFETY: live handle; `buf` holds 64 writable bytes, more than an fsid and its NUL.
        check(unsafe { sys::rados_cluster_fsid(self.handle, buf.as_mut_ptr().cast(), buf.len()) })?;
        Ok(text(&buf))
    }

    /// An I/O context on `pool`, in RADOS namespace `namespace` if given.
    pub fn pool(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> Result<Pool, Errno> {
        let name = cstr(pool)?;
        let namespace = namespace.map(cstr).transpose()?;
        let mut io: sys::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: live, connected handle; `name` outlives the call; `io` is a valid out-pointer.
        check(unsafe { sys::rados_ioctx_create(self.handle, name.as_ptr(), &mut io) })?;
        let pool = Pool { io, _cluster: self.clone() };
        if let Some(namespace) = namespace {
            // SAFETY: the I/O context was just created and is not shared yet (setting a
            // namespace is not safe while other threads use the context).
            unsafe { sys::rados_ioctx_set_namespace(pool.io, namespace.as_ptr()) };
        }
        Ok(pool)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle was created by rados_create, and no Pool refers to it any more
        // (each holds an Arc of this Cluster); shut down exactly once.
        unsafe { sys::rados_shutdown(self.handle) };
    }
}

/// An I/O context: RBD images are opened in it, ledger objects read and written.
pub struct Pool {
    io: sys::rados_ioctx_t,
    /// Keeps the connection the context lives in up until the context is destroyed.
    _cluster: Arc<Cluster>,
}

// SAFETY: librados I/O contexts may be used from several threads at once for object
// operations; the namespace is set only before the context is shared (`Cluster::pool`).
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create and destroyed once, here, while `_cluster`
        // (dropped after this) still holds the connection up.
        unsafe { sys::rados_ioctx_destroy(self.io) };
    }
}

/// A NUL-terminated C buffer as text.
fn text(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `LIBRADOS_OPERATION_NOFLAG`.
const NO_FLAGS: i32 = 0;

impl Pool {
    pub(super) fn io(&self) -> sys::rados_ioctx_t {
        self.io
    }

    /// Takes the exclusive advisory lock `name` on `object` under `cookie` for `duration`
    /// (flags: `LIBRADOS_LOCK_FLAG_MAY_RENEW` to extend it). EBUSY/EEXIST: held elsewhere.
    pub fn lock_exclusive(
        &self,
        object: &str,
        name: &str,
        cookie: &str,
        description: &str,
        duration: Duration,
        flags: u8,
    ) -> Result<(), Errno> {
        let (object, name, cookie, description) = (cstr(object)?, cstr(name)?, cstr(cookie)?, cstr(description)?);
        let mut duration = libc::timeval {
            tv_sec: duration.as_secs() as libc::time_t,
            tv_usec: duration.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: live context; every string outlives the call; `duration` is a valid timeval.
        check(unsafe {
            sys::rados_lock_exclusive(
                self.io,
                object.as_ptr(),
                name.as_ptr(),
                cookie.as_ptr(),
                description.as_ptr(),
                &mut duration,
                flags,
            )
        })
        .map(drop)
    }

    pub fn unlock(&self, object: &str, name: &str, cookie: &str) -> Result<(), Errno> {
        let (object, name, cookie) = (cstr(object)?, cstr(name)?, cstr(cookie)?);
        // SAFETY: live context; strings outlive the call.
        check(unsafe { sys::rados_unlock(self.io, object.as_ptr(), name.as_ptr(), cookie.as_ptr()) }).map(drop)
    }

    /// Sets omap `entries` (key → value) on `object`, creating it if needed.
    pub fn omap_set(&self, object: &str, entries: &[(&str, &[u8])]) -> Result<(), Errno> {
        let keys = entries.iter().map(|(k, _)| cstr(k)).collect::<Result<Vec<_>, _>>()?;
        let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        let value_ptrs: Vec<*const c_char> = entries.iter().map(|(_, v)| v.as_ptr().cast()).collect();
        let lens: Vec<usize> = entries.iter().map(|(_, v)| v.len()).collect();
        self.write_op(object, |op| {
            // SAFETY: `op` is a live write op; the three arrays hold `entries.len()` valid
            // pointers/lengths and outlive the operation, which copies them when operated.
            unsafe {
                sys::rados_write_op_omap_set(op, key_ptrs.as_ptr(), value_ptrs.as_ptr(), lens.as_ptr(), lens.len())
            }
        })
    }

    /// Removes omap `keys` from `object`; keys not there are no error.
    pub fn omap_remove(&self, object: &str, keys: &[&str]) -> Result<(), Errno> {
        let keys = keys.iter().map(|k| cstr(k)).collect::<Result<Vec<_>, _>>()?;
        let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        match self.write_op(object, |op| {
            // SAFETY: live write op; `key_ptrs` holds that many NUL-terminated keys, alive
            // until the operation has run.
            unsafe { sys::rados_write_op_omap_rm_keys(op, key_ptrs.as_ptr(), key_ptrs.len()) }
        }) {
            Err(Errno(libc::ENOENT)) => Ok(()),
            other => other,
        }
    }

    /// The values of `keys` that `object`'s omap holds (an object that does not exist
    /// holds none).
    pub fn omap_get(&self, object: &str, keys: &[&str]) -> Result<BTreeMap<String, Vec<u8>>, Errno> {
        let keys = keys.iter().map(|k| cstr(k)).collect::<Result<Vec<_>, _>>()?;
        let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        self.read_omap(object, |op, iter, rval| {
            // SAFETY: live read op; the keys outlive the operation; `iter` and `rval` are
            // valid out-pointers that outlive it too.
            unsafe { sys::rados_read_op_omap_get_vals_by_keys(op, key_ptrs.as_ptr(), key_ptrs.len(), iter, rval) }
        })
    }

    /// Up to `max` omap entries of `object` after key `after` (from the first if empty), in
    /// key order.
    pub fn omap_list(&self, object: &str, after: &str, max: u64) -> Result<BTreeMap<String, Vec<u8>>, Errno> {
        let after = cstr(after)?;
        self.read_omap(object, |op, iter, rval| {
            // SAFETY: live read op; `after` outlives the operation; a null prefix filters
            // nothing; `iter` and `rval` are valid out-pointers that outlive it.
            unsafe { sys::rados_read_op_omap_get_vals(op, after.as_ptr(), std::ptr::null(), max, iter, rval) }
        })
    }

    fn write_op(&self, object: &str, add: impl FnOnce(sys::rados_write_op_t)) -> Result<(), Errno> {
        let object = cstr(object)?;
        // SAFETY: creates an op owned here and released below on every path.
        let op = unsafe { sys::rados_create_write_op() };
        add(op);
        // SAFETY: live op and context; `object` outlives the call; a null mtime means now.
        let ret = unsafe { sys::rados_write_op_operate(op, self.io, object.as_ptr(), std::ptr::null_mut(), NO_FLAGS) };
        // SAFETY: released once, after it was operated.
        unsafe { sys::rados_release_write_op(op) };
        check(ret).map(drop)
    }

    /// Runs a read op that fills an omap iterator, and collects what it yields.
    fn read_omap(
        &self,
        object: &str,
        add: impl FnOnce(sys::rados_read_op_t, *mut sys::rados_omap_iter_t, *mut i32),
    ) -> Result<BTreeMap<String, Vec<u8>>, Errno> {
        let object = cstr(object)?;
        let (mut iter, mut rval): (sys::rados_omap_iter_t, i32) = (std::ptr::null_mut(), 0);
        // SAFETY: creates an op owned here and released below on every path.
        let op = unsafe { sys::rados_create_read_op() };
        add(op, &mut iter, &mut rval);
        // SAFETY: live op and context; `object` outlives the call.
        let ret = unsafe { sys::rados_read_op_operate(op, self.io, object.as_ptr(), NO_FLAGS) };
        let mut entries = BTreeMap::new();
        if ret >= 0 && rval >= 0 && !iter.is_null() {
            loop {
                let (mut key, mut value, mut len): (*mut c_char, *mut c_char, usize) =
                    (std::ptr::null_mut(), std::ptr::null_mut(), 0);
                // SAFETY: `iter` came from the operated read op and is ended below; librados
                // owns what `key` and `value` point to until then.
                if unsafe { sys::rados_omap_get_next(iter, &mut key, &mut value, &mut len) } < 0 || key.is_null() {
                    break;
                }
                // SAFETY: `key` is NUL-terminated; `value` holds `len` bytes (null when empty).
                let key = unsafe { CStr::from_ptr(key) }.to_string_lossy().into_owned();
                let value = if value.is_null() {
                    Vec::new()
                } else {
                    // SAFETY: as above.
                    unsafe { std::slice::from_raw_parts(value.cast::<u8>(), len) }.to_vec()
                };
                entries.insert(key, value);
            }
        }
        if !iter.is_null() {
            // SAFETY: ends the iterator librados allocated, once.
            unsafe { sys::rados_omap_get_end(iter) };
        }
        // SAFETY: released once, after the iterator is done with.
        unsafe { sys::rados_release_read_op(op) };
        match check(ret).and(check(rval)) {
            Ok(_) => Ok(entries),
            Err(Errno(libc::ENOENT)) => Ok(BTreeMap::new()),
            Err(e) => Err(e),
        }
    }
}
