//! Key wrapping through the real binary: `keys rewrap` to a new CMK (then
//! the old CMK disabled and a restart under the new one reads the data back),
//! migration of a `--kms local` directory to AWS KMS, an invalid new CMK
//! refused with keys.json untouched, offline edits of keys.json refused at
//! start-up, and a withdrawn `kms:Decrypt` failing closed after the grace
//! period.
//!
//! KMS is a real moto server. moto enforces key policies only for
//! DescribeKey, so "kms:Decrypt removed" is simulated by an HTTP proxy in
//! front of moto that answers Decrypt with AWS's AccessDeniedException
//! (`tests/common/kms_proxy.rs`); the sidecar's SDK client and error handling
//! are the real ones. Needs `qemu-io` and `moto_server` (`EAR_SKIP_MOTO=1`
//! skips the moto tests, as in `tests/kms_aws.rs`).

mod common;
#[path = "common/kms_proxy.rs"]
mod kms_proxy;
#[path = "common/moto.rs"]
mod moto;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_kms::types::KeySpec;
use ear_sidecar::crypto::KeyRing;
use ear_sidecar::keys::local::LocalProvider;
use ear_sidecar::keys::registry::{universe_key_context, Registry};
use ear_sidecar::keys::KeyProvider;

use common::{qemu_io_output, run, sidecar_bin, Output, Sidecar};
use kms_proxy::DenyProxy;
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

fn create_key(moto: &Moto) -> String {
    block_on(moto.create_key(KeySpec::SymmetricDefault, false))
}

/// Fake credentials and KMS at `endpoint` for every child.
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

/// Arguments for serving under CMK `arn` (or the local KEK when `arn` is
/// empty), JSON logs, a 16 MiB default export and its own metrics port.
fn set_args(s: &mut Sidecar, arn: &str, extra: &[&str]) {
    let mut args = if arn.is_empty() {
        vec!["--kms", "local"]
    } else {
        vec!["--kms", "aws", "--kms-key-id", arn]
    };
    args.extend(["--export", "default=16M", "--log-format", "json"]);
    args.extend(extra);
    s.set_args(&args);
    s.set_metrics_addr(&format!("127.0.0.1:{}", free_port()));
}

fn start(s: &mut Sidecar, arn: &str, extra: &[&str]) {
    set_args(s, arn, extra);
    s.start_again();
}

fn start_fails(s: &mut Sidecar, arn: &str) -> String {
    set_args(s, arn, &[]);
    let (status, log) = s.start_expect_failure();
    assert!(!status.success(), "{log}");
    log
}

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

/// `ear-sidecar keys rewrap --data-dir DIR ARGS` (offline) with the AWS test
/// environment and the sidecar's KEK location.
fn rewrap(s: &Sidecar, endpoint: &str, args: &[&str]) -> Output {
    let d = s.data_dir();
    let mut full = vec!["--data-dir", d.to_str().expect("utf-8 path")];
    full.extend(args);
    keys_rewrap(s, endpoint, &full)
}

/// `ear-sidecar keys rewrap ARGS`.
fn keys_rewrap(s: &Sidecar, endpoint: &str, args: &[&str]) -> Output {
    let mut full = vec!["rewrap"];
    full.extend(args);
    keys_cmd(s, endpoint, &full)
}

/// `ear-sidecar keys ARGS` with the AWS test environment and the sidecar's
/// KEK location.
fn keys_cmd(s: &Sidecar, endpoint: &str, args: &[&str]) -> Output {
    let mut c = Command::new(sidecar_bin());
    c.arg("keys")
        .args(args)
        .env("XDG_CONFIG_HOME", s.config_home());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EAR_") {
            c.env_remove(k);
        }
    }
    for (k, v) in aws_env(endpoint) {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    run(&mut c)
}

fn registry_json(s: &Sidecar) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(s.data_dir().join("keys.json")).expect("keys.json"))
        .expect("keys.json is JSON")
}

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

