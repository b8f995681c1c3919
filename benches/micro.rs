//! Criterion micro-benchmarks of the per-request hot path pieces: the block
//! cipher (4 KiB / 64 KiB / 1 MiB, applied per 4 KiB stored block with a
//! distinct nonce, as the store does), per-file key derivation, key-cache
//! lookups from 1 and 2 threads, block-entry and header encode/decode, and the
//! NBD request codec.
//!
//! Run: `cargo bench --bench micro [-- FILTER]`. Measurement is kept short
//! (1 s warm-up, 2 s measurement per benchmark) so the whole set finishes in a
//! few minutes; `cargo test --benches` runs each benchmark once as a check.
//! Results and the `openssl speed` comparison are in doc/bench-harness.md.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use ear_sidecar::crypto::{
    derive_file_keys, fill_random, BlockCipher, FileId, KeyRing, SecretKey, NONCE_LEN,
};
use ear_sidecar::protocol::consts::NBD_CMD_WRITE;
use ear_sidecar::protocol::{encode_request, parse_request_header, ExportLimits, RawRequest};
use ear_sidecar::store::format::{
    Algorithm, Header, Integrity, Kind, Slot, State, BLOCK_SIZE, HEADER_BODY, SLOT_SIZE,
};

fn universe() -> SecretKey {
    let mut k = [7u8; 32];
    SecretKey::take_from(&mut k).unwrap_or_else(|_| unreachable!("32 bytes"))
}

fn nonce_for(i: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&i.to_le_bytes());
    n
}

fn cipher(c: &mut Criterion) {
    let keys = derive_file_keys(&universe(), &[1u8; 16], 1);
    let bc = BlockCipher::new(keys.data_cipher());
    let mut g = c.benchmark_group("cipher");
    for size in [4096usize, 64 * 1024, 1 << 20] {
        let mut buf = vec![0x5au8; size];
        let mut seq = 0u64;
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("aes256ctr_per_4k_block", size),
            &size,
            |b, _| {
                b.iter(|| {
                    for block in buf.chunks_mut(BLOCK_SIZE) {
                        seq = seq.wrapping_add(1);
                        bc.apply(&nonce_for(seq), block);
                    }
                    black_box(&buf);
                })
            },
        );
    }
    // What a fresh random nonce per block write costs on top (getrandom(2)).
    g.throughput(Throughput::Elements(1));
    g.bench_function("random_nonce", |b| {
        b.iter(|| {
            let mut n = [0u8; NONCE_LEN];
            let _ = fill_random(&mut n);
            black_box(n)
        })
    });
    g.finish();
}

fn kdf(c: &mut Criterion) {
    let u = universe();
    let mut id: FileId = [0u8; 16];
    c.bench_function("kdf/derive_file_keys", |b| {
        b.iter(|| {
            id[0] = id[0].wrapping_add(1);
            black_box(derive_file_keys(&u, black_box(&id), 1))
        })
    });
}

fn keyring(c: &mut Criterion) {
    const FILES: u8 = 64;
    let mut keys = BTreeMap::new();
    keys.insert(1u32, universe());
    let Ok(ring) = KeyRing::new(keys, 1, 1024) else {
        return;
    };
    let ids: Vec<FileId> = (0..FILES).map(|i| [i; 16]).collect();
    for id in &ids {
        let _ = ring.file_keys(id, 1, 1);
    }
    let mut g = c.benchmark_group("keyring_hit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("1_thread", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = i.wrapping_add(1);
            let id = ids.get(i % ids.len()).unwrap_or(&[0; 16]);
            black_box(ring.file_keys(id, 1, 1).is_ok())
        })
    });
    // Two threads hammer the same (sharded) cache; one iteration is one lookup
    // on each thread, so throughput counts two elements.
    g.throughput(Throughput::Elements(2));
    g.bench_function("2_threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..2usize {
                    let (ring, ids) = (&ring, &ids);
                    s.spawn(move || {
                        for i in 0..iters as usize {
                            let id = ids.get((i + t * 7) % ids.len()).unwrap_or(&[0; 16]);
                            black_box(ring.file_keys(id, 1, 1).is_ok());
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

fn format(c: &mut Criterion) {
    let block = vec![0xa5u8; BLOCK_SIZE];
    let mut g = c.benchmark_group("format");
    g.throughput(Throughput::Bytes(BLOCK_SIZE as u64));
    let s0 = Slot {
        nonce: nonce_for(3),
        key_version: 1,
        epoch: 1,
        generation: 5,
        kind: Kind::Data,
        check: 0,
        tag: [0; 16],
    };
    g.bench_function("slot_seal_xxh3_4k", |b| {
        b.iter(|| black_box(black_box(s0).seal(9, black_box(&block))))
    });
    g.throughput(Throughput::Elements(1));
    let e = s0.seal(9, &block);
    let mut slot = [0u8; SLOT_SIZE];
    g.bench_function("slot_encode", |b| {
        b.iter(|| {
            black_box(&e).encode(&mut slot);
            black_box(&slot);
        })
    });
    e.encode(&mut slot);
    g.bench_function("slot_decode", |b| {
        b.iter(|| black_box(Slot::decode(black_box(&slot))).is_ok())
    });
    let h = Header {
        algorithm: Algorithm::Aes256Ctr,
        integrity: Integrity::Check,
        header_key_version: 1,
        file_id: [9; 16],
        size: 1 << 40,
        sequence: 42,
        dir_id: [3; 16],
        name: "bench-export".to_owned(),
        state: State::Open,
        epoch: 1,
        epoch_writes: 1 << 32,
    };
    g.bench_function("header_encode", |b| {
        b.iter(|| black_box(black_box(&h).encode_body()))
    });
    let body: [u8; HEADER_BODY] = h.encode_body();
    g.bench_function("header_decode", |b| {
        b.iter(|| black_box(Header::decode_body(black_box(&body))).is_ok())
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    let mut buf = BytesMut::new();
    encode_request(
        &mut buf,
        &RawRequest {
            flags: 0,
            command: NBD_CMD_WRITE,
            cookie: 77,
            offset: 1 << 20,
            length: 4096,
        },
    );
    let mut raw = [0u8; 28];
    raw.copy_from_slice(buf.get(..28).unwrap_or(&[0; 28]));
    let limits = ExportLimits {
        size: 1 << 30,
        max_request: 32 << 20,
        structured: false,
    };
    let mut g = c.benchmark_group("nbd_codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_request_header+validate", |b| {
        b.iter(|| {
            let r = parse_request_header(black_box(&raw))
                .ok()
                .map(|r| r.validate(&limits));
            black_box(r)
        })
    });
    g.bench_function("encode_request", |b| {
        let req = RawRequest {
            flags: 0,
            command: NBD_CMD_WRITE,
            cookie: 77,
            offset: 1 << 20,
            length: 4096,
        };
        let mut out = BytesMut::with_capacity(64);
        b.iter(|| {
            out.clear();
            encode_request(&mut out, black_box(&req));
            black_box(&out);
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = micro;
    config = config();
    targets = cipher, kdf, keyring, format, codec
}
criterion_main!(micro);
