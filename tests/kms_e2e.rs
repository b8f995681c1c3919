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

#[path = "common/moto.rs"]
mod moto;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kms::types::KeySpec;

use moto::{free_port, kid, Moto};

const BIN: &str = env!("CARGO_BIN_EXE_ear-sidecar");

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
    block_on(async {
        let c = moto.admin_client();
        if enabled {
            c.enable_key()
                .key_id(kid(arn))
                .send()
                .await
                .expect("EnableKey");
        } else {
            c.disable_key()
                .key_id(kid(arn))
                .send()
                .await
                .expect("DisableKey");
        }
    })
}

fn require_qemu_io() {
    let ok = Command::new("qemu-io")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "qemu-io is not installed: install qemu-utils (Debian/Ubuntu: apt-get install qemu-utils) \
         to run the end-to-end tests"
    );
}

/// Environment for the child: fake credentials, moto's endpoint (or any URL).
fn aws_env(cmd: &mut Command, endpoint: &str) {
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_SESSION_TOKEN", "testing")
        .env("AWS_REGION", moto::REGION)
        .env("AWS_ENDPOINT_URL_KMS", endpoint)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    for k in [
        "EAR_DATA_DIR",
        "EAR_SOCKET",
        "EAR_KMS",
        "EAR_KMS_KEY_ID",
        "EAR_KMS_ENDPOINT",
        "EAR_KMS_REGION",
        "EAR_CONFIG",
    ] {
        cmd.env_remove(k);
    }
}

/// A temp data dir + socket path for one sidecar.
struct Dirs {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    sock: PathBuf,
    logs: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let sock = tmp.path().join("nbd.sock");
    let logs = tmp.path().join("logs");
    std::fs::create_dir(&logs).expect("logs dir");
    Dirs {
        _tmp: tmp,
        data,
        sock,
        logs,
    }
}

/// A running sidecar; killed on drop if still running.
struct Sidecar {
    child: Child,
    log: PathBuf,
    /// Port of its metrics/health listener on 127.0.0.1.
    metrics_port: u16,
}

impl Sidecar {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "sidecar exited with {status} on SIGTERM; log:\n{}",
                    self.log_text()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar did not stop within 20 s of SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_cmd(d: &Dirs, endpoint: &str, arn: &str, extra: &[&str]) -> (Command, PathBuf, u16) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = d.logs.join(format!("sidecar-{n}.log"));
    // Tests run in parallel: every sidecar gets its own metrics port.
    let metrics_port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&d.data)
        .arg("--socket")
        .arg(&d.sock)
        .args(["--kms", "aws", "--kms-key-id", arn])
        .args(["--export", "default=16M", "--log-format", "json"])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    aws_env(&mut cmd, endpoint);
    (cmd, log, metrics_port)
}

