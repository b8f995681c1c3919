//! Prometheus metrics and the health endpoints, on one small HTTP listener.
//!
//! Owns everything `--metrics-addr` serves: `/metrics` (Prometheus text
//! format, rendered by `metrics-exporter-prometheus` behind the `metrics`
//! facade), `/livez` (the process answers) and `/readyz` (keys unwrapped, NBD
//! socket listening, not draining, not failed closed).
//!
//! Why it looks like this:
//!
//! * **Hot path without a global lock.** Every per-request series is
//!   registered once, when the exports are known ([`Metrics::register_exports`]),
//!   into a table of `metrics` handles that is published through a
//!   [`OnceLock`]. [`record_request`] (called by `server::observe` once per
//!   completed request) does one lock-free `OnceLock` load, one read-only map
//!   lookup by export name and a few atomic updates on the handles. Only the
//!   rare error results go through the facade's registry lookup.
//! * **Scrape-time export of existing atomics.** Key-cache counters
//!   ([`crate::crypto::CacheStats`]), KMS call counters
//!   ([`crate::keys::aws::KmsCallStats`]), revocation state, connections and
//!   readiness are read when `/metrics` is scraped, so they cost nothing on
//!   the I/O path.
//! * **Real histograms.** Every `*_seconds` histogram gets the storage-I/O
//!   [`BUCKETS`] (5 µs .. 10 s); without explicit buckets the exporter would
//!   emit summaries, which cannot be aggregated across sidecars.
//! * **One hand-rolled HTTP/1.1 responder.** GET only, request head bounded
//!   to [`MAX_REQUEST_HEAD`] bytes and [`REQUEST_TIMEOUT`], `Connection:
//!   close`, at most [`MAX_HTTP_CONNECTIONS`] at a time. That is all a
//!   Prometheus scraper and a kubelet probe need, and keeps hyper out.
//!
//! Labels are bounded: `export` (configured at start-up), `op` (seven NBD
//! commands), `result` (`ok` or a [`crate::store::StoreError::kind`]); KMS
//! series have `op` and `outcome`. Nothing per offset, per client or per key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::crypto::KeyRing;
use crate::keys::aws::{KmsCallStats, KmsOp};
use crate::keys::revocation::RevocationState;
use crate::server::handler::{Completion, Op};
use crate::server::Health;
use crate::store::{Export, Store};

/// Histogram buckets (seconds) for every latency histogram: from a cached
/// page-cache hit through NVMe and network disks to a stalled device.
pub const BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Largest HTTP request head accepted (request line plus headers).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent HTTP connections; more are closed at once.
pub const MAX_HTTP_CONNECTIONS: usize = 16;
/// How often recorded histogram samples are folded into their buckets (keeps
/// memory flat between scrapes).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Metric names, shared by the code, the tests, the rules and doc/metrics.md.
pub mod names {
    /// Gauge 1 with `version` and `encryption` (`on`/`off`) labels.
    pub const BUILD_INFO: &str = "ear_build_info";
    /// Histogram of handler wall time per request, by `export`, `op`.
    pub const REQUEST_DURATION: &str = "ear_request_duration_seconds";
    /// Histogram of cipher time per request, by `export`, `op`.
    pub const REQUEST_CRYPTO: &str = "ear_request_crypto_seconds";
    /// Histogram of backing-storage time per request, by `export`, `op`.
    pub const REQUEST_STORAGE: &str = "ear_request_storage_seconds";
    /// Counter of requests by `export`, `op`, `result`.
    pub const REQUESTS: &str = "ear_requests_total";
    /// Counter of payload bytes of successful requests by `export`, `op`.
    pub const BYTES: &str = "ear_request_bytes_total";
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
}

/// Errors of the metrics layer.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not bind.
    #[error("metrics listener {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// Another global `metrics` recorder is installed already.
    #[error("a metrics recorder is already installed in this process")]
    RecorderInstalled,
}

const OPS: [Op; 7] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Trim,
    Op::WriteZeroes,
    Op::Cache,
    Op::BlockStatus,
];

