//! The key registry `<data-dir>/keys.json`: which encryption mode and provider
//! a data directory was initialised with, the master key's identity, and every
//! universe-key version, stored only wrapped.
//!
//! The registry is what stops a data directory from silently changing its
//! protection: encryption cannot be added to or removed from existing data,
//! and a different provider or master key is refused at start-up. It is
//! parsed strictly (unknown fields, duplicate versions, bad base64 are errors)
//! and written atomically (tmp file, fsync, rename, fsync directory).
//!
//! An encrypted registry is *sealed*: every version carries a `mac`, an
//! HMAC-SHA256 over a canonical encoding of every other field
//! ([`Registry::canonical_encoding`]) under a key derived from that version's
//! universe key ([`crate::crypto::registry_mac`]). All of them are checked
//! right after the keys are unwrapped, so an offline edit of the active
//! version, the provider, the master key id or the version list is refused at
//! start-up, even by someone who can wrap a key of their own choosing under
//! the master key (they lack the other versions' keys). Only a registry
//! written before sealing existed (one key version, no `mac`) is accepted
//! unsealed, and sealed on first start.
//!
//! File layout (format 1, pretty JSON):
//!
//! ```text
//! { "format": 1, "dir_id": "<32 hex chars>",
//!   "encryption": "on" | "off", "provider": "local" | "aws" | null,
//!   "master_key_id": "<provider master_key_id()>" | null,
//!   "active_version": 1 | null,
//!   "versions": [ { "version": 1, "wrapped": "<base64>", "context": { ... },
//!                   "created_unix": 1764270000, "mac": "<64 hex chars>" } ] }
//! ```
//!
//! With encryption off, `provider`, `master_key_id` and `active_version` are
//! null and `versions` is empty (there is no key to make a MAC with).

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{EncryptionContext, KeyError, KeyProvider, WrappedKey};
use crate::crypto::{fill_random, KeyRing, SecretKey};

/// File name of the registry inside the data directory.
pub const REGISTRY_FILE: &str = "keys.json";
/// The registry format this build reads and writes.
pub const REGISTRY_FORMAT: u32 = 1;
/// Context key: the data directory's id.
pub const CTX_DIR_ID: &str = "ear-sidecar:dir-id";
/// Context key: what the wrapped key is for.
pub const CTX_PURPOSE: &str = "ear-sidecar:purpose";
/// Context key: the universe-key version.
pub const CTX_KEY_VERSION: &str = "ear-sidecar:key-version";
/// Value of [`CTX_PURPOSE`] for universe keys.
pub const PURPOSE_UNIVERSE_KEY: &str = "universe-key";
/// Domain-separation prefix of [`Registry::canonical_encoding`].
pub const REGISTRY_MAC_DOMAIN: &[u8] = b"ear-sidecar/v2 key-registry";

/// The encryption context a universe key of `version` in directory `dir_id`
/// is wrapped under.
pub fn universe_key_context(dir_id: &str, version: u32) -> EncryptionContext {
    [
        (CTX_DIR_ID.to_string(), dir_id.to_string()),
        (CTX_PURPOSE.to_string(), PURPOSE_UNIVERSE_KEY.to_string()),
        (CTX_KEY_VERSION.to_string(), version.to_string()),
    ]
    .into_iter()
    .collect()
}

/// One stored universe-key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersion {
    /// Version number (≥ 1).
    pub version: u32,
    /// The provider's ciphertext (its `Debug` prints only the length).
    pub wrapped: WrappedKey,
    /// The context it was wrapped under.
    pub context: EncryptionContext,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// What the status command may show about a version: no blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionInfo {
    /// Version number.
    pub version: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// The parsed, validated registry of one data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    path: PathBuf,
    dir_id: String,
    encryption_on: bool,
    provider: Option<String>,
    master_key_id: Option<String>,
    active_version: Option<u32>,
    versions: Vec<KeyVersion>,
    /// Per version: HMAC-SHA256 of the canonical encoding under a key derived
    /// from that version's universe key.
    macs: BTreeMap<u32, [u8; 32]>,
}

