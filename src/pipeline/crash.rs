//! Crash points for the crash-safety suite (`tests/crash.rs`): with the `fault-injection`
//! feature, a worker whose `NOVASNAP_CRASH_AT` names a point dies there at once, as under
//! `kill -9` (abort: no destructor, no cleanup, no ack). Without the feature (release
//! builds) every point compiles to nothing.

/// Where a crash can be injected; the names are what `NOVASNAP_CRASH_AT` takes.
pub const POINTS: &[&str] = &[
    "after-disk-snapshot",
    "after-clone",
    "mid-flatten",
    "after-flatten",
    "after-image-snapshot",
    "mid-upload",
    "after-upload",
];

#[cfg(feature = "fault-injection")]
pub fn point(name: &'static str) {
    debug_assert!(POINTS.contains(&name), "unlisted crash point {name}");
    if std::env::var("NOVASNAP_CRASH_AT").is_ok_and(|at| at == name) {
        eprintln!("novasnap: crash injected at {name}");
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &'static str) {}
