//! One client connection: the negotiation loop on the async runtime (the
//! rules are in `negotiate`, bounded by the handshake timeout), then the
//! transmission phase, which runs on threads of the connection's own with
//! blocking I/O (see [`super::transmission`]) while this task waits for them
//! and relays a server stop.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::handler::ReplyMode;
use super::negotiate::{Catalog, ExportView, Negotiation, Step};
use super::transmission::Conn;
use super::Shared;
use crate::protocol::{self, ProtocolError};
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
    /// The client read none of its replies for the reply timeout.
    #[error("the client read no reply for {0:?}; dropped so its unsent replies stop holding memory other clients need")]
    ReplyTimeout(std::time::Duration),
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

/// Hands the socket to the connection's threads (see [`transmission`]) and
/// waits for them; on `stop`, they finish what is in flight. If this future
/// is dropped (the server gave up draining), the socket is shut down.
async fn transmission(
    rd: Reader,
    wr: Writer,
    shared: Arc<Shared>,
    export: Arc<Export>,
    mode: ReplyMode,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    // Requests the client pipelined behind its last option are already in
    // the negotiation's buffer.
    let leftover = rd.buffer().to_vec();
    let stream = rd
        .into_inner()
        .reunite(wr.into_inner())
        .map_err(|_| std::io::Error::other("socket halves do not match"))?
        .into_std()?;
    let (conn, mut done) = Conn::start(stream, leftover, shared, export, mode)?;
    let guard = AbortOnDrop(Arc::clone(&conn));
    tokio::select! {
        _ = done.recv() => {}
        _ = stop.changed() => {
            conn.stop();
            done.recv().await;
        }
    }
    drop(guard);
    match conn.take_error() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Shuts the socket down when dropped, so the threads of a connection whose
/// task was cancelled end too.
struct AbortOnDrop(Arc<Conn>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
