//! Store tests: model-checked reads/writes, format properties, tamper and
//! torn-write detection.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use proptest::prelude::*;

use super::format::{self, BLOCK_SIZE};
use super::*;
use crate::crypto::{KeyRing, SecretKey};

const DIR_ID: [u8; 16] = [0x11; 16];

fn ring_with(key: [u8; 32]) -> Arc<KeyRing> {
    let mut raw = key;
    let mut m = BTreeMap::new();
    m.insert(1, SecretKey::take_from(&mut raw).unwrap());
    Arc::new(KeyRing::new(m, 1, 64).unwrap())
}

fn spec(name: &str, size: u64) -> ExportSpec {
    ExportSpec {
        name: ExportName::parse(name).unwrap(),
        size,
    }
}

fn open(dir: &Path, keys: Option<Arc<KeyRing>>, size: u64) -> Store {
    Store::open(dir, DIR_ID, keys, &[spec("t", size)]).unwrap()
}

#[test]
fn round_trip_aligned_and_unaligned_both_modes() {
    for enc in [true, false] {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path(), enc.then(|| ring_with([1; 32])), 3 << 20);
        let e = s.get("t").unwrap();
        let mut data: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
        let orig = data.clone();
        e.write(1000, &mut data, false).unwrap();
        let mut out = vec![0u8; 20000];
        e.read(1000, &mut out).unwrap();
        assert_eq!(out, orig);
        // Around it: zeros.
        let mut z = vec![1u8; 1000];
        e.read(0, &mut z).unwrap();
        assert!(z.iter().all(|&x| x == 0));
        // Last byte of the export.
        let mut last = [0xeeu8];
        e.write((3 << 20) - 1, &mut last, true).unwrap();
        let mut got = [0u8];
        e.read((3 << 20) - 1, &mut got).unwrap();
        assert_eq!(got, [0xee]);
        assert!(matches!(
            e.read(3 << 20, &mut got),
            Err(StoreError::OutOfRange { .. })
        ));
    }
}

#[test]
fn ciphertext_hides_plaintext_and_never_repeats() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), Some(ring_with([2; 32])), 1 << 20);
    let e = s.get("t").unwrap();
    let pattern = b"PLAINTEXT-MARKER".repeat(256); // one block
    e.write(0, &mut pattern.clone(), true).unwrap();
    let raw1 = std::fs::read(e.path()).unwrap();
    assert!(!raw1.windows(16).any(|w| w == b"PLAINTEXT-MARKER"));
    let blk0 = format::data_offset(0) as usize;
    let c1 = raw1[blk0..blk0 + BLOCK_SIZE].to_vec();
    e.write(0, &mut pattern.clone(), true).unwrap();
    let raw2 = std::fs::read(e.path()).unwrap();
    let c2 = raw2[blk0..blk0 + BLOCK_SIZE].to_vec();
    assert_ne!(c1, c2, "same data written twice must give new ciphertext");
    let ent = format::entry_offset(0) as usize;
    assert_ne!(raw1[ent..ent + 12], raw2[ent..ent + 12], "fresh nonce");
}

#[test]
fn survives_reopen_and_rejects_wrong_key() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = open(d.path(), Some(ring_with([3; 32])), 1 << 20);
        s.get("t")
            .unwrap()
            .write(4096, &mut vec![7u8; 4096], true)
            .unwrap();
    }
    let s = Store::open(d.path(), DIR_ID, Some(ring_with([3; 32])), &[]).unwrap();
    let mut out = vec![0u8; 4096];
    s.get("t").unwrap().read(4096, &mut out).unwrap();
    assert_eq!(out, vec![7u8; 4096]);
    let err = Store::open(d.path(), DIR_ID, Some(ring_with([4; 32])), &[]).unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    let err = Store::open(d.path(), DIR_ID, None, &[]).unwrap_err();
    assert!(err.to_string().contains("neither be added"), "{err}");
    let err = Store::open(d.path(), [0; 16], Some(ring_with([3; 32])), &[]).unwrap_err();
    assert!(err.to_string().contains("another data directory"), "{err}");
}

