//! Offline verification and repair of a data directory's backing files
//! (`ear-sidecar check`). The caller holds the data directory's lock, so no
//! sidecar writes while this runs.
//!
//! Every header slot and every written block is verified with the code the
//! scrub uses ([`super::scrub`]). `repair` resolves what can be resolved
//! without inventing data: it rolls back torn newer slots (the block already
//! reads as its older content), turns blocks that match neither slot into
//! zero slots (what they already read as in the default mode), rewrites a
//! damaged header slot from the valid one and marks a fully repaired file
//! closed cleanly. Blocks whose tag fails are left alone and reported. Every
//! change is appended to a JSON-lines record in the data directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::export::Export;
use super::format::{self, Slot, State, GROUP_BLOCKS, PAIR_SIZE, SLOT_SIZE};
use super::{exports_dir, StoreError, SUFFIX};
use crate::crypto::KeyRing;

/// Most block numbers listed per category in a report.
pub const LIST_MAX: usize = 100;

/// File name of the repair record in the data directory.
pub const REPAIR_LOG: &str = "repairs.jsonl";

/// What `check` found (and, with repair, changed) in one export.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ExportCheck {
    /// Export name.
    pub name: String,
    /// Backing file.
    pub path: PathBuf,
    /// Why the file could not be checked at all (bad headers, wrong key…).
    pub error: Option<String>,
    /// Header slots that were discarded, and why.
    pub header_problems: Vec<String>,
    /// `clean` or `open` (not closed cleanly).
    pub state: String,
    /// Highest key epoch reserved.
    pub epoch: u32,
    /// Blocks whose newest slot is valid.
    pub ok: u64,
    /// Never-written blocks.
    pub holes: u64,
    /// Blocks whose newer write did not land; they read as their old content.
    /// Expected after a crash (state `open`); damage when the file was
    /// closed cleanly (then also counted in `damaged_slots`).
    pub torn_old: u64,
    /// Torn blocks in a file closed cleanly, where none can be: damage.
    pub damaged_slots: u64,
    /// The first [`LIST_MAX`] of them.
    pub damaged_slot_blocks: Vec<u64>,
    /// Blocks matching neither slot: they read as zeros (EIO with integrity).
    pub cant_tell: u64,
    /// Blocks whose tag fails: modified on disk.
    pub bad_tags: u64,
    /// The first [`LIST_MAX`] can't-tell blocks.
    pub cant_tell_blocks: Vec<u64>,
    /// The first [`LIST_MAX`] bad-tag blocks.
    pub bad_tag_blocks: Vec<u64>,
    /// Changes made by repair.
    pub repaired: Repaired,
}

/// Changes made by `--repair` in one export.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Repaired {
    /// Torn newer slots rolled back.
    pub demoted: u64,
    /// Can't-tell blocks turned into zero slots.
    pub zeroed: u64,
    /// Both header slots rewritten (a damaged slot, or marking the file clean).
    pub headers_rewritten: bool,
}

impl ExportCheck {
    /// True when something remains that a read cannot return as written
    /// data: an unreadable file, a discarded header slot, can't-tell blocks
    /// or bad tags. (Torn-but-old blocks read correctly and are not damage.)
    pub fn damaged(&self) -> bool {
        self.error.is_some()
            || !self.header_problems.is_empty()
            || self.cant_tell > self.repaired.zeroed
            || self.damaged_slots > self.repaired.demoted
            || self.bad_tags > 0
    }

    /// One line for a terminal or a log.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("{}: cannot check: {e}", self.name);
        }
        let mut s = format!(
            "{}: {} ok, {} holes, {} torn (read as old), {} can't tell, {} bad tags; state {}, epoch {}",
            self.name,
            self.ok,
            self.holes,
            self.torn_old,
            self.cant_tell,
            self.bad_tags,
            self.state,
            self.epoch
        );
        if !self.header_problems.is_empty() {
            s.push_str(&format!("; header: {}", self.header_problems.join("; ")));
        }
        let r = &self.repaired;
        if r.demoted > 0 || r.zeroed > 0 || r.headers_rewritten {
            s.push_str(&format!(
                "; repaired: {} torn slots rolled back, {} blocks zeroed{}",
                r.demoted,
                r.zeroed,
                if r.headers_rewritten {
                    ", headers rewritten"
                } else {
                    ""
                }
            ));
        }
        if self.damaged_slots > 0 {
            s.push_str(&format!(
                "; {} blocks with a damaged newest slot although the file was closed cleanly {:?}",
                self.damaged_slots, self.damaged_slot_blocks
            ));
        }
        if !self.cant_tell_blocks.is_empty() {
            s.push_str(&format!("; can't-tell blocks {:?}", self.cant_tell_blocks));
        }
        if !self.bad_tag_blocks.is_empty() {
            s.push_str(&format!("; bad-tag blocks {:?}", self.bad_tag_blocks));
        }
        s
    }
}

/// Appends repair records (JSON lines) to [`REPAIR_LOG`].
pub struct RepairLog {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl RepairLog {
    /// A record in `data_dir` (the file is created on the first change).
    pub fn new(data_dir: &Path) -> Self {
        RepairLog {
            path: data_dir.join(REPAIR_LOG),
            file: None,
        }
    }

