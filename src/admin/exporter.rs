//! The metrics exporter: the Prometheus recorder, the HELP text of every
//! series, and the scrape-time sources it reads.
//!
//! * **Request series are the server's.** They are registered by
//!   [`crate::server::observe::RequestMetrics`] with the recorder installed
//!   here and recorded by the server itself; this module only describes them.
//! * **Scrape-time export of existing atomics.** Key-cache counters
//!   ([`crate::crypto::CacheStats`]), KMS call counters
//!   ([`crate::keys::aws::KmsCallStats`]), revocation state, connections,
//!   readiness and the process's CPU, memory and file descriptors are read
//!   when `/metrics` is scraped, so they cost nothing on the I/O path.
//! * **Real histograms.** Every `*_seconds` histogram gets the storage-I/O
//!   [`BUCKETS`] (5 µs .. 10 s); without explicit buckets the exporter would
//!   emit summaries, which cannot be aggregated across sidecars.
//!
//! Labels are bounded: `export` (configured at start-up), `op` (seven NBD
//! commands), `result` (`ok` or an error kind); KMS series have `op` and
//! `outcome`. Nothing per offset, per client or per key.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use metrics::{Counter, Gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::AdminError;
use crate::crypto::KeyRing;
use crate::health::Health;
use crate::keys::aws::{KmsCallStats, KmsOp};
use crate::keys::revocation::RevocationState;
use crate::server::observe::RequestMetrics;
use crate::store::sweep::Sweeper;
use crate::store::{Export, Store};

/// Histogram buckets (seconds) for every latency histogram: from a cached
/// page-cache hit through NVMe and network disks to a stalled device.
pub const BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Metric names, shared by the code, the tests, the rules and doc/metrics.md.
pub mod names {
    pub use crate::server::observe::names::*;

