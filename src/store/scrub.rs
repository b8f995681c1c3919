//! Block verification shared by the background scrub and `check`, and the
//! scrub itself.
//!
//! After an unclean shutdown (the header says `open`), a block may have a
//! newer slot whose data never landed. Reads handle that (they fall back to
//! the older slot), but a writer must not overwrite the valid slot, so until
//! the scrub has passed a block's group, writes resolve the block against its
//! data first. The scrub walks the groups in order under their block locks
//! and demotes every such newer slot, after which the group is clean again.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::export::Export;
use super::format::{
    self, Integrity, Kind, Resolution, SlotRead, BLOCK_SIZE, GROUP_BLOCKS, PAIR_SIZE,
};
use super::slots::KeyCache;
use super::StoreError;

/// What verification found for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockState {
    /// Never written (or a first write that did not land): reads as zeros.
    Hole,
    /// The newest slot is valid.
    Ok,
    /// The newer slot's write did not land but the older slot is valid (or
    /// it was the block's first write): the block reads as its content before
    /// that write. A torn write after a crash; damage in a file that was
    /// closed cleanly.
    TornOld,
    /// Neither slot matches the data (a write torn by power loss, or damage):
    /// reads as zeros (EIO with per-block integrity).
    CantTell,
    /// A slot's check matches the data but its authentication tag does not
    /// verify: the block was modified on disk.
    BadTag,
}

/// Result of verifying one group.
#[derive(Debug, Default, Clone)]
pub struct GroupReport {
    /// Blocks per state (indexed like [`BlockState`]'s variants).
    pub ok: u64,
    /// See [`BlockState::Hole`].
    pub holes: u64,
    /// Blocks in [`BlockState::TornOld`].
    pub torn_old: Vec<u64>,
    /// Blocks in [`BlockState::CantTell`].
    pub cant_tell: Vec<u64>,
    /// Blocks in [`BlockState::BadTag`].
    pub bad_tags: Vec<u64>,
}

impl Export {
    /// Classifies one block from its pair and stored data.
    pub(super) fn classify(
        &self,
        block: u64,
        pair: &[u8],
        stored: &[u8],
        cache: &mut KeyCache,
    ) -> Result<(BlockState, Resolution), StoreError> {
        let r = self.resolve_block(block, pair, stored, cache)?;
        let state = match r {
            Resolution::Unwritten => BlockState::Hole,
            Resolution::TornFirst => BlockState::TornOld,
            Resolution::Valid { newest: true, .. } => BlockState::Ok,
            Resolution::Valid { .. } | Resolution::CantTell => {
                // A newer slot (or, when nothing is valid, any slot) whose
                // check matches but whose tag fails was tampered with.
                let gmac = self.header().integrity == Integrity::Gmac;
                let skip = index_of(&r);
                let p = format::decode_pair(pair);
                let tampered = gmac
                    && (0..2).any(|i| {
                        Some(i) != skip
                            && matches!(p[i], SlotRead::Used(s)
                                if s.kind == Kind::Data && s.matches(block, stored))
                    });
                if tampered {
                    BlockState::BadTag
                } else if r == Resolution::CantTell {
                    BlockState::CantTell
                } else {
                    BlockState::TornOld
                }
            }
        };
        Ok((state, r))
    }

