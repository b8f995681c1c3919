//! Exact counts of an export's blocks by universe-key version: what key
//! retirement relies on ("no block uses version N") and what the metrics
//! show.
//!
//! A block *uses* version `v` when the slot that gives its content is a data
//! slot of version `v` ([`block_version`]). Holes, zero slots and blocks
//! whose first write did not land use no version. A block that matches
//! neither slot (can't tell) counts under its newest slot, the view a clean
//! block's write takes, so the census and the write path always agree.
//!
//! The counts are built by a *census* after opening (a background walk over
//! the groups, under each group's block locks) and kept exact afterwards by
//! every write: a write updates the counts of a block only when the census
//! has already passed its group (checked under the block lock), so each
//! block is counted exactly once. A failed write whose slots could not be
//! settled marks the counts inexact until the next start.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::export::Export;
use super::format::{self, Kind, Resolution, SlotRead, BLOCK_SIZE, GROUP_BLOCKS, PAIR_SIZE};
use super::slots::KeyCache;
use super::StoreError;

/// Per-version block counts of one export and the census cursor.
#[derive(Debug, Default)]
pub struct VersionCounts {
    by_version: Mutex<BTreeMap<u32, u64>>,
    /// Groups the census has counted; writes below it update the counts.
    census_done: AtomicU64,
    census_total: AtomicU64,
    /// False once a failed write left slots the counts cannot follow.
    exact: AtomicBool,
    /// The census stopped on an error.
    failed: AtomicBool,
}

/// What the counts say right now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CountsSnapshot {
    /// Blocks by key version (versions with no block are left out).
    pub by_version: BTreeMap<u32, u64>,
    /// True when the census finished and no write made the counts inexact.
    pub exact: bool,
    /// Groups counted so far, out of `census_total`.
    pub census_done: u64,
    /// Groups of the export.
    pub census_total: u64,
}

impl VersionCounts {
    pub(super) fn new(groups: u64) -> Self {
        let c = VersionCounts::default();
        c.census_total.store(groups, Ordering::Release);
        c.exact.store(true, Ordering::Release);
        c
    }

    /// Sets the number of groups to count (at open, and when the export
    /// grows before serving; new groups are holes).
    pub(super) fn set_total(&self, groups: u64) {
        let old = self.census_total.swap(groups, Ordering::AcqRel);
        if self.census_done.load(Ordering::Acquire) >= old && old > 0 {
            self.census_done.store(groups, Ordering::Release);
        }
    }

    /// True when group `g` has been counted (call under the group's block
    /// lock).
    pub(super) fn counted(&self, g: u64) -> bool {
        g < self.census_done.load(Ordering::Acquire)
    }

    /// Applies block transitions (old version → new version).
    pub(super) fn apply(&self, changes: impl IntoIterator<Item = (Option<u32>, Option<u32>)>) {
        let mut delta: Vec<(u32, i64)> = Vec::new();
        let mut add = |v: u32, d: i64| match delta.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += d,
            None => delta.push((v, d)),
        };
        for (old, new) in changes {
            if old == new {
                continue;
            }
            if let Some(v) = old {
                add(v, -1);
            }
            if let Some(v) = new {
                add(v, 1);
            }
        }
        if delta.iter().all(|(_, d)| *d == 0) {
            return;
        }
        let mut m = self.by_version.lock().unwrap_or_else(|p| p.into_inner());
        for (v, d) in delta {
            let n = m.entry(v).or_insert(0);
            match n.checked_add_signed(d) {
                Some(x) => *n = x,
                None => {
                    // Cannot happen while census and writes agree; never
                    // let a wrong count authorise a retirement.
                    tracing::error!(version = v, "key-version block count went negative");
                    self.exact.store(false, Ordering::Release);
                    *n = 0;
                }
            }
            if *n == 0 {
                m.remove(&v);
            }
        }
    }

    /// Marks the counts inexact (until the next start recounts).
    pub(super) fn mark_inexact(&self) {
        self.exact.store(false, Ordering::Release);
    }

    /// True when every group has been counted.
    pub fn census_finished(&self) -> bool {
        self.census_done.load(Ordering::Acquire) >= self.census_total.load(Ordering::Acquire)
    }

    /// The counts now.
    pub fn snapshot(&self) -> CountsSnapshot {
        let by_version = self
            .by_version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let census_done = self.census_done.load(Ordering::Acquire);
        let census_total = self.census_total.load(Ordering::Acquire);
        CountsSnapshot {
            by_version,
            exact: census_done >= census_total
                && self.exact.load(Ordering::Acquire)
                && !self.failed.load(Ordering::Acquire),
            census_done,
            census_total,
        }
    }

    /// Blocks using `version` (meaningful when the snapshot is exact).
    pub fn blocks_of(&self, version: u32) -> u64 {
        self.by_version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&version)
            .copied()
            .unwrap_or(0)
    }
}

/// The version the newest decodable slot of a pair names, when it is a data
/// slot: how a clean block is counted.
pub(super) fn pair_version(pair: &[u8]) -> Option<u32> {
    let (order, _) = format::newest_first(&format::decode_pair(pair));
    match order[0] {
        Some((_, s)) if s.kind == Kind::Data => Some(s.key_version),
        _ => None,
    }
}

/// The version block `pair` uses, given the read rule's resolution against
/// its data (suspect blocks).
pub(super) fn block_version(pair: &[u8], r: &Resolution) -> Option<u32> {
    match r {
        Resolution::Valid { slot, .. } if slot.kind == Kind::Data => Some(slot.key_version),
        Resolution::Valid { .. } | Resolution::Unwritten | Resolution::TornFirst => None,
        Resolution::CantTell => pair_version(pair),
    }
}

