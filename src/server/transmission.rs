//! The transmission phase of one connection, served by threads of the
//! connection's own with blocking socket and file I/O, the way nbdkit's
//! parallel thread model does it.
//!
//! Each thread loops: take the read side, read one request (and a WRITE's
//! payload) into the thread's own buffer, give the read side back, execute
//! the request, then send the reply under the write side's lock in one
//! write. A request therefore never changes threads: no hand-off to a pool,
//! no reply channel, no waking of a writer task, which at 4 KiB cost more
//! than the request itself. While one thread executes, another reads the
//! next request, so pipelined requests run concurrently and complete out
//! of order.
//!
//! A connection starts with one thread and gains one whenever a thread takes
//! a request and no other is left to read the next one, up to a per-connection
//! cap (`max_inflight`, at most [`MAX_THREADS_PER_CONN`]) and a server-wide
//! one ([`super::ServerConfig::max_threads_extra`]). The cap is the in-flight request limit;
//! payload bytes in flight are bounded per connection (two maximum requests)
//! and server-wide ([`super::Shared::inflight_bytes`]), taken before a
//! payload is read or a read's reply is built and released once the reply is
//! sent, so a client that does not read its replies stalls only itself. A
//! few such clients could still hold the whole server-wide budget, so a
//! reply that makes no progress for the reply timeout drops its connection.
//!
//! Stopping: the async side calls [`Conn::stop`] (graceful: reading stops,
//! requests in flight finish and are answered) or drops its guard (the socket
//! is shut down both ways). A protocol violation or a socket error ends the
//! connection the same way, and the first error is reported.

