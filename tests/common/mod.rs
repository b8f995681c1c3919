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
//! * [`Client`]: the one blocking NBD client, on the crate's client codec.
//! * [`Rng`]: a small seeded generator for reproducible test data (fixed
//!   seed, or `EAR_TEST_SEED` / the clock, printed), [`pattern`] /
//!   [`pattern_gen`] for self-describing blocks, and [`scan_dir_for`] to look
//!   for byte patterns in every file of a directory.
//!
//! * [`in_process::TestServer`]: `server::run` in-process on a temporary
//!   store, for tests that look inside the server.
//!
//! Every wait here is bounded; nothing depends on sleeping "long enough".
//! Include it with `mod common;` (each test crate uses a subset, hence the
//! `dead_code` allowance).
#![allow(dead_code)]

pub mod client;
pub mod in_process;
pub mod python;

pub use client::Client;

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

fn qemu_io_command(uri: &str, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c
}

/// Runs `qemu-io -f raw URI -c CMD...` and returns its output whatever the
/// exit status (for tests that expect a failure).
pub fn qemu_io_output(uri: &str, cmds: &[&str]) -> Output {
    run(&mut qemu_io_command(uri, cmds))
}

/// Runs `qemu-io -f raw URI -c CMD...` and asserts success. qemu-io exits
/// non-zero when a command fails (including `read -P` pattern mismatches);
/// the output is also checked for failure messages, belt and braces.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = qemu_io_command(uri, cmds);
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
    data_dir: Option<PathBuf>,
    wrapper: Vec<String>,
    metrics_addr: String,
    env: Vec<(String, Option<String>)>,
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
            data_dir: None,
            wrapper: Vec::new(),
            metrics_addr: String::new(),
            env: Vec::new(),
        }
    }

    /// The temporary directory holding data dir, socket and logs.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The data directory (`<tmp>/data` unless [`set_data_dir`](Self::set_data_dir) moved it).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// Uses `dir` as the data directory from the next start on (e.g. on a
    /// small tmpfs).
    pub fn set_data_dir(&mut self, dir: PathBuf) {
        self.data_dir = Some(dir);
    }

    /// Serves metrics and health on `addr` from the next start on (off by default).
    pub fn set_metrics_addr(&mut self, addr: &str) {
        self.metrics_addr = addr.to_string();
    }

    /// The `--metrics-addr` in use (empty: off).
    pub fn metrics_addr(&self) -> &str {
        &self.metrics_addr
    }

    /// Sets (`Some`) or removes (`None`) an environment variable of the
    /// process from the next start on. `EAR_*` variables and `RUST_LOG` of
    /// the test process are never inherited.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.map(str::to_string)));
    }

    /// Runs the binary under `wrapper` from the next start on (e.g.
    /// `["prlimit", "--fsize=N", "--"]`).
    pub fn set_wrapper(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
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

    /// The admin control socket (`<tmp>/s.admin.sock`, the default beside
    /// the data socket).
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("s.admin.sock")
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

    /// stdout and stderr of every run so far, in order.
    pub fn all_logs(&self) -> String {
        (1..=self.runs)
            .map(|n| self.dir.path().join(format!("sidecar-{n}.log")))
            .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned())
            .collect()
    }

    fn command(&self) -> Command {
        let mut c = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(sidecar_bin());
                c
            }
            None => Command::new(sidecar_bin()),
        };
        c.arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--socket")
            .arg(self.socket())
            .arg("--metrics-addr")
            .arg(&self.metrics_addr)
            .args(&self.args)
            // The default level is info; RUST_LOG would override `--log-level`.
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            // The default local KEK goes to <tmp>/config, beside the data.
            .env("XDG_CONFIG_HOME", self.config_home())
            .current_dir(self.dir.path());
        // Isolate from the developer's environment and config files.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EAR_") {
                c.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// Spawns the process (the previous one must be stopped) without waiting;
    /// stdout and stderr go to this run's log.
    pub fn spawn_no_wait(&mut self) {
        assert!(self.child.is_none(), "sidecar is already running");
        self.runs += 1;
        self.log_path = self.dir.path().join(format!("sidecar-{}.log", self.runs));
        let log = File::create(&self.log_path).expect("create sidecar log");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup sidecar log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", sidecar_bin()));
        self.child = Some(child);
    }

    /// Spawns the process (the previous one must be stopped) and waits for
    /// the socket to send the NBD greeting, or returns how it failed.
    pub fn try_start(&mut self) -> Result<(), StartFailure> {
        self.spawn_no_wait();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("just spawned");
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Err(StartFailure {
                        status: Some(status),
                        log: self.log(),
                    });
                }
                Ok(None) => {}
                Err(e) => panic!("waiting for the sidecar: {e}"),
            }
            // A greeting (not just "file exists"): a stale socket from a
            // killed run exists but refuses connections.
            if greeting_ok(&self.socket()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill9();
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

    /// SIGTERM if running, wait (bounded, then SIGKILL); true if it exited 0.
    /// For tests where the process may already have died.
    pub fn try_stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        wait_bounded(&mut child, STOP_TIMEOUT).is_some_and(|st| st.success())
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

    /// Exit status once the child has exited (None while running or stopped).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Resident set size of the process in KiB (from /proc/<pid>/status).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid().expect("sidecar is running");
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Number of open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        let pid = self.pid().expect("sidecar is running");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// A [`Client`] connected to `export` with `NBD_OPT_GO`.
    pub fn client(&self, export: &str) -> Client {
        Client::connect(&self.socket(), export)
            .unwrap_or_else(|e| panic!("good client cannot connect: {e}; log:\n{}", self.log()))
    }

    /// Asserts the process is alive and a fresh client can write, flush and
    /// read back at `offset` (both through [`Client`] and through qemu-io).
    pub fn assert_serves(&mut self, export: &str, offset: u64) {
        assert!(self.is_running(), "sidecar died; log:\n{}", self.log());
        let mut c = self.client(export);
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8) ^ (offset as u8) ^ 0x5a)
            .collect();
        c.write(offset, &data, true).expect("io").expect("write ok");
        c.flush().expect("io").expect("flush ok");
        let back = c.read(offset, 4096).expect("io").expect("read ok");
        assert_eq!(back, data, "good client read back wrong data");
        c.disconnect();
        qemu_io(
            &self.uri(export),
            &[
                &format!("write -P 0xa7 {} 4k", offset + 4096),
                &format!("read -P 0xa7 {} 4k", offset + 4096),
            ],
        );
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

