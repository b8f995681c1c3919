//! One export: a backing file in the format of [`super::format`]: creation,
//! opening, header slots, the clean/open state and the key-epoch counter.
//! Block I/O is in [`super::slots`], the scrub in [`super::scrub`].
//!
//! Overall, an export provides
//! positional block I/O, encryption, crash-atomic block updates (two slots
//! per block), read-modify-write, zero/trim slots, the clean/open state, the
//! key-epoch counter and the background scrub.
//!
//! All methods here block (pread/pwrite/fdatasync); the server calls them from
//! a blocking-task pool, never on the async runtime's workers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::backing::Backing;
use super::format::{
    self, Algorithm, Header, HeaderError, Integrity, State, GROUP_BLOCKS, HEADER_BODY,
    HEADER_MAC_AT, HEADER_SLOT,
};
use super::locks::StripeLocks;
use super::StoreError;
use crate::crypto::{fill_random, KeyRing};

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

impl ExportOptions {
    /// The defaults, with per-block authentication (`--integrity on`) or not.
    pub fn with_integrity(on: bool) -> Self {
        ExportOptions {
            integrity: if on {
                Integrity::Gmac
            } else {
                Integrity::Check
            },
            ..ExportOptions::default()
        }
    }
}

/// Opens a backing file for reading and, when `writable`, writing.
fn open_backing(path: &Path, writable: bool) -> Result<Backing, StoreError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map(Backing::new)
        .map_err(|source| StoreError::Io {
            what: format!("open {}", path.display()),
            source,
        })
}

/// The running epoch: the epoch new writes use and its next write counter.
#[derive(Debug)]
struct EpochState {
    epoch: u32,
    next: u64,
}

/// An open export.
pub struct Export {
    pub(super) name: String,
    pub(super) path: PathBuf,
    pub(super) io: Backing,
    /// The header as opened (immutable parts: file id, modes, size).
    pub(super) header: Header,
    /// The header as last written (sequence, state, epoch change).
    pub(super) live: Mutex<Header>,
    /// The universe keys: set at open for an encrypted export, or once by
    /// [`Export::enable_encryption`] on a plaintext one; never unset.
    keys: OnceLock<Arc<KeyRing>>,
    pub(super) locks: StripeLocks,
    pub(super) epoch_writes: u64,
    epochs: Mutex<EpochState>,
    /// The previous run did not close cleanly: blocks in groups at or past
    /// the scrub cursor may have a newer slot that is not valid.
    pub(super) suspect: bool,
    pub(super) counters: ExportCounters,
    /// Blocks already logged as unrecoverable (bounded).
    pub(super) reported: Mutex<HashSet<u64>>,
    pub(super) stop_scrub: AtomicBool,
    /// Blocks by key version (see [`super::versions`]).
    pub(super) versions: super::versions::VersionCounts,
    /// The cut of a running backup (blocks to preserve before a change).
    pub(super) cut: super::snapshot::CutSlot,
    /// Held shared by every request that changes slots (write, trim,
    /// write-zeroes, a scrub step) for its whole duration, and exclusively
    /// to take a backup cut: the cut falls between requests.
    pub(super) gate: std::sync::RwLock<()>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("size", &self.header.size)
            .field("encrypted", &self.encrypted())
            .finish()
    }
}

/// A timer that adds elapsed time to one of the stats fields.
pub(super) fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
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
}

pub(super) enum ZeroMode {
    Trim,
    Zero { no_hole: bool },
}

