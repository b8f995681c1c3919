//! Server side of the fixed-newstyle handshake: the greeting, client flags,
//! option headers and payloads, option replies, and the export-name type.
//!
//! Options are parsed in two steps so the connection layer controls reads:
//! [`parse_option_header`] on the fixed 16 bytes (fatal on a bad magic), then,
//! after reading at most [`MAX_OPTION_LEN`] payload bytes,
//! [`parse_option`] (recoverable [`OptionError`] → `NBD_REP_ERR_INVALID`).

use bytes::{BufMut, BytesMut};

use super::consts::*;
use super::{clamp_u32, truncate_str, Cursor, ProtocolError};

/// Largest option payload the connection layer accepts (64 KiB). Bigger
/// payloads are refused without being buffered.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Handshake flags this server always sends: `FIXED_NEWSTYLE | NO_ZEROES`.
pub const SERVER_HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/// Writes the 18-byte newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, handshake
/// flags [`SERVER_HANDSHAKE_FLAGS`].
pub fn encode_greeting(buf: &mut BytesMut) {
    buf.reserve(GREETING_LEN);
    buf.put_u64(NBD_MAGIC);
    buf.put_u64(NBD_IHAVEOPT);
    buf.put_u16(SERVER_HANDSHAKE_FLAGS);
}

/// Client flags the server accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_NO_ZEROES`: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// The wire value (always includes `NBD_FLAG_C_FIXED_NEWSTYLE`).
    pub fn bits(self) -> u32 {
        let mut bits = NBD_FLAG_C_FIXED_NEWSTYLE;
        if self.no_zeroes {
            bits |= NBD_FLAG_C_NO_ZEROES;
        }
        bits
    }
}

