//! Transmission phase: the 28-byte request header, its validation into a typed
//! [`Request`], and the simple and structured reply encoders.
//!
//! [`parse_request_header`] only checks framing (magic). Everything else is
//! [`RawRequest::validate`]'s job: known command, flags allowed for that
//! command, non-zero length, `offset + length` without overflow and inside the
//! export, length limits. Its error names the errno the spec asks for and how
//! many payload bytes (for `NBD_CMD_WRITE`) the connection must still read and
//! throw away so the stream stays in sync.

use bytes::{BufMut, BytesMut};

use super::consts::*;
use super::{truncate_str, Cursor, EncodeError, ProtocolError};

/// A request header as sent, before any semantic check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRequest {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*` type.
    pub command: u16,
    /// Opaque handle ("cookie") echoed in every reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte length (for `NBD_CMD_WRITE`, the payload that follows).
    pub length: u32,
}

/// Parses a 28-byte request header. A wrong magic is fatal (the stream is out
/// of sync): close the connection.
pub fn parse_request_header(raw: &[u8; REQUEST_HEADER_LEN]) -> Result<RawRequest, ProtocolError> {
    let mut c = Cursor::new(raw);
    let magic = c.u32().unwrap_or_default();
    if magic != NBD_REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic {
            what: "request",
            expected: u64::from(NBD_REQUEST_MAGIC),
            got: u64::from(magic),
        });
    }
    Ok(RawRequest {
        flags: c.u16().unwrap_or_default(),
        command: c.u16().unwrap_or_default(),
        cookie: c.u64().unwrap_or_default(),
        offset: c.u64().unwrap_or_default(),
        length: c.u32().unwrap_or_default(),
    })
}

/// What [`RawRequest::validate`] checks against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Export size in bytes.
    pub size: u64,
    /// Largest READ/WRITE/CACHE/WRITE_ZEROES length accepted (the advertised
    /// maximum block size).
    pub max_request: u32,
    /// Whether structured replies were negotiated.
    pub structured: bool,
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Handle to echo in the reply.
    pub cookie: u64,
    /// What to do.
    pub kind: RequestKind,
}

/// Validated request kinds. For every kind with a range: `len > 0` and
/// `offset + len <= size` (no overflow); for Read, Write, Cache and
/// WriteZeroes without `fast_zero` also `len <= max_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `NBD_CMD_READ`. `df`: send at most one content chunk (structured only).
    Read {
        /// Start offset.
        offset: u64,
        /// Length.
        len: u32,
        /// `NBD_CMD_FLAG_DF`.
        df: bool,
    },
    /// `NBD_CMD_WRITE`; `len` payload bytes follow the header.
    Write {
        /// Start offset.
        offset: u64,
        /// Length of the payload.
        len: u32,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_FLUSH` (offset and length were zero).
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim {
        /// Start offset.
        offset: u64,
        /// Length.
        len: u32,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes {
        /// Start offset.
        offset: u64,
        /// Length.
        len: u32,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
        /// `NBD_CMD_FLAG_NO_HOLE`: the range must end up allocated.
        no_hole: bool,
        /// `NBD_CMD_FLAG_FAST_ZERO`: fail with `NBD_ENOTSUP` unless fast.
        fast_zero: bool,
    },
    /// `NBD_CMD_DISC`: no reply; finish in-flight requests and close.
    Disconnect,
    /// `NBD_CMD_CACHE`.
    Cache {
        /// Start offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// `NBD_CMD_BLOCK_STATUS` (structured replies were negotiated). The
    /// connection must still check that metadata contexts were selected.
    BlockStatus {
        /// Start offset.
        offset: u64,
        /// Length (a hint).
        len: u32,
        /// `NBD_CMD_FLAG_REQ_ONE`.
        req_one: bool,
    },
}

/// The command of a request, as a bounded label for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `NBD_CMD_READ`
    Read,
    /// `NBD_CMD_WRITE`
    Write,
    /// `NBD_CMD_FLUSH`
    Flush,
    /// `NBD_CMD_TRIM`
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`
    WriteZeroes,
    /// `NBD_CMD_CACHE`
    Cache,
    /// `NBD_CMD_BLOCK_STATUS`
    BlockStatus,
}

