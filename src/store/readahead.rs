//! Read-ahead of a backing file's groups for a full backup.
//!
//! A full backup reads the whole file once, in group order. Read one group
//! at a time, the disk sees a single request at a time. [`ReadAhead`]
//! instead keeps a few threads reading the next groups at once, each into a
//! buffer of its own. Offline, with nothing else writing the file, they use
//! direct I/O where the filesystem allows it: the disk fills the buffer, no
//! CPU copy, and nothing passes through the page cache. Online they read
//! through the page cache: a direct read holds the inode lock that the
//! sidecar's buffered writes need (ext4) while it writes back and waits for
//! the dirty pages of its range, which stalls the foreground's writes.
//!
//! The reads run without the groups' block locks. That is safe for a cut:
//! any change to a block the backup has not copied yet first preserves the
//! block as of the cut, and the backup takes a preserved copy before
//! anything read from disk. A block that is still pending and not preserved
//! when its group is taken has not changed since the cut, so whatever was
//! read of it, at any moment after the cut, is its content at the cut.
//!
//! Per group, a thread reads the 32 KiB of slot pairs, then the data of the
//! span of blocks whose pair is not all zeros (none for a group never
//! written, so a sparse export costs its metadata only).

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use bytes::Bytes;

use super::backing::Backing;
use super::format::{self, BLOCK_SIZE, GROUP_BLOCKS, PAIR_SIZE};
use crate::fsutil::{direct_refused, AlignedBuf, DIRECT_ALIGN};

/// Threads reading ahead with direct I/O, each with up to one finished group
/// waiting: with 1 MiB groups, about the queue depth at which a virtual disk
/// reaches its sequential read speed with direct I/O.
pub(crate) const DIRECT_THREADS: usize = 4;
/// Threads reading ahead through the page cache (the kernel's own readahead
/// adds depth).
pub(crate) const BUFFERED_THREADS: usize = 2;

/// Reads a whole range at an offset through the page cache.
pub(crate) type ReadAt = Arc<dyn Fn(&mut [u8], u64) -> std::io::Result<()> + Send + Sync>;

/// One group, read ahead.
#[derive(Debug)]
pub(crate) struct GroupRead {
    /// The group's slot pairs, `PAIR_SIZE` bytes per block.
    pub pairs: Bytes,
    /// The stored data of blocks `lo..lo + data.len() / BLOCK_SIZE` (group
    /// indices), covering every block whose pair is not all zeros.
    pub data: Option<(usize, Bytes)>,
}

/// Groups `0..groups` of a backing file, read ahead in order (see the module
/// docs). Dropping it stops the threads after their current read.
#[derive(Debug)]
pub(crate) struct ReadAhead {
    rx: Vec<Receiver<std::io::Result<GroupRead>>>,
    next: u64,
    threads: u64,
}

impl ReadAhead {
    /// Starts the threads. `direct` is the file opened for direct I/O, if
    /// the filesystem allows it; `buffered` is the export's own handle,
    /// used without it (and if a direct read is refused).
    pub fn start(direct: Option<Backing>, buffered: ReadAt, blocks: u64) -> std::io::Result<Self> {
        let groups = blocks.div_ceil(GROUP_BLOCKS);
        let threads = if direct.is_some() {
            DIRECT_THREADS
        } else {
            BUFFERED_THREADS
        };
        let direct = direct.map(Arc::new);
        let mut rx = Vec::with_capacity(threads);
        for k in 0..threads {
            let (tx, r) = sync_channel(1);
            let direct = direct.clone();
            let buffered = Arc::clone(&buffered);
            std::thread::Builder::new()
                .name("ear-backup-ahead".into())
                .spawn(move || {
                    let mut reader = Reader { direct, buffered };
                    let mut g = k as u64;
                    while g < groups {
                        let r = reader.group(g, blocks);
                        let failed = r.is_err();
                        // The receiver is gone: the backup ended or failed.
                        if tx.send(r).is_err() || failed {
                            return;
                        }
                        g += threads as u64;
                    }
                })?;
            rx.push(r);
        }
        Ok(Self {
            rx,
            next: 0,
            threads: threads as u64,
        })
    }

    /// Group `g`, which must be the next one (groups are taken in order).
    pub fn take(&mut self, g: u64) -> std::io::Result<GroupRead> {
        if g != self.next {
            return Err(std::io::Error::other(format!(
                "internal: read-ahead asked for group {g}, expected {}",
                self.next
            )));
        }
        self.next += 1;
        self.rx[(g % self.threads) as usize]
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("backup read-ahead thread stopped")))
    }
}

