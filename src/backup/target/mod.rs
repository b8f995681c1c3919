//! Where backup objects live: the [`BackupTarget`] trait and its two
//! implementations, a local directory and an S3 bucket prefix.
//!
//! The contract every target keeps:
//! * `put` and `publish` are all-or-nothing: an object is either absent or
//!   complete, whatever crashes mid-way (local: temp file, fsync, rename,
//!   fsync directory; S3: an object or a completed multipart upload appears
//!   atomically). `publish` also refuses to replace an existing object.
//!   `put_staged` is `put` whose object may become visible and durable only
//!   at the next `sync_staged` (the local target syncs and renames its
//!   objects in batches).
//! * `list` shows only complete objects (never temp files or unfinished
//!   multipart uploads), with their size and modification time.
//! * `get` of a missing object is [`TargetError::NotFound`].
//!
//! A backup is *complete* exactly when its manifest has been published, and
//! the engine publishes a manifest only after every object it references is
//! durable, so a crash leaves at most unreferenced objects behind.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

/// Smallest S3 multipart part this code uses (8 MiB; S3's minimum is 5 MiB).
pub const MIN_PART_SIZE: usize = 8 << 20;
/// Directory (local) or key prefix under the root holding temporary files.
const TMP_DIR: &str = ".tmp";

/// Errors of a target. Messages name the object and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The object does not exist.
    #[error("{target}: object {key} does not exist")]
    NotFound {
        /// The target.
        target: String,
        /// The object.
        key: String,
    },
    /// `publish` found the object already there.
    #[error("{target}: object {key} already exists; refusing to replace it")]
    Exists {
        /// The target.
        target: String,
        /// The object.
        key: String,
    },
    /// A local file system operation failed.
    #[error("{what} {path}: {source}; check that the backup directory exists, is writable and has free space")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An S3 call failed.
    #[error("S3 {op} s3://{bucket}/{key}: {detail}; check the credentials, the bucket, the region and AWS_ENDPOINT_URL_S3")]
    S3 {
        /// The operation.
        op: &'static str,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The SDK's error with its context.
        detail: String,
    },
    /// A destination string or object key that is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

/// A validated object key: `/`-separated segments of `[A-Za-z0-9._-]`, none
/// empty, none starting with a dot (so temporary files never collide and no
/// key escapes the root), at most 512 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Parses a key.
    pub fn parse(s: &str) -> Result<Self, TargetError> {
        let ok = !s.is_empty()
            && s.len() <= 512
            && s.split('/').all(|seg| {
                !seg.is_empty()
                    && !seg.starts_with('.')
                    && seg
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
            });
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(TargetError::Invalid(format!(
                "{s:?} is not a valid backup object key"
            )))
        }
    }

    /// The key of the content-addressed object with this SHA-256 (hex).
    pub fn object(sha256_hex: &str) -> Result<Self, TargetError> {
        Self::parse(&format!("objects/{sha256_hex}"))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key.
    pub key: String,
    /// Its size.
    pub size: u64,
    /// When it was last written (if the target knows).
    pub modified: Option<SystemTime>,
}

/// An object's bytes as pieces stored back to back: a chunk references its
/// blocks' ciphertext where it already lies instead of copying it into one
/// buffer (a target that needs one buffer joins them).
#[derive(Debug, Clone, Default)]
pub struct Body {
    parts: Vec<Bytes>,
    len: usize,
}

impl Body {
    /// The pieces, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// Total length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a piece.
    pub fn push(&mut self, part: Bytes) {
        self.len += part.len();
        if !part.is_empty() {
            self.parts.push(part);
        }
    }

    /// The bytes in one buffer (no copy for a single piece).
    pub fn into_bytes(mut self) -> Bytes {
        if self.parts.len() <= 1 {
            return self.parts.pop().unwrap_or_default();
        }
        let mut v = Vec::with_capacity(self.len);
        for p in &self.parts {
            v.extend_from_slice(p);
        }
        Bytes::from(v)
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        let mut body = Body::default();
        body.push(b);
        body
    }
}