/// Most blocks remembered as already logged unrecoverable.
pub(super) const REPORTED_MAX: usize = 4096;

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
        self.keys.get().is_some()
    }

    /// The universe keys, once the export is encrypted.
    pub(super) fn keys(&self) -> Option<&Arc<KeyRing>> {
        self.keys.get()
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
    /// The header's algorithm decides its MAC: an encrypted header needs
    /// `keys`, a plaintext one is covered by SHA-256.
    pub(super) fn header_slot_bytes(
        header: &Header,
        keys: Option<&Arc<KeyRing>>,
    ) -> Result<Vec<u8>, StoreError> {
        let body = header.encode_body();
        let mut slot = vec![0u8; HEADER_SLOT as usize];
        slot[..HEADER_BODY].copy_from_slice(&body);
        let mac: [u8; 32] = match (header.algorithm, keys) {
            (Algorithm::None, _) => Sha256::digest(body).into(),
            (_, Some(ring)) => ring
                .file_keys(&header.file_id, header.header_key_version, 0)?
                .header_mac(&body),
            (_, None) => {
                return Err(StoreError::Config(
                    "an encrypted header needs the universe keys".into(),
                ))
            }
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
        let slot = Self::header_slot_bytes(&header, keys.as_ref())?;
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
        crate::fsutil::sync_dir(path)?;
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
                // A plaintext header under keys: a `keys encrypt` interrupted
                // between the registry and this header; `start` finishes it.
                (_, Algorithm::None) => Sha256::digest(body).as_slice() == mac,
                (None, _) => {
                    mode_error = Some("the file is encrypted but the server runs with encryption off; encryption cannot be removed (start with --encryption on --kms ...)".into());
                    continue;
                }
            };
            if ok {
                valid.push(h);
            } else if keys.is_some() && h.algorithm != Algorithm::None {
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

    /// Opens the backing file at `path` and reads its authenticated header
    /// (with the problems of a discarded slot).
    fn open_headers(
        path: &Path,
        keys: &Option<Arc<KeyRing>>,
        writable: bool,
    ) -> Result<(Backing, Header, Vec<String>), StoreError> {
        let file = open_backing(path, writable)?;
        let (header, problems) = Self::read_headers(&file, path, keys)?;
        Ok((file, header, problems))
    }

    /// Opens an existing backing file, authenticating its header.
    pub(crate) fn open(
        path: &Path,
        expected_name: &str,
        dir_id: [u8; 16],
        keys: Option<Arc<KeyRing>>,
        opts: ExportOptions,
    ) -> Result<Export, StoreError> {
        let (file, header, problems) = Self::open_headers(path, &keys, true)?;
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
        let (file, header, problems) = Self::open_headers(path, &keys, writable)?;
        check_identity(path, &header, expected_name, dir_id)?;
        let export = Export {
            name: expected_name.to_string(),
            path: path.to_path_buf(),
            io: file,
            header: header.clone(),
            live: Mutex::new(header.clone()),
            keys: keys.map(OnceLock::from).unwrap_or_default(),
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
            versions: super::versions::VersionCounts::new(0),
            cut: Default::default(),
            gate: Default::default(),
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
        if let (Some(ring), Algorithm::None) = (&keys, header.algorithm) {
            // The registry is on but this header is still plaintext: a
            // `keys encrypt` was interrupted between the two; finish it.
            header.algorithm = Algorithm::Aes256Ctr;
            header.header_key_version = ring.active_version();
            tracing::info!(
                export = name,
                "export switched to encryption (an interrupted keys encrypt)"
            );
        }
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
            keys: keys.map(OnceLock::from).unwrap_or_default(),
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
            versions: super::versions::VersionCounts::new(0),
            cut: Default::default(),
            gate: Default::default(),
        };
        export.check_len()?;
        export.write_headers(&header)?;
        export.counters.epoch.store(header.epoch, Ordering::Relaxed);
        let groups = export.groups();
        export.versions.set_total(groups);
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
        let slot = Self::header_slot_bytes(header, self.keys())?;
        self.write_header_slots(&slot)
    }

    /// Writes encoded header bytes into both slots, one at a time, synced in
    /// between.
    fn write_header_slots(&self, slot: &[u8]) -> Result<(), StoreError> {
        for at in [0, HEADER_SLOT] {
            self.io
                .write_all_at(slot, at)
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

    /// The key version whose header-MAC key signs the header on disk now.
    pub fn header_key_version(&self) -> u32 {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .header_key_version
    }

    /// Re-signs both header slots under key `version` (loaded), so an older
    /// version can be retired. Both slots are written and synced before
    /// this returns.
    pub fn move_header_key(&self, version: u32) -> Result<(), StoreError> {
        if !self.encrypted() || self.header_key_version() == version {
            return Ok(());
        }
        self.update_header(|h| h.header_key_version = version)?;
        tracing::info!(export = %self.name, version, "header re-signed under the active key version");
        Ok(())
    }

    /// Turns a plaintext export into an encrypted one while it serves: a
    /// fresh epoch is reserved and the header rewritten (algorithm
    /// AES-256-CTR, signed under the active version) through the two-slot
    /// update, then the keys are published. Both happen under the header
    /// lock, so a writer that sees the keys finds the epoch reserved. Blocks
    /// already written stay plaintext (key version 0) until the sweep
    /// rewrites them. A no-op on an encrypted export.
    pub fn enable_encryption(&self, ring: Arc<KeyRing>) -> Result<(), StoreError> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if self.encrypted() {
            return Ok(());
        }
        let mut h = live.clone();
        h.algorithm = Algorithm::Aes256Ctr;
        h.header_key_version = ring.active_version();
        h.epoch = h.epoch.checked_add(1).ok_or_else(|| {
            StoreError::Config(format!(
                "export {}: all 2^32 key epochs are used up",
                self.name
            ))
        })?;
        h.sequence = h.sequence.wrapping_add(1);
        let slot = Self::header_slot_bytes(&h, Some(&ring))?;
        self.write_header_slots(&slot)?;
        {
            let mut g = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
            g.epoch = h.epoch;
            g.next = 0;
        }
        self.counters.epoch.store(h.epoch, Ordering::Relaxed);
        // Set only here, under the header lock, after checking it is unset.
        let _ = self.keys.set(ring);
        *live = h;
        tracing::info!(export = %self.name, "export switched to encryption; plaintext blocks wait for the sweep");
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
        self.versions.set_total(groups);
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
        // Marking the header clean needs the header-MAC key. After a
        // fail-closed wipe there is none: the data is already durable, so
        // the export simply stays marked open and the next start scrubs it.
        if let Some(ring) = self.keys() {
            if ring.is_failed_closed() {
                tracing::warn!(export = %self.name,
                    "keys are wiped (failed closed): the export stays marked open and is scrubbed at the next start");
                return Ok(());
            }
        }
        self.update_header(|h| h.state = State::Clean)
    }

    pub(super) fn io_err(&self, what: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            what: format!("{what} {}", self.path.display()),
            source,
        }
    }

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
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
    pub(super) fn is_clean(&self, b: u64) -> bool {
        !self.suspect || b / GROUP_BLOCKS < self.counters.scrub_groups_done.load(Ordering::Acquire)
    }

    // ---- epochs and nonces -------------------------------------------------

    /// Takes `n` write counters: (epoch, counter) per block. Advances the
    /// epoch when the current one is used up, and reserves the next epoch
    /// in the header once half of the current one is used (reserve-ahead),
    /// so normally no writer waits for a header write.
    pub(super) fn take_counters(&self, n: usize) -> Result<Vec<(u32, u32)>, StoreError> {
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

impl From<HeaderError> for StoreError {
    fn from(e: HeaderError) -> Self {
        StoreError::BadHeader {
            path: String::new(),
            why: e.to_string(),
        }
    }
}