fn op_index(op: Op) -> usize {
    match op {
        Op::Read => 0,
        Op::Write => 1,
        Op::Flush => 2,
        Op::Trim => 3,
        Op::WriteZeroes => 4,
        Op::Cache => 5,
        Op::BlockStatus => 6,
    }
}

/// Pre-registered handles of one (export, op).
#[derive(Debug)]
struct OpHandles {
    duration: Histogram,
    crypto: Histogram,
    storage: Histogram,
    ok: Counter,
    bytes: Counter,
}

/// The per-request series of every export, built once and then only read.
#[derive(Debug)]
pub struct RequestMetrics {
    exports: HashMap<Box<str>, [OpHandles; 7]>,
}

impl RequestMetrics {
    /// Registers the request series of `exports` with the current recorder
    /// (the global one, or a local one inside `metrics::with_local_recorder`).
    pub fn new<'a>(exports: impl IntoIterator<Item = &'a str>) -> Self {
        let exports = exports
            .into_iter()
            .map(|name| {
                let handles = OPS.map(|op| {
                    let labels = [("export", name.to_owned()), ("op", op.as_str().to_owned())];
                    OpHandles {
                        duration: metrics::histogram!(names::REQUEST_DURATION, &labels),
                        crypto: metrics::histogram!(names::REQUEST_CRYPTO, &labels),
                        storage: metrics::histogram!(names::REQUEST_STORAGE, &labels),
                        ok: metrics::counter!(
                            names::REQUESTS, "export" => name.to_owned(),
                            "op" => op.as_str(), "result" => "ok"
                        ),
                        bytes: metrics::counter!(names::BYTES, &labels),
                    }
                });
                (Box::from(name), handles)
            })
            .collect();
        Self { exports }
    }

    /// Records one completed request on `export`. Unknown exports are ignored.
    pub fn record(&self, export: &str, done: &Completion) {
        let Some(h) = self
            .exports
            .get(export)
            .and_then(|ops| ops.get(op_index(done.op)))
        else {
            return;
        };
        h.duration.record(done.elapsed);
        h.crypto.record(done.stats.crypto);
        h.storage.record(done.stats.storage);
        match done.error {
            None => {
                h.ok.increment(1);
                h.bytes.increment(done.bytes);
            }
            // Rare: resolved through the recorder's registry.
            Some(kind) => metrics::counter!(
                names::REQUESTS, "export" => export.to_owned(),
                "op" => done.op.as_str(), "result" => kind
            )
            .increment(1),
        }
    }
}

static REQUESTS: OnceLock<RequestMetrics> = OnceLock::new();

/// Records one completed request in the process-wide table, if metrics are
/// enabled and the exports were registered; otherwise does nothing. Called
/// from `server::observe` on the blocking pool; lock-free.
pub fn record_request(export: &str, done: &Completion) {
    if let Some(m) = REQUESTS.get() {
        m.record(export, done);
    }
}

