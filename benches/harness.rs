//! Load harness: drives ear-sidecar over its Unix socket with its own
//! pipelined async NBD client and reports what encryption at rest costs.
//!
//! It owns the end-to-end measurement: N connections × queue depth
//! per connection, six workloads, HDR-histogram latency percentiles, and
//! encryption on and off measured in the same run, alternating per round so
//! machine drift hits both sides alike. It either starts two sidecars itself
//! (`--start`, the default: one with encryption on, one off, each in a fresh
//! temporary data directory) or connects to sockets it is given.
//!
//! Run: `cargo bench --bench harness -- [OPTIONS]` (`--help` lists them;
//! doc/bench-harness.md explains them and the output). Without `--bench` on
//! the command line (that is, when `cargo test --all-targets` executes this
//! target) it exits at once: the smoke test in tests/bench_smoke.rs includes
//! this file as a module and calls [`run_cli`] instead.
//!
//! The client speaks fixed newstyle with `NBD_OPT_GO` and simple replies only.
//! Cookies are slot indices `0..qd`; a final small READ with a sentinel cookie
//! tells the reply reader that the writer has stopped.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use ear_sidecar::protocol::consts::{
    NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_NO_ZEROES, NBD_REP_ACK, NBD_REP_INFO,
};
use ear_sidecar::protocol::{
    encode_go_opening, encode_request, parse_greeting, parse_option_reply_header, parse_rep_info,
    parse_simple_reply_header, InfoReply, ProtocolError, RawRequest,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// Cookie of the final READ that marks the end of a connection's stream.
const SENTINEL: u64 = u64::MAX;
/// Largest option reply payload the client accepts during negotiation.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Socket or process I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The server broke the NBD framing.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server refused something or answered unexpectedly.
    #[error("server: {0}")]
    Server(String),
    /// A sidecar could not be started.
    #[error("sidecar: {0}")]
    Sidecar(String),
    /// Bad command-line options.
    #[error("usage: {0}")]
    Usage(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

// ---------------------------------------------------------------- options

/// Command-line options (`cargo bench --bench harness -- --help`).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "harness",
    about = "Measure ear-sidecar throughput, IOPS and latency with encryption on and off"
)]
pub struct Options {
    /// Connect to running sidecars instead of starting them: ON_SOCKET[,OFF_SOCKET].
    /// With two sockets they are measured alternately and compared.
    #[arg(long, value_delimiter = ',')]
    pub socket: Vec<PathBuf>,
    /// Export name to attach to with --socket (empty = the default export).
    #[arg(long, default_value = "")]
    pub export_name: String,
    /// Start two sidecars (encryption on and off) in fresh temporary directories
    /// (the default when no --socket is given).
    #[arg(long)]
    pub start: bool,
    /// ear-sidecar binary used with --start.
    #[arg(long, default_value = "target/release/ear-sidecar")]
    pub binary: PathBuf,
    /// Extra argument passed to every started sidecar (repeatable), e.g. --sidecar-arg=--key-cache-size=64.
    #[arg(long, allow_hyphen_values = true)]
    pub sidecar_arg: Vec<String>,
    /// Parent directory of the temporary data directories (default: the system temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Size of each started export, sparse (K/M/G/T suffixes, 1024-based).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub export_size: u64,
    /// Number of exports per started sidecar; connection i uses export i mod N.
    #[arg(long, default_value_t = 1)]
    pub exports: usize,
    /// Byte range of each export the workloads touch (default: the export, at most 1 GiB).
    /// Read workloads write it once first (preconditioning).
    #[arg(long, value_parser = parse_size)]
    pub span: Option<u64>,
    /// Client connections per run.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests kept in flight per connection.
    #[arg(long, default_value_t = 8)]
    pub qd: usize,
    /// Length of each timed run (e.g. 5s, 500ms, 1m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Rounds per workload; each round runs encryption on, then off.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Comma-separated workloads (default: all): seq-read-1m, seq-write-1m,
    /// rand-read-4k, rand-write-4k, mixed-4k, unaligned-512.
    #[arg(long, value_delimiter = ',', value_parser = parse_workload)]
    pub workloads: Vec<Workload>,
    /// Print machine-readable JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Run the scaling sweeps (connections, export size, number of exports) instead.
    #[arg(long)]
    pub scaling: bool,
    /// Client runtime worker threads (1 = a single-threaded runtime, which leaves
    /// the most CPU to the sidecar on small machines).
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Passed by `cargo bench`; its absence means "executed by cargo test": exit at once.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// Parses a size with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => KIB,
                'M' => MIB,
                'G' => GIB,
                'T' => 1024 * GIB,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (s.get(..i).unwrap_or_default(), m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

/// Parses `500ms`, `5s`, `2m` or a bare number of seconds (may be fractional).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    Duration::try_from_secs_f64(v * scale).map_err(|_| format!("bad duration {s:?}"))
}

// ---------------------------------------------------------------- workloads

/// A request pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Workload {
    /// Sequential 1 MiB reads.
    #[serde(rename = "seq-read-1m")]
    SeqRead1M,
    /// Sequential 1 MiB writes.
    #[serde(rename = "seq-write-1m")]
    SeqWrite1M,
    /// Random 4 KiB-aligned 4 KiB reads.
    #[serde(rename = "rand-read-4k")]
    RandRead4K,
    /// Random 4 KiB-aligned 4 KiB writes.
    #[serde(rename = "rand-write-4k")]
    RandWrite4K,
    /// 70 % random 4 KiB reads, 30 % random 4 KiB writes.
    #[serde(rename = "mixed-4k")]
    Mixed4K,
    /// 512 B writes at random 512-aligned offsets that are not 4 KiB-aligned.
    #[serde(rename = "unaligned-512")]
    Unaligned512,
    /// Preconditioning: each connection writes its share of the span once, 1 MiB at a time.
    #[serde(rename = "fill")]
    Fill,
}