use std::io::{BufReader, Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;

use super::connection::ConnError;
use super::handler::{self, Reply, ReplyMode};
use super::observe::ExportMetrics;
use super::{ByteBudget, BytePermit, Shared};
use crate::protocol::{self, consts::*, ExportLimits, Request, RequestKind};
use crate::store::Export;

/// Most threads one connection may use (nbdkit's default is 16).
pub const MAX_THREADS_PER_CONN: usize = 16;

/// Stack of a connection thread: request handling keeps its buffers on the
/// heap, so the default 2 MiB is far more than needed.
const STACK: usize = 512 << 10;

/// A thread keeps a request buffer up to this size between requests; a larger
/// one (a rare large request) is freed once its reply is sent.
const KEEP_BUF: usize = 4 << 20;

type ReadSide = BufReader<std::io::Chain<Cursor<Vec<u8>>, UnixStream>>;

/// What a connection's threads share.
pub struct Conn {
    rd: Mutex<ReadSide>,
    wr: Mutex<UnixStream>,
    /// A handle for shutting the socket down from outside the locks.
    ctl: UnixStream,
    closing: AtomicBool,
    /// Threads running for this connection.
    threads: AtomicUsize,
    /// Threads waiting for, or holding, the read side.
    readers: AtomicUsize,
    max_threads: usize,
    /// Payload bytes in flight on this connection (two maximum requests),
    /// taken before the server-wide budget: one client that does not read
    /// its replies cannot hold the whole server-wide budget.
    conn_bytes: Arc<ByteBudget>,
    error: Mutex<Option<ConnError>>,
    shared: Arc<Shared>,
    export: Arc<Export>,
    mode: ReplyMode,
    limits: ExportLimits,
    observer: Option<Arc<ExportMetrics>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("export", &self.export.name())
            .field("threads", &self.threads.load(Ordering::Relaxed))
            .field("closing", &self.closing.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Ends when every thread of the connection has exited (each holds a clone).
pub type Done = tokio::sync::mpsc::Receiver<()>;
type DoneTx = tokio::sync::mpsc::Sender<()>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One request taken from the socket, with its byte budgets (connection,
/// then server-wide).
struct Taken {
    req: Request,
    _budget: (BytePermit, BytePermit),
}

enum Next {
    Request(Taken),
    Stop,
}

impl Conn {
    /// Starts serving `stream` (blocking mode) after negotiation. `leftover`
    /// is what the negotiation's reader had already buffered past the last
    /// option: requests a client pipelined behind its NBD_OPT_GO.
    pub fn start(
        stream: UnixStream,
        leftover: Vec<u8>,
        shared: Arc<Shared>,
        export: Arc<Export>,
        mode: ReplyMode,
    ) -> Result<(Arc<Conn>, Done), ConnError> {
        stream.set_nonblocking(false)?;
        // Bounds how long one send may make no progress (SO_SNDTIMEO).
        let reply_timeout = shared.config.reply_timeout;
        stream.set_write_timeout((!reply_timeout.is_zero()).then_some(reply_timeout))?;
        let wr = stream.try_clone()?;
        let ctl = stream.try_clone()?;
        let limits = ExportLimits {
            size: export.size(),
            max_request: shared.config.max_request,
            structured: mode.structured,
        };
        let observer = shared.metrics.export(export.name());
        let conn = Arc::new(Conn {
            rd: Mutex::new(BufReader::with_capacity(
                64 << 10,
                Cursor::new(leftover).chain(stream),
            )),
            wr: Mutex::new(wr),
            ctl,
            closing: AtomicBool::new(false),
            threads: AtomicUsize::new(0),
            readers: AtomicUsize::new(0),
            max_threads: shared.config.max_inflight.clamp(1, MAX_THREADS_PER_CONN),
            conn_bytes: Arc::new(ByteBudget::new(
                2usize.saturating_mul(shared.config.max_request as usize),
            )),
            error: Mutex::new(None),
            shared,
            export,
            mode,
            limits,
            observer,
        });
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // The first thread does not count against the server-wide cap: every
        // connection needs one.
        conn.threads.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = spawn(Arc::clone(&conn), tx, false) {
            conn.threads.fetch_sub(1, Ordering::AcqRel);
            return Err(e.into());
        }
        Ok((conn, rx))
    }

    /// Graceful stop: no further request is read; requests in flight finish
    /// and are answered.
    pub fn stop(&self) {
        self.closing.store(true, Ordering::Release);
        let _ = self.ctl.shutdown(std::net::Shutdown::Read);
    }

    /// Immediate stop: the socket is shut down both ways.
    pub fn abort(&self) {
        self.closing.store(true, Ordering::Release);
        let _ = self.ctl.shutdown(std::net::Shutdown::Both);
    }

    /// The error that ended the connection, if any (taken once).
    pub fn take_error(&self) -> Option<ConnError> {
        lock(&self.error).take()
    }

    fn fail(&self, e: ConnError) {
        let mut slot = lock(&self.error);
        if slot.is_none() && !self.closing.load(Ordering::Acquire) {
            *slot = Some(e);
        }
        drop(slot);
        self.abort();
    }

    /// What a failed reply send means: a send that timed out is a client
    /// that stopped reading.
    fn send_error(&self, e: std::io::Error) -> ConnError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ConnError::ReplyTimeout(self.shared.config.reply_timeout)
            }
            _ => e.into(),
        }
    }

    /// Adds a thread when nobody is left to read the next request.
    fn grow(self: &Arc<Self>, tx: &DoneTx) {
        if self.readers.load(Ordering::Acquire) > 0 || self.closing.load(Ordering::Acquire) {
            return;
        }
        let mine = self.threads.load(Ordering::Acquire);
        if mine >= self.max_threads {
            return;
        }
        let cap = self.shared.config.max_threads_extra;
        if self.shared.extra_threads.fetch_add(1, Ordering::AcqRel) >= cap {
            self.shared.extra_threads.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.threads.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = spawn(Arc::clone(self), tx.clone(), true) {
            self.threads.fetch_sub(1, Ordering::AcqRel);
            self.shared.extra_threads.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!(error = %e, "cannot start another connection thread; going on with fewer");
        }
    }

    /// Reads the next request (and a WRITE's payload into `buf`), answering
    /// refused requests on the way. Called with the read side held.
    fn next_request(&self, rd: &mut ReadSide, buf: &mut Vec<u8>) -> Next {
        loop {
            if self.closing.load(Ordering::Acquire) {
                return Next::Stop;
            }
            let mut hdr = [0u8; REQUEST_HEADER_LEN];
            if let Err(e) = rd.read_exact(&mut hdr) {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    self.fail(e.into());
                }
                // A clean end (or a stop, which shuts the read side down).
                self.closing.store(true, Ordering::Release);
                return Next::Stop;
            }
            let raw = match protocol::parse_request_header(&hdr) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(e.into());
                    return Next::Stop;
                }
            };
            let req = match raw.validate(&self.limits) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "refusing request");
                    if let Err(e) = discard(rd, u64::from(e.discard)) {
                        self.fail(e.into());
                        return Next::Stop;
                    }
                    let mut b = BytesMut::new();
                    e.encode_reply(&mut b, self.mode.structured);
                    if let Err(e) = lock(&self.wr).write_all(&b) {
                        self.fail(self.send_error(e));
                        return Next::Stop;
                    }
                    continue;
                }
            };
            if let RequestKind::Disconnect = req.kind {
                self.closing.store(true, Ordering::Release);
                return Next::Stop;
            }
            let bytes = match req.kind {
                RequestKind::Read { len, .. } | RequestKind::Write { len, .. } => len as usize,
                _ => 0,
            };
            let budget = (
                self.conn_bytes.acquire(bytes),
                self.shared.inflight_bytes.acquire(bytes),
            );
            if let RequestKind::Write { len, .. } = req.kind {
                let n = len as usize;
                handler::ensure_len(buf, n);
                if let Err(e) = rd.read_exact(&mut buf[..n]) {
                    self.fail(e.into());
                    return Next::Stop;
                }
            }
            return Next::Request(Taken {
                req,
                _budget: budget,
            });
        }
    }

    /// The loop of one thread; `extra` for every thread but the first.
    fn run(self: Arc<Self>, tx: DoneTx, extra: bool) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            self.readers.fetch_add(1, Ordering::AcqRel);
            let next = {
                let mut rd = lock(&self.rd);
                self.next_request(&mut rd, &mut buf)
            };
            self.readers.fetch_sub(1, Ordering::AcqRel);
            let Next::Request(taken) = next else {
                break;
            };
            self.grow(&tx);
            let Taken { req, _budget } = taken;
            let (reply, done) =
                handler::execute(&self.export, req.cookie, req.kind, &mut buf, self.mode);
            // Recorded before the reply leaves: a client that has its reply
            // finds the request counted.
            if let Some(o) = &self.observer {
                o.record(&done);
            }
            let sent = {
                let mut w = lock(&self.wr);
                match &reply {
                    Reply::Small(b) => w.write_all(b),
                    Reply::Buffer(n) => w.write_all(&buf[..*n]),
                }
            };
            drop(_budget);
            if let Err(e) = sent {
                self.fail(self.send_error(e));
                break;
            }
            if buf.len() > KEEP_BUF {
                buf = Vec::new();
            }
        }
        self.threads.fetch_sub(1, Ordering::AcqRel);
        if extra {
            self.shared.extra_threads.fetch_sub(1, Ordering::AcqRel);
        }
        drop(tx);
    }
}

fn spawn(conn: Arc<Conn>, tx: DoneTx, extra: bool) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ear-conn".into())
        .stack_size(STACK)
        .spawn(move || conn.run(tx, extra))
        .map(|_| ())
}

/// Reads and drops `n` payload bytes (a refused write) without buffering them.
fn discard(rd: &mut ReadSide, n: u64) -> std::io::Result<()> {
    let copied = std::io::copy(&mut rd.by_ref().take(n), &mut std::io::sink())?;
    if copied < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
