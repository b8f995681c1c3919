//! Universe-key rotation, the re-encryption sweep and retirement through the
//! real binary: `keys rotate|retire|status|sweep` on the admin socket and
//! offline, under fio `--verify` load, across a SIGKILL in the middle of the
//! sweep, with `--rotate-every` and `--retire-after-sweep`, and checked with
//! the independent Python decryptor; rotation under an AWS KMS CMK against
//! moto_server (`EAR_SKIP_MOTO=1` skips that one, as in `tests/kms_aws.rs`).

mod common;

use common::python::{decrypt, require_python_cryptography};
#[path = "common/moto.rs"]
mod moto;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{qemu_io, require_tool, run, Sidecar};
use serde_json::Value;

/// `ear-sidecar keys ARGS... --admin-socket <sidecar's>` (with `--json`).
fn keys_online(sc: &Sidecar, args: &[&str]) -> common::Output {
    let admin = sc.admin_socket();
    let mut a: Vec<&str> = vec!["keys"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--admin-socket", admin.to_str().unwrap(), "--json"]);
    sc.run_cli(&a)
}

/// `ear-sidecar keys ARGS... --data-dir <sidecar's>` (offline, `--json`).
fn keys_offline(sc: &Sidecar, args: &[&str]) -> common::Output {
    let dir = sc.data_dir();
    let mut a: Vec<&str> = vec!["keys"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--data-dir", dir.to_str().unwrap(), "--json"]);
    sc.run_cli(&a)
}

fn ok_json(out: &common::Output) -> Value {
    assert!(out.status.success(), "keys command failed: {}", out.both());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("JSON ({e}): {}", out.stdout))
}

fn status(sc: &Sidecar) -> Value {
    ok_json(&keys_online(sc, &["status"]))
}

/// Waits until `pred(status)` holds.
fn wait_status(sc: &Sidecar, what: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let v = status(sc);
        if pred(&v) {
            return v;
        }
        assert!(t.elapsed() < limit, "timed out waiting for {what}: {v:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sweep_done(v: &Value) -> bool {
    v["counts_exact"] == true
        && v["sweep"]["state"] == "done"
        && v["sweep"]["remaining_blocks"] == 0
}

fn fio_job(sc: &Sidecar, verify_only: bool) -> Child {
    let job = format!(
        "[global]\n\
         ioengine=nbd\n\
         uri={uri}\n\
         size=8M\n\
         iodepth=4\n\
         verify=crc32c\n\
         verify_fatal=1\n\
         randrepeat=1\n\
         {only}\
         [w4k]\n\
         rw=randwrite\n\
         bs=4k\n\
         numjobs=2\n\
         offset=0\n\
         offset_increment=8M\n\
         [w64k]\n\
         rw=randwrite\n\
         bs=64k\n\
         numjobs=1\n\
         offset=16M\n",
        uri = sc.uri("a"),
        only = if verify_only { "verify_only=1\n" } else { "" }
    );
    let jobfile = sc.root().join("keys.fio");
    std::fs::write(&jobfile, job).unwrap();
    Command::new("fio")
        .current_dir(sc.root())
        .arg(&jobfile)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio")
}

fn fio_ok(child: Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio {what} failed:\n{all}");
    assert!(
        !all.contains("verify:") && !all.contains("bad magic") && !all.contains("crc32c: "),
        "fio {what} reported verification errors:\n{all}"
    );
}

#[test]
fn rotate_under_fio_kill_during_sweep_restart_finish_and_retire() {
    require_tool("fio");
    require_tool("qemu-io");
    require_tool("nbdcopy");
    require_python_cryptography();
    // A slow sweep (1 MiB/s), so the SIGKILL lands in the middle of it.
    let mut sc = Sidecar::start(&[
        "--export",
        "a=24M",
        "--export",
        "b=8M",
        "--reencrypt-rate",
        "1",
    ]);
    qemu_io(&sc.uri("b"), &["write -P 0x5a 0 8M"]);
    qemu_io(&sc.uri("a"), &["write -P 0x33 0 24M"]);

    // Rotate while fio writes and verifies.
    let fio = fio_job(&sc, false);
    std::thread::sleep(Duration::from_millis(300));
    let r = ok_json(&keys_online(&sc, &["rotate"]));
    assert_eq!(r["active_version"], 2, "{r}");
    assert_eq!(r["previous_version"], 1, "{r}");
    fio_ok(fio, "write+verify across the rotation");

    // The sweep is under way: kill -9 in the middle of it.
    let cursor = sc.data_dir().join("sweep.json");
    let v = wait_status(
        &sc,
        "the sweep to rewrite something and save its cursor",
        Duration::from_secs(60),
        |v| v["sweep"]["rewritten_blocks"].as_u64().unwrap_or(0) > 64 && cursor.exists(),
    );
    assert!(
        v["sweep"]["remaining_blocks"].as_u64().unwrap() > 0,
        "{v:#}"
    );
    // Retiring now is refused with the number of blocks still under v1.
    let out = keys_online(&sc, &["retire", "1"]);
    assert!(!out.status.success());
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("block(s) still use it"),
        "{}",
        out.stderr
    );
    sc.kill9();

    // Restart at full speed: the sweep resumes from its cursor and finishes.
    let mut args: Vec<String> = sc.args().to_vec();
    let i = args.iter().position(|a| a == "--reencrypt-rate").unwrap();
    args[i + 1] = "0".into();
    sc.set_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    sc.start_again();
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&cursor).unwrap()).unwrap();
    assert_eq!(saved["target_version"], 2, "{saved}");
    let v = wait_status(
        &sc,
        "the sweep to finish",
        Duration::from_secs(120),
        sweep_done,
    );
    for e in v["exports"].as_array().unwrap() {
        assert_eq!(e["header_key_version"], 2, "{v:#}");
        assert!(e["blocks_by_version"].get("1").is_none(), "{v:#}");
    }
    let r = ok_json(&keys_online(&sc, &["retire", "1"]));
    assert_eq!(r["retired"], 1, "{r}");
    let v = status(&sc);
    assert_eq!(v["versions_loaded"], serde_json::json!([2]), "{v:#}");

    // fio's data verifies after the crash, the sweep and the retirement.
    fio_ok(fio_job(&sc, true), "verify-only after retirement");
    let live = sc.root().join("a.live");
    let out = run(Command::new("nbdcopy").arg(sc.uri("a")).arg(&live));
    assert!(out.status.success(), "{}", out.both());
    sc.stop();

    // The Python decryptor, with only version 2 in keys.json, decrypts every
    // export, and no block or header uses version 1.
    let keys_json = std::fs::read_to_string(sc.data_dir().join("keys.json")).unwrap();
    let reg: Value = serde_json::from_str(&keys_json).unwrap();
    assert_eq!(reg["versions"].as_array().unwrap().len(), 1, "{keys_json}");
    let (img_a, seen_a) = decrypt(&sc, "a");
    assert_eq!(seen_a["key_versions"], serde_json::json!([2]), "{seen_a}");
    assert_eq!(seen_a["header_key_version"], 2, "{seen_a}");
    assert!(
        img_a == std::fs::read(&live).unwrap(),
        "decrypted a differs from what NBD reads"
    );
    let (img_b, seen_b) = decrypt(&sc, "b");
    assert_eq!(seen_b["key_versions"], serde_json::json!([2]), "{seen_b}");
    assert!(
        img_b.iter().all(|&x| x == 0x5a),
        "export b lost its content"
    );
}

