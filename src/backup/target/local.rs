//! The local-directory target: temp file, fsync, rename, fsync directory.
//!
//! A backup's objects (`put_staged`) are batched instead: each is written to
//! a temporary file without a sync, and once a batch holds
//! [`STAGE_BATCH`] bytes (and at `sync_staged`) one `syncfs(2)` makes every
//! temporary of the batch durable, then they are renamed into place. A
//! name therefore still always means a complete object, but the disk sees
//! one flush per batch rather than one per object (an fsync per 4 MiB
//! object held a backup to a third of the disk's sequential speed).
//! `syncfs` also writes back other dirty data of that file system: work that
//! page-cache writeback would do anyway, only earlier.

use async_trait::async_trait;
use bytes::Bytes;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::*;

/// A local directory target. Layout: `<root>/<key>`, temporaries in
/// `<root>/.tmp/` (never listed; a crash may leave some, removed on open).
#[derive(Debug, Clone)]
pub struct LocalTarget {
    root: PathBuf,
    /// Directories holding names created by `put_staged` and not yet
    /// synced (shared by clones: the blocking tasks work on clones).
    pub(super) unsynced: Arc<std::sync::Mutex<std::collections::BTreeSet<PathBuf>>>,
    /// Objects written to temporaries by `put_staged`, not yet synced and
    /// renamed (shared by clones).
    staged: Arc<std::sync::Mutex<Staged>>,
    /// Staged bytes at which a batch is committed.
    batch_bytes: u64,
}

/// A batch of staged objects: (temporary, destination) and their bytes.
#[derive(Debug, Default)]
struct Staged {
    files: Vec<(PathBuf, PathBuf)>,
    bytes: u64,
}

/// Staged bytes after which a batch is synced and renamed into place: large
/// enough that the flush is cheap next to the writes, small enough that an
/// interrupted backup leaves most of its objects for the next one to re-use.
pub const STAGE_BATCH: u64 = 64 << 20;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TargetError {
    let path = path.to_path_buf();
    move |source| TargetError::Io { what, path, source }
}

/// Writes `parts` back to back (`writev`, as many pieces per call as the
/// kernel takes).
fn write_all_parts<P: AsRef<[u8]>>(f: &mut std::fs::File, parts: &[P]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = parts
        .iter()
        .map(|p| std::io::IoSlice::new(p.as_ref()))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match f.write_vectored(rest) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Objects at least this long are read with direct I/O.
const DIRECT_MIN: u64 = 256 << 10;

/// Reads a whole object. A large one (a chunk) is read with direct I/O where
/// the file system has it: the disk fills the buffer without a copy through
/// the page cache, and a restore does not fill the node's page cache with
/// backup data. Anything else, or a refusal, reads through the page cache.
fn read_object(p: &Path) -> std::io::Result<Bytes> {
    use crate::fsutil::{direct_refused, open_direct, AlignedBuf, DIRECT_ALIGN};
    use std::os::unix::fs::FileExt;
    if let Ok(f) = open_direct(p) {
        let len = f.metadata()?.len();
        if let Some(n) = usize::try_from(len).ok().filter(|_| len >= DIRECT_MIN) {
            let cap = n.next_multiple_of(DIRECT_ALIGN);
            let mut ab = AlignedBuf::new(cap);
            let buf = ab.as_mut_slice();
            let mut done = 0usize;
            let complete = loop {
                match f.read_at(&mut buf[done..], done as u64) {
                    Ok(0) => break done == n,
                    Ok(k) => {
                        done += k;
                        // A read that ends off the alignment ends the file.
                        if done >= n || !done.is_multiple_of(DIRECT_ALIGN) {
                            break done == n;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if direct_refused(&e) => break false,
                    Err(e) => return Err(e),
                }
            };
            if complete {
                return Ok(ab.into_bytes(n));
            }
        }
    }
    std::fs::read(p).map(Bytes::from)
}

fn sync_dir(dir: &Path) -> Result<(), TargetError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TargetError> + Send + 'static,
) -> Result<T, TargetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TargetError::Invalid(format!("backup I/O task failed: {e}")))?
}

impl LocalTarget {
    /// Opens (creating if needed) the directory `root`; removes stale temporaries.
    pub async fn open(root: PathBuf) -> Result<Self, TargetError> {
        blocking(move || {
            let tmp = root.join(TMP_DIR);
            std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
            for e in std::fs::read_dir(&tmp).map_err(io("reading", &tmp))? {
                let p = e.map_err(io("reading", &tmp))?.path();
                let _ = std::fs::remove_file(&p);
            }
            sync_dir(&root)?;
            Ok(Self {
                root,
                unsynced: Arc::default(),
                staged: Arc::default(),
                batch_bytes: STAGE_BATCH,
            })
        })
        .await
    }

