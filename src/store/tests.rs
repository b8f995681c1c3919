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
    // The second write went to the other slot, with a fresh nonce.
    let ent = format::pair_offset(0) as usize;
    assert_ne!(raw2[ent..ent + 12], raw2[ent + 64..ent + 76], "fresh nonce");
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
    assert!(err.to_string().contains("cannot be removed"), "{err}");
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
fn damaged_block_reads_as_zeros_and_is_counted_never_eio() {
    use std::sync::atomic::Ordering;
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), Some(ring_with([7; 32])), 1 << 20);
    let e = s.get("t").unwrap();
    // Block 1 written twice (both slots used), block 2 once.
    e.write(0, &mut vec![1u8; 8192], true).unwrap();
    e.write(4096, &mut vec![3u8; 8192], true).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(e.path())
        .unwrap();
    for b in [1, 2] {
        f.write_all_at(&[0u8; 100], format::data_offset(b) + 2000)
            .unwrap();
    }
    let mut out = vec![0u8; 4096];
    e.read(0, &mut out).unwrap();
    assert_eq!(out, vec![1u8; 4096]);
    for b in [1, 2] {
        out.fill(9);
        e.read(b * 4096, &mut out).unwrap();
        assert_eq!(out, vec![0u8; 4096], "block {b}");
    }
    assert_eq!(e.counters().unrecoverable_blocks.load(Ordering::Relaxed), 2);
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
    let opts = ExportOptions::with_integrity(true);
    Store::open_opts(dir, DIR_ID, Some(ring_with(key)), &specs, opts).unwrap()
}