#[test]
fn rewrap_to_a_new_cmk_then_disable_the_old_one_and_restart() {
    common::require_tool("qemu-io");
    let moto = moto_or_skip!();
    let old = create_key(&moto);
    let new = create_key(&moto);
    let mut s = sidecar(&moto.endpoint);
    start(&mut s, &old, &[]);
    io_ok(&s, "write -P 0x3c 0 2M");

    // Online data dir: the offline rewrap refuses and names the way out.
    let o = rewrap(&s, &moto.endpoint, &["--kms", "aws", "--kms-key-id", &new]);
    assert!(!o.status.success(), "{}", o.both());
    assert!(
        o.stderr.contains("in use by a running ear-sidecar"),
        "{}",
        o.both()
    );
    s.stop();

    let before = std::fs::read(s.backing_file("default")).expect("backing file");
    let reg_before = registry_json(&s);
    let o = rewrap(&s, &moto.endpoint, &["--kms", "aws", "--kms-key-id", &new]);
    assert!(o.status.success(), "{}", o.both());
    eprintln!("{}", o.stdout.trim());
    assert_eq!(o.stdout.trim().lines().count(), 1, "one line: {}", o.stdout);
    assert!(o.stdout.contains("KMS ReEncrypt"), "{}", o.stdout);
    assert!(
        o.stdout.contains(&format!(
            "start the sidecar with --kms aws --kms-key-id {new}"
        )),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains(&format!("{old} can now be disabled")),
        "{}",
        o.stdout
    );
    let reg = registry_json(&s);
    assert_eq!(reg["provider"], "aws");
    assert_eq!(reg["master_key_id"], new.as_str());
    assert_eq!(reg["dir_id"], reg_before["dir_id"]);
    assert_eq!(reg["active_version"], reg_before["active_version"]);
    assert_ne!(
        reg["versions"][0]["wrapped"], reg_before["versions"][0]["wrapped"],
        "a new blob"
    );
    assert_eq!(
        reg["versions"][0]["context"],
        reg_before["versions"][0]["context"]
    );
    let mac = &reg["versions"][0]["mac"];
    assert!(mac.is_string() && *mac != reg_before["versions"][0]["mac"]);
    assert!(!s.data_dir().join("keys.json.tmp").exists());
    assert!(
        std::fs::read(s.backing_file("default")).expect("backing file") == before,
        "data blocks are untouched"
    );

    // A crash between writing the new registry and renaming it over the
    // old one leaves the old registry in place: the old CMK still opens the
    // directory, and the rewrap simply runs again.
    let path = s.data_dir().join("keys.json");
    let new_bytes = std::fs::read(&path).expect("keys.json");
    std::fs::write(s.data_dir().join("keys.json.tmp"), &new_bytes).expect("tmp");
    std::fs::write(&path, serde_json::to_vec_pretty(&reg_before).expect("json")).expect("old");
    start(&mut s, &old, &[]);
    io_ok(&s, "read -P 0x3c 0 2M");
    s.stop();
    let o = rewrap(&s, &moto.endpoint, &["--kms", "aws", "--kms-key-id", &new]);
    assert!(o.status.success(), "{}", o.both());
    assert!(!s.data_dir().join("keys.json.tmp").exists());
    assert_eq!(registry_json(&s)["master_key_id"], new.as_str());

    // The old CMK goes away; the new one opens the directory.
    block_on(moto.set_enabled(&old, false));
    start(&mut s, &new, &[]);
    io_ok(&s, "read -P 0x3c 0 2M");
    io_ok(&s, "write -P 0x4d 2M 1M");
    s.stop();
    let log = start_fails(&mut s, &old);
    assert!(
        log.contains(&format!("is encrypted under master key {new}")),
        "{log}"
    );
    start(&mut s, &new, &[]);
    io_ok(&s, "read -P 0x3c 0 2M");
    io_ok(&s, "read -P 0x4d 2M 1M");
    s.stop();

    // Rewrapping to the key already in use changes nothing.
    let o = rewrap(&s, &moto.endpoint, &["--kms", "aws", "--kms-key-id", &new]);
    assert!(!o.status.success());
    assert!(o.stderr.contains("nothing to rewrap"), "{}", o.both());
}

