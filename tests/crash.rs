//! Crash safety and durability against the real binary:
//! repeated kill -9 while a pipelined writer runs,
//! a full filesystem, a file-size limit, and a crash at each step of the key
//! registry's atomic replacement.
//!
//! The kill -9 model: every block has the generation last acknowledged and at
//! most one write (or trim) in flight (the writer never overlaps in-flight
//! ranges, so completion order cannot matter). After the crash a block must
//! read as its acknowledged generation or as the in-flight one, and never
//! fail: format v2 updates blocks crash-atomically. A process kill leaves the
//! page cache intact, so this checks every acknowledged write, which implies
//! the FLUSH/FUA guarantee. A second loop kills the sidecar under fio random
//! writes (4 KiB-256 KiB, QD16, 2 jobs) and requires every block to read
//! whole, then `ear-sidecar check` to find no damage. `CRASH_CYCLES` sets the
//! number of cycles (default 20; scripts/soak.sh runs many more).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{is_root, pattern, pattern_gen, Client, Rng, Sidecar};
use ear_sidecar::protocol::consts::*;

const BLOCKS: u64 = 2048; // 8 MiB export
const BS: u64 = 4096;

/// What the writer knows when the process dies.
struct Model {
    acked: Vec<u64>,
    in_flight: HashMap<u64, u64>,
    next_gen: u64,
    writes_acked: u64,
    flushes: u64,
}

/// Writes random extents with up to 8 requests in flight until the socket
/// fails (the process was killed). Returns the model.
fn writer(socket: PathBuf, mut m: Model, seed: u64) -> Model {
    let mut rng = Rng::new(seed);
    let Ok(mut c) = Client::connect(&socket, "default") else {
        return m;
    };
    // cookie -> (first block, blocks, generation)
    let mut pending: HashMap<u64, (u64, u64, u64)> = HashMap::new();
    let mut since_flush = 0;
    let recv_one =
        |c: &mut Client, m: &mut Model, pending: &mut HashMap<u64, (u64, u64, u64)>| -> bool {
            let Ok(h) = c.recv() else { return false };
            let Some((first, n, gen)) = pending.remove(&h.cookie) else {
                panic!("reply for unknown cookie {}", h.cookie)
            };
            assert_eq!(h.error, 0, "write failed with errno {}", h.error);
            for b in first..first + n {
                m.acked[b as usize] = gen;
                m.in_flight.remove(&b);
            }
            m.writes_acked += 1;
            true
        };
    loop {
        if pending.len() >= 8 || (!pending.is_empty() && rng.below(3) == 0) {
            if !recv_one(&mut c, &mut m, &mut pending) {
                return m;
            }
            continue;
        }
        since_flush += 1;
        if since_flush > 40 {
            since_flush = 0;
            while !pending.is_empty() {
                if !recv_one(&mut c, &mut m, &mut pending) {
                    return m;
                }
            }
            match c.flush() {
                Ok(Ok(())) => m.flushes += 1,
                Ok(Err(e)) => panic!("flush failed with errno {e}"),
                Err(_) => return m,
            }
            continue;
        }
        let n = 1 + rng.below(8);
        let first = rng.below(BLOCKS - n + 1);
        if (first..first + n).any(|b| m.in_flight.contains_key(&b)) {
            continue;
        }
        let trim = rng.below(10) == 0;
        let gen = if trim { 0 } else { m.next_gen };
        m.next_gen += 1;
        for b in first..first + n {
            m.in_flight.insert(b, gen);
        }
        let ck = c.cookie();
        pending.insert(ck, (first, n, gen));
        let fua = if rng.below(4) == 0 {
            NBD_CMD_FLAG_FUA
        } else {
            0
        };
        let sent = if trim {
            c.send(NBD_CMD_TRIM, fua, ck, first * BS, (n * BS) as u32, &[])
        } else {
            let mut buf = Vec::with_capacity((n * BS) as usize);
            for b in first..first + n {
                buf.extend_from_slice(&pattern(b, gen));
            }
            c.send(NBD_CMD_WRITE, fua, ck, first * BS, buf.len() as u32, &buf)
        };
        if sent.is_err() {
            return m;
        }
    }
}

