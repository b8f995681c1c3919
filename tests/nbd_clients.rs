//! End-to-end tests of the built `ear-sidecar` binary with real NBD clients
//! (qemu-io, nbdcopy, nbdinfo, fio) and real backing files: data integrity at
//! aligned/unaligned offsets, multi-connection use, persistence across a clean
//! restart and a crash, ciphertext-only backing files, fresh nonces per write,
//! robustness against hostile clients, start-up failures (wrong KEK,
//! encryption mode change, socket path problems) and the `status` command.
//!
//! The on-disk offsets used here are computed from `doc/FORMAT.md`, not from
//! the crate, so the tests also check that the code follows the document.
//! External tools are required: a missing one fails the test with a clear
//! message (see `common::require_tool`).

mod common;

use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{qemu_io, require_tool, run_ok, Client, Rng, Sidecar};
use ear_sidecar::protocol::consts::{
    NBD_CMD_WRITE, NBD_EINVAL, NBD_ENOSPC, NBD_FLAG_CAN_MULTI_CONN,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

// Geometry from doc/FORMAT.md ("Backing file layout", "Group").
const DATA_START: u64 = 8192;
const GROUP_BYTES: u64 = 1_081_344;
const GROUP_META: u64 = 32_768;
const PAIR_SIZE: u64 = 128;
const BLOCK: u64 = 4096;

fn pair_offset(b: u64) -> u64 {
    DATA_START + (b / 256) * GROUP_BYTES + (b % 256) * PAIR_SIZE
}

fn data_offset(b: u64) -> u64 {
    DATA_START + (b / 256) * GROUP_BYTES + GROUP_META + (b % 256) * BLOCK
}

/// A 16-byte marker that cannot appear by accident, repeated to `len` bytes.
fn marker_data(len: usize) -> Vec<u8> {
    const MARKER: &[u8; 16] = b"EAR\x00plain\xa5TEXT\x5a!";
    MARKER.iter().copied().cycle().take(len).collect()
}

/// `nbdinfo --json URI` parsed.
fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    let out = run_ok(Command::new("nbdinfo").arg("--json").args(args));
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo printed invalid JSON ({e}):\n{}", out.stdout))
}