struct Reader {
    direct: Option<Arc<Backing>>,
    buffered: ReadAt,
}

impl Reader {
    /// Reads `len` bytes at `off` into a fresh buffer, directly if possible.
    fn read(&mut self, len: usize, off: u64) -> std::io::Result<Bytes> {
        let mut ab = AlignedBuf::new(len);
        let buf = ab.as_mut_slice();
        let aligned = len.is_multiple_of(DIRECT_ALIGN) && off.is_multiple_of(DIRECT_ALIGN as u64);
        match &self.direct {
            Some(d) if aligned => match d.read_full_at(buf, off) {
                Ok(()) => {}
                // Direct I/O refused after all (alignment rules of this
                // filesystem): go on through the page cache.
                Err(e) if direct_refused(&e) => {
                    self.direct = None;
                    (self.buffered)(buf, off)?;
                }
                Err(e) => return Err(e),
            },
            _ => (self.buffered)(buf, off)?,
        }
        Ok(ab.into_bytes(len))
    }

    fn group(&mut self, g: u64, blocks: u64) -> std::io::Result<GroupRead> {
        let first = g * GROUP_BLOCKS;
        let n = (blocks - first).min(GROUP_BLOCKS) as usize;
        // Whole 4 KiB pages of pairs (a group's pair area is always whole).
        let pair_len = (n * PAIR_SIZE).next_multiple_of(DIRECT_ALIGN);
        let pairs = self
            .read(pair_len, format::pair_offset(first))?
            .slice(..n * PAIR_SIZE);
        let used = |i: &usize| pairs[i * PAIR_SIZE..(i + 1) * PAIR_SIZE] != [0u8; PAIR_SIZE];
        let lo = (0..n).find(used);
        let hi = (0..n).rev().find(used);
        let data = match (lo, hi) {
            (Some(lo), Some(hi)) => Some((
                lo,
                self.read(
                    (hi - lo + 1) * BLOCK_SIZE,
                    format::data_offset(first + lo as u64),
                )?,
            )),
            _ => None,
        };
        Ok(GroupRead { pairs, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Writes a backing-file body where `used` blocks have a pair and data.
    fn file_with(path: &std::path::Path, blocks: u64, used: &[u64]) {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(format::DATA_START + blocks.div_ceil(GROUP_BLOCKS) * format::GROUP_BYTES)
            .unwrap();
        for &b in used {
            f.write_all_at(&[b as u8 | 1; PAIR_SIZE], format::pair_offset(b))
                .unwrap();
            f.write_all_at(&[b as u8; BLOCK_SIZE], format::data_offset(b))
                .unwrap();
        }
    }

    #[test]
    fn groups_come_in_order_with_their_used_span_direct_or_not() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        // Three groups, the middle one never written, the last one partial.
        let blocks = 2 * GROUP_BLOCKS + 100;
        file_with(&p, blocks, &[3, 5, 200, 2 * GROUP_BLOCKS + 99]);
        for direct in [true, false] {
            let f = Arc::new(std::fs::File::open(&p).unwrap());
            let buffered = Arc::new(move |buf: &mut [u8], off: u64| f.read_exact_at(buf, off));
            let dio = direct.then(|| Backing::open_direct(&p).ok()).flatten();
            let mut ra = ReadAhead::start(dio, buffered, blocks).unwrap();
            assert!(ra.take(1).is_err(), "groups are taken in order");
            let g0 = ra.take(0).unwrap();
            assert_eq!(g0.pairs.len(), GROUP_BLOCKS as usize * PAIR_SIZE);
            assert_eq!(g0.pairs[5 * PAIR_SIZE], 5);
            let (lo, data) = g0.data.unwrap();
            assert_eq!((lo, data.len()), (3, (200 - 3 + 1) * BLOCK_SIZE));
            assert_eq!(data[2 * BLOCK_SIZE], 5);
            assert_eq!(data[197 * BLOCK_SIZE + 7], 200);
            let g1 = ra.take(1).unwrap();
            assert!(g1.data.is_none(), "nothing read for a group never written");
            let g2 = ra.take(2).unwrap();
            assert_eq!(g2.pairs.len(), 100 * PAIR_SIZE);
            let (lo, data) = g2.data.unwrap();
            assert_eq!((lo, data.len()), (99, BLOCK_SIZE));
            assert_eq!(data[0], (2 * GROUP_BLOCKS + 99) as u8);
        }
    }
}
