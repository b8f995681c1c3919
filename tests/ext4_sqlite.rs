//! End to end through the kernel's ext4: an export attached with `nbdfuse`
//! and a loop device, `mkfs.ext4`, mounted, and a SQLite writer (WAL,
//! `synchronous=FULL`) that records every acknowledged commit in a file
//! outside the volume while another file on the volume is rewritten without
//! fsync. The sidecar is SIGKILLed mid-run; after a restart and reattach,
//! `e2fsck -fy` must succeed (exit ≤ 1), the filesystem must mount,
//! `PRAGMA integrity_check` must say ok, every acknowledged row must be
//! there and reading the rewritten file must give no I/O error. Repeated for
//! `EXT4_CYCLES` cycles (default 10).
//!
//! Needs root, /dev/fuse, loop devices, nbdfuse, mkfs.ext4/e2fsck and
//! python3's sqlite3 (.ci/run installs them). Where something is missing
//! the test prints one `SKIPPED:` line saying what, and returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{have_tool, run, run_timeout, Sidecar};

const WRITER: &str = r#"
import os, sqlite3, sys, time
mnt, acks = sys.argv[1], sys.argv[2]
db = sqlite3.connect(os.path.join(mnt, "db.sqlite"), isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload BLOB)")
start = db.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0] + 1
ack = open(acks, "a")
scratch = os.path.join(mnt, "scratch.bin")
i = start
while True:
    db.execute("BEGIN")
    db.execute("INSERT INTO t (id, payload) VALUES (?, ?)", (i, os.urandom(2000)))
    db.execute("COMMIT")
    # The commit returned: it is durable. Record it outside the volume.
    ack.write("%d\n" % i)
    ack.flush()
    os.fsync(ack.fileno())
    if i % 5 == 0:
        # A file rewritten in place without fsync.
        with open(scratch, "wb") as f:
            f.write(os.urandom(256 * 1024))
    i += 1
"#;

const VERIFY: &str = r#"
import os, sqlite3, sys
mnt, acks = sys.argv[1], sys.argv[2]
acked = [int(l) for l in open(acks) if l.strip()] if os.path.exists(acks) else []
db = sqlite3.connect(os.path.join(mnt, "db.sqlite"))
ok = db.execute("PRAGMA integrity_check").fetchone()[0]
# The writer may have been killed before it created the table.
tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
have = {r[0] for r in db.execute("SELECT id FROM t")} if "t" in tables else set()
missing = [i for i in acked if i not in have]
scratch = os.path.join(mnt, "scratch.bin")
n = 0
if os.path.exists(scratch):
    with open(scratch, "rb") as f:
        n = len(f.read())
print("integrity_check=%s acked=%d rows=%d missing=%d scratch_bytes=%d"
      % (ok, len(acked), len(have), len(missing), n))
sys.exit(0 if ok == "ok" and not missing else 1)
"#;

/// Why this machine cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root (loop devices and mount need root)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    for tool in [
        "nbdfuse",
        "mkfs.ext4",
        "e2fsck",
        "losetup",
        "python3",
        "fusermount3",
    ] {
        if !have_tool(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
    let py = run(Command::new("python3").args(["-c", "import sqlite3"]));
    if !py.status.success() {
        return Some("python3 has no sqlite3 module".into());
    }
    // A loop device must be obtainable.
    let probe = std::env::temp_dir().join(format!("ear-loop-probe-{}", std::process::id()));
    if let Err(e) = std::fs::write(&probe, vec![0u8; 1 << 20]) {
        return Some(format!("cannot create a loop device probe file: {e}"));
    }
    let out = run(Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&probe));
    let _ = std::fs::remove_file(&probe);
    if !out.status.success() {
        return Some(format!("no loop device available: {}", out.stderr.trim()));
    }
    let dev = out.stdout.trim().to_string();
    run(Command::new("losetup").args(["-d", &dev]));
    None
}

/// An export attached as a block device: nbdfuse file + loop device.
struct Attached {
    fuse_dir: PathBuf,
    nbdfuse: Child,
    loopdev: String,
    mnt: PathBuf,
    mounted: bool,
    attached: bool,
}