#[test]
fn qemu_io_patterns_aligned_unaligned_edges_zeroes() {
    require_tool("qemu-io");
    let size = 4 * MIB;
    let s = Sidecar::start(&["--export", "default=4M"]);
    let uri = s.uri("default");
    let last = size - 1;
    let g = MIB; // first group boundary (block 256)
    let z = 2 * MIB; // area for zeroing tests
    let cmds = [
        // Aligned, then an unaligned overwrite inside it (read-modify-write).
        "write -P 0xab 0 64k".to_string(),
        "read -P 0xab 0 64k".to_string(),
        "write -P 0xcd 1000 5000".to_string(),
        "read -P 0xab 0 1000".to_string(),
        "read -P 0xcd 1000 5000".to_string(),
        "read -P 0xab 6000 59536".to_string(),
        // Unaligned single bytes and short ranges in untouched blocks.
        "write -P 0x01 70001 1".to_string(),
        "read -P 0 69632 369".to_string(),
        "read -P 0x01 70001 1".to_string(),
        "read -P 0 70002 3726".to_string(),
        // The last byte and the last block of the export.
        format!("write -P 0xef {last} 1"),
        format!("read -P 0xef {last} 1"),
        format!("read -P 0 {} 4095", size - 4096),
        format!("write -P 0x3c {} 4096", size - 4096),
        format!("read -P 0x3c {} 4096", size - 4096),
        // Across the 1 MiB group boundary: aligned, then unaligned.
        format!("write -P 0x5a {} 8k", g - 4096),
        format!("read -P 0x5a {} 8k", g - 4096),
        format!("write -P 0x11 {} 3000", g - 1000),
        format!("read -P 0x5a {} 3096", g - 4096),
        format!("read -P 0x11 {} 3000", g - 1000),
        format!("read -P 0x5a {} 2096", g + 2000),
        // Write zeroes (whole blocks and a partial block), then discard.
        format!("write -P 0x77 {z} 64k"),
        format!("write -z {} 8k", z + 4096),
        format!("read -P 0x77 {z} 4k"),
        format!("read -P 0 {} 8k", z + 4096),
        format!("read -P 0x77 {} 52k", z + 12288),
        format!("write -z {} 100", z + 20000),
        format!("read -P 0x77 {} 3616", z + 16384),
        format!("read -P 0 {} 100", z + 20000),
        format!("read -P 0x77 {} 380", z + 20100),
        format!("discard {} 16k", z + 32768),
        format!("read -P 0 {} 16k", z + 32768),
        format!("read -P 0x77 {} 12k", z + 53248),
        // Never-written space reads as zeros.
        format!("read -P 0 {} 1M", 3 * MIB - 4096),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&uri, &cmds);
    // The final state, read back over a fresh connection.
    let final_state = [
        "read -P 0xab 0 1000".to_string(),
        "read -P 0xcd 1000 5000".to_string(),
        "read -P 0xab 6000 59536".to_string(),
        "read -P 0 65536 4465".to_string(),
        "read -P 0x01 70001 1".to_string(),
        "read -P 0 70002 3726".to_string(),
        format!("read -P 0x5a {} 3096", g - 4096),
        format!("read -P 0x11 {} 3000", g - 1000),
        format!("read -P 0x5a {} 2096", g + 2000),
        format!("read -P 0x77 {z} 4k"),
        format!("read -P 0 {} 8k", z + 4096),
        format!("read -P 0x77 {} 7712", z + 12288),
        format!("read -P 0 {} 100", z + 20000),
        format!("read -P 0x77 {} 12668", z + 20100),
        format!("read -P 0 {} 16k", z + 32768),
        format!("read -P 0x77 {} 16k", z + 49152),
        format!("read -P 0 {} 1M", 3 * MIB - 4096),
        format!("read -P 0x3c {} 4096", size - 4096),
    ];
    let final_state: Vec<&str> = final_state.iter().map(String::as_str).collect();
    qemu_io(&uri, &final_state);
    // Out of range is refused, not wrapped or truncated.
    let out = common::run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        &format!("read 0 {}", size + 4096),
    ]));
    assert!(
        !out.status.success(),
        "reading past the end succeeded:\n{}",
        out.both()
    );
    let mut s = s;
    s.stop();
}

#[test]
fn nbdcopy_random_data_round_trip_single_and_multi_conn() {
    require_tool("nbdcopy");
    let s = Sidecar::start(&["--export", "default=8M"]);
    let uri = s.uri("default");
    for (seed, extra) in [
        (1u64, &[][..]),
        (2, &["--connections", "4", "--requests", "8"][..]),
    ] {
        let input = s.root().join(format!("in-{seed}.img"));
        let output = s.root().join(format!("out-{seed}.img"));
        let data = Rng::new(seed).bytes(8 * MIB as usize);
        std::fs::write(&input, &data).expect("write input image");
        run_ok(Command::new("nbdcopy").args(extra).arg(&input).arg(&uri));
        run_ok(Command::new("nbdcopy").args(extra).arg(&uri).arg(&output));
        let back = std::fs::read(&output).expect("read output image");
        assert_eq!(back.len(), data.len(), "size differs (seed {seed})");
        if let Some(i) = back.iter().zip(&data).position(|(a, b)| a != b) {
            panic!("nbdcopy round trip differs at byte {i} (seed {seed}, args {extra:?})");
        }
    }
    let mut s = s;
    s.stop();
}

