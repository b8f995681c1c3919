//! The on-disk format of a backing file, version 2 (normative text:
//! `doc/FORMAT.md`). Pure encoding/decoding, the per-block slot rules and
//! geometry; no I/O.
//!
//! ```text
//! offset 0      header slot A (4096 bytes)
//! offset 4096   header slot B (4096 bytes)
//! offset 8192   group 0: 256 slot pairs x 128 bytes (32 KiB), then 256 data blocks x 4096 bytes
//!               group 1: ...
//! ```
//! Each data block has a *pair* of 64-byte slots. A write puts its new slot
//! into the slot that does not describe the block's current contents and then
//! writes the data, so a crash at any point leaves one slot that still
//! matches the data on disk (see [`resolve`]). A pair is 128 bytes and never
//! straddles a page, so the kernel copies it whole or not at all when a
//! process dies in the middle of a `pwrite`.

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
/// Bytes per slot.
pub const SLOT_SIZE: usize = 64;
/// Bytes per block's slot pair.
pub const PAIR_SIZE: usize = 2 * SLOT_SIZE;
/// Bytes of the pair table at the head of a group.
pub const GROUP_META: u64 = GROUP_BLOCKS * PAIR_SIZE as u64;
/// Bytes per group (pair table + data blocks).
pub const GROUP_BYTES: u64 = GROUP_META + GROUP_BLOCKS * BLOCK_SIZE_U64;
/// Largest export size this format accepts (1 PiB).
pub const MAX_EXPORT_SIZE: u64 = 1 << 50;
/// Magic at the start of each header slot.
pub const MAGIC: [u8; 8] = *b"EARSCAR\x01";
/// Format version written and read by this build.
pub const FORMAT_VERSION: u16 = 2;
/// Header bytes covered by the MAC.
pub const HEADER_BODY: usize = 192;
/// Offset of the 32-byte MAC (HMAC-SHA256, or SHA-256 when unencrypted).
pub const HEADER_MAC_AT: usize = HEADER_BODY;
/// Bytes reserved for the export name in the header.
pub const NAME_MAX: usize = 64;
/// Block check algorithm code: XXH3-64, seed 0.
pub const CHECK_XXH3: u16 = 1;
/// Largest (and default) number of block writes per epoch: the per-epoch
/// write counter is the nonce's first 32 bits.
pub const MAX_EPOCH_WRITES: u64 = 1 << 32;
/// Bytes of the per-block tag (integrity mode).
pub const TAG_LEN: usize = 16;

/// Data cipher recorded in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Plaintext passthrough (`--encryption off`).
    None,
    /// AES-256-CTR, 96-bit nonce (per-epoch counter and random bytes), 32-bit BE counter.
    Aes256Ctr,
}

impl Algorithm {
    fn code(self) -> u16 {
        match self {
            Algorithm::None => 0,
            Algorithm::Aes256Ctr => 1,
        }
    }
    fn from_code(c: u16) -> Option<Self> {
        match c {
            0 => Some(Algorithm::None),
            1 => Some(Algorithm::Aes256Ctr),
            _ => None,
        }
    }
}

/// Per-block authentication recorded in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// XXH3-64 check over slot and stored block only: detects torn writes
    /// and media errors, not tampering.
    Check,
    /// The check plus a 128-bit AES-256-GMAC tag per block under the per-file,
    /// per-epoch block-MAC key, bound to file id, block index, key version and
    /// epoch: detects tampering and blocks moved between offsets or files.
    /// Requires encryption.
    Gmac,
}

impl Integrity {
    fn code(self) -> u16 {
        match self {
            Integrity::Check => 0,
            Integrity::Gmac => 1,
        }
    }
    fn from_code(c: u16) -> Option<Self> {
        match c {
            0 => Some(Integrity::Check),
            1 => Some(Integrity::Gmac),
            _ => None,
        }
    }
}

/// Whether the file was closed cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Closed after a final fdatasync: every block's newer slot is valid (or
    /// neither is).
    Clean,
    /// Open, or the process died: every block is suspect until scrubbed.
    Open,
}

