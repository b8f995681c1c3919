//! One client connection: the negotiation loop (the rules are in
//! `negotiate`), then the transmission phase with pipelined requests
//! completing out of order.
//!
//! The connection owns its buffers. A reader loop parses requests and reads
//! write payloads. File I/O never blocks the async runtime: small reads
//! (≤ 16 KiB) are first tried right there on the connection task with
//! `preadv2(RWF_NOWAIT)`, which serves them from the page cache or gives up
//! at once (not cached, or a write to the same blocks in progress); a hop to
//! the blocking pool costs two thread wake-ups, more than such a read.
//! Everything else, and every read that gave up, runs on the blocking pool.
//! Either way the complete reply goes to a writer task through a channel,
//! which coalesces waiting replies into one flush. In-flight requests are
//! bounded per connection (count and bytes) and server-wide (payload bytes),
//! and their budget is released only once the reply is written, so a client
//! cannot make the server buffer without limit.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::handler::{self, ReplyMode};
use super::negotiate::{Catalog, ExportView, Negotiation, Step};
use super::Shared;
use crate::protocol::{self, consts::*, ExportLimits, ProtocolError, RequestKind};
use crate::store::Export;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    /// Negotiation took too long.
    #[error("negotiation timed out")]
    HandshakeTimeout,
    /// NBD_OPT_EXPORT_NAME for an export we do not have (cannot be answered
    /// with an error, so the connection is closed).
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// An option payload larger than we accept.
    #[error("option payload of {0} bytes is too large")]
    OptionTooLarge(u32),
}

type Reader = BufReader<OwnedReadHalf>;
type Writer = BufWriter<OwnedWriteHalf>;

enum Negotiated {
    Abort,
    Go {
        export: Arc<Export>,
        mode: ReplyMode,
    },
}

/// Runs one connection to completion.
pub async fn serve(
    stream: UnixStream,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let mut wr = BufWriter::with_capacity(64 << 10, wr);
    let neg = tokio::select! {
        r = tokio::time::timeout(shared.config.handshake_timeout, negotiate(&mut rd, &mut wr, &shared)) => {
            r.map_err(|_| ConnError::HandshakeTimeout)??
        }
        _ = stop.changed() => return Ok(()),
    };
    match neg {
        Negotiated::Abort => Ok(()),
        Negotiated::Go { export, mode } => transmission(rd, wr, shared, export, mode, stop).await,
    }
}

/// The server's exports as negotiation sees them.
struct StoreCatalog<'a>(&'a Shared);

impl ExportView for Arc<Export> {
    fn name(&self) -> &str {
        Export::name(self)
    }
    fn size(&self) -> u64 {
        Export::size(self)
    }
    fn encrypted(&self) -> bool {
        Export::encrypted(self)
    }
}

impl Catalog for StoreCatalog<'_> {
    type Export = Arc<Export>;

    fn resolve(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self.0.store.default_export().cloned();
        }
        let name = crate::store::ExportName::parse(name).ok()?;
        self.0.store.get(name.as_str()).cloned()
    }

    fn all(&self) -> Vec<Arc<Export>> {
        self.0.store.exports().cloned().collect()
    }
}

/// Sends the greeting, then reads options and answers them as
/// [`Negotiation`] decides until the client chooses an export or leaves.
async fn negotiate(
    rd: &mut Reader,
    wr: &mut Writer,
    shared: &Shared,
) -> Result<Negotiated, ConnError> {
    let mut out = BytesMut::with_capacity(256);
    protocol::encode_greeting(&mut out);
    wr.write_all(&out).await?;
    wr.flush().await?;
    let mut cf = [0u8; 4];
    rd.read_exact(&mut cf).await?;
    let client = protocol::parse_client_flags(cf)?;
    let mut neg = Negotiation::new(StoreCatalog(shared), shared.config.max_request, client);
    loop {
        let mut hdr = [0u8; 16];
        rd.read_exact(&mut hdr).await?;
        let h = protocol::parse_option_header(&hdr)?;
        if h.is_oversized() {
            return Err(ConnError::OptionTooLarge(h.length));
        }
        let mut data = vec![0u8; h.length as usize];
        rd.read_exact(&mut data).await?;
        let step = match protocol::parse_option(h, &data) {
            Ok(option) => neg.on_option(option),
            Err(e) => neg.on_invalid(h.option, &e),
        };
        match step {
            Step::Continue(reply) => {
                wr.write_all(&reply).await?;
                wr.flush().await?;
            }
            Step::Abort(reply) => {
                // The client may already have closed; ignore errors.
                let _ = wr.write_all(&reply).await;
                let _ = wr.flush().await;
                return Ok(Negotiated::Abort);
            }
            Step::Go {
                reply,
                export,
                mode,
            } => {
                wr.write_all(&reply).await?;
                wr.flush().await?;
                return Ok(Negotiated::Go { export, mode });
            }
            Step::UnknownExport(name) => return Err(ConnError::UnknownExport(name)),
        }
    }
}

