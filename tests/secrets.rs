//! Secrets never leave memory : runs the real binary with
//! the local provider, with traffic, debug/trace logging and every CLI
//! command, then recomputes the universe key (unwrapping `keys.json` with the
//! library) and every derived per-file key (HKDF per doc/FORMAT.md, checked
//! by decrypting a block written in the test) and scans the data directory,
//! the logs and every CLI output for each key as raw bytes, hex, base64 and
//! Rust `Debug` text. Nothing may be found. `local.kek` is the KEK by design
//! and is only scanned for the other keys; the KEK is searched for everywhere
//! else.

mod common;

use std::collections::HashMap;
use std::process::Command;

use base64::Engine as _;
use common::{pattern, qemu_io, sidecar_bin, Sidecar};
use ear_sidecar::keys::local::LocalProvider;
use ear_sidecar::keys::registry::Registry;
use ear_sidecar::keys::KeyProvider;
use hkdf::Hkdf;
use sha2::Sha256;

/// Every textual and binary form a 32-byte key could leak in.
fn encodings(key: &[u8; 32]) -> Vec<(String, Vec<u8>)> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut v = vec![
        ("raw".to_string(), key.to_vec()),
        ("raw first half".into(), key[..16].to_vec()),
        ("raw second half".into(), key[16..].to_vec()),
        ("hex".into(), hex::encode(key).into_bytes()),
        ("HEX".into(), hex::encode_upper(key).into_bytes()),
        (
            "hex first half".into(),
            hex::encode(&key[..16]).into_bytes(),
        ),
        ("base64".into(), STANDARD.encode(key).into_bytes()),
        (
            "base64 nopad".into(),
            STANDARD_NO_PAD.encode(key).into_bytes(),
        ),
        ("base64url".into(), URL_SAFE.encode(key).into_bytes()),
        (
            "base64url nopad".into(),
            URL_SAFE_NO_PAD.encode(key).into_bytes(),
        ),
        ("debug".into(), format!("{key:?}").into_bytes()),
        (
            "debug compact".into(),
            format!("{key:?}").replace(' ', "").into_bytes(),
        ),
    ];
    // base64 of the key at the other two alignments inside a longer blob.
    for pad in 1..3usize {
        let mut p = vec![0u8; pad];
        p.extend_from_slice(key);
        let s = STANDARD.encode(&p);
        // Skip the characters that mix in the padding bytes.
        let skip = (pad * 8).div_ceil(6) + 1;
        v.push((
            format!("base64 offset {pad}"),
            s.as_bytes()[skip..s.len() - 4].to_vec(),
        ));
    }
    v
}

/// (name, needle) pairs found in `hay`.
fn scan(hay: &[u8], needles: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut by_prefix: HashMap<[u8; 8], Vec<usize>> = HashMap::new();
    for (i, (_, n)) in needles.iter().enumerate() {
        let p: [u8; 8] = n[..8].try_into().unwrap();
        by_prefix.entry(p).or_default().push(i);
    }
    let mut found = Vec::new();
    if hay.len() < 8 {
        return found;
    }
    for i in 0..=hay.len() - 8 {
        let w: [u8; 8] = hay[i..i + 8].try_into().unwrap();
        if let Some(ids) = by_prefix.get(&w) {
            for &id in ids {
                let (name, n) = &needles[id];
                if hay[i..].starts_with(n) {
                    found.push(format!("{name} at byte {i}"));
                }
            }
        }
    }
    found
}

fn derive(universe: &[u8; 32], file_id: &[u8; 16], label: &[u8]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(&file_id[..]), universe);
    let mut okm = [0u8; 32];
    hk.expand(label, &mut okm).unwrap();
    okm
}