/// Reads every block and checks it against the model. Returns (unreadable
/// blocks, blocks that were in flight); the caller requires 0 unreadable.
fn verify(sc: &Sidecar, m: &mut Model, cycle: u32) -> (u64, u64) {
    let mut c = sc.client("default");
    let mut torn = 0;
    const CHUNK: u64 = 64;
    for chunk in 0..BLOCKS / CHUNK {
        let base = chunk * CHUNK;
        let blocks: Vec<Result<Vec<u8>, u32>> =
            match c.read(base * BS, (CHUNK * BS) as u32).unwrap() {
                Ok(data) => data.chunks(BS as usize).map(|b| Ok(b.to_vec())).collect(),
                Err(_) => (base..base + CHUNK)
                    .map(|b| c.read(b * BS, BS as u32).unwrap())
                    .collect(),
            };
        for (i, r) in blocks.into_iter().enumerate() {
            let b = base + i as u64;
            let acked = m.acked[b as usize];
            let flight = m.in_flight.get(&b).copied();
            match r {
                Ok(data) => {
                    let g = pattern_gen(b, &data);
                    assert!(
                        g == Some(acked) || (flight.is_some() && g == flight),
                        "cycle {cycle}: block {b} reads as {g:?}; acknowledged generation {acked}, \
                         in flight {flight:?} (wrong data after a crash)"
                    );
                    if let Some(g) = g {
                        m.acked[b as usize] = g;
                    }
                }
                Err(errno) => {
                    eprintln!(
                        "cycle {cycle}: block {b} is unreadable (errno {errno}); in flight {flight:?}"
                    );
                    torn += 1;
                }
            }
        }
    }
    let in_flight = m.in_flight.len() as u64;
    m.in_flight.clear();
    c.disconnect();
    (torn, in_flight)
}

