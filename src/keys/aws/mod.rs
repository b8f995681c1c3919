//! The AWS KMS key provider: a customer-managed symmetric CMK wraps the
//! universe key; the sidecar never sees the CMK and keeps the universe key only
//! in memory.
//!
//! This module owns everything AWS-specific:
//!
//! * building an `aws-sdk-kms` client from the standard AWS chain (environment
//!   keys, profiles, web identity / IRSA, ECS, and last the instance metadata
//!   service with a short, single-attempt timeout so an absent IMDS cannot hang
//!   start-up), with the region taken from the key ARN unless configured, the
//!   endpoint from `--kms-endpoint` or the SDK's own `AWS_ENDPOINT_URL_KMS` /
//!   `AWS_ENDPOINT_URL`, and bounded connect / attempt / operation timeouts plus
//!   the SDK's standard (jittered, exponential) retry with a bounded attempt count;
//! * [`AwsKmsProvider`], the [`KeyProvider`] implementation
//!   (GenerateDataKeyWithoutPlaintext / Decrypt with the key id pinned / DescribeKey);
//! * the `validate-key` checks ([`AwsKmsProvider::validate`], [`validate_key`]),
//!   which return a [`ValidationReport`] with one clear line per check;
//! * the mapping from SDK errors to clear messages ([`classify_sdk_error`],
//!   [`classify_error_code`], [`describe_failure`]), kept pure so it is unit-tested;
//! * [`with_startup_deadline`], which bounds start-up against an unreachable KMS;
//! * [`KmsCallStats`], per-operation call counters for the metrics layer.
//!
//! Plaintext from Decrypt goes straight into [`SecretKey::take_from`], which
//! zeroizes the SDK-owned `Vec` it came in. Copies inside the HTTP/JSON layers
//! of the SDK (the base64 response body) are not reachable from here and are
//! freed, not wiped, by the SDK.

//!
//! Submodules: `arn`, `stats`, `classify` and `validate`.

mod arn;
mod classify;
mod stats;
#[cfg(test)]
mod tests;
mod validate;

pub use arn::*;
pub use classify::*;
pub use stats::*;
pub use validate::*;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::provider_config::ProviderConfig;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyMetadata};
use zeroize::Zeroize;

use super::{DeadlineError, EncryptionContext, KeyError, KeyProvider, MasterKeyState, WrappedKey};
use crate::crypto::{SecretKey, KEY_LEN};
/// Provider name stored in the key registry.
pub const PROVIDER_KIND: &str = "aws";

/// How to reach and use the CMK. Everything not given here comes from the
/// standard AWS chain.
#[derive(Debug, Clone)]
pub struct AwsKmsOptions {
    /// The CMK's key ARN (`--kms-key-id`).
    pub key_arn: String,
    /// Region override (`--kms-region`); default: the ARN's region.
    pub region: Option<String>,
    /// Endpoint override (`--kms-endpoint`); default: `AWS_ENDPOINT_URL_KMS`,
    /// `AWS_ENDPOINT_URL`, then the regional AWS endpoint.
    pub endpoint: Option<String>,
    /// TCP/TLS connect timeout per attempt.
    pub connect_timeout: Duration,
    /// Socket read timeout.
    pub read_timeout: Duration,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Timeout of one operation including SDK retries.
    pub operation_timeout: Duration,
    /// Attempts per operation (SDK standard retry, exponential backoff with jitter).
    pub max_attempts: u32,
    /// First retry backoff.
    pub initial_backoff: Duration,
    /// Timeout of the instance metadata service when the chain reaches it
    /// (single attempt); it only matters on hosts with no other credentials.
    pub imds_timeout: Duration,
}

impl AwsKmsOptions {
    /// Options for `key_arn` with the default timeouts: connect 3 s, read 10 s,
    /// attempt 10 s, operation 30 s, 3 attempts from 500 ms backoff, IMDS 1 s.
    pub fn new(key_arn: impl Into<String>) -> Self {
        Self {
            key_arn: key_arn.into(),
            region: None,
            endpoint: None,
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
            max_attempts: 3,
            initial_backoff: Duration::from_millis(500),
            imds_timeout: Duration::from_secs(1),
        }
    }
}

/// The AWS KMS key provider. Cheap to share behind an `Arc`.
pub struct AwsKmsProvider {
    client: aws_sdk_kms::Client,
    arn: KeyArn,
    arn_string: String,
    endpoint: String,
    stats: Arc<KmsCallStats>,
}

