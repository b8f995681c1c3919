//! Hostile and broken clients against the real binary:
//! random bytes, wrong magics, oversized
//! and out-of-range requests, half-closed and stalled clients, 1 000 idle
//! connections against a connection limit, clients that vanish with requests in
//! flight or never read their replies, and the socket's file mode and uid
//! allowlist. After every abuse the process must be alive, its RSS bounded, and
//! a good client (our own and qemu-io) must still be served correctly.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{pattern, pattern_gen, raise_nofile, Client, Rng, Sidecar};
use ear_sidecar::protocol::{self, consts::*};

/// RSS bound for the server after any abuse (memory stays bounded).
const RSS_BOUND_KIB: u64 = 200 * 1024;

fn assert_rss_bounded(sc: &Sidecar, what: &str) {
    let rss = sc.rss_kib();
    eprintln!("{what}: server VmRSS = {rss} KiB");
    assert!(
        rss < RSS_BOUND_KIB,
        "{what}: server RSS {rss} KiB exceeds {RSS_BOUND_KIB} KiB"
    );
}

/// Reads until EOF (or a reset); panics if the peer keeps the connection open
/// for `secs`. Returns the bytes received before the close.
fn expect_closed(s: &mut UnixStream, secs: u64) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("server did not close the connection within {secs}s: {e}"),
        }
    }
}

/// Connects and reads the 18-byte greeting.
fn greeted(sc: &Sidecar) -> UnixStream {
    let mut s = UnixStream::connect(sc.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    protocol::parse_greeting(&g).unwrap();
    s
}

#[test]
fn random_bytes_and_wrong_magics() {
    let mut sc = Sidecar::start(&["--export", "default=64M"]);
    let mut rng = Rng::from_env("random_bytes_and_wrong_magics");
    sc.assert_serves("default", 0);
    let before = sc.rss_kib();

    // 1. Pure noise from the first byte, various lengths; some never close.
    for i in 0..60 {
        let mut s = UnixStream::connect(sc.socket()).unwrap();
        let n = [1usize, 3, 4, 17, 100, 4096, 70_000][i % 7];
        let _ = s.write_all(&rng.bytes(n));
        if i % 3 == 0 {
            let _ = s.shutdown(Shutdown::Write);
        }
        // Whatever happens, the server must close the connection (bad flags or
        // bad option magic) or wait for more; never crash.
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut sink = [0u8; 4096];
        let _ = s.read(&mut sink);
    }
    // 2. Noise after a valid GO, i.e. in the transmission phase.
    for i in 0..40 {
        let mut s = greeted(&sc);
        s.write_all(&common::client::go_request("default")).unwrap();
        let _ = i;
        let n = 1 + rng.below(10_000) as usize;
        let _ = s.write_all(&rng.bytes(n));
        let _ = s.shutdown(Shutdown::Write);
        expect_closed(&mut s, 10);
    }

    // 3. Wrong magics and invalid flags: each is fatal, the server closes.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unknown client flags",
            0xffff_ffffu32.to_be_bytes().to_vec(),
        ),
        ("not fixed newstyle", 0u32.to_be_bytes().to_vec()),
        ("bad IHAVEOPT", {
            let mut v = NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            v.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
            v.extend_from_slice(&NBD_OPT_LIST.to_be_bytes());
            v.extend_from_slice(&0u32.to_be_bytes());
            v
        }),
        ("oversized option", {
            let mut v = NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            v.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
            v.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
            v.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
            v
        }),
        ("bad request magic", {
            let mut v = common::client::go_request("default");
            let mut req = vec![0xde, 0xad, 0xbe, 0xef];
            req.extend_from_slice(&[0u8; 24]);
            v.extend_from_slice(&req);
            v
        }),
    ];
    for (what, bytes) in cases {
        let mut s = greeted(&sc);
        s.write_all(&bytes).unwrap();
        let got = expect_closed(&mut s, 10);
        // For the GO case some option replies precede the close, but never a
        // transmission reply to the bad request.
        assert!(
            !got.windows(4)
                .any(|w| w == NBD_SIMPLE_REPLY_MAGIC.to_be_bytes()),
            "{what}: server replied to a request with a bad magic"
        );
        eprintln!("{what}: closed after {} reply bytes", got.len());
    }

    sc.assert_serves("default", 1 << 20);
    assert_rss_bounded(&sc, "random bytes");
    eprintln!("RSS before {before} KiB");
    assert!(!sc.all_logs().contains("panicked"), "{}", sc.all_logs());
}

