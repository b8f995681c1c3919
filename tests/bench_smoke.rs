//! Smoke test of the bench harness (benches/harness.rs): a short run against
//! two sidecars it starts itself (the dev-built binary), with encryption on and
//! off, must finish and produce sane JSON. Not a timed benchmark: it checks the
//! harness works, not how fast the sidecar is.

#[allow(dead_code)]
#[path = "../benches/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v.get(key)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("missing number {key} in {v}"))
}

#[test]
fn harness_short_run_produces_sane_json() {
    let started = Instant::now();
    let out = harness::run_cli([
        "harness",
        "--bench",
        "--binary",
        env!("CARGO_BIN_EXE_ear-sidecar"),
        "--export-size",
        "8M",
        "--duration",
        "300ms",
        "--rounds",
        "1",
        "--connections",
        "2",
        "--qd",
        "4",
        "--json",
        "--quiet",
    ])
    .expect("harness run");
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    let results = v
        .get("results")
        .and_then(|r| r.as_array())
        .expect("results");
    let names: Vec<&str> = results
        .iter()
        .filter_map(|r| r.get("workload").and_then(|w| w.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            "seq-read-1m",
            "seq-write-1m",
            "rand-read-4k",
            "rand-write-4k",
            "mixed-4k",
            "unaligned-512"
        ]
    );
    for r in results {
        for mode in ["on", "off"] {
            let s = r
                .get(mode)
                .unwrap_or_else(|| panic!("{mode} missing in {r}"));
            assert!(num(s, "iops") > 0.0, "{mode}: no IOPS in {r}");
            assert!(num(s, "mb_per_s") > 0.0, "{mode}: no throughput in {r}");
            assert_eq!(num(s, "errors"), 0.0, "{mode}: errors in {r}");
            let (p50, p99, p999) = (num(s, "p50_us"), num(s, "p99_us"), num(s, "p999_us"));
            assert!(
                0.0 < p50 && p50 <= p99 && p99 <= p999,
                "{mode}: percentiles out of order in {r}"
            );
            assert!(num(s, "rss_kib") > 0.0, "{mode}: no RSS in {r}");
        }
        let o = r.get("overhead").expect("overhead");
        for k in ["throughput_pct", "p50_pct", "p99_pct", "p999_pct"] {
            assert!(num(o, k).is_finite(), "{k} not finite in {r}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "smoke run took {:?}",
        started.elapsed()
    );
}

#[test]
fn harness_parses_options() {
    assert_eq!(harness::parse_size("4K"), Ok(4096));
    assert_eq!(harness::parse_size("1T"), Ok(1 << 40));
    assert!(harness::parse_size("1X").is_err());
    assert_eq!(
        harness::parse_duration("250ms"),
        Ok(Duration::from_millis(250))
    );
    assert_eq!(harness::parse_duration("2"), Ok(Duration::from_secs(2)));
    assert!(harness::parse_workload("nope").is_err());
    let help = harness::run_cli(["harness", "--help"]).expect("help");
    assert!(help.contains("--connections"));
    assert!(matches!(
        harness::run_cli(["harness", "--bench", "--qd", "0"]),
        Err(harness::HarnessError::Usage(_))
    ));
}
