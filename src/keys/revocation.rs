//! Master-key revocation watch: periodically asks the provider whether the
//! master key (the customer's CMK) is still usable, and fails closed when the
//! KMS itself has reported it revoked for longer than a grace period.
//!
//! A check is two calls: the key's state (DescribeKey), then, when that says
//! usable, a *canary* unwrap: the provider decrypts a stored wrapped universe
//! key and the plaintext is dropped (zeroized) at once. The canary is what
//! notices a withdrawn `kms:Decrypt` permission (key policy, grant or IAM),
//! which leaves DescribeKey saying Enabled. A refused canary counts as a
//! revocation, with the same grace period. What is watched is a
//! [`WatchedKey`]: an online rewrap points it at the new master key and canary.
//!
//! Rules:
//!
//! * `Ok(Enabled)` → normal; a revocation seen earlier is cleared (the key was
//!   re-enabled within the grace period).
//! * `Ok(Revoked(reason))` → the first such answer starts the grace period; a
//!   `Revoked` answer at or after its end wipes the [`KeyRing`] (every later
//!   I/O fails, answered as EIO by the server) and logs why. The watcher
//!   re-checks exactly when the grace period ends, not only at the next
//!   interval. Recovery after that needs a restart (with the key re-enabled).
//! * `Err(_)` (KMS unreachable, throttled, credentials trouble) → warn and keep
//!   serving: an outage is never a revocation. It neither starts nor clears a
//!   grace period; failing closed needs a fresh `Revoked` answer.
//!
//! The current state lives in a [`RevocationState`] that the metrics and status
//! layers read ([`RevocationState::snapshot`]). The state machine itself is a
//! pure method ([`RevocationState::apply`]) so it is tested without time.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{EncryptionContext, KeyError, KeyProvider, MasterKeyState, WrappedKey};
use crate::crypto::KeyRing;

/// A wrapped universe key the watcher unwraps to prove the master key works.
#[derive(Debug, Clone)]
pub struct Canary {
    /// The stored blob (for instance the active version's wrapped key).
    pub wrapped: WrappedKey,
    /// The context it is bound to.
    pub context: EncryptionContext,
}

impl Canary {
    /// The active version's wrapped key of `registry` (none when encryption is off).
    pub fn active_of(registry: &super::registry::Registry) -> Option<Canary> {
        let active = registry.active_version()?;
        registry
            .key_versions()
            .iter()
            .find(|v| v.version == active)
            .map(|v| Canary {
                wrapped: v.wrapped.clone(),
                context: v.context.clone(),
            })
    }
}

/// What the watcher checks: a provider and the canary it must unwrap.
pub struct WatchTarget {
    /// The master key's provider.
    pub provider: Arc<dyn KeyProvider>,
    /// The canary; `None` checks the key state only.
    pub canary: Option<Canary>,
}

/// The watcher's target, swappable while it runs (an online rewrap moves the
/// directory to another master key).
pub struct WatchedKey(std::sync::RwLock<Arc<WatchTarget>>);

impl WatchedKey {
    /// A target to watch.
    pub fn new(provider: Arc<dyn KeyProvider>, canary: Option<Canary>) -> Self {
        Self(std::sync::RwLock::new(Arc::new(WatchTarget {
            provider,
            canary,
        })))
    }

    /// The current target.
    pub fn current(&self) -> Arc<WatchTarget> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the canary (after a rotation makes another version active,
    /// or a retirement removes the canary's version from the registry).
    pub fn set_canary(&self, canary: Option<Canary>) {
        let provider = Arc::clone(&self.current().provider);
        self.replace(provider, canary);
    }

    /// Points the watcher at another master key and canary from its next check.
    pub fn replace(&self, provider: Arc<dyn KeyProvider>, canary: Option<Canary>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(WatchTarget { provider, canary });
    }
}

impl std::fmt::Debug for WatchedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.current();
        f.debug_struct("WatchedKey")
            .field("master_key_id", &t.provider.master_key_id())
            .field("canary", &t.canary.is_some())
            .finish()
    }
}

/// One check of `target`: the key state, then (when usable) the canary.
pub async fn check_master_key(target: &WatchTarget) -> Result<MasterKeyState, KeyError> {
    match target.provider.master_key_state().await? {
        MasterKeyState::Enabled => match &target.canary {
            Some(c) => target.provider.canary_state(&c.wrapped, &c.context).await,
            None => Ok(MasterKeyState::Enabled),
        },
        revoked => Ok(revoked),
    }
}

