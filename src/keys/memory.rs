//! Process hardening for the unwrapped universe keys, and process settings a
//! userspace block server needs under a kernel block device.
//!
//! Keys live in [`crate::crypto::SecretKey`] (heap, zeroized on drop, redacted
//! `Debug`). This module keeps them out of places the process does not control:
//!
//! * **Core dumps** are disabled twice: `RLIMIT_CORE` is set to 0 (soft and
//!   hard, so it cannot be raised again) and `prctl(PR_SET_DUMPABLE, 0)` marks
//!   the process non-dumpable, which also suppresses core dumps via a
//!   `core_pattern` pipe and stops same-user `ptrace` attach and reads of
//!   `/proc/<pid>/mem` by other processes.
//! * **Swap**: [`prepare_process`] runs before any thread starts and calls
//!   `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)` when the process may
//!   lock without limit (`CAP_IPC_LOCK` in its effective set, or an unlimited
//!   `RLIMIT_MEMLOCK`). Every page the process touches from then on, including
//!   the per-file key schedules derived later on pool threads, stays in RAM.
//!   Under a finite `RLIMIT_MEMLOCK` without the capability, `MCL_FUTURE`
//!   would make later allocations and thread stacks fail, turning hardening
//!   into an outage, so memory is then not locked and one line says so (and
//!   whether the node has swap at all: without swap nothing can be swapped).
//! * **Reclaim deadlocks**: [`prepare_process`] also sets
//!   `prctl(PR_SET_IO_FLUSHER)`. The kernel copies the flag into every thread
//!   created afterwards, so all of them carry `PF_MEMALLOC_NOIO`: memory
//!   reclaim triggered by the sidecar's own allocations never waits for I/O
//!   on the NBD device the sidecar itself serves. Userspace block servers
//!   (nbd, tcmu-runner, ublk servers) do the same. It needs
//!   `CAP_SYS_RESOURCE`; without it one line says so.

use std::fmt;

/// What happened to one hardening step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// Applied.
    Done,
    /// Tried and failed (with the OS error).
    Failed(String),
    /// Not available on this platform.
    NotSupported,
    /// Not requested by the caller.
    NotRequested,
}

impl fmt::Display for StepOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepOutcome::Done => f.write_str("done"),
            StepOutcome::Failed(e) => write!(f, "failed: {e}"),
            StepOutcome::NotSupported => f.write_str("not supported on this platform"),
            StepOutcome::NotRequested => f.write_str("not requested"),
        }
    }
}

/// What [`harden_process`] achieved, for logging and status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardeningReport {
    /// `RLIMIT_CORE` set to 0.
    pub core_rlimit_zero: StepOutcome,
    /// `PR_SET_DUMPABLE` 0.
    pub not_dumpable: StepOutcome,
}

impl HardeningReport {
    /// True when core dumps are off by at least one mechanism.
    pub fn core_dumps_disabled(&self) -> bool {
        self.core_rlimit_zero == StepOutcome::Done || self.not_dumpable == StepOutcome::Done
    }

    /// Logs the outcome: `info` for what worked, `warn` for each failure.
    pub fn log(&self) {
        for (step, outcome) in [
            ("RLIMIT_CORE=0", &self.core_rlimit_zero),
            ("PR_SET_DUMPABLE=0", &self.not_dumpable),
        ] {
            match outcome {
                StepOutcome::Done => tracing::info!(step, "process hardening applied"),
                StepOutcome::NotRequested => {
                    tracing::debug!(step, "process hardening step not requested")
                }
                other => {
                    tracing::warn!(step, outcome = %other, "process hardening step not applied (best effort)")
                }
            }
        }
    }
}

impl fmt::Display for HardeningReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RLIMIT_CORE=0: {}; non-dumpable: {}",
            self.core_rlimit_zero, self.not_dumpable
        )
    }
}

/// Disables core dumps. Best effort: never fails, reports each step.
/// Idempotent.
pub fn harden_process() -> HardeningReport {
    HardeningReport {
        core_rlimit_zero: disable_core_rlimit(),
        not_dumpable: set_not_dumpable(),
    }
}

#[cfg(unix)]
fn disable_core_rlimit() -> StepOutcome {
    use rustix::process::{setrlimit, Resource, Rlimit};
    match setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    ) {
        Ok(()) => StepOutcome::Done,
        Err(e) => StepOutcome::Failed(e.to_string()),
    }
}