impl Workload {
    /// The six timed workloads, in report order.
    pub const ALL: [Workload; 6] = [
        Workload::SeqRead1M,
        Workload::SeqWrite1M,
        Workload::RandRead4K,
        Workload::RandWrite4K,
        Workload::Mixed4K,
        Workload::Unaligned512,
    ];

    /// Name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::SeqRead1M => "seq-read-1m",
            Workload::SeqWrite1M => "seq-write-1m",
            Workload::RandRead4K => "rand-read-4k",
            Workload::RandWrite4K => "rand-write-4k",
            Workload::Mixed4K => "mixed-4k",
            Workload::Unaligned512 => "unaligned-512",
            Workload::Fill => "fill",
        }
    }

    /// Whether it reads data that should exist (needs preconditioning).
    pub fn reads(self) -> bool {
        matches!(
            self,
            Workload::SeqRead1M | Workload::RandRead4K | Workload::Mixed4K
        )
    }

    fn request_len(self) -> u32 {
        match self {
            Workload::SeqRead1M | Workload::SeqWrite1M | Workload::Fill => 1 << 20,
            Workload::RandRead4K | Workload::RandWrite4K | Workload::Mixed4K => 4096,
            Workload::Unaligned512 => 512,
        }
    }
}

/// Parses a workload name.
pub fn parse_workload(s: &str) -> Result<Workload, String> {
    Workload::ALL
        .into_iter()
        .find(|w| w.name() == s)
        .ok_or_else(|| {
            let names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
            format!("unknown workload {s:?}; known: {}", names.join(", "))
        })
}

/// xorshift64*: a tiny deterministic generator for offsets (not for keys).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Offsets and kinds of one connection's requests.
struct OpGen {
    workload: Workload,
    rng: Rng,
    span: u64,
    cursor: u64,
    end: u64,
}

impl OpGen {
    fn new(workload: Workload, span: u64, conn: usize, conns: usize, seed: u64) -> Self {
        let conns = conns.max(1) as u64;
        let share = (span / conns) / MIB * MIB;
        let start = share.saturating_mul(conn as u64 % conns);
        OpGen {
            workload,
            rng: Rng::new(seed ^ (conn as u64).wrapping_mul(0x1000_0001)),
            span,
            cursor: start,
            end: start.saturating_add(share),
        }
    }

    /// Requests this generator issues at most (only `Fill` is bounded).
    fn limit(&self) -> Option<u64> {
        (self.workload == Workload::Fill).then(|| self.end.saturating_sub(self.cursor) / MIB)
    }

    /// (is_read, offset, length) of the next request.
    fn next(&mut self) -> (bool, u64, u32) {
        let len = self.workload.request_len();
        let len64 = u64::from(len);
        match self.workload {
            Workload::SeqRead1M | Workload::SeqWrite1M | Workload::Fill => {
                if self.cursor.saturating_add(len64) > self.span {
                    self.cursor = 0;
                }
                let off = self.cursor;
                self.cursor = self.cursor.saturating_add(len64);
                (self.workload == Workload::SeqRead1M, off, len)
            }
            Workload::RandRead4K | Workload::RandWrite4K | Workload::Mixed4K => {
                let off = self.rng.below(self.span / 4096) * 4096;
                let read = match self.workload {
                    Workload::RandRead4K => true,
                    Workload::RandWrite4K => false,
                    _ => self.rng.below(10) < 7,
                };
                (read, off, len)
            }
            Workload::Unaligned512 => {
                // The span is a whole number of MiB, so every 4 KiB block has
                // sectors 1..=7 to choose from: never 4 KiB-aligned.
                let k = self.rng.below(self.span / 4096) * 8 + 1 + self.rng.below(7);
                (false, k * 512, len)
            }
        }
    }
}

// ---------------------------------------------------------------- client