    /// Gauge 1 with `version` and `encryption` (`on`/`off`) labels.
    pub const BUILD_INFO: &str = "ear_build_info";
    /// Counter of derived-key cache hits.
    pub const KEY_CACHE_HITS: &str = "ear_key_cache_hits_total";
    /// Counter of derived-key cache misses.
    pub const KEY_CACHE_MISSES: &str = "ear_key_cache_misses_total";
    /// Counter of derived-key cache evictions.
    pub const KEY_CACHE_EVICTIONS: &str = "ear_key_cache_evictions_total";
    /// Counter of HKDF key derivations.
    pub const KEY_DERIVATIONS: &str = "ear_key_derivations_total";
    /// Counter of KMS calls by `op`, `outcome` (`ok`/`unavailable`/`refused`).
    pub const KMS_CALLS: &str = "ear_kms_calls_total";
    /// Counter of seconds spent in KMS calls by `op` (including SDK retries).
    pub const KMS_CALL_SECONDS: &str = "ear_kms_call_seconds_total";
    /// Counter of master-key revocation checks.
    pub const REVOCATION_CHECKS: &str = "ear_revocation_checks_total";
    /// Counter of revocation checks that got no verdict.
    pub const REVOCATION_CHECK_FAILURES: &str = "ear_revocation_check_failures_total";
    /// Gauge: master-key health, 0 ok, 1 revoked (grace running), 2 failed closed.
    pub const MASTER_KEY_STATE: &str = "ear_master_key_state";
    /// Gauge 1 while the universe key is in memory and usable.
    pub const UNIVERSE_KEY_LOADED: &str = "ear_universe_key_loaded";
    /// Gauge 1 after a fail-closed wipe of the keys.
    pub const FAIL_CLOSED: &str = "ear_fail_closed";
    /// Gauge: universe-key version used for new writes.
    pub const ACTIVE_KEY_VERSION: &str = "ear_active_key_version";
    /// Gauge: open NBD connections.
    pub const OPEN_CONNECTIONS: &str = "ear_open_connections";
    /// Gauge: exports served.
    pub const EXPORTS: &str = "ear_exports";
    /// Gauge 1 when `/readyz` answers 200.
    pub const READY: &str = "ear_ready";
    /// Counter: blocks found matching neither slot (read as zeros, or EIO
    /// with per-block integrity), by `export`.
    pub const BLOCKS_UNRECOVERABLE: &str = "ear_blocks_unrecoverable_total";
    /// Gauge: key epoch new writes use, by `export`.
    pub const KEY_EPOCH: &str = "ear_key_epoch";
    /// Gauge: block writes taken in the current key epoch, by `export`.
    pub const KEY_EPOCH_WRITES: &str = "ear_key_epoch_writes";
    /// Gauge: fraction of groups the scrub after an unclean shutdown has
    /// passed (1 when done or not needed), by `export`.
    pub const SCRUB_PROGRESS: &str = "ear_scrub_progress_ratio";
    /// Gauge: blocks whose content is under a universe-key version, by
    /// `export` and `version` (exact once the census finished).
    pub const KEY_VERSION_BLOCKS: &str = "ear_key_version_blocks";
    /// Gauge: universe-key versions loaded in memory.
    pub const KEY_VERSIONS_LOADED: &str = "ear_key_versions_loaded";
    /// Gauge: Unix time the active universe-key version was created.
    pub const KEY_LAST_ROTATION: &str = "ear_key_last_rotation_timestamp_seconds";
    /// Gauge: progress of the re-encryption sweep, 0..1 (1 when nothing is left).
    pub const SWEEP_PROGRESS: &str = "ear_sweep_progress_ratio";
    /// Gauge: blocks still under an older key version (all exports).
    pub const SWEEP_REMAINING: &str = "ear_sweep_remaining_blocks";
    /// Gauge: re-encryption rate over the last seconds, bytes per second.
    pub const SWEEP_RATE: &str = "ear_sweep_rate_bytes_per_second";
    /// Gauge: estimated seconds until the sweep is done (-1 when unknown).
    pub const SWEEP_ETA: &str = "ear_sweep_eta_seconds";
    /// Counter: blocks the sweep re-encrypted.
    pub const SWEEP_REWRITTEN: &str = "ear_sweep_rewritten_blocks_total";
    /// Gauge 1 while an operator has paused the sweep.
    pub const SWEEP_PAUSED: &str = "ear_sweep_paused";
    /// Gauge: unix time of the last successful backup, by `export`.
    pub const BACKUP_LAST_SUCCESS: &str = "ear_backup_last_success_timestamp_seconds";
    /// Gauge: wall time of the last successful backup, by `export`.
    pub const BACKUP_LAST_DURATION: &str = "ear_backup_last_duration_seconds";
    /// Gauge: bytes the last successful backup uploaded, by `export`.
    pub const BACKUP_LAST_BYTES: &str = "ear_backup_last_bytes";
    /// Gauge: how long I/O was held for the last backup's cut, by `export`.
    pub const BACKUP_LAST_CUT_PAUSE: &str = "ear_backup_last_cut_pause_seconds";
    /// Counter: backups that failed, by `export`.
    pub const BACKUP_FAILURES: &str = "ear_backup_failures_total";
}

/// Records a successful backup of `export` taken through this sidecar.
pub fn record_backup(export: &str, stats: &crate::backup::BackupStats, pause: std::time::Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let e = export.to_string();
    metrics::gauge!(names::BACKUP_LAST_SUCCESS, "export" => e.clone()).set(now);
    metrics::gauge!(names::BACKUP_LAST_DURATION, "export" => e.clone())
        .set(stats.duration.as_secs_f64());
    metrics::gauge!(names::BACKUP_LAST_BYTES, "export" => e.clone())
        .set(stats.bytes_uploaded as f64);
    metrics::gauge!(names::BACKUP_LAST_CUT_PAUSE, "export" => e).set(pause.as_secs_f64());
}

