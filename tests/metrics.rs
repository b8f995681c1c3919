//! Metrics and health endpoints of the real `ear-sidecar` binary: series move
//! by the right amounts under real NBD traffic (qemu-io), `promtool` accepts
//! the exposition, /livez and /readyz follow start-up, a real Prometheus
//! server scrapes the sidecar and evaluates the shipped recording rules, and
//! the rules pass `promtool check rules` / `promtool test rules`.
//!
//! Needs `qemu-io` (qemu-utils), `promtool` and `prometheus` (Debian package
//! `prometheus`); .ci/run installs them. A missing tool fails the test with a
//! message saying which package to install.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{qemu_io, Sidecar};

const MIB: f64 = 1_048_576.0;

fn require(tool: &str, package: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(_) => {}
        Err(e) => panic!(
            "`{tool}` is needed by this test but could not be run ({e}); \
             install the Debian package `{package}` (see .ci/run)"
        ),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("pick a free loopback port")
}

/// One blocking HTTP/1.1 GET; returns (status, body).
fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_owned()))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_logged(mut cmd: Command, log: PathBuf) -> Proc {
    let f = std::fs::File::create(&log).expect("create log file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup log"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    Proc { child, log }
}

/// A sidecar with metrics on a free loopback port, a 16 MiB default export
/// and `extra` arguments, once /readyz answers 200.
fn sidecar(extra: &[&str]) -> Sidecar {
    let mut args = vec!["--export", "default=16M"];
    args.extend(extra);
    let mut s = Sidecar::new_stopped(&args);
    s.set_metrics_addr(&format!("127.0.0.1:{}", free_port()));
    s.start_again();
    let t = Instant::now();
    while !matches!(http_get(metrics(&s), "/readyz"), Ok((200, _))) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "sidecar not ready in 30s; log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

/// The sidecar's metrics and health address.
fn metrics(s: &Sidecar) -> SocketAddr {
    s.metrics_addr().parse().expect("metrics address")
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample whose name and labels are exactly `series`
/// (labels in exposition order), or 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse::<f64>().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// The value of the sample of `name` having all `labels` (any order).
fn value_with(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        if !(rest.is_empty() || rest.starts_with('{')) {
            return None;
        }
        labels
            .iter()
            .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\"")))
            .then(|| v.parse().ok())
            .flatten()
    })
}

fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    require("promtool", "prometheus");
    let mut c = Command::new("promtool");
    c.args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn promtool");
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .expect("write promtool stdin");
    }
    child.wait_with_output().expect("promtool")
}

