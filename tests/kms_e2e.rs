//! End to end through the real `ear-sidecar` binary with `--kms aws` against a
//! real moto server: data written through NBD (`qemu-io`) survives a restart;
//! bad keys refuse to initialise a directory with a specific message; a
//! directory refuses a different CMK; KMS down at start-up fails in bounded
//! time; KMS down after start-up keeps serving; a CMK disabled while running
//! fails closed after the grace period and recovers after re-enable + restart;
//! `validate-key` exit codes.
//!
//! Needs `qemu-io` and `moto_server` on PATH (fails with a clear message when
//! either is missing; `EAR_SKIP_MOTO=1` skips, as in `tests/kms_aws.rs`).

mod common;
#[path = "common/moto.rs"]
mod moto;

use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_kms::types::KeySpec;

use common::{qemu_io_output, run, sidecar_bin, Output, Sidecar};
use moto::{free_port, Moto};

macro_rules! moto_or_skip {
    () => {
        match Moto::start() {
            Some(m) => m,
            None => return,
        }
    };
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test runtime")
        .block_on(f)
}

fn create_key(moto: &Moto, spec: KeySpec, multi_region: bool) -> String {
    block_on(moto.create_key(spec, multi_region))
}

fn set_enabled(moto: &Moto, arn: &str, enabled: bool) {
    block_on(moto.set_enabled(arn, enabled))
}

