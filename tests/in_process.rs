//! In-process server tests: `server::run` on a real store and a real Unix
//! socket, driven by the test kit's blocking NBD client, without spawning
//! the binary. Fast, and able to look inside (health latch, recorded metrics,
//! the store after shutdown).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::in_process::TestServer;
use common::{Client, Rng};
use ear_sidecar::protocol::consts::NBD_CMD_READ;
use ear_sidecar::server::ServerConfig;

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

/// Clients that leave their replies unread each hold a share of the
/// server-wide payload budget; a few of them could hold all of it, and every
/// other client would wait for ever. A reply that makes no progress for the
/// reply timeout drops its connection, so a well-behaved client is served
/// again (without the timeout, its read below times out).
#[test]
fn clients_that_read_no_replies_are_dropped_after_the_reply_timeout() {
    let config = ServerConfig {
        max_request: MIB as u32,
        // Two greedy connections (two 1 MiB replies each) fill it.
        inflight_bytes: 4 * MIB as usize,
        reply_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(&[("a", 64 * MIB)], true, config);
    let mut greedy: Vec<Client> = (0..3).map(|_| connect(&srv, "a")).collect();
    for c in &mut greedy {
        for i in 0..32u64 {
            let ck = c.cookie();
            c.send(NBD_CMD_READ, 0, ck, (i % 64) * MIB, MIB as u32, &[])
                .unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let mut good = connect(&srv, "a");
    good.s
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let data = good
        .read(0, 4096)
        .expect("served after the greedy clients were dropped");
    assert_eq!(data.expect("read").len(), 4096);
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    // The good client could only be served once a stalled connection was
    // dropped. (A greedy client that was still waiting for budget when the
    // others went had no stalled reply, and it is reading below, so it is
    // served like any other client.)
    let mut dropped = 0;
    for c in &mut greedy {
        c.s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut sink = Vec::new();
        let end = std::io::Read::read_to_end(&mut c.s, &mut sink);
        if end.is_ok()
            || end
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
        {
            dropped += 1;
        }
    }
    assert!(dropped >= 1, "no greedy client was dropped");
}
