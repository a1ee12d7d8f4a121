//! Quiescing a live snapshot's guest (Nova's `_can_quiesce` and `_set_quiesced`): the QEMU
//! guest agent freezes the guest's filesystems right before the step that makes the point in
//! time and thaws them right after, so the image holds filesystems the guest flushed.
//!
//! Nova quiesces only the file-backed live snapshot (`_live_snapshot`, around the end of
//! the block copy); novasnap also quiesces the RBD disk snapshot of the direct and standard
//! paths, the same point in time taken another way. As in Nova, a guest is quiesced only
//! when its image says it runs the agent (`hw_qemu_guest_agent`), and a failed freeze fails
//! the snapshot only when the image requires quiescing (`os_require_quiesce`); otherwise
//! the snapshot goes on crash-consistent.
//!
//! A freeze is bounded by `[novasnap] max_freeze_seconds` and always undone: the thaw runs
//! on success and failure alike, a thaw that fails leaves the cast unsettled (its
//! redelivery thaws first), and a request dropped while its guest is frozen (a panic) thaws
//! it from [`Frozen`]'s `Drop`. A worker killed while its guest is frozen leaves it frozen:
//! every live snapshot of a guest with the agent thaws before it starts ([`Job::thaw_first`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use super::plan::SnapshotPlan;
use super::{crash, Fault, Job, SnapshotError, Step};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::request::Instance;

/// What the instance's image says of quiescing, from the `image_*` system_metadata nova-api
/// copied from it (Nova reads the same as `image_meta.properties`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuiescePolicy {
    /// `hw_qemu_guest_agent`: the guest runs the QEMU guest agent.
    pub agent: bool,
    /// `os_require_quiesce`: a snapshot that cannot be quiesced must fail.
    pub required: bool,
}

impl QuiescePolicy {
    pub fn of(instance: &Instance) -> Self {
        let flag = |key: &str| instance.system_metadata.get(key).is_some_and(|v| flexible_bool(v));
        Self { agent: flag("image_hw_qemu_guest_agent"), required: flag("image_os_require_quiesce") }
    }
}

/// oslo's `strutils.bool_from_string`, which Nova's `FlexibleBooleanField` image properties
/// are read with: anything else is false.
fn flexible_bool(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "t" | "true" | "on" | "y" | "yes")
}

/// A guest whose filesystems this request froze. Thaw it with [`Job::thaw`]; dropped
/// without that (the request's future dropped, a panic), it thaws the guest from a task of
/// its own, unfenced: a frozen guest must never wait for a redelivery that may not come.
pub(crate) struct Frozen {
    hypervisor: Arc<dyn Hypervisor>,
    instance: Uuid,
    /// When the freeze was asked for: the guest is held from then.
    since: Instant,
    armed: bool,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (hypervisor, instance) = (self.hypervisor.clone(), self.instance);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = hypervisor.thaw_filesystems(instance).await {
                    tracing::error!(%instance, error = %e, "the guest's filesystems are still frozen");
                }
            });
        }
    }
}