/// Recomputes slot 0's check of `block` so that only the authentication tag
/// can notice a change (what an attacker who knows the format would do).
fn fix_check(path: &Path, block: u64) {
    use xxhash_rust::xxh3::Xxh3Default;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut slot = [0u8; 64];
    f.read_exact_at(&mut slot, format::pair_offset(block))
        .unwrap();
    let mut data = vec![0u8; BLOCK_SIZE];
    f.read_exact_at(&mut data, format::data_offset(block))
        .unwrap();
    let mut h = Xxh3Default::new();
    h.update(&slot[..32]);
    h.update(&block.to_le_bytes());
    h.update(&data);
    f.write_all_at(&h.digest().to_le_bytes(), format::pair_offset(block) + 32)
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
    // (what, in block 3's slot 0 (else its data), byte offset). The check
    // is recomputed after each change except the check's own.
    let cases: &[(&str, bool, u64)] = &[
        ("nonce", true, 0),
        ("nonce", true, 11),
        ("key version", true, 12),
        ("epoch", true, 16),
        ("reserved", true, 27),
        ("check", true, 33),
        ("tag", true, 40),
        ("tag", true, 55),
        ("reserved tail", true, 60),
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
            format::pair_offset(3) + off
        } else {
            format::data_offset(3) + off
        };
        patch(&path, at, |b| b[0] ^= 0x01);
        if *what != "check" {
            fix_check(&path, 3);
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
        let e = format::pair_offset(blk) as usize;
        let dta = format::data_offset(blk) as usize;
        (raw[e..e + 128].to_vec(), raw[dta..dta + 4096].to_vec())
    };
    let write_rec = |p: &Path, blk: u64, rec: &(Vec<u8>, Vec<u8>)| {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(&rec.0, format::pair_offset(blk)).unwrap();
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
    let opts = ExportOptions::with_integrity(true);
    let err = Store::open_opts(d.path(), DIR_ID, None, &[spec("t", 1 << 20)], opts).unwrap_err();
    assert!(err.to_string().contains("needs encryption"), "{err}");
}

// ---- format v2: header robustness, epochs, clean state, check ---------------

#[test]
fn v1_file_is_refused_with_one_clear_line() {
    let d = tempfile::tempdir().unwrap();
    let path = {
        let s = open(d.path(), Some(ring_with([30; 32])), 1 << 20);
        s.get("t").unwrap().path().to_path_buf()
    };
    for at in [8, 4096 + 8] {
        patch(&path, at, |b| b[0] = 1);
    }
    let err = Store::open(d.path(), DIR_ID, Some(ring_with([30; 32])), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("format v1") && err.contains("recreate the data directory"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn header_slot_naming_an_unknown_key_version_is_discarded() {
    let d = tempfile::tempdir().unwrap();
    let path = {
        let s = open(d.path(), Some(ring_with([31; 32])), 1 << 20);
        s.get("t").unwrap().path().to_path_buf()
    };
    // Slot A names key version 9, which is not loaded.
    patch(&path, 28, |b| b[0] = 9);
    let s = Store::open(d.path(), DIR_ID, Some(ring_with([31; 32])), &[]).unwrap();
    assert_eq!(s.get("t").unwrap().size(), 1 << 20);
    drop(s);
    // Both slots were rewritten: slot B can now be damaged too.
    patch(&path, 4096 + 28, |b| b[0] = 9);
    Store::open(d.path(), DIR_ID, Some(ring_with([31; 32])), &[]).unwrap();
}

fn open_small_epochs(dir: &Path, key: [u8; 32], integrity: format::Integrity) -> Store {
    Store::open_opts(
        dir,
        DIR_ID,
        Some(ring_with(key)),
        &[spec("t", 1 << 20)],
        ExportOptions {
            integrity,
            epoch_writes: 8,
        },
    )
    .unwrap()
}

#[test]
fn epochs_advance_and_decrypt_across_restarts() {
    use std::sync::atomic::Ordering;
    for integrity in [format::Integrity::Check, format::Integrity::Gmac] {
        let d = tempfile::tempdir().unwrap();
        let mut want = vec![0u8; 1 << 20];
        let mut epochs = vec![];
        for round in 0..3u8 {
            let s = open_small_epochs(d.path(), [32; 32], integrity);
            let e = s.get("t").unwrap();
            let e0 = e.counters().epoch.load(Ordering::Relaxed);
            for i in 0..20u64 {
                let off = ((i * 7 + round as u64 * 3) % 200) * 4096;
                let mut buf = vec![round * 50 + i as u8; 4096 * 3];
                want[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
                e.write(off, &mut buf, false).unwrap();
            }
            let e1 = e.counters().epoch.load(Ordering::Relaxed);
            // 60 block writes at 8 per epoch.
            assert!(e1 >= e0 + 7, "{integrity:?}: epoch {e0} -> {e1}");
            epochs.push((e0, e1));
            let mut out = vec![0u8; 1 << 20];
            e.read(0, &mut out).unwrap();
            assert_eq!(out, want);
            if round == 1 {
                drop(s); // crash: no clean close
            } else {
                s.close().unwrap();
            }
        }
        // Every run started past every epoch the previous one used.
        for w in epochs.windows(2) {
            assert!(w[1].0 > w[0].1, "{epochs:?}");
        }
        let s = Store::open(d.path(), DIR_ID, Some(ring_with([32; 32])), &[]).unwrap();
        let mut out = vec![0u8; 1 << 20];
        s.get("t").unwrap().read(0, &mut out).unwrap();
        assert_eq!(out, want);
        // Nonces never repeat under one (version, epoch) key.
        let raw = std::fs::read(s.get("t").unwrap().path()).unwrap();
        let mut seen = std::collections::HashSet::new();
        for b in 0..256u64 {
            let p = format::pair_offset(b) as usize;
            for slot in [&raw[p..p + 64], &raw[p + 64..p + 128]] {
                if let Ok(Some(sl)) = format::Slot::decode(slot) {
                    if sl.kind == format::Kind::Data {
                        assert!(seen.insert((
                            sl.epoch,
                            u32::from_le_bytes(sl.nonce[..4].try_into().unwrap())
                        )));
                    }
                }
            }
        }
    }
}

#[test]
fn clean_close_marks_the_file_clean_and_a_crash_triggers_a_scrub() {
    let d = tempfile::tempdir().unwrap();
    let state = |d: &Path| inspect(d).unwrap()[0].state.clone();
    {
        let s = open(d.path(), Some(ring_with([33; 32])), 1 << 20);
        assert_eq!(state(d.path()), "open");
        s.get("t")
            .unwrap()
            .write(0, &mut vec![1u8; 8192], false)
            .unwrap();
        s.close().unwrap();
    }
    assert_eq!(state(d.path()), "clean");
    {
        let s = open(d.path(), Some(ring_with([33; 32])), 1 << 20);
        assert!(!s.get("t").unwrap().scrubbing());
        s.get("t")
            .unwrap()
            .write(0, &mut vec![2u8; 8192], false)
            .unwrap();
        // dropped without close: a crash
    }
    assert_eq!(state(d.path()), "open");
    let s = open(d.path(), Some(ring_with([33; 32])), 1 << 20);
    let e = s.get("t").unwrap();
    let t = std::time::Instant::now();
    while e.scrubbing() {
        assert!(t.elapsed().as_secs() < 20, "scrub did not finish");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut out = vec![0u8; 8192];
    e.read(0, &mut out).unwrap();
    assert_eq!(out, vec![2u8; 8192]);
    s.close().unwrap();
    assert_eq!(state(d.path()), "clean");
}

#[test]
fn check_finds_a_flipped_byte_and_repair_fixes_and_records_it() {
    let d = tempfile::tempdir().unwrap();
    let keys = ring_with([34; 32]);
    let path = {
        let s = Store::open(
            d.path(),
            DIR_ID,
            Some(Arc::clone(&keys)),
            &[spec("t", 1 << 20)],
        )
        .unwrap();
        let e = s.get("t").unwrap();
        e.write(0, &mut vec![1u8; 16384], false).unwrap();
        e.write(4096, &mut vec![2u8; 4096], false).unwrap();
        s.close().unwrap();
        e.path().to_path_buf()
    };
    let run = |repair: bool| {
        let mut log = check::RepairLog::new(d.path());
        check::check_export(
            d.path(),
            "t",
            DIR_ID,
            Some(Arc::clone(&keys)),
            repair,
            &mut log,
            &mut |_, _| {},
        )
    };
    let r = run(false);
    assert!(!r.damaged(), "{}", r.summary());
    assert_eq!((r.ok, r.holes), (4, 252), "{}", r.summary());
    // Block 1 (both slots used): a flipped data byte matches neither slot.
    // Block 2 (written once) in a cleanly closed file: a damaged slot.
    patch(&path, format::data_offset(1) + 77, |b| b[0] ^= 0x10);
    patch(&path, format::pair_offset(2) + 3, |b| b[0] ^= 0x10);
    let r = run(false);
    assert!(r.damaged(), "{}", r.summary());
    assert_eq!(r.cant_tell_blocks, vec![1], "{}", r.summary());
    assert_eq!(r.damaged_slot_blocks, vec![2], "{}", r.summary());
    assert!(
        !d.path().join(check::REPAIR_LOG).exists(),
        "check alone writes nothing"
    );
    let r = run(true);
    assert_eq!(
        (r.repaired.zeroed, r.repaired.demoted),
        (1, 1),
        "{}",
        r.summary()
    );
    assert!(!r.damaged(), "{}", r.summary());
    let log = std::fs::read_to_string(d.path().join(check::REPAIR_LOG)).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    for l in log.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["export"], "t");
    }
    let r = run(false);
    assert!(!r.damaged(), "{}", r.summary());
    // The repaired blocks read as zeros (what they already read as).
    let s = Store::open(d.path(), DIR_ID, Some(keys), &[]).unwrap();
    let mut out = vec![9u8; 4096 * 4];
    s.get("t").unwrap().read(0, &mut out).unwrap();
    assert!(out[..4096].iter().all(|&x| x == 1));
    assert!(out[4096..3 * 4096].iter().all(|&x| x == 0));
    assert!(out[3 * 4096..].iter().all(|&x| x == 1));
}
