//! The re-encryption sweep: after a key rotation, rewrites every block whose
//! content is still under an older universe-key version, so the old version
//! can be retired.
//!
//! Each block is re-read, decrypted and written again under the active
//! version through the normal whole-block write path (fresh nonce from the
//! epoch counter and the CSPRNG, new slot, then data), under the block
//! lock. A foreground write to the same block simply wins: the sweep
//! re-checks the block under the lock and leaves it alone if it is already
//! under the active version. A SIGKILL at any instant leaves every block old
//! or new, as for any write.
//!
//! One sweeper thread per store walks the exports in name order, 16 blocks
//! (one lock stripe) at a time, throttled to a byte rate, pausable, with its
//! cursor persisted in `<data-dir>/sweep.json` (see `doc/FORMAT.md`) after
//! the export is synced, so a restart resumes where it was. The sweep is
//! done when the exact per-version counts ([`super::versions`]) show no
//! block and no header under an older version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::export::{Export, IoStats};
use super::format::{self, Kind, Resolution, BLOCK_SIZE, BLOCK_SIZE_U64, GROUP_BLOCKS, PAIR_SIZE};
use super::slots::KeyCache;
use super::versions::{block_version, may_need_sweep};
use super::{Store, StoreError};
use crate::crypto::KeyRing;

/// File name of the sweep cursor inside the data directory.
pub const SWEEP_FILE: &str = "sweep.json";
/// Blocks handled under one lock: one lock stripe (64 KiB).
pub const CHUNK_BLOCKS: u64 = 16;
/// How often the cursor is synced and saved while sweeping.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// What one chunk of the sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChunkResult {
    /// Blocks re-encrypted.
    pub rewritten: u64,
    /// Blocks under an older version left alone because they match neither
    /// slot (damage: `check --repair` resolves them).
    pub damaged: u64,
}

impl Export {
    /// Re-encrypts under `active` the blocks of `first..first+n` (one
    /// group at most) whose content is under another version.
    pub fn reencrypt_chunk(
        &self,
        first: u64,
        n: u64,
        active: u32,
    ) -> Result<ChunkResult, StoreError> {
        let mut res = ChunkResult::default();
        if !self.encrypted() || n == 0 {
            return Ok(res);
        }
        let nblocks = format::blocks_for(self.size());
        let last = (first + n)
            .min(nblocks)
            .min((first / GROUP_BLOCKS + 1) * GROUP_BLOCKS)
            - 1;
        let n = (last - first + 1) as usize;
        let mut pairs = vec![0u8; n * PAIR_SIZE];
        // Unlocked filter: most chunks need nothing.
        self.io
            .read_full_at(&mut pairs, format::pair_offset(first))
            .map_err(|source| self.io_err("read slots of", source))?;
        let clean = self.is_clean(first);
        if !pairs
            .chunks_exact(PAIR_SIZE)
            .any(|p| may_need_sweep(p, clean, active))
        {
            return Ok(res);
        }
        // A request like any write: a backup cut falls before or after it.
        let _gate = self.request_gate();
        let _g = self.locks.lock(first, last);
        // Under the lock: the truth, including foreground writes that won.
        self.io
            .read_full_at(&mut pairs, format::pair_offset(first))
            .map_err(|source| self.io_err("read slots of", source))?;
        let mut data = vec![0u8; n * BLOCK_SIZE];
        self.io
            .read_full_at(&mut data, format::data_offset(first))
            .map_err(|source| self.io_err("read", source))?;
        let mut cache = KeyCache::default();
        let mut todo = vec![false; n];
        for (i, (p, d)) in pairs
            .chunks_exact(PAIR_SIZE)
            .zip(data.chunks_exact_mut(BLOCK_SIZE))
            .enumerate()
        {
            let block = first + i as u64;
            let r = self.resolve_block(block, p, d, &mut cache)?;
            match r {
                Resolution::Valid { slot, .. }
                    if slot.kind == Kind::Data && slot.key_version != active =>
                {
                    self.decrypt(&slot, block, d, &mut cache)?;
                    todo[i] = true;
                }
                Resolution::CantTell if block_version(p, &r).is_some_and(|v| v != active) => {
                    res.damaged += 1;
                }
                _ => {}
            }
        }
        // Contiguous runs of blocks to rewrite, each one write.
        let mut st = IoStats::default();
        let mut i = 0;
        while i < n {
            if !todo[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < n && todo[i] {
                i += 1;
            }
            let run = &mut data[start * BLOCK_SIZE..i * BLOCK_SIZE];
            self.write_blocks(first + start as u64, run, &mut st)?;
            res.rewritten += (i - start) as u64;
        }
        Ok(res)
    }
}

/// What [`Export::purge_plaintext`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PurgeResult {
    /// Plaintext blocks re-encrypted on the way (writes that raced).
    pub rewritten: u64,
    /// Superseded plaintext slots zeroed.
    pub slots_zeroed: u64,
    /// Data areas of trimmed or unwritten blocks punched (or zeroed).
    pub areas_punched: u64,
    /// Blocks still plaintext (damaged: neither slot matches the data).
    pub plaintext_left: u64,
}

