//! Client half of the codec, used by our integration tests and the bench
//! harness to talk to the server: client flags, options, requests, and parsers
//! for what the server sends back. Same rules as the server half: pure byte
//! functions, fatal framing problems are [`ProtocolError`].

use bytes::{BufMut, BytesMut};

use super::consts::*;
use super::transmission::RawRequest;
use super::{clamp_u32, Cursor, ProtocolError};

fn bad_magic(what: &'static str, expected: u64, got: u64) -> ProtocolError {
    ProtocolError::BadMagic {
        what,
        expected,
        got,
    }
}

/// Parses the 18-byte server greeting; returns the handshake flags.
pub fn parse_greeting(raw: &[u8; GREETING_LEN]) -> Result<u16, ProtocolError> {
    let mut c = Cursor::new(raw);
    let magic = c.u64().unwrap_or_default();
    if magic != NBD_MAGIC {
        return Err(bad_magic("NBDMAGIC", NBD_MAGIC, magic));
    }
    let opt = c.u64().unwrap_or_default();
    if opt != NBD_IHAVEOPT {
        return Err(bad_magic("IHAVEOPT", NBD_IHAVEOPT, opt));
    }
    Ok(c.u16().unwrap_or_default())
}

/// Writes the client's 32-bit flags (raw, so tests can send invalid ones).
pub fn encode_client_flags(buf: &mut BytesMut, flags: u32) {
    buf.put_u32(flags);
}

/// Writes an option: `IHAVEOPT`, option code, data length, data.
pub fn encode_option(buf: &mut BytesMut, option: u32, data: &[u8]) {
    let (data, len) = clamp_u32(data);
    buf.reserve(OPTION_HEADER_LEN.saturating_add(data.len()));
    buf.put_u64(NBD_IHAVEOPT);
    buf.put_u32(option);
    buf.put_u32(len);
    buf.put_slice(data);
}

/// Writes what a client sends right after the greeting to enter
/// transmission on `export` with `NBD_OPT_GO`: its flags (fixed newstyle,
/// and no zeroes when `no_zeroes`, which a client only sets if the server
/// offered it) and the option, asking for no extra information.
pub fn encode_go_opening(buf: &mut BytesMut, export: &str, no_zeroes: bool) {
    let mut flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        flags |= NBD_FLAG_C_NO_ZEROES;
    }
    encode_client_flags(buf, flags);
    let mut data = BytesMut::new();
    super::InfoRequest {
        name: export.to_owned(),
        info_types: Vec::new(),
    }
    .encode(&mut data);
    encode_option(buf, NBD_OPT_GO, &data);
}

/// Header of a server option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Option this replies to.
    pub option: u32,
    /// `NBD_REP_*` type.
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// True for error replies (bit 31).
    pub fn is_error(&self) -> bool {
        self.reply_type & NBD_REP_FLAG_ERROR != 0
    }
}

/// Parses a 20-byte option reply header.
pub fn parse_option_reply_header(
    raw: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ProtocolError> {
    let mut c = Cursor::new(raw);
    let magic = c.u64().unwrap_or_default();
    if magic != NBD_REP_MAGIC {
        return Err(bad_magic("option reply", NBD_REP_MAGIC, magic));
    }
    Ok(OptionReplyHeader {
        option: c.u32().unwrap_or_default(),
        reply_type: c.u32().unwrap_or_default(),
        length: c.u32().unwrap_or_default(),
    })
}

/// Parses the first 10 bytes of the `NBD_OPT_EXPORT_NAME` reply: (size,
/// transmission flags). The 124 zero bytes, if any, are the caller's to skip.
pub fn parse_export_name_reply(raw: &[u8; 10]) -> (u64, u16) {
    let mut c = Cursor::new(raw);
    (c.u64().unwrap_or_default(), c.u16().unwrap_or_default())
}

/// Payload of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        maximum: u32,
    },
    /// An info type we do not know (to be ignored).
    Unknown(u16),
}

