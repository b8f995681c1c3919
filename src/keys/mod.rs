//! Key providers and the universe-key registry.
//!
//! A [`KeyProvider`] wraps and unwraps universe keys under a key-encryption key
//! it controls (a local KEK file, or a customer's AWS KMS CMK). The registry
//! (`<data-dir>/keys.json`) stores only wrapped blobs, the provider identity and
//! the encryption context; it is written atomically. At start-up the registry
//! asks the provider to unwrap every version into a [`crate::crypto::KeyRing`],
//! which lives only in memory.
//!
//! The store and server never see a provider: they get a `KeyRing`. That is
//! what lets an AWS provider plug in without touching them.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::crypto::SecretKey;

pub mod aws;
pub mod local;
pub mod memory;
pub mod registry;
pub mod revocation;
pub mod rewrap;

/// Key/value pairs bound to a wrapped key (AWS KMS `EncryptionContext`; AAD for
/// the local provider). Ordered so that its canonical encoding is stable.
pub type EncryptionContext = BTreeMap<String, String>;

/// A universe key as stored: ciphertext produced by the provider.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(pub Vec<u8>);

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WrappedKey({} bytes)", self.0.len())
    }
}

/// State of the master key as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeyState {
    /// Usable.
    Enabled,
    /// The KMS itself says the key is not usable (Disabled, PendingDeletion, …):
    /// grounds for failing closed.
    Revoked(String),
}

/// Errors of the key layer.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The provider could not be reached or timed out (transient).
    #[error("key provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused: missing permission, wrong key, invalid state.
    #[error("key provider refused: {0}")]
    Refused(String),
    /// The wrapped key did not authenticate under this master key.
    #[error("cannot unwrap the universe key: {0}")]
    WrongKey(String),
    /// Configuration problem (bad ARN, KEK file, provider mismatch…).
    #[error("{0}")]
    Config(String),
    /// Registry file problems.
    #[error("key registry {path}: {msg}")]
    Registry {
        /// Path of the registry file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// I/O on key files.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Crypto layer error (random source failure…).
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}

impl From<crate::fsutil::FsError> for KeyError {
    fn from(e: crate::fsutil::FsError) -> Self {
        KeyError::Io {
            context: e.what,
            source: e.source,
        }
    }
}

/// How [`with_deadline`] gave up.
#[derive(Debug)]
pub enum DeadlineError {
    /// The call failed with an error that retrying cannot fix.
    Failed(KeyError),
    /// The deadline passed; `last` is the last transient failure, if any.
    TimedOut {
        /// Message of the last [`KeyError::Unavailable`].
        last: Option<String>,
    },
}

/// Runs the key-provider call `op` until it succeeds, fails with something
/// other than [`KeyError::Unavailable`], or `end` passes. Between transient
/// failures it waits 250 ms, doubling to 5 s, never past `end`. Bounds every
/// start-up call to a provider (reachability, validation, key generation,
/// unwrap), so an unreachable KMS fails start-up in time.
pub async fn with_deadline<T, F, Fut>(
    end: tokio::time::Instant,
    mut op: F,
) -> Result<T, DeadlineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, KeyError>>,
{
    let mut pause = std::time::Duration::from_millis(250);
    let mut last = None;
    loop {
        match tokio::time::timeout_at(end, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(KeyError::Unavailable(msg))) => last = Some(msg),
            Ok(Err(other)) => return Err(DeadlineError::Failed(other)),
            Err(_elapsed) => break,
        }
        let now = tokio::time::Instant::now();
        if now >= end {
            break;
        }
        tokio::time::sleep_until((now + pause).min(end)).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
        if tokio::time::Instant::now() >= end {
            break;
        }
    }
    Err(DeadlineError::TimedOut { last })
}

/// A key-encryption-key provider. Implementations: [`local::LocalProvider`],
/// and the AWS KMS provider.
#[async_trait]
pub trait KeyProvider: Send + Sync {
    /// Short provider name stored in the registry (`"local"`, `"aws"`).
    fn kind(&self) -> &'static str;

    /// Identity of the master key (a KEK fingerprint, a CMK ARN). Stored in the
    /// registry; a directory refuses to start under a different one.
    fn master_key_id(&self) -> String;

    /// Generates a new 256-bit universe key and returns it only wrapped.
    async fn generate_wrapped(&self, ctx: &EncryptionContext) -> Result<WrappedKey, KeyError>;

    /// Wraps an existing universe key under this provider's master key, bound
    /// to `ctx` (rewrap of a directory's keys into this provider). Providers
    /// that cannot take plaintext keys refuse.
    async fn wrap_key(
        &self,
        _key: &SecretKey,
        _ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        Err(KeyError::Config(format!(
            "the {} key provider cannot wrap an existing key",
            self.kind()
        )))
    }

    /// Unwraps a stored universe key, bound to the same context.
    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KeyError>;

    /// Reports whether the master key is still usable (revocation check).
    async fn master_key_state(&self) -> Result<MasterKeyState, KeyError>;

    /// Proves the master key still unwraps: unwraps `canary` (a stored
    /// wrapped key) and drops the plaintext at once (it zeroizes on drop).
    /// `Ok(Enabled)` when it unwrapped, `Ok(Revoked)` when the provider
    /// refused in a way that means the key can no longer be used,
    /// `Err` for anything transient. The default treats a wrong-key answer as
    /// revocation and every other failure as transient.
    async fn canary_state(
        &self,
        canary: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<MasterKeyState, KeyError> {
        match self.unwrap(canary, ctx).await {
            Ok(key) => {
                drop(key);
                Ok(MasterKeyState::Enabled)
            }
            Err(KeyError::WrongKey(m)) => Ok(MasterKeyState::Revoked(format!(
                "the master key no longer unwraps the canary: {m}"
            ))),
            Err(e) => Err(e),
        }
    }
}