#[test]
fn grows_but_never_shrinks() {
    let d = tempfile::tempdir().unwrap();
    drop(open(d.path(), Some(ring_with([5; 32])), 1 << 20));
    let s = open(d.path(), Some(ring_with([5; 32])), 4 << 20);
    assert_eq!(s.get("t").unwrap().size(), 4 << 20);
    drop(s);
    let err = Store::open(
        d.path(),
        DIR_ID,
        Some(ring_with([5; 32])),
        &[spec("t", 1 << 20)],
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::Shrink { .. }), "{err}");
    let s = Store::open(d.path(), DIR_ID, Some(ring_with([5; 32])), &[]).unwrap();
    assert_eq!(s.get("t").unwrap().size(), 4 << 20);
}

#[test]
fn one_damaged_header_slot_is_repaired_both_damaged_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let path = {
        let s = open(d.path(), Some(ring_with([6; 32])), 1 << 20);
        s.get("t").unwrap().path().to_path_buf()
    };
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xff], 50).unwrap(); // slot A size field
    drop(f);
    let s = Store::open(d.path(), DIR_ID, Some(ring_with([6; 32])), &[]).unwrap();
    assert_eq!(s.get("t").unwrap().size(), 1 << 20);
    drop(s);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xff], 50).unwrap();
    f.write_all_at(&[0xff], 4096 + 50).unwrap();
    drop(f);
    let err = Store::open(d.path(), DIR_ID, Some(ring_with([6; 32])), &[]).unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
}

#[test]
fn torn_block_is_detected_not_returned() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), Some(ring_with([7; 32])), 1 << 20);
    let e = s.get("t").unwrap();
    e.write(0, &mut vec![1u8; 8192], true).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(e.path())
        .unwrap();
    f.write_all_at(&[0u8; 100], format::data_offset(1) + 2000)
        .unwrap();
    let mut out = vec![0u8; 4096];
    e.read(0, &mut out).unwrap();
    let err = e.read(4096, &mut out).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { block: 1, .. }), "{err}");
    // Rewriting the whole block repairs it.
    e.write(4096, &mut vec![2u8; 4096], false).unwrap();
    e.read(4096, &mut out).unwrap();
    assert_eq!(out, vec![2u8; 4096]);
}

#[test]
fn trim_and_write_zeroes() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), Some(ring_with([8; 32])), 2 << 20);
    let e = s.get("t").unwrap();
    e.write(0, &mut vec![9u8; 2 << 20], false).unwrap();
    e.write_zeroes(100, 10_000, false, false).unwrap();
    let mut out = vec![0u8; 12_000];
    e.read(0, &mut out).unwrap();
    assert!(out[..100].iter().all(|&x| x == 9));
    assert!(out[100..10_100].iter().all(|&x| x == 0));
    assert!(out[10_100..].iter().all(|&x| x == 9));
    e.trim(1 << 20, 1 << 20, false).unwrap();
    let mut out = vec![1u8; 1 << 20];
    e.read(1 << 20, &mut out).unwrap();
    assert!(out.iter().all(|&x| x == 0));
    let runs = e.allocation(0, 2 << 20).unwrap();
    assert_eq!(runs.last(), Some(&(1 << 20, true)));
    e.write_zeroes(0, 8192, true, true).unwrap();
    let mut out = vec![1u8; 8192];
    e.read(0, &mut out).unwrap();
    assert!(out.iter().all(|&x| x == 0));
}