/// Health of the master key as last established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeyHealth {
    /// Usable (or not yet checked).
    Ok,
    /// The KMS reported the key revoked; keys are wiped when the grace ends.
    Revoked {
        /// When the revocation was first seen.
        since: Instant,
        /// What the KMS said.
        reason: String,
    },
    /// Keys were wiped; a restart is needed.
    FailedClosed {
        /// Why.
        reason: String,
    },
}

/// A copy of the watcher's state for metrics and status (no secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationSnapshot {
    /// Current health.
    pub health: MasterKeyHealth,
    /// How long the key has been reported revoked (while in grace).
    pub revoked_for: Option<Duration>,
    /// Checks performed.
    pub checks: u64,
    /// Checks that got no verdict (provider unreachable or erroring).
    pub failed_checks: u64,
    /// Whether the last check got an answer from the provider.
    pub provider_reachable: bool,
    /// The last check error, if the last check failed.
    pub last_error: Option<String>,
}

impl RevocationSnapshot {
    /// Gauge encoding of the health: 0 = ok, 1 = revoked (grace running),
    /// 2 = failed closed.
    pub fn gauge(&self) -> i64 {
        match self.health {
            MasterKeyHealth::Ok => 0,
            MasterKeyHealth::Revoked { .. } => 1,
            MasterKeyHealth::FailedClosed { .. } => 2,
        }
    }
}

#[derive(Debug)]
struct Inner {
    health: MasterKeyHealth,
    checks: u64,
    failed_checks: u64,
    provider_reachable: bool,
    last_error: Option<String>,
}

/// The watcher's shared state. Create one, hand an `Arc` to
/// [`watch_master_key`] and to whoever exports it.
#[derive(Debug)]
pub struct RevocationState {
    inner: Mutex<Inner>,
}

impl Default for RevocationState {
    fn default() -> Self {
        Self::new()
    }
}

/// What the watcher must do after a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep serving.
    Continue,
    /// Wipe the keys, with this reason.
    FailClosed(String),
}

impl RevocationState {
    /// A fresh state: `Ok`, no checks yet.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                health: MasterKeyHealth::Ok,
                checks: 0,
                failed_checks: 0,
                provider_reachable: true,
                last_error: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> RevocationSnapshot {
        let g = self.lock();
        let revoked_for = match &g.health {
            MasterKeyHealth::Revoked { since, .. } => {
                Some(Instant::now().saturating_duration_since(*since))
            }
            _ => None,
        };
        RevocationSnapshot {
            health: g.health.clone(),
            revoked_for,
            checks: g.checks,
            failed_checks: g.failed_checks,
            provider_reachable: g.provider_reachable,
            last_error: g.last_error.clone(),
        }
    }

    /// True once the keys were wiped.
    pub fn is_failed_closed(&self) -> bool {
        matches!(self.lock().health, MasterKeyHealth::FailedClosed { .. })
    }

    /// The state machine: records the check `result` taken at `now` and says
    /// whether to fail closed.
    pub fn apply(
        &self,
        now: Instant,
        result: Result<MasterKeyState, KeyError>,
        grace: Duration,
    ) -> Verdict {
        let mut g = self.lock();
        g.checks = g.checks.saturating_add(1);
        if matches!(g.health, MasterKeyHealth::FailedClosed { .. }) {
            return Verdict::Continue;
        }
        match result {
            Err(e) => {
                g.failed_checks = g.failed_checks.saturating_add(1);
                g.provider_reachable = !matches!(e, KeyError::Unavailable(_));
                g.last_error = Some(e.to_string());
                Verdict::Continue
            }
            Ok(MasterKeyState::Enabled) => {
                g.provider_reachable = true;
                g.last_error = None;
                if let MasterKeyHealth::Revoked { reason, .. } = &g.health {
                    tracing::warn!(
                        previous = %reason,
                        "the master key is usable again within the grace period; revocation cleared"
                    );
                }
                g.health = MasterKeyHealth::Ok;
                Verdict::Continue
            }
            Ok(MasterKeyState::Revoked(reason)) => {
                g.provider_reachable = true;
                g.last_error = None;
                let since = match &g.health {
                    MasterKeyHealth::Revoked { since, .. } => *since,
                    _ => now,
                };
                let elapsed = now.saturating_duration_since(since);
                if elapsed >= grace {
                    let why = format!(
                        "the KMS has reported the master key revoked ({reason}) for {}s, \
                         longer than the {}s grace period",
                        elapsed.as_secs(),
                        grace.as_secs()
                    );
                    g.health = MasterKeyHealth::FailedClosed {
                        reason: why.clone(),
                    };
                    Verdict::FailClosed(why)
                } else {
                    if matches!(g.health, MasterKeyHealth::Ok) {
                        tracing::error!(
                            %reason,
                            grace_secs = grace.as_secs(),
                            "the KMS reports the master key revoked; failing closed when the grace period ends unless it is re-enabled"
                        );
                    }
                    g.health = MasterKeyHealth::Revoked { since, reason };
                    Verdict::Continue
                }
            }
        }
    }