/// Parses the data of an `NBD_REP_INFO` reply.
pub fn parse_rep_info(data: &[u8]) -> Result<InfoReply, ProtocolError> {
    let malformed = ProtocolError::Malformed("NBD_REP_INFO");
    let mut c = Cursor::new(data);
    let info = c.u16().ok_or(malformed.clone())?;
    let rest = data.get(2..).unwrap_or_default();
    let text = |s: &[u8]| {
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| malformed.clone())
    };
    let reply = match info {
        NBD_INFO_EXPORT if rest.len() == 10 => InfoReply::Export {
            size: c.u64().unwrap_or_default(),
            flags: c.u16().unwrap_or_default(),
        },
        NBD_INFO_NAME => InfoReply::Name(text(rest)?),
        NBD_INFO_DESCRIPTION => InfoReply::Description(text(rest)?),
        NBD_INFO_BLOCK_SIZE if rest.len() == 12 => InfoReply::BlockSize {
            minimum: c.u32().unwrap_or_default(),
            preferred: c.u32().unwrap_or_default(),
            maximum: c.u32().unwrap_or_default(),
        },
        NBD_INFO_EXPORT | NBD_INFO_BLOCK_SIZE => return Err(malformed),
        other => InfoReply::Unknown(other),
    };
    Ok(reply)
}

/// Writes a 28-byte request header (the caller appends WRITE payload).
pub fn encode_request(buf: &mut BytesMut, req: &RawRequest) {
    buf.reserve(REQUEST_HEADER_LEN);
    buf.put_u32(NBD_REQUEST_MAGIC);
    buf.put_u16(req.flags);
    buf.put_u16(req.command);
    buf.put_u64(req.cookie);
    buf.put_u64(req.offset);
    buf.put_u32(req.length);
}

/// Which kind of reply a 4-byte magic announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMagic {
    /// A simple reply (12 more header bytes).
    Simple,
    /// A structured reply chunk (16 more header bytes).
    Structured,
}

