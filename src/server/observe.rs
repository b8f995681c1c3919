//! What the server reports about each request: the [`Completion`] a handler
//! returns, and the per-(export, op) metric handles it is recorded into.
//!
//! The server owns these series, as a block device owns its metrics: they
//! are registered once with the current `metrics` recorder when the exports
//! are known ([`RequestMetrics::new`]), held in [`super::Shared`] and looked
//! up once per connection ([`RequestMetrics::export`]). Recording a request
//! is then a few atomic updates, with no global table and no lock. Only the
//! rare error results resolve their counter through the recorder.
//!
//! Labels are bounded: `export` (configured at start-up), `op` (seven NBD
//! commands) and `result` (`ok` or a store or handler error kind).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Histogram};

use crate::protocol::Op;
use crate::store::IoStats;

/// Names of the per-request series.
pub mod names {
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
}

/// What happened to one request, for metrics and logs.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The operation.
    pub op: Op,
    /// Payload bytes moved (read or written; zeroed/trimmed range length).
    pub bytes: u64,
    /// `None` on success, else a bounded error label (`io`, `corrupt`, …).
    pub error: Option<&'static str>,
    /// Cipher and storage time inside the request.
    pub stats: IoStats,
    /// Handler wall time (excludes socket I/O and queueing).
    pub elapsed: Duration,
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

/// The request series of one export, one set of handles per op.
#[derive(Debug)]
pub struct ExportMetrics {
    export: Box<str>,
    ops: [OpHandles; 7],
}

impl ExportMetrics {
    fn new(name: &str) -> Self {
        let ops = Op::ALL.map(|op| {
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
        Self {
            export: Box::from(name),
            ops,
        }
    }

    /// Records one completed request.
    pub fn record(&self, done: &Completion) {
        let Some(h) = self.ops.get(done.op.index()) else {
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
                names::REQUESTS, "export" => self.export.to_string(),
                "op" => done.op.as_str(), "result" => kind
            )
            .increment(1),
        }
    }
}

/// The request series of every export, built once and then only read.
#[derive(Debug, Default)]
pub struct RequestMetrics {
    exports: HashMap<Box<str>, Arc<ExportMetrics>>,
}

impl RequestMetrics {
    /// Registers the request series of `exports` with the current recorder
    /// (the global one, or a local one inside `metrics::with_local_recorder`).
    pub fn new<'a>(exports: impl IntoIterator<Item = &'a str>) -> Self {
        let exports = exports
            .into_iter()
            .map(|name| (Box::from(name), Arc::new(ExportMetrics::new(name))))
            .collect();
        Self { exports }
    }

    /// The series of `export`, if it was registered.
    pub fn export(&self, export: &str) -> Option<Arc<ExportMetrics>> {
        self.exports.get(export).cloned()
    }

    /// Number of exports with series.
    pub fn len(&self) -> usize {
        self.exports.len()
    }

    /// Whether no export has series.
    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

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

    /// The value of the first line of `text` starting with `prefix`.
    pub(crate) fn line_value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn request_series_are_histograms_with_buckets() {
        let rec = PrometheusBuilder::new()
            .set_buckets(&[0.000_1, 0.000_25])
            .unwrap()
            .build_recorder();
        let handle = rec.handle();
        let table = metrics::with_local_recorder(&rec, || RequestMetrics::new(["a", "b"]));
        let a = table.export("a").unwrap();
        a.record(&completion(Op::Read, 4096, None));
        a.record(&completion(Op::Read, 4096, None));
        table
            .export("b")
            .unwrap()
            .record(&completion(Op::Write, 512, None));
        metrics::with_local_recorder(&rec, || a.record(&completion(Op::Read, 0, Some("io"))));
        assert!(table.export("nope").is_none());
        let text = handle.render();
        assert!(text.contains("# TYPE ear_request_duration_seconds histogram"));
        assert!(text.contains("# TYPE ear_request_crypto_seconds histogram"));
        let v = |prefix: &str| line_value(&text, prefix);
        assert_eq!(
            v("ear_request_bytes_total{export=\"a\",op=\"read\"}"),
            Some(8192.0)
        );
        assert_eq!(
            v("ear_requests_total{export=\"a\",op=\"read\",result=\"ok\"}"),
            Some(2.0)
        );
        assert_eq!(
            v("ear_requests_total{export=\"a\",op=\"read\",result=\"io\"}"),
            Some(1.0)
        );
        assert_eq!(
            v("ear_request_duration_seconds_count{export=\"a\",op=\"read\"}"),
            Some(3.0)
        );
        assert_eq!(
            v("ear_request_duration_seconds_bucket{export=\"a\",op=\"read\",le=\"0.00025\"}"),
            Some(3.0)
        );
        assert_eq!(
            v("ear_request_duration_seconds_bucket{export=\"a\",op=\"read\",le=\"0.0001\"}"),
            Some(0.0)
        );
        assert!(!text.contains("nope"));
    }

    #[test]
    fn op_table_order_matches_index() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index(), i);
        }
    }
}
