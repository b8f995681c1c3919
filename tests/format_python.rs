//! Proves that `doc/FORMAT.md` is enough to decrypt a data directory: data
//! written through a real NBD client (qemu-io) is decrypted offline by an
//! independent implementation, `tests/python/decrypt_ear.py` (Python's
//! `cryptography` package, written only from the document), and compared
//! byte for byte with the image the writes should have produced.
//!
//! The sidecar runs with tiny key epochs (the hidden `--epoch-writes` test
//! knob) and blocks are rewritten, so the decryptor meets several epochs,
//! newest slots in both positions and zero slots.
//!
//! Requires qemu-io, python3 and the `cryptography` and `xxhash` packages; a
//! missing one fails the test with a clear message.

mod common;

use common::python::{decrypt, decryptor, require_python_cryptography};

use std::process::Command;

use common::{qemu_io, require_tool, run, Sidecar};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// One write applied both to the export (through qemu-io) and to the
/// expected image.
enum Op {
    /// `write -P pattern offset len`.
    Pattern(u8, usize, usize),
    /// `write -z offset len`.
    Zero(usize, usize),
    /// `discard offset len` (reads back as zeros).
    Discard(usize, usize),
}

impl Op {
    fn command(&self) -> String {
        match *self {
            Op::Pattern(p, off, len) => format!("write -P {p:#04x} {off} {len}"),
            Op::Zero(off, len) => format!("write -z {off} {len}"),
            Op::Discard(off, len) => format!("discard {off} {len}"),
        }
    }

    fn apply(&self, image: &mut [u8]) {
        let (fill, off, len) = match *self {
            Op::Pattern(p, off, len) => (p, off, len),
            Op::Zero(off, len) | Op::Discard(off, len) => (0, off, len),
        };
        image[off..off + len].fill(fill);
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: image length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: decrypted image differs from the expected one at byte {i} \
             (block {}): got {:#04x}, want {:#04x}",
            i / 4096,
            got[i],
            want[i]
        );
    }
}

fn round_trip(encryption: &str, integrity: &str) {
    require_tool("qemu-io");
    require_python_cryptography();
    // 2 MiB + 1.5 KiB: two full groups plus a third group whose only block is
    // partial (the size is a multiple of 512, not of 4096).
    let size = 2 * MIB + 1536;
    let mut s = Sidecar::start(&[
        "--export",
        &format!("default={size}"),
        "--export",
        "other=1M",
        "--encryption",
        encryption,
        "--integrity",
        integrity,
        "--epoch-writes",
        "4",
    ]);
    let ops = [
        Op::Pattern(0x11, 0, 64 * KIB),
        Op::Pattern(0x22, 5000, 3000), // one partial block (RMW inside block 1)
        Op::Pattern(0x33, 100_000, 10),
        Op::Pattern(0x44, MIB - 2048, 8192), // across the group boundary
        Op::Pattern(0x55, 1_500_000, 300 * KIB),
        Op::Discard(1_523_712, 16 * KIB), // a trimmed, block-aligned range
        Op::Zero(1_560_000, 5000),        // zeroes, unaligned
        Op::Pattern(0x66, 2 * MIB, 1536), // the partial last block
        Op::Pattern(0x77, 40 * KIB, 4096),
        Op::Pattern(0x77, 40 * KIB, 4096), // the same block rewritten
        Op::Pattern(0x78, 40 * KIB, 4096), // and again: newest slot back in slot 0
        Op::Pattern(0x88, 0, 16 * KIB),    // rewrites under a later epoch
    ];
    let mut image = vec![0u8; size];
    let cmds: Vec<String> = ops.iter().map(Op::command).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&s.uri("default"), &cmds);
    qemu_io(&s.uri("other"), &["write -P 0x99 4096 4096"]);
    for op in &ops {
        op.apply(&mut image);
    }
    s.stop();

    let (got, seen) = decrypt(&s, "default");
    assert_same(&got, &image, "default");
    let mut other = vec![0u8; MIB];
    other[4096..8192].fill(0x99);
    assert_same(&decrypt(&s, "other").0, &other, "other");
    // Both slot positions hold newest slots, and zero slots were read.
    let n = &seen["newest_in_slot"];
    assert!(n[0].as_u64() > Some(0) && n[1].as_u64() > Some(0), "{seen}");
    assert!(seen["zero_slots"].as_u64() > Some(0), "{seen}");
    if encryption == "on" {
        let epochs = seen["epochs"].as_array().map_or(0, Vec::len);
        assert!(epochs >= 3, "blocks under several key epochs: {seen}");
        if integrity == "on" {
            assert!(seen["tags_verified"].as_u64() > Some(0), "{seen}");
        }
    }

    // The decryptor is not trivially accepting: a different KEK must fail.
    if encryption == "on" {
        let wrong = s.root().join("wrong.kek");
        std::fs::write(&wrong, [0x5au8; 32]).expect("write wrong kek");
        let out = run(Command::new("python3")
            .arg(decryptor())
            .arg("--data-dir")
            .arg(s.data_dir())
            .args(["--export", "default", "--output"])
            .arg(s.root().join("never.plain"))
            .arg("--kek-file")
            .arg(&wrong));
        assert!(
            !out.status.success() && out.stderr.contains("unwrap"),
            "decrypt_ear.py accepted a wrong KEK:\n{}",
            out.both()
        );
    }
}

#[test]
fn python_decrypts_what_qemu_io_wrote() {
    round_trip("on", "off");
}

#[test]
fn python_verifies_block_tags_in_integrity_mode() {
    round_trip("on", "on");
}

#[test]
fn python_reads_plaintext_directory_too() {
    round_trip("off", "off");
}
