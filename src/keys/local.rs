//! The local key provider: a 256-bit key-encryption key (KEK) kept in a file.
//!
//! This module owns the KEK file (creation with mode 0600, strict permission
//! and size checks on load) and the wrapping of universe keys under it with
//! AES-256-GCM. It exists for development, tests and deployments without a
//! KMS; the KEK file must be protected like any other secret (it is the root
//! of every key in the data directory).
//!
//! Wrapped blob layout: `nonce (12 bytes, OS CSPRNG) || ciphertext (32) || tag (16)`.
//! The AES-GCM associated data binds the blob to its [`EncryptionContext`]
//! (see [`context_aad`]), so a blob moved to another context fails to unwrap.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use super::{EncryptionContext, KeyError, KeyProvider, MasterKeyState, WrappedKey};
use crate::crypto::{fill_random, SecretKey, KEY_LEN};

/// Bytes of the random AES-GCM nonce at the start of a wrapped blob.
pub const WRAP_NONCE_LEN: usize = 12;
/// Bytes of the AES-GCM tag at the end of a wrapped blob.
pub const WRAP_TAG_LEN: usize = 16;
/// Total length of a wrapped universe key produced by this provider.
pub const WRAPPED_LEN: usize = WRAP_NONCE_LEN + KEY_LEN + WRAP_TAG_LEN;

/// Domain-separation prefix of the KEK fingerprint.
const KEK_ID_DOMAIN: &[u8] = b"ear-sidecar local kek id";
/// Domain-separation prefix of the AAD (versioned, so the encoding can change).
const AAD_DOMAIN: &[u8] = b"ear-sidecar/v1 local-wrap context";

