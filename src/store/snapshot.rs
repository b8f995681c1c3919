//! Point-in-time cuts of an export for backups, and the restore of a backup
//! into a fresh backing file.
//!
//! A cut is taken at one instant between requests: every block-lock stripe
//! is held for as long as it takes to install a "not yet copied" bitmap, so
//! no write is half-way through a block at that instant. From then on, any
//! change to a block's slots (write, trim, write-zeroes, a scrub rollback)
//! first preserves the block's valid (slot, ciphertext) as of the cut, if
//! the backup has not copied that block yet. Preserved ciphertext lives in
//! memory up to a bound and then in an unlinked temporary file beside the
//! backing file. The backup reads blocks in order under their locks (or
//! takes the preserved copy) and marks them copied, so each block is read
//! exactly once and always as of the cut. Nothing is decrypted: slots and
//! ciphertext leave exactly as stored.
//!
//! [`RestoreSink`] writes a backup's records into a new backing file with
//! the same file id (so the per-file keys derive the same), and reserves a
//! key epoch above every epoch it restored, so no nonce is reused.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::backing::Backing;
use super::export::Export;
use super::format::{
    self, Header, Integrity, Kind, Resolution, Slot, State, BLOCK_SIZE, GROUP_BLOCKS, PAIR_SIZE,
    SLOT_SIZE,
};
use super::readahead::ReadAhead;
use super::slots::KeyCache;
use super::StoreError;
use crate::backup::{self, BlockRecord, BlockSink, BlockSource, DynError, RestoreInfo, SlotIndex};
use crate::crypto::KeyRing;

/// Preserved ciphertext kept in memory before spilling to a file.
pub const DEFAULT_MEMORY_LIMIT: usize = 64 << 20;

/// The active cut of an export, if any (one backup per export at a time).
#[derive(Debug, Default)]
pub(crate) struct CutSlot {
    /// Fast check on the write path: false when no backup is running.
    active: std::sync::atomic::AtomicBool,
    state: Mutex<Option<Arc<CutState>>>,
}

impl CutSlot {
    fn get(&self) -> Option<Arc<CutState>> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.state).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state is only replaced whole; poisoning leaves nothing
    // half-updated that a later reader could misread.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a preserved block's ciphertext is.
#[derive(Debug)]
enum Stored {
    Memory(Vec<u8>),
    Spilled(u64),
}

/// A block as of the cut, saved before a change.
#[derive(Debug)]
struct Preserved {
    /// The valid slot at the cut; `None` when nothing valid was there (the
    /// block read as zeros).
    slot: Option<[u8; SLOT_SIZE]>,
    data: Option<Stored>,
}

#[derive(Debug)]
struct CutInner {
    /// One bit per block: set while the backup has not copied it.
    pending: Vec<u64>,
    preserved: BTreeMap<u64, Preserved>,
    memory: usize,
    memory_limit: usize,
    spill: Option<File>,
    spill_len: u64,
    spill_dir: PathBuf,
    /// A failure to preserve a block: the backup must fail, never carry a
    /// block written after the cut.
    failed: Option<String>,
    preserved_total: u64,
}

impl CutInner {
    fn is_pending(&self, b: u64) -> bool {
        self.pending
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    fn clear(&mut self, b: u64) {
        if let Some(w) = self.pending.get_mut((b / 64) as usize) {
            *w &= !(1u64 << (b % 64));
        }
    }

    fn store(&mut self, data: &[u8]) -> Result<Stored, String> {
        if self.memory + data.len() <= self.memory_limit {
            self.memory += data.len();
            return Ok(Stored::Memory(data.to_vec()));
        }
        if self.spill.is_none() {
            self.spill = Some(spill_file(&self.spill_dir)?);
        }
        let f = self.spill.as_ref().ok_or("no spill file")?;
        let at = self.spill_len;
        f.write_all_at(data, at)
            .map_err(|e| format!("write the backup spill file: {e}"))?;
        self.spill_len += data.len() as u64;
        Ok(Stored::Spilled(at))
    }

    fn load(&mut self, s: Stored) -> Result<Vec<u8>, String> {
        match s {
            Stored::Memory(v) => {
                self.memory -= v.len();
                Ok(v)
            }
            Stored::Spilled(at) => {
                let f = self.spill.as_ref().ok_or("spill file missing")?;
                let mut v = vec![0u8; BLOCK_SIZE];
                f.read_exact_at(&mut v, at)
                    .map_err(|e| format!("read the backup spill file: {e}"))?;
                Ok(v)
            }
        }
    }
}

/// An unlinked temporary file in `dir` (its space is freed when closed).
fn spill_file(dir: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut r = [0u8; 8];
    crate::crypto::fill_random(&mut r).map_err(|e| e.to_string())?;
    let path = dir.join(format!(".backup-spill-{}.tmp", hex::encode(r)));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("create the backup spill file {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    Ok(f)
}

/// The state of one cut, shared by the export's write path and the backup.
#[derive(Debug)]
pub(crate) struct CutState {
    blocks: u64,
    inner: Mutex<CutInner>,
}

/// Statistics of a cut (for logs, metrics and the backup report).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CutStats {
    /// How long I/O to the export was held for the cut.
    #[serde(serialize_with = "micros", rename = "pause_us")]
    pub pause: Duration,
    /// Blocks preserved because a change reached them before the backup did.
    pub preserved_blocks: u64,
    /// Bytes of preserved ciphertext spilled to disk (peak file size).
    pub spilled_bytes: u64,
}

fn micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The export metadata a backup carries so a restore can recreate the
/// backing file (no secrets: the file id is in every header in clear).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportMeta {
    /// Version of this record.
    pub meta_format: u32,
    /// Backing-file id (hex): per-file keys derive from it.
    pub file_id: String,
    /// `xxh3` or `gmac`.
    pub integrity: String,
    /// Universe-key version of the header MAC.
    pub header_key_version: u32,
    /// Highest key epoch reserved in the header at the cut.
    pub epoch: u32,
    /// Block writes per epoch.
    pub epoch_writes: u64,
}