/// Fixed newstyle negotiation with `NBD_OPT_GO`; returns the export size.
pub async fn connect(socket: &Path, export: &str) -> Result<(UnixStream, u64), HarnessError> {
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(io_err(format!("connect {}", socket.display())))?;
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)
        .await
        .map_err(io_err("read greeting"))?;
    let hflags = parse_greeting(&greeting)?;
    let mut buf = BytesMut::new();
    encode_go_opening(&mut buf, export, hflags & NBD_FLAG_NO_ZEROES != 0);
    s.write_all(&buf).await.map_err(io_err("send NBD_OPT_GO"))?;
    let mut size = None;
    loop {
        let mut hdr = [0u8; 20];
        s.read_exact(&mut hdr)
            .await
            .map_err(io_err("read option reply"))?;
        let h = parse_option_reply_header(&hdr)?;
        if h.length > MAX_OPTION_REPLY {
            return Err(HarnessError::Server(format!(
                "option reply of {} bytes",
                h.length
            )));
        }
        let mut payload = vec![0u8; h.length as usize];
        s.read_exact(&mut payload)
            .await
            .map_err(io_err("read option reply data"))?;
        if h.is_error() {
            return Err(HarnessError::Server(format!(
                "NBD_OPT_GO for export {export:?} refused ({:#x}): {}",
                h.reply_type,
                String::from_utf8_lossy(&payload)
            )));
        }
        match h.reply_type {
            NBD_REP_INFO => {
                if let InfoReply::Export { size: sz, .. } = parse_rep_info(&payload)? {
                    size = Some(sz);
                }
            }
            NBD_REP_ACK => break,
            _ => {}
        }
    }
    let size = size.ok_or_else(|| HarnessError::Server("no NBD_INFO_EXPORT".into()))?;
    Ok((s, size))
}

/// What one connection measured.
struct ConnResult {
    hist: Histogram<u64>,
    ops: u64,
    bytes: u64,
    errors: u64,
    last_reply: Instant,
}

/// One in-flight request slot (cookie = slot index).
#[derive(Default)]
struct Slot {
    start_ns: AtomicU64,
    len: AtomicU32,
    read: AtomicBool,
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits; bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn request_header(command: u16, cookie: u64, offset: u64, length: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(28);
    encode_request(
        &mut b,
        &RawRequest {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        },
    );
    b
}

/// Drives one connection until `deadline` (or the generator's limit) with
/// `qd` requests in flight, then drains and disconnects.
async fn drive(
    stream: UnixStream,
    mut gen: OpGen,
    qd: usize,
    deadline: Instant,
    payload: Bytes,
) -> Result<ConnResult, HarnessError> {
    let qd = qd.max(1);
    let limit = gen.limit();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let slots: Vec<Slot> = (0..qd).map(|_| Slot::default()).collect();
    let sent_total = AtomicU64::new(u64::MAX);
    let origin = Instant::now();
    let (free_tx, mut free_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    for i in 0..qd {
        let _ = free_tx.send(i);
    }

    let writer = async {
        let mut sent = 0u64;
        while Instant::now() < deadline && limit.is_none_or(|l| sent < l) {
            let Some(slot) = free_rx.recv().await else {
                break;
            };
            if Instant::now() >= deadline {
                break;
            }
            let (read, offset, len) = gen.next();
            let Some(s) = slots.get(slot) else { break };
            s.len.store(len, Ordering::Relaxed);
            s.read.store(read, Ordering::Relaxed);
            s.start_ns
                .store(origin.elapsed().as_nanos() as u64, Ordering::Release);
            let cmd = if read { NBD_CMD_READ } else { NBD_CMD_WRITE };
            let hdr = request_header(cmd, slot as u64, offset, len).freeze();
            if read {
                wr.write_all(&hdr).await.map_err(io_err("send request"))?;
            } else {
                let body = payload.slice(..(len as usize).min(payload.len()));
                let mut chained = hdr.chain(body);
                wr.write_all_buf(&mut chained)
                    .await
                    .map_err(io_err("send write"))?;
            }
            sent += 1;
        }
        sent_total.store(sent, Ordering::SeqCst);
        let hdr = request_header(NBD_CMD_READ, SENTINEL, 0, 512);
        wr.write_all(&hdr).await.map_err(io_err("send sentinel"))?;
        Ok::<_, HarnessError>(wr)
    };

    let reader = async {
        let mut res = ConnResult {
            hist: new_hist(),
            ops: 0,
            bytes: 0,
            errors: 0,
            last_reply: Instant::now(),
        };
        let mut scratch = vec![0u8; 1 << 20];
        let mut sentinel_seen = false;
        while !(sentinel_seen && res.ops + res.errors == sent_total.load(Ordering::SeqCst)) {
            let mut hdr = [0u8; 16];
            rd.read_exact(&mut hdr)
                .await
                .map_err(io_err("read reply"))?;
            let h = parse_simple_reply_header(&hdr)?;
            let now_ns = origin.elapsed().as_nanos() as u64;
            if h.cookie == SENTINEL {
                if h.error == 0 {
                    let buf = scratch.get_mut(..512).unwrap_or_default();
                    rd.read_exact(buf).await.map_err(io_err("read data"))?;
                }
                sentinel_seen = true;
                continue;
            }
            let slot = usize::try_from(h.cookie)
                .ok()
                .and_then(|i| slots.get(i))
                .ok_or_else(|| HarnessError::Server(format!("unknown cookie {}", h.cookie)))?;
            let len = slot.len.load(Ordering::Relaxed);
            let start = slot.start_ns.load(Ordering::Acquire);
            if h.error != 0 {
                res.errors += 1;
            } else {
                if slot.read.load(Ordering::Relaxed) {
                    let buf = scratch
                        .get_mut(..len as usize)
                        .ok_or_else(|| HarnessError::Server("read longer than 1 MiB".into()))?;
                    rd.read_exact(buf).await.map_err(io_err("read data"))?;
                }
                res.ops += 1;
                res.bytes += u64::from(len);
                let _ = res.hist.record(now_ns.saturating_sub(start).max(1));
            }
            res.last_reply = Instant::now();
            let _ = free_tx.send(h.cookie as usize);
        }
        Ok::<_, HarnessError>(res)
    };

    let (mut wr, res) = tokio::try_join!(writer, reader)?;
    let disc = request_header(NBD_CMD_DISC, 0, 0, 0);
    let _ = wr.write_all(&disc).await;
    let _ = wr.shutdown().await;
    Ok(res)
}

// ---------------------------------------------------------------- results

/// Measurements of one (workload, mode), summed over rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Successful requests.
    pub ops: u64,
    /// Bytes moved by them.
    pub bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Measured wall time (all rounds).
    pub seconds: f64,
    /// Throughput in MB/s (10^6 bytes per second).
    pub mb_per_s: f64,
    /// Requests per second.
    pub iops: f64,
    /// Latency percentiles and mean in microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Mean latency.
    pub mean_us: f64,
    /// Largest latency.
    pub max_us: f64,
    /// Sidecar resident set size after the last run (KiB), when known.
    pub rss_kib: Option<u64>,
    /// Sidecar peak resident set size (VmHWM, KiB), when known.
    pub hwm_kib: Option<u64>,
}

/// Accumulates runs of one (workload, mode).
struct Acc {
    hist: Histogram<u64>,
    ops: u64,
    bytes: u64,
    errors: u64,
    seconds: f64,
    rss: Option<(u64, u64)>,
}

impl Acc {
    fn new() -> Self {
        Acc {
            hist: new_hist(),
            ops: 0,
            bytes: 0,
            errors: 0,
            seconds: 0.0,
            rss: None,
        }
    }

