//! Shared harness for integration tests that drive the built `ear-sidecar`
//! binary with real NBD clients (qemu-io, nbdcopy, nbdinfo, fio, ...).
//!
//! What it owns:
//! * [`Sidecar`]: a sidecar process in its own temporary directory
//!   (`<tmp>/data` data directory, `<tmp>/s.sock` socket, metrics disabled),
//!   started and waited for until the socket accepts connections, stopped
//!   with SIGTERM (asserting exit 0), killed with SIGKILL, restarted on the
//!   same data directory; its stderr goes to a log file that every panic
//!   message includes. Dropping it kills the child.
//! * [`require_tool`]: fail loudly (never skip silently) when an external
//!   client is missing.
//! * [`run`] / [`run_ok`] / [`qemu_io`]: run a command with a time limit and
//!   assert success, showing stdout and stderr on failure.
//! * [`Rng`]: a small seeded generator for reproducible test data, and
//!   [`scan_dir_for`] to look for byte patterns in every file of a directory.
//!
//! * [`in_process::TestServer`]: `server::run` in-process on a temporary
//!   store, for tests that look inside the server.
//!
//! Every wait here is bounded; nothing depends on sleeping "long enough".
//! Include it with `mod common;` (each test crate uses a subset, hence the
//! `dead_code` allowance).
#![allow(dead_code)]

pub mod in_process;

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long the sidecar may take to start accepting connections (debug build,
/// shared CI machine, fsyncs on a fresh data directory).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the sidecar may take to drain and exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time limit for an external command run by [`run`].
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Path of the binary under test (built by cargo for integration tests).
pub fn sidecar_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ear-sidecar")
}

