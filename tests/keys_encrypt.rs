//! `keys encrypt` through the real binary: a directory served with
//! `--encryption off` holding a known marker (in written and in trimmed
//! blocks) is encrypted online while fio writes with `--verify`, offline
//! under the directory lock, and across a SIGKILL in the middle of the
//! sweep. Afterwards the marker is nowhere in the data directory (`grep`),
//! the Python decryptor decrypts every export, NBD reads are right, and the
//! directory restarts with `--encryption on` (and refuses `--encryption off`).

mod common;

use common::python::{decrypt, require_python_cryptography};
#[path = "common/moto.rs"]
mod moto;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{qemu_io, require_tool, run, sidecar_bin, Sidecar};
use serde_json::Value;

const MARKER: &[u8] = b"EAR-PLAINTEXT-MARKER-7f3a9c";

/// `len` bytes of the marker, repeated (every 4 KiB block holds it).
fn marker_image(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

/// Writes the marker over all of `export` (nbdcopy), then trims
/// `trim_len` bytes at `trim_at`: their blocks held the marker.
fn fill_with_marker(sc: &Sidecar, export: &str, size: usize, trim_at: u64, trim_len: u64) {
    let img = sc.root().join(format!("{export}.marker"));
    std::fs::write(&img, marker_image(size)).unwrap();
    let out = run(Command::new("nbdcopy").arg(&img).arg(sc.uri(export)));
    assert!(out.status.success(), "nbdcopy: {}", out.both());
    qemu_io(&sc.uri(export), &[&format!("discard {trim_at} {trim_len}")]);
}

/// What `export` must read: the marker with the trimmed range zeroed.
fn expected(size: usize, trim_at: u64, trim_len: u64) -> Vec<u8> {
    let mut v = marker_image(size);
    v[trim_at as usize..(trim_at + trim_len) as usize].fill(0);
    v
}

fn read_export(sc: &Sidecar, export: &str, name: &str) -> Vec<u8> {
    let f = sc.root().join(name);
    let out = run(Command::new("nbdcopy").arg(sc.uri(export)).arg(&f));
    assert!(out.status.success(), "nbdcopy: {}", out.both());
    std::fs::read(&f).unwrap()
}

/// The marker must be nowhere in the data directory: `grep -r -a -c`
/// finds it in no file, and the test kit's scan agrees.
fn assert_no_marker(data_dir: &Path) {
    let out = run(Command::new("grep")
        .args(["-r", "-a", "-l", "-F"])
        .arg(std::str::from_utf8(MARKER).unwrap())
        .arg(data_dir));
    assert_eq!(
        out.status.code(),
        Some(1),
        "grep found the plaintext marker in {}: {}",
        data_dir.display(),
        out.both()
    );
    assert!(common::scan_dir_for(data_dir, MARKER).is_empty());
}

fn encrypt_args(sc: &Sidecar) -> Vec<String> {
    vec![
        "keys".into(),
        "encrypt".into(),
        "--kms".into(),
        "local".into(),
        "--local-kek-file".into(),
        sc.kek_file().display().to_string(),
        "--json".into(),
    ]
}

fn encrypt_online(sc: &Sidecar) -> common::Output {
    let mut a = encrypt_args(sc);
    a.extend([
        "--admin-socket".into(),
        sc.admin_socket().display().to_string(),
    ]);
    sc.run_cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn ok_json(out: &common::Output) -> Value {
    assert!(out.status.success(), "command failed: {}", out.both());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("JSON ({e}): {}", out.stdout))
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
         offset_increment=8M\n",
        uri = sc.uri("a"),
        only = if verify_only { "verify_only=1\n" } else { "" }
    );
    let jobfile = sc.root().join("encrypt.fio");
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

/// Restarts `sc` with `--encryption on --kms local` (the KEK at its
/// default path), after checking `--encryption off` is refused.
fn restart_encrypted(sc: &mut Sidecar, exports: &[&str]) {
    let mut args: Vec<&str> = exports.iter().flat_map(|e| ["--export", *e]).collect();
    args.extend(["--encryption", "off"]);
    sc.set_args(&args);
    let (status, log) = sc.start_expect_failure();
    assert!(!status.success());
    assert!(
        log.contains("encryption cannot be removed") && log.contains("--encryption on --kms local"),
        "{log}"
    );
    let n = args.len();
    args[n - 1] = "on";
    args.extend(["--kms", "local"]);
    sc.set_args(&args);
    sc.start_again();
}

const SIZE_B: usize = 8 << 20;
const TRIM_AT: u64 = 1 << 20;
const TRIM_LEN: u64 = 256 << 10;

#[test]
fn online_encrypt_under_fio_leaves_no_plaintext() {
    require_tool("fio");
    require_tool("qemu-io");
    require_tool("nbdcopy");
    require_python_cryptography();
    let mut sc = Sidecar::new_stopped(&[
        "--export",
        "a=16M",
        "--export",
        "b=8M",
        "--encryption",
        "off",
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    sc.set_metrics_addr(&format!("127.0.0.1:{port}"));
    sc.start_again();
    fill_with_marker(&sc, "b", SIZE_B, TRIM_AT, TRIM_LEN);
    // Export a: the marker where fio does not write (its first 16 KiB are
    // rewritten by fio, the rest stays as the marker until the sweep).
    fill_with_marker(&sc, "a", 16 << 20, 0, 4096);
    let want_b = expected(SIZE_B, TRIM_AT, TRIM_LEN);

    // Reads stay right throughout: a reader compares b again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, uri, root) = (Arc::clone(&stop), sc.uri("b"), sc.root().to_path_buf());
        let want = want_b.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Acquire) || n == 0 {
                let f = root.join("b.during");
                let out = run(Command::new("nbdcopy").arg(&uri).arg(&f));
                assert!(out.status.success(), "nbdcopy: {}", out.both());
                assert!(
                    std::fs::read(&f).unwrap() == want,
                    "b read wrong during the switch"
                );
                n += 1;
            }
            n
        })
    };
    let fio = fio_job(&sc, false);
    std::thread::sleep(Duration::from_millis(300));
    let r = ok_json(&encrypt_online(&sc));
    assert_eq!(r["online"], true, "{r}");
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .contains("--encryption on --kms local"),
        "{r}"
    );
    fio_ok(fio, "write+verify across keys encrypt");
    stop.store(true, Ordering::Release);
    let reads = reader.join().expect("reader");
    assert!(reads >= 1);

    // Status shows encryption on; a second encrypt is refused.
    let out = sc.run_cli(&[
        "status",
        "--admin-socket",
        sc.admin_socket().to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.stdout.contains("\"encryption\": \"on\"")
            || out.stdout.contains("\"encryption\":\"on\""),
        "{}",
        out.both()
    );
    let out = encrypt_online(&sc);
    assert!(!out.status.success());
    assert!(out.stderr.contains("already encrypted"), "{}", out.stderr);

    // The sweep left no plaintext (fio writes raced the switch).
    let v = ok_json(&sc.run_cli(&[
        "keys",
        "status",
        "--admin-socket",
        sc.admin_socket().to_str().unwrap(),
        "--json",
    ]));
    for e in v["exports"].as_array().unwrap() {
        assert!(e["blocks_by_version"].get("0").is_none(), "{v:#}");
    }
    assert!(read_export(&sc, "b", "b.after") == want_b);
    // The metrics gained the keys and the sweep without a restart.
    let text = common::scrape_metrics(sc.metrics_addr());
    for line in [
        "ear_key_versions_loaded 1",
        "ear_key_version_blocks{export=\"b\",version=\"1\"} 1984",
        "ear_sweep_remaining_blocks 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    assert!(
        text.lines().any(|l| l.starts_with("ear_build_info{")
            && l.contains("encryption=\"on\"")
            && l.ends_with(" 1")),
        "{text}"
    );
    let live_a = read_export(&sc, "a", "a.live");
    sc.stop();

    assert_no_marker(&sc.data_dir());
    let (img_b, seen_b) = decrypt(&sc, "b");
    assert!(img_b == want_b, "decrypted b differs");
    assert_eq!(seen_b["key_versions"], serde_json::json!([1]), "{seen_b}");
    let (img_a, _) = decrypt(&sc, "a");
    assert!(img_a == live_a, "decrypted a differs from what NBD read");

    restart_encrypted(&mut sc, &["a=16M", "b=8M"]);
    assert!(read_export(&sc, "b", "b.restarted") == want_b);
    fio_ok(fio_job(&sc, true), "verify-only after restart");
}