    /// How long to wait before the next check: `interval`, shortened so that
    /// a running grace period is re-checked as soon as it ends.
    pub fn next_delay(&self, now: Instant, interval: Duration, grace: Duration) -> Duration {
        match &self.lock().health {
            MasterKeyHealth::Revoked { since, .. } => {
                let end = *since + grace;
                let left = end.saturating_duration_since(now);
                if left.is_zero() {
                    interval
                } else {
                    interval.min(left)
                }
            }
            _ => interval,
        }
    }
}

/// Watches the master key of `provider` (key state only, no canary); see
/// [`watch_key`].
pub async fn watch_master_key(
    provider: Arc<dyn KeyProvider>,
    ring: Arc<KeyRing>,
    interval: Duration,
    grace: Duration,
    state: Arc<RevocationState>,
    shutdown: impl Future,
) {
    let target = Arc::new(WatchedKey::new(provider, None));
    watch_key(target, ring, interval, grace, state, shutdown).await
}

/// Watches the master key until `shutdown` completes or the keys are wiped.
///
/// Checks once immediately, then every `interval` (see the module doc for the
/// rules), each time against the target `watched` holds then. On fail-closed
/// it calls [`KeyRing::wipe`] with the reason, logs an error and returns. The
/// provider's own timeouts bound each check; `shutdown` also interrupts a
/// check in flight.
pub async fn watch_key(
    watched: Arc<WatchedKey>,
    ring: Arc<KeyRing>,
    interval: Duration,
    grace: Duration,
    state: Arc<RevocationState>,
    shutdown: impl Future,
) {
    tokio::pin!(shutdown);
    loop {
        let target = watched.current();
        let key_id = target.provider.master_key_id();
        let result = tokio::select! {
            r = check_master_key(&target) => r,
            _ = &mut shutdown => return,
        };
        if let Err(e) = &result {
            tracing::warn!(key = %key_id, error = %e, "master key check failed; still serving with the keys in memory");
        }
        let now = Instant::now();
        if let Verdict::FailClosed(why) = state.apply(now, result, grace) {
            ring.wipe(&why);
            tracing::error!(
                key = %key_id,
                reason = %why,
                "FAILED CLOSED: universe keys wiped from memory; all I/O now fails (EIO) until the key is re-enabled and the sidecar restarted"
            );
            return;
        }
        let delay = state.next_delay(now, interval, grace);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::crypto::SecretKey;
    use crate::keys::{EncryptionContext, WrappedKey};

    #[derive(Clone, Copy, Debug)]
    enum Fake {
        Enabled,
        Revoked,
        Down,
        /// DescribeKey still says Enabled, but the key no longer unwraps.
        DecryptDenied,
    }

    struct FakeProvider {
        state: Mutex<Fake>,
        calls: AtomicU64,
        unwraps: AtomicU64,
    }

    impl FakeProvider {
        fn new(s: Fake) -> Arc<Self> {
            Arc::new(Self {
                state: Mutex::new(s),
                calls: AtomicU64::new(0),
                unwraps: AtomicU64::new(0),
            })
        }
        fn set(&self, s: Fake) {
            *self.state.lock().unwrap() = s;
        }
    }

    #[async_trait]
    impl KeyProvider for FakeProvider {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn master_key_id(&self) -> String {
            "fake-key".into()
        }
        async fn generate_wrapped(&self, _: &EncryptionContext) -> Result<WrappedKey, KeyError> {
            Err(KeyError::Config("unused".into()))
        }
        async fn unwrap(
            &self,
            _: &WrappedKey,
            _: &EncryptionContext,
        ) -> Result<SecretKey, KeyError> {
            self.unwraps.fetch_add(1, Ordering::Relaxed);
            let s = *self.state.lock().unwrap();
            match s {
                Fake::DecryptDenied => Err(KeyError::WrongKey("decrypt denied".into())),
                Fake::Down => Err(KeyError::Unavailable("connection refused".into())),
                _ => Ok(SecretKey::generate().unwrap()),
            }
        }
        async fn master_key_state(&self) -> Result<MasterKeyState, KeyError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let s = *self.state.lock().unwrap();
            match s {
                Fake::Enabled | Fake::DecryptDenied => Ok(MasterKeyState::Enabled),
                Fake::Revoked => Ok(MasterKeyState::Revoked("KeyState Disabled".into())),
                Fake::Down => Err(KeyError::Unavailable("connection refused".into())),
            }
        }
    }

    fn ring() -> Arc<KeyRing> {
        let keys = BTreeMap::from([(1u32, SecretKey::generate().unwrap())]);
        Arc::new(KeyRing::new(keys, 1, 16).unwrap())
    }

    const MIN: Duration = Duration::from_secs(60);

    struct Harness {
        fake: Arc<FakeProvider>,
        ring: Arc<KeyRing>,
        state: Arc<RevocationState>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(initial: Fake, interval: Duration, grace: Duration) -> Harness {
        let fake = FakeProvider::new(initial);
        let ring = ring();
        let state = Arc::new(RevocationState::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(watch_master_key(
            fake.clone(),
            ring.clone(),
            interval,
            grace,
            state.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        Harness {
            fake,
            ring,
            state,
            stop: Some(tx),
            task,
        }
    }

    async fn at(t: Duration) {
        // With paused time, sleeping advances the clock deterministically.
        tokio::time::sleep(t).await;
    }

    #[tokio::test(start_paused = true)]
    async fn enabled_key_keeps_serving() {
        let h = start(Fake::Enabled, 5 * MIN, 5 * MIN);
        at(60 * MIN + Duration::from_secs(1)).await;
        let s = h.state.snapshot();
        assert_eq!(s.health, MasterKeyHealth::Ok);
        assert_eq!(s.checks, 13, "one at start, then every 5 min");
        assert_eq!(s.gauge(), 0);
        assert!(!h.ring.is_failed_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn revoked_past_grace_fails_closed() {
        let mut h = start(Fake::Enabled, 5 * MIN, 5 * MIN);
        at(Duration::from_secs(1)).await;
        h.fake.set(Fake::Revoked);
        // The check at t=5m sees the revocation: grace runs until 10m.
        at(5 * MIN).await;
        let s = h.state.snapshot();
        assert!(matches!(s.health, MasterKeyHealth::Revoked { .. }), "{s:?}");
        assert_eq!(s.gauge(), 1);
        assert!(s.revoked_for.is_some());
        assert!(!h.ring.is_failed_closed());
        at(4 * MIN + Duration::from_secs(57)).await; // t = 9m58s
        assert!(!h.ring.is_failed_closed());
        at(Duration::from_secs(3)).await; // t = 10m01s
        assert!(h.ring.is_failed_closed());
        let s = h.state.snapshot();
        assert_eq!(s.gauge(), 2);
        match s.health {
            MasterKeyHealth::FailedClosed { reason } => {
                assert!(reason.contains("KeyState Disabled"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // The watcher ends after failing closed.
        let _ = h.stop.take();
        tokio::time::timeout(Duration::from_secs(1), &mut h.task)
            .await
            .expect("watcher ended")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn grace_is_checked_on_time_even_with_long_interval() {
        let h = start(Fake::Revoked, 60 * MIN, 2 * MIN);
        at(2 * MIN - Duration::from_secs(1)).await;
        assert!(!h.ring.is_failed_closed());
        at(Duration::from_secs(2)).await;
        assert!(h.ring.is_failed_closed(), "re-checked when the grace ended");
        assert_eq!(h.fake.calls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn reenabled_within_grace_recovers() {
        let h = start(Fake::Revoked, MIN, 5 * MIN);
        at(2 * MIN + Duration::from_secs(1)).await;
        assert!(matches!(
            h.state.snapshot().health,
            MasterKeyHealth::Revoked { .. }
        ));
        h.fake.set(Fake::Enabled);
        at(MIN).await;
        assert_eq!(h.state.snapshot().health, MasterKeyHealth::Ok);
        // A later revocation starts a fresh grace period.
        h.fake.set(Fake::Revoked);
        at(4 * MIN).await;
        assert!(!h.ring.is_failed_closed());
        at(2 * MIN).await;
        assert!(h.ring.is_failed_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn outage_is_not_revocation() {
        let h = start(Fake::Down, MIN, MIN);
        at(120 * MIN).await;
        let s = h.state.snapshot();
        assert_eq!(s.health, MasterKeyHealth::Ok);
        assert!(!s.provider_reachable);
        assert!(s.failed_checks >= 100);
        assert!(s.last_error.unwrap().contains("connection refused"));
        assert!(!h.ring.is_failed_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn grace_end_during_outage_waits_for_a_confirmed_revocation() {
        let h = start(Fake::Revoked, MIN, 3 * MIN);
        at(Duration::from_secs(30)).await;
        h.fake.set(Fake::Down);
        at(10 * MIN).await;
        assert!(!h.ring.is_failed_closed(), "no fresh Revoked answer yet");
        assert!(matches!(
            h.state.snapshot().health,
            MasterKeyHealth::Revoked { .. }
        ));
        h.fake.set(Fake::Revoked);
        at(MIN + Duration::from_secs(1)).await;
        assert!(h.ring.is_failed_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_grace_fails_closed_at_once() {
        let h = start(Fake::Revoked, MIN, Duration::ZERO);
        at(Duration::from_millis(1)).await;
        assert!(h.ring.is_failed_closed());
        assert!(h.state.is_failed_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_watcher() {
        let mut h = start(Fake::Enabled, MIN, MIN);
        at(Duration::from_secs(1)).await;
        h.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(1), &mut h.task)
            .await
            .expect("watcher stopped")
            .unwrap();
        let checks = h.state.snapshot().checks;
        at(10 * MIN).await;
        assert_eq!(h.state.snapshot().checks, checks);
    }

    #[tokio::test(start_paused = true)]
    async fn canary_notices_a_withdrawn_decrypt_permission() {
        let fake = FakeProvider::new(Fake::Enabled);
        let ring = ring();
        let state = Arc::new(RevocationState::new());
        let canary = Canary {
            wrapped: WrappedKey(vec![1; 60]),
            context: EncryptionContext::new(),
        };
        let watched = Arc::new(WatchedKey::new(fake.clone(), Some(canary)));
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(watch_key(
            watched,
            ring.clone(),
            MIN,
            2 * MIN,
            state.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        at(Duration::from_secs(1)).await;
        assert_eq!(fake.unwraps.load(Ordering::Relaxed), 1, "canary unwrapped");
        fake.set(Fake::DecryptDenied);
        at(MIN).await; // t = 1m01: denied, grace until 3m
        let s = state.snapshot();
        assert!(
            matches!(s.health, MasterKeyHealth::Revoked { ref reason, .. }
            if reason.contains("no longer unwraps the canary")),
            "{s:?}"
        );
        at(MIN + Duration::from_secs(58)).await; // t = 2m59
        assert!(!ring.is_failed_closed());
        at(Duration::from_secs(3)).await; // t = 3m02
        assert!(ring.is_failed_closed());
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("watcher ended")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn replaced_target_is_checked_from_the_next_check() {
        let old = FakeProvider::new(Fake::Enabled);
        let new = FakeProvider::new(Fake::Enabled);
        let ring = ring();
        let state = Arc::new(RevocationState::new());
        let watched = Arc::new(WatchedKey::new(old.clone(), None));
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        let _task = tokio::spawn(watch_key(
            watched.clone(),
            ring.clone(),
            MIN,
            MIN,
            state.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        at(Duration::from_secs(1)).await;
        watched.replace(new.clone(), None);
        // The old key is disabled after the rewrap: nobody asks it any more.
        old.set(Fake::Revoked);
        at(5 * MIN).await;
        assert_eq!(old.calls.load(Ordering::Relaxed), 1);
        assert!(new.calls.load(Ordering::Relaxed) >= 4);
        assert!(!ring.is_failed_closed());
        assert_eq!(state.snapshot().health, MasterKeyHealth::Ok);
    }

    #[test]
    fn state_machine_pure() {
        let s = RevocationState::new();
        let t0 = Instant::now();
        let g = Duration::from_secs(300);
        assert_eq!(
            s.apply(t0, Ok(MasterKeyState::Enabled), g),
            Verdict::Continue
        );
        assert_eq!(
            s.apply(t0, Ok(MasterKeyState::Revoked("x".into())), g),
            Verdict::Continue
        );
        assert_eq!(
            s.next_delay(t0 + Duration::from_secs(100), MIN * 5, g),
            Duration::from_secs(200)
        );
        assert_eq!(
            s.apply(t0 + g, Err(KeyError::Unavailable("down".into())), g),
            Verdict::Continue
        );
        assert!(matches!(
            s.apply(t0 + g, Ok(MasterKeyState::Revoked("x".into())), g),
            Verdict::FailClosed(_)
        ));
        // Once closed, stays closed.
        assert_eq!(
            s.apply(t0 + g, Ok(MasterKeyState::Enabled), g),
            Verdict::Continue
        );
        assert!(s.is_failed_closed());
    }
}
