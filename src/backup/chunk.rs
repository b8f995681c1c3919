//! Chunk objects: a sequence of block records of one export, in strictly
//! increasing block order, content-addressed by the SHA-256 of the encoded
//! bytes. Pure codec, no I/O.
//!
//! Encoding (all integers little-endian):
//!
//! ```text
//! header (40 bytes)
//!   0  8  magic "EARBKCH1"
//!   8  2  chunk format version = 1
//!  10  2  reserved, zero
//!  12  4  block size = 4096
//!  16  8  first block index (= index of the first record)
//!  24  8  end block index (= index of the last record + 1)
//!  32  4  record count (≥ 1)
//!  36  4  reserved, zero
//! records, count times
//!   0  8  block index
//!   8 64  the block's entry slot, as stored by the store (opaque here,
//!         except the kind at slot bytes 24..26: 1 = data, 2 = zero)
//!  72  4096 the stored ciphertext, present only for kind 1
//! ```
//!
//! The decoder accepts exactly this and nothing else: the total length must
//! match, indices must increase strictly and stay inside `[first, end)`, the
//! first and last record must sit on `first` and `end - 1`, and every slot
//! kind must be 1 or 2. Never plaintext: the ciphertext is copied as stored.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::target::Body;
use super::{BLOCK_SIZE, SLOT_LEN};

/// Magic at the start of every chunk object.
pub const CHUNK_MAGIC: [u8; 8] = *b"EARBKCH1";
/// Chunk format version this build writes and reads.
pub const CHUNK_VERSION: u16 = 1;
/// Length of the chunk header.
pub const HEADER_LEN: usize = 40;
/// Length of a record without ciphertext (index + slot).
pub const RECORD_HEAD_LEN: usize = 8 + SLOT_LEN;
/// Offset of the kind field inside a slot.
const KIND_OFFSET: usize = 24;

/// Why a chunk object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// Shorter than a header, or the records do not fill it exactly.
    #[error("chunk is truncated or has trailing bytes (length {len}, expected {expected})")]
    Length {
        /// Actual length.
        len: usize,
        /// Length the header and records imply (saturated on overflow).
        expected: usize,
    },
    /// Not a chunk object.
    #[error("not a backup chunk (bad magic)")]
    Magic,
    /// A newer or unknown chunk format.
    #[error("chunk format version {0} is not supported by this build (expected 1)")]
    Version(u16),
    /// A header field is out of range.
    #[error("chunk header is invalid: {0}")]
    Header(&'static str),
    /// A record's block index is out of order or outside the chunk's range.
    #[error("record {position}: block index {index} is out of order or outside the chunk range")]
    Order {
        /// Record number in the chunk.
        position: u32,
        /// Its block index.
        index: u64,
    },
    /// A slot of a kind backups do not carry.
    #[error("block {index}: slot kind {kind} is not data (1) or zero (2)")]
    Kind {
        /// Block index.
        index: u64,
        /// The kind found.
        kind: u16,
    },
    /// The SHA-256 of the object differs from its address.
    #[error("SHA-256 mismatch (expected {expected}, got {actual})")]
    Hash {
        /// The address from the manifest.
        expected: String,
        /// The hash of the bytes read.
        actual: String,
    },
    /// The records do not cover exactly the blocks the manifest says.
    #[error("the records do not cover the block runs recorded in the manifest")]
    Runs,
}

/// What a slot says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// Kind 1: ciphertext follows.
    Data,
    /// Kind 2: the block reads as zeros; no ciphertext.
    Zero,
}

/// One 64-byte entry slot, opaque to backups except for its kind.
#[derive(Clone, PartialEq, Eq)]
pub struct Slot([u8; SLOT_LEN]);

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot({})", hex::encode(self.0))
    }
}

impl Slot {
    /// Wraps slot bytes; fails unless the kind is data or zero.
    pub fn new(index: u64, bytes: [u8; SLOT_LEN]) -> Result<Self, ChunkError> {
        let slot = Slot(bytes);
        slot.kind_at(index)?;
        Ok(slot)
    }

    fn kind_at(&self, index: u64) -> Result<SlotKind, ChunkError> {
        let kind = u16::from_le_bytes([self.0[KIND_OFFSET], self.0[KIND_OFFSET + 1]]);
        match kind {
            1 => Ok(SlotKind::Data),
            2 => Ok(SlotKind::Zero),
            kind => Err(ChunkError::Kind { index, kind }),
        }
    }