/// A key provider whose master key is a 32-byte KEK read from a local file.
pub struct LocalProvider {
    path: PathBuf,
    kek: SecretKey,
    key_id: String,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("path", &self.path)
            .field("master_key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl LocalProvider {
    /// Opens the KEK file at `path`. When it does not exist and `create` is
    /// true, a fresh random KEK is written there (mode 0600, fsynced, parent
    /// directory fsynced). An existing file must be a regular file without any
    /// group/other permission bits and hold exactly 32 bytes.
    pub fn open_or_create(path: &Path, create: bool) -> Result<Self, KeyError> {
        match File::open(path) {
            Ok(file) => Self::load(path, file),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if !create {
                    return Err(KeyError::Config(format!(
                        "local KEK file {} does not exist and creating it was not requested",
                        path.display()
                    )));
                }
                match Self::create(path) {
                    Ok(p) => Ok(p),
                    // Lost a creation race with another process: use its file.
                    Err(KeyError::Io { source, .. })
                        if source.kind() == ErrorKind::AlreadyExists =>
                    {
                        let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
                        Self::load(path, file)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(io_err(path, "open", e)),
        }
    }

    /// A provider over an in-memory KEK (tests and tools); `path` is only
    /// used in messages.
    pub fn from_key(path: &Path, kek: SecretKey) -> Self {
        let key_id = fingerprint(&kek);
        Self {
            path: path.to_path_buf(),
            kek,
            key_id,
        }
    }

    /// Path of the KEK file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(path: &Path, mut file: File) -> Result<Self, KeyError> {
        let meta = file.metadata().map_err(|e| io_err(path, "stat", e))?;
        if !meta.is_file() {
            return Err(KeyError::Config(format!(
                "local KEK file {} is not a regular file",
                path.display()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Config(format!(
                "local KEK file {} has mode {mode:03o}: it must not be accessible to group or \
                 others; run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(wrong_size(path, meta.len()));
        }
        // Read at most KEY_LEN + 1 bytes into a fixed zeroizing buffer (no
        // reallocation copies), so a file that grew after the stat is caught too.
        let mut buf = Zeroizing::new([0u8; KEY_LEN + 1]);
        let mut n = 0usize;
        while let Some(rest) = buf.get_mut(n..) {
            if rest.is_empty() {
                break;
            }
            match file.read(rest) {
                Ok(0) => break,
                Ok(k) => n = n.saturating_add(k),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(path, "read", e)),
            }
        }
        if n != KEY_LEN {
            return Err(wrong_size(path, n as u64));
        }
        let kek = SecretKey::take_from(&mut buf[..KEY_LEN])?;
        Ok(Self::from_key(path, kek))
    }

    fn create(path: &Path) -> Result<Self, KeyError> {
        let kek = SecretKey::generate()?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_err(path, "create", e))?;
        let written = file
            .write_all(kek.expose())
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err(path, "write", e));
        if let Err(e) = written {
            drop(file);
            // Never leave a partial KEK behind.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        drop(file);
        crate::fsutil::sync_dir(path)?;
        Ok(Self::from_key(path, kek))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.kek.expose().into())
    }

    /// Wraps `key` under the KEK, bound to `ctx`.
    fn wrap(&self, key: &SecretKey, ctx: &EncryptionContext) -> Result<WrappedKey, KeyError> {
        let mut nonce = [0u8; WRAP_NONCE_LEN];
        fill_random(&mut nonce)?;
        let aad = context_aad(ctx);
        let mut buf = Zeroizing::new(Vec::with_capacity(WRAPPED_LEN));
        buf.extend_from_slice(key.expose());
        self.cipher()
            .encrypt_in_place(&nonce.into(), &aad, &mut *buf)
            .map_err(|_| KeyError::Refused("AES-GCM wrap failed".into()))?;
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(WrappedKey(out))
    }

    fn wrong_key(&self) -> KeyError {
        KeyError::WrongKey(format!(
            "the local KEK at {} is not the one this universe key was wrapped with, \
             or the registry was altered",
            self.path.display()
        ))
    }
}

#[async_trait]
impl KeyProvider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn master_key_id(&self) -> String {
        self.key_id.clone()
    }

    async fn generate_wrapped(&self, ctx: &EncryptionContext) -> Result<WrappedKey, KeyError> {
        let key = SecretKey::generate()?;
        self.wrap(&key, ctx)
    }

    async fn wrap_key(
        &self,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        self.wrap(key, ctx)
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KeyError> {
        if wrapped.0.len() != WRAPPED_LEN {
            return Err(KeyError::WrongKey(format!(
                "wrapped key has {} bytes, a local-provider blob has {WRAPPED_LEN}",
                wrapped.0.len()
            )));
        }
        let (nonce, ct) = wrapped.0.split_at(WRAP_NONCE_LEN);
        let nonce: [u8; WRAP_NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| KeyError::WrongKey("malformed wrapped key".into()))?;
        let aad = context_aad(ctx);
        let mut buf = Zeroizing::new(Vec::with_capacity(ct.len()));
        buf.extend_from_slice(ct);
        self.cipher()
            .decrypt_in_place(&nonce.into(), &aad, &mut *buf)
            .map_err(|_| self.wrong_key())?;
        Ok(SecretKey::take_from(&mut buf[..])?)
    }

    async fn master_key_state(&self) -> Result<MasterKeyState, KeyError> {
        Ok(MasterKeyState::Enabled)
    }
}

/// Canonical encoding of an encryption context, used as AES-GCM AAD:
///
/// `AAD_DOMAIN || u64be(n) || for each (k, v) in key order: u64be(len k) || k || u64be(len v) || v`
///
/// Length prefixes make it injective (no two contexts encode alike); the
/// `BTreeMap` fixes the order.
pub fn context_aad(ctx: &EncryptionContext) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        AAD_DOMAIN.len()
            + 8
            + ctx
                .iter()
                .map(|(k, v)| 16 + k.len() + v.len())
                .sum::<usize>(),
    );
    out.extend_from_slice(AAD_DOMAIN);
    out.extend_from_slice(&(ctx.len() as u64).to_be_bytes());
    for (k, v) in ctx {
        out.extend_from_slice(&(k.len() as u64).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u64).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// `"local:" + hex(SHA-256("ear-sidecar local kek id" || kek)[..8])`.
fn fingerprint(kek: &SecretKey) -> String {
    let mut h = Sha256::new();
    h.update(KEK_ID_DOMAIN);
    h.update(kek.expose());
    let mut digest: [u8; 32] = h.finalize().into();
    let id = format!("local:{}", hex::encode(&digest[..8]));
    digest.zeroize();
    id
}

fn wrong_size(path: &Path, len: u64) -> KeyError {
    KeyError::Config(format!(
        "local KEK file {} holds {len} bytes; a KEK is exactly {KEY_LEN} raw bytes",
        path.display()
    ))
}

fn io_err(path: &Path, what: &str, source: std::io::Error) -> KeyError {
    KeyError::Io {
        context: format!("{what} local KEK file {}", path.display()),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(v: &str) -> EncryptionContext {
        [
            ("ear-sidecar:dir-id".to_string(), "00".repeat(16)),
            ("ear-sidecar:key-version".to_string(), v.to_string()),
        ]
        .into_iter()
        .collect()
    }

    fn new_provider(dir: &Path, name: &str) -> LocalProvider {
        LocalProvider::open_or_create(&dir.join(name), true).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wrap_unwrap_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = new_provider(dir.path(), "kek");
        let key = SecretKey::generate().unwrap();
        let w = p.wrap(&key, &ctx("1")).unwrap();
        assert_eq!(w.0.len(), WRAPPED_LEN);
        let back = p.unwrap(&w, &ctx("1")).await.unwrap();
        assert_eq!(back.expose(), key.expose());
        // Fresh nonce per wrap.
        assert_ne!(p.wrap(&key, &ctx("1")).unwrap(), w);
        // generate_wrapped round-trips too.
        let g = p.generate_wrapped(&ctx("2")).await.unwrap();
        p.unwrap(&g, &ctx("2")).await.unwrap();
        assert_eq!(p.master_key_state().await.unwrap(), MasterKeyState::Enabled);
        assert_eq!(p.kind(), "local");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reopen_gives_same_kek() {
        let dir = tempfile::tempdir().unwrap();
        let p = new_provider(dir.path(), "kek");
        let w = p.generate_wrapped(&ctx("1")).await.unwrap();
        let q = LocalProvider::open_or_create(&dir.path().join("kek"), false).unwrap();
        assert_eq!(p.master_key_id(), q.master_key_id());
        q.unwrap(&w, &ctx("1")).await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn different_kek_is_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = new_provider(dir.path(), "a");
        let b = new_provider(dir.path(), "b");
        assert_ne!(a.master_key_id(), b.master_key_id());
        let w = a.generate_wrapped(&ctx("1")).await.unwrap();
        let err = b.unwrap(&w, &ctx("1")).await.unwrap_err();
        match err {
            KeyError::WrongKey(msg) => {
                assert!(msg.contains("is not the one this universe key was wrapped with"));
                assert!(msg.contains(&dir.path().join("b").display().to_string()));
            }
            other => panic!("expected WrongKey, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn changed_context_or_blob_is_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = new_provider(dir.path(), "kek");
        let w = p.generate_wrapped(&ctx("1")).await.unwrap();
        assert!(matches!(
            p.unwrap(&w, &ctx("2")).await,
            Err(KeyError::WrongKey(_))
        ));
        let mut extra = ctx("1");
        extra.insert("x".into(), String::new());
        assert!(matches!(
            p.unwrap(&w, &extra).await,
            Err(KeyError::WrongKey(_))
        ));
        let mut flipped = w.clone();
        flipped.0[20] ^= 1;
        assert!(matches!(
            p.unwrap(&flipped, &ctx("1")).await,
            Err(KeyError::WrongKey(_))
        ));
        let short = WrappedKey(w.0[..10].to_vec());
        assert!(matches!(
            p.unwrap(&short, &ctx("1")).await,
            Err(KeyError::WrongKey(_))
        ));
    }

    #[test]
    fn aad_is_injective_on_boundaries() {
        let a: EncryptionContext = [("ab".to_string(), "c".to_string())].into_iter().collect();
        let b: EncryptionContext = [("a".to_string(), "bc".to_string())].into_iter().collect();
        assert_ne!(context_aad(&a), context_aad(&b));
        assert_ne!(context_aad(&a), context_aad(&EncryptionContext::new()));
    }

    #[test]
    fn kek_file_created_0600_with_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let p = LocalProvider::open_or_create(&path, true).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let id = p.master_key_id();
        assert!(
            id.starts_with("local:") && id.len() == "local:".len() + 16,
            "{id}"
        );
        // The id is the documented fingerprint of the file's bytes.
        let mut raw = std::fs::read(&path).unwrap();
        let k = SecretKey::take_from(&mut raw).unwrap();
        assert_eq!(fingerprint(&k), id);
        // Debug shows neither key bytes nor the raw key in hex.
        let dbg = format!("{p:?}");
        assert!(!dbg.contains(&hex::encode(k.expose())), "{dbg}");
    }

    #[test]
    fn missing_without_create_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalProvider::open_or_create(&dir.path().join("nope"), false).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn group_readable_kek_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        LocalProvider::open_or_create(&path, true).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = LocalProvider::open_or_create(&path, true).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("chmod 600"), "{msg}");
        assert!(msg.contains("640"), "{msg}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(LocalProvider::open_or_create(&path, false).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(LocalProvider::open_or_create(&path, false).is_ok());
    }

    #[test]
    fn wrong_size_kek_refused() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 31, 33, 64] {
            let path = dir.path().join(format!("kek{len}"));
            std::fs::write(&path, vec![1u8; len]).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = LocalProvider::open_or_create(&path, true).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("holds {len} bytes")), "{msg}");
            assert!(msg.contains("exactly 32"), "{msg}");
        }
    }

    #[test]
    fn directory_is_not_a_kek() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalProvider::open_or_create(dir.path(), true).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