#[test]
fn nbdinfo_lists_exports_sizes_block_sizes_and_default() {
    require_tool("nbdinfo");
    let mut s = Sidecar::start(&[
        "--export",
        "default=8M",
        "--export",
        "other=3M",
        "--export",
        "x.y-z_9=1G",
    ]);
    let list = nbdinfo_json(&["--list", &s.uri("")]);
    let exports = list["exports"].as_array().expect("exports array");
    let mut got: Vec<(String, u64)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().expect("export-name").to_string(),
                e["export-size"].as_u64().expect("export-size"),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("default".to_string(), 8 * MIB),
            ("other".to_string(), 3 * MIB),
            ("x.y-z_9".to_string(), 1024 * MIB),
        ]
    );

    let info = nbdinfo_json(&[&s.uri("other")]);
    let e = &info["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(3 * MIB), "{info}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{info}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{info}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB), "{info}");
    assert_eq!(e["can_multi_conn"].as_bool(), Some(true), "{info}");
    assert_eq!(e["is_read_only"].as_bool(), Some(false), "{info}");
    for cap in ["can_flush", "can_fua", "can_trim", "can_zero"] {
        assert_eq!(e[cap].as_bool(), Some(true), "{cap}: {info}");
    }

    // The empty export name selects `default`.
    let info = nbdinfo_json(&[&s.uri("")]);
    assert_eq!(
        info["exports"][0]["export-size"].as_u64(),
        Some(8 * MIB),
        "{info}"
    );
    // An unknown export is an error, not a crash.
    let out = common::run(Command::new("nbdinfo").arg(s.uri("nosuch")));
    assert!(
        !out.status.success(),
        "nbdinfo on an unknown export succeeded"
    );
    assert!(s.is_running());
    s.stop();
}

#[test]
fn fio_verify_crc32c_over_several_connections() {
    require_tool("fio");
    let mut s = Sidecar::start(&["--export", "default=32M"]);
    // Four jobs (four NBD connections), each on its own 4 MiB region so that
    // verification is meaningful; 4 KiB and 64 KiB random writes at QD4.
    let job = format!(
        "[global]\n\
         ioengine=nbd\n\
         uri={uri}\n\
         size=4M\n\
         iodepth=4\n\
         verify=crc32c\n\
         verify_fatal=1\n\
         randrepeat=1\n\
         [small]\n\
         rw=randwrite\n\
         bs=4k\n\
         numjobs=2\n\
         offset=0\n\
         offset_increment=4M\n\
         [big]\n\
         rw=randwrite\n\
         bs=64k\n\
         numjobs=2\n\
         offset=16M\n\
         offset_increment=4M\n",
        uri = s.uri("default")
    );
    let jobfile = s.root().join("verify.fio");
    std::fs::write(&jobfile, job).expect("write fio job file");
    let out = run_ok(
        Command::new("fio")
            // fio saves verify state files in its working directory.
            .current_dir(s.root())
            .arg("--output-format=json")
            .arg(&jobfile),
    );
    let all = out.both();
    assert!(
        !all.contains("verify:") && !all.contains("bad magic") && !all.contains("crc32c: "),
        "fio reported verification errors:\n{all}"
    );
    // fio prints connection notices before the JSON document.
    let json = out
        .stdout
        .find('{')
        .and_then(|i| out.stdout.get(i..))
        .expect("fio JSON output");
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{}", out.stdout));
    let jobs = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 4, "{}", out.stdout);
    for j in jobs {
        assert_eq!(j["error"].as_u64(), Some(0), "job error: {j}");
        assert_eq!(j["write"]["io_bytes"].as_u64(), Some(4 * MIB), "{j}");
        // The verify phase read everything back.
        assert_eq!(j["read"]["io_bytes"].as_u64(), Some(4 * MIB), "{j}");
    }
    s.stop();
}