/// True if `tool` is an executable file in a `PATH` directory.
pub fn have_tool(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Panics with an actionable message when `tool` is not on `PATH`. Tests
/// fail rather than skip: a missing client must not look like a pass.
pub fn require_tool(tool: &str) {
    assert!(
        have_tool(tool),
        "required tool `{tool}` is not on PATH; install the test dependencies \
         (apt-get install qemu-utils libnbd-bin fio nbdkit, or run .ci/run)"
    );
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Output {
    /// stdout and stderr together, for error messages and searches.
    pub fn both(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Waits for `child` at most `timeout`; on timeout it is killed and `None` returned.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` to completion within `timeout` (stdin is null; stdout and
/// stderr are captured through temporary files so a chatty child never
/// blocks on a full pipe). Panics if it cannot start or times out; the exit
/// status is the caller's to judge.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let out = tempfile::NamedTempFile::new().expect("temp file for stdout");
    let err = tempfile::NamedTempFile::new().expect("temp file for stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.reopen().expect("reopen stdout file"))
        .stderr(err.reopen().expect("reopen stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let status = wait_bounded(&mut child, timeout);
    let read = |f: &tempfile::NamedTempFile| {
        String::from_utf8_lossy(&std::fs::read(f.path()).unwrap_or_default()).into_owned()
    };
    let (stdout, stderr) = (read(&out), read(&err));
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "`{what}` did not finish within {timeout:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        ),
    }
}

/// [`run_timeout`] with [`COMMAND_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Output {
    run_timeout(cmd, COMMAND_TIMEOUT)
}

/// Runs `cmd` and asserts it exits 0; the panic shows the command line,
/// status, stdout and stderr.
pub fn run_ok(cmd: &mut Command) -> Output {
    let what = describe(cmd);
    let out = run(cmd);
    assert!(
        out.status.success(),
        "`{what}` failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out
}

/// Runs `qemu-io -f raw URI -c CMD...` and asserts success. qemu-io exits
/// non-zero when a command fails (including `read -P` pattern mismatches);
/// the output is also checked for failure messages, belt and braces.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let what = describe(&c);
    let out = run_ok(&mut c);
    let both = out.both();
    assert!(
        !both.contains("verification failed") && !both.contains("failed:"),
        "`{what}` reported a failure\n{both}"
    );
    out
}

/// A running (or stopped) sidecar in a private temporary directory.
pub struct Sidecar {
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    runs: u32,
    log_path: PathBuf,
}

/// Why [`Sidecar::try_start`] failed.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status, if the process exited (rather than timing out).
    pub status: Option<ExitStatus>,
    /// Its stderr.
    pub log: String,
}

impl Sidecar {
    /// Starts `ear-sidecar serve --data-dir <tmp>/data --socket <tmp>/s.sock
    /// --metrics-addr '' ARGS...` in a fresh temporary directory and waits
    /// until the socket accepts connections. Panics (with the log) if it
    /// exits or does not come up within [`START_TIMEOUT`].
    pub fn start(args: &[&str]) -> Sidecar {
        let mut s = Self::new_stopped(args);
        s.start_again();
        s
    }

    /// A sidecar whose temporary directory exists (with an empty `data`
    /// directory not yet created) but whose process was not started: for
    /// preparing files (e.g. the socket path) before the first start.
    pub fn new_stopped(args: &[&str]) -> Sidecar {
        let dir = tempfile::Builder::new()
            .prefix("ear-it-")
            .tempdir()
            .expect("create temp dir");
        let log_path = dir.path().join("sidecar-0.log");
        Sidecar {
            dir,
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            runs: 0,
            log_path,
        }
    }

    /// The temporary directory holding data dir, socket and logs.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The data directory (`<tmp>/data`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `XDG_CONFIG_HOME` of the sidecar (`<tmp>/config`), where the local
    /// provider's default KEK lives.
    pub fn config_home(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// The local provider's KEK file (`<tmp>/config/ear-sidecar/local.kek`).
    pub fn kek_file(&self) -> PathBuf {
        self.config_home().join("ear-sidecar").join("local.kek")
    }

    /// The socket path (`<tmp>/s.sock`).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("s.sock")
    }

    /// Backing file of `export` (`<data>/exports/<export>.ear`).
    pub fn backing_file(&self, export: &str) -> PathBuf {
        self.data_dir()
            .join("exports")
            .join(format!("{export}.ear"))
    }

    /// The extra arguments every start uses.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Replaces the extra arguments used by the next start.
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|s| s.to_string()).collect();
    }

    /// `nbd+unix:///EXPORT?socket=PATH` (empty `export` selects the default).
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    /// The process id of the running child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// stderr of the current (or last) run.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(sidecar_bin());
        c.arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--socket")
            .arg(self.socket())
            .args(["--metrics-addr", ""])
            .args(&self.args)
            // Isolate from the developer's environment and config files;
            // the default local KEK goes to <tmp>/config, beside the data.
            .env_remove("EAR_CONFIG")
            .env("XDG_CONFIG_HOME", self.config_home())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .current_dir(self.dir.path());
        c
    }

    /// Spawns the process (the previous one must be stopped) and waits for
    /// the socket, or returns how it failed.
    pub fn try_start(&mut self) -> Result<(), StartFailure> {
        assert!(self.child.is_none(), "sidecar is already running");
        self.runs += 1;
        self.log_path = self.dir.path().join(format!("sidecar-{}.log", self.runs));
        let log = File::create(&self.log_path).expect("create sidecar log");
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", sidecar_bin()));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(StartFailure {
                        status: Some(status),
                        log: self.log(),
                    })
                }
                Ok(None) => {}
                Err(e) => panic!("waiting for the sidecar: {e}"),
            }
            // Connect (not just "file exists"): a stale socket from a killed
            // run exists but refuses connections.
            if UnixStream::connect(self.socket()).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartFailure {
                    status: None,
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the (stopped) sidecar again on the same data directory; panics
    /// with the log on failure.
    pub fn start_again(&mut self) {
        if let Err(f) = self.try_start() {
            panic!(
                "ear-sidecar did not start ({}), args {:?}\n--- log\n{}",
                match f.status {
                    Some(s) => format!("exited with {s}"),
                    None => format!("socket not accepting after {START_TIMEOUT:?}"),
                },
                self.args,
                f.log
            );
        }
    }

    /// Starts the (stopped) sidecar expecting it to fail: waits (bounded)
    /// for it to exit and returns its exit status and stderr. Panics if it
    /// starts serving instead.
    pub fn start_expect_failure(&mut self) -> (ExitStatus, String) {
        match self.try_start() {
            Ok(()) => {
                let log = self.log();
                self.kill9();
                panic!("ear-sidecar started but was expected to fail\n--- log\n{log}");
            }
            Err(StartFailure {
                status: Some(s),
                log,
            }) => (s, log),
            Err(StartFailure { status: None, log }) => {
                panic!("ear-sidecar neither served nor exited\n--- log\n{log}")
            }
        }
    }

    /// SIGTERM, wait (bounded), assert exit status 0.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("sidecar is not running");
        send_signal(child.id(), "TERM");
        match wait_bounded(&mut child, STOP_TIMEOUT) {
            Some(st) => assert!(
                st.success(),
                "ear-sidecar exited with {st} after SIGTERM\n--- log\n{}",
                self.log()
            ),
            None => panic!(
                "ear-sidecar did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- log\n{}",
                self.log()
            ),
        }
    }

    /// SIGKILL and reap: a crash, nothing flushed by the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again).
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// True while the child runs (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs `ear-sidecar ARGS...` (another subcommand, e.g. `status`) and
    /// returns its output; the exit status is the caller's to judge.
    pub fn run_cli(&self, args: &[&str]) -> Output {
        let mut c = Command::new(sidecar_bin());
        c.args(args)
            .env_remove("EAR_CONFIG")
            .env("XDG_CONFIG_HOME", self.config_home());
        run(&mut c)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends `SIG<sig>` to `pid` with the `kill` utility (no unsafe code needed).
fn send_signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(st.success(), "kill -{sig} {pid} failed: {st}");
}

