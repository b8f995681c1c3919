//! The admin listener (`--metrics-addr`): Prometheus `/metrics`, `/livez`
//! (the process answers) and `/readyz` (keys unwrapped, NBD socket
//! listening, not draining, not failed closed).
//!
//! The top layer: it reads the health latch, the key ring, the KMS call
//! counters and the revocation state, and installs the `metrics` recorder
//! the server's request series register with. Nothing below imports it.
//!
//! * [`exporter`]: the recorder, the HELP text and the scrape-time sources.
//! * [`http`]: the HTTP/1.1 endpoints on hyper.

pub mod exporter;
pub mod http;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use exporter::{names, record_backup, record_backup_failure, Metrics, BUCKETS};

use crate::health::Health;

/// How often recorded histogram samples are folded into their buckets (keeps
/// memory flat between scrapes).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the admin layer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
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

/// Installs the global recorder, binds `addr` and serves `/metrics`,
/// `/livez` and `/readyz` on it from now on. Returns the metrics layer and
/// the bound address.
pub async fn start(
    addr: SocketAddr,
    health: Arc<Health>,
    encryption_on: bool,
) -> Result<(Arc<Metrics>, SocketAddr), AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AdminError::Bind { addr, source })?;
    let metrics = Metrics::install(health, encryption_on)?;
    let upkeep = metrics.clone();
    // Fold histogram samples into buckets off the async runtime.
    let _ = std::thread::Builder::new()
        .name("ear-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        });
    tokio::spawn(http::serve(listener, Arc::clone(&metrics)));
    tracing::info!(addr = %local, "metrics and health endpoints listening");
    Ok((metrics, local))
}