impl State {
    fn code(self) -> u16 {
        match self {
            State::Clean => 0,
            State::Open => 1,
        }
    }
    fn from_code(c: u16) -> Option<Self> {
        match c {
            0 => Some(State::Clean),
            1 => Some(State::Open),
            _ => None,
        }
    }
}

/// A decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Cipher of the data blocks.
    pub algorithm: Algorithm,
    /// Block authentication.
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
    /// Clean or open.
    pub state: State,
    /// Highest epoch ever reserved (0 when unencrypted and never opened).
    pub epoch: u32,
    /// Block writes per epoch in force when the header was written.
    pub epoch_writes: u64,
}

/// Why a header slot did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not an ear-sidecar file (or a zeroed slot).
    #[error("bad magic: not an ear-sidecar backing file")]
    Magic,
    /// Format version 1, which this build refuses.
    #[error("format v1, which this version does not read; there are no v1 deployments to migrate: recreate the data directory")]
    V1,
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
        b[24..26].copy_from_slice(&(PAIR_SIZE as u16).to_le_bytes());
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
        b[146..148].copy_from_slice(&CHECK_XXH3.to_le_bytes());
        b[148..150].copy_from_slice(&self.state.code().to_le_bytes());
        // 150..152 reserved
        b[152..156].copy_from_slice(&self.epoch.to_le_bytes());
        // 156..160 reserved
        b[160..168].copy_from_slice(&self.epoch_writes.to_le_bytes());
        // 168..192 reserved
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
        if version == 1 {
            return Err(HeaderError::V1);
        }
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
        if usize::from(u16_at(24)) != PAIR_SIZE {
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
        if b[82 + n..146].iter().any(|&x| x != 0) {
            return Err(HeaderError::Field("name padding"));
        }
        if u16_at(146) != CHECK_XXH3 {
            return Err(HeaderError::Field("check algorithm"));
        }
        let state = State::from_code(u16_at(148)).ok_or(HeaderError::Field("state"))?;
        let epoch_writes = u64_at(160);
        if epoch_writes == 0 || epoch_writes > MAX_EPOCH_WRITES {
            return Err(HeaderError::Field("epoch writes"));
        }
        if b[150..152]
            .iter()
            .chain(&b[156..160])
            .chain(&b[168..])
            .any(|&x| x != 0)
        {
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
            state,
            epoch: u32_at(152),
            epoch_writes,
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

/// File offset of block `b`'s slot pair. `b` is bounded by
/// `MAX_EXPORT_SIZE`, so nothing here overflows.
pub fn pair_offset(b: u64) -> u64 {
    DATA_START + (b / GROUP_BLOCKS) * GROUP_BYTES + (b % GROUP_BLOCKS) * PAIR_SIZE as u64
}

/// File offset of block `b`'s data.
pub fn data_offset(b: u64) -> u64 {
    DATA_START + (b / GROUP_BLOCKS) * GROUP_BYTES + GROUP_META + (b % GROUP_BLOCKS) * BLOCK_SIZE_U64
}

/// What a slot says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The block's stored data (ciphertext, or plaintext when unencrypted).
    Data,
    /// The block reads as zeros whatever its data area holds (trim, zeroing).
    Zero,
}

impl Kind {
    fn code(self) -> u16 {
        match self {
            Kind::Data => 1,
            Kind::Zero => 2,
        }
    }
}

/// A decoded, non-empty slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// CTR nonce: le32 per-epoch write counter, then 8 random bytes.
    pub nonce: [u8; NONCE_LEN],
    /// Universe-key version (0 if unencrypted).
    pub key_version: u32,
    /// Key epoch (0 if unencrypted).
    pub epoch: u32,
    /// Per-block slot generation (serial-number arithmetic).
    pub generation: u32,
    /// Data or zero.
    pub kind: Kind,
    /// XXH3-64 over slot bytes 0..32, le64(block) and, for data, the stored block.
    pub check: u64,
    /// Authentication tag (all zero unless integrity mode).
    pub tag: [u8; TAG_LEN],
}