impl ExportMeta {
    fn of(e: &Export) -> Self {
        let live = e.live_header();
        ExportMeta {
            meta_format: 1,
            file_id: hex::encode(e.header.file_id),
            integrity: match e.header.integrity {
                Integrity::Check => "xxh3".into(),
                Integrity::Gmac => "gmac".into(),
            },
            header_key_version: e.header.header_key_version,
            epoch: live.epoch,
            epoch_writes: live.epoch_writes,
        }
    }

    /// Parses the bytes a backup carries.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let m: ExportMeta = serde_json::from_slice(bytes)
            .map_err(|e| format!("export metadata of the backup does not parse: {e}"))?;
        if m.meta_format != 1 {
            return Err(format!(
                "export metadata format {} is not supported by this build; use a newer ear-sidecar",
                m.meta_format
            ));
        }
        Ok(m)
    }

    fn file_id(&self) -> Result<[u8; 16], String> {
        hex::decode(&self.file_id)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| "export metadata has a malformed file id".into())
    }
}

impl Export {
    /// Takes a cut: a [`BlockSource`] of this export as it is now, while
    /// serving continues. Fails if a backup of this export is already
    /// running, or for an unencrypted export.
    pub fn begin_cut(self: &Arc<Self>) -> Result<Snapshot, StoreError> {
        self.begin_cut_with(DEFAULT_MEMORY_LIMIT)
    }

    /// [`Export::begin_cut`] with a bound on preserved ciphertext in memory.
    pub fn begin_cut_with(self: &Arc<Self>, memory_limit: usize) -> Result<Snapshot, StoreError> {
        if !self.encrypted() {
            return Err(StoreError::Config(format!(
                "export {}: backups need encryption (there is no universe key to authenticate the manifest)",
                self.name
            )));
        }
        let blocks = format::blocks_for(self.header.size);
        let words = blocks.div_ceil(64) as usize;
        let mut pending = vec![u64::MAX; words];
        if let Some(last) = pending.last_mut() {
            let rem = blocks % 64;
            if rem != 0 {
                *last = (1u64 << rem) - 1;
            }
        }
        let state = Arc::new(CutState {
            blocks,
            inner: Mutex::new(CutInner {
                pending,
                preserved: BTreeMap::new(),
                memory: 0,
                memory_limit,
                spill: None,
                spill_len: 0,
                spill_dir: self.path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                failed: None,
                preserved_total: 0,
            }),
        });
        let t = Instant::now();
        let (time, meta) = {
            // The gate, exclusively: no write, trim, write-zeroes or scrub
            // step is in progress while the cut is installed, and none
            // starts until it is (reads go on).
            let _all = self.gate.write().unwrap_or_else(|p| p.into_inner());
            let mut slot = lock(&self.cut.state);
            if slot.is_some() {
                return Err(StoreError::Config(format!(
                    "export {}: a backup is already running; wait for it to finish",
                    self.name
                )));
            }
            *slot = Some(Arc::clone(&state));
            self.cut.active.store(true, Ordering::Release);
            (SystemTime::now(), ExportMeta::of(self))
        };
        let pause = t.elapsed();
        tracing::info!(export = %self.name, pause_us = pause.as_micros() as u64, "backup cut taken");
        Ok(Snapshot {
            export: Arc::clone(self),
            state,
            time,
            meta,
            next_group: 0,
            queue: std::collections::VecDeque::new(),
            stats: CutStats {
                pause,
                ..CutStats::default()
            },
            ended: false,
            ahead: None,
        })
    }