    fn add(&mut self, r: &RunResult) {
        let _ = self.hist.add(&r.hist);
        self.ops += r.ops;
        self.bytes += r.bytes;
        self.errors += r.errors;
        self.seconds += r.seconds;
        if r.rss.is_some() {
            self.rss = r.rss;
        }
    }

    fn stats(&self) -> Stats {
        let secs = self.seconds.max(1e-9);
        let q = |p: f64| self.hist.value_at_quantile(p) as f64 / 1000.0;
        Stats {
            ops: self.ops,
            bytes: self.bytes,
            errors: self.errors,
            seconds: self.seconds,
            mb_per_s: self.bytes as f64 / secs / 1e6,
            iops: self.ops as f64 / secs,
            p50_us: q(0.5),
            p99_us: q(0.99),
            p999_us: q(0.999),
            mean_us: self.hist.mean() / 1000.0,
            max_us: self.hist.max() as f64 / 1000.0,
            rss_kib: self.rss.map(|r| r.0),
            hwm_kib: self.rss.map(|r| r.1),
        }
    }
}

/// One timed run.
struct RunResult {
    hist: Histogram<u64>,
    ops: u64,
    bytes: u64,
    errors: u64,
    seconds: f64,
    rss: Option<(u64, u64)>,
}

/// Encryption on vs off for one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    /// Throughput lost with encryption on, in percent of off (positive = slower).
    pub throughput_pct: f64,
    /// p50 latency added with encryption on, in percent of off.
    pub p50_pct: f64,
    /// p99 latency added with encryption on, in percent of off.
    pub p99_pct: f64,
    /// p99.9 latency added with encryption on, in percent of off.
    pub p999_pct: f64,
}

/// Results of one workload.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// Workload name.
    pub workload: Workload,
    /// Bytes per request.
    pub request_bytes: u32,
    /// Encryption on (or the only target).
    pub on: Stats,
    /// Encryption off, when a second target exists.
    pub off: Option<Stats>,
    /// Cost of encryption, when both were measured.
    pub overhead: Option<Overhead>,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Harness settings.
    pub config: ReportConfig,
    /// One entry per workload.
    pub results: Vec<WorkloadReport>,
}

/// Settings recorded with a report.
#[derive(Debug, Clone, Serialize)]
pub struct ReportConfig {
    /// Connections per run.
    pub connections: usize,
    /// Queue depth per connection.
    pub qd: usize,
    /// Seconds per run.
    pub duration_s: f64,
    /// Rounds (each on then off).
    pub rounds: usize,
    /// Export size in bytes.
    pub export_size: u64,
    /// Bytes of each export touched.
    pub span: u64,
    /// Exports per sidecar.
    pub exports: usize,
    /// Whether sidecars were started by the harness.
    pub started: bool,
    /// Logical CPUs of the machine.
    pub cpus: usize,
    /// Unix time at start.
    pub unix_time: u64,
}

fn pct(on: f64, off: f64) -> f64 {
    if off.abs() < f64::EPSILON {
        0.0
    } else {
        (on - off) / off * 100.0
    }
}

fn overhead(on: &Stats, off: &Stats) -> Overhead {
    Overhead {
        throughput_pct: -pct(on.mb_per_s, off.mb_per_s),
        p50_pct: pct(on.p50_us, off.p50_us),
        p99_pct: pct(on.p99_us, off.p99_us),
        p999_pct: pct(on.p999_us, off.p999_us),
    }
}