/// Registers HELP text and units of every metric with the current recorder.
pub fn describe_all() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_gauge!(
        BUILD_INFO,
        "Build information: version and whether encryption at rest is on."
    );
    describe_counter!(
        BLOCKS_UNRECOVERABLE,
        "Blocks matching neither of their slots (a write torn by power loss, or damage)."
    );
    describe_gauge!(KEY_EPOCH, "Key epoch new block writes use.");
    describe_gauge!(
        KEY_EPOCH_WRITES,
        "Block writes taken in the current key epoch."
    );
    describe_gauge!(
        SCRUB_PROGRESS,
        "Fraction of groups scrubbed after an unclean shutdown (1 when done)."
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
    encryption_on: bool,
    keyring: OnceLock<(Arc<KeyRing>, KeyGauges)>,
    kms: OnceLock<(Arc<KmsCallStats>, KmsHandles)>,
    revocation: OnceLock<(Arc<RevocationState>, RevocationHandles)>,
    universe_loaded: Gauge,
    fail_closed: Gauge,
    connections: Gauge,
    exports: Gauge,
    ready: Gauge,
    store: OnceLock<Vec<(Arc<Export>, StoreHandles)>>,
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
        f.debug_struct("Metrics")
            .field("encryption_on", &self.encryption_on)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates the metrics layer around `handle`, registering the
    /// process-level series with the current recorder.
    pub fn new(handle: PrometheusHandle, health: Arc<Health>, encryption_on: bool) -> Self {
        describe_all();
        metrics::gauge!(
            names::BUILD_INFO,
            "version" => env!("CARGO_PKG_VERSION"),
            "encryption" => if encryption_on { "on" } else { "off" }
        )
        .set(1.0);
        let m = Self {
            handle,
            health,
            encryption_on,
            keyring: OnceLock::new(),
            kms: OnceLock::new(),
            revocation: OnceLock::new(),
            universe_loaded: metrics::gauge!(names::UNIVERSE_KEY_LOADED),
            fail_closed: metrics::gauge!(names::FAIL_CLOSED),
            connections: metrics::gauge!(names::OPEN_CONNECTIONS),
            exports: metrics::gauge!(names::EXPORTS),
            ready: metrics::gauge!(names::READY),
            store: OnceLock::new(),
        };
        m.refresh();
        m
    }

    /// Installs a process-wide recorder and returns the metrics layer.
    pub fn install(health: Arc<Health>, encryption_on: bool) -> Result<Arc<Self>, MetricsError> {
        let recorder = build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|_| MetricsError::RecorderInstalled)?;
        Ok(Arc::new(Self::new(handle, health, encryption_on)))
    }

    /// Registers the per-request series of every export of `store` and
    /// publishes them to [`record_request`]. Only the first call in a process
    /// publishes (the exports are fixed at start-up).
    pub fn register_exports(&self, store: &Store) {
        let names: Vec<&str> = store.exports().map(|e| e.name()).collect();
        self.exports.set(names.len() as f64);
        let _ = REQUESTS.set(RequestMetrics::new(names));
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

    fn failed_closed(&self) -> bool {
        self.keyring
            .get()
            .is_some_and(|(r, _)| r.is_failed_closed())
            || self
                .revocation
                .get()
                .is_some_and(|(r, _)| r.is_failed_closed())
    }

    /// Readiness: `Ok(())`, or why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.health.draining.load(Ordering::Acquire) {
            Err("draining")
        } else if self.failed_closed() {
            Err("failed closed")
        } else if !self.health.ready.load(Ordering::Acquire) {
            Err("starting")
        } else {
            Ok(())
        }
    }

    /// Copies the scrape-time sources (atomics, snapshots) into their series.
    pub fn refresh(&self) {
        let failed = self.failed_closed();
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
        if let Some((state, h)) = self.revocation.get() {
            let s = state.snapshot();
            h.state.set(s.gauge() as f64);
            h.checks.absolute(s.checks);
            h.failures.absolute(s.failed_checks);
        }
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

    /// Whether this sidecar encrypts.
    pub fn encryption_on(&self) -> bool {
        self.encryption_on
    }
}

/// Installs the global recorder, binds `addr` and serves `/metrics`,
/// `/livez` and `/readyz` on it from now on. Returns the metrics layer and
/// the bound address.
pub async fn start(
    addr: SocketAddr,
    health: Arc<Health>,
    encryption_on: bool,
) -> Result<(Arc<Metrics>, SocketAddr), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let metrics = Metrics::install(health, encryption_on)?;
    let handle = metrics.handle.clone();
    // Fold histogram samples into buckets off the async runtime.
    let _ = std::thread::Builder::new()
        .name("ear-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    tokio::spawn(serve_http(listener, Arc::clone(&metrics)));
    tracing::info!(addr = %local, "metrics and health endpoints listening");
    Ok((metrics, local))
}

/// Accepts HTTP connections on `listener` forever.
pub async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>) {
    let limit = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            continue; // dropped: too many concurrent scrapers
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _ = handle_http(stream, metrics).await;
            drop(permit);
        });
    }
}

/// A parsed HTTP request line.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestLine<'a> {
    /// Method, e.g. `GET`.
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
}

/// Parses the request line of an HTTP/1.x request head.
pub fn parse_request_line(head: &[u8]) -> Option<RequestLine<'_>> {
    let end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(head.get(..end)?).ok()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some(RequestLine { method, path })
}

