//! Rotation tests of the store: exact per-version counts (census and the
//! write path agree), the sweep's chunk rewrite, the header key move, and
//! the sweeper thread with its cursor file.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::format::BLOCK_SIZE;
use super::sweep::{SweepFile, Sweeper};
use super::*;
use crate::crypto::{KeyRing, SecretKey};

const DIR_ID: [u8; 16] = [0x22; 16];

fn ring() -> Arc<KeyRing> {
    let mut m = BTreeMap::new();
    m.insert(1, SecretKey::generate().unwrap());
    Arc::new(KeyRing::new(m, 1, 64).unwrap())
}

fn rotate(r: &KeyRing) -> u32 {
    let v = r.active_version() + 1;
    r.insert_version(v, SecretKey::generate().unwrap()).unwrap();
    r.set_active(v).unwrap();
    v
}

fn specs(size: u64) -> Vec<ExportSpec> {
    vec![ExportSpec {
        name: ExportName::parse("t").unwrap(),
        size,
    }]
}

fn block(tag: u64) -> Vec<u8> {
    (0..BLOCK_SIZE)
        .map(|i| (i as u64 ^ tag.wrapping_mul(31)) as u8)
        .collect()
}

fn wait_census(e: &Export) {
    let t = Instant::now();
    while !e.versions().census_finished() {
        assert!(t.elapsed() < Duration::from_secs(20), "census stuck");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn counts(e: &Export) -> BTreeMap<u32, u64> {
    let s = e.versions().snapshot();
    assert!(s.exact, "{s:?}");
    s.by_version
}

#[test]
fn counts_follow_writes_trims_and_reopen() {
    let d = tempfile::tempdir().unwrap();
    let r = ring();
    let size = 3 << 20; // 3 groups
    {
        let s = Store::open(d.path(), DIR_ID, Some(r.clone()), &specs(size)).unwrap();
        let e = s.get("t").unwrap();
        wait_census(e);
        assert!(counts(e).is_empty());
        for b in [0u64, 1, 2, 300, 700] {
            e.write(b * 4096, &mut block(b), false).unwrap();
        }
        assert_eq!(counts(e), BTreeMap::from([(1, 5)]));
        rotate(&r);
        e.write(4096, &mut block(9), false).unwrap(); // v1 -> v2
        e.write(5 * 4096, &mut block(5), false).unwrap(); // hole -> v2
        e.write(10, &mut [7u8; 100], false).unwrap(); // partial: v1 -> v2
        assert_eq!(counts(e), BTreeMap::from([(1, 3), (2, 3)]));
        e.trim(300 * 4096, 4096, false).unwrap(); // v1 -> zero
        e.trim(5 * 4096, 4096, false).unwrap(); // v2 -> zero
        e.write_zeroes(2 * 4096, 4096, true, false).unwrap(); // v1 -> v2 (encrypted zeros)
        assert_eq!(counts(e), BTreeMap::from([(1, 1), (2, 3)]));
        s.close().unwrap();
    }
    // A fresh census finds the same.
    let s = Store::open(d.path(), DIR_ID, Some(r.clone()), &specs(size)).unwrap();
    let e = s.get("t").unwrap();
    wait_census(e);
    assert_eq!(counts(e), BTreeMap::from([(1, 1), (2, 3)]));
}

#[test]
fn census_of_a_crashed_export_resolves_torn_blocks() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let r = ring();
    let path;
    let mut old0 = vec![0u8; BLOCK_SIZE];
    {
        let s = Store::open_no_scrub(
            d.path(),
            DIR_ID,
            Some(r.clone()),
            &specs(1 << 20),
            ExportOptions::default(),
        )
        .unwrap();
        let e = s.get("t").unwrap();
        path = e.path().to_path_buf();
        e.write(0, &mut block(1), false).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        f.read_exact_at(&mut old0, format::data_offset(0)).unwrap();
        e.write(4096, &mut block(2), false).unwrap();
        e.write(4096, &mut block(3), false).unwrap();
        rotate(&r);
        e.write(0, &mut block(4), false).unwrap();
        // Crash: no close.
    }
    // Block 0's v2 write "did not land" (its old data is back): it reads
    // its v1 content. Block 1 matches neither slot (can't tell).
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&old0, format::data_offset(0)).unwrap();
    f.write_all_at(&[0xAB; 16], format::data_offset(1)).unwrap();
    let s = Store::open(d.path(), DIR_ID, Some(r.clone()), &specs(1 << 20)).unwrap();
    let e = s.get("t").unwrap();
    wait_census(e);
    assert_eq!(counts(e), BTreeMap::from([(1, 2)]));
    // The sweep rewrites block 0 and leaves the damaged block alone.
    let res = e.reencrypt_chunk(0, 16, 2).unwrap();
    assert_eq!((res.rewritten, res.damaged), (1, 1));
    assert_eq!(counts(e), BTreeMap::from([(1, 1), (2, 1)]));
    let mut out = vec![0u8; BLOCK_SIZE];
    e.read(0, &mut out).unwrap();
    assert_eq!(out, block(1));
}