#[test]
fn data_survives_clean_restart_and_kill9_after_flush_or_fua() {
    require_tool("qemu-io");
    let mut s = Sidecar::start(&["--export", "default=4M"]);
    let uri = s.uri("default");
    qemu_io(
        &uri,
        &[
            "write -P 0x21 0 128k",
            "write -P 0x22 5000 3000",
            "write -P 0x23 1040384 16k",
        ],
    );
    s.restart();
    let checks = [
        "read -P 0x21 0 5000",
        "read -P 0x22 5000 3000",
        "read -P 0x21 8000 123072",
        "read -P 0x23 1040384 16k",
        "read -P 0 1056768 16k",
    ];
    qemu_io(&uri, &checks);

    // Crash safety of acknowledged FLUSH / FUA writes.
    qemu_io(&uri, &["write -P 7 2M 1M", "flush"]);
    qemu_io(
        &uri,
        &["write -f -P 9 3M 64k", "write -f -P 10 3149999 1234"],
    );
    s.kill9();
    assert!(
        s.socket().exists(),
        "a killed sidecar leaves its socket file"
    );
    // Restart replaces the stale socket.
    s.start_again();
    // 2M..3M flushed; 3M..3M+64k FUA, with an unaligned FUA write inside it.
    let after = [
        "read -P 7 2M 1M",
        "read -P 9 3145728 4271",
        "read -P 10 3149999 1234",
        "read -P 9 3151233 60031",
    ];
    qemu_io(&uri, &checks);
    qemu_io(&uri, &after);
    s.stop();
}

/// Writes the marker through the raw client at aligned and unaligned
/// offsets, flushes, and returns the files of the data dir that contain it.
fn write_marker_and_scan(s: &Sidecar) -> Vec<std::path::PathBuf> {
    let mut c = Client::connect_export_name(&s.socket(), "default").expect("connect");
    let data = marker_data(256 * KIB as usize);
    c.write(0, &data, false)
        .expect("socket")
        .expect("aligned marker write");
    c.write(MIB + 77, &data[..50_000], false)
        .expect("socket")
        .expect("unaligned marker write");
    c.write(3 * MIB - 4096, &data[..4096], true)
        .expect("socket")
        .expect("FUA marker write");
    c.flush().expect("socket").expect("flush");
    assert_eq!(
        c.read(0, 4096).expect("socket").expect("read back"),
        &data[..4096]
    );
    c.disconnect();
    common::scan_dir_for(&s.data_dir(), &data[..16])
}

#[test]
fn backing_files_hold_no_plaintext_but_do_without_encryption() {
    let mut enc = Sidecar::start(&["--export", "default=4M"]);
    let found = write_marker_and_scan(&enc);
    assert!(
        found.is_empty(),
        "plaintext marker found in encrypted backing files: {found:?}"
    );
    enc.stop();
    // Still none after a clean shutdown (final flush).
    let found = common::scan_dir_for(&enc.data_dir(), &marker_data(16));
    assert!(found.is_empty(), "plaintext after shutdown: {found:?}");

    // Control: the same scan does find plaintext when encryption is off.
    let mut plain = Sidecar::start(&["--export", "default=4M", "--encryption", "off"]);
    let found = write_marker_and_scan(&plain);
    assert_eq!(
        found,
        vec![plain.backing_file("default")],
        "the scan must see plaintext in an unencrypted backing file"
    );
    plain.stop();
}

