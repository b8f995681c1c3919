//! The backup manifest: what a backup is, which objects hold it, and an
//! HMAC-SHA256 that makes any edit detectable.
//!
//! A manifest object (`manifests/<backup id>.manifest`) is one header line
//! followed by the body, the UTF-8 JSON of [`Manifest`]:
//!
//! ```text
//! EARBACKUP1 <mac key version, decimal> <HMAC-SHA256, 64 lowercase hex>\n
//! <body bytes>
//! ```
//!
//! The MAC is computed over exactly `MAC_DOMAIN || body bytes` (the bytes
//! after the first `\n`, as stored; no JSON canonicalisation is involved:
//! the reader verifies the bytes before it parses them). The key is
//! `HKDF-SHA256(salt = none, IKM = universe key of that version,
//! info = "ear-sidecar/v2 backup-manifest-key")`, 32 bytes. The body repeats
//! the key version and the backup id; both must match the header and the
//! object name, so a valid manifest cannot be replayed under another name.
//! The manifest itself holds no secret: wrapped keys only.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::chunk::BlockRun;
use super::target::ObjectKey;
use crate::crypto::{SecretKey, KEY_LEN};

/// HKDF `info` of the manifest-authentication key.
pub const LABEL_MANIFEST_KEY: &[u8] = b"ear-sidecar/v2 backup-manifest-key";
/// Prefix of the MACed bytes (domain separation from every other HMAC use).
pub const MAC_DOMAIN: &[u8] = b"ear-sidecar backup manifest v1\n";
/// First word of a manifest object.
pub const MANIFEST_MAGIC: &str = "EARBACKUP1";
/// Manifest body format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// Upper bound of a manifest object we are willing to parse (1 GiB).
pub const MAX_MANIFEST_BYTES: usize = 1 << 30;

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The header line is malformed.
    #[error("manifest {name}: not a backup manifest ({detail})")]
    Malformed {
        /// Object name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// No key of the version the manifest was signed with is loaded.
    #[error("manifest {name} is authenticated with universe key version {version}, which is not loaded: restore the key registry of the data directory that made the backup")]
    UnknownKey {
        /// Object name.
        name: String,
        /// Key version.
        version: u32,
    },
    /// The MAC does not verify: the manifest was edited, or it belongs to a
    /// different universe key.
    #[error("manifest {name} failed authentication: it was modified or was made under a different universe key; do not use this backup")]
    BadMac {
        /// Object name.
        name: String,
    },
    /// Authenticated, but the body is inconsistent (a bug or a forged key).
    #[error("manifest {name}: {detail}")]
    Invalid {
        /// Object name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A backup id does not have the expected form.
    #[error("{0:?} is not a backup id (expected YYYYMMDDTHHMMSSZ-<8 hex digits>)")]
    BadId(String),
}

/// A backup id: `YYYYMMDDTHHMMSSZ-xxxxxxxx` (UTC cut time, then 32 random
/// bits). Ordering the ids orders backups by cut time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

impl BackupId {
    /// A new id for a backup cut at `cut`.
    pub fn new(cut: SystemTime) -> Result<Self, crate::crypto::CryptoError> {
        let mut r = [0u8; 4];
        crate::crypto::fill_random(&mut r)?;
        let secs = cut
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        Ok(Self(format!("{}-{}", utc_stamp(secs), hex::encode(r))))
    }

    /// Parses an id.
    pub fn parse(s: &str) -> Result<Self, ManifestError> {
        let b = s.as_bytes();
        let ok = b.len() == 25
            && b[..8].iter().all(u8::is_ascii_digit)
            && b[8] == b'T'
            && b[9..15].iter().all(u8::is_ascii_digit)
            && b[15] == b'Z'
            && b[16] == b'-'
            && b[17..]
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(ManifestError::BadId(s.to_string()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The object key of this backup's manifest.
    pub fn manifest_key(&self) -> ObjectKey {
        ObjectKey::parse(&format!("manifests/{}.manifest", self.0))
            .expect("a backup id is a valid key segment")
    }

    /// The id named by a manifest object key, if it is one.
    pub fn from_manifest_key(key: &str) -> Option<Self> {
        let name = key.strip_prefix("manifests/")?.strip_suffix(".manifest")?;
        Self::parse(name).ok()
    }
}

impl TryFrom<String> for BackupId {
    type Error = ManifestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> String {
        id.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `YYYYMMDDTHHMMSSZ` for Unix seconds (proleptic Gregorian, UTC).
pub fn utc_stamp(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 ≥ 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Reference to a content-addressed object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    /// SHA-256 of the object, lowercase hex: its address `objects/<sha256>`.
    pub sha256: String,
    /// Object length in bytes.
    pub bytes: u64,
}

/// One chunk of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// SHA-256 of the chunk object, lowercase hex.
    pub sha256: String,
    /// Object length in bytes.
    pub bytes: u64,
    /// The blocks it holds a record for, as increasing, non-adjacent runs.
    pub runs: Vec<BlockRun>,
    /// Records with ciphertext.
    pub data_blocks: u64,
}

impl ChunkRef {
    /// Number of records (the sum of the run lengths; checked when parsed).
    pub fn records(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }
}

/// Totals of a backup (this backup's own objects, not its parents').
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Totals {
    /// Block records in this backup.
    pub blocks: u64,
    /// Of which data (ciphertext) records.
    pub data_blocks: u64,
    /// Of which zero records.
    pub zero_blocks: u64,
    /// Number of chunk objects referenced.
    pub chunks: u64,
    /// Bytes of the chunk objects referenced.
    pub chunk_bytes: u64,
    /// Blocks present at the cut, counting those inherited from parents.
    pub blocks_present: u64,
}

/// The body of a backup manifest (authenticated as a whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Body format ([`MANIFEST_FORMAT`]).
    pub manifest_format: u32,
    /// This backup.
    pub backup_id: BackupId,
    /// The export's name.
    pub export: String,
    /// The export's size in bytes at the cut (a multiple of 4096).
    pub export_size: u64,
    /// Block size (4096).
    pub block_size: u32,
    /// Store on-disk format of the slots and ciphertext ([`super::STORE_FORMAT`]).
    pub store_format: u32,
    /// The cut, milliseconds since the Unix epoch.
    pub cut_unix_ms: u64,
    /// When the backup completed, milliseconds since the Unix epoch.
    pub finished_unix_ms: u64,
    /// The parent backup (incremental), or `None` for a full backup.
    pub parent: Option<BackupId>,
    /// Universe-key version of the MAC key (equals the header's).
    pub mac_key_version: u32,
    /// The data directory's key registry (`keys.json`: wrapped keys only), base64.
    pub key_registry: String,
    /// Opaque per-export metadata from the store (e.g. file id), base64.
    pub export_meta: String,
    /// The slot index object at this cut.
    pub slot_index: ObjectRef,
    /// The chunks of this backup, in increasing block order.
    pub chunks: Vec<ChunkRef>,
    /// Totals.
    pub totals: Totals,
}

impl Manifest {
    /// Number of blocks of the export.
    pub fn blocks(&self) -> u64 {
        self.export_size / u64::from(self.block_size.max(1))
    }

    /// The key registry bytes.
    pub fn key_registry_bytes(&self) -> Vec<u8> {
        B64.decode(&self.key_registry).unwrap_or_default()
    }

    /// The store's export metadata bytes.
    pub fn export_meta_bytes(&self) -> Vec<u8> {
        B64.decode(&self.export_meta).unwrap_or_default()
    }

    /// Encodes bytes for [`Manifest::key_registry`] / [`Manifest::export_meta`].
    pub fn b64(bytes: &[u8]) -> String {
        B64.encode(bytes)
    }

    /// Cut time.
    pub fn cut_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.cut_unix_ms)
    }

    /// Every object this manifest references (chunks and the slot index).
    pub fn object_shas(&self) -> impl Iterator<Item = &str> {
        self.chunks
            .iter()
            .map(|c| c.sha256.as_str())
            .chain(std::iter::once(self.slot_index.sha256.as_str()))
    }

    /// Structural checks after authentication: the things the rest of the
    /// code relies on, so it never has to re-check them.
    fn check(&self, name: &str) -> Result<(), ManifestError> {
        let bad = |detail: String| ManifestError::Invalid {
            name: name.to_string(),
            detail,
        };
        if self.manifest_format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "manifest format {} is not supported by this build (expected {MANIFEST_FORMAT}); use a newer ear-sidecar",
                self.manifest_format
            )));
        }
        if self.block_size as usize != super::BLOCK_SIZE {
            return Err(bad(format!("block size {} is not 4096", self.block_size)));
        }
        if self.store_format != super::STORE_FORMAT {
            return Err(bad(format!(
                "store format {} is not supported by this build (expected {})",
                self.store_format,
                super::STORE_FORMAT
            )));
        }
        if !self.export_size.is_multiple_of(super::BLOCK_SIZE as u64) {
            return Err(bad("export size is not a multiple of 4096".into()));
        }
        if self.export.is_empty() || self.export.chars().any(|c| c.is_control()) {
            return Err(bad("export name is empty or has control characters".into()));
        }
        if self.parent.as_ref() == Some(&self.backup_id) {
            return Err(bad("a backup cannot be its own parent".into()));
        }
        B64.decode(&self.key_registry)
            .map_err(|_| bad("key registry is not base64".into()))?;
        B64.decode(&self.export_meta)
            .map_err(|_| bad("export metadata is not base64".into()))?;
        let blocks = self.blocks();
        let is_sha =
            |s: &str| s.len() == 64 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if !is_sha(&self.slot_index.sha256) {
            return Err(bad("slot index address is not a SHA-256".into()));
        }
        let mut next = 0u64;
        let (mut recs, mut data, mut bytes) = (0u64, 0u64, 0u64);
        for c in &self.chunks {
            if !is_sha(&c.sha256) || c.runs.is_empty() {
                return Err(bad("chunk reference is malformed".into()));
            }
            let mut n = 0u64;
            for r in &c.runs {
                let end = r
                    .end()
                    .filter(|&e| r.len > 0 && r.start >= next && e <= blocks);
                let end = end.ok_or_else(|| {
                    bad(
                        "chunk block runs are out of order, overlapping or beyond the export"
                            .into(),
                    )
                })?;
                n += r.len;
                next = end.saturating_add(1);
            }
            // Adjacent runs across chunks are fine; within a chunk they were
            // merged by the writer. Allow touching across chunks:
            next = next.saturating_sub(1);
            if c.data_blocks > n {
                return Err(bad("chunk claims more data blocks than records".into()));
            }
            recs += n;
            data += c.data_blocks;
            bytes = bytes.saturating_add(c.bytes);
        }
        let t = &self.totals;
        if t.blocks != recs
            || t.data_blocks != data
            || t.zero_blocks != recs - data
            || t.chunks != self.chunks.len() as u64
            || t.chunk_bytes != bytes
            || t.blocks_present > blocks
        {
            return Err(bad("totals do not match the chunk list".into()));
        }
        Ok(())
    }
}

