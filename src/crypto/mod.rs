//! Cryptography core: key types, per-file key derivation, the block cipher and
//! the in-memory key ring. This module does no I/O (rustls' model): it turns
//! keys and bytes into keys and bytes, so it can be tested and fuzzed alone.
//!
//! Construction (normative text in `doc/FORMAT.md`):
//!
//! * A 256-bit *universe key* per key version, held only here, in memory.
//! * Per backing file, key version and *epoch*, HKDF-SHA256 with `IKM` =
//!   universe key, `salt` = the file's 16-byte random id, `info` = purpose
//!   label including the format version (and `be32(epoch)` for the data and
//!   block-MAC keys), yields independent 256-bit keys for data, header MAC
//!   and block MAC. The expanded key schedules are cached in the
//!   [`KeyRing`]'s LRU by (file, version, epoch).
//! * Data blocks are AES-256-CTR with a 128-bit counter block made of a
//!   96-bit nonce followed by a 32-bit big-endian block counter starting at 0
//!   (a 4 KiB block uses counters 0..=255, so the counter never wraps). The
//!   store builds each nonce from a per-epoch write counter and OS CSPRNG
//!   bytes, so no two writes under one key share a nonce.

mod cipher;
mod kdf;
mod keyring;
mod secret;

pub use cipher::{BlockCipher, NONCE_LEN};
pub use kdf::{
    derive_file_keys, registry_mac, FileKeys, BLOCK_TAG_LEN, LABEL_BLOCK_MAC, LABEL_DATA,
    LABEL_HEADER_MAC, LABEL_REGISTRY_MAC,
};
pub use keyring::{CacheStats, KeyRing, KeyRingSnapshot};
pub use secret::{SecretKey, KEY_LEN};

/// Random id of a backing file; HKDF salt for that file's keys.
pub type FileId = [u8; 16];

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The OS random number generator failed (we never fall back to anything weaker).
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    /// Key material of the wrong length.
    #[error("key material has {0} bytes, expected 32")]
    KeyLength(usize),
    /// No universe key of this version is loaded.
    #[error("universe key version {0} is not loaded")]
    UnknownVersion(u32),
    /// A version that cannot be added (already loaded, or 0) or removed
    /// (the active one).
    #[error("universe key version {0} is already loaded or is the active version")]
    VersionConflict(u32),
    /// Keys were wiped from memory (fail-closed after key revocation).
    #[error("keys are wiped from memory (fail-closed): {0}")]
    FailedClosed(String),
}

/// Fills `buf` from the OS CSPRNG (`getrandom(2)`). Never falls back.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}