#[test]
fn offline_encrypt_then_restart_encrypted() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    require_python_cryptography();
    let mut sc = Sidecar::start(&["--export", "b=8M", "--encryption", "off"]);
    fill_with_marker(&sc, "b", SIZE_B, TRIM_AT, TRIM_LEN);
    sc.stop();
    let want = expected(SIZE_B, TRIM_AT, TRIM_LEN);
    let mut a = encrypt_args(&sc);
    a.extend(["--data-dir".into(), sc.data_dir().display().to_string()]);
    let r = ok_json(&sc.run_cli(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(r["online"], false, "{r}");
    assert!(r["rewritten_blocks"].as_u64().unwrap() >= 1900, "{r}");
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(sc.kek_file())
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600);
    assert_no_marker(&sc.data_dir());
    let (img, _) = decrypt(&sc, "b");
    assert!(img == want, "decrypted b differs");
    restart_encrypted(&mut sc, &["b=8M"]);
    assert!(read_export(&sc, "b", "b.restarted") == want);
}

#[test]
fn local_kek_inside_the_data_dir_is_refused() {
    let mut sc = Sidecar::start(&["--export", "b=1M", "--encryption", "off"]);
    sc.stop();
    let kek = sc.data_dir().join("kek");
    let out = sc.run_cli(&[
        "keys",
        "encrypt",
        "--kms",
        "local",
        "--local-kek-file",
        kek.to_str().unwrap(),
        "--data-dir",
        sc.data_dir().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("inside the data directory"),
        "{}",
        out.stderr
    );
    assert!(!kek.exists());
    let reg = std::fs::read_to_string(sc.data_dir().join("keys.json")).unwrap();
    assert!(reg.contains("\"encryption\": \"off\""), "{reg}");
}

#[test]
fn sigkill_during_the_sweep_then_restart_finishes_it() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    require_python_cryptography();
    // A slow sweep (1 MiB/s), so the SIGKILL lands in the middle of it.
    let mut sc = Sidecar::start(&[
        "--export",
        "b=8M",
        "--encryption",
        "off",
        "--reencrypt-rate",
        "1",
    ]);
    fill_with_marker(&sc, "b", SIZE_B, TRIM_AT, TRIM_LEN);
    let want = expected(SIZE_B, TRIM_AT, TRIM_LEN);
    let mut client = {
        let mut a = encrypt_args(&sc);
        a.extend([
            "--admin-socket".into(),
            sc.admin_socket().display().to_string(),
        ]);
        Command::new(sidecar_bin())
            .args(&a)
            .env("XDG_CONFIG_HOME", sc.config_home())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let t = Instant::now();
    loop {
        let out = sc.run_cli(&[
            "keys",
            "status",
            "--admin-socket",
            sc.admin_socket().to_str().unwrap(),
            "--json",
        ]);
        if out.status.success() {
            let v: Value = serde_json::from_str(&out.stdout).unwrap();
            if v["sweep"]["rewritten_blocks"].as_u64().unwrap_or(0) > 64 {
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the sweep did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sc.kill9();
    let _ = client.wait();
    // Plaintext is still there: the sweep was cut short, and a backup
    // (which ships stored blocks) is refused until it is done.
    assert!(!common::scan_dir_for(&sc.data_dir(), MARKER).is_empty());
    let dest = sc.root().join("backups");
    let out = sc.run_cli(&[
        "backup",
        "--export",
        "b",
        "--to",
        dest.to_str().unwrap(),
        "--data-dir",
        sc.data_dir().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("still holds plaintext blocks"),
        "{}",
        out.both()
    );

    sc.set_args(&["--export", "b=8M", "--encryption", "on", "--kms", "local"]);
    sc.start_again();
    assert!(read_export(&sc, "b", "b.mid") == want);
    let sweep = sc.data_dir().join("sweep.json");
    let t = Instant::now();
    while std::fs::read_to_string(&sweep)
        .unwrap_or_default()
        .contains("purge_plaintext")
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the sweep did not finish"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(read_export(&sc, "b", "b.done") == want);
    sc.stop();
    assert_no_marker(&sc.data_dir());
    let (img, seen) = decrypt(&sc, "b");
    assert!(img == want, "decrypted b differs");
    assert_eq!(seen["key_versions"], serde_json::json!([1]), "{seen}");
}

#[test]
fn aws_online_encrypt_validates_the_cmk_watches_it_and_restarts_under_it() {
    require_tool("qemu-io");
    require_tool("nbdcopy");
    let Some(moto) = moto::Moto::start() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let arn = rt.block_on(moto.create_key(aws_sdk_kms::types::KeySpec::SymmetricDefault, false));
    let disabled =
        rt.block_on(moto.create_key(aws_sdk_kms::types::KeySpec::SymmetricDefault, false));
    rt.block_on(moto.set_enabled(&disabled, false));
    let endpoint = moto.endpoint.clone();
    let mut sc = Sidecar::new_stopped(&[
        "--export",
        "b=8M",
        "--encryption",
        "off",
        "--kms-check-interval",
        "1s",
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
    fill_with_marker(&sc, "b", SIZE_B, TRIM_AT, TRIM_LEN);
    let want = expected(SIZE_B, TRIM_AT, TRIM_LEN);
    let admin = sc.admin_socket().display().to_string();
    let encrypt = |key: &str| {
        sc.run_cli(&[
            "keys",
            "encrypt",
            "--kms",
            "aws",
            "--kms-key-id",
            key,
            "--kms-endpoint",
            &endpoint,
            "--admin-socket",
            &admin,
            "--json",
        ])
    };
    // A disabled CMK fails validation: nothing changes.
    let out = encrypt(&disabled);
    assert!(!out.status.success(), "{}", out.both());
    assert!(
        out.stderr.contains("refusing to encrypt") && out.stderr.contains("Disabled"),
        "{}",
        out.stderr
    );
    let reg = std::fs::read_to_string(sc.data_dir().join("keys.json")).unwrap();
    assert!(reg.contains("\"encryption\": \"off\""), "{reg}");

    let r = ok_json(&encrypt(&arn));
    assert!(
        r["restart_with"]
            .as_str()
            .unwrap()
            .contains(&format!("--kms aws --kms-key-id {arn}")),
        "{r}"
    );
    let reg: Value =
        serde_json::from_str(&std::fs::read_to_string(sc.data_dir().join("keys.json")).unwrap())
            .unwrap();
    assert_eq!(reg["encryption"], "on", "{reg}");
    assert_eq!(reg["provider"], "aws", "{reg}");
    assert_eq!(reg["master_key_id"], arn.as_str(), "{reg}");
    assert!(reg["versions"][0]["mac"].is_string(), "{reg}");
    // The revocation watcher runs without a restart.
    let t = Instant::now();
    while !sc.log().contains("master key revocation check running") {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", sc.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(read_export(&sc, "b", "b.after") == want);
    sc.stop();
    assert_no_marker(&sc.data_dir());

    sc.set_args(&[
        "--export",
        "b=8M",
        "--encryption",
        "on",
        "--kms",
        "aws",
        "--kms-key-id",
        &arn,
    ]);
    sc.start_again();
    assert!(read_export(&sc, "b", "b.restarted") == want);
    sc.stop();
}