    /// The live header (epoch reserved, epoch size).
    fn live_header(&self) -> Header {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Before the slots of blocks `first..` change (the caller holds their
    /// locks and passes the pairs as they are on disk, and the stored data
    /// when it has it): preserves, for a running backup, every block that is
    /// in the cut and not yet copied.
    pub(super) fn preserve_for_backup(&self, first: u64, pairs: &[u8], data: Option<&[u8]>) {
        let Some(cut) = self.cut.get() else {
            return;
        };
        let n = pairs.len() / PAIR_SIZE;
        let mut inner = lock(&cut.inner);
        if inner.failed.is_some() {
            return;
        }
        let wanted: Vec<usize> = (0..n)
            .filter(|&i| {
                let b = first + i as u64;
                b < cut.blocks && inner.is_pending(b) && !inner.preserved.contains_key(&b)
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let mut own;
        let stored: &[u8] = match data {
            Some(d) => d,
            None if pairs.iter().all(|&x| x == 0) => &[],
            None => {
                own = vec![0u8; n * BLOCK_SIZE];
                if let Err(e) = self.io.read_full_at(&mut own, format::data_offset(first)) {
                    inner.failed = Some(format!("read a block to preserve it for the backup: {e}"));
                    return;
                }
                &own
            }
        };
        let mut cache = KeyCache::default();
        for i in wanted {
            let b = first + i as u64;
            let pair = &pairs[i * PAIR_SIZE..(i + 1) * PAIR_SIZE];
            let blk = stored
                .get(i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE)
                .unwrap_or(&[]);
            let r = match self.valid_slot(b, pair, blk, &mut cache) {
                Ok(r) => r,
                Err(e) => {
                    inner.failed = Some(format!("block {b}: {e}"));
                    return;
                }
            };
            let p = match r {
                None => Preserved {
                    slot: None,
                    data: None,
                },
                Some((slot, Kind::Zero)) => Preserved {
                    slot: Some(slot),
                    data: None,
                },
                Some((slot, Kind::Data)) => match inner.store(blk) {
                    Ok(s) => Preserved {
                        slot: Some(slot),
                        data: Some(s),
                    },
                    Err(e) => {
                        inner.failed = Some(e);
                        return;
                    }
                },
            };
            inner.preserved.insert(b, p);
            inner.preserved_total += 1;
        }
    }

    /// The raw bytes and kind of block `b`'s valid slot, or `None` when the
    /// block reads as zeros without one (never written, a first write torn,
    /// or nothing matches).
    fn valid_slot(
        &self,
        b: u64,
        pair: &[u8],
        stored: &[u8],
        cache: &mut KeyCache,
    ) -> Result<Option<([u8; SLOT_SIZE], Kind)>, StoreError> {
        if pair.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let stored = if stored.len() == BLOCK_SIZE {
            stored
        } else {
            &[0u8; BLOCK_SIZE][..]
        };
        match self.resolve_block(b, pair, stored, cache)? {
            Resolution::Valid { index, slot, .. } => {
                let mut raw = [0u8; SLOT_SIZE];
                raw.copy_from_slice(&pair[index * SLOT_SIZE..(index + 1) * SLOT_SIZE]);
                Ok(Some((raw, slot.kind)))
            }
            _ => Ok(None),
        }
    }

    fn end_cut(&self, state: &Arc<CutState>) {
        let mut slot = lock(&self.cut.state);
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, state)) {
            *slot = None;
            self.cut.active.store(false, Ordering::Release);
        }
    }
}

/// Opens export `name` of `data_dir` read-only for an offline backup (the
/// caller holds the directory lock; nothing is written to the file).
pub fn open_for_backup(
    data_dir: &Path,
    name: &str,
    dir_id: [u8; 16],
    keys: Arc<KeyRing>,
) -> Result<Arc<Export>, StoreError> {
    let path = super::exports_dir(data_dir).join(format!("{name}{}", super::SUFFIX));
    let (e, problems) = Export::open_offline(&path, name, dir_id, Some(keys), false)?;
    if !problems.is_empty() {
        tracing::warn!(export = name, problems = %problems.join("; "), "header slot discarded");
    }
    Ok(Arc::new(e))
}

/// One export at a cut, read in block order (see the module docs).
/// Dropping it ends the cut.
#[derive(Debug)]
pub struct Snapshot {
    export: Arc<Export>,
    state: Arc<CutState>,
    time: SystemTime,
    meta: ExportMeta,
    next_group: u64,
    queue: std::collections::VecDeque<BlockRecord>,
    stats: CutStats,
    ended: bool,
    /// Groups read ahead, for a full backup (see [`super::readahead`]).
    ahead: Option<ReadAhead>,
}

impl Snapshot {
    /// Statistics so far (pause, preserved blocks).
    pub fn stats(&self) -> CutStats {
        let inner = lock(&self.state.inner);
        CutStats {
            preserved_blocks: inner.preserved_total,
            spilled_bytes: inner.spill_len.max(self.stats.spilled_bytes),
            ..self.stats
        }
    }

    /// A handle to read the statistics after the snapshot moved into the
    /// backup engine.
    pub fn stats_handle(&self) -> CutStatsHandle {
        CutStatsHandle {
            state: Arc::clone(&self.state),
            pause: self.stats.pause,
        }
    }

    /// The export.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// A full backup reads every group: starts reading them ahead; with
    /// direct I/O where the filesystem has it and the export is not served
    /// (opened read-only for an offline backup; see [`super::readahead`]).
    /// Without threads, groups are read one by one as before.
    fn start_read_ahead(&mut self) {
        let offline = self.export.io.is_read_only();
        let direct = match offline.then(|| Backing::open_direct(&self.export.path)) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(err)) => {
                tracing::debug!(export = %self.export.name, %err, "no direct I/O for the backup; reading through the page cache");
                None
            }
        };
        let e = Arc::clone(&self.export);
        let buffered = Arc::new(move |buf: &mut [u8], off: u64| e.io.read_full_at(buf, off));
        match ReadAhead::start(direct, buffered, self.state.blocks) {
            Ok(a) => self.ahead = Some(a),
            Err(err) => {
                tracing::warn!(export = %self.export.name, %err, "backup read-ahead threads did not start; reading groups one by one");
            }
        }
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.export.end_cut(&self.state);
        }
    }

    /// Reads group `g` under its locks into the queue: the records whose
    /// slot differs from `base`, and marks the group's blocks copied.
    fn read_group(&mut self, g: u64, base: &SlotIndex) -> Result<(), StoreError> {
        let e = Arc::clone(&self.export);
        let first = g * GROUP_BLOCKS;
        let last = (first + GROUP_BLOCKS).min(self.state.blocks) - 1;
        let n = (last - first + 1) as usize;
        // Waits for the group read ahead, if any, before taking its locks.
        let ahead = match self.ahead.as_mut() {
            Some(a) => Some(a.take(g).map_err(|source| e.io_err("read ahead", source))?),
            None => None,
        };
        // What each block is at the cut.
        let mut found: Vec<(u64, AtCut)> = Vec::with_capacity(n);
        {
            let _g = e.locks.lock(first, last);
            let mut inner = lock(&self.state.inner);
            if let Some(f) = inner.failed.take() {
                return Err(StoreError::Config(format!(
                    "export {}: the backup could not preserve a block changed after the cut ({f}); the backup is abandoned, retry it",
                    e.name
                )));
            }
            let pairs = match &ahead {
                Some(a) => a.pairs.clone(),
                None => {
                    let mut pairs = vec![0u8; n * PAIR_SIZE];
                    e.io.read_full_at(&mut pairs, format::pair_offset(first))
                        .map_err(|source| e.io_err("read slots of", source))?;
                    Bytes::from(pairs)
                }
            };
            // Blocks nothing changed since the cut (still pending, not
            // preserved) are read from disk, unless their newest slot is the
            // one the parent recorded: every write makes a new slot, so the
            // block is unchanged and its data need not be read.
            let mut disk: Vec<usize> = Vec::new();
            for i in 0..n {
                let b = first + i as u64;
                if let Some(p) = inner.preserved.remove(&b) {
                    let data = match p.data {
                        Some(s) => Some(Bytes::from(inner.load(s).map_err(StoreError::Config)?)),
                        None => None,
                    };
                    found.push((b, p.slot.map(|s| (s, data))));
                    continue;
                }
                if !inner.is_pending(b) {
                    return Err(StoreError::Config(format!(
                        "export {}: internal: block {b} read twice by one backup",
                        e.name
                    )));
                }
                let pair = &pairs[i * PAIR_SIZE..(i + 1) * PAIR_SIZE];
                if pair.iter().all(|&x| x == 0) {
                    found.push((b, None));
                } else if !newest_matches(b, pair, base) {
                    disk.push(i);
                }
            }
            if let (Some(&lo), Some(&hi)) = (disk.first(), disk.last()) {
                // The read-ahead span covers every block with a pair; read
                // here only without it. Records share the buffer (no copy
                // per block).
                let span = ahead.as_ref().and_then(|a| a.data.clone());
                let (at, data) = match span {
                    Some((at, d)) if at <= lo && (hi + 1 - at) * BLOCK_SIZE <= d.len() => (at, d),
                    _ => {
                        let mut data = vec![0u8; (hi - lo + 1) * BLOCK_SIZE];
                        e.io.read_full_at(&mut data, format::data_offset(first + lo as u64))
                            .map_err(|source| e.io_err("read", source))?;
                        (lo, Bytes::from(data))
                    }
                };
                let mut cache = KeyCache::default();
                for i in disk {
                    let b = first + i as u64;
                    let pair = &pairs[i * PAIR_SIZE..(i + 1) * PAIR_SIZE];
                    let blk = data.slice((i - at) * BLOCK_SIZE..(i - at + 1) * BLOCK_SIZE);
                    let rec = match e.valid_slot(b, pair, &blk, &mut cache)? {
                        None => None,
                        Some((s, Kind::Zero)) => Some((s, None)),
                        Some((s, Kind::Data)) => Some((s, Some(blk))),
                    };
                    found.push((b, rec));
                }
            }
            for i in 0..n {
                inner.clear(first + i as u64);
            }
        }
        found.sort_by_key(|(b, _)| *b);
        for (b, rec) in found {
            let record = match rec {
                Some((slot, data)) => BlockRecord::new(b, slot, data),
                // Nothing valid: reads as zeros. Only a block the parent
                // holds needs a record (a zero slot) to read as zeros.
                None if base.get(b).is_some() => {
                    let mut raw = [0u8; SLOT_SIZE];
                    Slot::zero(b, 0).encode(&mut raw);
                    BlockRecord::new(b, raw, None)
                }
                None => continue,
            }
            .map_err(|err| StoreError::Corrupt {
                export: e.name.clone(),
                block: b,
                why: format!("slot not fit for a backup: {err}"),
            })?;
            if !base.unchanged(b, record.slot()) {
                self.queue.push_back(record);
            }
        }
        Ok(())
    }
}

