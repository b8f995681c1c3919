//! [`TestServer`]: `server::run` driven in-process (mini-redis style), on a
//! store in a temporary directory, with a request-metrics table registered in
//! a local Prometheus recorder so tests can read what the server recorded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ear_sidecar::crypto::{KeyRing, SecretKey};
use ear_sidecar::health::Health;
use ear_sidecar::server::observe::RequestMetrics;
use ear_sidecar::server::{self, ServerConfig, Shared};
use ear_sidecar::store::{ExportName, ExportSpec, Store};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// A server running on its own runtime thread until [`TestServer::stop`] or drop.
pub struct TestServer {
    dir: tempfile::TempDir,
    /// Health latch shared with the server.
    pub health: Arc<Health>,
    /// The open store.
    pub store: Arc<Store>,
    metrics: PrometheusHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Serves `exports` (name, size) from a fresh directory; encrypted when
    /// `encrypted`.
    pub fn start(exports: &[(&str, u64)], encrypted: bool) -> TestServer {
        Self::start_with(exports, encrypted, ServerConfig::default())
    }

    /// [`TestServer::start`] with server limits of the test's own.
    pub fn start_with(
        exports: &[(&str, u64)],
        encrypted: bool,
        config: ServerConfig,
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let keys = encrypted.then(|| {
            let mut m = BTreeMap::new();
            m.insert(1, SecretKey::generate().expect("key"));
            Arc::new(KeyRing::new(m, 1, 64).expect("key ring"))
        });
        let specs: Vec<ExportSpec> = exports
            .iter()
            .map(|(n, size)| {
                ExportSpec::new(ExportName::parse(n).expect("name"), *size).expect("size")
            })
            .collect();
        let store = Arc::new(Store::open(dir.path(), [7; 16], keys, &specs).expect("open store"));
        let recorder = PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let request_metrics = metrics::with_local_recorder(&recorder, || {
            RequestMetrics::new(store.exports().map(|e| e.name()))
        });
        let health = Arc::new(Health::default());
        let shared = Shared::new(
            Arc::clone(&store),
            config,
            Arc::clone(&health),
            request_metrics,
        );
        let socket = dir.path().join("s.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = server::bind(&socket, 0o600).expect("bind");
                let _ = bound_tx.send(());
                server::run(listener, shared, async {
                    let _ = stopped.await;
                })
                .await;
            });
            // Keep the recorder alive as long as the handles that point at it.
            drop(recorder);
        });
        bound_rx.recv().expect("server bound its socket");
        TestServer {
            dir,
            health,
            store,
            metrics,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("s.sock")
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Prometheus text of the request series the server recorded.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    /// Resolves the shutdown future and waits until `server::run` returned
    /// (every connection drained).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}