impl Export {
    /// Removes what plaintext an encrypted export may still hold once every
    /// block is re-encrypted: per group, any block still plaintext is
    /// re-encrypted first; then, under the group's locks and after an
    /// fsync (so the newest slot and its data are durable), a superseded
    /// plaintext slot beside a valid encrypted or zero slot is zeroed (its
    /// check is a hash of plaintext) and the data areas of trimmed and
    /// unwritten blocks are punched out (overwritten with zeros where the
    /// file system cannot punch holes).
    pub fn purge_plaintext(&self, active: u32) -> Result<PurgeResult, StoreError> {
        let mut res = PurgeResult::default();
        if !self.encrypted() {
            return Ok(res);
        }
        let nblocks = format::blocks_for(self.size());
        let mut first = 0;
        while first < nblocks {
            let last = (first + GROUP_BLOCKS).min(nblocks) - 1;
            res.rewritten += self
                .reencrypt_chunk(first, last - first + 1, active)?
                .rewritten;
            self.purge_group(first, last, &mut res)?;
            first = last + 1;
        }
        self.io
            .sync_data()
            .map_err(|source| self.io_err("fdatasync", source))?;
        Ok(res)
    }

    fn purge_group(&self, first: u64, last: u64, res: &mut PurgeResult) -> Result<(), StoreError> {
        let n = (last - first + 1) as usize;
        let _gate = self.request_gate();
        let _g = self.locks.lock(first, last);
        let mut pairs = vec![0u8; n * PAIR_SIZE];
        self.io
            .read_full_at(&mut pairs, format::pair_offset(first))
            .map_err(|source| self.io_err("read slots of", source))?;
        // Newest slots and data written before this point become durable
        // before an older slot is dropped.
        self.io
            .sync_data()
            .map_err(|source| self.io_err("fdatasync", source))?;
        let mut data = vec![0u8; n * BLOCK_SIZE];
        self.io
            .read_full_at(&mut data, format::data_offset(first))
            .map_err(|source| self.io_err("read", source))?;
        let mut cache = KeyCache::default();
        let mut new_pairs = pairs.clone();
        let mut punch = vec![false; n];
        for (i, (p, d)) in pairs
            .chunks_exact(PAIR_SIZE)
            .zip(data.chunks_exact(BLOCK_SIZE))
            .enumerate()
        {
            let block = first + i as u64;
            match self.resolve_block(block, p, d, &mut cache)? {
                Resolution::Unwritten | Resolution::TornFirst => {
                    punch[i] = d.iter().any(|&x| x != 0);
                }
                Resolution::Valid { index, slot, .. }
                    if slot.kind == Kind::Zero || slot.key_version != 0 =>
                {
                    if slot.kind == Kind::Zero {
                        punch[i] = d.iter().any(|&x| x != 0);
                    }
                    let other = 1 - index;
                    let o = &mut new_pairs[i * PAIR_SIZE..(i + 1) * PAIR_SIZE]
                        [other * format::SLOT_SIZE..(other + 1) * format::SLOT_SIZE];
                    if let format::SlotRead::Used(s) = &format::decode_pair(p)[other] {
                        if s.key_version == 0 && s.kind == Kind::Data {
                            o.fill(0);
                            res.slots_zeroed += 1;
                        }
                    }
                }
                Resolution::Valid { .. } => res.plaintext_left += 1,
                Resolution::CantTell => {
                    if format::decode_pair(p).iter().any(|s| {
                        matches!(s, format::SlotRead::Used(s) if s.kind == Kind::Data && s.key_version == 0)
                    }) {
                        res.plaintext_left += 1;
                    }
                }
            }
        }
        if new_pairs != pairs {
            self.io
                .write_all_at(&new_pairs, format::pair_offset(first))
                .map_err(|source| self.io_err("write slots of", source))?;
        }
        let zeros = vec![0u8; BLOCK_SIZE];
        for (i, _) in punch.iter().enumerate().filter(|(_, p)| **p) {
            let at = format::data_offset(first + i as u64);
            self.io.punch_hole(at, BLOCK_SIZE_U64);
            let mut back = vec![0u8; BLOCK_SIZE];
            self.io
                .read_full_at(&mut back, at)
                .map_err(|source| self.io_err("read", source))?;
            if back != zeros {
                // No hole punching here: overwrite with zeros instead.
                self.io
                    .write_all_at(&zeros, at)
                    .map_err(|source| self.io_err("write", source))?;
            }
            res.areas_punched += 1;
        }
        Ok(())
    }
}