/// Why a slot did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt block slot: {0}")]
pub struct SlotError(pub &'static str);

/// True when generation `a` is newer than `b` (RFC 1982 serial-number
/// arithmetic, so the 32-bit generation may wrap).
pub fn newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl Slot {
    /// The 32 slot bytes the check covers (everything before the check).
    pub fn head(&self) -> [u8; 32] {
        let mut p = [0u8; 32];
        p[0..12].copy_from_slice(&self.nonce);
        p[12..16].copy_from_slice(&self.key_version.to_le_bytes());
        p[16..20].copy_from_slice(&self.epoch.to_le_bytes());
        p[20..24].copy_from_slice(&self.generation.to_le_bytes());
        p[24..26].copy_from_slice(&self.kind.code().to_le_bytes());
        p
    }

    /// The check this slot should carry for block `block` holding `stored`
    /// (`stored` is ignored for [`Kind::Zero`]).
    pub fn compute_check(&self, block: u64, stored: &[u8]) -> u64 {
        use xxhash_rust::xxh3::Xxh3Default;
        let mut h = Xxh3Default::new();
        h.update(&self.head());
        h.update(&block.to_le_bytes());
        if self.kind == Kind::Data {
            h.update(stored);
        }
        h.digest()
    }

    /// A sealed zero slot of `block`: no nonce, key or tag, just the
    /// generation (how TRIM, WRITE_ZEROES and repairs record a hole).
    pub fn zero(block: u64, generation: u32) -> Slot {
        Slot {
            nonce: [0; NONCE_LEN],
            key_version: 0,
            epoch: 0,
            generation,
            kind: Kind::Zero,
            check: 0,
            tag: [0; TAG_LEN],
        }
        .seal(block, &[])
    }

    /// A new slot with its check computed.
    pub fn seal(mut self, block: u64, stored: &[u8]) -> Slot {
        self.check = self.compute_check(block, stored);
        self
    }

    /// True when the check matches `stored` at `block` (the tag is the
    /// caller's business: it needs a key).
    pub fn matches(&self, block: u64, stored: &[u8]) -> bool {
        self.compute_check(block, stored) == self.check
    }

    /// Encodes into 64 bytes.
    pub fn encode(&self, out: &mut [u8]) {
        out[..SLOT_SIZE].fill(0);
        out[0..32].copy_from_slice(&self.head());
        out[32..40].copy_from_slice(&self.check.to_le_bytes());
        out[40..56].copy_from_slice(&self.tag);
    }

    /// Decodes 64 bytes: `Ok(None)` for an empty (all-zero) slot.
    pub fn decode(s: &[u8]) -> Result<Option<Slot>, SlotError> {
        let s = s.get(..SLOT_SIZE).ok_or(SlotError("short slot"))?;
        if s.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let u32_at = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        let kind = match u16::from_le_bytes([s[24], s[25]]) {
            1 => Kind::Data,
            2 => Kind::Zero,
            0 => return Err(SlotError("kind 0 in a non-empty slot")),
            _ => return Err(SlotError("unknown kind")),
        };
        if s[26..32].iter().chain(&s[56..64]).any(|&x| x != 0) {
            return Err(SlotError("reserved bytes set"));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&s[0..12]);
        let mut check = [0u8; 8];
        check.copy_from_slice(&s[32..40]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&s[40..56]);
        Ok(Some(Slot {
            nonce,
            key_version: u32_at(12),
            epoch: u32_at(16),
            generation: u32_at(20),
            kind,
            check: u64::from_le_bytes(check),
            tag,
        }))
    }
}

/// One side of a pair as read from disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRead {
    /// All zero.
    Empty,
    /// Does not decode: can never be valid.
    Bad,
    /// A decoded slot (valid or not: that depends on the data).
    Used(Slot),
}