#[test]
fn same_block_written_twice_gets_fresh_nonce_and_ciphertext() {
    require_tool("qemu-io");
    let mut s = Sidecar::start(&["--export", "default=4M"]);
    let uri = s.uri("default");
    let file = s.backing_file("default");
    // Block 300: second group, so the group arithmetic of FORMAT.md is exercised.
    let b = 300u64;
    let off = b * BLOCK;
    let snapshot = || {
        (
            common::read_at(&file, pair_offset(b), PAIR_SIZE as usize),
            common::read_at(&file, data_offset(b), BLOCK as usize),
        )
    };
    let write = format!("write -P 0x42 {off} 4096");
    qemu_io(&uri, &[&write, "flush"]);
    let (p1, d1) = snapshot();
    qemu_io(&uri, &[&write, "flush"]);
    let (p2, d2) = snapshot();
    qemu_io(&uri, &[&format!("read -P 0x42 {off} 4096")]);
    // The first write took slot 0 (generation 1), the second slot 1
    // (generation 2), leaving slot 0 as it was.
    let (e1, e2) = (&p1[0..64], &p2[64..128]);
    assert!(
        p1[64..].iter().all(|&x| x == 0),
        "slot 1 empty after one write"
    );
    assert_eq!(&p2[0..64], e1, "the older slot is kept");

    for (e, d, generation) in [(e1, &d1, 1u32), (e2, &d2, 2)] {
        assert_ne!(&e[0..12], &[0u8; 12], "nonce is zero");
        assert_eq!(&e[12..16], &1u32.to_le_bytes(), "key version 1");
        assert_ne!(&e[16..20], &0u32.to_le_bytes(), "epoch");
        assert_eq!(&e[20..24], &generation.to_le_bytes(), "generation");
        assert_eq!(&e[24..26], &1u16.to_le_bytes(), "kind = data");
        assert!(e[26..32].iter().all(|&x| x == 0), "reserved bytes");
        assert!(e[40..].iter().all(|&x| x == 0), "no tag, reserved bytes");
        let mut h = xxhash_rust::xxh3::Xxh3Default::new();
        h.update(&e[0..32]);
        h.update(&b.to_le_bytes());
        h.update(d);
        assert_eq!(
            &e[32..40],
            &h.digest().to_le_bytes(),
            "XXH3-64 per FORMAT.md"
        );
        assert_ne!(
            d.as_slice(),
            &[0x42u8; 4096][..],
            "stored block is plaintext"
        );
    }
    assert_ne!(&e1[0..12], &e2[0..12], "nonce reused on overwrite");
    assert_ne!(d1, d2, "same plaintext gave the same ciphertext twice");
    let same = d1.iter().zip(&d2).filter(|(a, b)| a == b).count();
    assert!(
        same < 100,
        "{same} of 4096 ciphertext bytes equal: keystream reuse?"
    );
    s.stop();
}

/// True if a read-to-end ended because the server closed the connection
/// (EOF, or a reset because our unread bytes were still queued), not by
/// the read timeout.
fn hung_up(r: std::io::Result<usize>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn garbage_clients_do_not_hurt_a_concurrent_good_client() {
    require_tool("qemu-io");
    let mut s = Sidecar::start(&["--export", "default=4M"]);
    let uri = s.uri("default");
    let sock = s.socket();

    // A good client working the whole time.
    let good = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            for i in 0..6u32 {
                let p = 0x30 + i;
                let off = u64::from(i) * 64 * KIB + 123;
                qemu_io(
                    &uri,
                    &[
                        &format!("write -P {p} {off} 40000"),
                        &format!("read -P {p} {off} 40000"),
                        "flush",
                    ],
                );
            }
        })
    };

    let mut rng = Rng::new(99);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rounds = 0u32;
    // At least two rounds, then as long as the good client works.
    while rounds < 2 || (!good.is_finished() && Instant::now() < deadline) {
        rounds += 1;
        use std::io::{Read, Write};
        // 1. Pure noise instead of a handshake.
        let mut c = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let _ = c.write_all(&rng.bytes(4096));
        let mut sink = Vec::new();
        // The server answers with its greeting, then hangs up on the noise.
        assert!(
            hung_up(c.read_to_end(&mut sink)),
            "server did not close a noise connection"
        );
        // 2. Connect and hang up at once.
        drop(std::os::unix::net::UnixStream::connect(&sock).expect("connect"));
        // 3. Wrong option magic after a proper greeting.
        let mut c = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut greet = [0u8; 18];
        c.read_exact(&mut greet).expect("greeting");
        let _ = c.write_all(&[0, 0, 0, 1]);
        let _ = c.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
        assert!(
            hung_up(c.read_to_end(&mut sink)),
            "server did not close a connection with a bad option magic"
        );

        // 4. A client that negotiates properly, then sends bad requests.
        let mut n = Client::connect_export_name(&sock, "default").expect("connect");
        assert_ne!(n.flags & NBD_FLAG_CAN_MULTI_CONN, 0);
        assert_eq!(
            n.read(0, 64 * MIB as u32).expect("socket"),
            Err(NBD_EINVAL),
            "oversized read"
        );
        assert_eq!(
            n.read(4 * MIB, 1).expect("socket"),
            Err(NBD_EINVAL),
            "read past the end"
        );
        assert_eq!(
            n.read(u64::MAX - 10, 100).expect("socket"),
            Err(NBD_EINVAL),
            "offset overflow"
        );
        assert_eq!(
            n.write(4 * MIB - 10, &[1u8; 20], false).expect("socket"),
            Err(NBD_ENOSPC),
            "write past the end"
        );
        // Oversized write: the server must swallow the payload and reply.
        let big = vec![0x55u8; (32 * MIB + 4096) as usize];
        let c1 = n.cookie();
        n.send(NBD_CMD_WRITE, 0, c1, 0, big.len() as u32, &big)
            .expect("send oversized write");
        let r = n.recv().expect("reply to oversized write");
        assert_eq!((r.cookie, r.error), (c1, NBD_EINVAL), "oversized write");
        // The connection is still in sync and usable.
        let r = n.read(3 * MIB, 512).expect("read after errors");
        assert!(r.is_ok(), "read after errors: {r:?}");
        // 5. A request with a wrong magic: only this connection is closed.
        let _ = n.s.write_all(&[0xde; 28]);
        assert!(
            n.closed_by_server(),
            "server kept a desynchronised connection"
        );
    }
    good.join().expect("the good client failed");
    assert!(s.is_running(), "server died\n{}", s.log());
    qemu_io(&uri, &["read -P 0x35 327803 40000"]);
    s.stop();
}

