//! The admin control socket through the real binary: created owner-only
//! beside the data socket, answered by `status --admin-socket`, closed to
//! peers outside `--allow-uid`, and gone after a clean stop.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::Sidecar;

#[test]
fn admin_socket_answers_status_and_goes_away_on_stop() {
    let mut sc = Sidecar::start(&["--export", "a=4M", "--export", "b=8M"]);
    let admin = sc.admin_socket();
    let md = std::fs::symlink_metadata(&admin).expect("admin socket exists");
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);

    let out = sc.run_cli(&[
        "status",
        "--json",
        "--admin-socket",
        admin.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", out.both());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    assert_eq!(v["pid"].as_u64(), sc.pid().map(u64::from));
    assert_eq!(v["keys"]["active_version"], 1);
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);

    let out = sc.run_cli(&["status", "--admin-socket", admin.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.both());
    assert!(
        out.stdout.contains("key versions   : [1] loaded, active 1"),
        "{}",
        out.stdout
    );

    sc.stop();
    assert!(
        !admin.exists(),
        "admin socket left behind after a clean stop"
    );
    let out = sc.run_cli(&["status", "--admin-socket", admin.to_str().unwrap()]);
    assert!(!out.status.success());
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("is the sidecar running"),
        "{}",
        out.stderr
    );
}

#[test]
fn admin_socket_refuses_a_peer_uid_that_is_not_allowed() {
    // The data socket refuses us too, so wait for the admin socket instead
    // of the NBD greeting.
    let me = rustix_uid();
    let other = me.wrapping_add(4242).to_string();
    let mut sc = Sidecar::new_stopped(&["--export", "a=4M", "--allow-uid", &other]);
    sc.spawn_no_wait();
    let admin = sc.admin_socket();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !admin.exists() {
        assert!(
            Instant::now() < deadline,
            "no admin socket; log:\n{}",
            sc.log()
        );
        assert!(sc.is_running(), "sidecar exited; log:\n{}", sc.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = sc.run_cli(&["status", "--admin-socket", admin.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", out.both());
    assert!(
        out.stderr
            .contains(&format!("peer uid {me} is not allowed on the admin socket")),
        "{}",
        out.stderr
    );
    assert!(sc.is_running());
}

#[test]
fn empty_admin_socket_disables_it() {
    let mut sc = Sidecar::start(&["--export", "a=4M", "--admin-socket", ""]);
    assert!(!sc.admin_socket().exists());
    sc.assert_serves("a", 0);
}

fn rustix_uid() -> u32 {
    // `id -u` keeps unsafe code and extra dependencies out of the tests.
    let out = std::process::Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
