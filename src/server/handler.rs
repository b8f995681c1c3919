//! Request handlers: apply one validated request to an export and build the
//! complete reply. Runs on a connection's own threads (the store does
//! blocking positional file I/O); no socket access here.
//!
//! The caller owns the request buffer and lends it for each request: a
//! WRITE's payload arrives in it (and is encrypted there in place), and a
//! READ's reply (header, then data) is built in it, so a thread that serves
//! request after request neither allocates nor zero-fills per request.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::observe::Completion;
use crate::protocol::{self, consts::*, Op, RequestKind};
use crate::store::{Export, IoStats, StoreError};

type Outcome = Result<IoStats, RequestFailure>;

/// Why a request failed: the store refused or failed it, or the request
/// itself was malformed in a way the codec could not catch.
#[derive(Debug, thiserror::Error)]
pub enum RequestFailure {
    /// The store failed the operation.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request does not fit what was negotiated.
    #[error("{0}")]
    Protocol(&'static str),
}

impl RequestFailure {
    /// The NBD errno a client sees.
    pub fn errno(&self) -> u32 {
        match self {
            RequestFailure::Store(e) => errno(e),
            RequestFailure::Protocol(_) => NBD_EINVAL,
        }
    }

    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestFailure::Store(e) => e.kind(),
            RequestFailure::Protocol(_) => "protocol",
        }
    }
}

/// The NBD errno for a store error: `ENOSPC` when storage is full, `EINVAL`
/// for a range outside the export, `EIO` for everything else.
pub fn errno(e: &StoreError) -> u32 {
    if e.is_no_space() {
        NBD_ENOSPC
    } else if matches!(e, StoreError::OutOfRange { .. }) {
        NBD_EINVAL
    } else {
        NBD_EIO
    }
}

/// Per-connection reply settings.
#[derive(Debug, Clone, Copy)]
pub struct ReplyMode {
    /// Structured replies negotiated.
    pub structured: bool,
    /// Context id of `base:allocation` if selected.
    pub base_allocation: Option<u32>,
}

/// The reply to send.
#[derive(Debug)]
pub enum Reply {
    /// A small reply of its own (status, error, block status).
    Small(Bytes),
    /// The first `n` bytes of the request buffer (a READ's header and data).
    Buffer(usize),
}

/// Makes `buf` at least `n` bytes long. It only grows: bytes already there
/// are reused as they are (a request overwrites what it uses), so a reused
/// buffer is never zero-filled again.
pub fn ensure_len(buf: &mut Vec<u8>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0);
    }
}

/// Executes `kind` on `export`. For a WRITE, `buf[..len]` holds the payload
/// (used as scratch for encryption); a READ builds its reply in `buf`.
/// Returns the reply and what happened.
pub fn execute(
    export: &Export,
    cookie: u64,
    kind: RequestKind,
    buf: &mut Vec<u8>,
    mode: ReplyMode,
) -> (Reply, Completion) {
    let t0 = Instant::now();
    let op = kind.op();
    let (reply, bytes, res) = match kind {
        RequestKind::Read { offset, len, .. } => {
            let (reply, res) = read(export, cookie, offset, len, mode, buf);
            return finish(reply, op, u64::from(len), res, t0);
        }
        RequestKind::Write { offset, len, fua } => {
            let res = match buf.get_mut(..len as usize) {
                Some(data) => export.write(offset, data, fua).map_err(Into::into),
                None => Err(RequestFailure::Protocol("payload length mismatch")),
            };
            (None, u64::from(len), res)
        }
        RequestKind::Flush => (None, 0, export.flush().map_err(Into::into)),
        RequestKind::Trim { offset, len, fua } => {
            let res = export.trim(offset, u64::from(len), fua);
            (None, u64::from(len), res.map_err(Into::into))
        }
        RequestKind::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast_zero,
        } => {
            if no_hole && fast_zero {
                // Allocating zeros means encrypting and writing them: not
                // faster than a write, so the spec asks us to refuse.
                let mut b = BytesMut::new();
                protocol::encode_error_reply(
                    &mut b,
                    cookie,
                    NBD_ENOTSUP,
                    "fast zero with NO_HOLE is not faster than a write",
                    mode.structured,
                );
                let done = Completion {
                    op,
                    bytes: 0,
                    error: Some("not_supported"),
                    stats: IoStats::default(),
                    elapsed: t0.elapsed(),
                };
                return (Reply::Small(b.freeze()), done);
            }
            let res = export.write_zeroes(offset, u64::from(len), no_hole, fua);
            (None, u64::from(len), res.map_err(Into::into))
        }
        RequestKind::Cache { len, .. } => (None, u64::from(len), Ok(IoStats::default())),
        RequestKind::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let (reply, res) = block_status(export, cookie, offset, len, req_one, mode);
            (Some(reply), u64::from(len), res)
        }
        RequestKind::Disconnect => (None, 0, Ok(IoStats::default())),
    };
    let reply = match (&res, reply) {
        (Ok(_), Some(r)) => r,
        (Ok(_), None) => {
            let mut b = BytesMut::with_capacity(32);
            if mode.structured {
                protocol::encode_structured_none_done(&mut b, cookie);
            } else {
                protocol::encode_simple_reply(&mut b, cookie, 0);
            }
            b.freeze()
        }
        (Err(e), _) => error_reply(cookie, e, mode),
    };
    finish(Reply::Small(reply), op, bytes, res, t0)
}