/// Records a failed backup of `export`.
pub fn record_backup_failure(export: &str) {
    metrics::counter!(names::BACKUP_FAILURES, "export" => export.to_string()).increment(1);
}

/// Registers HELP text and units of every metric with the current recorder.
pub fn describe_all() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_gauge!(
        BUILD_INFO,
        "Build information: version and whether encryption at rest is on."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time to execute one NBD request (handler wall time, excluding socket I/O and queueing)."
    );
    describe_histogram!(
        REQUEST_CRYPTO,
        Unit::Seconds,
        "Time spent in the cipher (encrypt/decrypt, integrity) within one request."
    );
    describe_histogram!(
        REQUEST_STORAGE,
        Unit::Seconds,
        "Time spent in backing-file I/O within one request."
    );
    describe_counter!(
        REQUESTS,
        "NBD requests completed, by result (ok or error kind)."
    );
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Payload bytes of successful requests (read, written, zeroed or trimmed)."
    );
    describe_counter!(KEY_CACHE_HITS, "Derived file-key cache hits.");
    describe_counter!(KEY_CACHE_MISSES, "Derived file-key cache misses.");
    describe_counter!(KEY_CACHE_EVICTIONS, "Derived file-key cache evictions.");
    describe_counter!(KEY_DERIVATIONS, "HKDF file-key derivations.");
    describe_counter!(
        KMS_CALLS,
        "KMS calls by operation and outcome (ok, unavailable, refused)."
    );
    describe_counter!(REVOCATION_CHECKS, "Master-key revocation checks performed.");
    describe_counter!(
        REVOCATION_CHECK_FAILURES,
        "Master-key revocation checks that got no verdict (KMS unreachable or erroring)."
    );
    describe_gauge!(
        MASTER_KEY_STATE,
        "Master-key health: 0 ok, 1 reported revoked (grace period running), 2 failed closed."
    );
    describe_gauge!(
        UNIVERSE_KEY_LOADED,
        "1 while the universe key is unwrapped in memory and usable."
    );
    describe_gauge!(
        FAIL_CLOSED,
        "1 after the keys were wiped (fail-closed); every I/O fails until a restart."
    );
    describe_gauge!(
        ACTIVE_KEY_VERSION,
        "Universe-key version used for new writes."
    );
    describe_counter!(
        BLOCKS_UNRECOVERABLE,
        "Blocks matching neither of their slots (a write torn by power loss, or damage)."
    );
    describe_gauge!(KEY_EPOCH, "Key epoch new block writes use.");
    describe_gauge!(
        BACKUP_LAST_SUCCESS,
        Unit::Seconds,
        "Unix time of the last successful backup taken through this sidecar."
    );
    describe_gauge!(
        BACKUP_LAST_DURATION,
        Unit::Seconds,
        "Wall time of the last successful backup."
    );
    describe_gauge!(
        BACKUP_LAST_BYTES,
        Unit::Bytes,
        "Bytes the last successful backup uploaded (chunks, index, manifest)."
    );
    describe_gauge!(
        BACKUP_LAST_CUT_PAUSE,
        Unit::Seconds,
        "How long I/O to the export was held to take the last backup's cut."
    );
    describe_counter!(BACKUP_FAILURES, "Backups that failed.");
    describe_gauge!(
        KEY_EPOCH_WRITES,
        "Block writes taken in the current key epoch."
    );
    describe_gauge!(
        SCRUB_PROGRESS,
        "Fraction of groups scrubbed after an unclean shutdown (1 when done)."
    );
    describe_gauge!(
        KEY_VERSION_BLOCKS,
        "Blocks whose content is under this universe-key version (exact once counted)."
    );
    describe_gauge!(
        KEY_VERSIONS_LOADED,
        "Universe-key versions loaded in memory."
    );
    describe_gauge!(
        KEY_LAST_ROTATION,
        Unit::Seconds,
        "Unix time the active universe-key version was created."
    );
    describe_gauge!(
        SWEEP_PROGRESS,
        "Progress of the re-encryption sweep after a key rotation (1 when nothing is left)."
    );
    describe_gauge!(
        SWEEP_REMAINING,
        "Blocks still under an older universe-key version."
    );
    describe_gauge!(
        SWEEP_RATE,
        "Re-encryption rate of the sweep over the last seconds, in bytes per second."
    );
    describe_gauge!(
        SWEEP_ETA,
        Unit::Seconds,
        "Estimated seconds until the re-encryption sweep is done (-1 when unknown)."
    );
    describe_counter!(SWEEP_REWRITTEN, "Blocks the re-encryption sweep rewrote.");
    describe_gauge!(
        SWEEP_PAUSED,
        "1 while an operator has paused the re-encryption sweep."
    );
    describe_gauge!(OPEN_CONNECTIONS, "Open NBD client connections.");
    describe_gauge!(EXPORTS, "Exports served.");
    describe_gauge!(
        READY,
        "1 when /readyz answers 200 (keys loaded, socket listening, not draining)."
    );
}

