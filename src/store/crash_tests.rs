//! Crash images, in the manner of CrashMonkey and dm-log-writes: a
//! [`Recorder`] under the store logs every write since the last fdatasync,
//! and the tests build images of the backing file as a crash could leave it:
//!
//! * **power loss**: every page written since the last fdatasync holds, in
//!   any order across pages, its synced content or any version it passed
//!   through (page-cache writeback at an arbitrary moment);
//! * **process crash (SIGKILL)**: an ordered prefix of the writes, the last
//!   one cut at a page boundary (the kernel copies a `pwrite` page by page).
//!
//! In every image every block must read without error as a content it had
//! (flushed and not rewritten: exactly the flushed content); only power loss
//! may add zeros (can't tell) and, with per-block integrity, EIO for blocks
//! written since the flush. The RNG is seeded;
//! set `EAR_CRASH_SEED` to replay a failure (the seed is in every message).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::backing::recorder::{self, Log};
use super::backing::Recorder;
use super::format::{self, Integrity, BLOCK_SIZE};
use super::*;
use crate::crypto::{KeyRing, SecretKey};

const DIR_ID: [u8; 16] = [0x33; 16];
const SIZE: u64 = 96 * 4096;
const BLOCKS: usize = (SIZE / 4096) as usize;
const PAGE: usize = 4096;

