//! Every numeric constant of the NBD protocol (`doc/proto.md` of the
//! NetworkBlockDevice/nbd project), named as in the spec. All values travel
//! big-endian on the wire. Widths follow the field they go into: handshake
//! and transmission flags, command types/flags, info types and structured
//! reply types/flags are `u16`; client flags, options, option reply types and
//! errno values are `u32`; magics are `u64` (handshake) or `u32` (transmission).

// ---------------------------------------------------------------- magics

/// `NBDMAGIC` (`INIT_PASSWD`), first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also prefixes every client option.
pub const NBD_IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// `cliserv_magic` of the (unsupported) oldstyle negotiation.
pub const NBD_CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every fixed-newstyle option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (`NBD_REQUEST_MAGIC`).
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended-header request (not negotiated by this server).
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`, formerly `NBD_REPLY_MAGIC`).
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk (not negotiated by this server).
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------- handshake flags (u16, server)

/// Handshake flag bit 0: server supports fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag bit 1: server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// ---------------------------------------------------------------- client flags (u32)

/// Client flag bit 0: client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag bit 1: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------- transmission flags (u16)

/// Bit 0: MUST always be set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Bit 1: export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Bit 2: `NBD_CMD_FLUSH` supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Bit 3: `NBD_CMD_FLAG_FUA` supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Bit 4: export behaves like rotational media.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Bit 5: `NBD_CMD_TRIM` supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Bit 6: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Bit 7: `NBD_CMD_FLAG_DF` supported (only with structured replies).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Bit 8: flush/FUA are visible across all connections.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Bit 9: experimental `RESIZE` extension.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Bit 10: `NBD_CMD_CACHE` understood.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Bit 11: `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Bit 12: block status payload (extended headers only; not used here).
pub const NBD_FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------- options (u32)

/// Choose an export and enter transmission (cannot report errors).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Query an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Query an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Negotiate extended headers (not supported here).
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------- option reply types (u32)

/// Option accepted / list finished. No data.
pub const NBD_REP_ACK: u32 = 1;
/// Export description (reply to `NBD_OPT_LIST`).
pub const NBD_REP_SERVER: u32 = 2;
/// Information item (reply to `NBD_OPT_INFO` / `NBD_OPT_GO`).
pub const NBD_REP_INFO: u32 = 3;
/// Metadata context (reply to `NBD_OPT_{LIST,SET}_META_CONTEXT`).
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks error replies.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Option unknown to this server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Forbidden by server policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Syntactically or semantically invalid option.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS required first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// Export not available.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// Server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// Client must request `NBD_INFO_BLOCK_SIZE`.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// Request or reply too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Extended headers required (not used here).
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------- info types (u16)

/// Export size and transmission flags (mandatory before a successful `NBD_REP_ACK`).
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------- command types (u16)

/// Read.
pub const NBD_CMD_READ: u16 = 0;
/// Write (header is followed by *length* bytes of payload).
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Trim / discard hint.
pub const NBD_CMD_TRIM: u16 = 4;
/// Cache / prefetch hint.
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes (no payload).
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Block status query.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Experimental resize.
pub const NBD_CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------- command flags (u16)

/// Force unit access (valid on every command when `NBD_FLAG_SEND_FUA` is set).
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Do not punch a hole (`NBD_CMD_WRITE_ZEROES` only).
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Do not fragment the reply (`NBD_CMD_READ` only, structured replies only).
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// One extent per context (`NBD_CMD_BLOCK_STATUS` only).
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Fail fast with `NBD_ENOTSUP` if zeroing is not fast (`NBD_CMD_WRITE_ZEROES` only).
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Payload length flag (extended headers only; never valid here).
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------- structured replies (u16)

/// Structured reply flag bit 0: final chunk of this reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Bit 15 of a structured reply type marks an error chunk.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// No payload; always with `NBD_REPLY_FLAG_DONE`.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// 64-bit offset followed by data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// 64-bit offset and 32-bit hole size.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Context id followed by (length, flags) descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Extended block status (extended headers only; not used here).
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Error: errno, message length, message.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
/// Error at an offset: errno, message length, message, offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

// ---------------------------------------------------------------- base:allocation

/// Name of the only metadata context the spec defines.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag bit 0: extent is a hole.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag bit 1: extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------- errno values (u32)

/// Operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Input/output error.
pub const NBD_EIO: u32 = 5;
/// Cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------- sizes and limits

/// Maximum length of any protocol string (export names, messages, queries).
pub const MAX_STRING_LEN: usize = 4096;
/// Length of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of a client option header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Number of reserved zero bytes after the `NBD_OPT_EXPORT_NAME` reply.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Largest data payload of one `NBD_REPLY_TYPE_OFFSET_DATA` chunk
/// (its length field also counts the 8-byte offset).
pub const MAX_OFFSET_DATA_LEN: u32 = u32::MAX - 8;
