//! The slot index of a backup: for every block that holds a record at the
//! cut (in this backup or an ancestor), a 64-bit fingerprint of its slot.
//!
//! Every write gives a block a fresh slot (new nonce, new generation), so
//! "slot fingerprint differs from the parent's" is exactly "block changed
//! since the parent" (a false "unchanged" needs a 64-bit collision). The next
//! incremental backup hands the parent's index to the [`super::BlockSource`],
//! which yields only blocks whose slot differs; the engine then overlays the
//! yielded records to get the new index. The index is a content-addressed
//! object beside the chunks.
//!
//! Memory is 8 bytes per block of the export (dense); the object stores only
//! non-empty runs:
//!
//! ```text
//!   0  8  magic "EARBKIX1"
//!   8  8  block count
//!  16  8  run count
//!  then per run: start (le64), length (le64), length × fingerprint (le64, ≠ 0)
//! ```
//! Runs are in increasing order, non-overlapping, non-adjacent, inside the
//! block count.

use bytes::{BufMut, Bytes, BytesMut};

use super::chunk::Slot;

/// Magic of an index object.
pub const INDEX_MAGIC: [u8; 8] = *b"EARBKIX1";

/// Why an index object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("slot index object is malformed: {0}")]
pub struct IndexError(pub &'static str);

/// Fingerprints of the slots of an export at one cut.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SlotIndex {
    fps: Vec<u64>,
}

impl SlotIndex {
    /// An index of `blocks` blocks, none present (the base of a full backup).
    pub fn empty(blocks: u64) -> Result<Self, IndexError> {
        let n = usize::try_from(blocks).map_err(|_| IndexError("block count too large"))?;
        Ok(Self { fps: vec![0; n] })
    }

    /// Number of blocks covered.
    pub fn blocks(&self) -> u64 {
        self.fps.len() as u64
    }

    /// Fingerprint of `block`, or `None` when the block held nothing.
    pub fn get(&self, block: u64) -> Option<u64> {
        let i = usize::try_from(block).ok()?;
        self.fps.get(i).copied().filter(|&f| f != 0)
    }

    /// True when `slot` is the slot this index recorded for `block`: the block
    /// did not change and a backup need not carry it again.
    pub fn unchanged(&self, block: u64, slot: &Slot) -> bool {
        // Hash the slot only when there is something to compare it with (a
        // full backup's base holds nothing).
        self.get(block).is_some_and(|f| f == slot.fingerprint())
    }

    /// Records `slot` as the slot of `block`. Blocks beyond the end are ignored
    /// (the caller checks them against the export size first).
    pub fn set(&mut self, block: u64, slot: &Slot) {
        if let Some(f) = usize::try_from(block)
            .ok()
            .and_then(|i| self.fps.get_mut(i))
        {
            *f = slot.fingerprint();
        }
    }

    /// Changes the block count (an export that grew or shrank since the parent).
    pub fn resize(&mut self, blocks: u64) -> Result<(), IndexError> {
        let n = usize::try_from(blocks).map_err(|_| IndexError("block count too large"))?;
        self.fps.resize(n, 0);
        Ok(())
    }

    /// Number of blocks present.
    pub fn present(&self) -> u64 {
        self.fps.iter().filter(|&&f| f != 0).count() as u64
    }

    /// Encodes the index as an object.
    pub fn encode(&self) -> Bytes {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < self.fps.len() {
            if self.fps[i] == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < self.fps.len() && self.fps[i] != 0 {
                i += 1;
            }
            runs.push((start, i - start));
        }
        let present: usize = runs.iter().map(|r| r.1).sum();
        let mut b = BytesMut::with_capacity(24 + runs.len() * 16 + present * 8);
        b.put_slice(&INDEX_MAGIC);
        b.put_u64_le(self.fps.len() as u64);
        b.put_u64_le(runs.len() as u64);
        for (start, len) in runs {
            b.put_u64_le(start as u64);
            b.put_u64_le(len as u64);
            for f in &self.fps[start..start + len] {
                b.put_u64_le(*f);
            }
        }
        b.freeze()
    }