/// splitmix64: small, seeded, good enough to pick crash points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seed() -> u64 {
    std::env::var("EAR_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

fn ring() -> Arc<KeyRing> {
    let mut raw = [0x5c; 32];
    let mut m = BTreeMap::new();
    m.insert(1, SecretKey::take_from(&mut raw).unwrap());
    Arc::new(KeyRing::new(m, 1, 64).unwrap())
}

fn opts(integrity: Integrity) -> ExportOptions {
    ExportOptions {
        integrity,
        // Tiny epochs: header rewrites (and fdatasyncs) happen mid-run too.
        epoch_writes: 64,
    }
}

fn open_store(dir: &Path, integrity: Integrity, rec: Option<Arc<Recorder>>) -> Store {
    recorder::install(rec);
    let s = Store::open_no_scrub(
        dir,
        DIR_ID,
        Some(ring()),
        &[ExportSpec {
            name: ExportName::parse("t").expect("valid name"),
            size: SIZE,
        }],
        opts(integrity),
    )
    .unwrap();
    recorder::install(None);
    s
}

/// Per block, the contents it may legitimately read as, and whether it was
/// written since the last flush (a write of identical content counts: it
/// still puts a new slot on disk that power loss can tear).
#[derive(Clone)]
struct Cand {
    contents: Vec<Vec<u8>>,
    written: bool,
}

type Candidates = Vec<Cand>;

fn fresh(n: usize) -> Candidates {
    vec![
        Cand {
            contents: vec![vec![0u8; BLOCK_SIZE]],
            written: false,
        };
        n
    ]
}

/// Applies a random operation to the export and the model; every block it
/// changes gains its new content as a candidate.
fn random_op(e: &Export, model: &mut [u8], cand: &mut Candidates, rng: &mut Rng) {
    let off = rng.below(SIZE - 1);
    let len = (1 + rng.below(6 * 4096)).min(SIZE - off);
    let (lo, hi) = (off as usize, (off + len) as usize);
    match rng.below(10) {
        0 => {
            e.trim(off, len, false).unwrap();
            let (a, b) = (lo.div_ceil(BLOCK_SIZE), hi / BLOCK_SIZE);
            if a < b {
                model[a * BLOCK_SIZE..b * BLOCK_SIZE].fill(0);
            }
        }
        1 => {
            e.write_zeroes(off, len, rng.below(2) == 0, false).unwrap();
            model[lo..hi].fill(0);
        }
        _ => {
            let v = rng.next() as u8;
            let mut buf: Vec<u8> = (0..len as usize).map(|i| v ^ (i / 512) as u8).collect();
            model[lo..hi].copy_from_slice(&buf);
            e.write(off, &mut buf, false).unwrap();
        }
    }
    for b in lo / BLOCK_SIZE..=(hi - 1) / BLOCK_SIZE {
        let c = model[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].to_vec();
        if !cand[b].contents.contains(&c) {
            cand[b].contents.push(c);
        }
        cand[b].written = true;
    }
}

/// Applies `w` to `img`, growing it if needed.
fn apply(img: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[off as usize..end].copy_from_slice(data);
}

/// A power-loss image: each written page at a random point of its history.
fn power_loss_image(log: &Log, rng: &mut Rng) -> Vec<u8> {
    // Per page, its versions after each write that touched it.
    let mut cur = log.synced.clone();
    let mut hist: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
    for (off, data) in &log.writes {
        apply(&mut cur, *off, data);
        let (p0, p1) = (
            *off as usize / PAGE,
            (*off as usize + data.len()).div_ceil(PAGE),
        );
        for p in p0..p1 {
            let end = ((p + 1) * PAGE).min(cur.len());
            hist.entry(p).or_default().push(cur[p * PAGE..end].to_vec());
        }
    }
    let mut img = log.synced.clone();
    for (p, versions) in hist {
        // 0 = never reached the disk, k = the k-th version.
        let k = rng.below(versions.len() as u64 + 1) as usize;
        if k > 0 {
            apply(&mut img, (p * PAGE) as u64, &versions[k - 1]);
        }
    }
    img
}

/// A process-crash image: writes `0..k` whole, then write `k` cut after a
/// random number of its pages.
fn sigkill_image(log: &Log, rng: &mut Rng) -> Vec<u8> {
    let mut img = log.synced.clone();
    let k = rng.below(log.writes.len() as u64 + 1) as usize;
    for (off, data) in &log.writes[..k] {
        apply(&mut img, *off, data);
    }
    if let Some((off, data)) = log.writes.get(k) {
        // Page boundaries in file coordinates.
        let first_end = ((*off as usize / PAGE + 1) * PAGE - *off as usize).min(data.len());
        let mut cuts = vec![0, first_end];
        let mut c = first_end;
        while c < data.len() {
            c = (c + PAGE).min(data.len());
            cuts.push(c);
        }
        let cut = cuts[rng.below(cuts.len() as u64) as usize];
        apply(&mut img, *off, &data[..cut]);
    }
    img
}

/// Writes `img` as the backing file of a fresh data directory.
fn install_image(dir: &Path, img: &[u8]) {
    let d = exports_dir(dir);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("t.ear"), img).unwrap();
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Crash {
    PowerLoss,
    Kill,
}

/// Reads every block of the opened image and checks it against `cand`.
/// Returns what each block read as (None: EIO, allowed only where noted).
fn verify(
    e: &Export,
    cand: &Candidates,
    crash: Crash,
    seed: u64,
    what: &str,
) -> Vec<Option<Vec<u8>>> {
    let gmac = e.header().integrity == Integrity::Gmac;
    let mut got = vec![];
    for (b, c) in cand.iter().enumerate() {
        let mut out = vec![0u8; BLOCK_SIZE];
        let r = e.read(b as u64 * 4096, &mut out);
        let rewritten = c.written;
        match r {
            Ok(_) => {
                // Power loss may leave a rewritten block that the format
                // cannot tell: zeros. (With integrity, a block whose second
                // write lost its slot update looks exactly like a first write
                // killed before its data, which must read as zeros; other
                // can't-tell blocks are EIO there.)
                let ok = c.contents.contains(&out)
                    || (crash == Crash::PowerLoss && rewritten && out.iter().all(|&x| x == 0));
                assert!(
                    ok,
                    "seed {seed}: {what}: {crash:?}: block {b} reads as content it never had \
                     (first byte {:#x}, {} candidates)",
                    out[0],
                    c.contents.len()
                );
                got.push(Some(out));
            }
            Err(err) => {
                assert!(
                    crash == Crash::PowerLoss && gmac && rewritten,
                    "seed {seed}: {what}: {crash:?}: block {b} failed to read: {err}"
                );
                got.push(None);
            }
        }
    }
    got
}

/// Runs flushed writes, then unflushed ones, and checks many crash images.
fn images(integrity: Integrity, crash: Crash, n_images: usize) {
    let seed = seed();
    let mut rng = Rng(seed);
    let d = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let s = open_store(d.path(), integrity, Some(Arc::clone(&rec)));
    let e = s.get("t").unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut cand = fresh(BLOCKS);
    for _ in 0..30 {
        random_op(e, &mut model, &mut cand, &mut rng);
    }
    e.flush().unwrap();
    // Flushed: exactly one candidate each.
    for (b, c) in cand.iter_mut().enumerate() {
        c.contents = vec![model[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].to_vec()];
        c.written = false;
    }
    for _ in 0..25 {
        random_op(e, &mut model, &mut cand, &mut rng);
    }
    let log = rec.log();
    assert!(!log.writes.is_empty());
    drop(s);
    for i in 0..n_images {
        let img = match crash {
            Crash::PowerLoss => power_loss_image(&log, &mut rng),
            Crash::Kill => sigkill_image(&log, &mut rng),
        };
        let d2 = tempfile::tempdir().unwrap();
        install_image(d2.path(), &img);
        let s2 = open_store(d2.path(), integrity, None);
        verify(
            s2.get("t").unwrap(),
            &cand,
            crash,
            seed,
            &format!("image {i}"),
        );
    }
}

#[test]
fn power_loss_images_default_mode() {
    images(Integrity::Check, Crash::PowerLoss, 120);
}

#[test]
fn power_loss_images_integrity_mode() {
    images(Integrity::Gmac, Crash::PowerLoss, 80);
}

#[test]
fn sigkill_images_default_mode() {
    images(Integrity::Check, Crash::Kill, 120);
}

#[test]
fn sigkill_images_integrity_mode() {
    images(Integrity::Gmac, Crash::Kill, 80);
}

/// Crash, restart, write the same blocks again, crash again…: every block
/// always reads as its content before or after an interrupted request,
/// whether or not the scrub got to run in between.
fn repeated_kills(integrity: Integrity) {
    let seed = seed();
    let mut rng = Rng(seed);
    let d = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let mut s = open_store(d.path(), integrity, Some(Arc::clone(&rec)));
    let mut cand = fresh(BLOCKS);
    let mut model = vec![0u8; SIZE as usize];
    let mut rec = rec;
    let mut dirs = vec![d];
    for round in 0..12 {
        let e = s.get("t").unwrap();
        if round > 0 && rng.below(3) == 0 {
            // Sometimes the scrub finishes before the next crash.
            scrub::run(Arc::downgrade(e));
            assert!(!e.scrubbing(), "seed {seed}");
        }
        // Concentrate on a few blocks so they are rewritten across crashes.
        for _ in 0..(1 + rng.below(12)) {
            random_op(e, &mut model, &mut cand, &mut rng);
        }
        let img = sigkill_image(&rec.log(), &mut rng);
        drop(s);
        let d2 = tempfile::tempdir().unwrap();
        install_image(d2.path(), &img);
        rec = Arc::new(Recorder::default());
        s = open_store(d2.path(), integrity, Some(Arc::clone(&rec)));
        let got = verify(
            s.get("t").unwrap(),
            &cand,
            Crash::Kill,
            seed,
            &format!("round {round}"),
        );
        // What survived is now the only truth.
        for (b, g) in got.into_iter().enumerate() {
            let g = g.expect("SIGKILL never gives EIO");
            model[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].copy_from_slice(&g);
            cand[b] = Cand {
                contents: vec![g],
                written: false,
            };
        }
        // Keep the directory alive for the next round.
        dirs.push(d2);
    }
    drop(s);
    drop(dirs);
}

#[test]
fn repeated_kill_restart_cycles_default_mode() {
    repeated_kills(Integrity::Check);
}

#[test]
fn repeated_kill_restart_cycles_integrity_mode() {
    repeated_kills(Integrity::Gmac);
}

#[test]
fn format_constants_fit_the_page_model() {
    // The process-crash model relies on pairs never straddling a page.
    assert_eq!(PAGE % format::PAIR_SIZE, 0);
    assert_eq!(format::data_offset(0) % PAGE as u64, 0);
}