#[test]
fn wrong_kek_fails_startup_with_clear_message() {
    let mut s = Sidecar::start(&["--export", "default=1M"]);
    s.stop();
    let kek = s.kek_file();
    assert_eq!(std::fs::read(&kek).expect("read local.kek").len(), 32);
    std::fs::remove_file(&kek).expect("remove kek");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&kek)
        .expect("create new kek");
    let new_kek = Rng::new(7).bytes(32);
    std::io::Write::write_all(&mut f, &new_kek).expect("write kek");
    drop(f);
    let kek_path = kek.display().to_string();
    let mentions_kek = |log: &str| {
        error_lines(log)
            .iter()
            .any(|l| l.contains("KEK") || l.contains("key-encryption key") || l.contains(&kek_path))
    };
    let (status, log) = s.start_expect_failure();
    assert!(!status.success());
    assert!(
        mentions_kek(&log),
        "start-up error does not mention the KEK:\n{log}"
    );

    // Same, with the registry's master key id edited to the new KEK's
    // fingerprint ("local:" + hex(SHA-256("ear-sidecar local kek id" ||
    // kek)[..8]), as src/keys/local.rs computes it; FORMAT.md only says "KEK
    // fingerprint"), so the AES-GCM unwrap itself must catch the wrong KEK.
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"ear-sidecar local kek id");
    h.update(&new_kek);
    let fp = format!("local:{}", hex::encode(&h.finalize()[..8]));
    let reg_path = s.data_dir().join("keys.json");
    let mut reg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&reg_path).expect("read keys.json"))
            .expect("keys.json is JSON");
    reg["master_key_id"] = serde_json::Value::String(fp);
    std::fs::write(&reg_path, serde_json::to_vec_pretty(&reg).expect("json"))
        .expect("write keys.json");
    let (status, log) = s.start_expect_failure();
    assert!(!status.success());
    assert!(
        mentions_kek(&log),
        "unwrap failure does not mention the KEK:\n{log}"
    );
}

/// The error lines of a sidecar log (not the start-up warnings).
fn error_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("ERROR") || l.starts_with("ear-sidecar: error"))
        .collect()
}

#[test]
fn encryption_can_neither_be_added_nor_removed() {
    for (first, second) in [("on", "off"), ("off", "on")] {
        let mut s = Sidecar::start(&["--export", "default=1M", "--encryption", first]);
        s.stop();
        s.set_args(&["--export", "default=1M", "--encryption", second]);
        let (status, log) = s.start_expect_failure();
        assert!(!status.success());
        assert!(
            log.contains("encryption cannot be removed") || log.contains("keys encrypt"),
            "{first} -> {second}: unexpected message:\n{log}"
        );
        // The original mode still works.
        s.set_args(&["--export", "default=1M", "--encryption", first]);
        s.start_again();
        s.stop();
    }
}