/// The manifest-authentication key of one universe-key version.
pub struct ManifestKey {
    version: u32,
    key: SecretKey,
}

impl fmt::Debug for ManifestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ManifestKey(version {}, [redacted])", self.version)
    }
}

impl ManifestKey {
    /// Derives the key of universe-key `version` from `universe`.
    pub fn derive(version: u32, universe: &SecretKey) -> Self {
        let hk = Hkdf::<Sha256>::new(None, universe.expose());
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        hk.expand(LABEL_MANIFEST_KEY, &mut okm[..])
            .expect("HKDF-SHA256 expand of 32 bytes cannot fail");
        let key = SecretKey::take_from(&mut okm[..]).expect("32-byte key");
        Self { version, key }
    }

    /// The universe-key version.
    pub fn version(&self) -> u32 {
        self.version
    }

    fn mac(&self) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256>>::new_from_slice(self.key.expose()).expect("HMAC accepts any key length");
        m.update(MAC_DOMAIN);
        m
    }
}

/// The manifest keys of every loaded universe-key version; one is active
/// (signs new manifests).
#[derive(Debug)]
pub struct ManifestKeys {
    active: u32,
    keys: BTreeMap<u32, ManifestKey>,
}

impl ManifestKeys {
    /// Keys with `active` as the signing key.
    pub fn new(active: ManifestKey) -> Self {
        let v = active.version;
        let mut keys = BTreeMap::new();
        keys.insert(v, active);
        Self { active: v, keys }
    }