#[test]
fn rewrap_needs_exactly_one_of_admin_socket_and_data_dir() {
    let s = Sidecar::new_stopped(&[]);
    let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let o = keys_rewrap(
        &s,
        "http://127.0.0.1:9",
        &["--kms", "aws", "--kms-key-id", arn],
    );
    assert_eq!(o.status.code(), Some(2), "{}", o.both());
    assert!(
        o.stderr.contains("pass --admin-socket PATH"),
        "{}",
        o.both()
    );
    let o = keys_rewrap(
        &s,
        "http://127.0.0.1:9",
        &[
            "--kms",
            "aws",
            "--kms-key-id",
            arn,
            "--data-dir",
            "/x",
            "--admin-socket",
            "/y",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", o.both());
    assert!(o.stderr.contains("cannot be used with"), "{}", o.both());
}

#[test]
fn local_directory_migrates_to_aws_kms_and_restarts_under_it() {
    common::require_tool("qemu-io");
    let moto = moto_or_skip!();
    let cmk = create_key(&moto);
    let mut s = sidecar(&moto.endpoint);
    start(&mut s, "", &[]);
    io_ok(&s, "write -P 0x6e 0 2M");
    s.stop();
    assert_eq!(registry_json(&s)["provider"], "local");

    let o = rewrap(
        &s,
        &moto.endpoint,
        &["--kms", "aws", "--kms-key-id", &cmk, "--json"],
    );
    assert!(o.status.success(), "{}", o.both());
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).expect("--json output");
    assert_eq!(v["rewrap"]["method"], "decrypt-encrypt");
    assert_eq!(v["rewrap"]["from_provider"], "local");
    assert_eq!(v["rewrap"]["to_master_key_id"], cmk.as_str());
    assert_eq!(v["rewrap"]["versions"], serde_json::json!([1]));
    let reg = registry_json(&s);
    assert_eq!(reg["provider"], "aws");
    assert_eq!(reg["master_key_id"], cmk.as_str());

    // The local KEK is not needed any more: move it out of reach.
    let kek = s.kek_file();
    std::fs::rename(&kek, kek.with_extension("gone")).expect("move the KEK away");
    start(&mut s, &cmk, &[]);
    io_ok(&s, "read -P 0x6e 0 2M");
    s.stop();
    let log = start_fails(&mut s, "");
    assert!(log.contains("uses provider aws"), "{log}");
}

#[test]
fn rewrap_to_an_unusable_cmk_is_refused_and_keys_json_stays() {
    let moto = moto_or_skip!();
    let cmk = create_key(&moto);
    let disabled = create_key(&moto);
    block_on(moto.set_enabled(&disabled, false));
    let mut s = sidecar(&moto.endpoint);
    start(&mut s, &cmk, &[]);
    s.stop();
    let before = std::fs::read(s.data_dir().join("keys.json")).expect("keys.json");
    let o = rewrap(
        &s,
        &moto.endpoint,
        &["--kms", "aws", "--kms-key-id", &disabled],
    );
    assert!(!o.status.success());
    let err = o.stderr.trim();
    eprintln!("{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("refusing to rewrap") && err.contains("KeyState is Disabled"),
        "{err}"
    );
    let o = rewrap(
        &s,
        &moto.endpoint,
        &["--kms", "local", "--kms-key-id", &cmk],
    );
    assert_eq!(o.status.code(), Some(2), "{}", o.both());
    assert!(o.stderr.contains("pass --kms aws"), "{}", o.both());
    assert_eq!(
        std::fs::read(s.data_dir().join("keys.json")).expect("keys.json"),
        before
    );
    start(&mut s, &cmk, &[]);
    s.stop();
}

/// Adds universe-key version 2 (active) to a stopped local sidecar's
/// registry, wrapped by its KEK and sealed, as a rotation would.
fn add_version_2(s: &Sidecar) {
    block_on(async {
        let p = LocalProvider::open_or_create(&s.kek_file(), false).expect("KEK");
        let mut v = registry_json(s);
        let dir_id = v["dir_id"].as_str().expect("dir_id").to_string();
        let ctx = universe_key_context(&dir_id, 2);
        let w = p.generate_wrapped(&ctx).await.expect("wrap v2");
        use base64::Engine as _;
        v["versions"]
            .as_array_mut()
            .expect("versions")
            .push(serde_json::json!({
                "version": 2,
                "wrapped": base64::engine::general_purpose::STANDARD.encode(&w.0),
                "context": ctx,
                "created_unix": 1_764_600_000u64,
            }));
        v["active_version"] = 2.into();
        let path = s.data_dir().join("keys.json");
        let mut reg = Registry::parse(&path, v.to_string().as_bytes()).expect("parse");
        let mut keys = BTreeMap::new();
        for kv in reg.key_versions() {
            keys.insert(
                kv.version,
                p.unwrap(&kv.wrapped, &kv.context).await.expect("unwrap"),
            );
        }
        let ring = KeyRing::new(keys, 2, 8).expect("ring");
        reg.save(Some(&ring)).expect("save");
    });
}

fn strip_macs(v: &mut serde_json::Value) {
    for e in v["versions"].as_array_mut().expect("versions") {
        e.as_object_mut().expect("object").remove("mac");
    }
}

fn edit(path: &Path, good: &[u8], f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(good).expect("json");
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
}

#[test]
fn edited_keys_json_is_refused_at_start_up() {
    common::require_tool("qemu-io");
    let mut s = Sidecar::new_stopped(&[]);
    start(&mut s, "", &[]);
    io_ok(&s, "write -P 0x21 0 1M");
    s.stop();
    add_version_2(&s);
    start(&mut s, "", &[]);
    io_ok(&s, "read -P 0x21 0 1M");
    io_ok(&s, "write -P 0x22 1M 1M");
    s.stop();
    let path = s.data_dir().join("keys.json");
    let good = std::fs::read(&path).expect("keys.json");

    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "active version 2 -> 1",
            Box::new(|v| v["active_version"] = 1.into()),
            "key version 1 has a MAC that does not verify",
        ),
        (
            "version 1 dropped",
            Box::new(|v| {
                v["versions"].as_array_mut().expect("versions").remove(0);
            }),
            "has a MAC that does not verify",
        ),
        (
            "version 2 dropped",
            Box::new(|v| {
                v["versions"].as_array_mut().expect("versions").remove(1);
                v["active_version"] = 1.into();
            }),
            "has a MAC that does not verify",
        ),
        (
            "provider",
            Box::new(|v| {
                v["provider"] = "aws".into();
                v["master_key_id"] =
                    "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                        .into();
            }),
            "uses provider aws",
        ),
        (
            "master key id",
            Box::new(|v| v["master_key_id"] = "local:00112233445566ff".into()),
            "initialised with a different local KEK",
        ),
        (
            "created time",
            Box::new(|v| v["versions"][1]["created_unix"] = 1.into()),
            "edited offline",
        ),
        (
            "every mac removed",
            Box::new(strip_macs),
            "has no \"mac\" but holds key versions [1, 2]",
        ),
        (
            "version 1's mac removed",
            Box::new(|v| {
                v["versions"][0]
                    .as_object_mut()
                    .expect("object")
                    .remove("mac");
            }),
            "key version 1 has no \"mac\"",
        ),
    ];
    for (what, f, want) in cases {
        edit(&path, &good, f);
        let log = start_fails(&mut s, "");
        let line = log
            .lines()
            .find(|l| l.starts_with("ear-sidecar: error"))
            .unwrap_or_default()
            .to_string();
        eprintln!("{what}: {line}");
        assert!(line.contains(want), "{what}: expected {want:?} in:\n{log}");
        std::fs::write(&path, &good).expect("restore");
    }
    // The untouched registry still serves both versions' data.
    start(&mut s, "", &[]);
    io_ok(&s, "read -P 0x21 0 1M");
    io_ok(&s, "read -P 0x22 1M 1M");
    s.stop();
    assert_eq!(std::fs::read(&path).expect("keys.json"), good);
}