/// A place backup objects are written to and read from.
#[async_trait]
pub trait BackupTarget: Send + Sync + fmt::Debug {
    /// Human-readable location (`/path` or `s3://bucket/prefix`).
    fn describe(&self) -> String;
    /// Stores `data` under `key` atomically, replacing any previous object.
    /// Large objects may be uploaded in parallel parts.
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError>;
    /// Reads a whole object.
    async fn get(&self, key: &ObjectKey) -> Result<Bytes, TargetError>;
    /// True if the object exists (complete).
    async fn exists(&self, key: &ObjectKey) -> Result<bool, TargetError>;
    /// Lists complete objects whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TargetError>;
    /// Deletes an object; deleting a missing object is not an error.
    async fn delete(&self, key: &ObjectKey) -> Result<(), TargetError>;
    /// Stores `data` under `key` atomically and durably, refusing to replace
    /// an existing object: the commit point of a backup.
    async fn publish(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError>;
    /// Stores `data` under `key` like [`BackupTarget::put`] (complete or
    /// absent, whatever happens), but the object need only be visible and
    /// durable once [`BackupTarget::sync_staged`] returns. Lets a target
    /// batch its durability work over a whole backup (the local target
    /// flushes once per batch of objects instead of once per object).
    /// Default: `put`.
    async fn put_staged(&self, key: &ObjectKey, data: Body) -> Result<(), TargetError> {
        self.put(key, data.into_bytes()).await
    }
    /// Makes every object stored with [`BackupTarget::put_staged`] so far
    /// durable. A backup calls it before it publishes its manifest.
    /// Default: nothing to do (every `put` is durable when it returns).
    async fn sync_staged(&self) -> Result<(), TargetError> {
        Ok(())
    }
}

/// A parsed backup destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A local directory.
    Local(PathBuf),
    /// An S3 bucket and key prefix (no leading or trailing `/`; may be empty).
    S3 {
        /// Bucket.
        bucket: String,
        /// Prefix.
        prefix: String,
    },
}

impl Destination {
    /// Parses `s3://bucket[/prefix]` or a local path.
    pub fn parse(s: &str) -> Result<Self, TargetError> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-')
                });
            if !bucket_ok {
                return Err(TargetError::Invalid(format!(
                    "{s:?}: {bucket:?} is not an S3 bucket name (3-63 of a-z, 0-9, '.', '-'); use s3://bucket/prefix"
                )));
            }
            let prefix = prefix.trim_matches('/').to_string();
            if !prefix.is_empty() {
                ObjectKey::parse(&prefix).map_err(|_| {
                    TargetError::Invalid(format!(
                        "{s:?}: the prefix must be '/'-separated segments of A-Z a-z 0-9 . _ - not starting with '.'"
                    ))
                })?;
            }
            return Ok(Self::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        if s.is_empty() || s.contains("://") {
            return Err(TargetError::Invalid(format!(
                "{s:?} is not a backup destination: use a directory path or s3://bucket/prefix"
            )));
        }
        Ok(Self::Local(PathBuf::from(s)))
    }

    /// Opens the target (creates a local directory if needed; builds the S3
    /// client from the standard AWS configuration).
    pub async fn open(&self, s3: &S3Options) -> Result<Arc<dyn BackupTarget>, TargetError> {
        Ok(match self {
            Self::Local(p) => Arc::new(LocalTarget::open(p.clone()).await?),
            Self::S3 { bucket, prefix } => {
                Arc::new(S3Target::connect(bucket.clone(), prefix.clone(), s3).await)
            }
        })
    }
}

mod local;
mod s3;