/// The persisted sweep state (`sweep.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// Format of this file (1).
    pub format: u32,
    /// The key version the sweep moves blocks to.
    pub target_version: u32,
    /// Paused by an operator (survives restarts).
    pub paused: bool,
    /// Per export: the next block to visit (everything before it was under
    /// `target_version`, and synced, when this was written).
    pub cursor: BTreeMap<String, u64>,
    /// Set by `keys encrypt`: once no block is plaintext any more, the
    /// plaintext residue (old slots, trimmed data areas) is purged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub purge_plaintext: bool,
}

impl SweepFile {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(SWEEP_FILE)
    }

    /// Loads `<data_dir>/sweep.json`; a missing or unreadable file means
    /// "start from the beginning" (the cursor only saves work).
    pub fn load(data_dir: &Path) -> SweepFile {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<SweepFile>(&b) {
                Ok(f) if f.format == 1 => f,
                _ => {
                    tracing::warn!(path = %path.display(),
                        "sweep cursor file is not valid; the sweep starts from the beginning");
                    SweepFile::default()
                }
            },
            Err(_) => SweepFile::default(),
        }
    }

    /// Records the paused flag without a running sweeper (offline).
    pub fn set_paused(data_dir: &Path, paused: bool) -> Result<(), StoreError> {
        let mut f = Self::load(data_dir);
        f.format = 1;
        f.paused = paused;
        f.save(data_dir)
    }

    /// Records that the plaintext residue must be purged once the sweep has
    /// re-encrypted every plaintext block (`keys encrypt`, before the
    /// switch, so a crash after it still purges).
    pub fn set_purge_plaintext(data_dir: &Path) -> Result<(), StoreError> {
        let mut f = Self::load(data_dir);
        f.format = 1;
        f.purge_plaintext = true;
        f.save(data_dir)
    }

    fn save(&self, data_dir: &Path) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| StoreError::Config(format!("cannot encode the sweep cursor: {e}")))?;
        bytes.push(b'\n');
        crate::fsutil::write_atomic(&Self::path(data_dir), &bytes)?;
        Ok(())
    }
}

/// Where the sweep stands (for status and metrics; no secrets).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SweepStatus {
    /// `idle` (nothing to do), `waiting` (census running), `running`,
    /// `paused`, `stalled` (an error; retried), `done`.
    pub state: String,
    /// Version blocks are moved to.
    pub target_version: u32,
    /// Blocks still under another version (all exports).
    pub remaining_blocks: u64,
    /// Blocks re-encrypted since this process started.
    pub rewritten_blocks: u64,
    /// Damaged blocks left alone in the last pass.
    pub damaged_blocks: u64,
    /// Progress of the current sweep, 0..=1.
    pub progress: f64,
    /// Re-encryption rate over the last seconds, bytes per second.
    pub rate_bytes_per_sec: f64,
    /// Estimated seconds left (`None` when unknown).
    pub eta_seconds: Option<f64>,
    /// Configured limit, bytes per second (0 = unlimited).
    pub limit_bytes_per_sec: u64,
    /// Export being swept.
    pub export: Option<String>,
    /// Last error, if the sweep stalled.
    pub error: Option<String>,
}