/// A small deterministic generator (SplitMix64) for reproducible test data
/// and test choices.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeds from `EAR_TEST_SEED` or the clock and prints the seed, so a
    /// failing randomized test can be replayed.
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

    /// Uniform enough in `0..n` (n > 0; 0 is treated as 1).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
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

/// Deterministic 4 KiB block content for (block, generation): generation 0 is
/// all zeros (never written); otherwise the first 16 bytes name the block and
/// generation and the rest comes from an [`Rng`] seeded from both.
pub fn pattern(block: u64, gen: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    if gen == 0 {
        return v;
    }
    v[0..8].copy_from_slice(&block.to_le_bytes());
    v[8..16].copy_from_slice(&gen.to_le_bytes());
    Rng::new(block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ gen.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .fill(&mut v[16..]);
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

/// True when the test process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Raises this process's open-file soft limit to at least `n` (best effort).
pub fn raise_nofile(n: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current.unwrap_or(u64::MAX) >= n {
        return;
    }
    l.current = Some(n.min(l.maximum.unwrap_or(u64::MAX)));
    let _ = setrlimit(Resource::Nofile, l);
}

/// True if a connection to `socket` receives the NBD greeting within 2 s.
pub fn greeting_ok(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut g = [0u8; 8];
    s.read_exact(&mut g).is_ok()
        && u64::from_be_bytes(g) == ear_sidecar::protocol::consts::NBD_MAGIC
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

/// `GET /metrics` from the sidecar's metrics listener at `addr`; the body of
/// a 200 answer.
pub fn scrape_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}