/// A small deterministic generator (SplitMix64) for reproducible test data.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display()));
        for ent in rd {
            let ent = ent.expect("dir entry");
            let ft = ent.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(ent.path());
            } else if ft.is_file() {
                out.push(ent.path());
            }
        }
    }
    out.sort();
    out
}

/// Files under `dir` that contain `needle` anywhere (streamed in chunks
/// with overlap, so big sparse backing files are fine).
pub fn scan_dir_for(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    assert!(!needle.is_empty());
    files_under(dir)
        .into_iter()
        .filter(|p| file_contains(p, needle))
        .collect()
}

/// True if the file at `path` contains `needle`.
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let keep = needle.len() - 1;
    let mut buf = vec![0u8; (1 << 20) + keep];
    let mut have = 0usize;
    loop {
        let n = f
            .read(&mut buf[have..])
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            return false;
        }
        have += n;
        if buf[..have].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        if have > keep {
            buf.copy_within(have - keep..have, 0);
            have = keep;
        }
    }
}

/// Reads `len` bytes at `offset` of the file at `path`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset)
        .unwrap_or_else(|e| panic!("read {len} bytes at {offset} of {}: {e}", path.display()));
    v
}

/// A minimal blocking NBD client over a Unix socket, built on the crate's
/// client codec (`ear_sidecar::protocol`): fixed-newstyle handshake with
/// `NBD_OPT_EXPORT_NAME` (so replies are simple replies), then one request at
/// a time. For tests that need byte-exact control (distinctive payloads,
/// invalid requests) that the command-line clients cannot express. All
/// socket reads and writes time out after 60 s.
pub struct NbdConn {
    sock: UnixStream,
    /// Export size announced by the server.
    pub size: u64,
    /// Transmission flags announced by the server.
    pub flags: u16,
    cookie: u64,
}

/// A simple reply: `NBD_E*` error (0 on success) and the READ payload.
#[derive(Debug)]
pub struct Reply {
    /// `NBD_E*` value, 0 on success.
    pub error: u32,
    /// Data of a successful READ; empty otherwise.
    pub data: Vec<u8>,
}