    /// The kind (always data or zero: checked at construction).
    pub fn kind(&self) -> SlotKind {
        if self.0[KIND_OFFSET] == 1 {
            SlotKind::Data
        } else {
            SlotKind::Zero
        }
    }

    /// The raw slot bytes.
    pub fn bytes(&self) -> &[u8; SLOT_LEN] {
        &self.0
    }

    /// The 64-bit fingerprint the slot index keeps: the first 8 bytes of
    /// SHA-256 over the slot, never 0 (0 means "no block").
    pub fn fingerprint(&self) -> u64 {
        let d = Sha256::digest(self.0);
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        u64::from_le_bytes(b).max(1)
    }
}

/// One block as a backup carries it: index, slot, and the stored ciphertext
/// for data slots. Constructed only consistent (data present iff kind 1, and
/// then exactly one block long).
#[derive(Clone, PartialEq, Eq)]
pub struct BlockRecord {
    index: u64,
    slot: Slot,
    data: Option<Bytes>,
}

impl std::fmt::Debug for BlockRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockRecord")
            .field("index", &self.index)
            .field("kind", &self.slot.kind())
            .finish_non_exhaustive()
    }
}

impl BlockRecord {
    /// A record; `data` must be the 4096-byte stored block for kind 1 and
    /// `None` for kind 2.
    pub fn new(index: u64, slot: [u8; SLOT_LEN], data: Option<Bytes>) -> Result<Self, ChunkError> {
        let slot = Slot::new(index, slot)?;
        match (slot.kind(), &data) {
            (SlotKind::Data, Some(d)) if d.len() == BLOCK_SIZE => {}
            (SlotKind::Zero, None) => {}
            (SlotKind::Data, _) => {
                return Err(ChunkError::Header(
                    "a data slot needs exactly 4096 bytes of ciphertext",
                ))
            }
            (SlotKind::Zero, Some(_)) => {
                return Err(ChunkError::Header("a zero slot carries no ciphertext"))
            }
        }
        Ok(Self { index, slot, data })
    }

    /// Block index.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The entry slot.
    pub fn slot(&self) -> &Slot {
        &self.slot
    }

    /// The stored ciphertext (kind 1 only).
    pub fn data(&self) -> Option<&Bytes> {
        self.data.as_ref()
    }

    fn encoded_len(&self) -> usize {
        RECORD_HEAD_LEN + self.data.as_ref().map_or(0, |_| BLOCK_SIZE)
    }
}

/// A run of consecutive block indices `[start, start + len)`. Serialised as
/// a two-element array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "[u64; 2]", into = "[u64; 2]")]
pub struct BlockRun {
    /// First block.
    pub start: u64,
    /// Number of blocks.
    pub len: u64,
}

impl From<[u64; 2]> for BlockRun {
    fn from(a: [u64; 2]) -> Self {
        Self {
            start: a[0],
            len: a[1],
        }
    }
}

impl From<BlockRun> for [u64; 2] {
    fn from(r: BlockRun) -> Self {
        [r.start, r.len]
    }
}

impl BlockRun {
    /// One past the last block (`None` on overflow).
    pub fn end(&self) -> Option<u64> {
        self.start.checked_add(self.len)
    }
}

/// Appends `index` to a run list built in increasing order.
pub(crate) fn push_run(runs: &mut Vec<BlockRun>, index: u64) {
    if let Some(last) = runs.last_mut() {
        if last.end() == Some(index) {
            last.len += 1;
            return;
        }
    }
    runs.push(BlockRun {
        start: index,
        len: 1,
    });
}

/// Builds one chunk from records in strictly increasing block order.
#[derive(Debug, Default)]
pub struct ChunkBuilder {
    records: Vec<BlockRecord>,
    bytes: usize,
}