#[test]
fn reencrypt_chunk_rewrites_old_blocks_only_and_keeps_content() {
    for integrity in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let r = ring();
        let s = Store::open_opts(
            d.path(),
            DIR_ID,
            Some(r.clone()),
            &specs(2 << 20),
            ExportOptions::with_integrity(integrity),
        )
        .unwrap();
        let e = s.get("t").unwrap();
        wait_census(e);
        for b in 0..40u64 {
            e.write(b * 4096, &mut block(b), false).unwrap();
        }
        e.trim(3 * 4096, 4096, false).unwrap();
        let v2 = rotate(&r);
        e.write(5 * 4096, &mut block(500), false).unwrap(); // foreground wins
        assert_eq!(counts(e), BTreeMap::from([(1, 38), (2, 1)]));
        let res = e.reencrypt_chunk(0, 16, v2).unwrap();
        assert_eq!(res.rewritten, 14, "16 blocks minus a trimmed and a new one");
        assert_eq!(counts(e), BTreeMap::from([(1, 24), (2, 15)]));
        // Again: nothing left in that chunk.
        assert_eq!(e.reencrypt_chunk(0, 16, v2).unwrap().rewritten, 0);
        for b in 16..40 {
            e.reencrypt_chunk(b, 1, v2).unwrap();
        }
        assert_eq!(counts(e), BTreeMap::from([(2, 39)]));
        for b in 0..40u64 {
            let mut out = vec![0u8; BLOCK_SIZE];
            e.read(b * 4096, &mut out).unwrap();
            let want = match b {
                3 => vec![0u8; BLOCK_SIZE],
                5 => block(500),
                _ => block(b),
            };
            assert_eq!(out, want, "block {b} integrity {integrity}");
        }
        // Every valid slot now names v2: retiring v1 from the ring keeps
        // every block readable (after the header moves too).
        assert_eq!(e.header_key_version(), 1);
        e.move_header_key(v2).unwrap();
        assert_eq!(e.header_key_version(), v2);
        r.remove_version(1).unwrap();
        let mut out = vec![0u8; 40 * 4096];
        e.read(0, &mut out).unwrap();
        s.close().unwrap();
        drop(s);
        // Reopens with only v2 loaded: the header is signed under v2.
        let s = Store::open(d.path(), DIR_ID, Some(r.clone()), &specs(2 << 20)).unwrap();
        let mut again = vec![0u8; 40 * 4096];
        s.get("t").unwrap().read(0, &mut again).unwrap();
        assert_eq!(out, again);
    }
}