impl Export {
    /// Per-version block counts.
    pub fn versions(&self) -> &VersionCounts {
        &self.versions
    }

    /// The versions blocks `b..` use now, from their pairs (clean blocks)
    /// or resolved against `data` (suspect blocks; `data` is read when
    /// `None` and needed).
    pub(super) fn current_versions(
        &self,
        b: u64,
        pairs: &[u8],
        data: Option<&[u8]>,
    ) -> Result<Vec<Option<u32>>, StoreError> {
        let n = pairs.len() / PAIR_SIZE;
        if self.is_clean(b) {
            return Ok(pairs.chunks_exact(PAIR_SIZE).map(pair_version).collect());
        }
        let owned;
        let data = match data {
            Some(d) => d,
            None => {
                let mut d = vec![0u8; n * BLOCK_SIZE];
                self.io
                    .read_full_at(&mut d, format::data_offset(b))
                    .map_err(|source| self.io_err("read", source))?;
                owned = d;
                &owned
            }
        };
        let mut cache = KeyCache::default();
        let mut out = Vec::with_capacity(n);
        for (i, (p, d)) in pairs
            .chunks_exact(PAIR_SIZE)
            .zip(data.chunks_exact(BLOCK_SIZE))
            .enumerate()
        {
            let r = self.resolve_block(b + i as u64, p, d, &mut cache)?;
            out.push(block_version(p, &r));
        }
        Ok(out)
    }

    /// Counts group `g` (under its block locks) and moves the census past it.
    fn census_group(&self, g: u64) -> Result<(), StoreError> {
        let first = g * GROUP_BLOCKS;
        let nblocks = format::blocks_for(self.size());
        let last = (first + GROUP_BLOCKS).min(nblocks) - 1;
        let n = (last - first + 1) as usize;
        let _g = self.locks.lock(first, last);
        let mut pairs = vec![0u8; n * PAIR_SIZE];
        self.io
            .read_full_at(&mut pairs, format::pair_offset(first))
            .map_err(|source| self.io_err("read slots of", source))?;
        if !pairs.iter().all(|&x| x == 0) {
            let v = self.current_versions(first, &pairs, None)?;
            self.versions.apply(v.into_iter().map(|v| (None, v)));
        }
        self.versions.census_done.store(g + 1, Ordering::Release);
        Ok(())
    }

    /// Moves the census over the unallocated groups from `g` on, with every
    /// block lock held so no write can allocate one unseen. Returns the next
    /// group to count, or `None` when the census is finished.
    fn census_skip_holes(&self, g: u64, total: u64) -> Option<u64> {
        // An allocated group is counted under its own locks; only a skip
        // needs every lock.
        if self.next_allocated_group(g) == Some(g) {
            return Some(g);
        }
        let _all = self.locks.lock(0, u64::MAX / 2);
        let next = self.next_allocated_group(g).filter(|&n| n < total);
        let to = next.unwrap_or(total);
        if to > g {
            self.versions.census_done.store(to, Ordering::Release);
        }
        next
    }

    /// Runs the census to the end on this thread (offline commands).
    pub fn census_blocking(&self) -> Result<(), StoreError> {
        let total = self.versions.census_total.load(Ordering::Acquire);
        let mut g = self.versions.census_done.load(Ordering::Acquire);
        while g < total {
            match self.census_skip_holes(g, total) {
                None => break,
                Some(next) => {
                    self.census_group(next)?;
                    g = next + 1;
                }
            }
        }
        Ok(())
    }
}

/// Starts the background census of `export` (a thread holding a weak
/// reference; it stops when the export is dropped or closed).
pub(crate) fn spawn_census(export: &Arc<Export>) {
    let w = Arc::downgrade(export);
    let name = export.name().to_string();
    let r = std::thread::Builder::new()
        .name("ear-census".into())
        .spawn(move || run_census(w));
    if let Err(e) = r {
        tracing::error!(export = %name, error = %e,
            "cannot start the key-version census; block counts stay incomplete");
        export.versions.failed.store(true, Ordering::Release);
    }
}

fn run_census(w: Weak<Export>) {
    let t = std::time::Instant::now();
    loop {
        let Some(e) = w.upgrade() else { return };
        if e.stop_scrub.load(Ordering::Acquire) {
            return;
        }
        let total = e.versions.census_total.load(Ordering::Acquire);
        let g = e.versions.census_done.load(Ordering::Acquire);
        let next = if g < total {
            e.census_skip_holes(g, total)
        } else {
            None
        };
        let Some(next) = next else {
            tracing::info!(export = e.name(), counts = ?e.versions.snapshot().by_version,
                elapsed_ms = t.elapsed().as_millis() as u64, "key-version census finished");
            return;
        };
        if let Err(err) = e.census_group(next) {
            tracing::error!(export = e.name(), group = next, error = %err,
                "key-version census stopped; block counts stay incomplete until the next start");
            e.versions.failed.store(true, Ordering::Release);
            return;
        }
    }
}

/// True when a pair has a data slot of a version other than `active` that
/// may give the block's content: the newest slot of a clean block, either
/// slot of a suspect one. A cheap filter before the sweep takes a lock.
pub(super) fn may_need_sweep(pair: &[u8], clean: bool, active: u32) -> bool {
    if clean {
        return pair_version(pair).is_some_and(|v| v != active);
    }
    format::decode_pair(pair)
        .iter()
        .any(|s| matches!(s, SlotRead::Used(s) if s.kind == Kind::Data && s.key_version != active))
}