/// Shared between the sweeper thread and its controllers.
#[derive(Debug)]
struct Shared {
    paused: AtomicBool,
    stop: AtomicBool,
    limit: AtomicU64,
    rewritten: AtomicU64,
    /// Bumped to wake the thread (rotation, resume, stop).
    wake: Mutex<u64>,
    cv: Condvar,
    status: Mutex<SweepStatus>,
    /// Passes completed (tests wait on it).
    passes: AtomicU64,
    /// Serialises writes of `sweep.json` (the thread's cursor, an
    /// operator's pause): one writer at a time, each writing the shared
    /// paused flag.
    file_lock: Mutex<()>,
    data_dir: PathBuf,
}

/// Handle on the store's sweeper thread.
#[derive(Debug, Clone)]
pub struct Sweeper {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Sweeper {
    /// Starts the sweeper for `store` (keys `ring`), throttled to
    /// `limit_bytes_per_sec` (0 = unlimited). It resumes from `sweep.json`.
    pub fn start(
        store: &Arc<Store>,
        ring: Arc<KeyRing>,
        data_dir: &Path,
        limit_bytes_per_sec: u64,
    ) -> Sweeper {
        let file = SweepFile::load(data_dir);
        let shared = Arc::new(Shared {
            paused: AtomicBool::new(file.paused),
            stop: AtomicBool::new(false),
            limit: AtomicU64::new(limit_bytes_per_sec),
            rewritten: AtomicU64::new(0),
            wake: Mutex::new(0),
            cv: Condvar::new(),
            status: Mutex::new(SweepStatus {
                state: "waiting".into(),
                limit_bytes_per_sec,
                ..SweepStatus::default()
            }),
            passes: AtomicU64::new(0),
            file_lock: Mutex::new(()),
            data_dir: data_dir.to_path_buf(),
        });
        let s = Sweeper {
            shared,
            thread: Arc::new(Mutex::new(None)),
        };
        let run = Run {
            store: Arc::downgrade(store),
            ring,
            data_dir: data_dir.to_path_buf(),
            shared: Arc::clone(&s.shared),
            file,
            parked: None,
        };
        match std::thread::Builder::new()
            .name("ear-sweep".into())
            .spawn(move || run.main())
        {
            Ok(h) => *lock(&s.thread) = Some(h),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the re-encryption sweep thread");
                s.set_state(
                    "stalled",
                    Some(format!("cannot start the sweep thread: {e}")),
                );
            }
        }
        s
    }

    /// A handle with no thread behind it (offline commands that only read
    /// or retire): its status says `idle`.
    pub fn idle(data_dir: &Path) -> Sweeper {
        let file = SweepFile::load(data_dir);
        Sweeper {
            shared: Arc::new(Shared {
                paused: AtomicBool::new(file.paused),
                stop: AtomicBool::new(true),
                limit: AtomicU64::new(0),
                rewritten: AtomicU64::new(0),
                wake: Mutex::new(0),
                cv: Condvar::new(),
                status: Mutex::new(SweepStatus {
                    state: "idle".into(),
                    target_version: file.target_version,
                    ..SweepStatus::default()
                }),
                passes: AtomicU64::new(0),
                file_lock: Mutex::new(()),
                data_dir: data_dir.to_path_buf(),
            }),
            thread: Arc::new(Mutex::new(None)),
        }
    }

    fn set_state(&self, state: &str, error: Option<String>) {
        let mut st = lock(&self.shared.status);
        st.state = state.into();
        st.error = error;
    }

    /// Wakes the sweeper (after a rotation).
    pub fn kick(&self) {
        *lock(&self.shared.wake) += 1;
        self.shared.cv.notify_all();
    }

    /// Pauses the sweep and records it in `sweep.json` (a restart stays
    /// paused).
    pub fn pause(&self) -> Result<(), StoreError> {
        self.shared.paused.store(true, Ordering::Release);
        let mut st = lock(&self.shared.status);
        if st.state == "running" || st.state == "waiting" {
            st.state = "paused".into();
        }
        drop(st);
        self.kick();
        self.persist_paused()
    }

    /// Resumes a paused sweep (recorded in `sweep.json`).
    pub fn resume(&self) -> Result<(), StoreError> {
        self.shared.paused.store(false, Ordering::Release);
        self.kick();
        self.persist_paused()
    }

