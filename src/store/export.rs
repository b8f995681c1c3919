//! One export: a backing file in the format of [`super::format`], with
//! positional block I/O, encryption, read-modify-write and hole handling.
//!
//! All methods here block (pread/pwrite/fdatasync); the server calls them from
//! a blocking-task pool, never on the async runtime's workers.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::format::{
    self, Algorithm, Entry, EntryState, Header, HeaderError, Integrity, BLOCK_SIZE, BLOCK_SIZE_U64,
    ENTRY_SIZE, GROUP_BLOCKS, HEADER_BODY, HEADER_MAC_AT, HEADER_SLOT,
};
use super::locks::StripeLocks;
use super::StoreError;
use crate::crypto::{fill_random, BlockCipher, FileKeys, KeyRing, NONCE_LEN};

/// Time a request spent in the cipher and in backing storage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoStats {
    /// AES-CTR encrypt/decrypt, block checksum and tag time.
    pub crypto: Duration,
    /// pread/pwrite/fdatasync/fallocate time.
    pub storage: Duration,
}

/// An open export.
pub struct Export {
    name: String,
    path: PathBuf,
    file: File,
    header: Header,
    keys: Option<Arc<KeyRing>>,
    locks: StripeLocks,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("size", &self.header.size)
            .field("encrypted", &self.keys.is_some())
            .finish()
    }
}

/// A timer that adds elapsed time to one of the stats fields.
fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    *acc += t.elapsed();
    r
}

