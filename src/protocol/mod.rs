//! NBD wire codec: pure functions from bytes to typed messages and back, no I/O.
//!
//! This module owns the byte layout of the Network Block Device protocol as
//! written in `doc/proto.md` of the NetworkBlockDevice/nbd project (fixed
//! newstyle handshake, simple and structured replies, block status). It never
//! touches a socket, so every message can be unit-tested and fuzzed alone
//! (the shape of tokio mini-redis' codec). Parsing follows "parse, don't
//! validate" (firecracker's block device): a [`RawRequest`] straight off the
//! wire becomes a typed [`Request`] only through [`RawRequest::validate`],
//! which does all range and flag checks with checked arithmetic, so handlers
//! never see an out-of-range offset.
//!
//! Error layers:
//! * [`ProtocolError`] – the peer broke framing (bad magic, unknown client
//!   flags): the connection must be closed.
//! * [`OptionError`] – a malformed option payload during negotiation: answer
//!   with `NBD_REP_ERR_INVALID` and keep negotiating (except after
//!   `NBD_OPT_EXPORT_NAME`, which cannot report errors: close).
//! * [`RequestError`] – a transmission request that must be refused: reply
//!   with its `errno`, and first read and discard `discard` payload bytes.
//! * [`EncodeError`] – a reply that cannot be framed (caller bug).
//!
//! Byte order is big-endian everywhere. Submodules: [`consts`] (every spec
//! constant), `handshake` (server side of negotiation), `transmission`
//! (requests and replies), `client` (the client half, for tests and benches).

pub mod consts;

mod client;
mod handshake;
mod transmission;

pub use client::{
    encode_client_flags, encode_go_opening, encode_option, encode_request,
    parse_block_status_payload, parse_export_name_reply, parse_greeting, parse_option_reply_header,
    parse_rep_info, parse_reply_magic, parse_simple_reply_header, parse_structured_chunk_header,
    parse_structured_error_payload, InfoReply, OptionReplyHeader, ReplyMagic, SimpleReplyHeader,
    StructuredChunkHeader,
};
pub use consts::{MAX_STRING_LEN, REQUEST_HEADER_LEN};
pub use handshake::{
    encode_export_name_reply, encode_greeting, encode_info_block_size, encode_info_description,
    encode_info_export, encode_info_name, encode_option_reply, encode_rep_ack, encode_rep_error,
    encode_rep_meta_context, encode_rep_server, parse_client_flags, parse_option,
    parse_option_header, ClientFlags, ClientOption, InfoRequest, MetaContextRequest, OptionError,
    OptionHeader, MAX_OPTION_LEN, SERVER_HANDSHAKE_FLAGS,
};
pub use transmission::{
    encode_block_status, encode_error_reply, encode_offset_data_header, encode_offset_hole,
    encode_simple_reply, encode_structured_chunk_header, encode_structured_error,
    encode_structured_error_offset, encode_structured_none_done, parse_request_header,
    ExportLimits, Op, RawRequest, Request, RequestError, RequestErrorReason, RequestKind,
};

/// Fatal protocol violations: the peer's framing can no longer be trusted and
/// the connection must be closed (spec: "MUST close the TCP connection" /
/// "MAY initiate a hard disconnect").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A magic number did not match.
    #[error("bad {what} magic: expected {expected:#x}, got {got:#x}")]
    BadMagic {
        /// Which message was being parsed.
        what: &'static str,
        /// The magic the spec requires.
        expected: u64,
        /// What was received.
        got: u64,
    },
    /// The client set client flags we do not know (spec: server MUST close).
    #[error("client sent unknown client flags {0:#010x}")]
    UnknownClientFlags(u32),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`; we only speak fixed newstyle.
    #[error("client does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    /// A server message (parsed on the client side) is inconsistent.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// A reply that cannot be framed as asked (a bug in the caller, never peer input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The payload does not fit the chunk's 32-bit length field.
    #[error("chunk payload of {0} bytes does not fit a 32-bit length field")]
    TooLarge(u64),
    /// A block status chunk needs at least one extent.
    #[error("block status chunk without extents")]
    EmptyExtents,
}

/// Bounds-checked reader over a byte slice; every read returns `None` instead
/// of panicking when the input is short.
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1; // terminates: 0 is always a char boundary
    }
    s.get(..end).unwrap_or("")
}

/// `data` cut to what a 32-bit length field can describe (never hit in practice;
/// keeps the length field and the bytes written consistent instead of panicking).
pub(crate) fn clamp_u32(data: &[u8]) -> (&[u8], u32) {
    let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let data = data.get(..n as usize).unwrap_or(data);
    (data, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_reads_big_endian_and_stops_at_end() {
        let mut c = Cursor::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(c.u16(), Some(1));
        assert_eq!(c.u32(), Some(2));
        assert_eq!(c.remaining(), 1);
        assert_eq!(c.u16(), None);
        assert_eq!(c.take(1), Some(&[9u8][..]));
        assert_eq!(c.take(1), None);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate_str("abc", 5), "abc");
        assert_eq!(truncate_str("abc", 2), "ab");
        assert_eq!(truncate_str("aé", 2), "a");
        assert_eq!(truncate_str("é", 0), "");
    }
}