/// Classifies the first 4 bytes of a transmission reply.
pub fn parse_reply_magic(raw: [u8; 4]) -> Result<ReplyMagic, ProtocolError> {
    match u32::from_be_bytes(raw) {
        NBD_SIMPLE_REPLY_MAGIC => Ok(ReplyMagic::Simple),
        NBD_STRUCTURED_REPLY_MAGIC => Ok(ReplyMagic::Structured),
        other => Err(bad_magic(
            "reply",
            u64::from(NBD_SIMPLE_REPLY_MAGIC),
            u64::from(other),
        )),
    }
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    /// `NBD_E*` value, 0 on success.
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

/// Parses a 16-byte simple reply header.
pub fn parse_simple_reply_header(
    raw: &[u8; SIMPLE_REPLY_HEADER_LEN],
) -> Result<SimpleReplyHeader, ProtocolError> {
    let mut c = Cursor::new(raw);
    let magic = c.u32().unwrap_or_default();
    if magic != NBD_SIMPLE_REPLY_MAGIC {
        return Err(bad_magic(
            "simple reply",
            u64::from(NBD_SIMPLE_REPLY_MAGIC),
            u64::from(magic),
        ));
    }
    Ok(SimpleReplyHeader {
        error: c.u32().unwrap_or_default(),
        cookie: c.u64().unwrap_or_default(),
    })
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub chunk_type: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl StructuredChunkHeader {
    /// `NBD_REPLY_FLAG_DONE` is set.
    pub fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }

    /// The type is an error chunk (bit 15).
    pub fn is_error(&self) -> bool {
        self.chunk_type & NBD_REPLY_TYPE_ERROR_BIT != 0
    }
}

/// Parses a 20-byte structured reply chunk header.
pub fn parse_structured_chunk_header(
    raw: &[u8; STRUCTURED_REPLY_HEADER_LEN],
) -> Result<StructuredChunkHeader, ProtocolError> {
    let mut c = Cursor::new(raw);
    let magic = c.u32().unwrap_or_default();
    if magic != NBD_STRUCTURED_REPLY_MAGIC {
        return Err(bad_magic(
            "structured reply",
            u64::from(NBD_STRUCTURED_REPLY_MAGIC),
            u64::from(magic),
        ));
    }
    Ok(StructuredChunkHeader {
        flags: c.u16().unwrap_or_default(),
        chunk_type: c.u16().unwrap_or_default(),
        cookie: c.u64().unwrap_or_default(),
        length: c.u32().unwrap_or_default(),
    })
}

/// Parses the payload of an error chunk (`NBD_REPLY_TYPE_ERROR` or
/// `_ERROR_OFFSET`): (errno, message). Trailing fields (the offset) are ignored.
pub fn parse_structured_error_payload(data: &[u8]) -> Result<(u32, String), ProtocolError> {
    let malformed = ProtocolError::Malformed("structured error chunk");
    let mut c = Cursor::new(data);
    let errno = c.u32().ok_or(malformed.clone())?;
    let len = c.u16().ok_or(malformed.clone())?;
    let msg = c.take(usize::from(len)).ok_or(malformed.clone())?;
    let msg = std::str::from_utf8(msg).map_err(|_| malformed)?;
    Ok((errno, msg.to_owned()))
}

/// Parses the payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: (context id,
/// extents as (length, flags)). Needs 4 + a positive multiple of 8 bytes.
pub fn parse_block_status_payload(data: &[u8]) -> Result<(u32, Vec<(u32, u32)>), ProtocolError> {
    let malformed = ProtocolError::Malformed("block status chunk");
    let mut c = Cursor::new(data);
    let id = c.u32().ok_or(malformed.clone())?;
    if c.remaining() == 0 || !c.remaining().is_multiple_of(8) {
        return Err(malformed);
    }
    let mut extents = Vec::with_capacity(c.remaining() / 8);
    while let (Some(len), Some(flags)) = (c.u32(), c.u32()) {
        extents.push((len, flags));
    }
    Ok((id, extents))
}

#[cfg(test)]
mod tests {
    use super::super::handshake::{
        encode_greeting, encode_info_block_size, encode_info_export, encode_info_name,
        encode_rep_error, parse_client_flags, parse_option_header,
    };
    use super::super::transmission::{
        encode_block_status, encode_simple_reply, encode_structured_error_offset,
        encode_structured_none_done,
    };
    use super::*;

    fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
        b[..N].try_into().unwrap()
    }

    #[test]
    fn go_opening_is_what_the_server_parses() {
        for no_zeroes in [false, true] {
            let mut b = BytesMut::new();
            encode_go_opening(&mut b, "disk-1", no_zeroes);
            let flags = parse_client_flags(arr(&b[..4])).unwrap();
            assert_eq!(flags.no_zeroes, no_zeroes);
            let h = parse_option_header(&arr(&b[4..4 + OPTION_HEADER_LEN])).unwrap();
            let opt = super::super::parse_option(h, &b[4 + OPTION_HEADER_LEN..]).unwrap();
            match opt {
                super::super::ClientOption::Go(req) => {
                    assert_eq!(req.name, "disk-1");
                    assert!(req.info_types.is_empty());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn greeting_and_flags() {
        let mut b = BytesMut::new();
        encode_greeting(&mut b);
        assert_eq!(
            parse_greeting(&arr(&b)),
            Ok(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
        );
        let mut bad = arr::<18>(&b);
        bad[9] ^= 1;
        assert!(matches!(
            parse_greeting(&bad),
            Err(ProtocolError::BadMagic {
                what: "IHAVEOPT",
                ..
            })
        ));
        let mut b = BytesMut::new();
        encode_client_flags(&mut b, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        assert_eq!(&b[..], &[0, 0, 0, 3]);
        assert!(parse_client_flags(arr(&b)).unwrap().no_zeroes);
    }

    #[test]
    fn option_round_trip() {
        let mut b = BytesMut::new();
        encode_option(&mut b, NBD_OPT_GO, b"xyz");
        assert_eq!(b.len(), 19);
        let h = parse_option_header(&arr(&b)).unwrap();
        assert_eq!((h.option, h.length), (NBD_OPT_GO, 3));
        assert_eq!(&b[16..], b"xyz");
    }

    #[test]
    fn option_replies() {
        let mut b = BytesMut::new();
        encode_rep_error(&mut b, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, "nope");
        let h = parse_option_reply_header(&arr(&b)).unwrap();
        assert_eq!(
            h,
            OptionReplyHeader {
                option: NBD_OPT_GO,
                reply_type: NBD_REP_ERR_UNKNOWN,
                length: 4
            }
        );
        assert!(h.is_error());
        let mut bad = arr::<20>(&b);
        bad[0] = 1;
        assert!(parse_option_reply_header(&bad).is_err());

        let mut b = BytesMut::new();
        encode_info_export(&mut b, NBD_OPT_GO, 1 << 40, 0x1ff);
        assert_eq!(
            parse_rep_info(&b[20..]),
            Ok(InfoReply::Export {
                size: 1 << 40,
                flags: 0x1ff
            })
        );
        let mut b = BytesMut::new();
        encode_info_name(&mut b, NBD_OPT_GO, "vol");
        assert_eq!(parse_rep_info(&b[20..]), Ok(InfoReply::Name("vol".into())));
        let mut b = BytesMut::new();
        encode_info_block_size(&mut b, NBD_OPT_GO, 1, 4096, 1 << 25);
        assert_eq!(
            parse_rep_info(&b[20..]),
            Ok(InfoReply::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 1 << 25
            })
        );
        assert_eq!(parse_rep_info(&[0, 9]), Ok(InfoReply::Unknown(9)));
        assert!(parse_rep_info(&[0, 0, 1]).is_err());
        assert!(parse_rep_info(&[0]).is_err());
        assert_eq!(
            parse_export_name_reply(&[0, 0, 0, 0, 0, 0, 2, 0, 0, 1]),
            (512, 1)
        );
    }

    #[test]
    fn replies() {
        let mut b = BytesMut::new();
        encode_simple_reply(&mut b, 42, 0);
        assert_eq!(parse_reply_magic(arr(&b)), Ok(ReplyMagic::Simple));
        assert_eq!(
            parse_simple_reply_header(&arr(&b)),
            Ok(SimpleReplyHeader {
                error: 0,
                cookie: 42
            })
        );
        assert!(parse_structured_chunk_header(&arr(&[b.as_ref(), &[0; 4]].concat())).is_err());

        let mut b = BytesMut::new();
        encode_structured_none_done(&mut b, 42);
        assert_eq!(parse_reply_magic(arr(&b)), Ok(ReplyMagic::Structured));
        let h = parse_structured_chunk_header(&arr(&b)).unwrap();
        assert!(h.is_done() && !h.is_error());
        assert!(parse_simple_reply_header(&arr(&b)).is_err());
        assert!(parse_reply_magic([0; 4]).is_err());

        let mut b = BytesMut::new();
        encode_structured_error_offset(&mut b, 1, NBD_EIO, "oops", 9, true);
        let h = parse_structured_chunk_header(&arr(&b)).unwrap();
        assert!(h.is_error());
        assert_eq!(
            parse_structured_error_payload(&b[20..]),
            Ok((NBD_EIO, "oops".into()))
        );
        assert!(parse_structured_error_payload(&[0, 0, 0, 5, 0, 9, b'x']).is_err());

        let mut b = BytesMut::new();
        encode_block_status(&mut b, 1, 3, &[(512, 1), (1024, 2)], true).unwrap();
        assert_eq!(
            parse_block_status_payload(&b[20..]),
            Ok((3, vec![(512, 1), (1024, 2)]))
        );
        assert!(parse_block_status_payload(&[0, 0, 0, 1]).is_err());
        assert!(parse_block_status_payload(&[0, 0, 0, 1, 0]).is_err());
    }
}
