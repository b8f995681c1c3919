//! Encrypted incremental backups of exports, to a local directory or S3.
//!
//! This module owns the backup *format* and *engine*; it never sees
//! plaintext or keys other than the manifest-authentication key. What leaves
//! the node is exactly what the store holds on disk: per block, the 64-byte
//! entry slot and the 4096-byte ciphertext (nothing for zero slots), plus the
//! wrapped key registry. Restoring therefore needs the customer master key.
//!
//! Layout (see `doc/backup.md` for the normative description):
//!
//! * [`target`]   – where objects go: the [`BackupTarget`] trait, a local
//!   directory (temp files synced in batches with one `syncfs`, then
//!   renamed; directories fsynced before the manifest) and S3
//!   (multipart, parallel parts), and `s3://bucket/prefix` / path parsing.
//! * [`chunk`]    – the chunk object codec: a run of block records of one
//!   export, content-addressed by SHA-256. Pure, no I/O.
//! * [`index`]    – the slot index: one fingerprint per non-empty block at a
//!   cut, which lets the next backup upload only blocks whose slot changed.
//! * [`manifest`] – the backup manifest and its HMAC-SHA256 authentication
//!   under a key derived from the universe key.
//! * [`source`]   – the seam to the store: [`BlockSource`] (blocks changed
//!   since a parent, at a cut) and [`BlockSink`] (what restore writes into),
//!   with in-memory implementations for tests.
//! * [`chain`]    – listing, chain resolution, restore plans, prune, verify.
//! * [`engine`]   – `backup`, `restore`, `verify`, with progress callbacks and
//!   statistics for metrics.
//!
//! Dependencies point one way: engine → chain → manifest/index/chunk → target.
//! Nothing here imports the store; the store implements [`BlockSource`] and
//! [`BlockSink`].

pub mod chain;
pub mod chunk;
pub mod engine;
pub mod index;
pub mod manifest;
pub mod source;
pub mod target;

pub use chain::{BackupInfo, Chain, PruneOptions, PruneReport, RestorePlan, VerifyReport};
pub use chunk::{BlockRecord, BlockRun, ChunkError, DecodedChunk, EncodedChunk, Slot, SlotKind};
pub use engine::{
    backup, restore, verify, BackupOptions, BackupRequest, BackupStats, Phase, Progress,
    RestoreStats,
};
pub use index::SlotIndex;
pub use manifest::{BackupId, ChunkRef, Manifest, ManifestError, ManifestKey, ManifestKeys};
pub use source::{BlockSink, BlockSource, MemorySink, MemorySource, RestoreInfo};
pub use target::{
    BackupTarget, Body, Destination, LocalTarget, ObjectKey, S3Options, S3Target, TargetError,
};

/// Size of one export block (and of one stored ciphertext block).
pub const BLOCK_SIZE: usize = 4096;
/// Size of one entry slot of the v2 store format.
pub const SLOT_LEN: usize = 64;
/// The store on-disk format whose slots and ciphertext backups carry.
pub const STORE_FORMAT: u32 = 2;

/// Errors from a [`BlockSource`] or [`BlockSink`] (the store's own error types,
/// boxed so this layer does not depend on them).
pub type DynError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the backup layer. Each message names the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The destination failed (I/O, S3, missing object).
    #[error(transparent)]
    Target(#[from] TargetError),
    /// A manifest is malformed, unauthenticated or inconsistent.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A chunk object does not match its manifest or is malformed.
    #[error("chunk {sha256} of backup {backup}: {source}; the backup is damaged: restore from another backup")]
    Chunk {
        /// The chunk's address.
        sha256: String,
        /// The backup that references it.
        backup: String,
        /// What is wrong.
        source: ChunkError,
    },
    /// The chain of a backup is broken or inconsistent.
    #[error("backup chain of {backup}: {detail}")]
    Chain {
        /// The backup whose chain was resolved.
        backup: String,
        /// What is wrong, and the fix.
        detail: String,
    },
    /// The block source (the store) failed.
    #[error("reading the export for backup failed: {0}")]
    Source(DynError),
    /// The block sink (the restore destination) failed.
    #[error("writing the restored export failed: {0}")]
    Sink(DynError),
    /// The caller passed inconsistent arguments.
    #[error("{0}")]
    Invalid(String),
}