/// A block at the cut: `None` reads as zeros without a valid slot; else its
/// raw slot and, for data, the ciphertext.
type AtCut = Option<([u8; SLOT_SIZE], Option<Bytes>)>;

/// True when block `b`'s newest slot is the one `base` records.
fn newest_matches(b: u64, pair: &[u8], base: &SlotIndex) -> bool {
    let Some(fp) = base.get(b) else {
        return false;
    };
    let (order, _) = format::newest_first(&format::decode_pair(pair));
    let Some((idx, _)) = order[0] else {
        return false;
    };
    let mut raw = [0u8; SLOT_SIZE];
    raw.copy_from_slice(&pair[idx * SLOT_SIZE..(idx + 1) * SLOT_SIZE]);
    backup::Slot::new(b, raw).is_ok_and(|s| s.fingerprint() == fp)
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.end();
    }
}

/// Reads a cut's statistics from outside the backup engine.
#[derive(Debug, Clone)]
pub struct CutStatsHandle {
    state: Arc<CutState>,
    pause: Duration,
}

impl CutStatsHandle {
    /// Statistics so far.
    pub fn get(&self) -> CutStats {
        let inner = lock(&self.state.inner);
        CutStats {
            pause: self.pause,
            preserved_blocks: inner.preserved_total,
            spilled_bytes: inner.spill_len,
        }
    }
}