    /// Verifies group `g` under its block locks. With `demote`, rolls back
    /// every torn newer slot (the scrub and `check --repair` do; plain
    /// `check` does not write).
    pub(super) fn verify_group(
        &self,
        g: u64,
        demote: bool,
    ) -> Result<(GroupReport, Vec<u8>), StoreError> {
        let first = g * GROUP_BLOCKS;
        let nblocks = format::blocks_for(self.size());
        let last = (first + GROUP_BLOCKS).min(nblocks) - 1;
        let n = (last - first + 1) as usize;
        let _gate = self.request_gate();
        let _g = self.locks().lock(first, last);
        let mut pairs = vec![0u8; n * PAIR_SIZE];
        self.io()
            .read_full_at(&mut pairs, format::pair_offset(first))
            .map_err(|source| self.io_err("read slots of", source))?;
        let mut rep = GroupReport::default();
        if pairs.iter().all(|&x| x == 0) {
            rep.holes = n as u64;
            return Ok((rep, pairs));
        }
        let mut data = vec![0u8; n * BLOCK_SIZE];
        self.io()
            .read_full_at(&mut data, format::data_offset(first))
            .map_err(|source| self.io_err("read", source))?;
        let mut cache = KeyCache::default();
        let mut changed = false;
        let before = pairs.clone();
        for (i, (pair, blk)) in pairs
            .chunks_exact_mut(PAIR_SIZE)
            .zip(data.chunks_exact(BLOCK_SIZE))
            .enumerate()
        {
            let block = first + i as u64;
            let (state, r) = self.classify(block, pair, blk, &mut cache)?;
            match state {
                BlockState::Hole => rep.holes += 1,
                BlockState::Ok => rep.ok += 1,
                BlockState::TornOld => {
                    rep.torn_old.push(block);
                    match (demote, r) {
                        (true, Resolution::Valid { index, .. }) => {
                            changed |= format::demote(pair, index)
                        }
                        (true, Resolution::TornFirst) => {
                            format::clear_torn_first(pair);
                            changed = true;
                        }
                        _ => {}
                    }
                }
                BlockState::CantTell => rep.cant_tell.push(block),
                BlockState::BadTag => rep.bad_tags.push(block),
            }
        }
        if changed {
            // A rollback keeps each block's valid slot, but the slots change:
            // a running backup gets the blocks as they were first.
            self.preserve_for_backup(first, &before, Some(&data));
            self.io()
                .write_all_at(&pairs, format::pair_offset(first))
                .map_err(|source| self.io_err("write slots of", source))?;
        }
        Ok((rep, pairs))
    }

    /// The first group at or after `g` that has any allocated byte
    /// (`SEEK_DATA`), or `None` when the rest of the file is a hole.
    pub(super) fn next_allocated_group(&self, g: u64) -> Option<u64> {
        let from = format::pair_offset(g * GROUP_BLOCKS);
        match self.io().next_data(from) {
            Ok(Some(off)) => Some(((off - format::DATA_START) / format::GROUP_BYTES).max(g)),
            Ok(None) => None,
            // Not supported: visit every group.
            Err(_) => Some(g),
        }
    }
}

fn index_of(r: &Resolution) -> Option<usize> {
    match r {
        Resolution::Valid { index, .. } => Some(*index),
        _ => None,
    }
}

/// Starts the background scrub of `export` when its previous run did not
/// close cleanly. The thread holds only a weak reference and stops when the
/// export is closed or dropped.
pub(crate) fn spawn(export: &Arc<Export>) {
    if !export.scrubbing() {
        return;
    }
    let w = Arc::downgrade(export);
    let name = export.name().to_string();
    let r = std::thread::Builder::new()
        .name("ear-scrub".into())
        .spawn(move || run(w));
    if let Err(e) = r {
        tracing::error!(export = %name, error = %e,
            "cannot start the scrub thread; writes keep verifying blocks first");
    }
}

/// Scrubs until done, stopped, or an I/O error (then it stays suspect and
/// the next start scrubs again).
pub(crate) fn run(w: Weak<Export>) {
    let t = std::time::Instant::now();
    let mut g = 0u64;
    loop {
        let Some(e) = w.upgrade() else { return };
        if e.stop_scrub.load(Ordering::Acquire) {
            return;
        }
        let total = e.counters.scrub_groups_total.load(Ordering::Acquire);
        match e.next_allocated_group(g) {
            Some(next) if next < total => {
                if next > g {
                    e.counters.scrub_groups_done.store(next, Ordering::Release);
                    g = next;
                }
            }
            _ => {
                e.counters.scrub_groups_done.store(total, Ordering::Release);
                tracing::info!(
                    export = e.name(),
                    demoted = e.counters.scrub_demoted.load(Ordering::Relaxed),
                    unrecoverable = e.counters.unrecoverable_blocks.load(Ordering::Relaxed),
                    elapsed_ms = t.elapsed().as_millis() as u64,
                    "scrub finished"
                );
                return;
            }
        }
        match e.verify_group(g, true) {
            Ok((rep, _)) => {
                e.counters
                    .scrub_demoted
                    .fetch_add(rep.torn_old.len() as u64, Ordering::Relaxed);
                for b in rep.cant_tell.iter().chain(&rep.bad_tags) {
                    e.report_unrecoverable(*b);
                }
            }
            Err(err) => {
                tracing::error!(export = e.name(), group = g, error = %err,
                    "scrub stopped; the export stays marked open and writes keep verifying blocks first");
                return;
            }
        }
        g += 1;
        e.counters.scrub_groups_done.store(g, Ordering::Release);
    }
}
