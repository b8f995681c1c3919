//! The seam between backups and the store: [`BlockSource`] (what a backup
//! reads, at one cut) and [`BlockSink`] (what a restore writes), with
//! in-memory implementations for tests.
//!
//! Both are synchronous (the store does positional I/O); the engine drives
//! them from a blocking thread and never holds them across an await.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::chunk::BlockRecord;
use super::index::SlotIndex;
use super::DynError;

/// The blocks of one export at one cut, as stored (slot and ciphertext).
///
/// The store implements this over a point-in-time view: writes after the cut
/// must not show (the store preserves a block's old slot and ciphertext
/// before overwriting it while a backup is running).
pub trait BlockSource: Send {
    /// Export size in bytes at the cut (a multiple of 4096).
    fn export_size(&self) -> u64;

    /// The instant of the cut.
    fn cut_time(&self) -> SystemTime;

    /// Opaque metadata the store needs to recreate the export on restore
    /// (for instance the backing file's id, the HKDF salt of its keys).
    /// Stored, authenticated, in the manifest.
    fn export_meta(&self) -> Vec<u8>;

    /// The next block, in strictly increasing index order, whose current slot
    /// differs from the one `base` records (`base` of a full backup records
    /// nothing, so every non-empty block qualifies). `None` at the end.
    ///
    /// Contract: a block whose valid slot is kind 1 yields its slot and
    /// ciphertext; kind 2 yields its slot alone. A block that `base` holds
    /// but that now has no valid slot (it reads as zeros) must be yielded as
    /// a kind-2 record, so that a restore reads zeros too.
    fn next_changed(&mut self, base: &SlotIndex) -> Result<Option<BlockRecord>, DynError>;
}

/// What a restore tells the sink before the first block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInfo {
    /// Export name.
    pub export: String,
    /// Export size in bytes.
    pub export_size: u64,
    /// The key registry (`keys.json`, wrapped keys only) of the backup.
    pub key_registry: Vec<u8>,
    /// The store's export metadata from the backup.
    pub export_meta: Vec<u8>,
    /// The backup restored.
    pub backup_id: String,
}

/// The destination of a restore (the store writes a fresh backing file).
///
/// Blocks arrive once each, in no particular order; blocks never written
/// before the cut do not arrive at all (they read as zeros). The store must
/// reserve a key epoch above every epoch found in the restored slots before
/// it serves writes, so restored nonces are never reused.
pub trait BlockSink: Send {
    /// Called once, first.
    fn begin(&mut self, info: &RestoreInfo) -> Result<(), DynError>;
    /// Writes one block's slot (and ciphertext for data slots).
    fn write(&mut self, record: &BlockRecord) -> Result<(), DynError>;
    /// Called once after the last block: make everything durable.
    fn finish(&mut self) -> Result<(), DynError>;
}

/// An in-memory export at a cut: block index → record.
#[derive(Debug, Clone)]
pub struct MemorySource {
    size: u64,
    cut: SystemTime,
    meta: Vec<u8>,
    blocks: BTreeMap<u64, BlockRecord>,
    cursor: Option<u64>,
    /// Fail after this many yielded blocks (tests of interrupted backups).
    pub fail_after: Option<u64>,
    yielded: u64,
}

impl MemorySource {
    /// A snapshot of `blocks` in an export of `size` bytes.
    pub fn new(size: u64, blocks: BTreeMap<u64, BlockRecord>) -> Self {
        Self {
            size,
            cut: SystemTime::now(),
            meta: b"memory".to_vec(),
            blocks,
            cursor: None,
            fail_after: None,
            yielded: 0,
        }
    }
}

impl BlockSource for MemorySource {
    fn export_size(&self) -> u64 {
        self.size
    }

    fn cut_time(&self) -> SystemTime {
        self.cut
    }

    fn export_meta(&self) -> Vec<u8> {
        self.meta.clone()
    }

    fn next_changed(&mut self, base: &SlotIndex) -> Result<Option<BlockRecord>, DynError> {
        if self.fail_after.is_some_and(|n| self.yielded >= n) {
            return Err("injected source failure".into());
        }
        let from = match self.cursor {
            None => 0,
            Some(c) => match c.checked_add(1) {
                Some(n) => n,
                None => return Ok(None),
            },
        };
        for (&i, r) in self.blocks.range(from..) {
            self.cursor = Some(i);
            if !base.unchanged(i, r.slot()) {
                self.yielded += 1;
                return Ok(Some(r.clone()));
            }
        }
        self.cursor = Some(u64::MAX);
        Ok(None)
    }
}

/// An in-memory restore destination.
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    /// What `begin` was told.
    pub info: Option<RestoreInfo>,
    /// The restored blocks.
    pub blocks: BTreeMap<u64, BlockRecord>,
    /// True once `finish` ran.
    pub finished: bool,
}

impl BlockSink for MemorySink {
    fn begin(&mut self, info: &RestoreInfo) -> Result<(), DynError> {
        if self.info.is_some() {
            return Err("begin called twice".into());
        }
        self.info = Some(info.clone());
        Ok(())
    }

    fn write(&mut self, record: &BlockRecord) -> Result<(), DynError> {
        let size = self.info.as_ref().ok_or("write before begin")?.export_size;
        if record.index() >= size / super::BLOCK_SIZE as u64 {
            return Err(format!("block {} beyond the export", record.index()).into());
        }
        if self.blocks.insert(record.index(), record.clone()).is_some() {
            return Err(format!("block {} written twice", record.index()).into());
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), DynError> {
        self.finished = true;
        Ok(())
    }
}
