//! Shared harness of the hardening tests (`tests/hostile.rs`, `tests/crash.rs`,
//! `tests/secrets.rs`, `tests/fuzz.rs`): starts the real `ear-sidecar` binary
//! on a private data directory and Unix socket, kills and restarts it, reads
//! its log and RSS, and talks NBD to it through a small blocking client built
//! on the crate's own client-side codec (or through `qemu-io`).
//!
//! Kept separate from `tests/common` (owned by another test suite) so both
//! can evolve independently.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ear_sidecar::protocol::{
    self, consts::*, InfoRequest, OptionReplyHeader, RawRequest, SimpleReplyHeader,
};

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ear-sidecar")
}

/// True when the test process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Raises this process's open-file soft limit to at least `n` (best effort).
pub fn raise_nofile(n: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    let cur = l.current.unwrap_or(u64::MAX);
    if cur >= n {
        return;
    }
    let max = l.maximum.unwrap_or(u64::MAX);
    l.current = Some(n.min(max));
    let _ = setrlimit(Resource::Nofile, l);
}

/// A running (or stopped) sidecar with its own directory.
pub struct Sidecar {
    /// Owns the temporary root (removed on drop).
    _root: Option<tempfile::TempDir>,
    /// Root directory (data dir, socket and log live under it).
    pub root: PathBuf,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// `--socket`.
    pub socket: PathBuf,
    /// stderr of every run, appended.
    pub log_path: PathBuf,
    /// Arguments after `serve` (without data dir / socket).
    pub args: Vec<String>,
    /// Command prefix such as `prlimit --fsize=N --`.
    pub wrapper: Vec<String>,
    child: Option<Child>,
}

impl Sidecar {
    /// Starts a sidecar with `args` (e.g. `["--export", "default=64M"]`) in a
    /// fresh temporary directory. Metrics are disabled.
    pub fn start(args: &[&str]) -> Sidecar {
        let root = tempfile::Builder::new()
            .prefix("earh")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let path = root.path().to_path_buf();
        let mut sc = Sidecar::new_in(&path, args);
        sc._root = Some(root);
        sc.spawn();
        sc
    }

    /// A sidecar rooted at `root` (not started, not owning the directory).
    pub fn new_in(root: &Path, args: &[&str]) -> Sidecar {
        Sidecar {
            _root: None,
            root: root.to_path_buf(),
            data_dir: root.join("data"),
            socket: root.join("nbd.sock"),
            log_path: root.join("sidecar.log"),
            args: args.iter().map(|s| s.to_string()).collect(),
            wrapper: Vec::new(),
            child: None,
        }
    }

    /// Spawns the process and waits until it answers on the socket.
    pub fn spawn(&mut self) {
        self.spawn_no_wait();
        self.wait_ready();
    }

    /// Spawns the process without waiting.
    pub fn spawn_no_wait(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        let mut argv: Vec<String> = self.wrapper.clone();
        argv.push(bin().to_string());
        argv.extend(["serve".to_string(), "--data-dir".into()]);
        argv.push(self.data_dir.display().to_string());
        argv.push("--socket".into());
        argv.push(self.socket.display().to_string());
        argv.push("--metrics-addr".into());
        argv.push(String::new());
        argv.extend(self.args.iter().cloned());
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .env_remove("RUST_LOG")
            .env("XDG_CONFIG_HOME", self.root.join("config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn ear-sidecar");
        self.child = Some(child);
    }

    /// Waits (≤ 30 s) until a connection gets the NBD greeting.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "ear-sidecar exited during start-up ({st}); log:\n{}",
                    self.log()
                );
            }
            if greeting_ok(&self.socket) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not ready; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Exit status if it has exited (None while running / never started).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait ≤ 20 s for a clean exit (then SIGKILL). Returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Stops (SIGTERM) and starts again with the same arguments.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Everything the process wrote to stdout/stderr so far (all runs).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// `nbd+unix` URI of `export` for qemu tools.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Resident set size of the process in KiB (from /proc/<pid>/status).
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Number of open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// A blocking NBD client connected to `export`.
    pub fn client(&self, export: &str) -> Client {
        Client::connect(&self.socket, export)
            .unwrap_or_else(|e| panic!("good client cannot connect: {e}; log:\n{}", self.log()))
    }

    /// Asserts the process is alive and a fresh client can write, flush and read
    /// back at `offset` (both through our client and through qemu-io).
    pub fn assert_serves(&mut self, export: &str, offset: u64) {
        assert!(self.alive(), "sidecar died; log:\n{}", self.log());
        let mut c = self.client(export);
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8) ^ (offset as u8) ^ 0x5a)
            .collect();
        c.write(offset, &data, true).expect("io").expect("write ok");
        c.flush().expect("io").expect("flush ok");
        let back = c.read(offset, 4096).expect("io").expect("read ok");
        assert_eq!(back, data, "good client read back wrong data");
        c.disconnect();
        let (ok, out) = qemu_io(
            &self.uri(export),
            &[
                &format!("write -P 0xa7 {} 4k", offset + 4096),
                &format!("read -P 0xa7 {} 4k", offset + 4096),
            ],
        );
        assert!(
            ok,
            "qemu-io good client failed: {out}\nlog:\n{}",
            self.log()
        );
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// True if a connection to `socket` receives `NBDMAGIC` within 2 s.
pub fn greeting_ok(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut g = [0u8; 8];
    s.read_exact(&mut g).is_ok() && u64::from_be_bytes(g) == NBD_MAGIC
}

