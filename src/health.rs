//! Liveness and readiness of the process: the latch the server sets
//! (listening, draining, open connections) and the readiness rule that
//! `/readyz` and the `ear_ready` gauge report.
//!
//! Sits below the server and the admin endpoints: the server writes the
//! latch, the admin layer only reads it. The key ring and the revocation
//! watcher are plugged in once at start-up, so a fail-closed wipe withdraws
//! readiness without either of them knowing about health.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::crypto::KeyRing;
use crate::keys::revocation::RevocationState;

/// Readiness/liveness state shared by the server and the health endpoints.
#[derive(Default)]
pub struct Health {
    /// Socket listening and keys loaded.
    pub ready: AtomicBool,
    /// Shutdown drain in progress.
    pub draining: AtomicBool,
    /// Open NBD connections.
    pub connections: AtomicUsize,
    keys: OnceLock<Arc<KeyRing>>,
    revocation: OnceLock<Arc<RevocationState>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("ready", &self.ready)
            .field("draining", &self.draining)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl Health {
    /// Withdraws readiness when `ring` is wiped (fail-closed). Only the first
    /// call counts: the keys are fixed at start-up.
    pub fn watch_key_ring(&self, ring: Arc<KeyRing>) {
        let _ = self.keys.set(ring);
    }

    /// Withdraws readiness when the revocation watcher fails closed.
    pub fn watch_revocation(&self, state: Arc<RevocationState>) {
        let _ = self.revocation.set(state);
    }

    /// The key ring plugged in with [`Health::watch_key_ring`], if any.
    pub fn key_ring(&self) -> Option<&Arc<KeyRing>> {
        self.keys.get()
    }

    /// Whether the keys were wiped (fail-closed): every I/O fails until a
    /// restart.
    pub fn failed_closed(&self) -> bool {
        self.keys.get().is_some_and(|r| r.is_failed_closed())
            || self.revocation.get().is_some_and(|r| r.is_failed_closed())
    }

    /// Readiness: `Ok(())`, or why not. Draining wins over failed closed,
    /// which wins over still starting.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Acquire) {
            Err("draining")
        } else if self.failed_closed() {
            Err("failed closed")
        } else if !self.ready.load(Ordering::Acquire) {
            Err("starting")
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_rule() {
        let h = Health::default();
        assert_eq!(h.readiness(), Err("starting"));
        h.ready.store(true, Ordering::Release);
        assert_eq!(h.readiness(), Ok(()));
        let mut keys = std::collections::BTreeMap::new();
        keys.insert(1, crate::crypto::SecretKey::generate().unwrap());
        let ring = Arc::new(KeyRing::new(keys, 1, 4).unwrap());
        h.watch_key_ring(Arc::clone(&ring));
        assert_eq!(h.readiness(), Ok(()));
        ring.wipe("test");
        assert!(h.failed_closed());
        assert_eq!(h.readiness(), Err("failed closed"));
        h.draining.store(true, Ordering::Release);
        assert_eq!(h.readiness(), Err("draining"));
    }
}