/// The environment of every child: fake credentials, KMS at `endpoint`
/// (moto's, or any URL), no AWS profile or endpoint from the developer's
/// shell. `None` removes the variable.
fn aws_env(endpoint: &str) -> [(&'static str, Option<String>); 9] {
    [
        ("AWS_ACCESS_KEY_ID", Some("testing".into())),
        ("AWS_SECRET_ACCESS_KEY", Some("testing".into())),
        ("AWS_SESSION_TOKEN", Some("testing".into())),
        ("AWS_REGION", Some(moto::REGION.into())),
        ("AWS_ENDPOINT_URL_KMS", Some(endpoint.into())),
        ("AWS_EC2_METADATA_DISABLED", Some("true".into())),
        ("AWS_PROFILE", None),
        ("AWS_ENDPOINT_URL", None),
        ("RUST_LOG", None),
    ]
}

/// A stopped sidecar on a fresh directory, using KMS at `endpoint`.
fn sidecar(endpoint: &str) -> Sidecar {
    let mut s = Sidecar::new_stopped(&[]);
    for (k, v) in aws_env(endpoint) {
        s.set_env(k, v.as_deref());
    }
    s
}

/// Arguments of a start under CMK `arn` (JSON logs, a 16 MiB default
/// export), with its own metrics port: tests run in parallel.
fn set_args(s: &mut Sidecar, arn: &str, extra: &[&str]) {
    let mut args = vec!["--kms", "aws", "--kms-key-id", arn];
    args.extend(["--export", "default=16M", "--log-format", "json"]);
    args.extend(extra);
    s.set_args(&args);
    s.set_metrics_addr(&format!("127.0.0.1:{}", free_port()));
}

/// Starts the sidecar and waits until it serves and has logged "listening".
fn start(s: &mut Sidecar, arn: &str, extra: &[&str]) {
    set_args(s, arn, extra);
    s.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.log().contains("\"listening\"") {
        assert!(
            Instant::now() < deadline,
            "sidecar did not log \"listening\" within 20 s; log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the sidecar expecting start-up to fail; returns (stderr, elapsed).
fn start_fails(s: &mut Sidecar, arn: &str, extra: &[&str]) -> (String, Duration) {
    set_args(s, arn, extra);
    let t = Instant::now();
    let (status, text) = s.start_expect_failure();
    let elapsed = t.elapsed();
    assert!(
        !status.success(),
        "start-up should have failed; log:\n{text}"
    );
    (text, elapsed)
}

/// Asserts a qemu-io command on the default export succeeded, with the
/// sidecar log on failure.
fn io_ok(s: &Sidecar, cmd: &str) {
    let o = qemu_io_output(&s.uri("default"), &[cmd]);
    let text = o.both();
    let lower = text.to_lowercase();
    assert!(
        o.status.success() && !lower.contains("error") && !lower.contains("fail"),
        "qemu-io {cmd:?} failed: {text}\nsidecar log:\n{}",
        s.log()
    );
}

/// The HTTP status line of `GET path` on the sidecar's metrics listener.
fn http_status(s: &Sidecar, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.metrics_addr()).expect("connect metrics");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(c, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send");
    let mut resp = String::new();
    let _ = c.read_to_string(&mut resp);
    resp.lines().next().unwrap_or_default().to_string()
}

fn registry_exists(s: &Sidecar) -> bool {
    s.data_dir().join("keys.json").exists()
}

fn validate_key(endpoint: &str, arn: &str) -> Output {
    let mut cmd = Command::new(sidecar_bin());
    cmd.args(["validate-key", "--kms-key-id", arn]);
    for (k, v) in aws_env(endpoint) {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    run(&mut cmd)
}

/// The `elapsed_ms` of the "universe keys unwrapped into memory" log line.
fn unwrap_ms(log: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("universe keys unwrapped into memory"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("fields")?.get("elapsed_ms")?.as_u64())
}

#[test]
fn happy_path_restart_status_validate_and_other_cmk_refused() {
    common::require_tool("qemu-io");
    let moto = moto_or_skip!();
    let arn = create_key(&moto, KeySpec::SymmetricDefault, false);
    let mut s = sidecar(&moto.endpoint);

    // validate-key: exit 0 and one line per check.
    let v = validate_key(&moto.endpoint, &arn);
    let vt = v.both();
    assert!(v.status.success(), "validate-key should pass: {vt}");
    assert_eq!(vt.matches("  ok    ").count(), 10, "{vt}");

    start(&mut s, &arn, &[]);
    assert!(registry_exists(&s));
    let log = s.log();
    assert!(
        log.contains("AWS KMS key passed all validation checks"),
        "{log}"
    );
    io_ok(&s, "write -P 0xab 0 1M");
    io_ok(&s, "read -P 0xab 0 1M");
    s.stop();

    // The registry holds the ARN and a KMS blob, never a raw key.
    let reg = std::fs::read_to_string(s.data_dir().join("keys.json")).expect("keys.json");
    assert!(reg.contains(&arn), "{reg}");

    start(&mut s, &arn, &[]);
    let ms = unwrap_ms(&s.log()).expect("unwrap elapsed_ms logged");
    eprintln!("start-up unwrap latency against moto: {ms} ms");
    io_ok(&s, "read -P 0xab 0 1M");
    s.stop();

    // status: provider aws, master key = the ARN.
    let d = s.data_dir().display().to_string();
    let st = s.run_cli(&["status", "--json", "--data-dir", &d]);
    assert!(st.status.success(), "{}", st.both());
    let v: serde_json::Value = serde_json::from_str(&st.stdout).expect("status json");
    assert_eq!(v["provider"], "aws");
    assert_eq!(v["master_key_id"], arn.as_str());

    // A different CMK is refused on this directory.
    let other = create_key(&moto, KeySpec::SymmetricDefault, false);
    let (text, _) = start_fails(&mut s, &other, &[]);
    assert!(
        text.contains(&format!("is encrypted under master key {arn}"))
            && text.contains(&format!("refusing to start with {other}")),
        "{text}"
    );
    // …and the data is still readable with the right one.
    start(&mut s, &arn, &[]);
    io_ok(&s, "read -P 0xab 0 1M");
    s.stop();
}

#[test]
fn bad_keys_refuse_to_initialise_a_new_directory() {
    let moto = moto_or_skip!();
    let nonexistent = format!(
        "arn:aws:kms:{}:123456789012:key/00000000-0000-0000-0000-000000000000",
        moto::REGION
    );
    let rsa = create_key(&moto, KeySpec::Rsa2048, false);
    let multi = create_key(&moto, KeySpec::SymmetricDefault, true);
    let disabled = create_key(&moto, KeySpec::SymmetricDefault, false);
    set_enabled(&moto, &disabled, false);

    let cases: [(&str, &str, &str); 5] = [
        ("nonexistent ARN", &nonexistent, "was not found"),
        ("RSA key", &rsa, "KeySpec is RSA_2048"),
        ("multi-region key", &multi, "multi-region key"),
        ("disabled key", &disabled, "KeyState is Disabled"),
        (
            "malformed ARN",
            "alias/not-an-arn",
            "a full key ARN is required",
        ),
    ];
    for (what, arn, expect) in cases {
        let mut s = sidecar(&moto.endpoint);
        let (text, _) = start_fails(&mut s, arn, &[]);
        assert!(
            text.contains(expect),
            "{what}: expected {expect:?} in:\n{text}"
        );
        assert!(
            !registry_exists(&s),
            "{what}: the data directory must not be initialised"
        );
        let v = validate_key(&moto.endpoint, arn);
        let vt = v.both();
        assert!(!v.status.success(), "{what}: validate-key must fail: {vt}");
        assert!(vt.contains(expect), "{what}: validate-key output:\n{vt}");
        assert!(vt.contains("the key is NOT usable"), "{vt}");
    }
}

#[test]
fn kms_down_at_startup_fails_in_bounded_time() {
    // Nothing listens on this port: connections are refused.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let arn = format!(
        "arn:aws:kms:{}:123456789012:key/11111111-1111-1111-1111-111111111111",
        moto::REGION
    );
    let mut s = sidecar(&endpoint);
    let (text, elapsed) = start_fails(&mut s, &arn, &["--kms-startup-timeout", "3s"]);
    eprintln!("new directory, KMS down, --kms-startup-timeout 3s: failed after {elapsed:?}");
    assert!(
        text.contains(&format!("AWS KMS at {endpoint} unreachable")),
        "{text}"
    );
    assert!(text.contains("--kms-startup-timeout"), "{text}");
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(10),
        "should give up after about 3 s, took {elapsed:?}"
    );
    assert!(!registry_exists(&s));

    // validate-key against a dead KMS exits non-zero too.
    let v = validate_key(&endpoint, &arn);
    assert!(!v.status.success(), "{}", v.both());
}

#[test]
fn kms_outage_after_startup_keeps_serving_and_restart_fails_in_bounded_time() {
    common::require_tool("qemu-io");
    let mut moto = moto_or_skip!();
    let arn = create_key(&moto, KeySpec::SymmetricDefault, false);
    let mut s = sidecar(&moto.endpoint);
    start(&mut s, &arn, &["--kms-check-interval", "1s"]);
    io_ok(&s, "write -P 0x5a 0 1M");

    moto.stop();
    // Several failed key checks later, still serving reads and writes.
    std::thread::sleep(Duration::from_millis(2500));
    io_ok(&s, "read -P 0x5a 0 1M");
    io_ok(&s, "write -P 0x17 1M 1M");
    io_ok(&s, "read -P 0x17 1M 1M");
    let log = s.log();
    assert!(log.contains("master key check failed"), "{log}");
    assert!(
        !log.contains("FAILED CLOSED"),
        "an outage is not a revocation:\n{log}"
    );
    s.stop();

    // Restart while KMS is still down: bounded, clear failure.
    let (text, elapsed) = start_fails(&mut s, &arn, &["--kms-startup-timeout", "3s"]);
    eprintln!("existing directory, KMS down, --kms-startup-timeout 3s: failed after {elapsed:?}");
    assert!(
        text.contains(&format!("AWS KMS at {} unreachable", moto.endpoint)),
        "{text}"
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn cmk_disabled_while_running_fails_closed_then_recovers() {
    common::require_tool("qemu-io");
    let moto = moto_or_skip!();
    let arn = create_key(&moto, KeySpec::SymmetricDefault, false);
    let mut s = sidecar(&moto.endpoint);
    let watch = ["--kms-check-interval", "1s", "--kms-revocation-grace", "2s"];
    start(&mut s, &arn, &watch);
    io_ok(&s, "write -P 0xc3 0 1M");
    assert!(
        http_status(&s, "/readyz").contains(" 200"),
        "ready while the key is enabled"
    );

    set_enabled(&moto, &arn, false);
    let t = Instant::now();
    while !s.log().contains("FAILED CLOSED") {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "did not fail closed within 15 s; log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("failed closed {:?} after DisableKey", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "not before the grace period"
    );
    let log = s.log();
    assert!(log.contains("Disabled"), "the log must say why:\n{log}");
    assert!(log.contains("not ready"), "{log}");
    let ready = http_status(&s, "/readyz");
    assert!(
        !ready.contains(" 200"),
        "/readyz must fail after failing closed: {ready}"
    );

    let o = qemu_io_output(&s.uri("default"), &["read -P 0xc3 0 1M"]);
    let text = o.both();
    assert!(
        text.contains("Input/output error"),
        "reads must fail with EIO after failing closed: {text}"
    );
    let o = qemu_io_output(&s.uri("default"), &["write -P 0x00 0 4k"]);
    assert!(
        o.both().contains("Input/output error"),
        "writes must fail with EIO after failing closed: {}",
        o.both()
    );
    s.stop();

    // Re-enable and restart: everything is readable again.
    set_enabled(&moto, &arn, true);
    start(&mut s, &arn, &watch);
    io_ok(&s, "read -P 0xc3 0 1M");
    s.stop();
}

#[test]
fn disabled_cmk_on_an_existing_directory_refuses_to_start() {
    let moto = moto_or_skip!();
    let arn = create_key(&moto, KeySpec::SymmetricDefault, false);
    let mut s = sidecar(&moto.endpoint);
    start(&mut s, &arn, &[]);
    s.stop();
    set_enabled(&moto, &arn, false);
    let (text, _) = start_fails(&mut s, &arn, &[]);
    assert!(
        text.contains("reports master key") && text.contains("Disabled"),
        "{text}"
    );
}