/// Builds a recorder with [`BUCKETS`] for every histogram.
pub fn build_recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        // Only fails on an empty slice.
        .unwrap_or_else(|_| PrometheusBuilder::new())
        .build_recorder()
}

#[derive(Debug)]
struct KeyGauges {
    hits: Counter,
    misses: Counter,
    evictions: Counter,
    derivations: Counter,
    active: Gauge,
}

#[derive(Debug)]
struct KmsHandles {
    // Per op: [ok, unavailable, refused].
    ops: Vec<(KmsOp, [Counter; 3])>,
}

#[derive(Debug)]
struct RevocationHandles {
    state: Gauge,
    checks: Counter,
    failures: Counter,
}

/// The metrics layer of one process: the recorder handle, the health latch
/// and the late-bound sources read at scrape time.
pub struct Metrics {
    handle: PrometheusHandle,
    health: Arc<Health>,
    process: metrics_process::Collector,
    keyring: OnceLock<(Arc<KeyRing>, KeyGauges)>,
    kms: OnceLock<(Arc<KmsCallStats>, KmsHandles)>,
    revocation: OnceLock<(Arc<RevocationState>, RevocationHandles)>,
    universe_loaded: Gauge,
    fail_closed: Gauge,
    connections: Gauge,
    exports: Gauge,
    ready: Gauge,
    store: OnceLock<Vec<(Arc<Export>, StoreHandles)>>,
    sweep: OnceLock<(Sweeper, SweepHandles)>,
}

/// Key-lifecycle series: the sweep's status and key-version counts.
struct SweepHandles {
    progress: Gauge,
    remaining: Gauge,
    rate: Gauge,
    eta: Gauge,
    rewritten: Counter,
    paused: Gauge,
    loaded: Gauge,
    last_rotation: Gauge,
}

/// Per-export series read from the store's counters at scrape time.
struct StoreHandles {
    unrecoverable: Counter,
    epoch: Gauge,
    epoch_writes: Gauge,
    scrub: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates the metrics layer around `handle`, registering the
    /// process-level series with the current recorder.
    pub fn new(handle: PrometheusHandle, health: Arc<Health>, encryption_on: bool) -> Self {
        describe_all();
        let process = metrics_process::Collector::default();
        process.describe();
        metrics::gauge!(
            names::BUILD_INFO,
            "version" => env!("CARGO_PKG_VERSION"),
            "encryption" => if encryption_on { "on" } else { "off" }
        )
        .set(1.0);
        let m = Self {
            handle,
            health,
            process,
            keyring: OnceLock::new(),
            kms: OnceLock::new(),
            revocation: OnceLock::new(),
            universe_loaded: metrics::gauge!(names::UNIVERSE_KEY_LOADED),
            fail_closed: metrics::gauge!(names::FAIL_CLOSED),
            connections: metrics::gauge!(names::OPEN_CONNECTIONS),
            exports: metrics::gauge!(names::EXPORTS),
            ready: metrics::gauge!(names::READY),
            store: OnceLock::new(),
            sweep: OnceLock::new(),
        };
        m.refresh();
        m
    }