/// Starts the sidecar and waits until its socket accepts connections.
fn start(d: &Dirs, endpoint: &str, arn: &str, extra: &[&str]) -> Sidecar {
    let (mut cmd, log, metrics_port) = serve_cmd(d, endpoint, arn, extra);
    let child = cmd.spawn().expect("spawn ear-sidecar");
    let mut s = Sidecar {
        child,
        log,
        metrics_port,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::os::unix::net::UnixStream::connect(&d.sock).is_ok()
            && s.log_text().contains("\"listening\"")
        {
            return s;
        }
        if let Some(status) = s.child.try_wait().expect("try_wait") {
            panic!(
                "sidecar exited during start-up with {status}; log:\n{}",
                s.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "sidecar did not listen within 20 s; log:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the sidecar expecting start-up to fail; returns (stderr, elapsed).
fn start_fails(d: &Dirs, endpoint: &str, arn: &str, extra: &[&str]) -> (String, Duration) {
    let (mut cmd, log, _) = serve_cmd(d, endpoint, arn, extra);
    let t = Instant::now();
    let status = cmd.status().expect("run ear-sidecar");
    let elapsed = t.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !status.success(),
        "start-up should have failed; log:\n{text}"
    );
    (text, elapsed)
}

fn qemu_io(sock: &Path, cmd: &str) -> Output {
    Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(format!("nbd+unix:///default?socket={}", sock.display()))
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .output()
        .expect("run qemu-io")
}

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts a qemu-io command succeeded (exit 0, no error or pattern mismatch).
fn io_ok(sock: &Path, cmd: &str, s: &Sidecar) {
    let o = qemu_io(sock, cmd);
    let text = out_text(&o);
    let lower = text.to_lowercase();
    assert!(
        o.status.success() && !lower.contains("error") && !lower.contains("fail"),
        "qemu-io {cmd:?} failed: {text}\nsidecar log:\n{}",
        s.log_text()
    );
}

/// The HTTP status line of `GET path` on the sidecar's metrics listener.
fn http_status(s: &Sidecar, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c =
        std::net::TcpStream::connect(("127.0.0.1", s.metrics_port)).expect("connect metrics");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(c, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send");
    let mut resp = String::new();
    let _ = c.read_to_string(&mut resp);
    resp.lines().next().unwrap_or_default().to_string()
}

fn registry_exists(d: &Dirs) -> bool {
    d.data.join("keys.json").exists()
}

fn validate_key(endpoint: &str, arn: &str) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["validate-key", "--kms-key-id", arn])
        .stdin(Stdio::null());
    aws_env(&mut cmd, endpoint);
    cmd.output().expect("run validate-key")
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
    require_qemu_io();
    let moto = moto_or_skip!();
    let arn = create_key(&moto, KeySpec::SymmetricDefault, false);
    let d = dirs();

    // validate-key: exit 0 and one line per check.
    let v = validate_key(&moto.endpoint, &arn);
    let vt = out_text(&v);
    assert!(v.status.success(), "validate-key should pass: {vt}");
    assert_eq!(vt.matches("  ok    ").count(), 10, "{vt}");

    let s = start(&d, &moto.endpoint, &arn, &[]);
    assert!(registry_exists(&d));
    let log = s.log_text();
    assert!(
        log.contains("AWS KMS key passed all validation checks"),
        "{log}"
    );
    io_ok(&d.sock, "write -P 0xab 0 1M", &s);
    io_ok(&d.sock, "read -P 0xab 0 1M", &s);
    s.stop();

    // The registry holds the ARN and a KMS blob, never a raw key.
    let reg = std::fs::read_to_string(d.data.join("keys.json")).expect("keys.json");
    assert!(reg.contains(&arn), "{reg}");

    let s = start(&d, &moto.endpoint, &arn, &[]);
    let ms = unwrap_ms(&s.log_text()).expect("unwrap elapsed_ms logged");
    eprintln!("start-up unwrap latency against moto: {ms} ms");
    io_ok(&d.sock, "read -P 0xab 0 1M", &s);
    s.stop();

    // status: provider aws, master key = the ARN.
    let st = Command::new(BIN)
        .args(["status", "--json", "--data-dir"])
        .arg(&d.data)
        .output()
        .expect("status");
    assert!(st.status.success(), "{}", out_text(&st));
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status json");
    assert_eq!(v["provider"], "aws");
    assert_eq!(v["master_key_id"], arn.as_str());

    // A different CMK is refused on this directory.
    let other = create_key(&moto, KeySpec::SymmetricDefault, false);
    let (text, _) = start_fails(&d, &moto.endpoint, &other, &[]);
    assert!(
        text.contains(&format!("is encrypted under master key {arn}"))
            && text.contains(&format!("refusing to start with {other}")),
        "{text}"
    );
    // …and the data is still readable with the right one.
    let s = start(&d, &moto.endpoint, &arn, &[]);
    io_ok(&d.sock, "read -P 0xab 0 1M", &s);
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
        let d = dirs();
        let (text, _) = start_fails(&d, &moto.endpoint, arn, &[]);
        assert!(
            text.contains(expect),
            "{what}: expected {expect:?} in:\n{text}"
        );
        assert!(
            !registry_exists(&d),
            "{what}: the data directory must not be initialised"
        );
        let v = validate_key(&moto.endpoint, arn);
        let vt = out_text(&v);
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
    let d = dirs();
    let (text, elapsed) = start_fails(&d, &endpoint, &arn, &["--kms-startup-timeout", "3s"]);
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
    assert!(!registry_exists(&d));

    // validate-key against a dead KMS exits non-zero too.
    let v = validate_key(&endpoint, &arn);
    assert!(!v.status.success(), "{}", out_text(&v));
}

#[test]
fn kms_outage_after_startup_keeps_serving_and_restart_fails_in_bounded_time() {
    require_qemu_io();
    let mut moto = moto_or_skip!();
    let arn = create_key(&moto, KeySpec::SymmetricDefault, false);
    let d = dirs();
    let s = start(&d, &moto.endpoint, &arn, &["--kms-check-interval", "1s"]);
    io_ok(&d.sock, "write -P 0x5a 0 1M", &s);

    moto.stop();
    // Several failed key checks later, still serving reads and writes.
    std::thread::sleep(Duration::from_millis(2500));
    io_ok(&d.sock, "read -P 0x5a 0 1M", &s);
    io_ok(&d.sock, "write -P 0x17 1M 1M", &s);
    io_ok(&d.sock, "read -P 0x17 1M 1M", &s);
    let log = s.log_text();
    assert!(log.contains("master key check failed"), "{log}");
    assert!(
        !log.contains("FAILED CLOSED"),
        "an outage is not a revocation:\n{log}"
    );
    s.stop();

    // Restart while KMS is still down: bounded, clear failure.
    let (text, elapsed) = start_fails(&d, &moto.endpoint, &arn, &["--kms-startup-timeout", "3s"]);
    eprintln!("existing directory, KMS down, --kms-startup-timeout 3s: failed after {elapsed:?}");
    assert!(
        text.contains(&format!("AWS KMS at {} unreachable", moto.endpoint)),
        "{text}"
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn cmk_disabled_while_running_fails_closed_then_recovers() {
    require_qemu_io();
    let moto = moto_or_skip!();
    let arn = create_key(&moto, KeySpec::SymmetricDefault, false);
    let d = dirs();
    let watch = ["--kms-check-interval", "1s", "--kms-revocation-grace", "2s"];
    let s = start(&d, &moto.endpoint, &arn, &watch);
    io_ok(&d.sock, "write -P 0xc3 0 1M", &s);
    assert!(
        http_status(&s, "/readyz").contains(" 200"),
        "ready while the key is enabled"
    );

    set_enabled(&moto, &arn, false);
    let t = Instant::now();
    while !s.log_text().contains("FAILED CLOSED") {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "did not fail closed within 15 s; log:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("failed closed {:?} after DisableKey", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "not before the grace period"
    );
    let log = s.log_text();
    assert!(log.contains("Disabled"), "the log must say why:\n{log}");
    assert!(log.contains("not ready"), "{log}");
    let ready = http_status(&s, "/readyz");
    assert!(
        !ready.contains(" 200"),
        "/readyz must fail after failing closed: {ready}"
    );

    let o = qemu_io(&d.sock, "read -P 0xc3 0 1M");
    let text = out_text(&o);
    assert!(
        text.contains("Input/output error"),
        "reads must fail with EIO after failing closed: {text}"
    );
    let o = qemu_io(&d.sock, "write -P 0x00 0 4k");
    assert!(
        out_text(&o).contains("Input/output error"),
        "writes must fail with EIO after failing closed: {}",
        out_text(&o)
    );
    s.stop();

    // Re-enable and restart: everything is readable again.
    set_enabled(&moto, &arn, true);
    let s = start(&d, &moto.endpoint, &arn, &watch);
    io_ok(&d.sock, "read -P 0xc3 0 1M", &s);
    s.stop();
}

#[test]
fn disabled_cmk_on_an_existing_directory_refuses_to_start() {
    let moto = moto_or_skip!();
    let arn = create_key(&moto, KeySpec::SymmetricDefault, false);
    let d = dirs();
    let s = start(&d, &moto.endpoint, &arn, &[]);
    s.stop();
    set_enabled(&moto, &arn, false);
    let (text, _) = start_fails(&d, &moto.endpoint, &arn, &[]);
    assert!(
        text.contains("reports master key") && text.contains("Disabled"),
        "{text}"
    );
}
