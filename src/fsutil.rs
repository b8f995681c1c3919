//! Durable file replacement: [`write_atomic`] (temp file, fsync, rename,
//! fsync directory) and [`sync_dir`]. Used by the key registry, the local
//! KEK file and the store, so each crash-safety rule is written once. Also
//! the direct-I/O helpers ([`open_direct`], [`AlignedBuf`]) that backups
//! and restores read with, in the store and in the local backup target.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Alignment of buffers, offsets and lengths for direct I/O (the page size,
/// which covers every logical block size in use).
pub const DIRECT_ALIGN: usize = 4096;

/// Opens `path` read-only with direct I/O (`O_DIRECT`): reads go from the
/// disk into the caller's buffer without a copy through the page cache, and
/// without evicting what is cached there. The kernel writes back dirty
/// cached pages of a range before reading it directly, so these reads see
/// everything written through the page cache. Buffers, offsets and lengths
/// must be aligned to [`DIRECT_ALIGN`]. Fails on file systems without
/// direct I/O (and a read may still fail with `EINVAL`: callers fall back to
/// the page cache).
pub fn open_direct(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
}

/// True for the error a direct read gives when this file system refuses it.
pub fn direct_refused(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// A zero-filled buffer of `len` bytes starting at a [`DIRECT_ALIGN`]ed
/// address, for direct reads (the vector is over-allocated by one
/// alignment, so no unsafe allocation is needed), handed on as [`Bytes`]
/// without a copy.
#[derive(Debug)]
pub struct AlignedBuf {
    v: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let v = vec![0u8; len + DIRECT_ALIGN];
        // An offset below the alignment always exists for u8.
        let at = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { v, at, len }
    }

    /// The aligned bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.v[self.at..self.at + self.len]
    }

    /// The first `n` aligned bytes (at most the buffer's length), as
    /// [`Bytes`].
    pub fn into_bytes(self, n: usize) -> bytes::Bytes {
        let end = self.at + n.min(self.len);
        bytes::Bytes::from(self.v).slice(self.at..end)
    }
}

/// A file-system step that failed, with what was being done and the path.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct FsError {
    /// The step and the path, e.g. `fsync directory /data`.
    pub what: String,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

impl FsError {
    fn new(what: &str, path: &Path, source: std::io::Error) -> Self {
        Self {
            what: format!("{what} {}", path.display()),
            source,
        }
    }
}

/// fsyncs the directory containing `path`, so a create or rename in it is
/// durable.
pub fn sync_dir(path: &Path) -> Result<(), FsError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FsError::new("fsync directory", dir, e))
}

/// Replaces `path` with `bytes` atomically: writes `<path>.tmp` (mode 0600,
/// removed first if stale), fsyncs it, renames it over `path`, fsyncs the
/// directory. A crash leaves either the old or the new file, never a mix.
/// Not safe for concurrent writers of the same path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let mut tmp_name = path.as_os_str().to_os_string();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(FsError::new("remove stale", &tmp, e)),
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| FsError::new("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| FsError::new("write", &tmp, e))?;
        f.sync_all().map_err(|e| FsError::new("fsync", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| FsError::new("rename over", path, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn aligned_buffers_are_aligned_and_hand_on_their_bytes() {
        for len in [0, 1, 4096, 100_000] {
            let mut b = AlignedBuf::new(len);
            let s = b.as_mut_slice();
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % DIRECT_ALIGN, 0);
            s.fill(7);
            let bytes = b.into_bytes(len / 2);
            assert_eq!(bytes.len(), len / 2);
            assert!(bytes.iter().all(|&x| x == 7));
        }
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // A stale tmp from a crash is replaced, not an obstacle.
        std::fs::write(dir.path().join("f.tmp"), b"stale").unwrap();
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["f".to_string()]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn sync_dir_of_a_bare_file_name_uses_the_cwd() {
        sync_dir(Path::new("x")).unwrap();
    }
}
