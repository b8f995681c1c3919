//! The on-disk format of a backing file, version 1 (normative text:
//! `doc/FORMAT.md`). Pure encoding/decoding and geometry; no I/O.
//!
//! ```text
//! offset 0      header slot A (4096 bytes)
//! offset 4096   header slot B (4096 bytes)
//! offset 8192   group 0: 256 entries x 64 bytes (16 KiB), then 256 data blocks x 4096 bytes
//!               group 1: ...
//! ```
//! Each data block has one 64-byte entry in its group's entry table:
//! `nonce[12] | key_version u32 | flags u32 | crc32c u32 | reserved[8] | tag[32]`.
//! An all-zero entry means "never written" and the block reads as zeros.

use crate::crypto::{FileId, NONCE_LEN};

/// Bytes per data block.
pub const BLOCK_SIZE: usize = 4096;
/// `BLOCK_SIZE` as u64.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// Bytes per header slot.
pub const HEADER_SLOT: u64 = 4096;
/// Offset of the first group.
pub const DATA_START: u64 = 2 * HEADER_SLOT;
/// Data blocks per group.
pub const GROUP_BLOCKS: u64 = 256;
/// Bytes per block entry.
pub const ENTRY_SIZE: usize = 64;
/// Bytes of the entry table at the head of a group.
pub const GROUP_META: u64 = GROUP_BLOCKS * ENTRY_SIZE as u64;
/// Bytes per group (entry table + data blocks).
pub const GROUP_BYTES: u64 = GROUP_META + GROUP_BLOCKS * BLOCK_SIZE_U64;
/// Largest export size this format accepts (1 PiB).
pub const MAX_EXPORT_SIZE: u64 = 1 << 50;
/// Magic at the start of each header slot.
pub const MAGIC: [u8; 8] = *b"EARSCAR\x01";
/// Format version written by this build.
pub const FORMAT_VERSION: u16 = 1;
/// Header bytes covered by the MAC.
pub const HEADER_BODY: usize = 160;
/// Offset of the 32-byte MAC (HMAC-SHA256, or SHA-256 when unencrypted).
pub const HEADER_MAC_AT: usize = HEADER_BODY;
/// Bytes reserved for the export name in the header.
pub const NAME_MAX: usize = 64;

/// Data cipher recorded in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Plaintext passthrough (`--encryption off`).
    None,
    /// AES-256-CTR, random 96-bit nonce per block write, 32-bit BE counter.
    Aes256CtrR96,
}

impl Algorithm {
    fn code(self) -> u16 {
        match self {
            Algorithm::None => 0,
            Algorithm::Aes256CtrR96 => 1,
        }
    }
    fn from_code(c: u16) -> Option<Self> {
        match c {
            0 => Some(Algorithm::None),
            1 => Some(Algorithm::Aes256CtrR96),
            _ => None,
        }
    }
}

/// Per-block check recorded in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// CRC32C over entry and stored block: detects torn writes and media
    /// errors, not tampering.
    Crc32c,
    /// CRC32C plus a 128-bit AES-256-GMAC tag per block under the per-file
    /// block-MAC key, bound to file id, block index, key version and nonce:
    /// detects tampering, blocks moved between offsets or files, and torn
    /// writes. Requires encryption.
    Gmac,
}

impl Integrity {
    fn code(self) -> u16 {
        match self {
            Integrity::Crc32c => 0,
            Integrity::Gmac => 1,
        }
    }
    fn from_code(c: u16) -> Option<Self> {
        match c {
            0 => Some(Integrity::Crc32c),
            1 => Some(Integrity::Gmac),
            _ => None,
        }
    }
}

/// A decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Cipher of the data blocks.
    pub algorithm: Algorithm,
    /// Block check.
    pub integrity: Integrity,
    /// Key version whose derived header-MAC key signs this header (0 if unencrypted).
    pub header_key_version: u32,
    /// Random id of this file (HKDF salt).
    pub file_id: FileId,
    /// Export size in bytes.
    pub size: u64,
    /// Incremented on every header rewrite; the valid slot with the highest wins.
    pub sequence: u64,
    /// Id of the data directory this file belongs to.
    pub dir_id: [u8; 16],
    /// Export name.
    pub name: String,
}

/// Why a header slot did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not an ear-sidecar file (or a zeroed slot).
    #[error("bad magic: not an ear-sidecar backing file")]
    Magic,
    /// Written by a newer or unknown format.
    #[error("unsupported format version {0}")]
    Version(u16),
    /// A field has a value this build does not know.
    #[error("invalid header field {0}")]
    Field(&'static str),
}

