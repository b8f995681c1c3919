//! Positional I/O on a backing file: the only place the store calls
//! pread/pwrite/fdatasync/fallocate. Test builds can attach a [`Recorder`]
//! that logs every write since the last fdatasync, from which the crash
//! tests build power-loss and process-crash images of the file.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// A backing file.
#[derive(Debug)]
pub(crate) struct Backing {
    file: File,
    #[cfg(test)]
    rec: Option<std::sync::Arc<Recorder>>,
}

impl Backing {
    pub(crate) fn new(file: File) -> Self {
        Backing {
            file,
            #[cfg(test)]
            rec: recorder::current(),
        }
    }

    /// Opens `path` read-only with direct I/O (see
    /// [`crate::fsutil::open_direct`]).
    pub(crate) fn open_direct(path: &std::path::Path) -> std::io::Result<Self> {
        crate::fsutil::open_direct(path).map(Backing::new)
    }

    /// True when this handle was opened read-only (an offline backup or
    /// check: nothing writes through it).
    pub(crate) fn is_read_only(&self) -> bool {
        use rustix::fs::OFlags;
        rustix::fs::fcntl_getfl(&self.file)
            .is_ok_and(|f| !f.intersects(OFlags::WRONLY | OFlags::RDWR))
    }

    /// Reads `buf.len()` bytes at `off`. The file is always at least as long
    /// as its header's size requires (it is extended before a header grows
    /// it), so hitting end of file means it was truncated: that is an error,
    /// never zeros.
    pub(crate) fn read_full_at(&self, mut buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, off) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "backing file is shorter than its header says (truncated)",
                    ))
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    off += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(crate) fn write_all_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(r) = &self.rec {
            r.write(off, buf);
        }
        self.file.write_all_at(buf, off)
    }

    pub(crate) fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()?;
        #[cfg(test)]
        if let Some(r) = &self.rec {
            r.synced(&self.file);
        }
        Ok(())
    }

    pub(crate) fn sync_all(&self) -> std::io::Result<()> {
        self.file.sync_all()?;
        #[cfg(test)]
        if let Some(r) = &self.rec {
            r.synced(&self.file);
        }
        Ok(())
    }

    pub(crate) fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }

    pub(crate) fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The offset of the first allocated byte at or after `off`
    /// (`SEEK_DATA`), or `None` when the rest of the file is a hole.
    pub(crate) fn next_data(&self, off: u64) -> std::io::Result<Option<u64>> {
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(off)) {
            Ok(o) => Ok(Some(o)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deallocates a byte range (best effort: where hole punching is not
    /// available the zero slots alone already make the blocks read as zeros).
    pub(crate) fn punch_hole(&self, offset: u64, len: u64) {
        use rustix::fs::{fallocate, FallocateFlags};
        #[cfg(test)]
        if let Some(r) = &self.rec {
            r.write(offset, &vec![0u8; len as usize]);
        }
        if let Err(e) = fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            tracing::debug!(error = %e, "hole punching not available");
        }
    }
}

#[cfg(test)]
pub(crate) use recorder::Recorder;

#[cfg(test)]
pub(crate) mod recorder {
    //! dm-log-writes for tests: every write since the last fdatasync, and
    //! the file as it was at that fdatasync.
    use std::cell::RefCell;
    use std::fs::File;
    use std::sync::{Arc, Mutex};

    thread_local! {
        static CURRENT: RefCell<Option<Arc<Recorder>>> = const { RefCell::new(None) };
    }

    /// Backing files opened on this thread while `r` is installed record into it.
    pub(crate) fn install(r: Option<Arc<Recorder>>) {
        CURRENT.with(|c| *c.borrow_mut() = r);
    }

    pub(super) fn current() -> Option<Arc<Recorder>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// The log.
    #[derive(Debug, Default)]
    pub(crate) struct Recorder {
        inner: Mutex<Log>,
    }

    #[derive(Debug, Default, Clone)]
    pub(crate) struct Log {
        /// The file at the last fdatasync.
        pub synced: Vec<u8>,
        /// Writes since, in order: (offset, bytes).
        pub writes: Vec<(u64, Vec<u8>)>,
    }

    impl Recorder {
        pub(super) fn write(&self, off: u64, buf: &[u8]) {
            self.inner.lock().unwrap().writes.push((off, buf.to_vec()));
        }

        pub(super) fn synced(&self, f: &File) {
            let mut g = self.inner.lock().unwrap();
            g.writes.clear();
            g.synced = std::fs::read(format!("/proc/self/fd/{}", fd(f))).unwrap();
        }

        /// A copy of the log.
        pub(crate) fn log(&self) -> Log {
            self.inner.lock().unwrap().clone()
        }
    }

    fn fd(f: &File) -> i32 {
        use std::os::fd::AsRawFd;
        f.as_raw_fd()
    }
}