    /// Installs a process-wide recorder and returns the metrics layer.
    pub fn install(health: Arc<Health>, encryption_on: bool) -> Result<Arc<Self>, AdminError> {
        let recorder = build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|_| AdminError::RecorderInstalled)?;
        Ok(Arc::new(Self::new(handle, health, encryption_on)))
    }

    /// Registers the per-request series of every export of `store` with
    /// this recorder, for the server to record into.
    pub fn request_metrics(&self, store: &Store) -> RequestMetrics {
        let names: Vec<&str> = store.exports().map(|e| e.name()).collect();
        self.exports.set(names.len() as f64);
        let handles = store
            .exports()
            .map(|e| {
                let n = e.name().to_string();
                let h = StoreHandles {
                    unrecoverable: metrics::counter!(names::BLOCKS_UNRECOVERABLE, "export" => n.clone()),
                    epoch: metrics::gauge!(names::KEY_EPOCH, "export" => n.clone()),
                    epoch_writes: metrics::gauge!(names::KEY_EPOCH_WRITES, "export" => n.clone()),
                    scrub: metrics::gauge!(names::SCRUB_PROGRESS, "export" => n),
                };
                (Arc::clone(e), h)
            })
            .collect();
        let _ = self.store.set(handles);
        RequestMetrics::new(names)
    }

    /// A sidecar started with encryption off was switched on (`keys
    /// encrypt`): the build-info series says so.
    pub fn set_encryption_on(&self) {
        let info = |mode: &'static str| metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "encryption" => mode);
        info("off").set(0.0);
        info("on").set(1.0);
    }

    /// Plugs in the key ring (encryption on) for key-cache and key-state series.
    pub fn set_key_ring(&self, ring: Arc<KeyRing>) {
        let g = KeyGauges {
            hits: metrics::counter!(names::KEY_CACHE_HITS),
            misses: metrics::counter!(names::KEY_CACHE_MISSES),
            evictions: metrics::counter!(names::KEY_CACHE_EVICTIONS),
            derivations: metrics::counter!(names::KEY_DERIVATIONS),
            active: metrics::gauge!(names::ACTIVE_KEY_VERSION),
        };
        let _ = self.keyring.set((ring, g));
    }

    /// Plugs in the re-encryption sweep (encryption on): sweep and
    /// key-version series.
    pub fn set_sweeper(&self, sweeper: Sweeper) {
        let h = SweepHandles {
            progress: metrics::gauge!(names::SWEEP_PROGRESS),
            remaining: metrics::gauge!(names::SWEEP_REMAINING),
            rate: metrics::gauge!(names::SWEEP_RATE),
            eta: metrics::gauge!(names::SWEEP_ETA),
            rewritten: metrics::counter!(names::SWEEP_REWRITTEN),
            paused: metrics::gauge!(names::SWEEP_PAUSED),
            loaded: metrics::gauge!(names::KEY_VERSIONS_LOADED),
            last_rotation: metrics::gauge!(names::KEY_LAST_ROTATION),
        };
        let _ = self.sweep.set((sweeper, h));
    }

    /// Copies the sweep status and per-version block counts.
    fn refresh_sweep(&self) {
        let Some((sw, h)) = self.sweep.get() else {
            return;
        };
        let st = sw.status();
        h.progress.set(st.progress);
        h.remaining.set(st.remaining_blocks as f64);
        h.rate.set(st.rate_bytes_per_sec);
        h.eta.set(st.eta_seconds.unwrap_or(-1.0));
        h.rewritten.absolute(sw.rewritten());
        h.paused.set(f64::from(u8::from(sw.is_paused())));
        let mut loaded = vec![];
        if let Some((ring, _)) = self.keyring.get() {
            let snap = ring.snapshot();
            h.loaded.set(snap.versions.len() as f64);
            h.last_rotation.set(ring.rotated_unix() as f64);
            loaded = snap.versions;
        }
        for (e, _) in self.store.get().into_iter().flatten() {
            let counts = e.versions().snapshot().by_version;
            // Loaded versions always have a series (0 when unused), so a
            // version that drains to zero is seen doing so.
            let mut versions: Vec<u32> = counts
                .keys()
                .copied()
                .chain(loaded.iter().copied())
                .collect();
            versions.sort_unstable();
            versions.dedup();
            for v in versions {
                metrics::gauge!(names::KEY_VERSION_BLOCKS,
                    "export" => e.name().to_string(), "version" => v.to_string())
                .set(counts.get(&v).copied().unwrap_or(0) as f64);
            }
        }
    }

    /// Plugs in the AWS KMS provider's call counters.
    pub fn set_kms_stats(&self, stats: Arc<KmsCallStats>) {
        let ops = KmsOp::ALL
            .iter()
            .map(|&op| {
                let outcome = |o: &'static str| {
                    metrics::counter!(names::KMS_CALLS, "op" => op.name(), "outcome" => o)
                };
                (
                    op,
                    [outcome("ok"), outcome("unavailable"), outcome("refused")],
                )
            })
            .collect();
        let _ = self.kms.set((stats, KmsHandles { ops }));
    }

    /// Plugs in the revocation watcher's state.
    pub fn set_revocation(&self, state: Arc<RevocationState>) {
        let h = RevocationHandles {
            state: metrics::gauge!(names::MASTER_KEY_STATE),
            checks: metrics::counter!(names::REVOCATION_CHECKS),
            failures: metrics::counter!(names::REVOCATION_CHECK_FAILURES),
        };
        let _ = self.revocation.set((state, h));
    }

    /// Readiness: `Ok(())`, or why not (see [`Health::readiness`]).
    pub fn readiness(&self) -> Result<(), &'static str> {
        self.health.readiness()
    }

    /// Copies the scrape-time sources (atomics, snapshots) into their series.
    pub fn refresh(&self) {
        let failed = self.health.failed_closed();
        self.fail_closed.set(f64::from(u8::from(failed)));
        self.connections
            .set(self.health.connections.load(Ordering::Relaxed) as f64);
        self.ready
            .set(f64::from(u8::from(self.readiness().is_ok())));
        let loaded = match self.keyring.get() {
            Some((ring, g)) => {
                let s = ring.stats();
                g.hits.absolute(s.hits.load(Ordering::Relaxed));
                g.misses.absolute(s.misses.load(Ordering::Relaxed));
                g.evictions.absolute(s.evictions.load(Ordering::Relaxed));
                g.derivations
                    .absolute(s.derivations.load(Ordering::Relaxed));
                g.active.set(f64::from(ring.active_version()));
                !failed
            }
            None => false,
        };
        self.universe_loaded.set(f64::from(u8::from(loaded)));
        if let Some((stats, h)) = self.kms.get() {
            for (op, [ok, unavailable, refused]) in &h.ops {
                let c = stats.op(*op);
                ok.absolute(c.ok.load(Ordering::Relaxed));
                unavailable.absolute(c.unavailable.load(Ordering::Relaxed));
                refused.absolute(c.refused.load(Ordering::Relaxed));
            }
        }
        for (e, h) in self.store.get().into_iter().flatten() {
            let c = e.counters();
            h.unrecoverable
                .absolute(c.unrecoverable_blocks.load(Ordering::Relaxed));
            h.epoch.set(f64::from(c.epoch.load(Ordering::Relaxed)));
            h.epoch_writes
                .set(c.writes_in_epoch.load(Ordering::Relaxed) as f64);
            let total = c.scrub_groups_total.load(Ordering::Relaxed);
            let done = c.scrub_groups_done.load(Ordering::Relaxed).min(total);
            h.scrub.set(if total == 0 {
                1.0
            } else {
                done as f64 / total as f64
            });
        }
        self.refresh_sweep();
        if let Some((state, h)) = self.revocation.get() {
            let s = state.snapshot();
            h.state.set(s.gauge() as f64);
            h.checks.absolute(s.checks);
            h.failures.absolute(s.failed_checks);
        }
        self.process.collect();
    }

    /// Folds recorded histogram samples into their buckets.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Refreshes the scrape-time series and renders the Prometheus text.
    pub fn render(&self) -> String {
        self.refresh();
        let mut text = self.handle.render();
        self.render_kms_seconds(&mut text);
        text
    }

    /// `ear_kms_call_seconds_total` is a fractional-seconds counter, which
    /// the facade's integer counters cannot carry; it is appended as its own
    /// metric family (same text format, read from the provider's atomics).
    fn render_kms_seconds(&self, out: &mut String) {
        use std::fmt::Write;
        let Some((stats, _)) = self.kms.get() else {
            return;
        };
        let name = names::KMS_CALL_SECONDS;
        let _ = writeln!(
            out,
            "# HELP {name} Total time spent in KMS calls, including SDK retries.\n# TYPE {name} counter"
        );
        for op in KmsOp::ALL {
            let micros = stats.op(op).latency_micros_sum.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}{{op=\"{}\"}} {}",
                op.name(),
                micros as f64 / 1e6
            );
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::observe::tests::line_value;

    #[test]
    fn scrape_time_sources_and_readiness() {
        let rec = build_recorder();
        let health = Arc::new(Health::default());
        let m = metrics::with_local_recorder(&rec, || {
            let m = Metrics::new(rec.handle(), Arc::clone(&health), true);
            let mut keys = std::collections::BTreeMap::new();
            keys.insert(3, crate::crypto::SecretKey::generate().unwrap());
            let ring = Arc::new(KeyRing::new(keys, 3, 16).unwrap());
            m.set_key_ring(Arc::clone(&ring));
            health.watch_key_ring(Arc::clone(&ring));
            m.set_kms_stats(Arc::new(KmsCallStats::default()));
            m.set_revocation(Arc::new(RevocationState::new()));
            (m, ring)
        });
        let (m, ring) = m;
        assert_eq!(m.readiness(), Err("starting"));
        health.ready.store(true, Ordering::Release);
        health.connections.store(2, Ordering::Relaxed);
        assert_eq!(m.readiness(), Ok(()));
        ring.stats().hits.store(5, Ordering::Relaxed);
        let text = m.render();
        assert_eq!(line_value(&text, "ear_key_cache_hits_total "), Some(5.0));
        assert_eq!(line_value(&text, "ear_active_key_version "), Some(3.0));
        assert_eq!(line_value(&text, "ear_universe_key_loaded "), Some(1.0));
        assert_eq!(line_value(&text, "ear_open_connections "), Some(2.0));
        assert_eq!(line_value(&text, "ear_ready "), Some(1.0));
        assert_eq!(line_value(&text, "ear_master_key_state "), Some(0.0));
        assert!(text.contains("ear_build_info{version=\""));
        assert!(text.contains("encryption=\"on\"} 1"));
        assert!(text.contains("ear_kms_calls_total{op=\"Decrypt\",outcome=\"ok\"} 0"));
        ring.wipe("test");
        assert_eq!(m.readiness(), Err("failed closed"));
        let text = m.render();
        assert_eq!(line_value(&text, "ear_fail_closed "), Some(1.0));
        assert_eq!(line_value(&text, "ear_universe_key_loaded "), Some(0.0));
        assert_eq!(line_value(&text, "ear_ready "), Some(0.0));
        health.draining.store(true, Ordering::Release);
        assert_eq!(m.readiness(), Err("draining"));
    }
}
