//! The client side of the control socket, used by CLI subcommands that
//! steer a running sidecar.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::proto::{ProgressUpdate, Reply, Request};

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listens at the path.
    #[error("cannot reach the sidecar's admin socket {path}: {source}; is the sidecar running, and is --admin-socket the path it serves?")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection broke, or the server sent something unreadable.
    #[error("admin socket {path}: {why}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The sidecar refused or failed the request (its one-line reason).
    #[error("{0}")]
    Refused(String),
}

/// Sends `req` to the sidecar at `path`, calls `on_progress` for every
/// progress line, and returns the final result.
pub async fn call(
    path: &Path,
    req: &Request,
    mut on_progress: impl FnMut(&ProgressUpdate),
) -> Result<serde_json::Value, CallError> {
    let protocol = |why: String| CallError::Protocol {
        path: path.to_path_buf(),
        why,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| CallError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let mut line = serde_json::to_vec(req).map_err(|e| protocol(e.to_string()))?;
    line.push(b'\n');
    // A refused peer gets its error line and a closed socket, possibly
    // before the request is written: read the answer even if writing fails.
    let wrote = stream.write_all(&line).await;
    let mut reader = BufReader::new(stream);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader
            .read_line(&mut buf)
            .await
            .map_err(|e| protocol(format!("reading the answer: {e}")))?;
        if n == 0 {
            return Err(protocol(match &wrote {
                Err(e) => format!("the sidecar closed the connection ({e})"),
                Ok(()) => "the sidecar closed the connection before answering; see its log".into(),
            }));
        }
        let reply: Reply = serde_json::from_str(buf.trim_end()).map_err(|e| {
            protocol(format!(
                "unreadable answer ({e}); is the CLI the sidecar's version?"
            ))
        })?;
        match reply {
            Reply::Progress(p) => on_progress(&p),
            Reply::Ok(v) => return Ok(v),
            Reply::Error(why) => return Err(CallError::Refused(why)),
        }
    }
}