/// Reads `buf.len()` bytes at `off`. The file is always at least as long as
/// its header's size requires (it is extended before a header grows it), so
/// hitting end of file means it was truncated: that is an error, never zeros.
fn read_full_at(file: &File, mut buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, off) {
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

/// Reads `buf.len()` bytes at `off`; with `nowait`, only from the page cache
/// (`preadv2(RWF_NOWAIT)`): anything that would wait for the disk, including
/// a partly cached range, is `ErrorKind::WouldBlock`.
fn read_at(file: &File, buf: &mut [u8], off: u64, nowait: bool) -> std::io::Result<()> {
    if !nowait {
        return read_full_at(file, buf, off);
    }
    use rustix::io::{preadv2, ReadWriteFlags};
    let want = buf.len();
    match preadv2(
        file,
        &mut [std::io::IoSliceMut::new(buf)],
        off,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(n) if n == want => Ok(()),
        // Short (partly cached, or end of file: the blocking path reports
        // truncation properly), would block, or not supported here.
        Ok(_) => Err(std::io::ErrorKind::WouldBlock.into()),
        Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::OPNOTSUPP => {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// How a segment read treats an entry/data mismatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadMode {
    /// Retry once under the block lock (a write may be in progress).
    Retry,
    /// Already under the lock: a mismatch is a torn or damaged block.
    Locked,
    /// Never block: page cache only, no locks; give up with `WouldBlock`.
    NoWait,
}

enum ZeroMode {
    Trim,
    Zero { no_hole: bool },
}

impl Export {
    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// The decoded header (no secrets).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when data is encrypted.
    pub fn encrypted(&self) -> bool {
        self.keys.is_some()
    }

    // ---- creation / opening -------------------------------------------------

    fn mode_algorithm(keys: &Option<Arc<KeyRing>>) -> Algorithm {
        if keys.is_some() {
            Algorithm::Aes256CtrR96
        } else {
            Algorithm::None
        }
    }

    fn header_slot_bytes(
        header: &Header,
        keys: &Option<Arc<KeyRing>>,
    ) -> Result<Vec<u8>, StoreError> {
        let body = header.encode_body();
        let mut slot = vec![0u8; HEADER_SLOT as usize];
        slot[..HEADER_BODY].copy_from_slice(&body);
        let mac: [u8; 32] = match keys {
            Some(ring) => ring
                .file_keys(&header.file_id, header.header_key_version)?
                .header_mac(&body),
            None => Sha256::digest(body).into(),
        };
        slot[HEADER_MAC_AT..HEADER_MAC_AT + 32].copy_from_slice(&mac);
        Ok(slot)
    }

    /// Creates a new backing file at `path` atomically (temp file, fsync,
    /// rename, fsync directory).
    pub(crate) fn create(
        path: &Path,
        name: &str,
        size: u64,
        dir_id: [u8; 16],
        keys: Option<Arc<KeyRing>>,
        integrity: Integrity,
    ) -> Result<Export, StoreError> {
        if integrity == Integrity::Gmac && keys.is_none() {
            return Err(StoreError::Config(
                "per-block integrity needs encryption".into(),
            ));
        }
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| StoreError::Io { what, source }
        };
        let mut file_id = [0u8; 16];
        fill_random(&mut file_id)?;
        let header = Header {
            algorithm: Self::mode_algorithm(&keys),
            integrity,
            header_key_version: keys.as_ref().map_or(0, |k| k.active_version()),
            file_id,
            size,
            sequence: 1,
            dir_id,
            name: name.to_string(),
        };
        let slot = Self::header_slot_bytes(&header, &keys)?;
        let tmp = path.with_extension("ear.tmp");
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create"))?
        };
        file.write_all_at(&slot, 0)
            .map_err(io("write header A of"))?;
        file.write_all_at(&slot, HEADER_SLOT)
            .map_err(io("write header B of"))?;
        file.set_len(format::file_len_for(size))
            .map_err(io("size"))?;
        file.sync_all().map_err(io("fsync"))?;
        std::fs::rename(&tmp, path).map_err(io("rename into place"))?;
        crate::fsutil::sync_dir(path)?;
        Ok(Export {
            name: name.to_string(),
            path: path.to_path_buf(),
            file,
            header,
            keys,
            locks: StripeLocks::default(),
        })
    }

    /// Opens an existing backing file, authenticating its header.
    pub(crate) fn open(
        path: &Path,
        expected_name: &str,
        dir_id: [u8; 16],
        keys: Option<Arc<KeyRing>>,
    ) -> Result<Export, StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| StoreError::Io {
                what: format!("open {}", path.display()),
                source,
            })?;
        let mut slots = vec![0u8; 2 * HEADER_SLOT as usize];
        read_full_at(&file, &mut slots, 0).map_err(|source| StoreError::Io {
            what: format!("read header of {}", path.display()),
            source,
        })?;
        let bad = |why: String| StoreError::BadHeader {
            path: path.display().to_string(),
            why,
        };
        let mut valid: Vec<(usize, Header)> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        for (i, slot) in slots.chunks_exact(HEADER_SLOT as usize).enumerate() {
            let mut body = [0u8; HEADER_BODY];
            body.copy_from_slice(&slot[..HEADER_BODY]);
            let mac = &slot[HEADER_MAC_AT..HEADER_MAC_AT + 32];
            match Header::decode_body(&body) {
                Err(e) => errors.push(format!("slot {}: {e}", i)),
                Ok(h) => {
                    let ok = match (&keys, h.algorithm) {
                        (Some(ring), Algorithm::Aes256CtrR96) => ring
                            .file_keys(&h.file_id, h.header_key_version)?
                            .verify_header_mac(&body, mac),
                        (None, Algorithm::None) => Sha256::digest(body).as_slice() == mac,
                        (Some(_), Algorithm::None) => {
                            return Err(bad("the file is unencrypted but the data directory is encrypted; encryption can neither be added to existing data nor removed".into()))
                        }
                        (None, _) => {
                            return Err(bad("the file is encrypted but the server runs with encryption off; encryption can neither be added to existing data nor removed".into()))
                        }
                    };
                    if ok {
                        valid.push((i, h));
                    } else if keys.is_some() {
                        errors.push(format!("slot {i}: header authentication failed (wrong universe key for this file, or the header was modified)"));
                    } else {
                        errors.push(format!("slot {i}: header checksum mismatch (the header was modified or damaged)"));
                    }
                }
            }
        }
        let Some((slot_i, header)) = valid.iter().max_by_key(|(_, h)| h.sequence).cloned() else {
            return Err(bad(errors.join("; ")));
        };
        if header.name != expected_name {
            return Err(bad(format!(
                "the header names export {:?}, not {:?} (was the file renamed?)",
                header.name, expected_name
            )));
        }
        if header.dir_id != dir_id {
            return Err(bad(
                "the file belongs to another data directory (directory id mismatch)".into(),
            ));
        }
        let mut export = Export {
            name: expected_name.to_string(),
            path: path.to_path_buf(),
            file,
            header,
            keys,
            locks: StripeLocks::default(),
        };
        if valid.len() < 2 || valid[0].1 != valid[1].1 {
            tracing::warn!(export = expected_name, slot = slot_i, problems = %errors.join("; "),
                "header slots disagree; rewriting both from the newest valid one");
            export.write_headers()?;
        }
        export.check_len()?;
        Ok(export)
    }

    /// A backing file shorter than its header requires was truncated (the
    /// file is always extended before a header that grows it is written).
    fn check_len(&self) -> Result<(), StoreError> {
        let want = format::file_len_for(self.header.size);
        let have = self
            .file
            .metadata()
            .map_err(|source| self.io_err("stat", source))?
            .len();
        if have < want {
            return Err(StoreError::BadHeader {
                path: self.path.display().to_string(),
                why: format!(
                    "the file is {have} bytes but its header requires {want}: it was truncated"
                ),
            });
        }
        Ok(())
    }

    fn write_headers(&mut self) -> Result<(), StoreError> {
        let slot = Self::header_slot_bytes(&self.header, &self.keys)?;
        // One slot at a time, synced in between: a crash leaves one valid slot.
        for at in [0, HEADER_SLOT] {
            self.file
                .write_all_at(&slot, at)
                .map_err(|source| self.io_err("write header", source))?;
            self.file
                .sync_data()
                .map_err(|source| self.io_err("fsync", source))?;
        }
        Ok(())
    }

    /// Grows the export to `new_size` (never shrinks).
    pub(crate) fn grow(&mut self, new_size: u64) -> Result<(), StoreError> {
        if new_size < self.header.size {
            return Err(StoreError::Shrink {
                export: self.name.clone(),
                have: self.header.size,
                want: new_size,
            });
        }
        if new_size == self.header.size {
            return Ok(());
        }
        // Extend first, then publish the new size: a crash in between leaves
        // a longer file under the old header, which is harmless.
        let want = format::file_len_for(new_size);
        self.file
            .set_len(want)
            .map_err(|source| self.io_err("resize", source))?;
        self.file
            .sync_all()
            .map_err(|source| self.io_err("fsync", source))?;
        self.header.size = new_size;
        self.header.sequence += 1;
        self.write_headers()
    }

    fn read_err(&self, what: &str, source: std::io::Error) -> StoreError {
        if source.kind() == std::io::ErrorKind::WouldBlock {
            StoreError::WouldBlock
        } else {
            self.io_err(what, source)
        }
    }

    fn io_err(&self, what: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            what: format!("{what} {}", self.path.display()),
            source,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size: self.header.size,
            }),
        }
    }

    // ---- reads --------------------------------------------------------------

    /// Reads `out.len()` plaintext bytes at `offset`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<IoStats, StoreError> {
        self.read_impl(offset, out, false)
    }

    /// Like [`Export::read`], but never blocks: entries and data are read
    /// with `preadv2(RWF_NOWAIT)`, so the call returns
    /// [`StoreError::WouldBlock`] instead of waiting for the disk when they are
    /// not all in the page cache, and instead of waiting for a block lock
    /// when a write to the same blocks is in progress. The server uses it to
    /// serve small cached reads on its async workers and sends the rest to the
    /// blocking pool.
    pub fn try_read_cached(&self, offset: u64, out: &mut [u8]) -> Result<IoStats, StoreError> {
        self.read_impl(offset, out, true)
    }

    fn read_impl(&self, offset: u64, out: &mut [u8], nowait: bool) -> Result<IoStats, StoreError> {
        let mut st = IoStats::default();
        if out.is_empty() {
            return Ok(st);
        }
        self.check_range(offset, out.len() as u64)?;
        let end = offset + out.len() as u64;
        let (first, last) = (offset / BLOCK_SIZE_U64, (end - 1) / BLOCK_SIZE_U64);
        let mut b = first;
        while b <= last {
            let seg_last = last.min((b / GROUP_BLOCKS + 1) * GROUP_BLOCKS - 1);
            let seg_start = b * BLOCK_SIZE_U64;
            let seg_end = (seg_last + 1) * BLOCK_SIZE_U64;
            let lo = seg_start.max(offset);
            let hi = seg_end.min(end);
            let out_part = &mut out[(lo - offset) as usize..(hi - offset) as usize];
            let mode = if nowait {
                ReadMode::NoWait
            } else {
                ReadMode::Retry
            };
            if lo == seg_start && hi == seg_end {
                self.read_segment(b, seg_last, out_part, mode, &mut st)?;
            } else {
                let mut scratch = vec![0u8; (seg_end - seg_start) as usize];
                self.read_segment(b, seg_last, &mut scratch, mode, &mut st)?;
                out_part.copy_from_slice(
                    &scratch[(lo - seg_start) as usize..(hi - seg_start) as usize],
                );
            }
            b = seg_last + 1;
        }
        Ok(st)
    }

    /// Reads and decrypts whole blocks `first..=last` (one group) into `buf`.
    /// In [`ReadMode::Retry`], a mismatch between entry and data (a concurrent
    /// write) is retried once under the range lock before it counts as
    /// corruption.
    fn read_segment(
        &self,
        first: u64,
        last: u64,
        buf: &mut [u8],
        mode: ReadMode,
        st: &mut IoStats,
    ) -> Result<(), StoreError> {
        let n = (last - first + 1) as usize;
        debug_assert_eq!(buf.len(), n * BLOCK_SIZE);
        let mut entries = vec![0u8; n * ENTRY_SIZE];
        let nowait = mode == ReadMode::NoWait;
        timed(&mut st.storage, || {
            read_at(
                &self.file,
                &mut entries,
                format::entry_offset(first),
                nowait,
            )
        })
        .map_err(|source| self.read_err("read entries of", source))?;
        if entries.iter().all(|&x| x == 0) {
            buf.fill(0);
            return Ok(());
        }
        timed(&mut st.storage, || {
            read_at(&self.file, buf, format::data_offset(first), nowait)
        })
        .map_err(|source| self.read_err("read", source))?;
        let t = Instant::now();
        let checked = self.check_and_decrypt(first, &entries, buf);
        st.crypto += t.elapsed();
        match (checked?, mode) {
            (None, _) => Ok(()),
            (Some(_), ReadMode::NoWait) => Err(StoreError::WouldBlock),
            (Some(block), ReadMode::Locked) => Err(StoreError::Corrupt {
                export: self.name.clone(),
                block,
                why: "block does not match its entry (torn write or damaged data)".into(),
            }),
            (Some(_), ReadMode::Retry) => {
                let _g = self.locks.lock(first, last);
                self.read_segment(first, last, buf, ReadMode::Locked, st)
            }
        }
    }

    /// Checks each block of a segment against its entry, authenticates it
    /// (integrity mode) and decrypts it while it is still in L1: one pass
    /// over the data instead of two. Returns the first block whose data does
    /// not match its entry (a write in progress, or damage); the caller then
    /// re-reads the whole segment, so blocks already decrypted here are
    /// never returned.
    fn check_and_decrypt(
        &self,
        first: u64,
        entries: &[u8],
        buf: &mut [u8],
    ) -> Result<Option<u64>, StoreError> {
        let gmac = self.header.integrity == Integrity::Gmac;
        let mut cached: Option<(u32, Arc<FileKeys>)> = None;
        for (i, (e, blk)) in entries
            .chunks_exact(ENTRY_SIZE)
            .zip(buf.chunks_exact_mut(BLOCK_SIZE))
            .enumerate()
        {
            let block = first + i as u64;
            let corrupt = |why: String| StoreError::Corrupt {
                export: self.name.clone(),
                block,
                why,
            };
            let en = match Entry::decode(e).map_err(|e| corrupt(e.to_string()))? {
                EntryState::Unwritten => {
                    blk.fill(0);
                    continue;
                }
                EntryState::Written(en) => en,
            };
            if !en.matches(blk) {
                return Ok(Some(block));
            }
            if !gmac && en.tag != [0; format::TAG_LEN] {
                return Err(corrupt(
                    "tag set in a file without per-block integrity".into(),
                ));
            }
            match &self.keys {
                None => {
                    if en.key_version != 0 || en.nonce != [0; NONCE_LEN] {
                        return Err(corrupt("encrypted block in an unencrypted export".into()));
                    }
                }
                Some(ring) => {
                    let keys = match &cached {
                        Some((v, k)) if *v == en.key_version => Arc::clone(k),
                        _ => {
                            let k = ring.file_keys(&self.header.file_id, en.key_version)?;
                            cached = Some((en.key_version, Arc::clone(&k)));
                            k
                        }
                    };
                    if gmac
                        && !keys.verify_block_tag(
                            &en.tag,
                            &en.nonce,
                            &self.header.file_id,
                            block,
                            en.key_version,
                            blk,
                        )
                    {
                        return Err(StoreError::AuthFailed {
                            export: self.name.clone(),
                            block,
                        });
                    }
                    BlockCipher::new(keys.data_cipher()).apply(&en.nonce, blk);
                }
            }
        }
        Ok(None)
    }

    // ---- writes -------------------------------------------------------------

    /// Writes `data` at `offset`. `data` is used as scratch (encrypted in
    /// place) when the request is block aligned. With `fua`, the data is
    /// durable when this returns.
    pub fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<IoStats, StoreError> {
        let mut st = IoStats::default();
        self.check_range(offset, data.len() as u64)?;
        if !data.is_empty() {
            let end = offset + data.len() as u64;
            let (first, last) = (offset / BLOCK_SIZE_U64, (end - 1) / BLOCK_SIZE_U64);
            let _g = self.locks.lock(first, last);
            if offset.is_multiple_of(BLOCK_SIZE_U64) && end.is_multiple_of(BLOCK_SIZE_U64) {
                self.write_blocks(first, data, &mut st)?;
            } else {
                let mut buf = vec![0u8; ((last - first + 1) as usize) * BLOCK_SIZE];
                let lb = buf.len() - BLOCK_SIZE;
                if !offset.is_multiple_of(BLOCK_SIZE_U64) {
                    self.read_segment(
                        first,
                        first,
                        &mut buf[..BLOCK_SIZE],
                        ReadMode::Locked,
                        &mut st,
                    )?;
                }
                if !end.is_multiple_of(BLOCK_SIZE_U64)
                    && (last != first || offset.is_multiple_of(BLOCK_SIZE_U64))
                {
                    self.read_segment(last, last, &mut buf[lb..], ReadMode::Locked, &mut st)?;
                }
                let at = (offset - first * BLOCK_SIZE_U64) as usize;
                buf[at..at + data.len()].copy_from_slice(data);
                self.write_blocks(first, &mut buf, &mut st)?;
            }
        }
        if fua {
            self.sync(&mut st)?;
        }
        Ok(st)
    }

    /// Encrypts and writes whole blocks starting at `first`. Caller holds the
    /// range lock.
    fn write_blocks(&self, first: u64, buf: &mut [u8], st: &mut IoStats) -> Result<(), StoreError> {
        let n = buf.len() / BLOCK_SIZE;
        let (version, keys, mut nonces) = match &self.keys {
            Some(ring) => {
                let v = ring.active_version();
                let k = ring.file_keys(&self.header.file_id, v)?;
                // One getrandom(2) call for every nonce of the request.
                let mut nonces = vec![0u8; n * NONCE_LEN];
                fill_random(&mut nonces)?;
                (v, Some(k), nonces)
            }
            None => (0, None, vec![0u8; n * NONCE_LEN]),
        };
        let mut b = first;
        let mut done = 0usize;
        while done < n {
            let seg_n = ((GROUP_BLOCKS - b % GROUP_BLOCKS) as usize).min(n - done);
            let seg = &mut buf[done * BLOCK_SIZE..(done + seg_n) * BLOCK_SIZE];
            let seg_nonces = &mut nonces[done * NONCE_LEN..(done + seg_n) * NONCE_LEN];
            // Encrypt, tag and checksum each block while it is still in L1:
            // one pass over the segment instead of two.
            let mut entries = vec![0u8; seg_n * ENTRY_SIZE];
            timed(&mut st.crypto, || {
                self.seal_blocks(keys.as_deref(), version, b, seg, seg_nonces, &mut entries)
            });
            // Data first, then entries: a crash in between leaves a block whose
            // entry does not match (detected on read), never silent garbage.
            timed(&mut st.storage, || {
                self.file.write_all_at(seg, format::data_offset(b))?;
                self.file.write_all_at(&entries, format::entry_offset(b))
            })
            .map_err(|source| self.io_err("write", source))?;
            done += seg_n;
            b += seg_n as u64;
        }
        Ok(())
    }

    /// Encrypts (when `keys` is set), tags (integrity mode) and checksums
    /// whole blocks starting at block `b0`, writing one entry per block.
    fn seal_blocks(
        &self,
        keys: Option<&FileKeys>,
        version: u32,
        b0: u64,
        seg: &mut [u8],
        nonces: &[u8],
        entries: &mut [u8],
    ) {
        let gmac = self.header.integrity == Integrity::Gmac;
        let file_id = &self.header.file_id;
        for (i, ((blk, nonce), slot)) in seg
            .chunks_exact_mut(BLOCK_SIZE)
            .zip(nonces.chunks_exact(NONCE_LEN))
            .zip(entries.chunks_exact_mut(ENTRY_SIZE))
            .enumerate()
        {
            let mut nn = [0u8; NONCE_LEN];
            nn.copy_from_slice(nonce);
            if let Some(k) = keys {
                BlockCipher::new(k.data_cipher()).apply(&nn, blk);
            }
            let mut entry = Entry::for_block(nn, version, blk);
            if let (true, Some(k)) = (gmac, keys) {
                entry.tag = k.block_tag(&nn, file_id, b0 + i as u64, version, blk);
            }
            entry.encode(slot);
        }
    }

    /// NBD_CMD_WRITE_ZEROES: the range reads as zeros afterwards. Whole blocks
    /// become holes unless `no_hole`, partial blocks are read-modify-written.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<IoStats, StoreError> {
        self.zero_range(offset, len, ZeroMode::Zero { no_hole }, fua)
    }

    /// NBD_CMD_TRIM: whole blocks in the range are deallocated (and read as
    /// zeros); partial blocks are left alone, as the protocol allows.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<IoStats, StoreError> {
        self.zero_range(offset, len, ZeroMode::Trim, fua)
    }

    fn zero_range(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<IoStats, StoreError> {
        let mut st = IoStats::default();
        self.check_range(offset, len)?;
        let end = offset + len;
        let full_first = offset.div_ceil(BLOCK_SIZE_U64);
        let full_end = end / BLOCK_SIZE_U64; // exclusive
        if let ZeroMode::Zero { .. } = mode {
            // Partial head and tail blocks.
            let head_end = (full_first * BLOCK_SIZE_U64).min(end);
            if offset < head_end {
                let mut z = vec![0u8; (head_end - offset) as usize];
                add(&mut st, self.write(offset, &mut z, false)?);
            }
            let tail_start = (full_end * BLOCK_SIZE_U64).max(head_end);
            if tail_start < end {
                let mut z = vec![0u8; (end - tail_start) as usize];
                add(&mut st, self.write(tail_start, &mut z, false)?);
            }
        }
        let mut b = full_first;
        while b < full_end {
            let seg_end = full_end.min((b / GROUP_BLOCKS + 1) * GROUP_BLOCKS);
            let n = (seg_end - b) as usize;
            let _g = self.locks.lock(b, seg_end - 1);
            if let ZeroMode::Zero { no_hole: true } = mode {
                let mut z = vec![0u8; n * BLOCK_SIZE];
                self.write_blocks(b, &mut z, &mut st)?;
            } else {
                let zeros = vec![0u8; n * ENTRY_SIZE];
                timed(&mut st.storage, || {
                    self.file.write_all_at(&zeros, format::entry_offset(b))
                })
                .map_err(|source| self.io_err("clear entries of", source))?;
                // Entries first: once they are zero the data is unreferenced,
                // so deallocating it is safe whatever happens next.
                timed(&mut st.storage, || {
                    punch_hole(
                        &self.file,
                        format::data_offset(b),
                        n as u64 * BLOCK_SIZE_U64,
                    )
                });
            }
            b = seg_end;
        }
        if fua {
            self.sync(&mut st)?;
        }
        Ok(st)
    }

    /// NBD_CMD_FLUSH: everything written before is durable when this returns.
    pub fn flush(&self) -> Result<IoStats, StoreError> {
        let mut st = IoStats::default();
        self.sync(&mut st)?;
        Ok(st)
    }

    fn sync(&self, st: &mut IoStats) -> Result<(), StoreError> {
        timed(&mut st.storage, || self.file.sync_data())
            .map_err(|source| self.io_err("fdatasync", source))
    }

    /// Reports which whole-block ranges are unwritten (holes) for block
    /// status: returns (length, is_hole) runs covering `offset..offset+len`.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, StoreError> {
        self.check_range(offset, len)?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        if len == 0 {
            return Ok(runs);
        }
        let end = offset + len;
        let (first, last) = (offset / BLOCK_SIZE_U64, (end - 1) / BLOCK_SIZE_U64);
        let mut b = first;
        while b <= last {
            let seg_last = last.min((b / GROUP_BLOCKS + 1) * GROUP_BLOCKS - 1);
            let n = (seg_last - b + 1) as usize;
            let mut entries = vec![0u8; n * ENTRY_SIZE];
            read_full_at(&self.file, &mut entries, format::entry_offset(b))
                .map_err(|source| self.io_err("read entries of", source))?;
            for (i, e) in entries.chunks_exact(ENTRY_SIZE).enumerate() {
                let blk = b + i as u64;
                let lo = (blk * BLOCK_SIZE_U64).max(offset);
                let hi = ((blk + 1) * BLOCK_SIZE_U64).min(end);
                let hole = e.iter().all(|&x| x == 0);
                match runs.last_mut() {
                    Some((l, h)) if *h == hole => *l += hi - lo,
                    _ => runs.push((hi - lo, hole)),
                }
            }
            b = seg_last + 1;
        }
        Ok(runs)
    }
}

fn add(st: &mut IoStats, o: IoStats) {
    st.crypto += o.crypto;
    st.storage += o.storage;
}

/// Deallocates a byte range (best effort: on filesystems without hole punching
/// the zeroed entries alone already make the blocks read as zeros).
fn punch_hole(file: &File, offset: u64, len: u64) {
    use rustix::fs::{fallocate, FallocateFlags};
    if let Err(e) = fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        tracing::debug!(error = %e, "hole punching not available");
    }
}

impl From<HeaderError> for StoreError {
    fn from(e: HeaderError) -> Self {
        StoreError::BadHeader {
            path: String::new(),
            why: e.to_string(),
        }
    }
}
