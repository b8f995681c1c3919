//! Durable file replacement: [`write_atomic`] (temp file, fsync, rename,
//! fsync directory) and [`sync_dir`]. Used by the key registry, the local
//! KEK file and the store, so each crash-safety rule is written once.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