/// Runs `qemu-io -f raw <uri> -c cmd...`; returns (success, combined output).
/// Success means exit status 0 and no "failed"/"error"/"mismatch" in the output.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    match c.output() {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let lower = text.to_lowercase();
            let bad =
                lower.contains("fail") || lower.contains("error") || lower.contains("mismatch");
            (o.status.success() && !bad, text)
        }
        Err(e) => (false, format!("cannot run qemu-io: {e}")),
    }
}

/// A blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies).
pub struct Client {
    /// The socket.
    pub s: UnixStream,
    /// Export size.
    pub size: u64,
    next_cookie: u64,
}

fn proto(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Client {
    /// Connects and negotiates `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> io::Result<Client> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Client {
            s,
            size: 0,
            next_cookie: 1,
        };
        let mut g = [0u8; GREETING_LEN];
        c.s.read_exact(&mut g)?;
        protocol::parse_greeting(&g).map_err(proto)?;
        let mut b = BytesMut::new();
        protocol::encode_client_flags(&mut b, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        let mut data = BytesMut::new();
        InfoRequest {
            name: export.to_string(),
            info_types: vec![],
        }
        .encode(&mut data);
        protocol::encode_option(&mut b, NBD_OPT_GO, &data);
        c.s.write_all(&b)?;
        loop {
            let (h, data) = c.read_option_reply()?;
            if h.is_error() {
                return Err(proto(format!("GO refused: {:#x}", h.reply_type)));
            }
            match h.reply_type {
                NBD_REP_ACK => break,
                NBD_REP_INFO => {
                    if let Ok(protocol::InfoReply::Export { size, .. }) =
                        protocol::parse_rep_info(&data)
                    {
                        c.size = size;
                    }
                }
                _ => {}
            }
        }
        Ok(c)
    }

    /// Reads one option reply (header and data).
    pub fn read_option_reply(&mut self) -> io::Result<(OptionReplyHeader, Vec<u8>)> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h)?;
        let h = protocol::parse_option_reply_header(&h).map_err(proto)?;
        let mut data = vec![0u8; h.length as usize];
        self.s.read_exact(&mut data)?;
        Ok((h, data))
    }

    /// A fresh cookie.
    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends a raw request header (and `payload`, if any).
    pub fn send(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = BytesMut::with_capacity(REQUEST_HEADER_LEN + payload.len());
        protocol::encode_request(
            &mut b,
            &RawRequest {
                flags,
                command,
                cookie,
                offset,
                length,
            },
        );
        b.extend_from_slice(payload);
        self.s.write_all(&b)
    }

    /// Reads one simple reply header.
    pub fn recv(&mut self) -> io::Result<SimpleReplyHeader> {
        let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h)?;
        protocol::parse_simple_reply_header(&h).map_err(proto)
    }

    /// Reads `n` bytes (READ reply payload).
    pub fn recv_data(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    /// READ: `Ok(Ok(data))`, `Ok(Err(errno))`, or a socket error.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let ck = self.cookie();
        self.send(NBD_CMD_READ, 0, ck, offset, len, &[])?;
        let h = self.recv()?;
        if h.cookie != ck {
            return Err(proto("cookie mismatch"));
        }
        if h.error != 0 {
            return Ok(Err(h.error));
        }
        Ok(Ok(self.recv_data(len as usize)?))
    }

    /// WRITE (with FUA when `fua`).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<Result<(), u32>> {
        let ck = self.cookie();
        let len = u32::try_from(data.len()).map_err(proto)?;
        self.send(
            NBD_CMD_WRITE,
            if fua { NBD_CMD_FLAG_FUA } else { 0 },
            ck,
            offset,
            len,
            data,
        )?;
        self.expect_reply(ck)
    }

    /// FLUSH.
    pub fn flush(&mut self) -> io::Result<Result<(), u32>> {
        let ck = self.cookie();
        self.send(NBD_CMD_FLUSH, 0, ck, 0, 0, &[])?;
        self.expect_reply(ck)
    }

    fn expect_reply(&mut self, ck: u64) -> io::Result<Result<(), u32>> {
        let h = self.recv()?;
        if h.cookie != ck {
            return Err(proto("cookie mismatch"));
        }
        Ok(if h.error == 0 { Ok(()) } else { Err(h.error) })
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub fn disconnect(mut self) {
        let _ = self.send(NBD_CMD_DISC, 0, 0, 0, 0, &[]);
    }
}

/// Deterministic 4 KiB block content for (block, generation): generation 0 is
/// all zeros (never written); otherwise the first 16 bytes name the block and
/// generation and the rest is a xorshift stream seeded from both.
pub fn pattern(block: u64, gen: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    if gen == 0 {
        return v;
    }
    v[0..8].copy_from_slice(&block.to_le_bytes());
    v[8..16].copy_from_slice(&gen.to_le_bytes());
    let mut x =
        block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ gen.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    for chunk in v[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    v
}

/// The generation a block read as, if it is exactly `pattern(block, gen)` for
/// the generation it names (or all zeros → 0); `None` for anything else.
pub fn pattern_gen(block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let gen = u64::from_le_bytes(data.get(8..16)?.try_into().ok()?);
    (gen != 0 && pattern(block, gen) == data).then_some(gen)
}

/// A tiny deterministic PRNG for test choices (seed printed by each test).
pub struct Rng(pub u64);

impl Rng {
    /// Seeds from `EAR_TEST_SEED` or the clock; prints the seed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("EAR_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: EAR_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
