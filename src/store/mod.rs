//! The encrypted store: a data directory of backing files, one per export,
//! each in the versioned format of [`format`] (see `doc/FORMAT.md`).
//!
//! The store owns file layout, block encryption, crash-atomic block updates,
//! read-modify-write, block locks, holes, durability, the scrub after an
//! unclean shutdown and the offline `check`. It takes a [`KeyRing`] (or none,
//! for the plaintext mode) and never talks to a key provider.

mod backing;
pub mod check;
pub mod export;
pub mod format;
mod locks;
mod readahead;
pub mod scrub;
mod slots;
pub mod snapshot;
pub mod spec;
pub mod sweep;
pub mod versions;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use export::{Export, ExportCounters, ExportOptions, IoStats};
pub use snapshot::{CutStats, DecryptCheckSink, ExportMeta, RestoreSink, Snapshot};
pub use spec::{ExportName, ExportSpec, Exports, NameError, SizeError};

use crate::crypto::{CryptoError, KeyRing};

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error on a backing file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A header that does not decode or authenticate.
    #[error("backing file {path}: {why}")]
    BadHeader {
        /// The file.
        path: String,
        /// Why it was refused.
        why: String,
    },
    /// A block whose stored form does not match its entry.
    #[error("export {export}: block {block} is unreadable: {why}")]
    Corrupt {
        /// Export name.
        export: String,
        /// Block index.
        block: u64,
        /// What failed.
        why: String,
    },
    /// A block whose authentication tag does not verify (integrity mode):
    /// tampered with, moved from another offset or file, or rolled to a
    /// different key version.
    #[error("export {export}: block {block} failed authentication (modified, moved or replaced on disk)")]
    AuthFailed {
        /// Export name.
        export: String,
        /// Block index.
        block: u64,
    },
    /// A request outside the export.
    #[error("range {offset}+{len} is outside the export of {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// A configured size below the existing one.
    #[error(
        "export {export} has {have} bytes; refusing to shrink it to {want} (exports can only grow)"
    )]
    Shrink {
        /// Export name.
        export: String,
        /// Current size.
        have: u64,
        /// Requested size.
        want: u64,
    },
    /// Invalid export configuration.
    #[error("{0}")]
    Config(String),
    /// Key unavailable (unknown version, failed closed, RNG failure).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl StoreError {
    /// Whether the backing storage ran out of room: the file system is full
    /// (`ENOSPC`), a quota is exhausted (`EDQUOT`) or the file-size limit was
    /// reached (`EFBIG`).
    pub fn is_no_space(&self) -> bool {
        const ENOSPC: i32 = 28;
        const EDQUOT: i32 = 122;
        const EFBIG: i32 = 27;
        matches!(self, StoreError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(ENOSPC | EDQUOT | EFBIG)))
    }

    /// A short, bounded label for metrics (`io`, `corrupt`, `nospace`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Io { .. } if self.is_no_space() => "nospace",
            StoreError::Io { .. } => "io",
            StoreError::BadHeader { .. } => "bad_header",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::AuthFailed { .. } => "auth_failed",
            StoreError::OutOfRange { .. } => "range",
            StoreError::Shrink { .. } | StoreError::Config(_) => "config",
            StoreError::Crypto(CryptoError::FailedClosed(_)) => "failed_closed",
            StoreError::Crypto(_) => "key",
        }
    }
}

impl From<crate::fsutil::FsError> for StoreError {
    fn from(e: crate::fsutil::FsError) -> Self {
        StoreError::Io {
            what: e.what,
            source: e.source,
        }
    }
}

/// File name suffix of backing files.
pub const SUFFIX: &str = ".ear";

/// Directory of backing files inside the data directory.
pub fn exports_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("exports")
}