#[cfg(not(unix))]
fn disable_core_rlimit() -> StepOutcome {
    StepOutcome::NotSupported
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_not_dumpable() -> StepOutcome {
    use rustix::process::{set_dumpable_behavior, DumpableBehavior};
    match set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        Ok(()) => StepOutcome::Done,
        Err(e) => StepOutcome::Failed(e.to_string()),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_not_dumpable() -> StepOutcome {
    StepOutcome::NotSupported
}

/// What [`prepare_process`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessReport {
    /// `prctl(PR_SET_IO_FLUSHER, 1)`.
    pub io_flusher: StepOutcome,
    /// `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`.
    pub memory_locked: StepOutcome,
    /// Whether the node has any swap configured (`/proc/swaps`); `None` when unknown.
    pub swap_present: Option<bool>,
}

impl ProcessReport {
    /// Logs one line per step: `info` for what took, `warn` for what did not and matters.
    pub fn log(&self) {
        match &self.io_flusher {
            StepOutcome::Done => tracing::info!("PR_SET_IO_FLUSHER set: threads allocate without waiting for I/O on the device they serve"),
            other => tracing::warn!(outcome = %other, "PR_SET_IO_FLUSHER not set: under memory pressure behind a kernel NBD device, reclaim may wait for this server (grant CAP_SYS_RESOURCE; see doc/kubernetes.md)"),
        }
        match (&self.memory_locked, self.swap_present) {
            (StepOutcome::Done, _) => tracing::info!(
                "all process memory locked in RAM (mlockall MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)"
            ),
            (other, Some(false)) => {
                tracing::info!(outcome = %other, "memory not locked; this node has no swap, so key material cannot be swapped out")
            }
            (other, _) => {
                tracing::warn!(outcome = %other, "memory not locked: key material could be swapped out (grant CAP_IPC_LOCK or use encrypted swap; see doc/SECURITY.md)")
            }
        }
    }
}

/// Process settings that must be in place before the async runtime starts
/// any thread: `PR_SET_IO_FLUSHER` (inherited by every later thread) and,
/// where locking is unlimited, `mlockall` of all current and future memory.
/// Best effort: never fails, reports each step.
pub fn prepare_process() -> ProcessReport {
    ProcessReport {
        io_flusher: set_io_flusher(),
        memory_locked: lock_all_memory(),
        swap_present: swap_present(),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_io_flusher() -> StepOutcome {
    match rustix::process::configure_io_flusher_behavior(true) {
        Ok(()) => StepOutcome::Done,
        Err(e) => StepOutcome::Failed(e.to_string()),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_io_flusher() -> StepOutcome {
    StepOutcome::NotSupported
}

/// True when `mlockall(MCL_FUTURE)` cannot make later allocations fail:
/// the process holds `CAP_IPC_LOCK` or `RLIMIT_MEMLOCK` is unlimited.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn may_lock_without_limit() -> bool {
    use rustix::process::{getrlimit, Resource};
    use rustix::thread::{capabilities, CapabilitySet};
    let unlimited = getrlimit(Resource::Memlock).current.is_none();
    let cap = capabilities(None)
        .map(|c| c.effective.contains(CapabilitySet::IPC_LOCK))
        .unwrap_or(false);
    unlimited || cap
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn lock_all_memory() -> StepOutcome {
    use rustix::mm::{mlockall, MlockAllFlags};
    if !may_lock_without_limit() {
        return StepOutcome::Failed(
            "no CAP_IPC_LOCK and RLIMIT_MEMLOCK is limited; locking future memory would make allocations fail".into(),
        );
    }
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => StepOutcome::Done,
        Err(e) => StepOutcome::Failed(e.to_string()),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn lock_all_memory() -> StepOutcome {
    StepOutcome::NotSupported
}

/// Whether `/proc/swaps` lists any swap area (its first line is a header).
fn swap_present() -> Option<bool> {
    std::fs::read_to_string("/proc/swaps")
        .ok()
        .map(|s| s.lines().skip(1).any(|l| !l.trim().is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn core_dumps_get_disabled() {
        let r = harden_process();
        assert_eq!(r.core_rlimit_zero, StepOutcome::Done, "{r}");
        assert_eq!(r.not_dumpable, StepOutcome::Done, "{r}");
        assert!(r.core_dumps_disabled());
        let lim = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(lim.current, Some(0));
        assert_eq!(
            rustix::process::dumpable_behavior().ok(),
            Some(rustix::process::DumpableBehavior::NotDumpable)
        );
        // Idempotent.
        assert!(harden_process().core_dumps_disabled());
        r.log();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn io_flusher_takes_with_cap_sys_resource() {
        let r = prepare_process();
        let has_cap = rustix::thread::capabilities(None)
            .map(|c| {
                c.effective
                    .contains(rustix::thread::CapabilitySet::SYS_RESOURCE)
            })
            .unwrap_or(false);
        if has_cap {
            assert_eq!(r.io_flusher, StepOutcome::Done, "{r:?}");
            assert_eq!(rustix::process::is_io_flusher().ok(), Some(true));
        } else {
            assert!(matches!(r.io_flusher, StepOutcome::Failed(_)), "{r:?}");
        }
        r.log();
    }

    #[test]
    fn display_mentions_every_step() {
        let r = HardeningReport {
            core_rlimit_zero: StepOutcome::Done,
            not_dumpable: StepOutcome::Failed("EPERM".into()),
        };
        let s = r.to_string();
        assert!(s.contains("RLIMIT_CORE=0: done"), "{s}");
        assert!(s.contains("failed: EPERM"), "{s}");
        assert!(r.core_dumps_disabled());
    }
}