    /// Writes the paused flag into `sweep.json`, keeping the cursor there.
    fn persist_paused(&self) -> Result<(), StoreError> {
        let _g = lock(&self.shared.file_lock);
        let mut f = SweepFile::load(&self.shared.data_dir);
        f.format = 1;
        f.paused = self.shared.paused.load(Ordering::Acquire);
        f.save(&self.shared.data_dir)
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::Acquire)
    }

    /// Stops the thread and waits for it (shutdown, before the store is
    /// closed); the cursor is saved where it stopped.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.kick();
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }

    /// Changes the rate limit (bytes per second, 0 = unlimited).
    pub fn set_limit(&self, bytes_per_sec: u64) {
        self.shared.limit.store(bytes_per_sec, Ordering::Release);
        lock(&self.shared.status).limit_bytes_per_sec = bytes_per_sec;
    }

    /// Where the sweep stands.
    pub fn status(&self) -> SweepStatus {
        lock(&self.shared.status).clone()
    }

    /// Blocks re-encrypted since start.
    pub fn rewritten(&self) -> u64 {
        self.shared.rewritten.load(Ordering::Acquire)
    }

    /// Passes completed since start.
    pub fn passes(&self) -> u64 {
        self.shared.passes.load(Ordering::Acquire)
    }

    /// True while a `keys encrypt` has plaintext left to re-encrypt or purge.
    pub fn purge_pending(&self) -> bool {
        let _g = lock(&self.shared.file_lock);
        SweepFile::load(&self.shared.data_dir).purge_plaintext
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Blocks of `exports` under versions other than `active`, with whether
/// every count is exact.
pub fn remaining(exports: &[Arc<Export>], active: u32) -> (u64, bool) {
    let mut n = 0;
    let mut exact = true;
    for e in exports {
        let s = e.versions().snapshot();
        exact &= s.exact;
        n += s
            .by_version
            .iter()
            .filter(|(v, _)| **v != active)
            .map(|(_, c)| c)
            .sum::<u64>();
    }
    (n, exact)
}

/// An export that still needs the sweep: blocks or header under another
/// version.
fn needs_sweep(e: &Export, active: u32) -> bool {
    e.encrypted()
        && (e.header_key_version() != active
            || e.versions()
                .snapshot()
                .by_version
                .keys()
                .any(|v| *v != active))
}

struct Run {
    store: std::sync::Weak<Store>,
    ring: Arc<KeyRing>,
    data_dir: PathBuf,
    shared: Arc<Shared>,
    file: SweepFile,
    /// (active version, blocks left) after a pass that could rewrite
    /// nothing more (only damaged blocks left): no new pass until either
    /// changes.
    parked: Option<(u32, u64)>,
}

/// Why a pass ended early.
enum Interrupt {
    Stop,
    Retarget,
}

impl Run {
    fn main(mut self) {
        let mut backoff = Duration::from_secs(1);
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            let seen = *lock(&self.shared.wake);
            match self.one_round() {
                Ok(true) => {
                    backoff = Duration::from_secs(1);
                    continue;
                }
                Ok(false) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::error!(error = %e, "re-encryption sweep stalled; retrying");
                    let mut st = lock(&self.shared.status);
                    st.state = "stalled".into();
                    st.error = Some(e.to_string());
                    drop(st);
                    self.wait(seen, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
            }
            self.wait(seen, Duration::from_secs(1));
        }
    }

    /// Sleeps until kicked or `max` passes.
    fn wait(&self, seen: u64, max: Duration) {
        let g = lock(&self.shared.wake);
        if *g != seen {
            return;
        }
        let _ = self
            .shared
            .cv
            .wait_timeout_while(g, max, |w| *w == seen)
            .unwrap_or_else(|p| p.into_inner());
    }

    /// One look at the store: sweeps what needs it. Returns true when it
    /// should look again at once.
    fn one_round(&mut self) -> Result<bool, StoreError> {
        let Some(store) = self.store.upgrade() else {
            self.shared.stop.store(true, Ordering::Release);
            return Ok(false);
        };
        let exports: Vec<Arc<Export>> = store.exports().cloned().collect();
        drop(store);
        let active = self.ring.active_version();
        if self.ring.is_failed_closed() {
            return Ok(false);
        }
        let (left, _) = remaining(&exports, active);
        let census_done = exports.iter().all(|e| e.versions().census_finished());
        self.update_status(|st| {
            st.target_version = active;
            st.remaining_blocks = left;
        });
        if !census_done {
            self.update_status(|st| st.state = "waiting".into());
            return Ok(false);
        }
        let todo: Vec<&Arc<Export>> = exports.iter().filter(|e| needs_sweep(e, active)).collect();
        if todo.is_empty() {
            self.update_status(|st| {
                st.state = "done".into();
                st.progress = 1.0;
                st.eta_seconds = Some(0.0);
                st.export = None;
                st.error = None;
            });
            if self.file.purge_plaintext {
                if matches!(self.parked, Some((a, _)) if a == active) {
                    return Ok(false);
                }
                self.update_status(|st| st.state = "purging".into());
                let mut left = 0;
                for e in &exports {
                    let p = e.purge_plaintext(active)?;
                    tracing::info!(
                        export = e.name(),
                        rewritten = p.rewritten,
                        slots = p.slots_zeroed,
                        punched = p.areas_punched,
                        left = p.plaintext_left,
                        "plaintext residue purged"
                    );
                    left += p.plaintext_left;
                }
                self.update_status(|st| st.state = "done".into());
                if left > 0 {
                    tracing::warn!(blocks = left,
                        "plaintext blocks the sweep cannot re-encrypt (damaged: `ear-sidecar check --repair` resolves them)");
                    self.parked = Some((active, left));
                    return Ok(false);
                }
                self.file.purge_plaintext = false;
                self.file.target_version = active;
                self.file.cursor.clear();
                self.save()?;
                tracing::info!(
                    "encryption complete: no plaintext block or residue remains in the exports"
                );
                return Ok(false);
            }
            // A finished sweep leaves no cursor behind (and a directory
            // that never rotated gets no file).
            if !self.file.cursor.is_empty() {
                self.file.target_version = active;
                self.file.cursor.clear();
                self.save()?;
            }
            return Ok(false);
        }
        if self.parked == Some((active, left)) {
            return Ok(false);
        }
        self.parked = None;
        if self.shared.paused.load(Ordering::Acquire) {
            self.update_status(|st| st.state = "paused".into());
            return Ok(false);
        }
        if self.file.target_version != active {
            self.file.target_version = active;
            self.file.cursor.clear();
        }
        self.file.format = 1;
        self.file.paused = false;
        let mut damaged = 0;
        let rewritten_before = self.shared.rewritten.load(Ordering::Acquire);
        for e in todo {
            match self.sweep_export(e, active, &mut damaged)? {
                None => {}
                Some(Interrupt::Stop) => return Ok(false),
                Some(Interrupt::Retarget) => return Ok(true),
            }
        }
        self.shared.passes.fetch_add(1, Ordering::AcqRel);
        self.update_status(|st| st.damaged_blocks = damaged);
        let (left, exact) = remaining(&exports, active);
        let progressed = self.shared.rewritten.load(Ordering::Acquire) > rewritten_before;
        if left > 0 && !progressed {
            // Nothing more can be rewritten: blocks that match neither slot
            // (damage), which `check --repair` resolves. Say so once and
            // wait for a change instead of passing again and again.
            tracing::warn!(
                remaining = left,
                damaged,
                "sweep finished except blocks it cannot re-encrypt (damaged: \
                 `ear-sidecar check --repair` resolves them); the old key version stays in use"
            );
            self.parked = Some((active, left));
            self.file.cursor.clear();
            self.save()?;
            self.update_status(|st| {
                st.state = "done".into();
                st.damaged_blocks = left;
                st.export = None;
                st.eta_seconds = None;
            });
            return Ok(false);
        }
        if left > damaged || !exact {
            // Blocks the cursor had passed are under another version (the
            // counts are exact, the cursor only an optimisation, e.g. after
            // power loss): go over everything again.
            tracing::info!(
                remaining = left,
                damaged,
                "sweep pass finished with blocks left; sweeping again"
            );
            self.file.cursor.clear();
            self.save()?;
            return Ok(left > damaged);
        }
        if damaged > 0 {
            tracing::warn!(
                damaged,
                "sweep finished except damaged blocks (`ear-sidecar check --repair` resolves them)"
            );
        } else {
            tracing::info!(
                version = active,
                "re-encryption sweep finished: every block is under the active key version"
            );
        }
        Ok(true)
    }

    fn update_status(&self, f: impl FnOnce(&mut SweepStatus)) {
        f(&mut lock(&self.shared.status));
    }

    /// Sweeps one export from its cursor to its end, then moves its header
    /// key. `None` when it got to the end.
    fn sweep_export(
        &mut self,
        e: &Export,
        active: u32,
        damaged: &mut u64,
    ) -> Result<Option<Interrupt>, StoreError> {
        let name = e.name().to_string();
        let nblocks = format::blocks_for(e.size());
        let mut b = self
            .file
            .cursor
            .get(&name)
            .copied()
            .unwrap_or(0)
            .min(nblocks);
        tracing::info!(export = %name, version = active, from_block = b, "re-encryption sweep of export");
        self.update_status(|st| {
            st.state = "running".into();
            st.export = Some(name.clone());
            st.error = None;
        });
        let mut last_save = Instant::now();
        let mut window = (Instant::now(), 0u64);
        let mut next_at = Instant::now();
        // Behind by more than a moment (a slow disk, a pause): start afresh
        // rather than bursting to catch up.
        while b < nblocks {
            if self.shared.stop.load(Ordering::Acquire) {
                self.save_cursor(e, b)?;
                return Ok(Some(Interrupt::Stop));
            }
            if self.shared.paused.load(Ordering::Acquire) {
                self.save_cursor(e, b)?;
                return Ok(Some(Interrupt::Stop));
            }
            if self.ring.active_version() != active {
                return Ok(Some(Interrupt::Retarget));
            }
            // Skip unallocated groups in one step.
            if b % GROUP_BLOCKS == 0 {
                match e.next_allocated_group(b / GROUP_BLOCKS) {
                    Some(g) if g * GROUP_BLOCKS < nblocks => b = b.max(g * GROUP_BLOCKS),
                    _ => break,
                }
            }
            let n = CHUNK_BLOCKS.min(nblocks - b);
            let r = e.reencrypt_chunk(b, n, active)?;
            *damaged += r.damaged;
            b += n;
            if r.rewritten > 0 {
                let bytes = r.rewritten * BLOCK_SIZE_U64;
                self.shared
                    .rewritten
                    .fetch_add(r.rewritten, Ordering::AcqRel);
                window.1 += bytes;
                // Throttle: a token bucket that allows no burst beyond one chunk.
                let limit = self.shared.limit.load(Ordering::Acquire);
                if limit > 0 {
                    let now = Instant::now();
                    if next_at + Duration::from_millis(100) < now {
                        next_at = now;
                    }
                    next_at += Duration::from_secs_f64(bytes as f64 / limit as f64);
                    let wait = next_at.saturating_duration_since(now);
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                }
            }
            if window.0.elapsed() >= Duration::from_secs(1) {
                self.refresh_rate(&mut window, active);
            }
            if last_save.elapsed() >= SAVE_EVERY {
                self.save_cursor(e, b)?;
                last_save = Instant::now();
            }
        }
        // Everything rewritten is made durable before the header moves and
        // before the cursor says so.
        e.flush()?;
        e.move_header_key(active)?;
        self.file.cursor.insert(name, nblocks);
        self.save()?;
        self.refresh_rate(&mut window, active);
        Ok(None)
    }

    fn save_cursor(&mut self, e: &Export, b: u64) -> Result<(), StoreError> {
        e.flush()?;
        self.file.cursor.insert(e.name().to_string(), b);
        self.save()
    }

    /// Saves the thread's view of `sweep.json` with the current paused flag.
    fn save(&mut self) -> Result<(), StoreError> {
        let _g = lock(&self.shared.file_lock);
        self.file.format = 1;
        self.file.paused = self.shared.paused.load(Ordering::Acquire);
        self.file.save(&self.data_dir)
    }

    fn refresh_rate(&self, window: &mut (Instant, u64), active: u32) {
        let secs = window.0.elapsed().as_secs_f64().max(1e-3);
        let rate = window.1 as f64 / secs;
        *window = (Instant::now(), 0);
        let exports: Vec<Arc<Export>> = match self.store.upgrade() {
            Some(s) => s.exports().cloned().collect(),
            None => return,
        };
        let (left, _) = remaining(&exports, active);
        let done = self.shared.rewritten.load(Ordering::Acquire);
        self.update_status(|st| {
            st.rate_bytes_per_sec = rate;
            st.remaining_blocks = left;
            st.rewritten_blocks = done;
            st.progress = if done + left == 0 {
                1.0
            } else {
                done as f64 / (done + left) as f64
            };
            st.eta_seconds = (rate > 0.0).then(|| left as f64 * BLOCK_SIZE as f64 / rate);
        });
    }
}