impl BlockSource for Snapshot {
    fn export_size(&self) -> u64 {
        self.state.blocks * BLOCK_SIZE as u64
    }

    fn cut_time(&self) -> SystemTime {
        self.time
    }

    fn export_meta(&self) -> Vec<u8> {
        serde_json::to_vec(&self.meta).unwrap_or_default()
    }

    fn next_changed(&mut self, base: &SlotIndex) -> Result<Option<BlockRecord>, DynError> {
        loop {
            if let Some(r) = self.queue.pop_front() {
                return Ok(Some(r));
            }
            let groups = self.state.blocks.div_ceil(GROUP_BLOCKS);
            if self.next_group >= groups {
                self.end();
                return Ok(None);
            }
            let g = self.next_group;
            if g == 0 && base.present() == 0 && groups > 1 {
                self.start_read_ahead();
            }
            self.next_group += 1;
            self.read_group(g, base)
                .map_err(|e| Box::new(e) as DynError)?;
        }
    }
}

/// Writes a restored export into `<data_dir>/exports/<name>.ear` (through a
/// temporary file renamed into place by [`BlockSink::finish`]).
#[derive(Debug)]
pub struct RestoreSink {
    data_dir: PathBuf,
    keys: Arc<KeyRing>,
    dir_id: [u8; 16],
    file: Option<File>,
    tmp: PathBuf,
    header: Option<Header>,
    max_epoch: u32,
    /// Pending contiguous run: first block, pairs and data.
    run_first: u64,
    run_pairs: Vec<u8>,
    run_data: Vec<u8>,
    blocks: u64,
    /// Bytes written since the flusher was last woken.
    unflushed: usize,
    flusher: Option<Flusher>,
}

/// Writes a restored file back while the restore goes on: a thread that
/// runs `fdatasync` whenever woken, so the disk writes overlap the reading
/// of the backup instead of all waiting for the final fsync (page-cache
/// writeback would otherwise start only at the dirty-memory threshold).
#[derive(Debug)]
struct Flusher {
    wake: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

/// Written bytes after which the flusher is woken.
const FLUSH_EVERY: usize = 64 << 20;

impl Flusher {
    fn start(f: &File) -> std::io::Result<Self> {
        let f = f.try_clone()?;
        let (wake, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("ear-restore-flush".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    f.sync_data()?;
                }
                Ok(())
            })?;
        Ok(Self { wake, thread })
    }

    /// Asks for a write-back; a pending request already covers this one.
    fn kick(&self) {
        let _ = self.wake.try_send(());
    }

    /// Stops the thread and returns its first error.
    fn stop(self) -> std::io::Result<()> {
        drop(self.wake);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("restore flusher panicked")))
    }
}

impl RestoreSink {
    /// A sink writing into `data_dir` (which must not hold the export yet),
    /// with the universe keys of the backup's registry and the directory id
    /// of that registry.
    pub fn new(data_dir: &Path, dir_id: [u8; 16], keys: Arc<KeyRing>) -> Self {
        RestoreSink {
            data_dir: data_dir.to_path_buf(),
            keys,
            dir_id,
            file: None,
            tmp: PathBuf::new(),
            header: None,
            max_epoch: 0,
            run_first: 0,
            run_pairs: Vec::new(),
            run_data: Vec::new(),
            blocks: 0,
            unflushed: 0,
            flusher: None,
        }
    }

