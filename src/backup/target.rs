//! Where backup objects live: the [`BackupTarget`] trait and its two
//! implementations, a local directory and an S3 bucket prefix.
//!
//! The contract every target keeps:
//! * `put` and `publish` are all-or-nothing: an object is either absent or
//!   complete, whatever crashes mid-way (local: temp file, fsync, rename,
//!   fsync directory; S3: an object or a completed multipart upload appears
//!   atomically). `publish` also refuses to replace an existing object.
//! * `list` shows only complete objects (never temp files or unfinished
//!   multipart uploads), with their size and modification time.
//! * `get` of a missing object is [`TargetError::NotFound`].
//!
//! A backup is *complete* exactly when its manifest has been published, and
//! the engine publishes a manifest only after every object it references is
//! durable, so a crash leaves at most unreferenced objects behind.

use std::fmt;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
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

// ---------------------------------------------------------------- local ---

/// A local directory target. Layout: `<root>/<key>`, temporaries in
/// `<root>/.tmp/` (never listed; a crash may leave some, removed on open).
#[derive(Debug, Clone)]
pub struct LocalTarget {
    root: PathBuf,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TargetError {
    let path = path.to_path_buf();
    move |source| TargetError::Io { what, path, source }
}

fn sync_dir(dir: &Path) -> Result<(), TargetError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TargetError> + Send + 'static,
) -> Result<T, TargetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TargetError::Invalid(format!("backup I/O task failed: {e}")))?
}