    /// Commits staged objects in batches of `bytes` instead of
    /// [`STAGE_BATCH`] (1: each object on its own, synced and renamed
    /// before `put_staged` returns).
    pub fn with_batch_bytes(mut self, bytes: u64) -> Self {
        self.batch_bytes = bytes.max(1);
        self
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// Writes `data` to a fresh temporary file, fsynced; returns its path.
    fn write_temp(&self, data: &[u8]) -> Result<PathBuf, TargetError> {
        self.write_temp_with(&[data], true)
    }

    /// Writes the pieces `data` back to back to a fresh temporary file
    /// (fsynced if `sync`), with vectored writes.
    fn write_temp_with<P: AsRef<[u8]>>(
        &self,
        data: &[P],
        sync: bool,
    ) -> Result<PathBuf, TargetError> {
        let mut r = [0u8; 12];
        crate::crypto::fill_random(&mut r).map_err(|e| TargetError::Invalid(e.to_string()))?;
        let tmp = self.root.join(TMP_DIR).join(hex::encode(r));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        let res = write_all_parts(&mut f, data)
            .and_then(|_| {
                if sync {
                    f.sync_all()
                } else {
                    // Start the write-back now (POSIX_FADV_DONTNEED writes
                    // dirty pages without waiting, and drops them from the
                    // page cache once clean): the batch's flush then finds
                    // most of it on disk, and backup data does not crowd
                    // the page cache of the node's database.
                    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
                        .map_err(std::io::Error::from)
                }
            })
            .map_err(io("writing", &tmp));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map(|_| tmp)
    }

    fn ensure_parent(&self, path: &Path) -> Result<PathBuf, TargetError> {
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        if !parent.is_dir() {
            std::fs::create_dir_all(&parent).map_err(io("creating", &parent))?;
            // Make the new directory entries durable up to the root.
            let mut d = parent.as_path();
            while let Some(up) = d.parent() {
                sync_dir(up)?;
                if up == self.root {
                    break;
                }
                d = up;
            }
        }
        Ok(parent)
    }

    /// Writes an object: its content is durable before its name appears, so
    /// a name always means a complete object; the name itself is durable
    /// when this returns, or, for `sync_parent == false`, once the parent is
    /// synced (the caller records it).
    fn put_sync(&self, key: &ObjectKey, data: &[u8], replace: bool) -> Result<(), TargetError> {
        let parent = self.put_unsynced(key, data, replace)?;
        sync_dir(&parent)
    }

    fn put_unsynced(
        &self,
        key: &ObjectKey,
        data: &[u8],
        replace: bool,
    ) -> Result<PathBuf, TargetError> {
        let dst = self.path(key);
        let parent = self.ensure_parent(&dst)?;
        let tmp = self.write_temp(data)?;
        let res = if replace {
            std::fs::rename(&tmp, &dst).map_err(io("renaming into", &dst))
        } else {
            // link(2) fails with EEXIST if the name exists: an atomic
            // create-if-absent; then drop the temporary name. File systems
            // without hard links get check-then-rename (one writer per
            // destination is the rule anyway).
            let r = std::fs::hard_link(&tmp, &dst).or_else(|e| match e.kind() {
                ErrorKind::Unsupported | ErrorKind::PermissionDenied if !dst.exists() => {
                    std::fs::rename(&tmp, &dst)
                }
                _ => Err(e),
            });
            let r = r.map_err(|e| {
                if e.kind() == ErrorKind::AlreadyExists {
                    TargetError::Exists {
                        target: self.describe(),
                        key: key.to_string(),
                    }
                } else {
                    TargetError::Io {
                        what: "linking",
                        path: dst.clone(),
                        source: e,
                    }
                }
            });
            let _ = std::fs::remove_file(&tmp);
            r
        };
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res?;
        Ok(parent)
    }

    /// Writes a staged object to an unsynced temporary; commits the batch
    /// once it is full.
    fn stage(&self, key: &ObjectKey, data: &Body) -> Result<(), TargetError> {
        let dst = self.path(key);
        self.ensure_parent(&dst)?;
        let tmp = self.write_temp_with(data.parts(), false)?;
        let full = {
            let mut s = self.staged.lock().unwrap_or_else(|p| p.into_inner());
            s.files.push((tmp, dst));
            s.bytes += data.len() as u64;
            (s.bytes >= self.batch_bytes).then(|| std::mem::take(&mut *s))
        };
        match full {
            Some(batch) => self.commit(batch),
            None => Ok(()),
        }
    }

    /// Makes a batch's temporaries durable with one `syncfs`, then renames
    /// them into place; their directories join the unsynced set. On an
    /// error the batch's temporaries are removed (the objects are simply
    /// absent, which the caller's error makes it retry or give up on).
    fn commit(&self, batch: Staged) -> Result<(), TargetError> {
        if batch.files.is_empty() {
            return Ok(());
        }
        let res = self.syncfs().and_then(|()| {
            for (tmp, dst) in &batch.files {
                std::fs::rename(tmp, dst).map_err(io("renaming into", dst))?;
                if let Some(d) = dst.parent() {
                    self.unsynced
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(d.to_path_buf());
                }
            }
            Ok(())
        });
        if res.is_err() {
            for (tmp, _) in &batch.files {
                let _ = std::fs::remove_file(tmp);
            }
        }
        res
    }

    /// `syncfs(2)` on the target's file system.
    fn syncfs(&self) -> Result<(), TargetError> {
        std::fs::File::open(&self.root)
            .and_then(|d| rustix::fs::syncfs(&d).map_err(std::io::Error::from))
            .map_err(io("syncing the file system of", &self.root))
    }

    fn list_sync(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TargetError> {
        // Scan the deepest directory the prefix names.
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let mut out = Vec::new();
        let mut stack = vec![(self.root.join(dir_part), dir_part.to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io("listing", &dir)(e)),
            };
            for e in rd {
                let e = e.map_err(io("listing", &dir))?;
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let key = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                let md = e.metadata().map_err(io("listing", &e.path()))?;
                if md.is_dir() {
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        stack.push((e.path(), key));
                    }
                } else if md.is_file() && key.starts_with(prefix) {
                    out.push(ObjectInfo {
                        key,
                        size: md.len(),
                        modified: md.modified().ok(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[async_trait]
impl BackupTarget for LocalTarget {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError> {
        let (t, k) = (self.clone(), key.clone());
        blocking(move || t.put_sync(&k, &data, true)).await
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, TargetError> {
        let (t, k) = (self.clone(), key.clone());
        blocking(move || {
            let p = t.path(&k);
            match read_object(&p) {
                Ok(v) => Ok(v),
                Err(e) if e.kind() == ErrorKind::NotFound => Err(TargetError::NotFound {
                    target: t.describe(),
                    key: k.to_string(),
                }),
                Err(e) => Err(io("reading", &p)(e)),
            }
        })
        .await
    }

    async fn exists(&self, key: &ObjectKey) -> Result<bool, TargetError> {
        let p = self.path(key);
        let unsynced = Arc::clone(&self.unsynced);
        blocking(move || match std::fs::metadata(&p) {
            Ok(m) => {
                // A backup may now reference this object instead of
                // storing it: its name, perhaps made by a backup that died
                // before syncing, must be durable before that manifest is.
                if let Some(d) = p.parent().filter(|_| m.is_file()) {
                    unsynced
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(d.to_path_buf());
                }
                Ok(m.is_file())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("checking", &p)(e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TargetError> {
        let (t, p) = (self.clone(), prefix.to_string());
        blocking(move || t.list_sync(&p)).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), TargetError> {
        let p = self.path(key);
        blocking(move || {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io("deleting", &p)(e)),
            }
            sync_dir(p.parent().unwrap_or(Path::new("/")))
        })
        .await
    }

    async fn publish(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError> {
        let (t, k) = (self.clone(), key.clone());
        blocking(move || t.put_sync(&k, &data, false)).await
    }

    async fn put_staged(&self, key: &ObjectKey, data: Body) -> Result<(), TargetError> {
        let (t, k) = (self.clone(), key.clone());
        blocking(move || t.stage(&k, &data)).await
    }

    async fn sync_staged(&self) -> Result<(), TargetError> {
        let t = self.clone();
        blocking(move || {
            let batch = std::mem::take(&mut *t.staged.lock().unwrap_or_else(|p| p.into_inner()));
            t.commit(batch)?;
            let dirs = std::mem::take(&mut *t.unsynced.lock().unwrap_or_else(|p| p.into_inner()));
            for (i, d) in dirs.iter().enumerate() {
                if let Err(e) = sync_dir(d) {
                    // Still unsynced: a retry syncs them again.
                    t.unsynced
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(dirs.iter().skip(i).cloned());
                    return Err(e);
                }
            }
            Ok(())
        })
        .await
    }
}