impl Op {
    /// Every operation, in [`Op::index`] order.
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::Cache,
        Op::BlockStatus,
    ];

    /// Position in [`Op::ALL`], for per-op tables.
    pub fn index(self) -> usize {
        self as usize
    }

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

impl RequestKind {
    /// The operation label of this request. A disconnect never reaches a
    /// handler; it is labelled as the flush it implies.
    pub fn op(&self) -> Op {
        match self {
            RequestKind::Read { .. } => Op::Read,
            RequestKind::Write { .. } => Op::Write,
            RequestKind::Flush | RequestKind::Disconnect => Op::Flush,
            RequestKind::Trim { .. } => Op::Trim,
            RequestKind::WriteZeroes { .. } => Op::WriteZeroes,
            RequestKind::Cache { .. } => Op::Cache,
            RequestKind::BlockStatus { .. } => Op::BlockStatus,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestErrorReason {
    /// Command type not known.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// A flag not valid for this command (or not negotiated).
    #[error("command flags {0:#06x} are not valid for this command")]
    InvalidFlags(u16),
    /// Command needs structured replies, which were not negotiated.
    #[error("command requires structured replies")]
    StructuredRequired,
    /// Flush with non-zero offset or length.
    #[error("flush offset and length must be zero")]
    NonZeroFlushFields,
    /// Zero length.
    #[error("zero-length request")]
    ZeroLength,
    /// Longer than the maximum block size.
    #[error("length {len} exceeds the maximum request size {max}")]
    TooLarge {
        /// Requested length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// `NBD_CMD_FLAG_DF` read too large for one chunk.
    #[error("length {0} cannot be sent in one chunk")]
    CannotFragmentFree(u32),
    /// Range overflows or ends beyond the export.
    #[error("range {offset}+{len} is beyond the export size {size}")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Export size.
        size: u64,
    },
}

/// A refused request: reply to `cookie` with `errno`; before that, read and
/// discard `discard` payload bytes (non-zero only for `NBD_CMD_WRITE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (errno {errno})")]
pub struct RequestError {
    /// Cookie of the refused request.
    pub cookie: u64,
    /// Its command type.
    pub command: u16,
    /// `NBD_E*` value to reply with.
    pub errno: u32,
    /// Payload bytes still on the wire that must be read and dropped.
    pub discard: u32,
    /// Why.
    pub reason: RequestErrorReason,
}

impl RawRequest {
    /// Turns a raw header into a typed [`Request`], or the error to reply with.
    ///
    /// Rules (spec "Request types" and "Error values"):
    /// * unknown command, unknown flag, or a flag not documented for the
    ///   command → `NBD_EINVAL`. FUA is accepted on every command; DF only on
    ///   READ and only with structured replies; NO_HOLE and FAST_ZERO only on
    ///   WRITE_ZEROES; REQ_ONE only on BLOCK_STATUS.
    /// * DISC is always accepted (it has no reply; other fields are ignored).
    /// * FLUSH needs offset = length = 0, else `NBD_EINVAL`.
    /// * BLOCK_STATUS without structured replies → `NBD_EINVAL`.
    /// * zero length on a ranged command → `NBD_EINVAL` (spec: unspecified).
    /// * length > `max_request` on READ/WRITE/CACHE/WRITE_ZEROES (not with
    ///   FAST_ZERO) → `NBD_EINVAL`; a DF read too big for one chunk → `NBD_EOVERFLOW`.
    /// * offset + length overflowing or past the end → `NBD_ENOSPC` for WRITE
    ///   and WRITE_ZEROES, `NBD_EINVAL` otherwise.
    ///
    /// Read-only exports (`NBD_EPERM`) and selected metadata contexts are the
    /// connection's business.
    pub fn validate(&self, limits: &ExportLimits) -> Result<Request, RequestError> {
        let discard = if self.command == NBD_CMD_WRITE {
            self.length
        } else {
            0
        };
        let fail = |errno: u32, reason: RequestErrorReason| RequestError {
            cookie: self.cookie,
            command: self.command,
            errno,
            discard,
            reason,
        };
        let allowed = match self.command {
            NBD_CMD_DISC => {
                return Ok(Request {
                    cookie: self.cookie,
                    kind: RequestKind::Disconnect,
                })
            }
            NBD_CMD_READ => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
            NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_CACHE => NBD_CMD_FLAG_FUA,
            NBD_CMD_WRITE_ZEROES => {
                NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO
            }
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
            other => return Err(fail(NBD_EINVAL, RequestErrorReason::UnknownCommand(other))),
        };
        let bad_flags = self.flags & !allowed;
        if bad_flags != 0 {
            return Err(fail(
                NBD_EINVAL,
                RequestErrorReason::InvalidFlags(bad_flags),
            ));
        }
        let flag = |f: u16| self.flags & f != 0;
        if flag(NBD_CMD_FLAG_DF) && !limits.structured {
            return Err(fail(
                NBD_EINVAL,
                RequestErrorReason::InvalidFlags(NBD_CMD_FLAG_DF),
            ));
        }
        if self.command == NBD_CMD_FLUSH {
            if self.offset != 0 || self.length != 0 {
                return Err(fail(NBD_EINVAL, RequestErrorReason::NonZeroFlushFields));
            }
            return Ok(Request {
                cookie: self.cookie,
                kind: RequestKind::Flush,
            });
        }
        if self.command == NBD_CMD_BLOCK_STATUS && !limits.structured {
            return Err(fail(NBD_EINVAL, RequestErrorReason::StructuredRequired));
        }
        if self.length == 0 {
            return Err(fail(NBD_EINVAL, RequestErrorReason::ZeroLength));
        }
        let limited = match self.command {
            NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_CACHE => true,
            NBD_CMD_WRITE_ZEROES => !flag(NBD_CMD_FLAG_FAST_ZERO),
            _ => false,
        };
        if limited && self.length > limits.max_request {
            return Err(fail(
                NBD_EINVAL,
                RequestErrorReason::TooLarge {
                    len: self.length,
                    max: limits.max_request,
                },
            ));
        }
        if self.command == NBD_CMD_READ
            && flag(NBD_CMD_FLAG_DF)
            && self.length > MAX_OFFSET_DATA_LEN
        {
            return Err(fail(
                NBD_EOVERFLOW,
                RequestErrorReason::CannotFragmentFree(self.length),
            ));
        }
        let in_range = self
            .offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= limits.size);
        if !in_range {
            let errno = match self.command {
                NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES => NBD_ENOSPC,
                _ => NBD_EINVAL,
            };
            return Err(fail(
                errno,
                RequestErrorReason::OutOfRange {
                    offset: self.offset,
                    len: self.length,
                    size: limits.size,
                },
            ));
        }
        let (offset, len, fua) = (self.offset, self.length, flag(NBD_CMD_FLAG_FUA));
        let kind = match self.command {
            NBD_CMD_READ => RequestKind::Read {
                offset,
                len,
                df: flag(NBD_CMD_FLAG_DF),
            },
            NBD_CMD_WRITE => RequestKind::Write { offset, len, fua },
            NBD_CMD_TRIM => RequestKind::Trim { offset, len, fua },
            NBD_CMD_CACHE => RequestKind::Cache { offset, len },
            NBD_CMD_WRITE_ZEROES => RequestKind::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: flag(NBD_CMD_FLAG_NO_HOLE),
                fast_zero: flag(NBD_CMD_FLAG_FAST_ZERO),
            },
            // Only BLOCK_STATUS is left: every other command returned above.
            _ => RequestKind::BlockStatus {
                offset,
                len,
                req_one: flag(NBD_CMD_FLAG_REQ_ONE),
            },
        };
        Ok(Request {
            cookie: self.cookie,
            kind,
        })
    }
}

// ---------------------------------------------------------------- replies

/// Simple reply header (16 bytes): magic, error, cookie. For a successful READ
/// the caller appends exactly `len` data bytes; after a non-zero `error` NO
/// payload may follow (spec), not even for READ.
pub fn encode_simple_reply(buf: &mut BytesMut, cookie: u64, error: u32) {
    buf.reserve(SIMPLE_REPLY_HEADER_LEN);
    buf.put_u32(NBD_SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// Structured reply chunk header (20 bytes): magic, flags, type, cookie, payload length.
pub fn encode_structured_chunk_header(
    buf: &mut BytesMut,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    len: u32,
) {
    buf.reserve(STRUCTURED_REPLY_HEADER_LEN);
    buf.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(chunk_type);
    buf.put_u64(cookie);
    buf.put_u32(len);
}

fn done_flag(done: bool) -> u16 {
    if done {
        NBD_REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk plus its 8-byte offset; the
/// caller appends exactly `data_len` bytes. `data_len` must be 1..=[`MAX_OFFSET_DATA_LEN`].
pub fn encode_offset_data_header(
    buf: &mut BytesMut,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> Result<(), EncodeError> {
    let len = data_len
        .checked_add(8)
        .ok_or(EncodeError::TooLarge(u64::from(data_len) + 8))?;
    encode_structured_chunk_header(
        buf,
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        len,
    );
    buf.put_u64(offset);
    Ok(())
}

/// A complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (length 12): offset and
/// hole size (must be non-zero).
pub fn encode_offset_hole(buf: &mut BytesMut, cookie: u64, offset: u64, hole_len: u32, done: bool) {
    encode_structured_chunk_header(buf, done_flag(done), NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    buf.put_u64(offset);
    buf.put_u32(hole_len);
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk: errno (non-zero), u16 message
/// length, message (truncated to 4096 bytes).
pub fn encode_structured_error(
    buf: &mut BytesMut,
    cookie: u64,
    errno: u32,
    message: &str,
    done: bool,
) {
    let msg = truncate_str(message, MAX_STRING_LEN);
    // ≤ 4096: the casts cannot truncate.
    encode_structured_chunk_header(
        buf,
        done_flag(done),
        NBD_REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    buf.put_u32(errno);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg.as_bytes());
}

/// A complete `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: errno, u16 message length,
/// message (≤ 4096 bytes), u64 offset.
pub fn encode_structured_error_offset(
    buf: &mut BytesMut,
    cookie: u64,
    errno: u32,
    message: &str,
    offset: u64,
    done: bool,
) {
    let msg = truncate_str(message, MAX_STRING_LEN);
    encode_structured_chunk_header(
        buf,
        done_flag(done),
        NBD_REPLY_TYPE_ERROR_OFFSET,
        cookie,
        14 + msg.len() as u32,
    );
    buf.put_u32(errno);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg.as_bytes());
    buf.put_u64(offset);
}

/// The final `NBD_REPLY_TYPE_NONE` chunk (flag DONE, length 0).
pub fn encode_structured_none_done(buf: &mut BytesMut, cookie: u64) {
    encode_structured_chunk_header(buf, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: context id, then one
/// (length, flags) descriptor per extent. Needs at least one extent; extent
/// lengths should be non-zero.
pub fn encode_block_status(
    buf: &mut BytesMut,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
    done: bool,
) -> Result<(), EncodeError> {
    if extents.is_empty() {
        return Err(EncodeError::EmptyExtents);
    }
    let wide = (extents.len() as u64).saturating_mul(8).saturating_add(4);
    let len = u32::try_from(wide).map_err(|_| EncodeError::TooLarge(wide))?;
    encode_structured_chunk_header(
        buf,
        done_flag(done),
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len,
    );
    buf.reserve(len as usize);
    buf.put_u32(context_id);
    for &(length, flags) in extents {
        buf.put_u32(length);
        buf.put_u32(flags);
    }
    Ok(())
}

/// The whole error reply for a failed request in the negotiated reply style:
/// a final `NBD_REPLY_TYPE_ERROR` chunk when `structured` (required for READ,
/// preferred otherwise), else a bare simple reply (never followed by data).
pub fn encode_error_reply(
    buf: &mut BytesMut,
    cookie: u64,
    errno: u32,
    message: &str,
    structured: bool,
) {
    if structured {
        encode_structured_error(buf, cookie, errno, message, true);
    } else {
        encode_simple_reply(buf, cookie, errno);
    }
}

impl RequestError {
    /// Encodes this error's reply (see [`encode_error_reply`]) with the reason
    /// as the message.
    pub fn encode_reply(&self, buf: &mut BytesMut, structured: bool) {
        encode_error_reply(
            buf,
            self.cookie,
            self.errno,
            &self.reason.to_string(),
            structured,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::client::encode_request;
    use super::*;
    use proptest::prelude::*;

    const LIM: ExportLimits = ExportLimits {
        size: 1 << 20,
        max_request: 1 << 16,
        structured: false,
    };
    const SLIM: ExportLimits = ExportLimits {
        structured: true,
        ..LIM
    };

    fn raw(command: u16, flags: u16, offset: u64, length: u32) -> RawRequest {
        RawRequest {
            flags,
            command,
            cookie: 0xdead_beef,
            offset,
            length,
        }
    }

    fn err(r: RawRequest, l: &ExportLimits) -> (u32, u32, RequestErrorReason) {
        let e = r.validate(l).unwrap_err();
        assert_eq!(e.cookie, 0xdead_beef);
        assert_eq!(e.command, r.command);
        (e.errno, e.discard, e.reason)
    }

    fn kind(r: RawRequest, l: &ExportLimits) -> RequestKind {
        let req = r.validate(l).unwrap();
        assert_eq!(req.cookie, 0xdead_beef);
        req.kind
    }

    #[test]
    fn request_header_layout() {
        let raw_bytes: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags
            0x00, 0x01, // type WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
            0, 0, 0x02, 0, // length 512
        ];
        let r = parse_request_header(&raw_bytes).unwrap();
        assert_eq!(
            r,
            RawRequest {
                flags: NBD_CMD_FLAG_FUA,
                command: NBD_CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512
            }
        );
        let mut b = BytesMut::new();
        encode_request(&mut b, &r);
        assert_eq!(&b[..], &raw_bytes[..]);
        let mut bad = raw_bytes;
        bad[3] = 0x14;
        assert!(matches!(
            parse_request_header(&bad),
            Err(ProtocolError::BadMagic {
                what: "request",
                got: 0x2560_9514,
                ..
            })
        ));
    }

    #[test]
    fn valid_requests() {
        assert_eq!(
            kind(raw(NBD_CMD_READ, 0, 0, 512), &LIM),
            RequestKind::Read {
                offset: 0,
                len: 512,
                df: false
            }
        );
        assert_eq!(
            kind(
                raw(
                    NBD_CMD_READ,
                    NBD_CMD_FLAG_DF | NBD_CMD_FLAG_FUA,
                    4096,
                    1 << 16
                ),
                &SLIM
            ),
            RequestKind::Read {
                offset: 4096,
                len: 1 << 16,
                df: true
            }
        );
        assert_eq!(
            kind(
                raw(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, (1 << 20) - 512, 512),
                &LIM
            ),
            RequestKind::Write {
                offset: (1 << 20) - 512,
                len: 512,
                fua: true
            }
        );
        assert_eq!(kind(raw(NBD_CMD_FLUSH, 0, 0, 0), &LIM), RequestKind::Flush);
        assert_eq!(
            kind(raw(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0), &LIM),
            RequestKind::Flush
        );
        // trim is not bounded by max_request
        assert_eq!(
            kind(raw(NBD_CMD_TRIM, 0, 0, 1 << 20), &LIM),
            RequestKind::Trim {
                offset: 0,
                len: 1 << 20,
                fua: false
            }
        );
        assert_eq!(
            kind(raw(NBD_CMD_CACHE, 0, 10, 20), &LIM),
            RequestKind::Cache {
                offset: 10,
                len: 20
            }
        );
        assert_eq!(
            kind(
                raw(
                    NBD_CMD_WRITE_ZEROES,
                    NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
                    0,
                    1 << 20
                ),
                &LIM
            ),
            RequestKind::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false,
                no_hole: true,
                fast_zero: true
            }
        );
        assert_eq!(
            kind(
                raw(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 1 << 20),
                &SLIM
            ),
            RequestKind::BlockStatus {
                offset: 0,
                len: 1 << 20,
                req_one: true
            }
        );
        // DISC: always accepted, fields ignored
        assert_eq!(
            kind(raw(NBD_CMD_DISC, 0xffff, 5, 5), &LIM),
            RequestKind::Disconnect
        );
    }

    #[test]
    fn refused_requests() {
        use RequestErrorReason as R;
        // unknown command
        assert_eq!(
            err(raw(9, 0, 0, 1), &LIM),
            (NBD_EINVAL, 0, R::UnknownCommand(9))
        );
        assert_eq!(
            err(raw(NBD_CMD_RESIZE, 0, 0, 1), &LIM),
            (NBD_EINVAL, 0, R::UnknownCommand(8))
        );
        // flags not valid for the command
        assert_eq!(
            err(raw(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 100), &LIM),
            (NBD_EINVAL, 100, R::InvalidFlags(NBD_CMD_FLAG_NO_HOLE))
        );
        assert_eq!(
            err(raw(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 1), &LIM),
            (NBD_EINVAL, 0, R::InvalidFlags(NBD_CMD_FLAG_REQ_ONE))
        );
        assert_eq!(
            err(raw(NBD_CMD_TRIM, 1 << 15, 0, 1), &LIM),
            (NBD_EINVAL, 0, R::InvalidFlags(1 << 15))
        );
        assert_eq!(
            err(raw(NBD_CMD_READ, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 1), &SLIM).0,
            NBD_EINVAL
        );
        // DF without structured replies
        assert_eq!(
            err(raw(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1), &LIM),
            (NBD_EINVAL, 0, R::InvalidFlags(NBD_CMD_FLAG_DF))
        );
        // block status without structured replies
        assert_eq!(
            err(raw(NBD_CMD_BLOCK_STATUS, 0, 0, 1), &LIM),
            (NBD_EINVAL, 0, R::StructuredRequired)
        );
        // flush with fields
        assert_eq!(
            err(raw(NBD_CMD_FLUSH, 0, 1, 0), &LIM),
            (NBD_EINVAL, 0, R::NonZeroFlushFields)
        );
        // zero length
        for c in [
            NBD_CMD_READ,
            NBD_CMD_WRITE,
            NBD_CMD_TRIM,
            NBD_CMD_CACHE,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_BLOCK_STATUS,
        ] {
            assert_eq!(err(raw(c, 0, 0, 0), &SLIM), (NBD_EINVAL, 0, R::ZeroLength));
        }
        // too large: write must discard its payload
        assert_eq!(
            err(raw(NBD_CMD_WRITE, 0, 0, (1 << 16) + 1), &LIM),
            (
                NBD_EINVAL,
                (1 << 16) + 1,
                R::TooLarge {
                    len: (1 << 16) + 1,
                    max: 1 << 16
                }
            )
        );
        assert_eq!(
            err(raw(NBD_CMD_READ, 0, 0, (1 << 16) + 1), &LIM).0,
            NBD_EINVAL
        );
        assert_eq!(
            err(raw(NBD_CMD_CACHE, 0, 0, (1 << 16) + 1), &LIM).0,
            NBD_EINVAL
        );
        assert_eq!(
            err(raw(NBD_CMD_WRITE_ZEROES, 0, 0, (1 << 16) + 1), &LIM).0,
            NBD_EINVAL
        );
        // out of range
        let oor = R::OutOfRange {
            offset: 1 << 20,
            len: 1,
            size: 1 << 20,
        };
        assert_eq!(
            err(raw(NBD_CMD_READ, 0, 1 << 20, 1), &LIM),
            (NBD_EINVAL, 0, oor)
        );
        assert_eq!(
            err(raw(NBD_CMD_WRITE, 0, 1 << 20, 1), &LIM),
            (NBD_ENOSPC, 1, oor)
        );
        assert_eq!(
            err(raw(NBD_CMD_WRITE_ZEROES, 0, 1 << 20, 1), &LIM),
            (NBD_ENOSPC, 0, oor)
        );
        assert_eq!(
            err(raw(NBD_CMD_TRIM, 0, 1 << 20, 1), &LIM),
            (NBD_EINVAL, 0, oor)
        );
        assert_eq!(
            err(raw(NBD_CMD_BLOCK_STATUS, 0, 1 << 20, 1), &SLIM),
            (NBD_EINVAL, 0, oor)
        );
        // offset + len overflows u64
        assert_eq!(
            err(raw(NBD_CMD_WRITE, 0, u64::MAX, 512), &LIM).0,
            NBD_ENOSPC
        );
        assert_eq!(
            err(raw(NBD_CMD_READ, 0, u64::MAX - 10, 512), &LIM).0,
            NBD_EINVAL
        );
        // DF read that cannot fit one chunk
        let huge = ExportLimits {
            size: u64::MAX,
            max_request: u32::MAX,
            structured: true,
        };
        assert_eq!(
            err(raw(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, u32::MAX), &huge),
            (NBD_EOVERFLOW, 0, R::CannotFragmentFree(u32::MAX))
        );
        assert!(raw(NBD_CMD_READ, 0, 0, u32::MAX).validate(&huge).is_ok());
    }

    #[test]
    fn simple_reply_layout() {
        let mut b = BytesMut::new();
        encode_simple_reply(&mut b, 0x0102_0304_0506_0708, NBD_EIO);
        assert_eq!(
            &b[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    fn chunk(b: &[u8], flags: u16, ty: u16, cookie: u64, len: u32) {
        assert_eq!(&b[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&b[4..6], &flags.to_be_bytes());
        assert_eq!(&b[6..8], &ty.to_be_bytes());
        assert_eq!(&b[8..16], &cookie.to_be_bytes());
        assert_eq!(&b[16..20], &len.to_be_bytes());
    }

    #[test]
    fn structured_layouts() {
        let mut b = BytesMut::new();
        encode_structured_chunk_header(&mut b, 1, 5, 7, 99);
        assert_eq!(b.len(), 20);
        chunk(&b, 1, 5, 7, 99);

        let mut b = BytesMut::new();
        encode_offset_data_header(&mut b, 7, 4096, 512, true).unwrap();
        assert_eq!(b.len(), 28);
        chunk(&b, 1, NBD_REPLY_TYPE_OFFSET_DATA, 7, 520);
        assert_eq!(&b[20..], &4096u64.to_be_bytes());
        assert_eq!(
            encode_offset_data_header(&mut b, 7, 0, u32::MAX, false),
            Err(EncodeError::TooLarge(u64::from(u32::MAX) + 8))
        );

        let mut b = BytesMut::new();
        encode_offset_hole(&mut b, 7, 8192, 4096, false);
        assert_eq!(b.len(), 32);
        chunk(&b, 0, NBD_REPLY_TYPE_OFFSET_HOLE, 7, 12);
        assert_eq!(&b[20..], &[0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x10, 0]);

        let mut b = BytesMut::new();
        encode_structured_error(&mut b, 7, NBD_EINVAL, "bad", true);
        chunk(&b, 1, 0x8001, 7, 9);
        assert_eq!(&b[20..], &[0, 0, 0, 22, 0, 3, b'b', b'a', b'd']);

        let mut b = BytesMut::new();
        encode_structured_error_offset(&mut b, 7, NBD_EIO, "x", 512, false);
        chunk(&b, 0, 0x8002, 7, 15);
        assert_eq!(&b[20..], &[0, 0, 0, 5, 0, 1, b'x', 0, 0, 0, 0, 0, 0, 2, 0]);

        let mut b = BytesMut::new();
        encode_structured_none_done(&mut b, 7);
        assert_eq!(b.len(), 20);
        chunk(&b, 1, 0, 7, 0);

        let mut b = BytesMut::new();
        encode_block_status(
            &mut b,
            7,
            1,
            &[(4096, 0), (8192, NBD_STATE_HOLE | NBD_STATE_ZERO)],
            true,
        )
        .unwrap();
        chunk(&b, 1, NBD_REPLY_TYPE_BLOCK_STATUS, 7, 20);
        assert_eq!(
            &b[20..],
            &[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 3]
        );
        assert_eq!(
            encode_block_status(&mut b, 7, 1, &[], true),
            Err(EncodeError::EmptyExtents)
        );

        let long = "x".repeat(5000);
        let mut b = BytesMut::new();
        encode_structured_error(&mut b, 7, NBD_EIO, &long, true);
        chunk(&b, 1, NBD_REPLY_TYPE_ERROR, 7, 6 + 4096);
        assert_eq!(b.len(), 20 + 6 + 4096);
    }

    #[test]
    fn error_reply_styles() {
        let e = raw(NBD_CMD_READ, 0, 1 << 20, 1).validate(&LIM).unwrap_err();
        let mut b = BytesMut::new();
        e.encode_reply(&mut b, false);
        assert_eq!(b.len(), 16);
        assert_eq!(&b[4..8], &NBD_EINVAL.to_be_bytes());
        let mut b = BytesMut::new();
        e.encode_reply(&mut b, true);
        chunk(
            &b,
            1,
            NBD_REPLY_TYPE_ERROR,
            0xdead_beef,
            (b.len() - 20) as u32,
        );
        assert_eq!(&b[20..24], &NBD_EINVAL.to_be_bytes());
        assert!(e.to_string().contains("errno 22"));
    }

    fn arb_raw() -> impl Strategy<Value = RawRequest> {
        (
            prop_oneof![0u16..10, any::<u16>()],
            prop_oneof![0u16..32, any::<u16>()],
            any::<u64>(),
            prop_oneof![
                0u64..(1 << 22),
                any::<u64>(),
                (u64::MAX - (1 << 20))..=u64::MAX
            ],
            prop_oneof![0u32..(1 << 22), any::<u32>()],
        )
            .prop_map(|(command, flags, cookie, offset, length)| RawRequest {
                flags,
                command,
                cookie,
                offset,
                length,
            })
    }

    fn arb_limits() -> impl Strategy<Value = ExportLimits> {
        (
            prop_oneof![0u64..(1 << 22), any::<u64>()],
            prop_oneof![0u32..(1 << 20), any::<u32>()],
            any::<bool>(),
        )
            .prop_map(|(size, max_request, structured)| ExportLimits {
                size,
                max_request,
                structured,
            })
    }

    proptest! {
        #[test]
        fn header_round_trip(r in arb_raw()) {
            let mut b = BytesMut::new();
            encode_request(&mut b, &r);
            prop_assert_eq!(b.len(), REQUEST_HEADER_LEN);
            let arr: [u8; REQUEST_HEADER_LEN] = b[..].try_into().unwrap();
            prop_assert_eq!(parse_request_header(&arr), Ok(r));
        }

        #[test]
        fn parse_header_never_panics(bytes in proptest::array::uniform28(any::<u8>())) {
            let _ = parse_request_header(&bytes);
        }

        #[test]
        fn validate_accepts_in_range_requests(
            size in 1u64..(1 << 40),
            max_request in 1u32..(1 << 25),
            command in prop::sample::select(vec![
                NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_CACHE,
                NBD_CMD_WRITE_ZEROES, NBD_CMD_BLOCK_STATUS,
            ]),
            fua in any::<bool>(),
            len_seed in any::<u32>(),
            off_seed in any::<u64>(),
        ) {
            let max_len = u64::from(max_request).min(size);
            let len = (u64::from(len_seed) % max_len + 1) as u32;
            let offset = off_seed % (size - u64::from(len) + 1);
            let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
            let r = RawRequest { flags, command, cookie: 1, offset, length: len };
            let l = ExportLimits { size, max_request, structured: true };
            let req = r.validate(&l);
            prop_assert!(req.is_ok(), "{:?} refused: {:?}", r, req);
        }

        #[test]
        fn validate_is_total_and_sound(r in arb_raw(), l in arb_limits()) {
            match r.validate(&l) {
                Ok(req) => {
                    prop_assert_eq!(req.cookie, r.cookie);
                    let range = match req.kind {
                        RequestKind::Read { offset, len, df } => {
                            prop_assert!(len <= l.max_request);
                            prop_assert!(!df || l.structured);
                            Some((offset, len))
                        }
                        RequestKind::Write { offset, len, .. }
                        | RequestKind::Cache { offset, len } => {
                            prop_assert!(len <= l.max_request);
                            Some((offset, len))
                        }
                        RequestKind::WriteZeroes { offset, len, fast_zero, .. } => {
                            prop_assert!(fast_zero || len <= l.max_request);
                            Some((offset, len))
                        }
                        RequestKind::Trim { offset, len, .. } => Some((offset, len)),
                        RequestKind::BlockStatus { offset, len, .. } => {
                            prop_assert!(l.structured);
                            Some((offset, len))
                        }
                        RequestKind::Flush => {
                            prop_assert_eq!((r.offset, r.length), (0, 0));
                            None
                        }
                        RequestKind::Disconnect => {
                            prop_assert_eq!(r.command, NBD_CMD_DISC);
                            None
                        }
                    };
                    if let Some((offset, len)) = range {
                        prop_assert_eq!((offset, len), (r.offset, r.length));
                        prop_assert!(len > 0);
                        let end = offset.checked_add(u64::from(len));
                        prop_assert!(end.is_some_and(|e| e <= l.size));
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e.cookie, r.cookie);
                    prop_assert!([NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW].contains(&e.errno));
                    let want_discard = if r.command == NBD_CMD_WRITE { r.length } else { 0 };
                    prop_assert_eq!(e.discard, want_discard);
                }
            }
        }
    }
}
