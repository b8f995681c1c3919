//! The NBD server: binds the Unix socket, accepts connections, enforces the
//! peer-uid allowlist and the connection limit, and drains gracefully.
//!
//! Shape of tokio's mini-redis: [`run`] takes an already bound listener and a
//! shutdown future; each connection is a task that negotiates
//! ([`connection`], rules in [`negotiate`]) and then hands the socket to
//! threads of its own for the transmission phase ([`transmission`]), which
//! own their buffers; requests are applied to the store by [`handler`].

pub mod connection;
pub mod handler;
pub mod negotiate;
pub mod observe;
pub mod transmission;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::health::Health;
use crate::store::Store;
use observe::RequestMetrics;

/// Errors of the server layer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path is taken by something that is not a stale socket.
    #[error("{path}: {why}")]
    SocketPath {
        /// The path.
        path: String,
        /// What is there.
        why: String,
    },
    /// Socket I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// Server limits and policy.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE length (advertised as the maximum block size).
    pub max_request: u32,
    /// Concurrent connections; more are refused with a log line.
    pub max_connections: usize,
    /// Peers allowed by SO_PEERCRED uid; `None` allows every uid that can
    /// open the socket (its file mode still applies).
    pub allow_uids: Option<Vec<u32>>,
    /// Requests in flight per connection (each has a thread; at most
    /// [`transmission::MAX_THREADS_PER_CONN`]).
    pub max_inflight: usize,
    /// Connection threads beyond the first of each connection, server-wide.
    /// Each running thread keeps a request buffer, so this bounds memory at
    /// many connections (128 keeps 64 connections × QD8 × 128 KiB within
    /// 64 MiB RSS) while a few busy connections still get their full
    /// concurrency.
    pub max_threads_extra: usize,
    /// Payload bytes in flight across all connections (memory bound).
    pub inflight_bytes: usize,
    /// Time a client has to finish negotiation.
    pub handshake_timeout: Duration,
    /// How long a reply may wait for its client to read anything. A client
    /// that reads nothing for this long is dropped: its unsent replies hold
    /// payload bytes of the server-wide budget, which a few such clients
    /// could otherwise hold for ever while every other client waits. Zero
    /// disables it.
    pub reply_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request: 32 << 20,
            max_connections: 256,
            allow_uids: None,
            max_inflight: 64,
            max_threads_extra: 128,
            inflight_bytes: 256 << 20,
            handshake_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// What every connection shares.
#[derive(Debug)]
pub struct Shared {
    /// The exports.
    pub store: Arc<Store>,
    /// Limits and policy.
    pub config: ServerConfig,
    /// Health latch.
    pub health: Arc<Health>,
    /// Global in-flight payload budget (bytes).
    pub inflight_bytes: Arc<ByteBudget>,
    /// Connection threads running beyond the first of each connection.
    pub extra_threads: AtomicUsize,
    /// Per-(export, op) request series; empty when metrics are off.
    pub metrics: RequestMetrics,
}

impl Shared {
    /// Builds the shared state. `metrics` holds the request series of the
    /// exports (see [`observe`]); `RequestMetrics::default()` records nothing.
    pub fn new(
        store: Arc<Store>,
        config: ServerConfig,
        health: Arc<Health>,
        metrics: RequestMetrics,
    ) -> Arc<Self> {
        let budget = config.inflight_bytes.max(config.max_request as usize);
        Arc::new(Self {
            store,
            inflight_bytes: Arc::new(ByteBudget::new(budget)),
            extra_threads: AtomicUsize::new(0),
            config,
            health,
            metrics,
        })
    }
}

/// A blocking budget of bytes shared by the connection threads: payloads in
/// flight across all connections stay below it.
#[derive(Debug)]
pub struct ByteBudget {
    total: usize,
    free: Mutex<usize>,
    freed: Condvar,
}

impl ByteBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        Self {
            total,
            free: Mutex::new(total),
            freed: Condvar::new(),
        }
    }

    /// Takes `n` bytes, waiting until they are free. A request larger than
    /// the whole budget takes all of it (it waits for everything else).
    pub fn acquire(self: &Arc<Self>, n: usize) -> BytePermit {
        let n = n.min(self.total);
        if n > 0 {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            while *free < n {
                free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
            }
            *free -= n;
        }
        BytePermit {
            budget: Arc::clone(self),
            n,
        }
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        *self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bytes taken from a [`ByteBudget`], given back on drop.
#[derive(Debug)]
pub struct BytePermit {
    budget: Arc<ByteBudget>,
    n: usize,
}

impl Drop for BytePermit {
    fn drop(&mut self) {
        if self.n > 0 {
            *self.budget.free.lock().unwrap_or_else(|p| p.into_inner()) += self.n;
            self.budget.freed.notify_all();
        }
    }
}

/// Binds the Unix socket at `path` with `mode`. A stale socket file (nobody
/// listening) is replaced; a live one or any other file is an error.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let spath = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::SocketPath {
                    path: spath,
                    why: "another server is listening on this socket".into(),
                });
            }
            tracing::info!(socket = %spath, "replacing stale socket file");
            std::fs::remove_file(path).map_err(|source| ServerError::Io {
                what: format!("remove stale socket {spath}"),
                source,
            })?;
        }
        Ok(_) => {
            return Err(ServerError::SocketPath {
                path: spath,
                why: "exists and is not a socket; refusing to replace it".into(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServerError::Io {
                what: format!("stat {spath}"),
                source,
            })
        }
    }
    // Created under the process umask (never group/world-writable with the
    // usual 022), then narrowed/widened to the configured mode before the
    // first accept.
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Io {
        what: format!("bind {spath}"),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ServerError::Io {
            what: format!("chmod {spath}"),
            source,
        }
    })?;
    Ok(listener)
}

/// Serves connections from `listener` until `shutdown` resolves, then stops
/// accepting, lets every connection finish its in-flight requests (bounded by
/// `drain_timeout`) and returns.
pub async fn run(
    listener: UnixListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    let mut refused_logged = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        // EMFILE and friends: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let cred = stream.peer_cred().ok();
                let uid = cred.map(|c| c.uid());
                if let Some(allowed) = &shared.config.allow_uids {
                    if !uid.is_some_and(|u| allowed.contains(&u)) {
                        tracing::warn!(peer_uid = ?uid, "refusing connection: peer uid not in --allow-uid");
                        continue;
                    }
                }
                let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                    if !refused_logged {
                        tracing::warn!(max = shared.config.max_connections,
                            "connection limit reached; refusing new connections until some close");
                        refused_logged = true;
                    }
                    continue;
                };
                refused_logged = false;
                let shared = Arc::clone(&shared);
                let stop = stop_rx.clone();
                conns.spawn(async move {
                    shared.health.connections.fetch_add(1, Ordering::Relaxed);
                    let pid = cred.and_then(|c| c.pid());
                    if let Err(e) = connection::serve(stream, Arc::clone(&shared), stop).await {
                        tracing::info!(peer_uid = ?uid, peer_pid = ?pid, error = %e, "connection closed");
                    } else {
                        tracing::debug!(peer_uid = ?uid, peer_pid = ?pid, "connection finished");
                    }
                    shared.health.connections.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
        }
    }
    shared.health.draining.store(true, Ordering::Release);
    shared.health.ready.store(false, Ordering::Release);
    drop(listener);
    let _ = stop_tx.send(true);
    let n = conns.len();
    if n > 0 {
        tracing::info!(connections = n, "draining in-flight requests");
    }
    let drained = tokio::time::timeout(shared.config.drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("drain timed out; closing remaining connections");
        conns.shutdown().await;
    }
}