#[test]
fn sweeper_finishes_persists_cursor_and_pauses() {
    let d = tempfile::tempdir().unwrap();
    let r = ring();
    let s = Arc::new(Store::open(d.path(), DIR_ID, Some(r.clone()), &specs(4 << 20)).unwrap());
    let e = Arc::clone(s.get("t").unwrap());
    for b in (0..1024u64).step_by(3) {
        e.write(b * 4096, &mut block(b), false).unwrap();
    }
    let sw = Sweeper::start(&s, r.clone(), d.path(), 0);
    sw.pause().unwrap();
    let v2 = rotate(&r);
    sw.kick();
    std::thread::sleep(Duration::from_millis(300));
    wait_census(&e);
    assert_eq!(sw.status().state, "paused");
    assert!(SweepFile::load(d.path()).paused);
    assert_eq!(counts(&e).get(&1), Some(&342));
    sw.resume().unwrap();
    let t = Instant::now();
    while sw.status().state != "done" {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", sw.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counts(&e), BTreeMap::from([(v2, 342)]));
    assert_eq!(e.header_key_version(), v2);
    let st = sw.status();
    assert_eq!(st.rewritten_blocks, 342);
    assert_eq!(st.progress, 1.0);
    let f = SweepFile::load(d.path());
    assert_eq!(f.target_version, v2);
    assert!(!f.paused);
    for b in (0..1024u64).step_by(3) {
        let mut out = vec![0u8; BLOCK_SIZE];
        e.read(b * 4096, &mut out).unwrap();
        assert_eq!(out, block(b));
    }
    sw.stop();
}

#[test]
fn sweeper_throttles_to_its_rate() {
    let d = tempfile::tempdir().unwrap();
    let r = ring();
    let s = Arc::new(Store::open(d.path(), DIR_ID, Some(r.clone()), &specs(2 << 20)).unwrap());
    let e = Arc::clone(s.get("t").unwrap());
    let mut all = vec![1u8; 2 << 20];
    e.write(0, &mut all, false).unwrap();
    rotate(&r);
    // 2 MiB at 4 MiB/s: about half a second, never much less.
    let t = Instant::now();
    let sw = Sweeper::start(&s, r.clone(), d.path(), 4 << 20);
    while sw.status().state != "done" {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", sw.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    sw.stop();
}

#[test]
fn sweeper_parks_when_only_damaged_blocks_are_left() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let r = ring();
    let s = Arc::new(Store::open(d.path(), DIR_ID, Some(r.clone()), &specs(1 << 20)).unwrap());
    let e = Arc::clone(s.get("t").unwrap());
    for b in 0..8u64 {
        e.write(b * 4096, &mut block(b), false).unwrap();
    }
    // Block 3, written twice, then damaged: it matches neither slot.
    e.write(3 * 4096, &mut block(33), false).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(e.path())
        .unwrap();
    f.write_all_at(&[0xEE; 32], format::data_offset(3)).unwrap();
    let v2 = rotate(&r);
    let sw = Sweeper::start(&s, r.clone(), d.path(), 0);
    let t = Instant::now();
    loop {
        let st = sw.status();
        if st.state == "done" && st.damaged_blocks == 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let passes = sw.passes();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        sw.passes() <= passes + 1,
        "the sweeper keeps passing over damage"
    );
    assert_eq!(counts(&e), BTreeMap::from([(1, 1), (v2, 7)]));
    // The header still moved: only the damaged block keeps version 1 in use.
    assert_eq!(e.header_key_version(), v2);
    sw.stop();
}

/// True when `needle` occurs anywhere in the backing file of `t`.
fn file_holds(dir: &std::path::Path, needle: &[u8]) -> bool {
    let raw = std::fs::read(dir.join("exports").join("t.ear")).unwrap();
    raw.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn plaintext_export_switches_live_sweeps_version_0_and_purges_residue() {
    let d = tempfile::tempdir().unwrap();
    let size = 2 << 20; // 2 groups
    let marker = b"PLAINTEXT-MARKER!";
    let mblock: Vec<u8> = marker.iter().copied().cycle().take(BLOCK_SIZE).collect();
    let s = Arc::new(Store::open(d.path(), DIR_ID, None, &specs(size)).unwrap());
    let e = Arc::clone(s.get("t").unwrap());
    for b in 0..8u64 {
        e.write(b * 4096, &mut mblock.clone(), false).unwrap();
    }
    // Block 3 rewritten (its old slot is a plaintext check), 5 trimmed.
    e.write(3 * 4096, &mut mblock.clone(), false).unwrap();
    e.trim(5 * 4096, 4096, false).unwrap();
    wait_census(&e);
    assert_eq!(counts(&e), BTreeMap::from([(0, 7)]));

    let r = ring();
    s.enable_encryption(&r).unwrap();
    assert!(e.encrypted());
    assert_eq!(e.header_key_version(), 1);
    // Plaintext blocks read as before; a new write is encrypted.
    let mut out = vec![0u8; BLOCK_SIZE];
    e.read(2 * 4096, &mut out).unwrap();
    assert_eq!(out, mblock);
    e.write(300 * 4096, &mut block(300), false).unwrap();
    assert_eq!(counts(&e), BTreeMap::from([(0, 7), (1, 1)]));

    SweepFile::set_purge_plaintext(d.path()).unwrap();
    let sw = Sweeper::start(&s, Arc::clone(&r), d.path(), 0);
    let t = Instant::now();
    while sw.purge_pending() {
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", sw.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    sw.stop();
    assert_eq!(counts(&e), BTreeMap::from([(1, 8)]));
    for b in [0u64, 3, 7] {
        e.read(b * 4096, &mut out).unwrap();
        assert_eq!(out, mblock, "block {b}");
    }
    e.read(5 * 4096, &mut out).unwrap();
    assert!(out.iter().all(|&x| x == 0));
    s.close().unwrap();
    assert!(!file_holds(d.path(), marker), "plaintext left in the file");
    // No used slot names key version 0 any more.
    let raw = std::fs::read(d.path().join("exports").join("t.ear")).unwrap();
    let pairs = &raw[format::pair_offset(0) as usize..][..8 * format::PAIR_SIZE];
    for p in pairs.chunks_exact(format::PAIR_SIZE) {
        for sl in format::decode_pair(p) {
            if let format::SlotRead::Used(sl) = sl {
                assert!(
                    sl.kind == format::Kind::Zero || sl.key_version == 1,
                    "{sl:?}"
                );
            }
        }
    }
    drop(s);
    // Reopened with the keys: everything reads back.
    let s = Store::open(d.path(), DIR_ID, Some(r), &[]).unwrap();
    s.get("t").unwrap().read(7 * 4096, &mut out).unwrap();
    assert_eq!(out, mblock);
}

#[test]
fn a_plaintext_header_under_keys_is_switched_at_open() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = Store::open(d.path(), DIR_ID, None, &specs(1 << 20)).unwrap();
        s.get("t").unwrap().write(0, &mut block(1), true).unwrap();
        s.close().unwrap();
    }
    // The registry went on, then a crash before the header was rewritten.
    let r = ring();
    {
        let s = Store::open(d.path(), DIR_ID, Some(Arc::clone(&r)), &[]).unwrap();
        let e = s.get("t").unwrap();
        assert!(e.encrypted());
        assert_eq!(e.header_key_version(), 1);
        let mut out = vec![0u8; BLOCK_SIZE];
        e.read(0, &mut out).unwrap();
        assert_eq!(out, block(1));
        s.close().unwrap();
    }
    // The header is encrypted now: encryption off is refused.
    let err = Store::open(d.path(), DIR_ID, None, &[]).unwrap_err();
    assert!(err.to_string().contains("encrypted"), "{err}");
}