#[test]
fn concurrent_writers_and_readers_stay_consistent() {
    let d = tempfile::tempdir().unwrap();
    let s = Arc::new(open(d.path(), Some(ring_with([9; 32])), 1 << 20));
    let mut hs = vec![];
    for t in 0..4u8 {
        let s = Arc::clone(&s);
        hs.push(std::thread::spawn(move || {
            let e = s.get("t").unwrap();
            for i in 0..200u64 {
                // Every writer writes whole blocks filled with one byte value,
                // unaligned so read-modify-write is exercised too.
                let off = (i % 8) * 4096 + 10;
                let mut buf = vec![t + 1; 4086];
                e.write(off, &mut buf, false).unwrap();
                let mut out = vec![0u8; 4096 * 9];
                e.read(0, &mut out).unwrap();
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn matches_an_in_memory_model(ops in proptest::collection::vec(
        (0u64..(600 * 1024), 1usize..70_000, any::<u8>(), 0u8..4), 1..20)) {
        let size: u64 = 700 * 1024;
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path(), Some(ring_with([10; 32])), size);
        let e = s.get("t").unwrap();
        let mut model = vec![0u8; size as usize];
        for (off, len, val, op) in ops {
            let len = len.min((size - off) as usize);
            match op {
                0 | 1 => {
                    let mut buf: Vec<u8> = (0..len).map(|i| val.wrapping_add(i as u8)).collect();
                    model[off as usize..off as usize + len].copy_from_slice(&buf);
                    e.write(off, &mut buf, false).unwrap();
                }
                2 => {
                    e.write_zeroes(off, len as u64, false, false).unwrap();
                    model[off as usize..off as usize + len].fill(0);
                }
                _ => {
                    let mut out = vec![0u8; len];
                    e.read(off, &mut out).unwrap();
                    prop_assert_eq!(&out[..], &model[off as usize..off as usize + len]);
                }
            }
        }
        let mut all = vec![0u8; size as usize];
        e.read(0, &mut all).unwrap();
        prop_assert_eq!(all, model);
    }
}

// ---- integrity mode --------------------------------------------------------

fn open_gmac(dir: &Path, key: [u8; 32], names: &[&str]) -> Store {
    let specs: Vec<ExportSpec> = names.iter().map(|n| spec(n, 2 << 20)).collect();
    Store::open_with(dir, DIR_ID, Some(ring_with(key)), &specs, true).unwrap()
}

/// Rewrites an entry's CRC so that only the authentication tag can notice a
/// change (what an attacker who knows the format would do).
fn fix_crc(path: &Path, block: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut ent = [0u8; 64];
    f.read_exact_at(&mut ent, format::entry_offset(block))
        .unwrap();
    let mut data = vec![0u8; BLOCK_SIZE];
    f.read_exact_at(&mut data, format::data_offset(block))
        .unwrap();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&ent[..20]), &data);
    f.write_all_at(&crc.to_le_bytes(), format::entry_offset(block) + 20)
        .unwrap();
}

fn patch(path: &Path, at: u64, f: impl FnOnce(&mut [u8])) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).unwrap();
    f(&mut b);
    file.write_all_at(&b, at).unwrap();
}

#[test]
fn integrity_round_trip_and_header_mode() {
    let d = tempfile::tempdir().unwrap();
    let s = open_gmac(d.path(), [20; 32], &["t"]);
    let e = s.get("t").unwrap();
    assert_eq!(e.header().integrity, format::Integrity::Gmac);
    let mut data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let orig = data.clone();
    e.write(777, &mut data, true).unwrap();
    let mut out = vec![0u8; orig.len()];
    e.read(777, &mut out).unwrap();
    assert_eq!(out, orig);
    drop(s);
    // Reopened without asking for integrity: the header keeps it.
    let s = Store::open(d.path(), DIR_ID, Some(ring_with([20; 32])), &[]).unwrap();
    assert_eq!(
        s.get("t").unwrap().header().integrity,
        format::Integrity::Gmac
    );
    let mut out = vec![0u8; orig.len()];
    s.get("t").unwrap().read(777, &mut out).unwrap();
    assert_eq!(out, orig);
}

#[test]
fn integrity_detects_every_tampered_byte_class() {
    // (what, byte offset relative to block 3's entry or data, fix the CRC?)
    let cases: &[(&str, bool, u64)] = &[
        ("nonce", true, 0),
        ("nonce", true, 11),
        ("key version", true, 12),
        ("flags", true, 16),
        ("crc", true, 21),
        ("reserved", true, 26),
        ("tag", true, 32),
        ("tag", true, 47),
        ("tag padding", true, 50),
        ("ciphertext first byte", false, 0),
        ("ciphertext middle", false, 2048),
        ("ciphertext last byte", false, 4095),
    ];
    for (what, in_entry, off) in cases {
        let d = tempfile::tempdir().unwrap();
        let s = open_gmac(d.path(), [21; 32], &["t"]);
        let e = s.get("t").unwrap();
        e.write(0, &mut vec![0x42u8; 8 * BLOCK_SIZE], true).unwrap();
        let path = e.path().to_path_buf();
        let at = if *in_entry {
            format::entry_offset(3) + off
        } else {
            format::data_offset(3) + off
        };
        patch(&path, at, |b| b[0] ^= 0x01);
        if *what != "crc" {
            fix_crc(&path, 3);
        }
        let mut out = vec![0u8; BLOCK_SIZE];
        let err = e.read(3 * 4096, &mut out).expect_err(what);
        assert!(
            !err.is_no_space() && !matches!(err, StoreError::OutOfRange { .. }),
            "{what}: {err}"
        );
        // Neighbours are unaffected.
        e.read(2 * 4096, &mut out).unwrap();
        assert_eq!(out, vec![0x42u8; BLOCK_SIZE], "{what}");
    }
}

