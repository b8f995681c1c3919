//! One export: a backing file in the format of [`super::format`], with
//! positional block I/O, encryption, crash-atomic block updates (two slots
//! per block), read-modify-write, zero/trim slots, the clean/open state, the
//! key-epoch counter and the background scrub.
//!
//! All methods here block (pread/pwrite/fdatasync); the server calls them from
//! a blocking-task pool, never on the async runtime's workers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::backing::Backing;
use super::format::{
    self, Algorithm, Header, HeaderError, Integrity, Kind, Resolution, Slot, State, BLOCK_SIZE,
    BLOCK_SIZE_U64, GROUP_BLOCKS, HEADER_BODY, HEADER_MAC_AT, HEADER_SLOT, PAIR_SIZE, SLOT_SIZE,
};
use super::locks::StripeLocks;
use super::StoreError;
use crate::crypto::{fill_random, BlockCipher, FileKeys, KeyRing, NONCE_LEN};

/// Time a request spent in the cipher and in backing storage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoStats {
    /// AES-CTR encrypt/decrypt, block check and tag time.
    pub crypto: Duration,
    /// pread/pwrite/fdatasync/fallocate time.
    pub storage: Duration,
}

/// Counters of one export that the metrics layer reads (no secrets).
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Blocks found unrecoverable (neither slot matches the data: a write
    /// torn by power loss, or damage), each counted once per process.
    pub unrecoverable_blocks: AtomicU64,
    /// Key epoch new writes use (0 when unencrypted).
    pub epoch: AtomicU32,
    /// Block writes taken in the current epoch.
    pub writes_in_epoch: AtomicU64,
    /// Groups the scrub has passed (equals `scrub_groups_total` when done or
    /// not needed).
    pub scrub_groups_done: AtomicU64,
    /// Groups the scrub has to pass.
    pub scrub_groups_total: AtomicU64,
    /// Newer slots the scrub demoted (torn writes rolled back to old data).
    pub scrub_demoted: AtomicU64,
}

/// Options of an export that come from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// Per-block integrity for a file created now.
    pub integrity: Integrity,
    /// Block writes per key epoch (1..=2^32; 2^32 outside tests).
    pub epoch_writes: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            integrity: Integrity::Check,
            epoch_writes: format::MAX_EPOCH_WRITES,
        }
    }
}

/// The running epoch: the epoch new writes use and its next write counter.
#[derive(Debug)]
struct EpochState {
    epoch: u32,
    next: u64,
}

/// An open export.
pub struct Export {
    name: String,
    path: PathBuf,
    io: Backing,
    /// The header as opened (immutable parts: file id, modes, size).
    header: Header,
    /// The header as last written (sequence, state, epoch change).
    live: Mutex<Header>,
    keys: Option<Arc<KeyRing>>,
    locks: StripeLocks,
    epoch_writes: u64,
    epochs: Mutex<EpochState>,
    /// The previous run did not close cleanly: blocks in groups at or past
    /// the scrub cursor may have a newer slot that is not valid.
    suspect: bool,
    pub(super) counters: ExportCounters,
    /// Blocks already logged as unrecoverable (bounded).
    reported: Mutex<HashSet<u64>>,
    pub(super) stop_scrub: AtomicBool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("size", &self.header.size)
            .field("encrypted", &self.keys.is_some())
            .finish()
    }
}

/// A timer that adds elapsed time to one of the stats fields.
fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    *acc += t.elapsed();
    r
}

/// How a segment read treats a block whose newest slot is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadMode {
    /// Retry under the block lock (a write may be in progress).
    Retry,
    /// Already under the lock: the full read rule applies.
    Locked,
    /// Never block: page cache only, no locks; give up with `WouldBlock`.
    NoWait,
}

enum ZeroMode {
    Trim,
    Zero { no_hole: bool },
}

/// Most blocks remembered as already logged unrecoverable.
const REPORTED_MAX: usize = 4096;