#[test]
fn legacy_keys_json_without_mac_is_sealed_once() {
    let mut s = Sidecar::new_stopped(&[]);
    start(&mut s, "", &[]);
    s.stop();
    let path = s.data_dir().join("keys.json");
    let good = std::fs::read(&path).expect("keys.json");
    edit(&path, &good, strip_macs);
    start(&mut s, "", &[]);
    assert!(
        s.log().contains("key registry sealed with a MAC"),
        "{}",
        s.log()
    );
    s.stop();
    assert!(registry_json(&s)["versions"][0]["mac"].is_string());
    start(&mut s, "", &[]);
    assert!(!s.log().contains("key registry sealed"), "{}", s.log());
    s.stop();

    // An unsealed registry whose version 1 is a key of someone else's
    // choosing (wrapped under the same KEK) passes as legacy, but the export
    // headers do not authenticate under it: refused, and not sealed.
    let forged = block_on(async {
        let p = LocalProvider::open_or_create(&s.kek_file(), false).expect("KEK");
        let mut v: serde_json::Value = serde_json::from_slice(&good).expect("json");
        let dir_id = v["dir_id"].as_str().expect("dir_id").to_string();
        let w = p
            .generate_wrapped(&universe_key_context(&dir_id, 1))
            .await
            .expect("wrap");
        use base64::Engine as _;
        v["versions"][0]["wrapped"] = base64::engine::general_purpose::STANDARD
            .encode(&w.0)
            .into();
        strip_macs(&mut v);
        serde_json::to_vec_pretty(&v).expect("json")
    });
    std::fs::write(&path, &forged).expect("write");
    let log = start_fails(&mut s, "");
    assert!(log.contains("authentication failed"), "{log}");
    assert_eq!(
        std::fs::read(&path).expect("keys.json"),
        forged,
        "not sealed"
    );
}