impl fmt::Debug for AwsKmsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsProvider")
            .field("key_arn", &self.arn_string)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

pub(crate) fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub(crate) fn to_hash_map(ctx: &EncryptionContext) -> HashMap<String, String> {
    ctx.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl AwsKmsProvider {
    /// Builds the client. No network I/O happens here: credentials are
    /// resolved lazily on the first call (bounded by the identity cache's load
    /// timeout; IMDS gets one short attempt). Fails only on a bad ARN.
    pub async fn new(opts: &AwsKmsOptions) -> Result<Self, KeyError> {
        let arn =
            parse_key_arn(opts.key_arn.trim()).map_err(|e| KeyError::Config(e.to_string()))?;
        let region_name = opts.region.clone().unwrap_or_else(|| arn.region.clone());
        if region_name != arn.region {
            tracing::warn!(
                configured = %region_name,
                arn_region = %arn.region,
                "the configured KMS region differs from the key ARN's region; KMS will not find the key there"
            );
        }
        let region = Region::new(region_name.clone());
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .operation_attempt_timeout(opts.attempt_timeout)
            .operation_timeout(opts.operation_timeout)
            .build();
        let retry = RetryConfig::standard()
            .with_max_attempts(opts.max_attempts.max(1))
            .with_initial_backoff(opts.initial_backoff)
            .with_max_backoff(Duration::from_secs(5));

        // The default chain, with the region pinned (no IMDS region lookup) and
        // an IMDS client that gives up quickly when there is no metadata service.
        let imds = aws_config::imds::Client::builder()
            .connect_timeout(opts.imds_timeout)
            .read_timeout(opts.imds_timeout)
            .max_attempts(1)
            .build();
        let provider_config = ProviderConfig::default()
            .with_behavior_version(Some(BehaviorVersion::latest()))
            .with_region(Some(region.clone()))
            .with_timeout_config(timeouts.clone())
            .with_retry_config(retry.clone());
        let credentials = DefaultCredentialsChain::builder()
            .configure(provider_config)
            .region(region.clone())
            .imds_client(imds)
            .build()
            .await;

        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .credentials_provider(credentials)
            .timeout_config(timeouts)
            .retry_config(retry);
        if let Some(ep) = opts.endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
            loader = loader.endpoint_url(ep.trim());
        }
        let sdk_config = loader.load().await;
        let client = aws_sdk_kms::Client::new(&sdk_config);

        let endpoint = opts
            .endpoint
            .clone()
            .filter(|e| !e.trim().is_empty())
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL_KMS"))
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("https://kms.{region_name}.amazonaws.com"));
        let arn_string = arn.to_string();
        Ok(Self {
            client,
            arn,
            arn_string,
            endpoint,
            stats: Arc::new(KmsCallStats::default()),
        })
    }

    /// The CMK ARN.
    pub fn key_arn(&self) -> &KeyArn {
        &self.arn
    }

    /// The endpoint calls go to (for messages).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Call counters (shared; the metrics layer may keep the `Arc`).
    pub fn stats(&self) -> Arc<KmsCallStats> {
        Arc::clone(&self.stats)
    }

    /// Records a call outcome and turns an SDK error into (kind, message),
    /// logging it with the SDK's full error context.
    fn finish<T, E, R>(
        &self,
        op: KmsOp,
        started: Instant,
        res: Result<T, SdkError<E, R>>,
    ) -> Result<T, (FailureKind, String)>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug + 'static,
    {
        let elapsed = started.elapsed();
        match res {
            Ok(v) => {
                self.stats.record(op, None, elapsed);
                tracing::debug!(
                    op = op.name(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "AWS KMS call ok"
                );
                Ok(v)
            }
            Err(e) => {
                let (kind, msg) = classify_sdk_error(op, &self.arn_string, &e);
                self.stats.record(op, Some(kind), elapsed);
                tracing::warn!(
                    op = op.name(),
                    endpoint = %self.endpoint,
                    kind = ?kind,
                    error = %DisplayErrorContext(&e),
                    "AWS KMS call failed"
                );
                Err((kind, msg))
            }
        }
    }

    async fn describe(&self) -> Result<KeyMetadata, (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .describe_key()
            .key_id(&self.arn_string)
            .send()
            .await;
        let out = self.finish(KmsOp::DescribeKey, started, res)?;
        out.key_metadata.ok_or_else(|| {
            (
                FailureKind::Other,
                "DescribeKey returned no KeyMetadata".to_string(),
            )
        })
    }

    async fn generate(&self, ctx: &EncryptionContext) -> Result<Vec<u8>, (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .generate_data_key_without_plaintext()
            .key_id(&self.arn_string)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(to_hash_map(ctx)))
            .send()
            .await;
        let out = self.finish(KmsOp::GenerateDataKeyWithoutPlaintext, started, res)?;
        match out.ciphertext_blob {
            Some(b) if !b.as_ref().is_empty() => Ok(b.into_inner()),
            _ => Err((
                FailureKind::Other,
                "GenerateDataKeyWithoutPlaintext returned no CiphertextBlob".to_string(),
            )),
        }
    }

    async fn decrypt(
        &self,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .decrypt()
            .key_id(&self.arn_string)
            .ciphertext_blob(Blob::new(wrapped.to_vec()))
            .set_encryption_context(Some(to_hash_map(ctx)))
            .send()
            .await;
        let mut out = self.finish(KmsOp::Decrypt, started, res)?;
        let mut plain = out
            .plaintext
            .take()
            .map(Blob::into_inner)
            .unwrap_or_default();
        if let Some(id) = out.key_id.as_deref() {
            if id != self.arn_string && !self.arn_string.ends_with(&format!("/{id}")) {
                plain.zeroize();
                return Err((
                    FailureKind::InvalidCiphertext,
                    format!("Decrypt answered for key {id}, not {}", self.arn_string),
                ));
            }
        }
        let len = plain.len();
        // `take_from` wipes `plain` in both outcomes.
        SecretKey::take_from(&mut plain).map_err(|_| {
            (
                FailureKind::Other,
                format!("Decrypt returned {len} bytes of plaintext, expected {KEY_LEN}"),
            )
        })
    }

    /// KMS Encrypt of an existing universe key under this CMK, bound to
    /// `ctx`. The request body (base64 of the key) is built and freed inside
    /// the SDK; the copy handed to it here is the only one this code makes.
    async fn encrypt_key(
        &self,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<Vec<u8>, (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .encrypt()
            .key_id(&self.arn_string)
            .plaintext(Blob::new(key.expose().to_vec()))
            .set_encryption_context(Some(to_hash_map(ctx)))
            .send()
            .await;
        let out = self.finish(KmsOp::Encrypt, started, res)?;
        self.check_answering_key(out.key_id.as_deref())?;
        match out.ciphertext_blob {
            Some(b) if !b.as_ref().is_empty() => Ok(b.into_inner()),
            _ => Err((
                FailureKind::Other,
                "Encrypt returned no CiphertextBlob".to_string(),
            )),
        }
    }

    /// Refuses an answer that names another key than this provider's CMK.
    fn check_answering_key(&self, id: Option<&str>) -> Result<(), (FailureKind, String)> {
        match id {
            Some(id) if id != self.arn_string && !self.arn_string.ends_with(&format!("/{id}")) => {
                Err((
                    FailureKind::InvalidCiphertext,
                    format!("KMS answered for key {id}, not {}", self.arn_string),
                ))
            }
            _ => Ok(()),
        }
    }

    /// KMS ReEncrypt of `wrapped` (a blob of CMK `source_arn` under `ctx`) to
    /// this provider's CMK with the same encryption context: the universe key
    /// never leaves KMS. Needs `kms:ReEncryptFrom` on the source key and
    /// `kms:ReEncryptTo` on this one.
    pub async fn re_encrypt_from(
        &self,
        source_arn: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        let started = Instant::now();
        let res = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped.0.clone()))
            .source_key_id(source_arn)
            .set_source_encryption_context(Some(to_hash_map(ctx)))
            .destination_key_id(&self.arn_string)
            .set_destination_encryption_context(Some(to_hash_map(ctx)))
            .send()
            .await;
        let out = self
            .finish(KmsOp::ReEncrypt, started, res)
            .map_err(|(k, m)| key_error(k, m))?;
        self.check_answering_key(out.key_id.as_deref())
            .map_err(|(k, m)| key_error(k, m))?;
        match out.ciphertext_blob {
            Some(b) if !b.as_ref().is_empty() => Ok(WrappedKey(b.into_inner())),
            _ => Err(KeyError::Refused(
                "ReEncrypt returned no CiphertextBlob".to_string(),
            )),
        }
    }

    async fn encrypt_probe(&self) -> Result<(), (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .encrypt()
            .key_id(&self.arn_string)
            .plaintext(Blob::new(b"ear-sidecar validate-key".to_vec()))
            .set_encryption_context(Some(to_hash_map(&validation_context())))
            .send()
            .await;
        self.finish(KmsOp::Encrypt, started, res).map(|_| ())
    }

    async fn list_aliases_probe(&self) -> Result<usize, (FailureKind, String)> {
        let started = Instant::now();
        let res = self
            .client
            .list_aliases()
            .key_id(&self.arn_string)
            .limit(10)
            .send()
            .await;
        let out = self.finish(KmsOp::ListAliases, started, res)?;
        Ok(out.aliases.map(|a| a.len()).unwrap_or(0))
    }

    /// Unwraps with a start-up deadline: transient failures are retried until
    /// `deadline`; see [`with_startup_deadline`].
    pub async fn unwrap_with_deadline(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
        deadline: Duration,
    ) -> Result<SecretKey, KeyError> {
        with_startup_deadline(&self.endpoint, deadline, || self.unwrap(wrapped, ctx)).await
    }

    /// Runs the managed service's key checks (see [`ValidationReport`]). Never
    /// touches a data directory. Later checks are skipped when KMS is
    /// unreachable or the key does not exist.
    pub async fn validate(&self) -> ValidationReport {
        let mut report = ValidationReport {
            key_arn: self.arn_string.clone(),
            endpoint: self.endpoint.clone(),
            checks: vec![Check::pass(
                CHECK_ARN,
                format!("{} (region {})", self.arn_string, self.arn.region),
            )],
        };
        let mut skip_reason: Option<String> = None;
        match self.describe().await {
            Ok(md) => {
                report.checks.push(Check::pass(CHECK_DESCRIBE, "permitted"));
                let spec = md.key_spec().map(|s| s.as_str()).unwrap_or("(none)");
                report.checks.push(if spec == "SYMMETRIC_DEFAULT" {
                    Check::pass(CHECK_SPEC, "KeySpec SYMMETRIC_DEFAULT")
                } else {
                    Check::fail(
                        CHECK_SPEC,
                        format!(
                            "KeySpec is {spec}: a symmetric CMK (SYMMETRIC_DEFAULT) is required"
                        ),
                    )
                });
                let usage = md.key_usage().map(|s| s.as_str()).unwrap_or("(none)");
                report.checks.push(if usage == "ENCRYPT_DECRYPT" {
                    Check::pass(CHECK_USAGE, "KeyUsage ENCRYPT_DECRYPT")
                } else {
                    Check::fail(
                        CHECK_USAGE,
                        format!("KeyUsage is {usage}: ENCRYPT_DECRYPT is required"),
                    )
                });
                let state = md.key_state().map(|s| s.as_str()).unwrap_or("(none)");
                report.checks.push(if state == "Enabled" {
                    Check::pass(CHECK_STATE, "KeyState Enabled")
                } else {
                    Check::fail(
                        CHECK_STATE,
                        format!("KeyState is {state}: the CMK must be Enabled"),
                    )
                });
                report.checks.push(if md.multi_region() == Some(true) {
                    Check::fail(
                        CHECK_MULTI_REGION,
                        "the CMK is a multi-region key: only single-region keys are supported",
                    )
                } else {
                    Check::pass(CHECK_MULTI_REGION, "single-region key")
                });
            }
            Err((kind, msg)) => {
                report.checks.push(Check::fail(CHECK_DESCRIBE, msg));
                for name in [CHECK_SPEC, CHECK_USAGE, CHECK_STATE, CHECK_MULTI_REGION] {
                    report
                        .checks
                        .push(Check::skip(name, "no key metadata (DescribeKey failed)"));
                }
                if kind != FailureKind::AccessDenied {
                    skip_reason = Some(format!("DescribeKey failed ({kind:?})"));
                }
            }
        }
        if let Some(why) = skip_reason {
            for name in [CHECK_ALIASES, CHECK_GENERATE, CHECK_DECRYPT, CHECK_ENCRYPT] {
                report.checks.push(Check::skip(name, why.clone()));
            }
            return report;
        }
        report.checks.push(match self.list_aliases_probe().await {
            Ok(n) => Check::pass(
                CHECK_ALIASES,
                format!("permitted ({n} alias(es) on the key)"),
            ),
            Err((_, msg)) => Check::fail(CHECK_ALIASES, msg),
        });
        let ctx = validation_context();
        match self.generate(&ctx).await {
            Ok(blob) => {
                report.checks.push(Check::pass(
                    CHECK_GENERATE,
                    format!("AES_256 data key generated ({} byte blob)", blob.len()),
                ));
                report.checks.push(match self.decrypt(&blob, &ctx).await {
                    Ok(_key) => Check::pass(CHECK_DECRYPT, "the blob decrypts to 32 bytes"),
                    Err((_, msg)) => Check::fail(CHECK_DECRYPT, msg),
                });
            }
            Err((_, msg)) => {
                report.checks.push(Check::fail(CHECK_GENERATE, msg));
                report.checks.push(Check::skip(
                    CHECK_DECRYPT,
                    "no data key to decrypt (GenerateDataKeyWithoutPlaintext failed)",
                ));
            }
        }
        report.checks.push(match self.encrypt_probe().await {
            Ok(()) => Check::pass(CHECK_ENCRYPT, "permitted"),
            Err((_, msg)) => Check::fail(CHECK_ENCRYPT, msg),
        });
        report
    }
}

