//! Block I/O of an export: the read rule (unlocked fast path, locked
//! fallback), whole-block writes into the slot that does not describe the
//! current data, read-modify-write, zero slots for TRIM / WRITE_ZEROES,
//! flush and allocation status.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::export::{timed, Export, IoStats, ReadMode, ZeroMode, REPORTED_MAX};
use super::format::{
    self, Integrity, Kind, Resolution, Slot, BLOCK_SIZE, BLOCK_SIZE_U64, GROUP_BLOCKS, PAIR_SIZE,
    SLOT_SIZE,
};
use super::versions::{block_version, pair_version};
use super::StoreError;
use crate::crypto::{fill_random, BlockCipher, FileKeys, NONCE_LEN};

impl Export {
    // ---- reads --------------------------------------------------------------

    /// Reads `out.len()` plaintext bytes at `offset`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<IoStats, StoreError> {
        let mut st = IoStats::default();
        if out.is_empty() {
            return Ok(st);
        }
        self.check_range(offset, out.len() as u64)?;
        let end = offset + out.len() as u64;
        let (first, last) = (offset / BLOCK_SIZE_U64, (end - 1) / BLOCK_SIZE_U64);
        let mut b = first;
        while b <= last {
            let seg_last = last.min((b / GROUP_BLOCKS + 1) * GROUP_BLOCKS - 1);
            let seg_start = b * BLOCK_SIZE_U64;
            let seg_end = (seg_last + 1) * BLOCK_SIZE_U64;
            let lo = seg_start.max(offset);
            let hi = seg_end.min(end);
            let out_part = &mut out[(lo - offset) as usize..(hi - offset) as usize];
            if lo == seg_start && hi == seg_end {
                self.read_segment(b, seg_last, out_part, ReadMode::Retry, &mut st)?;
            } else {
                let mut scratch = vec![0u8; (seg_end - seg_start) as usize];
                self.read_segment(b, seg_last, &mut scratch, ReadMode::Retry, &mut st)?;
                out_part.copy_from_slice(
                    &scratch[(lo - seg_start) as usize..(hi - seg_start) as usize],
                );
            }
            b = seg_last + 1;
        }
        Ok(st)
    }

    /// Reads and decrypts whole blocks `first..=last` (one group) into `buf`.
    /// Unlocked, a block is accepted only when its newest slot is valid;
    /// anything else (a write in progress, or a torn block) is re-read under
    /// the block lock, where the full read rule applies.
    pub(super) fn read_segment(
        &self,
        first: u64,
        last: u64,
        buf: &mut [u8],
        mode: ReadMode,
        st: &mut IoStats,
    ) -> Result<(), StoreError> {
        let n = (last - first + 1) as usize;
        debug_assert_eq!(buf.len(), n * BLOCK_SIZE);
        let mut pairs = vec![0u8; n * PAIR_SIZE];
        timed(&mut st.storage, || {
            self.io.read_full_at(&mut pairs, format::pair_offset(first))
        })
        .map_err(|source| self.io_err("read slots of", source))?;
        if pairs.iter().all(|&x| x == 0) {
            buf.fill(0);
            return Ok(());
        }
        timed(&mut st.storage, || {
            self.io.read_full_at(buf, format::data_offset(first))
        })
        .map_err(|source| self.io_err("read", source))?;
        let t = Instant::now();
        let checked = self.check_and_decrypt(first, &pairs, buf, mode);
        st.crypto += t.elapsed();
        match (checked?, mode) {
            (None, _) => Ok(()),
            (Some(_), ReadMode::Retry) => {
                let _g = self.locks.lock(first, last);
                self.read_segment(first, last, buf, ReadMode::Locked, st)
            }
            // Locked reads never ask for the lock.
            (Some(block), ReadMode::Locked) => Err(StoreError::Corrupt {
                export: self.name.clone(),
                block,
                why: "internal: locked read asked for the lock".into(),
            }),
        }
    }

    /// Applies the read rule to each block of a segment, authenticates it
    /// (integrity mode) and decrypts it while it is still in L1: one pass
    /// over the data. Returns the first block that needs the lock (unlocked
    /// modes only); the caller then re-reads the whole segment, so blocks
    /// already decrypted here are never returned.
    fn check_and_decrypt(
        &self,
        first: u64,
        pairs: &[u8],
        buf: &mut [u8],
        mode: ReadMode,
    ) -> Result<Option<u64>, StoreError> {
        let mut cache = KeyCache::default();
        for (i, (pair, blk)) in pairs
            .chunks_exact(PAIR_SIZE)
            .zip(buf.chunks_exact_mut(BLOCK_SIZE))
            .enumerate()
        {
            let block = first + i as u64;
            match self.resolve_block(block, pair, blk, &mut cache)? {
                Resolution::Unwritten => blk.fill(0),
                Resolution::TornFirst => {
                    if mode != ReadMode::Locked {
                        return Ok(Some(block));
                    }
                    self.torn_when_clean(block)?;
                    blk.fill(0);
                }
                Resolution::Valid { newest, slot, .. } => {
                    if !newest {
                        if mode != ReadMode::Locked {
                            return Ok(Some(block));
                        }
                        self.torn_when_clean(block)?;
                    }
                    match slot.kind {
                        Kind::Zero => blk.fill(0),
                        Kind::Data => self.decrypt(&slot, block, blk, &mut cache)?,
                    }
                }
                Resolution::CantTell => {
                    if mode != ReadMode::Locked {
                        return Ok(Some(block));
                    }
                    if self.header.integrity == Integrity::Gmac {
                        return Err(StoreError::AuthFailed {
                            export: self.name.clone(),
                            block,
                        });
                    }
                    self.report_unrecoverable(block);
                    blk.fill(0);
                }
            }
        }
        Ok(None)
    }

    /// The read rule for one block (see [`format::resolve`]), with the tag
    /// check in integrity mode. A key that is not loaded is an error, not
    /// an invalid slot.
    pub(super) fn resolve_block(
        &self,
        block: u64,
        pair: &[u8],
        stored: &[u8],
        cache: &mut KeyCache,
    ) -> Result<Resolution, StoreError> {
        let gmac = self.header.integrity == Integrity::Gmac;
        let mut key_err: Option<StoreError> = None;
        let r = format::resolve(pair, block, stored, |s| {
            if !gmac {
                return true;
            }
            match cache.get(self, s.key_version, s.epoch) {
                Ok(Some(k)) => k.verify_block_tag(
                    &s.tag,
                    &s.nonce,
                    &self.header.file_id,
                    block,
                    s.key_version,
                    s.epoch,
                    stored,
                ),
                Ok(None) => false,
                Err(e) => {
                    key_err = Some(e);
                    false
                }
            }
        });
        match (r, key_err) {
            (Resolution::Valid { .. }, _) | (_, None) => Ok(r),
            (_, Some(e)) => Err(e),
        }
    }

    /// Decrypts a block whose data slot is valid.
    pub(super) fn decrypt(
        &self,
        slot: &Slot,
        block: u64,
        blk: &mut [u8],
        cache: &mut KeyCache,
    ) -> Result<(), StoreError> {
        let corrupt = |why: &str| StoreError::Corrupt {
            export: self.name.clone(),
            block,
            why: why.into(),
        };
        if self.header.integrity != Integrity::Gmac && slot.tag != [0; format::TAG_LEN] {
            return Err(corrupt("tag set in a file without per-block integrity"));
        }
        match cache.get(self, slot.key_version, slot.epoch)? {
            None => {
                if slot.key_version != 0 || slot.nonce != [0; NONCE_LEN] || slot.epoch != 0 {
                    return Err(corrupt("encrypted block in an unencrypted export"));
                }
            }
            Some(keys) => BlockCipher::new(keys.data_cipher()).apply(&slot.nonce, blk),
        }
        Ok(())
    }

    /// Under the lock, a block whose newest slot is not valid is a torn
    /// write only when the previous run crashed and the scrub has not passed
    /// it yet; in a clean block it is damage (or tampering): EIO with
    /// per-block integrity, else logged and counted while the read rule's
    /// answer (the older content) is served.
    fn torn_when_clean(&self, block: u64) -> Result<(), StoreError> {
        if !self.is_clean(block) {
            return Ok(());
        }
        if self.header.integrity == Integrity::Gmac {
            return Err(StoreError::AuthFailed {
                export: self.name.clone(),
                block,
            });
        }
        self.report_unrecoverable(block);
        Ok(())
    }

    /// Logs a block that cannot be told (once per block, bounded) and counts it.
    pub(super) fn report_unrecoverable(&self, block: u64) {
        let mut r = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        if r.contains(&block) {
            return;
        }
        self.counters
            .unrecoverable_blocks
            .fetch_add(1, Ordering::Relaxed);
        if r.len() < REPORTED_MAX {
            r.insert(block);
            tracing::warn!(export = %self.name, block,
                "block matches neither of its slots (a write torn by power loss, or damage): \
                 it reads as zeros; `ear-sidecar check` lists such blocks");
        }
    }

    // ---- writes -------------------------------------------------------------

    /// Writes `data` at `offset`. `data` is used as scratch (encrypted in
    /// place) when the request is block aligned. With `fua`, the data is
    /// durable when this returns.
    pub fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<IoStats, StoreError> {
        let _gate = self.request_gate();
        self.write_ungated(offset, data, fua)
    }

    /// The request gate, shared: a backup cut (which takes it exclusively)
    /// happens before or after the whole request, never inside it.
    pub(super) fn request_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_ungated(
        &self,
        offset: u64,
        data: &mut [u8],
        fua: bool,
    ) -> Result<IoStats, StoreError> {
        let mut st = IoStats::default();
        self.check_range(offset, data.len() as u64)?;
        if !data.is_empty() {
            let end = offset + data.len() as u64;
            let (first, last) = (offset / BLOCK_SIZE_U64, (end - 1) / BLOCK_SIZE_U64);
            let _g = self.locks.lock(first, last);
            if offset.is_multiple_of(BLOCK_SIZE_U64) && end.is_multiple_of(BLOCK_SIZE_U64) {
                self.write_blocks(first, data, &mut st)?;
            } else {
                let mut buf = vec![0u8; ((last - first + 1) as usize) * BLOCK_SIZE];
                let lb = buf.len() - BLOCK_SIZE;
                if !offset.is_multiple_of(BLOCK_SIZE_U64) {
                    self.read_segment(
                        first,
                        first,
                        &mut buf[..BLOCK_SIZE],
                        ReadMode::Locked,
                        &mut st,
                    )?;
                }
                if !end.is_multiple_of(BLOCK_SIZE_U64)
                    && (last != first || offset.is_multiple_of(BLOCK_SIZE_U64))
                {
                    self.read_segment(last, last, &mut buf[lb..], ReadMode::Locked, &mut st)?;
                }
                let at = (offset - first * BLOCK_SIZE_U64) as usize;
                buf[at..at + data.len()].copy_from_slice(data);
                self.write_blocks(first, &mut buf, &mut st)?;
            }
        }
        if fua {
            self.sync(&mut st)?;
        }
        Ok(st)
    }

    /// For each block of a segment, the slot a write targets and its new
    /// generation. Clean blocks follow the pair alone; suspect blocks (an
    /// unclean shutdown the scrub has not passed) are resolved against
    /// their data first, so the valid slot is never overwritten.
    /// Also returns the key version each block uses now (see
    /// [`super::versions`]), for the per-version counts.
    fn targets(&self, b: u64, pairs: &[u8], st: &mut IoStats) -> Result<Targets, StoreError> {
        let n = pairs.len() / PAIR_SIZE;
        if self.is_clean(b) {
            return Ok((
                pairs
                    .chunks_exact(PAIR_SIZE)
                    .map(|p| format::write_target(p, None))
                    .collect(),
                pairs.chunks_exact(PAIR_SIZE).map(pair_version).collect(),
            ));
        }
        let mut data = vec![0u8; n * BLOCK_SIZE];
        timed(&mut st.storage, || {
            self.io.read_full_at(&mut data, format::data_offset(b))
        })
        .map_err(|source| self.io_err("read", source))?;
        let mut cache = KeyCache::default();
        let mut out = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        for (i, (p, d)) in pairs
            .chunks_exact(PAIR_SIZE)
            .zip(data.chunks_exact(BLOCK_SIZE))
            .enumerate()
        {
            let r = self.resolve_block(b + i as u64, p, d, &mut cache)?;
            versions.push(block_version(p, &r));
            let valid = match r {
                Resolution::Valid { index, .. } => Some(index),
                _ => None,
            };
            out.push(format::write_target(p, Some(valid)));
        }
        Ok((out, versions))
    }

    /// Encrypts and writes whole blocks starting at `first`. Caller holds the
    /// range lock. Per segment: the new slots go into the slots that do not
    /// describe the current data, the pair table is written, then the data.
    pub(super) fn write_blocks(
        &self,
        first: u64,
        buf: &mut [u8],
        st: &mut IoStats,
    ) -> Result<(), StoreError> {
        let n = buf.len() / BLOCK_SIZE;
        let (version, counters, random) = match self.keys() {
            Some(ring) => {
                let counters = self.take_counters(n)?;
                // One getrandom(2) call for every nonce of the request.
                let mut random = vec![0u8; n * 8];
                fill_random(&mut random)?;
                (ring.active_version(), counters, random)
            }
            None => (0, vec![(0, 0); n], vec![0u8; n * 8]),
        };
        let mut cache = KeyCache::default();
        let mut b = first;
        let mut done = 0usize;
        while done < n {
            let seg_n = ((GROUP_BLOCKS - b % GROUP_BLOCKS) as usize).min(n - done);
            let seg = &mut buf[done * BLOCK_SIZE..(done + seg_n) * BLOCK_SIZE];
            let mut pairs = vec![0u8; seg_n * PAIR_SIZE];
            timed(&mut st.storage, || {
                self.io.read_full_at(&mut pairs, format::pair_offset(b))
            })
            .map_err(|source| self.io_err("read slots of", source))?;
            let (targets, old_versions) = self.targets(b, &pairs, st)?;
            let old_pairs = pairs.clone();
            self.preserve_for_backup(b, &old_pairs, None);
            let t = Instant::now();
            for (i, (blk, pair)) in seg
                .chunks_exact_mut(BLOCK_SIZE)
                .zip(pairs.chunks_exact_mut(PAIR_SIZE))
                .enumerate()
            {
                let j = done + i;
                let (epoch, counter) = counters[j];
                let mut nonce = [0u8; NONCE_LEN];
                if self.encrypted() {
                    nonce[0..4].copy_from_slice(&counter.to_le_bytes());
                    nonce[4..12].copy_from_slice(&random[j * 8..j * 8 + 8]);
                }
                let keys = cache.get(self, version, epoch)?;
                if let Some(k) = &keys {
                    BlockCipher::new(k.data_cipher()).apply(&nonce, blk);
                }
                let (target, generation) = targets[i];
                let block = b + i as u64;
                let mut slot = Slot {
                    nonce,
                    key_version: version,
                    epoch,
                    generation,
                    kind: Kind::Data,
                    check: 0,
                    tag: [0; format::TAG_LEN],
                }
                .seal(block, blk);
                if let (Integrity::Gmac, Some(k)) = (self.header.integrity, &keys) {
                    slot.tag =
                        k.block_tag(&nonce, &self.header.file_id, block, version, epoch, blk);
                }
                slot.encode(&mut pair[target * SLOT_SIZE..(target + 1) * SLOT_SIZE]);
            }
            st.crypto += t.elapsed();
            // Slots first, then data: a crash in between leaves the new slot
            // invalid and the old one still matching the old data.
            timed(&mut st.storage, || {
                self.io.write_all_at(&pairs, format::pair_offset(b))
            })
            .map_err(|source| self.io_err("write", source))?;
            let r = timed(&mut st.storage, || {
                self.io.write_all_at(seg, format::data_offset(b))
            });
            if let Err(source) = r {
                // A failed data write (e.g. ENOSPC allocating a block) may
                // have written some of the segment's blocks (page by page)
                // and not others. Keep the new slot where its block landed
                // and put the old pair back where it did not, so every block
                // reads old or new and no new slot is left stale.
                let settled = self.settle_after_failed_write(b, &pairs, &old_pairs, &targets);
                if let Err(e) = self.io.write_all_at(&settled, format::pair_offset(b)) {
                    tracing::warn!(export = %self.name, error = %e,
                        "cannot settle slots after a failed write; the next start scrubs them");
                    self.versions.mark_inexact();
                } else if self.versions.counted(b / GROUP_BLOCKS) {
                    // Blocks that kept their new pair changed version.
                    self.versions.apply(
                        settled
                            .chunks_exact(PAIR_SIZE)
                            .zip(pairs.chunks_exact(PAIR_SIZE))
                            .zip(&old_versions)
                            .map(|((s, new), old)| {
                                (*old, if s == new { Some(version) } else { *old })
                            }),
                    );
                }
                return Err(self.io_err("write", source));
            }
            if self.versions.counted(b / GROUP_BLOCKS) {
                self.versions
                    .apply(old_versions.iter().map(|old| (*old, Some(version))));
            }
            done += seg_n;
            b += seg_n as u64;
        }
        Ok(())
    }

    /// The pair table to leave after a failed data write: per block, the new
    /// pair when the stored data matches the new slot, else the old pair.
    /// When the data cannot be read back, the old pairs (the blocks that did
    /// land then match neither slot until rewritten; the state stays
    /// readable as zeros, never as other data).
    fn settle_after_failed_write(
        &self,
        b: u64,
        new_pairs: &[u8],
        old_pairs: &[u8],
        targets: &[(usize, u32)],
    ) -> Vec<u8> {
        let n = new_pairs.len() / PAIR_SIZE;
        let mut data = vec![0u8; n * BLOCK_SIZE];
        if self
            .io
            .read_full_at(&mut data, format::data_offset(b))
            .is_err()
        {
            return old_pairs.to_vec();
        }
        let mut out = old_pairs.to_vec();
        for (i, ((new, stored), out)) in new_pairs
            .chunks_exact(PAIR_SIZE)
            .zip(data.chunks_exact(BLOCK_SIZE))
            .zip(out.chunks_exact_mut(PAIR_SIZE))
            .enumerate()
        {
            let t = targets[i].0;
            let landed = matches!(
                Slot::decode(&new[t * SLOT_SIZE..(t + 1) * SLOT_SIZE]),
                Ok(Some(slot)) if slot.matches(b + i as u64, stored)
            );
            if landed {
                out.copy_from_slice(new);
            }
        }
        out
    }

    /// NBD_CMD_WRITE_ZEROES: the range reads as zeros afterwards. Whole blocks
    /// become zero slots over holes unless `no_hole`, partial blocks are
    /// read-modify-written.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<IoStats, StoreError> {
        self.zero_range(offset, len, ZeroMode::Zero { no_hole }, fua)
    }

    /// NBD_CMD_TRIM: whole blocks in the range are deallocated (and read as
    /// zeros); partial blocks are left alone, as the protocol allows.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<IoStats, StoreError> {
        self.zero_range(offset, len, ZeroMode::Trim, fua)
    }

    fn zero_range(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<IoStats, StoreError> {
        let _gate = self.request_gate();
        let mut st = IoStats::default();
        self.check_range(offset, len)?;
        let end = offset + len;
        let full_first = offset.div_ceil(BLOCK_SIZE_U64);
        let full_end = end / BLOCK_SIZE_U64; // exclusive
        if let ZeroMode::Zero { .. } = mode {
            // Partial head and tail blocks.
            let head_end = (full_first * BLOCK_SIZE_U64).min(end);
            if offset < head_end {
                let mut z = vec![0u8; (head_end - offset) as usize];
                add(&mut st, self.write_ungated(offset, &mut z, false)?);
            }
            let tail_start = (full_end * BLOCK_SIZE_U64).max(head_end);
            if tail_start < end {
                let mut z = vec![0u8; (end - tail_start) as usize];
                add(&mut st, self.write_ungated(tail_start, &mut z, false)?);
            }
        }
        let mut b = full_first;
        while b < full_end {
            let seg_end = full_end.min((b / GROUP_BLOCKS + 1) * GROUP_BLOCKS);
            let n = (seg_end - b) as usize;
            let _g = self.locks.lock(b, seg_end - 1);
            if let ZeroMode::Zero { no_hole: true } = mode {
                let mut z = vec![0u8; n * BLOCK_SIZE];
                self.write_blocks(b, &mut z, &mut st)?;
            } else {
                self.zero_slots(b, n, &mut st)?;
                // The zero slots are written first: whatever happens to the
                // data area afterwards, the blocks read as zeros.
                timed(&mut st.storage, || {
                    self.io
                        .punch_hole(format::data_offset(b), n as u64 * BLOCK_SIZE_U64)
                });
            }
            b = seg_end;
        }
        if fua {
            self.sync(&mut st)?;
        }
        Ok(st)
    }

    /// Writes a zero slot for every written block of a segment (never-written
    /// blocks already read as zeros and keep their empty pair).
    fn zero_slots(&self, b: u64, n: usize, st: &mut IoStats) -> Result<(), StoreError> {
        let mut pairs = vec![0u8; n * PAIR_SIZE];
        timed(&mut st.storage, || {
            self.io.read_full_at(&mut pairs, format::pair_offset(b))
        })
        .map_err(|source| self.io_err("read slots of", source))?;
        if pairs.iter().all(|&x| x == 0) {
            return Ok(());
        }
        let (targets, old_versions) = self.targets(b, &pairs, st)?;
        self.preserve_for_backup(b, &pairs, None);
        for (i, pair) in pairs.chunks_exact_mut(PAIR_SIZE).enumerate() {
            if pair.iter().all(|&x| x == 0) {
                continue;
            }
            let (target, generation) = targets[i];
            let slot = Slot::zero(b + i as u64, generation);
            slot.encode(&mut pair[target * SLOT_SIZE..(target + 1) * SLOT_SIZE]);
        }
        timed(&mut st.storage, || {
            self.io.write_all_at(&pairs, format::pair_offset(b))
        })
        .map_err(|source| self.io_err("write slots of", source))?;
        if self.versions.counted(b / GROUP_BLOCKS) {
            self.versions
                .apply(old_versions.iter().map(|old| (*old, None)));
        }
        Ok(())
    }

    /// NBD_CMD_FLUSH: everything written before is durable when this returns.
    pub fn flush(&self) -> Result<IoStats, StoreError> {
        let mut st = IoStats::default();
        self.sync(&mut st)?;
        Ok(st)
    }

    fn sync(&self, st: &mut IoStats) -> Result<(), StoreError> {
        timed(&mut st.storage, || self.io.sync_data())
            .map_err(|source| self.io_err("fdatasync", source))
    }

    /// Reports which whole-block ranges are unwritten (holes) for block
    /// status: returns (length, is_hole) runs covering `offset..offset+len`.
    /// A block whose newest slot is a zero slot is a hole too.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, StoreError> {
        self.check_range(offset, len)?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        if len == 0 {
            return Ok(runs);
        }
        let end = offset + len;
        let (first, last) = (offset / BLOCK_SIZE_U64, (end - 1) / BLOCK_SIZE_U64);
        let mut b = first;
        while b <= last {
            let seg_last = last.min((b / GROUP_BLOCKS + 1) * GROUP_BLOCKS - 1);
            let n = (seg_last - b + 1) as usize;
            let mut pairs = vec![0u8; n * PAIR_SIZE];
            self.io
                .read_full_at(&mut pairs, format::pair_offset(b))
                .map_err(|source| self.io_err("read slots of", source))?;
            for (i, p) in pairs.chunks_exact(PAIR_SIZE).enumerate() {
                let blk = b + i as u64;
                let lo = (blk * BLOCK_SIZE_U64).max(offset);
                let hi = ((blk + 1) * BLOCK_SIZE_U64).min(end);
                let (order, bad) = format::newest_first(&format::decode_pair(p));
                let hole = !bad
                    && match order[0] {
                        None => true,
                        Some((_, s)) => s.kind == Kind::Zero,
                    };
                match runs.last_mut() {
                    Some((l, h)) if *h == hole => *l += hi - lo,
                    _ => runs.push((hi - lo, hole)),
                }
            }
            b = seg_last + 1;
        }
        Ok(runs)
    }
}