#[test]
fn integrity_detects_swapped_and_transplanted_blocks() {
    let d = tempfile::tempdir().unwrap();
    let s = open_gmac(d.path(), [22; 32], &["a", "b"]);
    let (a, b) = (s.get("a").unwrap(), s.get("b").unwrap());
    a.write(0, &mut vec![1u8; 4096], true).unwrap();
    a.write(4096, &mut vec![2u8; 4096], true).unwrap();
    b.write(0, &mut vec![3u8; 4096], true).unwrap();
    let read_rec = |p: &Path, blk: u64| {
        let raw = std::fs::read(p).unwrap();
        let e = format::entry_offset(blk) as usize;
        let dta = format::data_offset(blk) as usize;
        (raw[e..e + 64].to_vec(), raw[dta..dta + 4096].to_vec())
    };
    let write_rec = |p: &Path, blk: u64, rec: &(Vec<u8>, Vec<u8>)| {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(&rec.0, format::entry_offset(blk)).unwrap();
        f.write_all_at(&rec.1, format::data_offset(blk)).unwrap();
    };
    // Swap blocks 0 and 1 of export a (entries and data move together).
    let (r0, r1) = (read_rec(a.path(), 0), read_rec(a.path(), 1));
    write_rec(a.path(), 0, &r1);
    write_rec(a.path(), 1, &r0);
    let mut out = vec![0u8; 4096];
    assert!(matches!(
        a.read(0, &mut out),
        Err(StoreError::AuthFailed { block: 0, .. })
    ));
    assert!(matches!(
        a.read(4096, &mut out),
        Err(StoreError::AuthFailed { block: 1, .. })
    ));
    // Copy block 0 of b into block 0 of a (same universe key, other file).
    write_rec(a.path(), 0, &read_rec(b.path(), 0));
    assert!(matches!(
        a.read(0, &mut out),
        Err(StoreError::AuthFailed { .. })
    ));
    b.read(0, &mut out).unwrap();
    assert_eq!(out, vec![3u8; 4096]);
}

#[test]
fn truncated_backing_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let path = {
        let s = open_gmac(d.path(), [23; 32], &["t"]);
        let e = s.get("t").unwrap();
        e.write(0, &mut vec![9u8; 64 * 1024], true).unwrap();
        e.path().to_path_buf()
    };
    // Cut the file in the middle of block 5's data.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(format::data_offset(5) + 100).unwrap();
    drop(f);
    let err = Store::open(d.path(), DIR_ID, Some(ring_with([23; 32])), &[]).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn integrity_needs_encryption() {
    let d = tempfile::tempdir().unwrap();
    let err = Store::open_with(d.path(), DIR_ID, None, &[spec("t", 1 << 20)], true).unwrap_err();
    assert!(err.to_string().contains("needs encryption"), "{err}");
}

#[test]
fn cached_reads_never_block_and_agree_with_blocking_reads() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), Some(ring_with([24; 32])), 1 << 20);
    let e = s.get("t").unwrap();
    e.write(8192, &mut vec![0x77u8; 8192], true).unwrap();
    let mut out = vec![0u8; 8192];
    // Just written: in the page cache.
    e.try_read_cached(8192, &mut out).unwrap();
    assert_eq!(out, vec![0x77u8; 8192]);
    // Drop the (clean, synced) pages: a cached read now gives up rather
    // than waiting for the disk (or, if the kernel kept them, still answers
    // correctly); the blocking read always answers.
    let f = std::fs::File::open(e.path()).unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let mut out = vec![0u8; 8192];
    match e.try_read_cached(8192, &mut out) {
        Err(StoreError::WouldBlock) => {}
        Ok(_) => assert_eq!(out, vec![0x77u8; 8192]),
        Err(other) => panic!("{other}"),
    }
    e.read(8192, &mut out).unwrap();
    assert_eq!(out, vec![0x77u8; 8192]);
}