impl ChunkBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a record; its index must be above the previous one's.
    pub fn push(&mut self, record: BlockRecord) -> Result<(), ChunkError> {
        if let Some(last) = self.records.last() {
            if record.index <= last.index {
                return Err(ChunkError::Order {
                    position: u32::try_from(self.records.len()).unwrap_or(u32::MAX),
                    index: record.index,
                });
            }
        }
        if self.records.len() >= u32::MAX as usize {
            return Err(ChunkError::Header("too many records for one chunk"));
        }
        self.bytes += record.encoded_len();
        self.records.push(record);
        Ok(())
    }

    /// Encoded size of the records so far (without the header).
    pub fn record_bytes(&self) -> usize {
        self.bytes
    }

    /// True when no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Encodes the chunk and hashes it; `None` when empty.
    pub fn finish(self) -> Option<EncodedChunk> {
        let first = self.records.first()?.index;
        let last = self.records.last()?.index;
        let count = u32::try_from(self.records.len()).ok()?;
        // The header and every record's index and slot go into one buffer;
        // the ciphertext stays where the records hold it, and the object is
        // those pieces back to back (no copy of the data to encode it).
        let mut head = BytesMut::with_capacity(HEADER_LEN + self.records.len() * RECORD_HEAD_LEN);
        head.put_slice(&CHUNK_MAGIC);
        head.put_u16_le(CHUNK_VERSION);
        head.put_u16_le(0);
        head.put_u32_le(BLOCK_SIZE as u32);
        head.put_u64_le(first);
        // `last < u64::MAX` cannot be guaranteed by the type; saturate, and
        // the decoder rejects such a chunk (end would not be last + 1).
        head.put_u64_le(last.saturating_add(1));
        head.put_u32_le(count);
        head.put_u32_le(0);
        for r in &self.records {
            head.put_u64_le(r.index);
            head.put_slice(r.slot.bytes());
        }
        let head = head.freeze();
        let mut body = Body::default();
        let mut runs = Vec::new();
        let mut data_blocks = 0u64;
        // Start of the head bytes not yet in `body`.
        let mut from = 0;
        for (i, r) in self.records.iter().enumerate() {
            if let Some(d) = &r.data {
                let to = HEADER_LEN + (i + 1) * RECORD_HEAD_LEN;
                body.push(head.slice(from..to));
                body.push(d.clone());
                from = to;
                data_blocks += 1;
            }
            push_run(&mut runs, r.index);
        }
        body.push(head.slice(from..));
        let mut h = Sha256::new();
        for p in body.parts() {
            h.update(p);
        }
        Some(EncodedChunk {
            body,
            sha256: h.finalize().into(),
            runs,
            records: u64::from(count),
            data_blocks,
        })
    }
}

/// An encoded chunk ready for upload.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    /// The object bytes, as pieces.
    pub body: Body,
    /// SHA-256 of `bytes`: the object's address.
    pub sha256: [u8; 32],
    /// The blocks it holds, as runs.
    pub runs: Vec<BlockRun>,
    /// Number of records.
    pub records: u64,
    /// Records with ciphertext.
    pub data_blocks: u64,
}