/// How [`Registry::verify_seal`] found the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// Every version's MAC verified under its own key.
    Verified,
    /// No MAC, written before sealing existed (one key version): accepted
    /// once; seal it with [`Registry::save`].
    Legacy,
    /// Encryption is off: nothing to seal.
    Unencrypted,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    On,
    Off,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV1 {
    format: u32,
    dir_id: String,
    encryption: Mode,
    provider: Option<String>,
    master_key_id: Option<String>,
    active_version: Option<u32>,
    versions: Vec<VersionV1>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionV1 {
    version: u32,
    wrapped: String,
    context: BTreeMap<String, String>,
    created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

impl Registry {
    /// Path of the registry file of `data_dir`.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join(REGISTRY_FILE)
    }

    /// Loads and validates `<data_dir>/keys.json`; `Ok(None)` when it does not exist.
    pub fn load(data_dir: &Path) -> Result<Option<Registry>, KeyError> {
        let path = Self::path_in(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(KeyError::Io {
                    context: format!("read key registry {}", path.display()),
                    source,
                })
            }
        };
        Self::parse(&path, &bytes).map(Some)
    }

    /// Parses registry bytes (`path` is used in messages and kept for saving).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Registry, KeyError> {
        let err = |msg: String| KeyError::Registry {
            path: path.display().to_string(),
            msg,
        };
        // Look at the format first, so a newer file gets a clear message
        // rather than an unknown-field error.
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| err(format!("not valid JSON ({e}); the file is corrupt")))?;
        match value.get("format").and_then(serde_json::Value::as_u64) {
            Some(f) if f == u64::from(REGISTRY_FORMAT) => {}
            Some(f) => {
                return Err(err(format!(
                    "unknown format {f}; this build understands format {REGISTRY_FORMAT}"
                )))
            }
            None => return Err(err("missing or non-integer \"format\" field".into())),
        }
        let file: FileV1 =
            serde_json::from_value(value).map_err(|e| err(format!("invalid contents: {e}")))?;

        if file.dir_id.len() != 32
            || !file
                .dir_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err(format!(
                "dir_id {:?} is not 32 lowercase hex characters",
                file.dir_id
            )));
        }

        let encryption_on = file.encryption == Mode::On;
        let mut macs = BTreeMap::new();
        let mut versions = Vec::with_capacity(file.versions.len());
        if encryption_on {
            let provider = file.provider.as_deref().unwrap_or("");
            if provider.is_empty() {
                return Err(err("encryption is on but \"provider\" is missing".into()));
            }
            if file.master_key_id.as_deref().unwrap_or("").is_empty() {
                return Err(err(
                    "encryption is on but \"master_key_id\" is missing".into()
                ));
            }
            let mut seen = BTreeSet::new();
            for v in file.versions {
                if v.version == 0 {
                    return Err(err("key version 0 is invalid (versions start at 1)".into()));
                }
                if !seen.insert(v.version) {
                    return Err(err(format!("duplicate key version {}", v.version)));
                }
                let wrapped = B64.decode(v.wrapped.as_bytes()).map_err(|e| {
                    err(format!(
                        "key version {}: \"wrapped\" is not valid base64 ({e})",
                        v.version
                    ))
                })?;
                if wrapped.is_empty() {
                    return Err(err(format!("key version {}: empty wrapped key", v.version)));
                }
                let expected = universe_key_context(&file.dir_id, v.version);
                for (k, want) in &expected {
                    if v.context.get(k) != Some(want) {
                        return Err(err(format!(
                            "key version {}: context entry {k:?} is {:?}, expected {want:?}",
                            v.version,
                            v.context.get(k)
                        )));
                    }
                }
                if let Some(m) = v.mac.as_deref() {
                    let mac = hex::decode(m)
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or_else(|| {
                            err(format!(
                                "key version {}: \"mac\" is not 64 hex characters",
                                v.version
                            ))
                        })?;
                    macs.insert(v.version, mac);
                }
                versions.push(KeyVersion {
                    version: v.version,
                    wrapped: WrappedKey(wrapped),
                    context: v.context,
                    created_unix: v.created_unix,
                });
            }
            match file.active_version {
                None => return Err(err("encryption is on but \"active_version\" is null".into())),
                Some(a) if !seen.contains(&a) => {
                    return Err(err(format!(
                        "active version {a} is not among the stored versions"
                    )))
                }
                Some(_) => {}
            }
        } else if file.provider.is_some()
            || file.master_key_id.is_some()
            || file.active_version.is_some()
            || !file.versions.is_empty()
        {
            return Err(err(
                "encryption is off but provider, master_key_id, active_version or versions \
                 are set"
                    .into(),
            ));
        }
        versions.sort_by_key(|v| v.version);

        Ok(Registry {
            path: path.to_path_buf(),
            dir_id: file.dir_id,
            encryption_on,
            provider: file.provider,
            master_key_id: file.master_key_id,
            active_version: file.active_version,
            versions,
            macs,
        })
    }

    /// Initialises the registry of `data_dir` with a random dir id and, when
    /// `encryption_on`, universe-key version 1 generated by `provider`. Refuses
    /// to overwrite an existing registry.
    pub async fn create(
        data_dir: &Path,
        encryption_on: bool,
        provider: Option<&dyn KeyProvider>,
    ) -> Result<Registry, KeyError> {
        let path = Self::path_in(data_dir);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {
                return Err(KeyError::Registry {
                    path: path.display().to_string(),
                    msg: "already exists; refusing to overwrite it".into(),
                })
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KeyError::Io {
                    context: format!("stat key registry {}", path.display()),
                    source,
                })
            }
        }
        let mut id = [0u8; 16];
        fill_random(&mut id)?;
        let dir_id = hex::encode(id);

        let mut reg = if encryption_on {
            let provider = provider.ok_or_else(|| {
                KeyError::Config("encryption is on but no key provider is configured".into())
            })?;
            let context = universe_key_context(&dir_id, 1);
            let wrapped = provider.generate_wrapped(&context).await?;
            Registry {
                path,
                dir_id,
                encryption_on: true,
                provider: Some(provider.kind().to_string()),
                master_key_id: Some(provider.master_key_id()),
                active_version: Some(1),
                versions: vec![KeyVersion {
                    version: 1,
                    wrapped,
                    context,
                    created_unix: now_unix(),
                }],
                macs: BTreeMap::new(),
            }
        } else {
            Registry {
                path,
                dir_id,
                encryption_on: false,
                provider: None,
                master_key_id: None,
                active_version: None,
                versions: Vec::new(),
                macs: BTreeMap::new(),
            }
        };
        match provider.filter(|_| encryption_on) {
            // Sealed from the first write: one unwrap of the new key.
            Some(p) => {
                let ring = reg.unwrap_versions(p, 1).await?;
                reg.save(Some(&ring))?;
            }
            None => reg.save(None)?,
        }
        Ok(reg)
    }

    /// The JSON this registry is stored as.
    pub fn to_json(&self) -> Result<Vec<u8>, KeyError> {
        let file = FileV1 {
            format: REGISTRY_FORMAT,
            dir_id: self.dir_id.clone(),
            encryption: if self.encryption_on {
                Mode::On
            } else {
                Mode::Off
            },
            provider: self.provider.clone(),
            master_key_id: self.master_key_id.clone(),
            active_version: self.active_version,
            versions: self
                .versions
                .iter()
                .map(|v| VersionV1 {
                    version: v.version,
                    wrapped: B64.encode(&v.wrapped.0),
                    context: v.context.clone(),
                    created_unix: v.created_unix,
                    mac: self.macs.get(&v.version).map(hex::encode),
                })
                .collect(),
        };
        let mut out = serde_json::to_vec_pretty(&file).map_err(|e| KeyError::Registry {
            path: self.path.display().to_string(),
            msg: format!("cannot serialise: {e}"),
        })?;
        out.push(b'\n');
        Ok(out)
    }

    /// Seals (encryption on: `keys` must hold every stored version) and
    /// writes the registry atomically to its path: `keys.json.tmp` is written
    /// and fsynced, renamed over `keys.json`, and the directory fsynced, so a
    /// crash leaves the old or the new registry, never neither.
    pub fn save(&mut self, keys: Option<&KeyRing>) -> Result<(), KeyError> {
        match keys {
            Some(ring) => self.save_with_keys(ring, &[]),
            None if self.encryption_on => {
                Err(self.error("cannot seal an encrypted registry without its keys".into()))
            }
            None => self.write(),
        }
    }

    /// Like [`Registry::save`], with universe keys that `ring` does not hold
    /// yet (a rotation saves the new version before the ring gets it): each
    /// stored version's key is taken from `extra` or else from `ring`.
    pub fn save_with_keys(
        &mut self,
        ring: &KeyRing,
        extra: &[(u32, &SecretKey)],
    ) -> Result<(), KeyError> {
        if self.encryption_on {
            let dir_id = self.dir_id_bytes()?;
            let msg = self.canonical_encoding();
            let mut macs = BTreeMap::new();
            for v in &self.versions {
                let mac = match extra.iter().find(|(n, _)| *n == v.version) {
                    Some((_, key)) => crate::crypto::registry_mac(key, &dir_id, &msg),
                    None => ring.registry_mac(v.version, &dir_id, &msg).map_err(|e| {
                        self.error(format!("cannot seal key version {}: {e}", v.version))
                    })?,
                };
                macs.insert(v.version, mac);
            }
            self.macs = macs;
        }
        self.write()
    }

    fn write(&self) -> Result<(), KeyError> {
        crate::fsutil::write_atomic(&self.path, &self.to_json()?).map_err(KeyError::from)
    }

    fn error(&self, msg: String) -> KeyError {
        KeyError::Registry {
            path: self.path.display().to_string(),
            msg,
        }
    }

    /// The bytes every MAC covers: every field but the `mac`s, length-prefixed so
    /// that no two registries encode alike (normative text in doc/FORMAT.md):
    ///
    /// ```text
    /// "ear-sidecar/v2 key-registry" || be32(format) || str(dir_id)
    /// || u8(encryption on) || opt(provider) || opt(master_key_id)
    /// || be32(active_version or 0) || be64(number of versions)
    /// || per version, ascending: be32(version) || bytes(wrapped)
    ///    || be64(created_unix) || be64(context entries) || (str(k) || str(v))*
    /// str(s) = bytes(UTF-8 of s); bytes(b) = be64(len b) || b;
    /// opt(None) = 0x00; opt(Some(s)) = 0x01 || str(s)
    /// ```
    pub fn canonical_encoding(&self) -> Vec<u8> {
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u64).to_be_bytes());
            out.extend_from_slice(b);
        }
        fn opt(out: &mut Vec<u8>, s: Option<&str>) {
            match s {
                None => out.push(0),
                Some(s) => {
                    out.push(1);
                    bytes(out, s.as_bytes());
                }
            }
        }
        let mut out = Vec::with_capacity(256 + 160 * self.versions.len());
        out.extend_from_slice(REGISTRY_MAC_DOMAIN);
        out.extend_from_slice(&REGISTRY_FORMAT.to_be_bytes());
        bytes(&mut out, self.dir_id.as_bytes());
        out.push(u8::from(self.encryption_on));
        opt(&mut out, self.provider.as_deref());
        opt(&mut out, self.master_key_id.as_deref());
        out.extend_from_slice(&self.active_version.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&(self.versions.len() as u64).to_be_bytes());
        for v in &self.versions {
            out.extend_from_slice(&v.version.to_be_bytes());
            bytes(&mut out, &v.wrapped.0);
            out.extend_from_slice(&v.created_unix.to_be_bytes());
            out.extend_from_slice(&(v.context.len() as u64).to_be_bytes());
            for (k, val) in &v.context {
                bytes(&mut out, k.as_bytes());
                bytes(&mut out, val.as_bytes());
            }
        }
        out
    }

    /// The directory id as 16 bytes (a malformed one is an error).
    pub fn dir_id_bytes(&self) -> Result<[u8; 16], KeyError> {
        hex::decode(&self.dir_id)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| self.error("malformed dir_id".into()))
    }

    /// True when the registry carries its MACs.
    pub fn is_sealed(&self) -> bool {
        !self.macs.is_empty()
    }

    /// Checks every version's MAC against `ring` (which must hold every
    /// stored version). A registry without any MAC is accepted only as
    /// written before sealing existed: one key version, version 1, active.
    /// Anything else was edited offline and is refused with one line naming
    /// the fix.
    pub fn verify_seal(&self, ring: &KeyRing) -> Result<Seal, KeyError> {
        if !self.encryption_on {
            return Ok(Seal::Unencrypted);
        }
        let held = || self.versions.iter().map(|v| v.version).collect::<Vec<_>>();
        if self.macs.is_empty() {
            let legacy = self.active_version == Some(1) && held() == [1];
            if legacy {
                return Ok(Seal::Legacy);
            }
            return Err(self.error(format!(
                "has no \"mac\" but holds key versions {:?} (active {}): only a registry \
                 from before sealing (version 1 alone) may lack it, so this file was edited \
                 offline; restore keys.json from backup",
                held(),
                self.active_version.unwrap_or(0)
            )));
        }
        let dir_id = self.dir_id_bytes()?;
        let msg = self.canonical_encoding();
        for v in &self.versions {
            let edited = |what: &str| {
                self.error(format!(
                    "key version {} {what}: the file was edited offline (active version, \
                     provider, master key id or key versions changed); restore keys.json from \
                     backup or undo the edit",
                    v.version
                ))
            };
            let Some(stored) = self.macs.get(&v.version) else {
                return Err(edited("has no \"mac\""));
            };
            let want = ring
                .registry_mac(v.version, &dir_id, &msg)
                .map_err(|e| self.error(format!("key version {}: {e}", v.version)))?;
            use subtle::ConstantTimeEq;
            if !bool::from(want.ct_eq(stored)) {
                return Err(edited("has a MAC that does not verify"));
            }
        }
        Ok(Seal::Verified)
    }

    /// Checks a registry a running sidecar reads back from disk before it
    /// writes a new one (rotation, retirement, online rewrap): sealed by
    /// `ring` ([`Registry::verify_seal`], so it holds no version the ring
    /// lacks) and with the ring's active version. An authentic older copy put
    /// back behind the sidecar passes the seal check alone, and a rotation
    /// from it would give a version number the ring already holds to a new key.
    pub fn verify_current(&self, ring: &KeyRing) -> Result<Seal, KeyError> {
        let seal = self.verify_seal(ring)?;
        let active = ring.snapshot().active;
        if self.encryption_on && self.active_version != Some(active) {
            return Err(self.error(format!(
                "names active key version {}, but the running sidecar writes with version \
                 {active}: it was replaced behind the sidecar (an older copy?); nothing \
                 changed: put back the keys.json the sidecar wrote, or restart the sidecar",
                self.active_version.unwrap_or(0)
            )));
        }
        Ok(seal)
    }

    /// Checks that this directory may be served with the configured mode and
    /// provider: encryption can be neither added nor removed, and the provider
    /// kind and master key must be the ones the directory was initialised with.
    pub fn check_compatible(
        &self,
        encryption_on: bool,
        provider: Option<&dyn KeyProvider>,
    ) -> Result<(), KeyError> {
        let dir = self
            .path
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if encryption_on != self.encryption_on {
            return Err(KeyError::Config(if self.encryption_on {
                format!(
                    "data directory {dir} is encrypted, but encryption is configured off: \
                     encryption cannot be removed (start with --encryption on --kms {})",
                    self.provider.as_deref().unwrap_or("local|aws")
                )
            } else {
                format!(
                    "data directory {dir} was initialised with encryption off, but encryption \
                     is configured on: encrypt it first with `ear-sidecar keys encrypt --kms \
                     local|aws --data-dir {dir}` (or --admin-socket PATH while it serves), then \
                     start with --encryption on"
                )
            }));
        }
        if !encryption_on {
            return Ok(());
        }
        let provider = provider.ok_or_else(|| {
            KeyError::Config("encryption is on but no key provider is configured".into())
        })?;
        let stored_kind = self.provider.as_deref().unwrap_or("");
        if provider.kind() != stored_kind {
            return Err(KeyError::Config(format!(
                "data directory {dir}: this data directory is protected by provider \
                 {stored_kind}; it cannot be switched silently (configured provider: {})",
                provider.kind()
            )));
        }
        let stored_id = self.master_key_id.as_deref().unwrap_or("");
        let configured_id = provider.master_key_id();
        if configured_id != stored_id && stored_kind == "local" {
            return Err(KeyError::WrongKey(format!(
                "data directory {dir} was initialised with a different local KEK \
                 (fingerprint {stored_id}); the configured KEK file (--local-kek-file) has \
                 fingerprint {configured_id}. Restore the original KEK file; the data cannot be \
                 read without it (if keys.json was edited instead, restore it from backup)"
            )));
        }
        if configured_id != stored_id {
            return Err(KeyError::Config(format!(
                "data directory {dir} is encrypted under master key {stored_id}; refusing to \
                 start with {configured_id}; changing keys is an explicit operation (keys \
                 rewrap), and if keys.json was edited, restore it from backup"
            )));
        }
        Ok(())
    }

    /// Unwraps every stored version with `provider` (after
    /// [`Registry::check_compatible`]) into a key ring whose active version is
    /// the registry's, then checks the registry's MAC with it
    /// ([`Registry::verify_seal`]): an edited registry yields no ring.
    pub async fn unwrap_all(
        &self,
        provider: &dyn KeyProvider,
        cache_capacity: usize,
    ) -> Result<KeyRing, KeyError> {
        self.check_compatible(true, Some(provider))?;
        let ring = self.unwrap_versions(provider, cache_capacity).await?;
        self.verify_seal(&ring)?;
        Ok(ring)
    }

    /// Unwraps every version into a ring, without the compatibility and seal
    /// checks (creation, and [`Registry::unwrap_all`]).
    async fn unwrap_versions(
        &self,
        provider: &dyn KeyProvider,
        cache_capacity: usize,
    ) -> Result<KeyRing, KeyError> {
        let active = self.active_version.ok_or_else(|| KeyError::Registry {
            path: self.path.display().to_string(),
            msg: "no active key version".into(),
        })?;
        let mut keys: BTreeMap<u32, SecretKey> = BTreeMap::new();
        for v in &self.versions {
            let key = provider
                .unwrap(&v.wrapped, &v.context)
                .await
                .map_err(|e| with_version(e, v.version))?;
            keys.insert(v.version, key);
        }
        Ok(KeyRing::new(keys, active, cache_capacity)?)
    }

    /// Moves every version under a new master key (rewrap): `wrapped` must
    /// hold a blob for exactly the stored versions, each wrapping the same
    /// universe key under the same context. Versions, contexts and the active
    /// version are unchanged; [`Registry::save`] then seals and writes it.
    pub fn set_wrapping(
        &mut self,
        provider_kind: &str,
        master_key_id: String,
        mut wrapped: BTreeMap<u32, WrappedKey>,
    ) -> Result<(), KeyError> {
        if !self.encryption_on {
            return Err(self.error("encryption is off: there are no keys to rewrap".into()));
        }
        let stored: BTreeSet<u32> = self.versions.iter().map(|v| v.version).collect();
        let given: BTreeSet<u32> = wrapped.keys().copied().collect();
        if stored != given {
            return Err(self.error(format!(
                "rewrap covers key versions {given:?}, but the registry holds {stored:?}"
            )));
        }
        for v in &mut self.versions {
            if let Some(w) = wrapped.remove(&v.version) {
                v.wrapped = w;
            }
        }
        self.provider = Some(provider_kind.to_string());
        self.master_key_id = Some(master_key_id);
        Ok(())
    }

    /// Path of the registry file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data directory's random id (32 hex chars).
    pub fn dir_id(&self) -> &str {
        &self.dir_id
    }

    /// Whether the directory was initialised with encryption.
    pub fn encryption_on(&self) -> bool {
        self.encryption_on
    }

    /// Provider kind (`"local"`, `"aws"`); `None` when encryption is off.
    pub fn provider(&self) -> Option<&str> {
        self.provider.as_deref()
    }

    /// The master key's identity; `None` when encryption is off.
    pub fn master_key_id(&self) -> Option<&str> {
        self.master_key_id.as_deref()
    }

    /// Version used for new writes; `None` when encryption is off.
    pub fn active_version(&self) -> Option<u32> {
        self.active_version
    }

    /// Stored versions (ascending), without their blobs.
    pub fn versions(&self) -> Vec<VersionInfo> {
        self.versions
            .iter()
            .map(|v| VersionInfo {
                version: v.version,
                created_unix: v.created_unix,
            })
            .collect()
    }

    /// The stored versions with their wrapped blobs (for rotation / rewrap tools).
    pub fn key_versions(&self) -> &[KeyVersion] {
        &self.versions
    }
}