/// Parses the client's 32-bit flags. Unknown bits and a client without
/// `NBD_FLAG_C_FIXED_NEWSTYLE` are fatal: the connection must be closed.
pub fn parse_client_flags(raw: [u8; 4]) -> Result<ClientFlags, ProtocolError> {
    let bits = u32::from_be_bytes(raw);
    if bits & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::UnknownClientFlags(bits));
    }
    if bits & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle);
    }
    Ok(ClientFlags {
        no_zeroes: bits & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// Header of a client option: the option code and its payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*` code (any value; unknown ones are answered `NBD_REP_ERR_UNSUP`).
    pub option: u32,
    /// Payload length that follows the header.
    pub length: u32,
}

impl OptionHeader {
    /// True if the payload is larger than [`MAX_OPTION_LEN`].
    pub fn is_oversized(&self) -> bool {
        self.length > MAX_OPTION_LEN
    }
}

/// Parses a 16-byte option header. A wrong `IHAVEOPT` magic is fatal.
pub fn parse_option_header(raw: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtocolError> {
    let mut c = Cursor::new(raw);
    let (magic, option, length) = (
        c.u64().unwrap_or_default(),
        c.u32().unwrap_or_default(),
        c.u32().unwrap_or_default(),
    );
    if magic != NBD_IHAVEOPT {
        return Err(ProtocolError::BadMagic {
            what: "option",
            expected: NBD_IHAVEOPT,
            got: magic,
        });
    }
    Ok(OptionHeader { option, length })
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name as sent (empty = default export); not yet validated as an export name.
    pub name: String,
    /// Requested `NBD_INFO_*` items, in request order.
    pub info_types: Vec<u16>,
}

impl InfoRequest {
    /// Writes this request as option data (client side): u32 name length,
    /// name, u16 count, u16 info types. Over-long fields are truncated to what
    /// their length fields can express.
    pub fn encode(&self, buf: &mut BytesMut) {
        let (name, name_len) = clamp_u32(self.name.as_bytes());
        let types = self
            .info_types
            .get(..self.info_types.len().min(u16::MAX as usize))
            .unwrap_or(&[]);
        buf.put_u32(name_len);
        buf.put_slice(name);
        buf.put_u16(u16::try_from(types.len()).unwrap_or(u16::MAX));
        for t in types {
            buf.put_u16(*t);
        }
    }
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name as sent (empty = default export).
    pub export: String,
    /// Query strings (e.g. `base:allocation`), in request order.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Writes this request as option data (client side): u32 export length,
    /// export, u32 query count, then u32 length + bytes per query.
    pub fn encode(&self, buf: &mut BytesMut) {
        let (export, export_len) = clamp_u32(self.export.as_bytes());
        buf.put_u32(export_len);
        buf.put_slice(export);
        buf.put_u32(u32::try_from(self.queries.len()).unwrap_or(u32::MAX));
        for q in &self.queries {
            let (q, q_len) = clamp_u32(q.as_bytes());
            buf.put_u32(q_len);
            buf.put_slice(q);
        }
    }
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME` (name as sent; empty = default export). Errors
    /// cannot be reported for this option: refuse by closing the connection.
    ExportName(String),
    /// `NBD_OPT_ABORT` (any payload is ignored, as the spec asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// Any other option (STARTTLS, PEEK_EXPORT, EXTENDED_HEADERS, unknown):
    /// answer `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

/// A malformed option payload. Recoverable: reply with
/// [`OptionError::reply_type`] (`NBD_REP_ERR_INVALID`) and keep negotiating.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The data slice is not as long as the header says (caller bug).
    #[error("option header announces {declared} bytes but {actual} were given")]
    LengthMismatch {
        /// Length from the header.
        declared: u32,
        /// Length of the data slice.
        actual: usize,
    },
    /// The option takes no data but some was sent.
    #[error("option {option} takes no data but {len} bytes were sent")]
    UnexpectedData {
        /// Option code.
        option: u32,
        /// Bytes received.
        len: usize,
    },
    /// The data ends before a field is complete (lengths don't add up).
    #[error("option data too short for {0}")]
    Truncated(&'static str),
    /// Bytes remain after the last field.
    #[error("{0} unexpected bytes after the option data")]
    TrailingData(usize),
    /// A string field is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// A string field contains NUL.
    #[error("{0} contains a NUL character")]
    ContainsNul(&'static str),
    /// A string field is longer than 4096 bytes.
    #[error("{field} is {len} bytes long (maximum 4096)")]
    StringTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
}

impl OptionError {
    /// The option reply type to answer with: always `NBD_REP_ERR_INVALID`.
    pub fn reply_type(&self) -> u32 {
        NBD_REP_ERR_INVALID
    }
}

/// Validates a protocol string: ≤ 4096 bytes, UTF-8, no NUL.
fn parse_string(bytes: &[u8], field: &'static str) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionError::StringTooLong {
            field,
            len: bytes.len(),
        });
    }
    let s = std::str::from_utf8(bytes).map_err(|_| OptionError::InvalidUtf8(field))?;
    if s.contains('\0') {
        return Err(OptionError::ContainsNul(field));
    }
    Ok(s.to_owned())
}

/// Reads a u32-length-prefixed string.
fn read_string(c: &mut Cursor<'_>, field: &'static str) -> Result<String, OptionError> {
    let len = c.u32().ok_or(OptionError::Truncated(field))?;
    let len = usize::try_from(len).map_err(|_| OptionError::Truncated(field))?;
    let bytes = c.take(len).ok_or(OptionError::Truncated(field))?;
    parse_string(bytes, field)
}

fn expect_end(c: &Cursor<'_>) -> Result<(), OptionError> {
    match c.remaining() {
        0 => Ok(()),
        n => Err(OptionError::TrailingData(n)),
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut c = Cursor::new(data);
    let name = read_string(&mut c, "export name")?;
    let count = c
        .u16()
        .ok_or(OptionError::Truncated("info request count"))?;
    let mut info_types = Vec::with_capacity(usize::from(count).min(c.remaining() / 2));
    for _ in 0..count {
        info_types.push(c.u16().ok_or(OptionError::Truncated("info requests"))?);
    }
    expect_end(&c)?;
    Ok(InfoRequest { name, info_types })
}

fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, OptionError> {
    let mut c = Cursor::new(data);
    let export = read_string(&mut c, "export name")?;
    let count = c.u32().ok_or(OptionError::Truncated("query count"))?;
    // Each query needs at least 4 bytes: never pre-allocate more than that allows.
    let cap = usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(c.remaining() / 4);
    let mut queries = Vec::with_capacity(cap);
    for _ in 0..count {
        queries.push(read_string(&mut c, "metadata context query")?);
    }
    expect_end(&c)?;
    Ok(MetaContextRequest { export, queries })
}

/// Parses an option payload. `data` must be exactly `header.length` bytes.
pub fn parse_option(header: OptionHeader, data: &[u8]) -> Result<ClientOption, OptionError> {
    if usize::try_from(header.length).ok() != Some(data.len()) {
        return Err(OptionError::LengthMismatch {
            declared: header.length,
            actual: data.len(),
        });
    }
    let no_data = |opt: ClientOption| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(OptionError::UnexpectedData {
                option: header.option,
                len: data.len(),
            })
        }
    };
    match header.option {
        NBD_OPT_EXPORT_NAME => parse_string(data, "export name").map(ClientOption::ExportName),
        // Spec: "a server SHOULD ignore any data sent by the client rather
        // than rejecting the request as invalid".
        NBD_OPT_ABORT => Ok(ClientOption::Abort),
        NBD_OPT_LIST => no_data(ClientOption::List),
        NBD_OPT_INFO => parse_info_request(data).map(ClientOption::Info),
        NBD_OPT_GO => parse_info_request(data).map(ClientOption::Go),
        NBD_OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        NBD_OPT_LIST_META_CONTEXT => {
            parse_meta_context_request(data).map(ClientOption::ListMetaContext)
        }
        NBD_OPT_SET_META_CONTEXT => {
            parse_meta_context_request(data).map(ClientOption::SetMetaContext)
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

// ---------------------------------------------------------------- option replies

fn put_reply_header(buf: &mut BytesMut, option: u32, reply_type: u32, len: u32) {
    buf.reserve(OPTION_REPLY_HEADER_LEN.saturating_add(len as usize));
    buf.put_u64(NBD_REP_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply_type);
    buf.put_u32(len);
}

/// Writes an option reply: magic, option, reply type, length, data.
pub fn encode_option_reply(buf: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    let (data, len) = clamp_u32(data);
    put_reply_header(buf, option, reply_type, len);
    buf.put_slice(data);
}

/// `NBD_REP_ACK` for `option` (no data).
pub fn encode_rep_ack(buf: &mut BytesMut, option: u32) {
    encode_option_reply(buf, option, NBD_REP_ACK, &[]);
}

/// `NBD_REP_SERVER` (reply to `NBD_OPT_LIST`): u32 name length, name.
/// The name is truncated to 4096 bytes.
pub fn encode_rep_server(buf: &mut BytesMut, name: &str) {
    let name = truncate_str(name, MAX_STRING_LEN);
    // ≤ 4096 + 4: the casts cannot truncate.
    put_reply_header(buf, NBD_OPT_LIST, NBD_REP_SERVER, 4 + name.len() as u32);
    buf.put_u32(name.len() as u32);
    buf.put_slice(name.as_bytes());
}

/// `NBD_REP_INFO` / `NBD_INFO_EXPORT` (length 12): size and transmission flags.
/// `option` is `NBD_OPT_INFO` or `NBD_OPT_GO`.
pub fn encode_info_export(buf: &mut BytesMut, option: u32, size: u64, transmission_flags: u16) {
    put_reply_header(buf, option, NBD_REP_INFO, 12);
    buf.put_u16(NBD_INFO_EXPORT);
    buf.put_u64(size);
    buf.put_u16(transmission_flags);
}

fn encode_info_string(buf: &mut BytesMut, option: u32, info: u16, s: &str) {
    let s = truncate_str(s, MAX_STRING_LEN);
    put_reply_header(buf, option, NBD_REP_INFO, 2 + s.len() as u32);
    buf.put_u16(info);
    buf.put_slice(s.as_bytes());
}

/// `NBD_REP_INFO` / `NBD_INFO_NAME`: canonical export name (≤ 4096 bytes).
pub fn encode_info_name(buf: &mut BytesMut, option: u32, name: &str) {
    encode_info_string(buf, option, NBD_INFO_NAME, name);
}

/// `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`: human-readable text (≤ 4096 bytes).
pub fn encode_info_description(buf: &mut BytesMut, option: u32, description: &str) {
    encode_info_string(buf, option, NBD_INFO_DESCRIPTION, description);
}

/// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` (length 14): minimum, preferred and
/// maximum block size.
pub fn encode_info_block_size(
    buf: &mut BytesMut,
    option: u32,
    minimum: u32,
    preferred: u32,
    maximum: u32,
) {
    put_reply_header(buf, option, NBD_REP_INFO, 14);
    buf.put_u16(NBD_INFO_BLOCK_SIZE);
    buf.put_u32(minimum);
    buf.put_u32(preferred);
    buf.put_u32(maximum);
}

/// `NBD_REP_META_CONTEXT`: u32 context id, name (≤ 4096 bytes). Use id 0 for
/// `NBD_OPT_LIST_META_CONTEXT` replies.
pub fn encode_rep_meta_context(buf: &mut BytesMut, option: u32, context_id: u32, name: &str) {
    let name = truncate_str(name, MAX_STRING_LEN);
    put_reply_header(buf, option, NBD_REP_META_CONTEXT, 4 + name.len() as u32);
    buf.put_u32(context_id);
    buf.put_slice(name.as_bytes());
}

/// Error reply (`err_type` is one of `NBD_REP_ERR_*`) with a human-readable
/// message, truncated to 4096 bytes.
pub fn encode_rep_error(buf: &mut BytesMut, option: u32, err_type: u32, message: &str) {
    encode_option_reply(
        buf,
        option,
        err_type,
        truncate_str(message, MAX_STRING_LEN).as_bytes(),
    );
}

/// Reply to `NBD_OPT_EXPORT_NAME`: u64 size, u16 transmission flags, then 124
/// zero bytes unless the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(
    buf: &mut BytesMut,
    size: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) {
    buf.reserve(10 + EXPORT_NAME_ZEROES);
    buf.put_u64(size);
    buf.put_u16(transmission_flags);
    if !no_zeroes {
        buf.put_bytes(0, EXPORT_NAME_ZEROES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hdr(option: u32, data: &[u8]) -> OptionHeader {
        OptionHeader {
            option,
            length: data.len() as u32,
        }
    }

    #[test]
    fn greeting_layout() {
        let mut b = BytesMut::new();
        encode_greeting(&mut b);
        assert_eq!(&b[..], b"NBDMAGICIHAVEOPT\x00\x03");
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags([0, 0, 0, 1]),
            Ok(ClientFlags { no_zeroes: false })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 3]),
            Ok(ClientFlags { no_zeroes: true })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 2]),
            Err(ProtocolError::NotFixedNewstyle)
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 0]),
            Err(ProtocolError::NotFixedNewstyle)
        );
        assert_eq!(
            parse_client_flags([0x80, 0, 0, 1]),
            Err(ProtocolError::UnknownClientFlags(0x8000_0001))
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 5]),
            Err(ProtocolError::UnknownClientFlags(5))
        );
        assert_eq!(ClientFlags { no_zeroes: true }.bits(), 3);
        assert_eq!(ClientFlags { no_zeroes: false }.bits(), 1);
    }

    #[test]
    fn option_header() {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(b"IHAVEOPT");
        raw[8..12].copy_from_slice(&7u32.to_be_bytes());
        raw[12..].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&raw),
            Ok(OptionHeader {
                option: 7,
                length: 0x0102_0304
            })
        );
        assert!(parse_option_header(&raw).unwrap().is_oversized());
        raw[0] = b'X';
        assert!(matches!(
            parse_option_header(&raw),
            Err(ProtocolError::BadMagic { what: "option", .. })
        ));
    }

    #[test]
    fn simple_options() {
        assert_eq!(
            parse_option(hdr(NBD_OPT_EXPORT_NAME, b"disk0"), b"disk0"),
            Ok(ClientOption::ExportName("disk0".into()))
        );
        assert_eq!(
            parse_option(hdr(NBD_OPT_EXPORT_NAME, b""), b""),
            Ok(ClientOption::ExportName(String::new()))
        );
        assert_eq!(
            parse_option(hdr(NBD_OPT_ABORT, b"junk"), b"junk"),
            Ok(ClientOption::Abort)
        );
        assert_eq!(
            parse_option(hdr(NBD_OPT_LIST, b""), b""),
            Ok(ClientOption::List)
        );
        assert!(matches!(
            parse_option(hdr(NBD_OPT_LIST, b"x"), b"x"),
            Err(OptionError::UnexpectedData { option: 3, len: 1 })
        ));
        assert_eq!(
            parse_option(hdr(NBD_OPT_STRUCTURED_REPLY, b""), b""),
            Ok(ClientOption::StructuredReply)
        );
        assert!(parse_option(hdr(NBD_OPT_STRUCTURED_REPLY, b"x"), b"x").is_err());
        for opt in [
            NBD_OPT_STARTTLS,
            NBD_OPT_PEEK_EXPORT,
            NBD_OPT_EXTENDED_HEADERS,
            0,
            999,
        ] {
            assert_eq!(
                parse_option(hdr(opt, b"abc"), b"abc"),
                Ok(ClientOption::Unknown(opt))
            );
        }
        assert!(matches!(
            parse_option(
                OptionHeader {
                    option: 1,
                    length: 3
                },
                b"ab"
            ),
            Err(OptionError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn bad_strings() {
        assert_eq!(
            parse_option(hdr(1, b"a\0b"), b"a\0b"),
            Err(OptionError::ContainsNul("export name"))
        );
        assert_eq!(
            parse_option(hdr(1, b"\xff"), b"\xff"),
            Err(OptionError::InvalidUtf8("export name"))
        );
        let long = vec![b'a'; 4097];
        assert!(matches!(
            parse_option(hdr(1, &long), &long),
            Err(OptionError::StringTooLong { len: 4097, .. })
        ));
        let ok = vec![b'a'; 4096];
        assert!(parse_option(hdr(1, &ok), &ok).is_ok());
        assert_eq!(
            OptionError::Truncated("x").reply_type(),
            NBD_REP_ERR_INVALID
        );
    }

    #[test]
    fn info_and_go() {
        // name "ab", 2 requests: NAME, BLOCK_SIZE
        let data = [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 1, 0, 3];
        let want = InfoRequest {
            name: "ab".into(),
            info_types: vec![NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE],
        };
        assert_eq!(
            parse_option(hdr(NBD_OPT_INFO, &data), &data),
            Ok(ClientOption::Info(want.clone()))
        );
        assert_eq!(
            parse_option(hdr(NBD_OPT_GO, &data), &data),
            Ok(ClientOption::Go(want.clone()))
        );
        let mut enc = BytesMut::new();
        want.encode(&mut enc);
        assert_eq!(&enc[..], &data[..]);
        // empty name, no requests
        let data = [0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_option(hdr(NBD_OPT_GO, &data), &data),
            Ok(ClientOption::Go(InfoRequest {
                name: String::new(),
                info_types: vec![]
            }))
        );
        // name length beyond data
        let data = [0, 0, 0, 9, b'a', 0, 0];
        assert_eq!(
            parse_option(hdr(NBD_OPT_GO, &data), &data),
            Err(OptionError::Truncated("export name"))
        );
        // count says 2 but only 1 present
        let data = [0, 0, 0, 0, 0, 2, 0, 1];
        assert_eq!(
            parse_option(hdr(NBD_OPT_GO, &data), &data),
            Err(OptionError::Truncated("info requests"))
        );
        // trailing byte
        let data = [0, 0, 0, 0, 0, 0, 7];
        assert_eq!(
            parse_option(hdr(NBD_OPT_GO, &data), &data),
            Err(OptionError::TrailingData(1))
        );
        // missing count
        let data = [0, 0, 0, 0, 0];
        assert_eq!(
            parse_option(hdr(NBD_OPT_INFO, &data), &data),
            Err(OptionError::Truncated("info request count"))
        );
    }

    #[test]
    fn meta_context() {
        let req = MetaContextRequest {
            export: "d".into(),
            queries: vec!["base:allocation".into(), "x-a:".into()],
        };
        let mut data = BytesMut::new();
        req.encode(&mut data);
        assert_eq!(&data[..9], &[0, 0, 0, 1, b'd', 0, 0, 0, 2]);
        assert_eq!(&data[9..13], &[0, 0, 0, 15]);
        assert_eq!(
            parse_option(hdr(NBD_OPT_SET_META_CONTEXT, &data), &data),
            Ok(ClientOption::SetMetaContext(req.clone()))
        );
        assert_eq!(
            parse_option(hdr(NBD_OPT_LIST_META_CONTEXT, &data), &data),
            Ok(ClientOption::ListMetaContext(req))
        );
        // huge query count with no data must not allocate or panic
        let data = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            parse_option(hdr(NBD_OPT_SET_META_CONTEXT, &data), &data),
            Err(OptionError::Truncated("metadata context query"))
        );
        let data = [0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            parse_option(hdr(NBD_OPT_SET_META_CONTEXT, &data), &data),
            Err(OptionError::TrailingData(1))
        );
    }

    fn reply_header(b: &[u8], option: u32, ty: u32, len: u32) {
        assert_eq!(&b[0..8], &NBD_REP_MAGIC.to_be_bytes());
        assert_eq!(&b[0..8], &[0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(&b[8..12], &option.to_be_bytes());
        assert_eq!(&b[12..16], &ty.to_be_bytes());
        assert_eq!(&b[16..20], &len.to_be_bytes());
        assert_eq!(b.len(), 20 + len as usize);
    }

    #[test]
    fn option_reply_layouts() {
        let mut b = BytesMut::new();
        encode_rep_ack(&mut b, NBD_OPT_GO);
        reply_header(&b, 7, 1, 0);

        let mut b = BytesMut::new();
        encode_rep_server(&mut b, "disk");
        reply_header(&b, NBD_OPT_LIST, NBD_REP_SERVER, 8);
        assert_eq!(&b[20..], b"\0\0\0\x04disk");

        let mut b = BytesMut::new();
        encode_info_export(&mut b, NBD_OPT_INFO, 0x0102_0304_0506_0708, 0x0a0b);
        reply_header(&b, 6, 3, 12);
        assert_eq!(&b[20..], &[0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b]);

        let mut b = BytesMut::new();
        encode_info_name(&mut b, NBD_OPT_GO, "n");
        reply_header(&b, 7, 3, 3);
        assert_eq!(&b[20..], &[0, 1, b'n']);

        let mut b = BytesMut::new();
        encode_info_description(&mut b, NBD_OPT_GO, "hi");
        reply_header(&b, 7, 3, 4);
        assert_eq!(&b[20..], &[0, 2, b'h', b'i']);

        let mut b = BytesMut::new();
        encode_info_block_size(&mut b, NBD_OPT_GO, 1, 4096, 0x0200_0000);
        reply_header(&b, 7, 3, 14);
        assert_eq!(&b[20..], &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]);

        let mut b = BytesMut::new();
        encode_rep_meta_context(&mut b, NBD_OPT_SET_META_CONTEXT, 5, BASE_ALLOCATION);
        reply_header(&b, 10, 4, 4 + 15);
        assert_eq!(&b[20..24], &[0, 0, 0, 5]);
        assert_eq!(&b[24..], b"base:allocation");

        let mut b = BytesMut::new();
        encode_rep_error(&mut b, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, "no such export");
        reply_header(&b, 7, 0x8000_0006, 14);
        assert_eq!(&b[20..], b"no such export");

        let mut b = BytesMut::new();
        let long = "é".repeat(3000); // 6000 bytes
        encode_rep_error(&mut b, 1, NBD_REP_ERR_INVALID, &long);
        reply_header(&b, 1, NBD_REP_ERR_INVALID, 4096);
        assert!(std::str::from_utf8(&b[20..]).is_ok());
    }

    #[test]
    fn export_name_reply() {
        let mut b = BytesMut::new();
        encode_export_name_reply(&mut b, 1 << 30, 0x0003, false);
        assert_eq!(b.len(), 8 + 2 + 124);
        assert_eq!(&b[..10], &[0, 0, 0, 0, 0x40, 0, 0, 0, 0, 3]);
        assert!(b[10..].iter().all(|&x| x == 0));
        let mut b = BytesMut::new();
        encode_export_name_reply(&mut b, 1 << 30, 0x0003, true);
        assert_eq!(b.len(), 10);
    }

    proptest! {
        #[test]
        fn parse_option_never_panics(option in prop_oneof![0u32..16, any::<u32>()],
                                     data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let h = OptionHeader { option, length: data.len() as u32 };
            let _ = parse_option(h, &data);
        }

        #[test]
        fn parse_option_structured_noise(option in 6u32..=10,
                                         head in proptest::collection::vec(0u8..4, 0..12),
                                         tail in proptest::collection::vec(any::<u8>(), 0..40)) {
            // small length prefixes make the parser go deep instead of failing early
            let mut data = head;
            data.extend(tail);
            let h = OptionHeader { option, length: data.len() as u32 };
            let _ = parse_option(h, &data);
        }

        #[test]
        fn info_request_round_trip(name in "[^\0]{0,40}", types in proptest::collection::vec(any::<u16>(), 0..20), go in any::<bool>()) {
            let req = InfoRequest { name, info_types: types };
            let mut b = BytesMut::new();
            req.encode(&mut b);
            let opt = if go { NBD_OPT_GO } else { NBD_OPT_INFO };
            let parsed = parse_option(OptionHeader { option: opt, length: b.len() as u32 }, &b);
            prop_assert_eq!(parsed, Ok(if go { ClientOption::Go(req) } else { ClientOption::Info(req) }));
        }

        #[test]
        fn meta_request_round_trip(export in "[^\0]{0,20}", queries in proptest::collection::vec("[^\0]{0,20}", 0..8)) {
            let req = MetaContextRequest { export, queries };
            let mut b = BytesMut::new();
            req.encode(&mut b);
            let parsed = parse_option(OptionHeader { option: NBD_OPT_SET_META_CONTEXT, length: b.len() as u32 }, &b);
            prop_assert_eq!(parsed, Ok(ClientOption::SetMetaContext(req)));
        }
    }
}