    /// Path of the record.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, v: serde_json::Value) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            what: format!("write repair record {}", self.path.display()),
            source,
        };
        if self.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            self.file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&self.path)
                    .map_err(io)?,
            );
        }
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut v = v;
        v["time_unix"] = unix.into();
        writeln!(f, "{v}").map_err(io)?;
        f.sync_data().map_err(io)
    }
}

/// Checks (and with `repair`, repairs) export `name` of `data_dir`.
/// `progress(done, total)` is called after each group.
pub fn check_export(
    data_dir: &Path,
    name: &str,
    dir_id: [u8; 16],
    keys: Option<Arc<KeyRing>>,
    repair: bool,
    log: &mut RepairLog,
    progress: &mut dyn FnMut(u64, u64),
) -> ExportCheck {
    let mut out = ExportCheck {
        name: name.to_string(),
        path: exports_dir(data_dir).join(format!("{name}{SUFFIX}")),
        ..ExportCheck::default()
    };
    if let Err(e) = check_inner(&mut out, dir_id, keys, repair, log, progress) {
        out.error = Some(e.to_string());
    }
    out
}

/// The work of [`check_export`] on `out.path` (export `out.name`), filling `out`.
fn check_inner(
    out: &mut ExportCheck,
    dir_id: [u8; 16],
    keys: Option<Arc<KeyRing>>,
    repair: bool,
    log: &mut RepairLog,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), StoreError> {
    let name = out.name.clone();
    let name = name.as_str();
    let (e, problems) = Export::open_offline(&out.path, name, dir_id, keys, repair)?;
    out.header_problems = problems;
    out.state = match e.header().state {
        State::Clean => "clean".into(),
        State::Open => "open".into(),
    };
    out.epoch = e.header().epoch;
    let total = e.groups();
    let mut g = 0;
    while g < total {
        match e.next_allocated_group(g) {
            Some(next) if next < total => g = next,
            _ => {
                g = total;
                progress(g, total);
                break;
            }
        }
        let (rep, pairs) = e.verify_group(g, repair)?;
        out.ok += rep.ok;
        out.holes += rep.holes;
        out.torn_old += rep.torn_old.len() as u64;
        if e.header().state == State::Clean {
            out.damaged_slots += rep.torn_old.len() as u64;
            for &b in &rep.torn_old {
                if out.damaged_slot_blocks.len() < LIST_MAX {
                    out.damaged_slot_blocks.push(b);
                }
            }
        }
        out.bad_tags += rep.bad_tags.len() as u64;
        for &b in &rep.bad_tags {
            if out.bad_tag_blocks.len() < LIST_MAX {
                out.bad_tag_blocks.push(b);
            }
        }
        if repair {
            for &b in &rep.torn_old {
                log.record(serde_json::json!({"export": name, "block": b,
                    "action": "rolled back a torn newer slot (the block keeps reading its older content)"}))?;
            }
            out.repaired.demoted += rep.torn_old.len() as u64;
            if !rep.cant_tell.is_empty() {
                zero_blocks(&e, &pairs, g, &rep.cant_tell)?;
                for &b in &rep.cant_tell {
                    log.record(serde_json::json!({"export": name, "block": b,
                        "action": "wrote a zero slot: the block matched neither slot and already read as zeros"}))?;
                }
                out.repaired.zeroed += rep.cant_tell.len() as u64;
            }
        }
        out.cant_tell += rep.cant_tell.len() as u64;
        for &b in &rep.cant_tell {
            if out.cant_tell_blocks.len() < LIST_MAX {
                out.cant_tell_blocks.push(b);
            }
        }
        g += 1;
        progress(g, total);
    }
    // Holes are what is left (skipped groups were counted whole above).
    out.holes = format::blocks_for(e.size())
        .saturating_sub(out.ok + out.torn_old + out.bad_tags + out.cant_tell);
    if repair {
        e.io()
            .sync_data()
            .map_err(|source| e.io_err("fdatasync", source))?;
        // Every block now satisfies the clean invariant (newer slot valid),
        // except bad-tag blocks, which keep the file marked open.
        let clean = out.bad_tags == 0;
        let state = if clean {
            State::Clean
        } else {
            e.header().state
        };
        if !out.header_problems.is_empty() || state != e.header().state {
            e.rewrite_headers(state)?;
            out.repaired.headers_rewritten = true;
            log.record(
                serde_json::json!({"export": name, "action": "rewrote both header slots",
                "discarded": out.header_problems, "state": if clean { "clean" } else { "open" }}),
            )?;
            out.header_problems.clear();
            out.state = if clean { "clean".into() } else { "open".into() };
        }
    }
    Ok(())
}

/// Gives each listed block a zero slot as its newest slot.
fn zero_blocks(e: &Export, pairs: &[u8], g: u64, blocks: &[u64]) -> Result<(), StoreError> {
    let first = g * GROUP_BLOCKS;
    let mut pairs = pairs.to_vec();
    for &b in blocks {
        let i = (b - first) as usize;
        let pair = &mut pairs[i * PAIR_SIZE..(i + 1) * PAIR_SIZE];
        let (target, generation) = format::write_target(pair, Some(None));
        let slot = Slot::zero(b, generation);
        slot.encode(&mut pair[target * SLOT_SIZE..(target + 1) * SLOT_SIZE]);
    }
    e.io()
        .write_all_at(&pairs, format::pair_offset(first))
        .map_err(|source| e.io_err("write slots of", source))
}