#[test]
fn decrypt_denied_fails_closed_after_the_grace_period() {
    common::require_tool("qemu-io");
    let moto = moto_or_skip!();
    let proxy = DenyProxy::start(moto.port);
    let cmk = create_key(&moto);
    let mut s = sidecar(&proxy.endpoint);
    let watch = ["--kms-check-interval", "1s", "--kms-revocation-grace", "3s"];
    start(&mut s, &cmk, &watch);
    io_ok(&s, "write -P 0x5e 0 1M");
    assert!(http_status(&s, "/readyz").contains(" 200"));

    // kms:Decrypt withdrawn; DescribeKey still says Enabled.
    proxy.deny_decrypt(true);
    let t = Instant::now();
    while !s.log().contains("FAILED CLOSED") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "did not fail closed within 20 s; log:\n{}",
            s.log()
        );
        // Within the grace period the data stays readable.
        if t.elapsed() < Duration::from_secs(2) {
            io_ok(&s, "read -P 0x5e 0 1M");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t.elapsed();
    eprintln!(
        "failed closed {took:?} after Decrypt was denied ({} Decrypt calls refused)",
        proxy.denied()
    );
    assert!(
        took >= Duration::from_secs(3),
        "not before the grace period"
    );
    assert!(proxy.denied() >= 2);
    let log = s.log();
    assert!(
        log.contains("kms:Decrypt failed") && log.contains("AccessDenied"),
        "the log must say why:\n{log}"
    );
    assert!(!http_status(&s, "/readyz").contains(" 200"));
    let o = qemu_io_output(&s.uri("default"), &["read -P 0x5e 0 1M"]);
    assert!(o.both().contains("Input/output error"), "{}", o.both());
    s.stop();

    // While Decrypt stays denied a restart refuses; once restored it serves.
    let log = start_fails(&mut s, &cmk);
    assert!(
        log.contains("AccessDenied") || log.contains("not authorized"),
        "{log}"
    );
    proxy.deny_decrypt(false);
    start(&mut s, &cmk, &watch);
    io_ok(&s, "read -P 0x5e 0 1M");
    s.stop();
}

/// `ear-sidecar keys rewrap --admin-socket` against the running sidecar `s`.
fn rewrap_online(s: &Sidecar, endpoint: &str, args: &[&str]) -> Output {
    let admin = s.admin_socket();
    let mut full = vec!["--admin-socket", admin.to_str().expect("utf-8 path")];
    full.extend(args);
    keys_rewrap(s, endpoint, &full)
}