impl Job<'_> {
    /// A freeze an earlier try of this request left (its worker killed while the guest was
    /// frozen) is undone before anything else of a live snapshot. Thawing a guest that is not
    /// frozen does nothing, so this runs at the start of every live snapshot of a guest with
    /// the agent; a failure is only logged: the freeze that follows meets the same agent.
    pub(crate) async fn thaw_first(&self, plan: &SnapshotPlan) {
        let policy = QuiescePolicy::of(&self.req.instance);
        if !plan.live || !policy.agent {
            return;
        }
        let (hv, instance) = (&self.b.hypervisor, self.instance());
        let thaw = async {
            match hv.thaw_filesystems(instance).await {
                // Without an agent channel nothing can have been frozen.
                Err(HypervisorError::AgentNotConfigured { .. }) => Ok(()),
                other => other,
            }
        };
        self.tidy("thaw the guest's filesystems before the snapshot", &instance, thaw).await;
    }

    /// Runs `make`, the step that makes a live snapshot's point in time, with the guest
    /// quiesced around it when its image asks for it (see the module). A cold snapshot's
    /// guest is in managed save and needs none.
    pub(crate) async fn at_point_in_time<T>(
        &self,
        plan: &SnapshotPlan,
        make: impl Future<Output = Result<T, SnapshotError>>,
    ) -> Result<T, SnapshotError> {
        if !plan.live {
            return make.await;
        }
        let Some(mut frozen) = self.freeze().await? else {
            return make.await;
        };
        crash::point("while-frozen");
        let budget = self.settings.max_freeze.saturating_sub(frozen.since.elapsed());
        tokio::pin!(make);
        let (made, thawed_early) = tokio::select! {
            biased;
            made = &mut make => (made, None),
            _ = tokio::time::sleep(budget) => {
                // Past the bound: the guest's writes go on, and the point in time is taken
                // crash-consistent when the step ends.
                let thawed = self.thaw(&mut frozen).await;
                (make.await, Some(thawed))
            }
        };
        let cut_short = thawed_early.is_some();
        let thawed = match thawed_early {
            Some(thawed) => thawed,
            None => self.thaw(&mut frozen).await,
        };
        let made = made?;
        thawed?;
        if cut_short {
            let reason = format!(
                "the guest stayed frozen for [novasnap] max_freeze_seconds ({:?}) before its point in time \
                 was made, and was thawed: the snapshot is crash-consistent",
                self.settings.max_freeze
            );
            if QuiescePolicy::of(&self.req.instance).required {
                return Err(self.fail_at(Step::Quiesce, Fault::QuiesceFailed(reason)));
            }
            warn!(instance = %self.instance(), image = %self.image(), %reason, "snapshot not quiesced");
        }
        Ok(made)
    }

    /// Freezes the guest's filesystems if its image says it runs the agent. None when the
    /// snapshot goes on unquiesced; an error only when the image requires quiescing (Nova's
    /// `QemuGuestAgentNotEnabled` without the agent, `InstanceQuiesceFailed` otherwise).
    /// Tried once, as Nova does: the guest is paused for its writes while the agent works.
    async fn freeze(&self) -> Result<Option<Frozen>, SnapshotError> {
        let policy = QuiescePolicy::of(&self.req.instance);
        if !policy.agent {
            return match policy.required {
                true => Err(self.fail_at(Step::Quiesce, Fault::AgentNotEnabled)),
                false => Ok(None),
            };
        }
        self.lease.confirm().await.map_err(|e| self.fail_at(Step::Quiesce, e))?;
        let (hv, instance) = (&self.b.hypervisor, self.instance());
        // The work is noted already, before its first artefact: a worker killed from here on
        // leaves its cast unacknowledged, and the redelivery thaws first.
        let mut frozen = Frozen { hypervisor: hv.clone(), instance, since: Instant::now(), armed: true };
        let reason = match hv.freeze_filesystems(instance).await {
            Ok(_) if frozen.since.elapsed() > self.settings.max_freeze => format!(
                "the guest agent took {:?} to freeze the filesystems, more than [novasnap] max_freeze_seconds",
                frozen.since.elapsed()
            ),
            Ok(filesystems) => {
                // The agent's share of the time frozen, apart from the point-in-time step's.
                let freeze_ms = frozen.since.elapsed().as_millis() as u64;
                info!(%instance, filesystems, freeze_ms, "guest filesystems frozen");
                return Ok(Some(frozen));
            }
            // The agent may have frozen some before it failed, or answered late; but one
            // that was never asked (no channel, or nothing on its guest end) froze nothing,
            // and a thaw could not reach it either.
            Err(e) => {
                let needs_thaw = !matches!(
                    e,
                    HypervisorError::AgentNotConfigured { .. } | HypervisorError::AgentNotConnected { .. }
                );
                frozen.armed = needs_thaw;
                // `_set_quiesced`'s message.
                format!("Error from libvirt while quiescing {instance}: {e}")
            }
        };
        if frozen.armed {
            self.thaw(&mut frozen).await?;
        }
        if policy.required {
            return Err(self.fail_at(Step::Quiesce, Fault::QuiesceFailed(reason)));
        }
        // `_live_snapshot`: "Skipping quiescing instance".
        warn!(%instance, image = %self.image(), %reason, "skipping quiescing the instance: the snapshot is crash-consistent");
        Ok(None)
    }

    /// Thaws what [`freeze`](Self::freeze) froze, under the retry policy and past the
    /// deadline (a guest must not stay frozen because its snapshot ran late), and adds the
    /// time it was held to the request's. A thaw that still fails marks the guest frozen, for
    /// the failure path to try again and hand the cast back.
    async fn thaw(&self, frozen: &mut Frozen) -> Result<(), SnapshotError> {
        if !frozen.armed {
            return Ok(());
        }
        let (hv, instance) = (&self.b.hypervisor, self.instance());
        let asked = Instant::now();
        let thawed = self.fenced(Step::Thaw, None, || hv.thaw_filesystems(instance)).await;
        frozen.armed = false;
        let held = frozen.since.elapsed();
        self.held.add_frozen(held);
        match &thawed {
            Ok(()) => {
                info!(%instance, frozen_ms = held.as_millis() as u64, thaw_ms = asked.elapsed().as_millis() as u64,
                            "guest filesystems thawed")
            }
            Err(_) => self.held.set_left_frozen(true),
        }
        thawed
    }

    /// The failure path's second try at a guest an earlier thaw could not release.
    pub(crate) async fn thaw_if_left_frozen(&self) -> Result<(), SnapshotError> {
        if !self.held.left_frozen() {
            return Ok(());
        }
        let (hv, instance) = (&self.b.hypervisor, self.instance());
        self.fenced(Step::Thaw, None, || hv.thaw_filesystems(instance)).await?;
        self.held.set_left_frozen(false);
        Ok(())
    }
}

/// How long this request held its guest: frozen through the agent (live snapshots) and in
/// managed save (cold ones). Shared by the steps, which borrow the request immutably.
#[derive(Debug, Default)]
pub(crate) struct HeldTimes {
    frozen_ms: std::sync::atomic::AtomicU64,
    suspended_ms: std::sync::atomic::AtomicU64,
    /// A thaw failed: the guest may still be frozen.
    left_frozen: std::sync::atomic::AtomicBool,
}

impl HeldTimes {
    fn add_frozen(&self, held: Duration) {
        self.frozen_ms.fetch_add(held.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn add_suspended(&self, held: Duration) {
        self.suspended_ms.fetch_add(held.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn left_frozen(&self) -> bool {
        self.left_frozen.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_left_frozen(&self, frozen: bool) {
        self.left_frozen.store(frozen, std::sync::atomic::Ordering::Relaxed);
    }

    /// The figures the end notification carries.
    pub(crate) fn held(&self) -> crate::messaging::GuestHeld {
        crate::messaging::GuestHeld {
            frozen_ms: self.frozen_ms.load(std::sync::atomic::Ordering::Relaxed),
            suspended_ms: self.suspended_ms.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_properties_are_read_as_oslo_reads_booleans() {
        assert!(["yes", "True", "1", "on", " y "].iter().all(|v| flexible_bool(v)));
        assert!(["no", "false", "0", "", "maybe"].iter().all(|v| !flexible_bool(v)));
    }
}