#[test]
fn rotate_every_crosses_three_versions_and_retires_after_sweep() {
    require_tool("qemu-io");
    let mut sc = Sidecar::start(&[
        "--export",
        "a=4M",
        "--rotate-every",
        "1s",
        "--retire-after-sweep",
    ]);
    qemu_io(&sc.uri("a"), &["write -P 0x21 0 1M"]);
    let t = Instant::now();
    let mut k = 0u64;
    loop {
        // Keep writing while keys rotate underneath.
        qemu_io(
            &sc.uri("a"),
            &[&format!(
                "write -P 0x{:02x} {} 64k",
                0x40 + k,
                (1 + k) << 20
            )],
        );
        let v = status(&sc);
        let active = v["active_version"].as_u64().unwrap();
        let loaded: Vec<u64> = v["versions_loaded"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        if active >= 3 && !loaded.contains(&1) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{v:#}");
        k = (k + 1) % 3;
        std::thread::sleep(Duration::from_millis(300));
    }
    sc.stop();
    let reg: Value =
        serde_json::from_str(&std::fs::read_to_string(sc.data_dir().join("keys.json")).unwrap())
            .unwrap();
    assert!(reg["active_version"].as_u64().unwrap() >= 3, "{reg}");
    assert!(
        reg["versions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["version"] != 1),
        "version 1 was not retired: {reg}"
    );
    // Without the schedule, everything reads back.
    sc.set_args(&["--export", "a=4M"]);
    sc.start_again();
    qemu_io(&sc.uri("a"), &["read -P 0x21 0 1M"]);
    sc.stop();
}

#[test]
fn retire_refused_with_a_count_then_offline_sweep_rotate_and_retire() {
    require_tool("qemu-io");
    require_tool("promtool");
    let mut sc = Sidecar::new_stopped(&["--export", "a=4M"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    sc.set_metrics_addr(&format!("127.0.0.1:{port}"));
    sc.start_again();
    qemu_io(&sc.uri("a"), &["write -P 0x11 0 1M"]);
    ok_json(&keys_online(&sc, &["sweep", "pause"]));
    let r = ok_json(&keys_online(&sc, &["rotate"]));
    assert_eq!(r["active_version"], 2);
    let v = wait_status(&sc, "exact counts", Duration::from_secs(20), |v| {
        v["counts_exact"] == true
    });
    assert_eq!(v["sweep"]["state"], "paused", "{v:#}");
    assert_eq!(v["versions"][0]["blocks"], 256, "{v:#}");

    // `status` shows the rotation state too.
    let admin = sc.admin_socket();
    let out = sc.run_cli(&["status", "--admin-socket", admin.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.both());
    assert!(
        out.stdout
            .contains("key rotation   : blocks by version {\"1\":256}")
            && out.stdout.contains("sweep paused"),
        "{}",
        out.stdout
    );
    // The metrics say the same, and pass promtool.
    let text = common::scrape_metrics(sc.metrics_addr());
    for line in [
        "ear_key_version_blocks{export=\"a\",version=\"1\"} 256",
        "ear_key_version_blocks{export=\"a\",version=\"2\"} 0",
        "ear_key_versions_loaded 2",
        "ear_sweep_paused 1",
        "ear_sweep_remaining_blocks 256",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    assert!(
        text.contains("ear_key_last_rotation_timestamp_seconds "),
        "{text}"
    );
    assert!(text.contains("ear_sweep_progress_ratio "), "{text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let out = keys_online(&sc, &["retire", "1"]);
    assert!(!out.status.success());
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("refusing to retire key version 1: 256 block(s) still use it (a: 256)"),
        "{}",
        out.stderr
    );
    let out = keys_online(&sc, &["retire", "2"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("it is the active version"),
        "{}",
        out.stderr
    );
    let out = keys_online(&sc, &["retire", "9"]);
    assert!(
        out.stderr.contains("there is no such version"),
        "{}",
        out.stderr
    );
    // Offline commands refuse a directory in use.
    let out = keys_offline(&sc, &["status"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("use --admin-socket"), "{}", out.stderr);
    sc.stop();

    // Offline: still refused (the sweep is paused), then the sweep runs to
    // the end, then retirement succeeds.
    let out = keys_offline(&sc, &["retire", "1"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("256 block(s) still use it"),
        "{}",
        out.stderr
    );
    let r = ok_json(&keys_offline(&sc, &["sweep", "resume"]));
    assert_eq!(r["rewritten_blocks"], 256, "{r}");
    let r = ok_json(&keys_offline(&sc, &["retire", "1"]));
    assert_eq!(r["versions"], serde_json::json!([2]), "{r}");
    // Offline rotate re-encrypts at once.
    let r = ok_json(&keys_offline(&sc, &["rotate"]));
    assert_eq!(r["active_version"], 3, "{r}");
    assert_eq!(r["rewritten_blocks"], 256, "{r}");
    let out = keys_offline(&sc, &["retire", "2"]);
    ok_json(&out);
    // The human form is one line.
    let out = sc.run_cli(&[
        "keys",
        "status",
        "--data-dir",
        sc.data_dir().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", out.both());
    assert_eq!(
        out.stdout.trim(),
        "keys: v3 (active): 256 blocks; sweep idle",
        "{}",
        out.stdout
    );
    // No target: a clear usage error.
    let out = sc.run_cli(&["keys", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.both());
    assert!(out.stderr.contains("--admin-socket PATH"), "{}", out.stderr);

    sc.start_again();
    qemu_io(&sc.uri("a"), &["read -P 0x11 0 1M", "read -P 0 1M 3M"]);
    let v = status(&sc);
    assert_eq!(v["versions_loaded"], serde_json::json!([3]), "{v:#}");
    sc.stop();
}

#[test]
fn aws_rotation_generates_the_version_under_the_cmk_and_restarts_under_it() {
    require_tool("qemu-io");
    let Some(moto) = moto::Moto::start() else {
        return;
    };
    let arn = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(moto.create_key(aws_sdk_kms::types::KeySpec::SymmetricDefault, false));
    let endpoint = moto.endpoint.clone();
    let mut sc = Sidecar::new_stopped(&[
        "--kms",
        "aws",
        "--kms-key-id",
        &arn,
        "--export",
        "a=4M",
        "--reencrypt-rate",
        "0",
        "--retire-after-sweep",
    ]);
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", Some("testing")),
        ("AWS_SECRET_ACCESS_KEY", Some("testing")),
        ("AWS_SESSION_TOKEN", Some("testing")),
        ("AWS_REGION", Some(moto::REGION)),
        ("AWS_ENDPOINT_URL_KMS", Some(endpoint.as_str())),
        ("AWS_EC2_METADATA_DISABLED", Some("true")),
        ("AWS_PROFILE", None),
        ("AWS_ENDPOINT_URL", None),
    ] {
        sc.set_env(k, v);
    }
    sc.start_again();
    qemu_io(&sc.uri("a"), &["write -P 0x7e 0 2M"]);
    let r = ok_json(&keys_online(&sc, &["rotate"]));
    assert_eq!(r["active_version"], 2, "{r}");
    // The sweep moves every block, then version 1 is retired by itself.
    wait_status(&sc, "version 1 retired", Duration::from_secs(60), |v| {
        v["versions_loaded"] == serde_json::json!([2]) && sweep_done(v)
    });
    qemu_io(&sc.uri("a"), &["read -P 0x7e 0 2M"]);
    sc.stop();
    let reg: Value =
        serde_json::from_str(&std::fs::read_to_string(sc.data_dir().join("keys.json")).unwrap())
            .unwrap();
    let versions = reg["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{reg}");
    assert_eq!(versions[0]["version"], 2, "{reg}");
    assert_eq!(
        versions[0]["context"]["ear-sidecar:key-version"], "2",
        "{reg}"
    );
    assert_eq!(reg["master_key_id"], arn.as_str(), "{reg}");
    // A restart unwraps version 2 from KMS (Decrypt with its context).
    sc.start_again();
    qemu_io(&sc.uri("a"), &["read -P 0x7e 0 2M", "read -P 0 2M 2M"]);
    sc.stop();
}