/// Reads and drops `n` payload bytes (a refused write) without buffering them.
async fn discard(rd: &mut Reader, mut n: u64) -> std::io::Result<()> {
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let k = (n as usize).min(scratch.len());
        rd.read_exact(&mut scratch[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Largest read or write executed on the connection task instead of the
/// blocking pool.
const INLINE_MAX: u32 = 16 << 10;

/// Whether `kind` is tried on the connection task first: small reads, which
/// are served from the page cache with `preadv2(RWF_NOWAIT)` and never wait
/// for the disk or a lock (they fall back to the blocking pool when they
/// would). Everything else — writes, flushes, trims, large transfers — runs
/// on the blocking pool, so file I/O never blocks the async runtime.
fn try_inline(kind: &RequestKind) -> bool {
    matches!(*kind, RequestKind::Read { len, .. } if len <= INLINE_MAX)
}

/// Reads an `n`-byte write payload into a fresh buffer without zero-filling
/// it first (bytes are appended straight from the socket buffer).
async fn read_payload(rd: &mut Reader, n: usize) -> std::io::Result<Vec<u8>> {
    let mut p = Vec::with_capacity(n);
    while p.len() < n {
        let want = (n - p.len()) as u64;
        if (&mut *rd).take(want).read_buf(&mut p).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(p)
}

/// A reply ready to send, with the in-flight permits of its request: they are
/// released only once the reply has been written to the socket, so a client
/// that does not read its replies cannot make the server buffer them without
/// limit.
struct Outgoing {
    reply: Bytes,
    _permits: Option<[OwnedSemaphorePermit; 3]>,
}

async fn write_replies(
    mut wr: Writer,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    while let Some(o) = rx.recv().await {
        wr.write_all(&o.reply).await?;
        drop(o);
        // Coalesce replies that are already waiting into one flush.
        while let Ok(o) = rx.try_recv() {
            wr.write_all(&o.reply).await?;
        }
        wr.flush().await?;
    }
    Ok(())
}

async fn transmission(
    mut rd: Reader,
    wr: Writer,
    shared: Arc<Shared>,
    export: Arc<Export>,
    mode: ReplyMode,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(write_replies(wr, rx));
    let per_conn = Arc::new(Semaphore::new(shared.config.max_inflight));
    // Payload bytes in flight on this connection: one client cannot take the
    // whole server-wide budget.
    let conn_bytes = Arc::new(Semaphore::new(2 * shared.config.max_request as usize));
    let observer = shared.metrics.export(export.name());
    let limits = ExportLimits {
        size: export.size(),
        max_request: shared.config.max_request,
        structured: mode.structured,
    };
    let result: Result<(), ConnError> = async {
        loop {
            let mut hdr = [0u8; REQUEST_HEADER_LEN];
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                r = rd.read_exact(&mut hdr) => match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e.into()),
                },
            }
            let raw = protocol::parse_request_header(&hdr)?;
            let req = match raw.validate(&limits) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "refusing request");
                    discard(&mut rd, u64::from(e.discard)).await?;
                    let mut b = BytesMut::new();
                    e.encode_reply(&mut b, mode.structured);
                    let _ = tx.send(Outgoing {
                        reply: b.freeze(),
                        _permits: None,
                    });
                    continue;
                }
            };
            if let RequestKind::Disconnect = req.kind {
                return Ok(());
            }
            let bytes = match req.kind {
                RequestKind::Read { len, .. } | RequestKind::Write { len, .. } => len.max(1),
                _ => 1,
            };
            let slot = Arc::clone(&per_conn)
                .acquire_owned()
                .await
                .map_err(|_| std::io::Error::other("semaphore closed"))?;
            let mine = Arc::clone(&conn_bytes)
                .acquire_many_owned(bytes)
                .await
                .map_err(|_| std::io::Error::other("semaphore closed"))?;
            let budget = Arc::clone(&shared.inflight_bytes)
                .acquire_many_owned(bytes)
                .await
                .map_err(|_| std::io::Error::other("semaphore closed"))?;
            let payload = if let RequestKind::Write { len, .. } = req.kind {
                Some(read_payload(&mut rd, len as usize).await?)
            } else {
                None
            };
            if try_inline(&req.kind) {
                // A cached small read costs less than a hop to the blocking
                // pool (two thread wake-ups).
                if let Some((reply, done)) =
                    handler::try_cached_read(&export, req.cookie, req.kind, mode)
                {
                    // Recorded before the reply leaves: a client that has
                    // its reply finds the request counted.
                    if let Some(o) = &observer {
                        o.record(&done);
                    }
                    let _ = tx.send(Outgoing {
                        reply,
                        _permits: Some([slot, mine, budget]),
                    });
                    // Let the writer send this reply now rather than after
                    // the whole batch of pipelined requests: the client can
                    // submit its next request while we serve the rest.
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            let export = Arc::clone(&export);
            let tx = tx.clone();
            let observer = observer.clone();
            tokio::task::spawn_blocking(move || {
                let (reply, done) = handler::execute(&export, req.cookie, req.kind, payload, mode);
                if let Some(o) = &observer {
                    o.record(&done);
                }
                let _ = tx.send(Outgoing {
                    reply,
                    _permits: Some([slot, mine, budget]),
                });
            });
        }
    }
    .await;
    drop(tx);
    // Every in-flight request holds a sender: the writer finishes once they
    // have all replied.
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if result.is_ok() => return Err(e.into()),
        _ => {}
    }
    result
}