// ---------------------------------------------------------------- targets

/// A sidecar to drive: socket, exports, and the process (for RSS).
pub struct Target {
    /// "on", "off" or "target".
    pub label: String,
    /// Unix socket.
    pub socket: PathBuf,
    /// Export names; connection i uses `exports[i % len]`.
    pub exports: Vec<String>,
    /// Process id, for /proc/PID/status.
    pub pid: Option<u32>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let term = self
                .pid
                .and_then(|p| i32::try_from(p).ok())
                .and_then(rustix::process::Pid::from_raw)
                .map(|p| rustix::process::kill_process(p, rustix::process::Signal::TERM));
            let until = Instant::now() + Duration::from_secs(10);
            if matches!(term, Some(Ok(()))) {
                while Instant::now() < until {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads (VmRSS, VmHWM) in KiB from /proc/PID/status.
pub fn read_rss(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Disk space actually allocated under `dir` (sparse files count what they use), in bytes.
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total = total.saturating_add(m.blocks().saturating_mul(512));
            }
        }
    }
    total
}

/// Export names of a started sidecar with `n` exports.
fn export_names(n: usize) -> Vec<String> {
    if n <= 1 {
        vec!["bench".to_owned()]
    } else {
        (0..n).map(|i| format!("e{i}")).collect()
    }
}