#[test]
fn oversized_and_out_of_range_requests() {
    let mut sc = Sidecar::start(&["--export", "default=64M", "--max-request", "64K"]);
    let mut c = sc.client("default");
    let size = c.size;
    assert_eq!(size, 64 << 20);
    // Known content at the last block and at block 0.
    c.write(size - 4096, &pattern(1, 1), true).unwrap().unwrap();
    c.write(0, &pattern(2, 1), true).unwrap().unwrap();

    // WRITE longer than --max-request: error reply, payload discarded, connection usable.
    let big = vec![0xeeu8; 128 << 10];
    let ck = c.cookie();
    c.send(NBD_CMD_WRITE, 0, ck, 0, big.len() as u32, &big)
        .unwrap();
    let h = c.recv().unwrap();
    assert_eq!((h.cookie, h.error), (ck, NBD_EINVAL), "oversized write");
    // READ longer than --max-request: EINVAL, no payload follows.
    let ck = c.cookie();
    c.send(NBD_CMD_READ, 0, ck, 0, 128 << 10, &[]).unwrap();
    let h = c.recv().unwrap();
    assert_eq!((h.cookie, h.error), (ck, NBD_EINVAL), "oversized read");
    // The connection is still in sync: a proper request works.
    assert_eq!(c.read(0, 4096).unwrap().unwrap(), pattern(2, 1));

    // Past the end (spec: ENOSPC for writes, EINVAL for others).
    let payload = vec![0x11u8; 8192];
    assert_eq!(
        c.write(size - 4096, &payload, false).unwrap(),
        Err(NBD_ENOSPC)
    );
    assert_eq!(
        c.write(size, &payload[..4096], false).unwrap(),
        Err(NBD_ENOSPC)
    );
    assert_eq!(
        c.write(u64::MAX - 100, &payload[..4096], false).unwrap(),
        Err(NBD_ENOSPC)
    );
    assert_eq!(c.read(size - 4096, 8192).unwrap(), Err(NBD_EINVAL));
    assert_eq!(c.read(u64::MAX - 10, 4096).unwrap(), Err(NBD_EINVAL));
    for (cmd, flags) in [(NBD_CMD_TRIM, 0), (NBD_CMD_CACHE, 0)] {
        let ck = c.cookie();
        c.send(cmd, flags, ck, size - 4096, 8192, &[]).unwrap();
        let h = c.recv().unwrap();
        assert_eq!((h.cookie, h.error), (ck, NBD_EINVAL), "cmd {cmd} past end");
    }
    let ck = c.cookie();
    c.send(NBD_CMD_WRITE_ZEROES, 0, ck, size - 4096, 8192, &[])
        .unwrap();
    let h = c.recv().unwrap();
    assert_eq!(
        (h.cookie, h.error),
        (ck, NBD_ENOSPC),
        "write zeroes past end"
    );
    // Zero length, unknown command, bad flags, flush with a range.
    for (cmd, flags, off, len) in [
        (NBD_CMD_READ, 0, 0, 0),
        (77u16, 0, 0, 4096),
        (NBD_CMD_READ, 0x8000u16, 0, 4096),
        (NBD_CMD_FLUSH, 0, 4096, 4096),
        (NBD_CMD_BLOCK_STATUS, 0, 0, 4096),
    ] {
        let ck = c.cookie();
        c.send(cmd, flags, ck, off, len, &[]).unwrap();
        let h = c.recv().unwrap();
        assert_eq!(
            (h.cookie, h.error),
            (ck, NBD_EINVAL),
            "cmd {cmd} flags {flags:#x}"
        );
    }
    // Nothing past the end was applied; the last block is intact.
    assert_eq!(c.read(size - 4096, 4096).unwrap().unwrap(), pattern(1, 1));
    assert_eq!(c.read(0, 4096).unwrap().unwrap(), pattern(2, 1));
    c.disconnect();
    sc.assert_serves("default", 2 << 20);
    assert_rss_bounded(&sc, "oversized");
}

