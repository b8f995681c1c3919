//! The S3 target: aws-sdk-s3 on the KMS client's HTTP/TLS stack, multipart
//! uploads with parallel parts, path-style addressing for custom endpoints.

use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use super::*;

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