impl Export {
    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// The header as opened (no secrets; the live epoch and state are in
    /// [`Export::counters`]).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when data is encrypted.
    pub fn encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// Counters for the metrics layer.
    pub fn counters(&self) -> &ExportCounters {
        &self.counters
    }

    /// True while the scrub after an unclean shutdown has not finished.
    pub fn scrubbing(&self) -> bool {
        self.suspect
            && self.counters.scrub_groups_done.load(Ordering::Acquire)
                < self.counters.scrub_groups_total.load(Ordering::Acquire)
    }

    pub(super) fn io(&self) -> &Backing {
        &self.io
    }

    pub(super) fn locks(&self) -> &StripeLocks {
        &self.locks
    }

    /// Number of groups the export spans.
    pub fn groups(&self) -> u64 {
        format::blocks_for(self.header.size).div_ceil(GROUP_BLOCKS)
    }

    // ---- creation / opening -------------------------------------------------

    fn mode_algorithm(keys: &Option<Arc<KeyRing>>) -> Algorithm {
        if keys.is_some() {
            Algorithm::Aes256Ctr
        } else {
            Algorithm::None
        }
    }

    /// The 4096 bytes of a header slot: body and MAC.
    pub(super) fn header_slot_bytes(
        header: &Header,
        keys: &Option<Arc<KeyRing>>,
    ) -> Result<Vec<u8>, StoreError> {
        let body = header.encode_body();
        let mut slot = vec![0u8; HEADER_SLOT as usize];
        slot[..HEADER_BODY].copy_from_slice(&body);
        let mac: [u8; 32] = match keys {
            Some(ring) => ring
                .file_keys(&header.file_id, header.header_key_version, 0)?
                .header_mac(&body),
            None => Sha256::digest(body).into(),
        };
        slot[HEADER_MAC_AT..HEADER_MAC_AT + 32].copy_from_slice(&mac);
        Ok(slot)
    }