impl LocalTarget {
    /// Opens (creating if needed) the directory `root`; removes stale temporaries.
    pub async fn open(root: PathBuf) -> Result<Self, TargetError> {
        blocking(move || {
            let tmp = root.join(TMP_DIR);
            std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
            for e in std::fs::read_dir(&tmp).map_err(io("reading", &tmp))? {
                let p = e.map_err(io("reading", &tmp))?.path();
                let _ = std::fs::remove_file(&p);
            }
            sync_dir(&root)?;
            Ok(Self { root })
        })
        .await
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// Writes `data` to a fresh temporary file, fsynced; returns its path.
    fn write_temp(&self, data: &[u8]) -> Result<PathBuf, TargetError> {
        let mut r = [0u8; 12];
        crate::crypto::fill_random(&mut r).map_err(|e| TargetError::Invalid(e.to_string()))?;
        let tmp = self.root.join(TMP_DIR).join(hex::encode(r));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        let res = f
            .write_all(data)
            .and_then(|_| f.sync_all())
            .map_err(io("writing", &tmp));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map(|_| tmp)
    }

    fn ensure_parent(&self, path: &Path) -> Result<PathBuf, TargetError> {
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        if !parent.is_dir() {
            std::fs::create_dir_all(&parent).map_err(io("creating", &parent))?;
            // Make the new directory entries durable up to the root.
            let mut d = parent.as_path();
            while let Some(up) = d.parent() {
                sync_dir(up)?;
                if up == self.root {
                    break;
                }
                d = up;
            }
        }
        Ok(parent)
    }

    fn put_sync(&self, key: &ObjectKey, data: &[u8], replace: bool) -> Result<(), TargetError> {
        let dst = self.path(key);
        let parent = self.ensure_parent(&dst)?;
        let tmp = self.write_temp(data)?;
        let res = if replace {
            std::fs::rename(&tmp, &dst).map_err(io("renaming into", &dst))
        } else {
            // link(2) fails with EEXIST if the name exists: an atomic
            // create-if-absent; then drop the temporary name. File systems
            // without hard links get check-then-rename (one writer per
            // destination is the rule anyway).
            let r = std::fs::hard_link(&tmp, &dst).or_else(|e| match e.kind() {
                ErrorKind::Unsupported | ErrorKind::PermissionDenied if !dst.exists() => {
                    std::fs::rename(&tmp, &dst)
                }
                _ => Err(e),
            });
            let r = r.map_err(|e| {
                if e.kind() == ErrorKind::AlreadyExists {
                    TargetError::Exists {
                        target: self.describe(),
                        key: key.to_string(),
                    }
                } else {
                    TargetError::Io {
                        what: "linking",
                        path: dst.clone(),
                        source: e,
                    }
                }
            });
            let _ = std::fs::remove_file(&tmp);
            r
        };
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res?;
        sync_dir(&parent)
    }

    fn list_sync(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TargetError> {
        // Scan the deepest directory the prefix names.
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let mut out = Vec::new();
        let mut stack = vec![(self.root.join(dir_part), dir_part.to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io("listing", &dir)(e)),
            };
            for e in rd {
                let e = e.map_err(io("listing", &dir))?;
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let key = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                let md = e.metadata().map_err(io("listing", &e.path()))?;
                if md.is_dir() {
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        stack.push((e.path(), key));
                    }
                } else if md.is_file() && key.starts_with(prefix) {
                    out.push(ObjectInfo {
                        key,
                        size: md.len(),
                        modified: md.modified().ok(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[async_trait]
impl BackupTarget for LocalTarget {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError> {
        let (t, k) = (self.clone(), key.clone());
        blocking(move || t.put_sync(&k, &data, true)).await
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, TargetError> {
        let (t, k) = (self.clone(), key.clone());
        blocking(move || {
            let p = t.path(&k);
            match std::fs::read(&p) {
                Ok(v) => Ok(Bytes::from(v)),
                Err(e) if e.kind() == ErrorKind::NotFound => Err(TargetError::NotFound {
                    target: t.describe(),
                    key: k.to_string(),
                }),
                Err(e) => Err(io("reading", &p)(e)),
            }
        })
        .await
    }

    async fn exists(&self, key: &ObjectKey) -> Result<bool, TargetError> {
        let p = self.path(key);
        blocking(move || match std::fs::metadata(&p) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("checking", &p)(e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TargetError> {
        let (t, p) = (self.clone(), prefix.to_string());
        blocking(move || t.list_sync(&p)).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), TargetError> {
        let p = self.path(key);
        blocking(move || {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io("deleting", &p)(e)),
            }
            sync_dir(p.parent().unwrap_or(Path::new("/")))
        })
        .await
    }

    async fn publish(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError> {
        let (t, k) = (self.clone(), key.clone());
        blocking(move || t.put_sync(&k, &data, false)).await
    }
}

// ------------------------------------------------------------------- S3 ---

/// S3 client settings beyond the standard AWS configuration (environment,
/// profile, web identity, instance metadata).
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Endpoint override; default `AWS_ENDPOINT_URL_S3`, then
    /// `AWS_ENDPOINT_URL`, then AWS's regional endpoint.
    pub endpoint: Option<String>,
    /// Path-style addressing; default: on when an endpoint override is in
    /// effect (moto, MinIO), off for AWS.
    pub force_path_style: Option<bool>,
    /// Objects larger than this go up as multipart uploads.
    pub multipart_threshold: usize,
    /// Multipart part size (at least [`MIN_PART_SIZE`]).
    pub part_size: usize,
    /// Parts of one object uploaded at once.
    pub parallel_parts: usize,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            endpoint: None,
            force_path_style: None,
            multipart_threshold: 2 * MIN_PART_SIZE,
            part_size: MIN_PART_SIZE,
            parallel_parts: 4,
        }
    }
}

/// An S3 bucket prefix. Objects are `<prefix>/<key>`.
#[derive(Clone)]
pub struct S3Target {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    multipart_threshold: usize,
    part_size: usize,
    parallel_parts: usize,
}

impl fmt::Debug for S3Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Target")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn detail<E>(e: &aws_sdk_s3::error::SdkError<E>) -> String
where
    E: std::error::Error + 'static,
{
    aws_sdk_s3::error::DisplayErrorContext(e).to_string()
}

impl S3Target {
    /// Builds the client from the standard AWS configuration plus `opts`.
    pub async fn connect(bucket: String, prefix: String, opts: &S3Options) -> Self {
        use aws_config::BehaviorVersion;
        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
        let endpoint = opts
            .endpoint
            .clone()
            .filter(|e| !e.trim().is_empty())
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL"));
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            // Integrity is end to end (SHA-256 of every object, checked on
            // read); per-request CRCs add nothing and not every
            // S3-compatible store accepts them.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if sdk.region().is_none() {
            b = b.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        let path_style = opts.force_path_style.unwrap_or(endpoint.is_some());
        if let Some(ep) = endpoint {
            b = b.endpoint_url(ep.trim());
        }
        b = b.force_path_style(path_style);
        Self::from_client(
            aws_sdk_s3::Client::from_conf(b.build()),
            bucket,
            prefix,
            opts,
        )
    }

    /// A target over an existing client.
    pub fn from_client(
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
        opts: &S3Options,
    ) -> Self {
        Self {
            client,
            bucket,
            prefix: prefix.trim_matches('/').to_string(),
            multipart_threshold: opts.multipart_threshold.max(MIN_PART_SIZE),
            part_size: opts.part_size.max(MIN_PART_SIZE),
            parallel_parts: opts.parallel_parts.max(1),
        }
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn err(&self, op: &'static str, key: &str, detail: String) -> TargetError {
        TargetError::S3 {
            op,
            bucket: self.bucket.clone(),
            key: self.full(key),
            detail,
        }
    }

    async fn put_single(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key.as_str()))
            .body(data.into())
            .send()
            .await
            .map_err(|e| self.err("PutObject", key.as_str(), detail(&e)))?;
        Ok(())
    }

    /// Multipart upload with up to `parallel_parts` parts in flight; aborts
    /// the upload on any failure (an unfinished upload is never listed; a
    /// crash can leave one behind: a bucket lifecycle rule
    /// `AbortIncompleteMultipartUpload` cleans those up).
    async fn put_multipart(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let full = self.full(key.as_str());
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.err("CreateMultipartUpload", key.as_str(), detail(&e)))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| self.err("CreateMultipartUpload", key.as_str(), "no upload id".into()))?
            .to_string();

        let result = async {
            let sem = Arc::new(tokio::sync::Semaphore::new(self.parallel_parts));
            let mut set = tokio::task::JoinSet::new();
            let mut offset = 0usize;
            let mut number = 1i32;
            while offset < data.len() {
                // The last part takes the remainder if it would be < part size.
                let remaining = data.len() - offset;
                let len = if remaining < 2 * self.part_size {
                    remaining
                } else {
                    self.part_size
                };
                let body = data.slice(offset..offset + len);
                let permit = sem
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| self.err("UploadPart", key.as_str(), e.to_string()))?;
                let (client, bucket, k, id) = (
                    self.client.clone(),
                    self.bucket.clone(),
                    full.clone(),
                    upload_id.clone(),
                );
                set.spawn(async move {
                    let _permit = permit;
                    let out = client
                        .upload_part()
                        .bucket(bucket)
                        .key(k)
                        .upload_id(id)
                        .part_number(number)
                        .body(body.into())
                        .send()
                        .await
                        .map_err(|e| detail(&e))?;
                    let etag = out
                        .e_tag()
                        .ok_or("UploadPart returned no ETag")?
                        .to_string();
                    Ok::<_, String>(
                        CompletedPart::builder()
                            .e_tag(etag)
                            .part_number(number)
                            .build(),
                    )
                });
                offset += len;
                number += 1;
            }
            let mut parts = Vec::new();
            while let Some(joined) = set.join_next().await {
                let part = joined
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
                    .map_err(|d| self.err("UploadPart", key.as_str(), d))?;
                parts.push(part);
            }
            parts.sort_by_key(|p| p.part_number());
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| self.err("CompleteMultipartUpload", key.as_str(), detail(&e)))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }
}

#[async_trait]
impl BackupTarget for S3Target {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError> {
        if data.len() > self.multipart_threshold {
            self.put_multipart(key, data).await
        } else {
            self.put_single(key, data).await
        }
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, TargetError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key.as_str()))
            .send()
            .await
            .map_err(|e| {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    TargetError::NotFound {
                        target: self.describe(),
                        key: key.to_string(),
                    }
                } else {
                    self.err("GetObject", key.as_str(), detail(&e))
                }
            })?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| self.err("GetObject", key.as_str(), e.to_string()))?;
        Ok(body.into_bytes())
    }

