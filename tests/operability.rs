//! What a stranger meets first, through the real binary: every refusal is
//! one line that names the problem and the fix, printed once, without
//! terminal colour codes when stderr is not a terminal, and nothing is
//! created before every path was checked.

mod common;

use std::process::Command;

use common::{run, sidecar_bin, Output, Sidecar};

/// `ear-sidecar serve` with `args` in `cwd`, isolated from the caller's
/// environment (`XDG_CONFIG_HOME` under `cwd`), plus `env`.
fn serve(cwd: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(sidecar_bin());
    c.arg("serve")
        .args(["--metrics-addr", ""])
        .args(args)
        .current_dir(cwd)
        .env_remove("EAR_CONFIG")
        .env("XDG_CONFIG_HOME", cwd.join("config"));
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

/// A refusal: non-zero exit, the cause on exactly one `error` line, each
/// OS error once, and no ANSI escape codes.
fn assert_one_line_refusal(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected a refusal:\n{}", o.both());
    let lines: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.contains("ear-sidecar: error") || l.contains(" ERROR "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{}", o.stderr);
    assert!(
        lines[0].contains(needle),
        "{needle:?} not in {:?}",
        lines[0]
    );
    if let Some(i) = lines[0].find("(os error") {
        let code = &lines[0][i..lines[0][i..]
            .find(')')
            .map_or(lines[0].len(), |j| i + j + 1)];
        assert_eq!(lines[0].matches(code).count(), 1, "{}", lines[0]);
    }
    assert!(!o.stderr.contains('\u{1b}'), "ANSI codes in:\n{}", o.stderr);
}

#[test]
fn a_data_dir_that_is_a_file_is_named_as_such() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("data"), b"x").unwrap();
    let o = serve(d.path(), &["--data-dir", "data", "--socket", "s.sock"], &[]);
    assert_one_line_refusal(&o, "is not a directory");
}

#[test]
fn a_socket_in_a_missing_directory_fails_before_anything_is_created() {
    let d = tempfile::tempdir().unwrap();
    let o = serve(
        d.path(),
        &["--data-dir", "data", "--socket", "nodir/s.sock"],
        &[],
    );
    assert_one_line_refusal(&o, "directory nodir does not exist");
    assert!(!d.path().join("data").exists(), "data dir was created");
    assert!(!d.path().join("config").exists(), "KEK dir was created");
}

#[test]
fn a_misspelt_environment_variable_is_fatal_and_names_the_right_one() {
    let d = tempfile::tempdir().unwrap();
    let o = serve(
        d.path(),
        &["--data-dir", "data", "--socket", "s.sock"],
        &[("EAR_ALLOW_UIDS", "12345")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", o.both());
    assert!(o.stderr.contains("EAR_ALLOW_UIDS"), "{}", o.stderr);
    assert!(
        o.stderr.contains("did you mean EAR_ALLOW_UID?"),
        "{}",
        o.stderr
    );
    assert!(!d.path().join("data").exists());
}

#[test]
fn negative_numbers_name_the_option_and_range() {
    let d = tempfile::tempdir().unwrap();
    let o = serve(d.path(), &["--max-connections", "-1"], &[]);
    assert!(!o.status.success());
    assert!(o.stderr.contains("--max-connections"), "{}", o.stderr);
    assert!(o.stderr.contains("from 1 to"), "{}", o.stderr);
    assert!(!o.stderr.contains("unexpected argument"), "{}", o.stderr);
}

#[test]
fn a_kek_inside_the_data_dir_is_refused_without_the_loud_override() {
    let d = tempfile::tempdir().unwrap();
    let args = [
        "--data-dir",
        "data",
        "--socket",
        "s.sock",
        "--local-kek-file",
        "data/local.kek",
    ];
    let o = serve(d.path(), &args, &[]);
    assert!(!o.status.success());
    assert!(
        o.stderr.contains("inside the data directory"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("--insecure-kek-in-data-dir"),
        "{}",
        o.stderr
    );
    assert!(!d.path().join("data").exists());
}

#[test]
fn a_missing_key_registry_beside_exports_is_refused() {
    let mut s = Sidecar::start(&["--export", "db=1M"]);
    s.stop();
    std::fs::remove_file(s.data_dir().join("keys.json")).unwrap();
    let (_, log) = s.start_expect_failure();
    assert!(log.contains("no key registry keys.json"), "{log}");
    assert!(log.contains("restore keys.json from backup"), "{log}");
    assert!(
        !s.data_dir().join("keys.json").exists(),
        "a new registry was created over existing exports"
    );
}

#[test]
fn the_local_provider_on_an_aws_directory_says_which_options_open_it() {
    let mut s = Sidecar::start(&["--export", "db=1M"]);
    s.stop();
    let reg_path = s.data_dir().join("keys.json");
    let mut reg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reg_path).unwrap()).unwrap();
    let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    reg["provider"] = "aws".into();
    reg["master_key_id"] = arn.into();
    std::fs::write(&reg_path, serde_json::to_vec(&reg).unwrap()).unwrap();
    let (_, log) = s.start_expect_failure();
    assert!(log.contains("uses provider aws"), "{log}");
    assert!(
        log.contains(&format!("--kms aws --kms-key-id {arn}")),
        "{log}"
    );
}

#[test]
fn status_needs_no_flag_in_the_default_place_and_reports_truncation() {
    let mut s = Sidecar::start(&["--export", "db=4M"]);
    s.stop();
    // `status` in the directory holding ./ear-data, with no --data-dir.
    let cwd = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(s.data_dir(), cwd.path().join("ear-data")).unwrap();
    let mut c = Command::new(sidecar_bin());
    c.args(["status", "--json"])
        .current_dir(cwd.path())
        .env_remove("EAR_DATA_DIR");
    let o = run(&mut c);
    assert!(o.status.success(), "{}", o.both());
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["exports"][0]["error"], serde_json::Value::Null, "{v}");
    // A truncated backing file: serve refuses it, and status says so.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.backing_file("db"))
        .unwrap();
    f.set_len(64 * 1024).unwrap();
    let o = run(&mut c);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let err = v["exports"][0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("truncated"), "{v}");
}