#[test]
fn online_rewrap_keeps_serving_and_moves_the_revocation_check() {
    common::require_tool("qemu-io");
    let moto = moto_or_skip!();
    let old = create_key(&moto);
    let new = create_key(&moto);
    let disabled = create_key(&moto);
    block_on(moto.set_enabled(&disabled, false));
    let mut s = sidecar(&moto.endpoint);
    let watch = ["--kms-check-interval", "1s", "--kms-revocation-grace", "2s"];
    start(&mut s, &old, &watch);
    io_ok(&s, "write -P 0x71 0 2M");

    // An unusable new CMK is refused through the socket too; nothing changes.
    let before = std::fs::read(s.data_dir().join("keys.json")).expect("keys.json");
    let o = rewrap_online(
        &s,
        &moto.endpoint,
        &["--kms", "aws", "--kms-key-id", &disabled],
    );
    assert!(!o.status.success());
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.both());
    assert!(o.stderr.contains("KeyState is Disabled"), "{}", o.both());
    assert_eq!(
        std::fs::read(s.data_dir().join("keys.json")).expect("keys.json"),
        before
    );

    let o = rewrap_online(&s, &moto.endpoint, &["--kms", "aws", "--kms-key-id", &new]);
    assert!(
        o.status.success(),
        "{}\nsidecar log:\n{}",
        o.both(),
        s.log()
    );
    eprintln!("{}", o.stdout.trim());
    assert!(
        o.stdout.contains("KMS ReEncrypt")
            && o.stdout.contains("now checks the new CMK")
            && o.stdout
                .contains(&format!("restart it with --kms aws --kms-key-id {new}")),
        "{}",
        o.stdout
    );
    assert_eq!(registry_json(&s)["master_key_id"], new.as_str());
    // Serving goes on with the keys in memory.
    io_ok(&s, "read -P 0x71 0 2M");
    io_ok(&s, "write -P 0x72 2M 1M");

    // The old CMK is disabled: the running sidecar watches the new one, so
    // it does not fail closed.
    block_on(moto.set_enabled(&old, false));
    std::thread::sleep(Duration::from_secs(5));
    let log = s.log();
    assert!(!log.contains("FAILED CLOSED"), "{log}");
    assert!(http_status(&s, "/readyz").contains(" 200"));
    io_ok(&s, "read -P 0x72 2M 1M");
    s.stop();

    start(&mut s, &new, &watch);
    io_ok(&s, "read -P 0x71 0 2M");
    io_ok(&s, "read -P 0x72 2M 1M");
    s.stop();
}

#[test]
fn online_migration_from_local_then_restart_under_aws() {
    common::require_tool("qemu-io");
    let moto = moto_or_skip!();
    let cmk = create_key(&moto);
    let mut s = sidecar(&moto.endpoint);
    start(&mut s, "", &[]);
    io_ok(&s, "write -P 0x81 0 1M");
    let o = rewrap_online(
        &s,
        &moto.endpoint,
        &["--kms", "aws", "--kms-key-id", &cmk, "--json"],
    );
    assert!(
        o.status.success(),
        "{}\nsidecar log:\n{}",
        o.both(),
        s.log()
    );
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).expect("--json output");
    assert_eq!(v["online"], true);
    assert_eq!(v["rewrap"]["method"], "decrypt-encrypt");
    assert!(
        v["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("revocation check starts with the restart"),
        "{v}"
    );
    io_ok(&s, "read -P 0x81 0 1M");
    s.stop();
    start(&mut s, &cmk, &[]);
    io_ok(&s, "read -P 0x81 0 1M");
    s.stop();
}