/// Decodes both slots of a 128-byte pair.
pub fn decode_pair(pair: &[u8]) -> [SlotRead; 2] {
    let one = |s: &[u8]| match Slot::decode(s) {
        Ok(None) => SlotRead::Empty,
        Ok(Some(x)) => SlotRead::Used(x),
        Err(_) => SlotRead::Bad,
    };
    [one(&pair[..SLOT_SIZE]), one(&pair[SLOT_SIZE..PAIR_SIZE])]
}

/// The used slots of a pair, newest first (by generation).
pub fn newest_first(p: &[SlotRead; 2]) -> ([Option<(usize, Slot)>; 2], bool) {
    let bad = p.iter().any(|s| matches!(s, SlotRead::Bad));
    match (p[0], p[1]) {
        (SlotRead::Used(a), SlotRead::Used(b)) => {
            if newer(b.generation, a.generation) {
                ([Some((1, b)), Some((0, a))], bad)
            } else {
                ([Some((0, a)), Some((1, b))], bad)
            }
        }
        (SlotRead::Used(a), _) => ([Some((0, a)), None], bad),
        (_, SlotRead::Used(b)) => ([Some((1, b)), None], bad),
        _ => ([None, None], bad),
    }
}

/// What the read rule decided for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Both slots empty: never written, reads as zeros.
    Unwritten,
    /// Slot `index` is valid. `newest` is true when it is the newest
    /// non-empty slot and the other slot is not undecodable (the only answer
    /// an unlocked reader may accept).
    Valid {
        /// 0 or 1.
        index: usize,
        /// The slot.
        slot: Slot,
        /// See above.
        newest: bool,
    },
    /// One slot empty, the other not valid: the block's first write did not
    /// land (a crash between slot and data), or damage. Reads as zeros, its
    /// content before that write.
    TornFirst,
    /// Neither slot describes the data on disk: a torn write after power
    /// loss, or damage. Reads as zeros (default mode) or EIO (integrity).
    CantTell,
}

/// The read rule: the newest used slot that is valid for `stored` at
/// `block`, else the older one, else can't tell. `valid_tag` adds the
/// integrity check for data slots (return true when not in integrity mode).
pub fn resolve(
    pair: &[u8],
    block: u64,
    stored: &[u8],
    mut valid_tag: impl FnMut(&Slot) -> bool,
) -> Resolution {
    let p = decode_pair(pair);
    let (order, bad) = newest_first(&p);
    if order[0].is_none() && !bad {
        return Resolution::Unwritten;
    }
    for (rank, (index, slot)) in order.into_iter().flatten().enumerate() {
        let ok = slot.matches(block, stored) && (slot.kind == Kind::Zero || valid_tag(&slot));
        if ok {
            return Resolution::Valid {
                index,
                slot,
                newest: rank == 0 && !bad,
            };
        }
    }
    // One slot empty, the other not valid: the block's first write was
    // interrupted (a slot is emptied only when nothing valid is left: see
    // [`demote`]), so its content before that write, zeros, is the answer.
    if p.contains(&SlotRead::Empty) {
        return Resolution::TornFirst;
    }
    Resolution::CantTell
}

/// Demotes the slot that is not `valid` (a newer slot whose data never
/// landed) below the valid one, by rewriting its generation to one less than
/// the valid slot's. The slot stays non-empty and invalid, so the pair again
/// satisfies the clean invariant (its newer slot is valid) and an empty slot
/// keeps meaning "nothing valid was ever here". Returns false when there is
/// nothing to demote (the other slot is empty, undecodable or already older).
/// For a [`Resolution::TornFirst`] block, [`clear_torn_first`] is the
/// equivalent.
pub fn demote(pair: &mut [u8], valid: usize) -> bool {
    let p = decode_pair(pair);
    let (SlotRead::Used(v), SlotRead::Used(mut o)) = (p[valid], p[1 - valid]) else {
        return false;
    };
    if !newer(o.generation, v.generation) {
        return false;
    }
    o.generation = v.generation.wrapping_sub(1);
    o.encode(&mut pair[(1 - valid) * SLOT_SIZE..(2 - valid) * SLOT_SIZE]);
    true
}