    async fn exists(&self, key: &ObjectKey) -> Result<bool, TargetError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full(key.as_str()))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(self.err("HeadObject", key.as_str(), detail(&e))),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, TargetError> {
        let full_prefix = self.full(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.err("ListObjectsV2", prefix, detail(&e)))?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let Some(rel) = k.get(strip..) else { continue };
                if ObjectKey::parse(rel).is_err() {
                    continue;
                }
                let modified = o
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok());
                out.push(ObjectInfo {
                    key: rel.to_string(),
                    size: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    modified,
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), TargetError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full(key.as_str()))
            .send()
            .await
            .map_err(|e| self.err("DeleteObject", key.as_str(), detail(&e)))?;
        Ok(())
    }

    async fn publish(&self, key: &ObjectKey, data: Bytes) -> Result<(), TargetError> {
        // S3 makes an object visible only once complete. Backup ids carry 32
        // random bits, so two writers never race on one name; the check
        // below catches a re-used id.
        if self.exists(key).await? {
            return Err(TargetError::Exists {
                target: self.describe(),
                key: key.to_string(),
            });
        }
        self.put_single(key, data).await
    }
}

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
        // Reopening removes stale temporaries.
        drop(t);
        LocalTarget::open(dir.path().join("b")).await.unwrap();
        assert!(!dir.path().join("b/.tmp/junk").exists());
    }
}
