//! `ear-sidecar check` against the real binary: it refuses while a sidecar
//! holds the data directory, finds a flipped byte, and `--repair` fixes it,
//! records the change and leaves a directory that checks clean.

mod common;

use common::{qemu_io, require_tool, Sidecar};

#[test]
fn check_refuses_while_running_finds_a_flipped_byte_and_repairs() {
    require_tool("qemu-io");
    let mut s = Sidecar::start(&["--export", "default=4M"]);
    let uri = s.uri("default");
    // Block 3 is written twice, so both of its slots are used.
    qemu_io(
        &uri,
        &["write -P 0x5a 0 64k", "write -P 0x6b 12k 4k", "flush"],
    );
    let dir = s.data_dir().display().to_string();

    let busy = s.run_cli(&["check", "--data-dir", &dir]);
    assert_eq!(busy.status.code(), Some(2), "{}", busy.both());
    assert!(
        busy.both().contains("in use by a running ear-sidecar"),
        "{}",
        busy.both()
    );
    s.stop();

    let ok = s.run_cli(&["check", "--data-dir", &dir]);
    assert!(ok.status.success(), "{}", ok.both());
    assert!(ok.stdout.contains("default: 16 ok"), "{}", ok.stdout);

    // Flip one byte of block 3's data: it matches neither slot.
    let path = s.backing_file("default");
    let data3 = 8192 + 32768 + 3 * 4096 + 100;
    let mut raw = std::fs::read(&path).unwrap();
    raw[data3] ^= 0x01;
    std::fs::write(&path, &raw).unwrap();

    let bad = s.run_cli(&["check", "--data-dir", &dir, "--json"]);
    assert_eq!(bad.status.code(), Some(1), "{}", bad.both());
    let v: serde_json::Value = serde_json::from_str(&bad.stdout).expect("check --json output");
    assert_eq!(v["damaged"], true, "{v}");
    assert_eq!(v["exports"][0]["cant_tell_blocks"][0], 3, "{v}");

    let fixed = s.run_cli(&["check", "--data-dir", &dir, "--repair"]);
    assert!(fixed.status.success(), "{}", fixed.both());
    let record = std::fs::read_to_string(s.data_dir().join("repairs.jsonl")).unwrap();
    assert!(record.contains("\"block\":3"), "{record}");
    let again = s.run_cli(&["check", "--data-dir", &dir]);
    assert!(again.status.success(), "{}", again.both());

    // The repaired block reads as zeros (what it read as before), the rest as written.
    s.start_again();
    qemu_io(
        &uri,
        &[
            "read -P 0 12k 4k",
            "read -P 0x5a 0 12k",
            "read -P 0x5a 16k 48k",
        ],
    );
    s.stop();
}