/// Status, extra headers, content type and body for one request.
fn route(metrics: &Metrics, line: &RequestLine<'_>) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if line.method != "GET" {
        return (405, TEXT, "only GET is supported\n".into());
    }
    match line.path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/livez" => (200, TEXT, "ok\n".into()),
        "/readyz" => match metrics.readiness() {
            Ok(()) => (200, TEXT, "ready\n".into()),
            Err(why) => (503, TEXT, format!("not ready: {why}\n")),
        },
        _ => (
            404,
            TEXT,
            "not found; try /metrics, /livez, /readyz\n".into(),
        ),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

async fn handle_http(mut stream: TcpStream, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok::<bool, std::io::Error>(true);
            }
            if head.len() > MAX_REQUEST_HEAD {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let (status, ctype, body) = if !complete {
        (
            431,
            "text/plain; charset=utf-8",
            "request too large\n".into(),
        )
    } else {
        match parse_request_line(&head) {
            None => (400, "text/plain; charset=utf-8", "bad request\n".into()),
            Some(line) if line.method == "GET" && line.path == "/metrics" => {
                // Rendering folds pending histogram samples: keep it off the
                // async workers.
                let m = Arc::clone(&metrics);
                let body = tokio::task::spawn_blocking(move || m.render())
                    .await
                    .unwrap_or_default();
                (200, "text/plain; version=0.0.4; charset=utf-8", body)
            }
            Some(line) => route(&metrics, &line),
        }
    };
    let allow = if status == 405 { "Allow: GET\r\n" } else { "" };
    let header = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::IoStats;

    fn completion(op: Op, bytes: u64, error: Option<&'static str>) -> Completion {
        Completion {
            op,
            bytes,
            error,
            stats: IoStats {
                crypto: Duration::from_micros(30),
                storage: Duration::from_micros(70),
            },
            elapsed: Duration::from_micros(120),
        }
    }

    fn line_value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn request_series_are_histograms_with_buckets() {
        let rec = build_recorder();
        let handle = rec.handle();
        let table = metrics::with_local_recorder(&rec, || {
            describe_all();
            RequestMetrics::new(["a", "b"])
        });
        table.record("a", &completion(Op::Read, 4096, None));
        table.record("a", &completion(Op::Read, 4096, None));
        table.record("b", &completion(Op::Write, 512, None));
        metrics::with_local_recorder(&rec, || {
            table.record("a", &completion(Op::Read, 0, Some("io")))
        });
        table.record("nope", &completion(Op::Read, 1, None));
        let text = handle.render();
        assert!(text.contains("# TYPE ear_request_duration_seconds histogram"));
        assert!(text.contains("# TYPE ear_request_crypto_seconds histogram"));
        assert_eq!(
            line_value(&text, "ear_request_bytes_total{export=\"a\",op=\"read\"}"),
            Some(8192.0)
        );
        assert_eq!(
            line_value(
                &text,
                "ear_requests_total{export=\"a\",op=\"read\",result=\"ok\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            line_value(
                &text,
                "ear_requests_total{export=\"a\",op=\"read\",result=\"io\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            line_value(
                &text,
                "ear_request_duration_seconds_count{export=\"a\",op=\"read\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            line_value(
                &text,
                "ear_request_duration_seconds_bucket{export=\"a\",op=\"read\",le=\"0.00025\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            line_value(
                &text,
                "ear_request_duration_seconds_bucket{export=\"a\",op=\"read\",le=\"0.0001\"}"
            ),
            Some(0.0)
        );
        assert!(!text.contains("nope"));
    }

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

    #[test]
    fn request_line_parsing() {
        assert_eq!(
            parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(RequestLine {
                method: "GET",
                path: "/metrics"
            })
        );
        assert_eq!(parse_request_line(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"GET / HTTP/2\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"GET / HTTP/1.0 x\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"\xff / HTTP/1.1\r\n"), None);
        assert_eq!(parse_request_line(b"GET / HTTP/1.1"), None);
    }

    proptest::proptest! {
        #[test]
        fn request_line_parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_request_line(&bytes);
        }
    }
}