impl Header {
    /// Encodes the MAC-covered body (`HEADER_BODY` bytes).
    pub fn encode_body(&self) -> [u8; HEADER_BODY] {
        let mut b = [0u8; HEADER_BODY];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(HEADER_BODY as u16).to_le_bytes());
        b[12..14].copy_from_slice(&self.algorithm.code().to_le_bytes());
        b[14..16].copy_from_slice(&self.integrity.code().to_le_bytes());
        b[16..20].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(GROUP_BLOCKS as u32).to_le_bytes());
        b[24..26].copy_from_slice(&(ENTRY_SIZE as u16).to_le_bytes());
        // 26..28 flags: 0
        b[28..32].copy_from_slice(&self.header_key_version.to_le_bytes());
        b[32..48].copy_from_slice(&self.file_id);
        b[48..56].copy_from_slice(&self.size.to_le_bytes());
        b[56..64].copy_from_slice(&self.sequence.to_le_bytes());
        b[64..80].copy_from_slice(&self.dir_id);
        let name = self.name.as_bytes();
        let n = name.len().min(NAME_MAX);
        b[80..82].copy_from_slice(&(n as u16).to_le_bytes());
        b[82..82 + n].copy_from_slice(&name[..n]);
        b
    }

    /// Decodes a slot's body (the MAC is checked by the caller, who has the key).
    pub fn decode_body(b: &[u8; HEADER_BODY]) -> Result<Header, HeaderError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        if b[0..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let version = u16_at(8);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        if usize::from(u16_at(10)) != HEADER_BODY {
            return Err(HeaderError::Field("header length"));
        }
        let algorithm = Algorithm::from_code(u16_at(12)).ok_or(HeaderError::Field("algorithm"))?;
        let integrity = Integrity::from_code(u16_at(14)).ok_or(HeaderError::Field("integrity"))?;
        if u32_at(16) as usize != BLOCK_SIZE {
            return Err(HeaderError::Field("block size"));
        }
        if u64::from(u32_at(20)) != GROUP_BLOCKS {
            return Err(HeaderError::Field("group blocks"));
        }
        if usize::from(u16_at(24)) != ENTRY_SIZE {
            return Err(HeaderError::Field("entry size"));
        }
        if u16_at(26) != 0 {
            return Err(HeaderError::Field("flags"));
        }
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(&b[32..48]);
        let size = u64_at(48);
        if size == 0 || size > MAX_EXPORT_SIZE {
            return Err(HeaderError::Field("size"));
        }
        let mut dir_id = [0u8; 16];
        dir_id.copy_from_slice(&b[64..80]);
        let n = usize::from(u16_at(80));
        if n == 0 || n > NAME_MAX {
            return Err(HeaderError::Field("name length"));
        }
        let name = std::str::from_utf8(&b[82..82 + n])
            .map_err(|_| HeaderError::Field("name"))?
            .to_string();
        if b[82 + n..].iter().any(|&x| x != 0) {
            return Err(HeaderError::Field("reserved bytes"));
        }
        let header_key_version = u32_at(28);
        if integrity == Integrity::Gmac && algorithm == Algorithm::None {
            return Err(HeaderError::Field("integrity without encryption"));
        }
        if (algorithm == Algorithm::None) != (header_key_version == 0) {
            return Err(HeaderError::Field("header key version"));
        }
        Ok(Header {
            algorithm,
            integrity,
            header_key_version,
            file_id,
            size,
            sequence: u64_at(56),
            dir_id,
            name,
        })
    }
}

/// Number of data blocks an export of `size` bytes needs.
pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE_U64)
}

/// Backing-file length for an export of `size` bytes (whole groups, sparse).
pub fn file_len_for(size: u64) -> u64 {
    DATA_START + blocks_for(size).div_ceil(GROUP_BLOCKS) * GROUP_BYTES
}

/// File offset of block `b`'s entry. `b` is bounded by `MAX_EXPORT_SIZE`, so
/// nothing here overflows.
pub fn entry_offset(b: u64) -> u64 {
    DATA_START + (b / GROUP_BLOCKS) * GROUP_BYTES + (b % GROUP_BLOCKS) * ENTRY_SIZE as u64
}

/// File offset of block `b`'s data.
pub fn data_offset(b: u64) -> u64 {
    DATA_START + (b / GROUP_BLOCKS) * GROUP_BYTES + GROUP_META + (b % GROUP_BLOCKS) * BLOCK_SIZE_U64
}

/// Flag bit: the block has been written.
pub const FLAG_WRITTEN: u32 = 1;
/// Bytes of the per-block tag (integrity mode).
pub const TAG_LEN: usize = 16;
/// Offset of the tag inside an entry.
const TAG_AT: usize = 32;

/// A decoded block entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Random CTR nonce of the current block contents.
    pub nonce: [u8; NONCE_LEN],
    /// Universe-key version the block was written under (0 if unencrypted).
    pub key_version: u32,
    /// Flag bits.
    pub flags: u32,
    /// CRC32C over entry bytes 0..20 and the stored block.
    pub crc: u32,
    /// Authentication tag (all zero unless the file uses [`Integrity::Gmac`]).
    pub tag: [u8; TAG_LEN],
}

/// What an entry slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Never written (all zero): the block reads as zeros.
    Unwritten,
    /// A written block.
    Written(Entry),
}