pub(crate) fn validation_context() -> EncryptionContext {
    EncryptionContext::from([("ear-sidecar".to_string(), "validate-key".to_string())])
}

#[async_trait]
impl KeyProvider for AwsKmsProvider {
    fn kind(&self) -> &'static str {
        PROVIDER_KIND
    }

    fn master_key_id(&self) -> String {
        self.arn_string.clone()
    }

    async fn generate_wrapped(&self, ctx: &EncryptionContext) -> Result<WrappedKey, KeyError> {
        self.generate(ctx)
            .await
            .map(WrappedKey)
            .map_err(|(k, m)| key_error(k, m))
    }

    async fn wrap_key(
        &self,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        self.encrypt_key(key, ctx)
            .await
            .map(WrappedKey)
            .map_err(|(k, m)| key_error(k, m))
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KeyError> {
        self.decrypt(&wrapped.0, ctx)
            .await
            .map_err(|(k, m)| key_error(k, m))
    }

    /// Decrypt of the canary. KMS refusing it for a reason that means the key
    /// is no longer ours to use (AccessDenied: `kms:Decrypt` removed from the
    /// key policy or grant; Disabled; invalid state; not found; the blob no
    /// longer decrypting) is a revocation; network trouble, throttling and
    /// credential problems are not.
    async fn canary_state(
        &self,
        canary: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<MasterKeyState, KeyError> {
        match self.decrypt(&canary.0, ctx).await {
            Ok(key) => {
                drop(key);
                Ok(MasterKeyState::Enabled)
            }
            Err((kind, msg))
                if describe_failure_is_revocation(kind)
                    || kind == FailureKind::InvalidCiphertext =>
            {
                Ok(MasterKeyState::Revoked(format!(
                    "kms:Decrypt failed: {msg}"
                )))
            }
            Err((kind, msg)) => Err(key_error(kind, msg)),
        }
    }

    /// DescribeKey. `Enabled` → usable. Disabled / PendingDeletion / … →
    /// revoked. A DescribeKey refused by KMS with AccessDenied, NotFound,
    /// Disabled or invalid-state also counts as a revocation (the key policy
    /// or grant was withdrawn, or the key deleted). Network errors, throttling
    /// and credential problems are `Err(Unavailable/Refused)`, never revocation.
    async fn master_key_state(&self) -> Result<MasterKeyState, KeyError> {
        match self.describe().await {
            Ok(md) => match md.key_state() {
                Some(s) => key_state_verdict(s.as_str()),
                None => Err(KeyError::Unavailable(
                    "DescribeKey returned no KeyState".to_string(),
                )),
            },
            Err((kind, msg)) if describe_failure_is_revocation(kind) => {
                Ok(MasterKeyState::Revoked(msg))
            }
            Err((kind, msg)) => Err(key_error(kind, msg)),
        }
    }
}

/// Runs `op` until it succeeds, fails with something other than
/// [`KeyError::Unavailable`], or `deadline` passes (see
/// [`super::with_deadline`]). On the deadline the error is
/// `Unavailable("AWS KMS at <endpoint> unreachable after <N>s: <last error>")`.
pub async fn with_startup_deadline<T, F, Fut>(
    endpoint: &str,
    deadline: Duration,
    op: F,
) -> Result<T, KeyError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KeyError>>,
{
    let end = tokio::time::Instant::now() + deadline;
    super::with_deadline(end, op).await.map_err(|e| match e {
        DeadlineError::Failed(e) => e,
        DeadlineError::TimedOut { last } => KeyError::Unavailable(format!(
            "AWS KMS at {endpoint} unreachable after {}: {}",
            human_duration(deadline),
            last.as_deref()
                .unwrap_or("no response (the request was still pending at the deadline)")
        )),
    })
}

pub(crate) fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