#[test]
fn half_closed_and_stalled_clients() {
    let mut sc = Sidecar::start(&["--export", "default=64M"]);
    {
        let mut c = sc.client("default");
        c.write(0, &pattern(0, 7), true).unwrap().unwrap();
        c.disconnect();
    }
    // 1. Half-close mid-payload: the truncated write must not be applied.
    {
        let mut c = sc.client("default");
        let ck = c.cookie();
        let mut payload = pattern(0, 8);
        payload.extend_from_slice(&[0x33u8; 60 << 10]);
        c.send(
            NBD_CMD_WRITE,
            0,
            ck,
            0,
            payload.len() as u32,
            &payload[..10_000],
        )
        .unwrap();
        c.s.shutdown(Shutdown::Write).unwrap();
        let got = expect_closed(&mut c.s, 10);
        assert!(
            got.is_empty(),
            "reply to a write whose payload never arrived"
        );
    }
    // 2. Half-close mid-header and mid-option.
    for cut in [5usize, 20] {
        let mut s = greeted(&sc);
        let go = common::client::go_request("default");
        s.write_all(&go[..cut]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        expect_closed(&mut s, 10);
    }
    {
        let mut c = sc.client("default");
        let ck = c.cookie();
        let hdr_only = {
            let mut b = BytesMut::new();
            protocol::encode_request(
                &mut b,
                &protocol::RawRequest {
                    flags: 0,
                    command: NBD_CMD_READ,
                    cookie: ck,
                    offset: 0,
                    length: 4096,
                },
            );
            b.to_vec()
        };
        c.s.write_all(&hdr_only[..13]).unwrap();
        c.s.shutdown(Shutdown::Write).unwrap();
        assert!(expect_closed(&mut c.s, 10).is_empty());
    }
    // 3. Half-close after complete requests: their replies still arrive.
    {
        let mut c = sc.client("default");
        let (w, f) = (c.cookie(), c.cookie());
        c.send(NBD_CMD_WRITE, 0, w, 8192, 4096, &pattern(2, 1))
            .unwrap();
        c.send(NBD_CMD_FLUSH, 0, f, 0, 0, &[]).unwrap();
        c.s.shutdown(Shutdown::Write).unwrap();
        let mut cookies = [c.recv().unwrap(), c.recv().unwrap()];
        cookies.sort_by_key(|h| h.cookie);
        assert_eq!((cookies[0].cookie, cookies[0].error), (w, 0));
        assert_eq!((cookies[1].cookie, cookies[1].error), (f, 0));
        expect_closed(&mut c.s, 10);
    }
    {
        let mut c = sc.client("default");
        assert_eq!(
            c.read(0, 4096).unwrap().unwrap(),
            pattern(0, 7),
            "truncated write was applied"
        );
        assert_eq!(c.read(8192, 4096).unwrap().unwrap(), pattern(2, 1));
    }
    // 4. Stalled clients: mid-payload, mid-handshake and before the greeting is
    //    read. Others are served meanwhile.
    let mut stalled = Vec::new();
    for i in 0..5u64 {
        let mut c = sc.client("default");
        let ck = c.cookie();
        c.send(NBD_CMD_WRITE, 0, ck, i * 4096, 65536, &[0x44u8; 1000])
            .unwrap();
        stalled.push(c.s);
        let mut s = greeted(&sc);
        s.write_all(&common::client::go_request("default")[..10])
            .unwrap();
        stalled.push(s);
        stalled.push(UnixStream::connect(sc.socket()).unwrap());
    }
    let t = Instant::now();
    sc.assert_serves("default", 4 << 20);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "good client slowed down by stalled ones"
    );
    std::thread::sleep(Duration::from_secs(2));
    sc.assert_serves("default", 5 << 20);
    drop(stalled);
    std::thread::sleep(Duration::from_millis(300));
    let mut c = sc.client("default");
    assert_eq!(
        c.read(0, 4096).unwrap().unwrap(),
        pattern(0, 7),
        "stalled write was applied"
    );
    assert_rss_bounded(&sc, "half-close/stall");
}