impl Attached {
    fn new(s: &Sidecar, root: &Path) -> Attached {
        let fuse_dir = root.join("fuse");
        let mnt = root.join("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let nbdfuse = Command::new("nbdfuse")
            .arg(fuse_dir.join("disk"))
            .arg("--unix")
            .arg(s.socket())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        let disk = fuse_dir.join("disk");
        let t = Instant::now();
        while std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "nbdfuse did not attach"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&disk));
        assert!(out.status.success(), "losetup: {}", out.both());
        Attached {
            fuse_dir,
            nbdfuse,
            loopdev: out.stdout.trim().to_string(),
            mnt,
            mounted: false,
            attached: true,
        }
    }

    fn mount(&mut self) {
        let out = run(Command::new("mount").arg(&self.loopdev).arg(&self.mnt));
        assert!(out.status.success(), "mount: {}", out.both());
        self.mounted = true;
    }

    /// Tears everything down (also after the server died under it).
    fn detach(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if !self.attached {
            return;
        }
        self.attached = false;
        if self.mounted {
            run_timeout(
                Command::new("umount").arg("-l").arg(&self.mnt),
                Duration::from_secs(30),
            );
        }
        run_timeout(
            Command::new("losetup").args(["-d", &self.loopdev]),
            Duration::from_secs(30),
        );
        run_timeout(
            Command::new("fusermount3").arg("-u").arg(&self.fuse_dir),
            Duration::from_secs(30),
        );
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
        self.mounted = false;
    }
}

impl Drop for Attached {
    /// A failing assertion must not leave mounts and loop devices behind.
    fn drop(&mut self) {
        self.teardown();
    }
}

fn cycles() -> u32 {
    std::env::var("EXT4_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

#[test]
fn ext4_and_sqlite_survive_sidecar_sigkill() {
    if let Some(why) = missing_prerequisite() {
        println!("SKIPPED: ext4_and_sqlite_survive_sidecar_sigkill: {why}");
        return;
    }
    let mut s = Sidecar::start(&["--export", "default=96M"]);
    let root = s.root().to_path_buf();
    let acks = root.join("acks.txt");
    let writer_py = root.join("writer.py");
    let verify_py = root.join("verify.py");
    std::fs::write(&writer_py, WRITER).unwrap();
    std::fs::write(&verify_py, VERIFY).unwrap();

    let a = Attached::new(&s, &root);
    let out = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&a.loopdev));
    assert!(out.status.success(), "mkfs.ext4: {}", out.both());
    a.detach();

    let mut rng = common::Rng::new(
        std::env::var("EAR_TEST_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x5eed),
    );
    for cycle in 0..cycles() {
        let mut a = Attached::new(&s, &root);
        a.mount();
        let mut writer = Command::new("python3")
            .arg(&writer_py)
            .arg(&a.mnt)
            .arg(&acks)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the SQLite writer");
        std::thread::sleep(Duration::from_millis(800 + rng.next_u64() % 1500));
        s.kill9();
        let _ = writer.kill();
        let _ = writer.wait();
        a.detach();

        s.start_again();
        let mut a = Attached::new(&s, &root);
        let fsck = run_timeout(
            Command::new("e2fsck").args(["-fy", &a.loopdev]),
            Duration::from_secs(120),
        );
        let code = fsck.status.code().unwrap_or(99);
        assert!(
            code <= 1,
            "cycle {cycle}: e2fsck exit {code}:\n{}",
            fsck.both()
        );
        a.mount();
        let v = run(Command::new("python3")
            .arg(&verify_py)
            .arg(&a.mnt)
            .arg(&acks));
        println!("cycle {cycle}: e2fsck exit {code}; {}", v.stdout.trim());
        assert!(
            v.status.success(),
            "cycle {cycle}: SQLite check failed:\n{}",
            v.both()
        );
        a.detach();
    }
    s.stop();
    assert!(!s.log().contains("panicked"), "{}", s.log());
    let acked = std::fs::read_to_string(&acks).unwrap_or_default();
    assert!(acked.lines().count() > 10, "the writer made no progress");
}