/// Rotation, online rewrap and retirement share one writer of keys.json: a
/// rotation after a rewrap wraps the new version under the new CMK, every
/// write leaves keys.json sealed, and the revocation canary follows the
/// active version (so disabling the old CMK does not fail the sidecar closed).
#[test]
fn rotate_rewrap_rotate_and_retire_online_then_restart_under_the_new_cmk() {
    common::require_tool("qemu-io");
    let moto = moto_or_skip!();
    let old = create_key(&moto);
    let new = create_key(&moto);
    let mut s = sidecar(&moto.endpoint);
    let opts = [
        "--kms-check-interval",
        "1s",
        "--kms-revocation-grace",
        "2s",
        "--reencrypt-rate",
        "0",
    ];
    start(&mut s, &old, &opts);
    io_ok(&s, "write -P 0x91 0 2M");
    let admin = s.admin_socket();
    let admin = admin.to_str().expect("utf-8 path");
    let keys = |s: &Sidecar, args: &[&str]| -> serde_json::Value {
        let mut full = args.to_vec();
        full.extend(["--admin-socket", admin, "--json"]);
        let o = keys_cmd(s, &moto.endpoint, &full);
        assert!(
            o.status.success(),
            "keys {args:?}: {}\nsidecar log:\n{}",
            o.both(),
            s.log()
        );
        serde_json::from_str(o.stdout.trim()).expect("--json output")
    };
    let sealed = |reg: &serde_json::Value, versions: &[u32]| {
        let got: Vec<u64> = reg["versions"]
            .as_array()
            .expect("versions")
            .iter()
            .map(|v| {
                assert!(v["mac"].is_string(), "version without a mac: {reg:#}");
                v["version"].as_u64().expect("version")
            })
            .collect();
        let want: Vec<u64> = versions.iter().map(|&v| u64::from(v)).collect();
        assert_eq!(got, want, "{reg:#}");
    };

    let path = s.data_dir().join("keys.json");
    let first = std::fs::read(&path).expect("keys.json");
    assert_eq!(keys(&s, &["rotate"])["active_version"], 2);
    io_ok(&s, "write -P 0x92 2M 1M");

    // An authentic older keys.json put back behind the sidecar is not
    // written over: a rotation from it would reuse version 2.
    let current = std::fs::read(&path).expect("keys.json");
    std::fs::write(&path, &first).expect("put the old copy back");
    let o = keys_cmd(&s, &moto.endpoint, &["rotate", "--admin-socket", admin]);
    assert!(!o.status.success(), "{}", o.both());
    assert!(
        o.stderr.contains("replaced behind the sidecar"),
        "{}",
        o.both()
    );
    assert_eq!(std::fs::read(&path).expect("keys.json"), first);
    std::fs::write(&path, &current).expect("restore keys.json");
    let o = rewrap_online(&s, &moto.endpoint, &["--kms", "aws", "--kms-key-id", &new]);
    assert!(
        o.status.success(),
        "{}\nsidecar log:\n{}",
        o.both(),
        s.log()
    );
    // The next rotation uses the new CMK and keeps the rewrapped registry.
    assert_eq!(keys(&s, &["rotate"])["active_version"], 3);
    let reg = registry_json(&s);
    assert_eq!(reg["master_key_id"], new.as_str(), "{reg:#}");
    assert_eq!(reg["active_version"], 3, "{reg:#}");
    sealed(&reg, &[1, 2, 3]);

    // The sweep moves every block and header to version 3; then 1 and 2 go.
    let t = Instant::now();
    loop {
        let v = keys(&s, &["status"]);
        let old_blocks: u64 = v["versions"]
            .as_array()
            .expect("versions")
            .iter()
            .filter(|x| x["version"] != 3)
            .map(|x| x["blocks"].as_u64().unwrap_or(1))
            .sum();
        let headers_moved = v["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .all(|e| e["header_key_version"] == 3);
        if v["counts_exact"] == true && old_blocks == 0 && headers_moved {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "sweep: {v:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        keys(&s, &["retire", "1"])["versions"],
        serde_json::json!([2, 3])
    );
    assert_eq!(
        keys(&s, &["retire", "2"])["versions"],
        serde_json::json!([3])
    );
    let reg = registry_json(&s);
    assert_eq!(reg["master_key_id"], new.as_str(), "{reg:#}");
    sealed(&reg, &[3]);

    // The old CMK disabled: the running sidecar checks version 3 under the
    // new CMK, so it keeps serving.
    block_on(moto.set_enabled(&old, false));
    std::thread::sleep(Duration::from_secs(5));
    let log = s.log();
    assert!(!log.contains("FAILED CLOSED"), "{log}");
    assert!(http_status(&s, "/readyz").contains(" 200"));
    io_ok(&s, "read -P 0x91 0 2M");
    s.stop();

    // The registry verifies at start-up under the new CMK alone.
    start(&mut s, &new, &opts);
    io_ok(&s, "read -P 0x91 0 2M");
    io_ok(&s, "read -P 0x92 2M 1M");
    s.stop();
}