/// Per block of a segment: the slot a write targets with its generation,
/// and the key version the block uses now.
type Targets = (Vec<(usize, u32)>, Vec<Option<u32>>);

/// The last keys looked up, so a segment derives (or locks the ring's cache)
/// once per (version, epoch) instead of once per block.
#[derive(Default)]
pub(super) struct KeyCache {
    last: Option<(u32, u32, Arc<FileKeys>)>,
}

impl KeyCache {
    /// The keys for (version, epoch), or `None` for an unencrypted export.
    pub(super) fn get(
        &mut self,
        e: &Export,
        version: u32,
        epoch: u32,
    ) -> Result<Option<Arc<FileKeys>>, StoreError> {
        // Key version 0 is plaintext: blocks written before `keys encrypt`.
        let Some(ring) = e.keys().filter(|_| version != 0) else {
            return Ok(None);
        };
        match &self.last {
            Some((v, ep, k)) if *v == version && *ep == epoch => Ok(Some(Arc::clone(k))),
            _ => {
                let k = ring.file_keys(&e.header.file_id, version, epoch)?;
                self.last = Some((version, epoch, Arc::clone(&k)));
                Ok(Some(k))
            }
        }
    }
}

fn add(st: &mut IoStats, o: IoStats) {
    st.crypto += o.crypto;
    st.storage += o.storage;
}
