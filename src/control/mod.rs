//! The admin control socket: a second Unix socket (mode 0600, the same peer
//! uid allowlist as the data socket) through which CLI subcommands steer a
//! running sidecar: key lifecycle, backups, status.
//!
//! It owns the socket, the line protocol ([`proto`]) and the client
//! ([`client`]); what each request does is the [`Handler`]'s business, which
//! the application implements. Nothing here knows about stores or keys, and
//! the control socket is never the metrics listener: Kubernetes exposes that
//! one for scraping.
//!
//! One request per connection: the client sends one JSON line, the server
//! answers with progress lines and then one final `ok` or `error` line. The
//! handler runs in its own task, so a client that goes away does not cancel
//! an operation half-way; the operation finishes and its result is logged.

pub mod client;
pub mod proto;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use proto::{ProgressUpdate, Reply, Request, BACKUP_CUT_TAKEN};

/// Longest request line accepted (requests are small JSON objects).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Shortest interval between two progress lines sent to a client.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Errors of the control socket's setup.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Binding failed (the path is taken, or a directory is missing).
    #[error("admin socket: {0}")]
    Bind(#[from] crate::server::ServerError),
}

/// What a request does. Implemented by the application, which knows the
/// store, the keys and the backups.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Carries out `req`. `progress` reports long work; the result is the
    /// final `ok` object, or a one-line reason that names the problem and
    /// the fix.
    async fn handle(&self, req: Request, progress: Progress) -> Result<serde_json::Value, String>;
}

/// A progress reporter handed to the handler. Cheap to clone; the newest
/// update wins (a slow client never slows the work).
#[derive(Debug, Clone)]
pub struct Progress(Arc<watch::Sender<Option<ProgressUpdate>>>);

impl Progress {
    /// A reporter nobody listens to (offline commands, tests).
    pub fn detached() -> Self {
        Progress(Arc::new(watch::channel(None).0))
    }

    /// Reports `done` of `total` `unit`s, with a short message.
    pub fn update(&self, done: u64, total: u64, unit: &str, message: &str) {
        self.0.send_replace(Some(ProgressUpdate {
            done,
            total,
            unit: unit.to_owned(),
            message: message.to_owned(),
        }));
    }

    fn subscribe(&self) -> watch::Receiver<Option<ProgressUpdate>> {
        self.0.subscribe()
    }
}

/// Policy of the control socket.
#[derive(Debug, Clone, Default)]
pub struct ControlConfig {
    /// Peers allowed by SO_PEERCRED uid; `None` allows every uid that can
    /// open the socket file (which is 0600: its owner).
    pub allow_uids: Option<Vec<u32>>,
}

/// The default admin socket path for a data socket: `ear.sock` →
/// `ear.admin.sock`, anything else → `<name>.admin.sock`, in the same
/// directory.
pub fn default_path(data_socket: &Path) -> std::path::PathBuf {
    let name = data_socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ear".to_owned());
    let stem = name.strip_suffix(".sock").unwrap_or(&name);
    data_socket.with_file_name(format!("{stem}.admin.sock"))
}

/// Binds the control socket at `path` with `mode` (a stale socket is
/// replaced; a live one or another file is an error).
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, ControlError> {
    Ok(crate::server::bind(path, mode)?)
}

/// Serves control requests from `listener` until `shutdown` resolves; then
/// stops accepting and cancels requests still running (every operation is
/// crash-safe, so cancelling one is no worse than a crash).
pub async fn run(
    listener: UnixListener,
    config: ControlConfig,
    handler: Arc<dyn Handler>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let uid = stream.peer_cred().ok().map(|c| c.uid());
                let allowed = match &config.allow_uids {
                    Some(list) => uid.is_some_and(|u| list.contains(&u)),
                    None => true,
                };
                let handler = Arc::clone(&handler);
                conns.spawn(async move {
                    if !allowed {
                        tracing::warn!(peer_uid = ?uid, "admin socket: refusing peer uid not in --allow-uid");
                        let line = format!(
                            "peer uid {} is not allowed on the admin socket; add it with --allow-uid",
                            uid.map_or_else(|| "unknown".to_owned(), |u| u.to_string())
                        );
                        let _ = send(&mut BufReader::new(stream), &Reply::Error(line)).await;
                        return;
                    }
                    if let Err(e) = serve(stream, handler).await {
                        tracing::debug!(peer_uid = ?uid, error = %e, "admin connection ended");
                    }
                });
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn send(stream: &mut BufReader<UnixStream>, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.get_mut().write_all(&line).await
}

/// One connection: read the request line, run it, stream progress, answer.
async fn serve(stream: UnixStream, handler: Arc<dyn Handler>) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    let mut line = Vec::new();
    let n = AsyncReadExt::take(&mut stream, MAX_REQUEST_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(());
    }
    if !line.ends_with(b"\n") {
        let why = if line.len() > MAX_REQUEST_LINE {
            format!("request longer than {MAX_REQUEST_LINE} bytes; send one JSON object per line")
        } else {
            "request not terminated by a newline; send one JSON object per line".to_owned()
        };
        return send(&mut stream, &Reply::Error(why)).await;
    }
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            let why = format!(
                "malformed request ({e}); this sidecar is version {}: use the same version's CLI",
                env!("CARGO_PKG_VERSION")
            );
            return send(&mut stream, &Reply::Error(why)).await;
        }
    };
    let op = req.op_name();
    tracing::info!(op, "admin request");
    let progress = Progress(Arc::new(watch::channel(None).0));
    let mut updates = progress.subscribe();
    let task = tokio::spawn(async move { handler.handle(req, progress).await });
    tokio::pin!(task);
    let mut client_gone = false;
    let result = loop {
        tokio::select! {
            r = &mut task => break r,
            changed = updates.changed(), if !client_gone => {
                if changed.is_err() {
                    // The handler dropped every reporter; wait for its end.
                    client_gone = true;
                    continue;
                }
                let update = updates.borrow_and_update().clone();
                if let Some(u) = update {
                    if send(&mut stream, &Reply::Progress(u)).await.is_err() {
                        // The client left: the operation still finishes.
                        client_gone = true;
                    }
                }
                tokio::time::sleep(PROGRESS_INTERVAL).await;
            }
        }
    };
    let reply = match result {
        Ok(Ok(v)) => {
            tracing::info!(op, "admin request done");
            Reply::Ok(v)
        }
        Ok(Err(why)) => {
            tracing::warn!(op, error = %why, "admin request refused");
            Reply::Error(why)
        }
        Err(e) => {
            tracing::error!(op, error = %e, "admin request failed");
            Reply::Error(format!(
                "internal error running {op}: {e}; see the sidecar's log"
            ))
        }
    };
    send(&mut stream, &reply).await
}

#[cfg(test)]
mod tests;