    /// Creates a new backing file at `path` atomically (temp file, fsync,
    /// rename, fsync directory), then opens it.
    pub(crate) fn create(
        path: &Path,
        name: &str,
        size: u64,
        dir_id: [u8; 16],
        keys: Option<Arc<KeyRing>>,
        opts: ExportOptions,
    ) -> Result<Export, StoreError> {
        if opts.integrity == Integrity::Gmac && keys.is_none() {
            return Err(StoreError::Config(
                "per-block integrity needs encryption".into(),
            ));
        }
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| StoreError::Io { what, source }
        };
        let mut file_id = [0u8; 16];
        fill_random(&mut file_id)?;
        let header = Header {
            algorithm: Self::mode_algorithm(&keys),
            integrity: opts.integrity,
            header_key_version: keys.as_ref().map_or(0, |k| k.active_version()),
            file_id,
            size,
            sequence: 1,
            dir_id,
            name: name.to_string(),
            state: State::Clean,
            epoch: 0,
            epoch_writes: opts.epoch_writes,
        };
        let slot = Self::header_slot_bytes(&header, &keys)?;
        let tmp = path.with_extension("ear.tmp");
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create"))?
        };
        let file = Backing::new(file);
        file.write_all_at(&slot, 0)
            .map_err(io("write header A of"))?;
        file.write_all_at(&slot, HEADER_SLOT)
            .map_err(io("write header B of"))?;
        file.set_len(format::file_len_for(size))
            .map_err(io("size"))?;
        file.sync_all().map_err(io("fsync"))?;
        std::fs::rename(&tmp, path).map_err(io("rename into place"))?;
        sync_dir(path)?;
        Self::start(path, name, file, header, keys, opts)
    }

    /// Reads and authenticates both header slots of `file`, keeping those
    /// that verify. A slot that does not decode, does not authenticate or
    /// names a key version that is not loaded is discarded (with a warning
    /// by the caller); only two bad slots refuse the file.
    pub(super) fn read_headers(
        file: &Backing,
        path: &Path,
        keys: &Option<Arc<KeyRing>>,
    ) -> Result<(Header, Vec<String>), StoreError> {
        let mut slots = vec![0u8; 2 * HEADER_SLOT as usize];
        file.read_full_at(&mut slots, 0)
            .map_err(|source| StoreError::Io {
                what: format!("read header of {}", path.display()),
                source,
            })?;
        let bad = |why: String| StoreError::BadHeader {
            path: path.display().to_string(),
            why,
        };
        let mut valid: Vec<Header> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let mut mode_error: Option<String> = None;
        for (i, slot) in slots.chunks_exact(HEADER_SLOT as usize).enumerate() {
            let mut body = [0u8; HEADER_BODY];
            body.copy_from_slice(&slot[..HEADER_BODY]);
            let mac = &slot[HEADER_MAC_AT..HEADER_MAC_AT + 32];
            let h = match Header::decode_body(&body) {
                Err(HeaderError::V1) => {
                    return Err(StoreError::BadHeader {
                        path: path.display().to_string(),
                        why: HeaderError::V1.to_string(),
                    })
                }
                Err(e) => {
                    errors.push(format!("slot {i}: {e}"));
                    continue;
                }
                Ok(h) => h,
            };
            let ok = match (keys, h.algorithm) {
                (Some(ring), Algorithm::Aes256Ctr) => {
                    match ring.file_keys(&h.file_id, h.header_key_version, 0) {
                        Ok(k) => k.verify_header_mac(&body, mac),
                        Err(e) => {
                            errors.push(format!("slot {i}: {e}"));
                            continue;
                        }
                    }
                }
                (None, Algorithm::None) => Sha256::digest(body).as_slice() == mac,
                (Some(_), Algorithm::None) => {
                    mode_error = Some("the file is unencrypted but the data directory is encrypted; encryption can neither be added to existing data nor removed".into());
                    continue;
                }
                (None, _) => {
                    mode_error = Some("the file is encrypted but the server runs with encryption off; encryption can neither be added to existing data nor removed".into());
                    continue;
                }
            };
            if ok {
                valid.push(h);
            } else if keys.is_some() {
                errors.push(format!("slot {i}: header authentication failed (wrong universe key for this file, or the header was modified)"));
            } else {
                errors.push(format!(
                    "slot {i}: header checksum mismatch (the header was modified or damaged)"
                ));
            }
        }
        let Some(header) = valid.iter().max_by_key(|h| h.sequence).cloned() else {
            return Err(bad(mode_error.unwrap_or_else(|| errors.join("; "))));
        };
        if valid.len() == 2 && valid[0] != valid[1] {
            errors.push("slots differ (an interrupted header update)".into());
        }
        Ok((header, errors))
    }

    /// Opens an existing backing file, authenticating its header.
    pub(crate) fn open(
        path: &Path,
        expected_name: &str,
        dir_id: [u8; 16],
        keys: Option<Arc<KeyRing>>,
        opts: ExportOptions,
    ) -> Result<Export, StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| StoreError::Io {
                what: format!("open {}", path.display()),
                source,
            })?;
        let file = Backing::new(file);
        let (header, problems) = Self::read_headers(&file, path, &keys)?;
        if !problems.is_empty() {
            tracing::warn!(export = expected_name, problems = %problems.join("; "),
                "header slot discarded; both slots are rewritten from the newest valid one");
        }
        check_identity(path, &header, expected_name, dir_id)?;
        Self::start(path, expected_name, file, header, keys, opts)
    }

    /// Opens an existing backing file for the offline `check`: headers are
    /// read and authenticated but nothing is written, and every block counts
    /// as suspect. Returns the header problems found (discarded slots).
    pub(super) fn open_offline(
        path: &Path,
        expected_name: &str,
        dir_id: [u8; 16],
        keys: Option<Arc<KeyRing>>,
        writable: bool,
    ) -> Result<(Export, Vec<String>), StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| StoreError::Io {
                what: format!("open {}", path.display()),
                source,
            })?;
        let file = Backing::new(file);
        let (header, problems) = Self::read_headers(&file, path, &keys)?;
        check_identity(path, &header, expected_name, dir_id)?;
        let export = Export {
            name: expected_name.to_string(),
            path: path.to_path_buf(),
            io: file,
            header: header.clone(),
            live: Mutex::new(header.clone()),
            keys,
            locks: StripeLocks::default(),
            epoch_writes: header.epoch_writes,
            epochs: Mutex::new(EpochState {
                epoch: header.epoch,
                next: 0,
            }),
            suspect: true,
            counters: ExportCounters::default(),
            reported: Mutex::new(HashSet::new()),
            stop_scrub: AtomicBool::new(true),
        };
        export.check_len()?;
        Ok((export, problems))
    }

    /// Rewrites both header slots from the live header with `state`
    /// (`check --repair`).
    pub(super) fn rewrite_headers(&self, state: State) -> Result<(), StoreError> {
        self.update_header(|h| h.state = state)
    }

    /// Common tail of create and open: marks the file open under a freshly
    /// reserved epoch (both header slots, synced) before anything is served.
    fn start(
        path: &Path,
        name: &str,
        io: Backing,
        mut header: Header,
        keys: Option<Arc<KeyRing>>,
        opts: ExportOptions,
    ) -> Result<Export, StoreError> {
        let suspect = header.state == State::Open;
        let opened = header.clone();
        header.state = State::Open;
        header.sequence = header.sequence.wrapping_add(1);
        header.epoch_writes = opts.epoch_writes;
        if keys.is_some() {
            // Every run reserves a fresh epoch, so a crash never reuses a
            // (key, counter) range.
            header.epoch = header.epoch.checked_add(1).ok_or_else(|| {
                StoreError::Config(format!(
                    "export {name}: all 2^32 key epochs are used up; copy the data to a new export"
                ))
            })?;
        }
        let export = Export {
            name: name.to_string(),
            path: path.to_path_buf(),
            io,
            header: Header {
                state: opened.state,
                ..header.clone()
            },
            live: Mutex::new(header.clone()),
            keys,
            locks: StripeLocks::default(),
            epoch_writes: opts.epoch_writes,
            epochs: Mutex::new(EpochState {
                epoch: header.epoch,
                next: 0,
            }),
            suspect,
            counters: ExportCounters::default(),
            reported: Mutex::new(HashSet::new()),
            stop_scrub: AtomicBool::new(false),
        };
        export.check_len()?;
        export.write_headers(&header)?;
        export.counters.epoch.store(header.epoch, Ordering::Relaxed);
        let groups = export.groups();
        export
            .counters
            .scrub_groups_total
            .store(groups, Ordering::Relaxed);
        if !suspect {
            export
                .counters
                .scrub_groups_done
                .store(groups, Ordering::Release);
        } else {
            tracing::warn!(export = name,
                "the previous run did not close cleanly; a background scrub verifies written blocks");
        }
        Ok(export)
    }

    /// A backing file shorter than its header requires was truncated (the
    /// file is always extended before a header that grows it is written).
    fn check_len(&self) -> Result<(), StoreError> {
        let want = format::file_len_for(self.header.size);
        let have = self
            .io
            .len()
            .map_err(|source| self.io_err("stat", source))?;
        if have < want {
            return Err(StoreError::BadHeader {
                path: self.path.display().to_string(),
                why: format!(
                    "the file is {have} bytes but its header requires {want}: it was truncated"
                ),
            });
        }
        Ok(())
    }

    /// Writes both header slots, one at a time, synced in between: a crash
    /// leaves at least one valid slot.
    fn write_headers(&self, header: &Header) -> Result<(), StoreError> {
        let slot = Self::header_slot_bytes(header, &self.keys)?;
        for at in [0, HEADER_SLOT] {
            self.io
                .write_all_at(&slot, at)
                .map_err(|source| self.io_err("write header", source))?;
            self.io
                .sync_data()
                .map_err(|source| self.io_err("fsync", source))?;
        }
        Ok(())
    }

    /// Changes the live header under its lock and writes it.
    fn update_header(&self, f: impl FnOnce(&mut Header)) -> Result<(), StoreError> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = live.clone();
        f(&mut h);
        h.sequence = h.sequence.wrapping_add(1);
        self.write_headers(&h)?;
        *live = h;
        Ok(())
    }

    /// Grows the export to `new_size` (never shrinks).
    pub(crate) fn grow(&mut self, new_size: u64) -> Result<(), StoreError> {
        if new_size < self.header.size {
            return Err(StoreError::Shrink {
                export: self.name.clone(),
                have: self.header.size,
                want: new_size,
            });
        }
        if new_size == self.header.size {
            return Ok(());
        }
        // Extend first, then publish the new size: a crash in between leaves
        // a longer file under the old header, which is harmless.
        let want = format::file_len_for(new_size);
        self.io
            .set_len(want)
            .map_err(|source| self.io_err("resize", source))?;
        self.io
            .sync_all()
            .map_err(|source| self.io_err("fsync", source))?;
        self.update_header(|h| h.size = new_size)?;
        self.header.size = new_size;
        // New groups were never written: nothing there to scrub.
        let groups = self.groups();
        let total = self
            .counters
            .scrub_groups_total
            .swap(groups, Ordering::AcqRel);
        if self.counters.scrub_groups_done.load(Ordering::Acquire) >= total {
            self.counters
                .scrub_groups_done
                .store(groups, Ordering::Release);
        }
        Ok(())
    }

    /// Clean shutdown: everything durable, then `state = clean` (synced).
    /// While a scrub is unfinished the state stays open, so the next start
    /// scrubs again.
    pub fn close(&self) -> Result<(), StoreError> {
        self.stop_scrub.store(true, Ordering::Release);
        self.io
            .sync_data()
            .map_err(|source| self.io_err("fdatasync", source))?;
        if self.scrubbing() {
            tracing::info!(export = %self.name, "scrub unfinished: the export stays marked open");
            return Ok(());
        }
        self.update_header(|h| h.state = State::Clean)
    }

    fn read_err(&self, what: &str, source: std::io::Error) -> StoreError {
        if source.kind() == std::io::ErrorKind::WouldBlock {
            StoreError::WouldBlock
        } else {
            self.io_err(what, source)
        }
    }

    pub(super) fn io_err(&self, what: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            what: format!("{what} {}", self.path.display()),
            source,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size: self.header.size,
            }),
        }
    }

    /// True when block `b` is known clean: no unclean shutdown, or the scrub
    /// has passed its group.
    fn is_clean(&self, b: u64) -> bool {
        !self.suspect || b / GROUP_BLOCKS < self.counters.scrub_groups_done.load(Ordering::Acquire)
    }

    // ---- epochs and nonces -------------------------------------------------

    /// Takes `n` write counters: (epoch, counter) per block. Advances the
    /// epoch when the current one is used up, and reserves the next epoch
    /// in the header once half of the current one is used (reserve-ahead),
    /// so normally no writer waits for a header write.
    fn take_counters(&self, n: usize) -> Result<Vec<(u32, u32)>, StoreError> {
        let mut out = Vec::with_capacity(n);
        let mut reserve_next: Option<u32> = None;
        {
            let mut g = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
            while out.len() < n {
                if g.next >= self.epoch_writes {
                    let next = g.epoch.checked_add(1).ok_or_else(|| {
                        StoreError::Config(format!(
                            "export {}: all 2^32 key epochs are used up; copy the data to a new export",
                            self.name
                        ))
                    })?;
                    self.ensure_reserved(next)?;
                    g.epoch = next;
                    g.next = 0;
                    self.counters.epoch.store(next, Ordering::Relaxed);
                    tracing::info!(export = %self.name, epoch = next, "key epoch advanced");
                }
                let half = self.epoch_writes / 2;
                let take = ((n - out.len()) as u64).min(self.epoch_writes - g.next);
                if g.next <= half && g.next + take > half {
                    reserve_next = Some(g.epoch.saturating_add(1));
                }
                for c in g.next..g.next + take {
                    // c < epoch_writes <= 2^32: fits the nonce's 32 bits.
                    out.push((g.epoch, c as u32));
                }
                g.next += take;
            }
            self.counters
                .writes_in_epoch
                .store(g.next, Ordering::Relaxed);
        }
        if let Some(e) = reserve_next {
            self.ensure_reserved(e)?;
        }
        Ok(out)
    }

    /// Makes sure the header records `epoch` as reserved.
    fn ensure_reserved(&self, epoch: u32) -> Result<(), StoreError> {
        let reserved = self.live.lock().unwrap_or_else(|p| p.into_inner()).epoch;
        if reserved >= epoch {
            return Ok(());
        }
        self.update_header(|h| h.epoch = h.epoch.max(epoch))
    }

    // ---- reads --------------------------------------------------------------

    /// Reads `out.len()` plaintext bytes at `offset`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<IoStats, StoreError> {
        self.read_impl(offset, out, false)
    }

    /// Like [`Export::read`], but never blocks: slots and data are read
    /// with `preadv2(RWF_NOWAIT)`, so the call returns
    /// [`StoreError::WouldBlock`] instead of waiting for the disk when they are
    /// not all in the page cache, and instead of waiting for a block lock
    /// when a write to the same blocks is in progress. The server uses it to
    /// serve small cached reads on its async workers and sends the rest to the
    /// blocking pool.
    pub fn try_read_cached(&self, offset: u64, out: &mut [u8]) -> Result<IoStats, StoreError> {
        self.read_impl(offset, out, true)
    }

    fn read_impl(&self, offset: u64, out: &mut [u8], nowait: bool) -> Result<IoStats, StoreError> {
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
            let mode = if nowait {
                ReadMode::NoWait
            } else {
                ReadMode::Retry
            };
            if lo == seg_start && hi == seg_end {
                self.read_segment(b, seg_last, out_part, mode, &mut st)?;
            } else {
                let mut scratch = vec![0u8; (seg_end - seg_start) as usize];
                self.read_segment(b, seg_last, &mut scratch, mode, &mut st)?;
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
        let nowait = mode == ReadMode::NoWait;
        timed(&mut st.storage, || {
            self.io
                .read_at(&mut pairs, format::pair_offset(first), nowait)
        })
        .map_err(|source| self.read_err("read slots of", source))?;
        if pairs.iter().all(|&x| x == 0) {
            buf.fill(0);
            return Ok(());
        }
        timed(&mut st.storage, || {
            self.io.read_at(buf, format::data_offset(first), nowait)
        })
        .map_err(|source| self.read_err("read", source))?;
        let t = Instant::now();
        let checked = self.check_and_decrypt(first, &pairs, buf, mode);
        st.crypto += t.elapsed();
        match (checked?, mode) {
            (None, _) => Ok(()),
            (Some(_), ReadMode::NoWait) => Err(StoreError::WouldBlock),
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
    fn decrypt(
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
    fn targets(
        &self,
        b: u64,
        pairs: &[u8],
        kind: Kind,
        st: &mut IoStats,
    ) -> Result<Vec<(usize, u32)>, StoreError> {
        let n = pairs.len() / PAIR_SIZE;
        // A zero slot is valid whatever the data, so it needs no resolution.
        if kind == Kind::Zero || self.is_clean(b) {
            return Ok(pairs
                .chunks_exact(PAIR_SIZE)
                .map(|p| format::write_target(p, None))
                .collect());
        }
        let mut data = vec![0u8; n * BLOCK_SIZE];
        timed(&mut st.storage, || {
            self.io.read_full_at(&mut data, format::data_offset(b))
        })
        .map_err(|source| self.io_err("read", source))?;
        let mut cache = KeyCache::default();
        let mut out = Vec::with_capacity(n);
        for (i, (p, d)) in pairs
            .chunks_exact(PAIR_SIZE)
            .zip(data.chunks_exact(BLOCK_SIZE))
            .enumerate()
        {
            let valid = match self.resolve_block(b + i as u64, p, d, &mut cache)? {
                Resolution::Valid { index, .. } => Some(index),
                _ => None,
            };
            out.push(format::write_target(p, Some(valid)));
        }
        Ok(out)
    }

    /// Encrypts and writes whole blocks starting at `first`. Caller holds the
    /// range lock. Per segment: the new slots go into the slots that do not
    /// describe the current data, the pair table is written, then the data.
    fn write_blocks(&self, first: u64, buf: &mut [u8], st: &mut IoStats) -> Result<(), StoreError> {
        let n = buf.len() / BLOCK_SIZE;
        let (version, counters, random) = match &self.keys {
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
            let targets = self.targets(b, &pairs, Kind::Data, st)?;
            let old_pairs = pairs.clone();
            let t = Instant::now();
            for (i, (blk, pair)) in seg
                .chunks_exact_mut(BLOCK_SIZE)
                .zip(pairs.chunks_exact_mut(PAIR_SIZE))
                .enumerate()
            {
                let j = done + i;
                let (epoch, counter) = counters[j];
                let mut nonce = [0u8; NONCE_LEN];
                if self.keys.is_some() {
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
                // A failed data write (e.g. ENOSPC allocating the block) must
                // not leave new slots behind: put the old pair table back.
                if let Err(e) = self.io.write_all_at(&old_pairs, format::pair_offset(b)) {
                    tracing::warn!(export = %self.name, error = %e,
                        "cannot restore slots after a failed write; the blocks read as before it");
                }
                return Err(self.io_err("write", source));
            }
            done += seg_n;
            b += seg_n as u64;
        }
        Ok(())
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
                add(&mut st, self.write(offset, &mut z, false)?);
            }
            let tail_start = (full_end * BLOCK_SIZE_U64).max(head_end);
            if tail_start < end {
                let mut z = vec![0u8; (end - tail_start) as usize];
                add(&mut st, self.write(tail_start, &mut z, false)?);
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
        let targets = self.targets(b, &pairs, Kind::Zero, st)?;
        for (i, pair) in pairs.chunks_exact_mut(PAIR_SIZE).enumerate() {
            if pair.iter().all(|&x| x == 0) {
                continue;
            }
            let (target, generation) = targets[i];
            let slot = Slot {
                nonce: [0; NONCE_LEN],
                key_version: 0,
                epoch: 0,
                generation,
                kind: Kind::Zero,
                check: 0,
                tag: [0; format::TAG_LEN],
            }
            .seal(b + i as u64, &[]);
            slot.encode(&mut pair[target * SLOT_SIZE..(target + 1) * SLOT_SIZE]);
        }
        timed(&mut st.storage, || {
            self.io.write_all_at(&pairs, format::pair_offset(b))
        })
        .map_err(|source| self.io_err("write slots of", source))
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
        let Some(ring) = &e.keys else {
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

/// Refuses a header that names another export or data directory.
pub(super) fn check_identity(
    path: &Path,
    header: &Header,
    expected_name: &str,
    dir_id: [u8; 16],
) -> Result<(), StoreError> {
    let bad = |why: String| StoreError::BadHeader {
        path: path.display().to_string(),
        why,
    };
    if header.name != expected_name {
        return Err(bad(format!(
            "the header names export {:?}, not {:?} (was the file renamed?)",
            header.name, expected_name
        )));
    }
    if header.dir_id != dir_id {
        return Err(bad(
            "the file belongs to another data directory (directory id mismatch)".into(),
        ));
    }
    Ok(())
}

/// fsyncs the directory containing `path` so a rename is durable.
pub(crate) fn sync_dir(path: &Path) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            what: format!("fsync directory {}", dir.display()),
            source,
        })
}

impl From<HeaderError> for StoreError {
    fn from(e: HeaderError) -> Self {
        StoreError::BadHeader {
            path: String::new(),
            why: e.to_string(),
        }
    }
}