/// Starts a sidecar in a fresh temporary directory and waits until it accepts.
pub async fn start_sidecar(
    opts: &Options,
    encryption: bool,
    exports: usize,
    export_size: u64,
    max_connections: usize,
) -> Result<Target, HarnessError> {
    let label = if encryption { "on" } else { "off" };
    let prefix = format!("ear-bench-{label}-");
    let mut tb = tempfile::Builder::new();
    tb.prefix(&prefix);
    let dir = match &opts.work_dir {
        Some(p) => tb.tempdir_in(p),
        None => tb.tempdir(),
    }
    .map_err(io_err("create temp dir"))?;
    let socket = dir.path().join("sock");
    let log_path = dir.path().join("sidecar.log");
    let log = std::fs::File::create(&log_path).map_err(io_err("create sidecar log"))?;
    let log2 = log.try_clone().map_err(io_err("clone log handle"))?;
    let names = export_names(exports);
    let mut cmd = Command::new(&opts.binary);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(&socket)
        .arg("--encryption")
        .arg(label)
        .arg("--metrics-addr")
        .arg("")
        .arg("--log-level")
        .arg("warn")
        .arg("--max-connections")
        .arg(max_connections.max(16).to_string());
    for n in &names {
        cmd.arg("--export").arg(format!("{n}={export_size}"));
    }
    // The local provider's KEK goes beside the throwaway data directory.
    cmd.args(&opts.sidecar_arg)
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let child = cmd
        .spawn()
        .map_err(|e| HarnessError::Sidecar(format!("cannot run {}: {e}", opts.binary.display())))?;
    let mut target = Target {
        label: label.to_owned(),
        socket: socket.clone(),
        exports: names,
        pid: Some(child.id()),
        child: Some(child),
        _dir: Some(dir),
    };
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(child) = target.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(HarnessError::Sidecar(format!(
                    "{} exited with {status} during start-up:\n{log}",
                    opts.binary.display()
                )));
            }
        }
        if UnixStream::connect(&socket).await.is_ok() {
            return Ok(target);
        }
        if Instant::now() > until {
            return Err(HarnessError::Sidecar("not accepting after 300 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wraps an already running sidecar; learns its pid from SO_PEERCRED.
async fn attach(label: &str, socket: &Path, export: &str) -> Result<Target, HarnessError> {
    let (s, _) = connect(socket, export).await?;
    let pid = s
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let disc = request_header(NBD_CMD_DISC, 0, 0, 0);
    let mut s = s;
    let _ = s.write_all(&disc).await;
    Ok(Target {
        label: label.to_owned(),
        socket: socket.to_path_buf(),
        exports: vec![export.to_owned()],
        pid,
        child: None,
        _dir: None,
    })
}

/// Runs `workload` against `target` with `conns` × `qd` for `duration`.
async fn run_once(
    target: &Target,
    workload: Workload,
    conns: usize,
    qd: usize,
    duration: Duration,
    span: u64,
    seed: u64,
) -> Result<RunResult, HarnessError> {
    let conns = conns.max(1);
    let mut streams = Vec::with_capacity(conns);
    for i in 0..conns {
        let export = target
            .exports
            .get(i % target.exports.len().max(1))
            .map(String::as_str)
            .unwrap_or("");
        let (s, size) = connect(&target.socket, export).await?;
        if size < span {
            return Err(HarnessError::Usage(format!(
                "span {span} exceeds export {export:?} of {size} bytes"
            )));
        }
        streams.push(s);
    }
    let mut payload = vec![0u8; 1 << 20];
    let mut rng = Rng::new(seed ^ 0xD1B5_4A32_D192_ED03);
    for chunk in payload.chunks_mut(8) {
        let r = rng.next().to_le_bytes();
        chunk.copy_from_slice(r.get(..chunk.len()).unwrap_or_default());
    }
    let payload = Bytes::from(payload);
    let start = Instant::now();
    let deadline = if workload == Workload::Fill {
        start + Duration::from_secs(24 * 3600)
    } else {
        start + duration
    };
    // With a single target export every connection gets its own slice for the
    // sequential cursors; with many exports, each connection covers its export.
    let per_export = target.exports.len() > 1;
    let mut tasks = Vec::with_capacity(conns);
    for (i, s) in streams.into_iter().enumerate() {
        let (idx, n) = if per_export { (0, 1) } else { (i, conns) };
        let gen = OpGen::new(workload, span, idx, n, seed.wrapping_add(i as u64));
        tasks.push(tokio::spawn(drive(s, gen, qd, deadline, payload.clone())));
    }
    let mut run = RunResult {
        hist: new_hist(),
        ops: 0,
        bytes: 0,
        errors: 0,
        seconds: 0.0,
        rss: None,
    };
    let mut last = start;
    for t in tasks {
        let r = t
            .await
            .map_err(|e| HarnessError::Server(format!("connection task: {e}")))??;
        let _ = run.hist.add(&r.hist);
        run.ops += r.ops;
        run.bytes += r.bytes;
        run.errors += r.errors;
        last = last.max(r.last_reply);
    }
    run.seconds = last.duration_since(start).as_secs_f64();
    run.rss = target.pid.and_then(read_rss);
    Ok(run)
}

/// Writes each export's span once (1 MiB sequential writes, 2 connections per export).
async fn precondition(target: &Target, span: u64, quiet: bool) -> Result<(), HarnessError> {
    let t0 = Instant::now();
    let conns = if target.exports.len() > 1 {
        target.exports.len()
    } else {
        2
    };
    let r = run_once(target, Workload::Fill, conns, 8, Duration::ZERO, span, 7).await?;
    if !quiet {
        eprintln!(
            "  preconditioned {} ({} MiB per export) in {:.1}s",
            target.label,
            span / MIB,
            t0.elapsed().as_secs_f64()
        );
    }
    if r.errors > 0 {
        return Err(HarnessError::Server(format!(
            "{} write errors while preconditioning",
            r.errors
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------- main flows

fn progress(opts: &Options, line: std::fmt::Arguments<'_>) {
    if !opts.quiet {
        let mut e = std::io::stderr().lock();
        let _ = writeln!(e, "{line}");
    }
}

fn effective_span(opts: &Options, size: u64) -> Result<u64, HarnessError> {
    let span = opts.span.unwrap_or(size.min(GIB)).min(size) / MIB * MIB;
    if span < MIB {
        return Err(HarnessError::Usage(format!(
            "span of {span} bytes: exports must be at least 1 MiB"
        )));
    }
    Ok(span)
}

async fn open_targets(opts: &Options) -> Result<(Vec<Target>, u64), HarnessError> {
    if opts.socket.is_empty() || opts.start {
        let max_conn = opts.connections.max(opts.exports) + 8;
        let on = start_sidecar(opts, true, opts.exports, opts.export_size, max_conn).await?;
        let off = start_sidecar(opts, false, opts.exports, opts.export_size, max_conn).await?;
        Ok((vec![on, off], opts.export_size))
    } else {
        let mut targets = Vec::new();
        let mut size = u64::MAX;
        for (i, s) in opts.socket.iter().enumerate().take(2) {
            let label = match (i, opts.socket.len()) {
                (_, 1) => "target",
                (0, _) => "on",
                _ => "off",
            };
            let (_, sz) = connect(s, &opts.export_name).await?;
            size = size.min(sz);
            targets.push(attach(label, s, &opts.export_name).await?);
        }
        Ok((targets, size))
    }
}

/// The standard comparison: every workload, encryption on and off alternating.
pub async fn run_compare(opts: &Options) -> Result<Report, HarnessError> {
    let workloads = if opts.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        opts.workloads.clone()
    };
    let (targets, size) = open_targets(opts).await?;
    let span = effective_span(opts, size)?;
    if workloads.iter().any(|w| w.reads()) {
        for t in &targets {
            precondition(t, span, opts.quiet).await?;
        }
    }
    let total_runs = workloads.len() * opts.rounds.max(1) * targets.len();
    let t0 = Instant::now();
    let mut done = 0usize;
    let mut results = Vec::new();
    for (wi, &w) in workloads.iter().enumerate() {
        let mut accs: Vec<Acc> = targets.iter().map(|_| Acc::new()).collect();
        for round in 0..opts.rounds.max(1) {
            for (ti, t) in targets.iter().enumerate() {
                let seed = (wi as u64) << 32 | (round as u64) << 8;
                let r =
                    run_once(t, w, opts.connections, opts.qd, opts.duration, span, seed).await?;
                done += 1;
                progress(
                    opts,
                    format_args!(
                        "[{done:>3}/{total_runs}] {:<13} {:<6} round {}/{}: {:>9.0} IOPS {:>8.1} MB/s  \
                         (elapsed {:.0}s, {:.0}%)",
                        w.name(),
                        t.label,
                        round + 1,
                        opts.rounds.max(1),
                        r.ops as f64 / r.seconds.max(1e-9),
                        r.bytes as f64 / r.seconds.max(1e-9) / 1e6,
                        t0.elapsed().as_secs_f64(),
                        done as f64 * 100.0 / total_runs as f64
                    ),
                );
                if let Some(a) = accs.get_mut(ti) {
                    a.add(&r);
                }
            }
        }
        let mut stats = accs.iter().map(Acc::stats);
        let on = stats
            .next()
            .ok_or_else(|| HarnessError::Usage("no target".into()))?;
        let off = stats.next();
        let overhead = off.as_ref().map(|off| overhead(&on, off));
        results.push(WorkloadReport {
            workload: w,
            request_bytes: w.request_len(),
            on,
            off,
            overhead,
        });
    }
    Ok(Report {
        config: ReportConfig {
            connections: opts.connections,
            qd: opts.qd,
            duration_s: opts.duration.as_secs_f64(),
            rounds: opts.rounds.max(1),
            export_size: size,
            span,
            exports: targets.first().map_or(1, |t| t.exports.len()),
            started: targets.iter().any(|t| t.child.is_some()),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        },
        results,
    })
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
}

/// Renders a report as a text table.
pub fn render_table(r: &Report) -> String {
    let c = &r.config;
    let mut out = format!(
        "ear-sidecar harness: {} conn x QD {}, {:.1}s x {} rounds per mode, span {} MiB of {} MiB, \
         {} CPUs\n\n",
        c.connections,
        c.qd,
        c.duration_s,
        c.rounds,
        c.span / MIB,
        c.export_size / MIB,
        c.cpus
    );
    out.push_str(&format!(
        "{:<14} {:<6} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8}\n",
        "workload", "mode", "MB/s", "IOPS", "p50 us", "p99 us", "p99.9 us", "RSS MiB", "errors"
    ));
    for w in &r.results {
        let rows = std::iter::once(("on", &w.on)).chain(w.off.as_ref().map(|s| ("off", s)));
        for (label, s) in rows {
            let label = if w.off.is_none() { "-" } else { label };
            out.push_str(&format!(
                "{:<14} {:<6} {:>9.1} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>8}\n",
                w.workload.name(),
                label,
                s.mb_per_s,
                s.iops,
                s.p50_us,
                s.p99_us,
                s.p999_us,
                mib(s.rss_kib),
                s.errors
            ));
        }
        if let Some(o) = &w.overhead {
            out.push_str(&format!(
                "{:<14} {:<6} on/off throughput {:.3}x ({:+.1}%)  latency p50 {:+.1}%  p99 {:+.1}%  p99.9 {:+.1}%\n",
                "",
                "cost",
                1.0 - o.throughput_pct / 100.0,
                -o.throughput_pct, o.p50_pct, o.p99_pct, o.p999_pct
            ));
        }
    }
    out
}

// ---------------------------------------------------------------- scaling

/// One point of a scaling sweep.
#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    /// Sweep name: "connections", "export-size" or "exports".
    pub sweep: &'static str,
    /// The swept value (connections, bytes, or exports).
    pub value: u64,
    /// Connections used.
    pub connections: usize,
    /// Queue depth used.
    pub qd: usize,
    /// Workload measured.
    pub workload: Workload,
    /// Measurements (encryption on).
    pub stats: Stats,
    /// Sidecar start-up time in seconds (sweeps that start a sidecar per point).
    pub startup_s: Option<f64>,
    /// Disk space allocated by the data directory after the point (bytes).
    pub allocated_bytes: Option<u64>,
}

async fn scale_point(
    opts: &Options,
    target: &Target,
    sweep: &'static str,
    value: u64,
    (w, conns, qd, span): (Workload, usize, usize, u64),
) -> Result<ScalePoint, HarnessError> {
    let r = run_once(target, w, conns, qd, opts.duration, span, value).await?;
    let mut acc = Acc::new();
    acc.add(&r);
    let stats = acc.stats();
    progress(
        opts,
        format_args!(
            "  {sweep:<12} {value:>14} {:<13} {:>9.0} IOPS  p99 {:>8.1} us  RSS {} MiB",
            w.name(),
            stats.iops,
            stats.p99_us,
            mib(stats.rss_kib)
        ),
    );
    Ok(ScalePoint {
        sweep,
        value,
        connections: conns,
        qd,
        workload: w,
        stats,
        startup_s: None,
        allocated_bytes: None,
    })
}

/// The scaling sweeps (encryption on): connections 1/4/16/64, export size
/// 1 GiB..1 TiB, exports 1..1000.
pub async fn run_scaling(opts: &Options) -> Result<Vec<ScalePoint>, HarnessError> {
    let mut points = Vec::new();
    // Connections: one sidecar, 1 GiB export (span preconditioned once).
    progress(opts, format_args!("sweep: connections"));
    let t = start_sidecar(opts, true, 1, opts.export_size, 80).await?;
    let span = effective_span(opts, opts.export_size)?;
    precondition(&t, span, opts.quiet).await?;
    for conns in [1usize, 4, 16, 64] {
        for w in [
            Workload::RandRead4K,
            Workload::RandWrite4K,
            Workload::SeqRead1M,
        ] {
            points.push(
                scale_point(
                    opts,
                    &t,
                    "connections",
                    conns as u64,
                    (w, conns, opts.qd, span),
                )
                .await?,
            );
        }
    }
    drop(t);
    // Export size: a sidecar per size; random 4 KiB writes and reads over the whole export.
    progress(opts, format_args!("sweep: export size"));
    for size in [GIB, 16 * GIB, 256 * GIB, 1024 * GIB] {
        let t0 = Instant::now();
        let t = start_sidecar(opts, true, 1, size, 16).await?;
        let startup = t0.elapsed().as_secs_f64();
        for w in [Workload::RandWrite4K, Workload::RandRead4K] {
            let mut p = scale_point(
                opts,
                &t,
                "export-size",
                size,
                (w, opts.connections, opts.qd, size),
            )
            .await?;
            p.startup_s = Some(startup);
            p.allocated_bytes = t._dir.as_ref().map(|d| allocated_bytes(d.path()));
            points.push(p);
        }
    }
    // Number of exports: one connection per export, QD 1, random 4 KiB writes.
    progress(opts, format_args!("sweep: exports"));
    for n in [1usize, 10, 100, 1000] {
        let t0 = Instant::now();
        let t = start_sidecar(opts, true, n, 64 * MIB, n + 8).await?;
        let startup = t0.elapsed().as_secs_f64();
        let mut p = scale_point(
            opts,
            &t,
            "exports",
            n as u64,
            (Workload::RandWrite4K, n, 1, 64 * MIB),
        )
        .await?;
        p.startup_s = Some(startup);
        p.allocated_bytes = t._dir.as_ref().map(|d| allocated_bytes(d.path()));
        points.push(p);
    }
    Ok(points)
}

/// Renders the scaling sweeps as tables.
pub fn render_scaling(points: &[ScalePoint]) -> String {
    let mut out = String::new();
    for sweep in ["connections", "export-size", "exports"] {
        out.push_str(&format!(
            "\n{:<12} {:>14} {:<13} {:>5} {:>4} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>10}\n",
            sweep,
            "value",
            "workload",
            "conns",
            "qd",
            "MB/s",
            "IOPS",
            "p50 us",
            "p99 us",
            "RSS MiB",
            "HWM MiB",
            "start s",
            "disk MiB"
        ));
        for p in points.iter().filter(|p| p.sweep == sweep) {
            let value = if sweep == "export-size" {
                format!("{} GiB", p.value / GIB)
            } else {
                p.value.to_string()
            };
            out.push_str(&format!(
                "{:<12} {:>14} {:<13} {:>5} {:>4} {:>9.1} {:>9.0} {:>9.1} {:>9.1} {:>8} {:>8} {:>9} {:>10}\n",
                "",
                value,
                p.workload.name(),
                p.connections,
                p.qd,
                p.stats.mb_per_s,
                p.stats.iops,
                p.stats.p50_us,
                p.stats.p99_us,
                mib(p.stats.rss_kib),
                mib(p.stats.hwm_kib),
                p.startup_s.map_or_else(|| "-".into(), |s| format!("{s:.2}")),
                p.allocated_bytes
                    .map_or_else(|| "-".into(), |b| format!("{:.1}", b as f64 / MIB as f64)),
            ));
        }
    }
    out
}

/// Parses `args` (program name first), runs, and returns what would go to stdout.
pub fn run_cli<I, T>(args: I) -> Result<String, HarnessError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let opts = match Options::try_parse_from(args) {
        Ok(o) => o,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Ok(e.to_string()),
                _ => Err(HarnessError::Usage(e.to_string())),
            };
        }
    };
    run_with(&opts)
}

/// Runs with parsed options; returns the stdout text (table or JSON).
pub fn run_with(opts: &Options) -> Result<String, HarnessError> {
    if opts.connections == 0 || opts.qd == 0 || opts.exports == 0 {
        return Err(HarnessError::Usage(
            "--connections, --qd and --exports must be at least 1".into(),
        ));
    }
    let rt = if opts.client_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.client_threads)
            .enable_all()
            .build()
    }
    .map_err(io_err("tokio runtime"))?;
    rt.block_on(async {
        if opts.scaling {
            let points = run_scaling(opts).await?;
            if opts.json {
                serde_json::to_string_pretty(&points)
                    .map_err(|e| HarnessError::Usage(e.to_string()))
            } else {
                Ok(render_scaling(&points))
            }
        } else {
            let report = run_compare(opts).await?;
            if opts.json {
                serde_json::to_string_pretty(&report)
                    .map_err(|e| HarnessError::Usage(e.to_string()))
            } else {
                Ok(render_table(&report))
            }
        }
    })
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let help = args.iter().any(|a| a == "--help" || a == "-h");
    if !help && !args.iter().any(|a| a == "--bench") {
        eprintln!(
            "harness: not run under `cargo bench` (no --bench argument); nothing to do. \
             Use `cargo bench --bench harness -- --help`."
        );
        return std::process::ExitCode::SUCCESS;
    }
    match run_cli(args) {
        Ok(out) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("harness: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