/// Key rotation and retirement: the registry side of the key lifecycle.
/// The caller (the app's key operations) orders these against the key ring
/// and the store: a new version is saved before any block uses it, and a
/// version is removed only once no block or header uses it.
impl Registry {
    /// The version a rotation creates: one above every stored version.
    pub fn next_version(&self) -> Result<u32, KeyError> {
        self.versions
            .iter()
            .map(|v| v.version)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| self.error("all 2^32 key versions are used up".into()))
    }

    /// Rotates the universe key: has `provider` generate a new version
    /// (local: a random key wrapped by the KEK; aws:
    /// `GenerateDataKeyWithoutPlaintext` with the version in the
    /// encryption context), unwraps it once to prove it works, makes it
    /// the active version and saves the registry atomically, sealed with
    /// the keys of `ring` and the new key. Returns the new version and its
    /// key for the key ring; on any failure the registry (file and value)
    /// is unchanged.
    pub async fn rotate(
        &mut self,
        provider: &dyn KeyProvider,
        ring: &KeyRing,
    ) -> Result<(u32, SecretKey), KeyError> {
        self.check_compatible(true, Some(provider))?;
        let version = self.next_version()?;
        let context = universe_key_context(&self.dir_id, version);
        let wrapped = provider
            .generate_wrapped(&context)
            .await
            .map_err(|e| with_version(e, version))?;
        let key = provider
            .unwrap(&wrapped, &context)
            .await
            .map_err(|e| with_version(e, version))?;
        let mut next = self.clone();
        next.versions.push(KeyVersion {
            version,
            wrapped,
            context,
            created_unix: now_unix(),
        });
        next.active_version = Some(version);
        next.save_with_keys(ring, &[(version, &key)])?;
        *self = next;
        Ok((version, key))
    }

    /// Switches a registry with encryption off to on (`keys encrypt`): a new
    /// universe key version 1 generated and wrapped by `provider`, unwrapped
    /// once to prove it works, sealed and saved atomically. Returns the key
    /// ring the exports switch to. On any failure the registry (file and
    /// value) is unchanged; encryption already on is refused.
    pub async fn enable_encryption(
        &mut self,
        provider: &dyn KeyProvider,
        cache_capacity: usize,
    ) -> Result<KeyRing, KeyError> {
        if self.encryption_on {
            return Err(self.error(
                "encryption is already on for this data directory; nothing to encrypt".into(),
            ));
        }
        let context = universe_key_context(&self.dir_id, 1);
        let wrapped = provider
            .generate_wrapped(&context)
            .await
            .map_err(|e| with_version(e, 1))?;
        let mut next = self.clone();
        next.encryption_on = true;
        next.provider = Some(provider.kind().to_string());
        next.master_key_id = Some(provider.master_key_id());
        next.active_version = Some(1);
        next.versions = vec![KeyVersion {
            version: 1,
            wrapped,
            context,
            created_unix: now_unix(),
        }];
        let ring = next.unwrap_versions(provider, cache_capacity).await?;
        next.save(Some(&ring))?;
        *self = next;
        Ok(ring)
    }

    /// Removes version `version` and its wrapped key from the registry and
    /// saves it atomically, sealed with the keys of `ring` (crypto-shredding
    /// once no copy of the old file remains). Refuses the active version and
    /// a version not stored. The caller has made sure no block or header
    /// uses it.
    pub fn retire(&mut self, version: u32, ring: &KeyRing) -> Result<(), KeyError> {
        if self.active_version == Some(version) {
            return Err(self.error(format!(
                "key version {version} is the active version; rotate first, then retire it"
            )));
        }
        if !self.versions.iter().any(|v| v.version == version) {
            return Err(self.error(format!(
                "there is no key version {version} (stored: {})",
                self.versions
                    .iter()
                    .map(|v| v.version.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut next = self.clone();
        next.versions.retain(|v| v.version != version);
        next.save(Some(ring))?;
        *self = next;
        Ok(())
    }
}

/// `e` with "key version N: " before its message.
pub(crate) fn with_version(e: KeyError, version: u32) -> KeyError {
    match e {
        KeyError::WrongKey(m) => KeyError::WrongKey(format!("key version {version}: {m}")),
        KeyError::Refused(m) => KeyError::Refused(format!("key version {version}: {m}")),
        KeyError::Unavailable(m) => KeyError::Unavailable(format!("key version {version}: {m}")),
        other => other,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::local::LocalProvider;
    use crate::keys::MasterKeyState;
    use async_trait::async_trait;
    use std::os::unix::fs::PermissionsExt;

    /// A provider that only differs in kind.
    struct OtherKind;

    #[async_trait]
    impl KeyProvider for OtherKind {
        fn kind(&self) -> &'static str {
            "aws"
        }
        fn master_key_id(&self) -> String {
            "arn:aws:kms:eu-west-1:111122223333:key/test".into()
        }
        async fn generate_wrapped(&self, _: &EncryptionContext) -> Result<WrappedKey, KeyError> {
            Err(KeyError::Unavailable("test".into()))
        }
        async fn unwrap(
            &self,
            _: &WrappedKey,
            _: &EncryptionContext,
        ) -> Result<SecretKey, KeyError> {
            Err(KeyError::Unavailable("test".into()))
        }
        async fn master_key_state(&self) -> Result<MasterKeyState, KeyError> {
            Ok(MasterKeyState::Enabled)
        }
    }

    fn kek(dir: &Path, name: &str) -> LocalProvider {
        LocalProvider::open_or_create(&dir.join(name), true).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn create_load_round_trip_and_unwrap() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let p = kek(keys.path(), "kek");
        let reg = Registry::create(data.path(), true, Some(&p)).await.unwrap();
        assert_eq!(reg.dir_id().len(), 32);
        assert!(reg.encryption_on());
        assert_eq!(reg.provider(), Some("local"));
        assert_eq!(reg.master_key_id(), Some(p.master_key_id().as_str()));
        assert_eq!(reg.active_version(), Some(1));
        assert_eq!(reg.versions().len(), 1);
        assert_eq!(reg.versions()[0].version, 1);
        assert!(reg.versions()[0].created_unix > 1_700_000_000);

        let loaded = Registry::load(data.path()).unwrap().unwrap();
        assert_eq!(loaded, reg);
        let ctx = &loaded.key_versions()[0].context;
        assert_eq!(ctx.get(CTX_DIR_ID).map(String::as_str), Some(reg.dir_id()));
        assert_eq!(
            ctx.get(CTX_PURPOSE).map(String::as_str),
            Some("universe-key")
        );
        assert_eq!(ctx.get(CTX_KEY_VERSION).map(String::as_str), Some("1"));

        let mode = std::fs::metadata(Registry::path_in(data.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        loaded.check_compatible(true, Some(&p)).unwrap();
        let ring = loaded.unwrap_all(&p, 64).await.unwrap();
        assert_eq!(ring.active_version(), 1);
        assert_eq!(ring.snapshot().versions, vec![1]);

        // Debug never prints the blob.
        let dbg = format!("{loaded:?}");
        let b64 = B64.encode(&loaded.key_versions()[0].wrapped.0);
        assert!(!dbg.contains(&b64), "{dbg}");
        assert!(dbg.contains("WrappedKey(60 bytes)"), "{dbg}");

        // Refuses to overwrite.
        assert!(Registry::create(data.path(), true, Some(&p)).await.is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn encryption_off_round_trip() {
        let data = tempfile::tempdir().unwrap();
        assert!(Registry::load(data.path()).unwrap().is_none());
        let reg = Registry::create(data.path(), false, None).await.unwrap();
        assert!(!reg.encryption_on());
        assert_eq!(reg.provider(), None);
        assert_eq!(reg.active_version(), None);
        let loaded = Registry::load(data.path()).unwrap().unwrap();
        assert_eq!(loaded, reg);
        loaded.check_compatible(false, None).unwrap();
        let json = String::from_utf8(reg.to_json().unwrap()).unwrap();
        assert!(json.contains("\"encryption\": \"off\""), "{json}");
        assert!(json.contains("\"provider\": null"), "{json}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unwrap_all_with_other_kek_fails() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let a = kek(keys.path(), "a");
        let reg = Registry::create(data.path(), true, Some(&a)).await.unwrap();
        // Same fingerprint check would refuse first; tamper the registry's id to
        // get to the unwrap step with a different KEK.
        let b = kek(keys.path(), "b");
        let mut tampered = reg.clone();
        tampered.master_key_id = Some(b.master_key_id());
        let err = tampered.unwrap_all(&b, 8).await.unwrap_err();
        assert!(
            matches!(err, KeyError::WrongKey(ref m) if m.contains("key version 1")),
            "{err}"
        );
        assert!(matches!(
            reg.unwrap_all(&b, 8).await,
            Err(KeyError::WrongKey(_))
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn check_compatible_messages() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let a = kek(keys.path(), "a");
        let reg = Registry::create(data.path(), true, Some(&a)).await.unwrap();
        let dir = data.path().display().to_string();

        let e = reg.check_compatible(false, None).unwrap_err().to_string();
        assert!(e.contains("encryption cannot be removed"), "{e}");
        assert!(e.contains(&dir), "{e}");
        assert!(e.contains("--encryption on --kms local"), "{e}");

        let off_dir = tempfile::tempdir().unwrap();
        let off = Registry::create(off_dir.path(), false, None).await.unwrap();
        let e = off
            .check_compatible(true, Some(&a))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys encrypt"), "{e}");
        assert!(e.contains("initialised with encryption off"), "{e}");

        let e = reg
            .check_compatible(true, Some(&OtherKind))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("protected by provider local; it cannot be switched silently"),
            "{e}"
        );

        let b = kek(keys.path(), "b");
        let e = reg
            .check_compatible(true, Some(&b))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "initialised with a different local KEK (fingerprint {}); the configured KEK \
                 file (--local-kek-file) has fingerprint {}",
                a.master_key_id(),
                b.master_key_id()
            )),
            "{e}"
        );
    }

    fn good_json(dir_id: &str) -> serde_json::Value {
        serde_json::json!({
            "format": 1, "dir_id": dir_id, "encryption": "on", "provider": "local",
            "master_key_id": "local:0011223344556677", "active_version": 1,
            "versions": [{
                "version": 1, "wrapped": B64.encode([7u8; 60]),
                "context": universe_key_context(dir_id, 1), "created_unix": 1764270000u64
            }]
        })
    }

    fn parse_err(v: &serde_json::Value) -> String {
        Registry::parse(Path::new("/d/keys.json"), v.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn strict_parse_errors() {
        let id = "0123456789abcdef0123456789abcdef";
        Registry::parse(
            Path::new("/d/keys.json"),
            good_json(id).to_string().as_bytes(),
        )
        .unwrap();

        let e = Registry::parse(Path::new("/d/keys.json"), b"{\"format\": 1, \"dir_").unwrap_err();
        let e = e.to_string();
        assert!(e.contains("/d/keys.json") && e.contains("corrupt"), "{e}");

        let mut v = good_json(id);
        v["format"] = 2.into();
        assert!(parse_err(&v).contains("unknown format 2"));

        let mut v = good_json(id);
        v["surprise"] = true.into();
        assert!(parse_err(&v).contains("unknown field"));

        let mut v = good_json(id);
        let dup = v["versions"][0].clone();
        v["versions"].as_array_mut().unwrap().push(dup);
        assert!(parse_err(&v).contains("duplicate key version 1"));

        let mut v = good_json(id);
        v["active_version"] = 3.into();
        assert!(parse_err(&v).contains("active version 3 is not among"));

        let mut v = good_json(id);
        v["versions"][0]["wrapped"] = "not base64!!".into();
        assert!(parse_err(&v).contains("not valid base64"));

        let mut v = good_json(id);
        v["dir_id"] = "xyz".into();
        assert!(parse_err(&v).contains("32 lowercase hex"));

        let mut v = good_json(id);
        v["versions"][0]["context"][CTX_DIR_ID] = "ffffffffffffffffffffffffffffffff".into();
        assert!(parse_err(&v).contains("context entry"));

        let mut v = good_json(id);
        v["encryption"] = "maybe".into();
        assert!(parse_err(&v).contains("invalid contents"));

        let mut v = good_json(id);
        v["encryption"] = "off".into();
        assert!(parse_err(&v).contains("encryption is off but"));
    }

    /// A second version, as rotation adds one (wrapped by `p`, sealed with `ring`).
    async fn with_version_2(reg: &mut Registry, p: &LocalProvider) -> KeyRing {
        let ctx = universe_key_context(reg.dir_id(), 2);
        let wrapped = p.generate_wrapped(&ctx).await.unwrap();
        reg.versions.push(KeyVersion {
            version: 2,
            wrapped,
            context: ctx,
            created_unix: 1_764_270_001,
        });
        reg.active_version = Some(2);
        let ring = reg.unwrap_versions(p, 8).await.unwrap();
        reg.save(Some(&ring)).unwrap();
        ring
    }

    fn strip_macs(v: &mut serde_json::Value) {
        for e in v["versions"].as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("mac");
        }
    }

    fn edit(data: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let path = Registry::path_in(data);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sealed_registry_refuses_every_offline_edit() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let p = kek(keys.path(), "kek");
        let mut reg = Registry::create(data.path(), true, Some(&p)).await.unwrap();
        assert!(reg.is_sealed(), "sealed from the first write");
        let _ = with_version_2(&mut reg, &p).await;
        let good = std::fs::read(Registry::path_in(data.path())).unwrap();
        let loaded = Registry::load(data.path()).unwrap().unwrap();
        let ring = loaded.unwrap_all(&p, 8).await.unwrap();
        assert_eq!(loaded.verify_seal(&ring).unwrap(), Seal::Verified);
        assert_eq!(ring.active_version(), 2);

        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let edits: Vec<(&str, Edit)> = vec![
            (
                "active version",
                Box::new(|v| v["active_version"] = 1.into()),
            ),
            (
                "dropped version",
                Box::new(|v| {
                    v["versions"].as_array_mut().unwrap().remove(0);
                }),
            ),
            (
                "created time",
                Box::new(|v| v["versions"][0]["created_unix"] = 5.into()),
            ),
            (
                "swapped blobs",
                Box::new(|v| {
                    let a = v["versions"][0]["wrapped"].clone();
                    v["versions"][0]["wrapped"] = v["versions"][1]["wrapped"].clone();
                    v["versions"][1]["wrapped"] = a;
                }),
            ),
            ("macs removed", Box::new(strip_macs)),
            (
                "one mac removed",
                Box::new(|v| {
                    v["versions"][1].as_object_mut().unwrap().remove("mac");
                }),
            ),
            (
                "mac flipped",
                Box::new(|v| {
                    let m = v["versions"][0]["mac"].as_str().unwrap().to_string();
                    let flipped = if m.starts_with('0') { "1" } else { "0" };
                    v["versions"][0]["mac"] = format!("{flipped}{}", &m[1..]).into();
                }),
            ),
        ];
        for (what, f) in edits {
            std::fs::write(Registry::path_in(data.path()), &good).unwrap();
            edit(data.path(), f);
            let e = match Registry::load(data.path()) {
                Err(e) => e.to_string(),
                Ok(r) => match r.unwrap().unwrap_all(&p, 8).await {
                    Err(e) => e.to_string(),
                    Ok(_) => panic!("{what}: edited registry accepted"),
                },
            };
            assert!(
                e.contains("edited offline")
                    || e.contains("restore keys.json from backup")
                    || e.contains("cannot unwrap"),
                "{what}: {e}"
            );
            eprintln!("{what}: {e}");
        }
        // A provider or master key edit is refused before any unwrap.
        std::fs::write(Registry::path_in(data.path()), &good).unwrap();
        edit(data.path(), |v| {
            v["master_key_id"] = "local:0000000000000000".into()
        });
        let r = Registry::load(data.path()).unwrap().unwrap();
        assert!(r.unwrap_all(&p, 8).await.is_err());
        // And even with the check bypassed, the MAC catches it.
        let mut r2 = r.clone();
        r2.master_key_id = Some(p.master_key_id());
        r2.versions[0].context.insert("x".into(), "y".into());
        let ring = r2.unwrap_versions(&p, 8).await;
        assert!(ring.is_err(), "context is bound by the wrap too");
        let mut r3 = r.clone();
        let ring = {
            r3.master_key_id = Some(p.master_key_id());
            r3.unwrap_versions(&p, 8).await.unwrap()
        };
        r3.master_key_id = Some("local:0000000000000000".into());
        assert!(r3
            .verify_seal(&ring)
            .unwrap_err()
            .to_string()
            .contains("edited offline"));

        // A version whose key an attacker knows, made active: the other
        // versions' MACs cannot be recomputed without their keys.
        std::fs::write(Registry::path_in(data.path()), &good).unwrap();
        let mut r4 = Registry::load(data.path()).unwrap().unwrap();
        let known = SecretKey::generate().unwrap();
        let ctx = universe_key_context(r4.dir_id(), 3);
        r4.versions.push(KeyVersion {
            version: 3,
            wrapped: p.wrap_key(&known, &ctx).await.unwrap(),
            context: ctx,
            created_unix: 1_764_270_002,
        });
        r4.active_version = Some(3);
        let forged = r4.canonical_encoding();
        let dir: [u8; 16] = hex::decode(r4.dir_id()).unwrap().try_into().unwrap();
        r4.macs
            .insert(3, crate::crypto::registry_mac(&known, &dir, &forged));
        r4.write().unwrap();
        let r4 = Registry::load(data.path()).unwrap().unwrap();
        let e = r4.unwrap_all(&p, 8).await.unwrap_err().to_string();
        assert!(
            e.contains("key version 1 has a MAC that does not verify"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn legacy_registry_is_accepted_once_and_sealed() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let p = kek(keys.path(), "kek");
        let _ = Registry::create(data.path(), true, Some(&p)).await.unwrap();
        edit(data.path(), strip_macs);
        let mut r = Registry::load(data.path()).unwrap().unwrap();
        assert!(!r.is_sealed());
        let ring = r.unwrap_all(&p, 8).await.unwrap();
        assert_eq!(r.verify_seal(&ring).unwrap(), Seal::Legacy);
        r.save(Some(&ring)).unwrap();
        let r = Registry::load(data.path()).unwrap().unwrap();
        assert!(r.is_sealed());
        let ring = r.unwrap_all(&p, 8).await.unwrap();
        assert_eq!(r.verify_seal(&ring).unwrap(), Seal::Verified);

        // Without a MAC, more than version 1 cannot be legacy.
        let mut r = r.clone();
        let _ = with_version_2(&mut r, &p).await;
        edit(data.path(), strip_macs);
        let r = Registry::load(data.path()).unwrap().unwrap();
        let e = r.unwrap_all(&p, 8).await.unwrap_err().to_string();
        assert!(
            e.contains("has no \"mac\" but holds key versions [1, 2]"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn set_wrapping_moves_every_version_to_a_new_kek() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let a = kek(keys.path(), "a");
        let b = kek(keys.path(), "b");
        let mut reg = Registry::create(data.path(), true, Some(&a)).await.unwrap();
        let ring = with_version_2(&mut reg, &a).await;
        let mut wrapped = BTreeMap::new();
        for v in reg.key_versions() {
            let k = a.unwrap(&v.wrapped, &v.context).await.unwrap();
            wrapped.insert(v.version, b.wrap_key(&k, &v.context).await.unwrap());
        }
        let mut short = wrapped.clone();
        short.remove(&1);
        assert!(reg
            .clone()
            .set_wrapping("local", b.master_key_id(), short)
            .unwrap_err()
            .to_string()
            .contains("rewrap covers key versions {2}"));
        reg.set_wrapping("local", b.master_key_id(), wrapped)
            .unwrap();
        reg.save(Some(&ring)).unwrap();
        let loaded = Registry::load(data.path()).unwrap().unwrap();
        assert_eq!(loaded.master_key_id(), Some(b.master_key_id().as_str()));
        let ring_b = loaded.unwrap_all(&b, 8).await.unwrap();
        assert_eq!(ring_b.snapshot().versions, vec![1, 2]);
        assert!(loaded.unwrap_all(&a, 8).await.is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sealing_with_an_extra_key_equals_sealing_with_the_ring() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let p = kek(keys.path(), "kek");
        let mut reg = Registry::create(data.path(), true, Some(&p)).await.unwrap();
        let ring = with_version_2(&mut reg, &p).await;
        let by_ring = reg.macs.clone();
        assert_eq!(by_ring.len(), 2);
        // A ring with version 1 only, and version 2's key given apart.
        let v1 = &reg.key_versions()[0];
        let k1 = p.unwrap(&v1.wrapped, &v1.context).await.unwrap();
        let only_1 = KeyRing::new(BTreeMap::from([(1, k1)]), 1, 4).unwrap();
        let v2 = &reg.key_versions()[1];
        let k2 = p.unwrap(&v2.wrapped, &v2.context).await.unwrap();
        assert!(
            reg.save(Some(&only_1)).is_err(),
            "version 2 not in the ring"
        );
        reg.save_with_keys(&only_1, &[(2, &k2)]).unwrap();
        assert_eq!(reg.macs, by_ring);
        let loaded = Registry::load(data.path()).unwrap().unwrap();
        assert_eq!(loaded.verify_seal(&ring).unwrap(), Seal::Verified);
    }

    #[test]
    fn canonical_encoding_is_injective_on_boundaries() {
        let id = "0123456789abcdef0123456789abcdef";
        let base = Registry::parse(
            Path::new("/d/keys.json"),
            good_json(id).to_string().as_bytes(),
        )
        .unwrap();
        let mut a = base.clone();
        a.provider = Some("lo".into());
        a.master_key_id = Some("calx".into());
        let mut b = base.clone();
        b.provider = Some("loc".into());
        b.master_key_id = Some("alx".into());
        assert_ne!(a.canonical_encoding(), b.canonical_encoding());
        let mut c = base.clone();
        c.active_version = None;
        assert_ne!(c.canonical_encoding(), base.canonical_encoding());
    }

    #[test]
    fn corrupt_file_on_disk_gives_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Registry::path_in(dir.path()), b"\0\0garbage").unwrap();
        let e = Registry::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("keys.json") && e.contains("not valid JSON"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_older_copy_put_back_is_not_current() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let p = kek(keys.path(), "kek");
        let mut reg = Registry::create(data.path(), true, Some(&p)).await.unwrap();
        let older = std::fs::read(Registry::path_in(data.path())).unwrap();
        let ring1 = reg.unwrap_all(&p, 8).await.unwrap();
        let _ = reg.rotate(&p, &ring1).await.unwrap();
        let ring = Registry::load(data.path())
            .unwrap()
            .unwrap()
            .unwrap_all(&p, 8)
            .await
            .unwrap();
        let current = Registry::load(data.path()).unwrap().unwrap();
        assert_eq!(current.verify_current(&ring).unwrap(), Seal::Verified);
        std::fs::write(Registry::path_in(data.path()), &older).unwrap();
        let back = Registry::load(data.path()).unwrap().unwrap();
        // Authentic, so the seal alone verifies ...
        assert_eq!(back.verify_seal(&ring).unwrap(), Seal::Verified);
        // ... but it is not the registry these keys are running with.
        let e = back.verify_current(&ring).unwrap_err().to_string();
        assert!(
            e.contains("names active key version 1, but the running sidecar writes with version 2"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rotate_then_retire() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let p = kek(keys.path(), "kek");
        let mut reg = Registry::create(data.path(), true, Some(&p)).await.unwrap();
        let ring = reg.unwrap_all(&p, 8).await.unwrap();
        let (v, key) = reg.rotate(&p, &ring).await.unwrap();
        assert_eq!(v, 2);
        assert_eq!(reg.active_version(), Some(2));
        let loaded = Registry::load(data.path()).unwrap().unwrap();
        assert_eq!(loaded, reg);
        let ctx = &loaded.key_versions()[1].context;
        assert_eq!(ctx.get(CTX_KEY_VERSION).map(String::as_str), Some("2"));
        let ring2 = loaded.unwrap_all(&p, 8).await.unwrap();
        assert_eq!(ring2.snapshot().versions, vec![1, 2]);
        assert_eq!(ring2.active_version(), 2);
        // Sealed with every version's key, the new one included.
        assert_eq!(loaded.verify_seal(&ring2).unwrap(), Seal::Verified);
        // The returned key is the one stored wrapped.
        let f = [1u8; 16];
        let mut direct = BTreeMap::new();
        direct.insert(2, key);
        let direct = KeyRing::new(direct, 2, 8).unwrap();
        assert_eq!(
            ring2.file_keys(&f, 2, 1).unwrap().header_mac(&[0u8; 192]),
            direct.file_keys(&f, 2, 1).unwrap().header_mac(&[0u8; 192])
        );

        let e = reg.retire(2, &ring2).unwrap_err().to_string();
        assert!(e.contains("is the active version"), "{e}");
        let e = reg.retire(7, &ring2).unwrap_err().to_string();
        assert!(
            e.contains("there is no key version 7 (stored: 1, 2)"),
            "{e}"
        );
        reg.retire(1, &ring2).unwrap();
        let loaded = Registry::load(data.path()).unwrap().unwrap();
        assert_eq!(loaded.versions().len(), 1);
        assert_eq!(loaded.versions()[0].version, 2);
        let ring3 = loaded.unwrap_all(&p, 8).await.unwrap();
        assert_eq!(loaded.verify_seal(&ring3).unwrap(), Seal::Verified);
        // The retired wrapped key is gone from the file.
        let text = std::fs::read_to_string(Registry::path_in(data.path())).unwrap();
        assert!(!text.contains("\"version\": 1"), "{text}");
        // The next rotation never reuses a number.
        let (v, _) = reg.rotate(&p, &ring3).await.unwrap();
        assert_eq!(v, 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn failed_rotation_changes_nothing() {
        let keys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let p = kek(keys.path(), "kek");
        let mut reg = Registry::create(data.path(), true, Some(&p)).await.unwrap();
        let ring = reg.unwrap_all(&p, 8).await.unwrap();
        let before = std::fs::read(Registry::path_in(data.path())).unwrap();
        let other = kek(keys.path(), "other");
        assert!(reg.rotate(&other, &ring).await.is_err());
        assert!(reg.rotate(&OtherKind, &ring).await.is_err());
        assert_eq!(reg.active_version(), Some(1));
        assert_eq!(
            std::fs::read(Registry::path_in(data.path())).unwrap(),
            before
        );
    }
}