    /// Decodes an index object of an export of `expected_blocks` blocks (from
    /// the authenticated manifest, so a forged count cannot make us allocate).
    pub fn decode(bytes: &[u8], expected_blocks: u64) -> Result<Self, IndexError> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(8)? != INDEX_MAGIC {
            return Err(IndexError("bad magic"));
        }
        let blocks = r.u64()?;
        let nruns = r.u64()?;
        // Each run takes ≥ 24 bytes: bound the work by the input length.
        if nruns > (bytes.len() as u64) / 24 {
            return Err(IndexError("run count exceeds the object length"));
        }
        if blocks != expected_blocks {
            return Err(IndexError(
                "block count differs from the manifest's export size",
            ));
        }
        let mut index = Self::empty(blocks)?;
        let mut next_free = 0u64;
        for _ in 0..nruns {
            let start = r.u64()?;
            let len = r.u64()?;
            let end = start.checked_add(len).ok_or(IndexError("run overflows"))?;
            if len == 0 || start < next_free || end > blocks {
                return Err(IndexError(
                    "runs out of order, empty, adjacent or beyond the end",
                ));
            }
            let need = len.checked_mul(8).ok_or(IndexError("run overflows"))?;
            if need > r.remaining() as u64 {
                return Err(IndexError("truncated"));
            }
            for i in start..end {
                let f = r.u64()?;
                if f == 0 {
                    return Err(IndexError("zero fingerprint"));
                }
                // `i < blocks` and `blocks` fit in usize (checked by `empty`).
                index.fps[i as usize] = f;
            }
            // Adjacent runs would have been one run: refuse, so the encoding is unique.
            next_free = end.checked_add(1).ok_or(IndexError("run overflows"))?;
        }
        if r.remaining() != 0 {
            return Err(IndexError("trailing bytes"));
        }
        Ok(index)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.at
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(IndexError("truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, IndexError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::chunk::tests::slot;
    use proptest::prelude::*;

    #[test]
    fn set_get_unchanged() {
        let mut ix = SlotIndex::empty(10).unwrap();
        let a = Slot::new(3, slot(1, 7)).unwrap();
        let b = Slot::new(3, slot(1, 8)).unwrap();
        assert!(!ix.unchanged(3, &a));
        ix.set(3, &a);
        assert!(ix.unchanged(3, &a));
        assert!(!ix.unchanged(3, &b));
        assert!(!ix.unchanged(4, &a));
        ix.set(99, &a); // beyond the end: ignored
        assert_eq!(ix.present(), 1);
        let back = SlotIndex::decode(&ix.encode(), ix.blocks()).unwrap();
        assert_eq!(back, ix);
    }

    #[test]
    fn refuses_malformed() {
        let mut ix = SlotIndex::empty(8).unwrap();
        for i in [1, 2, 5] {
            ix.set(i, &Slot::new(i, slot(2, i as u8)).unwrap());
        }
        let good = ix.encode().to_vec();
        assert!(SlotIndex::decode(&good[..good.len() - 1], 8).is_err());
        let mut extra = good.clone();
        extra.push(0);
        assert!(SlotIndex::decode(&extra, 8).is_err());
        let mut big = good.clone();
        big[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(SlotIndex::decode(&big, 8).is_err());
        let mut runs = good.clone();
        runs[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(SlotIndex::decode(&runs, 8).is_err());
    }

    proptest! {
        #[test]
        fn prop_round_trip(blocks in 0u64..300, set in proptest::collection::vec((0u64..300, any::<u8>()), 0..50)) {
            let mut ix = SlotIndex::empty(blocks).unwrap();
            for (b, f) in set {
                ix.set(b, &Slot::new(b, slot(1, f)).unwrap());
            }
            prop_assert_eq!(SlotIndex::decode(&ix.encode(), ix.blocks()).unwrap(), ix);
        }

        #[test]
        fn prop_decode_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), small in 0u64..64) {
            if bytes.len() >= 16 {
                bytes[..8].copy_from_slice(&INDEX_MAGIC);
                bytes[8..16].copy_from_slice(&small.to_le_bytes());
            }
            let _ = SlotIndex::decode(&bytes, small);
        }
    }
}