/// A decoded chunk: records in strictly increasing order, all consistent.
#[derive(Debug, Clone)]
pub struct DecodedChunk {
    records: Vec<BlockRecord>,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl DecodedChunk {
    /// Checks `bytes` against its address, then decodes it.
    pub fn decode_verified(bytes: Bytes, sha256_hex: &str) -> Result<Self, ChunkError> {
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != sha256_hex {
            return Err(ChunkError::Hash {
                expected: sha256_hex.to_string(),
                actual,
            });
        }
        Self::decode(bytes)
    }

    /// Decodes a chunk (no hash check). Ciphertext stays shared with `bytes`.
    pub fn decode(bytes: Bytes) -> Result<Self, ChunkError> {
        let len = bytes.len();
        if len < HEADER_LEN {
            return Err(ChunkError::Length {
                len,
                expected: HEADER_LEN,
            });
        }
        if bytes[..8] != CHUNK_MAGIC {
            return Err(ChunkError::Magic);
        }
        let version = le_u16(&bytes, 8);
        if version != CHUNK_VERSION {
            return Err(ChunkError::Version(version));
        }
        if le_u16(&bytes, 10) != 0 || le_u32(&bytes, 36) != 0 {
            return Err(ChunkError::Header("reserved fields are not zero"));
        }
        if le_u32(&bytes, 12) != BLOCK_SIZE as u32 {
            return Err(ChunkError::Header("block size is not 4096"));
        }
        let first = le_u64(&bytes, 16);
        let end = le_u64(&bytes, 24);
        let count = le_u32(&bytes, 32);
        if count == 0 {
            return Err(ChunkError::Header("a chunk holds at least one record"));
        }
        let span = end
            .checked_sub(first)
            .ok_or(ChunkError::Header("end block is below the first block"))?;
        if span < u64::from(count) {
            return Err(ChunkError::Header("more records than blocks in the range"));
        }
        // Every record is at least RECORD_HEAD_LEN long: bound the count by
        // the length before allocating.
        let min_len = (count as usize)
            .checked_mul(RECORD_HEAD_LEN)
            .and_then(|n| n.checked_add(HEADER_LEN));
        match min_len {
            Some(m) if m <= len => {}
            _ => {
                return Err(ChunkError::Length {
                    len,
                    expected: min_len.unwrap_or(usize::MAX),
                })
            }
        }
        let mut records = Vec::with_capacity(count as usize);
        let mut at = HEADER_LEN;
        let mut prev: Option<u64> = None;
        for position in 0..count {
            let head_end = at
                .checked_add(RECORD_HEAD_LEN)
                .filter(|&e| e <= len)
                .ok_or(ChunkError::Length {
                    len,
                    expected: at.saturating_add(RECORD_HEAD_LEN),
                })?;
            let index = le_u64(&bytes, at);
            let in_order = prev.is_none_or(|p| index > p);
            let in_range = index >= first && index < end;
            let at_edges = (position != 0 || index == first)
                && (position + 1 != count || index.checked_add(1) == Some(end));
            if !(in_order && in_range && at_edges) {
                return Err(ChunkError::Order { position, index });
            }
            let mut slot = [0u8; SLOT_LEN];
            slot.copy_from_slice(&bytes[at + 8..head_end]);
            let slot = Slot::new(index, slot)?;
            at = head_end;
            let data = match slot.kind() {
                SlotKind::Zero => None,
                SlotKind::Data => {
                    let data_end = at.checked_add(BLOCK_SIZE).filter(|&e| e <= len).ok_or(
                        ChunkError::Length {
                            len,
                            expected: at.saturating_add(BLOCK_SIZE),
                        },
                    )?;
                    let d = bytes.slice(at..data_end);
                    at = data_end;
                    Some(d)
                }
            };
            records.push(BlockRecord { index, slot, data });
            prev = Some(index);
        }
        if at != len {
            return Err(ChunkError::Length { len, expected: at });
        }
        Ok(Self { records })
    }

    /// The records, in increasing block order.
    pub fn records(&self) -> &[BlockRecord] {
        &self.records
    }

    /// The blocks held, as runs.
    pub fn runs(&self) -> Vec<BlockRun> {
        let mut runs = Vec::new();
        for r in &self.records {
            push_run(&mut runs, r.index);
        }
        runs
    }

    /// Checks that the records cover exactly `expected` (from the manifest).
    pub fn check_runs(&self, expected: &[BlockRun]) -> Result<(), ChunkError> {
        if self.runs() == expected {
            Ok(())
        } else {
            Err(ChunkError::Runs)
        }
    }

    /// Takes the records out.
    pub fn into_records(self) -> Vec<BlockRecord> {
        self.records
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A slot of `kind` with recognisable other bytes.
    pub(crate) fn slot(kind: u16, fill: u8) -> [u8; SLOT_LEN] {
        let mut s = [fill; SLOT_LEN];
        s[KIND_OFFSET..KIND_OFFSET + 2].copy_from_slice(&kind.to_le_bytes());
        s
    }

    pub(crate) fn record(index: u64, fill: u8, zero: bool) -> BlockRecord {
        if zero {
            BlockRecord::new(index, slot(2, fill), None).unwrap()
        } else {
            let data = Bytes::from(vec![fill ^ 0x5a; BLOCK_SIZE]);
            BlockRecord::new(index, slot(1, fill), Some(data)).unwrap()
        }
    }

    fn encode(records: &[BlockRecord]) -> EncodedChunk {
        let mut b = ChunkBuilder::new();
        for r in records {
            b.push(r.clone()).unwrap();
        }
        b.finish().unwrap()
    }

    #[test]
    fn round_trip_and_hash() {
        let recs = vec![record(3, 1, false), record(4, 2, true), record(9, 3, false)];
        let enc = encode(&recs);
        assert_eq!(
            enc.body.len(),
            HEADER_LEN + 3 * RECORD_HEAD_LEN + 2 * BLOCK_SIZE
        );
        assert_eq!(
            enc.runs,
            vec![BlockRun { start: 3, len: 2 }, BlockRun { start: 9, len: 1 }]
        );
        let dec =
            DecodedChunk::decode_verified(enc.body.clone().into_bytes(), &hex::encode(enc.sha256))
                .unwrap();
        assert_eq!(dec.records(), &recs[..]);
        dec.check_runs(&enc.runs).unwrap();
        assert_eq!(
            dec.check_runs(&[BlockRun { start: 3, len: 3 }]),
            Err(ChunkError::Runs)
        );
    }

    #[test]
    fn edited_byte_fails_hash() {
        let enc = encode(&[record(0, 1, false)]);
        let mut v = enc.body.clone().into_bytes().to_vec();
        v[HEADER_LEN + RECORD_HEAD_LEN + 7] ^= 1;
        assert!(matches!(
            DecodedChunk::decode_verified(Bytes::from(v), &hex::encode(enc.sha256)),
            Err(ChunkError::Hash { .. })
        ));
    }

    #[test]
    fn builder_refuses_disorder_and_bad_records() {
        let mut b = ChunkBuilder::new();
        b.push(record(5, 1, true)).unwrap();
        assert!(b.push(record(5, 1, true)).is_err());
        assert!(b.push(record(4, 1, true)).is_err());
        assert!(BlockRecord::new(1, slot(0, 0), None).is_err());
        assert!(BlockRecord::new(1, slot(3, 0), None).is_err());
        assert!(BlockRecord::new(1, slot(1, 0), None).is_err());
        assert!(BlockRecord::new(1, slot(1, 0), Some(Bytes::from(vec![0; 10]))).is_err());
        assert!(BlockRecord::new(1, slot(2, 0), Some(Bytes::from(vec![0; 4096]))).is_err());
        assert!(ChunkBuilder::new().finish().is_none());
    }

    #[test]
    fn decoder_refuses_malformed_headers() {
        let good = encode(&[record(7, 1, true), record(8, 2, false)])
            .body
            .into_bytes()
            .to_vec();
        let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = good.clone();
            f(&mut v);
            DecodedChunk::decode(Bytes::from(v))
        };
        assert_eq!(mutate(&|v| v[0] = b'X').unwrap_err(), ChunkError::Magic);
        assert_eq!(mutate(&|v| v[8] = 2).unwrap_err(), ChunkError::Version(2));
        assert!(mutate(&|v| v[12] = 1).is_err()); // block size
        assert!(mutate(&|v| v[16] = 6).is_err()); // first below the first record
        assert!(mutate(&|v| v[24] = 10).is_err()); // end beyond the last record
        assert!(mutate(&|v| v[32] = 3).is_err()); // count
        assert!(mutate(&|v| v[32] = 0).is_err()); // empty
        assert!(mutate(&|v| v.truncate(v.len() - 1)).is_err());
        assert!(mutate(&|v| v.push(0)).is_err());
        assert!(mutate(&|v| v[36] = 1).is_err()); // reserved
        assert!(mutate(&|v| v[HEADER_LEN + 8 + KIND_OFFSET] = 1).is_err()); // kind 2 -> 1: length
        assert!(DecodedChunk::decode(Bytes::from_static(b"EARBKCH1")).is_err());
        // Huge count must not allocate.
        assert!(mutate(&|v| v[32..36].copy_from_slice(&u32::MAX.to_le_bytes())).is_err());
    }

    fn arb_records() -> impl Strategy<Value = Vec<BlockRecord>> {
        proptest::collection::btree_map(0u64..10_000, (any::<u8>(), any::<bool>()), 1..40).prop_map(
            |m| {
                m.into_iter()
                    .map(|(i, (fill, zero))| record(i, fill, zero))
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn prop_round_trip(recs in arb_records()) {
            let enc = encode(&recs);
            let dec = DecodedChunk::decode(enc.body.clone().into_bytes()).unwrap();
            prop_assert_eq!(dec.records(), &recs[..]);
            prop_assert_eq!(dec.runs(), enc.runs);
        }

        #[test]
        fn prop_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = DecodedChunk::decode(Bytes::from(bytes));
        }

        #[test]
        fn prop_mutations_never_panic_and_stay_consistent(
            recs in arb_records(), pos in any::<prop::sample::Index>(), byte in any::<u8>()
        ) {
            let mut v = encode(&recs).body.into_bytes().to_vec();
            let i = pos.index(v.len());
            v[i] = byte;
            if let Ok(dec) = DecodedChunk::decode(Bytes::from(v)) {
                // Whatever decodes obeys the invariants.
                let idx: Vec<u64> = dec.records().iter().map(|r| r.index()).collect();
                prop_assert!(idx.windows(2).all(|w| w[0] < w[1]));
                for r in dec.records() {
                    prop_assert_eq!(r.data().is_some(), r.slot().kind() == SlotKind::Data);
                }
            }
        }
    }
}