fn finish(reply: Reply, op: Op, bytes: u64, res: Outcome, t0: Instant) -> (Reply, Completion) {
    let (stats, error) = match res {
        Ok(s) => (s, None),
        Err(e) => {
            log_error(op, &e);
            (IoStats::default(), Some(e.kind()))
        }
    };
    (
        reply,
        Completion {
            op,
            bytes: if error.is_none() { bytes } else { 0 },
            error,
            stats,
            elapsed: t0.elapsed(),
        },
    )
}

fn log_error(op: Op, e: &RequestFailure) {
    match e {
        RequestFailure::Store(StoreError::OutOfRange { .. }) | RequestFailure::Protocol(_) => {
            tracing::debug!(op = op.as_str(), error = %e, "request refused")
        }
        _ => tracing::warn!(op = op.as_str(), error = %e, "request failed"),
    }
}

fn error_reply(cookie: u64, e: &RequestFailure, mode: ReplyMode) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    // Messages go to a client that may not be trusted with paths: keep it short.
    let msg = match e {
        RequestFailure::Store(StoreError::Corrupt { .. }) => "block failed its integrity check",
        RequestFailure::Store(StoreError::Crypto(_)) => "encryption keys unavailable",
        RequestFailure::Store(StoreError::OutOfRange { .. }) => "range outside the export",
        RequestFailure::Store(_) => "storage error",
        RequestFailure::Protocol(why) => why,
    };
    protocol::encode_error_reply(&mut b, cookie, e.errno(), msg, mode.structured);
    b.freeze()
}

/// A READ: the reply header, then the data read straight behind it, all in
/// `buf`, so the reply goes out in one write with no copy.
fn read(
    export: &Export,
    cookie: u64,
    offset: u64,
    len: u32,
    mode: ReplyMode,
    buf: &mut Vec<u8>,
) -> (Reply, Outcome) {
    let hdr = if mode.structured { 28 } else { 16 };
    let total = hdr + len as usize;
    ensure_len(buf, total);
    let res: Outcome = export
        .read(offset, &mut buf[hdr..total])
        .map_err(Into::into);
    match &res {
        Ok(_) => {
            let mut h = BytesMut::with_capacity(hdr);
            if mode.structured {
                // Cannot fail: len + 8 fits in u32 (len <= max request).
                if protocol::encode_offset_data_header(&mut h, cookie, offset, len, true).is_err() {
                    let e = RequestFailure::Protocol("reply too large");
                    return (Reply::Small(error_reply(cookie, &e, mode)), Err(e));
                }
            } else {
                protocol::encode_simple_reply(&mut h, cookie, 0);
            }
            buf[..hdr].copy_from_slice(&h);
            (Reply::Buffer(total), res)
        }
        Err(e) => (Reply::Small(error_reply(cookie, e, mode)), res),
    }
}

fn block_status(
    export: &Export,
    cookie: u64,
    offset: u64,
    len: u32,
    req_one: bool,
    mode: ReplyMode,
) -> (Bytes, Outcome) {
    let Some(ctx) = mode.base_allocation else {
        let mut b = BytesMut::new();
        protocol::encode_error_reply(
            &mut b,
            cookie,
            NBD_EINVAL,
            "no metadata context selected",
            mode.structured,
        );
        return (b.freeze(), Ok(IoStats::default()));
    };
    let t = Instant::now();
    match export.allocation(offset, u64::from(len)) {
        Err(e) => {
            let e = RequestFailure::Store(e);
            (error_reply(cookie, &e, mode), Err(e))
        }
        Ok(runs) => {
            let mut extents: Vec<(u32, u32)> = runs
                .into_iter()
                .map(|(l, hole)| {
                    // l <= len (u32) by construction.
                    let l = u32::try_from(l).unwrap_or(u32::MAX);
                    (
                        l,
                        if hole {
                            NBD_STATE_HOLE | NBD_STATE_ZERO
                        } else {
                            0
                        },
                    )
                })
                .collect();
            if req_one {
                extents.truncate(1);
            }
            let mut b = BytesMut::new();
            if protocol::encode_block_status(&mut b, cookie, ctx, &extents, true).is_err() {
                let mut b = BytesMut::new();
                protocol::encode_error_reply(&mut b, cookie, NBD_EINVAL, "empty range", true);
                return (b.freeze(), Ok(IoStats::default()));
            }
            let stats = IoStats {
                crypto: Duration::ZERO,
                storage: t.elapsed(),
            };
            (b.freeze(), Ok(stats))
        }
    }
}