    fn flush_run(&mut self) -> Result<(), DynError> {
        if self.run_pairs.is_empty() {
            return Ok(());
        }
        let f = self.file.as_ref().ok_or("write before begin")?;
        let first = self.run_first;
        // A run never crosses a group: its pairs and data are contiguous.
        f.write_all_at(&self.run_pairs, format::pair_offset(first))?;
        self.unflushed += self.run_pairs.len();
        if self.run_data.iter().any(|&x| x != 0) {
            f.write_all_at(&self.run_data, format::data_offset(first))?;
            self.unflushed += self.run_data.len();
        }
        if self.unflushed >= FLUSH_EVERY {
            self.unflushed = 0;
            if let Some(fl) = &self.flusher {
                fl.kick();
            }
        }
        self.run_pairs.clear();
        self.run_data.clear();
        Ok(())
    }
}

impl BlockSink for RestoreSink {
    fn begin(&mut self, info: &RestoreInfo) -> Result<(), DynError> {
        let meta = ExportMeta::parse(&info.export_meta)?;
        let name = super::ExportName::parse(&info.export)
            .map_err(|e| format!("the backup names export {:?}: {e}", info.export))?;
        let integrity = match meta.integrity.as_str() {
            "xxh3" => Integrity::Check,
            "gmac" => Integrity::Gmac,
            other => return Err(format!("unknown integrity mode {other:?} in the backup").into()),
        };
        let header = Header {
            algorithm: format::Algorithm::Aes256Ctr,
            integrity,
            header_key_version: meta.header_key_version,
            file_id: meta.file_id()?,
            size: info.export_size,
            sequence: 1,
            dir_id: self.dir_id,
            name: name.as_str().to_string(),
            state: State::Clean,
            epoch: meta.epoch,
            epoch_writes: meta.epoch_writes.clamp(1, format::MAX_EPOCH_WRITES),
        };
        let dir = super::exports_dir(&self.data_dir);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        let path = dir.join(format!("{}{}", name.as_str(), super::SUFFIX));
        if path.exists() {
            return Err(format!(
                "{} exists: restore into a new, empty data directory",
                path.display()
            )
            .into());
        }
        self.tmp = path.with_extension("ear.restore-tmp");
        let f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&self.tmp)
                .map_err(|e| format!("create {}: {e}", self.tmp.display()))?
        };
        f.set_len(format::file_len_for(info.export_size))
            .map_err(|e| format!("size {}: {e}", self.tmp.display()))?;
        self.flusher = Some(
            Flusher::start(&f)
                .map_err(|e| format!("start writing back {}: {e}", self.tmp.display()))?,
        );
        self.file = Some(f);
        self.max_epoch = meta.epoch;
        self.header = Some(header);
        Ok(())
    }

    fn write(&mut self, record: &BlockRecord) -> Result<(), DynError> {
        let header = self.header.as_ref().ok_or("write before begin")?;
        let b = record.index();
        if b >= format::blocks_for(header.size) {
            return Err(format!("block {b} lies beyond the export").into());
        }
        let raw = record.slot().bytes();
        let slot = Slot::decode(raw)
            .map_err(|e| format!("block {b}: {e}"))?
            .ok_or_else(|| format!("block {b}: empty slot in the backup"))?;
        let zero = [0u8; BLOCK_SIZE];
        let data: &[u8] = match (slot.kind, record.data()) {
            (Kind::Data, Some(d)) => d,
            (Kind::Zero, None) => &zero,
            _ => return Err(format!("block {b}: slot kind and ciphertext disagree").into()),
        };
        if !slot.matches(b, if slot.kind == Kind::Data { data } else { &[] }) {
            return Err(format!(
                "block {b}: the slot's check does not match its ciphertext (damaged backup)"
            )
            .into());
        }
        if slot.kind == Kind::Data && slot.key_version != 0 {
            self.max_epoch = self.max_epoch.max(slot.epoch);
        }
        let contiguous = !self.run_pairs.is_empty()
            && self.run_first + (self.run_pairs.len() / PAIR_SIZE) as u64 == b
            && !b.is_multiple_of(GROUP_BLOCKS);
        if !contiguous {
            self.flush_run()?;
            self.run_first = b;
        }
        let mut pair = [0u8; PAIR_SIZE];
        pair[..SLOT_SIZE].copy_from_slice(raw);
        self.run_pairs.extend_from_slice(&pair);
        if slot.kind == Kind::Data {
            self.run_data.extend_from_slice(data);
        } else {
            self.run_data.extend_from_slice(&zero);
        }
        self.blocks += 1;
        if self.run_pairs.len() >= (GROUP_BLOCKS as usize) * PAIR_SIZE {
            self.flush_run()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), DynError> {
        self.flush_run()?;
        if let Some(fl) = self.flusher.take() {
            fl.stop()
                .map_err(|e| format!("write back {}: {e}", self.tmp.display()))?;
        }
        let mut header = self.header.clone().ok_or("finish before begin")?;
        // Every epoch a restored slot used, and every epoch the source had
        // reserved, stays used: the next start reserves one above.
        header.epoch = self.max_epoch;
        let slot = Export::header_slot_bytes(&header, Some(&self.keys))?;
        let f = self.file.take().ok_or("finish before begin")?;
        f.write_all_at(&slot, 0)?;
        f.write_all_at(&slot, format::HEADER_SLOT)?;
        f.sync_all()?;
        drop(f);
        let path = self.tmp.with_extension("");
        let path = path.with_extension("ear");
        std::fs::rename(&self.tmp, &path)
            .map_err(|e| format!("rename {} into place: {e}", self.tmp.display()))?;
        crate::fsutil::sync_dir(&path)?;
        Ok(())
    }
}