pub use local::{LocalTarget, STAGE_BATCH};
pub use s3::{S3Options, S3Target};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            Destination::parse("s3://my-bucket/a/b/").unwrap(),
            Destination::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            Destination::parse("s3://my-bucket").unwrap(),
            Destination::S3 {
                bucket: "my-bucket".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            Destination::parse("/var/backups/x").unwrap(),
            Destination::Local("/var/backups/x".into())
        );
        assert_eq!(
            Destination::parse("rel/dir").unwrap(),
            Destination::Local("rel/dir".into())
        );
        for bad in [
            "",
            "s3://",
            "s3://AB",
            "s3://bucket/../x",
            "gs://bucket/x",
            "s3://b_c/x",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn object_keys() {
        assert!(ObjectKey::parse("objects/abc").is_ok());
        for bad in ["", "/a", "a/", "a//b", "../a", "a/.tmp", "a b", "ä"] {
            assert!(ObjectKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn local_put_get_list_publish_delete() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::open(dir.path().join("b")).await.unwrap();
        let k = ObjectKey::parse("objects/aa").unwrap();
        assert!(matches!(t.get(&k).await, Err(TargetError::NotFound { .. })));
        assert!(!t.exists(&k).await.unwrap());
        t.put(&k, Bytes::from_static(b"one")).await.unwrap();
        t.put(&k, Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(&t.get(&k).await.unwrap()[..], b"two");
        let m = ObjectKey::parse("manifests/x.manifest").unwrap();
        t.publish(&m, Bytes::from_static(b"m")).await.unwrap();
        assert!(matches!(
            t.publish(&m, Bytes::from_static(b"m2")).await,
            Err(TargetError::Exists { .. })
        ));
        assert_eq!(&t.get(&m).await.unwrap()[..], b"m");
        // A stale temporary is never listed.
        std::fs::write(dir.path().join("b/.tmp/junk"), b"x").unwrap();
        let all: Vec<String> = t
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(all, vec!["manifests/x.manifest", "objects/aa"]);
        let ms: Vec<String> = t
            .list("manifests/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(ms, vec!["manifests/x.manifest"]);
        assert_eq!(t.list("objects/a").await.unwrap().len(), 1);
        assert_eq!(t.list("nothing/").await.unwrap().len(), 0);
        t.delete(&k).await.unwrap();
        t.delete(&k).await.unwrap();
        assert!(!t.exists(&k).await.unwrap());
        // A staged object appears once its batch is synced: at
        // sync_staged, or as soon as a batch is full.
        let s = ObjectKey::parse("objects/bb").unwrap();
        t.put_staged(&s, Bytes::from_static(b"staged").into())
            .await
            .unwrap();
        assert!(!t.exists(&s).await.unwrap());
        t.sync_staged().await.unwrap();
        assert_eq!(&t.get(&s).await.unwrap()[..], b"staged");
        assert!(t.unsynced.lock().unwrap().is_empty());
        let big = ObjectKey::parse("objects/cc").unwrap();
        let payload = Bytes::from(vec![7u8; local::STAGE_BATCH as usize]);
        t.put_staged(&big, payload.into()).await.unwrap();
        assert!(
            t.exists(&big).await.unwrap(),
            "a full batch is committed at once"
        );
        assert_eq!(t.unsynced.lock().unwrap().len(), 1);
        t.sync_staged().await.unwrap();
        t.delete(&big).await.unwrap();
        // Large objects, of any length, are read back whole (directly from
        // the disk where the file system allows it), from pieces.
        for len in [(256 << 10) + 1, 4 << 20, (4 << 20) - 72] {
            let k = ObjectKey::parse(&format!("objects/len{len}")).unwrap();
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut body = Body::default();
            body.push(Bytes::copy_from_slice(&data[..100]));
            body.push(Bytes::copy_from_slice(&data[100..]));
            t.put_staged(&k, body).await.unwrap();
            t.sync_staged().await.unwrap();
            assert_eq!(t.get(&k).await.unwrap(), data, "{len}");
            t.delete(&k).await.unwrap();
        }
        // An object a backup re-uses instead of storing is synced too.
        assert!(t.exists(&s).await.unwrap());
        assert_eq!(t.unsynced.lock().unwrap().len(), 1);
        t.sync_staged().await.unwrap();
        t.delete(&s).await.unwrap();
        // Reopening removes stale temporaries.
        drop(t);
        LocalTarget::open(dir.path().join("b")).await.unwrap();
        assert!(!dir.path().join("b/.tmp/junk").exists());
    }
}
