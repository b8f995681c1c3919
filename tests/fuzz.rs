//! Fuzzing on stable Rust: a fuzz target for the handshake/option parser and
//! the request parser, and one for decoding headers and block records.
//! Proptest over arbitrary and mutated-valid bytes for every parser
//! that sees untrusted input, asserting no panic plus each parser's contract
//! (accepted requests are in range, decoders accept only canonical encodings),
//! and a stateful byte-stream fuzz against a live server over its socket.
//!
//! Case counts: `FUZZ_CASES` (default 2000 per property) and
//! `FUZZ_STREAM_CASES` (default 150 connections); `scripts/fuzz-long.sh` runs
//! them with large counts. Failures print a minimized input and the seed.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::BytesMut;
use common::{Rng, Sidecar};
use ear_sidecar::protocol::{
    self, consts::*, ClientOption, ExportLimits, InfoRequest, MetaContextRequest, OptionError,
    OptionHeader, ProtocolError, RawRequest, RequestKind, MAX_OPTION_LEN,
};
use ear_sidecar::store::format::{Header, Slot, HEADER_BODY, MAX_EXPORT_SIZE, SLOT_SIZE};
use proptest::prelude::*;
use proptest::test_runner::Config;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Random bytes, or a valid encoding with a few bytes overwritten / cut / extended.
fn mutated(valid: Vec<Vec<u8>>, max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    let valid = proptest::sample::select(valid);
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..max_len),
        (
            valid.clone(),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6)
        )
            .prop_map(|(mut v, muts)| {
                for (i, b) in muts {
                    if !v.is_empty() {
                        let n = v.len();
                        v[i % n] = b;
                    }
                }
                v
            }),
        (valid.clone(), any::<usize>()).prop_map(|(mut v, cut)| {
            let n = v.len() + 1;
            v.truncate(cut % n);
            v
        }),
        (valid, proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(mut v, tail)| {
            v.extend_from_slice(&tail);
            v
        }),
    ]
}

fn info_bytes(name: &str, types: &[u16]) -> Vec<u8> {
    let mut b = BytesMut::new();
    InfoRequest {
        name: name.into(),
        info_types: types.to_vec(),
    }
    .encode(&mut b);
    b.to_vec()
}