impl NbdConn {
    /// Connects to `socket` and enters transmission on `export`.
    pub fn connect(socket: &Path, export: &str) -> NbdConn {
        use ear_sidecar::protocol::{self, consts};
        use std::io::Write;
        let mut sock = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set read timeout");
        sock.set_write_timeout(Some(Duration::from_secs(60)))
            .expect("set write timeout");
        let mut greeting = [0u8; consts::GREETING_LEN];
        sock.read_exact(&mut greeting).expect("read greeting");
        let hflags = protocol::parse_greeting(&greeting).expect("valid greeting");
        let no_zeroes = hflags & consts::NBD_FLAG_NO_ZEROES != 0;
        let mut b = bytes::BytesMut::new();
        let mut cflags = consts::NBD_FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= consts::NBD_FLAG_C_NO_ZEROES;
        }
        protocol::encode_client_flags(&mut b, cflags);
        protocol::encode_option(&mut b, consts::NBD_OPT_EXPORT_NAME, export.as_bytes());
        sock.write_all(&b)
            .expect("send client flags and export name");
        let mut reply = [0u8; 10];
        sock.read_exact(&mut reply)
            .unwrap_or_else(|e| panic!("export {export:?}: server closed the handshake: {e}"));
        let (size, flags) = protocol::parse_export_name_reply(&reply);
        if !no_zeroes {
            let mut z = [0u8; consts::EXPORT_NAME_ZEROES];
            sock.read_exact(&mut z).expect("read 124 zero bytes");
        }
        NbdConn {
            sock,
            size,
            flags,
            cookie: 1,
        }
    }

    /// The underlying socket (to send raw bytes).
    pub fn socket(&mut self) -> &mut UnixStream {
        &mut self.sock
    }

    /// Sends one request header (and `payload` right after it, which may be
    /// of any length: tests send inconsistent ones on purpose). Returns the cookie.
    pub fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        use std::io::Write;
        let cookie = self.cookie;
        self.cookie += 1;
        let mut b = bytes::BytesMut::new();
        ear_sidecar::protocol::encode_request(
            &mut b,
            &ear_sidecar::protocol::RawRequest {
                flags,
                command,
                cookie,
                offset,
                length,
            },
        );
        self.sock.write_all(&b).expect("send request header");
        self.sock.write_all(payload).expect("send request payload");
        cookie
    }

    /// Reads one simple reply to `cookie`; for a successful READ, `read_len`
    /// payload bytes follow it.
    pub fn recv(&mut self, cookie: u64, read_len: usize) -> std::io::Result<Reply> {
        use ear_sidecar::protocol::{self, consts};
        let mut h = [0u8; consts::SIMPLE_REPLY_HEADER_LEN];
        self.sock.read_exact(&mut h)?;
        let hdr = protocol::parse_simple_reply_header(&h)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        assert_eq!(hdr.cookie, cookie, "reply to an unexpected cookie");
        let mut data = Vec::new();
        if hdr.error == 0 && read_len > 0 {
            data = vec![0u8; read_len];
            self.sock.read_exact(&mut data)?;
        }
        Ok(Reply {
            error: hdr.error,
            data,
        })
    }

    /// READ; `Err(errno)` on an error reply.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let c = self.send(
            ear_sidecar::protocol::consts::NBD_CMD_READ,
            0,
            offset,
            len,
            &[],
        );
        let r = self.recv(c, len as usize).expect("read reply");
        if r.error == 0 {
            Ok(r.data)
        } else {
            Err(r.error)
        }
    }

    /// WRITE (with FUA if `fua`); `Err(errno)` on an error reply.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), u32> {
        use ear_sidecar::protocol::consts;
        let flags = if fua { consts::NBD_CMD_FLAG_FUA } else { 0 };
        let len = u32::try_from(data.len()).expect("payload fits a request");
        let c = self.send(consts::NBD_CMD_WRITE, flags, offset, len, data);
        let r = self.recv(c, 0).expect("write reply");
        if r.error == 0 {
            Ok(())
        } else {
            Err(r.error)
        }
    }

    /// FLUSH; `Err(errno)` on an error reply.
    pub fn flush(&mut self) -> Result<(), u32> {
        let c = self.send(ear_sidecar::protocol::consts::NBD_CMD_FLUSH, 0, 0, 0, &[]);
        let r = self.recv(c, 0).expect("flush reply");
        if r.error == 0 {
            Ok(())
        } else {
            Err(r.error)
        }
    }

    /// NBD_CMD_DISC and close.
    pub fn disconnect(mut self) {
        self.send(ear_sidecar::protocol::consts::NBD_CMD_DISC, 0, 0, 0, &[]);
    }

    /// True once the server has closed the connection (EOF or reset) within
    /// the read timeout; false if it sent data instead.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.sock.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }
}