/// Empties the pair of a block whose first write did not land: it reads as
/// zeros either way, and an empty pair keeps the clean invariant.
pub fn clear_torn_first(pair: &mut [u8]) {
    pair[..PAIR_SIZE].fill(0);
}

/// The slot a write of a block should overwrite, and the generation of the
/// slot it writes. `valid` is the index of the block's valid slot when
/// known (from the read rule), `None` when the block is known clean (then
/// the newer slot is the valid one, or none is).
pub fn write_target(pair: &[u8], valid: Option<Option<usize>>) -> (usize, u32) {
    let p = decode_pair(pair);
    let (order, _) = newest_first(&p);
    let next_gen = order[0].map_or(1, |(_, s)| s.generation.wrapping_add(1));
    let target = match (valid, p[0], p[1]) {
        // Suspect block, resolved: the other slot.
        (Some(Some(i)), _, _) => 1 - i,
        // Nothing valid and one slot empty (a first write that did not
        // land): overwrite the used slot, so that if this write does not
        // land either, the block still reads as zeros.
        (Some(None), SlotRead::Empty, _) => 1,
        (Some(None), _, SlotRead::Empty) => 0,
        // Clean (or resolved to can't tell): an empty or bad slot if there
        // is one, else the older.
        (_, SlotRead::Used(_), SlotRead::Used(_)) => order[1].map_or(1, |(i, _)| i),
        (_, SlotRead::Used(_), _) => 1,
        _ => 0,
    };
    (target, next_gen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            algorithm: Algorithm::Aes256Ctr,
            integrity: Integrity::Check,
            header_key_version: 1,
            file_id: [7; 16],
            size: 1 << 30,
            sequence: 3,
            dir_id: [9; 16],
            name: "default".into(),
            state: State::Open,
            epoch: 5,
            epoch_writes: 1 << 20,
        }
    }

    #[test]
    fn header_round_trip() {
        let h = header();
        assert_eq!(Header::decode_body(&h.encode_body()).unwrap(), h);
    }

    #[test]
    fn header_rejects_bad_fields_and_v1() {
        let good = header().encode_body();
        let mut b = good;
        b[0] ^= 1;
        assert_eq!(Header::decode_body(&b), Err(HeaderError::Magic));
        let mut b = good;
        b[8] = 1;
        assert_eq!(Header::decode_body(&b), Err(HeaderError::V1));
        assert!(HeaderError::V1
            .to_string()
            .contains("recreate the data directory"));
        let mut b = good;
        b[8] = 3;
        assert_eq!(Header::decode_body(&b), Err(HeaderError::Version(3)));
        for at in [12, 146, 148, 150, 157, 170, 191] {
            let mut b = good;
            b[at] = 9;
            assert!(Header::decode_body(&b).is_err(), "byte {at}");
        }
        let mut b = good;
        b[160..168].fill(0);
        assert!(Header::decode_body(&b).is_err(), "epoch_writes 0");
    }

    #[test]
    fn geometry() {
        assert_eq!(pair_offset(0), 8192);
        assert_eq!(data_offset(0), 8192 + 32768);
        assert_eq!(data_offset(255) + 4096, DATA_START + GROUP_BYTES);
        assert_eq!(pair_offset(256), DATA_START + GROUP_BYTES);
        assert_eq!(file_len_for(4096), DATA_START + GROUP_BYTES);
        assert_eq!(file_len_for(1 << 20), DATA_START + GROUP_BYTES);
        assert_eq!(file_len_for((1 << 20) + 1), DATA_START + 2 * GROUP_BYTES);
        // Data blocks are page aligned, and no pair straddles a page.
        assert_eq!(data_offset(0) % 4096, 0);
        assert_eq!(4096 % PAIR_SIZE, 0);
        assert!(file_len_for(MAX_EXPORT_SIZE) < i64::MAX as u64);
    }

    fn slot(generation: u32, kind: Kind) -> Slot {
        Slot {
            nonce: [3; 12],
            key_version: 2,
            epoch: 7,
            generation,
            kind,
            check: 0,
            tag: [0xee; TAG_LEN],
        }
    }

    fn pair(a: Option<Slot>, b: Option<Slot>) -> [u8; PAIR_SIZE] {
        let mut p = [0u8; PAIR_SIZE];
        if let Some(a) = a {
            a.encode(&mut p[..SLOT_SIZE]);
        }
        if let Some(b) = b {
            b.encode(&mut p[SLOT_SIZE..]);
        }
        p
    }

    #[test]
    fn slot_round_trip_and_check() {
        let data = vec![0x5au8; BLOCK_SIZE];
        let s = slot(9, Kind::Data).seal(4, &data);
        let mut raw = [0u8; SLOT_SIZE];
        s.encode(&mut raw);
        assert_eq!(Slot::decode(&raw).unwrap(), Some(s));
        assert!(s.matches(4, &data));
        assert!(!s.matches(5, &data), "bound to the block index");
        let mut torn = data.clone();
        torn[4095] ^= 1;
        assert!(!s.matches(4, &torn));
        let z = slot(9, Kind::Zero).seal(4, &data);
        assert!(z.matches(4, &torn), "a zero slot ignores the data area");
        assert_eq!(Slot::decode(&[0u8; 64]).unwrap(), None);
    }

    #[test]
    fn read_rule() {
        let old = vec![1u8; BLOCK_SIZE];
        let new = vec![2u8; BLOCK_SIZE];
        let s_old = slot(1, Kind::Data).seal(0, &old);
        let s_new = slot(2, Kind::Data).seal(0, &new);
        let yes = |_: &Slot| true;
        assert_eq!(
            resolve(&pair(None, None), 0, &old, yes),
            Resolution::Unwritten
        );
        // Both written: new data -> newest; old data (entry landed, data not) -> older.
        let p = pair(Some(s_old), Some(s_new));
        assert!(matches!(
            resolve(&p, 0, &new, yes),
            Resolution::Valid {
                index: 1,
                newest: true,
                ..
            }
        ));
        assert!(matches!(
            resolve(&p, 0, &old, yes),
            Resolution::Valid {
                index: 0,
                newest: false,
                ..
            }
        ));
        assert_eq!(
            resolve(&p, 0, &[3u8; BLOCK_SIZE], yes),
            Resolution::CantTell
        );
        // A failing tag is invalid too.
        assert_eq!(
            resolve(&p, 0, &new, |s: &Slot| s.generation != 2),
            Resolution::CantTell
        );
        // A torn first write (one slot empty) reads as before it: zeros.
        assert_eq!(
            resolve(&pair(None, Some(s_new)), 0, &old, yes),
            Resolution::TornFirst
        );
        // Generations wrap.
        let a = slot(u32::MAX, Kind::Data).seal(0, &old);
        let b = slot(0, Kind::Zero).seal(0, &old);
        assert!(matches!(
            resolve(&pair(Some(a), Some(b)), 0, &old, yes),
            Resolution::Valid {
                index: 1,
                newest: true,
                ..
            }
        ));
    }

    #[test]
    fn write_target_rule() {
        let d = vec![1u8; BLOCK_SIZE];
        let s1 = slot(1, Kind::Data).seal(0, &d);
        let s2 = slot(2, Kind::Data).seal(0, &d);
        assert_eq!(write_target(&pair(None, None), None), (0, 1));
        assert_eq!(write_target(&pair(Some(s1), None), None), (1, 2));
        assert_eq!(write_target(&pair(None, Some(s1)), None), (0, 2));
        assert_eq!(write_target(&pair(Some(s1), Some(s2)), None), (0, 3));
        assert_eq!(write_target(&pair(Some(s2), Some(s1)), None), (1, 3));
        // Suspect, the older slot is the valid one: overwrite the newer.
        assert_eq!(
            write_target(&pair(Some(s1), Some(s2)), Some(Some(0))),
            (1, 3)
        );
        // Suspect, a first write that did not land: overwrite it, keep the empty slot.
        assert_eq!(write_target(&pair(None, Some(s1)), Some(None)), (1, 2));
        assert_eq!(write_target(&pair(Some(s1), None), Some(None)), (0, 2));
    }

    /// Model of one block's slot pair under the write rule with crashes at
    /// any step: whatever happens, the block reads as the last completed
    /// write or the interrupted one, across repeated crash/restart cycles.
    fn crash_model(ops: &[(u8, u8)]) -> Result<(), TestCaseError> {
        let mut p = [0u8; PAIR_SIZE];
        let mut data = vec![0u8; BLOCK_SIZE];
        let mut committed = vec![0u8; BLOCK_SIZE]; // unwritten reads as zeros
        let mut suspect = false;
        for (i, &(val, crash)) in ops.iter().enumerate() {
            let new = vec![val; BLOCK_SIZE];
            // Suspect blocks are resolved before targeting (as the store does).
            let valid = if suspect {
                match resolve(&p, 0, &data, |_| true) {
                    Resolution::Valid { index, .. } => Some(Some(index)),
                    _ => Some(None),
                }
            } else {
                None
            };
            let (t, generation) = write_target(&p, valid);
            let mut s = slot(generation, Kind::Data);
            s.nonce[0] = i as u8;
            let s = s.seal(0, &new);
            s.encode(&mut p[t * SLOT_SIZE..(t + 1) * SLOT_SIZE]);
            // crash 0: after the pair write; crash 1: no crash.
            if crash % 3 == 0 {
                suspect = true;
            } else {
                data.copy_from_slice(&new);
                committed = new.clone();
            }
            let got = match resolve(&p, 0, &data, |_| true) {
                Resolution::Unwritten | Resolution::TornFirst => vec![0u8; BLOCK_SIZE],
                Resolution::Valid { slot, .. } => {
                    prop_assert_eq!(slot.kind, Kind::Data);
                    data.clone()
                }
                Resolution::CantTell => {
                    return Err(TestCaseError::fail("can't tell after a process crash"))
                }
            };
            prop_assert!(got == committed, "op {}", i);
            // A scrub after some restarts demotes an invalid newer slot.
            if suspect && crash % 5 == 1 {
                match resolve(&p, 0, &data, |_| true) {
                    Resolution::Valid {
                        index,
                        newest: false,
                        ..
                    } => {
                        prop_assert!(demote(&mut p, index));
                        let now_newest = matches!(
                            resolve(&p, 0, &data, |_| true),
                            Resolution::Valid { newest: true, .. }
                        );
                        prop_assert!(now_newest);
                    }
                    Resolution::TornFirst => clear_torn_first(&mut p),
                    _ => {}
                }
                suspect = false;
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), HEADER_BODY..=HEADER_BODY),
                                e in proptest::collection::vec(any::<u8>(), 0..140)) {
            let mut body = [0u8; HEADER_BODY];
            body.copy_from_slice(&b);
            let _ = Header::decode_body(&body);
            let _ = Slot::decode(&e);
            if e.len() >= PAIR_SIZE {
                let _ = resolve(&e, 3, &[0u8; BLOCK_SIZE], |_| true);
                let _ = write_target(&e, None);
            }
        }

        #[test]
        fn slot_codec_round_trips(nonce in any::<[u8; 12]>(), v in any::<u32>(), ep in any::<u32>(),
                                  g in any::<u32>(), zero in any::<bool>(), check in any::<u64>(),
                                  tag in any::<[u8; 16]>()) {
            let s = Slot { nonce, key_version: v, epoch: ep, generation: g,
                kind: if zero { Kind::Zero } else { Kind::Data }, check, tag };
            let mut raw = [0u8; SLOT_SIZE];
            s.encode(&mut raw);
            prop_assert_eq!(Slot::decode(&raw).unwrap(), Some(s));
        }

        #[test]
        fn repeated_crashes_read_old_or_new(ops in proptest::collection::vec((any::<u8>(), any::<u8>()), 1..40)) {
            crash_model(&ops)?;
        }
    }
}