fn meta_bytes(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = BytesMut::new();
    MetaContextRequest {
        export: export.into(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
    .encode(&mut b);
    b.to_vec()
}

fn valid_option_payloads() -> Vec<Vec<u8>> {
    vec![
        info_bytes("default", &[]),
        info_bytes("", &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]),
        info_bytes("a.b-c_d", &[3, 2, 1, 0]),
        meta_bytes("default", &["base:allocation"]),
        meta_bytes("", &[]),
        meta_bytes("x", &["base:", "qemu:dirty-bitmap:a", ""]),
        b"default".to_vec(),
        vec![],
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Client flags: accepted iff fixed-newstyle is set and no unknown bit is.
    #[test]
    fn fuzz_client_flags(raw in any::<[u8; 4]>()) {
        let bits = u32::from_be_bytes(raw);
        match protocol::parse_client_flags(raw) {
            Ok(f) => {
                prop_assert_eq!(f.bits(), bits);
                prop_assert!(bits & NBD_FLAG_C_FIXED_NEWSTYLE != 0);
            }
            Err(_) => prop_assert!(
                bits & NBD_FLAG_C_FIXED_NEWSTYLE == 0
                    || bits & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0
            ),
        }
    }

    /// Option header: accepted iff the magic is IHAVEOPT; fields round-trip.
    #[test]
    fn fuzz_option_header(mut raw in any::<[u8; 16]>(), fix_magic in any::<bool>()) {
        if fix_magic {
            raw[..8].copy_from_slice(&NBD_IHAVEOPT.to_be_bytes());
        }
        match protocol::parse_option_header(&raw) {
            Ok(h) => {
                prop_assert_eq!(&raw[..8], &NBD_IHAVEOPT.to_be_bytes()[..]);
                let mut b = BytesMut::new();
                protocol::encode_option(&mut b, h.option, &[]);
                prop_assert_eq!(&b[..12], &raw[..12]);
                prop_assert_eq!(h.length, u32::from_be_bytes(raw[12..16].try_into().unwrap()));
                prop_assert_eq!(h.is_oversized(), h.length > MAX_OPTION_LEN);
            }
            Err(e) => {
                let is_bad_magic = matches!(e, ProtocolError::BadMagic { .. });
                prop_assert!(is_bad_magic);
                prop_assert!(raw[..8] != NBD_IHAVEOPT.to_be_bytes());
            }
        }
    }

    /// Option payloads: never panic; anything accepted re-encodes to exactly
    /// the bytes received (no lenient parsing); strings are bounded and NUL-free.
    #[test]
    fn fuzz_option(
        option in prop_oneof![0u32..=12, any::<u32>()],
        data in mutated(valid_option_payloads(), 300),
        lie in any::<bool>(),
    ) {
        let length = if lie { (data.len() as u32).wrapping_add(1) } else { data.len() as u32 };
        let r = protocol::parse_option(OptionHeader { option, length }, &data);
        if lie {
            let is_mismatch = matches!(r, Err(OptionError::LengthMismatch { .. }));
            prop_assert!(is_mismatch);
            return Ok(());
        }
        match r {
            Ok(ClientOption::Info(req)) | Ok(ClientOption::Go(req)) => {
                prop_assert!(option == NBD_OPT_INFO || option == NBD_OPT_GO);
                prop_assert!(req.name.len() <= MAX_STRING_LEN && !req.name.contains('\0'));
                let mut b = BytesMut::new();
                req.encode(&mut b);
                prop_assert_eq!(&b[..], &data[..]);
            }
            Ok(ClientOption::ListMetaContext(req)) | Ok(ClientOption::SetMetaContext(req)) => {
                prop_assert!(option == NBD_OPT_LIST_META_CONTEXT || option == NBD_OPT_SET_META_CONTEXT);
                for q in &req.queries {
                    prop_assert!(q.len() <= MAX_STRING_LEN && !q.contains('\0'));
                }
                let mut b = BytesMut::new();
                req.encode(&mut b);
                prop_assert_eq!(&b[..], &data[..]);
            }
            Ok(ClientOption::ExportName(name)) => {
                prop_assert_eq!(option, NBD_OPT_EXPORT_NAME);
                prop_assert_eq!(name.as_bytes(), &data[..]);
                prop_assert!(!name.contains('\0'));
            }
            Ok(ClientOption::List) | Ok(ClientOption::StructuredReply) => {
                prop_assert!(data.is_empty());
            }
            Ok(ClientOption::Abort) => prop_assert_eq!(option, NBD_OPT_ABORT),
            Ok(ClientOption::Unknown(o)) => {
                prop_assert_eq!(o, option);
                prop_assert!(!matches!(o, 1 | 2 | 3 | 6 | 7 | 8 | 9 | 10));
            }
            Err(e) => prop_assert_eq!(e.reply_type(), NBD_REP_ERR_INVALID),
        }
    }

    /// Request header + validation with random limits: accepted requests are
    /// in range and within the limits; refusals carry a spec errno and the
    /// exact payload length to discard.
    #[test]
    fn fuzz_request(
        mut raw in any::<[u8; 28]>(),
        fix_magic in prop::bool::weighted(0.9),
        small_cmd in prop::bool::weighted(0.8),
        size in prop_oneof![1u64..=1 << 20, 1u64..=MAX_EXPORT_SIZE, Just(MAX_EXPORT_SIZE)],
        max_request in prop_oneof![4096u32..=1 << 30, Just(32 << 20)],
        structured in any::<bool>(),
        near_end in any::<bool>(),
    ) {
        if fix_magic {
            raw[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        }
        if small_cmd {
            raw[6] = 0;
            raw[7] %= 10;
            raw[4] = 0;
            raw[5] &= 0x3f;
        }
        if near_end {
            // Offsets around the end of the export and lengths around the limit.
            let len = u32::from_be_bytes(raw[24..28].try_into().unwrap()) % (max_request.saturating_mul(2));
            let off = size.saturating_sub(u64::from(raw[8]) * 512).wrapping_add(u64::from(raw[9]));
            raw[16..24].copy_from_slice(&off.to_be_bytes());
            raw[24..28].copy_from_slice(&len.to_be_bytes());
        }
        let Ok(req) = protocol::parse_request_header(&raw) else {
            prop_assert!(raw[..4] != NBD_REQUEST_MAGIC.to_be_bytes());
            return Ok(());
        };
        let mut b = BytesMut::new();
        protocol::encode_request(&mut b, &req);
        prop_assert_eq!(&b[..], &raw[..]);
        let limits = ExportLimits { size, max_request, structured };
        match req.validate(&limits) {
            Ok(v) => {
                prop_assert_eq!(v.cookie, req.cookie);
                let in_range = |off: u64, len: u32| len > 0 && off.checked_add(u64::from(len)).is_some_and(|e| e <= size);
                match v.kind {
                    RequestKind::Read { offset, len, df } => {
                        prop_assert!(in_range(offset, len) && len <= max_request);
                        prop_assert!(!df || structured);
                    }
                    RequestKind::Write { offset, len, .. } | RequestKind::Cache { offset, len } => {
                        prop_assert!(in_range(offset, len) && len <= max_request);
                    }
                    RequestKind::WriteZeroes { offset, len, fast_zero, .. } => {
                        prop_assert!(in_range(offset, len));
                        prop_assert!(fast_zero || len <= max_request);
                    }
                    RequestKind::Trim { offset, len, .. } => prop_assert!(in_range(offset, len)),
                    RequestKind::BlockStatus { offset, len, .. } => {
                        prop_assert!(in_range(offset, len) && structured);
                    }
                    RequestKind::Flush => prop_assert!(req.offset == 0 && req.length == 0),
                    RequestKind::Disconnect => prop_assert_eq!(req.command, NBD_CMD_DISC),
                }
            }
            Err(e) => {
                prop_assert_eq!(e.cookie, req.cookie);
                prop_assert!([NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW].contains(&e.errno));
                let discard = if req.command == NBD_CMD_WRITE { req.length } else { 0 };
                prop_assert_eq!(e.discard, discard);
                let mut out = BytesMut::new();
                e.encode_reply(&mut out, structured);
                prop_assert!(!out.is_empty());
            }
        }
    }

    /// Header slot bodies: never panic; accepted bodies are canonical
    /// (re-encode to the same bytes) and within the format's limits.
    #[test]
    fn fuzz_header_decode(body in mutated(valid_headers(), HEADER_BODY + 1)) {
        let mut raw = [0u8; HEADER_BODY];
        let n = body.len().min(HEADER_BODY);
        raw[..n].copy_from_slice(&body[..n]);
        if let Ok(h) = Header::decode_body(&raw) {
            prop_assert!(h.size > 0 && h.size <= MAX_EXPORT_SIZE);
            prop_assert!(!h.name.is_empty() && h.name.len() <= 64);
            prop_assert_eq!(&h.encode_body()[..], &raw[..]);
        }
    }

    /// Block slots: never panic on any length; accepted slots re-encode
    /// to the same 64 bytes; short input is an error.
    #[test]
    fn fuzz_slot_decode(raw in mutated(valid_entries(), 80)) {
        match Slot::decode(&raw) {
            Ok(None) => prop_assert!(raw[..SLOT_SIZE].iter().all(|&b| b == 0)),
            Ok(Some(e)) => {
                let mut out = [0u8; SLOT_SIZE];
                e.encode(&mut out);
                prop_assert_eq!(&out[..], &raw[..SLOT_SIZE]);
            }
            Err(_) => {}
        }
        if raw.len() < SLOT_SIZE {
            prop_assert!(Slot::decode(&raw).is_err());
        }
    }
}

fn valid_headers() -> Vec<Vec<u8>> {
    use ear_sidecar::store::format::{Algorithm, Integrity};
    let mut v = Vec::new();
    for (alg, kv, name, size) in [
        (Algorithm::Aes256Ctr, 1u32, "default", 1u64 << 30),
        (Algorithm::None, 0, "x", 512),
        (
            Algorithm::Aes256Ctr,
            7,
            &"n".repeat(64)[..],
            MAX_EXPORT_SIZE,
        ),
    ] {
        let h = Header {
            algorithm: alg,
            integrity: Integrity::Check,
            state: ear_sidecar::store::format::State::Open,
            epoch: 3,
            epoch_writes: 1 << 32,
            header_key_version: kv,
            file_id: [0x42; 16],
            size,
            sequence: 3,
            dir_id: [0x17; 16],
            name: name.to_string(),
        };
        v.push(h.encode_body().to_vec());
    }
    v
}

fn valid_entries() -> Vec<Vec<u8>> {
    let stored = vec![0x5au8; 4096];
    let mut out = vec![0u8; SLOT_SIZE];
    Slot {
        nonce: [9; 12],
        key_version: 1,
        epoch: 2,
        generation: 7,
        kind: ear_sidecar::store::format::Kind::Data,
        check: 0,
        tag: [0; 16],
    }
    .seal(0, &stored)
    .encode(&mut out);
    vec![out, vec![0u8; SLOT_SIZE]]
}

// ------------------------------------------------------------ live stream fuzz

fn stream_cases() -> u64 {
    std::env::var("FUZZ_STREAM_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

/// A valid client transcript: flags, some options, GO, then requests.
fn valid_transcript(rng: &mut Rng) -> Vec<u8> {
    let mut b = BytesMut::new();
    protocol::encode_client_flags(&mut b, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    if rng.below(2) == 0 {
        protocol::encode_option(&mut b, NBD_OPT_STRUCTURED_REPLY, &[]);
        protocol::encode_option(
            &mut b,
            NBD_OPT_SET_META_CONTEXT,
            &meta_bytes("default", &["base:allocation"]),
        );
    }
    if rng.below(3) == 0 {
        protocol::encode_option(&mut b, NBD_OPT_LIST, &[]);
        protocol::encode_option(&mut b, NBD_OPT_INFO, &info_bytes("default", &[1, 2, 3]));
    }
    if rng.below(8) == 0 {
        protocol::encode_option(&mut b, NBD_OPT_EXPORT_NAME, b"default");
    } else {
        protocol::encode_option(&mut b, NBD_OPT_GO, &info_bytes("default", &[]));
    }
    // Requests start past the first MiB; mutations may move them anywhere.
    for _ in 0..rng.below(12) {
        let cmd = [
            NBD_CMD_READ,
            NBD_CMD_WRITE,
            NBD_CMD_FLUSH,
            NBD_CMD_TRIM,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_BLOCK_STATUS,
            NBD_CMD_CACHE,
        ][rng.below(7) as usize];
        let offset = (1 << 20) + rng.below(15 << 20);
        let length = 1 + rng.below(128 << 10) as u32;
        let (offset, length) = if cmd == NBD_CMD_FLUSH {
            (0, 0)
        } else {
            (offset, length)
        };
        let flags =
            [0, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_REQ_ONE][rng.below(4) as usize];
        protocol::encode_request(
            &mut b,
            &RawRequest {
                flags,
                command: cmd,
                cookie: rng.next_u64(),
                offset,
                length,
            },
        );
        if cmd == NBD_CMD_WRITE {
            let payload = rng.bytes(length as usize);
            b.extend_from_slice(&payload);
        }
    }
    if rng.below(2) == 0 {
        protocol::encode_request(
            &mut b,
            &RawRequest {
                flags: 0,
                command: NBD_CMD_DISC,
                cookie: 0,
                offset: 0,
                length: 0,
            },
        );
    }
    b.to_vec()
}

fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    match rng.below(6) {
        0 => v, // unmodified
        1 => {
            for _ in 0..1 + rng.below(8) {
                if !v.is_empty() {
                    let i = rng.below(v.len() as u64) as usize;
                    v[i] = rng.next_u64() as u8;
                }
            }
            v
        }
        2 => {
            let cut = rng.below(v.len() as u64 + 1) as usize;
            v.truncate(cut);
            v
        }
        3 => {
            let at = rng.below(v.len() as u64 + 1) as usize;
            let k = 1 + rng.below(64) as usize;
            let noise = rng.bytes(k);
            v.splice(at..at, noise);
            v
        }
        4 => {
            // Overwrite a 4-byte field with an extreme value.
            if v.len() > 4 {
                let i = rng.below(v.len() as u64 - 4) as usize;
                let x =
                    [0u32, 1, 0x7fff_ffff, 0xffff_ffff, 0x8000_0000, 4096][rng.below(6) as usize];
                v[i..i + 4].copy_from_slice(&x.to_be_bytes());
            }
            v
        }
        _ => {
            let k = rng.below(2048) as usize;
            rng.bytes(k)
        }
    }
}

#[test]
fn fuzz_live_byte_stream() {
    // The fuzzed streams all name "default". A mutated request can be a
    // well-formed write anywhere in it (a flipped offset byte is still a valid
    // offset), so the data that must survive lives in a second export that no
    // fuzzed stream names.
    let mut sc = Sidecar::start(&[
        "--export",
        "default=16M",
        "--export",
        "guard=2M",
        "--max-request",
        "1M",
    ]);
    let mut rng = Rng::from_env("fuzz_live_byte_stream");
    let good: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    {
        let mut c = sc.client("guard");
        c.write(0, &good, true).unwrap().unwrap();
    }
    let n = stream_cases();
    let mut replies = 0u64;
    for i in 0..n {
        let t = valid_transcript(&mut rng);
        let bytes = mutate(&mut rng, t);
        let mut s = UnixStream::connect(sc.socket()).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(&bytes);
        if rng.below(2) == 0 {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            replies += k as u64;
        }
        drop(s);
        if i % 25 == 24 {
            assert!(
                sc.is_running(),
                "server died at case {i}; log:\n{}",
                sc.all_logs()
            );
            let mut c = sc.client("guard");
            assert_eq!(
                c.read(0, 1 << 20).unwrap().unwrap(),
                good,
                "guard data changed at case {i}"
            );
        }
    }
    assert!(sc.is_running(), "server died; log:\n{}", sc.all_logs());
    let mut c = sc.client("guard");
    assert_eq!(c.read(0, 1 << 20).unwrap().unwrap(), good);
    c.disconnect();
    sc.assert_serves("default", 2 << 20);
    let log = sc.all_logs();
    assert!(!log.contains("panicked"), "panic in server log:\n{log}");
    eprintln!(
        "fuzz_live_byte_stream: {n} connections, {replies} reply bytes, RSS {} KiB",
        sc.rss_kib()
    );
}
