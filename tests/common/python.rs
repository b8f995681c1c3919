//! The Python decryptor (`tests/python/decrypt_ear.py`), which reads a data
//! directory from doc/FORMAT.md alone: its prerequisites and one call.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{require_tool, run, Sidecar};

/// Path of the decryptor script.
pub fn decryptor() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/decrypt_ear.py")
}

/// Fails the test unless python3 can import `cryptography` and `xxhash`
/// (.ci/run installs both).
pub fn require_python_cryptography() {
    require_tool("python3");
    let out = run(Command::new("python3").args(["-c", "import cryptography, xxhash"]));
    assert!(
        out.status.success(),
        "python3 cannot import the `cryptography` and `xxhash` packages \
         (pip install cryptography xxhash; .ci/run installs them):\n{}",
        out.stderr
    );
}

/// Decrypts `export` of sidecar `s` (its data directory and local KEK) with
/// the decryptor: the plaintext image and the `SEEN` report (key versions of
/// the blocks, header key version).
pub fn decrypt(s: &Sidecar, export: &str) -> (Vec<u8>, serde_json::Value) {
    let out_file = s.root().join(format!("{export}.plain"));
    let out = run(Command::new("python3")
        .arg(decryptor())
        .arg("--data-dir")
        .arg(s.data_dir())
        .arg("--kek-file")
        .arg(s.kek_file())
        .args(["--export", export])
        .arg("--output")
        .arg(&out_file));
    assert!(
        out.status.success(),
        "decrypt_ear.py failed ({}):\n{}",
        out.status,
        out.both()
    );
    let seen = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("SEEN "))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_else(|| panic!("no SEEN line from decrypt_ear.py:\n{}", out.stderr));
    (
        std::fs::read(&out_file).expect("read decrypted image"),
        seen,
    )
}