#[test]
fn traffic_moves_the_right_series_and_promtool_accepts_them() {
    require("qemu-io", "qemu-utils");
    let s = sidecar(&[]);
    let (status, body) = http_get(metrics(&s), "/livez").expect("livez");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let before = scrape(metrics(&s));
    qemu_io(&s.uri("default"), &["write -P 1 0 1M", "read -P 1 0 1M"]);
    let after = scrape(metrics(&s));
    let delta = |series: &str| value(&after, series) - value(&before, series);

    assert_eq!(
        delta(r#"ear_request_bytes_total{export="default",op="read"}"#),
        MIB
    );
    assert_eq!(
        delta(r#"ear_request_bytes_total{export="default",op="write"}"#),
        MIB
    );
    for op in ["read", "write"] {
        let ok = value_with(
            &after,
            "ear_requests_total",
            &[("export", "default"), ("op", op), ("result", "ok")],
        )
        .expect("requests series")
            - value_with(
                &before,
                "ear_requests_total",
                &[("export", "default"), ("op", op), ("result", "ok")],
            )
            .unwrap_or(0.0);
        assert!(ok >= 1.0, "{op}: {ok} requests");
        for hist in [
            "ear_request_duration_seconds",
            "ear_request_crypto_seconds",
            "ear_request_storage_seconds",
        ] {
            let count = format!(r#"{hist}_count{{export="default",op="{op}"}}"#);
            assert_eq!(delta(&count), ok, "{count}");
            let inf = format!(r#"{hist}_bucket{{export="default",op="{op}",le="+Inf"}}"#);
            assert_eq!(delta(&inf), ok, "{inf}");
            let sum = format!(r#"{hist}_sum{{export="default",op="{op}"}}"#);
            assert!(delta(&sum) > 0.0, "{sum} did not move");
        }
        // The parts fit in the whole.
        let part = delta(&format!(
            r#"ear_request_crypto_seconds_sum{{export="default",op="{op}"}}"#
        )) + delta(&format!(
            r#"ear_request_storage_seconds_sum{{export="default",op="{op}"}}"#
        ));
        let whole = delta(&format!(
            r#"ear_request_duration_seconds_sum{{export="default",op="{op}"}}"#
        ));
        assert!(
            part <= whole * 1.01,
            "{op}: crypto+storage {part} > request {whole}"
        );
    }
    assert!(after.contains("# TYPE ear_request_duration_seconds histogram"));
    // A real bucket layout, from microseconds to seconds.
    assert!(after.contains(r#"le="0.000005""#) && after.contains(r#"le="10""#));
    assert_eq!(
        value_with(&after, "ear_build_info", &[("encryption", "on")]),
        Some(1.0)
    );
    assert!(after.contains(&format!(
        r#"ear_build_info{{version="{}""#,
        env!("CARGO_PKG_VERSION")
    )));
    for (g, v) in [
        ("ear_universe_key_loaded", 1.0),
        ("ear_fail_closed", 0.0),
        ("ear_ready", 1.0),
        ("ear_exports", 1.0),
        ("ear_active_key_version", 1.0),
    ] {
        assert_eq!(value(&after, g), v, "{g}");
    }
    // The server notices the client's disconnect asynchronously.
    wait_for("ear_open_connections 0", Duration::from_secs(5), || {
        value(&scrape(metrics(&s)), "ear_open_connections") == 0.0
    });
    assert!(value(&after, "ear_key_derivations_total") >= 1.0);
    // Process metrics, read at scrape time.
    for g in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_threads",
    ] {
        assert!(value(&after, g) > 0.0, "{g}");
    }
    assert!(
        value(&after, "ear_key_cache_hits_total") + value(&after, "ear_key_cache_misses_total")
            >= 2.0
    );

    let out = promtool(&["check", "metrics"], Some(&after));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Unknown paths and methods.
    assert_eq!(http_get(metrics(&s), "/nope").map(|r| r.0).ok(), Some(404));
    let mut c = TcpStream::connect(metrics(&s)).expect("connect");
    c.write_all(b"POST /metrics HTTP/1.1\r\n\r\n")
        .expect("write");
    let mut r = String::new();
    let _ = c.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
}

#[test]
fn encryption_off_sidecar_reports_build_info_off() {
    require("qemu-io", "qemu-utils");
    let s = sidecar(&["--encryption", "off"]);
    qemu_io(&s.uri("default"), &["write -P 7 0 64k", "read -P 7 0 64k"]);
    let m = scrape(metrics(&s));
    assert_eq!(
        value_with(&m, "ear_build_info", &[("encryption", "off")]),
        Some(1.0)
    );
    assert_eq!(value(&m, "ear_universe_key_loaded"), 0.0);
    assert_eq!(
        value(&m, r#"ear_request_bytes_total{export="default",op="read"}"#),
        65536.0
    );
    // No cipher runs; what remains in the "crypto" part is the per-block
    // checksum, a small share of the request.
    let crypto = value(
        &m,
        r#"ear_request_crypto_seconds_sum{export="default",op="read"}"#,
    );
    let whole = value(
        &m,
        r#"ear_request_duration_seconds_sum{export="default",op="read"}"#,
    );
    assert!(whole > 0.0 && crypto < whole, "crypto {crypto} of {whole}");
}

/// /livez answers and /readyz refuses while start-up waits for a KMS that
/// does not answer; the sidecar then gives up on its start-up deadline.
#[test]
fn livez_answers_and_readyz_refuses_while_starting() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    // A port with nothing listening: every KMS call fails to connect.
    let dead_kms = format!("http://127.0.0.1:{}", free_port());
    let mut p = Sidecar::new_stopped(&[
        "--kms",
        "aws",
        "--kms-key-id",
        "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "--kms-endpoint",
        &dead_kms,
        "--kms-startup-timeout",
        "6s",
    ]);
    p.set_metrics_addr(&metrics.to_string());
    p.set_env("AWS_ACCESS_KEY_ID", Some("testing"));
    p.set_env("AWS_SECRET_ACCESS_KEY", Some("testing"));
    p.set_env("AWS_EC2_METADATA_DISABLED", Some("true"));
    p.set_env("AWS_PROFILE", None);
    p.spawn_no_wait();
    wait_for("/livez", Duration::from_secs(5), || {
        matches!(http_get(metrics, "/livez"), Ok((200, _)))
    });
    let (status, body) = http_get(metrics, "/readyz").expect("readyz");
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: starting\n"),
        "log:\n{}",
        p.log()
    );
    let m = scrape(metrics);
    assert_eq!(value(&m, "ear_ready"), 0.0);
    assert_eq!(value(&m, "ear_universe_key_loaded"), 0.0);
    assert_eq!(
        value_with(&m, "ear_build_info", &[("encryption", "on")]),
        Some(1.0)
    );
    // Gives up on the start-up deadline with an error, never turning ready.
    let t = Instant::now();
    let status = loop {
        if let Some(st) = p.exit_status() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "still running");
        assert!(
            !matches!(http_get(metrics, "/readyz"), Ok((200, _))),
            "turned ready without a KMS"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success(), "log:\n{}", p.log());
}

#[test]
fn readyz_withdrawn_on_shutdown() {
    let mut s = sidecar(&[]);
    assert_eq!(
        http_get(metrics(&s), "/readyz").map(|r| r.0).ok(),
        Some(200)
    );
    let pid = s.pid().expect("running").to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    // Once readiness is withdrawn (the signal is handled asynchronously),
    // /readyz never answers 200 again until the process has exited.
    let t = Instant::now();
    let mut withdrawn = false;
    loop {
        if let Some(st) = s.exit_status() {
            assert!(st.success(), "unclean exit; log:\n{}", s.log());
            break;
        }
        match http_get(metrics(&s), "/readyz") {
            Ok((200, body)) => assert!(!withdrawn, "ready again after SIGTERM: {body}"),
            _ => withdrawn = true,
        }
        assert!(t.elapsed() < Duration::from_secs(20), "did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn promtool_check_and_test_rules() {
    let out = promtool(&["check", "rules", "ear-sidecar.rules.yml"], None);
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = promtool(&["test", "rules", "ear-sidecar.rules.test.yml"], None);
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dash = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/ear-sidecar-dashboard.json"),
    )
    .expect("read dashboard");
    let v: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    assert!(v["panels"].as_array().is_some_and(|p| p.len() > 5));
    assert!(dash.contains("ear_request_crypto_seconds_sum"));
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Instant query against Prometheus; the `result` array.
fn prom_query(addr: SocketAddr, q: &str) -> Vec<serde_json::Value> {
    let Ok((200, body)) = http_get(addr, &format!("/api/v1/query?query={}", percent_encode(q)))
    else {
        return vec![];
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn sample_value(r: &serde_json::Value) -> Option<f64> {
    r["value"][1].as_str().and_then(|s| s.parse().ok())
}

#[test]
fn prometheus_scrapes_and_records_overhead() {
    require("qemu-io", "qemu-utils");
    require("prometheus", "prometheus");
    let s = sidecar(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let rules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/ear-sidecar.rules.yml");
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: ear-sidecar\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            metrics(&s)
        ),
    )
    .expect("write prometheus.yml");
    let prom: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prom}"))
        .arg("--log.level=warn");
    let p = spawn_logged(cmd, dir.path().join("prometheus.log"));
    let deadline = Duration::from_secs(40);
    let t = Instant::now();
    let check = |what: &str| {
        assert!(
            t.elapsed() < deadline,
            "timed out waiting for {what}; prometheus log:\n{}",
            p.log()
        )
    };
    // Scraped at least once before the traffic, so rates see it.
    loop {
        check("the first scrape");
        let up = prom_query(prom, r#"up{job="ear-sidecar"}"#);
        if up.first().and_then(sample_value) == Some(1.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    qemu_io(
        &s.uri("default"),
        &[
            "write -P 3 0 4M",
            "read -P 3 0 4M",
            "write -P 4 4M 4M",
            "read -P 4 4M 4M",
        ],
    );
    loop {
        check("a request-latency series");
        let r = prom_query(
            prom,
            r#"ear_request_duration_seconds_count{job="ear-sidecar",export="default",op="read"}"#,
        );
        if r.first().and_then(sample_value).is_some_and(|v| v >= 2.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let ratio = loop {
        check("the recorded EAR overhead ratio");
        let r = prom_query(
            prom,
            r#"instance_export:ear_overhead:ratio_rate5m{job="ear-sidecar",export="default"}"#,
        );
        if let Some(v) = r.first().and_then(sample_value).filter(|v| v.is_finite()) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        ratio > 0.0 && ratio <= 1.0,
        "overhead ratio {ratio} outside (0, 1]"
    );
    loop {
        check("the recorded p99");
        let r = prom_query(
            prom,
            r#"instance_export_op:ear_request_duration_seconds:p99_5m{export="default",op="read"}"#,
        );
        if r.first()
            .and_then(sample_value)
            .is_some_and(|v| v.is_finite() && v > 0.0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Nothing alerting on a healthy sidecar.
    let firing = prom_query(prom, r#"ALERTS{alertstate="firing"}"#);
    assert!(firing.is_empty(), "unexpected alerts: {firing:?}");
}
