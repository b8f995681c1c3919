//! In-process server tests: `server::run` on a real store and a real Unix
//! socket, driven by the test kit's blocking NBD client, without spawning
//! the binary. Fast, and able to look inside (health latch, recorded metrics,
//! the store after shutdown).

mod common;

use std::sync::atomic::Ordering;

use common::in_process::TestServer;
use common::{Client, Rng};

const MIB: u64 = 1 << 20;

/// A client in transmission on `export` (`NBD_OPT_EXPORT_NAME`).
fn connect(srv: &TestServer, export: &str) -> Client {
    Client::connect_export_name(&srv.socket(), export).expect("connect")
}

/// The value of the first line of `text` starting with `prefix`.
fn series(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn writes_read_back_and_survive_shutdown() {
    let mut srv = TestServer::start(&[("a", 4 * MIB), ("b", MIB)], true);
    let mut rng = Rng::new(15);
    let data = rng.bytes(64 << 10);
    let mut c = connect(&srv, "a");
    assert_eq!(c.size, 4 * MIB);
    c.write(12_345, &data, true).unwrap().expect("write");
    assert_eq!(
        c.read(12_345, data.len() as u32).unwrap().expect("read"),
        data
    );
    c.flush().unwrap().expect("flush");
    c.disconnect();
    srv.stop();
    // After a drain the data is in the store.
    let mut out = vec![0u8; data.len()];
    let e = srv.store.get("a").expect("export a");
    e.read(12_345, &mut out).expect("store read");
    assert_eq!(out, data);
    assert!(srv.health.draining.load(Ordering::Acquire));
}

#[test]
fn requests_are_recorded_per_export_and_op() {
    let srv = TestServer::start(&[("a", MIB)], false);
    let mut c = connect(&srv, "a");
    c.write(0, &[1u8; 4096], false).unwrap().expect("write");
    c.read(0, 4096).unwrap().expect("read");
    c.read(0, 4096).unwrap().expect("read");
    // Out of range: refused by the codec before the handler, so not counted.
    assert!(c.read(MIB, 4096).unwrap().is_err());
    c.disconnect();
    // Requests are recorded before their replies are sent.
    let text = srv.render_metrics();
    let value = |name: &str| series(&text, name);
    assert_eq!(
        value("ear_requests_total{export=\"a\",op=\"read\",result=\"ok\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("ear_request_bytes_total{export=\"a\",op=\"write\"}"),
        Some(4096.0),
        "{text}"
    );
}

#[test]
fn connections_are_counted_and_unknown_exports_refused() {
    let srv = TestServer::start(&[("a", MIB)], true);
    let c = connect(&srv, "a");
    let t = std::time::Instant::now();
    while srv.health.connections.load(Ordering::Relaxed) != 1 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "not counted"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    c.disconnect();
    let socket = srv.socket();
    assert!(
        Client::connect_export_name(&socket, "nope").is_err(),
        "an unknown export must close the handshake"
    );
}