/// Names of backing files present in `data_dir` (validated names only).
pub fn existing_exports(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    let dir = exports_dir(data_dir);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(source) => {
            return Err(StoreError::Io {
                what: format!("list {}", dir.display()),
                source,
            })
        }
    };
    let mut names = vec![];
    for ent in rd {
        let ent = ent.map_err(|source| StoreError::Io {
            what: format!("list {}", dir.display()),
            source,
        })?;
        let fname = ent.file_name();
        let Some(fname) = fname.to_str() else {
            continue;
        };
        if let Some(name) = fname.strip_suffix(SUFFIX) {
            if ExportName::parse(name).is_ok() {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// All open exports of a data directory.
#[derive(Debug)]
pub struct Store {
    exports: BTreeMap<String, Arc<Export>>,
}

impl Store {
    /// Opens every backing file in `data_dir`, creating or growing those in
    /// `specs`. `keys` is `None` for a plaintext directory.
    pub fn open(
        data_dir: &Path,
        dir_id: [u8; 16],
        keys: Option<Arc<KeyRing>>,
        specs: &[ExportSpec],
    ) -> Result<Store, StoreError> {
        Self::open_opts(data_dir, dir_id, keys, specs, ExportOptions::default())
    }

    /// Like [`Store::open`] with every option (per-block integrity for
    /// exports created now, the epoch size). Exports that were not closed
    /// cleanly get a background scrub.
    pub fn open_opts(
        data_dir: &Path,
        dir_id: [u8; 16],
        keys: Option<Arc<KeyRing>>,
        specs: &[ExportSpec],
        opts: ExportOptions,
    ) -> Result<Store, StoreError> {
        let s = Self::open_no_scrub(data_dir, dir_id, keys, specs, opts)?;
        for e in s.exports.values() {
            scrub::spawn(e);
            versions::spawn_census(e);
        }
        Ok(s)
    }

    /// Opens without starting scrubs (tests drive [`scrub::run`] themselves).
    pub(crate) fn open_no_scrub(
        data_dir: &Path,
        dir_id: [u8; 16],
        keys: Option<Arc<KeyRing>>,
        specs: &[ExportSpec],
        opts: ExportOptions,
    ) -> Result<Store, StoreError> {
        if opts.epoch_writes == 0 || opts.epoch_writes > format::MAX_EPOCH_WRITES {
            return Err(StoreError::Config(format!(
                "epoch size {} is outside 1..=2^32",
                opts.epoch_writes
            )));
        }
        let mode = opts.integrity;
        let dir = exports_dir(data_dir);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| StoreError::Io {
                    what: format!("create {}", dir.display()),
                    source,
                })?;
        }
        let mut exports = BTreeMap::new();
        for name in existing_exports(data_dir)? {
            let path = dir.join(format!("{name}{SUFFIX}"));
            let e = Export::open(&path, &name, dir_id, keys.clone(), opts)?;
            if e.header().integrity != mode {
                tracing::warn!(export = %name, header = ?e.header().integrity, configured = ?mode,
                    "existing export keeps the per-block integrity mode it was created with");
            }
            exports.insert(name, e);
        }
        for spec in specs {
            if spec.size == 0 || spec.size > format::MAX_EXPORT_SIZE {
                return Err(StoreError::Config(format!(
                    "export {}: size {} is outside 1..={}",
                    spec.name,
                    spec.size,
                    format::MAX_EXPORT_SIZE
                )));
            }
            match exports.get_mut(spec.name.as_str()) {
                Some(e) => {
                    if spec.size > e.size() {
                        tracing::info!(export = %spec.name, from = e.size(), to = spec.size, "growing export");
                    }
                    e.grow(spec.size)?
                }
                None => {
                    let path = dir.join(format!("{}{SUFFIX}", spec.name));
                    tracing::info!(export = %spec.name, size = spec.size, "creating export");
                    let e = Export::create(
                        &path,
                        spec.name.as_str(),
                        spec.size,
                        dir_id,
                        keys.clone(),
                        opts,
                    )?;
                    exports.insert(spec.name.to_string(), e);
                }
            }
        }
        Ok(Store {
            exports: exports.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        })
    }

    /// Switches every export to encryption under `ring` (`keys encrypt`):
    /// see [`Export::enable_encryption`].
    pub fn enable_encryption(&self, ring: &Arc<KeyRing>) -> Result<(), StoreError> {
        for e in self.exports.values() {
            e.enable_encryption(Arc::clone(ring))?;
        }
        Ok(())
    }

    /// The export called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        self.exports.get(name)
    }

    /// The export the empty name selects: `default`, or the only export.
    pub fn default_export(&self) -> Option<&Arc<Export>> {
        self.exports.get("default").or_else(|| {
            if self.exports.len() == 1 {
                self.exports.values().next()
            } else {
                None
            }
        })
    }

    /// All exports, by name.
    pub fn exports(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.values()
    }

    /// Durably flushes every export.
    pub fn flush_all(&self) -> Result<(), StoreError> {
        for e in self.exports.values() {
            e.flush()?;
        }
        Ok(())
    }

    /// Clean shutdown: stops scrubs, flushes every export and marks it
    /// closed cleanly (see [`Export::close`]).
    pub fn close(&self) -> Result<(), StoreError> {
        for e in self.exports.values() {
            e.close()?;
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Scrub threads hold weak references; tell them to stop now.
        for e in self.exports.values() {
            e.stop_scrub
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// What `status` shows about a backing file, read without keys (unverified).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// Size in bytes per the header.
    pub size: u64,
    /// Cipher recorded in the header.
    pub algorithm: String,
    /// Header key version.
    pub header_key_version: u32,
    /// Per-block check: `xxh3` or `gmac`.
    pub integrity: String,
    /// `clean` or `open` (running, or not closed cleanly).
    pub state: String,
    /// Highest key epoch reserved.
    pub epoch: u32,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
    /// Problem decoding the header, if any.
    pub error: Option<String>,
}

/// Reads export headers for `status` without keys (the MAC is not checked).
pub fn inspect(data_dir: &Path) -> Result<Vec<ExportInfo>, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let mut out = vec![];
    for name in existing_exports(data_dir)? {
        let path = exports_dir(data_dir).join(format!("{name}{SUFFIX}"));
        let mut info = ExportInfo {
            name: name.clone(),
            size: 0,
            algorithm: String::new(),
            header_key_version: 0,
            integrity: String::new(),
            state: String::new(),
            epoch: 0,
            allocated_bytes: 0,
            error: None,
        };
        match (|| -> std::io::Result<(u64, u64, [u8; format::HEADER_BODY])> {
            let f = std::fs::File::open(&path)?;
            let md = f.metadata()?;
            let mut body = [0u8; format::HEADER_BODY];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut body, 0)?;
            Ok((md.blocks() * 512, md.len(), body))
        })() {
            Err(e) => info.error = Some(e.to_string()),
            Ok((alloc, len, body)) => {
                info.allocated_bytes = alloc;
                match format::Header::decode_body(&body) {
                    // The same length rule as opening the export: a file
                    // shorter than its header requires was truncated.
                    Ok(h) if len < format::file_len_for(h.size) => {
                        info.size = h.size;
                        info.error = Some(format!(
                            "the file is {len} bytes but its header requires {}: it was truncated (serve refuses it)",
                            format::file_len_for(h.size)
                        ));
                    }
                    Ok(h) => {
                        info.size = h.size;
                        info.algorithm = match h.algorithm {
                            format::Algorithm::None => "none".into(),
                            format::Algorithm::Aes256Ctr => "aes-256-ctr".into(),
                        };
                        info.header_key_version = h.header_key_version;
                        info.integrity = match h.integrity {
                            format::Integrity::Check => "xxh3".into(),
                            format::Integrity::Gmac => "gmac".into(),
                        };
                        info.state = match h.state {
                            format::State::Clean => "clean".into(),
                            format::State::Open => "open".into(),
                        };
                        info.epoch = h.epoch;
                    }
                    Err(e) => info.error = Some(e.to_string()),
                }
            }
        }
        out.push(info);
    }
    Ok(out)
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod sweep_tests;
#[cfg(test)]
mod tests;