#[test]
fn thousand_idle_connections_against_limit() {
    raise_nofile(4096);
    let mut sc = Sidecar::start(&["--export", "default=16M", "--max-connections", "100"]);
    let base_fds = sc.fd_count();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        match UnixStream::connect(sc.socket()) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect failed after {} connections: {e}", idle.len()),
        }
    }
    // Count who got a greeting: at most 100; the rest are closed by the server.
    let mut greeted_n = 0;
    let mut closed_n = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut g = [0u8; 8];
        match s.read_exact(&mut g) {
            Ok(()) if u64::from_be_bytes(g) == NBD_MAGIC => greeted_n += 1,
            _ => closed_n += 1,
        }
    }
    eprintln!(
        "greeted {greeted_n}, refused {closed_n}, server fds {}",
        sc.fd_count()
    );
    assert!(
        greeted_n <= 100,
        "{greeted_n} connections served beyond --max-connections 100"
    );
    assert!(greeted_n >= 90, "only {greeted_n} connections served");
    assert!(
        sc.fd_count() < base_fds + 150,
        "server holds {} fds",
        sc.fd_count()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sc.all_logs().contains("connection limit reached") {
        assert!(
            Instant::now() < deadline,
            "no 'connection limit reached' log:\n{}",
            sc.all_logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(sc.is_running());
    assert_rss_bounded(&sc, "1000 idle");
    drop(idle);
    // Once the idle ones close, a good client is served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = Client::connect(&sc.socket(), "default") {
            if c.read(0, 4096).map(|r| r.is_ok()).unwrap_or(false) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not served after idle connections closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sc.assert_serves("default", 0);
    assert!(
        sc.fd_count() < base_fds + 10,
        "fd leak: {} vs {base_fds}",
        sc.fd_count()
    );
}

#[test]
fn disconnect_with_requests_in_flight() {
    let mut sc = Sidecar::start(&["--export", "default=64M"]);
    let mut rng = Rng::from_env("disconnect_with_requests_in_flight");
    const BLOCKS: u64 = 1024; // 4 MiB region
    {
        let mut c = sc.client("default");
        for chunk in 0..BLOCKS / 64 {
            let mut buf = Vec::with_capacity(64 * 4096);
            for b in chunk * 64..chunk * 64 + 64 {
                buf.extend_from_slice(&pattern(b, 1));
            }
            c.write(chunk * 64 * 4096, &buf, false).unwrap().unwrap();
        }
        c.flush().unwrap().unwrap();
        c.disconnect();
    }
    for round in 0..5u64 {
        let gen = round + 2;
        let mut c = sc.client("default");
        // 256 pipelined 64 KiB writes over the region, in random order.
        let mut order: Vec<u64> = (0..BLOCKS / 16).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut cookie_to_extent = std::collections::HashMap::new();
        let mut sent = 0;
        let send_n = 16 + rng.below(48) as usize;
        for &ext in order.iter().take(send_n) {
            let mut buf = Vec::with_capacity(16 * 4096);
            for b in ext * 16..ext * 16 + 16 {
                buf.extend_from_slice(&pattern(b, gen));
            }
            let ck = c.cookie();
            let fua = rng.below(2) == 0;
            if c.send(
                NBD_CMD_WRITE,
                if fua { NBD_CMD_FLAG_FUA } else { 0 },
                ck,
                ext * 16 * 4096,
                buf.len() as u32,
                &buf,
            )
            .is_err()
            {
                break;
            }
            cookie_to_extent.insert(ck, ext);
            sent += 1;
        }
        let read_n = rng.below(sent as u64 / 2 + 1) as usize;
        let mut acked = std::collections::HashSet::new();
        for _ in 0..read_n {
            let h = c.recv().unwrap();
            assert_eq!(h.error, 0);
            acked.insert(cookie_to_extent[&h.cookie]);
        }
        drop(c); // vanish with the rest in flight
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            sc.is_running(),
            "died after abrupt disconnect; log:\n{}",
            sc.all_logs()
        );
        let in_flight: std::collections::HashSet<u64> =
            cookie_to_extent.values().copied().collect();
        let mut c = sc.client("default");
        let mut applied = 0;
        for chunk in 0..BLOCKS / 64 {
            let data = c
                .read(chunk * 64 * 4096, 64 * 4096)
                .unwrap()
                .expect("read after disconnect");
            for (i, blk) in data.chunks(4096).enumerate() {
                let b = chunk * 64 + i as u64;
                let g = pattern_gen(b, blk);
                let ext = b / 16;
                let want: &[u64] = if acked.contains(&ext) {
                    &[gen]
                } else if in_flight.contains(&ext) {
                    &[gen, gen - 1]
                } else {
                    &[gen - 1]
                };
                assert!(
                    g.is_some_and(|g| want.contains(&g)),
                    "round {round}: block {b} reads as generation {g:?}, expected one of {want:?}"
                );
                if g == Some(gen) {
                    applied += 1;
                }
            }
        }
        // Bring every block to this generation for the next round.
        for ext in 0..BLOCKS / 16 {
            let mut buf = Vec::with_capacity(16 * 4096);
            for b in ext * 16..ext * 16 + 16 {
                buf.extend_from_slice(&pattern(b, gen));
            }
            c.write(ext * 16 * 4096, &buf, false).unwrap().unwrap();
        }
        c.disconnect();
        eprintln!(
            "round {round}: sent {sent}, acked {}, blocks applied {applied}",
            acked.len()
        );
    }
    sc.assert_serves("default", 32 << 20);
    assert_rss_bounded(&sc, "disconnect in flight");
}

/// A client of the default export that sends `count` READs of `len` bytes (at offsets
/// cycling over the first `spread` multiples of `len`) and reads none of the
/// replies; returned once `settle` has passed, so the server has done what it
/// will with them.
fn unread_reads(sc: &Sidecar, count: u64, len: u32, spread: u64, settle: Duration) -> Client {
    let mut c = sc.client("default");
    for i in 0..count {
        let ck = c.cookie();
        c.send(NBD_CMD_READ, 0, ck, (i % spread) * u64::from(len), len, &[])
            .unwrap();
    }
    std::thread::sleep(settle);
    c
}

/// A client that pipelines large READs and never reads the replies must not
/// make the server buffer them without bound (in-flight limits must cover
/// replies not yet written to the socket).
#[test]
fn unread_replies_do_not_grow_memory() {
    let mut sc = Sidecar::start(&["--export", "default=64M"]);
    sc.assert_serves("default", 0);
    let before = sc.rss_kib();
    // 300 x 1 MiB READs = 300 MiB of replies if nothing bounds them.
    let c = unread_reads(&sc, 300, 1 << 20, 64, Duration::from_secs(3));
    let during = sc.rss_kib();
    eprintln!(
        "unread replies: RSS before {before} KiB, with 300 MiB of unread replies {during} KiB"
    );
    // Another client is still served while the greedy one sits there.
    sc.assert_serves("default", 40 << 20);
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    assert!(sc.is_running());
    assert!(
        during < RSS_BOUND_KIB,
        "server buffered unread replies: RSS {during} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
    // Maximum-size requests: 20 x 32 MiB READs left unread would hold more
    // than the server-wide in-flight budget (256 MiB) if one connection
    // could take it all; the per-connection share keeps others served.
    let c = unread_reads(&sc, 20, 32 << 20, 2, Duration::from_secs(2));
    sc.assert_serves("default", 44 << 20);
    let during = sc.rss_kib();
    assert!(
        during < RSS_BOUND_KIB,
        "server buffered unread 32 MiB replies: RSS {during} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
    drop(c);
}

const PY_CONNECT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except Exception as e:
    print("CONNECT_ERR", type(e).__name__); sys.exit(0)
s.settimeout(5)
try:
    d = s.recv(8)
except Exception as e:
    print("RECV_ERR", type(e).__name__); sys.exit(0)
print("GOT", d.hex())
"#;

/// Runs the connect probe as uid/gid 65534 (nobody); returns its one-line verdict.
fn connect_as_nobody(socket: &std::path::Path) -> String {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            PY_CONNECT,
        ])
        .arg(socket)
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn socket_mode_and_peer_uid_allowlist() {
    // Default mode is 0600.
    let sc = Sidecar::start(&["--export", "default=16M"]);
    let mode = std::fs::metadata(sc.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "default socket mode {mode:o}");
    if !common::is_root() {
        eprintln!("SKIP second-uid checks: tests are not running as root (cannot switch uid)");
        return;
    }
    std::fs::set_permissions(sc.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let v = connect_as_nobody(&sc.socket());
    assert_eq!(
        v, "CONNECT_ERR PermissionError",
        "uid 65534 on a 0600 socket: {v}"
    );
    drop(sc);

    // Positive control: mode 0666 without an allowlist lets uid 65534 in.
    let sc = Sidecar::start(&["--export", "default=16M", "--socket-mode", "0666"]);
    std::fs::set_permissions(sc.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let v = connect_as_nobody(&sc.socket());
    assert_eq!(v, format!("GOT {:016x}", NBD_MAGIC), "control: {v}");
    drop(sc);

    // Mode 0666 with --allow-uid 0: uid 65534 is refused before the greeting.
    let mut sc = Sidecar::start(&[
        "--export",
        "default=16M",
        "--socket-mode",
        "0666",
        "--allow-uid",
        "0",
    ]);
    std::fs::set_permissions(sc.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for _ in 0..3 {
        let v = connect_as_nobody(&sc.socket());
        assert!(
            v == "GOT" || v == "RECV_ERR ConnectionResetError",
            "uid 65534 not refused: {v}"
        );
    }
    assert!(
        sc.all_logs().contains("peer uid not in --allow-uid"),
        "{}",
        sc.all_logs()
    );
    sc.assert_serves("default", 0);
}

/// A client may send its first requests right behind NBD_OPT_GO, before the
/// server has answered it: the server must serve them, although they arrive
/// while it is still negotiating (in the negotiation's read buffer).
#[test]
fn requests_pipelined_behind_opt_go_are_served() {
    let sc = Sidecar::start(&["--export", "default=16M"]);
    let mut s = greeted(&sc);
    let data = pattern(3, 9);
    let mut b = BytesMut::new();
    b.extend_from_slice(&common::client::go_request("default"));
    for (command, cookie, payload) in [
        (NBD_CMD_WRITE, 7u64, &data[..]),
        (NBD_CMD_READ, 8, &[][..]),
        (NBD_CMD_FLUSH, 9, &[][..]),
    ] {
        protocol::encode_request(
            &mut b,
            &protocol::RawRequest {
                flags: 0,
                command,
                cookie,
                offset: if command == NBD_CMD_FLUSH {
                    0
                } else {
                    3 * 4096
                },
                length: if command == NBD_CMD_FLUSH { 0 } else { 4096 },
            },
        );
        b.extend_from_slice(payload);
    }
    s.write_all(&b).unwrap();
    // Option replies up to the final ACK.
    loop {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let h = protocol::parse_option_reply_header(&h).unwrap();
        let mut skip = vec![0u8; h.length as usize];
        s.read_exact(&mut skip).unwrap();
        assert!(!h.is_error(), "GO refused: {:#x}", h.reply_type);
        if h.reply_type == NBD_REP_ACK {
            break;
        }
    }
    // All three are answered, in some order (requests in flight together
    // are not ordered: the read returns the old or the new data).
    let mut got = std::collections::HashMap::new();
    for _ in 0..3 {
        let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let h = protocol::parse_simple_reply_header(&h).unwrap();
        assert_eq!(h.error, 0, "request {} failed", h.cookie);
        let mut payload = Vec::new();
        if h.cookie == 8 {
            payload = vec![0u8; 4096];
            s.read_exact(&mut payload).unwrap();
            assert!(payload == data || payload == vec![0u8; 4096]);
        }
        got.insert(h.cookie, payload);
    }
    assert_eq!(got.len(), 3);
    // Once the write is answered, a read returns it.
    let mut b = BytesMut::new();
    protocol::encode_request(
        &mut b,
        &protocol::RawRequest {
            flags: 0,
            command: NBD_CMD_READ,
            cookie: 10,
            offset: 3 * 4096,
            length: 4096,
        },
    );
    s.write_all(&b).unwrap();
    let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = protocol::parse_simple_reply_header(&h).unwrap();
    assert_eq!((h.cookie, h.error), (10, 0));
    let mut payload = vec![0u8; 4096];
    s.read_exact(&mut payload).unwrap();
    assert_eq!(payload, data);
}