fn cycles() -> u32 {
    std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[test]
fn kill9_cycles_keep_acknowledged_writes() {
    let t0 = Instant::now();
    let mut sc = Sidecar::start(&["--export", "default=8M"]);
    let mut rng = Rng::from_env("kill9_cycles_keep_acknowledged_writes");
    let mut m = Model {
        acked: vec![0; BLOCKS as usize],
        in_flight: HashMap::new(),
        next_gen: 1,
        writes_acked: 0,
        flushes: 0,
    };
    let (mut torn_total, mut inflight_total) = (0, 0);
    let n = cycles();
    for cycle in 0..n {
        let socket = sc.socket();
        let seed = rng.next_u64();
        let h = std::thread::spawn(move || writer(socket, m, seed));
        std::thread::sleep(Duration::from_millis(50 + rng.below(450)));
        sc.kill9();
        m = h.join().expect("writer thread");
        sc.start_again();
        let (torn, inflight) = verify(&sc, &mut m, cycle);
        torn_total += torn;
        inflight_total += inflight;
    }
    eprintln!(
        "kill -9 cycles: {n}, writes acknowledged {}, flushes {}, requests in flight at kill {inflight_total} blocks, \
         unreadable blocks {torn_total}, {:.1}s",
        m.writes_acked,
        m.flushes,
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(torn_total, 0, "a crash made blocks unreadable");
    assert!(m.writes_acked > u64::from(n), "writer made no progress");
    assert!(!sc.all_logs().contains("panicked"), "{}", sc.all_logs());
}

// ------------------------------------------------------- fio under kill -9

/// Runs fio random writes against the sidecar until it is killed; every
/// write fills its blocks with one byte value (`fill`), so a block that mixes
/// two writes is detectable.
fn fio_until_killed(uri: &str, fill: u8, root: &Path) -> std::process::Child {
    Command::new("fio")
        .current_dir(root)
        .args([
            "--name=crash",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-256k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=16M",
            "--time_based",
            "--runtime=60",
            &format!("--buffer_pattern=0x{fill:02x}"),
            "--fsync=64",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run fio")
}

#[test]
fn fio_kill9_cycles_leave_no_unreadable_block() {
    if Command::new("fio").arg("--version").output().is_err() {
        eprintln!("SKIPPED: fio is not installed (.ci/run installs it)");
        return;
    }
    const EXPORT_BLOCKS: u64 = 4096; // 16 MiB
                                     // Small key epochs: the loop also crosses epochs and crash-restarts.
    let mut sc = Sidecar::start(&["--export", "default=16M", "--epoch-writes", "4096"]);
    let mut rng = Rng::from_env("fio_kill9_cycles_leave_no_unreadable_block");
    let n = cycles();
    let mut unreadable = 0u64;
    let mut written = 0u64;
    for cycle in 0..n {
        // Fill values 1..=n: a block reads as one of them or zeros.
        let fill = (cycle + 1) as u8;
        let mut fio = fio_until_killed(&sc.uri("default"), fill, sc.root());
        std::thread::sleep(Duration::from_millis(300 + rng.below(900)));
        sc.kill9();
        let _ = fio.kill();
        let _ = fio.wait();
        sc.start_again();
        let mut c = sc.client("default");
        written = 0;
        for chunk in 0..EXPORT_BLOCKS / 64 {
            let base = chunk * 64;
            let data = match c.read(base * BS, (64 * BS) as u32).unwrap() {
                Ok(d) => d,
                Err(_) => {
                    let mut d = Vec::new();
                    for b in base..base + 64 {
                        match c.read(b * BS, BS as u32).unwrap() {
                            Ok(x) => d.extend_from_slice(&x),
                            Err(errno) => {
                                eprintln!("cycle {cycle}: block {b} unreadable (errno {errno})");
                                unreadable += 1;
                                d.extend_from_slice(&[0u8; BS as usize]);
                            }
                        }
                    }
                    d
                }
            };
            for (i, blk) in data.chunks(BS as usize).enumerate() {
                let v = blk[0];
                assert!(
                    blk.iter().all(|&x| x == v) && v <= fill,
                    "cycle {cycle}: block {} mixes writes or holds data never written \
                     (first byte {v:#x})",
                    base + i as u64
                );
                written += u64::from(v != 0);
            }
        }
        c.disconnect();
    }
    eprintln!("fio kill -9 cycles: {n}, blocks written {written}, unreadable {unreadable}");
    assert_eq!(unreadable, 0, "unreadable blocks after kill -9");
    assert!(written > 0, "fio wrote nothing");
    // Offline check after a clean stop: no damage (torn-but-old slots are fine).
    assert!(sc.try_stop(), "clean stop");
    let out = Command::new(common::sidecar_bin())
        .args(["check", "--data-dir"])
        .arg(sc.data_dir())
        .env("XDG_CONFIG_HOME", sc.config_home())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "check found damage: {text}");
    assert!(text.contains("0 can't tell, 0 bad tags"), "{text}");
    assert!(!sc.all_logs().contains("panicked"), "{}", sc.all_logs());
}

// ------------------------------------------------------------------ full disk

/// Unmounts on drop (declared before the sidecar so it drops after it).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill_until_error(c: &mut Client, chunk: u64) -> (Vec<u64>, u32) {
    let mut ok = Vec::new();
    let size = c.size;
    let mut off = 0;
    while off + chunk <= size {
        let mut buf = Vec::with_capacity(chunk as usize);
        for b in off / BS..(off + chunk) / BS {
            buf.extend_from_slice(&pattern(b, 1));
        }
        match c.write(off, &buf, false).unwrap() {
            Ok(()) => ok.push(off),
            Err(e) => return (ok, e),
        }
        off += chunk;
    }
    (ok, 0)
}

fn check_chunks(c: &mut Client, offs: &[u64], chunk: u64, what: &str) {
    for &off in offs {
        let data = c
            .read(off, chunk as u32)
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: read at {off} failed: errno {e}"));
        for (i, blk) in data.chunks(BS as usize).enumerate() {
            let b = off / BS + i as u64;
            assert_eq!(pattern_gen(b, blk), Some(1), "{what}: block {b} corrupted");
        }
    }
}

#[test]
fn full_filesystem_gives_enospc_and_keeps_data() {
    if !is_root() {
        eprintln!("SKIP full_filesystem: not root, cannot mount a small tmpfs");
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("earfull")
        .tempdir_in("/tmp")
        .unwrap();
    let mnt = root.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !st.is_ok_and(|s| s.success()) {
        eprintln!("SKIP full_filesystem: mount -t tmpfs not permitted here");
        return;
    }
    let _mount = Mount(mnt.clone());
    let mut sc = Sidecar::new_stopped(&["--export", "default=64M"]);
    sc.set_data_dir(mnt.join("data"));
    sc.start_again();
    let chunk = 256 << 10;
    let mut c = sc.client("default");
    let (ok, errno) = fill_until_error(&mut c, chunk);
    eprintln!(
        "full disk: {} chunks of 256 KiB written, then errno {errno}",
        ok.len()
    );
    assert!(
        errno == NBD_ENOSPC || errno == NBD_EIO,
        "write on a full fs: errno {errno}"
    );
    assert!(ok.len() >= 8, "too few writes succeeded before ENOSPC");
    // Further writes keep failing cleanly; the connection stays usable.
    let e = c.write(60 << 20, &pattern(15360, 1), true).unwrap();
    assert!(matches!(e, Err(NBD_ENOSPC) | Err(NBD_EIO)), "{e:?}");
    let f = c.flush().unwrap();
    eprintln!("full disk: flush -> {f:?}");
    check_chunks(&mut c, &ok, chunk, "full fs, same connection");
    // Overwriting already-allocated blocks still works on a full fs.
    c.write(0, &pattern(0, 1), true)
        .unwrap()
        .expect("overwrite of allocated block on a full fs");
    c.disconnect();
    assert!(
        sc.is_running(),
        "died on a full fs; log:\n{}",
        sc.all_logs()
    );
    // Restart on the full filesystem: data still readable.
    sc.try_stop();
    sc.start_again();
    let mut c = sc.client("default");
    check_chunks(&mut c, &ok, chunk, "full fs, after restart");
    c.disconnect();
    sc.kill9();
}

#[test]
fn file_size_limit_gives_error_not_death() {
    let mut sc = Sidecar::start(&["--export", "default=64M"]);
    sc.stop();
    sc.set_wrapper(&["prlimit", "--fsize=4194304", "--"]);
    sc.start_again();
    let mut c = sc.client("default");
    c.write(0, &pattern(0, 1), true)
        .unwrap()
        .expect("write below the limit");
    let r = c.write(32 << 20, &pattern(8192, 1), true);
    let status = {
        std::thread::sleep(Duration::from_millis(200));
        sc.exit_status()
    };
    assert!(
        status.is_none(),
        "ear-sidecar was killed by a write beyond RLIMIT_FSIZE ({status:?}; reply {r:?}): \
         SIGXFSZ must be ignored so the write fails with EFBIG and gets an error reply"
    );
    let r = r.expect("socket");
    assert!(
        matches!(r, Err(NBD_ENOSPC) | Err(NBD_EIO) | Err(NBD_EINVAL)),
        "{r:?}"
    );
    assert_eq!(c.read(0, 4096).unwrap().unwrap(), pattern(0, 1));
}

// ------------------------------------------------------------ key registry

fn registry_paths(sc: &Sidecar) -> (PathBuf, PathBuf) {
    (
        sc.data_dir().join("keys.json"),
        sc.data_dir().join("keys.json.tmp"),
    )
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn key_registry_survives_crash_at_each_write_step() {
    let mut sc = Sidecar::start(&["--export", "default=16M"]);
    {
        let mut c = sc.client("default");
        c.write(0, &pattern(0, 5), true).unwrap().unwrap();
        c.disconnect();
    }
    sc.stop();
    let (reg, tmp) = registry_paths(&sc);
    let good = std::fs::read(&reg).unwrap();
    let half = &good[..good.len() / 2];
    let steps: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("tmp created, nothing written", Some(vec![])),
        ("tmp half written", Some(half.to_vec())),
        ("tmp fully written, not renamed", Some(good.clone())),
        ("tmp garbage", Some(b"\x00\xff{not json".to_vec())),
        ("renamed, directory not synced", None),
    ];
    for (what, tmp_bytes) in steps {
        if let Some(b) = &tmp_bytes {
            write_mode(&tmp, b, 0o600);
        }
        sc.start_again();
        let mut c = sc.client("default");
        assert_eq!(
            c.read(0, 4096).unwrap().unwrap(),
            pattern(0, 5),
            "{what}: data unreadable"
        );
        c.disconnect();
        sc.stop();
        assert_eq!(
            std::fs::read(&reg).unwrap(),
            good,
            "{what}: keys.json changed"
        );
        eprintln!("registry crash step '{what}': start-up ok, data intact, keys.json unchanged");
        let _ = std::fs::remove_file(&tmp);
    }

    // A corrupt keys.json (which the atomic write never produces) must stop
    // start-up, never re-initialise the directory with a new key.
    let export = sc.data_dir().join("exports").join("default.ear");
    let before = std::fs::read(&export).unwrap();
    write_mode(&reg, half, 0o600);
    sc.spawn_no_wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sc.is_running() {
        assert!(
            Instant::now() < deadline,
            "started with a truncated keys.json"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!sc.exit_status().unwrap().success());
    sc.kill9();
    assert_eq!(
        std::fs::read(&reg).unwrap(),
        half,
        "corrupt registry was overwritten"
    );
    assert!(std::fs::read(&export).unwrap() == before, "export changed");
    write_mode(&reg, &good, 0o600);
    sc.start_again();
    let mut c = sc.client("default");
    assert_eq!(c.read(0, 4096).unwrap().unwrap(), pattern(0, 5));
    c.disconnect();

    // Crash during the very first initialisation (KEK written, registry only
    // as a tmp file): the next start initialises cleanly.
    let mut fresh = Sidecar::start(&["--export", "default=16M"]);
    fresh.stop();
    let (freg, ftmp) = registry_paths(&fresh);
    let fgood = std::fs::read(&freg).unwrap();
    std::fs::remove_file(&freg).unwrap();
    let _ = std::fs::remove_dir_all(fresh.data_dir().join("exports"));
    write_mode(&ftmp, &fgood[..fgood.len() / 3], 0o600);
    fresh.start_again();
    fresh.assert_serves("default", 0);
    assert!(freg.exists());
}