/// A restore destination that writes nothing: it checks each block's slot
/// against its ciphertext, derives the block's keys through the key ring
/// (so the CMK must unwrap the backup's universe keys), verifies the block
/// tag in integrity mode and decrypts into a scratch buffer that is wiped.
/// What `backup verify --decrypt-check` runs.
#[derive(Debug)]
pub struct DecryptCheckSink {
    keys: Arc<KeyRing>,
    file_id: [u8; 16],
    gmac: bool,
    /// Data blocks decrypted.
    pub decrypted: u64,
    /// Zero slots seen.
    pub zero: u64,
}

impl DecryptCheckSink {
    /// A checker with the backup's universe keys.
    pub fn new(keys: Arc<KeyRing>) -> Self {
        DecryptCheckSink {
            keys,
            file_id: [0; 16],
            gmac: false,
            decrypted: 0,
            zero: 0,
        }
    }
}

impl BlockSink for DecryptCheckSink {
    fn begin(&mut self, info: &RestoreInfo) -> Result<(), DynError> {
        let meta = ExportMeta::parse(&info.export_meta)?;
        self.file_id = meta.file_id()?;
        self.gmac = meta.integrity == "gmac";
        Ok(())
    }

    fn write(&mut self, record: &BlockRecord) -> Result<(), DynError> {
        let b = record.index();
        let slot = Slot::decode(record.slot().bytes())
            .map_err(|e| format!("block {b}: {e}"))?
            .ok_or_else(|| format!("block {b}: empty slot in the backup"))?;
        let Some(data) = record.data() else {
            self.zero += 1;
            return Ok(());
        };
        if !slot.matches(b, data) {
            return Err(
                format!("block {b}: the slot's check does not match its ciphertext").into(),
            );
        }
        let keys = self
            .keys
            .file_keys(&self.file_id, slot.key_version, slot.epoch)
            .map_err(|e| format!("block {b}: {e}"))?;
        if self.gmac
            && !keys.verify_block_tag(
                &slot.tag,
                &slot.nonce,
                &self.file_id,
                b,
                slot.key_version,
                slot.epoch,
                data,
            )
        {
            return Err(format!("block {b}: authentication tag does not verify").into());
        }
        let mut scratch = zeroize::Zeroizing::new(data.to_vec());
        crate::crypto::BlockCipher::new(keys.data_cipher()).apply(&slot.nonce, &mut scratch);
        self.decrypted += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), DynError> {
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync
/// directory), refusing to replace an existing file.
pub fn write_new_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let io = |what: &str, source| StoreError::Io {
        what: format!("{what} {}", path.display()),
        source,
    };
    if path.exists() {
        return Err(StoreError::Config(format!(
            "{} exists: restore into a new, empty data directory",
            path.display()
        )));
    }
    let tmp = path.with_extension("restore-tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("create", e))?;
        f.write_all(bytes).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("fsync", e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io("rename into place", e))?;
    crate::fsutil::sync_dir(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{BackupOptions, BackupRequest, LocalTarget, ManifestKey, ManifestKeys};
    use crate::crypto::SecretKey;
    use crate::store::{ExportName, ExportSpec, Store};

    const DIR_ID: [u8; 16] = [0x22; 16];

    fn ring() -> Arc<KeyRing> {
        let mut raw = [7u8; 32];
        let mut m = BTreeMap::new();
        m.insert(1, SecretKey::take_from(&mut raw).unwrap());
        Arc::new(KeyRing::new(m, 1, 64).unwrap())
    }

    fn mkeys() -> ManifestKeys {
        let mut raw = [7u8; 32];
        ManifestKeys::new(ManifestKey::derive(
            1,
            &SecretKey::take_from(&mut raw).unwrap(),
        ))
    }

    fn open(dir: &Path, size: u64) -> Store {
        let spec = ExportSpec {
            name: ExportName::parse("t").unwrap(),
            size,
        };
        Store::open(dir, DIR_ID, Some(ring()), &[spec]).unwrap()
    }

    fn fill(b: u64, gen: u8) -> Vec<u8> {
        let mut v = vec![gen; BLOCK_SIZE];
        v[..8].copy_from_slice(&b.to_le_bytes());
        v
    }

    fn image(e: &Export) -> Vec<u8> {
        let mut out = vec![0u8; e.size() as usize];
        e.read(0, &mut out).unwrap();
        out
    }

    async fn take(
        target: &Arc<dyn crate::backup::BackupTarget>,
        snap: Snapshot,
        parent: Option<crate::backup::BackupId>,
    ) -> crate::backup::BackupId {
        let keys = mkeys();
        let req = BackupRequest {
            export: "t".into(),
            parent,
            key_registry: b"{}".to_vec(),
            keys: &keys,
            options: BackupOptions {
                window_blocks: 64,
                min_chunk_bytes: 1 << 16,
                parallel: 2,
                ..BackupOptions::default()
            },
        };
        let (m, _) = crate::backup::backup(Arc::clone(target), snap, req, &|_| {})
            .await
            .unwrap();
        m.backup_id
    }

    async fn restore_image(
        target: &Arc<dyn crate::backup::BackupTarget>,
        id: &crate::backup::BackupId,
    ) -> Vec<u8> {
        let d = tempfile::tempdir().unwrap();
        let sink = RestoreSink::new(d.path(), DIR_ID, ring());
        crate::backup::restore(Arc::clone(target), id, &mkeys(), sink, 2, &|_| {})
            .await
            .unwrap();
        let s = Store::open(d.path(), DIR_ID, Some(ring()), &[]).unwrap();
        let e = s.get("t").unwrap();
        // Restored epochs stay reserved: the first write uses a newer one.
        assert!(e.counters().epoch.load(Ordering::Relaxed) > 1);
        let img = image(e);
        // The restored export serves writes.
        e.write(0, &mut fill(0, 0xee), true).unwrap();
        img
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cut_is_point_in_time_under_writes_and_incremental_chains_restore() {
        let d = tempfile::tempdir().unwrap();
        let size = 600 * BLOCK_SIZE as u64; // three groups, the last partial
        let s = open(d.path(), size);
        let e = Arc::clone(s.get("t").unwrap());
        for b in (0..600).step_by(3) {
            e.write(b * 4096, &mut fill(b, 1), false).unwrap();
        }
        e.trim(30 * 4096, 4 * 4096, false).unwrap();
        let bdir = tempfile::tempdir().unwrap();
        let target: Arc<dyn crate::backup::BackupTarget> =
            Arc::new(LocalTarget::open(bdir.path().into()).await.unwrap());

        // Full backup: changes after the cut (some spilled: tiny memory bound)
        // do not show.
        let want1 = image(&e);
        let snap = e.begin_cut_with(3 * BLOCK_SIZE).unwrap();
        assert!(e.begin_cut().is_err(), "one backup per export at a time");
        for b in [0u64, 1, 299, 300, 599, 31] {
            e.write(b * 4096, &mut fill(b, 2), false).unwrap();
        }
        e.trim(3 * 4096, 4096, false).unwrap();
        e.write_zeroes(6 * 4096, 2 * 4096, false, false).unwrap();
        let h = snap.stats_handle();
        let id1 = take(&target, snap, None).await;
        assert!(h.get().preserved_blocks >= 8, "{:?}", h.get());
        assert!(h.get().spilled_bytes > 0, "{:?}", h.get());
        assert!(e.begin_cut().is_ok(), "the cut ended with the backup");

        // Incremental backup with writes racing the reader.
        let want2 = image(&e);
        let snap = e.begin_cut().unwrap();
        let e2 = Arc::clone(&e);
        let writer = std::thread::spawn(move || {
            for round in 0..3u8 {
                for b in (0..600).rev().step_by(7) {
                    e2.write(b * 4096, &mut fill(b, 10 + round), false).unwrap();
                }
            }
        });
        let id2 = take(&target, snap, Some(id1.clone())).await;
        writer.join().unwrap();

        assert_eq!(restore_image(&target, &id1).await, want1);
        assert_eq!(restore_image(&target, &id2).await, want2);
    }

    /// A full backup reads groups ahead, without their locks: writes racing
    /// it (before, during and after a group is read ahead) still do not
    /// show, because a preserved copy wins over what was read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_backup_read_ahead_stays_point_in_time_under_racing_writes() {
        let d = tempfile::tempdir().unwrap();
        let groups = 12u64;
        let blocks = groups * GROUP_BLOCKS + 17;
        let s = open(d.path(), blocks * BLOCK_SIZE as u64);
        let e = Arc::clone(s.get("t").unwrap());
        for b in (0..blocks).filter(|b| b % 5 != 0 && b / GROUP_BLOCKS != 4) {
            e.write(b * 4096, &mut fill(b, 1), false).unwrap();
        }
        let bdir = tempfile::tempdir().unwrap();
        let target: Arc<dyn crate::backup::BackupTarget> =
            Arc::new(LocalTarget::open(bdir.path().into()).await.unwrap());
        for round in 0..3u8 {
            let want = image(&e);
            let snap = e.begin_cut().unwrap();
            let e2 = Arc::clone(&e);
            let writer = std::thread::spawn(move || {
                // From both ends, so some groups change before they are read
                // ahead and some after.
                for pass in 0..4u64 {
                    for i in (0..blocks).step_by(11) {
                        let b = if pass % 2 == 0 { i } else { blocks - 1 - i };
                        e2.write(b * 4096, &mut fill(b, 20 + round), false).unwrap();
                    }
                    e2.trim((pass * 97 % blocks) * 4096, 4096, false).unwrap();
                }
            });
            let id = take(&target, snap, None).await;
            writer.join().unwrap();
            assert_eq!(restore_image(&target, &id).await, want, "round {round}");
        }
        // A served export reads ahead through the page cache; one opened
        // for an offline backup is read-only, so it reads directly.
        assert!(!e.io.is_read_only());
        let off = open_for_backup(d.path(), "t", DIR_ID, ring()).unwrap();
        assert!(off.io.is_read_only());
    }
}
