//! An export attached as a kernel block device: `nbdfuse` exposes it as a
//! file, `losetup` makes that file a loop device, and it can be mounted.
//! Needs root, /dev/fuse and loop devices; [`missing_prerequisite`] says
//! what is missing so a test can print one `SKIPPED:` line.
//! Include with `#[path = "common/attach.rs"] mod attach;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{have_tool, run, run_timeout};

/// Why this machine cannot attach exports, if it cannot (`tools` are the
/// extra tools the test needs).
pub fn missing_prerequisite(tools: &[&str]) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root (loop devices and mount need root)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    for tool in ["nbdfuse", "losetup", "fusermount3"].iter().chain(tools) {
        if !have_tool(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
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
    run(Command::new("losetup").args(["-d", out.stdout.trim()]));
    None
}

/// An export attached as a block device, optionally mounted.
pub struct Attached {
    fuse_dir: PathBuf,
    nbdfuse: Child,
    /// The loop device (`/dev/loopN`).
    pub loopdev: String,
    /// Where [`Attached::mount`] mounts it.
    pub mnt: PathBuf,
    mounted: bool,
    attached: bool,
}

impl Attached {
    /// Attaches the default export of the sidecar at `socket`, using
    /// `<dir>/fuse` and `<dir>/mnt`.
    pub fn new(socket: &Path, dir: &Path) -> Attached {
        let fuse_dir = dir.join("fuse");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let nbdfuse = Command::new("nbdfuse")
            .arg(fuse_dir.join("disk"))
            .arg("--unix")
            .arg(socket)
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

    /// Mounts the loop device on [`Attached::mnt`].
    pub fn mount(&mut self) {
        let out = run(Command::new("mount").arg(&self.loopdev).arg(&self.mnt));
        assert!(out.status.success(), "mount: {}", out.both());
        self.mounted = true;
    }

    /// Tears everything down.
    pub fn detach(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if !self.attached {
            return;
        }
        self.attached = false;
        if self.mounted {
            // A frozen filesystem cannot be unmounted: thaw first (an error
            // when it is not frozen is fine).
            run_timeout(
                Command::new("fsfreeze").arg("-u").arg(&self.mnt),
                Duration::from_secs(10),
            );
            run_timeout(
                Command::new("umount").arg(&self.mnt),
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
