//! Request handlers: apply one validated request to an export and build the
//! complete reply bytes. Runs on the blocking pool (the store does positional
//! file I/O); no socket access here.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::protocol::{self, consts::*, RequestKind};
use crate::store::{Export, IoStats, StoreError};

/// Operation label (bounded set, used by metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// NBD_CMD_READ
    Read,
    /// NBD_CMD_WRITE
    Write,
    /// NBD_CMD_FLUSH
    Flush,
    /// NBD_CMD_TRIM
    Trim,
    /// NBD_CMD_WRITE_ZEROES
    WriteZeroes,
    /// NBD_CMD_CACHE
    Cache,
    /// NBD_CMD_BLOCK_STATUS
    BlockStatus,
}

impl Op {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
        }
    }
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

/// Per-connection reply settings.
#[derive(Debug, Clone, Copy)]
pub struct ReplyMode {
    /// Structured replies negotiated.
    pub structured: bool,
    /// Context id of `base:allocation` if selected.
    pub base_allocation: Option<u32>,
}

/// Executes `kind` on `export`. `payload` is the write payload (used as
/// scratch for encryption). Returns the full reply and what happened.
pub fn execute(
    export: &Export,
    cookie: u64,
    kind: RequestKind,
    payload: Option<Vec<u8>>,
    mode: ReplyMode,
) -> (Bytes, Completion) {
    let t0 = Instant::now();
    let (reply, op, bytes, res) = match kind {
        RequestKind::Read { offset, len, .. } => {
            let (reply, res) = read(export, cookie, offset, len, mode, false);
            return finish(reply, Op::Read, u64::from(len), res, t0);
        }
        RequestKind::Write { offset, len, fua } => {
            let mut data = payload.unwrap_or_default();
            let res = if data.len() == len as usize {
                export.write(offset, &mut data, fua)
            } else {
                Err(StoreError::Config("payload length mismatch".into()))
            };
            (None, Op::Write, u64::from(len), res)
        }
        RequestKind::Flush => (None, Op::Flush, 0, export.flush()),
        RequestKind::Trim { offset, len, fua } => (
            None,
            Op::Trim,
            u64::from(len),
            export.trim(offset, u64::from(len), fua),
        ),
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
                return (
                    b.freeze(),
                    Completion {
                        op: Op::WriteZeroes,
                        bytes: 0,
                        error: Some("not_supported"),
                        stats: IoStats::default(),
                        elapsed: t0.elapsed(),
                    },
                );
            }
            (
                None,
                Op::WriteZeroes,
                u64::from(len),
                export.write_zeroes(offset, u64::from(len), no_hole, fua),
            )
        }
        RequestKind::Cache { len, .. } => (None, Op::Cache, u64::from(len), Ok(IoStats::default())),
        RequestKind::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let (reply, res) = block_status(export, cookie, offset, len, req_one, mode);
            (Some(reply), Op::BlockStatus, u64::from(len), res)
        }
        RequestKind::Disconnect => (None, Op::Flush, 0, Ok(IoStats::default())),
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
    finish(reply, op, bytes, res, t0)
}

fn finish(
    reply: Bytes,
    op: Op,
    bytes: u64,
    res: Result<IoStats, StoreError>,
    t0: Instant,
) -> (Bytes, Completion) {
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

fn log_error(op: Op, e: &StoreError) {
    match e {
        StoreError::OutOfRange { .. } => {
            tracing::debug!(op = op.as_str(), error = %e, "request refused")
        }
        _ => tracing::warn!(op = op.as_str(), error = %e, "request failed"),
    }
}

fn error_reply(cookie: u64, e: &StoreError, mode: ReplyMode) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    // Messages go to a client that may not be trusted with paths: keep it short.
    let msg = match e {
        StoreError::Corrupt { .. } => "block failed its integrity check",
        StoreError::Crypto(_) => "encryption keys unavailable",
        StoreError::OutOfRange { .. } => "range outside the export",
        _ => "storage error",
    };
    protocol::encode_error_reply(&mut b, cookie, e.errno(), msg, mode.structured);
    b.freeze()
}

/// Serves a READ from the page cache without blocking, for the connection's
/// async task. `None` when it would have to wait (data not cached, a write
/// in progress): the caller then runs the request on the blocking pool.
pub fn try_cached_read(
    export: &Export,
    cookie: u64,
    kind: RequestKind,
    mode: ReplyMode,
) -> Option<(Bytes, Completion)> {
    let RequestKind::Read { offset, len, .. } = kind else {
        return None;
    };
    let t0 = Instant::now();
    let (reply, res) = read(export, cookie, offset, len, mode, true);
    if let Err(StoreError::WouldBlock) = res {
        return None;
    }
    Some(finish(reply, Op::Read, u64::from(len), res, t0))
}

fn read(
    export: &Export,
    cookie: u64,
    offset: u64,
    len: u32,
    mode: ReplyMode,
    nowait: bool,
) -> (Bytes, Result<IoStats, StoreError>) {
    let n = len as usize;
    // The reply header is written in front of the data in the same buffer,
    // so the whole reply goes out in one write.
    let hdr = if mode.structured { 28 } else { 16 };
    let mut buf = vec![0u8; hdr + n];
    let res = if nowait {
        export.try_read_cached(offset, &mut buf[hdr..])
    } else {
        export.read(offset, &mut buf[hdr..])
    };
    if let Err(StoreError::WouldBlock) = res {
        return (Bytes::new(), res);
    }
    match &res {
        Ok(_) => {
            let mut h = BytesMut::with_capacity(hdr);
            if mode.structured {
                // Cannot fail: len + 8 fits in u32 (len <= max request).
                if protocol::encode_offset_data_header(&mut h, cookie, offset, len, true).is_err() {
                    return (
                        error_reply(cookie, &StoreError::Config("reply too large".into()), mode),
                        res,
                    );
                }
            } else {
                protocol::encode_simple_reply(&mut h, cookie, 0);
            }
            buf[..hdr].copy_from_slice(&h);
            (Bytes::from(buf), res)
        }
        Err(e) => (error_reply(cookie, e, mode), res),
    }
}

fn block_status(
    export: &Export,
    cookie: u64,
    offset: u64,
    len: u32,
    req_one: bool,
    mode: ReplyMode,
) -> (Bytes, Result<IoStats, StoreError>) {
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
        Err(e) => (error_reply(cookie, &e, mode), Err(e)),
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
