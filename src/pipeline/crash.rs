//! Crash points for the crash-safety suite (`tests/crash.rs`): with the `fault-injection`
//! feature, a worker whose `NOVASNAP_CRASH_AT` names a point dies there at once, as under
//! `kill -9` (abort: no destructor, no cleanup, no ack); one whose `NOVASNAP_PAUSE_AT` names
//! it stops itself there (SIGSTOP) the first time, as a stalled host would, until resumed;
//! one whose `NOVASNAP_DELAY_AT` is `<point>:<seconds>` waits there that long, as a slow
//! step would (the thread sleeps: test builds only).
//! Without the feature (release builds) every point compiles to nothing.

/// Where a crash can be injected; the names are what `NOVASNAP_CRASH_AT` takes.
pub const POINTS: &[&str] = &[
    "while-frozen",
    "while-suspended",
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
    // The first time only: the lease-loss test resumes the worker and lets it go on.
    static PAUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if std::env::var("NOVASNAP_PAUSE_AT").is_ok_and(|at| at == name)
        && !PAUSED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        eprintln!("novasnap: pause injected at {name}");
        // Through kill(1), as the tests signal: no unsafe for kill(2).
        let _ = std::process::Command::new("kill").args(["-STOP", &std::process::id().to_string()]).status();
    }
    if let Some(seconds) = std::env::var("NOVASNAP_DELAY_AT").ok().and_then(|at| {
        let (point, seconds) = at.split_once(':')?;
        (point == name).then(|| seconds.parse::<u64>().ok()).flatten()
    }) {
        eprintln!("novasnap: delay of {seconds}s injected at {name}");
        std::thread::sleep(std::time::Duration::from_secs(seconds));
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &'static str) {}