/// Why an entry did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt block entry: {0}")]
pub struct EntryError(pub &'static str);

impl Entry {
    /// The 20 entry bytes covered by the CRC.
    fn prefix(&self) -> [u8; 20] {
        let mut p = [0u8; 20];
        p[0..12].copy_from_slice(&self.nonce);
        p[12..16].copy_from_slice(&self.key_version.to_le_bytes());
        p[16..20].copy_from_slice(&self.flags.to_le_bytes());
        p
    }

    /// A written entry for `stored` (the bytes as they go to disk), computing its CRC.
    pub fn for_block(nonce: [u8; NONCE_LEN], key_version: u32, stored: &[u8]) -> Entry {
        let mut e = Entry {
            nonce,
            key_version,
            flags: FLAG_WRITTEN,
            crc: 0,
            tag: [0; TAG_LEN],
        };
        e.crc = crc32c::crc32c_append(crc32c::crc32c(&e.prefix()), stored);
        e
    }

    /// True when `stored` is the block this entry was written with.
    pub fn matches(&self, stored: &[u8]) -> bool {
        crc32c::crc32c_append(crc32c::crc32c(&self.prefix()), stored) == self.crc
    }

    /// Encodes into a 64-byte slot.
    pub fn encode(&self, out: &mut [u8]) {
        out[..ENTRY_SIZE].fill(0);
        out[0..20].copy_from_slice(&self.prefix());
        out[20..24].copy_from_slice(&self.crc.to_le_bytes());
        out[TAG_AT..TAG_AT + TAG_LEN].copy_from_slice(&self.tag);
    }

    /// Decodes a 64-byte slot.
    pub fn decode(s: &[u8]) -> Result<EntryState, EntryError> {
        let s = s.get(..ENTRY_SIZE).ok_or(EntryError("short entry"))?;
        if s.iter().all(|&x| x == 0) {
            return Ok(EntryState::Unwritten);
        }
        let u32_at = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        let flags = u32_at(16);
        if flags != FLAG_WRITTEN {
            return Err(EntryError("unknown flags"));
        }
        if s[24..TAG_AT].iter().any(|&x| x != 0) || s[TAG_AT + TAG_LEN..].iter().any(|&x| x != 0) {
            return Err(EntryError("reserved bytes set"));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&s[0..12]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&s[TAG_AT..TAG_AT + TAG_LEN]);
        Ok(EntryState::Written(Entry {
            nonce,
            key_version: u32_at(12),
            flags,
            crc: u32_at(20),
            tag,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            algorithm: Algorithm::Aes256CtrR96,
            integrity: Integrity::Crc32c,
            header_key_version: 1,
            file_id: [7; 16],
            size: 1 << 30,
            sequence: 3,
            dir_id: [9; 16],
            name: "default".into(),
        }
    }

    #[test]
    fn header_round_trip() {
        let h = header();
        assert_eq!(Header::decode_body(&h.encode_body()).unwrap(), h);
    }

    #[test]
    fn header_rejects_bad_fields() {
        let good = header().encode_body();
        let mut b = good;
        b[0] ^= 1;
        assert_eq!(Header::decode_body(&b), Err(HeaderError::Magic));
        let mut b = good;
        b[8] = 2;
        assert_eq!(Header::decode_body(&b), Err(HeaderError::Version(2)));
        let mut b = good;
        b[12] = 9;
        assert!(Header::decode_body(&b).is_err());
        let mut b = good;
        b[150] = 1;
        assert!(Header::decode_body(&b).is_err());
    }

    #[test]
    fn geometry() {
        assert_eq!(entry_offset(0), 8192);
        assert_eq!(data_offset(0), 8192 + 16384);
        assert_eq!(data_offset(255) + 4096, DATA_START + GROUP_BYTES);
        assert_eq!(entry_offset(256), DATA_START + GROUP_BYTES);
        assert_eq!(file_len_for(4096), DATA_START + GROUP_BYTES);
        assert_eq!(file_len_for(1 << 20), DATA_START + GROUP_BYTES);
        assert_eq!(file_len_for((1 << 20) + 1), DATA_START + 2 * GROUP_BYTES);
        // The largest export's offsets fit comfortably in an i64 (off_t).
        assert!(file_len_for(MAX_EXPORT_SIZE) < i64::MAX as u64);
    }

    #[test]
    fn entry_round_trip_and_crc() {
        let data = vec![0x5au8; BLOCK_SIZE];
        let mut e = Entry::for_block([3; 12], 2, &data);
        e.tag = [0xee; TAG_LEN];
        let mut slot = [0u8; ENTRY_SIZE];
        e.encode(&mut slot);
        assert_eq!(Entry::decode(&slot).unwrap(), EntryState::Written(e));
        assert!(e.matches(&data));
        let mut torn = data.clone();
        torn[4095] ^= 1;
        assert!(!e.matches(&torn));
        assert_eq!(Entry::decode(&[0u8; 64]).unwrap(), EntryState::Unwritten);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), HEADER_BODY..=HEADER_BODY),
                                e in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut body = [0u8; HEADER_BODY];
            body.copy_from_slice(&b);
            let _ = Header::decode_body(&body);
            let _ = Entry::decode(&e);
        }
    }
}
