//! Best-effort process hardening for the unwrapped universe keys.
//!
//! Keys live in [`crate::crypto::SecretKey`] (heap, zeroized on drop, redacted
//! `Debug`). This module keeps them out of places the process does not control:
//!
//! * **Core dumps** are disabled twice: `RLIMIT_CORE` is set to 0 (soft and
//!   hard, so it cannot be raised again) and `prctl(PR_SET_DUMPABLE, 0)` marks
//!   the process non-dumpable, which also suppresses core dumps via a
//!   `core_pattern` pipe and stops same-user `ptrace` attach and reads of
//!   `/proc/<pid>/mem` by other processes.
//! * **Swap**: the crate forbids `unsafe`, so single pages cannot be
//!   `mlock`ed. Instead, when asked, [`harden_process`] calls the safe
//!   `mlockall(MCL_CURRENT | MCL_ONFAULT)`: every page mapped *at that moment*
//!   (including the heap pages holding the keys, if called after the key ring
//!   is built) stays in RAM once touched. `MCL_FUTURE` is deliberately not
//!   used: under a low `RLIMIT_MEMLOCK` it makes later allocations and thread
//!   stacks fail, which would turn hardening into an outage. Locking is best
//!   effort; a failure (typically `ENOMEM`/`EPERM` from a small
//!   `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`) is reported and logged as a
//!   warning, never fatal. Encrypted swap remains the recommended setting.

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
    /// `mlockall(MCL_CURRENT | MCL_ONFAULT)`.
    pub memory_locked: StepOutcome,
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
            ("mlockall(MCL_CURRENT|MCL_ONFAULT)", &self.memory_locked),
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
            "RLIMIT_CORE=0: {}; non-dumpable: {}; memory locked: {}",
            self.core_rlimit_zero, self.not_dumpable, self.memory_locked
        )
    }
}

/// Disables core dumps and, when `lock_memory` is true, locks the currently
/// mapped pages in RAM. Best effort: never fails, reports each step. Call it
/// early (core dumps) and, for `lock_memory`, after the key ring is built.
/// Idempotent.
pub fn harden_process(lock_memory: bool) -> HardeningReport {
    HardeningReport {
        core_rlimit_zero: disable_core_rlimit(),
        not_dumpable: set_not_dumpable(),
        memory_locked: if lock_memory {
            lock_current_memory()
        } else {
            StepOutcome::NotRequested
        },
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

#[cfg(any(target_os = "linux", target_os = "android"))]
fn lock_current_memory() -> StepOutcome {
    use rustix::mm::{mlockall, MlockAllFlags};
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::ONFAULT) {
        Ok(()) => StepOutcome::Done,
        Err(e) => StepOutcome::Failed(format!(
            "{e} (raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK; use encrypted swap otherwise)"
        )),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn lock_current_memory() -> StepOutcome {
    StepOutcome::NotSupported
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn core_dumps_get_disabled() {
        let r = harden_process(false);
        assert_eq!(r.memory_locked, StepOutcome::NotRequested);
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
        assert!(harden_process(false).core_dumps_disabled());
        r.log();
    }

    #[test]
    fn display_mentions_every_step() {
        let r = HardeningReport {
            core_rlimit_zero: StepOutcome::Done,
            not_dumpable: StepOutcome::NotSupported,
            memory_locked: StepOutcome::Failed("ENOMEM".into()),
        };
        let s = r.to_string();
        assert!(s.contains("RLIMIT_CORE=0: done"), "{s}");
        assert!(s.contains("not supported"), "{s}");
        assert!(s.contains("failed: ENOMEM"), "{s}");
        assert!(r.core_dumps_disabled());
    }
}