#[test]
fn status_json_lists_exports_and_no_key_material() {
    use base64::Engine;
    let mut s = Sidecar::start(&["--export", "default=2M", "--export", "db=1M"]);
    s.stop();
    let data = s.data_dir();
    let out = s.run_cli(&[
        "status",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--json",
    ]);
    assert!(out.status.success(), "status failed:\n{}", out.both());
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", out.stdout));
    let mut exports: Vec<(String, u64)> = v["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_string(),
                e["size"].as_u64().expect("size"),
            )
        })
        .collect();
    exports.sort();
    assert_eq!(
        exports,
        vec![("db".to_string(), MIB), ("default".to_string(), 2 * MIB)]
    );
    assert_eq!(v["encryption"].as_str(), Some("on"));

    let kek = std::fs::read(s.kek_file()).expect("read kek");
    let text = s.run_cli(&["status", "--data-dir", data.to_str().expect("utf-8 path")]);
    assert!(text.status.success(), "{}", text.both());
    let forms = [
        hex::encode(&kek),
        hex::encode_upper(&kek),
        base64::engine::general_purpose::STANDARD.encode(&kek),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(&kek),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&kek),
    ];
    for printed in [out.both(), text.both()] {
        for f in &forms {
            // Any 8-byte window of the key in hex/base64 would be a leak.
            for w in f.as_bytes().windows(16) {
                let w = std::str::from_utf8(w).expect("ascii");
                assert!(!printed.contains(w), "status printed KEK bytes ({w})");
            }
        }
    }
}

#[test]
fn socket_mode_stale_socket_and_regular_file() {
    // Default mode 0600.
    let mut s = Sidecar::start(&["--export", "default=1M"]);
    let md = std::fs::symlink_metadata(s.socket()).expect("stat socket");
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    s.stop();
    assert!(!s.socket().exists(), "clean shutdown removes the socket");

    // --socket-mode is honoured.
    s.set_args(&["--export", "default=1M", "--socket-mode", "0660"]);
    s.start_again();
    let md = std::fs::symlink_metadata(s.socket()).expect("stat socket");
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    s.stop();

    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(s.socket()).expect("bind stale socket"));
    assert!(s.socket().exists());
    s.set_args(&["--export", "default=1M"]);
    s.start_again();
    Client::connect_export_name(&s.socket(), "default")
        .expect("connect")
        .disconnect();
    s.stop();

    // A regular file is never replaced.
    std::fs::write(s.socket(), b"precious").expect("write regular file");
    let (status, log) = s.start_expect_failure();
    assert!(!status.success());
    assert!(
        log.contains("not a socket"),
        "unexpected message for a regular file at the socket path:\n{log}"
    );
    assert_eq!(std::fs::read(s.socket()).expect("file kept"), b"precious");
}

/// `--export default=2G` on an existing directory grows the default export:
/// an explicit list is applied even when it names only `default`, while no
/// `--export` at all leaves an existing directory as it is.
#[test]
fn explicit_default_export_grows_an_existing_directory() {
    let mut s = Sidecar::start(&[]);
    s.stop();
    let size = |s: &Sidecar| {
        let data = s.data_dir();
        let out = s.run_cli(&[
            "status",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--json",
        ]);
        assert!(out.status.success(), "status failed:\n{}", out.both());
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
        v["exports"][0]["size"].as_u64().expect("size")
    };
    assert_eq!(size(&s), 1 << 30);
    s.set_args(&["--export", "default=2G"]);
    s.start_again();
    s.stop();
    assert_eq!(size(&s), 2 << 30, "log:\n{}", s.log());
    // Without --export, the existing (grown) export is served as it is.
    s.set_args(&[]);
    s.start_again();
    s.stop();
    assert_eq!(size(&s), 2 << 30);
}