    /// The manifest keys of every universe key in `ring`; the ring's active
    /// version signs.
    pub fn from_ring(ring: &crate::crypto::KeyRing) -> Result<Self, crate::crypto::CryptoError> {
        let active = ring.active_version();
        let mut all = ring.derive_each(ManifestKey::derive)?;
        let pos = all
            .iter()
            .position(|(v, _)| *v == active)
            .ok_or(crate::crypto::CryptoError::UnknownVersion(active))?;
        let (_, signing) = all.swap_remove(pos);
        let mut keys = Self::new(signing);
        for (_, k) in all {
            keys.insert(k);
        }
        Ok(keys)
    }

    /// Adds the key of an older (or newer) version, for verifying.
    pub fn insert(&mut self, key: ManifestKey) {
        self.keys.insert(key.version, key);
    }

    /// The signing key.
    pub fn active(&self) -> &ManifestKey {
        &self.keys[&self.active]
    }

    /// The key of `version`.
    pub fn get(&self, version: u32) -> Option<&ManifestKey> {
        self.keys.get(&version)
    }
}

/// Serialises and signs `m` with its `mac_key_version` key from `keys`.
pub fn seal(m: &Manifest, keys: &ManifestKeys) -> Result<Vec<u8>, ManifestError> {
    let name = m.backup_id.manifest_key().to_string();
    let key = keys
        .get(m.mac_key_version)
        .ok_or(ManifestError::UnknownKey {
            name: name.clone(),
            version: m.mac_key_version,
        })?;
    m.check(&name)?;
    let body = serde_json::to_vec_pretty(m).map_err(|e| ManifestError::Invalid {
        name,
        detail: e.to_string(),
    })?;
    let mut mac = key.mac();
    mac.update(&body);
    let tag = mac.finalize().into_bytes();
    let mut out = format!("{MANIFEST_MAGIC} {} {}\n", key.version, hex::encode(tag)).into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Verifies and parses the manifest object of `id`. The MAC is checked on
/// the raw bytes before any JSON parsing.
pub fn open(id: &BackupId, bytes: &[u8], keys: &ManifestKeys) -> Result<Manifest, ManifestError> {
    let name = id.manifest_key().to_string();
    let (version, tag, body) = split(&name, bytes)?;
    let key = keys.get(version).ok_or(ManifestError::UnknownKey {
        name: name.clone(),
        version,
    })?;
    let mut mac = key.mac();
    mac.update(body);
    mac.verify_slice(&tag)
        .map_err(|_| ManifestError::BadMac { name: name.clone() })?;
    let m: Manifest = serde_json::from_slice(body).map_err(|e| ManifestError::Invalid {
        name: name.clone(),
        detail: format!("authenticated body does not parse: {e}"),
    })?;
    if &m.backup_id != id || m.mac_key_version != version {
        return Err(ManifestError::Invalid {
            name,
            detail: "the body names a different backup id or key version than its object".into(),
        });
    }
    m.check(&name)?;
    Ok(m)
}

/// Parses a manifest WITHOUT authenticating it. Only for deciding what to
/// keep (prune keeps whatever an unverifiable manifest references): never
/// restore from the result.
pub fn parse_unauthenticated(id: &BackupId, bytes: &[u8]) -> Result<Manifest, ManifestError> {
    let name = id.manifest_key().to_string();
    let (_, _, body) = split(&name, bytes)?;
    serde_json::from_slice(body).map_err(|e| ManifestError::Malformed {
        name,
        detail: e.to_string(),
    })
}

fn split<'a>(name: &str, bytes: &'a [u8]) -> Result<(u32, Vec<u8>, &'a [u8]), ManifestError> {
    let bad = |detail: &str| ManifestError::Malformed {
        name: name.to_string(),
        detail: detail.to_string(),
    };
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(bad("larger than 1 GiB"));
    }
    let nl = bytes
        .iter()
        .take(128)
        .position(|&b| b == b'\n')
        .ok_or_else(|| bad("no header line"))?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| bad("header is not UTF-8"))?;
    let mut parts = header.split(' ');
    let (magic, ver, tag) = (parts.next(), parts.next(), parts.next());
    if magic != Some(MANIFEST_MAGIC) || parts.next().is_some() {
        return Err(bad("bad header line"));
    }
    let ver = ver
        .filter(|v| !v.is_empty() && v.len() <= 10 && v.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| bad("bad key version"))?;
    let tag = tag
        .filter(|t| t.len() == 64 && t.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
        .and_then(|t| hex::decode(t).ok())
        .ok_or_else(|| bad("bad MAC field"))?;
    Ok((ver, tag, &bytes[nl + 1..]))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn keys(fill: u8) -> ManifestKeys {
        let mut raw = [fill; 32];
        ManifestKeys::new(ManifestKey::derive(
            1,
            &SecretKey::take_from(&mut raw).unwrap(),
        ))
    }

    pub(crate) fn sample() -> Manifest {
        Manifest {
            manifest_format: MANIFEST_FORMAT,
            backup_id: BackupId::parse("20261201T140000Z-0123abcd").unwrap(),
            export: "vol0".into(),
            export_size: 64 * 4096,
            block_size: 4096,
            store_format: 2,
            cut_unix_ms: 1_764_597_600_000,
            finished_unix_ms: 1_764_597_601_000,
            parent: None,
            mac_key_version: 1,
            key_registry: Manifest::b64(b"{\"format\":1}"),
            export_meta: Manifest::b64(b"meta"),
            slot_index: ObjectRef {
                sha256: "ab".repeat(32),
                bytes: 24,
            },
            chunks: vec![ChunkRef {
                sha256: "cd".repeat(32),
                bytes: 100,
                runs: vec![BlockRun { start: 0, len: 2 }, BlockRun { start: 5, len: 1 }],
                data_blocks: 2,
            }],
            totals: Totals {
                blocks: 3,
                data_blocks: 2,
                zero_blocks: 1,
                chunks: 1,
                chunk_bytes: 100,
                blocks_present: 3,
            },
        }
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_764_597_600), "20251201T140000Z");
        assert!(BackupId::parse(&BackupId::new(SystemTime::now()).unwrap().0).is_ok());
    }

    #[test]
    fn ids() {
        assert!(BackupId::parse("20261201T140000Z-0123abcd").is_ok());
        for bad in [
            "",
            "20261201T140000Z-0123ABCD",
            "../x",
            "20261201T140000Z-0123abc",
            "20261201X140000Z-0123abcd",
        ] {
            assert!(BackupId::parse(bad).is_err(), "{bad}");
        }
        let id = BackupId::parse("20261201T140000Z-0123abcd").unwrap();
        assert_eq!(
            BackupId::from_manifest_key(id.manifest_key().as_str()),
            Some(id)
        );
    }

    #[test]
    fn seal_open_round_trip() {
        let k = keys(1);
        let m = sample();
        let bytes = seal(&m, &k).unwrap();
        assert_eq!(open(&m.backup_id, &bytes, &k).unwrap(), m);
    }

    #[test]
    fn any_edit_is_refused() {
        let k = keys(1);
        let m = sample();
        let bytes = seal(&m, &k).unwrap();
        let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
        for i in (nl + 1..bytes.len()).step_by(7) {
            let mut v = bytes.clone();
            v[i] ^= 0x01;
            assert!(open(&m.backup_id, &v, &k).is_err(), "edit at {i} accepted");
        }
        // A different universe key refuses it.
        assert!(matches!(
            open(&m.backup_id, &bytes, &keys(2)),
            Err(ManifestError::BadMac { .. })
        ));
        // Replayed under another name.
        let other = BackupId::parse("20261201T140000Z-ffffffff").unwrap();
        assert!(matches!(
            open(&other, &bytes, &k),
            Err(ManifestError::Invalid { .. })
        ));
        // Unknown key version.
        let mut v = bytes.clone();
        v[MANIFEST_MAGIC.len() + 1] = b'7';
        assert!(matches!(
            open(&m.backup_id, &v, &k),
            Err(ManifestError::UnknownKey { version: 7, .. })
        ));
    }

    #[test]
    fn structural_checks() {
        let k = keys(1);
        let mut m = sample();
        m.totals.blocks = 4;
        assert!(seal(&m, &k).is_err());
        let mut m = sample();
        m.chunks[0].runs = vec![BlockRun { start: 63, len: 2 }];
        assert!(seal(&m, &k).is_err());
        let mut m = sample();
        m.chunks[0].runs = vec![BlockRun { start: 5, len: 1 }, BlockRun { start: 0, len: 2 }];
        assert!(seal(&m, &k).is_err());
        let mut m = sample();
        m.export_size = 4097;
        assert!(seal(&m, &k).is_err());
    }

    #[test]
    fn debug_redacts() {
        let k = keys(0xab);
        let s = format!("{k:?}");
        assert!(s.contains("redacted") && !s.contains("171"), "{s}");
    }
}