fn cli(args: &[&str]) -> String {
    let o = Command::new(sidecar_bin()).args(args).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn no_key_material_in_files_logs_or_cli_output() {
    let mut sc = Sidecar::start(&[
        "--export",
        "default=16M",
        "--export",
        "second=4M",
        "--log-level",
        "debug",
    ]);
    // Traffic on both exports, through both clients.
    for export in ["default", "second"] {
        let mut c = sc.client(export);
        c.write(0, &pattern(0, 1), true).unwrap().unwrap();
        c.write(1 << 20, &vec![0x61u8; 64 << 10], false)
            .unwrap()
            .unwrap();
        c.flush().unwrap().unwrap();
        assert_eq!(c.read(0, 4096).unwrap().unwrap(), pattern(0, 1));
        c.disconnect();
        qemu_io(
            &sc.uri(export),
            &["write -P 0x33 8k 4k", "read -P 0x33 8k 4k", "discard 8k 4k"],
        );
    }
    sc.stop();
    // A second run with trace logging in JSON.
    sc.set_args(&[
        "--export",
        "default=16M",
        "--export",
        "second=4M",
        "--log-level",
        "trace",
        "--log-format",
        "json",
    ]);
    sc.start_again();
    {
        let mut c = sc.client("default");
        assert_eq!(c.read(0, 4096).unwrap().unwrap(), pattern(0, 1));
        c.write(4096, &pattern(1, 1), true).unwrap().unwrap();
        c.disconnect();
    }
    let d = sc.data_dir().display().to_string();
    let mut outputs = vec![
        ("status".to_string(), cli(&["status", "--data-dir", &d])),
        (
            "status --json".to_string(),
            cli(&["status", "--data-dir", &d, "--json"]),
        ),
    ];
    sc.stop();
    for args in [
        vec!["--help"],
        vec!["help"],
        vec!["--version"],
        vec!["serve", "--help"],
        vec!["status", "--help"],
        vec!["validate-key", "--help"],
        vec!["status", "--data-dir", &d],
        vec!["status", "--data-dir", &d, "--json"],
    ] {
        outputs.push((args.join(" "), cli(&args)));
    }
    assert!(
        outputs[1].1.contains("\"exports\""),
        "status --json output: {}",
        outputs[1].1
    );

    // Recompute the keys with the library.
    let kek_path = sc.kek_file();
    let kek: [u8; 32] = std::fs::read(&kek_path).unwrap().try_into().unwrap();
    let provider = LocalProvider::open_or_create(&kek_path, false).unwrap();
    let reg = Registry::load(&sc.data_dir()).unwrap().expect("registry");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut universes = Vec::new();
    for v in reg.key_versions() {
        let k = rt
            .block_on(provider.unwrap(&v.wrapped, &v.context))
            .unwrap();
        universes.push((v.version, *k.expose()));
    }
    assert!(!universes.is_empty());
    let mut keys: Vec<(String, [u8; 32])> = Vec::new();
    for (v, u) in &universes {
        keys.push((format!("universe key v{v}"), *u));
    }
    let mut checked_block = false;
    for export in ["default", "second"] {
        let file =
            std::fs::read(sc.data_dir().join("exports").join(format!("{export}.ear"))).unwrap();
        let file_id: [u8; 16] = file[32..48].try_into().unwrap();
        // Block 0's slots name the epoch its data key belongs to.
        let epochs: Vec<u32> = (0..2)
            .map(|i| {
                let at = 8192 + i * 64 + 16;
                u32::from_le_bytes(file[at..at + 4].try_into().unwrap())
            })
            .collect();
        for (v, u) in &universes {
            keys.push((
                format!("{export} header-MAC key v{v}"),
                derive(u, &file_id, ear_sidecar::crypto::LABEL_HEADER_MAC),
            ));
            for epoch in (1..=4).chain(epochs.iter().copied()) {
                let with_epoch = |label: &[u8]| {
                    let mut info = label.to_vec();
                    info.extend_from_slice(&epoch.to_be_bytes());
                    derive(u, &file_id, &info)
                };
                let data = with_epoch(ear_sidecar::crypto::LABEL_DATA);
                keys.push((format!("{export} data key v{v} epoch {epoch}"), data));
                keys.push((
                    format!("{export} block-MAC key v{v} epoch {epoch}"),
                    with_epoch(ear_sidecar::crypto::LABEL_BLOCK_MAC),
                ));
                // Prove the derived data key is the real one: decrypt block 0.
                if export == "default" {
                    use aes::cipher::KeyInit;
                    for slot in 0..2 {
                        let entry = &file[8192 + slot * 64..8192 + slot * 64 + 64];
                        let nonce: [u8; 12] = entry[..12].try_into().unwrap();
                        let mut block = file[8192 + 32768..8192 + 32768 + 4096].to_vec();
                        let enc = aes::Aes256Enc::new((&data).into());
                        ear_sidecar::crypto::BlockCipher::new(&enc).apply(&nonce, &mut block);
                        if block == pattern(0, 1) {
                            checked_block = true;
                        }
                    }
                }
            }
        }
    }
    assert!(
        checked_block,
        "derived data key does not decrypt block 0: key derivation in the test is wrong"
    );

    let mut needles = Vec::new();
    for (name, k) in &keys {
        for (enc, n) in encodings(k) {
            needles.push((format!("{name} ({enc})"), n));
        }
    }
    // The scanner itself finds a planted key in every encoding (control).
    for (enc, n) in encodings(&keys[0].1) {
        let mut hay = b"prefix ".to_vec();
        hay.extend_from_slice(&n);
        hay.extend_from_slice(b" suffix");
        assert!(
            !scan(&hay, &needles).is_empty(),
            "scanner misses the {enc} form"
        );
    }
    let mut kek_needles = needles.clone();
    for (enc, n) in encodings(&kek) {
        kek_needles.push((format!("KEK ({enc})"), n));
    }

    let mut findings = Vec::new();
    let files = common::files_under(&sc.data_dir());
    let mut scanned = 0usize;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        scanned += bytes.len();
        let list = if f == &kek_path {
            &needles
        } else {
            &kek_needles
        };
        for hit in scan(&bytes, list) {
            findings.push(format!("{}: {hit}", f.display()));
        }
    }
    let log = sc.all_logs().into_bytes();
    assert!(log.len() > 1000, "log unexpectedly short");
    for hit in scan(&log, &kek_needles) {
        findings.push(format!("sidecar log: {hit}"));
    }
    for (what, out) in &outputs {
        for hit in scan(out.as_bytes(), &kek_needles) {
            findings.push(format!("`{what}` output: {hit}"));
        }
    }
    eprintln!(
        "secrets scan: {} keys x {} encodings, {} files ({scanned} bytes), log {} bytes, {} CLI outputs",
        keys.len() + 1,
        encodings(&kek).len(),
        files.len(),
        log.len(),
        outputs.len()
    );
    assert!(
        findings.is_empty(),
        "key material found:\n{}",
        findings.join("\n")
    );
}
